"""StructuredLSTM: an ``nn.LSTM`` whose dropouts are structured, so the dropped input columns are never computed.

``nn.LSTM(num_layers > 1, dropout=p)`` drops layer ``l``'s output (both directions, concatenated) before
layer ``l + 1`` reads it. Here each such dropout is a :class:`~fxdrop.site.Site` named
``<lstm name>.layer{l}`` (``l`` = the layer whose output it masks, ``0 .. num_layers - 2``) that draws one
pattern per forward call, shared by every time step and batch element (as locked / variational dropout
is). Layer ``l + 1`` then runs on the compact input ``x[..., kept] * scale`` with ``weight_ih_l{l+1}[:, kept]``:
its input projection, which the LSTM kernel computes as one GEMM over the whole sequence, shrinks to the
kept columns; the recurrent path is unchanged. An optional *input site* does the same for a dropout just
before the LSTM (Embedding -> Dropout -> LSTM, or Dropout -> LSTM inside an AWD-LSTM-style stack of
single-layer LSTMs), shrinking layer 0's input GEMM.

The layers run through ``torch._VF.lstm``, the kernel ``nn.LSTM`` itself calls, one layer at a time, with
the module's own ``Parameter`` objects (sliced by autograd, so weight gradients are dense and of the
parameter's shape). ``StructuredLSTM`` subclasses ``nn.LSTM``: parameter names, ``state_dict`` keys,
``flatten_parameters``, ``.to()`` and the eval path are ``nn.LSTM``'s own, so eval mode is bit-identical.
``PackedSequence`` inputs are handled (the mask acts on the packed data's feature dimension, as
``nn.LSTM``'s dropout does). ``proj_size > 0`` is handled (the masked width is ``proj_size`` per direction).

Imports torch, patterns, site, scheduler (and ops, which registers the pattern-sampling op).
"""

from __future__ import annotations

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence

from . import ops as _ops  # noqa: F401  (registers fxdrop::sample_pattern, which Site.sample calls)
from .patterns import UNIT_FAMILIES, kept_slice, unit_scale
from .scheduler import derive_seed
from .site import Site

__all__ = ["StructuredLSTM", "structure_lstm", "lstm_blocker"]


def lstm_blocker(module: nn.Module) -> str | None:
    """Why ``module`` cannot become a :class:`StructuredLSTM`, or ``None`` when it can.

    The fx pass calls this before :func:`structure_lstm` and records the reason in the audit.
    """
    if isinstance(module, StructuredLSTM):
        return "already a StructuredLSTM"
    if type(module) is not nn.LSTM:
        # A subclass may override forward(); rewriting it could silently drop that behaviour.
        return (f"{type(module).__name__} is not exactly torch.nn.LSTM (subclasses may override forward); "
                "left as is")
    return None


def _structured_input(x: torch.Tensor, pattern: torch.Tensor, site: Site) -> tuple[torch.Tensor, slice | None]:
    """``x[..., kept] * scale`` and the kept slice (``None`` when the pattern keeps every unit)."""
    dp, offset = pattern.tolist()
    n = x.shape[-1]
    keep = kept_slice(site.family, n, dp, offset)
    scale = unit_scale(site.family, n, dp, offset, site.scale, site.p)
    if keep.start == 0 and keep.stop == n and keep.step == 1:
        return (x if scale == 1.0 else x * scale), None
    # One pass: the strided (row) or sliced (block) view is read, scaled and written compact.
    return torch.mul(x[..., keep], scale), keep


def _check_site(site: Site, units: int, where: str) -> Site:
    if not isinstance(site, Site):
        raise TypeError(f"{where} must be a fxdrop.site.Site, got {type(site).__name__}")
    if site.family not in UNIT_FAMILIES:
        raise ValueError(f"site {site.name!r}: an LSTM dropout masks units, so its family must be one of "
                         f"{UNIT_FAMILIES}, got {site.family!r} (tile patterns apply to Linear weights)")
    if site.units != units:
        raise ValueError(f"site {site.name!r}: {where} must mask {units} units, got units={site.units}")
    return site


