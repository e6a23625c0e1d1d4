"""CallSpec: how a region's forward is called, the key its traced program is specialised on.

fx traces a forward with its arguments as placeholders, so a branch on an argument's *value*
(``if mask is None``, ``if output_attentions``) is decided once, at trace time, and baked into the
graph. A program is therefore only valid for calls that agree with the trace on every such value.
A ``CallSpec`` records, for each parameter of the forward, either *a tensor slot* (a placeholder)
or *a constant* (None, bool, int, float, str, dtype, device, or a tuple of those); ``**kwargs`` and
``*args`` entries count as parameters of their own. Two calls with equal specs can run the same
program; anything else (a tensor inside a list, an object such as a cache) makes no spec, and that
call runs the original forward. Imports torch only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

TENSOR = "tensor"
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _constant(value: Any) -> tuple[bool, Any]:
    """``(True, hashable form)`` for a value a trace may bake in, else ``(False, None)``."""
    if isinstance(value, _CONSTANTS):
        return True, value
    if isinstance(value, torch.Size):
        return True, ("size", tuple(value))
    if isinstance(value, (tuple, list)) and all(isinstance(v, _CONSTANTS) for v in value):
        return True, (type(value).__name__, tuple(value))
    return False, None


def _rebuild(form: Any) -> Any:
    if isinstance(form, tuple) and len(form) == 2 and form[0] in ("size", "tuple", "list"):
        kind, items = form
        return torch.Size(items) if kind == "size" else (list(items) if kind == "list" else tuple(items))
    return form


@dataclass(frozen=True)
class CallSpec:
    """``entries``: ``(kind, name, form)`` per argument, in signature order; ``kind`` is ``"param"`` (a
    positional-or-keyword parameter), ``"vararg"`` (the i-th of ``*args``), ``"kwonly"`` (a keyword-only
    parameter) or ``"kwarg"`` (a ``**kwargs`` key); ``form`` is :data:`TENSOR` or the constant's hashable
    form."""

    entries: tuple[tuple[str, str, Any], ...]

    @property
    def tensor_names(self) -> list[str]:
        """Placeholder names, one per tensor slot (valid identifiers, unique)."""
        return [_identifier(kind, name) for kind, name, form in self.entries if form == TENSOR]

    @classmethod
    def of(cls, signature: inspect.Signature, args: tuple, kwargs: dict, *, bound_self: bool = True
           ) -> "CallSpec | str":
        """The spec of a call (``args`` without ``self``), or the reason there is none."""
        try:
            bound = signature.bind(None, *args, **kwargs) if bound_self else signature.bind(*args, **kwargs)
        except TypeError as err:
            return f"the call does not fit the forward's signature ({err})"
        bound.apply_defaults()
        entries = []
        parameters = list(signature.parameters.values())[1 if bound_self else 0:]
        for parameter in parameters:
            value = bound.arguments.get(parameter.name)
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                items = [("vararg", str(i), v) for i, v in enumerate(value or ())]
            elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
                items = [("kwarg", key, v) for key, v in sorted((value or {}).items())]
            elif parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                items = [("kwonly", parameter.name, value)]
            else:
                items = [("param", parameter.name, value)]
            for kind, name, item in items:
                if isinstance(item, (torch.Tensor, fx.Proxy)):
                    entries.append((kind, name, TENSOR))
                    continue
                ok, form = _constant(item)
                if not ok:
                    return (f"argument {name!r} is a {type(item).__name__}: a traced program can only take tensors "
                            "and constants (None, numbers, strings, dtypes, tuples of those)")
                entries.append((kind, name, form))
        return cls(tuple(entries))

    @classmethod
    def default(cls, signature: inspect.Signature, *, bound_self: bool = True) -> "CallSpec | str":
        """The spec of a call that passes only the parameters without defaults, each a tensor."""
        parameters = list(signature.parameters.values())[1 if bound_self else 0:]
        args = [torch.empty(0) for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        kwargs = {p.name: torch.empty(0) for p in parameters if p.default is inspect.Parameter.empty
                  and p.kind is inspect.Parameter.KEYWORD_ONLY}
        return cls.of(signature, tuple(args), kwargs, bound_self=bound_self)

    def tensors(self, signature: inspect.Signature, args: tuple, kwargs: dict, *, bound_self: bool = True) -> list:
        """The tensors of a call with this spec, in slot order (what the program takes)."""
        bound = signature.bind(None, *args, **kwargs) if bound_self else signature.bind(*args, **kwargs)
        out = []
        params = bound.arguments
        for kind, name, form in self.entries:
            if form != TENSOR:
                continue
            if kind in ("param", "kwonly"):
                out.append(params[name])
            elif kind == "vararg":
                out.append(_var_positional(signature, params)[int(name)])
            else:
                out.append(_var_keyword(signature, params)[name])
        return out

    def call(self, values: list) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the forward from tensor slot ``values`` (proxies while tracing)."""
        values = iter(values)
        args, kwargs = [], {}
        for kind, name, form in self.entries:
            value = next(values) if form == TENSOR else _rebuild(form)
            if kind in ("kwarg", "kwonly"):
                kwargs[name] = value
            else:
                args.append(value)
        return tuple(args), kwargs

    def describe(self) -> str:
        parts = []
        for kind, name, form in self.entries:
            parts.append(f"{name}=tensor" if form == TENSOR else f"{name}={_rebuild(form)!r}")
        return ", ".join(parts)


def _var_positional(signature: inspect.Signature, params: dict) -> tuple:
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_POSITIONAL:
            return params.get(p.name, ())
    return ()


def _var_keyword(signature: inspect.Signature, params: dict) -> dict:
    for p in signature.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return params.get(p.name, {})
    return {}


def _identifier(kind: str, name: str) -> str:
    base = {"param": "", "kwonly": "", "vararg": "arg_", "kwarg": "kw_"}[kind] + name
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in base) or "arg"
