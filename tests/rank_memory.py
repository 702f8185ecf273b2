"""Run under torchrun by tests/test_distributed.py: how much host memory each rank needs to get its
shard of a saved model (utils.model.modeling.empty_model + utils.run.distributed.shard_from_main,
what stages 2-3 do), and whether the shards hold the saved weights.

    torchrun --nproc_per_node 2 tests/rank_memory.py MODEL_DIR OUT_DIR

Each rank writes OUT_DIR/rank<r>.json: the growth of its peak resident memory (VmHWM, reset
after start-up through /proc/self/clear_refs) while it builds, shards and fills the model, and
whether the whole model gathered back equals the saved weights.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import utils  # noqa: E402,F401
from utils.model.modeling import empty_model, load_model  # noqa: E402
from utils.run import distributed  # noqa: E402


def status_kib(field: str) -> int:
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field + ":"))
    return int(line.split()[1])


def main():
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    distributed.init("cpu")
    device = torch.device("cpu")
    empty_model(model_dir)                      # imports (accelerate, the model code) before measuring
    distributed.barrier()
    Path("/proc/self/clear_refs").write_text("5")          # the peak restarts from the current size
    start = status_kib("VmRSS")
    whole = load_model(model_dir).state_dict() if distributed.is_main() else None
    model = distributed.shard_from_main(empty_model(model_dir), whole, device)
    grown = status_kib("VmHWM") - start
    whole = load_model(model_dir) if distributed.is_main() else None
    if whole is not None:
        with torch.no_grad():
            for p in whole.parameters():
                p.zero_()                               # so only the gather can fill it
    distributed.gather_into(model, whole)
    same = None
    if distributed.is_main():
        saved, gathered = load_model(model_dir).state_dict(), whole.state_dict()
        same = gathered.keys() == saved.keys() and all(torch.equal(gathered[k], saved[k]) for k in saved)
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps({"peak_growth_kib": grown, "equal": same}))
    distributed.destroy()


if __name__ == "__main__":
    main()
