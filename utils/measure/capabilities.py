"""What the models can still do: zero-shot tasks through lm-evaluation-harness.

Every arm is evaluated with lm-eval's own HFLM wrapper around the loaded model
(the harness's tokenisation, batching and metrics, with standard errors); the
per-example correctness is kept so stage 7 can pair baseline and monotone on
the same examples. The pythia presets use the harness's standard tasks (their
datasets cached by stage 0 where the hub is reachable). Two offline tasks are
built by stage 0 from the held-out test split whenever eval.tasks names them
(the tiny preset's default), as lm-eval task configs over local JSON files:
  heldout_lastword  LAMBADA-style: a passage without its last word; the word must
                    be the greedy continuation (acc) and is scored (perplexity)
  heldout_cloze     the same passages, the true last word among 4 choices (3 words
                    of similar length from other passages): acc, chance 0.25
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from configs.experiment_config import HELDOUT_TASKS
from utils.run import distributed
from utils.run.compute import Compute
from utils.run.run_files import PipelineError
_WORD = re.compile(r"[A-Za-z]{3,}")

_LASTWORD_YAML = """task: heldout_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_CLOZE_YAML = """task: heldout_cloze
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


PASSAGE_WORDS = (24, 40, 64)      # each test document gives up to three passages, cut after these words
MIN_EXAMPLES = 20


def task_names(tasks: str) -> list[str]:
    """eval.tasks as a list (comma-separated names; empty: none)."""
    return [t.strip() for t in tasks.split(",") if t.strip()]


def _passage(text: str, max_words: int) -> tuple[str, str] | None:
    """(context, last word) of the first `max_words` words of a text, if it has that many and the
    last is a plain word."""
    words = text.split()
    if len(words) < max_words or not _WORD.fullmatch(words[max_words - 1].rstrip(".,;:")):
        return None
    return " ".join(words[:max_words - 1]), words[max_words - 1].rstrip(".,;:")


def build_heldout_tasks(test_texts: list[str], out_dir: Path, seed: int = 0) -> dict:
    """Write the held-out tasks' data (jsonl) and lm-eval configs (yaml) from test documents."""
    rng = np.random.default_rng(seed)
    passages = [p for t in test_texts for n in PASSAGE_WORDS if (p := _passage(t, n))]
    if len(passages) < MIN_EXAMPLES:
        print(f"[setup] held-out tasks not built: the test split gives {len(passages)} passages "
              f"(< {MIN_EXAMPLES})")
        return {"tasks": [], "examples": len(passages)}
    pool = sorted({w for _, w in passages})
    out_dir.mkdir(parents=True, exist_ok=True)
    lastword, cloze = [], []
    for context, word in passages:
        lastword.append({"context": context, "target": word})
        others = [w for w in pool if w != word and abs(len(w) - len(word)) <= 2]
        if len(others) < 3:
            others = [w for w in pool if w != word]
        distractors = list(rng.choice(others, size=3, replace=False))
        label = int(rng.integers(0, 4))
        choices = distractors[:label] + [word] + distractors[label:]
        cloze.append({"context": context, "choices": choices, "label": label})   # lm-eval adds the " " before a choice
    for name, rows in (("heldout_lastword", lastword), ("heldout_cloze", cloze)):
        (out_dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"tasks": list(HELDOUT_TASKS), "examples": len(passages)}


def cache_task_datasets(tasks: list[str]) -> dict:
    """Stage 0: put the datasets of lm-eval's standard tasks in the Hugging Face cache, so that stage 4 on a
    compute node (the jobs run with HF_HUB_OFFLINE=1) evaluates them offline. Offline here too, it loads
    each from the cache instead: a task whose dataset is missing is one error line now, not in stage 4
    after all the training."""
    import os

    from lm_eval.tasks import TaskManager, get_task_dict
    hub_tasks = [t for t in tasks if t not in HELDOUT_TASKS]
    if not hub_tasks:
        return {"cached": []}
    offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
    try:
        get_task_dict(hub_tasks, TaskManager())
    except Exception as e:   # the harness raises whatever its dataset loader raises
        cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
        if offline:
            raise PipelineError(f"the lm-eval task datasets {', '.join(hub_tasks)} are not all in the local Hugging Face "
                                f"cache ({cause}); fill it where the hub is reachable (docs/cluster.md, 'Offline "
                                f"cache') or choose others with --set eval.tasks=...") from None
        raise PipelineError(f"cannot fetch the lm-eval task datasets {', '.join(hub_tasks)} ({cause})") from None
    return {"cached": hub_tasks, "offline": offline}


def write_task_configs(data_dir: Path, config_dir: Path) -> list[Path]:
    """lm-eval task configs for the held-out tasks whose data stage 0 wrote (absolute paths, written
    where they are used, so a work dir can move); returns the files written."""
    config_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, template in (("heldout_lastword", _LASTWORD_YAML), ("heldout_cloze", _CLOZE_YAML)):
        data = Path(data_dir) / f"{name}.jsonl"
        if data.exists():
            written.append(config_dir / f"{name}.yaml")
            written[-1].write_text(template.format(data=data.resolve()))
    return written


@contextmanager
def lm_eval_logging_to(log_file: Path):
    """lm-eval's own messages ("Truncating ...", its notes on a model passed as an object) go to
    `log_file`, appended, not to the console."""
    from lm_eval.utils import setup_logging
    setup_logging("INFO")                    # lm-eval adds its console handler once, here, not later
    logger = logging.getLogger("lm_eval")
    saved = logger.handlers[:], logger.level, logger.propagate
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(name)s] %(message)s"))
    logger.handlers, logger.propagate = [handler], False
    try:
        yield
    finally:
        handler.close()
        logger.handlers, logger.level, logger.propagate = saved


