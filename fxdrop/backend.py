"""``torch.compile(model, backend="fxdrop")``: convert dropout sites in the graphs Dynamo captures.

Dynamo hands a backend one functional fx graph per captured region: ``nn.Linear`` appears as
``linear(x, W, b)`` with the Parameters as graph inputs, ``nn.Dropout`` as ``dropout(x, p, True)``
(Dynamo specialises ``self.training`` into a constant and guards on it, so an eval-mode graph has
``training=False`` and a change of mode recompiles). Each graph is planned by the fx pass's own
finder (:func:`fxdrop.passes.find.plan_graph` on a :class:`~fxdrop.passes.find.NormalisedGraph`)
and rewritten here into calls of the ``fxdrop`` ops, then handed to the inner backend (Inductor by
default). Because every graph is rewritten on its own, models that ``torch.fx.symbolic_trace``
cannot trace (data-dependent control flow, graph breaks) convert too: what Dynamo captures converts.

Where the scheduler state lives. A converted site draws a pattern through ``fxdrop::sample_pattern``,
which mutates the site's int64 state tensor. The rewrite adds each site's state and cdf as *extra
graph inputs* (placeholders after Dynamo's own), and the compiled callable this backend returns
appends those tensors to every call; the inner backend sees ordinary inputs with an in-place
mutation (AOTAutograd writes it back). So the state persists across calls in the Site objects the
callable holds, never in a constant, and new patterns never recompile.

Sites are kept in a registry keyed by the Parameter they shrink (weakly, so a model's sites die with
it), and reused when Dynamo recompiles the same model (new shapes, mode switch back), so a site's
random stream continues instead of restarting. :func:`sites(model)` lists the sites of a model
compiled with this backend (as :func:`fxdrop.sites` does for a converted model); a backend made by
:func:`make_backend` also lists its own (``backend.sites``) and keeps one record per captured graph
(``backend.graphs``) with every decision and its reason.

Eval graphs (no dropout active) pass through unchanged. Each converted site bumps
``torch._dynamo.utils.counters["fxdrop"]["sites_converted"]`` (and ``"sites_skipped"`` for a site left
alone in a training graph; ``"chain"``, ``"tile_linear"``, ``"unit_dropout"`` per rewrite applied).
Decisions are logged to the ``fxdrop.backend`` logger at DEBUG; ``FXDROP_LOG=1`` turns that on.

Site names are the Dropout module's qualified name (from Dynamo's ``nn_module_stack``), so the same
``p=`` / ``pattern=`` dicts work here and in :func:`fxdrop.convert`; a functional dropout is named
``<module>.dropout`` after the module whose forward calls it (``:k`` for its k-th further call).

Imports torch, fxdrop's ops, site, scheduler and the fx pass's find records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .passes.find import (ChainPlan, DropoutSite, LinearCall, NormalisedGraph, Plan, TilePlan, UnitPlan, plan_graph)
from .passes.rewrite import chain_nodes, topological_order
from .patterns import FAMILIES
from .scheduler import derive_seed
from .search import check_max_dp, check_rate
from .site import SCALE_MODES, Site

__all__ = ["FxdropBackend", "CompiledGraph", "fxdrop_backend", "make_backend", "sites"]

BACKEND_NAME = "fxdrop"
COUNTER = "fxdrop"
INNER_DEFAULT = "inductor"

log = logging.getLogger(__name__)


def _configure_logging() -> None:
    """``FXDROP_LOG=1`` (read at each compile): decisions at DEBUG, printed to stderr; unset, back to normal."""
    ours = [h for h in log.handlers if getattr(h, "_fxdrop", False)]
    if os.environ.get("FXDROP_LOG", "") in ("", "0"):
        for handler in ours:
            log.removeHandler(handler)
        if ours:
            log.setLevel(logging.NOTSET)
        return
    log.setLevel(logging.DEBUG)
    if not ours:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("fxdrop: %(message)s"))
        handler._fxdrop = True  # type: ignore[attr-defined]
        log.addHandler(handler)


def _counters():
    from torch._dynamo.utils import counters
    return counters[COUNTER]


# ---------------------------------------------------------------- site names from Dynamo's module stack

_ROOT = re.compile(r"^L\[['\"][^'\"]*['\"]\]")


def _qualified(path: str) -> str:
    """``L['self'].encoder.block[0]._modules['fc']`` -> ``encoder.block.0.fc``."""
    path = _ROOT.sub("", path)
    path = re.sub(r"\._(?:modules|parameters|buffers)\b", "", path)
    path = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", path)
    return path.strip(".")


def _innermost(node: fx.Node) -> tuple[str, type | None] | None:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack:
        return None
    path, cls = stack[-1]
    return _qualified(path), cls if isinstance(cls, type) else None


def _label_from_modules(g: NormalisedGraph) -> None:
    """Name Dynamo's functional calls after the modules they came from (``nn_module_stack``).

    A Linear gets its ``nn.Linear``'s qualified name; a dropout its ``nn.Dropout``'s, or
    ``<module>.dropout`` for ``F.dropout`` called in that module's forward. The finder names sites
    after ``DropoutCall.module`` (``name:k`` for repeated calls), so names match :func:`fxdrop.convert`'s.
    """
    for node, call in list(g.linears.items()):
        found = _innermost(node)
        if found is not None and found[1] is not None and issubclass(found[1], nn.Linear) and found[0]:
            g.linears[node] = dataclasses.replace(call, label=found[0])
    for node, call in list(g.dropouts.items()):
        found = _innermost(node)
        if call.module is not None or found is None:
            continue
        path, cls = found
        if cls is not None and issubclass(cls, nn.modules.dropout._DropoutNd) and path:
            name = path
        else:
            name = f"{path}.{call.kind}" if path else call.kind
        g.dropouts[node] = dataclasses.replace(call, module=name)


# ---------------------------------------------------------------- the registry of live sites

# anchor Parameter (the weight a site shrinks) -> {site key: Site}; weak, so sites die with the model.
_REGISTRY = WeakIdKeyDictionary()  # by identity: a tensor's == is elementwise


def sites(model: nn.Module) -> list[Site]:
    """Every site that ``backend="fxdrop"`` created for ``model`` (compiled or not), in parameter order.

    Sites are found through the Parameters they shrink, so ``model`` may be the original module or
    the ``torch.compile`` wrapper of it. Empty before the first training-mode call compiles.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxdrop.backend.sites expects an nn.Module, got {type(model).__name__}")
    found: list[Site] = []
    seen: set[int] = set()
    for param in model.parameters():
        for site in _REGISTRY.get(param, {}).values():
            if id(site) not in seen:
                seen.add(id(site))
                found.append(site)
    return found


