"""Tracing: the modules of a model that fx can trace (regions), each as a graph of one call spec.

* :class:`FxdropTracer` keeps ``torch.nn`` modules (Linear, Dropout*, LSTM, Embedding, norms, ...),
  fxdrop's own modules, TorchScript modules, modules with hooks and the modules it is told to keep
  (:data:`leaves`) as leaf calls, and traces through user modules and ``nn.Sequential``. Known
  Linear-like modules of other libraries (transformers' ``Conv1D``) are leaves too: the planner reads
  them as Linears (:mod:`.normalise`). It records the deepest module whose forward failed, so a region
  can be traced again with that module as a leaf ("one untraceable child does not lose its parent").
* A region is traced for one :class:`~.spec.CallSpec` (tensor slots become placeholders, constants are
  baked in), twice: in training and in eval mode. fx bakes ``self.training`` into the graph as a
  constant; the two traces tell a mode flag (``F.dropout(x, p, self.training)``: True, then False)
  from a constant one. Mode flags are rewired to read, at run time, the ``training`` attribute of
  the module whose forward read it. A forward whose *structure* depends on the mode does not trace.
* :func:`discover` walks the module tree from the root: the largest modules that trace are regions;
  containers (``ModuleList``, ``ModuleDict``) and ``torch.nn`` modules with children (the
  Transformer stacks) are descended into; ``nn.TransformerEncoderLayer``/``DecoderLayer`` trace their
  feed-forward and attention blocks (``_ff_block``, ...) as method regions.
* :func:`clone_modules` copies the module tree (new module objects, the same Parameter and buffer
  objects), so tracing and converting never touch the user's model.

Imports torch and the call spec.
"""

from __future__ import annotations

import copy
import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn

from .spec import CallSpec

MODE_ATTR = "training"
FORWARD_ATTR = "_fxdrop_forward"  # set on a clone's region modules by convert (see fxdrop.modules.region)
MAX_LEAF_RETRIES = 8

