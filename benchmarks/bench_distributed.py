"""Scaling of input-margin estimation with 1 and 2 processes (torch.distributed, gloo).

Same model, same samples: one process using every core, then N processes with
cores / N threads each, all attacking their shard of the holdout. Prints wall
times, the speedup and whether the margins agree.

    python benchmarks/bench_distributed.py [--n 400] [--steps 30] [--engine torchattacks]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import brittle
from brittle.digits import digits_cnn, digits_model, load_digits_split


def _worker(rank: int, world: int, tmp: str, steps: int, engine: str) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=world)
    model = digits_cnn()
    model.load_state_dict(torch.load(f"{tmp}/model.pt", weights_only=True))
    x = torch.load(f"{tmp}/x.pt", weights_only=True)
    dist.barrier()
    start = time.perf_counter()
    margins = brittle.input_margins(model.eval(), x, steps=steps, engine=engine)
    dist.barrier()
    if rank == 0:
        torch.save({"seconds": time.perf_counter() - start, "margins": margins}, f"{tmp}/result.pt")
    dist.destroy_process_group()


def run(world: int, steps: int, engine: str, tmp: str) -> tuple[float, torch.Tensor]:
    if world == 1:
        model = digits_cnn()
        model.load_state_dict(torch.load(f"{tmp}/model.pt", weights_only=True))
        x = torch.load(f"{tmp}/x.pt", weights_only=True)
        torch.set_num_threads(os.cpu_count() or 1)
        start = time.perf_counter()
        margins = brittle.input_margins(model.eval(), x, steps=steps, engine=engine)
        return time.perf_counter() - start, margins
    if os.path.exists(f"{tmp}/pg"):
        os.remove(f"{tmp}/pg")
    mp.spawn(_worker, args=(world, tmp, steps, engine), nprocs=world, join=True)
    result = torch.load(f"{tmp}/result.pt", weights_only=True)
    return result["seconds"], result["margins"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--engine", default="torchattacks")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(digits_model("robust").state_dict(), f"{tmp}/model.pt")
        torch.save(load_digits_split().x_holdout[: args.n], f"{tmp}/x.pt")
        print(
            f"input margins, PGD-trained digits CNN, n={args.n}, steps={args.steps}, "
            f"engine={args.engine}, {os.cpu_count()} CPU cores"
        )
        print(f"{'processes':>9} {'seconds':>8} {'speedup':>8} {'max rel. diff':>14}")
        base_time, base = run(1, args.steps, args.engine, tmp)
        print(f"{1:>9} {base_time:8.1f} {1.0:8.2f} {0.0:14.2e}")
        for world in args.worlds:
            if world == 1:
                continue
            seconds, margins = run(world, args.steps, args.engine, tmp)
            finite = torch.isfinite(base)
            diff = ((margins[finite] - base[finite]).abs() / base[finite]).max().item()
            print(f"{world:>9} {seconds:8.1f} {base_time / seconds:8.2f} {diff:14.2e}")


if __name__ == "__main__":
    main()
