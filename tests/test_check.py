"""``python -m brittle.check``: the demo, every --model and --data form, exit codes, outputs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.calibrate.analyses import estimate_threshold, robust_accuracy_estimate
from brittle.calibrate.report import ConsistencyReport, percent
from brittle.check import main
from brittle.check.errors import UsageError
from brittle.check.sources import load_data, load_model
from brittle.digits import DigitsSplit

REPO = Path(__file__).resolve().parents[1]
# Small but real settings: every code path runs, attacks are short.
FAST = ["--eps", "0.1", "--steps", "3", "--no-progress", "--seed", "0"]


def digits_check(
    model: str,
    margin_cache: Path,
    data: str | Path = "digits",
    n: int = 120,
    subset: int = 40,
    fast: list[str] = FAST,
) -> list[str | Path]:
    """The arguments of a fast check of ``model`` on ``n`` digits (``subset`` attacked)."""
    return [
        "--model",
        model,
        *("--data", data, "--n", str(n), "--attack-subset", str(subset)),
        *("--cache-dir", margin_cache),
        *fast,
    ]


def run_main(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` in-process, with its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def read_report(out_dir: Path) -> dict[str, Any]:
    return json.loads((out_dir / "report.json").read_text())


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The digits CNN's ops are too small to gain from intra-op threads, and on a busy
    # shared machine oversubscribed threads stall them (ten times slower here).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo")
    # A fresh margin cache: the demo's margins are attacked anew every session.
    cache = tmp_path_factory.mktemp("demo-cache")
    code, stdout, stderr = run_main(
        [
            "--demo",
            "--n",
            "300",
            "--steps",
            "5",
            "--attack-subset",
            "150",
            "--no-progress",
            "--cache-dir",
            cache,
            "--out",
            out,
            "--save-monitor",
            out / "monitor.pt",
        ]
    )
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Path:
    """A ``file.py`` with factories returning the trained digits CNNs."""
    path = tmp_path_factory.mktemp("models") / "digits_models.py"
    path.write_text(
        textwrap.dedent(
            f"""
            import torch
            from brittle.digits import digits_model

            CACHE = {str(model_cache)!r}


            def robust():
                return digits_model("robust", cache_dir=CACHE)


            def standard():
                return digits_model("standard", cache_dir=CACHE)


            class Gray(torch.nn.Module):
                def forward(self, x):
                    return x.mean(dim=1, keepdim=True)


            def standard_rgb():
                # ImageFolder images load as RGB; the digits CNN takes one channel.
                return torch.nn.Sequential(Gray(), standard())


            def not_a_model():
                return 42
            """
        )
    )
    return path


@pytest.fixture(scope="module")
def digits_npz(tmp_path_factory: pytest.TempPathFactory, digits: DigitsSplit) -> Path:
    path = tmp_path_factory.mktemp("npz") / "digits.npz"
    np.savez(path, x=digits.x_holdout[:150].numpy(), y=digits.y_holdout[:150].numpy())
    return path


@pytest.fixture(scope="module")
def margin_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Shared by the runs on the same model and holdout, so each is attacked once.
    return tmp_path_factory.mktemp("margins")


# ---------------------------------------------------------------------- demo
def test_demo_reports_both_models_side_by_side(demo: dict[str, Any]) -> None:
    assert demo["code"] == 0, demo["stderr"]
    stdout = demo["stdout"]
    for text in (
        "== standard",
        "== robust",
        "tau",
        "95% CI",
        "AUROC",
        "AUPR",
        "FPR@95%",
        "threshold",
        "<- chosen",
        "baselines",
        "timings:",
        "robust acc. estimate",
    ):
        assert text in stdout
    header = next(line for line in stdout.splitlines() if line.strip().startswith("standard"))
    assert header.split() == ["standard", "robust"]
    for name in ("standard", "robust"):
        assert (demo["out"] / name / "report.json").is_file()
        assert (demo["out"] / f"monitor-{name}.pt").is_file()
    index = json.loads((demo["out"] / "report.json").read_text())
    assert index == {"models": {"standard": "standard/report.json", "robust": "robust/report.json"}}


def test_report_json_holds_the_report_and_the_analyses(demo: dict[str, Any]) -> None:
    payload = read_report(demo["out"] / "robust")
    expected = {
        "n",
        "eps",
        "norm",
        "accuracy",
        "nonrobust_fraction",
        "censored",
        "input_margins",
        "score_values",
        "metrics",
        "chosen",
        "reason",
        "threshold",
        "target_tpr",
        "tpr",
        "fpr",
        "timings",
        "settings",
        "robust_accuracy_estimate",
        "per_class",
        "baselines",
        "adversarial",
        "adaptive",
        "plots",
        "check_settings",
        "check_timings",
        "model",
        "data",
    }
    assert expected <= set(payload)
    # The file loads back as the library's own report.
    report = ConsistencyReport.from_dict(payload)
    assert report.n == 300 and report.eps == pytest.approx(0.1)
    assert set(payload["baselines"]) == {"msp", "entropy", "gradnorm", "kde"}
    for metrics in payload["baselines"].values():
        assert -1 <= metrics["tau"] <= 1 and 0 <= metrics["auroc"] <= 1
    classes = payload["per_class"]["classes"]
    assert [c["class"] for c in classes] == list(range(10))
    assert sum(c["n"] for c in classes) == int(np.sum(payload["calibration"]))
    for key in ("nonrobust_by_margin", "nonrobust_by_flag"):
        assert all(0 <= c[key] <= 1 for c in classes)
    adversarial = payload["adversarial"]
    assert adversarial["n"] == 150
    for attack in ("pgd", "fgsm"):
        assert 0 <= adversarial[attack]["success_rate"] <= 1
        assert adversarial[attack]["n_successful"] >= 1
        # Successful adversarials sit at the decision boundary: the monitor flags most.
        assert adversarial[attack]["flagged_of_successful"] >= 0.8
    assert 0 <= adversarial["clean_flagged"] <= 1
    # The attacks that know the monitor run on the same samples, at the monitor's eps.
    adaptive = payload["adaptive"]
    assert adaptive["n"] == 150 and adaptive["eps"] == pytest.approx(payload["eps"])
    assert set(adaptive["attacks"]) == {"pgd", "adaptive_pgd", "cw"}
    for outcome in adaptive["attacks"].values():
        assert 0 <= outcome["n_flagged"] <= outcome["n_successful"] <= outcome["n_changed"] <= 150
    assert adaptive["attacks"]["adaptive_pgd"]["n_successful"] >= 1


def test_robust_accuracy_estimate_matches_the_attacked_figure(demo: dict[str, Any]) -> None:
    for name in ("standard", "robust"):
        estimate = read_report(demo["out"] / name)["robust_accuracy_estimate"]
        assert estimate["subset_size"] == 150 and estimate["n_attacked"] == 300
        assert estimate["n_estimated"] == 719
        # Judged where the truth is known and the threshold was not matched: the 150
        # attacked samples outside the subset. The estimate carries the subset's
        # sampling error and the attacked figure its own: three binomial standard
        # deviations of a difference of two independent shares bound their gap.
        p, m, k = estimate["attacked_all"], estimate["subset_size"], estimate["n_held_out"]
        assert k == 150
        bound = 3 * math.sqrt(p * (1 - p) * (1 / m + 1 / k))
        assert abs(estimate["estimate_held_out"] - estimate["attacked_held_out"]) <= bound
        low, high = estimate["attacked_held_out_ci"]
        assert low <= estimate["attacked_held_out"] <= high


def test_html_references_plots_that_exist(demo: dict[str, Any]) -> None:
    page = (demo["out"] / "report.html").read_text()
    sources = re.findall(r"<img src='([^']+)'", page)
    assert len(sources) == 8  # four plots per model
    for src in sources:
        assert (demo["out"] / src).is_file(), src
        assert (demo["out"] / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" not in page and "http" not in page
    for text in ("standard", "robust", "Settings", "tau"):
        assert text in page


def test_robust_accuracy_estimate_reproduces_the_subset_figure() -> None:
    rng = np.random.default_rng(0)
    margins = rng.exponential(0.2, size=300)
    score = margins * 10 + rng.normal(0, 0.05, size=300)  # nearly consistent
    labels = rng.integers(0, 3, size=300)
    preds = np.where(rng.random(300) < 0.9, labels, (labels + 1) % 3)
    out = robust_accuracy_estimate(
        score_all=score,
        pred_all=preds,
        labels_all=labels,
        margins=margins[:200],
        eps=0.1,
        subset_size=50,
        score_name="logit",
    )
    truth = float(np.mean((preds == labels) & (margins > 0.1)))
    assert out.estimate == pytest.approx(truth, abs=0.05)
    assert estimate_threshold(np.array([1.0, 2.0, 3.0]), 3) == -np.inf
    assert estimate_threshold(np.array([1.0, 2.0, 3.0]), 0) == 3.0


# ----------------------------------------------------- model and data forms
def test_file_factory_on_digits_and_the_min_tau_gate(
    model_file: Path, margin_cache: Path, tmp_path: Path
) -> None:
    args = digits_check(f"{model_file}:standard", margin_cache)
    code, stdout, stderr = run_main([*args, "--min-tau", "0.99", "--out", tmp_path / "fail"])
    assert code == 1, stderr
    assert "gate FAILED" in stdout and "--min-tau 0.99" in stderr
    assert read_report(tmp_path / "fail")["gate"]["passed"] is False
    # Same margins from the cache, a bar the model clears: exit 0.
    code, stdout, _ = run_main([*args, "--min-tau", "0.1", "--out", tmp_path / "pass"])
    assert code == 0 and "gate passed" in stdout
    assert read_report(tmp_path / "pass")["gate"]["passed"] is True
    # A subset asked larger than --n: the report records the subset that ran (it
    # recorded 1000 before, beside a robust-accuracy subset of at most 120).
    args[args.index("--attack-subset") + 1] = "1000"
    code, _, stderr = run_main([*args, "--out", tmp_path / "all"])
    report = read_report(tmp_path / "all")
    ran = report["robust_accuracy_estimate"]["subset_size"]
    assert code == 0, stderr
    assert ran <= 120 and report["check_settings"]["attack_subset"] == ran


def test_a_model_returning_a_dict_of_logits_is_checked(
    model_file: Path, margin_cache: Path, tmp_path: Path
) -> None:
    # brittle.wrap and fit take a model returning a dict with "logits" (or .logits, or a
    # tuple). Before, the command refused it ("must return logits (batch, classes); got
    # dict"), and the gradient-norm baseline and the PGD/FGSM examples called the model
    # for a tensor and failed on it.
    (tmp_path / "dict_model.py").write_text(
        "import importlib.util, torch\n"
        f"spec = importlib.util.spec_from_file_location('digits_models', {str(model_file)!r})\n"
        "models = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(models)\n"
        "class AsDict(torch.nn.Module):\n"
        "    def __init__(self, net):\n"
        "        super().__init__()\n"
        "        self.net = net\n"
        "    def forward(self, x):\n"
        "        return {'logits': self.net(x), 'aux': x.mean()}\n"
        "def build():\n"
        "    return AsDict(models.standard())\n"
    )
    out = tmp_path / "out"
    code, _, stderr = run_main(
        [*digits_check(f"{tmp_path / 'dict_model.py'}:build", margin_cache), "--out", out]
    )
    assert code == 0, stderr
    payload = read_report(out)
    assert math.isfinite(payload["baselines"]["gradnorm"]["auroc"])
    assert payload["adversarial"]["pgd"]["n"] == 40


def test_package_module_factory_on_npz_without_matplotlib(
    model_file: Path,
    digits_npz: Path,
    margin_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(model_file.parent))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        [
            *digits_check("digits_models:standard", margin_cache, digits_npz, n=150, subset=50),
            *("--out", out, "--save-monitor", tmp_path / "monitor.pt"),
        ]
    )
    assert code == 0, stderr
    assert "pip install brittle[plot]" in stdout
    payload = read_report(out)
    assert payload["plots"] == [] and not list(out.glob("*.png"))
    assert payload["n"] == 150 and payload["n_data"] == 150
    assert "pip install brittle[plot]" in (out / "report.html").read_text()
    # The saved monitor, evaluated as saved on the same data: same threshold and score.
    saved = tmp_path / "monitor.pt"
    own_eps = [a for a in FAST if a not in ("--eps", "0.1")]  # the monitor's own eps
    evaluate = [
        *digits_check(f"{saved}@{model_file}:standard", margin_cache, digits_npz, 150, 50, own_eps),
        *("--out", tmp_path / "again"),
    ]
    code, stdout, stderr = run_main(evaluate)
    assert code == 0, stderr
    again = read_report(tmp_path / "again")
    assert again["threshold"] == pytest.approx(payload["threshold"])
    assert again["chosen"] == payload["chosen"]
    assert again["input_margins"] == payload["input_margins"]
    assert "saved in monitor.pt" in again["reason"]
    # Before, check_settings said eps 8/255 (the Linf default), not the 0.1 it ran at.
    assert again["check_settings"]["eps"] == again["eps"] == pytest.approx(0.1)
    assert again["check_settings"]["norm"] == again["norm"] == "Linf"


def test_image_folder_of_pngs(model_file: Path, digits: DigitsSplit, tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "images"
    for i in range(80):
        label = int(digits.y_holdout[i])
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.x_holdout[i, 0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    data = load_data(str(root), image_size=8)
    assert tuple(data.x.shape) == (80, 3, 8, 8) and data.y is not None
    out = tmp_path / "out"
    code, _, stderr = run_main(
        [
            "--model",
            f"{model_file}:standard_rgb",
            "--data",
            root,
            "--image-size",
            "8",
            "--n",
            "80",
            "--target-tpr",
            "0.8",
            "--attack-subset",
            "30",
            "--out",
            out,
            *FAST,
        ]
    )
    assert code == 0, stderr
    payload = read_report(out)
    assert payload["n"] == 80 and payload["target_tpr"] == 0.8
    # ImageFolder's class indices follow the sorted folder names, not the digits.
    assert payload["per_class"]["by"] == "label"


def test_image_folder_refuses_16_bit_images(tmp_path: Path) -> None:
    # Before, PIL's conversion to RGB clipped 16-bit pixels at 255: a 16-bit PNG whose
    # values span 0-63000 loaded as 1.0 everywhere but one pixel, with no error.
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8), mode="L").save(tmp_path / "a" / "0.png")
    wide = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(wide).save(tmp_path / "a" / "1.png")
    assert Image.open(tmp_path / "a" / "1.png").mode == "I;16"
    with pytest.raises(UsageError, match=r"1\.png.*'I;16'.*convert the images to 8 bits"):
        load_data(str(tmp_path))


def test_image_folder_of_mixed_sizes_stops_at_the_first_other_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, every image was decoded and kept at its own size before the sizes were
    # compared: an ImageNet folder given without --image-size (50,000 images of their
    # own sizes, some 80 GB as floats) ran out of memory instead of saying so.
    from PIL import Image

    from brittle.check import sources

    (tmp_path / "a").mkdir()
    for name, side in (("0.png", 8), ("1.png", 9), ("2.png", 8), ("3.png", 8)):
        Image.fromarray(np.zeros((side, side), dtype=np.uint8)).save(tmp_path / "a" / name)
    read: list[str] = []
    original = sources._rgb_image

    def counting(file: str) -> Any:
        read.append(Path(file).name)
        return original(file)

    monkeypatch.setattr(sources, "_rgb_image", counting)
    with pytest.raises(UsageError, match=r"--image-size: .*0\.png.* 8x8.*1\.png.* 9x9"):
        load_data(str(tmp_path))
    assert read == ["0.png", "1.png"]
    assert tuple(load_data(str(tmp_path), image_size=8).x.shape) == (4, 3, 8, 8)


def _robustbench_checkpoint(model_dir: Path) -> nn.Module:
    from brittle.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    entry = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Wong2020Fast"]
    torch.manual_seed(0)
    model = entry["model"]().eval()  # PreActResNet-18, random weights
    path = model_dir / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict()}, path)
    return model


def test_robustbench_checkpoint_in_model_dir(tmp_path: Path) -> None:
    model = _robustbench_checkpoint(tmp_path / "models")
    source = load_model("robustbench:Wong2020Fast", model_dir=tmp_path / "models")
    assert source.dataset == "cifar10"
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    with torch.no_grad():
        torch.testing.assert_close(source.model(x), model(x))
    np.savez(tmp_path / "cifar.npz", x=x.numpy())  # no labels
    # The budget between the smallest and largest margin gives both classes.
    margins = brittle.input_margins(model, x, steps=2, batch_size=6, engine="torchattacks")
    eps = float(margins.sort().values[2:4].mean())
    out = tmp_path / "out"
    code, stdout, stderr = run_main(
        [
            "--model",
            "robustbench:Wong2020Fast",
            "--model-dir",
            tmp_path / "models",
            "--data",
            tmp_path / "cifar.npz",
            "--eps",
            eps,
            "--steps",
            "2",
            "--engine",
            "torchattacks",  # the engine brittle.input_margins used above
            "--batch-size",
            "6",
            "--target-tpr",
            "0.5",
            "--attack-subset",
            "3",
            "--out",
            out,
            "--no-progress",
        ]
    )
    assert code == 0, stderr
    payload = read_report(out)
    assert payload["labels"] is None and payload["per_class"]["by"] == "prediction"
    assert payload["robust_accuracy_estimate"]["quantity"] == "robust share (no labels)"
    assert payload["input_margins"] == pytest.approx(margins.tolist(), rel=1e-5)


def test_robustbench_files_are_all_checked_and_nothing_is_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, only an ensemble's first file was checked: RobustBench then downloaded the
    # others from Google Drive, and a timm model from the Hugging Face hub, whatever
    # --model-dir held.
    from brittle.compat import import_robustbench

    rb = import_robustbench()
    import timm

    downloads: list[str] = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        downloads.append(str(args))
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(rb.utils, "download_gdrive_new", refuse)
    monkeypatch.setattr(timm, "create_model", refuse)
    folder = tmp_path / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    # Chen2020Adversarial is an ensemble of three networks, one file each.
    (folder / "Chen2020Adversarial.pt_m0.pt").write_bytes(b"")
    (folder / "Debenedetti2022Light_XCiT-S12.pt").write_bytes(b"")
    for name, option, needle in (
        ("Chen2020Adversarial", "--model-dir", "Chen2020Adversarial.pt_m1.pt"),
        ("Debenedetti2022Light_XCiT-S12", "--model", "through timm"),
    ):
        argv = ["--model", f"robustbench:{name}", "--model-dir", tmp_path, "--data", "digits"]
        code, _, stderr = run_main([*argv, "--out", tmp_path / "out"])
        assert code == 2, stderr
        assert stderr.startswith(f"brittle-check: error: {option}:") and needle in stderr, stderr
        assert stderr.count("\n") == 1
    assert downloads == []


class _Payload:
    """A pickled object that, unpickled, writes ``marker``: code hidden in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.write_text, (self.marker, "ran"))


