"""StructuredLSTM / StructuredGRU: RNNs whose dropouts are structured, so dropped input columns are never computed.

``nn.LSTM``/``nn.GRU(num_layers > 1, dropout=p)`` drop layer ``l``'s output (both directions,
concatenated) before layer ``l + 1`` reads it. Here each such dropout is a
:class:`~fxdrop.site.Site` named ``<rnn name>.layer{l}`` (``l`` = the layer whose output it masks,
``0 .. num_layers - 2``), with the rate and mode of the module itself (``rnn.dropout``, ``rnn.training``).
Layer ``l + 1`` then runs on the compact input ``x[..., kept] * scale`` with ``weight_ih_l{l+1}[:, kept]``:
its input projection, which the kernel computes as one GEMM over the sequence, shrinks to the kept
columns; the recurrent path is unchanged. A site of granularity ``"forward"`` draws one pattern per call,
shared by every time step and batch element; one of granularity ``"rows"`` (the default) draws
``row_classes`` patterns per call, one per equal contiguous chunk of the time steps
(:func:`fxdrop.patterns.time_chunks`), shared by the batch: the layer runs chunk after chunk with its state
carried across, so each chunk's input GEMM shrinks to its own columns (a ``PackedSequence`` call uses the
plan's first pattern for every step). One pattern per call regularised a PTB LM measurably less than
dropout in an overfitting regime (README, "PTB mask granularity where dropout matters"). An *input site*
(a dropout just before the RNN, given per call by the converted region's program through
:meth:`StructuredRNN.input_site_for_call`) does the same for layer 0.

The layers run through ``torch._VF.lstm`` / ``torch._VF.gru``, the kernels the modules themselves call,
one layer at a time, with the module's own ``Parameter`` objects (sliced by autograd, so weight
gradients are dense and of the parameter's shape). The classes subclass ``nn.LSTM`` / ``nn.GRU``:
parameter names, ``state_dict`` keys, ``flatten_parameters``, ``.to()`` and the eval path are the
originals', so eval mode is bit-identical. ``PackedSequence`` inputs and ``proj_size > 0`` work.

Imports torch, patterns and site (and ops, which registers the pattern-sampling ops).
"""

from __future__ import annotations

import contextlib

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from .. import ops as _ops  # noqa: F401  (registers fxdrop::sample_pattern, which Site.sample calls)
from ..patterns import UNIT_FAMILIES, kept_slice, time_chunks, unit_scale
from ..site import RNNOwner, Site

__all__ = ["StructuredRNN", "StructuredLSTM", "StructuredGRU", "structure_rnn"]


def _structured_input(x: torch.Tensor, pattern: torch.Tensor, site: Site) -> tuple[torch.Tensor, slice | None]:
    """``x[..., kept] * scale`` and the kept slice (``None`` when the pattern keeps every unit, scale 1)."""
    dp, offset = pattern.tolist()
    n = x.shape[-1]
    keep = kept_slice(site.family, n, dp, offset)
    scale = unit_scale(site.family, n, dp, offset, site.scale, site.rate)
    if keep.start == 0 and keep.stop == n and keep.step == 1:
        return (x if scale == 1.0 else x * scale), None
    # One pass: the strided (row) or sliced (block) view is read, scaled and written compact.
    return torch.mul(x[..., keep], scale), keep


