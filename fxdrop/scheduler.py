"""PatternScheduler: a site's random stream of patterns ``Pattern(dp, offset)`` (or row-class plans).

The stream is counter based: draw number ``k`` is a pure function of ``(seed, k)`` (SplitMix64).
That gives what a stateful generator would, and more: a resumed run continues the identical
sequence (the state is a few integers), and the state lives in one small int64 tensor that the
``fxdrop::sample_pattern`` / ``fxdrop::sample_rows`` ops mutate, so ``torch.compile`` sees a custom
op instead of Python RNG calls and never specialises on the drawn values.

Replays (activation checkpointing). ``torch.utils.checkpoint`` runs a forward again inside the
backward and restores the global RNG state first, so that ``nn.Dropout`` draws the same masks. Each
draw here also takes one number (a *token*) from the global CPU generator, as a dropout call would,
and remembers ``token -> counter`` for its last :data:`REPLAY` draws. A draw made while a backward
runs whose token is one of those is a recomputation: it returns the pattern of that counter again
instead of advancing. Outside a backward every draw advances, whatever the global RNG state.

Layout of the state tensor: ``[seed, draws, token_0, counter_0, ..., token_{R-1}, counter_{R-1}]``.
Imports torch, patterns and search.
"""

from __future__ import annotations

import bisect
from typing import Any

import torch

from .patterns import Pattern
from .search import PatternDistribution, search_distribution

_MASK64 = (1 << 64) - 1
_SEED_BITS = 62
REPLAY = 16
STATE_SIZE = 2 + 2 * REPLAY


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _uniforms(seed: int, counter: int) -> tuple[float, float]:
    """Two independent uniforms in [0, 1) for draw ``counter`` of stream ``seed``."""
    a = _splitmix64(_splitmix64(seed) ^ (2 * counter))
    b = _splitmix64(_splitmix64(seed) ^ (2 * counter + 1))
    return (a >> 11) / 2.0**53, (b >> 11) / 2.0**53


def _at_quantile(cdf: list[float], t: float) -> Pattern:
    """The pattern at quantile ``t`` of the distribution over ``(dp, offset)`` ordered by dp, then offset
    (``(dp, offset)`` has mass ``P(dp) / dp``): ``O(log max_dp)``."""
    total = cdf[-1]
    target = t * total
    index = min(bisect.bisect_right(cdf, target), len(cdf) - 1)
    while index > 0 and cdf[index] == cdf[index - 1]:  # rounding landed on a zero-mass period
        index -= 1
    dp = index + 1
    lower = cdf[index - 1] if index > 0 else 0.0
    mass = cdf[index] - lower
    offset = int((target - lower) / mass * dp) if mass > 0 else 0
    return Pattern(dp, min(max(offset, 0), dp - 1))


def draw(seed: int, counter: int, cdf: list[float]) -> Pattern:
    """Draw number ``counter`` of stream ``seed`` from the distribution with cumulative ``cdf``."""
    u_dp, u_offset = _uniforms(seed, counter)
    dp = min(bisect.bisect_right(cdf, u_dp * cdf[-1]), len(cdf) - 1) + 1
    return Pattern(dp, min(int(u_offset * dp), dp - 1))


def bit_reverse(c: int, classes: int) -> int:
    bits = classes.bit_length() - 1
    return int(format(c, f"0{bits}b")[::-1], 2) if bits else 0


def check_classes(classes: int) -> int:
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1 or classes & (classes - 1):
        raise ValueError(f"row classes must be a power of two >= 1, got {classes!r}")
    return classes


AUTO_CLASSES = "auto"
AUTO_CLASSES_ABOVE = 0.5  # row_classes="auto": more classes above this rate


def classes_for(row_classes: int | str, p: float | None, over_time: bool = False) -> int:
    """The class count of a ``row_classes`` option at rate ``p``: an int as it is; ``"auto"`` 8 above
    p = 0.5 and 4 at or below (2 for an RNN site, whose classes are chunks of the time steps:
    ``over_time``). Measured (README's stability grids, MNIST MLP): at p = 0.7, 2 classes diverge with
    SGD momentum at lr >= 0.05 on 2,000 images and trail AdamW at lr 3e-3 by 2.5 points, 8 train there;
    at p <= 0.5 on full MNIST with momentum lr 0.1, 2 classes trail standard dropout by 0.8-1.2 points
    where 4 (consecutive chain sites splitting the rows by different bits, see :func:`draw_classes`) are
    within 0.25. An RNN site is in no chain, and on the PTB study 8 time chunks regularised no better
    than 2 (README, "PTB mask granularity where dropout matters"), so it keeps 2 there."""
    if row_classes == AUTO_CLASSES:
        return 8 if (p or 0.0) > AUTO_CLASSES_ABOVE else 2 if over_time else 4
    return check_classes(row_classes)


def rotate_bits(c: int, by: int, classes: int) -> int:
    """``c`` with its ``log2(classes)`` bits rotated left by ``by`` (mod the bit count)."""
    bits = classes.bit_length() - 1
    if bits <= 1:
        return c
    by %= bits
    return ((c << by) | (c >> (bits - by))) & (classes - 1)


