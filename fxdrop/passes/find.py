"""Site discovery and planning on an fx graph: which dropouts fxdrop converts, and how.

The matcher first normalises each node, whatever its form, to one of three calls:

* ``linear(x, W, b)``   ``nn.Linear`` modules, ``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear``;
* ``activation(name)``  activation modules, functions and tensor methods (:mod:`fxdrop.ops.activations`);
* ``dropout(p)``        ``nn.Dropout*`` modules, ``F.dropout``, ``torch.dropout(_)``, ``aten.dropout``;

so the same rules run on module-level graphs (our tracer) and on functional graphs (Dynamo, where
weights are graph inputs). Then, on the def-use graph (networkx):

* ``Linear -> [act] -> Dropout -> Linear``: a link of a chain; maximal runs become one ``chain`` op;
* ``Linear -> [act] -> Dropout -> anything else``: output-structured Linear (chain end);
* ``anything -> Dropout -> Linear``: input-structured Linear (chain start), or ``tile_linear`` for
  the tile family;
* ``Dropout`` with several users, one of them a Linear (and no Linear producer): ``unit_dropout``;
* anything else is left exactly as it was, with the reason.

Imports torch, networkx and fxdrop's activations and patterns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops.activations import function_activation, module_activation
from ..patterns import FAMILIES, UNIT_FAMILIES
from .trace import MODE_ATTR, get_path

# ---------------------------------------------------------------- normalised calls


@dataclass(frozen=True)
class LinearCall:
    """``y = x @ W^T + b``: ``weight``/``bias`` are graph values (Node) or None for no bias."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node | str
    bias: fx.Node | str | None
    in_features: int | None
    out_features: int | None
    label: str


@dataclass(frozen=True)
class ActivationCall:
    node: fx.Node
    input: fx.Node
    name: str


@dataclass(frozen=True)
class DropoutCall:
    """``kind``: dropout, dropout1d/2d/3d, alpha_dropout, feature_alpha_dropout.
    ``training``: "mode" (follows the module's mode), True (always on) or False (never)."""

    node: fx.Node
    input: fx.Node
    p: Any
    kind: str
    inplace: bool
    training: Any
    module: str | None


_LINEAR_FUNCTIONS = {F.linear, torch._C._nn.linear, torch.ops.aten.linear.default}

_DROPOUT_MODULES = {nn.Dropout: "dropout", nn.Dropout1d: "dropout1d", nn.Dropout2d: "dropout2d",
                    nn.Dropout3d: "dropout3d", nn.AlphaDropout: "alpha_dropout",
                    nn.FeatureAlphaDropout: "feature_alpha_dropout"}

# function -> (kind, names of (input, p, training, inplace) in signature order, defaults, always inplace)
_DROPOUT_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...], tuple, bool]] = {
    F.dropout: ("dropout", ("input", "p", "training", "inplace"), (0.5, True, False), False),
    torch.dropout: ("dropout", ("input", "p", "train"), (), False),
    torch.dropout_: ("dropout", ("input", "p", "train"), (), True),
    torch.ops.aten.dropout.default: ("dropout", ("input", "p", "train"), (), False),
    F.dropout1d: ("dropout1d", ("input", "p", "training", "inplace"), (0.5, True, False), False),
    F.dropout2d: ("dropout2d", ("input", "p", "training", "inplace"), (0.5, True, False), False),
    F.dropout3d: ("dropout3d", ("input", "p", "training", "inplace"), (0.5, True, False), False),
    F.alpha_dropout: ("alpha_dropout", ("input", "p", "training", "inplace"), (0.5, False, False), False),
    F.feature_alpha_dropout: ("feature_alpha_dropout", ("input", "p", "training", "inplace"),
                              (0.5, False, False), False),
    torch.alpha_dropout: ("alpha_dropout", ("input", "p", "train"), (), False),
    torch.feature_dropout: ("dropout2d", ("input", "p", "train"), (), False),
    torch.feature_alpha_dropout: ("feature_alpha_dropout", ("input", "p", "train"), (), False),
}

_SOFTMAX = {F.softmax, torch.softmax, torch.ops.aten._softmax.default, torch.ops.aten.softmax.int}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for name, default in zip(names[len(names) - len(defaults):], defaults):
        bound.setdefault(name, default)
    return bound


