"""Failures leave the user's objects as they were: refits, labels, killed fits, damaged caches."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brittle
import brittle.calibrate.holdout
from brittle.calibrate.cache import MarginCache, model_fingerprint
from brittle.digits import DigitsSplit
from tests.conftest import DIGITS_EPS

FIT = {"steps": 10, "progress": False, "target_tpr": 0.9}


def _snapshot(monitor: brittle.Monitor) -> dict[str, object]:
    return {
        "state": {
            k: v.clone() for k, v in monitor.state_dict().items() if isinstance(v, torch.Tensor)
        },
        "extra": copy.deepcopy(monitor.get_extra_state()),
        "eps": monitor.eps,
        "score": monitor.score,
        "pseudo": None if monitor.pseudo is None else copy.deepcopy(monitor.pseudo.state_dict()),
        "report": monitor.report.to_dict(),
    }


def _same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        assert torch.equal(a["state"][key], b["state"][key]), key
    assert a["extra"] == b["extra"] and a["eps"] == b["eps"] and a["score"] == b["score"]
    assert a["report"] == b["report"]
    assert (a["pseudo"] is None) == (b["pseudo"] is None)


def _interrupted(loader: DataLoader, after: int) -> Iterator[object]:
    for i, batch in enumerate(loader):
        if i == after:
            raise KeyboardInterrupt
        yield batch


def test_a_failed_refit_leaves_the_monitor_as_it_was(
    pseudo_monitor: brittle.Monitor, holdout_loader: DataLoader
) -> None:
    monitor = copy.deepcopy(pseudo_monitor)
    before = _snapshot(monitor)
    with pytest.raises(ValueError, match="none of the"):
        monitor.fit(holdout_loader, n_samples=60, eps=1e-6, **FIT)  # no non-robust sample
    _same(before, _snapshot(monitor))
    with pytest.raises(KeyboardInterrupt):
        monitor.fit(_interrupted(holdout_loader, after=1), eps=0.5, **FIT)
    _same(before, _snapshot(monitor))
    assert monitor.is_fitted and monitor.pseudo is not None
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(monitor(x).margin, pseudo_monitor(x).margin)


def test_a_failed_first_fit_undoes_the_head_discovery(
    standard_model: nn.Module, digits: DigitsSplit
) -> None:
    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS)
    before = {k: v.clone() for k, v in monitor.state_dict().items() if isinstance(v, torch.Tensor)}
    extra = copy.deepcopy(monitor.get_extra_state())
    x = digits.x_holdout[:60]
    with pytest.raises(ValueError, match="none of the"):
        monitor.fit(x, eps=1e-6, pseudo=False, **FIT)  # fails after the first batch was read
    with pytest.raises(KeyboardInterrupt):
        monitor.fit(_interrupted(DataLoader(x, batch_size=20), after=1), **FIT)
    after = {k: v for k, v in monitor.state_dict().items() if isinstance(v, torch.Tensor)}
    assert before.keys() == after.keys()
    for key, value in before.items():  # the pair-norm table was left filled in
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    assert monitor.get_extra_state() == extra  # head, shapes
    assert not monitor.discovered and monitor.head_name is None


def test_bad_labels_fail_before_any_attack(
    standard_model: nn.Module, digits: DigitsSplit, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = brittle.calibrate.holdout.attack_batch
    monkeypatch.setattr(
        brittle.calibrate.holdout, "attack_batch", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    x, y = digits.x_holdout[:40], digits.y_holdout[:40]
    monitor = brittle.wrap(standard_model, eps=DIGITS_EPS)
    one_hot = DataLoader(TensorDataset(x, nn.functional.one_hot(y, 10).float()), batch_size=20)
    with pytest.raises(ValueError, match="one-hot"):
        monitor.fit(one_hot, **FIT)
    # Labels as a column: argmax (the one-hot advice) would turn every label into 0.
    with pytest.raises(ValueError, match=r"\(20, 1\) \(a column\? pass y.squeeze\(1\)\)"):
        monitor.fit([(x[:20], y[:20, None])], **FIT)
    short = [(x[:20], y[:10])]
    with pytest.raises(ValueError, match=r"shape \(batch,\) = \(20,\)"):
        monitor.fit(short, **FIT)
    with pytest.raises(ValueError, match=r"in \[0, 10\)"):
        monitor.fit([(x[:20], y[:20] + 10)], **FIT)
    assert calls == [] and not monitor.is_fitted


def test_half_precision_models_are_refused_with_the_way_out(standard_model: nn.Module) -> None:
    monitor = brittle.wrap(copy.deepcopy(standard_model).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"float32 copy .*brittle.load"):
        monitor.fit(torch.rand(8, 1, 8, 8, dtype=torch.bfloat16), **FIT)
    assert not monitor.is_fitted


_KILLED_FIT = """
import sys, torch, brittle
from brittle.digits import digits_model
model = digits_model("robust", cache_dir=sys.argv[1])
x = torch.load(sys.argv[2], weights_only=True)
print("ready", flush=True)
brittle.wrap(model, eps=0.1).fit(
    [x[i : i + 10] for i in range(0, len(x), 10)],
    steps=30, progress=False, cache_dir=sys.argv[3], target_tpr=0.8,
)
print("finished", flush=True)
"""


@pytest.mark.slow
def test_a_killed_fit_resumes_from_its_cache_with_identical_margins(
    robust_model: nn.Module, digits: DigitsSplit, model_cache: Path, tmp_path: Path
) -> None:
    x = digits.x_holdout[:120]
    torch.save(x, tmp_path / "x.pt")
    cache = tmp_path / "cache"
    script = tmp_path / "fit.py"
    script.write_text(textwrap.dedent(_KILLED_FIT))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(model_cache), str(tmp_path / "x.pt"), str(cache)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(cache.glob("*.pt"))) < 3:
            assert proc.poll() is None, "the fit ended before it could be killed"
            time.sleep(0.05)
        done = len(list(cache.glob("*.pt")))
        assert done >= 3
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert len(list(cache.glob("*.pt"))) < 12, "the fit finished before the kill"
    batches = [x[i : i + 10] for i in range(0, len(x), 10)]
    fit = {"steps": 30, "progress": False, "target_tpr": 0.8}
    resumed = brittle.wrap(robust_model, eps=0.1).fit(batches, cache_dir=cache, **fit)
    fresh = brittle.wrap(robust_model, eps=0.1).fit(batches, **fit)
    np.testing.assert_array_equal(resumed.report.input_margins, fresh.report.input_margins)


def test_a_damaged_cache_entry_is_recomputed_never_trusted(
    robust_model: nn.Module, digits: DigitsSplit, tmp_path: Path
) -> None:
    from brittle.attacks.settings import AttackSettings

    x, at = digits.x_holdout[:10], torch.arange(10)
    cache = MarginCache(tmp_path, robust_model, AttackSettings(steps=5), "brittle")
    margins = torch.linspace(0.1, 1.0, 10, dtype=torch.float64)
    cache.put(x, at, margins)
    torch.testing.assert_close(cache.get(x, at), margins)
    (entry,) = tmp_path.glob("*.pt")
    data = bytearray(entry.read_bytes())
    # Flip bytes inside the stored tensor: the file still loads, the checksum does not match.
    start = bytes(data).find(margins.numpy().tobytes()[:8])
    assert start > 0
    data[start : start + 8] = np.float64(0.0).tobytes()
    entry.write_bytes(bytes(data))
    assert cache.get(x, at) is None and cache.damaged == 1 and not entry.exists()
    cache.put(x, at, margins)
    entry.write_bytes(entry.read_bytes()[:50])  # truncated
    assert cache.get(x, at) is None and cache.damaged == 2


def test_margins_cached_by_an_earlier_engine_version_are_not_reused(
    robust_model: nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = brittle.attacks.attack.AttackSettings(steps=5)
    current = MarginCache(tmp_path, robust_model, settings, "brittle").key
    monkeypatch.setitem(brittle.calibrate.cache.ENGINE_VERSIONS, "brittle", 1)
    assert MarginCache(tmp_path, robust_model, settings, "brittle").key != current


def test_models_with_scalar_buffers_fit_with_a_margin_cache(
    robust_model: nn.Module, digits: DigitsSplit, tmp_path: Path
) -> None:
    # Batch norm keeps a 0-d num_batches_tracked buffer; the fingerprint failed on it
    # ("self.dim() cannot be 0 to view Long as Byte").
    norm = nn.BatchNorm2d(1).eval()
    model = nn.Sequential(norm, robust_model)
    before = model_fingerprint(model)
    norm.num_batches_tracked += 1
    assert model_fingerprint(model) != before
    x = digits.x_holdout[:100]
    fit = {"steps": 5, "progress": False, "target_tpr": 0.8, "pseudo": False}
    cached = brittle.wrap(model, eps=DIGITS_EPS).fit(x, cache_dir=tmp_path, **fit)
    assert len(list(tmp_path.glob("*.pt"))) == 1
    fresh = brittle.wrap(model, eps=DIGITS_EPS).fit(x, **fit)
    np.testing.assert_array_equal(cached.report.input_margins, fresh.report.input_margins)


def test_a_changed_non_persistent_buffer_changes_the_cache_key(robust_model: nn.Module) -> None:
    # A buffer left out of the state_dict (persistent=False) still changes the margins:
    # halving this input scale moved the median margin from 0.17 to 0.14, and the cache
    # served the old model's margins.
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = robust_model
            self.register_buffer("scale", torch.ones(1), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x * self.scale)

    model = Scaled()
    before = model_fingerprint(model)
    model.scale.fill_(0.5)
    assert model_fingerprint(model) != before
    assert model_fingerprint(robust_model) == model_fingerprint(copy.deepcopy(robust_model))


def test_cached_margins_are_keyed_by_position_as_restarts_are_drawn(
    robust_model: nn.Module, digits: DigitsSplit, tmp_path: Path
) -> None:
    # A sample's random restarts are drawn from its holdout position, so the same
    # batches in another order get other margins: a fit over the reordered batches
    # must not reuse the first order's entries. Before the positions were in the key,
    # 13-18 of 100 margins came from the other order (L2, restarts=4).
    x = digits.x_holdout[:40]
    first, second = x[:20], x[20:]
    fit = {"steps": 2, "restarts": 4, "progress": False, "target_tpr": 0.8}
    brittle.wrap(robust_model, eps=0.5, norm="L2").fit([first, second], cache_dir=tmp_path, **fit)
    swapped = [second, first]
    cached = brittle.wrap(robust_model, eps=0.5, norm="L2").fit(swapped, cache_dir=tmp_path, **fit)
    fresh = brittle.wrap(robust_model, eps=0.5, norm="L2").fit(swapped, **fit)
    np.testing.assert_array_equal(cached.report.input_margins, fresh.report.input_margins)
