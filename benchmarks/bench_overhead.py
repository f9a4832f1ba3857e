"""What the monitor costs on top of the model's forward pass, and why the pair-norm table matters.

Part 1: a bare torchvision ResNet-18 forward against the wrapped monitor's forward
(logit margin, exact feature margin) at 10 classes (32x32 inputs) and 1000 classes
(160x160 inputs), batch 64, one thread. Targets: logit-margin overhead <= 1 %,
feature <= 1.5 % (the floor is a top-2 over the logits plus one read of the input).
A few percent of a forward pass is within the noise of a shared CPU, so the table
also shows the noise floor (bare against bare) and the monitor's own work timed
alone (the same monitor around the model's head on fixed features, minus the head),
which gives the overhead without the trunk's noise.

Part 2: the exact feature margin at K=1000 three ways: brittle's table gather
(``brittle.functional.feature_margin`` with ``pair_norms``), a vectorised pairwise
minimum over a (B, K, d) difference tensor, and a brute-force Python loop over class
pairs (timed on a few samples, interleaved with the other two, and scaled to the
batch). Targets: table >= 1000x faster
than the loop and >= 10x faster than the vectorised version.

Variants are interleaved (A B C A B C ...) and medians reported, because the CPU is
shared with other jobs and a slow phase should hit every variant alike.

Run: python benchmarks/bench_overhead.py [--repeats 9] [--batch 64]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from timing import interleaved  # benchmarks/timing.py, beside this script
from torch import Tensor, nn
from torchvision.models import resnet18

import brittle
import brittle.functional as BF
from brittle.scores.norms import Norm, dual_order


class _HeadOnly(nn.Module):
    """The model's own head on fixed features: every step of the monitor, no convolutions."""

    def __init__(self, fc: nn.Linear, features: Tensor) -> None:
        super().__init__()
        self.fc = fc
        self.register_buffer("features", features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features[: x.shape[0]])


def forward_overhead(num_classes: int, size: int, batch: int, repeats: int) -> list[str]:
    torch.manual_seed(0)
    model = resnet18(num_classes=num_classes).eval()
    x = torch.rand(batch, 3, size, size)
    captured: list[Tensor] = []
    handle = model.fc.register_forward_hook(lambda m, args, out: captured.append(args[0]))
    with torch.inference_mode():
        model(x)
    handle.remove()
    # A few percent of a 5-second forward pass is within the noise of a shared CPU,
    # so the monitor's own work (input check, zeroing, hook, margin, flag) is also
    # timed alone: the same monitor around the head on fixed features, minus the
    # head itself. That difference over the bare forward is the overhead.
    head_only = _HeadOnly(model.fc, captured[0].clone()).eval()
    variants: dict[str, Callable[[], object]] = {"bare": _timed(model, x)}
    for kind in ("logit", "feature"):
        for name, net in ((kind, model), (f"{kind} work", head_only)):
            monitor = brittle.wrap(net, score=kind, eps=8 / 255, head="fc", example_input=x[:2])
            monitor.set_threshold(0.1)
            variants[name] = _timed(monitor, x)
    variants["head alone"] = _timed(head_only, x)
    # "bare again" is the same call as "bare": their difference is the noise floor.
    variants["bare again"] = variants["bare"]
    med = {name: cpu for name, (cpu, _) in interleaved(variants, repeats).items()}
    noise = 100.0 * (med["bare again"] / med["bare"] - 1.0)
    rows = []
    for kind, target in (("logit", 1.0), ("feature", 1.5)):
        end_to_end = 100.0 * (med[kind] / med["bare"] - 1.0)
        work = med[f"{kind} work"] - med["head alone"]
        over = 100.0 * work / med["bare"]
        verdict = "ok" if over <= target else "over target"
        rows.append(
            f"| ResNet-18, {num_classes} classes, {size}x{size} | {kind} | "
            f"{1e3 * med['bare']:.1f} | {1e3 * med[kind]:.1f} | {end_to_end:+.2f} % | "
            f"{noise:+.2f} % | {1e3 * work:.2f} | {over:.2f} % | <= {target:g} % {verdict} |"
        )
    return rows


def _timed(module: nn.Module, x: Tensor) -> Callable[[], object]:
    @torch.inference_mode()
    def run() -> object:
        return module(x)

    return run


