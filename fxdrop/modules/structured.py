"""The callables that replace matched subgraphs inside a converted region's program.

Each holds its :class:`~fxdrop.site.Site` objects and no parameters: weights and biases arrive as
call arguments (the original Linears' own Parameters, read at every call, so ``.to()``,
parametrizations and reassigned weights are what they are now). When none of its sites is active
(their dropouts in eval mode, or rates of 0) each computes exactly the original ops; otherwise it
draws each active site's pattern (inactive sites keep everything, scale 1) and calls
:mod:`fxdrop.ops`. A hook registered on a module whose work a structured op does cannot fire in
training: that is said once, naming the site. Imports torch, fxdrop.ops and fxdrop.site.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..layout import ChainLayout
from ..ops import activations as act
from ..site import Site


class _Probe:
    """While :func:`probing` runs, region programs run even in eval mode and the structured callables record
    their GEMMs' shapes (computing the original ops): what ``fxdrop.audit`` counts FLOPs from."""

    active = False
    records: list[tuple[str, Any, dict[str, Any]]] = []


PROBE = _Probe()


@contextlib.contextmanager
def probing() -> Iterator[list[tuple[str, Any, dict[str, Any]]]]:
    PROBE.active, PROBE.records = True, []
    try:
        yield PROBE.records
    finally:
        PROBE.active = False


def _split(params: Sequence[torch.Tensor], has_bias: Sequence[bool]):
    weights, biases, i = [], [], 0
    for bias_present in has_bias:
        weights.append(params[i])
        i += 1
        if bias_present:
            biases.append(params[i])
            i += 1
        else:
            biases.append(None)
    return weights, biases


def _check_local(params: Sequence[torch.Tensor | None], where: str) -> None:
    """A DTensor weight means fully_shard went onto a module the converted program bypasses: say so.

    (Without this the op fails with "mixed torch.Tensor and DTensor". No DTensor can exist unless
    torch.distributed.tensor was imported, so this costs nothing otherwise; never inside a trace.)
    """
    if torch.compiler.is_compiling():
        return
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is not None and any(isinstance(t, dtensor) for t in params):
        raise ValueError(f"{where}: its weights are DTensor shards, so fully_shard (FSDP2) was applied to a "
                         "module that the converted program never calls and its shards are never gathered; "
                         "shard the converted model as a whole: fxdrop.distributed.fully_shard(model)")


class HookWatch:
    """Says once, in training, that hooks on modules fused into a site's op do not fire."""

    def __init__(self, modules: Sequence[nn.Module], where: str):
        self.modules = list(modules)
        self.where = where
        self.warned = False

    def check(self) -> None:
        if self.warned or torch.compiler.is_compiling():
            return
        hooked = [m for m in self.modules if m._forward_hooks or m._forward_pre_hooks]
        glob = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        if hooked or glob:
            self.warned = True
            names = ", ".join(type(m).__name__ for m in hooked) or "every module (a global hook)"
            warnings.warn(f"fxdrop: {self.where} runs as one structured op in training, so forward hooks on "
                          f"{names} do not fire for it there (they do in eval mode, which runs the original "
                          "modules); to observe those modules in training, convert without that site "
                          "(p={name: 0} keeps it structured but dense) or read fxdrop.sites(model)",
                          stacklevel=4)


def _linear(x, weight, bias, transposed: bool):
    """The original Linear (``F.linear``) or Conv1D (``addmm`` on the flattened input) exactly."""
    if not transposed:
        return F.linear(x, weight, bias)
    flat = x.view(-1, x.shape[-1])
    out = torch.addmm(bias, flat, weight) if bias is not None else torch.mm(flat, weight)
    return out.view(*x.shape[:-1], weight.shape[-1])


