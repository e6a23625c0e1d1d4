"""Converted models under ``torch.distributed``: pattern seeding per rank, checkpoints, a DDP comm hook, FSDP2.

Patterns are **independent per rank by default**: after :func:`prepare`, site ``s`` on rank ``r`` draws
from ``derive_seed(base_s, r)``, so every rank drops different units, like ordinary dropout under DDP.
``prepare(model, sync=True)`` **shares** them instead: every rank draws from ``base_s`` and sees the
identical pattern at every step. ``base_s`` is agreed on rank 0 (the seed ``fxdrop.convert(seed=seed)``
gives the site of that name, or rank 0's current site seeds when ``seed`` is None), so no rank depends
on its own global RNG.

With shared patterns, the weight gradient of every structured Linear is zero outside the kept rows and
columns on every rank, so :func:`register_comm_hook` can all-reduce only the kept block of each
(``StructuredAllReduce``). Scheduler state (not part of the model's ``state_dict``) is gathered from every
rank by :func:`state_dict` and restored by :func:`load_state_dict`, so a resumed run draws the patterns
it would have drawn. :func:`fully_shard` is FSDP2 for converted models (the whole model as one unit).

Which block of a weight a chain's step uses is :class:`fxdrop.layout.ChainLayout`'s (``weight_support``).
Imports torch, torch.distributed and fxdrop's config, convert, layout, modules and scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .config import DropoutConfig
from .convert import conversion
from .convert import load_state_dict as _load_site_states
from .convert import regions as _regions
from .convert import sites as _sites
from .convert import state_dict as _site_states
from .modules.structured import StructuredChain, TileLinear, UnitDropout
from .scheduler import derive_seed

SHARING_ATTR = "_fxdrop_pattern_sharing"
STATE_FORMAT = "fxdrop.distributed/1"

__all__ = ["PatternSharing", "prepare", "sharing", "state_dict", "load_state_dict", "register_comm_hook",
           "StructuredAllReduce", "fully_shard", "check_fully_shard"]


# ---------------------------------------------------------------- seeding

@dataclass(frozen=True)
class PatternSharing:
    """How :func:`prepare` seeded a model's sites: ``sync`` (shared) or independent per rank."""

    sync: bool
    rank: int
    world_size: int
    base_seeds: tuple[int, ...]


