"""``python -m brittle.serve`` over real HTTP on 127.0.0.1, in a subprocess of its own.

One server serves the whole module (starting one costs seconds): the tests run in
file order and keep a tally of what the responses flagged, which ``/metrics`` must
equal. The clean digits are the holdout samples the monitor was not calibrated on;
the washed-out ones (``x * 0.3 + 0.35``, low contrast) have small margins. One
test starts a fresh server of its own, to see the alarm fire from a cold start.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.digits import DigitsSplit

DIGITS_EPS = 0.1
CALIBRATION = 240  # holdout samples the monitor is fitted on; the rest is clean traffic
RUN_LENGTH = 10**6  # the alarm's promise: expected clean samples between false alarms
TIMEOUT = 30.0  # seconds, for every request
# Runs the server as ``python -m brittle.serve`` does; a thread writes whether torch
# was ever imported to a file, which the test reads after the requests.
LAUNCH = """
import runpy, sys, threading, time
report = sys.argv.pop(1)
def watch():
    while True:
        with open(report, "w") as f:
            f.write(" ".join(m for m in ("torch", "brittle.monitor") if m in sys.modules))
        time.sleep(0.05)
threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "brittle.serve"
runpy.run_module("brittle.serve", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def onnx_path(
    robust_model: nn.Module, digits: DigitsSplit, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    torch.manual_seed(0)
    holdout = DataLoader(TensorDataset(digits.x_holdout, digits.y_holdout), batch_size=120)
    monitor = brittle.wrap(robust_model, score="logit", eps=DIGITS_EPS)
    monitor.fit(holdout, n_samples=CALIBRATION, steps=10, pseudo=False, progress=False)
    assert monitor.reference_flag_rate is not None
    folder = tmp_path_factory.mktemp("serve")
    return monitor.export_onnx(folder / "digits.onnx", digits.x_holdout[:4])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, body: bytes | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            raw, status = response.read(), response.status
    except urllib.error.HTTPError as err:
        raw, status = err.read(), err.code
    text = raw.decode()
    return status, json.loads(text) if text.startswith("{") else text


def _predict(url: str, inputs: Any, **extra: Any) -> tuple[int, Any]:
    return _request(f"{url}/predict", json.dumps({"inputs": inputs, **extra}).encode())


def _metrics(url: str) -> dict[str, float]:
    status, text = _request(f"{url}/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


@dataclass
class Server:
    url: str
    path: Path
    proc: subprocess.Popen[str]
    report: Path
    tally: dict[str, int] = field(default_factory=lambda: {"samples": 0, "flagged": 0})

    def count(self, response: dict[str, Any]) -> None:
        self.tally["samples"] += len(response["flag"])
        self.tally["flagged"] += sum(response["flag"])


@contextmanager
def _serve(onnx_path: Path, report: Path) -> Iterator[Server]:
    """``python -m brittle.serve`` in a subprocess, until the block ends (SIGTERM)."""
    port = _free_port()
    args = [
        str(onnx_path),
        *("--port", str(port), "--max-batch", "32", "--run-length", str(RUN_LENGTH)),
        *("--provider", "cpu", "--threads", "1"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, str(report), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}: {proc.communicate()}")
            try:
                if _request(f"{url}/healthz")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                pytest.fail("the server did not answer /healthz within 90 s")
            time.sleep(0.2)
        yield Server(url, onnx_path, proc, report)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(onnx_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with _serve(onnx_path, tmp_path_factory.mktemp("serve-report") / "modules.txt") as served:
        yield served


def test_healthz(server: Server, onnx_path: Path) -> None:
    status, body = _request(f"{server.url}/healthz")
    assert status == 200 and body["status"] == "ok" and body["model"] == onnx_path.name
    assert body["providers"] == ["CPUExecutionProvider"] and body["alarm_available"] is True


def test_concurrent_clean_traffic(server: Server, digits: DigitsSplit) -> None:
    x = digits.x_holdout[CALIBRATION:].numpy()
    batches = np.array_split(x, 64)  # 64 requests of 7 or 8 samples
    served = brittle.OnnxMonitor(server.path, ["CPUExecutionProvider"])
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda b: _predict(server.url, b.tolist()), batches))
    for batch, (status, body) in zip(batches, answers, strict=True):
        assert status == 200, body
        expected = served(batch)
        assert body["pred"] == expected.pred.tolist() and body["flag"] == expected.flag.tolist()
        np.testing.assert_allclose(body["margin"], expected.margin, rtol=1e-5, atol=1e-6)
        server.count(body)
    metrics = _metrics(server.url)
    assert metrics["brittle_samples_total"] == server.tally["samples"] == len(x)
    assert metrics["brittle_flagged_total"] == server.tally["flagged"]
    assert metrics["brittle_rejected_total"] == 0
    assert metrics['brittle_margin_bucket{le="+Inf"}'] == metrics["brittle_margin_count"] == len(x)
    # Clean digits flag at about the holdout's rate: no alarm.
    assert metrics["brittle_flag_rate_alarm"] == 0
    assert metrics["brittle_alarm_episodes_total"] == 0
    rate = server.tally["flagged"] / server.tally["samples"]
    assert rate < 2 * metrics["brittle_reference_flag_rate"]


def test_silent_on_5000_clean_digits(server: Server, digits: DigitsSplit) -> None:
    """Digits drawn like the holdout (resampled from those it was not fitted on): no alarm.

    The episode counter sees every switch-on, so it checks the alarm after every
    sample, as a scrape at any moment would.
    """
    pool = digits.x_holdout[CALIBRATION:].numpy()
    x = pool[np.random.default_rng(0).integers(0, len(pool), size=5000)]
    with ThreadPoolExecutor(max_workers=4) as pool_:
        answers = list(
            pool_.map(lambda b: _predict(server.url, b.tolist()), np.array_split(x, 160))
        )
    for status, body in answers:
        assert status == 200, body
        server.count(body)
    metrics = _metrics(server.url)
    assert metrics["brittle_samples_total"] == server.tally["samples"]
    assert metrics["brittle_alarm_episodes_total"] == 0
    assert metrics["brittle_flag_rate_alarm"] == 0
    assert (
        metrics["brittle_flag_rate_alarm_statistic"] < metrics["brittle_flag_rate_alarm_threshold"]
    )


def test_margin_histogram_buckets_from_calibration(server: Server) -> None:
    served = brittle.OnnxMonitor(server.path, ["CPUExecutionProvider"])
    metrics = _metrics(server.url)
    les = [k[len('brittle_margin_bucket{le="') : -2] for k in metrics if "_margin_bucket" in k]
    assert [float(le) for le in les[:-1]] == list(served.margin_buckets)
    assert les[-1] == "+Inf"
    assert f"{served.threshold:.4g}" in {f"{float(le):.4g}" for le in les[:-1]}


def test_logits_on_request_and_nan_row(server: Server, digits: DigitsSplit) -> None:
    x = digits.x_holdout[:3].numpy().copy()
    x[1, 0, 2, 2] = math.nan
    before = _metrics(server.url)
    status, body = _predict(server.url, x.tolist(), logits=True)
    assert status == 200, body
    server.count(body)
    assert body["flag"][1] is True and body["margin"][1] is None and body["pred"][1] == -1
    assert body["logits"][1] == [None] * 10 and len(body["logits"][0]) == 10
    assert all(isinstance(v, float) for v in body["logits"][0] + [body["margin"][0]])
    status, body = _predict(server.url, x[:1].tolist())
    assert "logits" not in body
    server.count(body)
    after = _metrics(server.url)
    assert after["brittle_rejected_total"] == before["brittle_rejected_total"] + 1
    assert after["brittle_samples_total"] == server.tally["samples"]


def test_nan_rows_are_rejected_and_leave_the_alarm_alone(server: Server) -> None:
    """Two requests of 32 all-NaN rows: 64 rejected samples, the alarm's statistic unmoved."""
    before = _metrics(server.url)
    rows = [[[[math.nan] * 8] * 8]] * 32
    for _ in range(2):
        status, body = _predict(server.url, rows)
        assert status == 200, body
        assert all(body["flag"]) and body["margin"] == [None] * 32
        server.count(body)
    after = _metrics(server.url)
    assert after["brittle_rejected_total"] == before["brittle_rejected_total"] + 64
    assert after["brittle_flag_rate_alarm"] == before["brittle_flag_rate_alarm"] == 0
    assert after["brittle_flag_rate_alarm_statistic"] == before["brittle_flag_rate_alarm_statistic"]
    assert after["brittle_alarm_episodes_total"] == 0


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b'{"inputs": [[1, 2', 400, "not valid JSON"),
        (b"[1, 2]", 422, 'JSON object {"inputs"'),
        (b'{"x": []}', 422, 'JSON object {"inputs"'),
        (b'{"inputs": 3}', 422, "must be a list"),
        (b'{"inputs": [[1, 2, 3]]}', 422, r"shape \(batch, 1, 8, 8\)\. Got \(1, 3\)"),
        (b'{"inputs": [[[[1, 2]]], [1]]}', 422, "nested lists of numbers"),
        (b'{"inputs": [["a"]]}', 422, "nested lists of numbers"),
        (b'{"inputs": [], "logits": "yes"}', 422, "logits must be true or false"),
        (json.dumps({"inputs": [[[[0.0] * 8] * 8]] * 33}).encode(), 413, "limit of 32"),
    ],
)
def test_bad_requests_get_4xx_and_the_server_lives_on(
    server: Server, body: bytes, status: int, reason: str
) -> None:
    before = _metrics(server.url)["brittle_samples_total"]
    got, answer = _request(f"{server.url}/predict", body)
    assert got == status
    detail = answer["detail"]
    assert "\n" not in detail and re.search(reason, detail), detail
    assert _request(f"{server.url}/healthz")[0] == 200
    assert _metrics(server.url)["brittle_samples_total"] == before


