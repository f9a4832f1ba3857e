"""What an adaptive attacker achieves against the monitor: the table of ``docs/security.md``.

For each digits model (standard, PGD-trained, IBP-certified) and score, the
monitor is fitted on 400 holdout digits (Linf eps 0.1, brittle's FAB with 20
steps) at each target TPR, and ``brittle.attacks.adaptive.adaptive_attacks``
runs plain PGD, adaptive PGD (which maximises the monitor's own score once the
prediction has changed) and Carlini-Wagner L2 on the other 319 holdout digits.
The certified model's pseudo-margin network trains on the 1,078 training
digits (``pseudo_data``). "Caught" is the share of successful examples the
monitor flags; "clean flagged" the share of the 319 clean inputs it flags.

Run: python benchmarks/bench_security.py [--rows all|pseudo] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import brittle
from brittle.attacks.adaptive import adaptive_attacks
from brittle.digits import digits_model, load_digits_split

EPS = 0.1
FIT = {"n_samples": 400, "steps": 20, "progress": False}
# (model, score, pseudo data) -> target TPRs
ROWS: list[tuple[str, str, bool]] = [
    ("standard", "logit", False),
    ("standard", "feature", False),
    ("robust", "logit", False),
    ("certified", "logit", False),
    ("certified", "pseudo", True),
]
TPRS = {"feature": (0.95,), "logit": (0.95, 0.5), "pseudo": (0.95, 0.5)}


def row(model: str, score: str, pseudo_data: bool, tpr: float) -> dict[str, Any]:
    """One fitted monitor and the three attacks against it."""
    split = load_digits_split()
    monitor = brittle.wrap(digits_model(model), eps=EPS, score=score)
    start = time.process_time()
    monitor.fit(
        split.x_holdout[:400],
        target_tpr=tpr,
        pseudo=score == "pseudo",
        pseudo_data=split.x_train if pseudo_data else None,
        **FIT,
    )
    fitted = time.process_time() - start
    result = adaptive_attacks(monitor, split.x_holdout[400:]).to_dict()
    taus = {k: round(v.tau, 3) for k, v in monitor.report.metrics.items()}
    return {"model": model, "score": score, "tpr": tpr, "taus": taus, "fit_cpu_s": fitted, **result}


def caught(result: dict[str, Any], name: str) -> str:
    a = result["attacks"][name]
    share = a["flagged_of_successful"]
    text = "-" if share is None else f"{100 * share:.0f} %"
    if name == "cw":
        return f"{a['n_successful']} ({a['n_changed']}), {text}"
    return f"{a['n_successful']}, {text}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", choices=["all", "pseudo"], default="all")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    rows = [r for r in ROWS if args.rows == "all" or r[1] == "pseudo"]
    results = []
    print(
        "| model (taus) | score | target TPR | clean flagged | PGD: successful, caught "
        "| adaptive PGD: successful, caught | CW: within eps (changed), caught |"
    )
    print("|---|---|---|---|---|---|---|")
    for model, score, pseudo_data in rows:
        for tpr in TPRS[score]:
            r = row(model, score, pseudo_data, tpr)
            results.append(r)
            taus = ", ".join(f"{k} {v}" for k, v in r["taus"].items())
            print(
                f"| {model} ({taus}) | {score} | {tpr} | {100 * r['clean_flagged']:.0f} % "
                f"| {caught(r, 'pgd')} | {caught(r, 'adaptive_pgd')} | {caught(r, 'cw')} |",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
