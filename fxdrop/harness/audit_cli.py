"""``fxdrop audit TARGET --input 64x784 [--input ...] [--json]``: the audit from the command line.

``TARGET`` is ``path/to/file.py:Name`` or ``package.module:Name``, where ``Name`` is an ``nn.Module``
class (built with no arguments) or a zero-argument factory. ``--input`` gives one example input per
positional argument as ``DIMSxDIMS[:dtype]`` (``float`` by default, random normal; ``long``/``int`` give
zeros, valid indices for an Embedding). Errors (missing file or name, bad shape string, a model that
fails on the inputs) print one line and exit with status 2. Imports fxdrop.audit.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

import torch
from torch import nn

from ..search import AUTO, check_max_dp

_DTYPES = {"float": torch.float32, "float32": torch.float32, "float64": torch.float64, "double": torch.float64,
           "half": torch.float16, "bfloat16": torch.bfloat16, "long": torch.long, "int64": torch.long,
           "int": torch.long}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="TARGET",
                        help="path/to/file.py:Name or package.module:Name (an nn.Module class or a factory)")
    parser.add_argument("--input", action="append", default=[], metavar="SHAPE",
                        help="an example input, e.g. 64x784 or 35x20:long (repeat for several inputs)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--p", type=float, default=None, help="override every site's drop rate")
    parser.add_argument("--pattern", default=None, help="pattern family: row, block or tile (default: convert's, block)")
    parser.add_argument("--granularity", choices=("rows", "forward"), default=None,
                        help="rows (patterns per row class; convert's default) or forward (one per forward)")
    parser.add_argument("--max-dp", type=max_dp_arg, default="auto",
                        help="largest pattern period, or 'auto' (the tightest that reaches p; default)")
    parser.add_argument("--tile", type=int, default=32, help="tile size for the tile family (default 32)")
    parser.add_argument("--optimizer", choices=("sgd", "momentum", "adamw", "none"), default="momentum",
                        help="the optimizer of the roofline step prediction (default momentum)")


def max_dp_arg(text: str) -> int | str:
    """``--max-dp``: ``auto`` or a positive int."""
    try:
        value = text if text == AUTO else int(text)
        check_max_dp(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 1, got {text!r}") from None
    return value


def parse_shape(text: str) -> torch.Tensor:
    """``"64x784"`` -> ``torch.randn(64, 784)``; ``"35x20:long"`` -> ``torch.zeros(35, 20, dtype=long)``."""
    dims_text, _, dtype_name = text.partition(":")
    try:
        dims = [int(d) for d in dims_text.lower().split("x")]
    except ValueError:
        dims = []
    if not dims or any(d < 0 for d in dims):
        raise CliError(f"bad --input {text!r}: expected dimensions joined by 'x', like 64x784 or 35x20:long")
    dtype = _DTYPES.get(dtype_name or "float")
    if dtype is None:
        raise CliError(f"bad --input {text!r}: unknown dtype {dtype_name!r}; expected one of {', '.join(_DTYPES)}")
    if dtype.is_floating_point:
        return torch.randn(*dims, dtype=dtype)
    return torch.zeros(*dims, dtype=dtype)


def load_target(target: str) -> nn.Module:
    """Import ``file.py:Name`` or ``module:Name`` and build the model."""
    where, sep, name = target.rpartition(":")
    if not sep or not where or not name:
        raise CliError(f"bad TARGET {target!r}: expected path/to/file.py:Name or package.module:Name")
    if where.endswith(".py") or os.sep in where or "/" in where:
        if not os.path.isfile(where):
            raise CliError(f"no such file: {where}")
        module_name = f"_fxdrop_audit_{abs(hash(os.path.abspath(where)))}"
        spec = importlib.util.spec_from_file_location(module_name, where)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling look classes up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:
            raise CliError(f"importing {where} failed: {type(err).__name__}: {err}") from err
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise CliError(f"cannot import module {where!r}: {err}") from err
    if not hasattr(module, name):
        raise CliError(f"{where} has no {name!r}")
    thing = getattr(module, name)
    if isinstance(thing, nn.Module):
        return thing
    if not callable(thing):
        raise CliError(f"{where}:{name} is a {type(thing).__name__}, not an nn.Module class or factory")
    try:
        model = thing()
    except Exception as err:
        raise CliError(f"building {where}:{name}() failed: {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CliError(f"{where}:{name}() returned a {type(model).__name__}, not an nn.Module")
    return model


def run(args: argparse.Namespace) -> int:
    from ..audit import audit

    try:
        inputs = tuple(parse_shape(text) for text in args.input)
        model = load_target(args.target)
        try:
            chosen = {k: v for k, v in (("pattern", args.pattern), ("granularity", args.granularity)) if v is not None}
            report = audit(model, inputs if inputs else None, p=args.p, max_dp=args.max_dp, **chosen,
                           tile=args.tile, optimizer=None if args.optimizer == "none" else args.optimizer)
        except (ValueError, TypeError) as err:
            raise CliError(str(err)) from err
    except CliError as err:
        print(f"fxdrop audit: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    else:
        from rich.console import Console

        Console().print(report)
    return 0


def main(argv: list[str] | None = None) -> int:  # `python -m fxdrop.harness.audit_cli`
    parser = argparse.ArgumentParser(prog="fxdrop audit")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
