"""The command line of ``python -m brittle.serve``.

Every start-up failure (a bad argument, a file that does not open or carries no
finite threshold, a port in use) is one line on stderr and exit status 2; SIGTERM
shuts the server down gracefully with exit status 0, as an orchestrator expects.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import warnings
from collections.abc import Sequence
from typing import Any, NoReturn

from brittle.deploy.alarm import DEFAULT_ODDS_RATIO, DEFAULT_RUN_LENGTH, MAX_RUN_LENGTH
from brittle.deploy.serve.connections import MAX_CONNECTIONS, REQUEST_TIMEOUT

__all__ = ["main", "build_parser", "PROVIDERS"]

# uvicorn's log levels (uvicorn.config.LOG_LEVELS, read case-insensitively); another
# name was a KeyError traceback after the banner.
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line (argparse adds the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _port(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535. Got {value}.")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number. Got {text[:40]!r}.") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number. Got {value}.")
    return value


def _positive(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number. Got {value}.")
    return value


def _threads(text: str) -> int:
    # onnxruntime starts every thread it is given, without a bound, before it reads the
    # graph: 1000 took 6 s and 100000 hung start-up with nothing printed. More threads
    # than the machine's logical CPUs can never run at once.
    value = _count(text)
    cpus = os.cpu_count() or 1
    if value > cpus:
        raise argparse.ArgumentTypeError(
            f"expected at most the {cpus} logical CPUs of this machine (0: onnxruntime's "
            f"default). Got {value}."
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number of seconds. Got {text[:40]!r}."
        ) from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(
            f"expected a positive, finite number of seconds. Got {value}."
        )
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m brittle.serve``."""
    parser = _Parser(
        prog="python -m brittle.serve",
        description="Serve a monitor exported with Monitor.export_onnx: POST /predict, the "
        "Open Inference Protocol (KServe v2) under /v2, GET /metrics (Prometheus), GET /healthz.",
    )
    parser.add_argument("monitor", help="the .onnx file written by Monitor.export_onnx")
    parser.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--max-batch", type=_positive, default=64, help="largest batch per request (default 64)"
    )
    parser.add_argument(
        "--max-body",
        type=_positive,
        default=None,
        help="largest request body in bytes (default: --max-batch samples of JSON numbers)",
    )
    parser.add_argument(
        "--body-budget",
        type=_positive,
        default=None,
        help="most bytes of request bodies held at once (being received, waiting or being "
        "judged); a request beyond it gets 503 with Retry-After (default: eight bodies of "
        "--max-body, at least 32 MiB)",
    )
    parser.add_argument(
        "--max-concurrent",
        type=_positive,
        default=None,
        help="most requests parsed and judged at once (default: one per CPU core, at most 4)",
    )
    parser.add_argument(
        "--run-length",
        type=float,
        default=DEFAULT_RUN_LENGTH,
        help="expected clean samples between false alarms of the flag-rate alarm, promised "
        f"with probability 0.9 over the calibration holdout (default {DEFAULT_RUN_LENGTH:g}, at "
        f"most {MAX_RUN_LENGTH:g})",
    )
    parser.add_argument(
        "--odds-ratio",
        type=float,
        default=DEFAULT_ODDS_RATIO,
        help="the rise of the flag rate's odds the alarm detects fastest "
        f"(default {DEFAULT_ODDS_RATIO:g})",
    )
    parser.add_argument(
        "--no-alarm-learning",
        dest="alarm_learning",
        action="store_false",
        help="keep the alarm's reference at the calibration holdout's counts (by default it "
        "learns the stream's clean samples, which makes it far less deaf)",
    )
    parser.add_argument(
        "--provider",
        choices=["auto", *PROVIDERS],
        default="auto",
        help="onnxruntime execution provider (default: CUDA when a GPU is present)",
    )
    parser.add_argument(
        "--threads",
        type=_threads,
        default=0,
        help="onnxruntime intra-op threads, at most the machine's logical CPUs (0: its default)",
    )
    parser.add_argument(
        "--request-timeout",
        type=_seconds,
        default=REQUEST_TIMEOUT,
        help="seconds a client has to send a whole request, from the connection's start or "
        "the previous response, and the longest it may leave an answer unread; slower "
        f"connections are closed (default {REQUEST_TIMEOUT:g})",
    )
    parser.add_argument(
        "--max-connections",
        type=_positive,
        default=None,
        help=f"most open connections; more are closed on accept (default {MAX_CONNECTIONS}, "
        "or fewer under a low open-file limit: 704 under ulimit -n 1024)",
    )
    parser.add_argument(
        "--http",
        choices=["auto", "httptools", "h11"],
        default="auto",
        help="HTTP parser, as uvicorn's --http (default: httptools when installed, as the "
        "serve extra does; h11 otherwise)",
    )
    parser.add_argument(
        "--log-level",
        type=str.lower,
        choices=LOG_LEVELS,
        default="warning",
        help="uvicorn's log level (default warning)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT or SIGTERM; returns the exit status."""
    args = build_parser().parse_args(argv)
    import onnxruntime as ort
    import uvicorn

    from brittle.deploy.onnx_monitor import OnnxMonitor
    from brittle.deploy.serve.app import create_app
    from brittle.deploy.serve.connections import bounded_protocol, connection_limits
    from brittle.deploy.serve.logs import UPGRADE_WARNINGS, LoggedOnce
    from brittle.deploy.serve.server import Server
    from brittle.deploy.telemetry import Telemetry

    options = ort.SessionOptions()
    # The session's own logger at onnxruntime's default, warnings: left to inherit, it
    # takes the default logger's severity when created and keeps it, and --provider
    # cuda silences that logger meanwhile (the server would log nothing below FATAL).
    options.log_severity_level = 2
    if args.threads > 0:
        options.intra_op_num_threads = args.threads
    providers = None if args.provider == "auto" else PROVIDERS[args.provider]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Where its CUDA provider cannot load, onnxruntime logs several lines and
            # runs on the CPU; the operator who asked for CUDA gets one line and exit 2.
            silenced = args.provider == "cuda"
            if silenced:
                ort.set_default_logger_severity(4)
            try:
                monitor = OnnxMonitor(args.monitor, providers, session_options=options)
            finally:
                if silenced:  # back to onnxruntime's default, warnings (it has no getter)
                    ort.set_default_logger_severity(2)
            if args.provider == "cuda" and "CUDAExecutionProvider" not in monitor.providers:
                raise ValueError(
                    "--provider cuda: onnxruntime cannot run this graph on CUDA here (its "
                    "CUDA provider did not load: no GPU, or a CUDA or cuDNN library it needs "
                    "is missing); pass --provider cpu, or install onnxruntime-gpu for this "
                    "machine's CUDA"
                )
            telemetry = Telemetry.from_monitor(
                monitor,
                run_length=args.run_length,
                odds_ratio=args.odds_ratio,
                learn=args.alarm_learning,
            )
        app = create_app(
            monitor,
            max_batch=args.max_batch,
            max_body=args.max_body,
            body_budget=args.body_budget,
            max_concurrent=args.max_concurrent,
            telemetry=telemetry,
        )
        parser_class = _http_protocol(args.http)
        # Bound here, before the banner: a port in use is a start-up error like any other.
        sock = _bind(args.host, args.port)
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        print(f"python -m brittle.serve: error: {_one_line(err)}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"python -m brittle.serve: warning: {warning.message}", file=sys.stderr)
    alarm = telemetry.alarm
    alarm_text = (
        "alarm unavailable"
        if alarm is None
        else f"alarm: reference flag rate {alarm.reference_rate:.4g}, designed at "
        f"{alarm.design.rate:.4g}, fires at {alarm.state.threshold:.4g} nats, run length "
        f"{alarm.run_length:g}" + (f", learns after {alarm.lag} samples" if alarm.learn else "")
    )
    port = sock.getsockname()[1]
    # An IPv6 address goes in brackets in a URL (RFC 3986): http://[::1]:8000.
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(
        f"brittle.serve: {monitor.path.name} on http://{host}:{port} "
        f"({', '.join(monitor.providers)}; score {monitor.score}, threshold "
        f"{monitor.threshold:.4g}; {alarm_text})",
        flush=True,
    )
    # uvicorn times out idle connections only between requests: the protocol also
    # bounds the time to receive each request and the number of open connections.
    limits = connection_limits()
    protocol = bounded_protocol(
        parser_class,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections or limits.max_connections,
        on_close=app.state.closed_connections.count,
        on_answer=app.state.requests.count,
    )
    config = uvicorn.Config(app, log_level=args.log_level, http=protocol, backlog=limits.backlog)
    logging.getLogger("uvicorn.error").addFilter(LoggedOnce(UPGRADE_WARNINGS))
    Server(config).run(sockets=[sock])
    return 0


def _http_protocol(name: str) -> type[Any]:
    """The HTTP protocol class of uvicorn that ``--http`` names."""
    if name == "h11":
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    if name == "httptools":
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
        except ImportError:
            raise ImportError(
                "--http httptools needs the httptools package: pip install httptools."
            ) from None
        return HttpToolsProtocol
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    return AutoHTTPProtocol


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise OSError(f"cannot resolve host {host[:80]!r}: {err.strerror}.") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {err.strerror}.") from None
    sock.set_inheritable(True)
    return sock
