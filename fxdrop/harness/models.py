"""The reference models: the one definition of each, imported by the demo, the benchmarks, the examples
and the tests.

* :func:`mnist_mlp`: the paper's MNIST classifier, ``784 -> h (x hidden_layers) -> 10`` with ReLU and
  Dropout(p) after each hidden layer (Song et al. 2019, the MNIST MLP experiment).
* :class:`WordLM`: the word-level Penn Treebank LM of Zaremba et al. (2014) and PyTorch's
  word_language_model: Embedding -> Dropout -> LSTM (dropout between layers) -> Dropout -> Linear.
* :func:`without_dropout`: a model with every dropout rate 0, the no-dropout reference of the quality runs.

Imports torch only.
"""

from __future__ import annotations

from torch import nn


def mnist_mlp(width: int, p: float, *, hidden_layers: int = 3, in_features: int = 784,
              classes: int = 10) -> nn.Sequential:
    """``in -> width (x hidden_layers) -> classes``, ReLU + Dropout(p) after each hidden layer."""
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"p must be a drop rate in [0, 1), got {p!r}")
    layers: list[nn.Module] = []
    features = in_features
    for _ in range(hidden_layers):
        layers += [nn.Linear(features, width), nn.ReLU(), nn.Dropout(p)]
        features = width
    layers.append(nn.Linear(features, classes))
    return nn.Sequential(*layers)


def without_dropout(model: nn.Module) -> nn.Module:
    """``model`` itself with every dropout rate set to 0 (``nn.Dropout`` modules and the inter-layer dropout
    of ``nn.LSTM``/``GRU``/``RNN``): the no-dropout reference of the quality runs, same weights."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(module, nn.RNNBase):
            module.dropout = 0.0
    return model


class WordLM(nn.Module):
    """Embedding -> Dropout -> LSTM(dropout between layers) -> Dropout -> Linear decoder.

    ``tokens: (T, B)`` int64 -> logits ``(T, B, vocab)`` and the new ``(h, c)``. Zaremba et al.'s
    "medium" model is ``hidden=650, layers=2, p=0.5`` with uniform init in ``[-0.05, 0.05]``.
    """

    def __init__(self, vocab: int, hidden: int = 650, layers: int = 2, p: float = 0.5, init: float = 0.05):
        super().__init__()
        self.encoder = nn.Embedding(vocab, hidden)
        self.drop_in = nn.Dropout(p)
        self.rnn = nn.LSTM(hidden, hidden, num_layers=layers, dropout=p)
        self.drop_out = nn.Dropout(p)
        self.decoder = nn.Linear(hidden, vocab)
        for param in self.parameters():
            nn.init.uniform_(param, -init, init)

    def forward(self, tokens, hidden=None):
        output, hidden = self.rnn(self.drop_in(self.encoder(tokens)), hidden)
        return self.decoder(self.drop_out(output)), hidden

    def init_hidden(self, batch: int):
        """Zero states ``(h, c)`` for ``batch`` sequences (what word_language_model's training loop calls)."""
        weight = self.decoder.weight
        shape = (self.rnn.num_layers, batch, self.rnn.hidden_size)
        return weight.new_zeros(shape), weight.new_zeros(shape)
