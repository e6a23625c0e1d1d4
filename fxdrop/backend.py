"""``torch.compile(model, backend="fxdrop")``: convert dropout sites in the graphs Dynamo captures.

Dynamo hands a backend one functional fx graph per captured region: ``nn.Linear`` appears as
``linear(x, W, b)`` with the Parameters as graph inputs, ``nn.Dropout`` as ``dropout(x, p, True)``
(Dynamo specialises ``self.training`` and ``p`` into constants and guards on them, so an eval-mode
graph has ``training=False`` and a change of mode or rate recompiles). Each graph is planned by the
one planner (:func:`fxdrop.passes.plan.plan_graph` on a
:class:`~fxdrop.passes.normalise.NormalisedGraph`), with the options of :class:`fxdrop.DropoutConfig`
(the keywords of :func:`fxdrop.convert`), rewritten by the one graph surgery
(:func:`fxdrop.passes.rewrite.apply_plan`) with :class:`FunctionalEmitter`, and handed to the inner
backend (Inductor by default). Because every graph is rewritten on its own, models that fx cannot
trace convert too: what Dynamo captures converts.

Where the scheduler state lives. A converted site draws a pattern through ``fxdrop::sample_pattern``
(or ``fxdrop::sample_classes`` for ``granularity="rows"``), which mutates the site's int64 state
tensor. The emitter adds each site's state and cdf as *extra graph inputs* (placeholders after
Dynamo's own), and the compiled callable this backend returns appends those tensors to every call;
the inner backend sees ordinary inputs with an in-place mutation (AOTAutograd writes it back). So the
state persists across calls in the Site objects the callable holds, and new patterns never recompile.

Sites are kept in a registry keyed by the Parameter they shrink (weakly, so a model's sites die with
it), and reused when Dynamo recompiles the same model (new shapes, mode switch back), so a site's
random stream continues instead of restarting. Site names, seeds and granularity are decided as
:func:`fxdrop.convert` decides them (the same names, from Dynamo's ``nn_module_stack``; the same seed
per name): for the same model and seed, both draw the same patterns. :func:`sites(model)` lists the
sites of a model compiled with this backend; a backend made by :func:`make_backend` also lists its own
(``backend.sites``) and keeps one record per captured graph (``backend.graphs``).

Eval graphs (no dropout active) pass through unchanged. Each converted site bumps
``torch._dynamo.utils.counters["fxdrop"]["sites_converted"]`` (and ``"sites_skipped"`` for a site left
alone in a training graph; ``"chain"``, ``"tile_linear"``, ``"unit_dropout"`` per rewrite applied).
Decisions are logged to the ``fxdrop.backend`` logger at DEBUG; ``FXDROP_LOG=1`` turns that on.
LSTMs and GRUs: Dynamo does not trace ``nn.LSTM``/``nn.GRU``; a model with recurrent dropout gets a
one-time warning naming the fix (``fxdrop.convert`` first, then compile).

Imports torch, fxdrop's config, ops, site, scheduler and the passes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from torch import fx, nn
from torch.utils.weak import WeakIdKeyDictionary

from . import ops
from .config import OPTIONS, DropoutConfig
from .passes.normalise import NormalisedGraph
from .passes.plan import ChainPlan, DropoutSite, RNNInputPlan, TilePlan, UnitPlan, plan_graph
from .passes.rewrite import COUNTERS, apply_plan
from .site import Site

__all__ = ["FxdropBackend", "CompiledGraph", "FunctionalEmitter", "fxdrop_backend", "make_backend", "sites"]

BACKEND_NAME = "fxdrop"
COUNTER = "fxdrop"
INNER_DEFAULT = "inductor"
BACKEND_OPTIONS = ("inner", "inner_options")

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


def _module_scope(node: fx.Node) -> str:
    """The module whose forward made ``node`` (Dynamo's innermost ``nn_module_stack`` entry), qualified."""
    found = _innermost(node)
    if found is None:
        return ""
    path, cls = found
    if node.op == "call_function" and cls is not None and issubclass(cls, nn.modules.dropout._DropoutNd):
        return path.rpartition(".")[0]  # a Dropout module's own F.dropout: named by the module below
    return path


def _label_from_modules(g: NormalisedGraph) -> None:
    """Name Dynamo's functional calls after the modules they came from (``nn_module_stack``).

    A Linear gets its ``nn.Linear``'s qualified name; a dropout its ``nn.Dropout``'s (``DropoutCall.module``),
    or ``<module>.dropout`` for ``F.dropout`` called in that module's forward, as the planner names
    sites of :func:`fxdrop.convert` (``name:k`` for repeated calls).
    """
    for node, call in list(g.linears.items()):
        found = _innermost(call.nodes[0] if call.nodes else node)
        if found is not None and found[1] is not None and found[0] and (
                issubclass(found[1], nn.Linear) or found[1].__name__ == "Conv1D"):
            g.linears[node] = dataclasses.replace(call, label=found[0])
    for node, call in list(g.dropouts.items()):
        found = _innermost(node)
        if call.module is not None or found is None:
            continue
        path, cls = found
        if cls is not None and issubclass(cls, nn.modules.dropout._DropoutNd) and path:
            g.dropouts[node] = dataclasses.replace(call, module=path, caller=path.rpartition(".")[0])
        else:
            g.dropouts[node] = dataclasses.replace(call, caller=path)


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


# ---------------------------------------------------------------- sites of Dynamo graphs


class FixedOwner:
    """A site of a Dynamo graph: Dynamo baked the rate and the mode (a training graph) and guards on both."""

    def __init__(self, p: float):
        self.p = p
        self.training = True


class FunctionalEmitter:
    """Emits op calls into a Dynamo graph for :func:`fxdrop.passes.rewrite.apply_plan`: each site gets two
    new placeholders (its state, mutated, and its cdf) and a sample op; the planned subgraph becomes one
    ``fxdrop`` op call, as the structured callables of :mod:`fxdrop.modules.structured` make in eager."""

    def __init__(self, gm: fx.GraphModule, values: Mapping[fx.Node, Any],
                 make_site: Callable[[DropoutSite, torch.Tensor | None], Site]):
        self.gm = gm
        self.graph = gm.graph
        self.values = values
        self.make_site = make_site
        self.sites: list[Site] = []
        self.extra: list[torch.Tensor] = []
        placeholders = list(self.graph.find_nodes(op="placeholder"))
        self.last_placeholder = placeholders[-1] if placeholders else None

    def _anchor(self, value: Any) -> torch.Tensor | None:
        if isinstance(value, str):
            try:
                return self.gm.get_parameter(value)
            except AttributeError:
                return None
        found = self.values.get(value)
        return found if isinstance(found, nn.Parameter) else None

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

    def _draw(self, site: Site) -> fx.Node:
        state, cdf = self._site_inputs(site)
        if site.granularity == "rows":
            return self.graph.call_function(torch.ops.fxdrop.sample_classes.default,
                                            (state, cdf, site.row_classes, site.position))
        return self.graph.call_function(torch.ops.fxdrop.sample_pattern.default, (state, cdf))

    def param(self, graph: fx.Graph, value: fx.Node | str) -> fx.Node:
        return graph.get_attr(value) if isinstance(value, str) else value

    def _weight(self, node: fx.Node, transposed: bool) -> fx.Node:
        return self.graph.call_method("t", (node,)) if transposed else node

    def chain(self, graph: fx.Graph, chain: ChainPlan, source: fx.Node, params: list[fx.Node]):
        linears = chain.linears
        sites = []
        for k, record in enumerate(chain.sites):
            # the Linear the site shrinks on its input side, or the last one for an output site
            layer = min(k + (0 if chain.layout.input_dropout else 1), len(linears) - 1)
            sites.append(self.make_site(record, self._anchor(linears[layer].weight)))
        draws = [self._draw(site) for site in sites]
        patterns = graph.call_function(ops.chain_patterns, (draws,))
        weights, biases, i = [], [], 0
        for linear in linears:
            weights.append(self._weight(params[i], linear.transposed))
            i += 1
            biases.append(params[i] if linear.bias is not None else None)
            i += linear.bias is not None
        rates = [site.p for site in sites]
        node = graph.call_function(ops.chain, (source, weights, biases, patterns), dict(
            family=chain.family, activations=list(chain.activations), input_dropout=chain.layout.input_dropout,
            output_dropout=chain.layout.output_dropout, scale=sites[0].scale, rates=rates))
        if not chain.input_shared:
            return node, None
        shared = graph.call_function(ops.unit_dropout, (source, draws[0]),
                                     dict(family=chain.family, scale=sites[0].scale, p=rates[0]))
        return node, shared

    def tile(self, graph: fx.Graph, tile: TilePlan, source: fx.Node, params: list[fx.Node]) -> fx.Node:
        site = self.make_site(tile.site, self._anchor(tile.linear.weight))
        pattern = self._draw(site)
        weight = self._weight(params[0], tile.linear.transposed)
        bias = params[1] if tile.linear.bias is not None else None
        return graph.call_function(ops.tile_linear, (source, weight, bias, pattern),
                                   dict(tile=site.tile, scale=site.scale, p=site.p))

    def unit(self, graph: fx.Graph, unit: UnitPlan, source: fx.Node) -> fx.Node:
        anchor = None
        for user in unit.dropout.node.users:
            weight = user.kwargs.get("weight", user.args[1] if len(user.args) > 1 else None)
            anchor = self._anchor(weight) if isinstance(weight, fx.Node) else None
            if anchor is not None:
                break
        site = self.make_site(unit.site, anchor)
        return graph.call_function(ops.unit_dropout, (source, self._draw(site)),
                                   dict(family=site.family, scale=site.scale, p=site.p))

    def rnn_input(self, graph: fx.Graph, rnn_input: RNNInputPlan, source: fx.Node) -> None:
        return None  # Dynamo graphs hold no RNN calls fxdrop could restructure


# ---------------------------------------------------------------- the backend


class FxdropBackend:
    """A Dynamo backend: plan and rewrite each captured graph, then compile it with ``inner``.

    ``config`` (or the keywords of :func:`fxdrop.convert`, which make one): what to convert and how.
    ``inner``: a backend name (``"inductor"``, ``"aot_eager"``, ``"eager"``, ...) or a backend callable;
    ``inner_options`` go to Inductor as config patches (or, for another named backend, as its options).
    """

    def __init__(self, inner: str | Callable = INNER_DEFAULT, *, inner_options: Mapping[str, Any] | None = None,
                 mode: str | None = None, config: DropoutConfig | None = None, **options: Any):
        if not (isinstance(inner, str) or callable(inner)):
            raise TypeError(f"inner must be a backend name or a backend callable, got {type(inner).__name__}")
        self.config = DropoutConfig.from_options(options, where='backend="fxdrop"') if config is None else \
            DropoutConfig.from_options(options, config=config, where='backend="fxdrop"')
        self.inner = inner
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
        return f"FxdropBackend(inner={self.inner!r}, config={self.config!r}, graphs={len(self.graphs)})"

    # ------------------------------------------------------------------ compile one graph

    def __call__(self, gm: fx.GraphModule, example_inputs: list) -> Callable:
        _configure_logging()
        _warn_about_rnns()
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
        g = NormalisedGraph(gm.graph, gm, constant_training_follows_mode=True, scope=_module_scope)
        if not any(d.training == "mode" for d in g.dropouts.values()):
            log.debug("graph %d: no dropout active (eval mode or none): left unchanged", record.index)
            return []
        record.training = True
        _label_from_modules(g)
        plan = plan_graph(g, self.config)
        record.records = plan.sites
        counters = _counters()
        for site in plan.sites:
            if site.converted:
                self.config.check_site_rate(site.name, site.p)
        for site in plan.sites:
            counters["sites_converted" if site.converted else "sites_skipped"] += 1
            log.debug("graph %d: %s (%s, p=%s): %s: %s", record.index, site.name, site.node, site.p,
                      site.decision, site.reason)
        if not plan.rewrites:
            return []
        emitter = FunctionalEmitter(gm, _placeholder_values(gm, example_inputs), self._make_site)
        before = dict(COUNTERS)
        apply_plan(gm.graph, plan, emitter)
        gm.recompile()
        record.sites = emitter.sites
        for kind, count in COUNTERS.items():
            if count != before.get(kind, 0):
                counters[kind] += count - before.get(kind, 0)
        return emitter.extra

    def _make_site(self, record: DropoutSite, anchor: torch.Tensor | None) -> Site:
        config = self.config
        key = (record.name, record.family, record.units, record.weight_shape, repr(config))
        table = _REGISTRY.setdefault(anchor, {}) if anchor is not None else None
        if table is not None and key in table:
            site = table[key]
            log.debug("%s: reusing the live site (its stream continues)", record.name)
            if site.owner.p != record.p:  # Dynamo recompiled for a new rate
                site.owner.p = record.p
                site.sync()
            return site
        site = Site.from_record(record, config, FixedOwner(record.p))
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


_RNN_WARNED: set[int] = set()


def _warn_about_rnns() -> None:
    """Once per model: Dynamo does not trace nn.LSTM / nn.GRU (it runs them eagerly and, for a graph break
    inside a forward, the rest of that forward too), so their dropouts, and those next to them, never reach
    this backend. The fix is to convert first."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        root = InstructionTranslator.current_tx().output.root_tx.f_locals.get("self")
    except Exception:  # no Dynamo frame (a direct call), or Dynamo's internals moved
        return
    if not isinstance(root, nn.Module) or id(root) in _RNN_WARNED:
        return
    from .modules.rnn import StructuredRNN

    rnns = [name for name, m in root.named_modules() if isinstance(m, (nn.RNNBase,)) and not isinstance(m, StructuredRNN)]
    if rnns:
        _RNN_WARNED.add(id(root))
        warnings.warn(f'fxdrop: backend="fxdrop" cannot convert the dropouts of {type(root).__name__}\'s recurrent '
                      f"modules ({', '.join(rnns)}): Dynamo does not trace nn.LSTM / nn.GRU and runs them (and often "
                      "the rest of the forward) eagerly. Convert first, then compile: "
                      "torch.compile(fxdrop.convert(model))", stacklevel=2)


# ---------------------------------------------------------------- entry points


def make_backend(inner: str | Callable = INNER_DEFAULT, **options: Any) -> FxdropBackend:
    """A backend to pass as ``torch.compile(model, backend=make_backend("eager", p=0.5))``.

    ``options``: the keywords of :func:`fxdrop.convert` (or ``config=``) and ``inner_options``. Keep the
    backend to inspect what happened: ``backend.graphs`` (decisions per captured graph), ``backend.sites``.
    """
    unknown = sorted(set(options) - set(OPTIONS) - {"inner_options", "config", "mode"})
    if unknown:
        raise TypeError(f"make_backend: unknown options {unknown}; the options are {list(OPTIONS)} and inner_options")
    return FxdropBackend(inner, **options)


def fxdrop_backend(gm: fx.GraphModule, example_inputs: list, *, options: Mapping[str, Any] | None = None,
                   mode: str | None = None) -> Callable:
    """The registered backend: ``torch.compile(model, backend="fxdrop", options={"inner": "eager", "p": 0.5})``.

    ``options`` takes ``inner``, ``inner_options`` and the keywords of :func:`fxdrop.convert`; ``mode`` goes
    to Inductor.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTIONS) - set(BACKEND_OPTIONS) - {"config"})
    if unknown:
        raise TypeError(f'backend="fxdrop": unknown options {unknown}; the options are {list(OPTIONS)} and '
                        f'{list(BACKEND_OPTIONS)}')
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
