"""The ``fxdrop`` ops: registration of kernels, fake kernels and autograd, and the Python wrappers.

Schemas live in :mod:`fxdrop.ops.schema`; the composite kernels (ATen calls, any device) in
:mod:`fxdrop.ops.composite`, registered for ``CompositeExplicitAutograd`` so that a compiled kernel
registered for ``CPU``/``CUDA`` by the extension (``csrc/``) takes precedence on that device. Dense
references for tests are in :mod:`fxdrop.ops.reference`.

Wrappers (what the rest of fxdrop calls)::

    chain(x, weights, biases, patterns, *, family, activations, input_dropout=False,
          output_dropout=False, scale="kept", rates)   # x: (..., in_features)
    sample_rows(states, cdfs, rows, classes)          # (classes, sites, 2) patterns of row classes, for chain
    unit_dropout(x, pattern, *, family, scale="kept", p=0.0)
    tile_linear(x, weight, bias, pattern, *, tile=32, scale="kept", p=0.0)
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import composite, extension
from .schema import NAMESPACE, SCHEMAS  # noqa: F401  (defines the ops)

_KEY = "CompositeExplicitAutograd"


def _impl(name: str, fn) -> None:
    torch.library.impl(f"{NAMESPACE}::{name}", _KEY)(fn)


for _name in SCHEMAS:
    _impl(_name, getattr(composite, _name))


# ---------------------------------------------------------------- fake kernels (shapes only)

@torch.library.register_fake("fxdrop::sample_pattern")
def _sample_pattern_fake(state, cdf):
    return state.new_empty(2)


@torch.library.register_fake("fxdrop::unit_dropout")
def _unit_dropout_fake(x, pattern, family, scale, p):
    return torch.empty_like(x)


@torch.library.register_fake("fxdrop::sample_rows")
def _sample_rows_fake(states, cdfs, rows, classes):
    return states[0].new_empty(classes, len(states), 2)


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
    for _ in range(max(count, 1)):
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
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    return grad_x, [torch.empty_like(w) for w in weights], [torch.empty_like(b) for b in biases]


@torch.library.register_fake("fxdrop::tile_linear")
def _tile_linear_fake(x, weight, bias, pattern, tile, scale, p):
    composite.check_chain(x, [weight], [bias])
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.register_fake("fxdrop::tile_linear_backward")
def _tile_linear_backward_fake(grad_y, x, weight, pattern, tile, scale, p, has_bias):
    return torch.empty_like(x), torch.empty_like(weight), (grad_y.new_empty(weight.shape[0]) if has_bias
                                                          else grad_y.new_empty(0))


# ---------------------------------------------------------------- autograd

def _chain_setup(ctx, inputs, output):
    x, weights, biases, has_bias, patterns, family, activations, input_dropout, output_dropout, scale, rates = inputs
    _, saved = output
    ctx.config = (list(has_bias), family, list(activations), input_dropout, output_dropout, scale, list(rates))
    ctx.counts = (len(weights), len(biases))
    ctx.save_for_backward(x, patterns, *weights, *biases, *saved)


def _chain_backward(ctx, grad_y, grad_saved):
    x, patterns, *rest = ctx.saved_tensors
    layers, present = ctx.counts
    weights, biases, saved = rest[:layers], rest[layers: layers + present], rest[layers + present:]
    has_bias, family, activations, input_dropout, output_dropout, scale, rates = ctx.config
    needs_x = ctx.needs_input_grad[0]
    grad_x, grad_w, grad_b = torch.ops.fxdrop.chain_backward(
        grad_y.contiguous(), x, weights, biases, has_bias, patterns, saved, family, activations, input_dropout,
        output_dropout, scale, rates, needs_x)
    # register_autograd compares structures, and flattens an empty list of anything as a tensor list.
    def no_grad(value):
        return [] if isinstance(value, list) and not value else None

    return (grad_x if needs_x else None, list(grad_w), list(grad_b), no_grad(has_bias), None, None,
            no_grad(activations), None, None, None, no_grad(rates))


torch.library.register_autograd("fxdrop::chain", _chain_backward, setup_context=_chain_setup)


def _unit_dropout_setup(ctx, inputs, output):
    _, pattern, family, scale, p = inputs
    ctx.config = (family, scale, p)
    ctx.save_for_backward(pattern)


def _unit_dropout_backward(ctx, grad):
    (pattern,) = ctx.saved_tensors
    return torch.ops.fxdrop.unit_dropout(grad, pattern, *ctx.config), None, None, None, None


torch.library.register_autograd("fxdrop::unit_dropout", _unit_dropout_backward, setup_context=_unit_dropout_setup)


def _tile_setup(ctx, inputs, output):
    x, weight, bias, pattern, tile, scale, p = inputs
    ctx.config = (tile, scale, p, bias is not None)
    ctx.save_for_backward(x, weight, pattern)


def _tile_backward(ctx, grad_y):
    x, weight, pattern = ctx.saved_tensors
    tile, scale, p, has_bias = ctx.config
    grad_x, grad_w, grad_b = torch.ops.fxdrop.tile_linear_backward(grad_y.contiguous(), x, weight, pattern,
                                                                   tile, scale, p, has_bias)
    return grad_x, grad_w, (grad_b if has_bias else None), None, None, None, None


torch.library.register_autograd("fxdrop::tile_linear", _tile_backward, setup_context=_tile_setup)


# ---------------------------------------------------------------- wrappers

def _kernels_ready() -> None:
    """First eager call: load (or build once, cached) the compiled kernels; never inside a trace."""
    if not torch.compiler.is_compiling():
        extension.ensure_loaded()


def chain(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
          patterns: torch.Tensor, *, family: str, activations: Sequence[str], input_dropout: bool = False,
          output_dropout: bool = False, scale: str = "kept", rates: Sequence[float]) -> torch.Tensor:
    """``[dropout ->] Linear -> act -> dropout -> ... -> Linear [-> act -> dropout]`` on kept units only.

    ``x: (..., in_features)``; ``patterns: int64 (sites, 2)``; returns ``(..., out_features)``.
    With ``patterns: (classes, sites, 2)`` (what :func:`sample_rows` returns) row ``r`` of ``x``
    flattened to 2-D uses ``patterns[r % classes]``; classes that repeat with a shorter period run as one.
    """
    _kernels_ready()
    y, _ = torch.ops.fxdrop.chain(x, list(weights), [b for b in biases if b is not None],
                                  [b is not None for b in biases], patterns, family, list(activations),
                                  bool(input_dropout), bool(output_dropout), scale, [float(r) for r in rates])
    return y


def sample_rows(states: Sequence[torch.Tensor], cdfs: Sequence[torch.Tensor], rows: int,
                classes: int) -> torch.Tensor:
    """Each site's next row-class plan (:func:`fxdrop.scheduler.draw_classes`): int64 ``(classes, sites, 2)``,
    for :func:`chain` on ``rows`` rows (the count only updates each stream's per-dp row counts)."""
    return torch.ops.fxdrop.sample_rows(list(states), list(cdfs), int(rows), int(classes))


def unit_dropout(x: torch.Tensor, pattern: torch.Tensor, *, family: str, scale: str = "kept",
                 p: float = 0.0) -> torch.Tensor:
    """``x * mask`` along the last dim (0 at dropped units, the scale at kept ones)."""
    _kernels_ready()
    return torch.ops.fxdrop.unit_dropout(x, pattern, family, scale, float(p))


def tile_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, pattern: torch.Tensor, *,
                tile: int = 32, scale: str = "kept", p: float = 0.0) -> torch.Tensor:
    """``x @ (weight * tile mask)^T + bias``, computed on the kept tiles only."""
    _kernels_ready()
    return torch.ops.fxdrop.tile_linear(x, weight, bias, pattern, int(tile), scale, float(p))
