"""Stage scripts end to end on the tiny preset: outputs, flags, exit codes."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FAST, ROOT, fast_sets, run_script

pytestmark = pytest.mark.slow


def test_pipeline_local_script_passes(tiny_run, tmp_path, capsys):
    """Every stage and its checks, on a copy of the session's stage 0 (the same FAST settings, so
    stage 0 is checked and skipped rather than pretrained again)."""
    import test_pipeline_local
    work = _copy_stage0(tiny_run, tmp_path)
    # with the parts FAST leaves off: the unconstrained_from_init control, the ladder and the same-history frontier,
    # and a 2-value recipe search
    sets = [*(f"{k}={v}" for k, v in FAST), "controls.unconstrained_from_init=true", "controls.ladder=0.25,0.5",
            "analysis.frontier=same_history",
            *(f"recovery_{arm}.{k}" for arm in ("baseline", "monotone")
              for k in ("lr_grid=1e-3,3e-3", "sweep_tokens=8000", "lr_confirm=2", "lr_grid_extensions=0")),
            "attack.uat_opt_texts=6", "attack.uat_eval_texts=8",
            "attack.uat_restarts=1", "attack.uat_max_sweeps=2", "attack.hotflip_texts=10", "attack.hotflip_max_flips=3",
            "attack.gcg_texts=4", "attack.gcg_steps=6", "attack.gcg_search_width=16"]
    assert test_pipeline_local.main(["--work-dir", str(work), *(a for kv in sets for a in ("--set", kv))]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 9 and "FAIL" not in out, out
    # run_all.sh --dry-run's disk per seed (utils/run/resources.py) is what this seed keeps: every arm's model,
    # best export, last checkpoint and best/ (weights only: the tiny model's tokenizer files would dominate).
    from configs.presets import load_config
    from utils.run.resources import ARM_BYTES, disk_per_seed_gb
    from utils.run.time_limits import parameters
    cfg = load_config("tiny", [tuple(kv.split("=", 1)) for kv in sets])
    added = len(json.loads((work / "seed_42" / "results" / "ladder.json").read_text())["rungs"]) - len(cfg.ladder_tokens())
    counted = disk_per_seed_gb(cfg)["kept"] * 1e9 + added * ARM_BYTES * parameters(cfg)
    kept = sum(f.stat().st_size for d in ("models", "checkpoints") for f in (work / "seed_42" / d).rglob("*.safetensors"))
    assert kept == pytest.approx(counted, rel=0.05), (kept, counted)


def test_pipeline_local_script_removes_its_temporary_work_dir_and_fails_on_a_bad_stage(capsys):
    import test_pipeline_local
    assert test_pipeline_local.main(["--set", "data.seq_len=-1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  stage_0_setup" in out
    removed = re.search(r"temporary work dir (\S+) removed", out)
    assert removed and not Path(removed.group(1)).exists()
    assert removed.group(1) not in out.replace(removed.group(0), "")     # no path printed into a deleted dir


def _copy_stage0(tiny_run, tmp_path):
    _, paths = tiny_run
    work = tmp_path / "work"
    shutil.copytree(paths.shared, work / "shared")
    return work


def test_stage_1_keep_gelu_is_labelled_not_monotone(tiny_run, tmp_path):
    work = _copy_stage0(tiny_run, tmp_path)
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(work), *fast_sets(),
                   "--set", "monotone.activation=keep")
    assert r.returncode == 0, r.stderr
    cert = json.loads((work / "seed_42" / "results" / "monotonicity_certificate.json").read_text())
    assert cert["monotone"] is False and cert["configured_monotone"] is False
    assert cert["label"].startswith("NOT MONOTONE") and cert["total_violations"] > 0
    assert "NOT MONOTONE" in r.stdout


def test_stage_1_reruns_when_config_changes_and_skips_when_not(tiny_run, tmp_path):
    work = _copy_stage0(tiny_run, tmp_path)
    args = ("--work-dir", str(work), *fast_sets())
    assert run_script("stage_1_apply_monotonicity", *args).returncode == 0
    assert "already done" in run_script("stage_1_apply_monotonicity", *args).stdout
    r = run_script("stage_1_apply_monotonicity", *args, "--set", "monotone.scope=mlp_in")
    assert r.returncode == 0 and "already done" not in r.stdout
    cert = json.loads((work / "seed_42" / "results" / "monotonicity_certificate.json").read_text())
    assert cert["scope"] == "mlp_in"
    # run_all.sh reads every stage's flag in one process: the same verdicts as each stage's --check.
    done = run_script("stages_done", *args, "--set", "monotone.scope=mlp_in", "--seeds", "42,7")
    assert done.returncode == 0 and done.stdout.splitlines() == ["0 42", "1 42", "0 7"], done.stderr
    assert run_script("stage_1_apply_monotonicity", *args, "--set", "monotone.scope=mlp_in", "--check").returncode == 0
    assert run_script("stages_done", *args, "--seeds", "42").stdout.splitlines() == ["0 42"]
    assert run_script("stage_1_apply_monotonicity", *args, "--check").returncode == 1
    bad = run_script("stages_done", *args, "--set", "monotone.scope=nowhere", "--seeds", "42")
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.splitlines()) == 1


def test_a_stage_run_by_hand_defaults_to_the_work_dir_run_all_uses():
    """run_all.sh writes to <repo>/work; a stage script run without --work-dir must read and write there too
    (it once defaulted to <repo>/utils/work, where nothing run_all.sh wrote could be found)."""
    repo = Path(__file__).resolve().parents[1]
    assert 'WORK_DIR="$ROOT/work"' in (repo / "run_all.sh").read_text()
    r = run_script("stage_4_evaluate", "--help")
    assert r.returncode == 0 and f"(default: {repo / 'work'})" in " ".join(r.stdout.split())


def test_stage_1_without_stage_0_fails_cleanly(tmp_path):
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(tmp_path / "empty"), *fast_sets())
    assert r.returncode == 1
    assert r.stderr.strip().startswith("error: [stage_1_apply_monotonicity] stage 0 has not run")
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "empty").glob("seed_42/flags/*.done"))


def test_corrupt_pretrained_model_is_one_clear_error_and_keeps_outputs(tiny_run, tmp_path):
    work = _copy_stage0(tiny_run, tmp_path)
    manifest = json.loads((work / "shared" / "manifest.json").read_text())
    pre = work / "shared" / "models" / "pretrained"
    manifest["pretrained_path"] = str(pre)
    (work / "shared" / "manifest.json").write_text(json.dumps(manifest))
    weights = next(pre.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(work), *fast_sets())
    assert r.returncode == 1 and "cannot load model" in r.stderr and "Traceback" not in r.stderr
    assert (work / "shared" / "manifest.json").exists() and weights.exists()


def test_a_stage_already_running_on_the_work_dir_is_refused(tiny_run, tmp_path):
    import fcntl
    work = _copy_stage0(tiny_run, tmp_path)
    lock = work / "seed_42" / "flags" / "stage_1_apply_monotonicity.lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as held:
        held.write("pid 4242 on node7")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        r = run_script("stage_1_apply_monotonicity", "--work-dir", str(work), *fast_sets())
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (f"error: [stage_1_apply_monotonicity] stage_1_apply_monotonicity (seed 42) is "
                                f"already running on this work dir (pid 4242 on node7 holds {lock}); "
                                f"wait for it or stop it")
    assert not (work / "seed_42" / "results").exists()
    r = run_script("stage_1_apply_monotonicity", "--work-dir", str(work), *fast_sets())   # released: runs
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("stage", ["stage_0_setup", "stage_1_apply_monotonicity", "stage_2_train_baseline",
                                   "stage_3_train_monotonic", "stage_4_evaluate", "stage_5_uat_attacks",
                                   "stage_6_hotflip_attacks", "stage_7_aggregate"])
def test_common_bad_inputs_are_one_error_line_for_every_stage(stage, tmp_path):
    """A work dir that is a file, a bad override, a missing earlier stage: one `error:` line, no traceback."""
    a_file = tmp_path / "afile"
    a_file.write_text("not a directory")
    cases = [(["--work-dir", str(a_file)], 2, "is a file, not a directory")]
    if stage == "stage_0_setup":
        cases.append((["--work-dir", str(tmp_path / "w"), "--set", "eval.stride=0"], 2, "eval.stride"))
    else:
        cases.append((["--work-dir", str(tmp_path / "empty")], 1, "stage 0 has not run" if stage != "stage_7_aggregate"
                      else "no seed"))
    for args, code, fragment in cases:
        r = run_script(stage, *args)
        assert r.returncode == code and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], (args, r.stderr)


def test_own_data_too_small_for_the_attacks_fails_in_stage_0_before_training(tmp_path):
    """30 test documents cannot feed UAT (12 + 24 texts) and HotFlip (24): say so before any training."""
    from utils.data.corpus import stdlib_documents
    docs = [d["text"] for d in stdlib_documents(200)]
    files = {}
    for split, chunk in (("train", docs[:400]), ("val", docs[400:440]), ("test", docs[440:470])):
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk))
    sets = ["--set", "data.source=jsonl", *[a for s, p in files.items() for a in ("--set", f"data.{s}_file={p}")]]
    r = run_script("stage_0_setup", "--work-dir", str(tmp_path / "w"), *fast_sets(), *sets)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    line = r.stderr.strip()
    assert line.count("\n") == 0 and "UAT needs 36" in line and "stage 6 24" in line, line
    assert "pretraining" not in r.stdout                              # failed before any training
    assert not (tmp_path / "w" / "shared" / "manifest.json").exists()


def test_a_stage_counts_as_done_only_while_its_outputs_are_whole(stage1_work, tmp_path):
    """Stage 1's model loses its weights after the stage finished: it is no longer done anywhere."""
    work = tmp_path / "w"
    shutil.copytree(stage1_work, work)
    args = ("--work-dir", str(work), *fast_sets())
    (work / "seed_42" / "models" / "monotonic_init" / "model.safetensors").unlink()
    assert run_script("stages_done", *args, "--seeds", "42").stdout.splitlines() == ["0 42"]
    assert run_script("stage_1_apply_monotonicity", *args, "--check").returncode == 1
    # A later stage started by hand names the file and the stage that writes it, in one line.
    r = run_script("stage_4_evaluate", *args)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "seed_42/models/monotonic_init has no *.safetensors weights: rerun stage_1_apply_monotonicity" in r.stderr
    # --status, on the record a local run leaves, shows it as not done.
    (work / "local" / "status").mkdir(parents=True)
    (work / "local" / "jobs.tsv").write_text("job_id\tstage\tseed\tlog\nlocal\tstage_1_apply_monotonicity\t42\tx.log\n")
    (work / "local" / "status" / "stage_1_apply_monotonicity_seed42").write_text("done local\n")
    st = run_script("pipeline_status", str(work))
    assert st.returncode == 1 and "done, but seed_42/models/monotonic_init is not whole (no *.safetensors weights)" \
        in st.stdout, st.stdout
    # A corrupt JSON output counts the same; the rerun says why it runs and makes the stage whole again.
    (work / "seed_42" / "results" / "monotonicity_certificate.json").write_text("{")
    r = run_script("stage_1_apply_monotonicity", *args)
    assert r.returncode == 0 and "was done, but its output" in r.stdout and "running it again" in r.stdout, r.stdout
    assert run_script("stages_done", *args, "--seeds", "42").stdout.splitlines() == ["0 42", "1 42"]
    assert run_script("pipeline_status", str(work)).returncode == 0


