"""The bridge to the published numbers: the paper's HotFlip protocol, reproduced beside the matched-loss verdict.

Cooper et al. report HotFlip success on Pythia-1.4B (scope mlp_both): 200 documents, 10 flips, success = a
relative increase of mean token NLL above 15%; the baseline 69.0%, the monotone model 43.5 / 39.0 / 45.0% over
three seeds (docs/METHOD.md). Stage 6's HotFlip is that attack under those sizes in the pythia presets; where the
paper's protocol is not known (text length, whether flipped tokens are scored, the search's width) the choices
made here are stated with the table. A relative threshold favours the model of higher clean loss (15% of a
larger NLL is more nats), so this table is the bridge to the paper, not the claim: the claim is damage at
matched clean loss (the verdict above it in results.md).
"""
from __future__ import annotations

import numpy as np

from utils.results.formatting import ARM_NAMES, arms_present, fmt
from utils.results.summary import short_verdict

PAPER = {"texts": 200, "max_flips": 10, "threshold": 0.15, "model": "Pythia-1.4B", "scope": "mlp_both",
         "published": {"baseline": "69.0%", "monotonic": "43.5 / 39.0 / 45.0%"}}
PYTHIA_1_4B = "EleutherAI/pythia-1.4b"


def summary(raw: dict, final: dict) -> dict | None:
    """What this run's HotFlip was against the paper's, and each arm's clean NLL on the attacked texts (what 15%
    of it is in nats); None without HotFlip records."""
    runs = [r["hotflip.json"] for r in raw.values() if "hotflip.json" in r]
    if not runs:
        return None
    config = runs[0].get("config", {})
    texts = sorted({len(next(iter(h["models"].values()))["examples"]) for h in runs})
    run = {"texts_per_seed": texts, "max_flips": config.get("hotflip_max_flips"), "text_len": config.get("text_len"),
           "threshold": runs[0]["success_threshold"], "top_k": config.get("hotflip_top_k"),
           "beam": config.get("hotflip_beam")}
    departures = [f"{', '.join(map(str, texts))} texts per seed (the paper: 200)"] if texts != [PAPER["texts"]] else []
    if run["max_flips"] != PAPER["max_flips"]:
        departures.append(f"at most {run['max_flips']} flips (the paper: 10)")
    if run["threshold"] != PAPER["threshold"]:
        departures.append(f"a {100 * run['threshold']:g}% threshold (the paper: 15%)")
    scopes = {c["scope"] for s in final["per_seed"].values() for c in s.get("certificates", {}).values()}
    model = final.get("provenance", {}).get("model", {}).get("hub_id") or \
        (PYTHIA_1_4B if final["preset"] == "pythia-1.4b" else final["preset"])
    if model != PYTHIA_1_4B:
        departures.append(f"model {model} (the paper: Pythia-1.4B)")
    if scopes and scopes != {PAPER["scope"]}:
        departures.append(f"scope {', '.join(sorted(scopes))} (the paper: mlp_both)")
    arms = {}
    for arm in {a for h in runs for a in h["models"]}:
        per_seed = [np.mean([e["clean_nll"] for e in h["models"][arm]["examples"]]) for h in runs if arm in h["models"]]
        clean = float(np.mean(per_seed))
        arms[arm] = {"clean_nll": clean, "threshold_nats": run["threshold"] * clean}
    return {"paper": PAPER, "run": run, "departures": departures, "comparable": not departures, "arms": arms}


def table(final: dict) -> list[str]:
    """results.md's section: every arm under the paper's protocol, the pretrained model and the baseline first,
    beside the published figures (where this run is the paper's setting) and the matched-loss verdict."""
    p = final.get("paper_protocol")
    if not p:
        return []
    run, acr = p["run"], final["across_seeds"]
    fr = acr.get("frontier", {}).get("hotflip_success", {})
    free = set(fr.get("unconstrained_arms", []))
    lines = ["## The paper's protocol (HotFlip success, the bridge to the published numbers)", "",
             f"The paper's HotFlip: {PAPER['texts']} documents, {PAPER['max_flips']} flips, success = relative increase "
             f"of mean token NLL above {100 * PAPER['threshold']:g}%; {PAPER['model']}, scope {PAPER['scope']}: "
             f"baseline {PAPER['published']['baseline']}, monotone {PAPER['published']['monotonic']} (three seeds). "
             + ("This run is that setting." if p["comparable"] else
                "This run departs from it: " + "; ".join(p["departures"]) + ", so the published column stays empty."),
             "",
             "Where the paper's protocol is not known, the choices made here: each text is the first "
             f"{run['text_len']} tokens of a held-out test document (the seed's draw; the paper does not state a "
             "length); flipped tokens are never scored (scoring them counts the attacker's own tokens as damage); "
             f"each flip is chosen from the top {run['top_k']} (position, token) candidates by the first-order score "
             f"with a beam of {run['beam']} and re-checked by a forward pass (the paper does not state its width). "
             f"A relative threshold asks more nats of a model of higher clean loss (the column '{100 * run['threshold']:g}%'), "
             "so the claim is the matched-loss verdict, not this table.", "",
             f"| Model | Clean NLL | {100 * run['threshold']:g}% of it (nats) | Success [95% CI] | Published | "
             "Matched-loss verdict (HotFlip success) |", "|---|---|---|---|---|---|"]
    order = [a for a in ("pretrained", "baseline") if a in p["arms"]]
    order += [a for a in arms_present(final) if a in p["arms"] and a not in order]
    for arm in order:
        a = p["arms"][arm]
        published = PAPER["published"].get(arm, "-") if p["comparable"] else "-"
        verdict = short_verdict(fr["residuals"][arm]) if arm in fr.get("residuals", {}) else \
            "control (in the frontier)" if arm in free else "-"
        lines.append(f"| {ARM_NAMES[arm]} | {a['clean_nll']:.3f} | {a['threshold_nats']:.3f} | "
                     f"{fmt(acr['arms'][arm].get('hotflip_success_rate'), 100, 1, True)} | {published} | {verdict} |")
    return lines
