"""``fxdrop.convert(model)``: the one-liner. Clone, trace, plan, install; the input model is not modified.

The result is a copy of the user's model of the same class, with the same methods, attributes,
Parameters (the very objects), buffers, ``state_dict`` keys and hooks. Only the smallest traced
regions that hold converted sites change, and only their forward (see :mod:`fxdrop.modules.region`);
``nn.LSTM``/``nn.GRU`` modules with inter-layer dropout become their structured subclasses.

Steps, each asked of the module that owns it:

1. :func:`fxdrop.passes.trace.discover` finds the largest traceable modules (regions);
2. :func:`fxdrop.passes.plan.plan_graph` plans each (the one planner);
3. :func:`install_regions` picks, for every rewrite, the smallest module whose forward holds all of it;
4. each such module gets a :class:`~fxdrop.modules.region.RegionForward`, whose program for the call
   spec is built (and, given example inputs, checked against the real call) now;
5. :func:`fxdrop.passes.plan.plan_rnn` decides the RNN modules.

Also ``fxdrop.sites(converted)``, ``set_p``, and ``state_dict(model)`` / ``load_state_dict(model, state)``
for the sites' scheduler states, which are not part of the model's own ``state_dict``. Imports torch,
the config, the passes and the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .config import DropoutConfig
from .modules.region import RegionForward, install, installed
from .modules.rnn import StructuredRNN, structure_rnn
from .ops import extension
from .passes.normalise import NormalisedGraph, drop_identities
from .passes.plan import DropoutSite, Plan, plan_graph, plan_rnn, rewrite_sites
from .passes.spec import CallSpec
from .passes.trace import (METHOD_REGIONS, SkippedModule, TracedRegion, call_spec, clone_modules, discover, join,
                           node_scope, set_submodule)
from .site import Site

REPORT_ATTR = "_fxdrop_conversion"


@dataclass
class RegionRecord:
    """One installed region: where, for which call, and what its program did."""

    name: str
    method: str
    spec: str
    verified: bool
    sites: list[str]


@dataclass
class Conversion:
    """What :func:`convert` did: every site found (converted or not, with reasons), regions, skipped modules."""

    sites: list[DropoutSite] = field(default_factory=list)
    skipped: list[SkippedModule] = field(default_factory=list)
    regions: list[RegionRecord] = field(default_factory=list)
    config: DropoutConfig | None = None
    # Parameters whose only use in the traced code is one Linear of one chain (qualified names): the
    # DDP comm hook may reduce just the kept block of their gradients (fxdrop.distributed).
    chain_only: set[str] = field(default_factory=set)

    @property
    def converted(self) -> list[DropoutSite]:
        return [s for s in self.sites if s.converted]


# ---------------------------------------------------------------- checks and inputs


def check_model(model: Any, where: str = "fxdrop.convert") -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{where}: {type(model).__name__} is a TorchScript module (torch.jit.script or "
                        "torch.jit.trace): its forward is compiled TorchScript, not Python that fx can trace; "
                        "convert the Python model before scripting it")
    _check_not_sharded(model, where)


def _check_not_sharded(model: nn.Module, where: str) -> None:
    """FSDP2 replaces Parameters by DTensor shards: convert first, then shard (fxdrop.distributed.fully_shard)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            raise TypeError(f"{where}: module {name or type(model).__name__!r} already went through "
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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def capture_calls(work: nn.Module, example_inputs: Sequence[Any], example_kwargs: Mapping[str, Any] | None = None
                  ) -> dict[str, tuple[tuple, dict]]:
    """Run ``work`` once in eval mode without gradients; the first call's ``(args, kwargs)`` of every module."""
    names = {id(m): name for name, m in work.named_modules()}
    captured: dict[str, tuple[tuple, dict]] = {}

    def capture(module, args, kwargs):
        captured.setdefault(names[id(module)], (args, dict(kwargs)))

    modes = {m: m.training for m in work.modules()}
    handles = [m.register_forward_pre_hook(capture, with_kwargs=True) for m in work.modules()]
    try:
        work.eval()
        with torch.no_grad(), torch.random.fork_rng():
            work(*example_inputs, **dict(example_kwargs or {}))
    except Exception as err:
        shapes = ", ".join(str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__
                           for x in example_inputs)
        raise ValueError(f"example_inputs ({shapes}) do not fit {type(work).__name__}: "
                         f"{type(err).__name__}: {_first_line(err)}") from err
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training
    return captured


# ---------------------------------------------------------------- choosing where to install


@dataclass
class InstallRegion:
    """A module (or method) that will get a RegionForward: its place, its call, the leaves its trace kept."""

    name: str
    method: str
    module: nn.Module
    spec: CallSpec | str
    call: tuple[tuple, dict] | None
    retry_leaves: tuple[str, ...]
    depth: int = 0


def _common(paths: list[str]) -> str:
    parts = [p.split(".") if p else [] for p in paths]
    common: list[str] = []
    for atoms in zip(*parts):
        if len(set(atoms)) != 1:
            break
        common.append(atoms[0])
    return ".".join(common)


def _inside(path: str, region: str) -> bool:
    return region == "" or path == region or path.startswith(region + ".")


def install_regions(region: TracedRegion, plan: Plan, calls: Mapping[str, tuple[tuple, dict]]) -> list[InstallRegion]:
    """The smallest modules of ``region`` whose forwards hold every node of each rewrite of ``plan``.

    A rewrite's owner is the deepest module that is a common prefix of the modules whose forwards made
    its nodes. An owner inside another owner's traced-through code moves up to it (the outer trace goes
    through it), so no two installed regions need each other's internals.
    """
    if region.method != "forward":
        owners = {"": plan.rewrites} if plan.rewrites else {}
    else:
        owners: dict[str, list] = {}
        for rewrite in plan.rewrites:
            scopes = [node_scope(n) for n in rewrite.nodes]
            owners.setdefault(_common(scopes), []).append(rewrite)
        changed = True
        while changed:
            changed = False
            for inner in sorted(owners, key=lambda p: -len(p.split(".")) if p else 0):
                if not inner:
                    continue
                for outer in sorted(owners, key=len):
                    if outer == inner or not _inside(inner, outer):
                        continue
                    if any(_inside(node_scope(n), inner) for r in owners[outer] for n in r.nodes):
                        owners[outer].extend(owners.pop(inner))
                        changed = True
                        break
                if changed:
                    break
    leaves = [name for name, m in region.module.named_modules() if id(m) in region.leaves]
    out = []
    for relative in owners:
        module = region.module.get_submodule(relative) if relative else region.module
        full = join(region.name, relative)
        if relative:
            call = calls.get(full) or region.trace.calls.get(relative)
            spec = call_spec(module, "forward", call)
        else:
            call = calls.get(region.name) if region.method == "forward" else None
            spec = region.spec
        inner_leaves = tuple(p[len(relative) + 1:] if relative else p for p in leaves
                             if not relative or p.startswith(relative + "."))
        out.append(InstallRegion(full, region.method, module, spec, calls.get(full) if region.method == "forward"
                                 else None, inner_leaves, depth=len(full.split(".")) if full else 0))
    return out


# ---------------------------------------------------------------- the conversion


def _plan_region(region: TracedRegion, config: DropoutConfig) -> tuple[NormalisedGraph, Plan]:
    graph = region.graph
    drop_identities(graph, region.module)
    g = NormalisedGraph(graph, region.module, prefix=region.name)
    return g, plan_graph(g, config, region=region.name)


def _apply_rate_overrides(work: nn.Module, config: DropoutConfig, records: list[DropoutSite]) -> None:
    """A converted module dropout's rate lives in its module: an override of ``p`` is written there."""
    by_module: dict[str, list[DropoutSite]] = {}
    for record in records:
        if record.converted and not record.functional and record.kind == "dropout":
            by_module.setdefault(record.owner, []).append(record)
    for owner, group in by_module.items():
        rates = {r.p for r in group}
        if len(rates) > 1:
            names = ", ".join(f"{r.name} (p={r.p})" for r in group)
            raise ValueError(f"p gives the calls of one nn.Dropout module different rates ({names}); its calls share "
                             f"the module's p: give them one rate")
        module = work.get_submodule(owner)
        if config.overrides_rate(group[0].name) or module.p != group[0].p:
            module.p = group[0].p


def convert(model: nn.Module, *, example_inputs: Any = None, example_kwargs: Mapping[str, Any] | None = None,
            config: DropoutConfig | None = None, **options: Any) -> nn.Module:
    """A converted copy of ``model`` that trains with approximate random dropout.

    Options (:class:`fxdrop.config.DropoutConfig`): ``p`` (None keeps each site's rate; a float, a dict
    of site name -> rate or a callable overrides it), ``pattern`` (``row``, ``block``, ``tile``; globally,
    as a dict or a callable; default ``block``), ``max_dp``, ``seed``, ``scale``, ``tile``, ``granularity``
    (default ``"rows"``: patterns per row class; ``"forward"``: one pattern per site per forward call, the
    paper's method), ``row_classes`` (default ``"auto"``: 8 for a site above p = 0.5 at conversion, 2
    otherwise).
    ``example_inputs`` (and ``example_kwargs``): a call of ``model``; each region is then traced for the
    way it is really called and checked against that call now (otherwise at its first training call).
    The result shares ``model``'s Parameters; ``model`` itself is left untouched.
    """
    config = DropoutConfig.from_options(options, where="fxdrop.convert") if config is None else \
        DropoutConfig.from_options(options, config=config, where="fxdrop.convert")
    check_model(model)
    work, conversion = plan_and_install(model, config, example_inputs=example_inputs, example_kwargs=example_kwargs)
    work.__dict__[REPORT_ATTR] = conversion
    if conversion.converted:
        extension.ensure_loaded()  # compiled kernels now, not at the first (maybe traced) training step
    return work


def plan_and_install(model: nn.Module, config: DropoutConfig, *, example_inputs: Any = None,
                     example_kwargs: Mapping[str, Any] | None = None) -> tuple[nn.Module, Conversion]:
    """The conversion proper, on a clone of ``model``: the converted clone and its report."""
    work = clone_modules(model)
    calls = capture_calls(work, as_input_tuple(example_inputs), example_kwargs) \
        if example_inputs is not None or example_kwargs else {}
    found = discover(work, calls)
    planned = [(region, *_plan_region(region, config)) for region in found.regions]
    rnn_plans = [plan for name, module in work.named_modules()
                 if (plan := plan_rnn(name, module, config)) is not None]
    known = {s.name for _, _, plan in planned for s in plan.sites} | {s.name for r in rnn_plans for s in r.sites}
    known |= {r.name for r in rnn_plans}
    config.check_names(known)
    for _, _, plan in planned:
        for record in plan.converted:
            config.check_site_rate(record.name, record.p)
    for rnn in rnn_plans:
        for record in rnn.sites:
            if record.converted:
                config.check_site_rate(record.name, record.p)

    conversion = Conversion(skipped=list(found.skipped), config=config)
    # RNNs first (programs call them at the same paths): those with converted inter-layer sites, and those
    # a converted input site feeds.
    fed = {join(region.name, piece.rnn.target) for region, _, plan in planned for piece in plan.rnn_inputs}
    structured: dict[str, list[DropoutSite]] = {path: [] for path in fed}
    for rnn in rnn_plans:
        conversion.sites.extend(rnn.sites)
        if rnn.converted:
            structured[rnn.name] = rnn.sites
    for path, records in structured.items():
        module = work.get_submodule(path)
        if records and module.dropout != records[0].p:
            module.dropout = records[0].p
        new = structure_rnn(module, name=path, records=records, config=config)
        if path:
            set_submodule(work, path, new)
        else:
            work = new

    failures: dict[tuple[str, str], str] = {}
    covered: list[tuple[str, str]] = []
    targets = [ir for region, _, plan in planned for ir in install_regions(region, plan, calls)]
    for target in sorted(targets, key=lambda r: -r.depth):
        outcome = _install_one(work, target, config, conversion)
        if isinstance(outcome, str):
            failures[(target.name, target.method)] = outcome
        else:
            covered.append((target.name, target.method))
    for region, _, plan in planned:
        for record in plan.sites:
            if any(_inside(record.scope, name) and method == region.method for name, method in covered):
                continue
            if record.converted:  # planned, but its region's program was not installed
                why = next((reason for (name, method), reason in failures.items()
                            if _inside(record.scope, name) and method == region.method), "")
                record.converted, record.plan = False, None
                record.reason = f"its region was not converted: {why}" if why else "its region was not converted"
            conversion.sites.append(record)
    _list_unreached_dropouts(work, conversion)
    _apply_rate_overrides(work, config, conversion.sites)
    conversion.chain_only = _chain_only_parameters(work, planned)
    for site in sites(work):
        site.sync()
    return work, conversion


_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _list_unreached_dropouts(work: nn.Module, conversion: Conversion) -> None:
    """Every Dropout module no traced code reached is listed too, with the module that kept it out of reach."""
    listed = {s.owner for s in conversion.sites if not s.functional} | {s.name.partition(":")[0] for s in conversion.sites}
    skipped = {s.name: s for s in conversion.skipped}
    for name, module in work.named_modules():
        if not isinstance(module, _DROPOUT_TYPES) or name in listed:
            continue
        parts = name.split(".")
        holder = next((skipped[".".join(parts[:i])] for i in range(len(parts) - 1, 0, -1)
                       if ".".join(parts[:i]) in skipped), skipped.get("<root>"))
        if holder is not None:
            reason = f"inside {holder.name} ({holder.type}), which does not trace: {holder.message}"
        else:
            reason = "no traced forward calls it (or its module's forward is not traced)"
        conversion.sites.append(DropoutSite(name, float(module.p), "dropout", None, None, False, reason, owner=name))


def _chain_only_parameters(work: nn.Module, planned) -> set[str]:
    """Parameters used by exactly one chain Linear and nothing else in the largest traced regions."""
    names = {id(p): name for name, p in work.named_parameters()}
    chain_uses: dict[int, int] = {}
    other: set[int] = set()
    covered: set[int] = set()
    for region, g, plan in planned:
        covered.update(id(p) for p in region.module.parameters())
        chain_nodes = {n for chain in plan.chains for linear in chain.linears for n in linear.nodes}
        for node in g.graph.nodes:
            if node.op == "call_module":
                params = [id(p) for p in region.module.get_submodule(node.target).parameters()]
                if node in chain_nodes:
                    for pid in params:
                        chain_uses[pid] = chain_uses.get(pid, 0) + 1
                else:
                    other.update(params)
            elif node.op == "get_attr":
                try:
                    value = region.module.get_parameter(node.target)
                except AttributeError:
                    continue
                if all(user in chain_nodes for user in node.users):
                    chain_uses[id(value)] = chain_uses.get(id(value), 0) + len(node.users)
                else:
                    other.add(id(value))
    return {names[pid] for pid, uses in chain_uses.items()
            if uses == 1 and pid not in other and pid in covered and pid in names}


def _install_one(work: nn.Module, target: InstallRegion, config: DropoutConfig, conversion: Conversion
                 ) -> list[DropoutSite] | str:
    module = work.get_submodule(target.name) if target.name else work  # an RNN swap may have replaced it
    region = RegionForward(module, name=target.name, method=target.method, config=config,
                           retry_leaves=target.retry_leaves)
    program = region.prepare(target.spec, target.call)
    if isinstance(program, str):
        conversion.skipped.append(SkippedModule(region.label, type(module).__name__, f"not converted: {program}"))
        return program
    if not program.plan.converted:
        return "its program converts no site"
    install(module, target.method, region)
    conversion.sites.extend(program.plan.sites)
    conversion.regions.append(RegionRecord(target.name, target.method, program.spec.describe(), program.verified,
                                           [s.name for s in program.plan.converted]))
    return program.plan.sites


# ---------------------------------------------------------------- converted models


def conversion(model: nn.Module) -> Conversion | None:
    """What :func:`convert` recorded on a converted model (None for a model it did not make)."""
    return model.__dict__.get(REPORT_ATTR)


def regions(model: nn.Module) -> list[RegionForward]:
    """Every installed region of ``model``, in module order."""
    found = []
    for module in model.modules():
        for method in ("forward", *METHOD_REGIONS.get(type(module), ())):
            region = installed(module, method)
            if region is not None:
                found.append(region)
    return found


def sites(model: nn.Module) -> list[Site]:
    """Every converted dropout site of ``model`` (regions' and RNNs'), in module order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxdrop.sites expects an nn.Module, got {type(model).__name__}")
    found: list[Site] = []
    seen: set[int] = set()
    for module in model.modules():
        holders = [r for method in ("forward", *METHOD_REGIONS.get(type(module), ()))
                   if (r := installed(module, method)) is not None]
        if isinstance(module, StructuredRNN):
            holders.append(module)
        for holder in holders:
            for site in holder.fxdrop_sites():
                if id(site) not in seen:
                    seen.add(id(site))
                    found.append(site)
    return found


def set_p(model: nn.Module, p: float | Mapping[str, float]) -> None:
    """Set the rate of every site (a float) or of named sites (a dict), for rate schedules.

    A module dropout's rate is its module's ``p`` (``model.classifier[2].p = 0.1`` does the same); a
    functional dropout's rate, a constant in its forward, is kept by its site; an RNN's is ``rnn.dropout``.
    """
    by_name = {site.name: site for site in sites(model)}
    if isinstance(p, Mapping):
        unknown = sorted(set(p) - set(by_name))
        if unknown:
            raise KeyError(f"fxdrop.set_p: no sites {unknown}; the sites are {sorted(by_name)}")
        items = list(p.items())
    else:
        items = [(name, p) for name in by_name]
    for name, rate in items:
        by_name[name].p = rate


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


__all__ = ["Conversion", "RegionRecord", "check_model", "conversion", "convert", "load_state_dict", "plan_and_install",
           "regions", "set_p", "sites", "state_dict"]
