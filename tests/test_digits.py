"""The shipped digits models: same weights everywhere, checked, loaded; training still works."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import brittle.digits as digits_module
from brittle.digits import (
    KINDS,
    MODEL_SHA256,
    DigitsSplit,
    digits_model,
    shipped_model_path,
    train_digits_cnn,
)

REPO = Path(__file__).resolve().parents[1]


def _accuracy(model: torch.nn.Module, split: DigitsSplit) -> float:
    with torch.no_grad():
        return float((model(split.x_holdout).argmax(dim=1) == split.y_holdout).double().mean())


@pytest.mark.parametrize("kind", KINDS)
def test_shipped_models_load_without_training(
    kind: str, digits: DigitsSplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("digits_model trained a model")

    monkeypatch.setattr(digits_module, "train_digits_cnn", refuse)
    path = shipped_model_path(kind)  # type: ignore[arg-type]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == MODEL_SHA256[kind]
    state = torch.load(path, weights_only=True)
    assert all(t.dtype == torch.float32 for t in state.values())
    model = digits_model(kind)  # type: ignore[arg-type]
    assert not model.training
    # The shipped weights' holdout accuracy, the same on every machine: standard 0.989,
    # robust 0.996, certified 0.698 (IBP at eps 0.3 trades accuracy for certified margins).
    expected = {"standard": 0.989, "robust": 0.996, "certified": 0.698}[kind]
    assert _accuracy(model, digits) == pytest.approx(expected, abs=0.001)


def test_a_damaged_model_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    damaged = tmp_path / "digits-standard.pt"
    data = bytearray(shipped_model_path("standard").read_bytes())
    data[-100] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(digits_module, "shipped_model_path", lambda kind: damaged)
    with pytest.raises(RuntimeError, match="damaged"):
        digits_model("standard")
    monkeypatch.setattr(digits_module, "shipped_model_path", lambda kind: tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match="missing"):
        digits_model("standard")


def test_training_code_still_trains_a_good_model(digits: DigitsSplit) -> None:
    threads = torch.get_num_threads()
    model = train_digits_cnn("standard", epochs=3, seed=1)
    assert torch.get_num_threads() == threads  # one thread while training only
    # Three epochs over seeds 0-4: holdout accuracy 0.911-0.936 (seed 1: 0.911).
    assert _accuracy(model, digits) >= 0.88


@pytest.mark.slow
def test_demo_trains_nothing_and_repeats_its_figures(tmp_path: Path) -> None:
    """Twice the same figures, and no file outside ``--out``: nothing trained or cached
    under HOME, the XDG folders or the working directory (matplotlib's font cache has
    a folder of its own)."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "MPLCONFIGDIR": str(tmp_path / "matplotlib"),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    figures = []
    for run in range(2):
        out = tmp_path / f"run{run}"
        args = [
            "--demo",
            "--n",
            "200",
            "--steps",
            "5",
            "--attack-subset",
            "60",
            "--target-tpr",
            "0.9",
        ]
        subprocess.run(
            [sys.executable, "-m", "brittle.check", *args, "--no-progress", "--out", str(out)],
            env=env,
            cwd=cwd,
            check=True,
            capture_output=True,
            timeout=900,
        )
        runs = {}
        for name in ("standard", "robust"):
            payload = json.loads((out / name / "report.json").read_text())
            for key in ("timings", "check_timings"):
                payload.pop(key, None)
            payload["settings"].get("passes", {}).pop("attack_seconds", None)
            runs[name] = payload
        figures.append(runs)
    written = sorted(str(p.relative_to(tmp_path)) for p in [*home.rglob("*"), *cwd.rglob("*")])
    assert written == []
    assert figures[0] == figures[1]
