"""A converted model under everything PyTorch training code does to a model (issue: training features).

Each case checks a behaviour against the *original* model (with its dropouts replaced by the sites'
masks, tests/masking.py, or in eval mode), never against fxdrop's own code path.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import fxdrop
from fxdrop.convert import conversion

import zoo
from fxdrop.harness.masking import masked
from test_convert import check_training_contract


class Block(nn.Module):
    def __init__(self, d=16, hidden=32, p=0.5):
        super().__init__()
        self.fc1, self.drop, self.fc2 = nn.Linear(d, hidden), nn.Dropout(p), nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.fc2(self.drop(torch.relu(self.fc1(x))))


class Checkpointed(nn.Module):
    """Blocks run under torch.utils.checkpoint (``mode``: reentrant, non_reentrant, sequential, none)."""

    def __init__(self, mode="none"):
        super().__init__()
        self.mode = mode
        self.blocks = nn.Sequential(Block(), Block(p=0.3))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        if self.mode == "sequential":
            x = checkpoint_sequential(self.blocks, 2, x, use_reentrant=False)
        elif self.mode != "none":
            for block in self.blocks:
                x = checkpoint(block, x, use_reentrant=self.mode == "reentrant")
        else:
            x = self.blocks(x)
        return self.head(x)


def _grads(model, x, steps=3):
    out = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant", "sequential"])
def test_checkpointing_recomputes_the_same_patterns(mode):
    """The recompute inside the backward draws what the forward drew: gradients equal the run without it."""
    torch.manual_seed(0)
    model = Checkpointed("none")
    plain = fxdrop.convert(model, seed=4)
    checked = copy.deepcopy(plain)
    checked.mode = mode
    x = torch.randn(8, 16, requires_grad=True)  # reentrant checkpoint needs an input that requires grad
    for got, want in zip(_grads(checked, x), _grads(plain, x)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)
    assert [s.scheduler.draws for s in fxdrop.sites(checked)] == [3, 3]  # the recomputes did not advance


def test_checkpoint_wrappers_of_fsdp():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (apply_activation_checkpointing,
                                                                             checkpoint_wrapper)

    torch.manual_seed(0)
    plain = fxdrop.convert(Checkpointed("none"), seed=4)
    wrapped = copy.deepcopy(plain)
    apply_activation_checkpointing(wrapped, checkpoint_wrapper_fn=checkpoint_wrapper,
                                   check_fn=lambda m: isinstance(m, Block))
    assert sum(type(m).__name__ == "CheckpointWrapper" for m in wrapped.modules()) == 2
    x = torch.randn(8, 16)
    for got, want in zip(_grads(wrapped, x), _grads(plain, x)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- rates and modes


def test_p_zero_means_no_dropout():
    torch.manual_seed(0)
    model = zoo.MLP()
    x = torch.randn(6, 20)
    for p in (0, 0.0, {"net.2": 0.0, "net.5": 0.0, "net.8": 0.0}):
        converted = fxdrop.convert(model, p=p, seed=0)
        converted.train()
        reference = copy.deepcopy(model)
        for m in reference.modules():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
        assert torch.equal(converted(x), reference.train()(x))
        assert all(not site.active for site in fxdrop.sites(converted))
    partial = fxdrop.convert(model, p={"net.5": 0.0}, seed=0)
    assert {s.name: s.p for s in fxdrop.sites(partial)} == {"net.2": 0.5, "net.5": 0.0, "net.8": 0.5}


class FineTune(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Dropout(0.5), nn.Linear(24, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(16, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 3))

    def forward(self, x):
        return self.head(self.backbone(x))


def test_submodule_eval_follows_the_dropouts_own_mode():
    """model.train(); model.backbone.eval(): the backbone's sites keep everything, the head's drop."""
    torch.manual_seed(0)
    model = FineTune()
    converted = fxdrop.convert(model, seed=2)
    x = torch.randn(5, 12)
    for module in (model, converted):
        module.train()
        module.backbone.eval()
    by_name = {s.name: s for s in fxdrop.sites(converted)}
    assert not by_name["backbone.2"].active and by_name["head.0"].active and by_name["head.3"].active
    y = converted(x)
    masks = {name: s.last_mask for name, s in by_name.items() if s.active}
    with masked(model, masks):
        torch.testing.assert_close(y, model(x), atol=1e-6, rtol=1e-6)
    assert by_name["backbone.2"].scheduler.draws == 0
    check_training_contract_partial(model, converted, x)


def check_training_contract_partial(model, converted, x):
    """Gradients too, with the backbone in eval (its sites inactive, its dropouts the identity)."""
    weight = torch.randn(5, 3)
    converted.zero_grad(set_to_none=True)
    (converted(x) * weight).sum().backward()
    masks = {s.name: s.last_mask for s in fxdrop.sites(converted) if s.active}
    got = [p.grad.clone() for p in converted.parameters()]
    model.zero_grad(set_to_none=True)
    with masked(model, masks):
        (model(x) * weight).sum().backward()
    for g, w in zip(got, (p.grad for p in model.parameters())):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


def test_changing_p_after_conversion_takes_effect():
    """Rate schedules: the converted model's Dropout at its original path drives its site."""
    torch.manual_seed(0)
    model = zoo.VGGLike()
    converted = fxdrop.convert(model, seed=0)
    site = {s.name: s for s in fxdrop.sites(converted)}["classifier.2"]
    converted.classifier[2].p = 0.1
    converted.train()
    converted(torch.randn(2, 3, 8, 8))
    assert site.p == 0.1 and site.scheduler.distribution.p == 0.1
    converted.classifier[2].p = 0.0
    assert not site.active
    check_training_contract(_with_rates(model, {"classifier.2": 0.0}), converted, (torch.randn(2, 3, 8, 8),))
    fxdrop.set_p(converted, {"classifier.5": 0.7})
    assert converted.classifier[5].p == 0.7
    with pytest.raises(KeyError, match="no sites"):
        fxdrop.set_p(converted, {"classifier.9": 0.1})
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
        fxdrop.set_p(converted, 1.0)


