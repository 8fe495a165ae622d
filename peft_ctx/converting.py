"""Converting a published context compressor into a peft_ctx adapter folder, with its model card: the machinery
behind ``peft_ctx.convert(...)`` and ``python -m peft_ctx.convert``.

SOURCE is a local folder or file of a published checkpoint (or its Hub id, where the Hub can be reached); the family
is recognised from its files, or named with ``--family``. Conversion reads JSON configs and tensors only (safetensors,
or torch files with ``weights_only=True``) and never runs the checkpoint's code. OUTPUT_DIR is written only when the
conversion succeeds, and an adapter already there is replaced only with ``--overwrite``. The families are the
registered methods' (``ContextMethod.converters``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

from safetensors import safe_open

from .methods import registered_methods


@dataclass(frozen=True)
class PublishedFamily:
    """A family of published checkpoints that one peft_ctx method loads, and how to convert it.

    ``detect(path)`` says whether a local file / folder is of this family (from its file names and JSON configs
    only); ``convert(path, output_dir, base_model_name_or_path=None, **overrides)`` writes the adapter's
    ``adapter_config.json`` and ``adapter_model.safetensors`` into an empty ``output_dir`` and returns the config.
    Calling the family converts (``family(source, output_dir)``), as the bare converter functions did.
    """

    name: str
    title: str
    method: str
    convert: Callable[..., Any]
    detect: Callable[[str], bool]
    hub_ids: tuple[str, ...]
    base_models: tuple[str, ...]
    paper: str
    license: Optional[str]  # the Hub licence id for the card metadata; None where the source gives none
    license_text: str
    looks_for: str  # what detect looks for, for the error listing every family

    def __call__(self, source: str, output_dir: str, **kwargs) -> Any:
        return self.convert(source, output_dir, **kwargs)


def refuse_existing_adapter(output_dir: str, overwrite: bool) -> None:
    """A family's converter called directly writes into ``output_dir``: never over an adapter unless told to."""
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already holds an adapter; pass overwrite=True (--overwrite) to replace it."
        )


def release_config(source: str, required: tuple[str, ...], family: str, hint: str) -> dict:
    """``source``'s config.json, which must hold ``required``: a ValueError naming the file and the fix otherwise."""
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{source} has no config.json; point at the {family} checkpoint folder ({hint}).")
    with open(path) as f:
        settings = json.load(f)
    missing = [key for key in required if key not in settings]
    if missing:
        raise ValueError(f"{path} lacks {missing}, which every {family} checkpoint's config has.")
    return settings


def peek_config(path: str) -> Optional[dict]:
    """The JSON config.json of folder ``path`` for a family's ``detect``, or None where there is none to read."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        return None
    try:
        with open(config_path) as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def families() -> dict[str, PublishedFamily]:
    """Every registered method's published families by name."""
    found = {}
    for method in registered_methods():
        for name, family in method.converters.items():
            found[name] = family
    return found


def converters() -> dict[str, Callable]:
    """The converters by family name (kept for callers of the earlier API)."""
    return dict(families())


def detect_family(source: str) -> PublishedFamily:
    """The one family whose files ``source`` has; a ValueError naming what each family looks for otherwise."""
    known = families()
    matches = [family for family in known.values() if family.detect(source)]
    if len(matches) == 1:
        return matches[0]
    listing = "; ".join(f"{f.name}: {f.looks_for}" for f in known.values())
    if not matches:
        raise ValueError(
            f"{source} is not a checkpoint of any family peft_ctx converts ({listing}). Name the family with "
            "--family if its files are laid out differently."
        )
    raise ValueError(
        f"{source} looks like several families ({', '.join(f.name for f in matches)}); name one with --family."
    )


def convert(
    source: str,
    output_dir: str,
    *,
    family: Optional[str] = None,
    base_model_name_or_path: Optional[str] = None,
    overwrite: bool = False,
    revision: Optional[str] = None,
    command: Optional[str] = None,
    **overrides: Any,
):
    """Convert a published checkpoint into a peft_ctx adapter folder with its model card (``README.md``).

    Args:
        source: a local file / folder of the published checkpoint, or its Hub id (downloaded where the Hub can be
            reached; the card then records the revision).
        output_dir: the adapter folder. It is written only if the conversion succeeds; an existing non-empty folder
            is replaced only with ``overwrite=True``.
        family: the family's name (``peft_ctx.convert.families()``); detected from the files when None.
        base_model_name_or_path: the decoder the adapter loads onto (default: the family's published base model when
            it has exactly one, else what the checkpoint records). When its config can be read, its hidden size is
            checked against the checkpoint's.
        revision: the source's revision, recorded in the card (read from a Hub cache path when not given).
        overrides: further fields of the method's config (e.g. ``prompt_template``).

    Example::

        import peft_ctx
        from peft import PeftModel

        peft_ctx.convert("xrag-7b/", "xrag-7b-peft_ctx", base_model_name_or_path="mistralai/Mistral-7B-Instruct-v0.2")
        model = PeftModel.from_pretrained(base, "xrag-7b-peft_ctx")
    """
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already exists and is not empty; pass overwrite=True (--overwrite) to replace it."
        )
    local, hub_id, revision = _resolve_source(source, revision)
    chosen = _family(family) if family is not None else detect_family(local)
    _check_overrides(chosen, overrides)
    base = base_model_name_or_path or (chosen.base_models[0] if len(chosen.base_models) == 1 else None)
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".peft_ctx-convert-", dir=parent)
    try:
        config = chosen.convert(local, staging, base_model_name_or_path=base, **overrides)
        _check_base_width(config, base)
        source_name = hub_id or source
        _write_card(chosen, config, local, staging, output_dir, source_name, hub_id is not None, revision, command)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return config


