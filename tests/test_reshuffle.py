"""fxdrop.reshuffle: reordering chain sites' hidden units keeps the function, the optimizer's trajectory and the
contract, and refuses what it cannot reorder.

References are the original model (trained without any reshuffling, or loaded with the converted model's
weights and masked with each site's ``last_mask``), never fxdrop's own code path.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdrop
from fxdrop.config import FxdropError
from fxdrop.convert import sites
from fxdrop.harness.masking import masked
from fxdrop.reshuffle import reshuffle


def mlp(p: float = 0.5, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, width), nn.GELU(),
                         nn.Dropout(p), nn.Linear(width, 5))


def data(steps: int = 6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 20, generator=g), torch.randint(5, (16,), generator=g)) for _ in range(steps)]


OPTIMIZERS = {
    "momentum": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.5),
}


class Tied(nn.Module):
    """The MLP, and a Linear elsewhere that shares its first weight."""

    def __init__(self):
        super().__init__()
        self.body = mlp()
        self.aux = nn.Linear(20, 32)
        self.aux.weight = self.body[0].weight

    def forward(self, x):
        return self.body(x)


def train(model, optimizer, batches):
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_reshuffling_every_step_trains_the_same_function(name):
    # rate 0: the sites are inactive, so both models compute the same function at every step and only the
    # unit order differs; the optimizer's state must move with the weights for the trajectories to agree
    original, converted = mlp(0.0), fxdrop.convert(mlp(0.0), seed=1)
    assert len(sites(converted)) == 2 and not any(s.active for s in sites(converted))
    reference_opt, opt = OPTIMIZERS[name](original.parameters()), OPTIMIZERS[name](converted.parameters())
    shuffler = reshuffle(converted, opt, every=1, seed=3)
    batches = data()
    train(original, reference_opt, batches)
    train(converted, opt, batches)
    assert shuffler.steps == 6 and shuffler.shuffles == 6
    assert not torch.equal(original[0].weight, converted[0].weight), "the units were reordered"
    x = torch.randn(64, 20)
    original.eval(), converted.eval()
    torch.testing.assert_close(converted(x), original(x), atol=2e-5, rtol=2e-5)


def test_units_move_together_weights_gradients_and_state():
    converted = fxdrop.convert(mlp(), seed=1)
    opt = torch.optim.AdamW(converted.parameters(), lr=0.01)
    shuffler = reshuffle(converted, opt, every=1000, seed=0)
    assert [a.site for a in shuffler.axes] == ["2", "5"]
    assert [(n, d) for n, _, d in shuffler.axes[0].members] == [("0.weight", 0), ("0.bias", 0), ("3.weight", 1)]
    x, y = data(1)[0]
    train(converted, opt, [(x, y)])
    def held(p):
        return p, p.grad, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]

    before = {n: [t.detach().clone() for t in held(p)] for n, p in converted.named_parameters()}
    generator_state = shuffler.generator.get_state()
    shuffler.shuffle()
    replay = torch.Generator()
    replay.set_state(generator_state)
    first, second = torch.randperm(32, generator=replay), torch.randperm(32, generator=replay)
    expected_moves = {"0.weight": [(0, first)], "0.bias": [(0, first)], "3.weight": [(1, first), (0, second)],
                      "3.bias": [(0, second)], "6.weight": [(1, second)], "6.bias": []}
    for n, p in converted.named_parameters():
        for old, now in zip(before[n], held(p)):
            for dim, order in expected_moves[n]:
                old = old.index_select(dim, order)
            assert torch.equal(now, old), n


def test_the_contract_holds_after_reshuffles():
    original, converted = mlp(), fxdrop.convert(mlp(), seed=1)
    opt = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9)
    reshuffle(converted, opt, every=2, seed=0)
    train(converted, opt, data(5))
    original.load_state_dict(converted.state_dict())
    x, y = data(1)[0]
    converted.train(), original.train()
    out = converted(x)
    with masked(original, {s.name: s.last_mask for s in sites(converted)}):
        reference = original(x)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    converted.eval(), original.eval()
    assert torch.equal(converted(x), original(x))


def test_resuming_a_reshuffler_draws_what_an_unbroken_run_draws():
    runs = []
    for resume in (False, True):
        converted = fxdrop.convert(mlp(), seed=1)
        opt = torch.optim.SGD(converted.parameters(), lr=0.05, momentum=0.9)
        shuffler = reshuffle(converted, opt, every=2, seed=7)
        batches = data(6)
        train(converted, opt, batches[:3])
        if resume:
            state = copy.deepcopy(shuffler.state_dict())
            shuffler.remove()
            shuffler = reshuffle(converted, opt, every=2, seed=0)
            shuffler.load_state_dict(state)
        train(converted, opt, batches[3:])
        assert shuffler.steps == 6 and shuffler.shuffles == 3
        runs.append(converted[0].weight.detach().clone())
    assert torch.equal(*runs)


def test_remove_stops_reshuffling():
    converted = fxdrop.convert(mlp(), seed=1)
    opt = torch.optim.SGD(converted.parameters(), lr=0.0)
    shuffler = reshuffle(converted, opt, every=1)
    weight = converted[0].weight.detach().clone()
    shuffler.remove()
    train(converted, opt, data(2))
    assert shuffler.steps == 0 and torch.equal(converted[0].weight, weight)


def test_what_cannot_be_reordered_is_refused_or_skipped_by_name():
    converted = fxdrop.convert(mlp(), seed=1)
    with pytest.raises(FxdropError, match="LBFGS is not one of the optimizers"):
        reshuffle(converted, torch.optim.LBFGS(converted.parameters()))
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="every must be an int"):
            reshuffle(converted, opt, every=bad)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        reshuffle(converted, "sgd")
    plain = mlp()
    with pytest.raises(FxdropError, match="this Sequential holds no region fxdrop.convert installed"):
        reshuffle(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    # only an output site: fxdrop does not see who reads its units
    head = fxdrop.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.5)), seed=1)
    with pytest.raises(FxdropError, match="no site of this model can be reordered.*output site"):
        reshuffle(head, torch.optim.SGD(head.parameters(), lr=0.1))
    # a tied weight keeps its site out, and the others are still reordered
    tied = fxdrop.convert(Tied(), seed=1)
    shuffler = reshuffle(tied, torch.optim.SGD(tied.parameters(), lr=0.1))
    assert "tied" in shuffler.skipped["body.2"] and [a.site for a in shuffler.axes] == ["body.5"]
    # a parametrised weight is not a plain Parameter (both sites touch it)
    norm = mlp()
    torch.nn.utils.parametrizations.weight_norm(norm[3])
    norm = fxdrop.convert(norm, seed=1)
    with pytest.raises(FxdropError, match="2: 3.weight is not a plain Parameter; 5: 3.weight is not"):
        reshuffle(norm, torch.optim.SGD(norm.parameters(), lr=0.1))


def test_a_state_of_another_shape_is_refused_before_anything_moves():
    converted = fxdrop.convert(mlp(), seed=1)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    shuffler = reshuffle(converted, opt, every=1000)
    train(converted, opt, data(1))
    opt.state[converted[3].weight]["factored"] = torch.zeros(32)
    weights = [p.detach().clone() for p in converted.parameters()]
    with pytest.raises(FxdropError, match="state 'factored' of 3.weight has shape"):
        shuffler.shuffle()
    assert all(torch.equal(a, b) for a, b in zip(weights, converted.parameters()))


def test_a_weight_stored_transposed_moves_along_its_own_dims():
    # a non-contiguous Parameter (a transposed view) takes the gather-and-copy path; the function still holds
    original = mlp(0.0)
    original[3].weight = nn.Parameter(original[3].weight.detach().t().contiguous().t())
    assert not original[3].weight.is_contiguous()
    converted = fxdrop.convert(copy.deepcopy(original), seed=1)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1, momentum=0.9)
    reference_opt = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    reshuffle(converted, opt, every=1, seed=2)
    batches = data(3)
    train(original, reference_opt, batches)
    train(converted, opt, batches)
    assert not converted[3].weight.is_contiguous() and not torch.equal(converted[3].weight, original[3].weight)
    x = torch.randn(8, 20)
    original.eval(), converted.eval()
    torch.testing.assert_close(converted(x), original(x), atol=2e-5, rtol=2e-5)


def test_sites_that_claim_the_same_units_are_both_left_out():
    # two programs of one region that planned the same weights under different site names (a plan fxdrop
    # does not make today): reordering both would apply two orders to one dimension
    import dataclasses

    from fxdrop.convert import regions
    from fxdrop.reshuffle import _unit_axes

    converted = fxdrop.convert(mlp(), seed=1)
    region = regions(converted)[0]
    program = next(iter(region.programs.values()))
    chain = program.plan.chains[0]
    renamed = dataclasses.replace(chain, sites=[dataclasses.replace(chain.sites[0], name="elsewhere"),
                                                *chain.sites[1:]])
    region.programs["another spec"] = dataclasses.replace(program, plan=dataclasses.replace(program.plan,
                                                                                            chains=[renamed]))
    axes, skipped = _unit_axes(converted)
    assert [a.site for a in axes] == ["5"]
    assert "also the units of site(s) elsewhere" in skipped["2"] and "site(s) 2" in skipped["elsewhere"]


@pytest.mark.parametrize("input_dropout,output_dropout", [(False, False), (True, False), (False, True), (True, True)])
def test_chain_layout_names_the_linears_around_each_site(input_dropout, output_dropout):
    from fxdrop.layout import ChainLayout

    layout = ChainLayout(3, input_dropout, output_dropout)
    for site in range(layout.sites):
        writer, reader = layout.writer(site), layout.reader(site)
        assert writer is None or layout.out_site(writer) == site
        assert reader is None or layout.in_site(reader) == site
        assert (writer is None) == (input_dropout and site == 0)
        assert (reader is None) == (output_dropout and site == layout.sites - 1)
        if writer is not None and reader is not None:
            assert reader == writer + 1