def _rank_world(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_gather(obj: Any, group: Any) -> list[Any]:
    """Every rank's ``obj`` (a one-element list when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def _converted_sites(model: nn.Module, where: str):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} expects the converted nn.Module (not a DDP/FSDP wrapper's output), "
                        f"got {type(model).__name__}")
    found = _sites(model)
    if not found:
        raise ValueError(f"{where}: {type(model).__name__} has no converted dropout sites; pass the model "
                         "returned by fxdrop.convert(...) (for DDP, the module inside: ddp.module)")
    return found


def prepare(model: nn.Module, *, sync: bool = False, seed: int | None = None, group: Any = None) -> nn.Module:
    """Seed a converted model's sites for this rank; call it on every rank, before wrapping in DDP.

    ``sync=False`` (default): **independent** patterns, site ``s`` of rank ``r`` draws from
    ``derive_seed(base_s, r)``. ``sync=True``: **shared** patterns, every rank draws from ``base_s`` and
    so drops the same units at every step (required by :func:`register_comm_hook`). ``base_s`` is the
    seed ``fxdrop.convert(model, seed=seed)`` gives site ``s`` (by its name), or rank 0's current seed of
    the site when ``seed`` is None. Draw counters are taken from rank 0, so every rank starts at the
    same step. A collective (``all_gather_object``) on ``group``; every rank must pass the same ``sync``
    and ``seed`` and hold the same sites, else every rank raises ``ValueError``. Without an initialised
    process group it seeds as rank 0 of 1. Returns ``model`` (modified in place).
    """
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be True or False, got {sync!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    found = _converted_sites(model, "fxdrop.distributed.prepare")
    rank, world = _rank_world(group)
    mine = {"names": [s.name for s in found], "sync": sync, "seed": seed,
            "states": [s.scheduler.state.clone() for s in found]}
    every = _all_gather(mine, group)
    first = every[0]
    for other_rank, other in enumerate(every):
        for key in ("names", "sync", "seed"):
            if other[key] != first[key]:
                raise ValueError(f"fxdrop.distributed.prepare: rank {other_rank} has {key}={other[key]!r} but "
                                 f"rank 0 has {key}={first[key]!r}; every rank must convert the same model and "
                                 "pass the same sync and seed")
    if seed is None:
        base = [int(state[0]) for state in first["states"]]
    else:
        seeds = DropoutConfig(seed=seed)
        base = [seeds.seed_for(site.name) for site in found]
    for site, base_seed, state in zip(found, base, first["states"]):
        site.scheduler.state.copy_(state)
        site.scheduler.state[0] = base_seed if sync else derive_seed(base_seed, rank)
    model.__dict__[SHARING_ATTR] = PatternSharing(sync, rank, world, tuple(base))
    return model


def sharing(model: nn.Module) -> PatternSharing | None:
    """How :func:`prepare` seeded ``model`` (None if it was not prepared)."""
    return model.__dict__.get(SHARING_ATTR)


# ---------------------------------------------------------------- checkpoints

def state_dict(model: nn.Module, group: Any = None) -> dict[str, Any]:
    """Every rank's scheduler states, gathered (a collective: call it on every rank; save it on rank 0).

    ``{"format", "world_size", "sync", "ranks": [fxdrop.state_dict(model) of rank 0, 1, ...]}``.
    """
    _converted_sites(model, "fxdrop.distributed.state_dict")
    info = sharing(model)
    _, world = _rank_world(group)
    return {"format": STATE_FORMAT, "world_size": world, "sync": None if info is None else info.sync,
            "ranks": _all_gather(_site_states(model), group)}


def load_state_dict(model: nn.Module, state: Mapping[str, Any], group: Any = None) -> None:
    """Restore this rank's scheduler states from :func:`state_dict`'s result (load it on every rank).

    Each rank continues its own stream exactly. Shared patterns (``sync``) resume on any number of ranks;
    independent ones need the world size they were saved with.
    """
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError("fxdrop.distributed.load_state_dict expects the dict that "
                         "fxdrop.distributed.state_dict returned (key 'format' = "
                         f"{STATE_FORMAT!r}); for a single-process checkpoint use fxdrop.load_state_dict")
    _converted_sites(model, "fxdrop.distributed.load_state_dict")
    rank, world = _rank_world(group)
    ranks = state["ranks"]
    if world != len(ranks):
        if not state.get("sync"):
            raise ValueError(f"fxdrop.distributed.load_state_dict: the checkpoint holds the independent pattern "
                             f"streams of {len(ranks)} ranks but this run has {world}; resume on {len(ranks)} "
                             "ranks (shared patterns, sync=True, resume on any number)")
        rank = 0  # shared: every rank saved the same streams
    info = sharing(model)
    if info is not None and state.get("sync") is not None and info.sync != state["sync"]:
        raise ValueError(f"fxdrop.distributed.load_state_dict: the checkpoint was saved with sync={state['sync']} "
                         f"but this model was prepared with sync={info.sync}; prepare it the way it was saved")
    _load_site_states(model, ranks[rank])
    if info is None and state.get("sync") is not None:  # resumed without prepare: remember the mode
        model.__dict__[SHARING_ATTR] = PatternSharing(bool(state["sync"]), _rank_world(group)[0], world, tuple(
            int(site_state["state"][0]) for site_state in ranks[0].values()))


# ---------------------------------------------------------------- DDP comm hook

@dataclass(frozen=True)
class _Support:
    """The kept block of a gradient: ``g[rows][:, cols]`` (None = every row / column)."""

    rows: slice | None
    cols: slice | None

    def code(self) -> list[int]:
        out = []
        for s in (self.rows, self.cols):
            out += [-1, -1, -1] if s is None else [s.start, s.stop, s.step]
        return out


_DENSE_CODE = [-2] * 6


_FXDROP_CALLABLES = (StructuredChain, TileLinear, UnitDropout)


def _programs(model: nn.Module):
    """``(region, program)`` for every program a region of ``model`` has built."""
    for region in _regions(model):
        for program in region.programs.values():
            if not isinstance(program, str):
                yield region, program


def _chain_only_parameters(model: nn.Module) -> set[int]:
    """Parameters whose only use in ``model``'s training step is as weight/bias argument of one chain call.

    Any other use (another node of a program, a module a program calls, a module outside every region,
    a second chain, or any use in the largest traced code around the region: ``Conversion.chain_only``)
    adds gradient outside the chain's kept block, so such parameters stay dense. Code that fx cannot
    trace around a region is not seen: a parameter such code also uses must not go to this hook.
    """
    chain_uses: dict[int, int] = {}
    other: set[int] = set()
    inside: set[int] = set()
    for region in _regions(model):
        inside.update(id(p) for p in region.module.parameters())
    other.update(id(p) for p in model.parameters() if id(p) not in inside)  # eager, outside every region
    for region, program in _programs(model):
        structured = program.self_._structured
        for node in program.graph.nodes:
            if node.op == "call_module" and node.target not in structured:
                called = region.module.get_submodule(node.target)
                other.update(id(p) for p in called.parameters())
            elif node.op == "get_attr":
                try:
                    value = region.module.get_parameter(node.target)
                except AttributeError:
                    continue
                users = list(node.users)
                if all(u.op == "call_module" and isinstance(structured.get(u.target), StructuredChain)
                       and node not in u.kwargs.values() and list(u.args).count(node) == 1 for u in users):
                    chain_uses[id(value)] = chain_uses.get(id(value), 0) + len(users)
                else:
                    other.add(id(value))
    report = conversion(model)
    traced = {id(p) for name, p in model.named_parameters() if report is not None and name in report.chain_only}
    return {pid for pid, uses in chain_uses.items() if uses == 1 and pid not in other and pid in traced}


def _chain_supports(chain: StructuredChain, args: Sequence[Any]) -> list[tuple[torch.Tensor, _Support | None]]:
    """Each weight/bias argument of a chain call with its gradient's kept block for this step's patterns
    (:meth:`fxdrop.layout.ChainLayout.weight_support`); None where the gradient is dense (a
    ``granularity="rows"`` chain: every row class keeps its own units; a transposed weight)."""
    params = list(args[1:])
    out: list[tuple[torch.Tensor, _Support | None]] = []
    granular = any(site.granularity == "rows" for site in chain.sites)
    patterns = None if granular else [tuple(site.last_pattern) if site.active and site.last_pattern else (1, 0)
                                      for site in chain.sites]
    i = 0
    for layer, has_bias in enumerate(chain.has_bias):
        weight = params[i]
        bias = params[i + 1] if has_bias else None
        i += 1 + int(has_bias)
        if patterns is None or chain.transposed[layer]:
            out += [(weight, None)] + ([(bias, None)] if bias is not None else [])
            continue
        rows, cols = chain.layout.weight_support(layer, tuple(weight.shape), chain.family, patterns)
        out.append((weight, _Support(rows, cols)))
        if bias is not None:
            out.append((bias, _Support(rows, None)))
    return out


@dataclass
class StructuredAllReduce:
    """State of the DDP comm hook that all-reduces only the kept block of each structured gradient.

    ``sent_elements`` / ``dense_elements``: gradient elements all-reduced so far, and what the plain
    all-reduce would have sent (``saving`` is one minus their ratio). With ``verify`` (default), the
    first bucket of each step all-reduces the step's kept-block layout (6 int64 per structured parameter,
    ``MAX``, blocking) and raises if ranks disagree, which happens only when patterns are not shared;
    without it, ranks that disagree send buffers of different sizes and gloo aborts the process.
    """

    group: Any
    verify: bool = True
    sent_elements: int = 0
    dense_elements: int = 0
    steps: int = 0
    _eligible: list[torch.Tensor] = field(default_factory=list)
    _eligible_ids: set[int] = field(default_factory=set)
    _pending: dict[int, _Support | None] = field(default_factory=dict)
    _checked: bool = False
    _handles: list[Any] = field(default_factory=list)

    @property
    def saving(self) -> float:
        return 0.0 if not self.dense_elements else 1.0 - self.sent_elements / self.dense_elements

    def track(self, model: nn.Module) -> None:
        """Find the parameters whose gradient is one chain's kept block (see ``_chain_only_parameters``)."""
        eligible = _chain_only_parameters(model)
        self._eligible = [p for p in model.parameters() if id(p) in eligible]
        self._eligible_ids = {id(p) for p in self._eligible}

    def record(self, chain: StructuredChain, args: tuple) -> None:
        """Observer of each StructuredChain call: remember this step's kept block of each parameter."""
        for tensor, support in _chain_supports(chain, args):
            if id(tensor) not in self._eligible_ids:
                continue
            # A second forward before the reduce (no_sync accumulation, a no_grad forward in training
            # mode) adds a different block to the gradient: that parameter goes dense this time.
            self._pending[id(tensor)] = None if id(tensor) in self._pending else support

    def _support(self, param: torch.Tensor) -> _Support | None:
        support = self._pending.pop(id(param), None)
        if support is None or (support.rows is None and support.cols is None):
            return None
        return support

    def _check_layout(self, group: Any) -> None:
        codes: list[int] = []
        for param in self._eligible:
            support = self._pending.get(id(param))
            codes += _DENSE_CODE if support is None else support.code()
        mine = torch.tensor(codes, dtype=torch.int64)
        agreed = torch.cat([mine, -mine])
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
        if not (torch.equal(agreed[: len(codes)], mine) and torch.equal(agreed[len(codes):], -mine)):
            self._pending.clear()
            raise RuntimeError(
                "fxdrop StructuredAllReduce: ranks kept different rows/columns this step, so their gradients "
                "are not zero at the same places; the hook needs shared patterns: call "
                "fxdrop.distributed.prepare(model, sync=True) on every rank (and restore checkpoints with "
                "fxdrop.distributed.load_state_dict)")

    def remove(self) -> None:
        """Stop observing the chains (the DDP comm hook itself cannot be unregistered)."""
        for chain in self._handles:
            if self.record in chain.observers:
                chain.observers.remove(self.record)
        self._handles.clear()


