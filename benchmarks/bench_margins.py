"""How tight brittle's input margins are, and what they cost: an AttackBench-style table.

On the digits CNNs (standard and PGD-trained), for each norm, every reference
minimum-norm attack of ``brittle.attacks.fab_references`` (adv-lib FMN, DDN and FAB,
torchattacks' FAB, AutoAttack's FAB) and brittle's engine at a few budgets
attack the same test images. The per-sample best is the smallest verified
margin any reference found. For each attack the table gives forward and backward
passes per sample (``brittle.attacks.attack.PassCounter``), CPU seconds, the samples
broken, the share of margins within 1 % of the per-sample best, the 90th
percentile of the ratio to the best, Kendall tau of the logit margin against
the attack's margins minus tau against the best margins, and the CPU-time
speedup over torchattacks' FAB. The plot (``--plot``, default
``docs/img/margins_budget.png``) draws the share within 1 % against passes per
sample.

Run: ``python benchmarks/bench_margins.py [--n 200] [--device cpu|cuda] [--quick]``
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from scipy.stats import kendalltau
from torch import Tensor, nn

# adv-lib imports visdom for its logger only; the runners of brittle.attacks.fab_references
# register a stand-in where visdom is missing (its source release no longer builds).
from brittle.attacks.attack import PassCounter
from brittle.attacks.fab import fab_attack
from brittle.attacks.fab_references import REFERENCES, reference_margins
from brittle.attacks.verify import verified_margins
from brittle.digits import digits_model, load_digits_split

# brittle's engine at a few budgets: fab_attack keyword arguments. "default" is
# what fit() and input_margins() run (100 steps, one restart).
BUDGETS: dict[str, dict[str, int]] = {
    "brittle FAB only": {"targeted": 0, "walk_steps": 0},
    "brittle default": {},
    "brittle targeted=2": {"targeted": 2},
    "brittle targeted=3, walk 40": {"targeted": 3, "walk_steps": 40},
    "brittle restarts=3, targeted=3, walk 40": {"restarts": 3, "targeted": 3, "walk_steps": 40},
}
# Reference budgets with --quick (the full ones are REFERENCES' defaults).
QUICK_STEPS = {
    "torchattacks FAB": 50,
    "AutoAttack FAB x3": 30,
    "adv-lib FAB x3": 30,
    "adv-lib FMN": 300,
    "adv-lib DDN": 300,
}


def _measure(
    run: Callable[[nn.Module], Tensor], model: nn.Module, device: torch.device
) -> dict[str, float | Tensor]:
    counter = PassCounter()
    counted = counter.counted(model)
    start, start_wall = time.process_time(), time.perf_counter()
    margins = run(counted).cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    n = len(margins)
    return {
        "margins": margins.double(),
        "forward": counter.forward / n,
        "backward": counter.backward / n,
        "cpu": time.process_time() - start,
        "wall": time.perf_counter() - start_wall,
    }


def _brittle(x: Tensor, pred: Tensor, norm: str, kwargs: dict[str, int]) -> Callable[..., Tensor]:
    def run(model: nn.Module) -> Tensor:
        adv = fab_attack(model, x, pred, norm=norm, **kwargs).adv  # type: ignore[arg-type]
        return verified_margins(model, x, adv, pred, norm)  # type: ignore[arg-type]

    return run


def _reference(x: Tensor, pred: Tensor, norm: str, name: str, steps: int | None) -> Callable:
    return lambda model: reference_margins(name, model, x, pred, norm, steps)  # type: ignore[arg-type]


def _case(kind: str, norm: str, n: int, device: torch.device, quick: bool) -> dict[str, dict]:
    model = digits_model(kind).to(device)  # type: ignore[arg-type]
    x = load_digits_split().x_holdout[:n].to(device)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(dim=1)
    top2 = logits.topk(2, dim=1).values
    logit_margin = (top2[:, 0] - top2[:, 1]).cpu().numpy()
    rows: dict[str, dict] = {}
    for name, (_, _, norms) in REFERENCES.items():
        if norm in norms:
            steps = QUICK_STEPS[name] if quick else None
            torch.manual_seed(0)
            rows[name] = _measure(_reference(x, pred, norm, name, steps), model, device)
    for name, kwargs in BUDGETS.items():
        rows[name] = _measure(_brittle(x, pred, norm, kwargs), model, device)
    # The per-sample best of the references, as in the table (brittle's own
    # runs may beat it: ratios below 1).
    best = torch.stack([rows[k]["margins"] for k in rows if k in REFERENCES]).amin(dim=0)
    tau_best = kendalltau(logit_margin, best.numpy()).statistic
    ta_cpu = rows["torchattacks FAB"]["cpu"]
    for row in rows.values():
        ratio = row["margins"] / best
        row["found"] = int(torch.isfinite(row["margins"]).sum())
        row["within"] = float((ratio <= 1.01).double().mean())
        row["p90"] = float(ratio.nan_to_num(nan=1.0, posinf=math.inf).quantile(0.9))
        row["dtau"] = kendalltau(logit_margin, row["margins"].numpy()).statistic - tau_best
        row["speedup"] = ta_cpu / max(row["cpu"], 1e-9)
    return rows


def _plot(results: dict[tuple[str, str], dict[str, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2), sharey=True)
    axes = axes if len(results) > 1 else [axes]
    markers = dict(zip(REFERENCES, "osD^v", strict=True))
    for ax, ((kind, norm), rows) in zip(axes, results.items(), strict=True):
        ours = [(rows[k]["forward"] + rows[k]["backward"], rows[k]["within"]) for k in BUDGETS]
        ax.plot(*zip(*ours, strict=True), "-o", color="black", label="brittle (budgets)")
        for name, row in rows.items():
            if name in REFERENCES:
                passes = row["forward"] + row["backward"]
                ax.plot(passes, row["within"], markers[name], label=name, alpha=0.8)
        ax.set_xscale("log")
        ax.set_title(f"digits CNN, {kind}, {norm}")
        ax.set_xlabel("forward + backward passes per sample")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("share within 1 % of the references' best")
    legend: dict[str, object] = {}
    for ax in axes:  # every attack once, whichever panels it appears in (DDN: L2 only)
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="test images per model")
    parser.add_argument("--models", default="standard,robust")
    parser.add_argument("--norms", default="Linf,L2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="48 images, shortened references")
    parser.add_argument("--threads", type=int, default=1, help="PyTorch CPU threads")
    parser.add_argument("--plot", default="docs/img/margins_budget.png")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = min(args.n, 48) if args.quick else args.n
    device = torch.device(args.device)
    results: dict[tuple[str, str], dict[str, dict]] = {}
    print(f"device={device} threads={torch.get_num_threads()} n={n} quick={args.quick}")
    header = (
        f"{'attack':<40} {'fwd':>6} {'bwd':>6} {'CPU s':>7} {'found':>5} {'within 1%':>9} "
        f"{'p90':>6} {'dtau':>7} {'vs ta':>6}"
    )
    for kind in args.models.split(","):
        for norm in args.norms.split(","):
            rows = _case(kind, norm, n, device, args.quick)
            results[(kind, norm)] = rows
            print(f"\ndigits CNN, {kind}, {norm}")
            print(header)
            print("-" * len(header))
            for name, r in rows.items():
                print(
                    f"{name:<40} {r['forward']:>6.0f} {r['backward']:>6.0f} {r['cpu']:>7.2f} "
                    f"{r['found']:>5} {r['within']:>9.1%} {r['p90']:>6.3f} {r['dtau']:>+7.3f} "
                    f"{r['speedup']:>5.1f}x",
                    flush=True,
                )
    if args.plot:
        _plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
