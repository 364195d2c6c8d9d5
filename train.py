"""Entry point for launchers: `accelerate launch train.py --config configs/tiny_cpu.yaml`,
`torchrun --nproc_per_node 2 train.py --config ...`, or `python train.py --config ...`."""

import sys

from wlora_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
