"""``python -m fxdrop.build``: compile the C++ (and, with a CUDA torch and toolkit, CUDA) kernels now.

Builds into the cache that ``import fxdrop`` loads from (see :mod:`fxdrop.ops.extension`), prints
the compiler output on failure and exits non-zero, then prints which kernels are active.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxdrop.build", description=__doc__)
    parser.add_argument("--variant", choices=("auto", "cpu", "cuda"), default="auto",
                        help="cuda: CPU + CUDA kernels (needs a CUDA torch and nvcc); auto: cuda when possible")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    args = parser.parse_args(argv)

    import torch

    from .ops import extension

    if extension.disabled():
        print("FXDROP_NO_EXT is set: nothing to build", file=sys.stderr)
        return 1
    variant = args.variant
    if variant == "auto":
        variant = "cuda" if torch.version.cuda is not None else "cpu"
    try:
        path = extension.build(variant, strict=True, verbose=args.verbose)
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return 1
    print(f"built {path}")
    print(json.dumps(extension.backend_info(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
