"""Tracing: a model becomes one fx graph, or, when it does not trace, the largest submodules that do.

* :class:`FxdropTracer` keeps ``torch.nn`` modules (Linear, Dropout*, LSTM, Embedding, norms, ...) and
  fxdrop's own modules as leaf calls, and traces through user modules and ``nn.Sequential``.
* Each module is traced twice, in training and in eval mode. fx bakes ``self.training`` into the graph
  as a constant; the two traces tell a mode-dependent flag (``F.dropout(x, p, self.training)``: True, then
  False) from a constant one (``F.dropout(x, p)``: always True). Mode-dependent flags are rewired to read
  ``self.training`` at run time, so the traced graph keeps the original's behaviour in both modes. A
  forward whose *structure* depends on the mode cannot be kept by one graph and counts as untraceable.
* :func:`clone_modules` copies the module tree (new module objects, the same Parameter and buffer
  objects), so tracing and rewriting never touch the user's model.

Imports torch only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import fx, nn

MODE_ATTR = "training"


class FxdropTracer(fx.Tracer):
    """Leaf calls: every ``torch.nn`` module except ``nn.Sequential``, modules with ``fxdrop_sites``,
    and modules with forward hooks."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if m._forward_hooks or m._forward_pre_hooks:
            return True  # inlining it would lose its hooks; called as a module, they run
        return _natural_leaf(m)


def _natural_leaf(module: nn.Module) -> bool:
    """A leaf whatever its hooks: a ``torch.nn`` module (not a Sequential) or an fxdrop module."""
    if isinstance(module, nn.Sequential):
        return False
    if callable(getattr(module, "fxdrop_sites", None)):
        return True
    return module.__module__.startswith(("torch.nn", "torch.ao.nn"))


class TraceError(Exception):
    """A module does not trace; the message says why (the tracer's own message where there is one)."""


@dataclass
class SkippedModule:
    """A module left exactly as it was because it does not trace (its children may still convert)."""

    name: str
    type: str
    message: str


@dataclass
class TracedRegion:
    """A module of the (cloned) tree that traced: ``name`` is its qualified name ("" for the root)."""

    name: str
    module: nn.Module
    graph: fx.Graph


@dataclass
class TraceResult:
    regions: list[TracedRegion] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)


# ---------------------------------------------------------------- cloning


_OWN_DICTS = ("_parameters", "_buffers", "_modules")


def clone_modules(model: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every Parameter and buffer (tensors are not copied).

    Each module is a shallow copy of the original (same class, same attributes); its parameter,
    buffer, child and hook dictionaries are new, so nothing done to the clone reaches the original's
    modules. A module that appears at two places stays one (shared) module in the clone.
    """
    memo: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        new = copy.copy(module)
        memo[id(module)] = new
        for key, value in list(vars(new).items()):
            if key.startswith("_") and key not in _OWN_DICTS and isinstance(value, (dict, set, list)):
                new.__dict__[key] = copy.copy(value)
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


# ---------------------------------------------------------------- tracing


def _modes(model: nn.Module) -> dict[nn.Module, bool]:
    return {m: m.training for m in model.modules()}


def _trace_once(module: nn.Module, training: bool) -> fx.Graph:
    for m in module.modules():
        m.training = training
    tracer = FxdropTracer()
    try:
        return tracer.trace(module)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError, NameError, ...
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TraceError(f"{type(err).__name__}: {message}") from err


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


def trace_module(module: nn.Module) -> fx.Graph:
    """Trace ``module`` in both modes; return the training graph with mode flags read at run time.

    Raises :class:`TraceError` when it does not trace, or when the two modes give different graphs
    other than in ``True``/``False`` flags. Module modes are restored on the way out.
    """
    modes = _modes(module)
    try:
        train = _trace_once(module, True)
        evaluation = _trace_once(module, False)
    finally:
        for m, training in modes.items():
            m.training = training
    train_nodes, eval_nodes = list(train.nodes), list(evaluation.nodes)
    if len(train_nodes) != len(eval_nodes):
        raise TraceError("forward depends on self.training beyond True/False flags (different graphs in "
                         "train and eval mode)")
    flags: list[tuple[fx.Node, str, tuple]] = []
    for a, b in zip(train_nodes, eval_nodes):
        if a.op != b.op or a.target != b.target:
            raise TraceError("forward depends on self.training beyond True/False flags (different graphs in "
                             "train and eval mode)")
        for kind in ("args", "kwargs"):
            for path, value_train, value_eval in _arg_pairs(getattr(a, kind), getattr(b, kind)):
                if not (value_train is True and value_eval is False):
                    raise TraceError("forward depends on self.training beyond True/False flags "
                                     f"(at {a.format_node()})")
                flags.append((a, kind, path))
    if flags:
        first = next(n for n in train.nodes if n.op != "placeholder")
        with train.inserting_before(first):
            mode = train.get_attr(MODE_ATTR)
        for node, kind, path in flags:
            if kind == "args":
                node.args = _replace_at(node.args, path, mode)
            else:
                node.kwargs = _replace_at(node.kwargs, path, mode)
    return train


def trace_regions(model: nn.Module, accept: Callable[[str, nn.Module, fx.Graph], str | None] | None = None
                  ) -> TraceResult:
    """The whole model if it traces; else, recursively, the largest children that do.

    Modules that do not trace are listed in ``skipped`` with the tracer's message (their children
    are tried in turn); modules without children that do not trace are simply left as they are.
    ``accept(name, module, graph)`` may reject a traced graph with a reason (e.g. it disagrees with
    the module on example inputs); a rejected module is skipped like one that does not trace.
    """
    result = TraceResult()

    def visit(name: str, module: nn.Module) -> None:
        if _natural_leaf(module):
            return
        try:
            graph = trace_module(module)
            reason = accept(name, module, graph) if accept is not None else None
            if reason is not None:
                raise TraceError(reason)
        except TraceError as err:
            result.skipped.append(SkippedModule(name or "<root>", type(module).__name__, str(err)))
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)
            return
        result.regions.append(TracedRegion(name, module, graph))
        # Modules the trace kept as calls only because they have hooks are regions of their own.
        hooked: list[str] = []
        for sub_name, sub in module.named_modules():
            if sub is not module and (sub._forward_hooks or sub._forward_pre_hooks) and not _natural_leaf(sub) \
                    and not any(sub_name.startswith(h + ".") for h in hooked):
                hooked.append(sub_name)
                visit(f"{name}.{sub_name}" if name else sub_name, sub)

    visit("", model)
    return result


def graph_module(module: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """An ``fx.GraphModule`` whose attribute tree *is* ``module``'s (same children, parameters, buffers,
    persistence and order), so its ``state_dict`` keys are exactly ``module``'s."""
    gm = fx.GraphModule(module, graph, class_name=type(module).__name__)
    extras = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target != MODE_ATTR and not has_path(module, node.target):
            extras[node.target] = get_path(gm, node.target)  # tracer-made constants (_tensor_constant0)
    gm.__dict__["_modules"] = dict(module._modules)
    gm.__dict__["_parameters"] = dict(module._parameters)
    gm.__dict__["_buffers"] = dict(module._buffers)
    gm.__dict__["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    for target, value in extras.items():
        # Not a buffer: the original had no state_dict entry for it.
        owner, _, name = target.rpartition(".")
        object.__setattr__(get_path(gm, owner), name, value)
    for key, value in vars(module).items():
        if "hooks" in key and isinstance(value, (dict, set)):  # the root's own hooks (forward, state_dict, ...)
            gm.__dict__[key] = copy.copy(value)
    gm.training = module.training
    return gm