def vectorised_feature_margin(logits: Tensor, weight: Tensor, norm: Norm) -> Tensor:
    """The pairwise minimum without a table: a (B, K, d) tensor of weight differences."""
    pred = logits.argmax(dim=1)
    gaps = logits.gather(1, pred[:, None]) - logits
    diff = weight[pred][:, None, :] - weight[None, :, :]
    denom = torch.linalg.vector_norm(diff, ord=dual_order(norm), dim=2)
    ratio = gaps / denom.clamp_min(torch.finfo(denom.dtype).tiny)
    ratio = ratio.scatter(1, pred[:, None], torch.inf)
    return ratio.amin(dim=1)


def loop_feature_margin(logits: Tensor, weight: Tensor, norm: Norm) -> Tensor:
    """Brute force: one Python iteration per (sample, other class) pair."""
    q = dual_order(norm)
    out = []
    for z in logits:
        c = int(z.argmax())
        best = float("inf")
        for j in range(z.numel()):
            if j == c:
                continue
            dist = float(torch.linalg.vector_norm(weight[c] - weight[j], ord=q))
            best = min(best, float(z[c] - z[j]) / max(dist, 1e-38))
        out.append(best)
    return torch.tensor(out)


def feature_margin_speed(batch: int, repeats: int, loop_samples: int) -> list[str]:
    torch.manual_seed(0)
    k, d, norm = 1000, 512, "Linf"  # ResNet-18's head: 512 features, 1000 classes
    head = nn.Linear(d, k)
    weight = head.weight.detach()
    with torch.inference_mode():
        logits = head(torch.randn(batch, d))
        table = BF.pair_norm_table(weight, norm)

        def table_fn() -> Tensor:
            return BF.feature_margin(logits, weight, norm, pair_norms=table)

        def vector_fn() -> Tensor:
            return vectorised_feature_margin(logits, weight, norm)

        def loop_fn() -> Tensor:
            return loop_feature_margin(logits[:loop_samples], weight, norm)

        ref = table_fn()
        torch.testing.assert_close(vector_fn(), ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            loop_feature_margin(logits[:2], weight, norm), ref[:2], rtol=1e-4, atol=1e-6
        )
        # The loop is interleaved with the other two like every variant, and its
        # median scaled from its few samples to the batch.
        variants = {"table": table_fn, "vectorised": vector_fn, "loop": loop_fn}
        med = {name: cpu for name, (cpu, _) in interleaved(variants, repeats).items()}
        loop = med["loop"] / loop_samples * batch
    return [
        f"| table gather (brittle) | {1e3 * med['table']:.3f} | 1x |",
        f"| vectorised (B, K, d) minimum | {1e3 * med['vectorised']:.1f} | "
        f"{med['vectorised'] / med['table']:.0f}x slower (target >= 10x) |",
        f"| Python loop over class pairs (scaled from {loop_samples} samples) | "
        f"{1e3 * loop:.0f} | {loop / med['table']:.0f}x slower (target >= 1000x) |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--loop-samples", type=int, default=4)
    # One thread by default: on a CPU shared with other jobs, a second OpenMP thread
    # that gets descheduled stalls every parallel op, and small ops (the margins)
    # suffer far more than the convolutions, which would distort the ratios.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-forward", action="store_true", help="only the margin timings")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, batch {args.batch}")
    print(f"medians of {args.repeats} interleaved repeats\n")
    if not args.skip_forward:
        forward_table(args)
    print(f"\nExact feature margin, K=1000, d=512, Linf, batch {args.batch}\n")
    print("| method | CPU time per batch (ms) | vs table |")
    print("|---|---|---|")
    for row in feature_margin_speed(args.batch, 3 * args.repeats, args.loop_samples):
        print(row)


def forward_table(args: argparse.Namespace) -> None:
    print(
        "| model | score | bare forward (CPU ms) | monitor forward (CPU ms) "
        "| end-to-end overhead | bare vs bare (noise) | monitor work alone (CPU ms) "
        "| overhead (work / bare) | target |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for num_classes, size, repeats in ((10, 32, 3 * args.repeats), (1000, 160, args.repeats)):
        for row in forward_overhead(num_classes, size, args.batch, repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
