"""The statistics of the final report, each small and tested against known values.

Across seeds: mean, sample std and a t-based 95% interval. Within a seed:
percentile bootstrap intervals over examples. Proportions: Wilson score
intervals (inside [0, 1]). Paired comparisons on the same examples: McNemar's
exact test for success/failure, Wilcoxon's signed-rank test for delta-NLL; on
few units (seeds): a paired t-test (scipy's implementations). Several tests in one report:
Holm's step-down adjustment (hand-written: scipy has none, statsmodels would be a new dependency).

Attack measures across seeds: a hierarchical bootstrap, seeds drawn with replacement and then the
texts of each drawn seed (one draw of texts for every arm of that seed, so arms stay paired). It
treats the seed (a training run, a trigger search, a draw of texts) as the unit and never pools
the texts of different seeds as independent; with few seeds it understates the seed-to-seed part
of the variance by about (S - 1) / S (simulated: its 95% intervals covered 76% at 3 seeds), so the
primary endpoint is tested with the seed as the unit instead (`seed_level_test`, a one-sample t over
the seeds' residuals). Its tests invert the percentile interval (p = twice the smaller tail) where the
tail holds at least MIN_TAIL_DRAWS draws, else use the normal approximation (no floor at 1 / draws, which
would make Holm over many tests unable to reject), and the minimum detectable effect at 80% power is
(z_(1 - alpha/2) + z_0.80) x its SE at the alpha its verdict uses.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def t_interval(values: list[float], level: float = 0.95) -> dict:
    """Mean, sample std and t-based interval; one value gives no interval (None)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def bootstrap_interval(values, statistic=np.mean, level: float = 0.95, n_boot: int = 2000,
                       seed: int = 0) -> list[float]:
    """Percentile bootstrap interval of `statistic` over the examples (rows of `values`)."""
    x = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(x), size=(n_boot, len(x)))
    boots = np.array([statistic(x[i]) for i in idx])
    return [float(np.quantile(boots, (1 - level) / 2)), float(np.quantile(boots, (1 + level) / 2))]


def perplexity_bootstrap(nll: list[float], tokens: list[int], **kw) -> list[float]:
    """Bootstrap over documents of exp(sum NLL / sum tokens)."""
    pairs = np.stack([np.asarray(nll, float), np.asarray(tokens, float)], axis=1)
    return bootstrap_interval(pairs, statistic=lambda p: math.exp(p[:, 0].sum() / p[:, 1].sum()), **kw)


def mcnemar_exact(a_success: list[bool], b_success: list[bool]) -> dict:
    """McNemar's exact test on paired outcomes: a binomial test on the discordant pairs."""
    a, b = np.asarray(a_success, bool), np.asarray(b_success, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    p = 1.0 if n == 0 else float(stats.binomtest(only_a, n, 0.5).pvalue)
    return {"test": "McNemar exact (binomial on discordant pairs)", "only_first": only_a,
            "only_second": only_b, "p_value": p}


def wilcoxon_paired(a: list[float], b: list[float]) -> dict:
    """Wilcoxon signed-rank test of a - b (two-sided); all-zero differences give p = 1."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if not np.any(d != 0):
        return {"test": "Wilcoxon signed-rank", "statistic": 0.0, "p_value": 1.0, "mean_difference": 0.0}
    res = stats.wilcoxon(d)
    return {"test": "Wilcoxon signed-rank", "statistic": float(res.statistic), "p_value": float(res.pvalue),
            "mean_difference": float(d.mean())}


def wilson_interval(successes: int, n: int, level: float = 0.95) -> list[float] | None:
    """Wilson score interval of a proportion (scipy): stays inside [0, 1], sensible at 0 and n."""
    if n == 0:
        return None
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=level, method="wilson")
    return [float(ci.low), min(1.0, float(ci.high))]


def paired_t(a: list[float], b: list[float]) -> dict:
    """Paired t-test of a - b (two-sided), for few units such as seeds; fewer than 2 pairs: no test."""
    d = np.asarray(a, float) - np.asarray(b, float)
    if len(d) < 2:
        return {"test": "paired t-test", "n": len(d), "p_value": None, "mean_difference": float(d.mean()) if len(d) else None}
    if not np.any(d != d[0]):
        p = 1.0 if d[0] == 0 else 0.0          # identical non-zero differences: no variance, a sure sign
        return {"test": "paired t-test", "n": len(d), "p_value": p, "mean_difference": float(d.mean())}
    res = stats.ttest_rel(a, b)
    return {"test": "paired t-test", "n": len(d), "p_value": float(res.pvalue), "mean_difference": float(d.mean())}


def holm(p_values: dict[str, float]) -> dict[str, float]:
    """Holm-Bonferroni adjusted p-values over one family of tests: the i-th smallest of m is multiplied
    by (m - i), kept non-decreasing in that order, capped at 1. Rejecting where adjusted p < alpha
    holds the family-wise error rate at alpha."""
    adjusted, running, m = {}, 0.0, len(p_values)
    for i, key in enumerate(sorted(p_values, key=p_values.get)):
        running = max(running, min(1.0, (m - i) * p_values[key]))
        adjusted[key] = running
    return adjusted


def hierarchical_bootstrap(per_seed: list[dict[str, np.ndarray]], statistic, n_boot: int = 2000,
                           seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`statistic` on the data and on `n_boot` seed-then-text resamples of it.

    per_seed: for each seed, {name: values over that seed's texts}, every name on the same texts in the
    same order. Each draw picks len(per_seed) seeds with replacement and, for each pick, its texts with
    replacement (one draw of texts for every name: paired). statistic(slots) gets one entry per picked
    seed, {name: array of the means over the drawn texts, one per draw}, and returns an array over the
    draws (or draws x k). Returns (estimate, draws)."""
    rng = np.random.default_rng(seed)
    data = [{k: np.asarray(v, float) for k, v in s.items()} for s in per_seed]
    n_seeds, names = len(data), list(data[0])
    estimate = np.asarray(statistic([{k: v.mean(keepdims=True) for k, v in s.items()} for s in data]), float)[0]
    picked = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    slots = []
    for j in range(n_seeds):
        # every seed resampled for this slot, then the slot takes the seed its draw picked
        per = []
        for s in data:
            n = len(s[names[0]])
            idx = rng.integers(0, n, size=(n_boot, n))
            per.append({k: s[k][idx].mean(axis=1) for k in names})
        slots.append({k: np.stack([p[k] for p in per])[picked[:, j], np.arange(n_boot)] for k in names})
    return estimate, np.asarray(statistic(slots), float)


def mean_of_seeds(name: str):
    """The statistic of most measures: the mean over the picked seeds of their mean over the drawn texts."""
    return lambda slots: np.mean([s[name] for s in slots], axis=0)


MIN_TAIL_DRAWS = 20          # fewer draws beyond 0 than this: the tail is not counted, it is approximated


def mde(se: float, alpha: float = 0.05, power: float = 0.80) -> float:
    """The effect a two-sided level-`alpha` test of this standard error detects with `power` (normal)."""
    return float((stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)) * se)


