"""Recovery training: exact resume after SIGKILL, signal stop, corrupt checkpoints."""
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from configs.experiment_config import TrainConfig
from conftest import ROOT, fast_sets, run_script
from utils.train.checkpoint import read_checkpoint
from utils.train.training import lr_at, make_optimizer

STAGE = "stage_3_train_monotonic"
# 24 optimizer steps of 8 x 128 tokens, a checkpoint every 3 steps.
SHORT = ["--set", "recovery_monotone.max_tokens=24576", "--set", "recovery_monotone.micro_batch_size=8",
         "--set", "recovery_monotone.checkpoint_every_steps=3", "--set", "recovery_monotone.eval_interval=5",
         "--set", "recovery_monotone.eval_windows=8"]


def test_schedule_warms_up_then_decays_to_the_floor():
    t = TrainConfig(lr=1.0, warmup_fraction=0.1, min_lr_fraction=0.1)
    lrs = [lr_at(s, 100, t) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_softplus_pre_parameters_get_no_weight_decay():
    from test_monotonicity import tiny_model
    from utils.model.monotonicity import apply_monotonicity
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-6)
    opt = make_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert not any("parametrizations" in names[i] for i in decayed)
    assert any("attention.query_key_value" in names[i] for i in decayed)


def _clone(stage1_work, tmp_path, name):
    work = tmp_path / name
    shutil.copytree(stage1_work, work)
    return work


def _popen(work, extra=()):
    return subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{STAGE}.py"), "--work-dir", str(work),
                             *fast_sets(), *SHORT, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(work, proc, min_step=3, timeout=120):
    ckpt_dir = work / "seed_42" / "checkpoints" / "monotonic"
    deadline = time.time() + timeout
    while time.time() < deadline:
        steps = [int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*")]
        if steps and max(steps) >= min_step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def _killed_after_checkpoint(stage1_work, tmp_path, name, min_step, extra=()):
    """A run SIGKILLed once a checkpoint of at least `min_step` exists."""
    work = _clone(stage1_work, tmp_path, name)
    proc = _popen(work, extra)
    _wait_for_checkpoint(work, proc, min_step=min_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return work


def _final_tensors(work):
    ckpts = sorted((work / "seed_42" / "checkpoints" / "monotonic").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_00000024"]      # a finished arm keeps its last checkpoint only
    raw = {k: v for k, v in read_checkpoint(ckpts[-1]).items() if k.startswith("model.")}
    saved = load_file(next((work / "seed_42" / "models" / "monotonic").glob("*.safetensors")))
    return raw, saved


@pytest.fixture(scope="module")
def uninterrupted(stage1_work, tmp_path_factory):
    work = _clone(stage1_work, tmp_path_factory.mktemp("full"), "w")
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT)
    assert r.returncode == 0, r.stderr
    return _final_tensors(work)


def _assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(stage1_work, uninterrupted, tmp_path):
    work = _clone(stage1_work, tmp_path, "killed")
    proc = _popen(work)
    _wait_for_checkpoint(work, proc, min_step=6)
    time.sleep(0.3)                     # somewhere inside a later step
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "seed_42" / "flags" / f"{STAGE}.done").exists()
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    raw, saved = _final_tensors(work)
    _assert_bitwise_equal(raw, uninterrupted[0])      # includes the softplus pre-parameters V
    _assert_bitwise_equal(saved, uninterrupted[1])
    report = json.loads((work / "seed_42" / "results" / "training_monotonic.json").read_text())
    history = report["history"]
    assert [row["step"] for row in history["steps"]] == sorted({row["step"] for row in history["steps"]})
    assert report["processes"] == [1] and history["segments"] == [{"first_step": 0, "last_step": 24, "processes": 1}]
    # --force on the finished stage trains afresh (no resume), sets the old checkpoints aside until it has
    # finished (then removes them, in one line), and gives the uninterrupted run's bits again.
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT, "--force")
    assert r.returncode == 0, r.stderr
    assert "resumed from" not in r.stdout and "--force: starting afresh" in r.stdout, r.stdout
    removed = [line for line in r.stdout.splitlines() if "removed what --force had set aside" in line]
    assert len(removed) == 1 and "monotonic.set-aside-" in removed[0], r.stdout
    assert not list((work / "seed_42" / "checkpoints").glob("monotonic.set-aside-*"))
    raw, saved = _final_tensors(work)
    _assert_bitwise_equal(raw, uninterrupted[0])
    _assert_bitwise_equal(saved, uninterrupted[1])


