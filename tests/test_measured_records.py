"""Stages 4-6 end to end on the tiny run, and recomputation of what they stored: every record a
fresh forward pass reproduces from what the result file names (model, token file, ids)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import fast_sets, run_script
from test_attacks import _plain_target_nll
from utils.attacks import uat
from utils.attacks.core import target_mask
from utils.data.corpus import read_corpus
from utils.data.tokenization import TokenFile, encoded_utf8_bytes, load_tokenizer
from utils.model.modeling import load_model

# How closely a fresh fp32 forward (one unpadded sequence, on the CPU) must reproduce a record, by the
# precision the record states. fp32: batching, padding and summation order alone (~1e-6). bf16-mixed, what
# CUDA resolves to: autocast rounds every matmul's inputs to 8 significand bits, and the tiny run's mean NLLs
# moved 2e-4 to 1.5e-3 nats (perplexity ~0.1%); 1e-2 leaves margin while a wrong target, position or
# window (>= 0.1 nats on these texts) still fails.
TOLERANCE = {"fp32": 1e-4, "bf16-mixed": 1e-2}


def tol(result: dict) -> float:
    return TOLERANCE[result["compute"]["precision"]]


SMALL_ATTACKS = ["attack.uat_opt_texts=6", "attack.uat_eval_texts=8", "attack.uat_restarts=1",
                 "attack.uat_max_sweeps=2", "attack.hotflip_texts=10", "attack.hotflip_max_flips=3",
                 "attack.gcg_texts=4", "attack.gcg_steps=6", "attack.gcg_search_width=16", "attack.pgd_texts=2",
                 "attack.pgd_steps=3"]


@pytest.fixture(scope="module")
def measured(tiny_run, tmp_path_factory):
    """Stages 1, 4, 5, 6 on the tiny run (arms: pretrained, monotonic_init)."""
    _, paths = tiny_run
    work = tmp_path_factory.mktemp("measure") / "w"
    shutil.copytree(paths.shared, work / "shared")
    sets = fast_sets() + [a for kv in SMALL_ATTACKS for a in ("--set", kv)]
    for stage in ("stage_1_apply_monotonicity", "stage_4_evaluate", "stage_5_uat_attacks", "stage_6_hotflip_attacks"):
        r = run_script(stage, "--work-dir", str(work), *sets)
        assert r.returncode == 0, r.stderr
    results = work / "seed_42" / "results"
    return work, {name: json.loads((results / f"{name}.json").read_text())
                  for name in ("evaluation", "uat", "hotflip", "gcg", "gcg_surrogate", "random_search", "worst_case", "pgd")}


@pytest.mark.slow
def test_evaluation_is_recomputable_from_what_it_names(measured):
    work, res = measured
    ev = res["evaluation"]
    c = ev["convention"]
    tokens = np.load(work / ev["token_file"], mmap_mode="r")       # recorded relative to the work dir
    offsets = np.load(work / ev["offsets_file"], mmap_mode="r")
    assert ev["split"] == "test" and set(ev["models"]) == {"pretrained", "control_40000", "monotonic_init"}
    for arm, m in ev["models"].items():
        model = load_model(work / m["path"]).eval()
        per = m["per_document"]
        assert math.exp(sum(per["nll"]) / sum(per["tokens"])) == pytest.approx(m["perplexity"], rel=1e-9)
        assert sum(per["tokens"]) == m["tokens"] == int(offsets[-1]) - ev["documents"]
        for i in (0, 3):       # independent recomputation, one window at a time, no padding
            doc = np.asarray(tokens[offsets[i]:offsets[i + 1] - 1], dtype=np.int64)
            seq = torch.tensor([c["eos_id"], *doc.tolist()])
            # The stated windows: target chunks ending at max_len, then every stride tokens; each
            # window reads the max_len tokens before its last target.
            total, scored_to, end = 0.0, 1, min(len(seq), c["max_len"] + 1)
            while end > scored_to:
                begin = max(0, end - 1 - c["max_len"])
                with torch.no_grad():
                    logp = F.log_softmax(model(input_ids=seq[None, begin:end - 1]).logits[0].double(), -1)
                for t in range(scored_to, end):
                    total -= logp[t - begin - 1, seq[t]].item()
                scored_to, end = end, min(len(seq), end + c["stride"])
            assert per["tokens"][i] == len(doc)
            assert total == pytest.approx(per["nll"][i], rel=tol(ev))
    assert ev["models"]["monotonic_init"]["label"] == "monotone"
    # Capabilities: lm-eval's held-out tasks on every arm, with per-example correctness.
    caps = json.loads((work / "seed_42" / "results" / "capabilities.json").read_text())
    assert caps["harness"].startswith("lm-evaluation-harness 0.4") and set(caps["models"]) == set(ev["models"])
    for m in caps["models"].values():
        for task in ("heldout_lastword", "heldout_cloze"):
            r = m["tasks"][task]
            assert r["n"] == 40 == len(r["correct"]) and sum(r["correct"]) / 40 == pytest.approx(r["metrics"]["acc"])
    # Bits per byte divide by the bytes the tokenizer encoded (after its NFC normaliser).
    tokenizer = load_tokenizer(work / "shared" / "tokenizer")
    assert ev["utf8_bytes"] == sum(encoded_utf8_bytes(tokenizer, t) for t in read_corpus(work / ev["corpus_file"]))
    assert "NFC" in ev["convention"]["utf8_bytes"]
    for m in ev["models"].values():
        assert m["bits_per_byte"] == pytest.approx(m["nll_sum"] / math.log(2) / ev["utf8_bytes"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["hotflip", "gcg", "gcg_surrogate", "random_search"])
def test_text_attack_records_are_recomputable_and_beat_random_flips(measured, attack):
    work, res = measured
    hf = res[attack]
    assert len(hf["models"]["pretrained"]["examples"]) == (10 if attack == "hotflip" else 4)
    for arm, m in hf["models"].items():
        model = load_model(work / m["path"]).eval()
        for rec in m["examples"]:
            orig, adv = torch.tensor(rec["original_ids"]), torch.tensor(rec["adversarial_ids"])
            assert (orig != adv).nonzero().squeeze(1).tolist() == rec["modified_positions"]
            targets = target_mask(len(orig), rec["modified_positions"])
            assert rec["attacked_nll"] == pytest.approx(_plain_target_nll(model, adv, targets), abs=tol(hf))
            assert rec["clean_nll"] == pytest.approx(_plain_target_nll(model, orig, targets), abs=tol(hf))
            assert rec["success"] == (rec["rel_delta_nll"] > hf["success_threshold"])
            assert 0 < len(rec["modified_positions"]) <= 3 and 0 not in rec["modified_positions"]
            assert rec["cost"]["forward_passes"] > 2
            assert (rec["cost"]["gradient_passes"] == 0) == (attack == "random_search")
            # the convergence trace: forward passes rising, best objective never falling, ending at the record
            spent, best = zip(*rec["trace"])
            assert list(spent) == sorted(spent) and list(best) == sorted(best) and spent[-1] < rec["cost"]["forward_passes"]
            assert best[-1] == pytest.approx(rec["abs_delta_nll"], abs=1e-4)
        s, ctl = m["summary"], m["random_control"]
        assert s["cost"]["forward_passes"] == sum(r["cost"]["forward_passes"] for r in m["examples"])
        assert s["mean_abs_delta_nll"] > ctl["mean_abs_delta_nll"], arm
        assert hf["transfer"][arm][arm]["mean_abs_delta_nll"] == pytest.approx(s["mean_abs_delta_nll"], abs=1e-4)
    assert set(hf["transfer"]) == set(hf["models"]) and "search" in hf["composition"]


@pytest.mark.slow
def test_uat_records_are_recomputable_on_disjoint_texts(measured):
    work, res = measured
    u = res["uat"]
    assert not set(u["opt_docs"]) & set(u["eval_docs"])
    tf = TokenFile(work / "shared" / "tokens", "test")
    for arm, m in u["models"].items():
        model = load_model(work / m["path"]).eval()
        trig = torch.tensor(m["trigger_ids"])
        for ex in m["examples"][:4]:
            text = torch.tensor(ex["text_ids"])
            assert text[1:].tolist() == tf.document(ex["doc"])[:len(text) - 1].tolist()
            ids, targets = uat.triggered(trig, text)
            assert ex["triggered_nll"] == pytest.approx(_plain_target_nll(model, ids, targets), abs=tol(u))
            assert ex["clean_nll"] == pytest.approx(_plain_target_nll(model, text, target_mask(len(text))), abs=tol(u))
        mean = sum(e["triggered_nll"] for e in m["examples"]) / len(m["examples"])
        assert mean == pytest.approx(m["eval"]["triggered_nll"], abs=1e-6)
        # every restart kept: the best on the optimisation texts is the reported trigger, each restart's
        # held-out damage recomputes, and its trace ends at its optimisation-set damage
        best = max(m["restarts"], key=lambda r: r["opt_loss"])
        assert best["trigger_ids"] == m["trigger_ids"] and best["restart"] == m["restart"]
        assert best["eval"]["triggered_nll"] == pytest.approx(m["eval"]["triggered_nll"], abs=1e-9)
        for r in m["restarts"]:
            assert r["trace"][-1][1] == pytest.approx(r["opt_loss"] - m["opt_clean_loss"], abs=1e-9)
            ids, targets = uat.triggered(torch.tensor(r["trigger_ids"]), torch.tensor(m["examples"][0]["text_ids"]))
            assert r["eval"]["triggered_nll_per_text"][0] == pytest.approx(_plain_target_nll(model, ids, targets),
                                                                           abs=tol(u))
        assert u["transfer"][arm][arm] == m["eval"]
        assert m["search_cost"]["forward_passes"] > 0 and m["search_cost"]["gradient_passes"] > 0


@pytest.mark.slow
def test_worst_case_pgd_and_masking_records_recompute(measured):
    """worst_case.json takes per text the record of largest damage among its searches; PGD's records
    recompute from the saved perturbations, inside their balls; the flat-region fractions count by hand."""
    from safetensors.torch import load_file
    from utils.model.portable.modeling_monotone import GELU_ARGMIN
    work, res = measured
    worst, p = res["worst_case"], res["pgd"]
    assert worst["attacks"] == ["hotflip", "gcg", "gcg_surrogate", "random_search"]
    assert worst["searches"] == ["hotflip", "gcg", "random_search"]       # the same three for every arm
    for arm, m in worst["models"].items():
        by = {n: {r["doc"]: r for r in res[n]["models"][arm]["examples"]} for n in worst["searches"]}
        assert [r["doc"] for r in m["examples"]] == sorted(by["gcg"])        # the texts every search attacked
        for r in m["examples"]:
            top = max(by, key=lambda n: by[n][r["doc"]]["abs_delta_nll"])
            assert r["abs_delta_nll"] == by[top][r["doc"]]["abs_delta_nll"] == max(
                by[n][r["doc"]]["abs_delta_nll"] for n in by)
            assert r["adversarial_ids"] == by[r["attack"]][r["doc"]]["adversarial_ids"]
        model = load_model(work / m["path"]).eval()
        acts, seen = [mod for name, mod in model.named_modules() if name.endswith("mlp.act")], []
        hooks = [a.register_forward_pre_hook(lambda _m, i: seen.append(i[0])) for a in acts]
        with torch.no_grad():
            for r in m["examples"]:
                model(input_ids=torch.tensor(r["original_ids"])[None])
        for h in hooks:
            h.remove()
        layer0 = torch.cat([x.flatten() for x in seen[::len(acts)]])
        flat = m["flat_region"]["clean"]
        assert flat["fraction_below_clamp"][0] == pytest.approx(int((layer0 < GELU_ARGMIN).sum()) / layer0.numel(), abs=1e-12)
        assert flat["flat_region"] == (arm == "monotonic_init")
    for arm, m in p["models"].items():
        model = load_model(work / m["path"]).eval()
        deltas = load_file(str(work / m["deltas_file"]))
        E = model.get_input_embeddings()
        assert 0 < m["nearest_swap_distance"] < 2 * m["mean_embedding_norm"]    # radii in swaps: r x unit / swap
        assert m["radius_in_swaps"] == {f"{r:g}": pytest.approx(r * m["mean_embedding_norm"] / m["nearest_swap_distance"])
                                        for r in p["radii"]}
        for r in m["examples"]:
            delta, ids = deltas[f"{r['doc']}@{r['radius']:g}"], torch.tensor(r["ids"])
            assert delta[0].abs().max() == 0 and delta.norm(dim=-1).max() <= r["epsilon"] * (1 + 1e-5)
            with torch.no_grad():
                logp = F.log_softmax(model(inputs_embeds=(E(ids) + delta)[None]).logits[0].double(), -1)
            attacked = -logp[torch.arange(len(ids) - 1), ids[1:]].mean().item()
            assert attacked == pytest.approx(r["attacked_nll"], abs=tol(p))
            assert r["clean_nll"] == pytest.approx(_plain_target_nll(model, ids, target_mask(len(ids))), abs=tol(p))
            assert r["abs_delta_nll"] > 0
        rows = m["by_radius"]
        assert rows["0.05"]["mean_abs_delta_nll"] < rows["0.2"]["mean_abs_delta_nll"]      # a larger ball does more


@pytest.mark.slow
def test_records_of_either_precision_agree_with_the_other(measured, tmp_path):
    """Stages 4 and 6 rerun in the other precision (bf16-mixed where the fixture ran in fp32, as on a CPU;
    fp32 where it ran in bf16-mixed, as on a GPU) state it, agree on perplexity within 2%, and their HotFlip
    records recompute by fresh fp32 forwards at that precision's tolerance."""
    work, first = measured
    other = {"fp32": "bf16-mixed", "bf16-mixed": "fp32"}[first["evaluation"]["compute"]["precision"]]
    copy = tmp_path / "w"
    shutil.copytree(work, copy)
    sets = fast_sets() + [a for kv in SMALL_ATTACKS for a in ("--set", kv)] + ["--set", f"precision={other}",
                                                                              "--set", "attack.hotflip_texts=4",
                                                                              "--set", "attack.text_attacks=hotflip",
                                                                              "--set", "eval.tasks="]
    for stage in ("stage_4_evaluate", "stage_6_hotflip_attacks"):
        r = run_script(stage, "--work-dir", str(copy), *sets)
        assert r.returncode == 0 and "already done" not in r.stdout, r.stderr   # precision is in the fingerprint
    results = copy / "seed_42" / "results"
    ev, hf = (json.loads((results / f"{n}.json").read_text()) for n in ("evaluation", "hotflip"))
    assert ev["compute"]["precision"] == hf["compute"]["precision"] == other
    for arm, m in ev["models"].items():
        assert m["perplexity"] == pytest.approx(first["evaluation"]["models"][arm]["perplexity"], rel=0.02)
    for arm, m in hf["models"].items():
        model = load_model(copy / m["path"]).eval()
        for rec in m["examples"]:
            orig, adv = torch.tensor(rec["original_ids"]), torch.tensor(rec["adversarial_ids"])
            targets = target_mask(len(orig), rec["modified_positions"])
            assert rec["attacked_nll"] == pytest.approx(_plain_target_nll(model, adv, targets), abs=tol(hf))
            assert rec["clean_nll"] == pytest.approx(_plain_target_nll(model, orig, targets), abs=tol(hf))