def test_robustbench_checkpoint_with_pickled_code_is_refused_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # RobustBench loads its checkpoints with torch.load and no weights_only, which is
    # PyTorch's weights-only default only until TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set
    # (the usual advice for old checkpoints): the pickled code in the file then ran.
    marker = tmp_path / "marker"
    path = tmp_path / "models" / "cifar10" / "Linf" / "Wong2020Fast.pt"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {"conv1.weight": _Payload(marker)}}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    # Unset whatever the environment running the tests holds, so the last line can
    # check the load's override is put back as it was (absent).
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    argv = ["--model", "robustbench:Wong2020Fast", "--model-dir", tmp_path / "models"]
    code, _, stderr = run_main([*argv, "--data", "digits", "--out", tmp_path / "out"])
    assert not marker.exists()
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("brittle-check: error: --model:") and "weights only" in stderr
    assert "Wong2020Fast.pt" in stderr
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"  # the user's setting is kept
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


@pytest.mark.parametrize("placeholder", [False, True])
def test_robustbench_model_with_weights_from_elsewhere_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, placeholder: bool
) -> None:
    # RobustBench builds ImageNet's Standard_R50 with torchvision's pretrained weights,
    # read from the torch hub cache (downloaded when missing) and never from --model-dir.
    # Before, --model-dir had to hold a Standard_R50.pt that nothing read (without it the
    # advice was to download a file RobustBench never writes), and with one the hub
    # cache's file was loaded, pickled code and all, or fetched from the internet.
    marker = tmp_path / "marker"
    checkpoints = tmp_path / "torch_home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save({"fc.weight": _Payload(marker)}, checkpoints / "resnet50-0676ba61.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    folder = tmp_path / "models" / "imagenet" / "Linf"
    folder.mkdir(parents=True)
    if placeholder:
        (folder / "Standard_R50.pt").write_bytes(b"")
    argv = ["--model", "robustbench:Standard_R50", "--dataset", "imagenet"]
    argv += ["--model-dir", tmp_path / "models", "--data", "digits", "--out", tmp_path / "out"]
    code, _, stderr = run_main(argv)
    assert not marker.exists()
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("brittle-check: error: --model:"), stderr
    assert "not from --model-dir" in stderr and "file.py:factory" in stderr, stderr