def evaluate_capabilities(model, tokenizer, tasks: list[str], data_dir: Path, batch_size: int,
                          max_length: int, limit: int, compute: Compute, log_file: Path) -> dict:
    """lm-eval on one loaded model: metrics with standard errors and per-example correctness
    (lm-eval's messages go to `log_file`). Under torchrun collective: every rank evaluates its share of
    each task's documents; the results are on rank 0 ({} on the others).

    The harness computes in the stage's precision (bf16 autocast on CUDA by default, as every other
    measurement; fp32 on CPU) through its own `mixed_precision_dtype`, which wraps each of its
    forwards in torch.autocast (and turns off any autocast around it), and with the model's KV
    cache off: its log-likelihood forwards call model(inputs) and would otherwise fill a cache of
    every layer they never read."""
    saved = model.config.use_cache
    model.config.use_cache = False
    try:
        with lm_eval_logging_to(log_file):
            return _evaluate(model, tokenizer, tasks, data_dir, batch_size, max_length, limit, compute)
    finally:
        model.config.use_cache = saved


_GAP = object()


def _in_document_order(parts: list):
    """The ranks' per-document lists (rank r holds documents r, r+N, r+2N, ...: lm-eval's Task.doc_iterator)
    merged round-robin, so they are in document order as one process lists them (the harness's bootstrap
    resamples by position). Dicts are merged key by key."""
    if isinstance(parts[0], dict):
        keys = dict.fromkeys(k for p in parts for k in p)
        return type(parts[0])({k: _in_document_order([p.get(k, []) for p in parts]) for k in keys})
    return [x for row in itertools.zip_longest(*parts, fillvalue=_GAP) for x in row if x is not _GAP]


def _harness_model(model, tokenizer, batch_size, max_length, compute: Compute):
    """lm-eval's HFLM around the loaded model. Under torchrun it is data-parallel: the harness deals each task's
    documents to the ranks (padding every rank to the same number of requests) and gathers the per-document
    results on rank 0, through the rank, world size and collectives its LM interface leaves to a backend
    (here torch.distributed, the stage's own process group); gathered in document order, rank 0 computes
    what one process computes. Balanced whatever the tasks' sizes (HellaSwag is 57% of the standard tasks'
    requests), where dealing whole tasks to ranks was not."""
    import torch
    from lm_eval.models.huggingface import HFLM

    class DataParallelHFLM(HFLM):
        def all_gather(self, tensor):
            if self.world_size <= 1:
                return tensor
            one = tensor.reshape(1) if tensor.ndim == 0 else tensor.contiguous()
            parts = [torch.empty_like(one) for _ in range(self.world_size)]
            torch.distributed.all_gather(parts, one)
            return torch.cat(parts)

        def gather_object(self, obj, dst=0):
            parts = distributed.gather_objects(obj)
            return [_in_document_order(parts)] if self.rank == dst else None

        def barrier(self):
            distributed.barrier()

    lm = DataParallelHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                          device=str(compute.device),
                          mixed_precision_dtype=torch.bfloat16 if compute.precision == "bf16-mixed" else None)
    lm._rank, lm._world_size = distributed.rank(), distributed.world_size()
    return lm


def _evaluate(model, tokenizer, tasks, data_dir, batch_size, max_length, limit, compute: Compute) -> dict:
    import tempfile

    import lm_eval
    from lm_eval.tasks import TaskManager

    lm = _harness_model(model, tokenizer, batch_size, max_length, compute)
    with tempfile.TemporaryDirectory(prefix="lm_eval_tasks_") as configs:
        own = {p.stem for p in write_task_configs(data_dir, Path(configs))}
        # lm-eval indexes its ~14,700 built-in tasks for every TaskManager (4-11 s on 2 cores): only when a
        # task asked for is not one of the project's own.
        manager = TaskManager(include_path=configs, include_defaults=not set(tasks) <= own)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise PipelineError(f"eval.tasks: lm-eval knows no task {', '.join(unknown)}")
        # One task per call: lm-eval batches the requests of all tasks of a call together, and a task's
        # numbers should not depend on which others ran beside it. simple_evaluate returns results on rank 0
        # only, where LOCAL_RANK is 0 too (its tensor-parallel convention): the data-parallel rank decides.
        local_rank, result = os.environ.pop("LOCAL_RANK", None), {}
        # A limit below the number of ranks would leave a rank without documents, which lm-eval refuses: such a
        # task runs on rank 0 alone (a task run in full has thousands of documents; the held-out ones >= 20).
        ranks = lm.world_size
        alone = 0 < limit < ranks
        try:
            for task in tasks:
                if alone and lm.rank != 0:
                    continue
                lm._world_size = 1 if alone else ranks
                out = lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=0, limit=limit or None,
                                              log_samples=True, task_manager=manager, bootstrap_iters=1000,
                                              random_seed=0, verbosity="INFO")
                if out is None:                 # a rank other than 0: its documents went to rank 0
                    continue
                metrics = {k.split(",")[0]: v for k, v in out["results"][task].items()
                           if k != "alias" and isinstance(v, (int, float))}
                samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
                result[task] = {"metrics": metrics, "n": len(samples), "version": out["versions"].get(task),
                                "correct": [float(s["acc"]) for s in samples if "acc" in s]}
        except (OSError, ConnectionError, ValueError) as e:     # a task's dataset neither cached nor reachable
            raise PipelineError(f"lm-eval could not load the tasks {', '.join(tasks)} ({type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]}); run stage 0 where the hub is reachable to "
                                f"cache them, or choose others with --set eval.tasks=...") from None
        finally:
            lm._world_size = ranks
            if local_rank is not None:
                os.environ["LOCAL_RANK"] = local_rank
    return result
