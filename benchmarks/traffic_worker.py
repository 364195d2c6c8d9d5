"""One launch of benchmarks/traffic.py: runs the trainer on each config of a list (one
process group, one after another), counts the collectives of every step
(benchmarks/collectives.py) and writes <first output.dir>/traffic-rank<R>.json: per config,
each step's records and the adapters kept at the prune event.

    python -m torch.distributed.run --nproc_per_node 4 benchmarks/traffic_worker.py specs.json
"""

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.collectives import CollectiveLog
from benchmarks.harness import exit_now, random_batches
from wlora_dist.config import config_from_dict
from wlora_dist.distributed.env import init_distributed, shutdown
from wlora_dist.training.tracking import setup_logging
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
    specs = json.loads(Path(sys.argv[1]).read_text())
    env = init_distributed(specs[0]["cfg"]["distributed"].get("timeout_minutes", 10))
    setup_logging(env.is_main)
    done = [measure(spec, env) for spec in specs]
    out = Path(specs[0]["cfg"]["output"]["dir"]) / f"traffic-rank{env.global_rank}.json"
    out.write_text(json.dumps([record for record, _ in done]))
    shutdown()
    exit_now(done)  # the trainers outlive the group: see tests/dist_worker.py


if __name__ == "__main__":
    main()