def test_cifar_files_missing_or_damaged_are_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, RobustBench's loader (download=True) fetched the archive whenever a file in
    # cifar-10-batches-py/ was missing or failed its md5 check; offline the run ended
    # with a URLError.
    import pickle

    from torchvision.datasets import cifar

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(cifar, "download_and_extract_archive", refuse)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    code, _, stderr = run_main(
        ["--model", "brittle.digits:digits_cnn", "--data", "cifar10", "--data-dir", tmp_path]
        + ["--out", tmp_path / "out"]
    )
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("brittle-check: error: --data-dir:") and "md5" in stderr, stderr
    # Files that pass the check (the md5 check stubbed) load as ToTensor reads them.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(7, 3 * 32 * 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).tolist()
    for name, _ in cifar.CIFAR10.train_list + cifar.CIFAR10.test_list:
        batch = {"data": pixels, "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list("abcdefghij")}))
    data = load_data("cifar10", data_dir=tmp_path)
    from torchvision.transforms import ToTensor

    images = pixels.reshape(7, 3, 32, 32).transpose(0, 2, 3, 1)
    expected = torch.stack([ToTensor()(image) for image in images])
    assert data.x.dtype == torch.float32 and torch.equal(data.x, expected)
    assert data.y is not None and data.y.tolist() == labels


def test_export_onnx_when_available(model_file: Path, margin_cache: Path, tmp_path: Path) -> None:
    pytest.importorskip("brittle.deploy.onnx")
    pytest.importorskip("onnxruntime")
    path = tmp_path / "monitor.onnx"
    code, stdout, stderr = run_main(
        [
            *digits_check(f"{model_file}:standard", margin_cache),
            *("--out", tmp_path / "out", "--export-onnx", path),
        ]
    )
    assert code == 0, stderr
    assert path.is_file() and f"onnx: {path}" in stdout


def test_too_few_brittle_calibration_samples_say_where_the_others_went(
    model_file: Path, tmp_path: Path
) -> None:
    # Of 60 samples at eps 0.05, the robust CNN has a few non-robust ones, all
    # among the 18 the score was chosen on. Before, the error read "none of the 42
    # holdout samples is non-robust" after --n 60, although the holdout had some.
    argv = ["--model", f"{model_file}:robust", "--data", "digits", "--n", "60", "--eps", "0.05"]
    argv += ["--steps", "3", "--seed", "0", "--no-progress", "--out", tmp_path]
    code, _, stderr = run_main(argv)
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert "none of the 42 calibration samples is non-robust" in stderr, stderr
    assert "18 chose the score" in stderr, stderr


# ------------------------------------------------------------ usage errors
@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--model", "no/such/file.py:build", "--data", "digits"], "--model"),
        (["--model", "nonsense", "--data", "digits"], "--model"),
        (["--model", "brittle.digits:no_such_factory", "--data", "digits"], "--model"),
        (["--model", "robustbench:NoSuchModel2099", "--data", "digits"], "--model"),
        (["--model", "robustbench:Wong2020Fast", "--model-dir", "/nonexistent"], "--model-dir"),
        (["--model", "brittle.digits:digits_cnn", "--data", "missing.npz"], "--data"),
        (
            ["--model", "brittle.digits:digits_cnn", "--device", "meta", "--data", "digits"],
            "--device",
        ),
        (
            [
                "--model",
                "brittle.digits:digits_cnn",
                "--data",
                "cifar10",
                "--data-dir",
                "/nonexistent",
            ],
            "--data-dir",
        ),
        (["--model", "brittle.digits:digits_cnn", "--data", "digits", "--eps", "-1"], "--eps"),
        (["--model", "brittle.digits:digits_cnn", "--data", "digits", "--norm", "L3"], "--norm"),
        (
            ["--model", "brittle.digits:digits_cnn", "--data", "digits", "--engine", "nope"],
            "--engine",
        ),
        (["--model", "brittle.digits:digits_cnn", "--data", "imagenet"], "--data"),
        (["--demo", "--data", "digits"], "--data"),
        (["--data", "digits"], "--model"),
        # Before, a negative seed passed the parser and failed after the attacks, blamed on --data.
        (["--model", "brittle.digits:digits_cnn", "--data", "digits", "--seed", "-1"], "--seed"),
    ],
)
def test_usage_errors_exit_2_with_one_line(argv: list[str], option: str, tmp_path: Path) -> None:
    code, stdout, stderr = run_main([*argv, "--out", tmp_path])
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith(f"brittle-check: error: {option}")


