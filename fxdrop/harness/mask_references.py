"""Dense mask references: every ``nn.Dropout`` of a model replaced by a mask with chosen statistics.

They answer *which statistics of a mask train* (the stability study of README), with no fxdrop kernel
involved: the model runs dense and multiplies each dropout's input by a mask drawn each forward.
A reference is written ``ref/<kind>/<classes>``:

``kind``
    ``subset``: each class keeps a uniformly random subset of ``k = round(n (1 - p))`` units, times ``n / k``.
    ``window``: each class keeps ``k`` cyclically contiguous units from a uniformly random start, times ``n / k``.
    ``block``: each class draws fxdrop's pattern ``(dp, offset)`` independently from the searched ``P(dp)``
    and keeps that block of the balanced partition, times ``dp`` (fxdrop's ``block`` family and scale).
    ``rot``: ``block`` after a uniformly random cyclic rotation of the units, drawn per mask (a window
    of ``n / dp`` units with a random start: the partition's boundaries move every step).
    ``perm<g>``: ``block`` over a uniformly random permutation of the ``ceil(n / g)`` chunks of ``g``
    contiguous units, drawn per mask (``perm1``: a random subset of ``n / dp`` units, so ``block``'s
    distribution of ``dp`` without its fixed partition).
    ``shuffled``: ``block`` over one uniformly random permutation of the units per forward, shared by every
    class (each class its own ``(dp, offset)``): what a kernel gets that permutes each weight once per step
    and then runs ``block`` on contiguous views.
    ``shuffled<K>``: the same with the permutation drawn again only every ``K`` training forwards of the
    site (``shuffled1`` is ``shuffled``): what permuting the hidden units of the weights (and their optimizer
    state) in place every ``K`` steps gives, a reparametrisation that leaves the function unchanged.
``classes``
    ``row`` (every row its own mask, as Bernoulli dropout) or an int ``M``: row ``r`` uses class ``r mod M``,
    one mask shared by ``batch / M`` rows (fxdrop's row classes; ``1``: one mask per forward). ``M``
    followed by ``r`` (``8r``): the same ``M`` masks, but each forward a fresh random permutation of the
    rows decides which rows share each, independently at every site, so rows that share a mask at one
    site do not share one at the next (with ``8`` the rows of class ``c`` share every site's mask ``c``:
    their whole path through the network).

Masks come from the module's own generator (seeded), never the global RNG. Imports torch, fxdrop.search,
fxdrop.patterns (the block's index math), the harness's masking (which applies a row-class mask) and the
training runs' name parsing (:func:`.training_runs.counted`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..patterns import kept_slice
from .masking import apply_mask
from .training_runs import counted

KINDS = ("subset", "window", "block", "rot", "shuffled", "shuffled<K>", "perm<g>")


def _check_kind(kind: str) -> str:
    if kind in KINDS[:5] or counted(kind, "perm") or counted(kind, "shuffled"):
        return kind
    raise ValueError(f"unknown mask kind {kind!r}; expected one of {', '.join(KINDS)} (g, K ints >= 1)")


def parse_reference(variant: str) -> tuple[str, int | None, bool] | None:
    """``ref/<kind>/<classes>`` -> ``(kind, classes, random_rows)`` (None classes: one mask per row;
    ``random_rows``: classes written ``<M>r``); None if not a reference."""
    parts = variant.split("/")
    if parts[0] != "ref":
        return None
    if len(parts) != 3:
        raise ValueError(f"mask reference {variant!r}: expected ref/<kind>/<classes> with kind one of "
                         f"{', '.join(KINDS)} and classes 'row', an int >= 1 or an int followed by r")
    try:
        _check_kind(parts[1])
    except ValueError as error:
        raise ValueError(f"mask reference {variant!r}: {error}") from None
    if parts[2] == "row":
        return parts[1], None, False
    random_rows = parts[2].endswith("r")
    count = parts[2][:-1] if random_rows else parts[2]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"mask reference {variant!r}: classes must be 'row', an int >= 1 or an int followed by r "
                         f"(rows assigned to the classes at random each forward), got {parts[2]!r}")
    return parts[1], int(count), random_rows


class ReferenceMask(nn.Module):
    """What replaces one ``nn.Dropout(p)``: identity in eval, a ``(kind, classes)`` mask in training
    (``random_rows``: a fresh random assignment of the rows to the classes each forward)."""

    def __init__(self, p: float, kind: str, classes: int | None, generator: torch.Generator,
                 random_rows: bool = False):
        super().__init__()
        self.p, self.kind, self.classes, self.generator = float(p), _check_kind(kind), classes, generator
        self.random_rows = random_rows and classes is not None
        self.every = 1 if kind == "shuffled" else counted(kind, "shuffled")  # None: no permutation
        self.order, self.forwards = None, 0
        if kind not in ("subset", "window"):
            from ..search import search_distribution

            self.probs = search_distribution(self.p, "auto").probs

    def mask(self, rows: int, n: int) -> torch.Tensor:
        """``(M, n)``: one mask per class (``M = rows`` for per-row masks)."""
        count = rows if self.classes is None else self.classes
        g, masks = self.generator, torch.zeros(count, n)
        k = max(1, round(n * (1.0 - self.p)))
        if self.every is not None and (self.forwards % self.every == 0 or self.order is None
                                       or len(self.order) != n):
            self.order = torch.randperm(n, generator=g)
        self.forwards += 1
        for c in range(count):
            if self.kind == "subset":
                masks[c, torch.randperm(n, generator=g)[:k]] = n / k
            elif self.kind == "window":
                start = int(torch.randint(n, (), generator=g))
                masks[c, (torch.arange(k) + start) % n] = n / k
            else:
                dp = int(torch.multinomial(self.probs, 1, generator=g)) + 1
                offset = int(torch.randint(dp, (), generator=g))
                block = kept_slice("block", n, dp, offset)  # fxdrop's block of the balanced partition
                if self.kind == "block":
                    masks[c, block] = dp
                elif self.every is not None:
                    masks[c, self.order[block]] = dp
                elif self.kind == "rot":
                    start = int(torch.randint(n, (), generator=g))
                    masks[c, (torch.arange(block.start, block.stop) + start) % n] = dp
                else:  # perm<g>: block `offset` of a random order of the chunks
                    size = counted(self.kind, "perm")
                    chunks = -(-n // size)
                    order = torch.randperm(chunks, generator=g)[kept_slice("block", chunks, dp, offset)]
                    units = (order.unsqueeze(1) * size + torch.arange(size)).flatten()
                    masks[c, units[units < n]] = dp
        return masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        n = x.shape[-1]
        rows = x.numel() // n if n else 0
        masks = self.mask(rows, n)
        if self.random_rows:  # row r uses mask assignment[r]: each class keeps its share of the rows
            masks = masks[torch.randperm(rows, generator=self.generator) % masks.shape[0]]
        return apply_mask(x, masks)  # row r uses mask r mod M


def with_reference_masks(model: nn.Module, kind: str, classes: int | None, random_rows: bool, seed: int) -> nn.Module:
    """``model`` itself with every ``nn.Dropout`` replaced by a :class:`ReferenceMask` of its rate (one
    generator, seeded with ``seed``, for all of them)."""
    generator = torch.Generator().manual_seed(seed)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(parent, name, ReferenceMask(child.p, kind, classes, generator, random_rows))
    return model