@pytest.mark.slow
def test_the_time_limits_count_at_least_the_work_the_attacks_did(measured):
    """utils/run/time_limits.py bounds stages 5 and 6 from the config alone: every token the searches and
    the transfer runs really ran (their recorded cost) is within the bound, by kind of pass."""
    from pathlib import Path

    from conftest import tiny_config
    from utils.run.time_limits import attack_forward_equivalents
    _, res = measured
    cfg = tiny_config(Path("unused"), [tuple(kv.split("=", 1)) for kv in SMALL_ATTACKS])
    arms = len(res["uat"]["models"])
    (uat_fwd, uat_grad), (text_fwd, text_grad) = attack_forward_equivalents(cfg, arms)
    uat = res["uat"]["models"].values()
    assert sum(m["search_cost"]["forward_tokens"] + m["transfer_cost"]["forward_tokens"] for m in uat) <= uat_fwd
    assert sum(m["search_cost"]["gradient_tokens"] for m in uat) <= uat_grad
    text = [res[a]["models"][arm]["summary"]["cost"] for a in ("hotflip", "gcg", "gcg_surrogate", "random_search")
            for arm in res[a]["models"]]
    text += [r["cost"] for m in res["pgd"]["models"].values() for r in m["examples"]]
    text += [r["gradient_fidelity"]["cost"] for m in res["random_search"]["models"].values() for r in m["examples"]]
    assert sum(c["forward_tokens"] for c in text) <= text_fwd and sum(c["gradient_tokens"] for c in text) <= text_grad