@pytest.mark.slow
@pytest.mark.parametrize("construction", ["signed_units", "projected"])
def test_resume_is_bitwise_identical_for_the_other_constructions(stage1_work, tmp_path, construction):
    """softplus_abs is the test above; signed_units also carries its unit signs through the checkpoint,
    projected clamps W after every step. Both certify after training."""
    sets = ["--set", f"monotone.construction={construction}", "--set", "monotone.init=clip"]
    base = tmp_path / "base"
    shutil.copytree(stage1_work / "shared", base / "shared")
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(base), *fast_sets(), *sets)
    assert r.returncode == 0, r.stderr
    full = _clone(base, tmp_path, "full")
    r = run_script(STAGE, "--work-dir", str(full), *fast_sets(), *SHORT, *sets)
    assert r.returncode == 0, r.stderr
    work = _killed_after_checkpoint(base, tmp_path, "killed", min_step=6, extra=sets)
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT, *sets)
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    for a, b in zip(_final_tensors(work), _final_tensors(full)):
        _assert_bitwise_equal(a, b)
    cert = json.loads((work / "seed_42" / "results" / "monotonicity_certificate_monotonic.json").read_text())
    assert cert["monotone"] and cert["construction"] == construction
    assert (sum(l["concave_units"] for l in cert["layers"]) > 0) == (construction == "signed_units")


@pytest.mark.slow
@pytest.mark.parametrize("sig,code", [(signal.SIGUSR1, 75), (signal.SIGTERM, 75), (signal.SIGINT, 130)])
def test_signal_checkpoints_exits_and_resume_matches(stage1_work, uninterrupted, tmp_path, sig, code):
    """SLURM's warning signals exit 75 (requeue); Ctrl-C exits 130; all checkpoint first."""
    work = _clone(stage1_work, tmp_path, "signalled")
    proc = _popen(work)
    _wait_for_checkpoint(work, proc, min_step=3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"stopped by signal {sig.name}" in err and "rerun the same command" in err and "Traceback" not in err
    assert not (work / "seed_42" / "flags" / f"{STAGE}.done").exists()
    steps = [int(p.name.split("_")[1]) for p in (work / "seed_42" / "checkpoints" / "monotonic").glob("step_*")]
    assert max(steps) < 24
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT)
    assert r.returncode == 0, r.stderr
    assert (work / "seed_42" / "flags" / f"{STAGE}.done").exists()
    _assert_bitwise_equal(_final_tensors(work)[0], uninterrupted[0])


