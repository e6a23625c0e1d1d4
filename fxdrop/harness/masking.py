"""The training contract's reference: the *original* model with each dropout replaced by its site's mask.

``masked(model, masks)`` runs ``model`` (the original, never a converted one) with every dropout whose
site name is in ``masks`` replaced by multiplication with that mask; other dropouts run as they are.
Names follow fxdrop's: a Dropout module by its qualified name (``name:k`` for its k-th further call in
one forward), a functional ``F.dropout`` / ``torch.dropout`` by the module whose forward called it
(``<module>.dropout``, ``:k`` likewise), an LSTM/GRU's inter-layer dropout ``<rnn>.layer{l}``. A mask of
shape ``(M, units)`` is a row-class mask: row ``r`` of the input flattened to 2-D uses row ``r mod M``.
Nothing here calls fxdrop.
"""

from __future__ import annotations

import contextlib
import sys
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn


def apply_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if mask.dim() == 2:  # row classes
        x2 = x.reshape(-1, x.shape[-1])
        rows = mask[torch.arange(x2.shape[0]) % mask.shape[0]]
        return (x2 * rows).reshape(x.shape)
    return x * mask


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)


@contextlib.contextmanager
def masked(model: nn.Module, masks: dict[str, torch.Tensor]):
    names = {id(m): name for name, m in model.named_modules()}
    calls: dict[str, int] = {}

    def mask_for(base: str):
        k = calls.get(base, 0)
        calls[base] = k + 1
        return masks.get(base if k == 0 else f"{base}:{k}")

    patched = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            original = module.forward

            def forward(x, name=name, original=original):
                mask = mask_for(name)
                return original(x) if mask is None else apply_mask(x, mask)

            module.forward = forward
            patched.append(module)
    for name, module in model.named_modules():
        if type(module) in (nn.LSTM, nn.GRU) and f"{name}.layer0" in masks:
            module.forward = _masked_rnn(module, name, masks)
            patched.append(module)

    def caller() -> str:
        frame = sys._getframe(2)
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, nn.Module) and id(owner) in names:
                return names[id(owner)]
            frame = frame.f_back
        return ""

    def fake(real):
        def dropout(x, *args, **kwargs):
            mask = mask_for(_join(caller(), "dropout"))
            return real(x, *args, **kwargs) if mask is None else apply_mask(x, mask)
        return dropout

    real_f, real_t = F.dropout, torch.dropout
    try:
        with mock.patch.object(F, "dropout", fake(real_f)), mock.patch.object(torch, "dropout", fake(real_t)):
            calls.clear()
            yield model
    finally:
        for module in patched:
            del module.forward


def _masked_rnn(rnn: nn.Module, name: str, masks):
    """A unidirectional ``rnn`` run one layer at a time (single-layer modules on its own Parameters),
    layer ``l``'s output multiplied by ``masks[f"{name}.layer{l}"]``."""
    lstm = isinstance(rnn, nn.LSTM)

    def forward(x, hx=None):
        assert not rnn.bidirectional and not getattr(rnn, "proj_size", 0), "a unidirectional RNN without projections"
        h_n, c_n = [], []
        for layer in range(rnn.num_layers):
            ref = (nn.LSTM if lstm else nn.GRU)(x.shape[-1], rnn.hidden_size, batch_first=rnn.batch_first)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                setattr(ref, f"{kind}_l0", getattr(rnn, f"{kind}_l{layer}"))
            rows = slice(layer, layer + 1)
            state = None if hx is None else ((hx[0][rows], hx[1][rows]) if lstm else hx[rows])
            x, state = ref(x, state)
            if lstm:
                h_n.append(state[0])
                c_n.append(state[1])
            else:
                h_n.append(state)
            if layer < rnn.num_layers - 1:
                x = apply_mask(x, masks[f"{name}.layer{layer}"])
        return x, ((torch.cat(h_n), torch.cat(c_n)) if lstm else torch.cat(h_n))
    return forward