def draw_classes(seed: int, counter: int, cdf: list[float], classes: int, position: int = 0) -> list[Pattern]:
    """Row-class plan number ``counter`` of stream ``seed``: the pattern of each residue ``r mod M``.

    ``M = classes`` (a power of two) patterns are the distribution's quantiles ``(u + j) / M``
    (systematic sampling: a step's rows spread over the distribution), ``u`` uniform. Residue ``c``
    takes quantile ``bit_reverse((rotate_bits(c, position) + s) mod M)``, ``s`` a uniform rotation:
    every row takes each quantile with probability ``1 / M``, so it uses ``(dp, offset)`` with
    probability exactly its mass and drops every unit with probability exactly the distribution's
    rate. The bit reversal sends runs of equal quantiles onto residue classes of a smaller modulus (at
    p = 0.5, dp = 2: the even and the odd rows), which the chain op runs as one strided set of rows
    each. ``position`` (the site's index in its chain) picks which bits of the class decide: at p =
    0.5 with 4 classes the first site splits the rows by bit 0 and the next by bit 1, so the rows that
    share a mask at one site split evenly between the next site's two masks, and the weight between
    them gets a gradient in all four of its (kept output, kept input) blocks every step, not two. With
    one shared split the rows of a class share their whole path through the chain, and a large
    learning rate trains worse (README's stability grids).
    """
    check_classes(classes)
    u, u_shift = _uniforms(seed, counter)
    shift = min(int(u_shift * classes), classes - 1)
    quantiles = [_at_quantile(cdf, (u + j) / classes) for j in range(classes)]
    return [quantiles[bit_reverse((rotate_bits(c, position, classes) + shift) % classes, classes)]
            for c in range(classes)]


def derive_seed(base: int, *salt: int) -> int:
    """A seed for a sub-stream (a site, a rank) derived from a base seed."""
    z = int(base) & _MASK64
    for s in salt:
        z = _splitmix64(z ^ _splitmix64(int(s) & _MASK64))
    return z & ((1 << _SEED_BITS) - 1)


def name_salt(name: str) -> int:
    """A stable integer for a site name (the salt of its seed: the same name, the same stream)."""
    z = 0
    for byte in name.encode():
        z = _splitmix64(z ^ byte)
    return z


def new_state(seed: int) -> torch.Tensor:
    state = torch.zeros(STATE_SIZE, dtype=torch.int64)
    state[0] = seed & ((1 << _SEED_BITS) - 1)
    state[3::2] = -1  # no remembered draws
    return state


def check_state(state: torch.Tensor, where: str) -> None:
    if state.dtype != torch.int64 or tuple(state.shape) != (STATE_SIZE,) or state.device.type != "cpu":
        raise ValueError(f"{where}: state must be a CPU int64 tensor of shape ({STATE_SIZE},) = [seed, draws, "
                         f"{REPLAY} remembered (token, counter) pairs], got {state.dtype} {tuple(state.shape)} on "
                         f"{state.device}")


def next_counter(state: torch.Tensor) -> int:
    """The counter of this draw, advancing ``state`` unless it is a replay (see the module docstring)."""
    token = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    values = state.tolist()
    if torch._C._current_graph_task_id() != -1:  # inside a backward: maybe a recomputation
        for slot in range(REPLAY):
            if values[2 + 2 * slot] == token and values[3 + 2 * slot] >= 0:
                return values[3 + 2 * slot]
    counter = values[1]
    slot = counter % REPLAY
    state[1] = counter + 1
    state[2 + 2 * slot] = token
    state[3 + 2 * slot] = counter
    return counter


class PatternScheduler:
    """Samples ``dp ~ P`` and ``offset ~ U[0, dp)`` from a counter-based stream; same seed, same sequence.

    ``distribution`` may be replaced (a site whose rate changes); the stream (``state``, an int64 CPU
    tensor, see the module docstring) continues.
    """

    def __init__(self, distribution: PatternDistribution | float, seed: int | None = None,
                 max_dp: int | str = "auto"):
        if seed is None:
            # Drawn once from the global RNG so torch.manual_seed makes conversion reproducible.
            seed = int(torch.randint(0, 2**_SEED_BITS, (), dtype=torch.int64))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        self.state = new_state(seed)
        self.max_dp = max_dp
        self.distribution = distribution if isinstance(distribution, PatternDistribution) else \
            search_distribution(distribution, max_dp=max_dp)

    @property
    def distribution(self) -> PatternDistribution:
        return self._distribution

    @distribution.setter
    def distribution(self, value: PatternDistribution) -> None:
        self._distribution = value
        self.cdf = torch.cumsum(value.probs, 0)
        self._cdf_list = self.cdf.tolist()

    @property
    def seed(self) -> int:
        return int(self.state[0])

    @property
    def draws(self) -> int:
        """How many patterns (or row-class plans) have been drawn."""
        return int(self.state[1])

    @property
    def last_pattern(self) -> Pattern | None:
        if self.draws == 0:
            return None
        return draw(self.seed, self.draws - 1, self._cdf_list)

    def peek(self, ahead: int = 0) -> Pattern:
        """The pattern that draw ``draws + ahead`` will return, without drawing it."""
        return draw(self.seed, self.draws + ahead, self._cdf_list)

    def sample(self) -> Pattern:
        return draw(self.seed, next_counter(self.state), self._cdf_list)

    def sample_tensor(self) -> torch.Tensor:
        """Draw through the ``fxdrop::sample_pattern`` op: ``int64 (2,) = [dp, offset]`` on the CPU."""
        return torch.ops.fxdrop.sample_pattern(self.state, self.cdf)

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state.clone(), "probs": self.distribution.probs.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "state" not in state:
            raise KeyError("PatternScheduler.load_state_dict expects the key 'state'")
        saved = state["state"]
        if tuple(saved.shape) != (STATE_SIZE,):
            raise ValueError(f"PatternScheduler.load_state_dict: the saved state has shape {tuple(saved.shape)}, "
                             f"expected ({STATE_SIZE},) (a checkpoint of another fxdrop version?)")
        self.state.copy_(saved)

    def __repr__(self) -> str:
        return (f"PatternScheduler(p={self.distribution.p}, max_dp={self.distribution.max_dp}, "
                f"seed={self.seed}, draws={self.draws})")
