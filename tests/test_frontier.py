"""The matched-control statistics: the seed-then-text bootstrap, the isotonic frontier, the residual
verdict, every-pair tests with their power, on records built so the right answer is known."""
import numpy as np
import pytest
from scipy import stats

from utils.results.aggregate import pair_tests, success_curves, verdicts
from utils.results.frontier import (adjust_secondary, fit_direction, frontier, isotonic_fit, residual_verdict,
                                    seed_residuals)
from utils.results.statistics import bootstrap_summary, hierarchical_bootstrap, holm, mde, paired_t_mde, seed_level_test


def test_hierarchical_bootstrap_draws_seeds_then_texts_with_the_probabilities_worked_out_by_hand():
    mean_of_seeds = lambda slots: np.mean([s["v"] for s in slots], axis=0)  # noqa: E731
    # Two seeds whose texts are all alike: only the seed draw varies, {1, 1}, {1, 3}/{3, 1}, {3, 3}.
    est, draws = hierarchical_bootstrap([{"v": [1, 1, 1]}, {"v": [3, 3]}], mean_of_seeds, n_boot=4000)
    assert est == 2.0 and set(np.unique(draws)) == {1.0, 2.0, 3.0}
    assert [np.mean(draws == v) for v in (1, 2, 3)] == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    # One seed of texts 0 and 1: only the texts vary; means 0, 0.5, 1 with 1/4, 1/2, 1/4.
    est, draws = hierarchical_bootstrap([{"v": [0, 1]}], mean_of_seeds, n_boot=4000)
    assert est == 0.5 and [np.mean(draws == v) for v in (0, 0.5, 1)] == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    # Arms of one seed share the drawn texts: a difference of equal records is 0 in every draw, where
    # drawing each arm's texts on its own would not give 0.
    same = [{"a": [0.0, 5.0, 1.0], "b": [0.0, 5.0, 1.0]}]
    _, d = hierarchical_bootstrap(same, lambda slots: slots[0]["a"] - slots[0]["b"], n_boot=200)
    assert not d.any()


def test_bootstrap_summary_inverts_the_interval_and_states_the_detectable_effect():
    draws = np.random.default_rng(0).normal(1.0, 0.5, 20000)
    s = bootstrap_summary(1.0, draws)
    assert s["ci95"] == pytest.approx([1 - 1.96 * 0.5, 1 + 1.96 * 0.5], abs=0.02)
    assert s["p_value"] == pytest.approx(2 * stats.norm.cdf(-2.0), abs=0.005)       # 0 lies 2 SE away
    assert s["mde80"] == pytest.approx(2.8016 * 0.5, abs=0.01) == mde(0.5, 0.05)
    assert mde(0.5, 0.05 / 70) == pytest.approx((stats.norm.ppf(1 - 0.05 / 140) + stats.norm.ppf(0.8)) * 0.5)


def test_no_p_value_floor_keeps_significance_reachable_among_105_tests():
    """With p floored at 1 / 2000 draws, Holm over 105 tests could never go below 105 / 2000 > 0.05."""
    rng = np.random.default_rng(2)
    summaries = {f"t{i}": bootstrap_summary(1.0 if i < 10 else 0.0, rng.normal(1.0 if i < 10 else 0.0, 0.2, 2000))
                 for i in range(105)}
    strong = summaries["t0"]["p_value"]
    assert 0 < strong < 1e-5 and strong == pytest.approx(2 * stats.norm.sf(1.0 / summaries["t0"]["se"]), rel=1e-6)
    adjusted = holm({k: v["p_value"] for k, v in summaries.items()})
    assert all(adjusted[f"t{i}"] < 0.05 for i in range(10)) and adjusted["t50"] > 0.05
    # A tail of enough draws is still counted: p is twice its share.
    counted = bootstrap_summary(0.3, rng.normal(0.3, 0.2, 2000))
    assert counted["p_value"] == pytest.approx(2 * stats.norm.cdf(-1.5), abs=0.02)


