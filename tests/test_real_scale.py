"""The path a cluster user takes, on stand-ins built here (tests/standins.py):
a pythia preset through all eight stages on a Pythia-format model directory and
Pile-layout files, stage 0 from an offline Hugging Face cache and on a machine
without a GPU, hub failures as one line, and outputs the user's group can read.
"""
import json
import os
import shutil
import stat
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir

from conftest import ROOT, run_script
from standins import hf_cache, pile_layout, pythia_format_dir
from utils.attacks.core import forbidden_tokens
from utils.data.hub import file_sha256
from utils.data.tokenization import TokenFile, load_tokenizer

PRESET = "pythia-410m"
# Only sizes and budgets shrink: the preset's eval windows (2048 / 1024), attack text length (256),
# batch sizes, recipe (accumulation 4, gradient checkpointing, lr, warmup) and data layout stay.
SHRINK = {"data.seq_len": "128", "recovery_baseline.max_tokens": "16384", "recovery_monotone.max_tokens": "16384",
          "monotone.cert_trials": "8", "attack.uat_opt_texts": "4", "attack.uat_eval_texts": "6",
          "attack.uat_trigger_len": "3", "attack.uat_restarts": "1", "attack.uat_max_sweeps": "1",
          "attack.uat_top_k": "8", "attack.hotflip_texts": "4", "attack.hotflip_max_flips": "3",
          "attack.hotflip_top_k": "8",
          "attack.gcg_texts": "3", "attack.gcg_steps": "3", "attack.gcg_search_width": "8", "attack.gcg_top_k": "8",
          "attack.pgd_texts": "1", "attack.pgd_steps": "2",
          "attack.uat_screen_texts": "2", "attack.uat_screen_keep": "3",
          # lm-eval's standard tasks need the hub; the held-out tasks are built from the stand-in test split.
          "eval.tasks": "heldout_lastword,heldout_cloze", "eval.task_limit": "20",
          # the recipe search's sweep shrinks with the budget; the stand-in has no released checkpoints
          "recovery_baseline.sweep_tokens": "4096", "recovery_monotone.sweep_tokens": "4096", "controls.revisions": "",
          # one rung of the ladder (one optimizer step), no extension: its cost stays bounded
          "controls.ladder": "0.25", "controls.ladder_extensions": "0"}


def _sets(pairs: dict) -> list[str]:
    return [a for k, v in pairs.items() for a in ("--set", f"{k}={v}")]


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("standins")
    return {"pile": pile_layout(root / "pile"), "model": pythia_format_dir(root / "pythia")}


def _local(standins) -> dict:
    files = standins["pile"]
    return {"model.source": "local", "model.path": str(standins["model"]), "device": "cpu",
            "data.source": "jsonl.zst", **{f"data.{s}_file": str(p) for s, p in files.items()}}


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MONO__"))}
    return {**env, "OMP_NUM_THREADS": "2", **extra}