# torch.nn modules whose own forwards are fast paths around plain blocks: those blocks are regions.
METHOD_REGIONS: dict[type, tuple[str, ...]] = {
    nn.TransformerEncoderLayer: ("_ff_block", "_sa_block"),
    nn.TransformerDecoderLayer: ("_ff_block", "_sa_block", "_mha_block"),
}
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def linear_like(module: nn.Module) -> bool:
    """A module the planner reads as a Linear although it is not one: transformers' ``Conv1D``
    (``y = x @ W + b`` with ``W: (in, out)``)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") and hasattr(module, "nf")


def natural_leaf(module: nn.Module) -> bool:
    """A leaf whatever its hooks: a ``torch.nn`` module (not a Sequential), an fxdrop module, a
    TorchScript module, a Linear-like module of another library."""
    if isinstance(module, nn.Sequential):
        return False
    if isinstance(module, torch.jit.ScriptModule) or callable(getattr(module, "fxdrop_sites", None)):
        return True
    if linear_like(module):
        return True
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class TraceError(Exception):
    """A module does not trace; the message says why (the tracer's own message where there is one).

    ``culprit``: the qualified name (relative to the traced module) of the deepest module whose forward
    failed, or None when the traced module's own code failed."""

    def __init__(self, message: str, culprit: str | None = None):
        super().__init__(message)
        self.culprit = culprit


class _MetaProxy(fx.Proxy):
    """A proxy that answers ``.dtype`` and ``.device`` with the values the tracer propagated (from the call
    spec's tensors and the module's parameters), so code that branches on them traces; anything else is
    fx's own proxy. A wrong answer cannot go unnoticed: every program is checked against the real call."""

    def __getattr__(self, name: str):
        if name in ("node", "tracer") or name.startswith("__"):
            raise AttributeError(name)  # not set yet (copying, pickling): never a graph attribute
        if name in ("dtype", "device"):
            value = self.node.meta.get(f"fxdrop_{name}")
            if value is not None:
                self.tracer.specialized |= bool(self.node.meta.get("fxdrop_from_spec"))
                return value if name == "dtype" else torch.device(value)
        return super().__getattr__(name)

    def is_floating_point(self):
        dtype = self.node.meta.get("fxdrop_dtype")
        if dtype is not None:
            self.tracer.specialized |= bool(self.node.meta.get("fxdrop_from_spec"))
            return dtype.is_floating_point
        return self.tracer.create_proxy("call_method", "is_floating_point", (self,), {})


_DTYPE_CASTS = {"float": torch.float32, "double": torch.float64, "half": torch.float16, "bfloat16": torch.bfloat16,
                "long": torch.int64, "int": torch.int32, "bool": torch.bool}
_BOOL_RESULTS = {"eq", "ne", "lt", "le", "gt", "ge", "isinf", "isnan", "logical_not", "logical_and", "logical_or"}


def _raw_attr(root: nn.Module, target: str) -> Any:
    """``root.<target>`` through the modules' own dictionaries (None where there is nothing)."""
    obj: Any = root
    for atom in target.split(".") if target else ():
        if isinstance(obj, nn.Module):
            found = None
            for table in ("_parameters", "_buffers", "_modules"):
                found = obj.__dict__.get(table, {}).get(atom)
                if found is not None:
                    break
            obj = found if found is not None else obj.__dict__.get(atom)
        else:
            obj = getattr(obj, atom, None)
        if obj is None:
            return None
    return obj


class FxdropTracer(fx.Tracer):
    """Leaf calls: natural leaves, modules with hooks, and the modules in ``leaves`` (by identity)."""

    def __init__(self, leaves: frozenset[int] = frozenset(), spec: CallSpec | None = None):
        super().__init__()
        self.leaves = leaves
        self.spec = spec
        self.failed: str | None = None
        self.calls: dict[str, tuple[tuple, dict]] = {}  # first call of each traced-through module
        self.output_type: type | None = None
        self.specialized = False  # the trace asked a tensor's dtype or device (so the program is valid for those)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _MetaProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        node = proxy.node
        if kind != "placeholder" and "fxdrop_dtype" not in node.meta:
            dtype, device = self._propagate(kind, target, node)
            node.meta["fxdrop_dtype"], node.meta["fxdrop_device"] = dtype, device
            # Whether the answer comes from the call spec (a placeholder's dtype) rather than from a parameter.
            inputs = [n for n in node.all_input_nodes if n.meta.get("fxdrop_dtype") is not None]
            module = _raw_attr(self.root, target) if kind == "call_module" else None
            own = kind == "get_attr" or (isinstance(module, nn.Module) and any(
                p.is_floating_point() for p in module.parameters()))
            node.meta["fxdrop_from_spec"] = not own and bool(inputs) and bool(inputs[0].meta.get("fxdrop_from_spec"))
        return proxy

    def _propagate(self, kind: str, target: Any, node: fx.Node) -> tuple[Any, Any]:
        """The dtype and device type of a new node's value, where a simple rule knows them (else None)."""
        if kind == "get_attr":
            value = _raw_attr(self.root, target)  # not getattr: fx patches it while tracing
            return (value.dtype, value.device.type) if isinstance(value, torch.Tensor) else (None, None)
        inputs = [n for n in node.all_input_nodes if n.meta.get("fxdrop_dtype") is not None]
        first = (inputs[0].meta["fxdrop_dtype"], inputs[0].meta["fxdrop_device"]) if inputs else (None, None)
        if kind == "call_module":
            module = _raw_attr(self.root, target)
            if not isinstance(module, nn.Module):
                return None, None
            if isinstance(module, nn.Embedding):
                return module.weight.dtype, module.weight.device.type
            params = [p for p in module.parameters() if p.is_floating_point()]
            if params and first[0] is not None and first[0].is_floating_point:
                return params[0].dtype if not torch.is_autocast_enabled() else None, params[0].device.type
            return first
        name = target if isinstance(target, str) else getattr(target, "__name__", "")
        if name in _DTYPE_CASTS:
            return _DTYPE_CASTS[name], first[1]
        if name in _BOOL_RESULTS or (kind == "call_function" and target in (operator.eq, operator.ne, operator.lt,
                                                                            operator.le, operator.gt, operator.ge)):
            return torch.bool, first[1]
        if name in ("to", "type", "type_as", "view_as_real", "view_as_complex", "argmax", "argmin", "nonzero",
                    "size", "dim", "numel", "new_tensor", "tensor", "arange", "zeros", "ones", "full", "empty"):
            return None, None  # dtype-changing, not a tensor, or not known from the inputs
        if kind == "call_function" and target is getattr:
            return None, None
        return first

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if id(m) in self.leaves or _has_hooks(m):
            return True  # inlining a hooked module would lose its hooks; called as a module, they run
        return natural_leaf(m)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            name = self.path_of_module(m)
        except NameError:  # a module made inside forward (a loss, say): its code is traced through
            return forward(*args, **kwargs)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        self.calls.setdefault(name, (args, kwargs))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed is None:
                self.failed = name
            raise

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        if self.spec is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        spec = self.spec
        placeholders = []
        for name, (dtype, device) in zip(spec.tensor_names, spec.placeholder_meta()):
            proxy = self.create_proxy("placeholder", name, (), {})
            proxy.node.meta["fxdrop_dtype"], proxy.node.meta["fxdrop_device"] = dtype, device
            proxy.node.meta["fxdrop_from_spec"] = True
            placeholders.append(proxy)

        def run(root, *values):
            args, kwargs = spec.call(list(values))
            out = root_fn(root, *args, **kwargs)
            if not isinstance(out, fx.Proxy):  # fx returns a dict subclass (a ModelOutput) as a plain dict
                self.output_type = type(out)
            return out

        return run, [self.root, *placeholders]


# ---------------------------------------------------------------- cloning


_OWN_DICTS = ("_parameters", "_buffers", "_modules")


def clone_modules(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every Parameter and buffer (tensors are not copied).

    Each module is a shallow copy of the original (same class, same attributes); its parameter,
    buffer, child and hook dictionaries are new, so nothing done to the clone reaches the original's
    modules. A module that appears at two places stays one (shared) module in the clone. The copy
    never goes through ``__getstate__`` (parametrized modules refuse it), and fxdrop's own forwards
    of an already converted model are not copied: converting a converted model starts afresh.
    """
    memo: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = type(module).__new__(type(module))
        new.__dict__.update(module.__dict__)
        memo[id(module)] = new
        for key, value in list(vars(new).items()):
            if key.startswith("_") and key not in _OWN_DICTS and isinstance(value, (dict, set, list)):
                new.__dict__[key] = copy.copy(value)
        for name in [FORWARD_ATTR] + [k for k in vars(new) if k.startswith("_fxdrop_")]:
            new.__dict__.pop(name, None)
        for method in ("forward", *METHOD_REGIONS.get(type(new), ())):
            if getattr(new.__dict__.get(method), "fxdrop_region", False):
                del new.__dict__[method]
        new.__dict__["_parameters"] = dict(module._parameters)
        new.__dict__["_buffers"] = dict(module._buffers)
        new.__dict__["_modules"] = {name: (clone(child) if child is not None else None)
                                    for name, child in module._modules.items()}
        return new

    return clone(model)


def get_path(root: Any, target: str) -> Any:
    obj = root
    for atom in target.split(".") if target else ():
        obj = getattr(obj, atom)
    return obj


def has_path(root: Any, target: str) -> bool:
    try:
        get_path(root, target)
    except AttributeError:
        return False
    return True


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    get_path(root, parent_name)._modules[name] = module


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


# ---------------------------------------------------------------- tracing one region


def region_signature(module: nn.Module, method: str = "forward") -> inspect.Signature:
    return inspect.signature(getattr(type(module), method))


def node_scope(node: fx.Node) -> str:
    """The qualified name (relative to the traced root) of the module whose forward made ``node``."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module" and stack:
        stack = stack[:-1]  # the called leaf itself
    return stack[-1][0] if stack else ""


def _first_line(err: BaseException) -> str:
    """The first sentence of an error's message (fx appends paragraphs of advice)."""
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line.split(". ")[0].rstrip(".") if ". " in line else line


def _trace_once(module: nn.Module, method: str, spec: CallSpec, leaves: frozenset[int], training: bool
                ) -> tuple[fx.Graph, FxdropTracer]:
    for m in module.modules():
        m.training = training
    tracer = FxdropTracer(leaves, spec)
    tracer.traced_func_name = method
    try:
        return tracer.trace(module), tracer
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, NameError, ...
        raise TraceError(f"{type(err).__name__}: {_first_line(err)}", tracer.failed) from err


def _arg_pairs(a: Any, b: Any, path: tuple = ()):
    """Walks two argument structures side by side, yielding ``(path, a, b)`` for each differing leaf."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _arg_pairs(x, y, path + (i,))
    elif isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        for key in a:
            yield from _arg_pairs(a[key], b[key], path + (key,))
    elif isinstance(a, fx.Node) and isinstance(b, fx.Node):
        if a.name != b.name:
            yield path, a, b
    elif type(a) is not type(b) or a != b:
        yield path, a, b


def _replace_at(structure: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(structure, dict):
        return {k: (_replace_at(v, rest, value) if k == head else v) for k, v in structure.items()}
    items = [(_replace_at(v, rest, value) if i == head else v) for i, v in enumerate(structure)]
    return type(structure)(items)


_DIFFERENT = "forward depends on self.training beyond True/False flags (different graphs in train and eval mode)"


@dataclass
class Trace:
    graph: fx.Graph
    calls: dict[str, tuple[tuple, dict]]  # first call of each traced-through module (relative names)
    output_type: type | None = None  # what the forward returned (a dict subclass comes back from fx as a dict)
    specialized: bool = False  # it depends on the spec's tensor dtypes/devices (else valid for any)


def trace_region(module: nn.Module, spec: CallSpec, *, method: str = "forward",
                 leaves: frozenset[int] = frozenset()) -> Trace:
    """Trace ``module.<method>`` for calls of ``spec`` in both modes; the training graph, mode flags rewired.

    Raises :class:`TraceError` when it does not trace, or when the two modes give different graphs
    other than in ``True``/``False`` flags. Module modes are restored on the way out.
    """
    modes = {m: m.training for m in module.modules()}
    try:
        train, tracer = _trace_once(module, method, spec, leaves, True)
        evaluation, eval_tracer = _trace_once(module, method, spec, leaves, False)
    finally:
        for m, training in modes.items():
            m.training = training
    train_nodes, eval_nodes = list(train.nodes), list(evaluation.nodes)
    if len(train_nodes) != len(eval_nodes):
        raise TraceError(_DIFFERENT)
    flags: list[tuple[fx.Node, str, tuple]] = []
    for a, b in zip(train_nodes, eval_nodes):
        if a.op != b.op or a.target != b.target:
            raise TraceError(_DIFFERENT)
        for kind in ("args", "kwargs"):
            for path, value_train, value_eval in _arg_pairs(getattr(a, kind), getattr(b, kind)):
                if not (value_train is True and value_eval is False):
                    raise TraceError(f"forward depends on self.training beyond True/False flags (at {a.format_node()})")
                flags.append((a, kind, path))
    if flags:
        first = next(n for n in train.nodes if n.op != "placeholder")
        reads: dict[str, fx.Node] = {}
        for node, kind, path in flags:
            scope = node_scope(node)
            if scope not in reads:
                with train.inserting_before(first):
                    reads[scope] = train.get_attr(join(scope, MODE_ATTR))
            mode = reads[scope]
            if kind == "args":
                node.args = _replace_at(node.args, path, mode)
            else:
                node.kwargs = _replace_at(node.kwargs, path, mode)
    return Trace(train, tracer.calls, tracer.output_type, tracer.specialized or eval_tracer.specialized)


def trace_with_retries(module: nn.Module, spec: CallSpec, *, method: str = "forward",
                       leaves: frozenset[int] = frozenset()) -> tuple[Trace, frozenset[int], list[str]]:
    """:func:`trace_region`, retrying with the failing child as a leaf (up to :data:`MAX_LEAF_RETRIES`).

    Returns the trace, the leaves it used, and the names of the children made leaves (relative).
    """
    made_leaves: list[str] = []
    for _ in range(MAX_LEAF_RETRIES + 1):
        try:
            return trace_region(module, spec, method=method, leaves=leaves), leaves, made_leaves
        except TraceError as err:
            culprit = err.culprit
            if not culprit or len(made_leaves) == MAX_LEAF_RETRIES:
                raise TraceError(str(err) + (f" (after keeping {', '.join(made_leaves)} as leaf calls)"
                                             if made_leaves else "")) from err
            leaves = leaves | {id(module.get_submodule(culprit))}
            made_leaves.append(culprit)
    raise AssertionError("unreachable")


# ---------------------------------------------------------------- discovery


@dataclass
class SkippedModule:
    """A module left exactly as it was because it does not trace (its children may still convert)."""

    name: str
    type: str
    message: str


@dataclass
class TracedRegion:
    """A module (or a method of one) of the working tree that traced for ``spec``."""

    name: str  # qualified name, "" for the root
    module: nn.Module
    method: str
    spec: CallSpec
    trace: Trace
    leaves: frozenset[int]

    @property
    def graph(self) -> fx.Graph:
        return self.trace.graph

    @property
    def label(self) -> str:
        return self.name + (f".{self.method}" if self.method != "forward" else "") if self.name else \
            ("<root>" if self.method == "forward" else f"<root>.{self.method}")


@dataclass
class Discovery:
    regions: list[TracedRegion] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)


def call_spec(module: nn.Module, method: str, call: tuple[tuple, dict] | None) -> CallSpec | str:
    """The spec of a recorded call (example inputs, or what the parent's trace passed), else the default."""
    signature = region_signature(module, method)
    if call is None:
        return CallSpec.default(signature)
    args, kwargs = call
    return CallSpec.of(signature, tuple(args), dict(kwargs))


def discover(model: nn.Module, calls: dict[str, tuple[tuple, dict]] | None = None) -> Discovery:
    """The largest traceable modules of ``model`` (the regions), and the modules that do not trace.

    ``calls``: the first call of each module by qualified name (from example inputs); a module is
    traced for the spec of its call, else for the default spec (only its required parameters, tensors).
    """
    found = Discovery()
    calls = dict(calls or {})
    visited: set[int] = set()

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in visited:
            return
        visited.add(id(module))
        if isinstance(module, torch.jit.ScriptModule):
            found.skipped.append(SkippedModule(name or "<root>", type(module).__name__,
                                               "a TorchScript module: its code is compiled, not Python that fx "
                                               "can trace"))
            return
        if isinstance(module, _CONTAINERS) or (natural_leaf(module) and not linear_like(module)):
            for method in METHOD_REGIONS.get(type(module), ()):
                region(name, module, method)
            if not callable(getattr(module, "fxdrop_sites", None)):
                for child_name, child in module.named_children():
                    visit(join(name, child_name), child)
            return
        if linear_like(module):
            return
        region(name, module, "forward")

    def region(name: str, module: nn.Module, method: str) -> None:
        spec = call_spec(module, method, calls.get(name) if method == "forward" else None)
        label = (name or "<root>") + (f".{method}" if method != "forward" else "")
        if isinstance(spec, str):
            failure = f"its call cannot be traced: {spec}"
        else:
            try:
                trace, leaves, made = trace_with_retries(module, spec, method=method)
            except TraceError as err:
                failure = str(err)
            else:
                found.regions.append(TracedRegion(name, module, method, spec, trace, leaves))
                for child_name, (args, kwargs) in trace.calls.items():
                    calls.setdefault(join(name, child_name), (args, kwargs))
                    visited.add(id(module.get_submodule(child_name)))
                # The topmost modules the trace did not go through (leaf calls, modules it never called)
                # may hold sites of their own: they are visited in turn.
                through = set(trace.calls) | {""}
                for sub_name, sub in module.named_modules():
                    if sub_name in through or sub_name.rpartition(".")[0] not in through:
                        continue
                    if natural_leaf(sub) and not list(sub.children()) and type(sub) not in METHOD_REGIONS:
                        continue
                    visit(join(name, sub_name), sub)
                return
        found.skipped.append(SkippedModule(label, type(module).__name__, failure))
        if method != "forward":
            return
        for child_name, child in module.named_children():
            visit(join(name, child_name), child)

    visit("", model)
    return found
