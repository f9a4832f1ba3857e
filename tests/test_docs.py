"""The documentation site builds offline with no warnings and documents every public name."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import brittle
import brittle.functional

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for module in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log[-5000:]}"
    assert "WARNING" not in log, log
    return out


@pytest.mark.slow
def test_docs_build_strict(site: Path) -> None:
    for page in ("index", "guide", "faq", "distributed", "api", "api-functional", "api-modules"):
        assert (site / page / "index.html").is_file() or (site / f"{page}.html").is_file(), page


@pytest.mark.slow
def test_api_reference_covers_every_public_name(site: Path) -> None:
    api = (site / "api" / "index.html").read_text()
    for name in brittle.__all__:
        if name in ("functional", "__version__"):
            continue
        assert f'id="brittle.{name}"' in api, f"brittle.{name} is missing from docs/api.md"
    functional = (site / "api-functional" / "index.html").read_text()
    for name in brittle.functional.__all__:
        if name == "ScoreMetrics":  # documented once, as brittle.ScoreMetrics
            continue
        anchor = f'id="brittle.functional.{name}"'
        assert anchor in functional, f"brittle.functional.{name} is missing from the API pages"


@pytest.mark.slow
def test_docstring_examples_render_as_code(site: Path) -> None:
    # brittle's docstrings head doctests with "Example:"; mkdocs.yml makes griffe read
    # that as an examples section, so ">>>" lines are code, not nested block quotes.
    api = (site / "api" / "index.html").read_text()
    assert '<span class="gp">&gt;&gt;&gt; </span>' in api
    assert "<blockquote>" not in api


def test_the_overhead_quoted_is_the_benchmarks_figure() -> None:
    # Before, docs/index.md said the monitor "adds 1-2 %" to a ResNet-18 forward pass,
    # the figure of an older benchmark; benchmarks/README.md measures 0.14-0.79 %.
    bench = (ROOT / "benchmarks" / "README.md").read_text()
    section = bench[bench.index("## Monitor overhead") : bench.index("## ONNX")]
    measured = [float(v) for v in re.findall(r"\*\*([\d.]+) %\*\*", section)]
    assert len(measured) == 4, measured
    for doc in ("README.md", "docs/index.md"):
        text = " ".join((ROOT / doc).read_text().split())
        claim = re.search(r"[^.;|]*ResNet-18 forward pass[^;|]*", text)
        assert claim is not None, doc
        for bound, value in re.findall(r"(under )?([\d.]+) %", claim.group(0)):
            # Each figure is a measured one rounded, or a bound ("under 1 %") above them all.
            close = any(abs(float(value) - m) <= 0.05 for m in measured)
            assert close or (bound and float(value) >= max(measured)), (doc, claim.group(0))