# ---------------------------------------------------------------- records


@dataclass
class CompiledGraph:
    """One graph Dynamo captured and this backend compiled: its decisions and its live sites.

    ``training``: a dropout of the graph was active (a training-mode graph); only those are rewritten.
    """

    index: int
    training: bool
    records: list[DropoutSite] = field(default_factory=list)
    sites: list[Site] = field(default_factory=list)
    code: str = ""

    @property
    def converted(self) -> list[DropoutSite]:
        return [r for r in self.records if r.converted]


class _WithSiteState:
    """The compiled graph plus the tensors of its extra inputs (each site's state and cdf)."""

    def __init__(self, compiled: Callable, extra: list[torch.Tensor], record: CompiledGraph):
        self.compiled = compiled
        self.extra = extra
        self.record = record  # keeps the Sites alive as long as Dynamo keeps this callable

    def __call__(self, *args):
        # Dynamo calls a compiled graph unboxed (``fn(*args)``), whatever ``_boxed_call`` says.
        return self.compiled(*args, *self.extra)


# ---------------------------------------------------------------- the backend


class FxdropBackend:
    """A Dynamo backend: plan and rewrite each captured graph, then compile it with ``inner``.

    ``p``, ``pattern``, ``max_dp``, ``seed``, ``scale``, ``tile`` mean what they mean for
    :func:`fxdrop.convert` (site names as in the module docstring). ``inner``: a backend name
    (``"inductor"``, ``"aot_eager"``, ``"eager"``, ...) or a backend callable; ``inner_options`` go
    to Inductor as config patches (or, for another named backend, as its ``options``).
    """

    def __init__(self, inner: str | Callable = INNER_DEFAULT, *, p: Any = None, pattern: Any = "row",
                 max_dp: int | str = "auto", seed: int | None = None, scale: str = "kept", tile: int = 32,
                 inner_options: Mapping[str, Any] | None = None, mode: str | None = None):
        _check_options(inner, p, pattern, max_dp, seed, scale, tile)
        self.inner = inner
        self.p = p
        self.pattern = pattern
        self.max_dp = max_dp
        self.seed = seed
        self.scale = scale
        self.tile = tile
        self.inner_options = dict(inner_options or {})
        self.mode = mode
        self.graphs: list[CompiledGraph] = []

    @property
    def sites(self) -> list[Site]:
        """The live sites of every graph this backend compiled (a site shared by graphs listed once)."""
        found, seen = [], set()
        for graph in self.graphs:
            for site in graph.sites:
                if id(site) not in seen:
                    seen.add(id(site))
                    found.append(site)
        return found

    def __repr__(self) -> str:
        return (f"FxdropBackend(inner={self.inner!r}, p={self.p!r}, pattern={self.pattern!r}, "
                f"graphs={len(self.graphs)}, sites={len(self.sites)})")

    # ------------------------------------------------------------------ compile one graph

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        _configure_logging()
        record = CompiledGraph(index=len(self.graphs), training=False)
        self.graphs.append(record)
        gm = _own_copy(gm)
        extra = self._rewrite(gm, list(example_inputs), record)
        if extra:
            ops.extension.ensure_loaded()  # the graph calls the ops directly: load the kernels now
        record.code = gm.code
        inputs = list(example_inputs) + _fake_like(example_inputs, extra)
        with _dynamic_output_shapes(extra):
            compiled = self._compile_inner(gm, inputs)
        return _WithSiteState(compiled, extra, record) if extra else compiled

    def _compile_inner(self, gm: fx.GraphModule, inputs: list) -> Callable:
        inner = self.inner
        if callable(inner):
            return inner(gm, inputs)
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            patches = dict(torch._inductor.list_mode_options(self.mode)) if self.mode else {}
            patches.update(self.inner_options)
            return compile_fx(gm, inputs, config_patches=patches or None)
        from torch._dynamo.backends.registry import lookup_backend
        fn = lookup_backend(inner)
        return fn(gm, inputs, options=self.inner_options) if self.inner_options else fn(gm, inputs)

    def _rewrite(self, gm: fx.GraphModule, example_inputs: list, record: CompiledGraph) -> list[torch.Tensor]:
        """Plan and rewrite ``gm`` in place; returns the tensors of the extra inputs it added."""
        g = NormalisedGraph(gm.graph, gm, constant_training_follows_mode=True)
        if not any(d.training == "mode" for d in g.dropouts.values()):
            log.debug("graph %d: no dropout active (eval mode or none): left unchanged", record.index)
            return []
        record.training = True
        _label_from_modules(g)
        plan = plan_graph(g, p=self.p, pattern=self.pattern)
        record.records = plan.sites
        counters = _counters()
        for site in plan.sites:
            if site.converted:
                check_rate(site.p, self.max_dp, where=f"p of dropout site {site.name!r}")
        for site in plan.sites:
            counters["sites_converted" if site.converted else "sites_skipped"] += 1
            log.debug("graph %d: %s (%s, p=%s): %s: %s", record.index, site.name, site.node, site.p,
                      site.decision, site.reason)
        if not plan.chains and not plan.tiles and not plan.units:
            return []
        values = _placeholder_values(gm, example_inputs)
        rewriter = _DynamoRewrite(gm, values, self._make_site)
        rewriter.apply(plan)
        record.sites = rewriter.sites
        for kind, count in rewriter.applied.items():
            counters[kind] += count
        return rewriter.extra

    def _make_site(self, record: DropoutSite, anchor: torch.Tensor | None) -> Site:
        key = (record.name, record.p, record.family, self.scale, record.units, record.weight_shape, self.tile,
               self.max_dp, self.seed)
        table = _REGISTRY.setdefault(anchor, {}) if anchor is not None else None
        if table is not None and key in table:
            log.debug("%s: reusing the live site (its stream continues)", record.name)
            return table[key]
        seed = None if self.seed is None else derive_seed(self.seed, zlib.crc32(record.name.encode()))
        site = Site.create(record.name, record.p, record.family, max_dp=self.max_dp, seed=seed, scale=self.scale,
                           units=record.units, weight_shape=record.weight_shape, tile=self.tile,
                           producer=record.producer, consumer=record.consumer)
        if table is not None:
            table[key] = site
        return site