def test_a_seed_torch_cannot_take_is_a_usage_error(tmp_path: Path) -> None:
    # Before, a seed past 2**64 - 1 passed the parser and the whole fit, and the analyses
    # after it failed: exit 3, "the check failed: ValueError: Overflow when unpacking long".
    (tmp_path / "models.py").write_text(
        "from brittle.digits import digits_model\n\n\n"
        "def build():\n    return digits_model('robust')\n"
    )
    argv = ["--model", f"{tmp_path / 'models.py'}:build", "--data", "digits", *FAST[:4]]
    argv += ["--n", "200", "--attack-subset", "20", "--target-tpr", "0.8", "--no-progress"]
    code, _, stderr = run_main([*argv, "--seed", str(2**64), "--out", tmp_path / "o"])
    assert code == 2 and stderr.count("\n") == 1, stderr
    assert stderr.startswith("brittle-check: error: --seed: expected an integer in [0, 2**64)")
    code, _, stderr = run_main([*argv, "--seed", str(2**64 - 1), "--out", tmp_path / "o"])
    assert code == 0, stderr


def test_model_specs_in_folders_whose_names_hold_an_at_sign(tmp_path: Path) -> None:
    # Before, the first "@" always split MONITOR.pt@SPEC: a factory in a folder such
    # as Jenkins' "job@2" workspace was read as the monitor file "job".
    folder = tmp_path / "job@2"
    folder.mkdir()
    (folder / "models.py").write_text("from brittle.digits import digits_cnn as build\n")
    source = load_model(f"{folder / 'models.py'}:build")
    assert source.monitor_path is None and type(source.model).__name__ == "Sequential"
    (folder / "monitor.pt").write_bytes(b"")
    spec = f"{folder / 'monitor.pt'}@{folder / 'models.py'}:build"
    source = load_model(spec)
    assert source.monitor_path == folder / "monitor.pt" and source.spec == spec
    with pytest.raises(UsageError, match=r"no saved monitor at .*missing\.pt"):
        load_model(f"{folder / 'missing.pt'}@brittle.digits:digits_cnn")


