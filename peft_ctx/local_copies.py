"""Local copies of Hub models, so that adapters record Hub ids and still load on a machine without the Hub.

An adapter config names its base model, retriever and compressor by Hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``),
which any PEFT user can resolve. A machine that holds a copy of such a model elsewhere (converted from an offline
package, or on a shared disk) lists it in a JSON file ``{hub_id: folder}``: ``$PEFT_CTX_LOCAL_COPIES``, by default
``local_copies.json`` in ``$PEFT_CTX_CACHE`` (``~/.cache/peft_ctx``). peft_ctx's loaders read a name through
``resolve``; the config keeps the Hub id.

Example::

    peft_ctx.local_copies.register("HuggingFaceTB/SmolLM2-135M-Instruct", "/data/smollm2")
    peft_ctx.local_copies.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")  # '/data/smollm2'
"""

from __future__ import annotations

import json
import os
from typing import Optional

from filelock import FileLock
from transformers import AutoModelForCausalLM


def cache_dir() -> str:
    """peft_ctx's cache folder: ``$PEFT_CTX_CACHE``, default ``~/.cache/peft_ctx``."""
    return os.environ.get("PEFT_CTX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_ctx")


def copies_file() -> str:
    return os.environ.get("PEFT_CTX_LOCAL_COPIES") or os.path.join(cache_dir(), "local_copies.json")


def copies() -> dict[str, str]:
    """Every listed copy, ``{hub_id: folder}`` (empty when the file does not exist)."""
    path = copies_file()
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not a JSON object of {{hub_id: folder}} ({exc}); fix or delete it.") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ValueError(f"{path} must hold a JSON object of {{hub_id: folder}} strings.")
    return data


def register(hub_id: str, folder: str) -> None:
    """List ``folder`` as this machine's copy of ``hub_id`` (replacing an earlier entry for that id)."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder} is not a folder; register the folder that holds the model's files.")
    path = copies_file()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with FileLock(path + ".lock"):
        data = copies()
        data[hub_id] = os.path.abspath(folder)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def resolve(name_or_path: Optional[str]) -> Optional[str]:
    """The folder to load ``name_or_path`` from: a listed local copy of a Hub id, else the name as it is (a folder,
    or a Hub id that transformers fetches or finds in its own cache)."""
    if not name_or_path or os.path.isdir(name_or_path):
        return name_or_path
    folder = copies().get(name_or_path)
    return folder if folder is not None and os.path.isdir(folder) else name_or_path


def load_model(name_or_path: str, model_class=None, **kwargs):
    """``model_class.from_pretrained`` (default ``AutoModelForCausalLM``) from the local copy of ``name_or_path`` when
    one is listed, keeping ``name_or_path`` as the model's name, which PEFT records as the adapter's base model."""
    model_class = model_class or AutoModelForCausalLM
    model = model_class.from_pretrained(resolve(name_or_path), **kwargs)
    model.name_or_path = name_or_path
    return model