class StructuredRNN:
    """The structured forward shared by :class:`StructuredLSTM` and :class:`StructuredGRU`."""

    _lstm: bool

    def _attach_sites(self, name: str, sites: list[Site]) -> None:
        self.fxdrop_name = name
        self.layer_sites: list[Site] = list(sites)
        self._call_input_site: Site | None = None

    def fxdrop_sites(self) -> list[Site]:
        """The inter-layer sites of this module (what ``fxdrop.sites`` collects; input sites belong to the
        region whose program feeds this module)."""
        return list(self.layer_sites)

    @contextlib.contextmanager
    def input_site_for_call(self, site: Site):
        if site.family not in UNIT_FAMILIES or site.units != self.input_size:
            raise ValueError(f"site {site.name!r}: an input site of {self.fxdrop_name} must be a unit site of "
                             f"{self.input_size} units, got family {site.family!r} and units={site.units}")
        previous, self._call_input_site = self._call_input_site, site
        try:
            yield
        finally:
            self._call_input_site = previous

    def extra_repr(self) -> str:
        names = ", ".join(site.name for site in self.layer_sites) or "none"
        return f"{super().extra_repr()}, structured sites: {names}"

    def forward(self, input, hx=None):
        input_site = self._call_input_site
        active = [s for s in ([input_site] if input_site is not None else []) + self.layer_sites if s.active]
        if not active:
            # Exactly nn.LSTM / nn.GRU: its dropout is off (eval, or p = 0) and the input site is an identity.
            return super().forward(input, hx)
        self._update_flat_weights()
        packed = isinstance(input, PackedSequence)
        directions = 2 if self.bidirectional else 1
        real_hidden = self.proj_size if self.proj_size > 0 else self.hidden_size
        batch_sizes = sorted_indices = unsorted_indices = None
        is_batched = True
        if packed:
            x, batch_sizes, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes[0])
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            x = input
            is_batched = x.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                x = x.unsqueeze(batch_dim)
                if hx is not None:
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1)) if self._lstm else hx.unsqueeze(1)
            batch = x.size(batch_dim)
        layers = self.num_layers * directions
        if hx is None:
            h0 = torch.zeros(layers, batch, real_hidden, dtype=x.dtype, device=x.device)
            hx = (h0, torch.zeros(layers, batch, self.hidden_size, dtype=x.dtype, device=x.device)) \
                if self._lstm else h0
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(x, hx, batch_sizes)

        per_layer = len(self._flat_weights) // self.num_layers  # both directions' weights of one layer
        h_n, c_n = [], []
        site = input_site
        for layer in range(self.num_layers):
            weights = self._flat_weights[layer * per_layer: (layer + 1) * per_layer]
            rows = slice(layer * directions, (layer + 1) * directions)
            state = (hx[0][rows], hx[1][rows]) if self._lstm else hx[rows]
            if site is not None and site.active and site.granularity == "rows":
                x, h, c = self._run_layer_over_time(x, batch_sizes, state, weights, site, is_batched)
            else:
                if site is not None and site.active:
                    x, keep = _structured_input(x, site.sample(), site)
                    weights = self._shrink_input_weights(weights, [keep], directions)[0]
                x, h, c = self._run_layer(x, batch_sizes, state, weights, packed)
            h_n.append(h)
            c_n.append(c)
            site = self.layer_sites[layer] if layer < len(self.layer_sites) else None
        h = torch.cat(h_n, 0) if self.num_layers > 1 else h_n[0]
        hidden = (h, torch.cat(c_n, 0) if self.num_layers > 1 else c_n[0]) if self._lstm else h
        if packed:
            return PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            x = x.squeeze(0 if self.batch_first else 1)
            hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if self._lstm else hidden.squeeze(1)
        return x, hidden

    def _run_layer(self, x, batch_sizes, state, weights, packed):
        if self._lstm:
            if packed:
                return _VF.lstm(x, batch_sizes, state, weights, self.bias, 1, 0.0, True, self.bidirectional)
            return _VF.lstm(x, state, weights, self.bias, 1, 0.0, True, self.bidirectional, self.batch_first)
        if packed:
            x, h = _VF.gru(x, batch_sizes, state, weights, self.bias, 1, 0.0, True, self.bidirectional)
        else:
            x, h = _VF.gru(x, state, weights, self.bias, 1, 0.0, True, self.bidirectional, self.batch_first)
        return x, h, None

    def _run_layer_over_time(self, x, batch_sizes, state, weights, site: Site, is_batched: bool):
        """One layer whose input site draws a pattern per time chunk (:meth:`Site.sample_over_time`): the
        layer runs chunk after chunk, each direction carrying its state across the chunks (the reverse
        direction from the last chunk back, on time-flipped chunks), each chunk's input GEMM on its own
        kept columns. A ``PackedSequence`` takes the plan's first pattern for every step."""
        directions = 2 if self.bidirectional else 1
        units = x.shape[-1]
        if batch_sizes is not None:
            compact, keep = _structured_input(x, site.sample_over_time(None, (units,))[0], site)
            return self._run_layer(compact, batch_sizes, state,
                                   self._shrink_input_weights(weights, [keep], directions)[0], True)
        time_dim = 1 if self.batch_first else 0
        steps = x.shape[time_dim]
        shape = ((1, steps, units) if self.batch_first else (steps, 1, units)) if is_batched else (steps, units)
        plan = site.sample_over_time(steps, shape)
        chunks = [_structured_input(x.narrow(time_dim, start, stop - start), plan[c], site)
                  for c, start, stop in time_chunks(steps, plan.shape[0])]
        if len(chunks) == 1:
            compact, keep = chunks[0]
            return self._run_layer(compact, None, state, self._shrink_input_weights(weights, [keep], directions)[0],
                                   False)
        per_direction = len(weights) // directions
        outputs, h_n, c_n = [], [], []
        for d in range(directions):
            group = weights[d * per_direction: (d + 1) * per_direction]
            carried = (state[0][d: d + 1], state[1][d: d + 1]) if self._lstm else state[d: d + 1]
            pieces: list[torch.Tensor | None] = [None] * len(chunks)
            shrunk = self._shrink_input_weights(group, [keep for _, keep in chunks], 1)
            for i in (range(len(chunks)) if d == 0 else reversed(range(len(chunks)))):
                compact = chunks[i][0]
                y, h, c = self._run_direction(compact if d == 0 else compact.flip(time_dim), carried, shrunk[i])
                carried = (h, c) if self._lstm else h
                pieces[i] = y if d == 0 else y.flip(time_dim)
            outputs.append(torch.cat(pieces, time_dim))
            h_n.append(carried[0] if self._lstm else carried)
            c_n.append(carried[1] if self._lstm else None)
        out = torch.cat(outputs, -1) if directions == 2 else outputs[0]
        return out, torch.cat(h_n, 0), (torch.cat(c_n, 0) if self._lstm else None)

    def _run_direction(self, x, state, weights):
        """One direction of one layer, forward in time, on a padded (not packed) input."""
        if self._lstm:
            return _VF.lstm(x, state, weights, self.bias, 1, 0.0, True, False, self.batch_first)
        y, h = _VF.gru(x, state, weights, self.bias, 1, 0.0, True, False, self.batch_first)
        return y, h, None

    def _shrink_input_weights(self, weights: list[torch.Tensor], keeps: list[slice | None],
                              directions: int) -> list[list[torch.Tensor]]:
        """For each of ``keeps`` (kept input columns, one per time chunk of a call; ``None`` keeps every
        column), the weights with each direction's ``weight_ih`` restricted to those columns, through one
        :class:`_InputColumns` per ``weight_ih``; all ``None``: the weights as they are."""
        if all(keep is None for keep in keeps):
            return [list(weights) for _ in keeps]
        columns = weights[0].shape[1]
        slices = [slice(0, columns, 1) if keep is None else keep for keep in keeps]
        per_direction = len(weights) // directions
        shrunk = [list(weights) for _ in keeps]
        for start in range(0, len(weights), per_direction):  # weight_ih leads each direction's group
            for chunk, w_ih in enumerate(_InputColumns.apply(weights[start], *slices)):
                shrunk[chunk][start] = w_ih
        return shrunk