def test_empty_batch(server: Server) -> None:
    status, body = _predict(server.url, [])
    assert status == 200 and body["pred"] == [] and body["flag"] == []


def test_alarm_fires_on_washed_out_digits(server: Server, digits: DigitsSplit) -> None:
    washed = (digits.x_holdout[CALIBRATION:] * 0.3 + 0.35).numpy()
    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = np.array_split(washed, 20)
        answers = list(pool.map(lambda b: _predict(server.url, b.tolist()), batches))
    for status, body in answers:
        assert status == 200
        server.count(body)
    metrics = _metrics(server.url)
    assert metrics["brittle_samples_total"] == server.tally["samples"]
    assert metrics["brittle_flagged_total"] == server.tally["flagged"]
    assert metrics["brittle_flag_rate_alarm"] == 1
    assert (
        metrics["brittle_flag_rate_alarm_statistic"] >= metrics["brittle_flag_rate_alarm_threshold"]
    )
    assert metrics["brittle_alarm_episodes_total"] == 1


def test_fresh_server_fires_within_30_flagged_samples(
    onnx_path: Path, digits: DigitsSplit, tmp_path: Path
) -> None:
    """No warm-up: a cold server alarms within 30 samples of a stream that is all flagged."""
    served = brittle.OnnxMonitor(onnx_path, ["CPUExecutionProvider"])
    washed = (digits.x_holdout[CALIBRATION:] * 0.3 + 0.35).numpy()
    flagged = washed[served(washed).flag][:30]
    assert len(flagged) == 30 and served.reference_counts is not None
    assert served.reference_flag_rate is not None and served.reference_flag_rate <= 0.3
    with _serve(onnx_path, tmp_path / "modules.txt") as fresh:
        fired_at = None
        for i in range(30):
            status, body = _predict(fresh.url, flagged[i : i + 1].tolist())
            assert status == 200 and body["flag"] == [True]
            if _metrics(fresh.url)["brittle_flag_rate_alarm"] == 1:
                fired_at = i + 1
                break
    assert fired_at is not None and fired_at <= 30