def _with_rates(model, rates):
    for name, module in model.named_modules():
        if name in rates:
            module.p = rates[name]
    return model


def test_a_functional_rate_changes_through_set_p():
    torch.manual_seed(0)
    model = zoo.FunctionalMLP()
    converted = fxdrop.convert(model, seed=0)
    fxdrop.set_p(converted, {"dropout": 0.6})
    site = {s.name: s for s in fxdrop.sites(converted)}["dropout"]
    converted.train()
    converted(torch.randn(4, 16))
    assert site.p == 0.6 and site.scheduler.distribution.p == 0.6


@pytest.mark.parametrize("granularity", ["forward", "rows"])
@pytest.mark.parametrize("family", ["row", "block"])
@pytest.mark.parametrize("width,p", [(1, 0.5), (3, 0.7), (10, 0.7)])
def test_narrow_sites_drop_each_unit_at_exactly_p(family, width, p, granularity):
    """Widths below the pattern period: the measured per-unit drop rate and mean multiplier match p and 1
    (in rows mode for every row class)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, 2))
    converted = fxdrop.convert(model, seed=1, pattern=family, granularity=granularity)
    (site,) = fxdrop.sites(converted)
    draws = 4000
    classes = site.row_classes  # 1 for "forward"; "auto": 4 at p = 0.5, 8 at p = 0.7
    assert classes == (1 if granularity == "forward" else 4 if p <= 0.5 else 8)
    dropped = torch.zeros(classes, width, dtype=torch.float64)
    mean = torch.zeros(classes, width, dtype=torch.float64)
    x = torch.randn(2, 4)
    with torch.no_grad():
        for _ in range(draws):
            converted(x)
            mask = site.last_mask.double().reshape(classes, width)
            dropped += mask == 0
            mean += mask
    se = (p * (1 - p) / draws) ** 0.5
    assert ((dropped / draws - p).abs() <= 4.5 * se).all(), dropped / draws
    assert ((mean / draws - 1).abs() <= 0.15).all(), mean / draws


def test_a_weight_smaller_than_one_tile_still_drops():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 8))
    converted = fxdrop.convert(model, seed=0, pattern="tile", tile=32)
    (site,) = fxdrop.sites(converted)
    with torch.no_grad():
        zeros = sum(bool(converted(torch.randn(2, 8)).eq(model[1].bias).all()) or not site.last_mask.any()
                    for _ in range(400))
    assert 140 <= zeros <= 260  # the one tile is dropped in half the steps


def test_max_dp_beyond_the_limit_is_refused():
    with pytest.raises(ValueError, match="above fxdrop's limit of 1024"):
        fxdrop.convert(zoo.MLP(), max_dp=10**5)
    with pytest.raises(ValueError, match="fxdrop draws periods up to 1024"):
        fxdrop.convert(zoo.MLP(), p=1 - 1e-9)


# ---------------------------------------------------------------- copies and conversions


def test_converting_a_converted_model_starts_afresh():
    torch.manual_seed(0)
    first = fxdrop.convert(zoo.MLP(), seed=1)
    second = fxdrop.convert(first, seed=2, p=0.3)
    assert all(s.p == 0.3 for s in fxdrop.sites(second)) and all(s.p == 0.5 for s in fxdrop.sites(first))
    assert {id(s) for s in fxdrop.sites(first)}.isdisjoint(id(s) for s in fxdrop.sites(second))
    second.train()
    second(torch.randn(3, 20))
    assert [s.scheduler.draws for s in fxdrop.sites(first)] == [0, 0, 0]
    assert [s.scheduler.draws for s in fxdrop.sites(second)] == [1, 1, 1]
    assert [p is q for p, q in zip(first.parameters(), second.parameters())] == [True] * 8


# ---------------------------------------------------------------- hooks


def test_hooks_fire_in_eval_and_say_so_once_in_training():
    torch.manual_seed(0)
    model = zoo.MLP()
    converted = fxdrop.convert(model, seed=0)
    seen = []
    converted.net[0].register_forward_hook(lambda m, a, out: seen.append("linear"))
    converted.net[2].register_forward_hook(lambda m, a, out: seen.append("dropout"))
    converted.eval()
    converted(torch.randn(2, 20))
    assert seen == ["linear", "dropout"]
    converted.train()
    with pytest.warns(UserWarning, match=r"net.2, net.5, net.8 runs as one structured op in training, so forward "
                                         r"hooks on Linear, Dropout do not fire"):
        converted(torch.randn(2, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted(torch.randn(2, 20))  # once


def test_a_global_hook_sees_every_linear_in_eval():
    torch.manual_seed(0)
    model = zoo.MLP()
    converted = fxdrop.convert(model, seed=0).eval()
    calls = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, a, out: calls.append(type(m).__name__) if isinstance(m, nn.Linear) else None)
    try:
        converted(torch.randn(2, 20))
        assert calls.count("Linear") == 4
        converted.train()
        with pytest.warns(UserWarning, match="a global hook"):
            converted(torch.randn(2, 20))
    finally:
        handle.remove()


# ---------------------------------------------------------------- what is refused


def test_torchscript_models_are_refused_clearly():
    model = zoo.MLP()
    with pytest.raises(TypeError, match="TorchScript module .*convert the Python model before scripting"):
        fxdrop.convert(torch.jit.script(model))
    with pytest.raises(TypeError, match="TorchScript"):
        fxdrop.convert(torch.jit.trace(model, torch.randn(2, 20)), example_inputs=torch.randn(2, 20))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.scripted = torch.jit.script(zoo.MLP())
            self.mlp = zoo.MLP()

        def forward(self, x):
            return self.scripted(x) + self.mlp(x)

    report = conversion(fxdrop.convert(Holder(), seed=0))
    skipped = {s.name: s.message for s in report.skipped}
    assert "TorchScript" in skipped["scripted"] and [r.name for r in report.regions] == ["mlp.net"]


# ---------------------------------------------------------------- precision and autocast


@pytest.mark.parametrize("granularity", ["forward", "rows"])
def test_autocast_gives_the_originals_dtype_and_values(granularity):
    torch.manual_seed(0)
    model = zoo.MLP()
    converted = fxdrop.convert(model, seed=0, granularity=granularity)
    x = torch.randn(6, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = converted(x)
        masks = {s.name: s.last_mask for s in fxdrop.sites(converted)}
        with masked(model, masks):
            expect = model(x)
    assert y.dtype == expect.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expect.float(), atol=0.05, rtol=0.05)
    y.float().sum().backward()


def test_a_chain_fed_by_an_autocast_op_converts_and_runs():
    class AutocastInside(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.mlp = zoo.MLP((8, 16, 4))

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                h = self.proj(x)
            return self.mlp(h)

    torch.manual_seed(0)
    model = AutocastInside()
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the model only runs under autocast
        converted = fxdrop.convert(model, seed=0, example_inputs=x)
        y = converted.train()(x)
        with masked(model.train(), {s.name: s.last_mask for s in fxdrop.sites(converted)}):
            expect = model(x)
    assert y.dtype == expect.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expect.float(), atol=0.05, rtol=0.05)


# ---------------------------------------------------------------- parametrizations, LoRA, double backward


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "orthogonal", "custom"])
def test_parametrized_linears_convert_and_read_the_parametrized_weight(kind):
    from torch.nn.utils import parametrizations, parametrize

    class Scale(nn.Module):
        def forward(self, w):
            return 2.0 * w

    torch.manual_seed(0)
    model = zoo.MLP((12, 16, 16, 4))
    for index in (0, 3):
        layer = model.net[index]
        if kind == "custom":
            parametrize.register_parametrization(layer, "weight", Scale())
        else:
            getattr(parametrizations, kind)(layer)
    converted = fxdrop.convert(model, seed=3)
    assert [s.name for s in fxdrop.sites(converted)] == ["net.2", "net.5"]
    x = torch.randn(5, 12)
    if kind == "spectral_norm":  # its power iteration updates buffers in training: compare in eval, then run
        model.eval(), converted.eval()
        assert torch.equal(converted(x), model(x))
        converted.train()
        converted(x).sum().backward()
        return
    check_training_contract(model, converted, (x,))
    model.eval(), converted.eval()
    assert torch.equal(converted(x), model(x))


class LoRALayer(nn.Module):
    """The shape of a peft LoRA layer after a model-level dropout: ``drop(x) -> {base, lora_drop -> A -> B}``."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.1)
        self.base = nn.Linear(16, 16)
        self.lora_dropout = nn.ModuleDict({"default": nn.Dropout(0.2)})
        self.lora_A = nn.ModuleDict({"default": nn.Linear(16, 4, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(4, 16, bias=False)})
        self.scaling = 0.5

    def forward(self, x):
        h = self.drop(x)
        out = self.base(h)
        for name in self.lora_A:
            out = out + self.lora_B[name](self.lora_A[name](self.lora_dropout[name](h))) * self.scaling
        return out


def test_lora_shaped_layers_convert():
    torch.manual_seed(0)
    model = LoRALayer()
    for p in model.base.parameters():
        p.requires_grad_(False)  # frozen base, as in LoRA fine-tuning
    converted = fxdrop.convert(model, seed=0)
    plans = {s.name: s.plan for s in conversion(converted).sites}
    assert plans == {"drop": "input", "lora_dropout.default": "input"}
    check_training_contract(model, converted, (torch.randn(4, 7, 16),))


def test_double_backward_gradient_penalties():
    torch.manual_seed(0)
    model = zoo.MLP((6, 12, 12, 3))
    converted = fxdrop.convert(model, seed=1).train()

    def penalty(module, x, masks=None):
        module.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        y = module(x)
        (grad_x,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        loss = y.sum() + grad_x.square().sum()
        loss.backward()
        return [p.grad.clone() for p in module.parameters()]

    x = torch.randn(4, 6)
    got = penalty(converted, x)
    with masked(model.train(), {s.name: s.last_mask for s in fxdrop.sites(converted)}):
        want = penalty(model, x)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- inputs


def test_any_real_scalar_is_a_rate():
    np = pytest.importorskip("numpy")
    for p in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25)):
        converted = fxdrop.convert(zoo.MLP(), p=p, seed=0)
        assert all(s.p == 0.25 for s in fxdrop.sites(converted))
    converted = fxdrop.convert(zoo.MLP(), p={"net.2": np.float32(0.5)}, seed=0)
    with pytest.raises(TypeError, match="p must be None, a real number"):
        fxdrop.convert(zoo.MLP(), p="0.5")


def test_rows_granularity_unit_dropouts_draw_per_row_class():
    """A dropout with several users (a unit dropout) follows granularity='rows' like the chains."""
    torch.manual_seed(0)
    model = zoo.SharedInputChain()
    converted = fxdrop.convert(model, seed=0, granularity="rows", row_classes=4,
                               pattern={"drop": "row", "drop2": "block"})
    by_name = {s.name: s for s in fxdrop.sites(converted)}
    assert conversion(converted).sites[0].plan == "unit_dropout" or any(
        r.plan == "unit_dropout" for r in conversion(converted).sites)
    assert by_name["drop"].granularity == "rows" and by_name["drop"].last_mask is None
    check_training_contract(model, converted, (torch.randint(0, 50, (6, 5)),))
    assert by_name["drop"].last_mask.shape == (4, 24)