def _stopped_once(stage: str, work: Path, ready, *args: str) -> str:
    """Run a stage, send SLURM's warning (SIGUSR1) once ready() holds; it must exit 75 (requeue) without its
    done flag. Returns its stderr."""
    import signal
    import time
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / f"{stage}.py"), "--work-dir", str(work), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready() and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err[-2000:]
    assert not (work / "seed_42" / "flags" / f"{stage}.done").exists()
    return err


def _first_arm_kept(kept: Path):
    return lambda: bool(list(kept.glob("pretrained-*.json")))


@pytest.mark.slow
def test_stage_6_stopped_by_its_time_limit_warning_goes_on_from_the_texts_it_finished(stage1_work, tmp_path):
    """SIGUSR1 stops stage 6 after the text its search is attacking, inside an arm (exit 75, no done flag); the
    requeued run reads every text attacked before and writes what an uninterrupted run writes."""
    small = [a for kv in ("attack.hotflip_texts=4", "attack.gcg_texts=2", "attack.gcg_steps=2",
                          "attack.gcg_search_width=8", "attack.hotflip_max_flips=2", "attack.pgd_radii=")
             for a in ("--set", kv)]
    runs = {}
    for name in ("stopped", "straight"):
        work = tmp_path / name
        shutil.copytree(stage1_work, work)
        runs[name] = work
    kept = runs["stopped"] / "shared" / "measured" / "seed_42" / "stage_6_hotflip"
    err = _stopped_once("stage_6_hotflip_attacks", runs["stopped"], lambda: bool(list(kept.glob("pretrained.doc*"))),
                        *fast_sets(), *small)
    assert re.search(r"after pretrained's text \d; what stage 6 \(hotflip\) measured is kept, rerun the same command "
                     r"to go on", err), err[-2000:]
    r = run_script("stage_6_hotflip_attacks", "--work-dir", str(runs["stopped"]), *fast_sets(), *small)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"\[hotflip\] pretrained +\d text\(s\) attacked before: kept", r.stdout), r.stdout
    assert not list(kept.glob("*.doc*"))                     # a finished arm's texts give way to its whole record
    assert run_script("stage_6_hotflip_attacks", "--work-dir", str(runs["straight"]), *fast_sets(), *small).returncode == 0
    for name in ("hotflip", "gcg", "random_search", "worst_case"):
        got, want = (json.loads((runs[k] / "seed_42" / "results" / f"{name}.json").read_text())["models"]
                     for k in ("stopped", "straight"))
        assert {a: [r["adversarial_ids"] for r in m["examples"]] for a, m in got.items()} == \
               {a: [r["adversarial_ids"] for r in m["examples"]] for a, m in want.items()}, name


