"""Convert a published context compressor into a peft_ctx adapter folder, with its model card.

    python -m peft_ctx.convert SOURCE OUTPUT_DIR [--family NAME] [--base_model ID] [--overwrite]
        [--embedding_module PATH] [--encoder_tokenizer ID] [--decoder_index N]

SOURCE is a published checkpoint's folder or file (or its Hub id, where the Hub can be reached); its family is
recognised from its files or named with ``--family``. Only JSON configs and tensors are read; the checkpoint's code
never runs. ``peft_ctx.convert(SOURCE, OUTPUT_DIR, ...)`` does the same from Python (``peft_ctx.converting``).
"""

from __future__ import annotations

import argparse
import sys
import types
from typing import Any, Optional

from .converting import PublishedFamily, convert, converters, detect_family, families

__all__ = ["PublishedFamily", "convert", "converters", "detect_family", "families", "main"]


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    known = families()
    # The earlier form `convert FAMILY SOURCE OUT` still works.
    if len([a for a in argv if not a.startswith("-")]) >= 3 and argv and argv[0] in known:
        argv = [argv[1], argv[2], "--family", argv[0], *argv[3:]]
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.convert", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="the published checkpoint: a folder, a file, or a Hub id")
    parser.add_argument("output_dir", help="where to write the peft_ctx adapter (with README.md, its card)")
    parser.add_argument("--family", choices=sorted(known), default=None, help="default: recognised from the files")
    parser.add_argument("--base_model", default=None, help="the decoder's Hub id / folder, recorded in the adapter")
    parser.add_argument("--revision", default=None, help="the source's revision, recorded in the card")
    parser.add_argument("--embedding_module", default=None, help="input-embedding module path in the base model")
    parser.add_argument("--encoder_tokenizer", default=None, help="ARC: the encoder's tokenizer (Llama-3.2-3B's)")
    parser.add_argument("--decoder_index", type=int, default=None, help="ARC multi-decoder: which decoder's bridge")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output_dir")
    args = parser.parse_args(argv)
    given = ("embedding_module", "encoder_tokenizer", "decoder_index")
    overrides = {name: getattr(args, name) for name in given if getattr(args, name) is not None}
    command = "python -m peft_ctx.convert " + " ".join(argv)
    config = convert(
        args.source,
        args.output_dir,
        family=args.family,
        base_model_name_or_path=args.base_model,
        overwrite=args.overwrite,
        revision=args.revision,
        command=command,
        **overrides,
    )
    print(f"Wrote a peft_ctx {config.method} adapter to {args.output_dir} (card: {args.output_dir}/README.md)")


class _CallableModule(types.ModuleType):
    """Importing this module rebinds ``peft_ctx.convert`` to it; calling it converts, so that ``peft_ctx.convert(...)``
    keeps meaning the function."""

    def __call__(self, *args: Any, **kwargs: Any):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    main()
