"""Tests for metacorrect.datasets.noise (pure numpy, fast)."""
from __future__ import annotations


import numpy as np
import pytest

from metacorrect.datasets.noise import (
    FEATURE_CHUNK,
    NoiseSpec,
    NoiseSpecError,
    apply_noise,
    empirical_transition,
    parse_noise,
    transition_matrix,
)

C10 = 10


def uniform_labels(n: int, c: int = C10, seed: int = 123) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, c, size=n)


def cifar100_like_coarse(seed: int = 7) -> np.ndarray:
    """20 superclasses of 5 fine classes each, shuffled so members are not contiguous."""
    return np.random.default_rng(seed).permutation(100) % 20


# ---------------------------------------------------------------- sampled: empirical T matches model T
@pytest.mark.parametrize("text", ["symmetric:0.4", "symmetric:0.6:uniform", "pair:0.4", "pair:0.45:cifar10"])
def test_sampled_empirical_matches_transition(text: str) -> None:
    spec = parse_noise(text)
    y = uniform_labels(200_000)
    res = apply_noise(spec, y, C10, seed=0)
    t = transition_matrix(spec, C10)
    np.testing.assert_allclose(res.transition, t)
    assert np.abs(res.empirical - t).max() < 0.01
    np.testing.assert_array_equal(res.empirical, empirical_transition(y, res.noisy_labels, C10))
    assert res.noisy_labels.dtype == np.int64 and res.noisy_labels.shape == y.shape
    assert res.description


def test_actual_rates_flip_vs_uniform() -> None:
    y = uniform_labels(200_000)
    flip = apply_noise(parse_noise("symmetric:0.6"), y, C10, seed=1)
    unif = apply_noise(parse_noise("symmetric:0.6:uniform"), y, C10, seed=1)
    assert abs(flip.actual_rate - 0.6) < 0.01
    assert abs(unif.actual_rate - 0.6 * (1 - 1 / C10)) < 0.01
    assert flip.actual_rate == pytest.approx(np.mean(flip.noisy_labels != y))


def test_expected_matrices() -> None:
    flip = transition_matrix(parse_noise("symmetric:0.6"), 4)
    np.testing.assert_allclose(np.diag(flip), 0.4)
    np.testing.assert_allclose(flip[0, 1:], 0.2)
    unif = transition_matrix(parse_noise("symmetric:0.6:uniform"), 4)
    np.testing.assert_allclose(np.diag(unif), 0.4 + 0.15)
    np.testing.assert_allclose(unif[0, 1:], 0.15)
    cifar = transition_matrix(parse_noise("pair:0.4:cifar10"), 10)
    for src, tgt in [(9, 1), (2, 0), (3, 5), (5, 3), (4, 7)]:
        assert cifar[src, src] == pytest.approx(0.6) and cifar[src, tgt] == pytest.approx(0.4)
    for cls in (0, 1, 6, 7, 8):  # classes without a partner keep their label
        np.testing.assert_array_equal(cifar[cls], np.eye(10)[cls])
    nxt = transition_matrix(parse_noise("pair:0.3"), 3)
    np.testing.assert_allclose(nxt, [[0.7, 0.3, 0], [0, 0.7, 0.3], [0.3, 0, 0.7]])


@pytest.mark.parametrize("text", ["none", "symmetric:0.6", "symmetric:1", "symmetric:0.3:uniform", "pair:0.4",
                                  "pair:1.0", "pair:0.4:map=1>0;0>1", "pair:0.2:cifar100"])
@pytest.mark.parametrize("c", [2, 10, 100])
def test_transition_rows_sum_to_one(text: str, c: int) -> None:
    spec = parse_noise(text)
    coarse = cifar100_like_coarse() if c == 100 else np.arange(c) % 2
    t = transition_matrix(spec, c, coarse_of_class=coarse)
    assert t.shape == (c, c) and (t >= 0).all()
    np.testing.assert_allclose(t.sum(axis=1), 1.0)


# ---------------------------------------------------------------- exact-count variants
def test_symmetric_flip_exact_count() -> None:
    y = uniform_labels(10_007)
    res = apply_noise(parse_noise("symmetric:0.37:flip:exact"), y, C10, seed=3)
    changed = res.noisy_labels != y
    assert changed.sum() == round(0.37 * y.size)  # every chosen sample gets a different class
    # Flipped targets are spread over the other classes, never the true one.
    offsets = (res.noisy_labels[changed] - y[changed]) % C10
    assert set(np.unique(offsets)) == set(range(1, C10))


