"""Check a model on an .npz holdout with ``python -m brittle.check``, as a CI job would.

Writes a small .npz of scikit-learn digits (an array ``x`` of shape (N, C, H, W)
in [0, 1] and integer labels ``y``), then runs the command on it through
``brittle.check.main([...])``, which takes the same arguments as the shell:

    python -m brittle.check --model examples/cli_npz.py:robust_digits \\
        --data holdout.npz --eps 0.1 --n 300 --steps 20 --min-tau 0.3 --out report

``--model`` names a factory, ``path/to/file.py:factory`` or
``package.module:factory``, called with no arguments and returning an
``nn.Module`` on inputs in [0, 1]; here it is :func:`robust_digits` below. The
exit status is the command's: 0 when the check ran and the chosen score's
Kendall tau reached ``--min-tau``, 1 when it did not, 2 for a usage error.

Runs on a CPU in about a minute with no download:

    python examples/cli_npz.py [--samples 300] [--steps 20] [--min-tau 0.3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from torch import nn


def robust_digits() -> nn.Module:
    """The PGD-trained digits CNN (its weights ship with brittle)."""
    from brittle.digits import digits_model

    return digits_model("robust")


def write_npz(path: Path, samples: int) -> Path:
    """The first ``samples`` digits of the holdout as ``x`` float32 (N, 1, 8, 8) and ``y`` int64."""
    from brittle.digits import load_digits_split

    split = load_digits_split()
    np.savez_compressed(
        path,
        x=split.x_holdout[:samples].numpy().astype(np.float32),
        y=split.y_holdout[:samples].numpy().astype(np.int64),
    )
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="holdout samples in the .npz")
    parser.add_argument("--steps", type=int, default=20, help="FAB steps per sample")
    parser.add_argument("--min-tau", type=float, default=0.3, help="CI gate on Kendall tau")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: temporary)")
    args = parser.parse_args()

    from brittle.check import main as check

    work = Path(tempfile.mkdtemp(prefix="brittle-cli-"))
    out = args.out or work / "report"
    data = write_npz(work / "holdout.npz", args.samples)
    argv = [
        "--model",
        f"{Path(__file__).resolve()}:robust_digits",
        "--data",
        str(data),
        "--eps",
        "0.1",  # digits have 17 grey levels: 0.1 is about one and a half
        "--norm",
        "Linf",
        "--n",
        str(args.samples),
        "--steps",
        str(args.steps),
        "--attack-subset",
        str(min(100, args.samples)),
        "--device",
        "cpu",
        "--min-tau",
        str(args.min_tau),
        "--out",
        str(out),
        "--save-monitor",
        str(out / "monitor.pt"),
        "--no-progress",
    ]
    print("python -m brittle.check " + " ".join(argv), end="\n\n", flush=True)
    status = check(argv)
    if status not in (0, 1):  # a usage error (2) or a crash (3), explained on stderr: no report
        return status

    # report.json holds everything the table shows, for tools and dashboards.
    report = json.loads((out / "report.json").read_text())
    gate = report["gate"]
    print(
        f"\nexit status {status}: chosen score {gate['score']} has Kendall tau {gate['tau']:.3f} "
        f"({'>=' if gate['passed'] else '<'} --min-tau {gate['min_tau']}); "
        f"threshold {report['threshold']:.4g}, monitor saved to {out / 'monitor.pt'}"
    )
    return status


if __name__ == "__main__":
    sys.exit(main())
