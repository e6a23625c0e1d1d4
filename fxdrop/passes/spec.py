"""CallSpec: how a region's forward is called, the key its traced program is specialised on.

fx traces a forward with its arguments as placeholders, so a branch on an argument's *value*
(``if mask is None``, ``if output_attentions``, ``if x.dtype == torch.float16``) is decided once, at
trace time, and baked into the graph. A program is therefore only valid for calls that agree with the
trace on every such value. A ``CallSpec`` records, for each argument of the forward (``**kwargs`` and
``*args`` entries count as arguments of their own):

* a *tensor slot* (a placeholder), with the tensor's dtype and device type (the tracer answers
  ``x.dtype`` and ``x.device`` with them);
* an *object slot* for anything else that is not a constant (a cache object, say): a placeholder
  whose methods the program calls on the real object;
* a tuple or list of those (``hidden=(h, c)``): one slot per item;
* a *constant*: None, bool, int, float, str, dtype, device, ``torch.Size``, or a tuple of those.

Two calls with equal specs run the same program. Imports torch only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

TENSOR = "tensor"
OBJECT = "object"
_CONSTANTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _form(value: Any) -> Any:
    """The hashable form of one argument (see the module docstring)."""
    if isinstance(value, fx.Proxy):
        node = value.node
        dtype, device = node.meta.get("fxdrop_dtype"), node.meta.get("fxdrop_device")
        return (TENSOR, dtype, device)
    if isinstance(value, torch.Tensor):
        return (TENSOR, value.dtype, value.device.type)
    if isinstance(value, _CONSTANTS):
        return ("const", value)
    if isinstance(value, torch.Size):
        return ("size", tuple(value))
    if isinstance(value, (tuple, list)):
        items = tuple(_form(v) for v in value)
        if all(item[0] == "const" for item in items):
            return ("const", (type(value).__name__, tuple(item[1] for item in items)))
        return (type(value).__name__, items)
    return (OBJECT, type(value).__module__ + "." + type(value).__qualname__)


def _slots(form: Any) -> int:
    kind = form[0]
    if kind in (TENSOR, OBJECT):
        return 1
    if kind in ("tuple", "list"):
        return sum(_slots(item) for item in form[1])
    return 0


def _flatten(form: Any, value: Any, out: list) -> None:
    kind = form[0]
    if kind in (TENSOR, OBJECT):
        out.append(value)
    elif kind in ("tuple", "list"):
        for item, v in zip(form[1], value):
            _flatten(item, v, out)


def _rebuild(form: Any, values) -> Any:
    kind = form[0]
    if kind in (TENSOR, OBJECT):
        return next(values)
    if kind in ("tuple", "list"):
        items = [_rebuild(item, values) for item in form[1]]
        return tuple(items) if kind == "tuple" else items
    if kind == "size":
        return torch.Size(form[1])
    value = form[1]
    if isinstance(value, tuple) and len(value) == 2 and value[0] in ("tuple", "list") and isinstance(value[1], tuple):
        return tuple(value[1]) if value[0] == "tuple" else list(value[1])
    return value


def _describe(form: Any) -> str:
    kind = form[0]
    if kind == TENSOR:
        return f"tensor({str(form[1]).replace('torch.', '')})" if form[1] is not None else "tensor"
    if kind == OBJECT:
        return form[1].rpartition(".")[2]
    if kind in ("tuple", "list"):
        inner = ", ".join(_describe(item) for item in form[1])
        return f"({inner})" if kind == "tuple" else f"[{inner}]"
    return repr(_rebuild(form, iter(())))


@dataclass(frozen=True)
class CallSpec:
    """``entries``: ``(kind, name, form)`` per argument, in signature order; ``kind`` is ``"positional"`` (a
    positional-only parameter), ``"param"`` (positional or keyword), ``"vararg"`` (the i-th of ``*args``),
    ``"kwonly"`` (keyword-only) or ``"kwarg"`` (a ``**kwargs`` key)."""

    entries: tuple[tuple[str, str, Any], ...]

    @property
    def tensor_names(self) -> list[str]:
        """Placeholder names, one per slot (valid identifiers, unique)."""
        names = []
        for kind, name, form in self.entries:
            base = _identifier(kind, name)
            count = _slots(form)
            names += [base] if count == 1 and form[0] in (TENSOR, OBJECT) else [f"{base}_{i}" for i in range(count)]
        return names

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
            elif parameter.kind is inspect.Parameter.POSITIONAL_ONLY:
                items = [("positional", parameter.name, value)]
            else:
                items = [("param", parameter.name, value)]
            entries += [(kind, name, _form(item)) for kind, name, item in items]
        return cls(tuple(entries))

    @classmethod
    def default(cls, signature: inspect.Signature, *, bound_self: bool = True) -> "CallSpec | str":
        """The spec of a call that passes only the parameters without defaults, each a tensor of unknown dtype."""
        parameters = list(signature.parameters.values())[1 if bound_self else 0:]
        args = [torch.empty(0) for p in parameters if p.default is inspect.Parameter.empty
                and p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        kwargs = {p.name: torch.empty(0) for p in parameters if p.default is inspect.Parameter.empty
                  and p.kind is inspect.Parameter.KEYWORD_ONLY}
        spec = cls.of(signature, tuple(args), kwargs, bound_self=bound_self)
        return spec if isinstance(spec, str) else spec.erased()

    def erased(self) -> "CallSpec":
        """This spec without the tensors' dtypes and devices: the key of a program whose trace never asked them."""
        def erase(form):
            if form[0] == TENSOR:
                return (TENSOR, None, None)
            if form[0] in ("tuple", "list"):
                return (form[0], tuple(erase(item) for item in form[1]))
            return form
        return CallSpec(tuple((kind, name, erase(form)) for kind, name, form in self.entries))

    def tensors(self, signature: inspect.Signature, args: tuple, kwargs: dict, *, bound_self: bool = True) -> list:
        """The values of a call with this spec, one per slot (what the program takes)."""
        bound = signature.bind(None, *args, **kwargs) if bound_self else signature.bind(*args, **kwargs)
        params = bound.arguments
        out: list = []
        for kind, name, form in self.entries:
            if not _slots(form):
                continue
            if kind == "vararg":
                value = _var(signature, params, inspect.Parameter.VAR_POSITIONAL, ())[int(name)]
            elif kind == "kwarg":
                value = _var(signature, params, inspect.Parameter.VAR_KEYWORD, {})[name]
            else:
                value = params[name]
            _flatten(form, value, out)
        return out

    def call(self, values: list) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for the forward from slot ``values`` (proxies while tracing).

        Parameters go by keyword where they can (wrappers such as transformers' decorators inspect and
        extend ``kwargs``); positional-only ones, and everything before ``*args`` entries, go positionally.
        """
        values = iter(values)
        positional = any(kind == "vararg" for kind, _, _ in self.entries)
        args, kwargs = [], {}
        for kind, name, form in self.entries:
            value = _rebuild(form, values)
            if kind in ("kwarg", "kwonly") or (kind == "param" and not positional):
                kwargs[name] = value
            else:
                args.append(value)
        return tuple(args), kwargs

    def placeholder_meta(self) -> list[tuple[Any, Any]]:
        """``(dtype, device type)`` per slot (None for object slots), for the tracer."""
        metas: list = []

        def walk(form):
            if form[0] == TENSOR:
                metas.append((form[1], form[2]))
            elif form[0] == OBJECT:
                metas.append((None, None))
            elif form[0] in ("tuple", "list"):
                for item in form[1]:
                    walk(item)

        for _, _, form in self.entries:
            walk(form)
        return metas

    def describe(self) -> str:
        return ", ".join(f"{name}={_describe(form)}" for _, name, form in self.entries)


def _var(signature: inspect.Signature, params: dict, kind, empty):
    for p in signature.parameters.values():
        if p.kind is kind:
            return params.get(p.name, empty)
    return empty


def _identifier(kind: str, name: str) -> str:
    base = {"param": "", "positional": "", "kwonly": "", "vararg": "arg_", "kwarg": "kw_"}[kind] + name
    return "".join(ch if ch.isalnum() or ch == "_" else "_" for ch in base) or "arg"
