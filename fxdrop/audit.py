"""``fxdrop.audit(model, example_inputs)``: what :func:`fxdrop.convert` does to a model, and what it saves.

The audit *is* a conversion (on a clone of the model, which is left unchanged): the same discovery,
planner and installation, so every site's decision and reason are convert's own. Given example inputs
it also counts the FLOPs of a training step:

* the dense step: every GEMM-like op (``mm``, ``addmm``, ``bmm``, convolutions, attention) of one forward
  and backward, counted by ``torch.utils.flop_counter`` (backward as it really runs: no input gradient
  for data, no weight gradient for frozen weights), plus the GEMMs of ``nn.LSTM``/``nn.GRU``/``nn.RNN``
  layers, counted from their shapes (their fused kernels are invisible to the counter);
* what each converted site shrinks: the Linear GEMMs of its chain (expected work per GEMM
  ``fxdrop.layout.ChainLayout.expected_keep``: ``(1 - p)`` per structured side), the tiles of a tile
  Linear, the input projection of the RNN layer it feeds;

and reports the FLOP-only ideal step speedup, ``dense / expected``, an upper bound of what structure
buys (elementwise work, the optimizer and memory traffic do not shrink).

Imports torch, rich (for printing), the config, convert and the runtime modules.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .config import DropoutConfig
from .convert import RegionRecord, as_input_tuple, check_model, plan_and_install
from .modules.structured import StructuredChain, TileLinear, probing
from .passes.trace import SkippedModule


@dataclass
class SiteAudit:
    """One dropout site: the plan record plus the GEMM FLOPs it makes structured (dense, forward + backward)."""

    name: str
    kind: str
    p: float | None
    producer: str | None
    consumer: str | None
    decision: str
    plan: str | None
    family: str | None
    reason: str
    gemm_flops: float | None = None
    share: float | None = None


@dataclass
class AuditReport:
    model: str
    inputs: list[list[int]]
    options: dict[str, Any]
    sites: list[SiteAudit] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    regions: list[RegionRecord] = field(default_factory=list)
    step_flops: float | None = None  # GEMM FLOPs of one dense training step (forward + backward)
    expected_flops: float | None = None  # the same after conversion, in expectation
    ideal_speedup: float | None = None  # step_flops / expected_flops
    optimizer: str | None = None
    roofline: dict[str, Any] | None = None  # machine, dense and converted step costs (fxdrop.roofline)
    roofline_speedup: float | None = None  # dense step time / converted step time, both modelled

    @property
    def converted(self) -> list[SiteAudit]:
        return [s for s in self.sites if s.decision == "converted"]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "inputs": self.inputs, "options": self.options,
                "sites": [asdict(s) for s in self.sites], "skipped": [asdict(s) for s in self.skipped],
                "regions": [asdict(r) for r in self.regions], "step_flops": self.step_flops,
                "expected_flops": self.expected_flops, "ideal_speedup": self.ideal_speedup,
                "optimizer": self.optimizer, "roofline": self.roofline, "roofline_speedup": self.roofline_speedup}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def __rich__(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"fxdrop audit: {self.model}" + (f" on {_shapes(self.inputs)}" if self.inputs else ""),
                      show_lines=False)
        for column, justify in (("site", "left"), ("kind", "left"), ("p", "right"), ("producer", "left"),
                                ("consumer", "left"), ("decision", "left"), ("plan / reason", "left"),
                                ("GEMM FLOPs", "right"), ("share", "right")):
            table.add_column(column, justify=justify, overflow="fold")
        for s in self.sites:
            style = "green" if s.decision == "converted" else "yellow"
            why = f"{s.plan} ({s.family}): {s.reason}" if s.plan else s.reason
            table.add_row(s.name, s.kind, "-" if s.p is None else f"{s.p:g}", s.producer or "-", s.consumer or "-",
                          Text(s.decision, style=style), why, _flops(s.gemm_flops),
                          "-" if s.share is None else f"{100 * s.share:.1f}%")
        parts: list[Any] = [table]
        if self.step_flops is not None:
            parts.append(Text(f"training step GEMM FLOPs: {_flops(self.step_flops)} dense, "
                              f"{_flops(self.expected_flops)} expected after conversion; "
                              f"ideal step speedup (FLOPs only): {self.ideal_speedup:.3f}x"))
            if self.roofline and "unavailable" in self.roofline:
                parts.append(Text(f"no roofline speedup: {self.roofline['unavailable']}", style="dim"))
            if self.roofline_speedup is not None:
                machine = self.roofline["machine"]
                parts.append(Text(f"roofline step speedup with the {self.optimizer} optimizer (GEMMs at "
                                  f"{machine['gemm_gflops']:.0f} GFLOP/s, memory at {machine['bandwidth_gb_s']:.1f} "
                                  f"GB/s, measured here): {self.roofline_speedup:.3f}x"))
        else:
            parts.append(Text("give example inputs for FLOPs, shares and the predicted speedup", style="dim"))
        if self.skipped:
            skipped = Table(title="modules that do not trace or did not convert (left as they are; their children "
                                  "were tried)")
            for column in ("module", "type", "message"):
                skipped.add_column(column, overflow="fold")
            for s in self.skipped:
                skipped.add_row(s.name, s.type, s.message)
            parts.append(skipped)
        return Group(*parts)

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=160, record=True, file=_Null(), color_system=None)
        console.print(self)
        return console.export_text()


class _Null:
    def write(self, _text: str) -> int:
        return 0

    def flush(self) -> None:
        pass


def _shapes(inputs: list[list[int]]) -> str:
    return ", ".join("x".join(str(d) for d in shape) for shape in inputs)


def _flops(value: float | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f}"


# ---------------------------------------------------------------- counting


class _Reattach(torch.autograd.Function):
    """Outputs of a module run outside the FLOP counter, connected to its inputs by a backward that also
    runs outside it (the module's GEMMs are counted from shapes instead)."""

    @staticmethod
    def forward(ctx, real_outputs, *inputs):
        # The real outputs travel outside the arguments: as inputs of this node, the engine would walk their
        # graph (already freed by the inner backward) once more.
        ctx.real = (inputs, real_outputs)
        return tuple(o.detach().clone() for o in real_outputs)

    @staticmethod
    def backward(ctx, *grads):
        from torch.utils._python_dispatch import _disable_current_modes

        inputs, outputs = ctx.real
        pairs = [(o, g) for o, g in zip(outputs, grads) if g is not None and o.requires_grad]
        with _disable_current_modes(), torch.enable_grad():
            got = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], allow_unused=True) \
                if pairs else [None] * len(inputs)
        return (None, *got)


