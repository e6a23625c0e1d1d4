"""Elementwise activations the structured ops fuse, by name: forward and derivative.

Names: ``none relu gelu gelu_tanh silu tanh sigmoid leaky_relu:<slope> elu:<alpha>`` (``none``: a
Linear whose dropout follows it directly). The planner maps modules and functions to these names
(:func:`module_activation`, :func:`function_activation`); the ops apply them (:func:`apply`,
:func:`grad`). Imports only torch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

PLAIN = ("none", "relu", "gelu", "gelu_tanh", "silu", "tanh", "sigmoid")
PARAMETRISED = ("leaky_relu", "elu")


def parse(name: str) -> tuple[str, float]:
    """``"leaky_relu:0.2"`` -> ``("leaky_relu", 0.2)``; plain names get 0.0."""
    base, _, arg = name.partition(":")
    if base in PLAIN and not arg:
        return base, 0.0
    if base in PARAMETRISED:
        try:
            return base, float(arg) if arg else (0.01 if base == "leaky_relu" else 1.0)
        except ValueError:
            pass
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(PLAIN)}, "
                     "leaky_relu:<slope> or elu:<alpha>")


def apply(name: str, z: torch.Tensor) -> torch.Tensor:
    base, arg = parse(name)
    if base == "none":
        return z
    if base == "relu":
        return torch.relu(z)
    if base == "gelu":
        return F.gelu(z)
    if base == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if base == "silu":
        return F.silu(z)
    if base == "tanh":
        return torch.tanh(z)
    if base == "sigmoid":
        return torch.sigmoid(z)
    if base == "leaky_relu":
        return F.leaky_relu(z, arg)
    return F.elu(z, arg)


def needs_input(name: str) -> bool:
    """Whether the derivative needs the pre-activation ``z`` (else the output ``h`` suffices)."""
    return parse(name)[0] not in ("none", "relu", "tanh", "sigmoid")


def grad(name: str, grad_h: torch.Tensor, z: torch.Tensor | None, h: torch.Tensor) -> torch.Tensor:
    """``dL/dz`` from ``dL/dh``, given ``h = act(z)`` (``z`` may be None when not needed)."""
    base, arg = parse(name)
    if base == "none":
        return grad_h
    if base == "relu":
        return torch.ops.aten.threshold_backward(grad_h, h, 0)
    if base == "tanh":
        return torch.ops.aten.tanh_backward(grad_h, h)
    if base == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad_h, h)
    assert z is not None  # internal: needs_input() said so
    if base == "gelu":
        return torch.ops.aten.gelu_backward(grad_h, z)
    if base == "gelu_tanh":
        return torch.ops.aten.gelu_backward(grad_h, z, approximate="tanh")
    if base == "silu":
        return torch.ops.aten.silu_backward(grad_h, z)
    if base == "leaky_relu":
        return torch.ops.aten.leaky_relu_backward(grad_h, z, arg, False)
    return torch.ops.aten.elu_backward(grad_h, arg, 1.0, 1.0, False, z)


_MODULES: dict[type, Callable[[nn.Module], str | None]] = {
    nn.ReLU: lambda m: "relu",
    nn.GELU: lambda m: "gelu_tanh" if m.approximate == "tanh" else "gelu",
    nn.SiLU: lambda m: "silu",
    nn.Tanh: lambda m: "tanh",
    nn.Sigmoid: lambda m: "sigmoid",
    nn.LeakyReLU: lambda m: f"leaky_relu:{m.negative_slope!r}",
    nn.ELU: lambda m: f"elu:{m.alpha!r}",
}


def module_activation(module: nn.Module) -> str | None:
    """The activation name of a module, or None if it is not one we fuse."""
    to_name = _MODULES.get(type(module))
    return to_name(module) if to_name is not None else None


_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu", F.relu: "relu", torch.nn.functional.relu: "relu",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.silu: "silu", F.gelu: "gelu", F.leaky_relu: "leaky_relu", F.elu: "elu",
    torch.ops.aten.relu.default: "relu", torch.ops.aten.gelu.default: "gelu",
    torch.ops.aten.silu.default: "silu", torch.ops.aten.tanh.default: "tanh",
    torch.ops.aten.sigmoid.default: "sigmoid", torch.ops.aten.leaky_relu.default: "leaky_relu",
    torch.ops.aten.elu.default: "elu",
}
_METHODS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}


def function_activation(target: Any, args: tuple, kwargs: dict, method: bool = False) -> str | None:
    """The activation name of an fx ``call_function`` (or ``call_method`` with ``method=True``) node.

    Returns None for anything else, including in-place variants and non-default forms we cannot
    express (e.g. ELU with a scale).
    """
    if method:
        return _METHODS.get(target) if not args[1:] and not kwargs else None
    base = _FUNCTIONS.get(target)
    if base is None:
        return None
    if kwargs.get("inplace") or (base in ("relu",) and len(args) > 1 and args[1]):
        return None
    if base == "gelu":
        approximate = kwargs.get("approximate", args[1] if len(args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    if base == "leaky_relu":
        slope = kwargs.get("negative_slope", args[1] if len(args) > 1 else 0.01)
        return f"leaky_relu:{float(slope)!r}" if isinstance(slope, (int, float)) else None
    if base == "elu":
        alpha = kwargs.get("alpha", args[1] if len(args) > 1 else 1.0)
        if target is torch.ops.aten.elu.default and (args[2:] not in ((), (1.0,), (1.0, 1.0)) or kwargs):
            return None
        return f"elu:{float(alpha)!r}" if isinstance(alpha, (int, float)) else None
    if len(args) > 1 or any(k != "inplace" for k in kwargs):
        return None
    return base

