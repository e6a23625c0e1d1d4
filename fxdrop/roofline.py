"""A roofline model of a training step: what the audit predicts when memory traffic and the optimizer count too.

Every op of one training step (forward, loss, backward) is recorded by a dispatch mode with its FLOPs
(``torch.utils.flop_counter``'s formulas, plus the GEMMs inside fused RNN layers, which it has no formula
for) and the bytes of the tensors it reads and writes; its time is ``max(FLOPs / gemm_flops, bytes /
bandwidth)`` with this machine's measured large-GEMM FLOP/s and copy bandwidth (:func:`measure_machine`,
once per process and thread count). Random-number ops (standard dropout's ``bernoulli_``) are costed at
their measured time per element instead when that is slower than their bytes: on a CPU, drawing a
256 x 4096 mask costs tens of times an elementwise multiply of the same tensor. fxdrop's own ops are
costed from their layout at the sites' expected keep fractions (``1 - p`` per structured side; a
structured RNN layer runs on its drawn pattern's kept columns, so the audit averages several converted
steps): compact GEMMs and activations (each row class reads its own kept weight block), and the dense
weight-gradient writes. The optimizer step adds its parameter count times the optimizer's measured
cost per element (one step of PyTorch's default implementation on a 64 MiB parameter: CPU AdamW's
temporaries make it several times slower than its bytes at copy bandwidth). The model ignores what it
cannot see (per-op overheads, small-GEMM inefficiency, page faults of fresh gradient buffers, cache
effects), so it is an estimate to compare with measured training runs, not a measurement. A per-shape
GEMM rate and a fresh-page term were tried and fitted the measured MLP runs worse (README's speed section
says how far the model is off). Imports torch and the layout.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from .layout import ChainLayout

OPTIMIZERS = (None, "sgd", "momentum", "adamw")


def check_optimizer(name: str | None, where: str) -> str | None:
    """``name`` if it is one of :data:`OPTIMIZERS` (None: no optimizer step), else a ValueError naming it."""
    if name not in OPTIMIZERS:
        raise ValueError(f"{where}: optimizer={name!r}; expected one of sgd, momentum, adamw or None")
    return name


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """What an optimizer name means everywhere (the training runs, the quality runs, the roofline's measured
    cost): ``sgd`` plain SGD, ``momentum`` SGD with momentum 0.9, ``adamw`` AdamW; PyTorch's defaults otherwise."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected one of sgd, momentum, adamw")


@dataclass(frozen=True)
class Machine:
    gemm_flops: float  # FLOP/s of a large square fp32 GEMM
    bandwidth: float  # bytes/s of a large copy (read + write)
    threads: int

    def to_dict(self) -> dict[str, Any]:
        return {"gemm_gflops": self.gemm_flops / 1e9, "bandwidth_gb_s": self.bandwidth / 1e9, "threads": self.threads}