def _own_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own Graph: Dynamo keeps using the graph it handed over (its placeholders
    must stay its own). Dynamo's metadata, which AOTAutograd reads, is carried over."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, value_map))
    for old, new in value_map.items():
        if hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    copy = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copy.meta.update(gm.meta)
    for attr in ("_param_name_to_source", "_source_to_user_stacks"):
        if hasattr(gm, attr):
            setattr(copy, attr, getattr(gm, attr))
    return copy


def _placeholder_values(gm: fx.GraphModule, example_inputs: list) -> dict[fx.Node, Any]:
    """The real tensor behind each placeholder (Dynamo passes real example inputs; fall back to grapharg)."""
    values = {}
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), example_inputs):
        if _is_fake(value):
            grapharg = node.meta.get("grapharg")
            value = getattr(grapharg, "example", None) if grapharg is not None else None
        values[node] = value
    return values


@contextlib.contextmanager
def _dynamic_output_shapes(enabled: Any):
    """Let the inner backend trace ``fxdrop::chain``, whose saved outputs have data-dependent widths
    (its fake kernel calls ``ctx.new_dynamic_size()``).

    Dynamo's ShapeEnv allows such ops only under ``fullgraph=True`` or
    ``torch._dynamo.config.capture_dynamic_output_shape_ops``; otherwise AOTAutograd's trace of the
    rewritten graph raises ``DynamicOutputShapeException``. The graph is already captured, so
    allowing them for its compilation only changes nothing else.
    """
    from torch._guards import TracingContext
    context = TracingContext.try_get() if enabled else None
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    if shape_env is None or shape_env.allow_dynamic_output_shape_ops:
        yield
        return
    settings = shape_env.settings  # frozen; part of FakeTensor's dispatch cache key
    shape_env.settings = dataclasses.replace(settings, allow_dynamic_output_shape_ops=True)
    try:
        yield
    finally:
        shape_env.settings = settings


