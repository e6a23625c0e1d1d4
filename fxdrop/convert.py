"""``fxdrop.convert(model)``: the one-liner. Trace, find sites, plan, rewrite; the input is not modified.

Also ``fxdrop.sites(converted)`` (every converted site, from modules that expose ``fxdrop_sites()``)
and ``state_dict(model)`` / ``load_state_dict(model, state)`` for the sites' scheduler states, which
are not part of the model's own ``state_dict`` (that one keeps exactly the original keys).
Imports torch and fxdrop's passes, modules, site and scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .lstm import StructuredLSTM, lstm_blocker, structure_lstm
from .ops import extension
from .passes.find import DropoutSite, LSTMInputPlan, NormalisedGraph, Plan, plan_graph, site_family, site_rate
from .passes.rewrite import apply_plan
from .passes.trace import SkippedModule, clone_modules, graph_module, set_submodule, trace_regions
from .patterns import FAMILIES, UNIT_FAMILIES
from .scheduler import derive_seed
from .search import check_max_dp, check_rate
from .site import GRANULARITIES, SCALE_MODES, Site

REPORT_ATTR = "_fxdrop_conversion"


@dataclass
class Conversion:
    """What :func:`convert` did: every site found (converted or not, with reasons) and skipped modules."""

    sites: list[DropoutSite] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    regions: list[str] = field(default_factory=list)

    @property
    def converted(self) -> list[DropoutSite]:
        return [s for s in self.sites if s.converted]


@dataclass
class PlannedRegion:
    name: str
    module: nn.Module  # the GraphModule, not yet rewritten
    plan: Plan


def _check_options(model: Any, p: Any, pattern: Any, max_dp: Any, seed: Any, scale: Any, tile: Any,
                   granularity: Any = "forward") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxdrop.convert expects an nn.Module, got {type(model).__name__}")
    if isinstance(p, (int, float)) and not isinstance(p, bool):
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"p={p} is outside [0, 1): pass a drop rate at least 0 and below 1, or None to keep "
                             "each site's own rate")
    elif isinstance(p, Mapping):
        for name, rate in p.items():
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= float(rate) < 1.0:
                raise ValueError(f"p[{name!r}]={rate!r} is outside [0, 1)")
    elif p is not None and not callable(p):
        raise TypeError(f"p must be None, a float, a dict of site name -> float or a callable, got "
                        f"{type(p).__name__}")
    if isinstance(pattern, str):
        if pattern not in FAMILIES:
            raise ValueError(f"pattern={pattern!r} is not a pattern family; expected one of {', '.join(FAMILIES)}")
    elif isinstance(pattern, Mapping):
        for name, family in pattern.items():
            if family not in FAMILIES:
                raise ValueError(f"pattern[{name!r}]={family!r} is not a pattern family; expected one of "
                                 f"{', '.join(FAMILIES)}")
    elif not callable(pattern):
        raise TypeError(f"pattern must be a family name, a dict or a callable, got {type(pattern).__name__}")
    check_max_dp(max_dp)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if scale not in SCALE_MODES:
        raise ValueError(f"scale={scale!r} is not a scale mode; expected one of {', '.join(SCALE_MODES)}")
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be an int >= 1, got {tile!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}: expected one of {', '.join(GRANULARITIES)} ('forward': "
                         "one pattern per forward call; 'rows': patterns per row class)")
    _check_not_sharded(model)


def _check_not_sharded(model: nn.Module) -> None:
    """FSDP2 replaces Parameters by DTensor shards: convert first, then shard (fxdrop.distributed.fully_shard)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            raise TypeError(f"fxdrop.convert: module {name or type(model).__name__!r} already went through "
                            "fully_shard (FSDP2); convert the unsharded model first, then shard it with "
                            "fxdrop.distributed.fully_shard(converted)")


def as_input_tuple(example_inputs: Any) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def check_example_inputs(model: nn.Module, example_inputs: Sequence[Any]) -> dict[str, tuple]:
    """Run a clone of ``model`` in eval mode on the inputs; a failure names the inputs' shapes.

    Returns the arguments each submodule (by qualified name, "" for the model) got on its first call,
    which :func:`plan_model` uses to check traced graphs against the modules they came from.
    """
    probe = clone_modules(model)
    probe.eval()
    names = {module: name for name, module in probe.named_modules()}
    captured: dict[str, tuple] = {}

    def capture(module, args):
        captured.setdefault(names[module], args)

    handles = [m.register_forward_pre_hook(capture) for m in probe.modules() if list(m.children()) or m is probe]
    try:
        with torch.no_grad():
            probe(*example_inputs)
    except Exception as err:
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                           for x in example_inputs)
        raise ValueError(f"example_inputs ({shapes}) do not fit {type(model).__name__}: "
                         f"{type(err).__name__}: {_first_line(err)}") from err
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b)