def test_a_saved_monitor_refuses_an_eps_or_norm_it_would_ignore(tmp_path: Path) -> None:
    # Before, --eps and --norm were silently ignored for MONITOR.pt@SPEC (it runs at
    # its own), and report.json's check_settings recorded the ignored values.
    for option, value in (("--eps", "0.05"), ("--norm", "L2")):
        code, _, stderr = run_main(
            ["--model", f"{tmp_path / 'm.pt'}@brittle.digits:digits_cnn", "--data", "digits"]
            + [option, value, "--out", tmp_path / "o"]
        )
        assert code == 2 and stderr.startswith(f"brittle-check: error: {option}: a saved monitor")
        assert stderr.count("\n") == 1


def test_a_saved_monitor_reads_its_figures_at_the_target_tpr_asked(
    model_file: Path, digits_npz: Path, margin_cache: Path, tmp_path: Path
) -> None:
    # Before, --target-tpr was silently ignored for a saved monitor with a report (its
    # FPR@TPR figures were read at the fitted target), while check_settings recorded the
    # ignored value: report.json said 0.95 and 0.8 side by side.
    model = load_model(f"{model_file}:standard").model
    monitor = brittle.wrap(model, eps=0.1)
    monitor.fit(load_data(str(digits_npz)).x[:120], steps=3, pseudo=False, progress=False)
    saved = monitor.save(tmp_path / "monitor.pt")
    own_eps = [a for a in FAST if a not in ("--eps", "0.1")]  # the monitor's own eps
    check = digits_check(
        f"{saved}@{model_file}:standard", margin_cache, digits_npz, 60, 10, own_eps
    )
    for asked, used in ((["--target-tpr", "0.8"], 0.8), ([], monitor.report.target_tpr)):
        out = tmp_path / f"out{len(asked)}"
        code, stdout, stderr = run_main([*check, *asked, "--out", out])
        assert code == 0, stderr
        payload = read_report(out)
        assert payload["target_tpr"] == payload["check_settings"]["target_tpr"] == used
        assert f"FPR@{percent(used)}" in stdout