def _best(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.lru_cache(maxsize=None)
def _measure(threads: int) -> Machine:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm = 2.0 * 2048**3 / _best(lambda: torch.mm(a, b))
    src = torch.randn(32 << 20)  # 128 MiB
    dst = torch.empty_like(src)
    bandwidth = 2.0 * src.numel() * 4 / _best(lambda: dst.copy_(src))
    return Machine(gemm, bandwidth, threads)


def measure_machine() -> Machine:
    """This machine's large-GEMM FLOP/s and copy bandwidth at the current thread count (measured once)."""
    return _measure(torch.get_num_threads())


@dataclass
class StepCost:
    """The roofline time of one step, and its parts (seconds)."""

    compute: float = 0.0  # ops bound by FLOPs
    memory: float = 0.0  # ops bound by bytes
    random: float = 0.0  # random-number ops bound by their measured time per element
    optimizer: float = 0.0
    flops: float = 0.0
    bytes: float = 0.0
    ops: int = 0

    @property
    def seconds(self) -> float:
        return self.compute + self.memory + self.random + self.optimizer

    def add(self, flops: float, nbytes: float, machine: Machine, random_s: float = 0.0) -> None:
        t_compute, t_memory = flops / machine.gemm_flops, nbytes / machine.bandwidth
        if random_s > max(t_compute, t_memory):
            self.random += random_s
        elif t_compute >= t_memory:
            self.compute += t_compute
        else:
            self.memory += t_memory
        self.flops += flops
        self.bytes += nbytes
        self.ops += 1

    def scale(self, factor: float) -> None:
        """Every accumulated part times ``factor`` (the mean of several costed steps)."""
        for name in ("compute", "memory", "random", "optimizer", "flops", "bytes"):
            setattr(self, name, getattr(self, name) * factor)
        self.ops = round(self.ops * factor)

    def to_dict(self) -> dict[str, float]:
        return {"seconds": self.seconds, "compute_s": self.compute, "memory_s": self.memory,
                "random_s": self.random, "optimizer_s": self.optimizer, "flops": self.flops, "bytes": self.bytes,
                "ops": self.ops}


def _nbytes(values) -> float:
    flat, _ = tree_flatten(values)
    seen, total = set(), 0.0
    for t in flat:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def _rnn_flops(name: str, args) -> float:
    """The GEMM FLOPs of a fused RNN layer op (CPU ``mkldnn_rnn_layer``, CUDA ``_cudnn_rnn``, and their
    backwards), which ``flop_registry`` has no formula for: per row, ``2 * gates_hidden * (input +
    hidden)`` forward, twice that backward (the input and the weight gradients)."""
    x = args[0]
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if name.startswith("mkldnn_rnn_layer"):
        pairs = [(args[1], args[2])]  # (w_ih, w_hh) of the one layer
    else:
        weights, stride = list(args[1]), int(args[2])
        pairs = [(weights[i], weights[i + 1]) for i in range(0, len(weights), stride)]
    forward = sum(2.0 * rows * w_ih.shape[0] * (w_ih.shape[1] + w_hh.shape[1]) for w_ih, w_hh in pairs)
    return 2.0 * forward if name.endswith("_backward") else forward


_RNN = {"mkldnn_rnn_layer", "mkldnn_rnn_layer_backward", "_cudnn_rnn", "_cudnn_rnn_backward"}
_RANDOM = {"bernoulli", "bernoulli_", "native_dropout"}  # dropout's mask draws


_SKIP = {"detach", "view", "_unsafe_view", "reshape", "t", "transpose", "permute", "expand", "slice", "select",
         "unsqueeze", "squeeze", "as_strided", "alias", "split", "chunk", "unbind", "empty", "empty_like",
         "new_empty", "sample_pattern", "sample_classes", "_to_copy_meta"}


class CostMode(TorchDispatchMode):
    """Adds every dispatched op's roofline time to a :class:`StepCost`; fxdrop's ops by their layout."""

    def __init__(self, machine: Machine):
        super().__init__()
        self.machine = machine
        self.cost = StepCost()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        if func.namespace == "fxdrop":
            self._fxdrop(name, args, out)
            return out
        if name in _SKIP or name.endswith("_view"):
            return out
        if name in _RNN:
            flops = _rnn_flops(name, args)
        else:
            formula = flop_registry.get(func._overloadpacket)
            # The registry's formulas take the op's own arguments and output (FlopCounterMode's convention).
            flops = float(formula(*args, **kwargs, out_val=out)) if formula is not None else 0.0
        random_s = 0.0
        if name in _RANDOM and isinstance(args[0], torch.Tensor):
            random_s = args[0].numel() * _random_rate(args[0].device.type, self.machine.threads)
        self.cost.add(flops, _nbytes(args) + _nbytes(out), self.machine, random_s)
        return out

    def _fxdrop(self, name: str, args, out) -> None:
        if name in ("chain", "chain_backward"):
            backward = name == "chain_backward"
            x, weights = args[1 if backward else 0], args[2 if backward else 1]
            flags = (args[9], args[10]) if backward else (args[7], args[8])
            rates = list(args[12] if backward else args[10])
            layout = ChainLayout(len(weights), bool(flags[0]), bool(flags[1]))
            patterns = args[5 if backward else 4]
            classes = patterns.shape[0] if patterns.dim() == 3 else 1
            rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
            for layer, weight in enumerate(weights):
                in_site, out_site = layout.in_site(layer), layout.out_site(layer)
                keep_in = 1.0 - rates[in_site] if in_site is not None else 1.0
                keep_out = 1.0 - rates[out_site] if out_site is not None else 1.0
                out_f, in_f = weight.shape
                in_k, out_k = max(round(in_f * keep_in), 1), max(round(out_f * keep_out), 1)
                size = weight.element_size()
                gemm = 2.0 * rows * in_k * out_k
                block = classes * in_k * out_k * size  # each row class reads its own kept block
                activations = rows * (in_k + out_k * (2 if out_site is not None else 1)) * size
                if backward:  # input- and weight-gradient GEMMs; the dense weight gradient is written whole
                    if layer > 0 or args[13]:  # the first layer's input gradient only when the input needs one
                        self.cost.add(gemm, block + activations, self.machine)
                    self.cost.add(gemm, block + activations + weight.numel() * size, self.machine)
                else:
                    self.cost.add(gemm, block + activations, self.machine)
            return
        self.cost.add(0.0, _nbytes(args) + _nbytes(out), self.machine)


@functools.lru_cache(maxsize=None)
def _optimizer_rate(optimizer: str, threads: int) -> float:
    """Seconds per parameter element of one ``optimizer`` step, measured on a 64 MiB fp32 parameter (the
    size of a large layer's weight: the step's temporaries are as big, and are allocated as they are in a
    training run)."""
    param = torch.nn.Parameter(torch.randn(16 << 20))
    param.grad = torch.randn_like(param)
    step = make_optimizer(optimizer, [param], 1e-3)
    step.step()  # the first step makes the state; _best warms up once more, then takes the best of 3
    return _best(step.step) / param.numel()


@functools.lru_cache(maxsize=None)
def _random_rate(device: str, threads: int) -> float:
    """Seconds per element of ``bernoulli_`` (what standard dropout draws its mask with), measured on a
    256 x 4096 fp32 tensor on the CPU; 0 elsewhere (a GPU draws it at memory speed)."""
    if device != "cpu":
        return 0.0
    noise = torch.empty(256, 4096)
    return _best(lambda: noise.bernoulli_(0.5)) / noise.numel()


def optimizer_seconds(params, optimizer: str | None, machine: Machine) -> float:
    """The optimizer step's time: parameter elements times this machine's measured per-element cost of
    ``optimizer`` (PyTorch's default implementation at the current thread count)."""
    if check_optimizer(optimizer, "fxdrop.roofline") is None:
        return 0.0
    elements = sum(p.numel() for p in params if p.requires_grad)
    return elements * _optimizer_rate(optimizer, machine.threads)


__all__ = ["CostMode", "Machine", "OPTIMIZERS", "StepCost", "check_optimizer", "make_optimizer", "measure_machine",
           "optimizer_seconds"]
