"""Convert official research checkpoints into peft_ctx adapters.

python -m peft_ctx.convert {xrag,spring,...} CHECKPOINT_DIR OUTPUT_DIR [--base_model ID] [--embedding_module PATH]

The converters are the registered methods' (``ContextMethod.converters``).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Optional

from .methods import registered_methods


def converters() -> dict[str, Callable]:
    """Every registered method's converters by name (``ContextMethod.converters``)."""
    return {name: fn for method in registered_methods() for name, fn in method.converters.items()}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m peft_ctx.convert", description=__doc__.splitlines()[1])
    known = converters()
    parser.add_argument("method", choices=sorted(known))
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
    convert = known[args.method]
    kwargs = {"base_model_name_or_path": args.base_model, "overwrite": args.overwrite}
    if args.embedding_module:
        kwargs["embedding_module"] = args.embedding_module
    config = convert(args.source, args.output_dir, **kwargs)
    print(f"Wrote a peft_ctx {args.method} adapter to {args.output_dir}: {config}")


if __name__ == "__main__":
    main()
