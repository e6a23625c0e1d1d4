"""examples/ptb_mask_study.py's mask modes: each draws the structure its docstring says (dense masks, so
these are the references the README's PTB mask tables rest on)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fxdrop.harness.models import WordLM
from fxdrop.patterns import time_classes

_SPEC = importlib.util.spec_from_file_location(
    "ptb_mask_study", Path(__file__).resolve().parent.parent / "examples" / "ptb_mask_study.py")
study = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study)

T, B, H = 11, 4, 16


def masks(mode: str, p: float = 0.5, draws: int = 6) -> list[torch.Tensor]:
    """The multipliers ``mode`` applies to a ``(T, B, H)`` activation of ones, ``draws`` times."""
    model = study.MaskedLM(WordLM(50, H, 2, p), mode, p, "block", "auto", "kept", seed=0).train()
    return [model.drop(torch.ones(T, B, H), mode) for _ in range(draws)]


def test_modes_are_checked():
    assert study.check_mode("tchunks8/classes8") == "tchunks8/classes8"
    for bad in ("tchunks", "classes0", "chunky", "a/b/c"):
        with pytest.raises(Exception, match="expected one of"):
            study.check_mode(bad)
    # every mode the study accepts has README's words (they share one table), and only those
    from fxdrop.harness.ptb import mask_mode_words

    assert all(mask_mode_words(mode) for mode in study.GRANULARITIES)
    assert mask_mode_words("csys8") == "8 patterns drawn as fxdrop does (systematic), token r in class r mod 8"
    with pytest.raises(KeyError):
        mask_mode_words("chunky")


def test_none_is_the_identity():
    assert all(torch.equal(m, torch.ones(T, B, H)) for m in masks("none"))


@pytest.mark.parametrize("prefix", ["classes", "cshuff", "csys"])
def test_class_modes_give_token_r_class_r_mod_k(prefix):
    for m in masks(f"{prefix}4"):
        rows = m.reshape(T * B, H)
        for r in range(T * B):
            assert torch.equal(rows[r], rows[r % 4])


@pytest.mark.parametrize("prefix", ["tchunks", "tshuff", "tsys"])
def test_time_modes_give_one_pattern_per_chunk_shared_by_the_batch(prefix):
    classes = time_classes(T, 4)
    for m in masks(f"{prefix}4"):
        assert (m == m[:, :1]).all()  # shared by the batch
        for t in range(T):
            assert torch.equal(m[t], m[int((classes == classes[t]).nonzero()[0])])


def test_systematic_plans_take_both_halves_at_p_half():
    """At p = 0.5 (two patterns: the two halves), a systematic 2-class plan always takes both; an
    independent one sometimes takes one half twice."""
    systematic = [m.reshape(T * B, H)[:2] for m in masks("csys2", draws=20)]
    assert all(torch.equal(a + b, torch.full((H,), 2.0)) for a, b in systematic)
    independent = [m.reshape(T * B, H)[:2] for m in masks("classes2", draws=20)]
    assert any(torch.equal(a, b) for a, b in independent)


def test_shuffled_modes_move_the_kept_units():
    kept = {tuple(m[0, 0].nonzero().flatten().tolist()) for m in masks("tshuff2", draws=10)}
    assert len(kept) > 2  # not only the two halves of the block partition