def _simulated_seeds(n_seeds: int, rng, seed_sd: float = 0.3, text_sd: float = 0.2, texts: int = 20) -> list[dict]:
    """Unconstrained arms on damage = 3 - clean (plus text noise); the constrained arm 'm' at a true residual
    of 0 with a seed effect that dominates its text noise (the case where the text-level bootstrap
    under-covers)."""
    out = []
    for _ in range(n_seeds):
        s = {a: {"clean": list(rng.normal(c, 0.05, texts)), "value": list(3 - c + rng.normal(0, text_sd, texts))}
             for a, c in (("a", 1.0), ("b", 1.5), ("c", 2.0), ("d", 2.5))}
        u = rng.normal(0, seed_sd)
        s["m"] = {"clean": list(rng.normal(1.75, 0.05, texts)), "value": list(3 - 1.75 + u + rng.normal(0, text_sd, texts))}
        out.append(s)
    return out


@pytest.mark.parametrize("n_seeds", [3, 5])
def test_the_primary_interval_covers_at_its_nominal_rate(n_seeds):
    """Seed-level t over the seeds' residuals from their own frontiers: >= 93% coverage of a nominal 95%."""
    rng = np.random.default_rng(n_seeds)
    covered = []
    for _ in range(400):
        t = seed_level_test(seed_residuals(_simulated_seeds(n_seeds, rng), "m", ["a", "b", "c", "d"], False))
        covered.append(t["ci95"][0] <= 0 <= t["ci95"][1])
    assert np.mean(covered) >= 0.93
    one = seed_level_test([0.2])
    assert one["p_value"] is None and one["ci95"] is None         # one seed: no seed-level test


def test_secondary_frontier_verdicts_are_holm_adjusted_and_the_primary_is_not():
    def res(p, mean=0.1):
        return {"mean": mean, "ci95": [0.01, 0.2], "se": 0.05, "p_value": p, "inside_range": True, "mde80": 0.14}
    frontiers = {m: {"residuals": {"monotonic": res(0.03), "monotonic_init": res(0.03)}} for m in ("x", "y", "z")}
    adjust_secondary(frontiers, ("x", "monotonic"))
    second = frontiers["y"]["residuals"]["monotonic"]
    assert second["p_holm"] == pytest.approx(0.15) and second["family_size"] == 5       # 5 x 0.03
    assert second["verdict"].startswith("no difference detected") and second["mde80"] == pytest.approx(mde(0.05, 0.01))
    assert "p_holm" not in frontiers["x"]["residuals"]["monotonic"]                     # the primary: tested alone
    assert residual_verdict(res(0.03)).startswith("less robust")                        # unadjusted, it would be named


def test_paired_t_mde_has_80_percent_power_by_simulation():
    assert paired_t_mde(3, 1.0) == pytest.approx(3.26, abs=0.01)     # the "about 3.3 seed-sds at 3 seeds"
    rng = np.random.default_rng(1)
    n, d = 5, paired_t_mde(5, 1.0)
    x = rng.normal(d, 1.0, size=(20000, n))
    rejected = stats.ttest_1samp(x, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.80, abs=0.01)
    assert paired_t_mde(1, 1.0) is None


def test_isotonic_fit_pools_adjacent_violators_and_is_flat_beyond_the_points():
    x, y = np.array([3.0, 1.0, 4.0, 2.0]), np.array([3.5, 4.0, 1.0, 3.0])     # unsorted on purpose
    assert not fit_direction(x, y)                                              # falls with x
    f = isotonic_fit(x, y, increasing=False)
    # by hand: sorted y 4, 3, 3.5, 1 -> the violators 3, 3.5 pool to 3.25
    assert f(np.array([1.0, 2.0, 2.5, 3.0, 4.0])) == pytest.approx([4.0, 3.25, 3.25, 3.25, 1.0])
    assert f(np.array([0.0, 9.0])) == pytest.approx([4.0, 1.0])


