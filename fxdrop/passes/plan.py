"""Planning: for every dropout of a normalised graph, whether and how it is converted, or why not.

This is the one place these decisions are made; ``fxdrop.convert``, ``fxdrop.audit`` and the
``backend="fxdrop"`` all ask :func:`plan_graph` (and :func:`plan_rnn` for recurrent modules) and
report what it returns. Small per-shape planners each give a plan piece or a reason:

* :func:`_blocker`: dropouts no plan can take (channel dropouts, always-on or never-on flags, rates
  that are not constants, attention probabilities, in-place dropouts whose input has other users);
* :func:`_plan_rnn_input`: ``Dropout -> nn.LSTM / nn.GRU``: the RNN's input GEMM shrinks;
* :func:`_plan_tile`: ``Dropout -> Linear`` with the tile family: DropConnect on the Linear's tiles;
* :func:`_link` then :func:`_assemble_chains`: ``Linear -> [act] -> Dropout -> Linear`` links become
  maximal chains (both GEMMs shrink), with input sites (``anything -> Dropout -> Linear``), output sites
  (``Linear -> [act] -> Dropout -> anything``) and shared inputs (a dropout whose other users get the
  same masked tensor); a lone shared dropout becomes a unit dropout.

Site names: a module dropout is named by its qualified module name (``classifier.2``), its k-th
further call ``name:k``; a functional dropout by the module whose forward calls it and its kind
(``block.dropout``; ``dropout`` in the root's forward). Imports torch, networkx, the config, the layout
and the normalised graph.
"""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass, field
from typing import Any

import networkx as nx
from torch import fx, nn

from ..config import DropoutConfig
from ..layout import ChainLayout
from ..patterns import UNIT_FAMILIES
from .normalise import DropoutCall, LinearCall, NormalisedGraph
from .trace import join

# ---------------------------------------------------------------- plan records


@dataclass
class DropoutSite:
    """One dropout the planner found, and what it decided.

    ``plan``: "chain" (between two Linears), "output" (after the last Linear of a chain), "input"
    (before the first), "tile_linear", "unit_dropout", "rnn_input" (before an LSTM/GRU), "rnn"
    (between an RNN's layers), or None when left as is; ``reason`` says why. ``owner``: the
    qualified name of the Dropout module (module dropouts), else of the module whose forward calls it.
    ``position``: the site's index among its chain's sites (0 outside a chain), which decides which bits of
    a row's class pick its pattern (:func:`fxdrop.scheduler.draw_classes`).
    """

    name: str
    p: float | None
    kind: str
    producer: str | None
    consumer: str | None
    converted: bool
    reason: str
    plan: str | None = None
    family: str | None = None
    units: int | None = None
    weight_shape: tuple[int, int] | None = None
    region: str = ""
    node: str = ""
    owner: str = ""
    functional: bool = False
    scope: str = ""
    position: int = 0

    @property
    def decision(self) -> str:
        return "converted" if self.converted else "left as is"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["decision"] = self.decision
        return data


@dataclass
class ChainPlan:
    """``[input site ->] Linear_0 -> act -> site -> ... -> Linear_{m-1} [-> act -> output site]``."""

    linears: list[LinearCall]
    activations: list[str]
    sites: list[DropoutSite]
    dropouts: list[DropoutCall]
    layout: ChainLayout
    family: str
    input_shared: bool = False  # the input dropout has other users: they get the masked input too

    @property
    def nodes(self) -> list[fx.Node]:
        """Every node the chain replaces: its Linears (all their nodes), its dropouts, and the
        activation before each dropout that follows a Linear of the chain."""
        linear_nodes = [n for linear in self.linears for n in linear.nodes]
        outputs = {linear.node for linear in self.linears}
        nodes = list(linear_nodes)
        for i, dropout in enumerate(self.dropouts):
            nodes.append(dropout.node)
            if not (self.layout.input_dropout and i == 0) and dropout.input not in outputs:
                nodes.append(dropout.input)
        return nodes

    @property
    def source(self) -> fx.Node:
        return self.dropouts[0].input if self.layout.input_dropout else self.linears[0].input

    @property
    def output(self) -> fx.Node:
        return self.dropouts[-1].node if self.layout.output_dropout else self.linears[-1].node


