"""Where a run's files live, atomic writes, and stage completion flags.

WORK_DIR/shared/       built once for every seed (corpus, tokenizer, token files, tiny model)
WORK_DIR/seed_<S>/     results/ (each stage's JSON), models/ (saved models), flags/
WORK_DIR/final/        cross-seed aggregates
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]        # the repository: utils/run/run_files.py


class PipelineError(RuntimeError):
    """A stage cannot run (missing input, corrupt file); one line for the user."""


@dataclass(frozen=True)
class RunPaths:
    work_dir: Path
    seed: int

    @property
    def shared(self) -> Path:
        return self.work_dir / "shared"

    @property
    def seed_dir(self) -> Path:
        return self.work_dir / f"seed_{self.seed}"

    @property
    def results(self) -> Path:
        return self.seed_dir / "results"

    @property
    def models(self) -> Path:
        return self.seed_dir / "models"

    @property
    def final(self) -> Path:
        return self.work_dir / "final"

    def flag(self, stage: str, shared: bool = False) -> Path:
        return (self.shared if shared else self.seed_dir) / "flags" / f"{stage}.done"

    # What a run records about its own files is relative to the work dir, so a copied or
    # moved work dir uses its own files; things outside it (a local model, the HF cache) stay absolute.
    # Lexically first: a grid variant's links to shared files (utils/run/grid.py) stay inside it.
    def rel(self, path: Path) -> str:
        for p, work in ((_lexical(path), _lexical(self.work_dir)), (Path(path).resolve(), self.work_dir.resolve())):
            try:
                return str(p.relative_to(work))
            except ValueError:
                pass
        return str(Path(path).resolve())

    def resolve(self, recorded: str) -> Path:
        return self.work_dir / recorded          # an absolute `recorded` stays as it is


def _lexical(path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(path: Path) -> None:
    """Give a file or a directory tree the modes a plain open()/mkdir() would (0644/0755 under
    umask 022): tempfile's private 0600/0700 would hide results from the user's group."""
    mask = _umask()
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in items:
        if not item.is_symlink():
            os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~mask)


def publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or directory into place, readable as the umask allows."""
    share_modes(tmp)
    os.replace(tmp, final)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    publish(Path(tmp), path)


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise PipelineError(f"missing file {path}") from None
    except json.JSONDecodeError as e:
        raise PipelineError(f"corrupt JSON in {path}: {e}") from None


def atomic_dir(final: Path):
    """Context manager: build a directory under a temporary name, then swap it in."""
    class _Swap:
        def __enter__(self):
            final.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
            return self.tmp

        def __exit__(self, exc_type, exc, tb):
            if exc_type is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return False
            old = final.with_name(f".{final.name}.old")
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            publish(self.tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return False
    return _Swap()


@contextmanager
def stage_lock(path: Path, what: str):
    """One run of a stage and seed per work dir at a time (local or SLURM, same file system)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise PipelineError(f"{what} is already running on this work dir ({holder} holds {path}); "
                                f"wait for it or stop it") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def code_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# The code whose change can change a measurement. Saved measurements (utils.measurement.MeasuredOnce) are
# keyed by these files' contents, not by the git revision: a commit or a `git pull` that touches none of them
# (docs, results, training, SLURM) keeps every record.
MEASUREMENT_CODE = ("utils/attacks", "utils/measure", "utils/model", "utils/data/tokenization.py",
                    "utils/measurement.py", "utils/text_attacks.py", "utils/run/compute.py", "utils/run/distributed.py")


def source_digest(parts: tuple[str, ...] = MEASUREMENT_CODE, root: Path = ROOT) -> str:
    """sha256 (16 hex digits) over the Python files of `parts` under `root`: their paths and bytes."""
    h = hashlib.sha256()
    for part in parts:
        where = root / part
        for f in sorted(where.rglob("*.py")) if where.is_dir() else [where]:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def weights_digest(model_dir: Path) -> str:
    """sha256 (16 hex digits) over a model directory's safetensors files, names and bytes: what a measurement
    of it is keyed by, so that a moved or copied work dir reads the records of the same weights. Each file is
    hashed once per process (about 4 s per GB)."""
    h = hashlib.sha256()
    for f in sorted(Path(model_dir).resolve().glob("*.safetensors")):
        st = f.stat()
        h.update(f.name.encode() + b"\0" + _file_sha256(str(f), st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def set_aside(path: Path) -> Path | None:
    """Rename `path` to `<path>.set-aside-<UTC time>` (nothing is deleted); None if it does not exist."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target, n = path.with_name(f"{path.name}.set-aside-{stamp}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.set-aside-{stamp}-{n}")
    path.rename(target)
    return target


def output_problem(path: Path) -> str | None:
    """Why a recorded output is not whole, or None: missing, JSON that does not parse, safetensors
    whose header does not, a model directory without config.json or weights."""
    if not path.exists():
        return "missing"
    if path.is_dir():
        if not (path / "config.json").exists():
            return None
        weights = sorted(path.glob("*.safetensors"))
        problems = [output_problem(f) for f in [path / "config.json", *weights]]
        return next((f"{f.name}: {p}" for f, p in zip([path / "config.json", *weights], problems) if p),
                    None if weights else "no *.safetensors weights")
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":      # 8-byte little-endian header length, then a JSON header
            with path.open("rb") as f:
                length = int.from_bytes(f.read(8), "little")
                if length > 100_000_000:           # the format's own limit: a corrupt length, not a header
                    return "does not parse"
                json.loads(f.read(length))
    except (OSError, ValueError, MemoryError):
        return "does not parse"
    return None


def flag_problem(path: Path, fingerprint: str, paths: RunPaths) -> str | None:
    """Why the completion flag at `path` does not say "done" for this config, or None if it does:
    the flag must exist, match the fingerprint, and every output it lists must still be whole."""
    if not path.exists():
        return "not run"
    try:
        flag = json.loads(path.read_text())
    except json.JSONDecodeError:
        return "corrupt completion flag"
    if flag.get("fingerprint") != fingerprint:
        return "run with another config"
    for recorded in flag.get("outputs", []):
        problem = output_problem(paths.resolve(recorded))
        if problem:
            return f"its output {recorded} is not whole ({problem})"
    return None


def flag_matches(path: Path, fingerprint: str, paths: RunPaths) -> bool:
    return flag_problem(path, fingerprint, paths) is None


def write_flag(path: Path, fingerprint: str, outputs: list[str], paths: RunPaths) -> None:
    """Written last, only when the stage's outputs are whole (recorded relative to the work dir)."""
    missing = [o for o in outputs if not Path(o).exists()]
    if missing:
        raise PipelineError(f"refusing to mark {path.stem} done: missing outputs {missing}")
    write_json(path, {"fingerprint": fingerprint, "outputs": [paths.rel(o) for o in outputs],
                      "code_revision": code_revision()})