def _rnn_layers(module: nn.RNNBase, rows: int, input_needs_grad: bool) -> list[dict[str, float]]:
    """Per layer: the input projection's and the recurrence's step FLOPs (forward + backward)."""
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    directions = 2 if module.bidirectional else 1
    hidden, out = module.hidden_size, (getattr(module, "proj_size", 0) or module.hidden_size)
    layers = []
    for layer in range(module.num_layers):
        width = module.input_size if layer == 0 else directions * out
        ih = 2.0 * rows * width * gates * hidden * directions
        hh = 2.0 * rows * out * gates * hidden * directions
        proj = 2.0 * rows * hidden * out * directions if out != hidden else 0.0
        passes_ih = 3 if (layer > 0 or input_needs_grad) else 2
        layers.append({"ih": ih * passes_ih, "hh": (hh + proj) * 3, "ih_passes": passes_ih, "ih_forward": ih})
    return layers


@dataclass
class _Count:
    dense: float = 0.0
    saved: float = 0.0
    per_site: dict[str, float] = field(default_factory=dict)

    def touch(self, names: list[str], flops: float) -> None:
        for name in set(names):
            self.per_site[name] = self.per_site.get(name, 0.0) + flops


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0


def count_step(work: nn.Module, inputs: tuple, kwargs: Mapping[str, Any],
               loss: Callable[[Any], torch.Tensor] | None = None) -> _Count:
    """The FLOPs of one training step of ``work`` (converted) on these inputs, dense and saved per site."""
    from torch.utils.flop_counter import FlopCounterMode
    from torch.utils._python_dispatch import _disable_current_modes

    from .modules.rnn import StructuredRNN

    count = _Count()
    rnn_calls: list[tuple[nn.RNNBase, int, bool]] = []
    patched: list[nn.Module] = []

    def uncounted(module: nn.RNNBase):
        original = module.forward

        def forward(*args, **kw):
            flat, _ = tree_flatten((args, kw))
            tensors = [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]
            x = args[0].data if isinstance(args[0], nn.utils.rnn.PackedSequence) else args[0]
            rnn_calls.append((module, _rows(x), x.requires_grad))
            with _disable_current_modes():
                out = original(*args, **kw)
            flat_out, spec = tree_flatten(out)
            positions = [i for i, t in enumerate(flat_out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            attached = _Reattach.apply(tuple(flat_out[i] for i in positions), *tensors)
            for i, t in zip(positions, attached):
                flat_out[i] = t
            return tree_unflatten(flat_out, spec)

        module.forward = forward
        patched.append(module)

    for module in work.modules():
        if isinstance(module, nn.RNNBase):
            uncounted(module)
    modes = {m: m.training for m in work.modules()}
    params = [p for p in work.parameters() if p.requires_grad]
    try:
        work.eval()  # dense ops, no state updates (BatchNorm statistics), no .grad written
        with FlopCounterMode(display=False) as counter, probing() as records, torch.random.fork_rng():
            value = _loss(work(*inputs, **dict(kwargs)), loss)
            if value is not None:
                torch.autograd.grad(value, params, allow_unused=True)
        count.dense = float(counter.get_total_flops())
    finally:
        for module in patched:
            del module.forward
        for module, training in modes.items():
            module.training = training

    for module, rows, needs_grad in rnn_calls:
        layers = _rnn_layers(module, rows, needs_grad)
        count.dense += sum(layer["ih"] + layer["hh"] for layer in layers)
        if isinstance(module, StructuredRNN):
            for layer, site in enumerate(module.layer_sites):
                ih = layers[layer + 1]["ih"]
                count.saved += ih * site.p
                count.touch([site.name], ih)
    rnn_input_of = {}
    for kind, owner, data in records:
        if kind == "chain":
            _count_chain(count, owner, data)
        elif kind == "tile":
            x, weight = data["x"], data["weight"]
            out_f, in_f = (weight.shape[1], weight.shape[0]) if owner.transposed else tuple(weight.shape)
            passes = 1 + int(x.requires_grad) + int(weight.requires_grad)
            dense = 2.0 * _rows(x) * in_f * out_f * passes
            count.saved += dense * owner.site.p
            count.touch([owner.site.name], dense)
        elif kind == "rnn_input":
            rnn_input_of[id(owner.rnn)] = owner.site
    for module, rows, needs_grad in rnn_calls:
        site = rnn_input_of.get(id(module))
        if site is not None:
            ih = _rnn_layers(module, rows, needs_grad)[0]["ih"]
            count.saved += ih * site.p
            count.touch([site.name], ih)
    return count


def _count_chain(count: _Count, chain: StructuredChain, data: dict[str, Any]) -> None:
    x, weights = data["x"], data["weights"]
    rows = _rows(x)
    rates = [site.p for site in chain.sites]
    layout = chain.layout
    for layer, weight in enumerate(weights):
        out_f, in_f = (weight.shape[1], weight.shape[0]) if chain.transposed[layer] else tuple(weight.shape)
        needs_input_grad = x.requires_grad if layer == 0 else True
        passes = 1 + int(needs_input_grad) + int(weight.requires_grad)
        dense = 2.0 * rows * in_f * out_f * passes
        count.saved += dense * (1.0 - layout.expected_keep(layer, rates))
        names = [chain.sites[s].name for s in (layout.in_site(layer), layout.out_site(layer)) if s is not None]
        count.touch(names, dense)


# ---------------------------------------------------------------- audit


def audit(model: nn.Module, example_inputs: Any = None, *, example_kwargs: Mapping[str, Any] | None = None,
          optimizer: str | None = "momentum", roofline: bool = True, loss: Callable[[Any], torch.Tensor] | None = None,
          config: DropoutConfig | None = None, **options: Any) -> AuditReport:
    """Report every dropout site of ``model`` and what :func:`fxdrop.convert` with these options does.

    ``model`` is not changed. With ``example_inputs`` (a tensor or tuple; ``example_kwargs`` for keyword
    arguments), also FLOPs, shares, the FLOP-only ideal step speedup and (``roofline=True``) the roofline
    speedup of a training step with ``optimizer`` (``"sgd"``, ``"momentum"``, ``"adamw"`` or None):
    :mod:`fxdrop.roofline`. ``loss``: the step's loss from the model's output (default: the sum of its
    floating outputs); give the real one where it costs (a 10,000-way softmax).
    """
    from .roofline import check_optimizer

    check_optimizer(optimizer, "fxdrop.audit")
    config = DropoutConfig.from_options(options, where="fxdrop.audit") if config is None else \
        DropoutConfig.from_options(options, config=config, where="fxdrop.audit")
    check_model(model, "fxdrop.audit")
    inputs = as_input_tuple(example_inputs)
    has_inputs = example_inputs is not None or bool(example_kwargs)
    work, conversion = plan_and_install(model, config, example_inputs=example_inputs if has_inputs else None,
                                        example_kwargs=example_kwargs)
    report = AuditReport(model=type(model).__name__,
                         inputs=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
                         options=config.describe(), skipped=list(conversion.skipped),
                         regions=list(conversion.regions))
    report.sites = [SiteAudit(r.name, r.kind, r.p, r.producer, r.consumer, r.decision, r.plan, r.family, r.reason)
                    for r in conversion.sites]
    if not has_inputs:
        return report
    count = count_step(work, inputs, example_kwargs or {}, loss)
    report.step_flops = count.dense
    report.expected_flops = max(count.dense - count.saved, 0.0)
    report.ideal_speedup = count.dense / report.expected_flops if report.expected_flops else None
    for row in report.sites:
        if row.decision == "converted":
            row.gemm_flops = count.per_site.get(row.name, 0.0)
            row.share = row.gemm_flops / count.dense if count.dense else None
    report.optimizer = optimizer
    if roofline:
        try:
            report.roofline = roofline_step(model, work, inputs, example_kwargs or {}, optimizer, loss)
        except Exception as err:  # noqa: BLE001  (the user's training step raises whatever it raises)
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            report.roofline = {"unavailable": f"a training step of the model fails ({type(err).__name__}: {text})"}
        else:
            report.roofline_speedup = report.roofline["dense"]["seconds"] / report.roofline["converted"]["seconds"]
    return report


def _loss(out: Any, loss: Callable[[Any], torch.Tensor] | None):
    if loss is not None:
        return loss(out)
    flat, _ = tree_flatten(out)
    total = sum(t.float().sum() for t in flat if isinstance(t, torch.Tensor) and t.requires_grad)
    return total if isinstance(total, torch.Tensor) else None


RNN_DRAWS = 16  # converted steps the roofline averages when RNN layers run on drawn patterns


def roofline_step(model: nn.Module, converted: nn.Module, inputs: tuple, kwargs: Mapping[str, Any],
                  optimizer: str | None, loss: Callable[[Any], torch.Tensor] | None = None) -> dict[str, Any]:
    """The roofline cost of one training step of ``model`` and of ``converted`` (deep copies, in training
    mode: their BatchNorm statistics and gradients never reach the originals)."""
    import copy

    from .modules.rnn import StructuredRNN
    from .roofline import CostMode, measure_machine, optimizer_seconds

    machine = measure_machine()
    out = {"machine": machine.to_dict()}
    for name, source in (("dense", model), ("converted", converted)):
        twin = copy.deepcopy(source).train()
        params = [p for p in twin.parameters() if p.requires_grad]

        def step():
            with torch.random.fork_rng():
                value = _loss(twin(*inputs, **dict(kwargs)), loss)
                if value is not None:
                    torch.autograd.grad(value, params, allow_unused=True)

        step()  # a copy's first call rebuilds and checks its programs: not a step's cost
        # A structured RNN layer runs on the kept columns of the pattern drawn for the step, so one step's
        # cost is one draw's: the converted side averages RNN_DRAWS steps (each its own draw, and the same
        # draws for a given seed); every other site is costed at its expected keep fraction.
        draws = RNN_DRAWS if name == "converted" and any(isinstance(m, StructuredRNN) for m in twin.modules()) else 1
        with CostMode(machine) as mode:
            for _ in range(draws):
                step()
        mode.cost.scale(1.0 / draws)
        mode.cost.optimizer = optimizer_seconds(params, optimizer, machine)
        out[name] = mode.cost.to_dict()
    return out


def ideal_speedup(model: nn.Module, example_inputs: Any, **options: Any) -> float:
    """The predicted ideal training-step speedup of ``convert(model, **options)`` (FLOPs only)."""
    if example_inputs is None:
        raise ValueError("ideal_speedup needs example_inputs (shapes decide the FLOPs)")
    speedup = audit(model, example_inputs, **options).ideal_speedup
    return 1.0 if speedup is None or math.isnan(speedup) else speedup


__all__ = ["AuditReport", "SiteAudit", "audit", "count_step", "ideal_speedup"]
