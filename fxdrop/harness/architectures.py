"""Public architectures, built from their own libraries' configs with random weights, small enough for a CPU.

Each :class:`Architecture` builds a fresh model and one example batch (positional and keyword
arguments) and says which of its outputs to train on. The libraries are optional: an architecture
whose library is missing (or fails to import) is skipped with the reason. torchvision's registry
wheel is a CUDA build whose C++ ops cannot load against a CPU torch; :func:`import_torchvision`
then declares the two operator schemas its import registers fake kernels for, so that its pure-Python
model definitions load (no torchvision operator runs in any of these models).

The PyTorch word_language_model models (``RNNModel`` LSTM and GRU, ``TransformerModel``) follow that
example's own code (pytorch/examples, word_language_model/model.py), since it is not a package.
Imports torch; the libraries lazily.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

_SHIM: list = []


class Unavailable(Exception):
    """The library an architecture needs is not installed (or does not import); the message says which."""


def import_torchvision():
    """``import torchvision``, declaring ``torchvision::nms``/``qnms`` first when its C++ library cannot load."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        raise Unavailable("torchvision is not installed (pip install --no-deps torchvision==0.28.0)")
    if not _SHIM and "torchvision" not in __import__("sys").modules:
        library = next(Path(spec.origin).parent.glob("_C*.so"), None)
        try:
            if library is None:
                raise OSError("no _C library")
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError):
            shim = torch.library.Library("torchvision", "DEF")
            shim.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            shim.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
            _SHIM.append(shim)
    try:
        return importlib.import_module("torchvision")
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"torchvision does not import: {type(err).__name__}: {err}") from err


def _library(name: str):
    if name == "torchvision":
        return import_torchvision()
    if name in ("timm", "transformers") and importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # both import torchvision when it is installed
    try:
        return importlib.import_module(name)
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"{name} is not installed or does not import: {type(err).__name__}: {err}") from err


@dataclass
class Batch:
    args: tuple
    kwargs: dict = field(default_factory=dict)


@dataclass
class Architecture:
    """``build() -> (model, Batch)``; ``output(result)`` picks the tensor to train on (a loss or logits)."""

    name: str
    library: str
    build: Callable[[], tuple[nn.Module, Batch]]
    output: Callable[[Any], torch.Tensor] = lambda out: out
    # Dropout-like modules that are not dropouts fxdrop converts (stochastic depth, drop path): set to 0 in the
    # training-contract check, which compares against the original step for step.
    note: str = ""


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def _loss(out):
    return out.loss


# ---------------------------------------------------------------- torchvision


def _tv(factory: str, size: int = 64, **kwargs):
    def build():
        tv = _library("torchvision")
        torch.manual_seed(0)
        model = getattr(tv.models, factory)(weights=None, **kwargs)
        return model, Batch((torch.randn(2, 3, size, size),))
    return build


def _tv_vit():
    tv = _library("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                        mlp_dim=64, dropout=0.1, attention_dropout=0.0, num_classes=10)
    return model, Batch((torch.randn(2, 3, 32, 32),))


# ---------------------------------------------------------------- timm


def _timm(name: str, size: int = 32, **kwargs):
    def build():
        timm = _library("timm")
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10, img_size=size, **kwargs)
        return model, Batch((torch.randn(2, 3, size, size),))
    return build


def _timm_mixer(res: bool):
    def build():
        _library("timm")
        torch.manual_seed(0)
        mixer = importlib.import_module("timm.models.mlp_mixer")
        extra = dict(block_layer=mixer.ResBlock, norm_layer=mixer.Affine) if res else {}
        model = mixer.MlpMixer(num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=64, mlp_ratio=2,
                               drop_rate=0.1, proj_drop_rate=0.1, **extra)
        return model, Batch((torch.randn(2, 3, 32, 32),))
    return build


