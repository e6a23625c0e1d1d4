"""Apply a plan: each matched subgraph becomes one ``call_module`` to a replacement module.

The replacement modules live under one new child, ``fxdrop`` (they hold no parameters, so the
state_dict is unchanged); weights and biases reach them as ``get_attr`` nodes of the original
Linears' own Parameters. The matched nodes have no users outside the match (the planner checked),
so they are erased once the replacement has taken over their output. Every applied rewrite bumps
a named counter (:data:`COUNTERS`) that tests read.

Imports torch, networkx, fxdrop.modules, fxdrop.site and the plan records of :mod:`.find`.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Callable

import networkx as nx
from torch import fx, nn

from ..modules import StructuredChain, TileLinear, UnitDropout
from ..site import Site
from .find import ChainPlan, DropoutSite, LinearCall, LSTMInputPlan, Plan
from .trace import get_path, set_submodule

CONTAINER = "fxdrop"
COUNTERS: Counter = Counter()


def _param_node(graph: fx.Graph, value) -> fx.Node:
    return graph.get_attr(value) if isinstance(value, str) else value


def _linear_params(graph: fx.Graph, linear: LinearCall) -> list[fx.Node]:
    params = [_param_node(graph, linear.weight)]
    if linear.bias is not None:
        params.append(_param_node(graph, linear.bias))
    return params


def _install(gm: fx.GraphModule, name: str, module: nn.Module) -> str:
    if CONTAINER not in gm._modules:
        gm.add_module(CONTAINER, nn.Module())
    getattr(gm, CONTAINER).add_module(name, module)
    return f"{CONTAINER}.{name}"


def _replace(graph: fx.Graph, matched: list[fx.Node], output: fx.Node, build: Callable[[], fx.Node],
             reroute: Callable[[fx.Node], None] | None = None,
             renamed: dict[fx.Node, fx.Node] | None = None) -> None:
    """Insert the replacement after the last matched node, reroute ``output``'s users (and, through
    ``reroute``, any other outside users of matched nodes), erase the match. ``renamed`` records
    ``output -> replacement`` for later replacements whose planned input was ``output``."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    last = max(matched, key=order.__getitem__)
    with graph.inserting_before(last.next):
        new = build()
    if reroute is not None:
        new = reroute(new)
    output.replace_all_uses_with(new)
    if renamed is not None:
        renamed[output] = new
    for node in sorted(matched, key=order.__getitem__, reverse=True):
        graph.erase_node(node)


def topological_order(graph: fx.Graph) -> None:
    """Restore def-before-use after a rewrite that gave earlier nodes a later definition (a shared
    input dropout whose other users come before the Linear): a stable topological sort."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    uses = nx.DiGraph()
    uses.add_nodes_from(graph.nodes)
    uses.add_edges_from((source, node) for node in graph.nodes for source in node.all_input_nodes)
    ordered = list(nx.lexicographical_topological_sort(uses, key=order.__getitem__))
    if ordered == list(graph.nodes):
        return
    previous = ordered[0]
    for node in ordered[1:]:
        previous.append(node)
        previous = node


def chain_nodes(chain: ChainPlan) -> list[fx.Node]:
    """Every node the chain replaces: its Linears, its dropouts, and the activation before each
    dropout that follows a Linear of the chain."""
    linear_nodes = [linear.node for linear in chain.linears]
    nodes = list(linear_nodes)
    for i, dropout in enumerate(chain.dropouts):
        nodes.append(dropout.node)
        if not (chain.input_dropout and i == 0) and dropout.input not in linear_nodes:
            nodes.append(dropout.input)
    return nodes


MakeLSTM = Callable[[LSTMInputPlan, nn.LSTM], nn.Module]


def apply_plan(gm: fx.GraphModule, plan: Plan, make_site: Callable[[DropoutSite], Site],
               make_lstm: MakeLSTM | None = None) -> bool:
    """Rewrite ``gm`` in place; returns whether anything changed.

    ``make_site`` builds the runtime Site of a plan record; ``make_lstm`` the structured LSTM that
    replaces an ``nn.LSTM`` fed by a planned input site (same parameter names, so the same keys).
    """
    graph = gm.graph
    changed = False
    # A planned input may be the output of an earlier replacement (a chain that ends in a dropout
    # feeding the next chain): read the node that replaced it.
    renamed: dict[fx.Node, fx.Node] = {}

    def current(node: fx.Node) -> fx.Node:
        while node in renamed:
            node = renamed[node]
        return node

    for lstm_input in plan.lstm_inputs if make_lstm is not None else ():
        node = lstm_input.lstm
        set_submodule(gm, node.target, make_lstm(lstm_input, get_path(gm, node.target)))
        node.args = (lstm_input.dropout.input, *node.args[1:])
        graph.erase_node(lstm_input.dropout.node)
        COUNTERS["lstm_input"] += 1
        changed = True
    for index, chain in enumerate(plan.chains):
        sites = [make_site(s) for s in chain.sites]
        module = StructuredChain(sites, family=chain.family, activations=chain.activations,
                                 has_bias=[l.bias is not None for l in chain.linears],
                                 input_dropout=chain.input_dropout, output_dropout=chain.output_dropout,
                                 scale=sites[0].scale, linears=[l.label for l in chain.linears],
                                 share_input=chain.input_shared)
        target = _install(gm, f"chain_{index}", module)
        source = chain.dropouts[0].input if chain.input_dropout else chain.linears[0].input
        output = chain.dropouts[-1].node if chain.output_dropout else chain.linears[-1].node

        def build(chain=chain, target=target, source=source):
            params = [p for linear in chain.linears for p in _linear_params(graph, linear)]
            return graph.call_module(target, (current(source), *params))

        def share(new: fx.Node, chain=chain) -> fx.Node:
            """``(y, dropped x)``: the dropout's other users read the dropped input."""
            with graph.inserting_after(new):
                y = graph.call_function(operator.getitem, (new, 0))
            with graph.inserting_after(y):
                dropped = graph.call_function(operator.getitem, (new, 1))
            first = chain.linears[0].node
            chain.dropouts[0].node.replace_all_uses_with(dropped, delete_user_cb=lambda user: user is not first)
            return y

        _replace(graph, chain_nodes(chain), output, build, share if chain.input_shared else None, renamed)
        COUNTERS["chain"] += 1
        changed = True
    for index, tile in enumerate(plan.tiles):
        site = make_site(tile.site)
        target = _install(gm, f"tile_{index}", TileLinear(site, has_bias=tile.linear.bias is not None,
                                                           linear=tile.linear.label))

        def build(tile=tile, target=target):
            return graph.call_module(target, (current(tile.dropout.input), *_linear_params(graph, tile.linear)))

        _replace(graph, [tile.dropout.node, tile.linear.node], tile.linear.node, build, renamed=renamed)
        COUNTERS["tile_linear"] += 1
        changed = True
    for index, unit in enumerate(plan.units):
        site = make_site(unit.site)
        target = _install(gm, f"unit_{index}", UnitDropout(site))

        def build(unit=unit, target=target):
            return graph.call_module(target, (current(unit.dropout.input),))

        _replace(graph, [unit.dropout.node], unit.dropout.node, build, renamed=renamed)
        COUNTERS["unit_dropout"] += 1
        changed = True
    if changed:
        topological_order(graph)
        graph.lint()
        gm.recompile()
    return changed