def bootstrap_summary(estimate: float, draws: np.ndarray, level: float = 0.95) -> dict:
    """Percentile interval, the test of 0 that inverts it, and the minimum detectable effect at 80% power
    (at alpha 0.05; a verdict adjusted for several tests recomputes it at its own alpha, `mde`).

    p: twice the fraction of draws beyond 0 where at least MIN_TAIL_DRAWS lie there; a thinner tail cannot
    be counted with this many draws, so p is the normal approximation 2 Phi(-|estimate| / SE) instead of a
    floor at 1 / draws (which Holm multiplies past any level once there are more tests than draws / 20)."""
    draws = draws[np.isfinite(draws)]
    tail = int(min((draws <= 0).sum(), (draws >= 0).sum()))
    se = float(draws.std(ddof=1)) if len(draws) > 1 else float("nan")
    if tail >= MIN_TAIL_DRAWS or not se > 0:
        p = min(1.0, 2 * tail / len(draws))
    else:
        p = float(2 * stats.norm.sf(abs(estimate) / se))
    return {"mean": float(estimate), "ci95": [float(np.quantile(draws, (1 - level) / 2)),
                                              float(np.quantile(draws, (1 + level) / 2))],
            "se": se, "p_value": p, "mde80": mde(se), "interval": "hierarchical bootstrap (seeds, then texts within each seed)"}


def seed_level_test(values: list[float], alpha: float = 0.05) -> dict:
    """The primary test: one value per seed (e.g. a residual), tested against 0 by a one-sample t-test over
    the seeds (df = seeds - 1): the seed is the unit, so the interval carries the seed-to-seed spread at its
    nominal coverage (for normal seed effects, exactly). Fewer than 2 seeds: no test."""
    t = t_interval(values, 1 - alpha)
    n, sd = t["n"], t["std"]
    out = {"test": "one-sample t over seeds", "n": n, "mean": t["mean"], "ci95": t["ci95"], "sd": sd, "alpha": alpha}
    if n < 2:
        return {**out, "p_value": None, "mde80": None}
    if not sd > 0:
        return {**out, "p_value": 1.0 if t["mean"] == 0 else 0.0, "mde80": 0.0}
    p = float(2 * stats.t.sf(abs(t["mean"]) / (sd / math.sqrt(n)), n - 1))
    return {**out, "p_value": p, "mde80": paired_t_mde(n, sd, alpha)}


def paired_t_mde(n: int, sd: float, level: float = 0.05, power: float = 0.80) -> float | None:
    """Smallest mean difference a two-sided paired t-test on n units of this sd detects with `power`:
    the exact non-central t solution (scipy), not the normal approximation."""
    if n < 2 or not sd:
        return None
    crit = stats.t.ppf(1 - level / 2, n - 1)
    from scipy.optimize import brentq

    def power_at(d):
        nc = d * math.sqrt(n) / sd
        p = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
        return 1.0 if not math.isfinite(p) else p
    return float(brentq(lambda d: power_at(d) - power, 1e-9 * sd, 40 * sd))
