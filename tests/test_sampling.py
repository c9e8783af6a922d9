from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from magicseg_engine.prompts.sampling import sample_class_combos

CLASSES = [f"class{i}" for i in range(37)]


def test_deterministic_for_a_seed_and_different_across_seeds():
    a = sample_class_combos(CLASSES, 500, 2, seed=3)
    assert a == sample_class_combos(CLASSES, 500, 2, seed=3)
    assert a != sample_class_combos(CLASSES, 500, 2, seed=4)


def test_prefix_is_stable_when_more_samples_are_asked():
    assert sample_class_combos(CLASSES, 1000, 2, 0)[:300] == sample_class_combos(CLASSES, 300, 2, 0)


@settings(max_examples=60, deadline=None)
@given(n_classes=st.integers(1, 60), num=st.integers(1, 400), k=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_every_prefix_is_balanced_and_samples_are_valid(n_classes, num, k, seed):
    classes = [f"c{i}" for i in range(n_classes)]
    combos = sample_class_combos(classes, num, k, seed)
    assert len(combos) == num
    counts = Counter()
    for combo in combos:
        assert 1 <= len(combo) <= min(k, n_classes)
        assert len(set(combo)) == len(combo)
        counts.update(combo)
    if sum(counts.values()) >= n_classes:
        # Dealt from a deck: no class is more than about one sample ahead of any other.
        values = [counts[c] for c in classes]
        assert max(values) - min(values) <= k + 1


def test_mix_of_one_and_two_class_samples():
    sizes = Counter(len(c) for c in sample_class_combos(CLASSES, 2000, 2, 0))
    assert set(sizes) == {1, 2}
    assert 0.4 < sizes[1] / 2000 < 0.6


def test_single_class_vocabulary_gives_single_class_samples():
    assert sample_class_combos(["cat"], 5, 2, 0) == [("cat",)] * 5


def test_invalid_arguments():
    with pytest.raises(ValueError):
        sample_class_combos([], 3)
    with pytest.raises(ValueError):
        sample_class_combos(CLASSES, -1)


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0]), min_size=1, max_size=12).filter(any),
       num=st.integers(1, 400), k=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_weighted_draws_follow_the_weights_at_every_prefix(weights, num, k, seed):
    # A class is drawn at most once per sample: a share above 1/k could not be met.
    assume(max(weights) / sum(weights) * k <= 1)
    classes = [f"c{i}" for i in range(len(weights))]
    combos = sample_class_combos(classes, num, k, seed, weights=weights)
    assert combos == sample_class_combos(classes, num, k, seed, weights=weights)
    positive = [c for c, w in zip(classes, weights) if w > 0]
    counts = Counter()
    for combo in combos:
        assert 1 <= len(combo) <= min(k, len(positive)) and len(set(combo)) == len(combo)
        counts.update(combo)
    assert set(counts) <= set(positive)  # weight 0: never drawn
    draws, total = sum(counts.values()), sum(weights)
    for c, w in zip(classes, weights):
        # Each class within a few draws of its share, however the 1- and k-class samples mix.
        assert abs(counts[c] - draws * w / total) <= k + 2, (c, counts[c], draws * w / total)


def test_weights_shift_the_counts_but_not_the_unweighted_deck():
    equal = sample_class_combos(CLASSES, 300, 2, 0, weights=[1.0] * len(CLASSES))
    counts = Counter(c for combo in equal for c in combo)
    assert max(counts.values()) - min(counts.values()) <= 3
    doubled = Counter(c for combo in sample_class_combos(CLASSES, 3000, 1, 0, weights=[2.0] + [1.0] * 36)
                      for c in combo)
    assert doubled["class0"] == pytest.approx(2 * 3000 / 38, abs=2)
    with pytest.raises(ValueError):
        sample_class_combos(CLASSES, 3, weights=[1.0])
    with pytest.raises(ValueError):
        sample_class_combos(CLASSES[:2], 3, weights=[0.0, 0.0])
