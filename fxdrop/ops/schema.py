"""The ``fxdrop`` op schemas: declared here once, and nowhere else (C++ registers kernels only).

Patterns reach the ops as int64 CPU tensors ``[dp, offset]`` (stacked ``(k, 2)`` for k sites), so
torch.compile never specialises on the drawn values. Imports only torch.
"""

from __future__ import annotations

import torch

NAMESPACE = "fxdrop"

SCHEMAS = {
    # Draws the next pattern [dp, offset] of a PatternScheduler stream and advances its state (or, in a
    # checkpoint's recomputation, draws the remembered one again: fxdrop.scheduler).
    "sample_pattern": "sample_pattern(Tensor(a!) state, Tensor cdf) -> Tensor",
    # Draws the next row-class plan (classes, 2) of a stream: row r uses plan[r mod classes].
    "sample_classes": "sample_classes(Tensor(a!) state, Tensor cdf, int classes, int position=0) -> Tensor",
    # x * unit mask along the last dim; pattern (2,), or (classes, 2) with row r using class r mod classes.
    "unit_dropout": "unit_dropout(Tensor x, Tensor pattern, str family, str scale, float p) -> Tensor",
    # [dropout ->] Linear -> act -> dropout -> Linear ... [-> act -> dropout]; returns y and the
    # compact tensors saved for backward. ``biases`` holds the biases that exist, ``has_bias`` says
    # which Linear has one (a ``Tensor?[]`` input gets no gradient through register_autograd).
    # ``patterns`` is (sites, 2), one pattern set for every row, or (classes, sites, 2): row r of x
    # (flattened to 2-D) uses class r mod classes (strided row sets, so nothing is gathered).
    "chain": ("chain(Tensor x, Tensor[] weights, Tensor[] biases, bool[] has_bias, Tensor patterns, str family, "
              "str[] activations, bool input_dropout, bool output_dropout, str scale, float[] rates) "
              "-> (Tensor, Tensor[])"),
    # Gradients of chain: (grad_x, grad_weights, grad_biases of the biases that are present).
    "chain_backward": ("chain_backward(Tensor grad_y, Tensor x, Tensor[] weights, Tensor[] biases, bool[] has_bias, "
                       "Tensor patterns, Tensor[] saved, str family, str[] activations, bool input_dropout, "
                       "bool output_dropout, str scale, float[] rates, bool needs_input_grad) "
                       "-> (Tensor, Tensor[], Tensor[])"),
    # x @ (W * tile mask)^T + b on the kept tiles only.
    "tile_linear": ("tile_linear(Tensor x, Tensor weight, Tensor? bias, Tensor pattern, int tile, str scale, "
                    "float p) -> Tensor"),
    "tile_linear_backward": ("tile_linear_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor pattern, "
                             "int tile, str scale, float p, bool has_bias) -> (Tensor, Tensor, Tensor)"),
}

LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)