def _raw(monotone_shift: float, monotone_clean: float, seeds=5, texts=30, seed=0):
    """hotflip.json records whose unconstrained arms lie on damage = 3 - clean (plus text noise),
    and a monotone arm at `monotone_clean` whose damage is the frontier's plus `monotone_shift`."""
    rng = np.random.default_rng(seed)
    centres = {"control_1": 2.6, "pretrained": 2.2, "baseline": 2.0, "unconstrained_from_init": 1.8}
    raw = {}
    for s in range(seeds):
        models = {}
        for arm, c in [*centres.items(), ("monotonic", monotone_clean)]:
            clean = c + 0.05 * rng.standard_normal(texts) + 0.02 * rng.standard_normal()
            dmg = 3 - clean + (monotone_shift if arm == "monotonic" else 0) + 0.1 * rng.standard_normal(texts)
            models[arm] = {"examples": [{"doc": d, "clean_nll": float(cl), "abs_delta_nll": float(v),
                                         "rel_delta_nll": float(v / cl), "success": bool(v / cl > 0.4)}
                                        for d, (cl, v) in enumerate(zip(clean, dmg))]}
        raw[s] = {"hotflip.json": {"config": {"success_abs_nats": 0.5}, "models": models}}
    return raw


def test_the_verdict_names_an_arm_only_where_its_residual_interval_excludes_zero():
    shifted = frontier(_raw(-0.3, 2.1), "hotflip_abs_delta_nll", 0.5, n_boot=400)
    r = shifted["residuals"]["monotonic"]
    assert shifted["fit"].startswith("isotonic (decreasing") and r["inside_range"]
    assert r["mean"] == pytest.approx(-0.3, abs=0.05) and r["ci95"][1] < 0
    assert r["verdict"] == "more robust than an unconstrained model of the same clean loss"
    assert set(r["nearest_control"]["controls"]) <= {"pretrained", "baseline"}      # 0.1 away on either side
    assert r["nearest_control"]["difference"]["ci95"][1] < 0

    on_it = frontier(_raw(0.0, 2.1, seed=3), "hotflip_abs_delta_nll", 0.5, n_boot=400)["residuals"]["monotonic"]
    assert on_it["ci95"][0] < 0 < on_it["ci95"][1]
    assert on_it["verdict"].startswith("no difference detected (this test detects a residual of about")

    worse = frontier(_raw(+0.3, 2.1), "hotflip_abs_delta_nll", 0.5, n_boot=400)["residuals"]["monotonic"]
    assert worse["verdict"] == "less robust than an unconstrained model of the same clean loss"

    outside = frontier(_raw(-0.3, 3.5), "hotflip_abs_delta_nll", 0.5, n_boot=400)["residuals"]["monotonic"]
    assert not outside["inside_range"] and outside["verdict"].startswith("no matched verdict")


def test_residual_verdict_rule_on_its_own():
    base = {"inside_range": True, "mde80": 0.2, "se": 0.07}
    assert residual_verdict({**base, "ci95": [-0.5, -0.01]}).startswith("more robust")
    assert residual_verdict({**base, "ci95": [0.01, 0.5]}).startswith("less robust")
    assert residual_verdict({**base, "ci95": [-0.01, 0.5]}).startswith("no difference detected")
    # every text succeeds on every arm: no draw varies, and a detectable effect of 0 would be a false promise
    assert residual_verdict({**base, "ci95": [0.0, 0.0], "se": 0.0, "mde80": 0.0}).startswith("no test: the measure does not vary")


