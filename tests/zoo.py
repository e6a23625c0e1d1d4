"""Real-looking models for the fx-pass tests, with what the pass should decide for each.

Each entry of :data:`ZOO` builds a fresh model and an example input; ``expect`` maps each dropout
site name to its plan ("chain", "input", "output", "tile_linear", "unit_dropout") or None (left as is).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """The paper's MNIST classifier shape: L1 -> relu -> drop -> L2 -> relu -> drop -> L3 -> relu -> drop -> L4."""

    def __init__(self, sizes=(20, 48, 40, 36, 10), p=0.5):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers += [nn.ReLU(), nn.Dropout(p)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class VGGLike(nn.Module):
    """torchvision VGG's layout: conv features, then a ``classifier`` head with two dropouts."""

    def __init__(self, classes=10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(8 * 2 * 2, 36), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(36, 36), nn.ReLU(True), nn.Dropout(p=0.5),
            nn.Linear(36, classes))

    def forward(self, x):
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class T5DenseActDense(nn.Module):
    def __init__(self, d_model=24, d_ff=40, p=0.1):
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(p)
        self.act = nn.ReLU()

    def forward(self, hidden_states):
        hidden_states = self.wi(hidden_states)
        hidden_states = self.act(hidden_states)
        hidden_states = self.dropout(hidden_states)
        return self.wo(hidden_states)


class T5LayerFF(nn.Module):
    """T5: ``x + dropout(wo(dropout(act(wi(norm(x))))))``."""

    def __init__(self, d_model=24, d_ff=40, p=0.1):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(d_model, d_ff, p)
        self.layer_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(p)

    def forward(self, hidden_states):
        forwarded_states = self.layer_norm(hidden_states)
        forwarded_states = self.DenseReluDense(forwarded_states)
        return hidden_states + self.dropout(forwarded_states)


class GPT2MLP(nn.Module):
    def __init__(self, d=24, inner=48, p=0.1):
        super().__init__()
        self.c_fc = nn.Linear(d, inner)
        self.c_proj = nn.Linear(inner, d)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Attention(nn.Module):
    def __init__(self, d=24, heads=2, p=0.1):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.attn_dropout = nn.Dropout(p)
        self.resid_dropout = nn.Dropout(p)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (d // self.heads) ** 0.5
        att = self.attn_dropout(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        return self.resid_dropout(self.c_proj(y))


class GPT2Block(nn.Module):
    """GPT-2: ``x + attn(ln_1(x))``, then ``x + dropout(c_proj(gelu(c_fc(ln_2(x)))))``."""

    def __init__(self, d=24, p=0.1):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = GPT2Attention(d, p=p)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = GPT2MLP(d, 2 * d, p)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class FunctionalMLP(nn.Module):
    """Functional forms: F.linear on own parameters, torch.relu, x.tanh(), F.dropout and torch.dropout."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(32, 16) * 0.2)
        self.b1 = nn.Parameter(torch.zeros(32))
        self.fc2 = nn.Linear(32, 24)
        self.fc3 = nn.Linear(24, 8)

    def forward(self, x):
        h = F.dropout(torch.relu(F.linear(x, self.w1, self.b1)), 0.25, self.training)
        h = torch.dropout(self.fc2(h).tanh(), 0.5, self.training)
        return self.fc3(h)


class SharedLinear(nn.Module):
    """One Linear called at two places: ``fc(drop(relu(fc(x))))``."""

    def __init__(self, d=24):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.fc(self.drop(torch.relu(self.fc(x)))))


class InplaceDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.4, inplace=True)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class InplaceDropoutSharedInput(nn.Module):
    """``h + drop_(h)``: the in-place dropout changes ``h`` for its other user too: left as is."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop = nn.Dropout(0.4, inplace=True)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc1(x) + 1.0
        return self.fc2(self.drop(h)) + h.sum(-1, keepdim=True)


class ZeroRate(nn.Module):
    """A Dropout(0.0) converts like any other: inactive (no dropout) until its rate is raised."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.drop0 = nn.Dropout(0.0)
        self.fc2 = nn.Linear(32, 32)
        self.drop = nn.Dropout(0.5)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(self.drop(F.relu(self.fc2(self.drop0(F.relu(self.fc1(x)))))))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Sequential(nn.Linear(16, 32), nn.GELU()),
            nn.Sequential(nn.Dropout(0.2), nn.Sequential(nn.Linear(32, 32), nn.SiLU(), nn.Dropout(0.3))),
            nn.Linear(32, 6))

    def forward(self, x):
        return self.body(x)


class Looped(nn.Module):
    """Modules used in a loop, with one Dropout shared by every iteration."""

    def __init__(self, d=24, depth=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.drop = nn.Dropout(0.25)
        self.out = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.layers:
            x = self.drop(F.relu(layer(x)))
        return self.out(x)


class DataDependent(nn.Module):
    """The root does not trace (branch on a tensor value); its ``head`` MLP does."""

    def __init__(self):
        super().__init__()
        self.head = MLP((16, 32, 24, 4), p=0.3)
        self.other = nn.Linear(16, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.head(x)
        return self.head(-x) + self.other(x)


class ModeStructure(nn.Module):
    """Forward structure depends on self.training: the root stays as is; children convert."""

    def __init__(self):
        super().__init__()
        self.mlp = GPT2MLP()

    def forward(self, x):
        if self.training:
            x = x * 2
        return self.mlp(x)


class ChannelDropouts(nn.Module):
    """Dropout2d, AlphaDropout and a dropout feeding a conv: all left as is."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.drop2d = nn.Dropout2d(0.2)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 8)
        self.alpha = nn.AlphaDropout(0.2)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        x = self.conv2(self.drop(self.drop2d(torch.relu(self.conv1(x)))))
        return self.out(self.alpha(torch.selu(self.fc(x.flatten(1)))))


class SeveralUsers(nn.Module):
    """``h = drop(embedding)``, used by a Linear and by a sum: one unit mask for both."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(24, 24)

    def forward(self, idx):
        h = self.drop(self.emb(idx))
        return self.fc(h) + h


class SharedInputChain(nn.Module):
    """``h = drop(emb)``: its mean is taken before the chain ``fc1 -> relu -> drop2 -> fc2`` reads it."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.drop = nn.Dropout(0.3)
        self.fc1 = nn.Linear(24, 32)
        self.drop2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(32, 24)

    def forward(self, idx):
        h = self.drop(self.emb(idx))
        s = h.mean(-1, keepdim=True)
        return self.fc2(self.drop2(torch.relu(self.fc1(h)))) + s


class ProducerSeveralUsers(nn.Module):
    """``h = drop(relu(fc1(x)))`` used by fc2 and a residual: output-structured fc1."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(24, 24)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(24, 24)

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x)))
        return self.fc2(h) + h


class EmbeddingInput(nn.Module):
    """Embedding -> LayerNorm -> Dropout -> Linear: an input-structured Linear."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.norm = nn.LayerNorm(24)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(24, 7)

    def forward(self, idx):
        return self.fc(self.drop(self.norm(self.emb(idx))))


class AlwaysOn(nn.Module):
    """``F.dropout(x, 0.1)`` drops in eval too (training defaults to True): left as written."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc2(F.dropout(F.relu(self.fc1(x)), 0.1))


@dataclass
class ZooModel:
    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], tuple]
    expect: dict[str, str | None]
    deterministic_train: bool = True  # every dropout converted (so training is a function of the masks)
    options: dict = field(default_factory=dict)  # convert/audit options


def _x(*shape):
    return lambda: (torch.randn(*shape),)


def _idx(*shape):
    return lambda: (torch.randint(0, 50, shape),)


ZOO = [
    ZooModel("mlp", MLP, _x(6, 20), {"net.2": "chain", "net.5": "chain", "net.8": "chain"}),
    ZooModel("vgg", VGGLike, _x(2, 3, 8, 8), {"classifier.2": "chain", "classifier.5": "chain"}),
    ZooModel("t5_ffn", T5LayerFF, _x(2, 5, 24), {"DenseReluDense.dropout": "chain", "dropout": "output"}),
    ZooModel("gpt2_block", GPT2Block, _x(2, 5, 24),
             {"attn.attn_dropout": None, "attn.resid_dropout": "output", "mlp.dropout": "output"},
             deterministic_train=False),
    ZooModel("functional", FunctionalMLP, _x(5, 16), {"dropout": "chain", "dropout:1": "chain"}),
    ZooModel("shared_linear", SharedLinear, _x(5, 24), {"drop": "chain"}),
    ZooModel("inplace", InplaceDropout, _x(5, 16), {"drop": "chain"}),
    ZooModel("inplace_shared_input", InplaceDropoutSharedInput, _x(5, 16), {"drop": None},
             deterministic_train=False),
    ZooModel("zero_rate", ZeroRate, _x(5, 16), {"drop0": "chain", "drop": "chain"}),
    ZooModel("nested", Nested, _x(5, 16), {"body.1.0": "chain", "body.1.1.2": "chain"}),
    ZooModel("looped", Looped, _x(5, 24), {"drop": "chain", "drop:1": "chain", "drop:2": "chain"}),
    ZooModel("data_dependent", DataDependent, _x(5, 16), {"head.net.2": "chain", "head.net.5": "chain"}),
    ZooModel("mode_structure", ModeStructure, _x(3, 24), {"mlp.dropout": "output"}),
    ZooModel("channel_dropouts", ChannelDropouts, _x(2, 3, 6, 6), {"drop2d": None, "drop": None, "alpha": None},
             deterministic_train=False),
    ZooModel("several_users", SeveralUsers, _idx(3, 5), {"drop": "input"}),
    ZooModel("shared_input_chain", SharedInputChain, _idx(3, 5), {"drop": "input", "drop2": "chain"}),
    ZooModel("family_change", SharedInputChain, _idx(3, 5), {"drop": "unit_dropout", "drop2": "chain"},
             options={"pattern": {"drop": "row", "drop2": "block"}}),
    ZooModel("producer_several_users", ProducerSeveralUsers, _x(4, 24), {"drop": "output"}),
    ZooModel("embedding_input", EmbeddingInput, _idx(3, 5), {"drop": "input"}),
    ZooModel("always_on", AlwaysOn, _x(4, 8), {"dropout": None}, deterministic_train=False),
]


class LSTMLanguageModel(nn.Module):
    """Embedding -> Dropout -> 2-layer LSTM(dropout) -> Dropout -> Linear decoder (the PTB LM shape)."""

    def __init__(self, vocab=50, d=16, hidden=24):
        super().__init__()
        self.encoder = nn.Embedding(vocab, d)
        self.drop_in = nn.Dropout(0.3)
        self.rnn = nn.LSTM(d, hidden, num_layers=2, dropout=0.4)
        self.drop_out = nn.Dropout(0.3)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, idx):
        output, _ = self.rnn(self.drop_in(self.encoder(idx)))
        return self.decoder(self.drop_out(output))


class UntracedLSTM(nn.Module):
    """The root branches on data; its LSTM (a leaf under it) still gets structured inter-layer dropout."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(8, 12, num_layers=3, dropout=0.25)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        out, _ = self.rnn(x)
        if out.mean() > 10:
            out = out * 0
        return self.head(out)


ZOO += [
    ZooModel("lstm_lm", LSTMLanguageModel, _idx(6, 3),
             {"drop_in": "rnn_input", "drop_out": "input", "rnn.layer0": "rnn"}),
    ZooModel("untraced_lstm", UntracedLSTM, _x(5, 2, 8), {"rnn.layer0": "rnn", "rnn.layer1": "rnn"}),
]
