"""One launch of benchmarks/traffic.py: runs the trainer on each config of a list (one
process group, one after another), counts the collectives of every step
(benchmarks/collectives.py) and writes <first output.dir>/traffic-rank<R>.json: per config,
each step's records and the adapters kept at the prune event.

    python -m torch.distributed.run --nproc_per_node 4 benchmarks/traffic_worker.py specs.json
"""

import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.collectives import CollectiveLog
from benchmarks.harness import random_batches, run_specs
from wlora_dist.config import config_from_dict
from wlora_dist.training.trainer import Trainer


def measure(spec: dict, env) -> tuple[dict, Trainer]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    cfg = config_from_dict(spec["cfg"])
    trainer = Trainer(cfg, env)
    trainer.setup(batches=random_batches(spec["vocab"], cfg.train.micro_batch_size, cfg.data.seq_len, env.global_rank))
    trainer.backend.module.train()
    steps = {}
    for step in range(1, cfg.train.max_steps + 1):
        with CollectiveLog() as log:
            trainer.train_step(step)
        if step in spec["measure"]:
            steps[str(step)] = [asdict(r) for r in log.records]
    kept = [(s.layer, s.kind) for s in trainer.wl.kept_sites() if s.layer is not None]
    seconds = time.perf_counter() - start
    return {"tag": spec["tag"], "steps": steps, "kept": kept, "seconds": seconds}, trainer


def main() -> None:
    run_specs(measure, "traffic")


if __name__ == "__main__":
    main()
