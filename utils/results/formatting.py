"""How stage 7's reports name arms and searches, order arms and write a statistic with its interval."""
from __future__ import annotations


def tokens_short(n: int) -> str:
    """65000 -> '65k', 28750000 -> '28.8M', 1840000000 -> '1.84B'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


class _Names(dict):
    def __missing__(self, arm: str) -> str:      # stage 0's controls: control_<tokens or revision>; stage 3's ladder
        if arm.startswith("ladder_"):
            return f"Ladder {tokens_short(int(arm.removeprefix('ladder_')))}"
        return f"Control {arm.removeprefix('control_')}"


ARM_NAMES = _Names({"pretrained": "Pretrained", "monotonic_init": "Monotone (init)", "baseline": "Baseline (recovered)",
                    "monotonic": "Monotone (recovered)", "unconstrained_from_init": "Unconstrained from init"})
ORDER = ("pretrained", "monotonic_init", "baseline", "monotonic", "unconstrained_from_init")


def _control_key(arm: str):
    tail = arm.removeprefix("control_").removeprefix("step")
    return (0, int(tail), "") if tail.isdigit() else (1, 0, tail)


def arms_present(final: dict) -> list[str]:
    """The arms in report order: pretrained, the controls (by tokens or step), the trained arms, the ladder."""
    present = final["across_seeds"]["arms"]
    controls = sorted((a for a in present if a.startswith("control_")), key=_control_key)
    ladder = sorted((a for a in present if a.startswith("ladder_")), key=lambda a: int(a.removeprefix("ladder_")))
    return [a for a in ORDER[:1] if a in present] + controls + [a for a in ORDER[1:] if a in present] + ladder


def fmt(stat: dict, scale: float = 1.0, digits: int = 2, pct: bool = False) -> str:
    if not stat or stat.get("mean") is None:
        return "n/a"
    unit = "%" if pct else ""
    text = f"{stat['mean'] * scale:.{digits}f}{unit}"
    if stat.get("ci95"):
        lo, hi = stat["ci95"]
        text += f" [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"
    return text


ATTACK_NAMES = {"hotflip": "HotFlip", "gcg": "GCG", "gcg_surrogate": "GCG (surrogate)", "random_search": "Random search",
                "uat": "UAT", "worst": "Worst case"}
