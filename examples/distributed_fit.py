"""Fit a monitor with the holdout's attacks sharded over processes (torch.distributed).

    torchrun --nproc_per_node=2 examples/distributed_fit.py --out runs/dist
    python examples/distributed_fit.py --out runs/single      # one process, same result

Each rank attacks every world_size-th sample, the margins are gathered on every
rank, and every rank ends with the same fitted monitor; rank 0 writes the files.
On GPUs the NCCL backend is used, one GPU per rank; on CPUs gloo.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist

import brittle
from brittle.digits import ROBUST_EPS, digits_model, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="directory for report.json and monitor.pt"
    )
    parser.add_argument("--samples", type=int, default=400, help="holdout samples to attack")
    parser.add_argument("--steps", type=int, default=30, help="FAB steps per restart")
    args = parser.parse_args()

    launched = "RANK" in os.environ  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, ...
    if launched:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    rank = dist.get_rank() if launched else 0
    device = (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    )

    # Every rank reads the same holdout in the same order; fit() shards the attacks.
    model = digits_model("robust").to(device)
    holdout = load_digits_split().x_holdout[: args.samples]
    monitor = brittle.wrap(model, eps=ROBUST_EPS).fit(holdout, steps=args.steps, progress=rank == 0)

    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        monitor.report.to_json(args.out / "report.json")
        monitor.save(args.out / "monitor.pt")
        print(monitor.report)
        print(f"wrote {args.out / 'report.json'}")
    if launched:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
