"""The price of monitoring in the serving stack: ``python -m brittle.serve`` against a bare server.

Two HTTP servers of the same model on 127.0.0.1, each in its own process, with the
same stack (uvicorn, FastAPI, JSON bodies ``{"inputs": [...]}``, onnxruntime with
the same provider and threads):

- **bare**: the model alone exported to ONNX; answers ``pred``; judged where the
  monitor would judge it (the event loop or a worker thread, ``Admission.run``);
- **monitor**: ``python -m brittle.serve`` on the monitor's ONNX file; answers
  ``pred``, ``margin`` and ``flag`` and counts every sample into its telemetry
  (counters, margin histogram, flag-rate alarm) behind ``/metrics``.

Closed-loop clients (``--clients`` threads, one keep-alive connection each) send
pre-encoded requests for ``--seconds`` per round; rounds alternate bare and
monitor (``--rounds`` each, every round on freshly started server processes, so
that the medians are over processes and not over rounds of one, each warmed up
for ``WARM_UP`` seconds), and the table gives the median round's requests per
second and the p50/p99 latency of all requests. The throughput loss is
``1 - rps(monitor) / rps(bare)`` (target <= 5 %). On a CPU shared with the clients
and with other jobs, wall-clock throughput swings with what else runs, so the
table also gives each server's own CPU time per request (``/proc/PID/stat``) and
the capacity loss ``1 - cpu(bare) / cpu(monitor)``: the throughput loss of a
server whose cores are its own and saturated. Models: the PGD-trained digits
CNN (fitted monitor, logit margin) and a torchvision ResNet-18 (random weights,
10 classes, ``--size`` pixels, exact feature margin), at batch 1 and 16.

With ``--baseline DIR`` (another checkout of brittle, e.g. ``git worktree add
/tmp/base main``) a third server joins the rounds: that checkout's monitor,
exported and served by its own code. The table then also gives each monitor's
fixed cost, ``cpu(monitor) - cpu(bare)`` per request, and the ratio of this
checkout's to the baseline's, all measured in the same interleaved rounds.

Run: python benchmarks/bench_serve.py [--quick] [--provider cpu|cuda] [--clients 4]
     [--models all|digits] [--baseline DIR]
"""

# No ``from __future__ import annotations``: FastAPI reads the bare server's route
# annotations at run time, and that server imports its types inside a function.
import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent  # this checkout
# Seconds of requests before each measured round: a fresh monitor's alarm redesigns
# its chart as its learned reference doubles, most often in its first 10^4 samples.
WARM_UP = 2.0
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
}


# ---------------------------------------------------------------- bare server
def serve_bare(path: str, port: int, provider: str, threads: int) -> None:
    """The bare model behind the same stack as ``brittle.serve``: JSON in, ``pred`` out."""
    import uvicorn

    uvicorn.run(bare_app(path, provider, threads), host="127.0.0.1", port=port, log_level="warning")


