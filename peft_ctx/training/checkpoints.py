"""Complete checkpoints (resuming only from one whose save finished) and saving an adapter without overwriting."""

from __future__ import annotations

import os
import re
import shutil

COMPLETE_MARKER = "peft_ctx_checkpoint_complete.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def resolve_resume(resume_from_checkpoint, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a folder, or true/auto/last for the newest complete checkpoint in output_dir."""
    if resume_from_checkpoint in (None, False, "", "false", "False", "no"):
        return None
    if resume_from_checkpoint in (True, "true", "True", "auto", "last"):
        return last_complete_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume_from_checkpoint, COMPLETE_MARKER)):
        raise ValueError(
            f"{resume_from_checkpoint} is not a complete peft_ctx checkpoint (no {COMPLETE_MARKER}: the run was "
            "probably killed while writing it); resume from an earlier one or pass --resume_from_checkpoint auto."
        )
    return resume_from_checkpoint


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` folder that a ContextSFTTrainer finished writing (None if there is none).

    A run killed while writing a checkpoint leaves a folder without the completion marker; it is skipped.
    """
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        match = _CHECKPOINT_RE.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, COMPLETE_MARKER)):
            steps.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(steps)[1]) if steps else None


def save_adapter(model, output_dir: str, overwrite: bool = False, **kwargs) -> str:
    """``save_pretrained`` into a temporary folder renamed into place: a killed save never looks complete."""
    if os.path.isfile(os.path.join(output_dir, "adapter_config.json")) and not overwrite:
        raise FileExistsError(f"{output_dir} already holds an adapter; pass overwrite=True to replace it.")
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(output_dir))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # peft_ctx never resizes the vocabulary, so PEFT's "auto" check (which looks the base model up on the Hub, or
    # warns offline) has nothing to find.
    kwargs.setdefault("save_embedding_layers", False)
    model.save_pretrained(tmp, **kwargs)
    if os.path.isdir(output_dir):
        # Keep what else the folder holds (checkpoints, logs); replace only the adapter files. The config goes first
        # and comes back last, so a folder caught half-way never looks like a complete adapter.
        config_path = os.path.join(output_dir, "adapter_config.json")
        if os.path.exists(config_path):
            os.remove(config_path)
        names = sorted(os.listdir(tmp), key=lambda name: name == "adapter_config.json")
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, output_dir)
    return output_dir