def test_no_torch_in_the_server_and_sigterm_stops_it(server: Server) -> None:
    time.sleep(0.2)  # the watcher writes every 0.05 s
    loaded = server.report.read_text().split()
    assert "torch" not in loaded and "brittle.monitor" not in loaded, loaded
    os.kill(server.proc.pid, signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert server.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    out, err = server.proc.communicate(timeout=30)
    assert "brittle.serve: digits.onnx on http://127.0.0.1:" in out
    assert "fires at" in out and "run length 1e+06" in out and "Traceback" not in err


def test_missing_file_exits_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "brittle.serve", str(tmp_path / "missing.onnx")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "no ONNX file at" in result.stderr and "Traceback" not in result.stderr


def test_old_file_serves_without_alarm(tmp_path: Path) -> None:
    """A monitor without a reference rate (hand-set threshold): served, alarm unavailable."""
    from fastapi.testclient import TestClient

    from brittle.deploy.serve.app import create_app

    monitor = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), eps=0.1)
    monitor.set_threshold(0.1)
    path = monitor.export_onnx(tmp_path / "m.onnx", torch.rand(2, 1, 4, 4))
    served = brittle.OnnxMonitor(path, ["CPUExecutionProvider"])
    assert served.reference_flag_rate is None
    with pytest.warns(UserWarning, match="alarm unavailable.*refit"):
        app = create_app(served)
    client = TestClient(app)
    assert client.post("/predict", json={"inputs": [[[[0.5] * 4] * 4]]}).status_code == 200
    text = client.get("/metrics").text
    assert "brittle_flag_rate_alarm 0.0" in text and "brittle_flag_rate_alarm_available 0.0" in text
    assert "brittle_samples_total 1.0" in text
