"""Normalisation: every node of an fx graph seen as a Linear, an activation, a dropout, an RNN or other.

Whatever its form, a node becomes one of these calls:

* ``linear(x, W, b)``   ``nn.Linear`` modules, ``F.linear`` / ``torch._C._nn.linear`` / ``aten.linear``;
  transformers' ``Conv1D`` (a leaf call in our traces; ``view -> addmm -> view`` in Dynamo's graphs),
  whose weight is ``(in, out)``: read transposed;
* ``activation(name)``  activation modules, functions and tensor methods (:mod:`fxdrop.ops.activations`);
* ``dropout(p)``        ``nn.Dropout*`` modules, ``F.dropout``, ``torch.dropout(_)``, ``aten.dropout``;
* ``rnn``               ``nn.LSTM`` / ``nn.GRU`` calls (their inter-layer sites are planned apart);

so the same planner runs on module-level graphs (our tracer) and on functional graphs (Dynamo, where
weights are graph inputs). ``nn.Identity`` calls are removed from our own graphs first
(:func:`drop_identities`): ``Linear -> Identity (a disabled norm) -> Dropout`` is a chain link.

Imports torch, networkx, fxdrop's activations and the trace helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import fx, nn

from ..ops.activations import function_activation, module_activation
from .trace import MODE_ATTR, get_path, linear_like


@dataclass(frozen=True)
class LinearCall:
    """``y = x @ W^T + b``: ``weight``/``bias`` are graph values (Node), attribute paths (str) or None.

    ``transposed``: the stored weight is ``(in, out)`` (Conv1D). ``nodes``: every node the call is made
    of (``node`` last), which a rewrite erases."""

    node: fx.Node
    input: fx.Node
    weight: fx.Node | str
    bias: fx.Node | str | None
    in_features: int | None
    out_features: int | None
    label: str
    transposed: bool = False
    nodes: tuple[fx.Node, ...] = ()


@dataclass(frozen=True)
class ActivationCall:
    node: fx.Node
    input: fx.Node
    name: str


@dataclass(frozen=True)
class DropoutCall:
    """``kind``: dropout, dropout1d/2d/3d, alpha_dropout, feature_alpha_dropout.
    ``training``: "mode" (follows a module's mode), True (always on), False (never) or None (computed).
    ``module``: the Dropout module's path for module dropouts; ``caller``: the path of the module whose
    forward made the call (relative to the graph's root)."""

    node: fx.Node
    input: fx.Node
    p: Any
    kind: str
    inplace: bool
    training: Any
    module: str | None
    caller: str = ""


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
CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
RNN_MODULES = (nn.LSTM, nn.GRU)
_VIEWS = ("view", "reshape")


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: tuple) -> dict[str, Any]:
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for name, default in zip(names[len(names) - len(defaults):], defaults):
        bound.setdefault(name, default)
    return bound


def plain_module(module: nn.Module, forward) -> bool:
    """The module runs exactly ``forward`` of its class: no override, no hooks at conversion time."""
    return (type(module).forward is forward and "forward" not in module.__dict__ and not module._forward_hooks
            and not module._forward_pre_hooks)


def shape_of(value: Any) -> tuple[int, ...] | None:
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


def drop_identities(graph: fx.Graph, root: nn.Module) -> None:
    """Remove calls of ``nn.Identity`` modules without hooks: they return their input."""
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = get_path(root, node.target)
        if type(module) is nn.Identity and not module._forward_hooks and not module._forward_pre_hooks:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)