@dataclass
class TilePlan:
    site: DropoutSite
    dropout: DropoutCall
    linear: LinearCall

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.dropout.node, *self.linear.nodes]


@dataclass
class UnitPlan:
    site: DropoutSite
    dropout: DropoutCall

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.dropout.node]


@dataclass
class RNNInputPlan:
    """``Dropout -> nn.LSTM / nn.GRU``: the dropout becomes the RNN's input site (:mod:`fxdrop.modules.rnn`)."""

    site: DropoutSite
    dropout: DropoutCall
    rnn: fx.Node

    @property
    def nodes(self) -> list[fx.Node]:
        return [self.dropout.node, self.rnn]


@dataclass
class Plan:
    sites: list[DropoutSite] = field(default_factory=list)
    rnn_inputs: list[RNNInputPlan] = field(default_factory=list)
    chains: list[ChainPlan] = field(default_factory=list)
    tiles: list[TilePlan] = field(default_factory=list)
    units: list[UnitPlan] = field(default_factory=list)

    @property
    def rewrites(self) -> list:
        return [*self.rnn_inputs, *self.chains, *self.tiles, *self.units]

    @property
    def converted(self) -> list[DropoutSite]:
        return [s for s in self.sites if s.converted]


def rewrite_sites(rewrite) -> list[DropoutSite]:
    return list(rewrite.sites) if isinstance(rewrite, ChainPlan) else [rewrite.site]


# ---------------------------------------------------------------- names

def site_names(g: NormalisedGraph, prefix: str = "") -> dict[fx.Node, str]:
    """Qualified module name for module dropouts; ``<caller>.<kind>`` for functional ones; ``:k`` for the
    k-th further call of the same name."""
    names: dict[fx.Node, str] = {}
    calls: dict[str, int] = {}
    for node, dropout in g.dropouts.items():
        base = dropout.module if dropout.module is not None else join(dropout.caller, dropout.kind)
        base = join(prefix, base)
        k = calls.get(base, 0)
        calls[base] = k + 1
        names[node] = base if k == 0 else f"{base}:{k}"
    return names


# ---------------------------------------------------------------- per-shape planners

def _blocker(g: NormalisedGraph, dropout: DropoutCall, rate: float | None) -> str | None:
    """Why no plan can take this dropout, or None."""
    if dropout.kind != "dropout":
        return {"dropout1d": "Dropout1d drops whole channels, not units of the last dim",
                "dropout2d": "Dropout2d drops whole channels, not units of the last dim",
                "dropout3d": "Dropout3d drops whole channels, not units of the last dim",
                "alpha_dropout": "AlphaDropout keeps self-normalisation with its own affine map; not a unit "
                                 "dropout",
                "feature_alpha_dropout": "FeatureAlphaDropout drops channels with an affine map; not a unit "
                                         "dropout"}[dropout.kind]
    if dropout.training is True:
        return "functional dropout with training=True whatever the mode (also drops in eval): left as written"
    if dropout.training is False:
        return "functional dropout with training=False: it never drops"
    if dropout.training != "mode":
        return "the training flag is computed, not a module's mode"
    if rate is None:
        return "the drop rate is not a constant (or the Dropout module overrides forward or has hooks)"
    if rate >= 1.0:
        return "p = 1 drops every unit (the output is zeros): no pattern reaches it; left as it is"
    if g.is_softmax(dropout.input):
        return "dropout on attention probabilities: structured masks would drop whole keys"
    if dropout.inplace and len(g.users(dropout.input)) > 1:
        return "in-place dropout whose input has other users: they see the dropped values"
    return None


