"""results.md's bridge to the published numbers: the paper's HotFlip protocol beside the matched-loss verdict."""
import json

from test_aggregate import _work
from utils.results import paper_protocol
from utils.results.aggregate import run_aggregate
from utils.results.formatting import fmt

TINY_HOTFLIP = {"hotflip_max_flips": 5, "text_len": 64, "hotflip_top_k": 64, "hotflip_beam": 2, "hotflip_texts": 10}


def test_results_lead_with_the_verdict_then_every_arm_under_the_papers_protocol_saying_where_it_departs(tmp_path):
    work = _work(tmp_path)
    for f in work.glob("seed_*/results/hotflip.json"):
        f.write_text(json.dumps({**json.loads(f.read_text()), "config": TINY_HOTFLIP}))
    run_aggregate(work, None, False, "tiny")
    final = json.loads((work / "final" / "final_results.json").read_text())
    md = (work / "final" / "results.md").read_text()
    head = "## The paper's protocol (HotFlip success, the bridge to the published numbers)"
    assert md.index("## Matched-control verdict") < md.index(head) < md.index("## Worst case per text")
    section = md[md.index(head):].split("\n## ")[0]
    assert "departs from it: 10 texts per seed (the paper: 200); at most 5 flips (the paper: 10); model tiny" in section
    assert "the first 64 tokens of a held-out test document" in section and "top 64" in section
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| Model")]
    assert [r.split(" | ")[0] for r in rows[:2]] == ["| Pretrained", "| Baseline (recovered)"] and len(rows) == 4
    acr = final["across_seeds"]
    for row in rows:
        name, clean, nats, success, published, verdict = [c.strip() for c in row.strip("|").split("|")]
        arm = next(a for a in ("pretrained", "monotonic_init", "baseline", "monotonic")
                   if name == paper_protocol.ARM_NAMES[a])
        assert (clean, nats, published) == ("2.500", "0.375", "-")      # 15% of a clean NLL of 2.5: not comparable
        assert success == fmt(acr["arms"][arm]["hotflip_success_rate"], 100, 1, True)
        residuals = acr["frontier"]["hotflip_success"]["residuals"]
        assert (verdict != "-") == (arm in residuals or arm in acr["frontier"]["hotflip_success"]["unconstrained_arms"])


def test_the_published_figures_stand_beside_a_run_of_the_papers_setting_only():
    """Pythia-1.4B, mlp_both, 200 texts of at most 10 flips at 15%: the published success beside each arm."""
    examples = [{"doc": d, "clean_nll": 2.0 + (d % 2), "success": d < 100} for d in range(200)]
    hot = {"success_threshold": 0.15, "config": {**TINY_HOTFLIP, "hotflip_max_flips": 10, "text_len": 256},
           "models": {a: {"examples": examples} for a in ("pretrained", "baseline", "monotonic")}}
    final = {"preset": "pythia-1.4b", "provenance": {"model": {"hub_id": "EleutherAI/pythia-1.4b"}},
             "per_seed": {"1": {"certificates": {"monotonic": {"scope": "mlp_both"}}}},
             "across_seeds": {"arms": {a: {"hotflip_success_rate": {"mean": 0.5, "ci95": [0.4, 0.6]}}
                                       for a in ("pretrained", "baseline", "monotonic")}}}
    final["paper_protocol"] = paper_protocol.summary({1: {"hotflip.json": hot}}, final)
    assert final["paper_protocol"]["comparable"] and final["paper_protocol"]["arms"]["baseline"]["clean_nll"] == 2.5
    rows = {r.split("|")[1].strip(): r.split("|")[5].strip() for r in paper_protocol.table(final) if r.startswith("| ")}
    assert rows["Baseline (recovered)"] == "69.0%" and rows["Monotone (recovered)"] == "43.5 / 39.0 / 45.0%"
    assert rows["Pretrained"] == "-" and "This run is that setting." in "\n".join(paper_protocol.table(final))
    final["per_seed"]["1"]["certificates"]["monotonic"]["scope"] = "mlp_in"        # another scope: not comparable
    final["paper_protocol"] = paper_protocol.summary({1: {"hotflip.json": hot}}, final)
    assert final["paper_protocol"]["departures"] == ["scope mlp_in (the paper: mlp_both)"]
