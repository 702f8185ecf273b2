"""Capability tasks through lm-evaluation-harness: the held-out tasks stage 0 builds, on real models."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_sets, run_script
from utils.data.corpus import read_corpus
from utils.data.tokenization import load_tokenizer
from utils.measure.capabilities import evaluate_capabilities
from utils.model.modeling import load_model
from utils.run.compute import CPU, Compute

TASKS = ["heldout_lastword", "heldout_cloze"]


@pytest.fixture(scope="module")
def pretrained_scores(tiny_run, tmp_path_factory):
    _, paths = tiny_run
    model = load_model(paths.shared / "models" / "pretrained").eval()
    tokenizer = load_tokenizer(paths.shared / "tokenizer")
    log = tmp_path_factory.mktemp("lm_eval") / "lm_eval.log"
    return model, tokenizer, evaluate_capabilities(model, tokenizer, TASKS, paths.shared / "tasks", 16, 128, 0, CPU,
                                                   log)


def test_lm_eval_messages_go_to_its_log_not_the_console(pretrained_scores, tiny_run, tmp_path, capfd):
    model, tokenizer, _ = pretrained_scores
    log = tmp_path / "lm_eval.log"
    evaluate_capabilities(model, tokenizer, ["heldout_cloze"], tiny_run[1].shared / "tasks", 16, 128, 5, CPU, log)
    err = capfd.readouterr().err
    assert "`pretrained` model kwarg is not of type `str`" in log.read_text()
    assert "model kwarg" not in err and "WARNING" not in err and "INFO" not in err, err[-2000:]


def test_lm_eval_runs_under_the_configured_autocast_without_a_kv_cache(pretrained_scores, tiny_run, tmp_path):
    """bf16-mixed (the CUDA default) autocasts the harness's forwards: the log-likelihoods move by bf16
    rounding, not more; no forward fills a KV cache (the tasks here never generate)."""
    model, tokenizer, fp32 = pretrained_scores
    seen = []
    hook = model.base_model.register_forward_hook(lambda m, args, out: seen.append(out.past_key_values))
    try:
        bf16 = evaluate_capabilities(model, tokenizer, ["heldout_lastword"], tiny_run[1].shared / "tasks", 16, 128, 0,
                                     Compute(torch.device("cpu"), "bf16-mixed"), tmp_path / "lm_eval.log")
    finally:
        hook.remove()
    assert seen and all(c is None for c in seen)
    assert model.config.use_cache                      # the model itself is left as it was
    ppl, ref = bf16["heldout_lastword"]["metrics"]["perplexity"], fp32["heldout_lastword"]["metrics"]["perplexity"]
    assert ppl != ref and ppl == pytest.approx(ref, rel=0.05)


def test_stage_0_builds_the_held_out_tasks_from_the_test_split(tiny_run):
    _, paths = tiny_run
    manifest = json.loads((paths.shared / "manifest.json").read_text())
    assert manifest["capability_tasks"]["tasks"] == TASKS
    test_docs = [" ".join(t.split()) for t in read_corpus(paths.shared / "corpus" / "test.jsonl")]
    rows = [json.loads(line) for line in (paths.shared / "tasks" / "heldout_cloze.jsonl").read_text().splitlines()]
    assert len(rows) == manifest["capability_tasks"]["examples"] >= 100
    for row in rows[:50]:
        answer = row["choices"][row["label"]]
        assert any(d.startswith(row["context"] + " " + answer) for d in test_docs)  # a held-out passage, its word
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4


def test_the_pretrained_tiny_model_beats_chance(pretrained_scores):
    _, _, scores = pretrained_scores
    cloze, lastword = scores["heldout_cloze"], scores["heldout_lastword"]
    assert cloze["metrics"]["acc"] - 2 * cloze["metrics"]["acc_stderr"] > 0.25     # four choices
    assert lastword["metrics"]["acc"] - 2 * lastword["metrics"]["acc_stderr"] > 0  # greedy: chance ~ 1/vocab
    assert len(cloze["correct"]) == cloze["n"] and sum(cloze["correct"]) / cloze["n"] == \
        pytest.approx(cloze["metrics"]["acc"])


def test_lm_eval_log_likelihoods_equal_our_forward_pass(tiny_run, pretrained_scores):
    """The harness's numbers for a few cloze examples, recomputed with one forward pass each."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from utils.measure.capabilities import write_task_configs
    _, paths = tiny_run
    model, tokenizer, _ = pretrained_scores
    configs = paths.work_dir / "task_configs"
    write_task_configs(paths.shared / "tasks", configs)
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu"),
                                  tasks=["heldout_cloze"], limit=5, log_samples=True,
                                  task_manager=TaskManager(include_path=str(configs)), verbosity="ERROR")
    samples = out["samples"]["heldout_cloze"]
    assert len(samples) == 5
    for sample in samples:
        assert [c for _, c in sample["arguments"]] == [" " + c for c in sample["doc"]["choices"]]
        for (context, choice), resp in zip(sample["arguments"], sample["resps"]):
            n_ctx = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            ids = torch.tensor(tokenizer(context + choice, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logp = F.log_softmax(model(input_ids=ids[None, :-1]).logits[0].double(), -1)
            ours = sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))
            assert resp[0][0] == pytest.approx(ours, abs=1e-4)


def test_the_offline_lm_eval_recipe_runs_the_held_out_tasks_with_no_hub(pretrained_scores, tiny_run, tmp_path):
    """docs/results.md's offline recipe: scripts/lm_eval_tasks.py, then the lm_eval command line, with the hub
    off and an empty cache; it scores what the pipeline's own lm-eval call scores."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT
    _, paths = tiny_run
    model, tokenizer, _ = pretrained_scores
    configs = tmp_path / "tasks"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_eval_tasks.py"), "--work-dir", str(paths.work_dir),
                        "--out", str(configs)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cli = subprocess.run([str(Path(sys.executable).parent / "lm_eval"), "--model", "hf", "--model_args",
                          f"pretrained={paths.shared / 'models' / 'pretrained'},dtype=float32",
                          "--include_path", str(configs), "--tasks", "heldout_cloze", "--batch_size", "8",
                          "--limit", "8", "--output_path", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert cli.returncode == 0, cli.stderr[-3000:]
    result = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["heldout_cloze"]
    ours = evaluate_capabilities(model, tokenizer, ["heldout_cloze"], paths.shared / "tasks", 8, 128, 8, CPU,
                                 tmp_path / "lm_eval.log")["heldout_cloze"]["metrics"]
    assert result["acc,none"] == pytest.approx(ours["acc"])
    empty = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_eval_tasks.py"), "--work-dir",
                            str(tmp_path / "none"), "--out", str(configs)], capture_output=True, text=True, timeout=120)
    assert empty.returncode == 1 and empty.stderr.startswith("error: no held-out task data")


@pytest.mark.slow
def test_offline_stage_0_names_a_task_dataset_missing_from_the_cache_before_training(tmp_path):
    """The jobs after stage 0 run offline (jobs/common.sh): a standard task whose dataset is not in the cache
    is one error line in stage 0, before pretraining, not a failure of stage 4 after all the training."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    work = tmp_path / "w"
    r = run_script("stage_0_setup", "--work-dir", str(work), *fast_sets(), "--set", "eval.tasks=heldout_cloze,piqa",
                   env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: [stage_0_setup] the lm-eval task datasets piqa are not all in the local "
                               "Hugging Face cache") and "eval.tasks" in lines[0]
    assert "pretraining" not in r.stdout and not (work / "shared" / "flags" / "stage_0_setup.done").exists()