def rnn_blocker(module: nn.Module, family: str | None = None) -> str | None:
    """Why an RNN's dropout (inter-layer or input site) cannot be structured, or None.

    The one decision for every path: the planner of input sites, :func:`plan_rnn`, and the audit."""
    from ..modules.rnn import StructuredRNN

    if isinstance(module, StructuredRNN):
        return None
    if type(module) not in (nn.LSTM, nn.GRU):
        return (f"{type(module).__name__} is not exactly torch.nn.LSTM or torch.nn.GRU (a subclass may override "
                "forward)")
    if "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks:
        return f"the {type(module).__name__} has hooks or an overridden forward"
    if family is not None and family not in UNIT_FAMILIES:
        return f"an {type(module).__name__} dropout masks units: the tile family does not apply"
    return None


def _plan_rnn_input(g: NormalisedGraph, site: DropoutSite, dropout: DropoutCall, family: str):
    """``Dropout -> RNN``: an :class:`RNNInputPlan`, a reason, or None when the dropout does not feed an RNN."""
    only = g.only_user(dropout.node)
    if only is None or only not in g.rnns or not only.args or only.args[0] is not dropout.node:
        return None
    module = g.rnns[only]
    reason = rnn_blocker(module, family)
    if reason is None and sum(1 for n in g.rnns if n.target == only.target) > 1:
        reason = f"{only.target} is called more than once; an input site would apply to every call"
    if reason is not None:
        return reason
    site.units = module.input_size
    site.consumer = g.qualify(only.target)
    site.plan, site.converted = "rnn_input", True
    site.reason = f"input site of {site.consumer}: its input GEMM shrinks"
    return RNNInputPlan(site, dropout, only)


def _linear_user(g: NormalisedGraph, node: fx.Node) -> LinearCall | None:
    only = g.only_user(node)
    linear = g.linears.get(only) if only is not None else None
    if linear is None:
        # A transposed-weight Linear of Dynamo's graphs starts with a view of its input.
        for candidate in g.linears.values():
            if candidate.input is node and len(candidate.nodes) > 1 and candidate.nodes[0] is only:
                return candidate
        return None
    return linear if linear.input is node else None


def _plan_tile(g: NormalisedGraph, site: DropoutSite, dropout: DropoutCall) -> TilePlan | str:
    linear = _linear_user(g, dropout.node)
    if linear is None:
        return "the tile family needs the dropout to feed exactly one Linear"
    if linear.in_features is None or linear.out_features is None:
        return "the consuming Linear's weight shape is unknown"
    site.weight_shape = (linear.out_features, linear.in_features)
    site.plan, site.converted = "tile_linear", True
    site.reason = f"DropConnect on {linear.label}'s weight, tile granularity"
    return TilePlan(site, dropout, linear)


def _find_producer(g: NormalisedGraph, dropout: DropoutCall) -> tuple[LinearCall, str] | None:
    """``Linear -> [act] -> dropout`` where every intermediate value has the next step as only user."""
    source, activation = dropout.input, "none"
    if g.only_user(source) is not dropout.node:
        return None
    if source in g.activations:
        activation = g.activations[source].name
        source = g.activations[source].input
        if g.only_user(source) is None:
            return None
    linear = g.linears.get(source)
    return (linear, activation) if linear is not None else None


def _why_no_linear(g: NormalisedGraph, dropout: DropoutCall, users: list[fx.Node]) -> str:
    if any(g.is_conv(u) for u in users):
        return "dropout feeding a convolution: its units are channels, not the last dim"
    if not users:
        return "the dropout's output is unused"
    source = dropout.input
    if source.op == "call_function" and source.target is operator.getitem and isinstance(source.args[0], fx.Node):
        source = source.args[0]  # (output, weights) = attention(...)
    if source.op == "call_module" and isinstance(g.module(source), nn.MultiheadAttention):
        return ("produced by nn.MultiheadAttention, whose output projection runs inside "
                "F.multi_head_attention_forward, and consumed by no Linear: nothing to shrink")
    producer = g.module(source) if source.op == "call_module" else None
    if producer is not None and not _is_torch_module(producer):
        return (f"produced by {g.qualify(source.target)} ({type(producer).__name__}), which runs as a call (it does "
                "not trace, or has hooks), so its last Linear is out of reach; consumed by no Linear")
    return "no Linear produces or consumes it: nothing to shrink"