def _error_line(r: subprocess.CompletedProcess) -> str:
    """The one line a failing stage must print: `error: ...`, and no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# -- the whole pipeline at a pythia preset ------------------------------------------

@pytest.mark.slow
def test_pythia_preset_runs_all_eight_stages_on_a_local_pythia_format_model(standins, tmp_path):
    work = tmp_path / "work"
    old_mask = os.umask(0o022)
    try:
        r = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--local", "--preset", PRESET, "--work-dir", str(work),
                            *_sets({**_local(standins), **SHRINK})],
                           capture_output=True, text=True, env=_env(), timeout=1500)
    finally:
        os.umask(old_mask)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    shared, seed = work / "shared", work / "seed_42"
    flags = sorted(p.name for p in [*shared.glob("flags/*.done"), *seed.glob("flags/*.done")])
    assert len(flags) == 7 and (work / "final" / "final_results.json").exists()

    # Stage 0: the local directory, its hashes, Pile-layout data, one pass for the largest budget.
    m = json.loads((shared / "manifest.json").read_text())
    model_dir = standins["model"]
    assert m["model"]["source"] == "local" and m["model"]["path"] == str(model_dir)
    assert m["model"]["files"]["model.safetensors"] == file_sha256(model_dir / "model.safetensors")
    train_tokens = m["corpus"]["train"]["tokens"]
    assert 16384 <= train_tokens < 16384 + 4000          # stopped at the budget: whole documents
    assert m["training_data"]["runs"]["recovery_monotone"]["epochs"] <= 1
    tok = load_tokenizer(shared / "tokenizer")
    assert tok.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|padding|>"]

    # Stages 1-3: the fp16 release became fp32 master weights; the constrained copy moved and stayed monotone.
    cert = json.loads((seed / "results" / "monotonicity_certificate.json").read_text())
    assert cert["monotone"] and cert["min_weight"] > 0
    report = json.loads((seed / "results" / "training_monotonic.json").read_text())
    h = report["history"]
    assert h["precision"] == "fp32" and h["epochs"] <= 1 and h["training_tokens"] == train_tokens
    assert report["movement"]["fraction_V_changed"] > 0.99 and report["certificate"]["monotone"]
    # Portable: the saved monotone model carries the custom code other Hugging Face tools need.
    for arm in ("monotonic_init", "monotonic", "monotonic_best"):
        config = json.loads((seed / "models" / arm / "config.json").read_text())
        assert "auto_map" in config and (seed / "models" / arm / "modeling_monotone.py").exists()

    # Stages 4-6: every arm measured at the preset's shapes; no attack proposes a special token
    # (<|endoftext|>, <|padding|>) or one of the padded embedding rows.
    ev = json.loads((seed / "results" / "evaluation.json").read_text())
    arms = {"pretrained", "monotonic_init", "baseline", "monotonic", "unconstrained_from_init", "ladder_4096"}
    assert set(ev["models"]) == arms
    assert ev["convention"]["max_len"] == 2048 and ev["compute"]["precision"] == "fp32"
    rows = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert rows > len(tok)
    forbidden = forbidden_tokens(tok, rows)
    assert forbidden[[0, 1]].all() and forbidden[len(tok):].all() and not forbidden[2:len(tok)].any()
    hf = json.loads((seed / "results" / "hotflip.json").read_text())
    uat = json.loads((seed / "results" / "uat.json").read_text())
    assert hf["config"]["text_len"] == 256
    for arm in ev["models"]:
        for rec in hf["models"][arm]["examples"]:
            new = [rec["adversarial_ids"][p] for p in rec["modified_positions"]]
            assert not forbidden[new].any(), (arm, new)
        assert not forbidden[uat["models"][arm]["trigger_ids"]].any(), arm

    # The local run left a log per stage and reports itself like a SLURM run; training wrote its
    # history as it went.
    status = subprocess.run(["bash", str(ROOT / "run_all.sh"), "--status", "--work-dir", str(work)],
                            capture_output=True, text=True, timeout=60)
    states = [l.split()[-1] for l in status.stdout.splitlines() if l.split()[:1] == ["local"] and "stage_" in l
              and "recorded in" not in l]
    assert status.returncode == 0 and states == ["done"] * 8, status.stdout
    assert len(list((work / "local" / "logs").glob("*.log"))) == 8
    live = [json.loads(l) for l in (seed / "results" / "training_monotonic.history.jsonl").read_text().splitlines()]
    assert live == h["steps"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(str(seed / "results" / "tensorboard" / "monotonic")).Reload()
    assert [e.value for e in board.Scalars("monotonic/val_loss")] == \
        pytest.approx([r["val_loss"] for r in h["steps"] if r.get("val_loss") is not None])

    # Stage 7 read every arm; the report exists.
    final = json.loads((work / "final" / "final_results.json").read_text())
    md = (work / "final" / "results.md").read_text()
    assert f"Preset `{PRESET}`. Model: local {model_dir}." in md and "jsonl.zst" in md   # what was measured
    assert final["per_seed"]["42"]["training"]["monotonic"]["train_curve"]
    # A hub-layout source is checked for held-out text repeating training text, and not changed (report).
    overlap = json.loads((work / "shared" / "manifest.json").read_text())["heldout_overlap"]
    assert set(overlap) == {"val", "test"} and all(o["removed"] == 0 for o in overlap.values())
    assert "Held-out near-duplicates of training text" in md and "What recovery changed" in md
    # Capabilities: lm-eval's held-out tasks on every arm, in the report.
    caps = json.loads((seed / "results" / "capabilities.json").read_text())
    assert set(caps["models"]) == arms
    assert all(m["tasks"]["heldout_cloze"]["n"] == 20 for m in caps["models"].values())
    assert "## Capabilities (zero-shot accuracy, lm-evaluation-harness 0.4.13" in md
    assert set(final["across_seeds"]["capabilities"]) == {"heldout_lastword", "heldout_cloze"}

    # Shareable outputs: under umask 022 everything but checkpoints is 0644 / 0755.
    private = []
    for p in work.rglob("*"):
        if "checkpoints" in p.relative_to(work).parts or p.is_symlink():
            continue
        want = 0o755 if p.is_dir() else 0o644
        if stat.S_IMODE(p.stat().st_mode) != want:
            private.append(f"{oct(stat.S_IMODE(p.stat().st_mode))} {p.relative_to(work)}")
    assert not private, private[:10]


# -- stage 0 without a GPU, offline, and when the hub fails ----------------------------

def _stage0(work: Path, *sets: str, env=None) -> subprocess.CompletedProcess:
    return run_script("stage_0_setup", "--preset", PRESET, "--work-dir", str(work), *sets, env=env or _env())


@pytest.fixture(scope="module")
def offline_cache(standins, tmp_path_factory):
    """A Hugging Face cache holding the preset's model and dataset files, as if fetched elsewhere."""
    cache = tmp_path_factory.mktemp("hf_cache")
    model = standins["model"]
    model_sha = hf_cache(cache, f"EleutherAI/{PRESET}", "model", {p.name: p for p in model.iterdir()})
    files = standins["pile"]
    data_sha = hf_cache(cache, "monology/pile-uncopyrighted", "dataset",
                        {"train/00.jsonl.zst": files["train"], "val.jsonl.zst": files["val"],
                         "test.jsonl.zst": files["test"]})
    # Two released training checkpoints (the hub's stepN branches) for controls.revisions: other weights, the earlier
    # step further from the final ones (stage 0 refuses controls whose loss does not rise as the step falls).
    from safetensors.torch import load_file, save_file
    revisions = {}
    for step in (1000, 2000):
        files = {p.name: p for p in model.iterdir()}
        weights = tmp_path_factory.mktemp(f"step{step}") / "model.safetensors"
        noise = torch.Generator().manual_seed(step)           # 33% (step1000) and 17% of each tensor's spread
        state = {k: (v.float() + (3000 - step) / 6000 * v.float().std().nan_to_num() * torch.randn(v.shape, generator=noise)
                     ).to(v.dtype) for k, v in load_file(model / "model.safetensors").items()}
        save_file(state, weights, metadata={"format": "pt"})
        revisions[f"step{step}"] = hf_cache(cache, f"EleutherAI/{PRESET}", "model", {**files, "model.safetensors": weights},
                                            revision=f"step{step}")
    return cache, model_sha, data_sha, revisions


