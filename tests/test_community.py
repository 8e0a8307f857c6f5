"""Client similarity (Eq. 8), data importance (Eq. 9) and RL-CD community detection (Sec. IV-C5)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.community import (
    RLCDConfig,
    data_importance,
    double_centred_pairs,
    hierarchy_score,
    otsu_separability,
    rl_cd,
    similarity_matrix,
    similarity_weights,
)

GROUPS = 8
PER_GROUP = 5
CLASSES = 10


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert & Arabie 1985); 1 = identical partitions."""
    _, ai = np.unique(np.asarray(a), return_inverse=True)
    _, bi = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, rows, cols, total = pairs(table), pairs(table.sum(1)), pairs(table.sum(0)), len(ai) * (len(ai) - 1) / 2
    expected = rows * cols / total
    return (index - expected) / ((rows + cols) / 2 - expected)


def group_label_distributions() -> np.ndarray:
    """(GROUPS, CLASSES): group g has dominant label g // 2 (0.6), its own secondary label (4 + g) % 10 (0.3).

    Pairs of groups share the dominant label; groups 6 and 7 have as secondary label the dominant label
    of pair 0 and pair 1, a realistic cross-overlap.
    """
    base = np.full((GROUPS, CLASSES), 0.1 / (CLASSES - 2))
    for g in range(GROUPS):
        base[g, g // 2] = 0.6
        base[g, (4 + g) % CLASSES] = 0.3
    return base / base.sum(axis=1, keepdims=True)


def planted_gradients(
    seed: int, features: int = 16, samples: int = 200, concentration: float = 100.0, noise: float = 0.01
) -> tuple[np.ndarray, np.ndarray]:
    """Output-layer gradients of softmax cross-entropy for 40 clients in 8 planted groups, and the group labels.

    Each client draws its label mix from Dirichlet(concentration * group distribution) and ``samples``
    labels from it; a sample of class y has features phi_y + noise. The global head predicts the global
    label mix p for every input, so the mean gradient is (p - onehot(y)) for the bias and
    (p - onehot(y)) h^T for the weights; small Gaussian noise is added. Shape (40, CLASSES * (features + 1)).
    """
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(GROUPS), PER_GROUP)
    base = group_label_distributions()
    mixes = np.stack([rng.dirichlet(concentration * base[g]) for g in groups])
    prediction = mixes.mean(axis=0)
    phi = rng.normal(size=(CLASSES, features))
    grads = []
    for mix in mixes:
        y = rng.choice(CLASSES, size=samples, p=mix)
        h = phi[y] + 0.5 * rng.normal(size=(samples, features))
        err = prediction[None, :] - np.eye(CLASSES)[y]
        grad = np.concatenate([err.mean(axis=0), (err.T @ h / samples).ravel()])
        grads.append(grad + noise * rng.normal(size=grad.size))
    return np.stack(grads), groups


