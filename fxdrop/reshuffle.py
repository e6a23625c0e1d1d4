"""Reshuffling the hidden units of chain sites: the model's function unchanged, new neighbours for the patterns.

fxdrop's patterns keep contiguous blocks of a site's units (that is what lets the GEMMs shrink to views), so
units next to each other are kept or dropped together at every step, where Bernoulli dropout separates every
pair now and then. The hidden units of a site *between two Linears of a chain* can be put in any order
without changing the function: permute the rows of the Linear that writes them (and its bias), the columns
of the Linear that reads them, and the optimizer's state of those weights alike. :func:`reshuffle` does that
every ``every`` optimizer steps with a fresh random permutation per site, so the contiguous patterns keep
different units together over training, at the price of one permuted copy of those weights and their
optimizer state every ``every`` steps (not every step, which is what a shuffled kernel would pay).

What it touches, and what it refuses:

- Only interior chain sites (``Linear -> activation -> Dropout -> Linear`` as fxdrop planned it, parameter-free
  activations): the only places where fxdrop knows every reader and writer of the units. Input and output
  sites of a chain, tile and unit sites and RNN sites are left alone; :attr:`Reshuffler.skipped` says why.
- A weight that is not a plain Parameter of its module (parametrised, computed), or a Parameter that the model
  holds more than once (tied), keeps its site out.
- The optimizer must be one of PyTorch's elementwise ones (:data:`ELEMENTWISE`), whose state for a parameter
  is tensors of its shape (momentum, Adam's moments) and scalars (the step): those are permuted with it.
  Anything else is refused by name, since a factored or preconditioned state cannot be permuted this way.
- When: right after every ``every``-th optimizer step (a step post-hook), when the backward that used the old
  order is done and no forward has saved the weights for the next one. Gradients present then (``.grad``)
  move with their weights, so a loop that reads or accumulates them stays right; that is a third of the
  work with SGD momentum, spent even when the loop's next ``zero_grad`` would drop them.

The model's ``state_dict`` then holds the units in their current order: loading it into the original model
gives the same function. Copies of the weights made outside the optimizer (an EMA or SWA model, a teacher)
do not follow and must not be averaged with a reshuffled model. Every rank of a data-parallel run draws the
same permutations when given the same ``seed`` and stepped in lockstep, as DDP does.

Imports torch and the converted model's regions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from .config import FxdropError

ELEMENTWISE = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad,
               torch.optim.Adamax, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta, torch.optim.Rprop,
               torch.optim.ASGD)


@dataclasses.dataclass
class UnitAxis:
    """The hidden units of one site: each ``(name, parameter, dim)`` holds them along ``dim``."""

    site: str
    units: int
    members: list[tuple[str, nn.Parameter, int]]

    def describe(self) -> str:
        return f"{self.site}: {self.units} units in " + ", ".join(f"{n}[dim {d}]" for n, _, d in self.members)


def _site_axis(region, chain, index: int, names: dict[int, str], owners: dict[int, int]) -> UnitAxis | str:
    """Site ``index`` of ``chain`` (planned in ``region``) as a unit axis, or why it cannot be reordered."""
    from .passes.trace import get_path

    site, layout = chain.sites[index], chain.layout
    writer, reader = layout.writer(index), layout.reader(index)
    if writer is None or reader is None:
        return "an input or output site of its chain: fxdrop does not see every reader and writer of its units"
    write, read = chain.linears[writer], chain.linears[reader]
    wanted = [(write.weight, 1 if write.transposed else 0), (write.bias, 0),
              (read.weight, 0 if read.transposed else 1)]
    members = []
    for path, dim in wanted:
        if path is None:
            continue
        value = get_path(region.module, path) if isinstance(path, str) else None
        if not isinstance(value, nn.Parameter) or id(value) not in names:
            return f"{path if isinstance(path, str) else 'a weight'} is not a plain Parameter"
        if owners[id(value)] > 1:
            return f"{names[id(value)]} is tied (the model holds it {owners[id(value)]} times)"
        members.append((names[id(value)], value, dim))
    units = {parameter.shape[dim] for _, parameter, dim in members}
    if len(units) != 1:
        return f"its weights disagree on the unit count {sorted(units)}"
    return UnitAxis(site.name, units.pop(), members)


def _unit_axes(model: nn.Module) -> tuple[list[UnitAxis], dict[str, str]]:
    """The interior chain sites of a converted ``model`` that can be permuted, and why the others cannot."""
    from .convert import regions

    owners: dict[int, int] = {}
    for _, parameter in model.named_parameters(remove_duplicate=False):
        owners[id(parameter)] = owners.get(id(parameter), 0) + 1
    names = {id(p): n for n, p in model.named_parameters()}
    axes: dict[str, UnitAxis] = {}
    skipped: dict[str, str] = {}
    chains = [(region, chain) for region in regions(model) for program in region.programs.values()
              if not isinstance(program, str) for chain in program.plan.chains]
    for region, chain in chains:
        for index, site in enumerate(chain.sites):
            found = _site_axis(region, chain, index, names, owners)
            if isinstance(found, str):
                skipped.setdefault(site.name, found)
            else:
                axes.setdefault(site.name, found)
    claims: dict[tuple[int, int], list[str]] = {}
    for axis in axes.values():
        for _, parameter, dim in axis.members:
            claims.setdefault((id(parameter), dim), []).append(axis.site)
    for sites in (c for c in claims.values() if len(c) > 1):  # two programs planned the same weight apart
        for name in sites:
            if axes.pop(name, None) is not None:
                skipped[name] = f"its units are also the units of site(s) {', '.join(n for n in sites if n != name)}"
    for record in (s for region in regions(model) for s in region.records if s.converted):
        if record.name not in axes:
            skipped.setdefault(record.name, f"a {record.plan} site: only sites between two Linears of a chain "
                                            "can be reordered")
    return list(axes.values()), {k: v for k, v in skipped.items() if k not in axes}


class Reshuffler:
    """Installed by :func:`reshuffle`: permutes the unit axes after every ``every``-th optimizer step."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, every: int, seed: int):
        self.model, self.optimizer, self.every = model, optimizer, every
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.shuffles = 0
        self._buffers: dict[tuple, torch.Tensor] = {}
        from .convert import regions

        if not regions(model):
            raise FxdropError(f"fxdrop.reshuffle: this {type(model).__name__} holds no region fxdrop.convert "
                              "installed; pass the model fxdrop.convert returned (graphs of the torch.compile "
                              "backend cannot be reordered)")
        self.axes, self.skipped = _unit_axes(model)
        if not self.axes:
            why = "; ".join(f"{k}: {v}" for k, v in self.skipped.items()) or "it has no converted sites"
            raise FxdropError(f"fxdrop.reshuffle: no site of this model can be reordered ({why})")
        self._handle = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        # right after the step: the backward that used the old order is done, and no forward has yet saved
        # weights for a backward (reordering then would break it); the gradients present move too
        self.steps += 1
        if self.steps % self.every == 0:
            self.shuffle()

    def _tensors(self, name: str, parameter: nn.Parameter) -> list[torch.Tensor]:
        """The parameter, its gradient and its optimizer state: everything that holds its units in order."""
        tensors = [parameter] + ([parameter.grad] if parameter.grad is not None else [])
        for key, value in self.optimizer.state.get(parameter, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                if value.shape != parameter.shape:
                    raise FxdropError(f"fxdrop.reshuffle: the optimizer's state {key!r} of {name} has shape "
                                      f"{tuple(value.shape)}, not the parameter's {tuple(parameter.shape)}: it "
                                      "cannot be reordered with it")
                tensors.append(value)
        return tensors

    def _scratch(self, tensor: torch.Tensor) -> torch.Tensor:
        """A contiguous buffer of ``tensor``'s shape: a view of one flat buffer per dtype and device, kept
        between calls (as large as the largest tensor moved). A fresh buffer per call would be a fresh mmap
        for any weight above glibc's mmap threshold, and its page faults cost more than the gathers."""
        key = (tensor.dtype, tensor.device)
        flat = self._buffers.get(key)
        if flat is None or flat.numel() < tensor.numel():
            flat = self._buffers[key] = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
        return flat[:tensor.numel()].view(tensor.shape)

    @torch.no_grad()
    def shuffle(self) -> None:
        """Draw a new order for every unit axis and apply it now (checked in full before anything moves).

        Each tensor moves in place through the scratch buffer; a weight whose rows and columns both move takes
        two gathers and no copy (rows into the scratch, columns back into the weight)."""
        moves: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        for axis in self.axes:
            order = torch.randperm(axis.units, generator=self.generator)
            for name, parameter, dim in axis.members:
                index = order.to(parameter.device)
                for tensor in self._tensors(name, parameter):
                    moves.setdefault(id(tensor), (tensor, {}))[1][dim] = index
        for tensor, by_dim in moves.values():
            if not tensor.is_contiguous():  # out= would not keep its strides: gather, then copy back
                for dim, index in by_dim.items():
                    tensor.copy_(tensor.index_select(dim, index))
                continue
            buffer = self._scratch(tensor)
            (first, index), *rest = sorted(by_dim.items())
            torch.index_select(tensor, first, index, out=buffer)
            if rest:
                torch.index_select(buffer, rest[0][0], rest[0][1], out=tensor)
            else:
                tensor.copy_(buffer)
        self.shuffles += 1

    def remove(self) -> None:
        """Stop reshuffling (and free the scratch buffer)."""
        self._handle.remove()
        self._buffers.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "shuffles": self.shuffles, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps, self.shuffles = int(state["steps"]), int(state["shuffles"])
        self.generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (f"Reshuffler(every={self.every}, steps={self.steps}, shuffles={self.shuffles}, "
                f"sites=[{', '.join(a.site for a in self.axes)}])")


def reshuffle(model: nn.Module, optimizer: torch.optim.Optimizer, *, every: int = 16, seed: int = 0) -> Reshuffler:
    """Reorder the hidden units of ``model``'s interior chain sites every ``every`` steps of ``optimizer``.

    ``model`` is what :func:`fxdrop.convert` returned (or a module holding it, e.g. DDP's ``.module``);
    ``optimizer`` one of :data:`ELEMENTWISE` over its parameters. Returns the :class:`Reshuffler` (its
    ``remove()`` stops it; its ``state_dict()`` resumes it). Raises :class:`FxdropError` when no site can
    be reordered, naming each site's reason. See the module docstring for what it touches.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxdrop.reshuffle expects the converted nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"fxdrop.reshuffle expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if type(optimizer) not in ELEMENTWISE:
        raise FxdropError(f"fxdrop.reshuffle: {type(optimizer).__name__} is not one of the optimizers whose state is "
                          f"elementwise ({', '.join(o.__name__ for o in ELEMENTWISE)}); its state could not be "
                          "reordered with the weights")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"fxdrop.reshuffle: every must be an int >= 1 (optimizer steps), got {every!r}")
    return Reshuffler(model, optimizer, every, seed)


__all__ = ["ELEMENTWISE", "Reshuffler", "UnitAxis", "reshuffle"]
