"""brittle's FAB engine against torchattacks' FAB: same model, same samples, one run.

For each model both engines attack the same samples with the same settings
through :func:`brittle.attacks.attack.attack_batch`; the table gives wall time, the
speedup (wall clock, and CPU time of this process, which is steadier when
other jobs share the CPU), the share of samples each engine broke, the median
and 95th percentile of (brittle margin / torchattacks margin) over samples both
broke, and how many of those brittle finds more than 5 % larger.

Models: the PGD-trained digits CNN (10 classes); the same network with a
100-class head (digit x 10 + a k-means sub-cluster of the digit, trained in
seconds); a CIFAR-shaped torchvision ResNet-18 with random weights (timing).
With ``--device cuda`` also ResNet-18 at 100 classes and at 1000 classes
(64x64 inputs), random weights (timing).

Run: ``python benchmarks/bench_fab.py [--norm Linf] [--device cpu|cuda] [--quick]``
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
from models import (  # beside this script
    add_device_arguments,
    gpu_precision,
    hundred_class_digits,
    resnet18,
)
from torch import Tensor, nn

from brittle.attacks.attack import AttackSettings, attack_batch
from brittle.digits import digits_model, load_digits_split


def _robust_digits() -> tuple[nn.Module, Tensor]:
    return digits_model("robust"), load_digits_split().x_holdout


def _compare(
    model: nn.Module, x: Tensor, warmup: Tensor, settings: AttackSettings, repeats: int
) -> dict[str, float]:
    with torch.no_grad():
        pred, warmup_pred = model(x).argmax(dim=1), model(warmup).argmax(dim=1)
    engines = ("torchattacks", "brittle")
    for engine in engines:
        # Other samples first, so one-time library set-up is not billed to either engine.
        attack_batch(model, warmup, warmup_pred, AttackSettings(settings.norm, steps=2), engine)
    times: dict[str, list[float]] = {engine: [] for engine in engines}
    cpu: dict[str, list[float]] = {engine: [] for engine in engines}
    margins: dict[str, Tensor] = {}
    for _ in range(repeats):  # interleaved, so a burst of load hits both engines alike
        for engine in engines:
            start, start_cpu = time.perf_counter(), time.process_time()
            margins[engine] = attack_batch(model, x, pred, settings, engine=engine).cpu()
            if x.device.type == "cuda":
                torch.cuda.synchronize()
            times[engine].append(time.perf_counter() - start)
            cpu[engine].append(time.process_time() - start_cpu)
    wall = {engine: statistics.median(values) for engine, values in times.items()}
    cpu_s = {engine: statistics.median(values) for engine, values in cpu.items()}
    ours, ref = margins["brittle"], margins["torchattacks"]
    both = torch.isfinite(ours) & torch.isfinite(ref)
    ratio = ours[both] / ref[both] if both.any() else torch.tensor([math.nan])
    return {
        "n": len(x),
        "ta_s": wall["torchattacks"],
        "br_s": wall["brittle"],
        "speedup": wall["torchattacks"] / wall["brittle"],
        "cpu_speedup": cpu_s["torchattacks"] / cpu_s["brittle"],
        "ta_broke": float(torch.isfinite(ref).float().mean()),
        "br_broke": float(torch.isfinite(ours).float().mean()),
        "median": float(ratio.median()),
        "p95": float(ratio.quantile(0.95)),
        "worse5": int((ratio > 1.05).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--norm", default="Linf", choices=["Linf", "L2", "L1"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--n10", type=int, default=128, help="samples, 10-class digits CNN")
    parser.add_argument("--n100", type=int, default=32, help="samples, 100-class digits CNN")
    parser.add_argument("--nresnet", type=int, default=8, help="samples, ResNet-18")
    parser.add_argument("--resnet-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs; medians shown")
    parser.add_argument("--threads", type=int, default=None, help="PyTorch CPU threads")
    add_device_arguments(parser)
    parser.add_argument(
        "--quick", action="store_true", help="a quarter of the samples, half the ResNet steps"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is available on this machine")
    if args.quick:
        args.n10, args.n100 = max(8, args.n10 // 4), max(8, args.n100 // 4)
        args.nresnet, args.resnet_steps = max(4, args.nresnet // 2), max(5, args.resnet_steps // 2)
    nresnet = args.nresnet * (4 if cuda else 1)

    settings = AttackSettings(norm=args.norm, steps=args.steps)
    resnet = AttackSettings(norm=args.norm, steps=args.resnet_steps)
    cases: list[tuple[str, Callable[[], tuple[nn.Module, Tensor]], int, AttackSettings]] = [
        ("digits CNN, PGD, 10 classes", _robust_digits, args.n10, settings),
        ("digits CNN, 100 classes", hundred_class_digits, args.n100, settings),
        ("ResNet-18 32x32, random", partial(resnet18, 10, 32, nresnet + 8), nresnet, resnet),
    ]
    if cuda:  # torchattacks takes one backward pass per class and step: GPU only
        cases += [
            ("ResNet-18 32x32, 100 cl.", partial(resnet18, 100, 32, nresnet + 8), nresnet, resnet),
            (
                "ResNet-18 64x64, 1000 cl.",
                partial(resnet18, 1000, 64, nresnet + 8),
                max(4, nresnet // 2),
                resnet,
            ),
        ]
    header = (
        f"{'model':<28} {'n':>4} {'steps':>5} {'torchattacks':>12} {'brittle':>8} "
        f"{'speedup':>7} {'cpu':>5} {'broke ta/br':>11} {'ratio med':>9} {'p95':>6} "
        f"{'>5%':>4}"
    )
    precision = gpu_precision(args.tf32) if cuda else "float32"
    print(
        f"norm={args.norm} device={args.device} ({precision}) threads={torch.get_num_threads()} "
        f"repeats={args.repeats} (times: medians)"
    )
    print(header)
    print("-" * len(header))
    for name, build, n, case_settings in cases:
        model, x = build()
        # The warm-up samples are the last 8, never among the timed ones.
        warmup, x = x[-8:].to(args.device), x[: min(n, len(x) - 8)].to(args.device)
        row = _compare(model.to(args.device), x, warmup, case_settings, args.repeats)
        print(
            f"{name:<28} {row['n']:>4} {case_settings.steps:>5} {row['ta_s']:>11.1f}s "
            f"{row['br_s']:>7.1f}s {row['speedup']:>6.1f}x {row['cpu_speedup']:>4.1f}x "
            f"{row['ta_broke']:>5.0%}/{row['br_broke']:<5.0%} {row['median']:>9.4f} "
            f"{row['p95']:>6.3f} {row['worse5']:>4}",
            flush=True,
        )


if __name__ == "__main__":
    main()