def first_level_labels(result_first: list[list[int]], n: int) -> np.ndarray:
    labels = np.full(n, -1)
    for c, members in enumerate(result_first):
        labels[members] = c
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_rl_cd_recovers_planted_groups_that_single_louvain_merges(seed: int) -> None:
    grads, groups = planted_gradients(seed)
    result = rl_cd(similarity_matrix(grads), RLCDConfig(seed=seed))
    rl_ari = adjusted_rand_index(groups, result.labels(len(groups)))
    single_ari = adjusted_rand_index(groups, first_level_labels(result.first_level, len(groups)))
    assert rl_ari >= 0.9, (rl_ari, result.communities)
    assert single_ari <= 0.7, single_ari
    assert len(result.first_level) < len(result.communities) == GROUPS
    # the single pass merges exactly the pairs sharing a dominant label
    for members in result.first_level:
        assert len({int(groups[m]) // 2 for m in members}) == 1


def test_rl_cd_is_deterministic_for_a_seed_and_returns_a_sorted_partition() -> None:
    sim = similarity_matrix(planted_gradients(5)[0])
    a, b = rl_cd(sim, RLCDConfig(seed=3)), rl_cd(sim, RLCDConfig(seed=3))
    assert a.communities == b.communities and a.splits == b.splits and a.first_level == b.first_level
    assert all(m == sorted(m) for m in a.communities)
    assert a.communities == sorted(a.communities)
    assert sorted(c for m in a.communities for c in m) == list(range(sim.shape[0]))


def test_split_record_describes_each_split() -> None:
    cfg = RLCDConfig(seed=0)
    sim = similarity_matrix(planted_gradients(0)[0])
    result = rl_cd(sim, cfg)
    assert len(result.splits) == 4  # one per merged pair
    for split in result.splits:
        assert set(split) == {"parent", "children", "criterion", "threshold", "depth"}
        assert split["depth"] == 1 and split["parent"] in result.first_level
        children = split["children"]
        assert len(children) >= 2 and all(len(c) >= cfg.min_size for c in children)
        assert sorted(c for child in children for c in child) == split["parent"]
        pairs = len(split["parent"]) * (len(split["parent"]) - 1) // 2
        assert split["threshold"] == pytest.approx(cfg.hierarchy_threshold(pairs))
        assert split["criterion"] >= split["threshold"]


def test_homogeneous_clients_are_not_split() -> None:
    rng = np.random.default_rng(0)
    direction = rng.normal(size=50)
    grads = direction + rng.uniform(0.3, 1.0, size=(30, 1)) * rng.normal(size=(30, 50))
    result = rl_cd(similarity_matrix(grads), RLCDConfig(seed=0))
    assert result.splits == []
    assert result.communities == result.first_level


def test_min_size_and_max_depth_guard_the_recursion() -> None:
    sim = similarity_matrix(planted_gradients(0)[0])
    no_split_possible = rl_cd(sim, RLCDConfig(min_size=6))  # pair communities of 10 cannot give two children of 6
    assert no_split_possible.splits == [] and len(no_split_possible.communities) == GROUPS // 2
    no_depth = rl_cd(sim, RLCDConfig(max_depth=0))
    assert no_depth.splits == [] and no_depth.communities == no_depth.first_level
    anything_goes = rl_cd(sim, RLCDConfig(eta_threshold=0.0, eta_small_sample=0.0, min_size=2))
    assert all(len(m) >= 2 for m in anything_goes.communities)  # no singletons even when every test passes


def test_top_k_sparsification_keeps_the_planted_groups() -> None:
    grads, groups = planted_gradients(1)
    sim = similarity_matrix(grads)
    assert rl_cd(sim, RLCDConfig(top_k=None)).communities == rl_cd(sim, RLCDConfig(top_k=39)).communities
    sparse = rl_cd(sim, RLCDConfig(top_k=6))
    assert adjusted_rand_index(groups, sparse.labels(len(groups))) >= 0.9


def test_similarity_matrix_is_the_cosine_of_known_vectors() -> None:
    grads = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0], [0.0, 0.0]])
    sim = similarity_matrix(grads)
    r = 1 / math.sqrt(2)
    expected = np.array(
        [
            [1.0, 0.0, r, -1.0, 0.0],
            [0.0, 1.0, r, 0.0, 0.0],
            [r, r, 1.0, -r, 0.0],
            [-1.0, 0.0, -r, 1.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
        ]
    )
    np.testing.assert_allclose(sim, expected, atol=1e-12)
    np.testing.assert_array_equal(np.diag(sim), 1.0)
    with pytest.raises(ValueError, match="shape"):
        similarity_matrix(np.zeros(3))
    with pytest.raises(ValueError, match="finite"):
        similarity_matrix(np.array([[np.nan, 1.0]]))


def test_similarity_weights_clip_or_shift_negative_cosines() -> None:
    sim = np.array([[1.0, -0.5, 0.5], [-0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])
    np.testing.assert_allclose(similarity_weights(sim, "clip"), [[0, 0, 0.5], [0, 0, 0], [0.5, 0, 0]])
    np.testing.assert_allclose(similarity_weights(sim, "shift"), [[0, 0.25, 0.75], [0.25, 0, 0.5], [0.75, 0.5, 0]])
    with pytest.raises(ValueError, match="weight_map"):
        similarity_weights(sim, "abs")


def test_data_importance_on_known_numbers() -> None:
    assert data_importance(100, 4.0) == pytest.approx(200.0)  # 100 samples * sqrt(4 nats^2)
    assert data_importance(50, 0.25) == pytest.approx(25.0)
    assert data_importance(0, 9.0) == 0.0
    with pytest.raises(ValueError, match="num_examples"):
        data_importance(-1, 1.0)
    with pytest.raises(ValueError, match="loss_sq_mean"):
        data_importance(10, float("nan"))


def test_otsu_separability_reference_values() -> None:
    assert otsu_separability(np.array([0.2] * 10 + [0.9] * 12)) == pytest.approx(1.0)
    assert otsu_separability(np.full(7, 0.4)) == 0.0
    assert otsu_separability(np.array([1.0])) == 0.0
    gauss = np.random.default_rng(0).normal(size=200_000)
    assert otsu_separability(gauss) == pytest.approx(2 / math.pi, abs=0.01)
    uniform = np.linspace(0.0, 1.0, 100_001)
    assert otsu_separability(uniform) == pytest.approx(0.75, abs=0.01)


def test_double_centring_removes_per_client_offsets_but_keeps_sub_groups() -> None:
    offsets = np.array([0.1, 0.3, 0.2, 0.5, 0.4, 0.0])
    additive = offsets[:, None] + offsets[None, :]
    np.testing.assert_allclose(double_centred_pairs(additive), 0.0, atol=1e-12)
    assert hierarchy_score(additive, centre=True) == 0.0
    assert hierarchy_score(additive, centre=False) > 0.5  # raw weights see a spurious spread
    two_groups = np.where(np.arange(6)[:, None] // 3 == np.arange(6)[None, :] // 3, 0.9, 0.6) + additive / 10
    assert hierarchy_score(two_groups) == pytest.approx(1.0)


def test_config_errors_name_the_field() -> None:
    for field, value in [
        ("weight_map", "abs"),
        ("min_size", 0),
        ("max_depth", -1),
        ("top_k", 0),
        ("resolution", 0.0),
        ("eta_small_sample", -1.0),
        ("centre", 1),
        ("seed", 1.5),
    ]:
        with pytest.raises(ValueError, match=f"RLCDConfig.{field}"):
            RLCDConfig(**{field: value})


def test_empty_and_tiny_inputs() -> None:
    assert rl_cd(np.zeros((0, 0))).communities == []
    assert rl_cd(np.ones((1, 1))).communities == [[0]]