def _check_overrides(family: PublishedFamily, overrides: dict[str, Any]) -> None:
    """Settings a family's conversion takes: its converter's own arguments and its method's config fields."""
    from .methods import get_method

    parameters = inspect.signature(family.convert).parameters.values()
    accepted = {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    accepted |= {f.name for f in dataclasses.fields(get_method(family.method).config_class)}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        own = sorted(p.name for p in parameters if p.default is not p.empty)
        raise ValueError(
            f"{', '.join(unknown)}: not a setting of a {family.title} conversion; it takes the fields of "
            f"{get_method(family.method).config_class.__name__} (e.g. prompt_template) and the converter's own "
            f"arguments ({', '.join(own)})."
        )


def _family(name: str) -> PublishedFamily:
    known = families()
    if name not in known:
        raise ValueError(f"family={name!r} is not one peft_ctx converts; use one of {', '.join(sorted(known))}.")
    return known[name]


_HUB_ID = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+)((?:/[\w.-]+)*)$")  # org/name, then a path inside it
_SNAPSHOT = re.compile(r"/snapshots/([0-9a-f]{40})(?:/|$)")


def _resolve_source(source: str, revision: Optional[str]) -> tuple[str, Optional[str], Optional[str]]:
    """The local path of ``source``, its Hub id if it was one, and its revision if known.

    A Hub source is ``org/name`` or ``org/name/path/inside`` (a subfolder such as CLaRa's ``compression-16``, or one
    file such as one of SPRING's tensors); only that part is downloaded."""
    if os.path.exists(source):
        match = _SNAPSHOT.search(os.path.abspath(source))
        return source, None, revision or (match.group(1) if match else None)
    match = _HUB_ID.match(source)
    if match is None:
        raise ValueError(f"{source} does not exist; give the published checkpoint's folder or file, or its Hub id.")
    repo_id, inside = match.group(1), match.group(2).strip("/")
    try:
        from huggingface_hub import HfApi, snapshot_download

        info = HfApi().model_info(repo_id, revision=revision)
        patterns = [inside, f"{inside}/*"] if inside else None
        local = snapshot_download(repo_id, revision=info.sha, allow_patterns=patterns)
    except Exception as exc:  # offline, unknown repo, gated model: all say the same to the user
        raise ValueError(
            f"Cannot download {source} from the Hugging Face Hub ({type(exc).__name__}: {exc}); download it "
            "elsewhere (hf download) and give the folder."
        ) from exc
    local = os.path.join(local, inside) if inside else local
    if not os.path.exists(local):
        raise ValueError(f"{repo_id} has no {inside!r} at revision {info.sha}; check the path inside the repository.")
    return local, source, info.sha


def _check_base_width(config, base: Optional[str]) -> None:
    """A base model of another width than the checkpoint's is refused here, not at loading time."""
    hidden = getattr(config, "base_hidden_size", None)
    if base is None or hidden is None:
        return
    try:
        from transformers import AutoConfig

        base_config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError):
        return  # not reachable here (a Hub id offline): PeftModel.from_pretrained checks the shapes when loading
    width = getattr(base_config.get_text_config(), "hidden_size", None)
    if width is not None and width != hidden:
        raise ValueError(
            f"The checkpoint's embeddings are {hidden}-d but base model {base!r} has hidden size {width}; give the "
            "base model the checkpoint was trained with (--base_model)."
        )


def _write_card(family, config, local, staging, output_dir, source, source_is_hub, revision, command) -> None:
    from .hub import make_card

    with safe_open(os.path.join(staging, "adapter_model.safetensors"), framework="pt") as f:
        trainable = sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    provenance = {
        "source": source,
        "source_is_hub": source_is_hub,
        "source_url": _hub_url(source, revision) if source_is_hub else None,
        "source_title": family.title,
        "revision": revision,
        "license_text": family.license_text,
        "paper": family.paper,
        "command": command or f"peft_ctx.convert({source!r}, {output_dir!r}, family={family.name!r})",
        "files_read": _files_read(local),
    }
    card = make_card(
        None,
        f"{_namespace(source, source_is_hub)}/{_safe_name(os.path.basename(os.path.normpath(output_dir)))}",
        config=config,
        trainable_parameters=trainable,
        base_model=config.base_model_name_or_path,
        license=family.license,
        provenance=provenance,
    )
    card.save(os.path.join(staging, "README.md"))
    with open(os.path.join(staging, "conversion.json"), "w") as f:
        json.dump({k: v for k, v in provenance.items() if k != "source_title"} | {"family": family.name}, f, indent=1)


_PICKLED = (".pt", ".pth", ".bin")


def _files_read(local: str) -> str:
    """The checkpoint's config and weight files, each with how it is read (for the card)."""
    names = [os.path.basename(local)] if os.path.isfile(local) else sorted(os.listdir(local))
    weights = [n for n in names if n.endswith((".safetensors", *_PICKLED)) or n == "config.json"]
    described = [
        f"`{n}` (pickled tensors, read with `torch.load(weights_only=True)`)" if n.endswith(_PICKLED) else f"`{n}`"
        for n in weights
    ]
    return ", ".join(described) or "the checkpoint's files"


def _hub_url(source: str, revision: Optional[str]) -> str:
    repo_id, inside = _HUB_ID.match(source).groups()
    inside = inside.strip("/")
    return f"https://huggingface.co/{repo_id}" + (f"/tree/{revision or 'main'}/{inside}" if inside else "")


def _namespace(source: str, source_is_hub: bool) -> str:
    return source.split("/")[0] if source_is_hub else "your-name"


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]", "-", name).strip("-.") or "converted"
