"""Seed spread, paired differences and the comparison page of ``bench compare``."""

from __future__ import annotations

import math

import pytest

from bench.compare_table import markdown
from common.results import aggregate, headline, mean_curve, summarise, versus
from common.seedstats import paired_difference, spread, t_quantile_975


def test_spread_is_mean_and_sample_std() -> None:
    s = spread([0.40, 0.42, None, 0.44])
    assert s is not None and s.values == (0.40, 0.42, 0.44)
    assert s.mean == pytest.approx(0.42) and s.std == pytest.approx(0.02)
    one = spread([0.5])
    assert one is not None and one.std is None
    assert spread([None, None]) is None


def test_paired_difference_t_interval_and_significance() -> None:
    d = paired_difference([0.409, 0.386, 0.399], [0.393, 0.363, 0.379])
    assert d.differences == pytest.approx((0.016, 0.023, 0.020))
    assert d.mean == pytest.approx(0.019666, abs=1e-5)
    sem = d.std / math.sqrt(3)
    assert d.ci95 == pytest.approx((d.mean - 4.303 * sem, d.mean + 4.303 * sem))
    assert d.t == pytest.approx(d.mean / sem) and d.significant is True
    noisy = paired_difference([0.40, 0.35, 0.45], [0.38, 0.40, 0.41])
    assert noisy.significant is False
    single = paired_difference([0.4], [0.3])
    assert single.std is None and single.significant is None
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_difference([0.1, 0.2], [0.1])


def test_t_quantiles() -> None:
    assert t_quantile_975(2) == 4.303 and t_quantile_975(11) == 2.228 and t_quantile_975(100) == 1.96
    with pytest.raises(ValueError):
        t_quantile_975(0)


def _doc(strategy: str, accs: list[float]) -> dict:
    rounds = [{"round": 0, "server-accuracy": 0.1}]
    rounds += [
        {"round": i + 1, "server-accuracy": a, "sim-time": float(i + 1), "participants": 5, "max-peak-mb": 9.0}
        for i, a in enumerate(accs)
    ]
    summary = {"final-accuracy": accs[-1], "best-accuracy": max(accs), "participation-rate": 1.0, "bytes-down": 2**20}
    return {"config": {"strategy": strategy}, "summary": summary, "rounds": rounds}


def test_headline_pairs_smartfreeze_with_the_best_constrained_entry_and_page_shows_it() -> None:
    curves = {
        "smartfreeze": [[0.3] * 5 + [0.45] * 5, [0.3] * 5 + [0.43] * 5],
        "allsmall": [[0.3] * 5 + [0.40] * 5, [0.3] * 5 + [0.41] * 5],
        "heterofl": [[0.3] * 10, [0.3] * 10],
        "fedavg": [[0.3] * 5 + [0.50] * 5, [0.3] * 5 + [0.50] * 5],  # unconstrained: never the comparator
    }
    runs = {
        label: [summarise(label, seed, _doc(label, accs), 0.35) for seed, accs in enumerate(per_seed)]
        for label, per_seed in curves.items()
    }
    rows = [aggregate(label, per_seed) for label, per_seed in runs.items()]
    assert rows[0]["final-accuracy-smoothed"].mean == pytest.approx(0.44)
    assert rows[0]["final-accuracy-smoothed"].std == pytest.approx(math.sqrt(2) * 0.01)
    head = headline(rows, runs)
    assert (head["a"], head["b"], head["seeds"]) == ("smartfreeze", "allsmall", [0, 1])
    assert head["final-accuracy-smoothed"].differences == pytest.approx((0.05, 0.02))
    page = markdown("t", "test", "num-rounds=10", {k: f"strategy='{k}'" for k in curves}, rows, runs, head, "fedavg")
    assert "| smartfreeze | 44.0 ± 1.4 |" in page
    assert "`smartfreeze` minus `allsmall`" in page and "+3.5 ± 2.1 points" in page
    assert "| allsmall | 1 | 41.0 |" in page  # per-seed row
    rounds, sim, mean, std = mean_curve([_doc("x", [0.2, 0.4]), _doc("x", [0.4, 0.4])])
    assert rounds == [0, 1, 2] and mean[1] == pytest.approx(30.0) and std[2] == 0.0 and sim[1:] == [1.0, 2.0]


def test_versus_pairs_every_entry_with_the_reference_and_the_page_lists_it() -> None:
    curves = {
        "ablation": [[0.40] * 6, [0.38] * 6, [0.41] * 6],
        "other": [[0.30] * 6],
        "ref": [[0.42] * 6, [0.41] * 6, [0.42] * 6],
    }
    runs = {
        label: [summarise(label, seed, _doc(label, accs), None) for seed, accs in enumerate(per_seed)]
        for label, per_seed in curves.items()
    }
    against = versus(runs, "ref")
    assert set(against) == {"ablation", "other"}
    assert against["ablation"]["final-accuracy-smoothed"].differences == pytest.approx((-0.02, -0.03, -0.01))
    assert against["other"]["final-accuracy"].n == 1 and against["other"]["final-accuracy"].std is None
    assert versus(runs, "missing") == {}
    rows = [aggregate(label, per_seed) for label, per_seed in runs.items()]
    page = markdown("t", "test", "num-rounds=6", {k: "" for k in curves}, rows, runs, {}, "ref", against)
    assert "Each entry minus `ref`" in page and "- `ablation`, last-5 mean: -2.0 ± 1.0 points" in page


def test_self_supervised_entries_get_downstream_figures_and_cost_ratios_to_the_reference() -> None:
    def ssl_doc(probe: float, knn: float, peak: float, gflops: float, mb: float) -> dict:
        doc = _doc("fedll", [probe] * 6)
        for r in doc["rounds"][1:]:
            r["max-peak-mb"] = peak
        doc["summary"].update(
            {
                "ssl-knn-accuracy": knn,
                "ssl-floor-probe-accuracy": 0.30,
                "ssl-floor-knn-accuracy": 0.25,
                "client-gflops-per-round": gflops,
                "client-mb-per-round": mb,
            }
        )
        return doc

    runs = {
        "fedll-ssl": [summarise("fedll-ssl", 0, ssl_doc(0.40, 0.35, 10.0, 2.0, 0.5), None)],
        "fedssl": [summarise("fedssl", 0, ssl_doc(0.42, 0.37, 55.0, 9.0, 2.5), None)],
    }
    rows = [aggregate(label, per_seed) for label, per_seed in runs.items()]
    page = markdown("ssl", "d", "cfg", {"fedll-ssl": "", "fedssl": ""}, rows, runs, {}, "fedssl")
    assert "Self-supervised entries" in page
    line = next(ln for ln in page.splitlines() if ln.startswith("| fedll-ssl | 40.0 | 35.0 | 30.0 | 25.0 |"))
    assert line.endswith("| 5.5x | 4.5x | 5.0x |")  # memory, GFLOPs and communication against fedssl
    plain = [aggregate("x", [summarise("x", 0, _doc("fedavg", [0.4] * 6), None)])]
    assert "Self-supervised" not in markdown("s", "d", "c", {"x": ""}, plain, {"x": []}, {}, "x")
