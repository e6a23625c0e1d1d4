"""``fxdrop.audit(model, example_inputs)``: what :func:`fxdrop.convert` would do, and what it would save.

Without changing the model, lists every dropout site (name, kind, p, producer, consumer, decision,
reason) and, given example inputs, the FLOPs of the GEMMs each site makes structured, their share
of a training step and the predicted ideal step speedup: Amdahl over GEMM FLOPs (forward and
backward: the forward GEMM, the input-gradient GEMM where the input needs a gradient, and the
weight-gradient GEMM where the weight has one), with the expected work of a GEMM scaled by
``(1 - p)`` per structured side. Elementwise work is not counted: the number is an upper bound of
what structure can buy, not a measurement.

Shapes come from running a clone of the model in eval mode without gradients (:class:`ShapeProp`
on each traced region; forward hooks on the leaf modules of parts that do not trace).
Imports torch, networkx, rich and fxdrop's convert and passes.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from .convert import _check_options, as_input_tuple, plan_model
from .passes.find import DropoutSite, NormalisedGraph, site_family, site_rate
from .passes.trace import SkippedModule, get_path

# ---------------------------------------------------------------- report


@dataclass
class SiteAudit:
    """One dropout site: the plan record plus its GEMM FLOPs (dense, forward + backward, per step)."""

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
    step_flops: float | None = None  # GEMM FLOPs of one dense training step (forward + backward)
    expected_flops: float | None = None  # the same after conversion, in expectation
    ideal_speedup: float | None = None

    @property
    def converted(self) -> list[SiteAudit]:
        return [s for s in self.sites if s.decision == "converted"]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "inputs": self.inputs, "options": self.options,
                "sites": [asdict(s) for s in self.sites], "skipped": [asdict(s) for s in self.skipped],
                "step_flops": self.step_flops, "expected_flops": self.expected_flops,
                "ideal_speedup": self.ideal_speedup}

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
                              f"ideal step speedup (Amdahl over FLOPs): {self.ideal_speedup:.3f}x"))
        else:
            parts.append(Text("give example inputs for FLOPs, shares and the predicted speedup", style="dim"))
        if self.skipped:
            skipped = Table(title="modules that do not trace (left as they are; their children were tried)")
            for column in ("module", "type", "tracer message"):
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


# ---------------------------------------------------------------- GEMM accounting


@dataclass
class Gemm:
    """One GEMM of the training step: forward FLOPs and how many of (fwd, grad input, grad weight) run."""

    forward: float
    passes: int = 3
    keep: float = 1.0  # expected fraction of the work that remains after conversion

    @property
    def step(self) -> float:
        return self.forward * self.passes


def _numel(shape) -> int:
    return int(math.prod(shape))


def _meta_shape(node: Any):
    if isinstance(node, fx.Node):
        meta = node.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape)
    return None


def _lstm_gemms(lstm: nn.LSTM, rows: int) -> dict[tuple, Gemm]:
    """Per layer: the input-projection GEMM (``ih``) and the recurrent one (``hh``), all directions."""
    directions = 2 if lstm.bidirectional else 1
    out_width = lstm.proj_size or lstm.hidden_size
    gemms = {}
    for layer in range(lstm.num_layers):
        width = lstm.input_size if layer == 0 else directions * out_width
        gemms[(layer, "ih")] = Gemm(2.0 * rows * width * 4 * lstm.hidden_size * directions)
        gemms[(layer, "hh")] = Gemm(2.0 * rows * out_width * 4 * lstm.hidden_size * directions)
    return gemms


def _module_gemms(module: nn.Module, inputs: tuple, output: Any) -> dict[tuple, Gemm]:
    x = inputs[0] if inputs else None
    if isinstance(module, nn.Linear) and isinstance(x, torch.Tensor):
        return {(): Gemm(2.0 * (x.numel() // module.in_features) * module.in_features * module.out_features)}
    if isinstance(module, nn.modules.conv._ConvNd) and isinstance(output, torch.Tensor):
        per_output = module.in_channels // module.groups * _numel(module.kernel_size)
        return {(): Gemm(2.0 * output.numel() * per_output)}
    if isinstance(module, nn.LSTM) and isinstance(x, torch.Tensor):
        return _lstm_gemms(module, x.numel() // x.shape[-1])
    if isinstance(module, nn.MultiheadAttention) and isinstance(x, torch.Tensor):
        tokens, e = x.numel() // x.shape[-1], module.embed_dim
        return {("proj",): Gemm(2.0 * tokens * e * 4 * e), ("attention",): Gemm(4.0 * tokens * tokens * e)}
    return {}


_MATMULS = {operator.matmul, torch.matmul, torch.bmm, torch.mm}


def _node_gemms(g: NormalisedGraph, node: fx.Node) -> dict[tuple, Gemm]:
    if node in g.linears:
        linear = g.linears[node]
        shape = _meta_shape(linear.input)
        out_shape = _meta_shape(node)
        if shape is None or out_shape is None:
            return {}
        return {(): Gemm(2.0 * _numel(shape) * out_shape[-1])}
    if node.op == "call_module":
        module = g.module(node)
        if isinstance(module, nn.LSTM):
            shape = _meta_shape(node.args[0])
            return _lstm_gemms(module, _numel(shape[:-1])) if shape else {}
        if isinstance(module, (nn.modules.conv._ConvNd, nn.MultiheadAttention)):
            shape, out = _meta_shape(node.args[0]), node.meta.get("tensor_meta")
            fake_in = torch.empty(shape, device="meta") if shape else None
            out_shape = _meta_shape(node) if not isinstance(out, (tuple, list)) else None
            fake_out = torch.empty(out_shape, device="meta") if out_shape else None
            return _module_gemms(module, (fake_in,), fake_out) if fake_in is not None else {}
        return {}
    if node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d):
        weight, out = g.value(node.args[1]), _meta_shape(node)
        weight_shape = _meta_shape(weight) if isinstance(weight, fx.Node) else getattr(weight, "shape", None)
        return {(): Gemm(2.0 * _numel(out) * _numel(weight_shape[1:]))} if out and weight_shape else {}
    if (node.op == "call_function" and node.target in _MATMULS) or (node.op == "call_method"
                                                                     and node.target in ("matmul", "bmm", "mm")):
        a, out = _meta_shape(node.args[0]), _meta_shape(node)
        return {(): Gemm(2.0 * _numel(out) * a[-1])} if a and out else {}
    return {}


def _needs_grad_nodes(g: NormalisedGraph) -> set[fx.Node]:
    """Nodes whose value depends on a trainable parameter (reachability on the def-use graph)."""
    sources = []
    for node in g.graph.nodes:
        if node.op == "get_attr":
            value = g.value(node)
            if isinstance(value, torch.Tensor) and value.requires_grad:
                sources.append(node)
        elif node.op == "call_module":
            module = g.module(node)
            if module is not None and any(p.requires_grad for p in module.parameters()):
                sources.append(node)
    reached: set[fx.Node] = set(sources)
    for source in sources:
        reached |= nx.descendants(g.def_use, source)
    return reached


def _weight_trainable(g: NormalisedGraph, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = g.module(node)
        return module is not None and any(p.requires_grad for p in module.parameters(recurse=True))
    if node in g.linears:
        weight = g.value(g.linears[node].weight) if isinstance(g.linears[node].weight, fx.Node) else None
        return isinstance(weight, torch.Tensor) and weight.requires_grad
    return False


# ---------------------------------------------------------------- audit


def audit(model: nn.Module, example_inputs: Any = None, *, p: Any = None, pattern: Any = "row",
          max_dp: int | str = "auto", seed: int | None = None, scale: str = "kept", tile: int = 32) -> AuditReport:
    """Report every dropout site of ``model`` and what :func:`fxdrop.convert` with these options would do.

    ``model`` is not changed. With ``example_inputs`` (a tensor or tuple), also FLOPs, shares and
    the predicted ideal step speedup.
    """
    _check_options(model, p, pattern, max_dp, seed, scale, tile)
    inputs = as_input_tuple(example_inputs)
    work, regions, skipped = plan_model(model, p=p, pattern=pattern,
                                        example_inputs=inputs if example_inputs is not None else None)
    records: list[DropoutSite] = [s for region in regions for s in region.plan.sites]
    records += _lstm_records(work, p, pattern, {r.name for r in regions}, records)
    report = AuditReport(model=type(model).__name__,
                         inputs=[list(x.shape) for x in inputs if isinstance(x, torch.Tensor)],
                         options={"p": p if isinstance(p, (float, int, type(None))) else repr(p),
                                  "pattern": pattern if isinstance(pattern, str) else repr(pattern),
                                  "max_dp": max_dp, "scale": scale, "tile": tile},
                         skipped=list(skipped))
    site_audits = {id(r): SiteAudit(r.name, r.kind, r.p, r.producer, r.consumer, r.decision, r.plan, r.family,
                                    r.reason) for r in records}
    report.sites = [site_audits[id(r)] for r in records]
    if example_inputs is None:
        return report

    gemms, touched = _measure(work, regions, inputs)
    rates = {r.name: r.p for r in records if r.converted}
    for key, sides in touched.items():
        if key in gemms:
            for side, name in sides:
                gemms[key].keep *= 1.0 - rates[name]
    report.step_flops = sum(gemm.step for gemm in gemms.values())
    report.expected_flops = sum(gemm.step * gemm.keep for gemm in gemms.values())
    report.ideal_speedup = report.step_flops / report.expected_flops if report.expected_flops else None
    per_site: dict[str, float] = {}
    for key, sides in touched.items():
        for name in {name for _, name in sides}:
            if key in gemms:
                per_site[name] = per_site.get(name, 0.0) + gemms[key].step
    for record in records:
        audit_row = site_audits[id(record)]
        if record.converted:
            audit_row.gemm_flops = per_site.get(record.name, 0.0)
            audit_row.share = audit_row.gemm_flops / report.step_flops if report.step_flops else None
    return report


def ideal_speedup(model: nn.Module, example_inputs: Any, **convert_options: Any) -> float:
    """The predicted ideal training-step speedup of ``convert(model, **convert_options)`` (Amdahl over FLOPs)."""
    if example_inputs is None:
        raise ValueError("ideal_speedup needs example_inputs (shapes decide the FLOPs)")
    speedup = audit(model, example_inputs, **convert_options).ideal_speedup
    return 1.0 if speedup is None else speedup


def _lstm_records(work: nn.Module, p: Any, pattern: Any, regions: set[str],
                  records: list[DropoutSite]) -> list[DropoutSite]:
    """What convert does to LSTMs with inter-layer dropout (it converts them wherever they are)."""
    from .lstm import lstm_blocker

    input_sites = {r.consumer for r in records if r.plan == "lstm_input"}
    out = []
    for name, module in work.named_modules():
        if not isinstance(module, nn.LSTM) or module.num_layers < 2 or module.dropout == 0:
            continue
        rate = site_rate(p, name, module.dropout)
        family = site_family(pattern, name)
        blocker = lstm_blocker(module)
        if blocker is None and family == "tile":
            blocker = "an LSTM dropout masks units: the tile family does not apply"
        if blocker is None and rate == 0 and name not in input_sites:
            blocker = "p = 0: nothing is dropped, nothing to save"
        if blocker is not None:
            out.append(DropoutSite(f"{name}.dropout", rate, "lstm", f"{name} (layer output)",
                                   f"{name} (next layer)", False, blocker))
            continue
        for layer in range(module.num_layers - 1):
            out.append(DropoutSite(f"{name}.layer{layer}", rate, "lstm", f"{name} layer {layer}",
                                   f"{name}.weight_ih_l{layer + 1}", rate > 0,
                                   "inter-layer dropout of an LSTM: the next layer's input GEMM shrinks",
                                   plan="lstm" if rate > 0 else None, family=family))
    return out


def _measure(work: nn.Module, regions, inputs: tuple) -> tuple[dict[tuple, Gemm], dict[tuple, list]]:
    """GEMMs of the step (keyed by place) and, per GEMM, the structured sides ``[(side, site name)]``."""
    gemms: dict[tuple, Gemm] = {}
    touched: dict[tuple, list] = {}
    region_names = {r.name for r in regions}
    by_name = {r.name: r for r in regions}
    captured: dict[str, tuple] = {}
    handles = []
    modes = {m: m.training for m in work.modules()}
    work.eval()

    def inside_region(name: str) -> bool:
        return any(name == r or name.startswith(r + ".") or r == "" for r in region_names)

    try:
        # Region inputs by pre-hooks (nested regions too); leaves outside every region by forward hooks.
        for name, module in work.named_modules():
            if name in region_names:
                def capture(m, args, name=name):
                    captured.setdefault(name, args)  # a region called again has the same shapes
                handles.append(module.register_forward_pre_hook(capture))
            elif not inside_region(name) and not list(module.children()):
                def hook(m, args, output, name=name):
                    for key, gemm in _module_gemms(m, args, output).items():
                        place = ("module", name) + key
                        if place in gemms:
                            gemms[place].forward += gemm.forward
                        else:
                            gemms[place] = gemm
                handles.append(module.register_forward_hook(hook))
        with torch.no_grad():
            work(*inputs)
        for handle in handles:
            handle.remove()
        for name, args in captured.items():
            region = by_name[name]
            gm = region.module
            gm.eval()
            with torch.no_grad():
                ShapeProp(gm).propagate(*args)
            g = NormalisedGraph(gm.graph, gm)
            needs_grad = _needs_grad_nodes(g)
            for node in gm.graph.nodes:
                for key, gemm in _node_gemms(g, node).items():
                    source = node.args[0] if node.args else None
                    gemm.passes = 1 + int(source in needs_grad) + int(_weight_trainable(g, node))
                    gemms[("node", name, node.name) + key] = gemm
            _sides(region, touched)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    _lstm_sides(work, regions, gemms, touched)
    return gemms, touched


def _sides(region, touched: dict[tuple, list]) -> None:
    name = region.name
    plan = region.plan
    for chain in plan.chains:
        sites = iter(chain.sites)
        keys = [("node", name, linear.node.name) for linear in chain.linears]
        if chain.input_dropout:
            touched.setdefault(keys[0], []).append(("in", next(sites).name))
        for i in range(len(keys) - 1):
            site = next(sites).name
            touched.setdefault(keys[i], []).append(("out", site))
            touched.setdefault(keys[i + 1], []).append(("in", site))
        if chain.output_dropout:
            touched.setdefault(keys[-1], []).append(("out", next(sites).name))
    for tile in plan.tiles:
        touched.setdefault(("node", name, tile.linear.node.name), []).append(("weight", tile.site.name))
    for lstm_input in plan.lstm_inputs:
        touched.setdefault(("node", name, lstm_input.lstm.name, 0, "ih"), []).append(("in", lstm_input.site.name))


def _lstm_sides(work: nn.Module, regions, gemms: dict[tuple, Gemm], touched: dict[tuple, list]) -> None:
    """Inter-layer site ``<lstm>.layer{l}`` shrinks layer ``l + 1``'s input GEMM, wherever the LSTM runs."""
    by_module: dict[str, list[tuple]] = {}
    for region in regions:
        for node in region.module.graph.nodes:
            if node.op == "call_module" and isinstance(get_path(region.module, node.target), nn.LSTM):
                full = f"{region.name}.{node.target}" if region.name else node.target
                by_module.setdefault(full, []).append(("node", region.name, node.name))
    for place in gemms:
        if place[0] == "module" and isinstance(get_path(work, place[1]), nn.LSTM):
            by_module.setdefault(place[1], []).append(("module", place[1]))
    for name, prefixes in by_module.items():
        lstm = get_path(work, name)
        if lstm.num_layers < 2 or lstm.dropout == 0:
            continue
        for prefix in set(prefixes):
            for layer in range(lstm.num_layers - 1):
                touched.setdefault(prefix + (layer + 1, "ih"), []).append(("in", f"{name}.layer{layer}"))
