from __future__ import annotations

import numpy as np
import pytest

from edgelm.sampling import NUCLEUS_FIRST, Sampler, SamplingConfig, nucleus


def test_greedy_is_argmax():
    logits = np.array([0.1, 3.0, 2.0, -1.0])
    assert Sampler()(logits) == 1


def test_seed_reproducible_and_top_k_restricts():
    logits = np.log(np.array([0.3, 0.3, 0.2, 0.1, 0.1]))
    cfg = SamplingConfig(temperature=1.0, top_k=2, seed=7)
    first = Sampler(cfg)(logits)
    s1, s2 = Sampler(cfg), Sampler(cfg)
    seq1 = [s1(logits) for _ in range(200)]
    seq2 = [s2(logits) for _ in range(200)]
    assert seq1 == seq2 and first == seq1[0]
    assert set(seq1) <= {0, 1} and set(seq1) == {0, 1}


def test_top_p_keeps_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    s = Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=0))
    draws = {s(np.log(probs)) for _ in range(300)}
    assert draws == {0, 1}


def test_nucleus_is_the_prefix_of_a_full_sort():
    """Partitioning finds what sorting the whole vocabulary finds: flat and peaked distributions,
    ties (rounded logits), zeros left by top-k, vocabularies below and far above the first guess."""
    rng = np.random.default_rng(0)
    for trial in range(600):
        vocab = int(rng.choice([3, NUCLEUS_FIRST - 1, NUCLEUS_FIRST + 1, 700, 5000]))
        logits = rng.standard_normal(vocab) * float(rng.choice([0.1, 1.0, 3.0, 10.0]))
        if trial % 3 == 0:
            logits = np.round(logits, 1)
        probs = np.exp(logits - logits.max())
        if trial % 4 == 1:
            k = int(rng.integers(1, 100))
            probs[np.argsort(-probs, kind="stable")[k:]] = 0.0
        probs = (probs / probs.sum()).astype(np.float32)
        top_p = float(rng.uniform(0.05, 1.0))
        order = np.argsort(-probs, kind="stable")
        want = order[:int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1]
        np.testing.assert_array_equal(nucleus(probs, top_p), want[probs[want] > 0])


def test_draw_follows_the_distribution_and_never_draws_a_zero():
    probs = np.array([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    s = Sampler(SamplingConfig(temperature=1.0, seed=3))
    counts = np.bincount([s.draw(probs) for _ in range(4000)], minlength=probs.size) / 4000
    assert counts[[0, 2, 5]].sum() == 0
    assert np.abs(counts - probs).max() < 0.03


def test_repetition_penalty_discourages_seen_tokens():
    logits = np.array([2.0, 1.9, -1.0])
    assert Sampler(SamplingConfig(repetition_penalty=1.5))(logits, history=[0]) == 1
    # negative logits are pushed further down (multiplied), not up
    out = Sampler(SamplingConfig(repetition_penalty=2.0))(np.array([-1.0, -1.5]), history=[0])
    assert out == 1


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": -1}, {"top_p": 0.0}, {"repetition_penalty": 0}])
def test_invalid_config(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)
