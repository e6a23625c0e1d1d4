"""RegionForward: the forward fxdrop installs on a converted region, and the programs it runs.

A converted model is the user's module tree (a clone sharing every Parameter): same classes, same
methods, same attributes. Each *region* (a module, or a method such as ``_ff_block`` of a
``TransformerEncoderLayer``, that holds converted sites) gets an instance attribute of that name, a
``RegionForward``. When none of the region's sites is active (every dropout it replaced is in eval
mode or at rate 0) it runs the module's own method: eval output is the original's, bit for bit, and
hooks on every submodule fire. Otherwise it runs the region's *program* for the call's
:class:`~fxdrop.passes.spec.CallSpec`: the traced graph with the planned subgraphs replaced by the
structured callables of :mod:`.structured`, generated as Python code whose ``self`` is the live
module (so weights, parametrizations, modes and rates are read at each call).

A program is built once per spec, from the real call: traced, planned, rewritten, and checked
against the module on that call (both in eval mode, no gradients, the same RNG state: the outputs
must be bit for bit equal) before it is used. A call whose spec cannot be traced, or whose program
fails the check, runs the original method, and fxdrop warns once, naming the region and the reason.
Under ``torch.compile`` programs are never built (fx tracing inside Dynamo): a program built at
conversion (or by an eager call) is used; other calls run the original method (warned once).

Imports torch, the passes and the structured callables.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import linecache
import warnings
from typing import Any

import torch
from torch import fx, nn

from ..config import DropoutConfig
from ..passes.normalise import NormalisedGraph, drop_identities
from ..passes.plan import ChainPlan, DropoutSite, Plan, RNNInputPlan, TilePlan, UnitPlan, plan_graph
from ..passes.rewrite import apply_plan, tuple_outputs
from ..passes.spec import CallSpec
from ..passes.trace import FORWARD_ATTR, TraceError, get_path, trace_with_retries
from ..site import CallerOwner, ModuleOwner, Site
from .structured import PROBE, HookWatch, RNNInput, StructuredChain, TileLinear, UnitDropout

_COUNTER = itertools.count()


def installed(module: nn.Module, method: str = "forward") -> "RegionForward | None":
    value = module.__dict__.get(method)
    return value if isinstance(value, RegionForward) else None


class _ProgramSelf:
    """``self`` of a program: the live region module, plus the program's structured callables."""

    __slots__ = ("_module", "_structured")

    def __init__(self, module: nn.Module, structured: dict[str, Any]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_structured", structured)

    def __getattr__(self, name: str) -> Any:
        found = self._structured.get(name)
        return found if found is not None else getattr(self._module, name)


@dataclasses.dataclass
class Program:
    """A region's rewritten graph for one call spec, as a Python function of the spec's tensor slots."""

    spec: CallSpec
    plan: Plan
    graph: fx.Graph
    function: Any
    self_: _ProgramSelf
    code: str
    verified: bool = False
    output_type: type | None = None
    specialized: bool = False  # valid for its spec's tensor dtypes only (else for any dtype)

    def __call__(self, *tensors):
        out = self.function(self.self_, *tensors)
        if type(out) is dict and self.output_type is not None and self.output_type is not dict \
                and issubclass(self.output_type, dict):
            return self.output_type(**out)  # a ModelOutput, as the module returns it
        return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return type(a) is type(b) and list(a.keys()) == list(b.keys()) and all(_same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        return all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return type(a) is type(b) and (a is b or a == b)


class ModuleEmitter:
    """Emits calls of structured callables (held by the program's ``self``) for :func:`apply_plan`."""

    def __init__(self, region: "RegionForward", g: NormalisedGraph, structured: dict[str, Any]):
        self.region = region
        self.g = g
        self.structured = structured

    def _install(self, kind: str, callable_: Any) -> str:
        target = f"fxdrop_{kind}_{sum(1 for k in self.structured if k.startswith(f'fxdrop_{kind}_'))}"
        self.structured[target] = callable_
        return target

    def _modules(self, nodes) -> list[nn.Module]:
        return [m for m in (self.g.module(n) for n in nodes) if m is not None]

    def param(self, graph: fx.Graph, value: fx.Node | str) -> fx.Node:
        return graph.get_attr(value) if isinstance(value, str) else value

    def chain(self, graph: fx.Graph, chain: ChainPlan, source: fx.Node, params: list[fx.Node]):
        sites = [self.region.site(record) for record in chain.sites]
        watch = HookWatch(self._modules(chain.nodes), f"site {sites[0].name}" if len(sites) == 1 else
                          f"the chain of sites {', '.join(s.name for s in sites)}")
        module = StructuredChain(sites, family=chain.family, activations=chain.activations,
                                 has_bias=[l.bias is not None for l in chain.linears], layout=chain.layout,
                                 scale=sites[0].scale, linears=[l.label for l in chain.linears],
                                 transposed=[l.transposed for l in chain.linears], share_input=chain.input_shared,
                                 watch=watch)
        node = graph.call_module(self._install("chain", module), (source, *params))
        if not chain.input_shared:
            return node, None
        return tuple_outputs(graph, node)

    def tile(self, graph: fx.Graph, tile: TilePlan, source: fx.Node, params: list[fx.Node]) -> fx.Node:
        site = self.region.site(tile.site)
        module = TileLinear(site, has_bias=tile.linear.bias is not None, linear=tile.linear.label,
                            transposed=tile.linear.transposed,
                            watch=HookWatch(self._modules(tile.nodes), f"site {site.name}"))
        return graph.call_module(self._install("tile", module), (source, *params))

    def unit(self, graph: fx.Graph, unit: UnitPlan, source: fx.Node) -> fx.Node:
        site = self.region.site(unit.site)
        module = UnitDropout(site, watch=HookWatch(self._modules(unit.nodes), f"site {site.name}"))
        return graph.call_module(self._install("unit", module), (source,))

    def rnn_input(self, graph: fx.Graph, rnn_input: RNNInputPlan, source: fx.Node) -> fx.Node:
        site = self.region.site(rnn_input.site)
        rnn = self.g.module(rnn_input.rnn)
        callable_ = RNNInput(site, rnn)
        return graph.call_module(self._install("rnn_input", callable_), (source, *rnn_input.rnn.args[1:]),
                                 dict(rnn_input.rnn.kwargs))


class RegionForward:
    """The installed method of a converted region (see the module docstring)."""

    fxdrop_region = True  # marks it for clone_modules, which drops it when a converted model is converted again

    def __init__(self, module: nn.Module, *, name: str, method: str, config: DropoutConfig,
                 retry_leaves: tuple[str, ...] = ()):
        self.module = module
        self.name = name
        self.method = method
        self.config = config
        self.retry_leaves = tuple(retry_leaves)
        self.sites: dict[str, Site] = {}
        self.programs: dict[CallSpec, Program | str] = {}
        self.records: list[DropoutSite] = []  # the plan of the first program (what convert reports)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ identity

    @property
    def label(self) -> str:
        base = self.name or "<root>"
        return base if self.method == "forward" else f"{base}.{self.method}"

    @property
    def original(self):
        return getattr(type(self.module), self.method)

    @property
    def signature(self) -> inspect.Signature:
        return inspect.signature(self.original)

    def fxdrop_sites(self) -> list[Site]:
        return list(self.sites.values())

    def __repr__(self) -> str:
        return f"RegionForward({self.label}, sites=[{', '.join(self.sites)}], programs={len(self.programs)})"

    # ------------------------------------------------------------------ sites

    def _relative(self, path: str) -> str:
        if not self.name:
            return path
        if path == self.name:
            return ""
        return path[len(self.name) + 1:] if path.startswith(self.name + ".") else path

    def site(self, record: DropoutSite) -> Site:
        """The live site of a plan record (made on first use; the same object for every program)."""
        found = self.sites.get(record.name)
        if found is not None:
            return found
        owner_module = self.module.get_submodule(self._relative(record.owner))
        owner = CallerOwner(owner_module, record.p) if record.functional else ModuleOwner(owner_module)
        site = self.sites[record.name] = Site.from_record(record, self.config, owner)
        return site

    # ------------------------------------------------------------------ the call

    def __call__(self, *args, **kwargs):
        if not PROBE.active and not any(site.active for site in self.sites.values()):
            return self.original(self.module, *args, **kwargs)
        spec = CallSpec.of(self.signature, args, kwargs)
        program = self._lookup(spec) if not isinstance(spec, str) else spec
        if program is None:
            program = self.prepare(spec, (args, kwargs))
        if isinstance(program, str):
            self._warn(program)
            return self.original(self.module, *args, **kwargs)
        if not program.verified and not torch.compiler.is_compiling():
            problem = self._verify(program, args, kwargs)
            if problem is not None:
                self.programs[spec] = problem
                self._warn(problem)
                return self.original(self.module, *args, **kwargs)
        return program(*spec.tensors(self.signature, args, kwargs))

    def _lookup(self, spec: CallSpec) -> Program | str | None:
        """The program for ``spec``: built for it, or for its dtype-erased form by a trace that never asked a
        dtype (valid for any)."""
        found = self.programs.get(spec)
        if found is None:
            found = self.programs.get(spec.erased())
            if isinstance(found, Program) and found.specialized:
                found = None
        return found

    def _warn(self, reason: str) -> None:
        if reason in self._warned or torch.compiler.is_compiling():
            return
        self._warned.add(reason)
        warnings.warn(f"fxdrop: {self.label} runs as the original module here (its dropouts as nn.Dropout): "
                      f"{reason}", stacklevel=3)

    # ------------------------------------------------------------------ building programs

    def prepare(self, spec: CallSpec | str, call: tuple[tuple, dict] | None = None) -> Program | str:
        """The program for ``spec`` (built now; checked against ``call`` when given), or why there is none."""
        if isinstance(spec, str):
            return spec
        if torch.compiler.is_compiling():
            return (f"it was not traced for calls with ({spec.describe()}) before torch.compile ran; run one "
                    "eager forward first, or pass example_inputs to fxdrop.convert")
        try:
            program = self._build(spec)
        except TraceError as err:
            program = f"it does not trace for calls with ({spec.describe()}): {err}"
        if not isinstance(program, str) and call is not None:
            problem = self._verify(program, *call)
            if problem is not None:
                program = problem
        self.programs[spec] = program
        if isinstance(program, Program) and not program.specialized:
            self.programs.setdefault(spec.erased(), program)
        if not isinstance(program, str) and not self.records:
            self.records = program.plan.sites
        return program

    def _leaves(self) -> frozenset[int]:
        ids = {id(self.module.get_submodule(path)) for path in self.retry_leaves}
        for sub in self.module.modules():
            if sub is not self.module and any(isinstance(v, RegionForward) for v in vars(sub).values()):
                ids.add(id(sub))  # a region of its own: called, not traced through
        return frozenset(ids)

    def _build(self, spec: CallSpec) -> Program:
        trace, _, _ = trace_with_retries(self.module, spec, method=self.method, leaves=self._leaves())
        graph = trace.graph
        drop_identities(graph, self.module)
        g = NormalisedGraph(graph, self.module, prefix=self.name)
        plan = plan_graph(g, self.config, region=self.name)
        structured: dict[str, Any] = {}
        applied = apply_plan(graph, plan, ModuleEmitter(self, g, structured))
        applied_sites = {s.name for r in applied for s in ([r.site] if hasattr(r, "site") else r.sites)}
        for record in plan.sites:
            if record.converted and record.name not in applied_sites:
                record.converted, record.plan = False, None
        graph.lint()
        code = graph.python_code(root_module="self")
        filename = f"<fxdrop {self.label} #{next(_COUNTER)}>"
        linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
        namespace = dict(code.globals)
        exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 (fx's generated code, as GraphModule)
        return Program(spec, plan, graph, namespace["forward"], _ProgramSelf(self.module, structured), code.src,
                       output_type=trace.output_type, specialized=trace.specialized)

    def _verify(self, program: Program, args: tuple, kwargs: dict) -> str | None:
        """None when the program computes what the module computes on this call (eval, bit for bit).

        Objects the call passes (a cache, say) are copied for each of the two runs, so the check changes
        none of the caller's state."""
        modes = {m: m.training for m in self.module.modules()}
        try:
            for m in modes:
                m.training = False
            with torch.no_grad(), torch.random.fork_rng(devices=_devices(args, kwargs)):
                torch.manual_seed(0)
                call_args, call_kwargs = _copy_objects(args, kwargs)
                expected = self.original(self.module, *call_args, **call_kwargs)
                torch.manual_seed(0)
                call_args, call_kwargs = _copy_objects(args, kwargs)
                got = program(*program.spec.tensors(self.signature, call_args, call_kwargs))
        except Exception as err:  # the user's model raises whatever it raises
            text = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return f"its traced program fails on this call ({type(err).__name__}: {text})"
        finally:
            for m, training in modes.items():
                m.training = training
        if not _same(got, expected):
            return (f"its traced program disagrees with the module on a call with ({program.spec.describe()}): fx "
                    "took a branch the real call does not")
        program.verified = True
        return None

    # ------------------------------------------------------------------ copies

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["programs"] = {}  # rebuilt (and checked again) at the first call that needs one
        state["config"] = _picklable(self.config, self.sites)
        return state


def _copy_objects(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Deep copies of the non-tensor, non-constant arguments (tensors and constants are passed as they are)."""
    def copy_one(value):
        if isinstance(value, (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device)):
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(copy_one(v) for v in value)
        try:
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001  (not copyable: the check uses it as it is)
            return value
    return tuple(copy_one(a) for a in args), {k: copy_one(v) for k, v in kwargs.items()}


def _devices(args: tuple, kwargs: dict) -> list[int]:
    if not torch.cuda.is_available():
        return []
    found = {t.device.index for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.is_cuda}
    return sorted(i for i in found if i is not None)


def _picklable(config: DropoutConfig, sites: dict[str, Site]) -> DropoutConfig:
    """The config with callable options replaced by their values at the known sites (callables may not
    pickle; the sites already hold their rates)."""
    changes = {}
    if callable(config.p) and not isinstance(config.p, (float, dict)):
        changes["p"] = None
    if callable(config.pattern) and not isinstance(config.pattern, (str, dict)):
        changes["pattern"] = {name: site.family for name, site in sites.items()}
    return dataclasses.replace(config, **changes) if changes else config


def install(module: nn.Module, method: str, region: RegionForward) -> None:
    module.__dict__[method] = region
    module.__dict__[FORWARD_ATTR] = True


__all__ = ["ModuleEmitter", "Program", "RegionForward", "install", "installed"]
