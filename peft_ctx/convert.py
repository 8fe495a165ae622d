"""Convert official research checkpoints into peft_ctx adapters.

python -m peft_ctx.convert xrag CHECKPOINT_DIR OUTPUT_DIR [--base_model ID] [--embedding_module PATH]
"""

from __future__ import annotations

import argparse
import importlib
from typing import Optional

# method -> (module, function); each method's converter lives in its own package.
CONVERTERS = {
    "xrag": ("peft_ctx.xrag.convert", "convert_official_xrag"),
    "spring": ("peft_ctx.spring.convert", "convert_official_spring"),
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.convert", description=__doc__.splitlines()[1])
    parser.add_argument("method", choices=sorted(CONVERTERS))
    parser.add_argument("source", help="the official checkpoint (folder or tensor file)")
    parser.add_argument("output_dir", help="where to write the peft_ctx adapter")
    parser.add_argument("--base_model", default=None, help="base model id / folder recorded in the adapter config")
    parser.add_argument(
        "--embedding_module",
        default=None,
        help="input-embedding module path in the base model (default: read from the checkpoint / base config)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter already in output_dir")
    args = parser.parse_args(argv)
    module_name, function_name = CONVERTERS[args.method]
    convert = getattr(importlib.import_module(module_name), function_name)
    kwargs = {"base_model_name_or_path": args.base_model, "overwrite": args.overwrite}
    if args.embedding_module:
        kwargs["embedding_module"] = args.embedding_module
    config = convert(args.source, args.output_dir, **kwargs)
    print(f"Wrote a peft_ctx {args.method} adapter to {args.output_dir}: {config}")


if __name__ == "__main__":
    main()