@pytest.mark.slow
def test_stage_5_stopped_by_its_time_limit_warning_goes_on_from_the_restarts_it_finished(stage1_work, tmp_path):
    """SIGUSR1 stops stage 5 after the UAT restart in progress, inside an arm; the requeued run reads the
    restarts searched before and finds the triggers, costs and traces an uninterrupted run finds."""
    small = [a for kv in ("attack.uat_restarts=3", "attack.uat_max_sweeps=2", "attack.uat_opt_texts=4",
                          "attack.uat_eval_texts=4") for a in ("--set", kv)]
    runs = {}
    for name in ("stopped", "straight"):
        runs[name] = tmp_path / name
        shutil.copytree(stage1_work, runs[name])
    kept = runs["stopped"] / "shared" / "measured" / "seed_42" / "stage_5_uat_attacks"
    err = _stopped_once("stage_5_uat_attacks", runs["stopped"], lambda: bool(list(kept.glob("pretrained.restart*"))),
                        *fast_sets(), *small)
    assert re.search(r"after pretrained's restart \d; what stage 5 measured is kept", err), err[-2000:]
    r = run_script("stage_5_uat_attacks", "--work-dir", str(runs["stopped"]), *fast_sets(), *small)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"\[uat\] pretrained +\d restart\(s\) searched before: kept", r.stdout), r.stdout
    # The uninterrupted run, as the stage's own process; after its work it reports how it would take SLURM's warning
    # from then on: ignored. (Left to the stage's handler, a warning while the interpreter exits met the default
    # action Python restores there, and a finished stage died with 138: seen once in CI, stage 2.)
    report = ("import os, runpy, signal, sys; sys.argv = sys.argv[1:]; sys.path.insert(0, os.path.dirname(sys.argv[0]))\n"
              "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
              "except SystemExit as e:\n    print('exit', e.code, signal.getsignal(signal.SIGUSR1) is signal.SIG_IGN)")
    r = subprocess.run([sys.executable, "-c", report, str(ROOT / "scripts" / "stage_5_uat_attacks.py"), "--work-dir",
                        str(runs["straight"]), *fast_sets(), *small], capture_output=True, text=True, timeout=600)
    assert r.stdout.splitlines()[-1] == "exit 0 True", (r.stdout[-2000:], r.stderr[-2000:])
    got, want = (json.loads((runs[k] / "seed_42" / "results" / "uat.json").read_text())["models"]
                 for k in ("stopped", "straight"))
    fields = ("trigger_ids", "opt_loss", "restart", "iterations", "search_cost", "restarts", "eval")
    assert {a: {f: m[f] for f in fields} for a, m in got.items()} == {a: {f: m[f] for f in fields} for a, m in want.items()}


