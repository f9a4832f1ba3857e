"""onnxruntime vs PyTorch eager for a wrapped torchvision ResNet-18; the monitor's cost in ONNX.

For batch 1 (latency) and batch 64 (throughput) it times, interleaved (A B C ...,
medians reported, since the CPU is shared with other jobs):

- PyTorch eager: the bare model and the wrapped monitor;
- onnxruntime: the bare exported model and the exported monitors (logit margin and
  exact feature margin with its pair-norm table), served by ``brittle.OnnxMonitor``.

The monitor's cost in onnxruntime is its time over the bare exported model
(target <= 5 %). Default: 1000 classes at 224x224 (ImageNet's ResNet-18 head).

Run: python benchmarks/bench_onnx.py [--classes 1000] [--size 224] [--repeats 7]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from timing import interleaved  # benchmarks/timing.py, beside this script
from torchvision.models import resnet18

import brittle


def _eager(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    @torch.inference_mode()
    def run() -> object:
        return module(x)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    # One thread each for PyTorch and onnxruntime by default: equal footing, and
    # stable numbers on a CPU that other jobs share (see bench_overhead.py).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, folder: Path) -> None:
    """Export the models into ``folder`` and print the tables."""
    torch.set_num_threads(args.threads)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]

    torch.manual_seed(0)
    model = resnet18(num_classes=args.classes).eval()
    example = torch.rand(2, 3, args.size, args.size)
    monitors, served = {}, {}
    for kind in ("logit", "feature"):
        monitor = brittle.wrap(model, score=kind, eps=8 / 255, example_input=example)
        monitor.set_threshold(0.1)
        monitors[kind] = monitor
        path = monitor.export_onnx(folder / f"monitor-{kind}.onnx", example)
        served[kind] = brittle.OnnxMonitor(path, providers, session_options=options)
    bare_path = folder / "bare.onnx"
    torch.onnx.export(
        model,
        (example,),
        bare_path,
        dynamo=True,
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        verbose=False,
    )
    bare = ort.InferenceSession(str(bare_path), sess_options=options, providers=providers)

    print(
        f"torch {torch.__version__}, onnxruntime {ort.__version__} ({providers[0]}), "
        f"{args.threads} thread(s); ResNet-18, {args.classes} classes, {args.size}x{args.size}; "
        f"medians of {args.repeats} interleaved repeats\n"
    )
    print(
        "| batch | runtime | variant | CPU ms | wall ms | images per CPU-s "
        "| monitor cost vs bare, same runtime (CPU) |"
    )
    print("|---|---|---|---|---|---|---|")
    for batch, repeats in ((1, 5 * args.repeats), (64, args.repeats)):
        x = torch.rand(batch, 3, args.size, args.size)
        xn = x.numpy()
        with torch.inference_mode():
            expected = monitors["feature"](x)
        got = served["feature"](xn)
        np.testing.assert_allclose(got.logits, expected.logits.numpy(), rtol=1e-3, atol=1e-3)

        fns: dict[str, Callable[[], object]] = {
            "eager bare": _eager(model, x),
            "eager monitor logit": _eager(monitors["logit"], x),
            "eager monitor feature": _eager(monitors["feature"], x),
            "ort bare": partial(bare.run, None, {"input": xn}),
            "ort monitor logit": partial(served["logit"], xn),
            "ort monitor feature": partial(served["feature"], xn),
        }
        med = interleaved(fns, repeats)
        for name, (cpu, wall) in med.items():
            runtime, variant = name.split(" ", 1)
            ratio = cpu / med[f"{runtime} bare"][0] - 1.0
            cost = "-" if variant == "bare" else f"{100 * ratio:+.2f} %"
            label = "onnxruntime" if runtime == "ort" else "PyTorch eager"
            print(
                f"| {batch} | {label} | {variant} | {1e3 * cpu:.2f} | {1e3 * wall:.2f} | "
                f"{batch / cpu:.1f} | {cost} |",
                flush=True,
            )
        speedup = med["eager monitor feature"][0] / med["ort monitor feature"][0]
        print(
            f"| {batch} | | speed-up of onnxruntime over eager (monitor, feature) | | | | "
            f"{speedup:.2f}x |"
        )


if __name__ == "__main__":
    main()