def bare_app(path: str, provider: str, threads: int) -> Any:
    """The bare server's FastAPI app."""
    import onnxruntime as ort
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse

    from brittle.deploy.serve.admission import Admission, max_concurrent_default

    options = ort.SessionOptions()
    if threads > 0:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, sess_options=options, providers=PROVIDERS[provider])
    app = FastAPI()

    def judge(body: bytes) -> JSONResponse:
        try:
            x = np.asarray(json.loads(body)["inputs"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as err:
            raise HTTPException(422, str(err)) from err
        logits = session.run(None, {"input": x})[0]
        return JSONResponse({"pred": logits.argmax(axis=1).tolist()})

    # The monitor's worker places: a small quick request is judged on the event loop,
    # every other one in a worker thread (brittle.deploy.serve.admission).
    admission = Admission(2**40, max_concurrent_default())

    @app.post("/predict")
    async def predict(request: Request) -> JSONResponse:
        body = await request.body()
        return await admission.run(judge, body, size=len(body))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


# ------------------------------------------------------- in-process ASGI timing
def time_asgi(
    kind: str, path: str, body: bytes, provider: str, threads: int, blocks: tuple[int, int]
) -> float:
    """CPU µs per ``POST /predict`` through the whole ASGI app, without a network.

    Middleware, routing, body reading, the worker-thread hop, parsing, the graph,
    the telemetry and the answer: all a server's fixed cost but the sockets. The
    minimum over blocks of requests is robust to other jobs on a shared machine.
    ``blocks`` is (requests per block, blocks).
    """
    import asyncio

    if kind == "bare":
        app = bare_app(path, provider, threads)
    else:
        import warnings

        import onnxruntime as ort

        from brittle.deploy.onnx_monitor import OnnxMonitor
        from brittle.deploy.serve.app import create_app

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monitor = OnnxMonitor(path, PROVIDERS[provider], session_options=options)
            app = create_app(monitor, max_batch=16)
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    statuses: list[int] = []

    async def one() -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)  # a client that stays connected
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await app(dict(scope), receive, send)

    async def timed_blocks(n: int, repeat: int) -> float:
        for _ in range(200):  # warm-up
            await one()
        best = float("inf")
        for _ in range(repeat):
            start = time.process_time()
            for _ in range(n):
                await one()
            best = min(best, (time.process_time() - start) / n)
        return best

    best = asyncio.run(timed_blocks(*blocks))
    if set(statuses) != {200}:
        raise RuntimeError(f"statuses {sorted(set(statuses))}")
    return 1e6 * best


# ------------------------------------------------------------------- models
def build_models(folder: Path, size: int, only: str = "all") -> dict[str, dict[str, Any]]:
    """Export each model bare and monitored; returns paths and an example input each."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset
    from torchvision.models import resnet18

    import brittle
    from brittle.digits import ROBUST_EPS, digits_model, load_digits_split

    def bare(model: torch.nn.Module, x: torch.Tensor, path: Path) -> Path:
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )
        return path

    torch.manual_seed(0)
    split = load_digits_split()
    digits = digits_model("robust")
    monitor = brittle.wrap(digits, score="logit", eps=ROBUST_EPS)
    holdout = DataLoader(TensorDataset(split.x_holdout, split.y_holdout), batch_size=100)
    monitor.fit(holdout, n_samples=200, steps=10, pseudo=False, progress=False)
    x = split.x_holdout[:2]
    models = {
        "digits CNN (8x8, logit margin)": {
            "bare": bare(digits, x, folder / "digits-bare.onnx"),
            "monitor": monitor.export_onnx(folder / "digits-monitor.onnx", x),
            "x": split.x_holdout[200:216].numpy(),
        }
    }
    if only == "digits":
        return models
    net = resnet18(num_classes=10).eval()
    x = torch.rand(16, 3, size, size)
    monitor = brittle.wrap(net, score="feature", eps=8 / 255, example_input=x[:2])
    with torch.no_grad():
        margins = monitor(x).margin.numpy()
    monitor.set_threshold(float(np.median(margins)))
    # Random weights have no holdout to calibrate on: a reference rate and buckets from
    # these inputs switch the telemetry's alarm on, which is what its cost needs.
    monitor.reference_flag_rate = 0.5
    monitor.margin_buckets = tuple(
        sorted({float(f"{m:.4g}") for m in np.quantile(margins, 0.1 * np.arange(1, 10))})
    )
    models[f"ResNet-18 ({size}x{size}, 10 classes, feature margin)"] = {
        "bare": bare(net, x[:2], folder / "resnet-bare.onnx"),
        "monitor": monitor.export_onnx(folder / "resnet-monitor.onnx", x[:2]),
        "x": x.numpy(),
    }
    return models


# ------------------------------------------------------------------ harness
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(
    command: list[str], port: int, cwd: Path | None = None, **extra_env: str
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra_env}
    proc = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server on port {port} did not start")


def stop(proc: subprocess.Popen[bytes]) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(port: int, body: bytes, clients: int, seconds: float) -> tuple[float, list[float]]:
    """Requests per second and per-request latencies of closed-loop clients."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start_at = time.perf_counter() + 0.1
    stop_at = start_at + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/json"}
        while time.perf_counter() < start_at:
            time.sleep(0.001)
        while (t0 := time.perf_counter()) < stop_at:
            conn.request("POST", "/predict", body, headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"status {response.status}")
            latencies[i].append(time.perf_counter() - t0)
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 120)
    done = [v for per in latencies for v in per]
    return len(done) / (time.perf_counter() - start_at), done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", choices=sorted(PROVIDERS), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="per round")
    parser.add_argument("--rounds", type=int, default=5, help="per variant, interleaved")
    parser.add_argument("--size", type=int, default=32, help="ResNet-18 input size")
    parser.add_argument(
        "--quick", action="store_true", help="at most 2 rounds of 2 s (ASGI: blocks of 200)"
    )
    parser.add_argument("--models", choices=["all", "digits"], default="all")
    parser.add_argument(
        "--baseline", type=Path, help="another brittle checkout whose monitor joins the rounds"
    )
    parser.add_argument("--bare-server", nargs=2, metavar=("ONNX", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--export-only", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--asgi",
        action="store_true",
        help="time requests in-process through each ASGI app (CPU µs, no sockets) instead",
    )
    parser.add_argument(
        "--time-asgi", nargs=3, metavar=("KIND", "ONNX", "BODY"), help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--asgi-blocks", nargs=2, type=int, default=(1000, 7), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "brittle" / "__init__.py").is_file():
        # Its PYTHONPATH would point nowhere and the "baseline" would be this checkout.
        parser.error(f"--baseline: {args.baseline} is not a brittle checkout (no brittle/).")
    if args.time_asgi:
        kind, path, body_path = args.time_asgi
        body = Path(body_path).read_bytes()
        print(time_asgi(kind, path, body, args.provider, args.threads, tuple(args.asgi_blocks)))
        return
    if args.bare_server:
        serve_bare(args.bare_server[0], int(args.bare_server[1]), args.provider, args.threads)
        return
    if args.export_only:
        args.export_only.mkdir(parents=True, exist_ok=True)
        built = build_models(args.export_only, args.size, args.models)
        print(json.dumps({name: str(spec["monitor"]) for name, spec in built.items()}))
        return
    if args.quick:
        # ASGI: blocks of 200 requests, 3 per process (a smoke test, not a figure).
        args.seconds, args.rounds, args.asgi_blocks = 2.0, min(args.rounds, 2), (200, 3)
    if args.provider == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--provider cuda: no CUDA device is available on this machine")

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        compare(args, Path(tmp))


def compare(args: argparse.Namespace, folder: Path) -> None:
    """Export the models into ``folder``, serve them and print the table."""
    import onnxruntime as ort

    models = build_models(folder, args.size, args.models)
    if args.provider == "cuda":
        # onnxruntime falls back to the CPU, with a warning in the servers' logs only,
        # when its CUDA provider cannot start: the table would be CPU figures.
        bare = str(next(iter(models.values()))["bare"])
        used = ort.InferenceSession(bare, providers=PROVIDERS["cuda"]).get_providers()
        if used[0] != "CUDAExecutionProvider":
            raise SystemExit(f"--provider cuda: onnxruntime cannot start CUDA here (got {used})")
    variants = ["bare", "monitor"]
    baseline_env: dict[str, str] = {}
    if args.baseline is not None:
        # The baseline's monitor files, exported by the baseline's own code.
        baseline_env = {"PYTHONPATH": str(args.baseline.resolve())}
        out = subprocess.run(
            [sys.executable, str(HERE), "--export-only", str(folder / "baseline")]
            + ["--size", str(args.size), "--models", args.models],
            env={**os.environ, **baseline_env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for name, path in json.loads(out.strip().splitlines()[-1]).items():
            models[name]["baseline"] = path
        variants.append("baseline")
    common = ["--provider", args.provider, "--threads", str(args.threads)]
    if args.asgi:
        print(
            f"onnxruntime {ort.__version__} ({args.provider}, {args.threads} intra-op "
            f"thread(s)), requests in-process through each ASGI app: per process the minimum "
            f"CPU time over {args.asgi_blocks[1]} blocks of {args.asgi_blocks[0]:,}, medians of "
            f"{args.rounds} interleaved processes"
        )
        blocks = (args.asgi_blocks[0], args.asgi_blocks[1])
        asgi_table(models, variants, baseline_env, common, folder, args.rounds, blocks)
        return
    print(
        f"onnxruntime {ort.__version__} ({args.provider}, {args.threads} intra-op thread(s) per "
        f"server), {args.clients} closed-loop clients, {args.rounds} interleaved rounds (fresh "
        f"server processes each) of "
        f"{args.seconds:g} s per variant\n"
    )
    print(
        "| model | batch | variant | requests/s | samples/s | p50 ms | p99 ms "
        "| throughput loss vs bare | server CPU ms/request | capacity loss vs bare (CPU) "
        "| fixed cost µs/request (CPU, vs bare) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, spec in models.items():
        http_table(
            name, spec, variants, baseline_env, common, args.rounds, args.seconds, args.clients
        )


def start_servers(
    spec: dict[str, Any], variants: list[str], baseline_env: dict[str, str], common: list[str]
) -> tuple[dict[str, subprocess.Popen[bytes]], dict[str, int]]:
    """One fresh process per variant, each on a port of its own."""
    ports = {variant: free_port() for variant in variants}
    commands = {
        "bare": [sys.executable, str(HERE), "--bare-server", str(spec["bare"]), str(ports["bare"])],
        "monitor": [sys.executable, "-m", "brittle.serve", str(spec["monitor"])],
        "baseline": [sys.executable, "-m", "brittle.serve", str(spec.get("baseline"))],
    }
    servers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for variant in variants:
            command = commands[variant] + common
            if variant != "bare":
                command += ["--port", str(ports[variant]), "--max-batch", "16"]
            # ``python -m`` puts the working directory first on sys.path: run from this
            # checkout's root, the baseline's server would be this checkout's. Each
            # server runs in the models' folder, with its own code first on the path.
            extra = baseline_env if variant == "baseline" else {"PYTHONPATH": str(ROOT)}
            servers[variant] = start(
                command, ports[variant], cwd=Path(spec["monitor"]).parent, **extra
            )
    except BaseException:
        for proc in servers.values():
            stop(proc)
        raise
    return servers, ports


def fixed_cost_text(variant: str, fixed: dict[str, float]) -> str:
    """A row's fixed cost in µs, with the monitor's as a multiple of the baseline's."""
    if variant == "bare":
        return "-"
    cost = f"{fixed[variant]:.0f}"
    if variant == "monitor" and fixed.get("baseline", 0.0) > 0:
        cost += f" ({fixed['monitor'] / fixed['baseline']:.2f}x the baseline's)"
    return cost


def http_table(
    name: str,
    spec: dict[str, Any],
    variants: list[str],
    baseline_env: dict[str, str],
    common: list[str],
    rounds: int,
    seconds: float,
    clients: int,
) -> None:
    """Interleaved rounds over HTTP, each round on fresh server processes; one row per variant.

    A server's CPU per request depends on its process (memory layout, hash seeds),
    so every round starts each variant anew and the medians are over processes.
    """
    bodies = {
        batch: json.dumps(
            {"inputs": np.round(spec["x"][:batch].astype(np.float64), 4).tolist()}
        ).encode()
        for batch in (1, 16)
    }
    keys = [(batch, variant) for batch in bodies for variant in variants]
    rps: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    cpu: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    lat: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    for _ in range(rounds):
        servers, ports = start_servers(spec, variants, baseline_env, common)
        try:
            for batch, body in bodies.items():
                for variant in variants:
                    load(ports[variant], body, clients, WARM_UP)
                    pid = servers[variant].pid
                    before = cpu_seconds(pid)
                    r, latencies = load(ports[variant], body, clients, seconds)
                    cpu[batch, variant].append((cpu_seconds(pid) - before) / len(latencies))
                    rps[batch, variant].append(r)
                    lat[batch, variant].extend(latencies)
        finally:
            for proc in servers.values():
                stop(proc)
    for batch in bodies:
        base_rps = statistics.median(rps[batch, "bare"])
        base_cpu = statistics.median(cpu[batch, "bare"])
        fixed = {v: 1e6 * (statistics.median(cpu[batch, v]) - base_cpu) for v in variants}
        for variant in variants:
            r, c = statistics.median(rps[batch, variant]), statistics.median(cpu[batch, variant])
            p50, p99 = np.percentile(lat[batch, variant], [50, 99]) * 1e3
            loss = "-" if variant == "bare" else f"{100 * (1 - r / base_rps):+.1f} %"
            capacity = "-" if variant == "bare" else f"{100 * (1 - base_cpu / c):+.1f} %"
            cost = fixed_cost_text(variant, fixed)
            print(
                f"| {name} | {batch} | {variant} | {r:.1f} | {r * batch:.0f} | "
                f"{p50:.2f} | {p99:.2f} | {loss} | {1e3 * c:.3f} | {capacity} | {cost} |",
                flush=True,
            )


def asgi_table(
    models: dict[str, dict[str, Any]],
    variants: list[str],
    baseline_env: dict[str, str],
    common: list[str],
    folder: Path,
    rounds: int,
    blocks: tuple[int, int],
) -> None:
    """Each variant timed in its own process, the processes interleaved ``rounds`` times."""
    print(
        "\n| model | batch | variant | CPU µs/request (in-process ASGI) | fixed cost µs vs bare |"
    )
    print("|---|---|---|---|---|")
    for name, spec in models.items():
        for batch in (1, 16):
            inputs = np.round(spec["x"][:batch].astype(np.float64), 4).tolist()
            body_path = folder / f"body-{batch}.json"
            body_path.write_bytes(json.dumps({"inputs": inputs}).encode())
            times: dict[str, list[float]] = {v: [] for v in variants}
            for _ in range(rounds):
                for variant in variants:
                    kind = "bare" if variant == "bare" else "monitor"
                    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
                    if variant == "baseline":
                        env.update(baseline_env)
                    out = subprocess.run(
                        [sys.executable, str(HERE), "--time-asgi", kind, str(spec[variant])]
                        + [str(body_path), *common]
                        + ["--asgi-blocks", *map(str, blocks)],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                    times[variant].append(float(out.strip().splitlines()[-1]))
            base = statistics.median(times["bare"])
            fixed = {v: statistics.median(times[v]) - base for v in variants}
            for variant in variants:
                cost = fixed_cost_text(variant, fixed)
                print(
                    f"| {name} | {batch} | {variant} | {statistics.median(times[variant]):.0f} "
                    f"| {cost} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
