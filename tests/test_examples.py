"""Every script in examples/ runs to completion, so none of them rots.

Each example runs as a subprocess, one thread per process, on small settings
where its command line has them, with an empty HOME under which it must write
nothing: the digits CNNs ship with brittle, so no example trains or caches a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# Folders under HOME that other libraries write when imported: onnxruntime its
# device id and telemetry database, gdown (robustbench's downloader) its cache.
THEIRS = (Path(".cache/Microsoft/DeveloperTools/.onnxruntime"), Path(".cache/gdown"))
TESTED = {
    "quickstart.py",
    "fit_digits.py",
    "distributed_fit.py",
    "deploy_onnx.py",
    "cli_npz.py",
    "robustbench_model.py",
    "fastapi_app.py",
}


@pytest.fixture
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty HOME (and XDG cache and config folders in it) for one example."""
    return tmp_path_factory.mktemp("home")


def _run(
    args: list[str], cwd: Path, home: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` in ``cwd``; it must succeed and write nothing under ``home``.

    The digits CNNs ship with brittle: an example that trained one, or cached
    anything, in the user's folders would leave a file under ``home``. matplotlib's
    font cache goes to a folder of its own, outside it; ``THEIRS`` are other
    libraries' folders.
    """
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "MPLCONFIGDIR": str(home.parent / f"{home.name}-matplotlib"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(args)} exited with {result.returncode}\n"
        f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
    )
    paths = [p.relative_to(home) for p in home.rglob("*")]
    above = {q for folder in THEIRS for q in folder.parents}
    written = sorted(
        str(p)
        for p in paths
        if p not in above and not any(p == f or f in p.parents for f in THEIRS)
    )
    assert written == [], f"{' '.join(args)} wrote under HOME: {written[:10]}"
    return result


def _example(name: str, *modules: str) -> Path:
    """Path of ``examples/<name>``; skips when it, or a module it needs, does not exist yet."""
    path = EXAMPLES / name
    if not path.is_file():
        pytest.skip(f"examples/{name} does not exist yet")
    for module in modules:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"examples/{name} needs {module}, which does not exist yet")
    return path


def test_every_example_is_run_here() -> None:
    found = {p.name for p in EXAMPLES.glob("*.py")}
    untested = sorted(found - TESTED)
    assert not untested, f"add a test for {untested} to tests/test_examples.py"


@pytest.mark.slow
def test_quickstart(tmp_path: Path, home: Path) -> None:
    out = _run([str(_example("quickstart.py"))], tmp_path, home).stdout
    assert "brittle consistency report: n=300" in out
    assert "chosen:" in out
    rows = [line.split() for line in out.splitlines()[-8:]]
    assert len(rows) == 8 and all(row[-1] in ("True", "False") for row in rows)
    # docs/guide.md shows this report: the same lines, but for the numbers. Before, it
    # showed an older layout (no choice samples, no intervals, no guarantee line).
    guide = (ROOT / "docs" / "guide.md").read_text()
    shown = guide[guide.index("## Read the report") :].split("```text\n", 1)[1].split("```")[0]
    printed = out[out.index("brittle consistency report") :].splitlines()[: shown.count("\n")]
    number = re.compile(r"\d+(\.\d+)?")
    assert [number.sub("#", line) for line in shown.splitlines()] == [
        number.sub("#", line) for line in printed
    ]


@pytest.mark.slow
def test_fit_digits(tmp_path: Path, home: Path) -> None:
    script = _example("fit_digits.py")
    args = [str(script), "--samples", "200", "--steps", "10", "--pseudo", "false"]
    out = _run(args, tmp_path, home).stdout
    assert "=== standard digits CNN ===" in out and "=== robust digits CNN ===" in out
    table = out[out.index("model     score") :].splitlines()[1:]
    kinds = {(row.split()[0], row.split()[1]) for row in table if row.strip()}
    assert kinds == {(m, s) for m in ("standard", "robust") for s in ("logit", "feature")}


@pytest.mark.slow
def test_distributed_fit_on_two_processes(tmp_path: Path, home: Path) -> None:
    script = _example("distributed_fit.py")
    args = [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        "--out",
        str(tmp_path / "run"),
        "--samples",
        "200",
        "--steps",
        "10",
    ]
    out = _run(args, tmp_path, home).stdout
    assert "brittle consistency report: n=200" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["n"] == 200 and len(report["input_margins"]) == 200
    assert (tmp_path / "run" / "monitor.pt").is_file()


@pytest.mark.slow
def test_deploy_onnx(tmp_path: Path, home: Path) -> None:
    script = _example("deploy_onnx.py", "brittle.deploy.onnx", "onnxruntime")
    args = [str(script), "--cache-dir", str(tmp_path / "margins"), "--out", str(tmp_path)]
    out = _run(args, tmp_path, home).stdout
    assert (tmp_path / "digits-monitor.onnx").is_file()
    assert "torch imported by the server: False" in out
    served = out[out.index("sample  pred  margin  brittle") :].splitlines()[1:7]
    assert served[2].split()[1:] == ["-1", "nan", "True"]  # the NaN request fails closed


@pytest.mark.slow
def test_fastapi_app(tmp_path: Path, home: Path) -> None:
    script = _example("fastapi_app.py", "fastapi", "prometheus_client")
    lines = _run([str(script)], tmp_path, home).stdout.splitlines()
    assert lines[0].startswith("clean: 519 digits") and lines[0].endswith("alarm False")
    assert lines[1].startswith("washed-out: 519 digits") and lines[1].endswith("alarm True")
    assert "brittle_samples_total 1038.0" in lines and "brittle_flag_rate_alarm 1.0" in lines
    assert "digits_requests_total 66.0" in lines


@pytest.mark.slow
def test_cli_on_an_npz(tmp_path: Path, home: Path) -> None:
    script = _example("cli_npz.py", "brittle.check")
    args = [str(script), "--samples", "200", "--steps", "10", "--out", str(tmp_path / "report")]
    out = _run(args, tmp_path, home).stdout
    assert "exit status 0" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["n"] == 200 and report["gate"]["passed"] is True
    assert (tmp_path / "report" / "monitor.pt").is_file()


def test_robustbench_example_skips_without_a_checkpoint(tmp_path: Path, home: Path) -> None:
    script = _example("robustbench_model.py")
    args = [str(script), "--model-dir", str(tmp_path / "models")]
    out = _run(args, tmp_path, home).stdout
    assert out.startswith("skipped: no checkpoint at")
    assert "load_model('Wong2020Fast'" in out


@pytest.mark.slow
def test_robustbench_example_loads_a_local_checkpoint(tmp_path: Path, home: Path) -> None:
    script = _example("robustbench_model.py")
    from brittle.compat import import_robustbench

    import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    # A checkpoint of the real architecture (random weights) where load_model looks for it.
    entry = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Wong2020Fast"]
    folder = tmp_path / "models" / "cifar10" / "Linf"
    folder.mkdir(parents=True)
    torch.save({"state_dict": entry["model"]().state_dict()}, folder / "Wong2020Fast.pt")
    args = [str(script), "--model-dir", str(tmp_path / "models"), "--data-dir", str(tmp_path)]
    out = _run(args, tmp_path, home).stdout
    assert "loaded Wong2020Fast" in out
    assert "head 'linear': 10 classes, 512 features" in out
    assert "skipped fit: no cifar10 test set" in out
