"""The command line of ``python -m brittle.serve``."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from brittle.deploy.alarm import DEFAULT_ODDS_RATIO, DEFAULT_RUN_LENGTH

__all__ = ["main", "build_parser", "PROVIDERS"]

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m brittle.serve``."""
    parser = argparse.ArgumentParser(
        prog="python -m brittle.serve",
        description="Serve a monitor exported with Monitor.export_onnx: POST /predict, "
        "GET /metrics (Prometheus), GET /healthz.",
    )
    parser.add_argument("monitor", help="the .onnx file written by Monitor.export_onnx")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--max-batch", type=int, default=64, help="largest batch per request (default 64)"
    )
    parser.add_argument(
        "--run-length",
        type=float,
        default=DEFAULT_RUN_LENGTH,
        help="expected clean samples between false alarms of the flag-rate alarm, promised "
        f"with probability 0.9 over the calibration holdout (default {DEFAULT_RUN_LENGTH:g})",
    )
    parser.add_argument(
        "--odds-ratio",
        type=float,
        default=DEFAULT_ODDS_RATIO,
        help="the rise of the flag rate's odds the alarm detects fastest "
        f"(default {DEFAULT_ODDS_RATIO:g})",
    )
    parser.add_argument(
        "--provider",
        choices=["auto", *PROVIDERS],
        default="auto",
        help="onnxruntime execution provider (default: CUDA when a GPU is present)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)"
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn's log level")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    import onnxruntime as ort
    import uvicorn

    from brittle.deploy.onnx_monitor import OnnxMonitor
    from brittle.deploy.serve.app import create_app
    from brittle.deploy.telemetry import Telemetry

    options = ort.SessionOptions()
    if args.threads > 0:
        options.intra_op_num_threads = args.threads
    providers = None if args.provider == "auto" else PROVIDERS[args.provider]
    try:
        monitor = OnnxMonitor(args.monitor, providers, session_options=options)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            telemetry = Telemetry.from_monitor(
                monitor, run_length=args.run_length, odds_ratio=args.odds_ratio
            )
        app = create_app(monitor, max_batch=args.max_batch, telemetry=telemetry)
    except (FileNotFoundError, ValueError) as err:
        print(f"python -m brittle.serve: error: {err}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"python -m brittle.serve: warning: {warning.message}", file=sys.stderr)
    alarm = telemetry.alarm
    alarm_text = (
        "alarm unavailable"
        if alarm is None
        else f"alarm: reference flag rate {alarm.reference_rate:.4g}, designed at "
        f"{alarm.design.rate:.4g}, fires at {alarm.state.threshold:.4g} nats, run length "
        f"{alarm.run_length:g}"
    )
    print(
        f"brittle.serve: {monitor.path.name} on http://{args.host}:{args.port} "
        f"({', '.join(monitor.providers)}; score {monitor.score}, threshold "
        f"{monitor.threshold:.4g}; {alarm_text})",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