def test_pair_exact_count() -> None:
    y = uniform_labels(10_000)
    spec = parse_noise("pair:0.45:cifar10:exact")
    res = apply_noise(spec, y, C10, seed=4)
    target = {9: 1, 2: 0, 3: 5, 5: 3, 4: 7}
    has_partner = np.isin(y, list(target))
    changed = res.noisy_labels != y
    assert changed.sum() == round(0.45 * has_partner.sum())
    assert not changed[~has_partner].any()
    assert all(target[a] == b for a, b in zip(y[changed], res.noisy_labels[changed]))


def test_uniform_exact_resamples_fixed_count() -> None:
    y = uniform_labels(50_000)
    rate, k = 0.6, round(0.6 * 50_000)
    res = apply_noise(parse_noise("symmetric:0.6:uniform:exact"), y, C10, seed=5)
    changes = int((res.noisy_labels != y).sum())
    assert changes <= k
    # Each of the k resampled labels keeps its class with probability 1/C: binomial(k, 1 - 1/C) changes.
    sd = np.sqrt(k * 0.1 * 0.9)
    assert abs(changes - rate * (1 - 1 / C10) * y.size) < 5 * sd
    # Rate 1 with C = 2: every label is redrawn, so about half keep their class (unlike flip, which changes all).
    y2 = uniform_labels(1000, 2)
    res2 = apply_noise(parse_noise("symmetric:1.0:uniform:exact"), y2, 2, seed=5)
    assert 400 < (res2.noisy_labels != y2).sum() < 600


def test_exact_rounding_and_rate_one() -> None:
    y = uniform_labels(999)
    assert (apply_noise(parse_noise("symmetric:1:exact"), y, C10, seed=0).noisy_labels != y).all()
    res = apply_noise(parse_noise("symmetric:0.5:exact"), y[:7], C10, seed=0)
    assert (res.noisy_labels != y[:7]).sum() == round(0.5 * 7)


# ---------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("text", ["symmetric:0.4", "symmetric:0.4:exact", "symmetric:0.5:uniform",
                                  "symmetric:0.5:uniform:exact", "pair:0.3", "pair:0.3:exact"])
def test_seeded_reproducibility(text: str) -> None:
    spec, y = parse_noise(text), uniform_labels(5000)
    a = apply_noise(spec, y, C10, seed=11).noisy_labels
    b = apply_noise(spec, y, C10, seed=11).noisy_labels
    c = apply_noise(spec, y, C10, seed=12).noisy_labels
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_none_and_rate_zero_leave_labels_unchanged() -> None:
    y = uniform_labels(1000).reshape(20, 50)
    for text in ["none", "symmetric:0", "pair:0%", "instance:0"]:
        spec = parse_noise(text)
        assert spec.is_none
        res = apply_noise(spec, y, C10, seed=0)
        np.testing.assert_array_equal(res.noisy_labels, y)
        np.testing.assert_array_equal(res.transition, np.eye(C10))
        assert res.actual_rate == 0.0 and res.noisy_labels.shape == (20, 50)
    assert not parse_noise("symmetric:0.1").is_none


def test_million_labels_keep_rates() -> None:
    # Clothing1M-size label arrays go through the vectorised path (speed lives in benchmarks, not here).
    y = uniform_labels(1_000_000)
    for text, rate in [("symmetric:0.6", 0.6), ("symmetric:0.6:exact", 0.6), ("symmetric:0.6:uniform", 0.54)]:
        res = apply_noise(parse_noise(text), y, C10, seed=0)
        assert abs(res.actual_rate - rate) < 0.005


# ---------------------------------------------------------------- cifar100 superclass pairs
def test_cifar100_next_in_superclass() -> None:
    coarse = cifar100_like_coarse()
    spec = parse_noise("pair:0.4:cifar100")
    t = transition_matrix(spec, 100, coarse_of_class=coarse)
    off = t - np.diag(np.diag(t))
    target = off.argmax(axis=1)
    np.testing.assert_allclose(off.max(axis=1), 0.4)
    assert (coarse[target] == coarse).all() and (target != np.arange(100)).all()
    for sup in range(20):
        members = np.flatnonzero(coarse == sup)
        assert sorted(target[members]) == list(members)  # a permutation within the superclass
        np.testing.assert_array_equal(target[members], np.roll(members, -1))  # next fine index, cyclic
    y = uniform_labels(20_000, 100)
    res = apply_noise(spec, y, 100, seed=2, coarse_of_class=coarse)
    changed = res.noisy_labels != y
    assert (coarse[res.noisy_labels] == coarse[y]).all()
    np.testing.assert_array_equal(res.noisy_labels[changed], target[y[changed]])
    assert abs(res.actual_rate - 0.4) < 0.02