@pytest.mark.slow
def test_offline_stage_0_of_a_hub_preset_needs_no_gpu_and_records_the_cached_revisions(offline_cache, tmp_path):
    cache, model_sha, data_sha, revisions = offline_cache
    scan = scan_cache_dir(cache)             # huggingface_hub reads the stand-in cache as its own
    assert not scan.warnings and {r.repo_id for r in scan.repos} == {f"EleutherAI/{PRESET}",
                                                                     "monology/pile-uncopyrighted"}
    assert not torch.cuda.is_available()      # the preset says device=cuda: stage 0 must not care
    work = tmp_path / "w"
    offline = _env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    # A control revision the cache lacks: one line naming it, before anything is written.
    line = _error_line(_stage0(tmp_path / "x", *_sets({**SHRINK, "controls.revisions": "step1000,step3000"}), env=offline))
    assert f"EleutherAI/{PRESET}@step3000" in line and "not in the local Hugging Face cache" in line, line
    assert not (tmp_path / "x" / "shared" / "manifest.json").exists()
    r = _stage0(work, *_sets({**SHRINK, "controls.revisions": "step1000,step2000"}), env=offline)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((work / "shared" / "manifest.json").read_text())
    assert (m["model"]["source"], m["model"]["sha"], m["model"]["offline"]) == ("hub", model_sha, True)
    # Each control as the main model is recorded: its revision, the sha the cache resolved it to, its files.
    assert {n: (c["revision"], c["sha"]) for n, c in m["controls"].items()} == {
        f"control_step{s}": (f"step{s}", revisions[f"step{s}"]) for s in (1000, 2000)}
    assert len({model_sha, *revisions.values()}) == 3 and all(
        Path(c["path"]).name == c["sha"] and c["files"]["model.safetensors"] for c in m["controls"].values())
    assert m["controls"]["control_step1000"]["val_loss"] > m["controls"]["control_step2000"]["val_loss"] > m["model_val_loss"]
    assert m["dataset"]["sha"] == data_sha and m["dataset"]["offline"] is True
    assert Path(m["pretrained_path"]).name == model_sha          # read from the cache, not copied
    assert len(TokenFile(work / "shared" / "tokens", "test")) == m["corpus"]["test"]["documents"] > 0