class StructuredLSTM(nn.LSTM):
    """``nn.LSTM`` with structured inter-layer (and optional input) dropout; see the module docstring.

    Shapes are ``nn.LSTM``'s: ``input: (T, B, input_size)`` (``(B, T, ...)`` with ``batch_first``,
    ``(T, input_size)`` unbatched, or a ``PackedSequence``); returns ``(output, (h_n, c_n))``.

    ``layer_sites[l]`` masks layer ``l``'s output (``D * H`` units, ``D`` directions, ``H`` the hidden or
    projection size); ``input_site`` masks the input (``input_size`` units) or is ``None``.
    """

    def __init__(self, *args, name: str = "lstm", p: float | None = None, family: str = "row",
                 max_dp: int | str = "auto", seed: int | None = None, scale: str = "kept",
                 input_site: Site | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._attach_sites(name, p, family, max_dp, seed, scale, input_site)

    @classmethod
    def from_lstm(cls, lstm: nn.LSTM, *, name: str, p: float | None = None, family: str = "row",
                  max_dp: int | str = "auto", seed: int | None = None, scale: str = "kept",
                  input_site: Site | None = None) -> "StructuredLSTM":
        """A StructuredLSTM that uses ``lstm``'s own ``Parameter`` objects (no copy); ``lstm`` is not modified.

        ``p=None`` keeps ``lstm.dropout`` for the inter-layer sites; a float overrides it. Inter-layer sites
        exist when ``lstm.dropout > 0`` and ``num_layers > 1`` (where ``nn.LSTM`` applies a dropout).
        ``seed`` seeds site ``l`` with ``derive_seed(seed, l)``; ``None`` draws from the global RNG.
        """
        if not isinstance(lstm, nn.LSTM):
            raise TypeError(f"StructuredLSTM.from_lstm expects an nn.LSTM, got {type(lstm).__name__}")
        reason = lstm_blocker(lstm)
        if reason is not None:
            raise TypeError(f"StructuredLSTM.from_lstm({name!r}): {reason}")
        weight = lstm.weight_ih_l0
        # Built on the meta device so no parameters are allocated, then the originals are put in.
        new = cls(lstm.input_size, lstm.hidden_size, num_layers=lstm.num_layers, bias=lstm.bias,
                  batch_first=lstm.batch_first, dropout=lstm.dropout, bidirectional=lstm.bidirectional,
                  proj_size=lstm.proj_size, device="meta", dtype=weight.dtype,
                  name=name, p=p, family=family, max_dp=max_dp, seed=seed, scale=scale, input_site=input_site)
        for param_name in lstm._flat_weights_names:
            setattr(new, param_name, getattr(lstm, param_name))
        new._init_flat_weights()
        new.train(lstm.training)
        return new

    def _attach_sites(self, name, p, family, max_dp, seed, scale, input_site) -> None:
        if family not in UNIT_FAMILIES:
            raise ValueError(f"StructuredLSTM {name!r}: family must be one of {UNIT_FAMILIES}, got {family!r} "
                             "(tile patterns apply to Linear weights, not LSTM inputs)")
        self.fxdrop_name = name
        directions = 2 if self.bidirectional else 1
        width = directions * (self.proj_size if self.proj_size > 0 else self.hidden_size)
        rate = self.dropout if p is None else p
        self.layer_sites: list[Site] = []
        if self.dropout > 0 and self.num_layers > 1:
            self.layer_sites = [
                Site.create(f"{name}.layer{layer}", rate, family, max_dp=max_dp,
                            seed=None if seed is None else derive_seed(seed, layer), scale=scale, units=width,
                            producer=f"{name} layer {layer}", consumer=f"{name}.weight_ih_l{layer + 1}")
                for layer in range(self.num_layers - 1)]
        self.input_site = None if input_site is None else _check_site(input_site, self.input_size, "input_site")

    def fxdrop_sites(self) -> list[Site]:
        """The converted dropout sites of this module, input site first (what ``fxdrop.sites`` collects)."""
        return ([self.input_site] if self.input_site is not None else []) + list(self.layer_sites)

    def extra_repr(self) -> str:
        names = ", ".join(site.name for site in self.fxdrop_sites()) or "none"
        return f"{super().extra_repr()}, structured sites: {names}"

    # ------------------------------------------------------------------ forward

    def forward(self, input, hx=None):
        if not self.training or not self.fxdrop_sites():
            # Eval: exactly nn.LSTM (its dropout is off in eval, and the input site is an identity).
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
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            x = input
            is_batched = x.dim() == 3
            batch_dim = 0 if self.batch_first else 1
            if not is_batched:
                x = x.unsqueeze(batch_dim)
                if hx is not None:
                    if hx[0].dim() != 2 or hx[1].dim() != 2:
                        raise RuntimeError("For unbatched 2-D input, hx and cx should also be 2-D but got "
                                           f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
                    hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
            elif hx is not None and (hx[0].dim() != 3 or hx[1].dim() != 3):
                raise RuntimeError("For batched 3-D input, hx and cx should also be 3-D but got "
                                   f"({hx[0].dim()}-D, {hx[1].dim()}-D) tensors")
            batch = x.size(batch_dim)
        if hx is None:
            layers = self.num_layers * directions
            hx = (torch.zeros(layers, batch, real_hidden, dtype=x.dtype, device=x.device),
                  torch.zeros(layers, batch, self.hidden_size, dtype=x.dtype, device=x.device))
        else:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(x, hx, batch_sizes)

        per_layer = len(self._flat_weights) // self.num_layers  # both directions' weights of one layer
        h_n, c_n = [], []
        site = self.input_site
        for layer in range(self.num_layers):
            weights = self._flat_weights[layer * per_layer: (layer + 1) * per_layer]
            if site is not None:
                x, keep = _structured_input(x, site.sample(), site)
                if keep is not None:
                    weights = self._shrink_input_weights(weights, keep)
            rows = slice(layer * directions, (layer + 1) * directions)
            state = (hx[0][rows], hx[1][rows])
            if packed:
                x, h, c = _VF.lstm(x, batch_sizes, state, weights, self.bias, 1, 0.0, True, self.bidirectional)
            else:
                x, h, c = _VF.lstm(x, state, weights, self.bias, 1, 0.0, True, self.bidirectional,
                                   self.batch_first)
            h_n.append(h)
            c_n.append(c)
            site = self.layer_sites[layer] if layer < len(self.layer_sites) else None
        hidden = (torch.cat(h_n, 0), torch.cat(c_n, 0)) if self.num_layers > 1 else (h_n[0], c_n[0])
        if packed:
            return PackedSequence(x, batch_sizes, sorted_indices, unsorted_indices), \
                self.permute_hidden(hidden, unsorted_indices)
        if not is_batched:
            return x.squeeze(0 if self.batch_first else 1), (hidden[0].squeeze(1), hidden[1].squeeze(1))
        return x, hidden

    def _shrink_input_weights(self, weights: list[torch.Tensor], keep: slice) -> list[torch.Tensor]:
        """Each direction's ``weight_ih`` restricted to the kept input columns (autograd-tracked views)."""
        per_direction = len(weights) // (2 if self.bidirectional else 1)
        shrunk = list(weights)
        for start in range(0, len(weights), per_direction):  # weight_ih leads each direction's group
            w_ih = weights[start][:, keep]
            # BLAS takes a column-sliced block as is; a row pattern's strided columns are gathered once
            # here, so the GEMM, and its backward, see a dense matrix.
            shrunk[start] = w_ih if keep.step == 1 else w_ih.contiguous()
        return shrunk


def structure_lstm(lstm: nn.LSTM, *, name: str, p: float | None = None, input_name: str | None = None,
                   input_p: float | None = None, family: str = "row", max_dp: int | str = "auto",
                   seed: int | None = None, scale: str = "kept") -> StructuredLSTM:
    """What the fx pass calls for an ``nn.LSTM`` with inter-layer dropout and/or a Dropout feeding it.

    ``input_name``/``input_p``: the qualified name and rate of a Dropout whose only user is this LSTM
    (Embedding -> Dropout -> LSTM; or, in an AWD-LSTM-style stack of single-layer LSTMs,
    LSTM -> Dropout -> LSTM, where each Dropout becomes the next LSTM's input site). The Dropout node is
    then removed from the graph and the LSTM receives the undropped tensor.
    """
    input_site = None
    if input_name is not None or input_p is not None:
        if input_name is None or input_p is None:
            raise ValueError(f"structure_lstm({name!r}): give both input_name and input_p for an input site")
        input_site = Site.create(input_name, input_p, family, max_dp=max_dp,
                                 seed=None if seed is None else derive_seed(seed, lstm.num_layers),
                                 scale=scale, units=lstm.input_size, consumer=f"{name}.weight_ih_l0")
    return StructuredLSTM.from_lstm(lstm, name=name, p=p, family=family, max_dp=max_dp, seed=seed, scale=scale,
                                    input_site=input_site)
