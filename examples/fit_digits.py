"""Fit monitors for the standard and the PGD-trained digits CNNs and print their reports.

The figures in docs/results.md come from this script (all 719 holdout digits,
100 FAB steps, Linf eps 0.1).

    python examples/fit_digits.py [--samples 719] [--steps 100] [--engine brittle]
"""

from __future__ import annotations

import argparse
import time

from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.attacks.attack import DEFAULT_ENGINE, ENGINES
from brittle.digits import ROBUST_EPS, digits_model, load_digits_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--samples", type=int, default=None, help="holdout samples (default: all 719)"
    )
    parser.add_argument("--steps", type=int, default=100, help="FAB steps")
    parser.add_argument("--engine", default=DEFAULT_ENGINE, choices=sorted(ENGINES))
    parser.add_argument("--pseudo", default="auto", choices=["auto", "true", "false"])
    args = parser.parse_args()
    pseudo = {"auto": "auto", "true": True, "false": False}[args.pseudo]

    split = load_digits_split()
    holdout = DataLoader(TensorDataset(split.x_holdout, split.y_holdout), batch_size=128)
    rows = []
    for kind in ("standard", "robust"):
        monitor = brittle.wrap(digits_model(kind), norm="Linf", eps=ROBUST_EPS)
        start = time.perf_counter()
        monitor.fit(
            holdout,
            n_samples=args.samples,
            steps=args.steps,
            engine=args.engine,
            pseudo=pseudo,
            progress=False,  # type: ignore[arg-type]
        )
        seconds = time.perf_counter() - start
        print(f"\n=== {kind} digits CNN ===\n{monitor.report}")
        report = monitor.report
        for name, m in report.metrics.items():
            rows.append(
                (kind, name, m.tau, m.tau_ci, m.auroc, m.fpr_at_tpr, name == report.chosen, seconds)
            )

    print("\nmodel     score     tau    95% CI            AUROC   FPR@95  chosen  fit time")
    for kind, name, tau, ci, auroc, fpr, chosen, seconds in rows:
        print(
            f"{kind:<9} {name:<8} {tau:5.3f}  [{ci[0]:.3f}, {ci[1]:.3f}]  {auroc:6.1%}  {fpr:6.1%}"
            f"  {'*' if chosen else '':^6}  {seconds:5.1f}s"
        )


if __name__ == "__main__":
    main()
