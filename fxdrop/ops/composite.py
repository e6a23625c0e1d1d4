"""Composite kernels of the ``fxdrop`` ops, written with ATen calls (any device).

The work done is the structured work only: the GEMMs run on the kept rows/columns of each weight
(views for the block family, a gather of the consumer's columns for the row family, whose column
stride BLAS cannot take), biases, scales and activations fold into the GEMM calls where ATen
allows (``addmm`` with ``alpha``), and dense weight gradients are written as ``empty`` + zeroed
complement + a GEMM straight into the kept region, never ``zeros`` + a copy.

Outputs are never views (a view made inside a custom op cannot be modified in place by the caller:
``Linear -> ReLU(inplace=True)`` after a converted site), and they are contiguous, as the fake
kernels say. Which weight dimensions shrink is :class:`fxdrop.layout.ChainLayout`'s.

Imports torch, patterns, layout, scheduler (the stream) and activations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import patterns as P
from ..layout import ChainLayout
from . import activations as act


def _check_mode(family: str, scale: str) -> None:
    P.check_family(family, P.UNIT_FAMILIES)
    P.check_scale(scale)


def _pattern_rows(patterns: torch.Tensor, sites: int) -> list[tuple[int, int]]:
    if patterns.dtype != torch.int64 or patterns.shape != (sites, 2):
        raise ValueError(f"patterns must be an int64 tensor of shape ({sites}, 2) = [dp, offset] per site, "
                         f"got {patterns.dtype} {tuple(patterns.shape)}")
    rows = [(int(dp), int(off)) for dp, off in patterns.tolist()]
    for dp, off in rows:
        P.Pattern(dp, off).check()
    return rows


@dataclass(frozen=True)
class Mask:
    """One site's kept units of a width-``n`` axis and the scale for them (``keep`` may be empty)."""

    keep: slice
    scale: float
    n: int

    @property
    def full(self) -> bool:
        return self.keep.start == 0 and self.keep.stop == self.n and self.keep.step == 1

    @property
    def contiguous(self) -> bool:
        return self.keep.step == 1


def _mask(family: str, n: int, pattern: tuple[int, int], scale: str, p: float) -> Mask:
    dp, off = pattern
    return Mask(P.kept_slice(family, n, dp, off), P.unit_scale(family, n, dp, off, scale, p), n)