def test_a_folder_named_like_a_file_is_called_a_folder(tmp_path: Path) -> None:
    # Before, a folder called x.npz (or model.py) was "no such file".
    for option, name in (("--data", "x.npz"), ("--model", "model.py")):
        (tmp_path / name).mkdir()
        argv = ["--model", "brittle.digits:digits_cnn", "--data", "digits"]
        argv[argv.index(option) + 1] = str(tmp_path / name) + (
            ":build" if name == "model.py" else ""
        )
        code, _, stderr = run_main([*argv, "--out", tmp_path / "o"])
        assert code == 2 and stderr.startswith(f"brittle-check: error: {option}: a directory")


def test_data_of_the_wrong_shape_exit_2(model_file: Path, tmp_path: Path) -> None:
    np.savez(tmp_path / "flat.npz", x=np.zeros((5, 64), dtype=np.float32))
    np.savez(tmp_path / "rgb.npz", x=np.zeros((5, 3, 8, 8), dtype=np.float32))
    np.savez(tmp_path / "range.npz", x=np.full((5, 1, 8, 8), 3.0, dtype=np.float32))
    np.savez(tmp_path / "labels.npz", x=np.zeros((5, 1, 8, 8), dtype=np.float32), y=np.zeros(4))
    np.savez(tmp_path / "empty.npz", x=np.zeros((5, 0, 8, 8), dtype=np.float32))
    for name, needle in (
        ("flat", "(N, C, H, W)"),
        ("rgb", "cannot take inputs"),
        ("range", "[0, 1]"),
        ("labels", "'y'"),
        ("empty", "(5, 0, 8, 8)"),  # before: min()'s "Expected reduction dim to be specified"
    ):
        code, _, stderr = run_main(
            [
                "--model",
                f"{model_file}:standard",
                "--data",
                tmp_path / f"{name}.npz",
                "--out",
                tmp_path / "out",
            ]
        )
        assert code == 2, name
        assert stderr.startswith("brittle-check: error: --data") and needle in stderr, stderr
        assert stderr.count("\n") == 1