def _plain_module(module: nn.Module, forward) -> bool:
    """The module runs exactly ``forward`` of its torch.nn class: no override, no hooks."""
    return (type(module).forward is forward and not module._forward_hooks and not module._forward_pre_hooks
            and not nn.modules.module._global_forward_hooks and not nn.modules.module._global_forward_pre_hooks)


def _shape(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, fx.Node):
        for key in ("val", "example_value"):
            if isinstance(value.meta.get(key), torch.Tensor):
                return tuple(value.meta[key].shape)
        meta = value.meta.get("tensor_meta")
        if meta is not None and hasattr(meta, "shape"):
            return tuple(meta.shape)
    return None


class NormalisedGraph:
    """Each node of ``graph`` seen as a Linear, an activation, a dropout or something else.

    ``root`` resolves ``call_module``/``get_attr`` targets (None for purely functional graphs).
    ``constant_training_follows_mode``: Dynamo specialises ``self.training`` into a constant and
    guards on it, so there a constant ``True``/``False`` flag means "the mode" (our own traces rewire
    mode flags to ``get_attr("training")`` instead, and a constant means a constant).
    """

    def __init__(self, graph: fx.Graph, root: nn.Module | None = None, *,
                 constant_training_follows_mode: bool = False, prefix: str = ""):
        self.prefix = prefix  # qualifies module names in labels (the region's name in the whole model)
        self.graph = graph
        self.root = root
        self.constant_training_follows_mode = constant_training_follows_mode
        self.linears: dict[fx.Node, LinearCall] = {}
        self.activations: dict[fx.Node, ActivationCall] = {}
        self.dropouts: dict[fx.Node, DropoutCall] = {}
        self.lstms: dict[fx.Node, nn.LSTM] = {}  # call_module nodes of nn.LSTM (or a subclass)
        for node in graph.nodes:
            self._classify(node)
        self.def_use = nx.DiGraph()
        for node in graph.nodes:
            self.def_use.add_node(node)
            for user in node.users:
                self.def_use.add_edge(node, user)

    def qualify(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix else target

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module" or self.root is None:
            return None
        return get_path(self.root, node.target)

    def value(self, node: Any) -> Any:
        """The tensor a ``get_attr`` node names (for widths), or the node's recorded example value."""
        if isinstance(node, fx.Node) and node.op == "get_attr" and self.root is not None:
            try:
                return get_path(self.root, node.target)
            except AttributeError:
                return None
        return node

    def _classify(self, node: fx.Node) -> None:
        if node.op == "call_module":
            module = self.module(node)
            if module is None or not node.args or not isinstance(node.args[0], fx.Node) or node.kwargs:
                return
            if isinstance(module, nn.LSTM):
                self.lstms[node] = module
            if isinstance(module, nn.Linear) and _plain_module(module, nn.Linear.forward) and len(node.args) == 1:
                self.linears[node] = LinearCall(node, node.args[0], f"{node.target}.weight",
                                                f"{node.target}.bias" if module.bias is not None else None,
                                                module.in_features, module.out_features,
                                                self.qualify(node.target))
            elif type(module) in _DROPOUT_MODULES and len(node.args) == 1:
                plain = _plain_module(module, type(module).forward)
                self.dropouts[node] = DropoutCall(node, node.args[0], module.p if plain else None,
                                                  _DROPOUT_MODULES[type(module)], bool(module.inplace), "mode",
                                                  node.target)
            elif len(node.args) == 1 and not module._forward_hooks and not module._forward_pre_hooks:
                name = module_activation(module)
                if name is not None:
                    self.activations[node] = ActivationCall(node, node.args[0], name)
        elif node.op in ("call_function", "call_method"):
            if not node.args or not isinstance(node.args[0], fx.Node):
                return
            target = node.target
            if node.op == "call_function" and target in _LINEAR_FUNCTIONS:
                bound = _bind(node.args, node.kwargs, ("input", "weight", "bias"), (None,))
                weight, bias = bound.get("weight"), bound.get("bias")
                if not isinstance(weight, fx.Node) or not (bias is None or isinstance(bias, fx.Node)):
                    return
                shape = _shape(self.value(weight))
                out_features, in_features = shape if shape is not None and len(shape) == 2 else (None, None)
                self.linears[node] = LinearCall(node, bound["input"], weight, bias, in_features, out_features,
                                                node.name)
            elif node.op == "call_function" and target in _DROPOUT_FUNCTIONS:
                kind, names, defaults, always_inplace = _DROPOUT_FUNCTIONS[target]
                bound = _bind(node.args, node.kwargs, names, defaults)
                training = bound.get("training", bound.get("train"))
                if isinstance(training, fx.Node):
                    training = "mode" if (training.op == "get_attr" and training.target == MODE_ATTR) else None
                elif training is True and self.constant_training_follows_mode:
                    training = "mode"
                self.dropouts[node] = DropoutCall(node, bound["input"], bound.get("p"), kind,
                                                  always_inplace or bool(bound.get("inplace", False)), training,
                                                  None)
            else:
                name = function_activation(target, node.args, node.kwargs, method=node.op == "call_method")
                if name is not None:
                    self.activations[node] = ActivationCall(node, node.args[0], name)

    # --------------------------------------------------------- questions on the def-use graph

    def users(self, node: fx.Node) -> list[fx.Node]:
        return list(self.def_use.successors(node))

    def only_user(self, node: fx.Node) -> fx.Node | None:
        users = self.users(node)
        return users[0] if len(users) == 1 else None

    def is_softmax(self, node: fx.Node) -> bool:
        return ((node.op == "call_function" and node.target in _SOFTMAX)
                or (node.op == "call_method" and node.target == "softmax")
                or isinstance(self.module(node), nn.Softmax))

    def is_conv(self, node: fx.Node) -> bool:
        return ((node.op == "call_function" and node.target in _CONV_FUNCTIONS)
                or isinstance(self.module(node), _CONV_MODULES))


# ---------------------------------------------------------------- plan records


@dataclass
class DropoutSite:
    """One dropout the pass found, and what it decided.

    ``plan``: "chain" (between two Linears), "output" (after the last Linear of a chain), "input"
    (before the first), "tile_linear", "unit_dropout", or None when left as is. ``reason`` says why.
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
    input_dropout: bool
    output_dropout: bool
    family: str
    input_shared: bool = False  # the input dropout has other users: they get the masked input too


@dataclass
class TilePlan:
    site: DropoutSite
    dropout: DropoutCall
    linear: LinearCall


@dataclass
class UnitPlan:
    site: DropoutSite
    dropout: DropoutCall


@dataclass
class LSTMInputPlan:
    """``Dropout -> nn.LSTM``: the dropout becomes the LSTM's input site (:mod:`fxdrop.lstm`)."""

    site: DropoutSite
    dropout: DropoutCall
    lstm: fx.Node


@dataclass
class Plan:
    sites: list[DropoutSite] = field(default_factory=list)
    lstm_inputs: list[LSTMInputPlan] = field(default_factory=list)
    chains: list[ChainPlan] = field(default_factory=list)
    tiles: list[TilePlan] = field(default_factory=list)
    units: list[UnitPlan] = field(default_factory=list)


# ---------------------------------------------------------------- planning

RateOption = float | None | Mapping[str, float] | Callable[[str], float | None]
FamilyOption = str | Mapping[str, str] | Callable[[str], str]


def _per_site(option: Any, name: str, default: Any) -> Any:
    if callable(option) and not isinstance(option, (str, float, int)):
        value = option(name)
        return default if value is None else value
    if isinstance(option, Mapping):
        return option.get(name, default)
    return default if option is None else option


def site_rate(option: RateOption, name: str, own: float) -> float:
    return _per_site(option, name, own)


def site_family(option: FamilyOption, name: str) -> str:
    family = _per_site(option, name, "row")
    if family not in FAMILIES:
        raise ValueError(f"dropout site {name!r}: unknown pattern family {family!r}; expected one of "
                         f"{', '.join(FAMILIES)}")
    return family


def _describe(g: NormalisedGraph, node: fx.Node) -> str:
    if node.op in ("call_module", "get_attr"):
        return g.qualify(node.target)
    if node.op == "placeholder":
        return f"input {node.target}"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({name})"


def site_names(g: NormalisedGraph, prefix: str = "") -> dict[fx.Node, str]:
    """Qualified module name for module dropouts (``name:k`` for its k-th extra call), node name else."""
    names: dict[fx.Node, str] = {}
    calls: dict[str, int] = {}
    for node, dropout in g.dropouts.items():
        base = dropout.module if dropout.module is not None else node.name
        k = calls.get(base, 0)
        calls[base] = k + 1
        name = base if k == 0 else f"{base}:{k}"
        names[node] = f"{prefix}.{name}" if prefix else name
    return names


def plan_graph(g: NormalisedGraph, *, p: RateOption = None, pattern: FamilyOption = "row",
               region: str = "") -> Plan:
    """Decide, for every dropout of the graph, whether and how it is converted."""
    names = site_names(g, region)
    plan = Plan()
    producer: dict[fx.Node, tuple[LinearCall, str]] = {}  # dropout -> (Linear, activation)
    consumer: dict[fx.Node, LinearCall] = {}  # dropout -> its only user, a Linear
    unit_candidates: list[DropoutCall] = []
    shared: set[fx.Node] = set()  # input sites whose dropout has other users besides the Linear
    site_of: dict[fx.Node, DropoutSite] = {}

    for node, dropout in g.dropouts.items():
        name = names[node]
        own = dropout.p if isinstance(dropout.p, (int, float)) and not isinstance(dropout.p, bool) else None
        rate = site_rate(p, name, own) if own is not None else None
        site = DropoutSite(name=name, p=rate, kind=dropout.kind, producer=None, consumer=None, converted=False,
                           reason="", region=region, node=node.name)
        plan.sites.append(site)
        site_of[node] = site
        source = dropout.input
        site.producer = _describe(g, source)
        users = g.users(node)
        site.consumer = ", ".join(_describe(g, u) for u in users) if users else None
        found = _find_producer(g, dropout)
        if found is not None:
            site.producer = found[0].label if found[1] == "none" else f"{found[0].label} -> {found[1]}"
        only = g.only_user(node)
        linear_user = g.linears.get(only) if only is not None else None
        if linear_user is not None and linear_user.input is not node:
            linear_user = None

        reason = _unsupported(g, dropout, rate)
        if reason is None and dropout.inplace and len(g.users(source)) > 1:
            reason = "in-place dropout whose input has other users: they see the dropped values"
        if reason is None:
            family = site_family(pattern, name)
            site.family = family
            lstm_user = only if only in g.lstms and only.args and only.args[0] is node else None
            if lstm_user is not None:
                reason = _lstm_input_blocker(g, lstm_user, family)
                if reason is None:
                    site.units = g.lstms[lstm_user].input_size
                    site.consumer = g.qualify(lstm_user.target)
                    site.plan, site.converted = "lstm_input", True
                    site.reason = f"input site of {site.consumer}: its input GEMM shrinks"
                    plan.lstm_inputs.append(LSTMInputPlan(site, dropout, lstm_user))
                    continue
            elif family == "tile":
                if linear_user is None:
                    reason = "the tile family needs the dropout to feed exactly one Linear"
                elif linear_user.in_features is None or linear_user.out_features is None:
                    reason = "the consuming Linear's weight shape is unknown"
                else:
                    site.weight_shape = (linear_user.out_features, linear_user.in_features)
                    site.plan, site.converted = "tile_linear", True
                    site.reason = f"DropConnect on {linear_user.label}'s weight, tile granularity"
                    plan.tiles.append(TilePlan(site, dropout, linear_user))
                    continue
            else:
                if found is not None and found[0].out_features is not None:
                    producer[node] = found
                if linear_user is not None and linear_user.in_features is not None:
                    consumer[node] = linear_user
                if node not in producer and node not in consumer:
                    linear_users = [g.linears[u] for u in users if u in g.linears and g.linears[u].input is node]
                    if linear_users and linear_users[0].in_features is not None:
                        # One pattern for every user: the Linear reads the kept units only (chain input
                        # site), the others get the masked tensor from the same op.
                        consumer[node] = linear_users[0]
                        shared.add(node)
                        unit_candidates.append(dropout)
                        continue
                    reason = _why_no_linear(g, dropout, users)
                else:
                    unit_candidates.append(dropout)
                    continue
        site.reason = reason

    _plan_chains(g, plan, unit_candidates, producer, consumer, site_of, shared)
    return plan


def _unsupported(g: NormalisedGraph, dropout: DropoutCall, rate: float | None) -> str | None:
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
        return "the training flag is computed, not the module's mode"
    if rate is None:
        return "the drop rate is not a constant (or the module overrides forward or has hooks)"
    if rate == 0:
        return "p = 0: nothing is dropped, nothing to save"
    if g.is_softmax(dropout.input):
        return "dropout on attention probabilities: structured masks would drop whole keys"
    return None


def _lstm_input_blocker(g: NormalisedGraph, node: fx.Node, family: str) -> str | None:
    module = g.lstms[node]
    if type(module) is not nn.LSTM:
        return f"feeds {type(module).__name__}, not exactly nn.LSTM (a subclass may override forward)"
    if family not in UNIT_FAMILIES:
        return "an LSTM input site masks units: the tile family does not apply"
    if sum(1 for n in g.lstms if n.target == node.target) > 1:
        return f"{node.target} is called more than once; an input site would apply to every call"
    if "forward" in module.__dict__ or module._forward_hooks or module._forward_pre_hooks:
        return f"{node.target} has hooks or an overridden forward"
    return None


def _why_no_linear(g: NormalisedGraph, dropout: DropoutCall, users: list[fx.Node]) -> str:
    if any(g.is_conv(u) for u in users):
        return "dropout feeding a convolution: its units are channels, not the last dim"
    if not users:
        return "the dropout's output is unused"
    return "no Linear produces or consumes it: nothing to shrink"


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


def _plan_chains(g: NormalisedGraph, plan: Plan, candidates: list[DropoutCall],
                 producer: dict[fx.Node, tuple[LinearCall, str]], consumer: dict[fx.Node, LinearCall],
                 site_of: dict[fx.Node, DropoutSite], shared: set[fx.Node]) -> None:
    """Maximal runs: a path graph alternating Linear and dropout nodes (each has <= 1 in and out edge)."""
    links = nx.DiGraph()
    for dropout in candidates:
        node = dropout.node
        links.add_node(node)
        if node in producer:
            links.add_edge(producer[node][0].node, node)
        if node in consumer:
            links.add_edge(node, consumer[node].node)
    # A Linear between two sites of different families cannot be in one chain op: cut its input edge.
    for dropout in candidates:
        node = dropout.node
        if node in consumer:
            after = [s for s in links.successors(consumer[node].node)]
            if after and site_of[after[0]].family != site_of[node].family:
                links.remove_edge(node, consumer[node].node)
    for component in nx.weakly_connected_components(links):
        path = list(nx.topological_sort(links.subgraph(component)))
        linears = [g.linears[n] for n in path if n in g.linears]
        drops = [g.dropouts[n] for n in path if n in g.dropouts]
        if not linears:  # a lone site whose consumer edge was cut, without producer
            site = site_of[drops[0].node]
            site.units = consumer[drops[0].node].in_features
            site.plan, site.converted = "unit_dropout", True
            site.reason = "several users or a family change: one unit mask, no GEMM shrinks"
            plan.units.append(UnitPlan(site, drops[0]))
            continue
        input_dropout = path[0] in g.dropouts
        output_dropout = path[-1] in g.dropouts
        activations = [producer[d.node][1] for d in drops if d.node in producer]
        sites = [site_of[d.node] for d in drops]
        for i, (site, dropout) in enumerate(zip(sites, drops)):
            node = dropout.node
            if input_dropout and i == 0:
                site.plan, site.units = "input", consumer[node].in_features
                site.reason = f"input-structured {consumer[node].label}"
                if node in shared:
                    site.reason += "; its other users get the same mask"
            elif output_dropout and i == len(drops) - 1:
                site.plan, site.units = "output", producer[node][0].out_features
                site.reason = f"output-structured {producer[node][0].label}, scattered to full width"
            else:
                site.plan, site.units = "chain", producer[node][0].out_features
                site.reason = f"{producer[node][0].label} -> {consumer[node].label}: both GEMMs shrink"
            site.converted = True
            if len(linears) > 1:
                site.reason += f" (one chain of {len(linears)} Linears)"
        plan.chains.append(ChainPlan(linears, activations, sites, drops, input_dropout, output_dropout,
                                     sites[0].family, input_shared=input_dropout and path[0] in shared))


__all__ = ["ActivationCall", "ChainPlan", "DropoutCall", "DropoutSite", "LSTMInputPlan", "LinearCall",
           "NormalisedGraph", "Plan",
           "TilePlan", "UnitPlan", "plan_graph", "site_family", "site_names", "site_rate"]
