"""Deploy a fitted monitor as one ONNX file and serve it with onnxruntime alone.

Offline (PyTorch): load the PGD-trained digits CNN, calibrate a monitor
on a holdout, export logits + margin + flag as one graph. Online (no PyTorch):
a fresh process opens the file with onnxruntime and numpy only, and reads the
calibration it was exported with from the file's metadata.

Runs on a CPU in under two minutes (the digits CNN ships with brittle; with
``--cache-dir`` a rerun reads the calibration's margins from there):

    python examples/deploy_onnx.py [--cache-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def export_monitor(out_dir: Path, cache_dir: Path | None) -> tuple[Path, np.ndarray]:
    """The PyTorch side: fit a monitor on the digits holdout and export it."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import brittle
    from brittle.digits import ROBUST_EPS, digits_model, load_digits_split

    split = load_digits_split()
    model = digits_model("robust")
    monitor = brittle.wrap(model, norm="Linf", eps=ROBUST_EPS)
    holdout = DataLoader(TensorDataset(split.x_holdout, split.y_holdout), batch_size=100)
    # A small attack budget keeps the example fast; FAB margins are cached for reruns.
    monitor.fit(holdout, n_samples=200, steps=20, pseudo=False, progress=False, cache_dir=cache_dir)
    print(f"fitted: score={monitor.score}, threshold={float(monitor.threshold):.3f}")
    path = monitor.export_onnx(out_dir / "digits-monitor.onnx", split.x_holdout[:8])
    print(f"exported {path} ({path.stat().st_size / 1e3:.0f} kB)")
    # Requests for the server: a few holdout digits, one of them corrupted with NaN.
    images = split.x_holdout[-6:].numpy().copy()
    images[2, 0, 4, 4] = np.nan
    with torch.inference_mode():
        reference = monitor(torch.from_numpy(images))
    print("PyTorch margins:", np.array2string(reference.margin.numpy(), precision=3))
    return path, images


def serve(path: Path, images: np.ndarray) -> None:
    """The serving side: onnxruntime and numpy, no torch and no brittle import."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    print(
        f"serving {path.name}: brittle {meta['brittle_version']}, score={meta['score']}, "
        f"norm={meta['norm']}, eps={float(meta['eps']):.3f}, "
        f"threshold={float(meta['threshold']):.3f}, target TPR={meta['target_tpr']}, "
        f"tau={float(meta.get('tau', 'nan')):.2f}, AUROC={float(meta.get('auroc', 'nan')):.2f}"
    )
    logits, pred, margin, flag = session.run(None, {"input": images.astype(np.float32)})
    print("\nsample  pred  margin  brittle")
    for i in range(len(pred)):
        print(f"{i:>6}  {int(pred[i]):>4}  {float(margin[i]):6.3f}  {bool(flag[i])}")
    # The server never loaded PyTorch: the file is all it needs.
    assert "torch" not in sys.modules, "the serving process imported torch"
    print("\ntorch imported by the server:", "torch" in sys.modules)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-dir", type=Path, default=None, help="margin cache for reruns")
    parser.add_argument("--out", type=Path, default=None, help="folder for the .onnx file")
    parser.add_argument("--serve", nargs=2, metavar=("ONNX", "NPY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), np.load(args.serve[1]))
        return
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="brittle-deploy-"))
    path, images = export_monitor(out_dir, args.cache_dir)
    requests = out_dir / "requests.npy"
    np.save(requests, images)
    # A fresh interpreter stands in for the production server.
    subprocess.run([sys.executable, __file__, "--serve", str(path), str(requests)], check=True)


if __name__ == "__main__":
    main()