def test_every_pair_is_tested_with_holm_and_a_detectable_effect_beside_each_non_result():
    raw = _raw(-0.3, 2.1)
    arms = ["pretrained", "baseline", "monotonic", "unconstrained_from_init"]
    tests = pair_tests(raw, arms, n_boot=400)
    hot = {k: t for k, t in tests.items() if t["measure"] == "hotflip_abs_delta_nll"}
    assert len(hot) == 6 and "hotflip_abs_delta_nll: pretrained vs monotonic" in hot
    # pretrained (clean 2.2) takes 0.8 on average, monotone (2.1) 0.9 - 0.3 = 0.6
    assert hot["hotflip_abs_delta_nll: pretrained vs monotonic"]["mean"] == pytest.approx(0.2, abs=0.05)
    said = verdicts(tests, n_seeds=5)
    assert said["hotflip_abs_delta_nll: pretrained vs monotonic"].startswith("monotonic (")
    adjusted = [t["p_holm"] for t in tests.values()]
    assert all(t["p_holm"] >= t["p_value"] for t in tests.values()) and max(adjusted) <= 1
    # the baseline (2.0, damage 1.0) and unconstrained (1.8, damage 1.2) differ by 0.2 as well: named
    quiet = [v for v in said.values() if v.startswith("no significant difference")]
    assert all("detectable at 80% power:" in v for v in quiet)


def test_success_curves_count_texts_above_each_absolute_threshold():
    raw = {0: {"hotflip.json": {"config": {}, "models": {"a": {"examples": [
        {"doc": i, "clean_nll": 2.0, "abs_delta_nll": v} for i, v in enumerate([0.1, 0.6, 1.2, 2.5])]}}}}}
    curves = success_curves(raw, ["a"], thresholds=[0.0, 0.5, 1.0, 2.0, 3.0])
    assert curves["attacks"]["hotflip"]["a"] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_the_same_history_frontier_reads_the_residual_against_the_ladder_not_models_of_another_history():
    """Models of another history (the pretrained model, stage 0's snapshots) lie on another curve (here 0.5 nats
    more damage at equal clean loss). The monotone arm lies on its own history's curve: against that frontier
    (the ladder, unconstrained_from_init, the baseline) its residual is 0; fitted to every unconstrained arm, it
    would read as more robust. The ladder also puts the monotone arm's clean loss inside the range."""
    rng = np.random.default_rng(4)
    same = {"baseline": 1.8, "unconstrained_from_init": 2.0, "ladder_2000": 2.5, "ladder_1000": 2.9}
    other = {"pretrained": 2.2, "control_100": 2.6}
    raw = {}
    for s in range(4):
        models = {}
        for arm, c in [*same.items(), *other.items(), ("monotonic", 2.4)]:
            clean = c + 0.05 * rng.standard_normal(30)
            dmg = 3 - clean + (0.5 if arm in other else 0) + 0.1 * rng.standard_normal(30)
            models[arm] = {"examples": [{"doc": d, "clean_nll": float(cl), "abs_delta_nll": float(v),
                                         "rel_delta_nll": float(v / cl), "success": bool(v / cl > 0.4)}
                                        for d, (cl, v) in enumerate(zip(clean, dmg))]}
        raw[s] = {"hotflip.json": {"config": {"success_abs_nats": 0.5}, "models": models}}
    own = frontier(raw, "hotflip_abs_delta_nll", 0.5, n_boot=300, which="same_history")
    assert sorted(own["unconstrained_arms"]) == sorted(same) and own["frontier_arms"] == "same_history"
    assert set(own["points"]) == {*same, *other, "monotonic"}          # the others are still shown
    r = own["residuals"]["monotonic"]
    assert r["inside_range"] and r["ci95"][0] < 0 < r["ci95"][1] and abs(r["mean"]) < 0.1
    assert r["seed_level"]["n"] == 4
    every = frontier(raw, "hotflip_abs_delta_nll", 0.5, n_boot=300, which="all")["residuals"]["monotonic"]
    assert every["mean"] < -0.15                   # the other history's points pull the frontier up
    # Without the ladder the same-history frontier ends at unconstrained_from_init: the arm is outside its range.
    for s in raw.values():
        for rung in ("ladder_1000", "ladder_2000"):
            del s["hotflip.json"]["models"][rung]
    short = frontier(raw, "hotflip_abs_delta_nll", 0.5, n_boot=100, which="same_history")["residuals"]["monotonic"]
    assert not short["inside_range"] and short["verdict"].startswith("no matched verdict")
