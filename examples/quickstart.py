"""Quickstart: wrap a digits classifier, calibrate it once, read margins and flags.

Runs on a CPU in well under a minute with no download: scikit-learn ships the
digits, and the small CNN's weights ship with brittle.

    python examples/quickstart.py
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.digits import ROBUST_EPS, digits_model, load_digits_split


def main() -> None:
    split = load_digits_split()
    model = digits_model("robust")  # PGD-trained CNN; its weights ship with brittle

    # One nn.Module: the model's logits plus a margin and a brittle flag per sample.
    monitor = brittle.wrap(model, norm="Linf", eps=ROBUST_EPS)

    # Offline, once: FAB input margins on a holdout, consistency check, threshold.
    holdout = DataLoader(TensorDataset(split.x_holdout, split.y_holdout), batch_size=128)
    monitor.fit(holdout, n_samples=300, steps=30, target_tpr=0.95, progress=False)
    print(monitor.report)

    # Online, every request: one forward pass, no attack.
    with torch.inference_mode():
        logits, pred, margin, flag = monitor(split.x_holdout[-8:])
    print("\nsample  pred  margin  brittle")
    for i in range(len(pred)):
        print(f"{i:>6}  {int(pred[i]):>4}  {float(margin[i]):6.2f}  {bool(flag[i])}")


if __name__ == "__main__":
    main()