def _is_torch_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith(("torch.nn", "torch.ao.nn"))


@dataclass
class _Link:
    producer: tuple[LinearCall, str] | None
    consumer: LinearCall | None
    shared: bool = False


def _link(g: NormalisedGraph, dropout: DropoutCall) -> _Link | str:
    """The chain link of a unit dropout: its producing Linear (with the activation between), its
    consuming Linear, or a reason when it has neither."""
    node = dropout.node
    found = _find_producer(g, dropout)
    producer = found if found is not None and found[0].out_features is not None else None
    linear_user = _linear_user(g, node)
    consumer = linear_user if linear_user is not None and linear_user.in_features is not None else None
    if producer is None and consumer is None:
        users = g.users(node)
        linear_users = [g.linears[u] for u in users if u in g.linears and g.linears[u].input is node
                        and g.linears[u].in_features is not None]
        if linear_users:
            # One pattern for every user: the Linear reads the kept units only (chain input site), the
            # others get the masked tensor from the same draw.
            return _Link(None, linear_users[0], shared=True)
        return _why_no_linear(g, dropout, users)
    return _Link(producer, consumer)


def _assemble_chains(g: NormalisedGraph, plan: Plan, links: dict[fx.Node, _Link],
                     site_of: dict[fx.Node, DropoutSite]) -> None:
    """Maximal runs: a path graph alternating Linear and dropout nodes (each has <= 1 in and out edge)."""
    graph = nx.DiGraph()
    for node, link in links.items():
        graph.add_node(node)
        if link.producer is not None:
            graph.add_edge(link.producer[0].node, node)
        if link.consumer is not None:
            graph.add_edge(node, link.consumer.node)
    # A Linear between two sites of different families cannot be in one chain op: cut its input edge.
    for node, link in links.items():
        if link.consumer is not None:
            after = list(graph.successors(link.consumer.node))
            if after and site_of[after[0]].family != site_of[node].family:
                graph.remove_edge(node, link.consumer.node)
    order = {n: i for i, n in enumerate(g.graph.nodes)}
    components = sorted(nx.weakly_connected_components(graph), key=lambda c: min(order[n] for n in c))
    for component in components:
        path = list(nx.topological_sort(graph.subgraph(component)))
        linears = [g.linears[n] for n in path if n in g.linears]
        drops = [g.dropouts[n] for n in path if n in g.dropouts]
        if not linears:  # a lone shared site whose consumer edge was cut, without producer
            site = site_of[drops[0].node]
            site.units = links[drops[0].node].consumer.in_features
            site.plan, site.converted = "unit_dropout", True
            site.reason = "several users or a family change: one unit mask, no GEMM shrinks"
            plan.units.append(UnitPlan(site, drops[0]))
            continue
        layout = ChainLayout(len(linears), path[0] in g.dropouts, path[-1] in g.dropouts)
        activations = [links[d.node].producer[1] for d in drops if links[d.node].producer is not None]
        sites = [site_of[d.node] for d in drops]
        for i, (site, dropout) in enumerate(zip(sites, drops)):
            link = links[dropout.node]
            if layout.input_dropout and i == 0:
                site.plan, site.units = "input", link.consumer.in_features
                site.reason = f"input-structured {link.consumer.label}"
                if link.shared:
                    site.reason += "; its other users get the same mask"
            elif layout.output_dropout and i == len(drops) - 1:
                site.plan, site.units = "output", link.producer[0].out_features
                site.reason = f"output-structured {link.producer[0].label}, scattered to full width"
            else:
                site.plan, site.units = "chain", link.producer[0].out_features
                site.reason = f"{link.producer[0].label} -> {link.consumer.label}: both GEMMs shrink"
            site.converted, site.position = True, i
            if len(linears) > 1:
                site.reason += f" (one chain of {len(linears)} Linears)"
        plan.chains.append(ChainPlan(linears, activations, sites, drops, layout, sites[0].family,
                                     input_shared=layout.input_dropout and links[path[0]].shared))