class _InputColumns(torch.autograd.Function):
    """``weight[:, keep]`` for each ``keep`` of one call, with one dense gradient for ``weight``.

    Plain slicing of the parameter once per time chunk made autograd zero a weight-sized gradient per
    slice, copy the slice's gradient into it, and add those up. Here the gradient is written once (PTB
    2 x 650, 2 chunks, a 3-step profile: copy_ 30 -> 16 ms, fill_ 30 -> 24 ms, add_ 22 -> 19 ms, of
    ~300 ms steps whose time moved within noise): zeros outside the
    first slice's columns (all of it for a strided slice), the first slice's gradient copied in, the
    others added. A block's columns are a view (BLAS takes it as is); a row pattern's strided columns are
    gathered, so the GEMM, and its backward, see a dense matrix."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, *keeps: slice):
        ctx.keeps, ctx.shape = keeps, weight.shape
        return tuple(weight[:, keep] if keep.step == 1 else weight[:, keep].contiguous() for keep in keeps)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        first = ctx.keeps[0]
        grad = grads[0].new_empty(ctx.shape)
        if first.step == 1:
            grad[:, :first.start].zero_()
            grad[:, first.stop:].zero_()
        else:
            grad.zero_()
        grad[:, first].copy_(grads[0])
        for keep, piece in zip(ctx.keeps[1:], grads[1:]):
            grad[:, keep].add_(piece)
        return (grad, *([None] * len(ctx.keeps)))


class StructuredLSTM(StructuredRNN, nn.LSTM):
    """``nn.LSTM`` with structured inter-layer (and per-call input) dropout; see the module docstring."""

    _lstm = True


class StructuredGRU(StructuredRNN, nn.GRU):
    """``nn.GRU`` with structured inter-layer (and per-call input) dropout; see the module docstring."""

    _lstm = False


def structure_rnn(module: nn.Module, *, name: str, records, config) -> StructuredRNN:
    """A structured copy of ``module`` (``nn.LSTM`` or ``nn.GRU``) with its own ``Parameter`` objects (no
    copy) and a site per plan record (``fxdrop.passes.plan.plan_rnn``); ``module`` is not modified."""
    cls = StructuredLSTM if isinstance(module, nn.LSTM) else StructuredGRU
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    new.__dict__["_parameters"] = dict(module._parameters)
    new.__dict__["_buffers"] = dict(module._buffers)
    new.__dict__["_modules"] = dict(module._modules)
    for key in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
        if key in module.__dict__:
            new.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    new._init_flat_weights()
    new._attach_sites(name, [Site.from_record(record, config, RNNOwner(new)) for record in records])
    return new
