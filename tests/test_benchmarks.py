"""The benchmark scripts' own behaviour: what they refuse, what they leave behind.

The scripts' figures are not tested here (they are timings, recorded in
``benchmarks/README.md``); these tests run each script in a mode that costs
seconds and check what it tells a user who asks for something it cannot do.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _run(
    script: str, *args: str, timeout: float = 120, cwd: Path = ROOT, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("bench_fab.py", ("--device", "cuda", "--quick")),
        ("bench_margins.py", ("--device", "cuda", "--quick", "--n", "2", "--plot", "")),
        ("bench_serve.py", ("--provider", "cuda", "--quick", "--models", "digits")),
        ("bench_overhead_gpu.py", ("--repeats", "1")),
    ],
)
def test_a_gpu_benchmark_says_there_is_no_gpu(script: str, args: tuple[str, ...]) -> None:
    # Before, --device cuda failed deep inside torch with a traceback, and
    # bench_serve's --provider cuda fell back to the CPU in its servers and
    # printed CPU figures under the heading "cuda".
    result = _run(script, *args)
    assert result.returncode != 0, result.stdout[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "CUDA device" in result.stderr, result.stderr[-2000:]


def test_a_baseline_that_is_not_a_checkout_is_refused(tmp_path: Path) -> None:
    # Before, --baseline took any path: its PYTHONPATH pointed nowhere, the installed
    # brittle served as the "baseline", and the table compared this code with itself.
    result = _run("bench_serve.py", "--quick", "--baseline", str(tmp_path / "no-such"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "is not a brittle checkout" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_feature_margin_methods_are_timed_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before, bench_overhead.py interleaved the table and the vectorised minimum and
    # then timed the Python loop alone, three runs after them, so the loop's ratio
    # was not measured side by side.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = importlib.import_module("bench_overhead")
    timed: list[list[str]] = []
    interleaved = bench.interleaved

    def recorded(fns: dict[str, Any], repeats: int, **kwargs: Any) -> Any:
        timed.append(sorted(fns))
        return interleaved(fns, repeats, **kwargs)

    monkeypatch.setattr(bench, "interleaved", recorded)
    rows = bench.feature_margin_speed(batch=4, repeats=1, loop_samples=1)
    assert timed == [["loop", "table", "vectorised"]]
    assert len(rows) == 3 and "scaled from 1 samples" in rows[2], rows


@pytest.mark.skipif(
    importlib.util.find_spec("alibi_detect") is not None, reason="alibi-detect is installed"
)
def test_the_alarm_benchmark_asks_for_alibi_detect_before_it_starts() -> None:
    # Before, the default run spent minutes on the promise and learning parts and
    # then stopped with a ModuleNotFoundError traceback in the delay part.
    result = _run("bench_alarm.py", "--holdouts", "2", "--paths", "1", "--check-streams", "0")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--no-fet" in result.stderr
    assert result.stdout == ""  # no part ran


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "args"),
    [
        ("bench_onnx.py", ("--classes", "10", "--size", "32", "--repeats", "1")),
        ("bench_flood.py", ("--clients", "1", "--batch", "4", "--rounds", "1")),
    ],
)
def test_a_benchmark_leaves_no_files_behind(
    script: str, args: tuple[str, ...], tmp_path: Path
) -> None:
    # Before, bench_onnx.py, bench_flood.py and bench_serve.py exported their models
    # into tempfile.mkdtemp() folders and never removed them (129 MB a run of
    # bench_onnx.py at 10 classes, more at 1000).
    result = _run(script, *args, timeout=240, TMPDIR=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "|" in result.stdout  # it printed its table
    # torch and onnxscript keep their caches there too (torchinductor_*, .ses): not ours.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bench-")] == []


@pytest.mark.slow
def test_the_in_process_serving_benchmark_prints_one_table() -> None:
    # Before, --asgi printed the HTTP table's header (requests/s, p50, p99, ...) with
    # no rows, and "4 closed-loop clients ... of 5 s per variant", before its own table.
    result = _run(
        "bench_serve.py", "--asgi", "--quick", "--rounds", "1", "--models", "digits", timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    headers = [line for line in result.stdout.splitlines() if line.startswith("| model |")]
    assert len(headers) == 1, result.stdout
    assert "in-process ASGI" in headers[0]
    assert "closed-loop clients" not in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| digits")]
    assert len(rows) == 4, result.stdout  # bare and monitor, batch 1 and 16


@pytest.mark.slow
def test_the_fab_benchmark_prints_how_many_samples_it_attacked() -> None:
    # Before, each row printed the number asked for: --n10 1000 printed 1000 for the
    # 719 holdout digits (whose last 8 were also the warm-up samples), and --nresnet
    # above 72 printed more ResNet inputs than were made. The warm-up takes 8.
    result = _run(
        "bench_fab.py",
        *("--n10", "1000", "--n100", "2", "--nresnet", "80"),
        *("--steps", "2", "--resnet-steps", "1", "--threads", "1", "--device", "cpu"),
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    counts = {
        line[:28].strip(): int(line[28:33])
        for line in result.stdout.splitlines()
        if line.startswith(("digits", "ResNet"))
    }
    assert counts == {
        "digits CNN, PGD, 10 classes": 719 - 8,
        "digits CNN, 100 classes": 2,
        "ResNet-18 32x32, random": 80,
    }, result.stdout


def test_a_quick_margins_run_leaves_the_docs_figure_alone(tmp_path: Path) -> None:
    # Before, every run without --plot wrote docs/img/margins_budget.png relative to
    # the working directory: from the checkout, a --quick smoke test (48 images at
    # most, shortened references) replaced the figure docs/margins.md shows; from
    # anywhere else, it made a docs/img folder there.
    figure = ROOT / "docs" / "img" / "margins_budget.png"
    before = figure.read_bytes()
    args = ("--quick", "--n", "2", "--models", "robust", "--norms", "Linf")
    result = _run("bench_margins.py", *args, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plot:" not in result.stdout
    assert list(tmp_path.iterdir()) == []
    assert figure.read_bytes() == before


def test_tf32_keeps_pytorch_default_matrix_products(monkeypatch: pytest.MonkeyPatch) -> None:
    # --tf32 is documented to keep PyTorch's default (TF32 convolutions, the setting the
    # GPU tables' TF32 rows were measured at), but it also turned TF32 on for matrix
    # products, which PyTorch leaves in float32: its runs measured another precision.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    models = importlib.import_module("models")
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        models.gpu_precision(True)
        assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
        models.gpu_precision(False)
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