class _FakeHub(BaseHTTPRequestHandler):
    """A loopback server answering every request as the hub does for one failure."""
    answer = (404, "RepoNotFound")

    def do_GET(self):
        status, code = self.answer
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("answer,fragment", [
    ((404, "RepoNotFound"), "repository not found"),
    ((403, "GatedRepo"), "gated or unauthorised"),
    ((404, "RevisionNotFound"), "revision not found"),
])
def test_hub_answers_are_one_error_line(fake_hub, answer, fragment, tmp_path):
    _FakeHub.answer = answer
    work = tmp_path / "w"
    r = _stage0(work, env=_env(HF_ENDPOINT=f"http://127.0.0.1:{fake_hub.server_port}",
                               HF_HUB_CACHE=str(tmp_path / "cache")))
    line = _error_line(r)
    assert fragment in line and "monology/pile-uncopyrighted" in line, line
    assert not (work / "shared" / "manifest.json").exists() and not list(work.glob("shared/flags/*.done"))


@pytest.mark.slow
def test_no_network_and_empty_offline_cache_are_one_error_line_with_the_fix(tmp_path):
    closed = _env(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "cache"))   # nothing listens
    line = _error_line(_stage0(tmp_path / "a", env=closed))
    assert "cannot reach the hub" in line and "HF_HUB_OFFLINE=1" in line and "model.source=local" in line
    offline = _env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    line = _error_line(_stage0(tmp_path / "b", env=offline))
    assert "not in the local Hugging Face cache" in line and "login node" in line
    for work in (tmp_path / "a", tmp_path / "b"):
        assert not (work / "shared" / "manifest.json").exists() and not list(work.glob("shared/flags/*.done"))


@pytest.mark.slow
def test_local_model_problems_are_one_error_line(standins, tmp_path):
    sets = _sets({**_local(standins), **SHRINK})
    line = _error_line(_stage0(tmp_path / "a", *sets, "--set", f"model.path={tmp_path / 'nowhere'}"))
    assert "model directory not found" in line
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((standins["model"] / "config.json").read_text())
    line = _error_line(_stage0(tmp_path / "b", *sets, "--set", f"model.path={broken}"))
    assert "missing *.safetensors weights, tokenizer files" in line
    line = _error_line(_stage0(tmp_path / "c", *sets, "--set", "data.seq_len=4096"))
    assert "exceed the model's context of 2048" in line


@pytest.mark.slow
def test_a_budget_beyond_the_data_is_refused_unless_repetition_is_allowed(standins, tmp_path):
    sets = _sets({**_local(standins), **SHRINK, "recovery_monotone.max_tokens": "2000000"})
    line = _error_line(_stage0(tmp_path / "a", *sets))
    assert "recovery_monotone" in line and "passes over the" in line and "data.max_epochs=" in line
    allowed = line.split("--set ")[-1].strip()
    r = _stage0(tmp_path / "b", *sets, "--set", allowed)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(repeating data)" in r.stdout


