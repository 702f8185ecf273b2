"""Everything stage 0 fetches: models and dataset files from the Hugging Face hub
(or its local cache), and local model directories; each with what the manifest records.

Online, a revision is resolved to its commit sha first and everything is
downloaded at that sha into the standard Hugging Face cache (HF_HOME /
HF_HUB_CACHE), so compute nodes and copies of the cache read the same bytes.
With HF_HUB_OFFLINE=1 nothing touches the network: files come from the cache
(fetched elsewhere and copied) and the sha is the cached snapshot's. Every hub
failure becomes one PipelineError line that names the cause and the fix.
"""
from __future__ import annotations

import errno
import hashlib
from contextlib import contextmanager
from pathlib import Path

from configs.experiment_config import SPLITS, DataConfig, ModelConfig
from utils.run.run_files import PipelineError

MODEL_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]   # configs, weights, tokenizer files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")

FIX_ONLINE = ("run stage 0 where the hub is reachable (a login node), or copy a Hugging Face cache that holds "
              "the files and set HF_HUB_OFFLINE=1, or use local files (model.source=local, data.source=jsonl.zst)")


def offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def hub_errors(what: str):
    """Turn whatever the hub client raises into one line for the user."""
    from huggingface_hub import errors as e
    try:
        yield
    except PipelineError:
        raise
    except e.GatedRepoError:
        raise PipelineError(f"{what}: access is gated or unauthorised; accept its terms on the hub and log in "
                            f"(`hf auth login` or HF_TOKEN), then rerun") from None
    except e.RepositoryNotFoundError:
        raise PipelineError(f"{what}: repository not found on the hub (check the id; a private repository "
                            f"needs `hf auth login` or HF_TOKEN)") from None
    except e.RevisionNotFoundError:
        raise PipelineError(f"{what}: revision not found on the hub (check model.revision / data.revision)") from None
    except (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled):
        where = "HF_HUB_OFFLINE=1 and it is" if offline() else "the hub is unreachable and it is"
        raise PipelineError(f"{what}: {where} not in the local Hugging Face cache; {FIX_ONLINE}") from None
    except e.RemoteEntryNotFoundError:
        raise PipelineError(f"{what}: file not found in the repository (check data.*_file)") from None
    except e.HfHubHTTPError as err:
        raise PipelineError(f"{what}: the hub answered {str(err).splitlines()[0]}") from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise                                   # disk full: reported by utils.run.cli for every stage
        raise PipelineError(f"{what}: {type(err).__name__}: {err}; {FIX_ONLINE}") from None
    except Exception as err:                        # the HTTP client's own errors (no network, timeouts)
        if type(err).__module__.split(".")[0].startswith("httpx") or isinstance(err, (ConnectionError, TimeoutError)):
            raise PipelineError(f"{what}: cannot reach the hub ({type(err).__name__}: {err}); {FIX_ONLINE}") from None
        raise


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_hashes(directory: Path) -> dict:
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}


def check_model_dir(path: Path) -> None:
    """A loadable Hugging Face model directory with safetensors weights and a tokenizer."""
    if not path.is_dir():
        raise PipelineError(f"model directory not found: {path}")
    missing = [n for n, ok in (("config.json", (path / "config.json").is_file()),
                               ("*.safetensors weights", any(path.glob("*.safetensors"))),
                               ("tokenizer files", any((path / f).is_file() for f in TOKENIZER_FILES)))
               if not ok]
    if missing:
        raise PipelineError(f"{path} is not a usable model directory: missing {', '.join(missing)} "
                            f"(pickled .bin weights are never loaded)")


def fetch_model(m: ModelConfig) -> dict:
    """Model config, tokenizer and safetensors weights: their directory and provenance."""
    if m.source == "local":
        path = Path(m.path).expanduser().resolve()
        check_model_dir(path)
        return {"source": "local", "path": str(path), "files": _file_hashes(path)}
    from huggingface_hub import HfApi, snapshot_download
    what = f"model {m.hub_id}@{m.revision}"
    with hub_errors(what):
        if offline():
            path = Path(snapshot_download(m.hub_id, revision=m.revision, allow_patterns=MODEL_PATTERNS,
                                          local_files_only=True))
            sha = path.name                        # cache layout: snapshots/<commit sha>/
        else:
            info = HfApi().model_info(m.hub_id, revision=m.revision, files_metadata=True)
            if not any(s.rfilename.endswith(".safetensors") for s in info.siblings):
                raise PipelineError(f"{what} has no safetensors weights; refusing pickle files")
            sha = info.sha
            path = Path(snapshot_download(m.hub_id, revision=sha, allow_patterns=MODEL_PATTERNS))
    check_model_dir(path)
    return {"source": "hub", "hub_id": m.hub_id, "revision": m.revision, "sha": sha, "offline": offline(),
            "path": str(path), "files": _file_hashes(path)}


def fetch_dataset(d: DataConfig) -> dict:
    """The split files of a hub dataset in the local cache, pinned to one commit."""
    from huggingface_hub import HfApi, hf_hub_download
    what = f"dataset {d.hub_id}@{d.revision}"
    files = {s: getattr(d, f"{s}_file") for s in SPLITS}
    with hub_errors(what):
        sha = None if offline() else HfApi().dataset_info(d.hub_id, revision=d.revision).sha
        paths = {}
        for split, name in files.items():
            print(f"[setup] {'cached' if offline() else 'fetching'} {d.hub_id}/{name}")
            paths[split] = hf_hub_download(d.hub_id, name, repo_type="dataset", revision=sha or d.revision,
                                           local_files_only=offline())
    # Cache layout: .../snapshots/<commit sha>/<file path>; one commit for every split.
    shas = {Path(p).parents[len(Path(files[s]).parts) - 1].name for s, p in paths.items()}
    if len(shas) != 1:
        raise PipelineError(f"{what}: the cached split files come from different commits {sorted(shas)}; "
                            f"pin data.revision to one of them")
    return {"hub_id": d.hub_id, "revision": d.revision, "sha": shas.pop(), "offline": offline(),
            "files": files, "paths": paths}
