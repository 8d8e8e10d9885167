"""benchmarks/fidelity.py, round 2: the separability statistic (one-way ANOVA / ICC(1)) against
a hand-computed example, the bootstrapped Spearman, and the summary over (layer, seed) results."""
from __future__ import annotations

import math

import pytest
from benchmark_modules import benchmark_module



@pytest.fixture(scope="module")
def fidelity():
    with benchmark_module("fidelity") as module:
        yield module


def test_icc_hand_computed(fidelity):
    # 3 layers x 2 seeds: layer means 2, 6, 10, grand mean 6
    # MSB = 2 * (16 + 0 + 16) / 2 = 32; MSW = (1 + 1) * 3 / (3 * 1) = 2; F = 16
    # ICC(1) = (32 - 2) / (32 + 2) = 15 / 17
    # interval: F / F.975(2, 3) = 16 / 16.044 and F * F.975(3, 2) = 16 * 39.165 (F tables)
    out = fidelity.icc_oneway({"a": [1, 3], "b": [5, 7], "c": [9, 11]})
    assert out["layers"] == 3 and out["seeds"] == 2
    assert out["ms_between"] == pytest.approx(32)
    assert out["ms_within"] == pytest.approx(2)
    assert out["f"] == pytest.approx(16)
    assert out["icc"] == pytest.approx(15 / 17)
    lo_f, hi_f = 16 / 16.044, 16 * 39.165
    assert out["icc_ci"][0] == pytest.approx((lo_f - 1) / (lo_f + 1), abs=1e-3)
    assert out["icc_ci"][1] == pytest.approx((hi_f - 1) / (hi_f + 1), abs=1e-4)
    from scipy import stats
    ref = stats.f_oneway([1, 3], [5, 7], [9, 11])
    assert out["f"] == pytest.approx(ref.statistic) and out["p"] == pytest.approx(ref.pvalue)


def test_icc_no_separation_and_balance(fidelity):
    # equal layer means: all of the variance is between seeds; ICC(1) at its floor -1 / (k - 1)
    out = fidelity.icc_oneway({"a": [1, 3], "b": [3, 1]})
    assert out["ms_between"] == 0 and out["ms_within"] == pytest.approx(2)
    assert out["icc"] == pytest.approx(-1.0)
    # unbalanced: every layer gives its first k = 2 scores; a layer with one score is left out
    out = fidelity.icc_oneway({"a": [1, 3, 100], "b": [5, 7], "c": [9, 11], "d": [4]})
    assert out["layers"] == 3 and out["seeds"] == 2 and out["icc"] == pytest.approx(15 / 17)


def test_bootstrap_rho(fidelity):
    ref = [1, 2, 3, 4, 5, 6]
    same = fidelity.bootstrap_rho(ref, [[10, 20, 30, 40, 50, 60]], [[6, 5, 4, 3, 2, 1]])
    assert same["rho"] == pytest.approx(1) and same["ci"] == pytest.approx([1, 1])
    assert same["diff"] == pytest.approx(2) and same["diff_ci"] == pytest.approx([2, 2])
    # the mean over several 1-seed rankings: rho 1 and rho 1 - 6 * 4 / 210 (two swaps of neighbours)
    two = fidelity.bootstrap_rho(ref, [[1, 2, 3, 4, 5, 6], [2, 1, 3, 4, 6, 5]])
    assert two["rho"] == pytest.approx((1 + (1 - 6 * 4 / 210)) / 2)
    assert two["ci"][0] <= two["rho"] <= two["ci"][1] <= 1


def _rows(fidelity, setting, seed, layer_scores, cpu=3.0):
    rows = []
    for layer, acc in layer_scores.items():
        for arch in fidelity.ARCHS:
            config = fidelity.config_of(setting, None, arch)
            rows.append({"layer": layer, "setting": setting, "seed": seed, "config": fidelity.config_hash(config),
                         "archs": [arch], "accuracies": {arch: acc}, "mean": acc, "diverged": False,
                         "cpu_s": cpu, "wall_s": cpu})
    return rows


def test_good_summary(fidelity):
    layers = ["l1", "l2", "l3", "l4", "l5"]
    rows = []
    for i, seed in enumerate(fidelity.REFERENCE2_SEEDS[:2]):
        rows += _rows(fidelity, fidelity.REFERENCE2, seed, {k: 0.9 - 0.05 * j + 0.001 * i for j, k in enumerate(layers)},
                      cpu=20.0)
    for seed in fidelity.PROXY_SEEDS:
        # digits: in the reference's order; fashion_small8: the reverse order
        rows += _rows(fidelity, "r2/digits", seed, {k: 0.8 - 0.02 * j + 0.001 * seed for j, k in enumerate(layers)})
        rows += _rows(fidelity, "r2/fashion_small8", seed, {k: 0.5 + 0.02 * j for j, k in enumerate(layers)})
    # digits_g2 differs from digits only in groups: run for l5 (group statistics) alone, the
    # others read from digits' runs
    for seed in fidelity.PROXY_SEEDS:
        rows += _rows(fidelity, "r2/digits_g2", seed, {"l5": 0.99})
    rows += [{**rows[0], "config": "older"}]  # made with an older definition: ignored
    out = fidelity.good_summary(rows, layers, no_groups={"l1", "l2", "l3", "l4"})
    assert out["reference"]["layers"] == 5 and out["reference"]["seeds"] == [2, 2]
    assert out["reference"]["cpu_s_per_eval"] == pytest.approx(60.0)  # summed over 3 architectures
    assert out["reference"]["rho_seed_vs_seed"]["rho"] == pytest.approx(1)
    d, f = out["proxies"]["digits"], out["proxies"]["fashion_small8"]
    assert d["seeds"] == 3 and d["layers"] == 5 and d["cpu_s_per_eval"] == pytest.approx(9.0)
    assert d["rho_seed0"]["rho"] == pytest.approx(1) and d["rho_seed_mean"]["rho"] == pytest.approx(1)
    assert f["rho_one_seed"]["rho"] == pytest.approx(-1) and f["rho_one_seed"]["diff"] == pytest.approx(-2)
    assert d["separability"]["icc"] > 0.99
    assert math.isnan(f["separability"]["ms_within"]) is False and f["separability"]["ms_within"] == 0
    assert list(out["scores"]) == layers  # best reference first
    g2 = out["scores"]
    assert g2["l1"]["digits_g2"] == g2["l1"]["digits"] and g2["l5"]["digits_g2"] == pytest.approx([0.99] * 3)
    assert out["proxies"]["digits_g2"]["rho_seed0"]["rho"] == pytest.approx(0.0)  # l5 first: sum d^2 = 4 + 16, 1 - 6 * 20 / 120


def test_uses_groups(fidelity):
    assert fidelity.uses_groups("gn_relu") and fidelity.uses_groups("evonorm_s0")
    assert not fidelity.uses_groups("bn_relu") and not fidelity.uses_groups("evonorm_b0")