@pytest.mark.slow
def test_disk_full_is_one_error_line_and_leaves_nothing_that_looks_complete(standins, tmp_path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("cannot mount a small tmpfs (CI runs as root)")
        pytest.skip("needs root to mount a small tmpfs")
    try:
        line = _error_line(_stage0(mnt / "w", *_sets({**_local(standins), **SHRINK})))
        assert "disk full" in line
        assert not (mnt / "w" / "shared" / "manifest.json").exists()
        assert not list((mnt / "w").glob("shared/flags/*.done"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# -- bf16-mixed on CPU: the GPU recipe's numerics ---------------------------------------

@pytest.mark.slow
def test_bf16_mixed_recovery_keeps_fp32_master_weights_and_moves_v(tiny_run, tmp_path):
    from configs.experiment_config import TrainConfig
    from utils.model.modeling import SavedWeights, load_model, save_model
    from utils.model.monotonicity import apply_monotonicity
    from utils.train.movement import movement_report
    from utils.run.compute import Compute
    from utils.train.training import train
    _, paths = tiny_run
    model = load_model(paths.shared / "models" / "pretrained")
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    save_model(model, tmp_path / "start")
    model = load_model(tmp_path / "start")
    start = SavedWeights(tmp_path / "start", model)
    train_tok = TokenFile(paths.shared / "tokens", "train")
    hist = train(model, train_tok.tokens, TokenFile(paths.shared / "tokens", "val").tokens,
                 TrainConfig(max_tokens=6 * 8 * 64, micro_batch_size=8, lr=3e-3, eval_windows=8),
                 64, 0, Compute(torch.device("cpu"), "bf16-mixed"), desc="bf16")
    assert hist["precision"] == "bf16-mixed"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    moved = movement_report(start, model, "mlp_both")["fraction_V_changed"]
    assert moved >= 0.99, f"only {moved:.1%} of V moved under bf16-mixed"


def test_local_controls_are_model_directories_recorded_like_the_model(standins, tmp_path):
    from configs.presets import load_config
    from utils.run.run_files import PipelineError
    from utils.stages import fetch_controls
    local = {**_local(standins), **SHRINK}
    cfg = load_config(PRESET, list({**local, "controls.revisions": f"{standins['model']},{tmp_path / 'nope'}"}.items()))
    with pytest.raises(PipelineError, match=r"with model.source=local each entry is a model directory, and '.*nope' is not one"):
        fetch_controls(cfg)
    cfg = load_config(PRESET, list({**local, "controls.revisions": str(standins["model"])}.items()))
    controls = fetch_controls(cfg)
    assert list(controls) == [f"control_{standins['model'].name}"]
    c = controls[f"control_{standins['model'].name}"]
    assert c["source"] == "local" and Path(c["path"]) == standins["model"].resolve()
    assert c["files"]["model.safetensors"] == file_sha256(standins["model"] / "model.safetensors")
    # A control that is the main model, or another control, byte for byte, is refused in one line.
    from utils.data.hub import fetch_model
    from utils.stages import check_distinct_controls
    main = fetch_model(cfg.model)
    with pytest.raises(PipelineError, match=rf"control_{standins['model'].name}'s weights are the main model's"):
        check_distinct_controls(main, controls)
    twin = tmp_path / "twin"
    shutil.copytree(standins["model"], twin)
    other = tmp_path / "other"
    shutil.copytree(standins["model"], other)
    from safetensors.torch import load_file, save_file
    save_file({k: v * 1.01 for k, v in load_file(other / "model.safetensors").items()}, other / "model.safetensors",
              metadata={"format": "pt"})
    cfg = load_config(PRESET, list({**local, "controls.revisions": f"{other},{twin}"}.items()))
    with pytest.raises(PipelineError, match="control_twin's weights are the main model's"):
        check_distinct_controls(main, fetch_controls(cfg))
    cfg = load_config(PRESET, list({**local, "controls.revisions": f"{other}"}.items()))
    check_distinct_controls(main, fetch_controls(cfg))                  # other weights: accepted