@pytest.mark.slow
def test_stage_2_stopped_during_its_recipe_search_requeues_and_keeps_the_values_it_finished(stage1_work, tmp_path):
    """SIGUSR1 while the recipe search trains its second value: exit 75 (requeue), not a kill; the requeued
    run keeps the first value's result, trains the rest and the recovery, and chooses what an uninterrupted
    run chooses."""
    sweep = ["--set", "recovery_baseline.lr_grid=1e-4,1e-3,1e-2", "--set", "recovery_baseline.sweep_tokens=8192"]
    work = tmp_path / "w"
    shutil.copytree(stage1_work, work)
    record = work / "seed_42" / "checkpoints" / "baseline" / "lr_sweep.json"
    err = _stopped_once("stage_2_train_baseline", work, record.exists, *fast_sets(), *sweep)
    assert "rerun the same command to" in err       # the prefix is checkpointed; its cooldown is rerun whole
    kept = json.loads(record.read_text())["rows"]
    assert len(kept) in (1, 2) and kept[0]["lr"] == 1e-4
    r = run_script("stage_2_train_baseline", "--work-dir", str(work), *fast_sets(), *sweep)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[baseline lr 0.0001]" not in r.stdout + r.stderr                # the finished value is not retrained
    straight = tmp_path / "s"
    shutil.copytree(stage1_work, straight)
    assert run_script("stage_2_train_baseline", "--work-dir", str(straight), *fast_sets(), *sweep).returncode == 0
    got, want = (json.loads((w / "seed_42" / "results" / "training_baseline.json").read_text())["lr_sweep"]
                 for w in (work, straight))
    assert got == want