def test_cifar100_superclass_of_one_has_no_partner() -> None:
    coarse = np.array([0, 0, 1, 2, 2, 2])
    t = transition_matrix(parse_noise("pair:0.4:cifar100"), 6, coarse_of_class=coarse)
    np.testing.assert_array_equal(t[2], np.eye(6)[2])
    assert t[3, 4] == t[4, 5] == t[5, 3] == pytest.approx(0.4)


# ---------------------------------------------------------------- instance-dependent noise
@pytest.fixture(scope="module")
def instance_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(99)
    return rng.integers(0, C10, 20_000), rng.normal(size=(20_000, 64))


def test_instance_rate_and_reproducibility(instance_data) -> None:
    y, x = instance_data
    spec = parse_noise("instance:0.4")
    res = apply_noise(spec, y, C10, seed=8, features=x)
    assert abs(res.actual_rate - 0.4) < 0.05
    np.testing.assert_array_equal(res.noisy_labels, apply_noise(spec, y, C10, seed=8, features=x).noisy_labels)
    assert (res.noisy_labels != apply_noise(spec, y, C10, seed=9, features=x).noisy_labels).any()
    np.testing.assert_array_equal(res.transition, res.empirical)
    np.testing.assert_allclose(res.transition.sum(axis=1), 1.0)
    with pytest.raises(NoiseSpecError, match="no fixed transition matrix"):
        transition_matrix(spec, C10)