def _timm_block(kind: str):
    def build():
        timm = _library("timm")
        torch.manual_seed(0)
        layers = importlib.import_module("timm.layers")
        if kind == "mlp":
            model = layers.Mlp(32, 64, drop=0.2)
        else:
            model = layers.SwiGLU(32, 64, drop=0.2)
        del timm
        return model, Batch((torch.randn(2, 5, 32),))
    return build


# ---------------------------------------------------------------- Hugging Face transformers


def _hf(config_name: str, model_name: str, config: dict, inputs: Callable[[], dict]):
    def build():
        transformers = _library("transformers")
        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        return model, Batch((), inputs())
    return build


def _ids(vocab: int = 64, shape=(2, 6)):
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(1))


_SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
              max_position_embeddings=32)


# ---------------------------------------------------------------- PyTorch's word_language_model


class RNNModel(nn.Module):
    """word_language_model/model.py: an encoder, a recurrent module, and a decoder."""

    def __init__(self, rnn_type, ntoken, ninp, nhid, nlayers, dropout=0.5, tie_weights=False):
        super().__init__()
        self.ntoken = ntoken
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        self.init_weights()
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        output = self.drop(output)
        decoded = self.decoder(output)
        decoded = decoded.view(-1, self.ntoken)
        return F.log_softmax(decoded, dim=1), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


class PositionalEncoding(nn.Module):
    """word_language_model/model.py's sinusoidal positional encoding, with its dropout."""

    def __init__(self, d_model, dropout=0.1, max_len=5000):
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))

    def forward(self, x):
        x = x + self.pe[:x.size(0), :]
        return self.dropout(x)


class TransformerModel(nn.Transformer):
    """word_language_model/model.py's TransformerModel: nn.Transformer's encoder on a causal mask."""

    def __init__(self, ntoken, ninp, nhead, nhid, nlayers, dropout=0.5):
        super().__init__(d_model=ninp, nhead=nhead, dim_feedforward=nhid, num_encoder_layers=nlayers)
        self.model_type = "Transformer"
        self.src_mask = None
        self.pos_encoder = PositionalEncoding(ninp, dropout)
        self.input_emb = nn.Embedding(ntoken, ninp)
        self.ninp = ninp
        self.decoder = nn.Linear(ninp, ntoken)
        self.init_weights()

    def _generate_square_subsequent_mask(self, sz):
        return torch.log(torch.tril(torch.ones(sz, sz)))

    def init_weights(self):
        initrange = 0.1
        nn.init.uniform_(self.input_emb.weight, -initrange, initrange)
        nn.init.zeros_(self.decoder.bias)
        nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, src, has_mask=True):
        if has_mask:
            device = src.device
            if self.src_mask is None or self.src_mask.size(0) != len(src):
                mask = self._generate_square_subsequent_mask(len(src)).to(device)
                self.src_mask = mask
        else:
            self.src_mask = None
        src = self.input_emb(src) * math.sqrt(self.ninp)
        src = self.pos_encoder(src)
        output = self.encoder(src, mask=self.src_mask)
        output = self.decoder(output)
        return F.log_softmax(output, dim=-1)


def _wlm_rnn(kind: str):
    def build():
        torch.manual_seed(0)
        model = RNNModel(kind, 50, 16, 24, 2, dropout=0.3)
        return model, Batch((_ids(50, (7, 3)), model.init_hidden(3)))
    return build


def _wlm_transformer():
    torch.manual_seed(0)
    model = TransformerModel(50, 16, 2, 32, 2, dropout=0.2)
    return model, Batch((_ids(50, (7, 3)),))


# ---------------------------------------------------------------- the registry


