"""What the monitor costs on a GPU: ResNet-50, batch 256, eager and compiled.

The bare torchvision ResNet-50 (random weights, 1000 classes, 224x224 inputs)
against the wrapped monitor (``score="logit"`` and ``score="feature"``, the exact
feature margin), each eager and under ``torch.compile`` (the monitor with
``fullgraph=True``: no graph break on its forward path). Inference mode, float32
with TF32 matrix products allowed, channels-last, as a server would run it.

Timing: CUDA events around each call, variants interleaved (A B C ... A B C) so a
slow phase of the GPU hits each alike; the medians of ``--repeats`` calls are
reported with the overhead against the bare model in the same mode. A monitor
whose forward synchronised with the host would show it here as idle gaps.

Run: python benchmarks/bench_overhead_gpu.py [--batch 256] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torchvision.models import resnet50

import brittle


def _time(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds per call of each function on the GPU, calls interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in times.items()}


def _monitor(model: nn.Module, score: str, example: Tensor) -> nn.Module:
    monitor = brittle.wrap(model, score=score, eps=0.01)
    monitor.set_threshold(0.0)
    with torch.inference_mode():
        monitor(example[:2])  # finds the head and builds the pair-norm table
    return monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_overhead_gpu.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = resnet50(num_classes=1000).eval().to(device, memory_format=torch.channels_last)
    x = torch.rand(args.batch, 3, 224, 224, device=device).contiguous(
        memory_format=torch.channels_last
    )
    eager: dict[str, nn.Module] = {
        "bare": model,
        "logit": _monitor(model, "logit", x),
        "feature": _monitor(model, "feature", x),
    }
    modes: dict[str, dict[str, nn.Module]] = {"eager": eager}
    if not args.no_compile:
        modes["compiled"] = {
            "bare": torch.compile(model),
            "logit": torch.compile(eager["logit"], fullgraph=True),
            "feature": torch.compile(eager["feature"], fullgraph=True),
        }
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, ResNet-50, "
        f"batch {args.batch}, 224x224, float32 (TF32), channels-last; "
        f"medians of {args.repeats} interleaved calls"
    )
    print("| mode | variant | ms per batch | images/s | overhead vs bare |")
    print("|---|---|---|---|---|")
    for mode, modules in modes.items():

        def call(module: nn.Module) -> Callable[[], object]:
            def run() -> object:
                with torch.inference_mode():
                    return module(x)

            return run

        fns = {name: call(module) for name, module in modules.items()}
        medians = _time(fns, args.repeats, args.warmup)
        bare = medians["bare"]
        for name, ms in medians.items():
            overhead = "-" if name == "bare" else f"{100 * (ms / bare - 1):+.2f} %"
            print(f"| {mode} | {name} | {ms:.2f} | {args.batch / ms * 1e3:.0f} | {overhead} |")


if __name__ == "__main__":
    main()