class StructuredChain:
    """``[dropout ->] Linear_0 -> act -> dropout -> ... -> Linear_{m-1} [-> act -> dropout]`` as one op.

    ``__call__(x, W_0, [b_0,] W_1, [b_1,] ...)`` with ``x: (..., in_features of Linear_0)``; a
    transposed weight (Conv1D) arrives as stored and is read transposed. With ``share_input`` (an
    input dropout that has other users too) it returns ``(y, dropped x)``, both from one draw.
    """

    def __init__(self, sites: Sequence[Site], *, family: str, activations: Sequence[str], has_bias: Sequence[bool],
                 layout: ChainLayout, scale: str, linears: Sequence[str] = (), transposed: Sequence[bool] = (),
                 share_input: bool = False, watch: HookWatch | None = None):
        if share_input and not layout.input_dropout:
            raise ValueError("StructuredChain: share_input needs an input dropout")
        self.sites = list(sites)
        self.family = family
        self.activations = list(activations)
        self.has_bias = list(has_bias)
        self.layout = layout
        self.scale = scale
        self.linears = list(linears)
        self.transposed = list(transposed) or [False] * layout.layers
        self.share_input = bool(share_input)
        self.watch = watch
        self.observers: list = []  # called with (self, (x, *params)) after each structured call (the DDP comm hook)

    def fxdrop_sites(self) -> list[Site]:
        return list(self.sites)

    def __call__(self, x: torch.Tensor, *params: torch.Tensor):
        _check_local(params, f"fxdrop chain of {', '.join(self.linears) or 'Linears'}")
        weights, biases = _split(params, self.has_bias)
        if PROBE.active:
            PROBE.records.append(("chain", self, dict(x=x, weights=weights)))
        if PROBE.active or not any(site.active for site in self.sites):
            y = self._original(x, weights, biases)
            return (y, x) if self.share_input else y
        if self.watch is not None:
            self.watch.check()
        weights = [w.t() if t else w for w, t in zip(weights, self.transposed)]
        draws = [site.draw() for site in self.sites]
        patterns = ops.chain_patterns(draws)
        rates = [site.rate for site in self.sites]
        y = ops.chain(x, weights, biases, patterns, family=self.family, activations=self.activations,
                      input_dropout=self.layout.input_dropout, output_dropout=self.layout.output_dropout,
                      scale=self.scale, rates=rates)
        for observe in self.observers:
            observe(self, (x, *params))
        if not self.share_input:
            return y
        return y, ops.unit_dropout(x, draws[0], family=self.family, scale=self.scale, p=rates[0])

    def _original(self, x, weights, biases):
        """Inactive: the original ops in the original order (dropouts are the identity)."""
        for layer, (weight, bias) in enumerate(zip(weights, biases)):
            x = _linear(x, weight, bias, self.transposed[layer])
            if self.layout.out_site(layer) is not None:
                x = act.apply(self.activations[layer], x)
        return x

    def __repr__(self) -> str:
        sites = ", ".join(s.name for s in self.sites)
        return (f"StructuredChain(linears=[{', '.join(self.linears)}], activations={self.activations}, "
                f"sites=[{sites}], family={self.family!r}, input_dropout={self.layout.input_dropout}, "
                f"output_dropout={self.layout.output_dropout}, scale={self.scale!r}"
                + (", share_input=True" if self.share_input else "") + ")")


class TileLinear:
    """``Dropout -> Linear`` as DropConnect on the Linear's weight at tile granularity: ``(x, W, [b])``."""

    def __init__(self, site: Site, *, has_bias: bool, linear: str = "", transposed: bool = False,
                 watch: HookWatch | None = None):
        self.site = site
        self.has_bias = bool(has_bias)
        self.linear = linear
        self.transposed = transposed
        self.watch = watch

    def fxdrop_sites(self) -> list[Site]:
        return [self.site]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        _check_local((weight, bias), f"fxdrop tile Linear {self.linear or self.site.name}")
        site = self.site
        if PROBE.active:
            PROBE.records.append(("tile", self, dict(x=x, weight=weight)))
        if PROBE.active or not site.active:
            return _linear(x, weight, bias, self.transposed)
        if self.watch is not None:
            self.watch.check()
        weight = weight.t() if self.transposed else weight
        return ops.tile_linear(x, weight, bias, site.sample(), tile=site.tile, scale=site.scale, p=site.rate)

    def __repr__(self) -> str:
        return f"TileLinear(linear={self.linear}, site={self.site.name}, tile={self.site.tile})"


class UnitDropout:
    """A dropout whose output has several users: one structured unit mask along the last dim."""

    def __init__(self, site: Site, watch: HookWatch | None = None):
        self.site = site
        self.watch = watch

    def fxdrop_sites(self) -> list[Site]:
        return [self.site]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        site = self.site
        if not site.active:
            return x
        if self.watch is not None:
            self.watch.check()
        return ops.unit_dropout(x, site.draw(), family=site.family, scale=site.scale, p=site.rate)

    def __repr__(self) -> str:
        return f"UnitDropout(site={self.site.name}, family={self.site.family!r})"


class RNNInput:
    """``Dropout -> LSTM/GRU``: calls the (structured) RNN module with ``site`` as its input site for this call."""

    def __init__(self, site: Site, rnn: nn.Module):
        self.site = site
        self.rnn = rnn

    def fxdrop_sites(self) -> list[Site]:
        return [self.site]

    def __call__(self, x, *args, **kwargs):
        if PROBE.active:
            PROBE.records.append(("rnn_input", self, dict(x=x)))
        with self.rnn.input_site_for_call(self.site):
            return self.rnn(x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"RNNInput(site={self.site.name})"
