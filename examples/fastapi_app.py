"""Embed brittle's telemetry in your own FastAPI app around a torch Monitor.

The app classifies digits with the PGD-trained digits CNN wrapped by a fitted
``brittle.Monitor``, counts every output into ``brittle.Telemetry`` and exposes
it at ``/metrics`` through its own Prometheus registry, beside its own metric.
The demo drives it in-process (FastAPI's TestClient): clean digits, then
washed-out ones (``x * 0.3 + 0.35``, low contrast), and prints the metrics and
whether the flag-rate alarm fired.

    pip install -e ".[serve]"
    python examples/fastapi_app.py            # the demo
    python examples/fastapi_app.py --serve    # uvicorn on 127.0.0.1:8000
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from pydantic import BaseModel
from torch.utils.data import DataLoader, TensorDataset

import brittle
from brittle.deploy.serve.metrics import TelemetryCollector
from brittle.digits import ROBUST_EPS, digits_model, load_digits_split


class Images(BaseModel):
    images: list[list[list[float]]]  # a batch of 8x8 grey images in [0, 1]


def build_app(monitor: brittle.Monitor, run_length: float = 10**6) -> FastAPI:
    """Your app: its own route and metric, with brittle's telemetry beside them."""
    telemetry = brittle.Telemetry.from_monitor(monitor, run_length=run_length)
    registry = CollectorRegistry()  # the app's own registry, not the global one
    registry.register(TelemetryCollector(telemetry))
    requests = Counter("digits_requests", "Classification requests.", registry=registry)
    app = FastAPI(title="digits classifier")

    @app.post("/classify")
    def classify(body: Images) -> dict[str, Any]:
        requests.inc()
        x = torch.tensor(body.images, dtype=torch.float32).unsqueeze(1)
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise HTTPException(422, f"images must be 8x8. Got {tuple(x.shape[1:])}.")
        with torch.inference_mode():
            out = telemetry.observe(monitor(x))
        return {
            "digit": out.pred.tolist(),
            "brittle": out.flag.tolist(),
            "alarm": telemetry.snapshot().alarm.firing,  # type: ignore[union-attr]
        }

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


def fitted_monitor() -> tuple[brittle.Monitor, torch.Tensor]:
    """The digits monitor, fitted on 200 holdout digits; returns it and unseen digits."""
    torch.manual_seed(0)
    split = load_digits_split()
    monitor = brittle.wrap(digits_model("robust"), score="logit", eps=ROBUST_EPS)
    holdout = DataLoader(TensorDataset(split.x_holdout, split.y_holdout), batch_size=100)
    monitor.fit(holdout, n_samples=200, steps=10, pseudo=False, progress=False)
    return monitor, split.x_holdout[200:]


def demo(app: FastAPI, digits: torch.Tensor) -> None:
    from fastapi.testclient import TestClient

    client = TestClient(app)
    for name, images in (("clean", digits), ("washed-out", digits * 0.3 + 0.35)):
        flagged = 0
        for batch in images.split(16):
            answer = client.post("/classify", json={"images": batch[:, 0].tolist()}).json()
            flagged += sum(answer["brittle"])
        print(f"{name}: {len(images)} digits, {flagged} flagged, alarm {answer['alarm']}")
    wanted = ("brittle_samples_total", "brittle_flagged_total", "brittle_reference_flag_rate")
    wanted += ("brittle_flag_rate_alarm ", "brittle_alarm_episodes_total", "digits_requests_total")
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(wanted):
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="run uvicorn instead of the demo")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    monitor, digits = fitted_monitor()
    app = build_app(monitor)
    if args.serve:
        import uvicorn

        uvicorn.run(app, host="127.0.0.1", port=args.port)
    else:
        demo(app, digits)


if __name__ == "__main__":
    main()