def _graph_agrees(captured: Mapping[str, tuple]):
    """A check for :func:`trace_regions`: the traced graph must compute, in eval mode, exactly what the
    module computes on the arguments it got from the example inputs (same seed for both runs)."""

    def accept(name: str, module: nn.Module, graph) -> str | None:
        args = captured.get(name)
        if args is None:
            return None  # not called on these inputs: nothing to compare
        gm = graph_module(module, graph)
        modes = {m: m.training for m in module.modules()}
        module.eval()
        gm.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng():
                torch.manual_seed(0)
                expected = module(*args)
                torch.manual_seed(0)
                got = gm(*args)
        except Exception as err:
            return f"the traced graph fails on the example inputs ({type(err).__name__}: {_first_line(err)})"
        finally:
            for m, training in modes.items():
                m.training = training
        if not _same(got, expected):
            return "the traced graph disagrees with the module on the example inputs"
        return None

    return accept


def plan_model(model: nn.Module, *, p: Any = None, pattern: Any = "row", example_inputs: Sequence[Any] | None = None
               ) -> tuple[nn.Module, list[PlannedRegion], list[SkippedModule]]:
    """Clone, trace and plan (no rewrite): the working clone, each traced region's plan, skipped modules.

    With ``example_inputs``, a traced graph that does not reproduce its module on them (a branch
    fx took on a placeholder, say) is not used: the module is skipped and its children are tried.
    """
    captured = check_example_inputs(model, example_inputs) if example_inputs is not None else None
    work = clone_modules(model)
    traced = trace_regions(work, _graph_agrees(captured) if captured is not None else None)
    regions = []
    for region in traced.regions:
        gm = graph_module(region.module, region.graph)
        plan = plan_graph(NormalisedGraph(gm.graph, gm, prefix=region.name), p=p, pattern=pattern,
                          region=region.name)
        regions.append(PlannedRegion(region.name, gm, plan))
    return work, regions, traced.skipped


def convert(model: nn.Module, *, p: float | None | Mapping[str, float] | Callable[[str], float | None] = None,
            pattern: str | Mapping[str, str] | Callable[[str], str] = "row", max_dp: int | str = "auto",
            seed: int | None = None, scale: str = "kept", tile: int = 32, example_inputs: Any = None,
            granularity: str = "forward") -> nn.Module:
    """A converted copy of ``model`` that trains with approximate random dropout.

    ``p``: None keeps each site's rate; a float (or a dict / callable on the site name) overrides it.
    ``pattern``: the family (row, block, tile), globally or per site. ``seed``: per-site seeds derive
    from it. ``granularity``: ``"forward"`` (one pattern per site per forward call, the paper's method)
    or ``"rows"`` (Linear sites draw patterns per row class: row r uses class r mod 2, the classes
    spread over the distribution; for sequence models, whose rows are many tokens; LSTM sites stay
    one pattern per forward, as locked dropout is, and tile sites too, whose mask is on the weight
    every row shares).
    The result shares ``model``'s Parameters; ``model`` itself is left untouched.
    """
    _check_options(model, p, pattern, max_dp, seed, scale, tile, granularity)
    inputs = as_input_tuple(example_inputs) if example_inputs is not None else None
    work, regions, skipped = plan_model(model, p=p, pattern=pattern, example_inputs=inputs)
    conversion = Conversion(skipped=skipped, regions=[r.name for r in regions])
    for region in regions:
        conversion.sites.extend(region.plan.sites)
    index = {id(site): i for i, site in enumerate(conversion.sites)}

    _check_site_names(p, pattern, conversion.sites, work)
    # Validate every site first, so a bad rate fails before anything is built.
    for site in conversion.converted:
        check_rate(site.p, max_dp, where=f"p of dropout site {site.name!r}")

    def make_site(record: DropoutSite) -> Site:
        site_seed = None if seed is None else derive_seed(seed, index[id(record)])
        return Site.create(record.name, record.p, record.family, max_dp=max_dp, seed=site_seed, scale=scale,
                           units=record.units, weight_shape=record.weight_shape, tile=tile,
                           producer=record.producer, consumer=record.consumer,
                           granularity=granularity if record.family != "tile" else "forward")

    def make_lstm(lstm_input: LSTMInputPlan, lstm: nn.LSTM) -> nn.Module:
        record = lstm_input.site
        name = f"{record.region}.{lstm_input.lstm.target}" if record.region else lstm_input.lstm.target
        return structure_lstm(lstm, name=name, p=site_rate(p, name, lstm.dropout), input_name=record.name,
                              input_p=record.p, family=record.family, max_dp=max_dp,
                              seed=None if seed is None else derive_seed(seed, index[id(record)]), scale=scale)

    for region in regions:
        apply_plan(region.module, region.plan, make_site, make_lstm)
        if region.name:
            set_submodule(work, region.name, region.module)
        else:
            work = region.module
    work = _structure_lstms(work, conversion, p=p, pattern=pattern, max_dp=max_dp, seed=seed, scale=scale)
    work.__dict__[REPORT_ATTR] = conversion
    if conversion.converted:
        extension.ensure_loaded()  # compiled kernels now, not at the first (maybe traced) training step
    return work