def _is_fake(value: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return isinstance(value, FakeTensor)


def _fake_like(example_inputs: list, extra: list[torch.Tensor]) -> list:
    """Extra inputs in the same world as Dynamo's: fake when its example inputs are fake."""
    from torch._guards import detect_fake_mode
    fake_mode = detect_fake_mode(example_inputs) if any(_is_fake(x) for x in example_inputs) else None
    if fake_mode is None:
        return list(extra)
    return [fake_mode.from_tensor(t, static_shapes=True) for t in extra]


class _DynamoRewrite:
    """Applies a :class:`Plan` to a Dynamo graph with functional op calls.

    Unlike :func:`fxdrop.passes.rewrite.apply_plan` (which installs modules for ``convert``), each site
    gets two new placeholders (state, cdf) and the matched nodes become ``sample_pattern`` + one
    ``fxdrop`` op call, so the inner backend traces plain ops over inputs.
    """

    def __init__(self, gm: fx.GraphModule, values: Mapping[fx.Node, Any],
                 make_site: Callable[[DropoutSite, torch.Tensor | None], Site]):
        self.gm = gm
        self.graph = gm.graph
        self.values = values
        self.make_site = make_site
        self.sites: list[Site] = []
        self.extra: list[torch.Tensor] = []
        self.applied: dict[str, int] = {}
        placeholders = list(self.graph.find_nodes(op="placeholder"))
        self.last_placeholder = placeholders[-1] if placeholders else None

    def apply(self, plan: Plan) -> None:
        for chain in plan.chains:
            self._chain(chain)
        for tile in plan.tiles:
            self._tile(tile)
        for unit in plan.units:
            self._unit(unit)
        topological_order(self.graph)
        self.graph.lint()
        self.gm.recompile()

    # ------------------------------------------------------------ pieces

    def _anchor(self, linear: LinearCall) -> torch.Tensor | None:
        weight = linear.weight
        if isinstance(weight, str):
            try:
                return self.gm.get_parameter(weight)
            except AttributeError:
                return None
        value = self.values.get(weight)
        return value if isinstance(value, nn.Parameter) else None

    def _param(self, value: Any) -> Any:
        return self.graph.get_attr(value) if isinstance(value, str) else value

    def _site_inputs(self, site: Site) -> tuple[fx.Node, fx.Node]:
        """Two new placeholders, after the last one: the site's state (mutated) and its cdf."""
        index = len(self.sites)
        nodes = []
        for what, tensor in (("state", site.scheduler.state), ("cdf", site.scheduler.cdf)):
            if self.last_placeholder is None:
                context = self.graph.inserting_before(next(iter(self.graph.nodes)))
            else:
                context = self.graph.inserting_after(self.last_placeholder)
            with context:
                node = self.graph.placeholder(f"fxdrop_site{index}_{what}")
            node._dynamo_source = None  # AOTAutograd reads it off Dynamo's placeholders; ours have none
            self.last_placeholder = node
            self.extra.append(tensor)
            nodes.append(node)
        self.sites.append(site)
        return nodes[0], nodes[1]

    def _sample(self, site: Site) -> fx.Node:
        state, cdf = self._site_inputs(site)
        return self.graph.call_function(torch.ops.fxdrop.sample_pattern.default, (state, cdf))

    def _replace(self, matched: list[fx.Node], output: fx.Node, build: Callable[[], fx.Node],
                 share: Callable[[fx.Node], None] | None = None) -> None:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        last = max(matched, key=order.__getitem__)
        with self.graph.inserting_before(last.next):
            new = build()
        if share is not None:
            share(new)
        output.replace_all_uses_with(new)
        new.meta.update({k: v for k, v in output.meta.items() if k in ("nn_module_stack", "stack_trace")})
        for node in sorted(matched, key=order.__getitem__, reverse=True):
            self.graph.erase_node(node)

    def _count(self, kind: str) -> None:
        self.applied[kind] = self.applied.get(kind, 0) + 1

    # ------------------------------------------------------------ the three rewrites

    def _chain(self, chain: ChainPlan) -> None:
        linears = chain.linears
        offset = 0 if chain.input_dropout else 1
        sites = []
        for k, record in enumerate(chain.sites):
            # the Linear the site shrinks on its input side, or the last one for an output site
            anchor = linears[min(k + offset, len(linears) - 1)]
            sites.append(self.make_site(record, self._anchor(anchor)))
        source = chain.dropouts[0].input if chain.input_dropout else linears[0].input
        output = chain.dropouts[-1].node if chain.output_dropout else linears[-1].node
        graph = self.graph
        rows: list[fx.Node] = []

        def build() -> fx.Node:
            rows.extend(self._sample(site) for site in sites)
            patterns = graph.call_function(torch.stack, (list(rows),))
            weights = [self._param(linear.weight) for linear in linears]
            biases = [self._param(linear.bias) if linear.bias is not None else None for linear in linears]
            return graph.call_function(ops.chain, (source, weights, biases, patterns), dict(
                family=chain.family, activations=list(chain.activations), input_dropout=chain.input_dropout,
                output_dropout=chain.output_dropout, scale=sites[0].scale, rates=[s.p for s in sites]))

        def share(new: fx.Node) -> None:
            """The input dropout's other users read ``x * mask`` of the same pattern (the fx pass's
            ``share_input``); they may precede the chain, hence the topological sort in :meth:`apply`."""
            with graph.inserting_after(new):
                dropped = graph.call_function(ops.unit_dropout, (source, rows[0]), dict(
                    family=chain.family, scale=sites[0].scale, p=sites[0].p))
            first = linears[0].node
            chain.dropouts[0].node.replace_all_uses_with(dropped, delete_user_cb=lambda user: user is not first)

        self._replace(chain_nodes(chain), output, build, share if chain.input_shared else None)
        self._count("chain")

    def _tile(self, tile: TilePlan) -> None:
        site = self.make_site(tile.site, self._anchor(tile.linear))
        graph = self.graph

        def build() -> fx.Node:
            pattern = self._sample(site)
            bias = self._param(tile.linear.bias) if tile.linear.bias is not None else None
            return graph.call_function(ops.tile_linear, (tile.dropout.input, self._param(tile.linear.weight), bias,
                                                         pattern), dict(tile=site.tile, scale=site.scale, p=site.p))

        self._replace([tile.dropout.node, tile.linear.node], tile.linear.node, build)
        self._count("tile_linear")

    def _unit(self, unit: UnitPlan) -> None:
        g_users = [u for u in unit.dropout.node.users]
        anchor = None
        for user in g_users:
            weight = user.kwargs.get("weight", user.args[1] if len(user.args) > 1 else None)
            value = self.values.get(weight) if isinstance(weight, fx.Node) else None
            if isinstance(value, nn.Parameter):
                anchor = value
                break
        site = self.make_site(unit.site, anchor)
        graph = self.graph

        def build() -> fx.Node:
            pattern = self._sample(site)
            return graph.call_function(ops.unit_dropout, (unit.dropout.input, pattern),
                                       dict(family=site.family, scale=site.scale, p=site.p))

        self._replace([unit.dropout.node], unit.dropout.node, build)
        self._count("unit_dropout")


# ---------------------------------------------------------------- entry points


def _check_options(inner: Any, p: Any, pattern: Any, max_dp: Any, seed: Any, scale: Any, tile: Any) -> None:
    if not (isinstance(inner, str) or callable(inner)):
        raise TypeError(f"inner must be a backend name or a backend callable, got {type(inner).__name__}")
    if isinstance(p, (int, float)) and not isinstance(p, bool) and not 0.0 <= float(p) < 1.0:
        raise ValueError(f"p={p} is outside [0, 1): pass a drop rate at least 0 and below 1, or None to keep "
                         "each site's own rate")
    if isinstance(pattern, str) and pattern not in FAMILIES:
        raise ValueError(f"pattern={pattern!r} is not a pattern family; expected one of {', '.join(FAMILIES)}")
    check_max_dp(max_dp)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if scale not in SCALE_MODES:
        raise ValueError(f"scale={scale!r} is not a scale mode; expected one of {', '.join(SCALE_MODES)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be an int >= 1, got {tile!r}")


_OPTIONS = ("inner", "p", "pattern", "max_dp", "seed", "scale", "tile", "inner_options")


def make_backend(inner: str | Callable = INNER_DEFAULT, **options: Any) -> FxdropBackend:
    """A backend to pass as ``torch.compile(model, backend=make_backend("eager", p=0.5))``.

    Keep it to inspect what happened: ``backend.graphs`` (decisions per captured graph), ``backend.sites``.
    """
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"make_backend: unknown options {unknown}; expected some of {list(_OPTIONS[1:])}")
    return FxdropBackend(inner, **options)


def fxdrop_backend(gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None,
                   mode: str | None = None) -> Callable:
    """The registered backend: ``torch.compile(model, backend="fxdrop", options={"inner": "eager", "p": 0.5})``.

    ``options`` takes the keyword arguments of :func:`make_backend`; ``mode`` goes to Inductor.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f'backend="fxdrop": unknown options {unknown}; expected some of {list(_OPTIONS)}')
    return FxdropBackend(mode=mode, **options)(gm, example_inputs)


def _register() -> None:
    """Register ``"fxdrop"`` with Dynamo, unless its entry point is about to (or already did).

    ``lookup_backend`` loads an entry point and then registers what it loaded; registering here as
    well would make that second registration fail ("duplicate name"), so when the name is known from
    the ``torch_dynamo_backends`` entry point, the registry is left to do it.
    """
    from importlib.metadata import EntryPoint

    from torch._dynamo.backends import registry

    if BACKEND_NAME in registry._COMPILER_FNS or isinstance(registry._BACKENDS.get(BACKEND_NAME), EntryPoint):
        return
    registry.register_backend(fxdrop_backend, name=BACKEND_NAME)


_register()