@pytest.mark.slow
def test_stage_4_stopped_by_its_time_limit_warning_keeps_what_it_measured(stage1_work, tmp_path):
    """SLURM's warning (SIGUSR1, --signal B:USR1@120) stops stage 4 after the arm it is measuring, exit 75
    (requeue); the requeued run reads every arm measured before and measures only the rest."""
    work = tmp_path / "w"
    shutil.copytree(stage1_work, work)
    kept = work / "shared" / "measured" / "every_seed" / "stage_4_evaluate"
    err = _stopped_once("stage_4_evaluate", work, _first_arm_kept(kept), *fast_sets())
    assert "what stage 4 measured is kept, rerun the same command to go on" in err
    measured = sorted(p.name.split("-")[0] for p in kept.iterdir())
    # Stopped after the next arm, or after its perplexity (kept as a part: the requeued job goes on with its tasks).
    assert measured[0] in ("control_40000", "control_40000.perplexity") or measured == ["pretrained"]
    r = run_script("stage_4_evaluate", "--work-dir", str(work), *fast_sets())
    assert r.returncode == 0, r.stderr[-2000:]
    reused = re.findall(r"\[evaluate\] (\S+) +perplexity .*\(measured before: kept\)", r.stdout)
    assert "pretrained" in reused and len(reused) == len([m for m in measured if "." not in m])
    ev = json.loads((work / "seed_42" / "results" / "evaluation.json").read_text())
    caps = json.loads((work / "seed_42" / "results" / "capabilities.json").read_text())
    assert set(ev["models"]) == set(caps["models"]) == {"pretrained", "control_40000", "monotonic_init"}
    assert all("." not in p.name.split("-")[0] for p in kept.iterdir())      # the parts of finished arms are gone


def test_stage_0_measures_its_controls_and_refuses_a_list_whose_loss_does_not_rise_as_the_step_falls(tiny_run, capsys):
    import torch
    from utils.data.tokenization import TokenFile
    from utils.model.modeling import load_model
    from utils.run.compute import Compute
    from utils.run.run_files import PipelineError, read_json
    from utils.stages import check_control_losses
    cfg, paths = tiny_run
    manifest = read_json(paths.shared / "manifest.json")
    snap = manifest["controls"]["control_40000"]
    assert snap["val_loss"] > manifest["model_val_loss"] > 0          # recorded by the stage 0 run itself
    val, cpu = TokenFile(paths.shared / "tokens", "val"), Compute(torch.device("cpu"), "fp32")
    main = load_model(paths.shared / "models" / "pretrained")
    pretrained, snapshot = str(paths.shared / "models" / "pretrained"), str(paths.resolve(snap["path"]))
    losses = check_control_losses(cfg, main, {"control_step1": {"path": snapshot}, "control_other": {"path": snapshot}},
                                  val, cpu)
    assert losses["control_step1"] == pytest.approx(snap["val_loss"], abs=1e-5) and losses["main"] < losses["control_step1"]
    assert "control_other: no step in the name (stepN), so not checked for order" in capsys.readouterr().out
    # The final model listed as an early step, the snapshot as a later one: the loss falls as the step falls.
    with pytest.raises(PipelineError, match=r"^controls: the validation loss does not rise as the step falls: "
                                            r"control_step1 [\d.]+ <= control_step2 [\d.]+ \(4 windows\)"):
        check_control_losses(cfg, main, {"control_step2": {"path": snapshot}, "control_step1": {"path": pretrained}},
                             val, cpu)
    # A control better than the main model.
    with pytest.raises(PipelineError, match=r"control_step5 [\d.]+ <= the main model"):
        check_control_losses(cfg, load_model(snapshot), {"control_step5": {"path": pretrained}}, val, cpu)