def _block(grad: torch.Tensor, support: _Support) -> torch.Tensor:
    view = grad if support.rows is None else grad[support.rows]
    return view if support.cols is None else view[:, support.cols]


def _structured_allreduce_hook(state: StructuredAllReduce, bucket: "dist.GradBucket") -> torch.futures.Future:
    group = state.group if state.group is not None else dist.group.WORLD
    if bucket.is_last():
        state.steps += 1
    if state.verify and not state._checked:
        # Blocking and before any data: differing layouts would mean differing buffer sizes below.
        state._checked = not bucket.is_last()
        state._check_layout(group)
    elif bucket.is_last():
        state._checked = False
    world = dist.get_world_size(group)
    buffer = bucket.buffer()
    views = []
    for param, grad in zip(bucket.parameters(), bucket.gradients()):
        support = state._support(param)
        views.append(grad if support is None else _block(grad, support))
    sizes = [v.numel() for v in views]
    send = buffer.new_empty(sum(sizes))
    offset = 0
    for view, size in zip(views, sizes):
        send[offset: offset + size].view(view.shape).copy_(view)
        offset += size
    send.div_(world)
    state.sent_elements += send.numel()
    state.dense_elements += buffer.numel()

    def unpack(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        at = 0
        for view, size in zip(views, sizes):
            view.copy_(reduced[at: at + size].view(view.shape))
            at += size
        return buffer

    return dist.all_reduce(send, group=group, async_op=True).get_future().then(unpack)


# DDP checks the hook's annotations at run time; postponed (string) annotations fail its check.
_structured_allreduce_hook.__annotations__.update({"bucket": dist.GradBucket,
                                                  "return": torch.futures.Future[torch.Tensor]})


def register_comm_hook(ddp: nn.parallel.DistributedDataParallel, *, group: Any = None,
                       verify: bool = True) -> StructuredAllReduce:
    """All-reduce only the kept rows/columns of structured weights (needs ``prepare(model, sync=True)``).

    Every other gradient (and every parameter outside a StructuredChain, or used by anything else too)
    is all-reduced whole, as DDP's default hook would; the result equals the default all-reduce. Returns
    the hook's state (``saving``, ``sent_elements``, ``dense_elements``).
    """
    if not isinstance(ddp, nn.parallel.DistributedDataParallel):
        raise TypeError(f"register_comm_hook expects a DistributedDataParallel, got {type(ddp).__name__}")
    model = ddp.module
    _converted_sites(model, "fxdrop.distributed.register_comm_hook")
    info = sharing(model)
    if info is None or not info.sync:
        raise ValueError("fxdrop.distributed.register_comm_hook needs patterns shared across ranks: call "
                         "fxdrop.distributed.prepare(model, sync=True) on every rank before wrapping the model "
                         "in DDP (with independent patterns, ranks keep different rows and the kept blocks "
                         "do not line up)")
    state = StructuredAllReduce(group=group, verify=verify)
    state.track(model)
    for chain in chains(model):
        chain.observers.append(state.record)
        state._handles.append(chain)
    ddp.register_comm_hook(state, _structured_allreduce_hook)
    return state


def chains(model: nn.Module) -> list[StructuredChain]:
    """Every StructuredChain in the programs ``model``'s regions have built."""
    return [c for _, program in _programs(model) for c in program.self_._structured.values()
            if isinstance(c, StructuredChain)]


# ---------------------------------------------------------------- FSDP2

def _bypassed_owners(model: nn.Module) -> dict[str, list[str]]:
    """Submodules whose parameters a region's program reads directly (fused into a structured op)."""
    read: dict[int, str] = {}
    names = {id(m): name for name, m in model.named_modules()}
    for region, program in _programs(model):
        prefix = names.get(id(region.module), "")
        for node in program.graph.nodes:
            if node.op == "get_attr":
                try:
                    value = region.module.get_parameter(node.target)
                except AttributeError:
                    continue
                read[id(value)] = f"{prefix}.{node.target}" if prefix else node.target
    bypassed: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or installed_region(module):
            continue
        found = [read[id(p)] for p in module.parameters() if id(p) in read]
        if found:
            bypassed[name] = found
    return bypassed


def installed_region(module: nn.Module) -> bool:
    from .modules.region import RegionForward

    return any(isinstance(v, RegionForward) for v in vars(module).values())


def fully_shard(model: nn.Module, **kwargs: Any) -> nn.Module:
    """FSDP2 for a converted model: ``torch.distributed.fsdp.fully_shard(model, **kwargs)``, checked.

    A converted region's program reads the fused Linears' weights directly and never calls those Linear
    modules in training, so FSDP2's per-module hooks on them would never all-gather their shards. Shard
    the converted model (or a region module) as one unit; a model where a bypassed submodule was already
    passed to ``fully_shard`` raises ``ValueError`` naming it. Convert first, shard second:
    ``fxdrop.convert`` of a model that already went through ``fully_shard`` fails while cloning it.
    Patterns may be independent (default) or shared, as under DDP; gradients are reduce-scattered whole.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard as _fully_shard

    _converted_sites(model, "fxdrop.distributed.fully_shard")
    check_fully_shard(model)
    if isinstance(model, FSDPModule):
        return model
    return _fully_shard(model, **kwargs)


def check_fully_shard(model: nn.Module) -> None:
    """Raise ``ValueError`` if ``fully_shard`` was applied to a submodule the converted graph bypasses."""
    from torch.distributed.fsdp import FSDPModule

    for name, params in _bypassed_owners(model).items():
        module = model.get_submodule(name)
        if isinstance(module, FSDPModule):
            raise ValueError(
                f"fully_shard({name}) cannot work on a converted model: a converted region reads "
                f"{', '.join(params)} directly and never calls {name} in training, so FSDP2 never all-gathers those "
                "shards (the chain op then fails with 'mixed torch.Tensor and DTensor'). Apply fully_shard "
                "to the converted model as a whole: fxdrop.distributed.fully_shard(model)")