def test_factory_errors_name_the_model(model_file: Path) -> None:
    with pytest.raises(UsageError, match="must return a torch.nn.Module; got int"):
        load_model(f"{model_file}:not_a_model")
    with pytest.raises(UsageError, match="did you mean robust"):
        load_model(f"{model_file}:robst")
    with pytest.raises(UsageError, match="name the factory"):
        load_model(str(model_file))
    with pytest.raises(UsageError, match="holds no model weights"):
        load_model(str(REPO / "pyproject.toml"))


def test_a_weights_file_as_the_model_says_how_to_load_it(tmp_path: Path) -> None:
    # Before, a state_dict given as --model was taken for a saved monitor: the message
    # only said that a monitor holds no weights and asked for MONITOR.pt@MODEL_SPEC.
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(UsageError, match=r"state_dict.*file\.py:factory.*weights_only=True"):
        load_model(str(path))


def test_help_explains_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "brittle.check", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    options = [
        "--demo",
        "--model",
        "--data",
        "--dataset",
        "--threat-model",
        "--model-dir",
        "--data-dir",
        "--image-size",
        "--eps",
        "--norm",
        "--n",
        "--target-tpr",
        "--steps",
        "--engine",
        "--batch-size",
        "--device",
        "--seed",
        "--cache-dir",
        "--save-monitor",
        "--export-onnx",
        "--min-tau",
        "--attack-subset",
        "--out",
    ]
    for option in options:
        assert re.search(rf"^\s+{re.escape(option)}\b", result.stdout, re.M), option
    from brittle.attacks.attack import ENGINES

    for engine in ENGINES:
        assert engine in result.stdout
    assert "exit status" in result.stdout
    # Before, --demo said it trained the CNNs "or loads them from the cache directory"
    # (their weights ship with brittle) and --export-onnx left the graph's pred out.
    text = " ".join(result.stdout.split())
    assert "cache directory" not in text and "weights ship with brittle" in text
    assert "ONNX graph (input -> logits, pred, margin, flag)" in text


def test_a_factory_whose_weights_do_not_load_says_which(tmp_path: Path) -> None:
    # PyTorch's load_state_dict error puts what is wrong on the lines after its first,
    # "Error(s) in loading state_dict for Net:"; the command printed that line alone.
    source = textwrap.dedent(
        """
        import torch
        from torch import nn

        def net():
            return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))

        def wrong_shape():
            state = net().state_dict()
            state["3.weight"] = torch.zeros(5, 16)
            model = net()
            model.load_state_dict(state)
            return model

        def data_parallel():
            state = {f"module.{k}": v for k, v in net().state_dict().items()}
            model = net()
            model.load_state_dict(state)
            return model
        """
    )
    (tmp_path / "models.py").write_text(source)
    expected = {
        "wrong_shape": ["size mismatch for 3.weight", "[5, 16]", "[10, 16]"],
        "data_parallel": [
            'Missing key(s) in state_dict: "1.weight", "1.bias", "3.weight" and 1 more',
            'Unexpected key(s) in state_dict: "module.1.weight"',
        ],
    }
    for factory, needles in expected.items():
        argv = ["--model", f"{tmp_path / 'models.py'}:{factory}", "--data", "digits"]
        code, _, stderr = run_main([*argv, "--out", tmp_path / "out"])
        assert code == 2 and stderr.count("\n") == 1, stderr
        assert stderr.startswith("brittle-check: error: --model:"), stderr
        for needle in needles:
            assert needle in stderr, stderr