@pytest.mark.slow
def test_the_recipe_search_extends_a_winning_edge_admits_the_start_model_and_goes_on_from_the_chosen_prefix(
        stage1_work, tmp_path):
    """The monotone arm on a grid of small rates: its upper edge wins, so a value half a decade above is added
    (one extension allowed: still on the edge, and said so). The best two go on from their prefixes to the full
    budget; the winner's run is the arm, and ends where a run at that lr without a search ends. The baseline on 0 and a damaging rate: lr 0 wins, the arm
    is the pretrained model itself."""
    import torch
    from utils.model.modeling import load_model
    work, straight = tmp_path / "w", tmp_path / "s"
    for w in (work, straight):
        shutil.copytree(stage1_work, w)
    short = ["recovery_monotone.sweep_tokens=8192", "recovery_monotone.lr_grid_extensions=1",
             "recovery_monotone.schedule=wsd", "recovery_baseline.schedule=wsd"]
    sets = [a for kv in [*short, "recovery_monotone.lr_grid=1e-4,3e-4"] for a in ("--set", kv)]
    r = run_script("stage_3_train_monotonic", "--work-dir", str(work), *fast_sets(), *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    t = json.loads((work / "seed_42" / "results" / "training_monotonic.json").read_text())
    sw = t["lr_sweep"]
    assert [x["lr"] for x in sw["rows"]] == [1e-4, 3e-4, 1e-3] and sw["added"] == [1e-3]
    assert sw["chosen_lr"] == 1e-3 == t["recipe"]["lr"] and sw["chosen_on_edge"] and "STILL ON AN EDGE" in r.stdout
    assert sw["confirmed"] == [1e-3, 3e-4]          # the tiny recipe's lr_confirm=2: the best two at full length
    assert t["history"]["val_loss"] == sw["rows"][2]["full_val_loss"] < sw["rows"][1]["full_val_loss"]
    assert sw["rows"][0]["val_loss"] > sw["rows"][1]["val_loss"] > sw["rows"][2]["val_loss"]
    assert all(x["prefix_tokens"] == 8192 and x["cooldown_tokens"] == 2048 for x in sw["rows"])
    sets = [a for kv in [*short, "recovery_monotone.lr=1e-3"] for a in ("--set", kv)]
    assert run_script("stage_3_train_monotonic", "--work-dir", str(straight), *fast_sets(), *sets).returncode == 0
    u = json.loads((straight / "seed_42" / "results" / "training_monotonic.json").read_text())
    assert t["history"]["val_loss"] == pytest.approx(u["history"]["val_loss"], abs=1e-6)
    a, b = (load_model(w / "seed_42" / "models" / "monotonic").state_dict() for w in (work, straight))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5

    sets = [a for kv in [*short, "recovery_baseline.lr_grid=0,1e-2", "recovery_baseline.sweep_tokens=8192",
                         "recovery_baseline.lr_confirm=1"]          # (at full length 1e-2 beats the start)
            for a in ("--set", kv)]
    r = run_script("stage_2_train_baseline", "--work-dir", str(work), *fast_sets(), *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    sw = json.loads((work / "seed_42" / "results" / "training_baseline.json").read_text())["lr_sweep"]
    assert sw["chosen_lr"] == 0 and sw["start_is_best"] and sw["added"] == []        # 0 wins: nothing to extend
    assert "(the start model: no training)" in r.stdout
    got, want = (load_model(p).state_dict() for p in (work / "seed_42" / "models" / "baseline",
                                                     work / "shared" / "models" / "pretrained"))
    assert all(torch.equal(got[k], want[k]) for k in want)