def _check_site_names(p: Any, pattern: Any, records: list[DropoutSite], work: nn.Module) -> None:
    """A per-site dict naming no site is a typo: say so, with the names there are."""
    known = {r.name for r in records} | {name for name, m in work.named_modules() if isinstance(m, nn.LSTM)}
    for option, value in (("p", p), ("pattern", pattern)):
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"{option} names no dropout site: {unknown}; the sites are {sorted(known)}")


def _structure_lstms(work: nn.Module, conversion: Conversion, *, p, pattern, max_dp, seed, scale) -> nn.Module:
    """Every ``nn.LSTM`` with inter-layer dropout, traced or not, becomes a StructuredLSTM in place
    (in the working clone); each of its sites gets a plan record."""
    for name, module in list(work.named_modules()):
        if isinstance(module, StructuredLSTM):  # made for an input site: record its layer sites
            for site in module.layer_sites:
                conversion.sites.append(_lstm_record(site.name, site.p, name, converted=True, family=site.family,
                                                     units=site.units, reason="inter-layer dropout of an LSTM: "
                                                     "the next layer's input GEMM shrinks"))
            continue
        if not isinstance(module, nn.LSTM) or module.num_layers < 2 or module.dropout == 0:
            continue
        rate = site_rate(p, name, module.dropout)
        blocker = lstm_blocker(module)
        family = site_family(pattern, name)
        if blocker is None and family not in UNIT_FAMILIES:
            blocker = "an LSTM dropout masks units: the tile family does not apply"
        if blocker is None and rate == 0:
            blocker = "p = 0: nothing is dropped, nothing to save"
        if blocker is not None:
            conversion.sites.append(_lstm_record(f"{name}.dropout", rate, name, converted=False, reason=blocker))
            continue
        structured = structure_lstm(module, name=name, p=rate, family=family, max_dp=max_dp,
                                    seed=None if seed is None else derive_seed(seed, len(conversion.sites)),
                                    scale=scale)
        if name:
            set_submodule(work, name, structured)
        else:
            work = structured
        for site in structured.layer_sites:
            conversion.sites.append(_lstm_record(site.name, site.p, name, converted=True, family=family,
                                                 units=site.units, reason="inter-layer dropout of an LSTM: the "
                                                 "next layer's input GEMM shrinks"))
    return work


def _lstm_record(name: str, p: float, lstm: str, *, converted: bool, reason: str, family: str | None = None,
                 units: int | None = None) -> DropoutSite:
    return DropoutSite(name=name, p=p, kind="lstm", producer=f"{lstm} (layer output)",
                       consumer=f"{lstm} (next layer)", converted=converted, reason=reason,
                       plan="lstm" if converted else None, family=family, units=units)


def conversion(model: nn.Module) -> Conversion | None:
    """What :func:`convert` recorded on a converted model (None for a model it did not make)."""
    return model.__dict__.get(REPORT_ATTR)


def sites(model: nn.Module) -> list[Site]:
    """Every converted dropout site of ``model``, from each module's ``fxdrop_sites()``, in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxdrop.sites expects an nn.Module, got {type(model).__name__}")
    found: list[Site] = []
    seen: set[int] = set()
    for module in model.modules():
        get = getattr(module, "fxdrop_sites", None)
        if not callable(get):
            continue
        for site in get():
            if id(site) not in seen:
                seen.add(id(site))
                found.append(site)
    return found


def state_dict(model: nn.Module) -> dict[str, Any]:
    """The schedulers' states by site name (the model's own ``state_dict`` holds the weights)."""
    return {site.name: site.scheduler.state_dict() for site in sites(model)}


def load_state_dict(model: nn.Module, state: Mapping[str, Any], strict: bool = True) -> None:
    by_name = {site.name: site for site in sites(model)}
    if strict:
        missing = sorted(set(by_name) - set(state))
        unexpected = sorted(set(state) - set(by_name))
        if missing or unexpected:
            raise KeyError(f"fxdrop.load_state_dict: missing sites {missing}, unexpected sites {unexpected}")
    for name, site_state in state.items():
        if name in by_name:
            by_name[name].scheduler.load_state_dict(site_state)
