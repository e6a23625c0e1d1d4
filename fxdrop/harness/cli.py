"""The ``fxdrop`` command line: ``fxdrop audit | demo | bench``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches, and imports a subcommand's module when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "audit": ("fxdrop.harness.audit_cli", "report every dropout site of a model and what fxdrop would do"),
    "demo": ("fxdrop.harness.demo", "train the paper's MNIST MLP with standard dropout and with fxdrop"),
    "bench": ("fxdrop.harness.bench", "whole-training-step benchmarks, original against converted"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxdrop", description="approximate random dropout for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
