"""The ``fxdrop`` ops: registration of kernels, fake kernels, autograd and autocast, and the Python wrappers.

Schemas live in :mod:`fxdrop.ops.schema`; the composite kernels (ATen calls, any device) in
:mod:`fxdrop.ops.composite`, registered for ``CompositeExplicitAutograd`` so that a compiled kernel
registered for ``CPU``/``CUDA`` by the extension (``csrc/``) takes precedence on that device. Dense
references for tests are in :mod:`fxdrop.ops.reference`.

Autocast: under ``torch.autocast`` the GEMM ops (``chain``, ``tile_linear``) cast their floating
inputs to the autocast dtype and run with autocast off, as ``F.linear`` does (float64 stays).
Double backward (``create_graph=True``): the backward of ``chain`` and ``tile_linear`` is then the
differentiable dense reference with the same masks, so gradient penalties work (at dense cost).

Wrappers (what the rest of fxdrop calls)::

    chain(x, weights, biases, patterns, *, family, activations, input_dropout=False,
          output_dropout=False, scale="kept", rates)   # x: (..., in_features)
    unit_dropout(x, pattern, *, family, scale="kept", p=0.0)
    tile_linear(x, weight, bias, pattern, *, tile=32, scale="kept", p=0.0)
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import composite, extension, reference
from .schema import LIBRARY, NAMESPACE, SCHEMAS

_KEY = "CompositeExplicitAutograd"


def _impl(name: str, fn) -> None:
    torch.library.impl(f"{NAMESPACE}::{name}", _KEY)(fn)


for _name in SCHEMAS:
    _impl(_name, getattr(composite, _name))


# ---------------------------------------------------------------- fake kernels (shapes only)

@torch.library.register_fake("fxdrop::sample_pattern")
def _sample_pattern_fake(state, cdf):
    return state.new_empty(2)


@torch.library.register_fake("fxdrop::sample_classes")
def _sample_classes_fake(state, cdf, classes, position=0):
    return state.new_empty(classes, 2)


@torch.library.register_fake("fxdrop::unit_dropout")
def _unit_dropout_fake(x, pattern, family, scale, p):
    return x.new_empty(x.shape)


@torch.library.register_fake("fxdrop::chain")
def _chain_fake(x, weights, biases, has_bias, patterns, family, activations, input_dropout, output_dropout, scale,
                rates):
    composite.check_chain(x, weights, composite.expand_biases(biases, has_bias))
    layers = len(weights)
    sites = layers - 1 + int(input_dropout) + int(output_dropout)
    count = patterns.shape[0] if patterns.dim() == 3 else 0
    if tuple(patterns.shape) not in ((sites, 2), (count, sites, 2)) or patterns.dim() == 3 and count < 1:
        raise ValueError(f"patterns must have shape ({sites}, 2) or (classes, {sites}, 2), got "
                         f"{tuple(patterns.shape)}")
    ctx = torch.library.get_ctx()
    saved = []
    from . import activations as act
    for _ in range(max(count, 1) if activations else 0):  # nothing saved (no unbacked sizes) without activations
        rows = (x.numel() // x.shape[-1] if x.shape[-1] else 0) if count == 0 else ctx.new_dynamic_size()
        for name in activations:
            kept = ctx.new_dynamic_size()
            z = x.new_empty(rows, kept) if act.needs_input(name) else x.new_empty(0)
            saved += [z, x.new_empty(rows, kept)]
    y = x.new_empty(*x.shape[:-1], weights[-1].shape[0])
    return y, saved


@torch.library.register_fake("fxdrop::chain_backward")
def _chain_backward_fake(grad_y, x, weights, biases, has_bias, patterns, saved, family, activations,
                         input_dropout, output_dropout, scale, rates, needs_input_grad):
    grad_x = x.new_empty(x.shape) if needs_input_grad else x.new_empty(0)
    return grad_x, [w.new_empty(w.shape) for w in weights], [b.new_empty(b.shape) for b in biases]


@torch.library.register_fake("fxdrop::tile_linear")
def _tile_linear_fake(x, weight, bias, pattern, tile, scale, p):
    composite.check_chain(x, [weight], [bias])
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("fxdrop::tile_linear_backward")
def _tile_linear_backward_fake(grad_y, x, weight, pattern, tile, scale, p, has_bias):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), (grad_y.new_empty(weight.shape[0]) if has_bias
                                                                 else grad_y.new_empty(0))


# ---------------------------------------------------------------- autograd

def _chain_setup(ctx, inputs, output):
    x, weights, biases, has_bias, patterns, family, activations, input_dropout, output_dropout, scale, rates = inputs
    _, saved = output
    ctx.config = (list(has_bias), family, list(activations), input_dropout, output_dropout, scale, list(rates))
    ctx.counts = (len(weights), len(biases))
    ctx.save_for_backward(x, patterns, *weights, *biases, *saved)


def _no_grad(value):
    """register_autograd compares structures, and flattens an empty list of anything as a tensor list."""
    return [] if isinstance(value, list) and not value else None


def _chain_backward(ctx, grad_y, grad_saved):
    x, patterns, *rest = ctx.saved_tensors
    layers, present = ctx.counts
    weights, biases, saved = rest[:layers], rest[layers: layers + present], rest[layers + present:]
    has_bias, family, activations, input_dropout, output_dropout, scale, rates = ctx.config
    needs_x = ctx.needs_input_grad[0]
    if torch.is_grad_enabled():  # create_graph=True: the differentiable dense reference, same masks
        grad_x, grad_w, grad_b = _reference_chain_grads(grad_y, x, list(weights), list(biases), has_bias, patterns,
                                                        family, activations, input_dropout, output_dropout, scale,
                                                        rates)
    else:
        grad_x, grad_w, grad_b = torch.ops.fxdrop.chain_backward(
            grad_y.contiguous(), x, weights, biases, has_bias, patterns, saved, family, activations, input_dropout,
            output_dropout, scale, rates, needs_x)
    return (grad_x if needs_x else None, list(grad_w), list(grad_b), _no_grad(has_bias), None, None,
            _no_grad(activations), None, None, None, _no_grad(rates))


def _reference_chain_grads(grad_y, x, weights, biases, has_bias, patterns, family, activations, input_dropout,
                           output_dropout, scale, rates):
    full_biases = composite.expand_biases(biases, has_bias)
    kw = dict(family=family, activations=activations, input_dropout=input_dropout, output_dropout=output_dropout,
              scale=scale, rates=rates)
    run = reference.chain_classes if patterns.dim() == 3 else reference.chain
    inputs = [x, *weights, *biases]
    with torch.enable_grad():
        y = run(x, weights, full_biases, patterns, **kw)
        grads = torch.autograd.grad(y, inputs, grad_y, create_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, inputs)]
    return grads[0], grads[1:1 + len(weights)], grads[1 + len(weights):]


torch.library.register_autograd("fxdrop::chain", _chain_backward, setup_context=_chain_setup)


def _unit_dropout_setup(ctx, inputs, output):
    _, pattern, family, scale, p = inputs
    ctx.config = (family, scale, p)
    ctx.save_for_backward(pattern)


def _unit_dropout_backward(ctx, grad):
    (pattern,) = ctx.saved_tensors
    # Linear in x: the same op is its own (differentiable) backward.
    return torch.ops.fxdrop.unit_dropout(grad, pattern, *ctx.config), None, None, None, None


torch.library.register_autograd("fxdrop::unit_dropout", _unit_dropout_backward, setup_context=_unit_dropout_setup)


def _tile_setup(ctx, inputs, output):
    x, weight, bias, pattern, tile, scale, p = inputs
    ctx.config = (tile, scale, p, bias is not None)
    ctx.save_for_backward(x, weight, pattern)


def _tile_backward(ctx, grad_y):
    x, weight, pattern = ctx.saved_tensors
    tile, scale, p, has_bias = ctx.config
    if torch.is_grad_enabled():  # create_graph=True: the differentiable dense reference
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device, requires_grad=True) \
            if has_bias else None
        inputs = [x, weight] + ([bias] if has_bias else [])
        with torch.enable_grad():
            y = reference.tile_linear(x, weight, bias, pattern, tile=tile, scale=scale, p=p)
            grads = torch.autograd.grad(y, inputs, grad_y, create_graph=True, allow_unused=True)
        grad_x, grad_w = grads[0], grads[1]
        grad_b = grads[2] if has_bias else None
    else:
        grad_x, grad_w, grad_b = torch.ops.fxdrop.tile_linear_backward(grad_y.contiguous(), x, weight, pattern,
                                                                       tile, scale, p, has_bias)
    return grad_x, grad_w, (grad_b if has_bias else None), None, None, None, None


torch.library.register_autograd("fxdrop::tile_linear", _tile_backward, setup_context=_tile_setup)


# ---------------------------------------------------------------- autocast

def _autocast_cast(value, device_type: str, dtype: torch.dtype):
    """What autocast does to a lower-precision op's inputs: floating tensors on the device, float64 aside."""
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype is not torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, device_type, dtype) for v in value)
    return value


