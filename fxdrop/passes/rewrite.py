"""Apply a plan to a graph: the one graph surgery, for both conversion paths, with an emitter for the new nodes.

:func:`apply_plan` replaces each planned subgraph (a chain, a tile Linear, a unit dropout, an RNN
input site) by what an :class:`Emitter` inserts, reroutes the users of its output (and, for a shared
input dropout, the dropout's other users, to the masked input of the same draw), erases the matched
nodes and restores def-before-use. The planner has checked that matched nodes have no other users.
Two emitters exist: :class:`fxdrop.modules.region.ModuleEmitter` (``fxdrop.convert``: calls of
structured callables inside a region's program) and :class:`fxdrop.backend.FunctionalEmitter`
(``backend="fxdrop"``: op calls with each site's state as extra graph inputs). Every applied rewrite
bumps a named counter in :data:`COUNTERS` (``reset_counters()`` clears it; the backend also adds to
Dynamo's ``counters["fxdrop"]``).

Imports torch, networkx and the plan records.
"""

from __future__ import annotations

import operator
from collections import Counter
from typing import Protocol

import networkx as nx
from torch import fx

from .normalise import LinearCall
from .plan import ChainPlan, Plan, RNNInputPlan, TilePlan, UnitPlan

COUNTERS: Counter = Counter()


def reset_counters() -> None:
    COUNTERS.clear()


class Emitter(Protocol):
    """What a conversion path inserts. Each method is called with the graph's insertion point set."""

    def param(self, graph: fx.Graph, value: fx.Node | str) -> fx.Node: ...

    def chain(self, graph: fx.Graph, chain: ChainPlan, source: fx.Node, params: list[fx.Node]
              ) -> tuple[fx.Node, fx.Node | None]:
        """The chain's output, and (when ``chain.input_shared``) the masked input of the same draw."""

    def tile(self, graph: fx.Graph, tile: TilePlan, source: fx.Node, params: list[fx.Node]) -> fx.Node: ...

    def unit(self, graph: fx.Graph, unit: UnitPlan, source: fx.Node) -> fx.Node: ...

    def rnn_input(self, graph: fx.Graph, rnn_input: RNNInputPlan, source: fx.Node) -> fx.Node | None:
        """The node that replaces the RNN call, or None when this path cannot take RNN input sites."""


def linear_params(emitter: Emitter, graph: fx.Graph, linear: LinearCall) -> list[fx.Node]:
    params = [emitter.param(graph, linear.weight)]
    if linear.bias is not None:
        params.append(emitter.param(graph, linear.bias))
    return params


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


def apply_plan(graph: fx.Graph, plan: Plan, emitter: Emitter) -> list:
    """Rewrite ``graph`` in place; returns the rewrites applied (an RNN input site the emitter declines
    stays as it was)."""
    applied = []
    # A planned input may be a value an earlier rewrite replaced (a chain ending in a dropout that feeds
    # the next chain, a shared dropout feeding another site): read what replaced it.
    replaced: dict[fx.Node, fx.Node] = {}

    def current(node: fx.Node) -> fx.Node:
        while node in replaced:
            node = replaced[node]
        return node

    order = {n: i for i, n in enumerate(graph.nodes)}
    for rewrite in sorted(plan.rewrites, key=lambda r: max(order[n] for n in r.nodes)):
        matched = sorted(set(rewrite.nodes), key=order.__getitem__)
        last = matched[-1]
        shared = None
        with graph.inserting_before(last.next):
            if isinstance(rewrite, ChainPlan):
                params = [p for linear in rewrite.linears for p in linear_params(emitter, graph, linear)]
                new, shared = emitter.chain(graph, rewrite, current(rewrite.source), params)
                output = rewrite.output
            elif isinstance(rewrite, TilePlan):
                new = emitter.tile(graph, rewrite, current(rewrite.dropout.input),
                                   linear_params(emitter, graph, rewrite.linear))
                output = rewrite.linear.node
            elif isinstance(rewrite, UnitPlan):
                new = emitter.unit(graph, rewrite, current(rewrite.dropout.input))
                output = rewrite.dropout.node
            else:
                new = emitter.rnn_input(graph, rewrite, current(rewrite.dropout.input))
                if new is None:
                    continue
                output = rewrite.rnn
        if shared is not None:
            first = rewrite.linears[0].node if isinstance(rewrite, ChainPlan) else None
            head = rewrite.dropouts[0].node
            head.replace_all_uses_with(shared, delete_user_cb=lambda user: user is not first)
            replaced[head] = shared
        output.replace_all_uses_with(new)
        new.meta.update({k: v for k, v in output.meta.items() if k in ("nn_module_stack", "stack_trace")})
        replaced[output] = new
        for node in reversed(matched):
            graph.erase_node(node)
        kind = {ChainPlan: "chain", TilePlan: "tile_linear", UnitPlan: "unit_dropout",
                RNNInputPlan: "rnn_input"}[type(rewrite)]
        COUNTERS[kind] += 1
        applied.append(rewrite)
    if applied:
        topological_order(graph)
        graph.lint()
    return applied


def tuple_outputs(graph: fx.Graph, node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """``(node[0], node[1])`` as getitem nodes right after ``node``."""
    with graph.inserting_after(node):
        first = graph.call_function(operator.getitem, (node, 0))
    with graph.inserting_after(first):
        second = graph.call_function(operator.getitem, (node, 1))
    return first, second


__all__ = ["COUNTERS", "Emitter", "apply_plan", "linear_params", "reset_counters", "topological_order",
           "tuple_outputs"]