# ---------------------------------------------------------------- the planner

def plan_graph(g: NormalisedGraph, config: DropoutConfig, *, region: str = "") -> Plan:
    """Decide, for every dropout of the graph, whether and how it is converted."""
    names = site_names(g, region)
    plan = Plan()
    links: dict[fx.Node, _Link] = {}
    site_of: dict[fx.Node, DropoutSite] = {}
    for node, dropout in g.dropouts.items():
        name = names[node]
        own = dropout.p if isinstance(dropout.p, (int, float)) and not isinstance(dropout.p, bool) else None
        rate = config.rate_for(name, own) if own is not None else None
        owner = join(region, dropout.module) if dropout.module is not None else join(region, dropout.caller)
        site = DropoutSite(name=name, p=rate, kind=dropout.kind, producer=g.describe(dropout.input),
                           consumer=", ".join(g.describe(u) for u in g.users(node)) or None, converted=False,
                           reason="", region=region, node=node.name, owner=owner,
                           functional=dropout.module is None, scope=join(region, g.scope(node)))
        plan.sites.append(site)
        site_of[node] = site
        found = _find_producer(g, dropout)
        if found is not None:
            site.producer = found[0].label if found[1] == "none" else f"{found[0].label} -> {found[1]}"
        reason = _blocker(g, dropout, rate)
        if reason is None:
            site.family = config.family_for(name)
            piece = _plan_rnn_input(g, site, dropout, site.family)
            if piece is None and site.family == "tile":
                piece = _plan_tile(g, site, dropout)
            if piece is None:
                piece = _link(g, dropout)
            if isinstance(piece, RNNInputPlan):
                plan.rnn_inputs.append(piece)
                continue
            if isinstance(piece, TilePlan):
                plan.tiles.append(piece)
                continue
            if isinstance(piece, _Link):
                links[node] = piece
                continue
            reason = piece
        site.reason = reason
    _assemble_chains(g, plan, links, site_of)
    return plan


# ---------------------------------------------------------------- recurrent modules

@dataclass
class RNNPlan:
    """An ``nn.LSTM``/``nn.GRU`` with inter-layer dropout: its layer sites (or one record saying why not)."""

    name: str
    module: nn.Module
    family: str | None
    sites: list[DropoutSite]

    @property
    def converted(self) -> bool:
        return any(s.converted for s in self.sites)


def plan_rnn(name: str, module: nn.Module, config: DropoutConfig) -> RNNPlan | None:
    """The inter-layer sites ``<name>.layer{l}`` of an RNN module (None: it has no inter-layer dropout)."""
    if not isinstance(module, (nn.LSTM, nn.GRU)) or module.num_layers < 2 or module.dropout == 0:
        return None
    kind = "lstm" if isinstance(module, nn.LSTM) else "gru"
    family = config.family_for(name)
    rate = config.rate_for(name, module.dropout)
    reason = rnn_blocker(module, family)
    if reason is not None:
        return RNNPlan(name, module, None, [DropoutSite(f"{name}.dropout", rate, kind, f"{name} (layer output)",
                                                        f"{name} (next layer)", False, reason, owner=name)])
    sites = [DropoutSite(f"{name}.layer{layer}", rate, kind, f"{name} layer {layer}",
                         f"{name}.weight_ih_l{layer + 1}", True,
                         "inter-layer dropout: the next layer's input GEMM shrinks", plan="rnn", family=family,
                         units=_rnn_width(module), owner=name)
             for layer in range(module.num_layers - 1)]
    return RNNPlan(name, module, family, sites)


def _rnn_width(module: nn.Module) -> int:
    directions = 2 if module.bidirectional else 1
    return directions * (getattr(module, "proj_size", 0) or module.hidden_size)


__all__ = ["ChainPlan", "DropoutSite", "Plan", "RNNInputPlan", "RNNPlan", "TilePlan", "UnitPlan", "plan_graph",
           "plan_rnn", "rewrite_sites", "rnn_blocker", "site_names"]