def test_setup_errors_exit_2_before_any_work(model_file: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    (tmp_path / "raises.py").write_text("def build():\n    raise RuntimeError('no weights here')\n")
    base = ["--model", f"{model_file}:standard", "--data", "digits", "--n", "60", *FAST]
    cases = [
        (base + ["--out", tmp_path / "file"], "--out"),
        (base + ["--out", tmp_path / "file" / "sub"], "--out"),
        (base + ["--out", tmp_path / "o", "--save-monitor", tmp_path], "--save-monitor"),
        (
            base + ["--out", tmp_path / "o", "--export-onnx", tmp_path / "file" / "m.onnx"],
            "--export-onnx",
        ),
        (base + ["--out", tmp_path / "o", "--cache-dir", tmp_path / "file"], "--cache-dir"),
        (
            [
                "--model",
                f"{tmp_path / 'raises.py'}:build",
                "--data",
                "digits",
                "--out",
                tmp_path / "o",
            ],
            "--model",
        ),
    ]
    for argv, option in cases:
        start = time.perf_counter()
        code, stdout, stderr = run_main(argv)
        assert code == 2, (option, stderr)
        assert stderr.startswith(f"brittle-check: error: {option}"), stderr
        assert stderr.count("\n") == 1 and "Traceback" not in stderr
        assert time.perf_counter() - start < 20, "the path was checked only after the work"
    assert "no weights here" in run_main(cases[-1][0])[2]


def model_that_stops(statement: str) -> str:
    """The source of a digits model whose fourth forward pass runs ``statement``."""
    return (
        "import sys, torch\n"
        "class Stops(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(64, 10)\n"
        "        self.calls = 0\n"
        "    def forward(self, x):\n"
        "        self.calls += 1\n"
        "        if self.calls > 3:\n"
        f"            {statement}\n"
        "        return self.fc(x.flatten(1))\n"
        "def build():\n"
        "    return Stops()\n"
    )


def test_a_crash_during_the_check_is_not_the_gate(model_file: Path, tmp_path: Path) -> None:
    broken = model_that_stops("raise ArithmeticError('model broke mid-way')")
    (tmp_path / "bad.py").write_text(broken)
    code, _, stderr = run_main(
        [
            "--model",
            f"{tmp_path / 'bad.py'}:build",
            "--data",
            "digits",
            "--n",
            "60",
            "--out",
            tmp_path / "o",
            *FAST,
        ]
    )
    assert code == 3 and "model broke mid-way" in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr


def test_a_sys_exit_in_the_model_code_is_not_a_check_that_ran(tmp_path: Path) -> None:
    # Before, main() took any SystemExit for argparse's --help: a factory calling
    # sys.exit(0) ended the command with status 0 and no output, as if the check had
    # passed, and a training script parsing its own arguments at import time printed
    # its own usage and exited with its own code.
    (tmp_path / "exits.py").write_text("import sys\ndef build():\n    sys.exit(0)\n")
    (tmp_path / "script.py").write_text(
        "import argparse\n"
        "parser = argparse.ArgumentParser()\n"
        # Required: it exits whatever arguments pytest itself was given.
        "parser.add_argument('--lr', type=float, required=True)\n"
        "args = parser.parse_args()\n"
        "def build():\n"
        "    return None\n"
    )
    (tmp_path / "forward.py").write_text(model_that_stops("sys.exit()"))
    base = ["--data", "digits", "--n", "60", "--out", tmp_path / "o", *FAST]
    for factory, code, needle in (
        ("exits.py:build", 2, "SystemExit(0)"),
        ("script.py:build", 2, "SystemExit(2)"),
        ("forward.py:build", 3, "the check failed: SystemExit"),
    ):
        got, _, stderr = run_main(["--model", f"{tmp_path / factory}", *base])
        assert got == code, (factory, stderr)
        last = stderr.splitlines()[-1]  # argparse prints the script's own usage first
        assert last.startswith("brittle-check: error: ") and needle in last, stderr
    assert run_main(["--help"])[0] == 0


def test_console_shows_the_target_tpr_with_its_own_digits() -> None:
    # Before, a target of 0.995 read "guarantee: ... >= 100%" (rounded to whole percent).
    from brittle.check.console import flag_text

    payload = {"threshold": 0.25, "tpr": 1.0, "tpr_ci": [0.9, 1.0], "fpr": 0.5}
    payload |= {"fpr_ci": [0.4, 0.6], "n_calibration": 140, "target_tpr": 0.995}
    assert flag_text(payload).endswith(">= 99.5%")


def test_plots_of_a_report_with_infinite_scores(tmp_path: Path) -> None:
    # A report reads an infinite score back as inf ("Infinity" in report.json), as the
    # metrics rank it; the ROC and precision-recall plot handed it to scikit-learn, which
    # refuses infinities: the check died after its attacks with a ValueError.
    pytest.importorskip("matplotlib")
    from brittle.calibrate.metrics import ScoreMetrics
    from brittle.check.plots import PLOT_FILES, write_plots

    inf = math.inf
    metrics = ScoreMetrics(tau=0.8, tau_ci=(0.1, 1.0), auroc=1.0, aupr=1.0, fpr_at_tpr=0.0, n=6)
    report = ConsistencyReport(
        n=6,
        eps=0.25,
        norm="Linf",
        accuracy=None,
        nonrobust_fraction=0.5,
        censored=1,
        input_margins=np.array([0.1, 0.2, 0.3, 0.5, 0.6, inf]),
        score_values={"logit": np.array([-inf, 0.2, 0.4, 0.5, 1.0, inf])},
        metrics={"logit": metrics},
        chosen="logit",
        reason="requested",
        threshold=0.4,
        target_tpr=0.9,
        tpr=1.0,
        fpr=0.0,
        tpr_ci=(0.3, 1.0),
        fpr_ci=(0.0, 0.7),
        timings={},
        predictions=np.zeros(6, dtype=np.int64),
        labels=None,
        calibration=np.ones(6, dtype=bool),
    )
    payload = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert payload["score_values"]["logit"][-1] == "Infinity"
    rows = [{"class": 0, "nonrobust_by_margin": 0.5, "nonrobust_by_flag": 0.5}]
    payload |= {"baselines": {}, "per_class": {"by": "prediction", "classes": rows}}
    written = write_plots(payload, tmp_path)
    assert [p.stem for p in written] == list(PLOT_FILES)
    assert all(p.stat().st_size > 0 for p in written)
