"""The real-architecture coverage check: what ``fxdrop.convert`` does to each public architecture, and whether
the result keeps the contract.

``python -m fxdrop.harness.coverage --out benchmarks/results/coverage.json`` checks every architecture of
:mod:`.architectures` and writes one row each; ``benchmarks/readme.py`` renders the README table from that
file, and ``tests/test_architectures.py`` runs the same :func:`check` on every architecture. A row holds:

* the dropouts the conversion found, which converted, which make both GEMMs of a chain shrink, and the
  reason for each one left as is;
* ``eval_exact``: eval output bit for bit the original's;
* ``train_contract``: one training step's output and every gradient equal the original's with each
  converted dropout replaced by its site's mask (dropout-like modules fxdrop leaves alone, stochastic
  depth and unconverted dropouts, are set to 0 in both, so the two steps see the same randomness), on
  float64 copies of the model and batch (fp32 rounding through a deep CNN on a batch of two can exceed
  any tolerance on gradients that are zero in exact arithmetic; which CPU decided whether it did);
* ``model_kept``: same class, same Parameter objects and ties, same ``state_dict`` keys;
* ``compile``: one training step of ``torch.compile(convert(model))``; ``backend``: one of
  ``torch.compile(model, backend="fxdrop")`` (each with the inner backend given, Inductor by default).

Imports torch, fxdrop, and the architectures' libraries through :mod:`.architectures`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

from . import architectures as A

_STOCHASTIC = ("StochasticDepth", "DropPath")  # per-sample residual drops: not dropouts fxdrop converts


@dataclass
class CoverageRow:
    architecture: str
    library: str
    available: bool = True
    note: str = ""
    dropouts: int = 0
    converted: list[str] = field(default_factory=list)
    both_gemms: list[str] = field(default_factory=list)
    left: dict[str, str] = field(default_factory=dict)  # site -> reason
    eval_exact: bool | None = None
    train_contract: bool | None = None
    model_kept: bool | None = None
    compile: bool | None = None
    backend: bool | None = None
    errors: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def _tensors(out: Any) -> list[torch.Tensor]:
    from torch.utils._pytree import tree_flatten

    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _same(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def _quiet(model: nn.Module) -> None:
    """Every dropout-like rate of ``model`` to 0 (RNN inter-layer dropout aside): dropout modules, stochastic
    depth, attention dropouts kept as float attributes (``self.dropout = config.attention_dropout``)."""
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, float) and not isinstance(value, bool) and (
                    "drop" in attr.lower() or (type(module).__name__ in _STOCHASTIC and attr in ("p", "drop_prob"))):
                setattr(module, attr, 0.0)


def _step(model: nn.Module, arch: A.Architecture, batch: A.Batch, weights: list[torch.Tensor] | None):
    model.zero_grad(set_to_none=True)
    out = arch.output(model(*batch.args, **batch.kwargs))
    if weights is None:
        weights = [torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)]
    (out * weights[0]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, weights


def check(arch: A.Architecture, *, inner: str = "inductor", compile_checks: bool = True) -> CoverageRow:
    """Every column of a coverage row for one architecture (see the module docstring)."""
    import fxdrop
    from fxdrop.convert import conversion

    row = CoverageRow(arch.name, arch.library, note=arch.note)
    start = time.perf_counter()
    try:
        model, batch = A.build(arch)
    except A.Unavailable as err:
        row.available = False
        row.errors["build"] = str(err)
        return row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = fxdrop.convert(model, seed=0, example_inputs=batch.args, example_kwargs=batch.kwargs)
        except Exception as err:  # noqa: BLE001  (a crash is the finding)
            row.errors["convert"] = _first_line(err)
            row.seconds = time.perf_counter() - start
            return row
        report = conversion(converted)
        row.dropouts = len(report.sites)
        row.converted = [s.name for s in report.sites if s.converted]
        row.both_gemms = [s.name for s in report.sites if s.plan == "chain"]
        row.left = {s.name: s.reason for s in report.sites if not s.converted}
        row.model_kept = _model_kept(model, converted)
        row.eval_exact = _attempt(row, "eval", lambda: _eval_exact(model, converted, batch))
        row.train_contract = _attempt(row, "train", lambda: _train_contract(model, converted, arch, batch))
        if compile_checks:
            row.compile = _attempt(row, "compile", lambda: _compiled_step(converted, arch, batch, inner))
            row.backend = _attempt(row, "backend", lambda: _backend_step(model, arch, batch, inner))
    row.seconds = time.perf_counter() - start
    return row


def _attempt(row: CoverageRow, column: str, fn) -> bool:
    try:
        ok = fn()
    except Exception as err:  # noqa: BLE001
        row.errors[column] = _first_line(err)
        if "FXDROP_COVERAGE_TRACEBACK" in __import__("os").environ:
            traceback.print_exc()
        return False
    if ok is not True:
        row.errors[column] = str(ok)
        return False
    return True


def _model_kept(model: nn.Module, converted: nn.Module) -> bool:
    same_class = isinstance(converted, type(model))
    params = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    converted_params = [id(p) for _, p in converted.named_parameters(remove_duplicate=False)]
    return same_class and params == converted_params and list(model.state_dict()) == list(converted.state_dict())


def _eval_exact(model: nn.Module, converted: nn.Module, batch: A.Batch):
    model.eval(), converted.eval()
    with torch.no_grad():
        torch.manual_seed(5)
        want = model(*batch.args, **batch.kwargs)
        torch.manual_seed(5)
        got = converted(*batch.args, **batch.kwargs)
    return True if _same(got, want) else "eval outputs differ"


def _train_contract(model: nn.Module, converted: nn.Module, arch: A.Architecture, batch: A.Batch):
    """One training step of a converted copy against the original with the sites' masks, every other source of
    randomness off: all rates are set to 0 before converting the copy, then the converted sites get their
    rates back (so unconverted dropouts, whose rates a traced program bakes in, stay off in both)."""
    import fxdrop

    from .masking import masked

    rates = {s.name: s.p for s in fxdrop.sites(converted)}
    # its own Parameters (these steps do not reach the caller's model), in float64: the check is of the
    # masks' semantics, and fp32 rounding carried back through a deep CNN trained on a batch of two
    # swamps gradients that are zero in exact arithmetic (a BatchNorm bias ahead of another BatchNorm)
    original = copy.deepcopy(model).double()
    batch = A.Batch(*tree_map(lambda t: t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                              (batch.args, batch.kwargs)))
    _quiet(original)
    twin = fxdrop.convert(original, seed=0, example_inputs=batch.args, example_kwargs=batch.kwargs)
    fxdrop.set_p(twin, {name: rate for name, rate in rates.items() if name in {s.name for s in fxdrop.sites(twin)}})
    missing = sorted(set(rates) - {s.name for s in fxdrop.sites(twin)})
    if missing:
        return f"the copy did not convert {missing}"
    original.train(), twin.train()
    got, got_grads, weights = _step(twin, arch, batch, None)
    masks = {s.name: s.last_mask for s in fxdrop.sites(twin) if s.active}
    with masked(original, masks):
        want, want_grads, _ = _step(original, arch, batch, weights)
    if not torch.allclose(got, want, atol=1e-5, rtol=1e-4):
        return f"training outputs differ by {(got - want).abs().max():.3g}"
    if got_grads.keys() != want_grads.keys():
        return f"gradients of different parameters: {sorted(set(got_grads) ^ set(want_grads))[:4]}"
    for name in got_grads:
        if not torch.allclose(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-4):
            return f"gradient of {name} differs by {(got_grads[name] - want_grads[name]).abs().max():.3g}"
    return True


def _compiled_step(converted: nn.Module, arch: A.Architecture, batch: A.Batch, inner: str):
    import torch._dynamo

    torch._dynamo.reset()
    model = copy.deepcopy(converted).train()
    # One eager step first builds each region's program for the real call (a compiled first call cannot).
    _step(model, arch, batch, None)
    compiled = torch.compile(model, backend=inner)
    out, grads, _ = _step(compiled, arch, batch, None)
    return True if torch.isfinite(out).all() and grads else "no finite output or no gradients"


def _backend_step(model: nn.Module, arch: A.Architecture, batch: A.Batch, inner: str):
    import torch._dynamo

    import fxdrop.backend

    torch._dynamo.reset()
    copy_ = copy.deepcopy(model).train()
    compiled = torch.compile(copy_, backend="fxdrop", options={"inner": inner, "seed": 0})
    out, grads, _ = _step(compiled, arch, batch, None)
    return True if torch.isfinite(out).all() and grads else "no finite output or no gradients"


def run(names: list[str] | None = None, *, inner: str = "inductor") -> dict:
    rows = []
    for arch in A.ARCHITECTURES:
        if names and arch.name not in names:
            continue
        row = check(arch, inner=inner)
        rows.append(row)
        status = "ok" if not row.errors else f"errors {row.errors}"
        print(f"{arch.name}: {len(row.converted)}/{row.dropouts} converted, {status} ({row.seconds:.1f} s)",
              file=sys.stderr)
    from .timing import machine_info

    return {"benchmark": "fxdrop.convert on public architectures (small configs, random weights)",
            "inner_backend": inner, "machine": machine_info(), "rows": [asdict(r) for r in rows]}


def markdown_table(result: dict) -> str:
    """README's coverage table."""
    def mark(value):
        return {True: "yes", False: "**no**", None: "-"}[value]

    lines = ["| architecture | dropouts | converted | both GEMMs shrink | left as is (reason) | eval exact | "
             "train contract | compile | backend |", "|:---|---:|---:|---:|:---|:---:|:---:|:---:|:---:|"]
    for row in result["rows"]:
        if not row["available"]:
            lines.append(f"| {row['architecture']} | - | - | - | not run: {row['errors'].get('build', '')} | - | - | - "
                         "| - |")
            continue
        left = "; ".join(f"`{name}`: {reason}" for name, reason in row["left"].items()) or "-"
        lines.append(f"| {row['architecture']} | {row['dropouts']} | {len(row['converted'])} | "
                     f"{len(row['both_gemms'])} | {left} | {mark(row['eval_exact'])} | "
                     f"{mark(row['train_contract'])} | {mark(row['compile'])} | {mark(row['backend'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fxdrop.harness.coverage", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the results file (JSON)")
    parser.add_argument("--inner", default="inductor", help="the inner backend of the compile checks")
    parser.add_argument("--only", action="append", default=None, help="one architecture (repeatable)")
    args = parser.parse_args(argv)
    result = run(args.only, inner=args.inner)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(markdown_table(result))
    return 0 if all(not r["errors"] for r in result["rows"] if r["available"]) else 1


if __name__ == "__main__":
    sys.exit(main())