@pytest.mark.slow
def test_corrupt_checkpoint_is_one_clear_error_and_nothing_is_deleted(stage1_work, tmp_path):
    work = _killed_after_checkpoint(stage1_work, tmp_path, "corrupt", min_step=6)
    ckpts = sorted((work / "seed_42" / "checkpoints" / "monotonic").glob("step_*"))
    weights = next(ckpts[-1].glob("shard-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])          # truncated
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "is corrupt or incomplete" in r.stderr
    assert sorted((work / "seed_42" / "checkpoints" / "monotonic").glob("step_*")) == ckpts


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused(stage1_work, tmp_path):
    work = _killed_after_checkpoint(stage1_work, tmp_path, "changed", min_step=3)
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT, "--set", "recovery_monotone.lr=0.1")
    assert r.returncode == 1 and "different config" in r.stderr


@pytest.mark.slow
def test_a_copied_work_dir_uses_its_own_files(stage1_work, tmp_path):
    """`cp -a work elsewhere`, original moved away: the copy trains from its own models, records
    paths relative to itself, and a missing stage-0 model is one clear line."""
    orig = _clone(stage1_work, tmp_path, "orig")
    moved = tmp_path / "moved"
    subprocess.run(["cp", "-a", str(orig), str(moved)], check=True)
    orig.rename(tmp_path / "gone")
    base = ["--set", "recovery_baseline.max_tokens=2048", "--set", "recovery_baseline.micro_batch_size=8",
            "--set", "recovery_baseline.eval_windows=8"]
    for stage, extra in ((STAGE, SHORT), ("stage_2_train_baseline", base)):
        r = run_script(stage, "--work-dir", str(moved), *fast_sets(), *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    results = moved / "seed_42" / "results"
    assert json.loads((results / "training_monotonic.json").read_text())["start_model"] == \
        "seed_42/models/monotonic_init"
    assert json.loads((results / "training_baseline.json").read_text())["start_model"] == "shared/models/pretrained"
    assert json.loads((moved / "shared" / "manifest.json").read_text())["pretrained_path"] == "shared/models/pretrained"
    shutil.rmtree(moved / "shared" / "models" / "pretrained")
    r = run_script("stage_4_evaluate", "--work-dir", str(moved), *fast_sets())
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "pretrained model recorded by stage 0 is not at" in r.stderr


@pytest.mark.slow
def test_the_frozen_ablation_trains_only_the_constrained_modules(stage1_work, tmp_path):
    """recovery_monotone.trainable=constrained: attention, embeddings and norms stay exactly as they
    were; the per-group report shows it, and the certificate still holds."""
    work = _clone(stage1_work, tmp_path, "frozen")
    r = run_script(STAGE, "--work-dir", str(work), *fast_sets(), *SHORT, "--set", "recovery_monotone.max_tokens=6144",
                   "--set", "recovery_monotone.trainable=constrained")
    assert r.returncode == 0, r.stderr
    assert "ablation: only the modules of scope mlp_both train" in r.stdout
    report = json.loads((work / "seed_42" / "results" / "training_monotonic.json").read_text())
    groups = report["movement"]["groups"]
    assert set(groups) == {"mlp_in", "mlp_out", "attention", "embeddings", "norms"}
    assert groups["mlp_in"]["relative_delta"] > 0 and groups["mlp_out"]["relative_delta"] > 0
    assert all(groups[g]["relative_delta"] == 0 for g in ("attention", "embeddings", "norms"))
    assert report["certificate"]["monotone"] and report["recipe"]["trainable"] == "constrained"


def test_weight_change_is_reported_per_module_group():
    import copy
    from configs.experiment_config import ModelConfig
    from utils.model.modeling import build_tiny_model
    from utils.train.movement import module_group, weight_change_by_group
    start = build_tiny_model(ModelConfig(n_layer=2, d_model=32, n_head=4, d_ff=64, vocab_size=97), 0)
    out = start.get_output_embeddings()
    names = {n: module_group(n, m, out) for n, m in start.named_modules()
             if isinstance(getattr(m, "weight", None), torch.Tensor)}
    assert names["gpt_neox.embed_in"] == names["lm_head"] == "embeddings"       # input and output embeddings
    assert names["gpt_neox.layers.1.mlp.dense_h_to_4h"] == "mlp_in"
    assert names["gpt_neox.layers.1.mlp.dense_4h_to_h"] == "mlp_out"
    assert names["gpt_neox.layers.0.attention.query_key_value"] == names["gpt_neox.layers.0.attention.dense"] \
        == "attention"
    assert names["gpt_neox.layers.0.input_layernorm"] == names["gpt_neox.final_layer_norm"] == "norms"
    trained = copy.deepcopy(start)
    with torch.no_grad():
        w = trained.gpt_neox.layers[0].mlp.dense_h_to_4h.weight
        w.mul_(1.5)                                     # +50% on one of the two mlp_in weight matrices
    groups = weight_change_by_group(start.state_dict(), trained)
    mlp_in = [start.gpt_neox.layers[i].mlp.dense_h_to_4h for i in (0, 1)]
    mass = sum(float(m.weight.abs().sum() + m.bias.abs().sum()) for m in mlp_in)
    expected = 0.5 * float(mlp_in[0].weight.abs().sum()) / mass
    assert groups["mlp_in"]["relative_delta"] == pytest.approx(expected, rel=1e-5)
    assert all(v["relative_delta"] == 0 for g, v in groups.items() if g != "mlp_in")


def test_the_best_weights_are_kept_sharded_and_exported_once_at_the_end(stage1_work, tmp_path, monkeypatch):
    """Every improvement writes checkpoints/<arm>/best (each rank its shard, no gather); the Hugging
    Face export of it happens once, after the final model, and scores the recorded best loss."""
    from conftest import tiny_config
    from utils import recovery
    from utils.data.tokenization import TokenFile
    from utils.model.modeling import load_model
    from utils.run.compute import Compute
    from utils.run.run_files import RunPaths
    from utils.train.training import validation_loss
    work = _clone(stage1_work, tmp_path, "best")
    pairs = [tuple(a.split("=", 1)) for a in SHORT[1::2]]
    cfg = tiny_config(work, pairs)
    paths = RunPaths(work, cfg.seed)
    exports, save = [], recovery.save_model
    monkeypatch.setattr(recovery, "save_model", lambda m, path, *a, **k: (exports.append(path.name), save(m, path, *a, **k)))
    recovery.recover(cfg, paths, "monotonic")
    assert exports == ["monotonic", "monotonic_best"]
    report = json.loads((paths.results / "training_monotonic.json").read_text())
    info = json.loads((paths.models / "monotonic_best" / "run_info.json").read_text())
    best = report["best"]
    assert info["step"] == best["step"] == report["history"]["best_step"]
    kept = json.loads((paths.seed_dir / "checkpoints" / "monotonic" / "best" / "state.json").read_text())
    assert kept["step"] == best["step"] and kept["val_loss"] == best["val_loss"]
    val = TokenFile(paths.shared / "tokens", "val").tokens
    t = cfg.recovery_monotone
    # Scored as training scored it (its device and precision: bf16-mixed on a GPU), so the same kernels
    # give the same loss; a different precision would differ by bf16's rounding (~1e-3), not by a wrong export.
    compute = Compute.from_config(cfg.device, cfg.precision)
    again = validation_loss(load_model(paths.models / "monotonic_best", device=compute.device), val, cfg.data.seq_len,
                            t.micro_batch_size, t.eval_windows, compute)
    assert again == pytest.approx(best["val_loss"], rel=1e-5)
    assert best["val_loss"] <= min(r["val_loss"] for r in report["history"]["steps"] if r.get("val_loss") is not None)


def test_the_best_weights_at_step_0_are_the_start_and_are_not_written_again(tmp_path):
    """Validation before the first step is the start model's, already on disk: best/ then holds only its
    record, and the export is told to use the start's weights; a later improvement writes its weights."""
    from test_monotonicity import tiny_model
    from utils.train.checkpoint import Checkpointer
    start, trained = tiny_model(), tiny_model()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    ckpt = Checkpointer(tmp_path / "ckpt", "fingerprint", 2)
    ckpt.save_best(start, 0, 5.0)
    assert [p.name for p in (tmp_path / "ckpt" / "best").iterdir()] == ["state.json"]
    out = tiny_model()
    with torch.no_grad():
        for p in out.parameters():
            p.add_(2.0)
    before = {k: v.clone() for k, v in out.state_dict().items()}
    assert ckpt.load_best_into(out) == {"step": 0, "val_loss": 5.0, "start": True}
    assert all(torch.equal(before[k], v) for k, v in out.state_dict().items())      # left for the caller
    ckpt.save_best(trained, 3, 4.0)
    assert list((tmp_path / "ckpt" / "best").glob("*.safetensors"))
    assert ckpt.load_best_into(out) == {"step": 3, "val_loss": 4.0, "start": False}
    assert all(torch.equal(a, b) for a, b in zip(out.state_dict().values(), trained.state_dict().values()))


def test_a_checkpoint_is_written_one_tensor_at_a_time_and_reads_back_exactly(tmp_path):
    """DCP's stock safetensors writer serialises a rank's whole shard into one bytes object beside the tensors
    (pythia-6.9b on 8 GPUs: ~165 GB per node per checkpoint). The checkpoint writer streams the shard tensor by
    tensor: writing 96 MiB of model and optimizer state allocates less than one 4-MiB tensor in Python (the
    stock writer: over 96 MiB), and every tensor reads back bitwise, through DCP's own reader."""
    import tracemalloc
    from utils.train.checkpoint import Checkpointer
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    ckpt = Checkpointer(tmp_path / "ckpt", "fingerprint", 2)
    tracemalloc.start()
    try:
        path = ckpt.save(7, model, optimizer, {"history": []})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"writing the checkpoint allocated {peak / 2**20:.1f} MiB"
    saved = read_checkpoint(path)
    for name, p in model.named_parameters():
        assert torch.equal(saved[f"model.{name}"], p)
        for key, value in optimizer.state[p].items():
            assert torch.equal(saved[f"optim.{name}.{key}"], value)


@pytest.mark.parametrize("construction", ["softplus_abs", "signed_units"])
def test_an_untrained_arm_moved_exactly_nothing_from_its_saved_start(tmp_path, construction):
    """The movement report reads the start's tensors from its files (no second model on the host) and rebuilds the
    weights training started from: a monotone arm and a released one (unconstrained_from_init), loaded and not
    trained, moved by exactly 0, and no V changed."""
    from test_monotonicity import tiny_model
    from utils.model.modeling import SavedWeights, load_model, save_model
    from utils.model.monotonicity import apply_monotonicity, release_constraint
    from utils.train.movement import movement_report
    model = tiny_model()
    apply_monotonicity(model, "mlp_both", "monotone", 1e-3, construction=construction)
    save_model(model, tmp_path / "start")
    for trained in (load_model(tmp_path / "start"), release_constraint(load_model(tmp_path / "start"))):
        report = movement_report(SavedWeights(tmp_path / "start", trained), trained, "mlp_both")
        assert report["mean_abs_delta_W_constrained"] == report["mean_abs_delta_W_unconstrained"] == 0
        assert all(g["mean_abs_delta"] == 0 for g in report["groups"].values())
        assert report["fraction_V_changed"] in (0, None)