def _register_autocast(name: str, device_type: str) -> None:
    """Like ``torch.library.register_autocast``, but with the dtype of the active autocast region."""
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)
    op = getattr(torch.ops.fxdrop, name).default

    def run(*args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*_autocast_cast(args, device_type, dtype))

    op.py_impl(key)(run)  # the Python dispatcher's copy (torch.compile traces through it)
    LIBRARY.impl(name, lambda _keyset, *args: run(*args), key_name, with_keyset=True)


for _name in ("chain", "tile_linear"):
    for _device in ("cpu", "cuda"):
        _register_autocast(_name, _device)


# ---------------------------------------------------------------- wrappers

def _kernels_ready() -> None:
    """First eager call: load (or build once, cached) the compiled kernels; never inside a trace."""
    if not torch.compiler.is_compiling():
        extension.ensure_loaded()


def chain_patterns(draws: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`chain`'s ``patterns`` from its sites' draws (in site order): ``(sites, 2)`` from one pattern
    each, ``(classes, sites, 2)`` from row-class plans. A site with fewer classes than the most (counts are
    powers of two, so it divides) is tiled: row ``r`` still uses its own plan ``r mod`` its count."""
    if draws[0].dim() == 1:
        return torch.stack(list(draws), dim=0)
    classes = max(d.shape[0] for d in draws)
    return torch.stack([d if d.shape[0] == classes else d.repeat(classes // d.shape[0], 1) for d in draws], dim=1)


def chain(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
          patterns: torch.Tensor, *, family: str, activations: Sequence[str], input_dropout: bool = False,
          output_dropout: bool = False, scale: str = "kept", rates: Sequence[float]) -> torch.Tensor:
    """``[dropout ->] Linear -> act -> dropout -> ... -> Linear [-> act -> dropout]`` on kept units only.

    ``x: (..., in_features)``; ``patterns: int64 (sites, 2)``; returns ``(..., out_features)``.
    With ``patterns: (classes, sites, 2)`` row ``r`` of ``x`` flattened to 2-D uses
    ``patterns[r % classes]``; residue classes that share patterns run as one strided set of rows.
    """
    _kernels_ready()
    y, _ = torch.ops.fxdrop.chain(x, list(weights), [b for b in biases if b is not None],
                                  [b is not None for b in biases], patterns, family, list(activations),
                                  bool(input_dropout), bool(output_dropout), scale, [float(r) for r in rates])
    return y


def unit_dropout(x: torch.Tensor, pattern: torch.Tensor, *, family: str, scale: str = "kept",
                 p: float = 0.0) -> torch.Tensor:
    """``x * mask`` along the last dim (0 at dropped units, the scale at kept ones); ``pattern (classes, 2)``:
    row ``r`` of ``x`` (flattened to 2-D) uses ``pattern[r % classes]``."""
    _kernels_ready()
    return torch.ops.fxdrop.unit_dropout(x, pattern, family, scale, float(p))


def tile_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern: torch.Tensor, *,
                tile: int = 32, scale: str = "kept", p: float = 0.0) -> torch.Tensor:
    """``x @ (weight * tile mask)^T + bias``, computed on the kept tiles only."""
    _kernels_ready()
    return torch.ops.fxdrop.tile_linear(x, weight, bias, pattern, int(tile), scale, float(p))


__all__ = ["chain", "chain_patterns", "unit_dropout", "tile_linear", "composite", "reference", "extension"]