ARCHITECTURES: list[Architecture] = [
    Architecture("torchvision AlexNet", "torchvision", _tv("alexnet", 64), note="Dropout -> Linear -> ReLU(inplace)"),
    Architecture("torchvision VGG-11", "torchvision", _tv("vgg11", 32)),
    Architecture("torchvision MobileNetV3-Small", "torchvision", _tv("mobilenet_v3_small", 32)),
    Architecture("torchvision EfficientNet-B0", "torchvision", _tv("efficientnet_b0", 32)),
    Architecture("torchvision ViT", "torchvision", _tv_vit),
    Architecture("timm ViT", "timm", _timm("vit_tiny_patch16_224", 32, patch_size=8, depth=2, drop_rate=0.1,
                                           proj_drop_rate=0.1, attn_drop_rate=0.0)),
    Architecture("timm MLP-Mixer", "timm", _timm_mixer(res=False), note="token mixing on a transposed input"),
    Architecture("timm ResMLP", "timm", _timm_mixer(res=True)),
    Architecture("timm Mlp block", "timm", _timm_block("mlp")),
    Architecture("timm SwiGLU block", "timm", _timm_block("swiglu")),
    Architecture("transformers BERT", "transformers",
                 _hf("BertConfig", "BertForSequenceClassification", dict(_SMALL, num_labels=3),
                     lambda: dict(input_ids=_ids(), labels=torch.tensor([0, 2]))), _loss),
    Architecture("transformers RoBERTa", "transformers",
                 _hf("RobertaConfig", "RobertaForSequenceClassification",
                     dict(_SMALL, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2),
                     lambda: dict(input_ids=_ids(), labels=torch.tensor([0, 2]))), _loss),
    Architecture("transformers DistilBERT", "transformers",
                 _hf("DistilBertConfig", "DistilBertForSequenceClassification",
                     dict(vocab_size=64, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32,
                          num_labels=3), lambda: dict(input_ids=_ids(), labels=torch.tensor([0, 2]))), _loss),
    Architecture("transformers GPT-2", "transformers",
                 _hf("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2,
                                                          n_positions=32, bos_token_id=0, eos_token_id=0),
                     lambda: dict(input_ids=_ids(), labels=_ids())), _loss),
    Architecture("transformers T5", "transformers",
                 _hf("T5Config", "T5ForConditionalGeneration",
                     dict(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                          num_heads=2, dropout_rate=0.1, decoder_start_token_id=0, pad_token_id=0),
                     lambda: dict(input_ids=_ids(), labels=_ids())), _loss),
    Architecture("transformers BART", "transformers",
                 _hf("BartConfig", "BartForConditionalGeneration",
                     dict(vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                          decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                          max_position_embeddings=32, dropout=0.1, activation_dropout=0.1, attention_dropout=0.0,
                          pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
                     lambda: dict(input_ids=_ids(), labels=_ids())), _loss),
    Architecture("transformers StableLM (Llama family, hidden dropout)", "transformers",
                 _hf("StableLmConfig", "StableLmForCausalLM",
                     dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                          hidden_dropout=0.1, attention_dropout=0.0),
                     lambda: dict(input_ids=_ids(), labels=_ids())), _loss),
    Architecture("transformers GPT-NeoX (hidden dropout)", "transformers",
                 _hf("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=32, hidden_dropout=0.1,
                          attention_dropout=0.0),
                     lambda: dict(input_ids=_ids(), labels=_ids())), _loss),
    Architecture("word_language_model LSTM", "torch", _wlm_rnn("LSTM"), lambda out: out[0]),
    Architecture("word_language_model GRU", "torch", _wlm_rnn("GRU"), lambda out: out[0]),
    Architecture("word_language_model Transformer", "torch", _wlm_transformer),
]

BY_NAME = {a.name: a for a in ARCHITECTURES}


def build(arch: Architecture) -> tuple[nn.Module, Batch]:
    """The model and its batch; raises :class:`Unavailable` when the library is missing."""
    if arch.library != "torch":
        _library(arch.library)
    return arch.build()


__all__ = ["ARCHITECTURES", "Architecture", "BY_NAME", "Batch", "RNNModel", "TransformerModel", "Unavailable",
           "build", "import_torchvision"]