class NormalisedGraph:
    """Each node of ``graph`` seen as a Linear, an activation, a dropout, an RNN or something else.

    ``root`` resolves ``call_module``/``get_attr`` targets (None for purely functional graphs).
    ``constant_training_follows_mode``: Dynamo specialises ``self.training`` into a constant and
    guards on it, so there a constant ``True``/``False`` flag means "the mode" (our own traces rewire
    mode flags to ``get_attr("...training")`` instead, and a constant means a constant).
    ``scope(node)`` names the module whose forward made a node (relative to ``root``).
    """

    def __init__(self, graph: fx.Graph, root: nn.Module | None = None, *,
                 constant_training_follows_mode: bool = False, prefix: str = "", scope=None):
        self.prefix = prefix  # qualifies module names in labels (the region's name in the whole model)
        self.graph = graph
        self.root = root
        self.constant_training_follows_mode = constant_training_follows_mode
        self._scope = scope
        self.linears: dict[fx.Node, LinearCall] = {}
        self.activations: dict[fx.Node, ActivationCall] = {}
        self.dropouts: dict[fx.Node, DropoutCall] = {}
        self.rnns: dict[fx.Node, nn.Module] = {}  # call_module nodes of nn.LSTM / nn.GRU (or subclasses)
        for node in graph.nodes:
            self._classify(node)
        self.def_use = nx.DiGraph()
        for node in graph.nodes:
            self.def_use.add_node(node)
            for user in node.users:
                self.def_use.add_edge(node, user)

    def qualify(self, target: str) -> str:
        return f"{self.prefix}.{target}" if self.prefix and target else (self.prefix or target)

    def scope(self, node: fx.Node) -> str:
        if self._scope is not None:
            return self._scope(node)
        from .trace import node_scope
        return node_scope(node)

    def module(self, node: fx.Node) -> nn.Module | None:
        if node.op != "call_module" or self.root is None:
            return None
        return get_path(self.root, node.target)

    def value(self, node: Any) -> Any:
        """The tensor a ``get_attr`` node names (for widths), or the node itself."""
        if isinstance(node, fx.Node) and node.op == "get_attr" and self.root is not None:
            try:
                return get_path(self.root, node.target)
            except AttributeError:
                return None
        return node

    def _classify(self, node: fx.Node) -> None:
        if node.op == "call_module":
            self._classify_module(node)
        elif node.op in ("call_function", "call_method"):
            if not node.args or not isinstance(node.args[0], fx.Node):
                return
            if self._classify_addmm_view(node):
                return
            target = node.target
            if node.op == "call_function" and target in _LINEAR_FUNCTIONS:
                bound = _bind(node.args, node.kwargs, ("input", "weight", "bias"), (None,))
                weight, bias = bound.get("weight"), bound.get("bias")
                if not isinstance(weight, fx.Node) or not (bias is None or isinstance(bias, fx.Node)):
                    return
                shape = shape_of(self.value(weight))
                out_features, in_features = shape if shape is not None and len(shape) == 2 else (None, None)
                self.linears[node] = LinearCall(node, bound["input"], weight, bias, in_features, out_features,
                                                node.name, nodes=(node,))
            elif node.op == "call_function" and target in _DROPOUT_FUNCTIONS:
                kind, names, defaults, always_inplace = _DROPOUT_FUNCTIONS[target]
                bound = _bind(node.args, node.kwargs, names, defaults)
                training = bound.get("training", bound.get("train"))
                if isinstance(training, fx.Node):
                    training = "mode" if (training.op == "get_attr" and
                                          training.target.rpartition(".")[2] == MODE_ATTR) else None
                elif training is True and self.constant_training_follows_mode:
                    training = "mode"
                self.dropouts[node] = DropoutCall(node, bound["input"], bound.get("p"), kind,
                                                  always_inplace or bool(bound.get("inplace", False)), training,
                                                  None, self.scope(node))
            else:
                name = function_activation(target, node.args, node.kwargs, method=node.op == "call_method")
                if name is not None:
                    self.activations[node] = ActivationCall(node, node.args[0], name)

    def _classify_module(self, node: fx.Node) -> None:
        module = self.module(node)
        if module is None or not node.args or not isinstance(node.args[0], fx.Node):
            return
        if isinstance(module, RNN_MODULES):
            self.rnns[node] = module
        if node.kwargs or len(node.args) != 1:
            return
        if isinstance(module, nn.Linear) and plain_module(module, nn.Linear.forward):
            self.linears[node] = LinearCall(node, node.args[0], f"{node.target}.weight",
                                            f"{node.target}.bias" if module.bias is not None else None,
                                            module.in_features, module.out_features, self.qualify(node.target),
                                            nodes=(node,))
        elif linear_like(module) and plain_module(module, type(module).forward):
            in_features, out_features = module.weight.shape
            self.linears[node] = LinearCall(node, node.args[0], f"{node.target}.weight",
                                            f"{node.target}.bias" if getattr(module, "bias", None) is not None
                                            else None, in_features, out_features, self.qualify(node.target),
                                            transposed=True, nodes=(node,))
        elif type(module) in _DROPOUT_MODULES:
            plain = plain_module(module, type(module).forward)
            self.dropouts[node] = DropoutCall(node, node.args[0], module.p if plain else None,
                                              _DROPOUT_MODULES[type(module)], bool(module.inplace), "mode",
                                              node.target, self.scope(node))
        elif not module._forward_hooks and not module._forward_pre_hooks:
            name = module_activation(module)
            if name is not None:
                self.activations[node] = ActivationCall(node, node.args[0], name)

    def _classify_addmm_view(self, node: fx.Node) -> bool:
        """Dynamo's form of transformers' Conv1D: ``view(addmm(b, view(x, (-1, K)), W), size)``."""
        if not _is_view(node):
            return False
        addmm = node.args[0]
        if not (isinstance(addmm, fx.Node) and addmm.op == "call_function" and addmm.target is torch.addmm
                and len(addmm.args) == 3 and not addmm.kwargs and len(addmm.users) == 1):
            return False
        bias, flat, weight = addmm.args
        if not (isinstance(flat, fx.Node) and _is_view(flat) and len(flat.users) == 1
                and isinstance(flat.args[0], fx.Node) and isinstance(weight, fx.Node) and isinstance(bias, fx.Node)):
            return False
        x = flat.args[0]
        shape_x, shape_w, shape_y = shape_of(x), shape_of(self.value(weight)), shape_of(node)
        if shape_x is None or shape_w is None or shape_y is None or len(shape_w) != 2:
            return False
        in_features, out_features = shape_w
        if shape_x[-1] != in_features or shape_y != shape_x[:-1] + (out_features,):
            return False
        self.linears[node] = LinearCall(node, x, weight, bias, in_features, out_features, addmm.name,
                                        transposed=True, nodes=(flat, addmm, node))
        return True

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
        return ((node.op == "call_function" and node.target in CONV_FUNCTIONS)
                or isinstance(self.module(node), CONV_MODULES))

    def describe(self, node: fx.Node) -> str:
        if node.op in ("call_module", "get_attr"):
            module = self.module(node) if node.op == "call_module" else None
            kind = f" ({type(module).__name__})" if module is not None else ""
            return self.qualify(node.target) + kind
        if node.op == "placeholder":
            return f"input {node.target}"
        if node in self.linears:
            return self.linears[node].label
        name = getattr(node.target, "__name__", str(node.target))
        return f"{node.name} ({name})"


def _is_view(node: fx.Node) -> bool:
    return ((node.op == "call_method" and node.target in _VIEWS)
            or (node.op == "call_function" and node.target in (torch.reshape, torch.Tensor.view, torch.Tensor.reshape)))


__all__ = ["ActivationCall", "DropoutCall", "LinearCall", "NormalisedGraph", "drop_identities", "plain_module",
           "shape_of"]