def test_instance_callable_in_chunks_matches_array(instance_data) -> None:
    y, x = instance_data
    calls: list[int] = []

    def source(idx: np.ndarray) -> np.ndarray:
        calls.append(idx.size)
        return x[idx]

    spec = parse_noise("instance:0.4")
    from_array = apply_noise(spec, y, C10, seed=8, features=x).noisy_labels
    from_callable = apply_noise(spec, y, C10, seed=8, features=source).noisy_labels
    np.testing.assert_array_equal(from_array, from_callable)
    assert len(calls) == -(-y.size // FEATURE_CHUNK) > 1 and max(calls) <= FEATURE_CHUNK and sum(calls) == y.size


def test_instance_features_required_and_checked(instance_data) -> None:
    y, x = instance_data
    with pytest.raises(NoiseSpecError, match="needs image features"):
        apply_noise(parse_noise("instance:0.4"), y, C10, seed=0)
    with pytest.raises(NoiseSpecError, match="rows"):
        apply_noise(parse_noise("instance:0.4"), y, C10, seed=0, features=x[:100])


# ---------------------------------------------------------------- parsing
EXAMPLES = {
    "none": NoiseSpec("none", 0.0),
    "symmetric:0.6": NoiseSpec("symmetric", 0.6),
    "symmetric:60%": NoiseSpec("symmetric", 0.6),
    "symmetric:0.6:uniform": NoiseSpec("symmetric", 0.6, variant="uniform"),
    "symmetric:0.4:flip:exact": NoiseSpec("symmetric", 0.4, exact=True),
    "symmetric:0.4:uniform:exact": NoiseSpec("symmetric", 0.4, variant="uniform", exact=True),
    "symmetric:0.4:sampled": NoiseSpec("symmetric", 0.4),
    "pair:0.4": NoiseSpec("pair", 0.4),
    "pair:0.4:cifar10": NoiseSpec("pair", 0.4, class_map="cifar10"),
    "pair:0.4:cifar100:exact": NoiseSpec("pair", 0.4, exact=True, class_map="cifar100"),
    "pair:0.4:map=2>0;3>5": NoiseSpec("pair", 0.4, class_map="2>0;3>5"),
    "instance:0.4": NoiseSpec("instance", 0.4),
    " Symmetric : 0.25 : Uniform ": NoiseSpec("symmetric", 0.25, variant="uniform"),
}


@pytest.mark.parametrize("text", list(EXAMPLES))
def test_parse_round_trip(text: str) -> None:
    spec = parse_noise(text)
    assert spec == EXAMPLES[text]
    assert parse_noise(spec.to_string()) == spec
    assert str(spec) == spec.to_string()


def test_canonical_strings() -> None:
    assert parse_noise("symmetric:0.4:flip:exact").to_string() == "symmetric:0.4:exact"
    assert parse_noise("pair:0.4:map= 2>0 ; 3>5").to_string() == "pair:0.4:map=2>0;3>5"
    assert parse_noise("pair:40%:next").to_string() == "pair:0.4"
    assert NoiseSpec("symmetric", 1).to_string() == "symmetric:1.0"


@pytest.mark.parametrize("text, fragment", [
    ("symmetrc:0.6", "unknown kind 'symmetrc' (expected one of none, symmetric, pair, instance)"),
    ("symmetric:1.5", "outside [0, 1]"),
    ("symmetric:-0.1", "outside [0, 1]"),
    ("pair:150%", "outside [0, 1]"),
    ("symmetric:abc", "is not a number"),
    ("symmetric:nan", "outside [0, 1]"),
    ("symmetric", "missing rate"),
    ("symmetric:0.4:bogus", "unknown option 'bogus'"),
    ("symmetric:0.4:flip:uniform", "conflicts"),
    ("pair:0.4:uniform", "applies only to symmetric"),
    ("symmetric:0.4:cifar10", "applies only to pair"),
    ("instance:0.4:exact", "exact counts apply only"),
    ("none:0.3", "takes no rate"),
    ("pair:0.4:map=2-0", "bad class map entry '2-0'"),
    ("pair:0.4:map=2>2", "maps a class to itself"),
    ("pair:0.4:map=2>0;2>1", "more than one target"),
    ("", "unknown kind"),
])
def test_parse_rejects(text: str, fragment: str) -> None:
    with pytest.raises(NoiseSpecError) as info:
        parse_noise(text)
    assert str(info.value).startswith(f"noise '{text}': ")
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_spec_validates_direct_construction() -> None:
    assert NoiseSpec("pair", 0.4, class_map="2>0; 3>5").class_map == "2>0;3>5"
    with pytest.raises(NoiseSpecError, match="unknown kind"):
        NoiseSpec("gaussian", 0.1)
    with pytest.raises(NoiseSpecError, match="outside"):
        NoiseSpec("symmetric", 2.0)


# ---------------------------------------------------------------- apply-time validation
def test_explicit_map_out_of_range_at_apply_time() -> None:
    spec = parse_noise("pair:0.4:map=2>0;3>12")  # fine to parse: C is unknown until applied
    with pytest.raises(NoiseSpecError, match=r"'3>12' has a class outside \[0, 10\)"):
        apply_noise(spec, uniform_labels(100), C10, seed=0)
    res = apply_noise(parse_noise("pair:1:map=2>0;3>5"), np.array([2, 3, 5, 0]), C10, seed=0)
    np.testing.assert_array_equal(res.noisy_labels, [0, 5, 5, 0])


def test_input_validation_messages() -> None:
    spec = parse_noise("symmetric:0.2")
    with pytest.raises(NoiseSpecError, match=r"true labels contain 12, outside \[0, 10\)"):
        apply_noise(spec, np.array([1, 12, 3]), C10, seed=0)
    with pytest.raises(NoiseSpecError, match=r"contain -1, outside"):
        apply_noise(spec, np.array([-1, 2]), C10, seed=0)
    with pytest.raises(NoiseSpecError, match="must be integers"):
        apply_noise(spec, np.array([0.5, 1.0]), C10, seed=0)
    with pytest.raises(NoiseSpecError, match="num_classes must be an integer >= 2"):
        apply_noise(spec, np.array([0, 0]), 1, seed=0)
    with pytest.raises(NoiseSpecError, match="needs 10 classes, got 5"):
        transition_matrix(parse_noise("pair:0.4:cifar10"), 5)
    with pytest.raises(NoiseSpecError, match="needs coarse_of_class"):
        apply_noise(parse_noise("pair:0.4:cifar100"), np.array([0, 1]), 100, seed=0)
    with pytest.raises(NoiseSpecError, match="coarse_of_class has 3 entries, expected 100"):
        transition_matrix(parse_noise("pair:0.4:cifar100"), 100, coarse_of_class=np.array([0, 0, 1]))


def test_empirical_transition_identity_for_empty_rows() -> None:
    emp = empirical_transition(np.array([0, 0, 0, 1]), np.array([0, 1, 1, 1]), 3)
    np.testing.assert_allclose(emp, [[1 / 3, 2 / 3, 0], [0, 1, 0], [0, 0, 1]])