def _columns(t: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    """``t[:, kept]``: a view when contiguous, else a gather (BLAS needs a unit column stride)."""
    if mask is None or mask.full:
        return t
    view = t[:, mask.keep]
    return view if mask.contiguous else view.contiguous()


def _rows(t: torch.Tensor, mask: Mask | None) -> torch.Tensor:
    return t if mask is None or mask.full else t[mask.keep]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """``alpha * x @ weight.T + bias`` in one GEMM call."""
    if bias is None:
        out = torch.mm(x, weight.t())
        return out if alpha == 1.0 else out.mul_(alpha)
    return torch.addmm(bias, x, weight.t(), beta=1, alpha=alpha)


def _zero_outside(full: torch.Tensor, rows: Mask | None, cols: Mask | None) -> None:
    """Zero everything of a 2-D tensor outside ``rows x cols`` (both contiguous or absent)."""
    r0, r1 = (rows.keep.start, rows.keep.stop) if rows is not None else (0, full.shape[0])
    c0, c1 = (cols.keep.start, cols.keep.stop) if cols is not None else (0, full.shape[1])
    full[:r0].zero_()
    full[r1:].zero_()
    full[r0:r1, :c0].zero_()
    full[r0:r1, c1:].zero_()


def _scatter_product(shape: tuple[int, int], like: torch.Tensor, rows: Mask | None, cols: Mask | None,
                     a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """A dense ``shape`` tensor holding ``alpha * a @ b`` at ``[rows, cols]`` and zeros elsewhere."""
    contiguous = (rows is None or rows.contiguous) and (cols is None or cols.contiguous)
    if contiguous:
        full = like.new_empty(shape)
        _zero_outside(full, rows, cols)
        region = full
        if rows is not None:
            region = region[rows.keep]
        if cols is not None:
            region = region[:, cols.keep]
        region.addmm_(a, b, beta=0, alpha=alpha)  # a BLAS-compatible view: written in place
        return full
    full = like.new_zeros(shape)
    region = full
    if rows is not None:
        region = region[rows.keep]
    if cols is not None:
        region = region[:, cols.keep]
    if region.stride(-1) == 1:
        region.addmm_(a, b, beta=0, alpha=alpha)
    else:
        region.copy_(torch.mm(a, b).mul_(alpha) if alpha != 1.0 else torch.mm(a, b))
    return full


def _scatter_columns(values: torch.Tensor, n: int, mask: Mask, alpha: float) -> torch.Tensor:
    """A ``(rows, n)`` tensor with ``alpha * values`` at the kept columns and zeros elsewhere."""
    if mask.contiguous:
        full = values.new_empty(values.shape[0], n)
        full[:, : mask.keep.start].zero_()
        full[:, mask.keep.stop:].zero_()
    else:
        full = values.new_zeros(values.shape[0], n)
    torch.mul(values, alpha, out=full[:, mask.keep]) if alpha != 1.0 else full[:, mask.keep].copy_(values)
    return full


@dataclass(frozen=True)
class _Layer:
    """Linear ``layer`` of a chain: the mask of its input units and of its output units."""

    inputs: Mask | None
    outputs: Mask | None


def _plan(x_width: int, weights: Sequence[torch.Tensor], patterns: torch.Tensor, family: str,
          activations: Sequence[str], input_dropout: bool, output_dropout: bool, scale: str,
          rates: Sequence[float]) -> list[_Layer]:
    _check_mode(family, scale)
    if len(weights) < 1:
        raise ValueError("chain needs at least one weight")
    layout = ChainLayout(len(weights), bool(input_dropout), bool(output_dropout))
    rows = _pattern_rows(patterns, layout.sites)
    if len(rates) != layout.sites:
        raise ValueError(f"chain has {layout.sites} dropout sites but {len(rates)} rates")
    if len(activations) != layout.activations:
        raise ValueError(f"chain needs {layout.activations} activations (one per Linear followed by a dropout), "
                         f"got {len(activations)}")
    for name in activations:
        act.parse(name)
    widths = [w.shape[0] for w in weights]
    masks = [_mask(family, layout.site_width(site, x_width, widths), rows[site], scale, rates[site])
             for site in range(layout.sites)]
    plan = []
    for layer in range(layout.layers):
        in_site, out_site = layout.in_site(layer), layout.out_site(layer)
        plan.append(_Layer(None if in_site is None else masks[in_site], None if out_site is None else masks[out_site]))
    return plan


def check_chain(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None]) -> None:
    """Shapes and dtypes of a chain's tensors; errors name the weight at fault."""
    if not x.is_floating_point():
        raise TypeError(f"chain: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("chain: x must have shape (..., in_features)")
    if len(biases) != len(weights):
        raise ValueError(f"chain: {len(weights)} weights but {len(biases)} biases (use None for no bias)")
    width = x.shape[-1]
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        if weight.dim() != 2:
            raise ValueError(f"chain: weights[{i}] must be 2-D (out, in), got shape {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"chain: weights[{i}] is {weight.dtype} but x is {x.dtype}")
        if weight.shape[1] != width:
            raise ValueError(f"chain: weights[{i}] expects {weight.shape[1]} input features, "
                             f"but {'x' if i == 0 else f'weights[{i - 1}]'} gives {width}")
        if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype):
            raise ValueError(f"chain: biases[{i}] must be {x.dtype} of shape ({weight.shape[0]},), "
                             f"got {bias.dtype} {tuple(bias.shape)}")
        width = weight.shape[0]


def expand_biases(biases: Sequence[torch.Tensor], has_bias: Sequence[bool]) -> list[torch.Tensor | None]:
    """``(present biases, has_bias)`` -> one entry per Linear, None where it has no bias."""
    if sum(has_bias) != len(biases):
        raise ValueError(f"chain: has_bias marks {sum(has_bias)} biases but {len(biases)} were given")
    present = iter(biases)
    return [next(present) if has else None for has in has_bias]


def row_groups(table: list, classes: int) -> list[tuple[int, int]]:
    """The strided row sets ``(start, step)`` of a call with ``classes`` row classes whose patterns are
    ``table[c]`` (row ``r`` in class ``r mod classes``): residue classes whose members all share one
    pattern set run as one set of rows ``r = start (mod step)``, a strided view.

    Splits residue classes in two (mod 2, mod 4, ...) until each is uniform; a class count with an odd
    factor left splits into single classes. The C++ kernels implement the same function.
    """
    def split(start: int, step: int) -> list[tuple[int, int]]:
        members = table[start::step]
        if all(m == members[0] for m in members):
            return [(start, step)]
        if (classes // step) % 2:
            return [(c, classes) for c in range(start, classes, step)]
        return split(start, 2 * step) + split(start + step, 2 * step)

    return split(0, 1)


def row_classes(patterns: torch.Tensor, sites: int) -> list[tuple[slice, torch.Tensor]] | None:
    """``[(rows, patterns (sites, 2)), ...]`` of a call with row classes, or ``None`` for one pattern set.

    ``patterns: (M, sites, 2)``: row ``r`` uses ``patterns[r % M]``; the groups are :func:`row_groups`.
    """
    if patterns.dim() != 3:
        return None
    if patterns.dtype != torch.int64 or patterns.shape[0] < 1 or patterns.shape[1:] != (sites, 2):
        raise ValueError(f"patterns must be an int64 tensor of shape ({sites}, 2) = [dp, offset] per site, or "
                         f"(classes, {sites}, 2) with row r using class r mod classes, got {patterns.dtype} "
                         f"{tuple(patterns.shape)}")
    classes = patterns.shape[0]
    table = patterns.tolist()
    return [(slice(start, None, step), patterns[start]) for start, step in row_groups(table, classes)]


def _num_sites(weights, input_dropout: bool, output_dropout: bool) -> int:
    return len(weights) - 1 + int(input_dropout) + int(output_dropout)


def _forward(x2, weights, biases, plan, activations, out=None):
    """The chain on 2-D ``x2`` for one pattern set: ``(y2, saved)``; ``y2`` written into ``out`` if given."""
    cur = _columns(x2, plan[0].inputs)
    alpha = plan[0].inputs.scale if plan[0].inputs is not None else 1.0
    saved: list[torch.Tensor] = []
    name_index = 0
    last = len(weights) - 1
    for layer, (weight, bias, step) in enumerate(zip(weights, biases, plan)):
        w = _columns(_rows(weight, step.outputs), step.inputs)
        b = _rows(bias, step.outputs) if bias is not None else None
        if layer == last and step.outputs is None and out is not None:
            if b is None:
                torch.mm(cur, w.t(), out=out)
                if alpha != 1.0:
                    out.mul_(alpha)
            else:
                torch.addmm(b, cur, w.t(), beta=1, alpha=alpha, out=out)
            return out, saved
        z = _linear(cur, w, b, alpha)
        if step.outputs is None:
            cur = z
            continue
        name = activations[name_index]
        name_index += 1
        if act.needs_input(name):
            h = act.apply(name, z)
            saved += [z, h]
        else:
            h = z.relu_() if act.parse(name)[0] == "relu" else act.apply(name, z)
            saved += [z.new_empty(0), h]
        cur, alpha = h, step.outputs.scale
    final = plan[-1].outputs
    y = _scatter_columns(cur, final.n, final, alpha) if final is not None else cur
    if out is not None:
        out.copy_(y)
        return out, saved
    return y, saved


def _empty_saved(x2: torch.Tensor, activations: Sequence[str]) -> list[torch.Tensor]:
    out = []
    for name in activations:
        out += [x2.new_empty(0, 0) if act.needs_input(name) else x2.new_empty(0), x2.new_empty(0, 0)]
    return out


def chain(x, weights, biases, has_bias, patterns, family, activations, input_dropout, output_dropout, scale, rates):
    biases = expand_biases(biases, has_bias)
    check_chain(x, weights, biases)
    x2 = x.reshape(-1, x.shape[-1])
    y = x.new_empty(*x.shape[:-1], weights[-1].shape[0])  # the output itself, never a view of one
    y2 = y.view(-1, y.shape[-1])
    classes = row_classes(patterns, _num_sites(weights, input_dropout, output_dropout))
    if classes is None:
        plan = _plan(x.shape[-1], weights, patterns, family, activations, input_dropout, output_dropout, scale,
                     rates)
        _, saved = _forward(x2, weights, biases, plan, activations, out=y2)
        return y, saved
    saved = []
    for rows, class_patterns in classes:
        plan = _plan(x.shape[-1], weights, class_patterns, family, activations, input_dropout, output_dropout,
                     scale, rates)
        # A group without rows runs too (GEMMs of 0 rows): its saved tensors then have the fake kernel's shapes.
        _, piece = _forward(x2[rows], weights, biases, plan, activations, out=y2[rows])
        saved += piece
    # Merged classes save nothing: pad to one set per class of `patterns` (a count fixed for compiled graphs).
    for _ in range(patterns.shape[0] - len(classes)):
        saved += _empty_saved(x2, activations)
    return y, saved


def _accumulate_product(full: torch.Tensor, rows: Mask | None, cols: Mask | None, a: torch.Tensor,
                        b: torch.Tensor, alpha: float) -> None:
    """``full[rows, cols] += alpha * a @ b``."""
    region = full
    if rows is not None and not rows.full:
        region = region[rows.keep]
    if cols is not None and not cols.full:
        region = region[:, cols.keep]
    if region.stride(-1) == 1:
        region.addmm_(a, b, alpha=alpha)
    else:
        region.add_(torch.mm(a, b), alpha=alpha)


def _backward(g, x2, weights, biases, plan, hidden, activations, needs_input_grad, grads=None, grad_x_out=None):
    """Gradients of the chain on 2-D rows for one pattern set.

    ``grads=None``: returns ``(grad_x2, grad_weights, grad_biases)`` as fresh dense tensors. Otherwise
    ``grads = (grad_weights, grad_biases)`` (dense, one entry per Linear, None for no bias) are
    accumulated into, and the input gradient is written into ``grad_x_out``.
    """
    accumulate = grads is not None
    sites_after = [step.outputs is not None for step in plan]
    grad_weights: list = [None] * len(weights)
    grad_biases: list = [None] * len(weights)
    site_index = sum(sites_after) - 1  # index into hidden / activations of the latest site
    if plan[-1].outputs is not None:
        last = plan[-1].outputs
        z, h = hidden[site_index]
        g = act.grad(activations[site_index], _columns(g, last).mul(last.scale), z if z.dim() == 2 else None, h)
        site_index -= 1
    grad_x = None
    for layer in range(len(weights) - 1, -1, -1):
        step, weight, bias = plan[layer], weights[layer], biases[layer]
        inp = hidden[site_index][1] if layer > 0 else _columns(x2, step.inputs)
        alpha = step.inputs.scale if step.inputs is not None else 1.0
        if accumulate:
            _accumulate_product(grads[0][layer], step.outputs, step.inputs, g.t(), inp, alpha)
        else:
            grad_weights[layer] = _scatter_product(tuple(weight.shape), weight, step.outputs, step.inputs,
                                                   g.t(), inp, alpha)
        if bias is not None:
            sums = g.sum(0)
            if accumulate:
                target = grads[1][layer]
                (target if step.outputs is None or step.outputs.full else target[step.outputs.keep]).add_(sums)
            elif step.outputs is None or step.outputs.full:
                grad_biases[layer] = sums
            else:
                gb = bias.new_zeros(bias.shape)
                gb[step.outputs.keep] = sums
                grad_biases[layer] = gb
        if layer == 0 and not needs_input_grad:
            break
        w = _columns(_rows(weight, step.outputs), step.inputs)
        if layer > 0:
            g_in = torch.mm(g, w)
            if alpha != 1.0:
                g_in.mul_(alpha)
            z, h = hidden[site_index]
            g = act.grad(activations[site_index], g_in, z if z.dim() == 2 else None, h)
            site_index -= 1
        elif accumulate:
            if step.inputs is None or step.inputs.full:
                torch.mm(g, w, out=grad_x_out)
                if alpha != 1.0:
                    grad_x_out.mul_(alpha)
            else:
                grad_x_out.zero_()
                _accumulate_product(grad_x_out, None, step.inputs, g, w, alpha)
        elif step.inputs is None:
            grad_x = torch.mm(g, w)
        else:
            grad_x = _scatter_product((g.shape[0], x2.shape[-1]), g, None, step.inputs, g, w, alpha)
    return grad_x, grad_weights, [b for b in grad_biases if b is not None]


def chain_backward(grad_y, x, weights, biases, has_bias, patterns, saved, family, activations, input_dropout,
                   output_dropout, scale, rates, needs_input_grad):
    biases = expand_biases(biases, has_bias)
    g = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    activations = list(activations)
    classes = row_classes(patterns, _num_sites(weights, input_dropout, output_dropout))
    per_class = 2 * len(activations)
    if classes is None:
        plan = _plan(x.shape[-1], weights, patterns, family, activations, input_dropout, output_dropout, scale,
                     rates)
        hidden = [(saved[2 * i], saved[2 * i + 1]) for i in range(len(saved) // 2)]
        grad_x, grad_weights, grad_biases = _backward(g, x2, weights, biases, plan, hidden, activations,
                                                      needs_input_grad)
    else:
        if len(saved) != per_class * patterns.shape[0]:
            raise ValueError(f"chain_backward: expected {per_class * patterns.shape[0]} saved tensors for "
                             f"{patterns.shape[0]} row classes, got {len(saved)}")
        grad_weights = [torch.zeros_like(w) for w in weights]
        grad_bias_full = [torch.zeros_like(b) if b is not None else None for b in biases]
        grad_x = x2.new_empty(x2.shape) if needs_input_grad else None
        for index, (rows, class_patterns) in enumerate(classes):
            if g[rows].shape[0] == 0:
                continue
            plan = _plan(x.shape[-1], weights, class_patterns, family, activations, input_dropout,
                         output_dropout, scale, rates)
            class_saved = saved[index * per_class: (index + 1) * per_class]
            hidden = [(class_saved[2 * i], class_saved[2 * i + 1]) for i in range(len(activations))]
            _backward(g[rows], x2[rows], weights, biases, plan, hidden, activations, needs_input_grad,
                      grads=(grad_weights, grad_bias_full), grad_x_out=None if grad_x is None else grad_x[rows])
        grad_biases = [b for b in grad_bias_full if b is not None]
    grad_x = x.new_empty(0) if grad_x is None else grad_x.reshape(x.shape)
    return grad_x, grad_weights, grad_biases


def unit_dropout(x, pattern, family, scale, p):
    """``x * mask`` along the last dim; ``pattern (M, 2)``: row ``r`` of ``x`` (flattened) uses ``pattern[r % M]``."""
    _check_mode(family, scale)
    out = x.new_empty(x.shape)
    if pattern.dim() == 1 or x.numel() == 0:
        (row,) = _pattern_rows(pattern.reshape(1, 2), 1) if pattern.dim() == 1 else [tuple(pattern[0].tolist())]
        mask = P.unit_mask(family, x.shape[-1], row[0], row[1], scale, p, dtype=x.dtype)
        return torch.mul(x, mask.to(x.device), out=out)
    classes = row_classes(pattern.unsqueeze(1), 1)
    x2, out2 = x.reshape(-1, x.shape[-1]), out.view(-1, x.shape[-1])
    for rows, class_pattern in classes:
        (dp, offset), = _pattern_rows(class_pattern, 1)
        mask = P.unit_mask(family, x.shape[-1], dp, offset, scale, p, dtype=x.dtype).to(x.device)
        torch.mul(x2[rows], mask, out=out2[rows])
    return out


def _tile_plan(weight: torch.Tensor, pattern: torch.Tensor, tile: int, scale: str, p: float):
    if scale not in ("kept", "rate"):
        raise ValueError(f"unknown scale mode {scale!r}; expected 'kept' or 'rate'")
    (dp, off), = _pattern_rows(pattern.reshape(1, 2), 1)
    shape = tuple(weight.shape)
    groups = [(r.to(weight.device), c.to(weight.device)) for r, c in P.tile_groups(shape, tile, dp, off)]
    return groups, P.tile_scale(shape, tile, dp, off, scale, p)


def tile_linear(x, weight, bias, pattern, tile, scale, p):
    check_chain(x, [weight], [bias])
    groups, s = _tile_plan(weight, pattern, tile, scale, p)
    x2 = x.reshape(-1, x.shape[-1])
    y = x.new_empty(*x.shape[:-1], weight.shape[0])
    y2 = y.view(-1, weight.shape[0])
    for rows, cols in groups:
        b = bias.index_select(0, rows) if bias is not None else None
        if cols.numel() == 0:
            y2[:, rows] = b if b is not None else 0
            continue
        w = weight.index_select(0, rows).index_select(1, cols)
        y2[:, rows] = _linear(x2.index_select(1, cols), w, b, s)
    return y


def tile_linear_backward(grad_y, x, weight, pattern, tile, scale, p, has_bias):
    groups, s = _tile_plan(weight, pattern, tile, scale, p)
    g = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    grad_x = torch.zeros_like(x2)
    grad_w = torch.zeros_like(weight)
    for rows, cols in groups:
        if cols.numel() == 0:
            continue
        g_rows = g.index_select(1, rows)
        x_cols = x2.index_select(1, cols)
        grad_w[rows.unsqueeze(1), cols.unsqueeze(0)] = torch.mm(g_rows.t(), x_cols).mul_(s)
        w = weight.index_select(0, rows).index_select(1, cols)
        # Distinct row residues read distinct column residues: no two groups write the same column.
        grad_x[:, cols] = torch.mm(g_rows, w).mul_(s)
    grad_b = g.sum(0) if has_bias else g.new_empty(0)
    return grad_x.reshape(x.shape), grad_w, grad_b


def sample_pattern(state, cdf):
    from ..scheduler import check_state, draw, next_counter  # the one stream definition

    check_state(state, "sample_pattern")
    pattern = draw(int(state[0]), next_counter(state), cdf.tolist())
    return torch.tensor([pattern.dp, pattern.offset], dtype=torch.int64)


def sample_classes(state, cdf, classes, position=0):
    from ..scheduler import check_classes, check_state, draw_classes, next_counter

    check_state(state, "sample_classes")
    check_classes(classes)
    plan = draw_classes(int(state[0]), next_counter(state), cdf.tolist(), int(classes), int(position))
    return torch.tensor([list(pattern) for pattern in plan], dtype=torch.int64)
