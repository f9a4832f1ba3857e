"""Many large requests at once: the server's peak memory and its health route under them.

``--clients`` threads each send one body of ``--batch`` digits (17 significant
digits per value: about 1.3 KB of JSON a digit) to ``python -m brittle.serve`` at
the same moment, on a connection of its own, while the benchmark polls
``/healthz`` every 0.1 s. Reported: how many answers were 200 and 503, the
server's peak resident memory (``VmHWM``) over what it held after one such
request alone (onnxruntime's arena for the largest batch), and the ``/healthz``
latency (median, worst) during the flood, and the server's CPU time for the flood.
With ``--chunk BYTES`` each body is sent with ``Transfer-Encoding: chunked`` in
chunks of that many bytes (``--clients 1 --batch 800 --chunk 1``: one 1 MB body in
1-byte chunks). With ``--baseline DIR`` another checkout
serves the same ONNX file in the same interleaved rounds, each round on fresh
server processes. Every server runs with its defaults apart from ``--max-batch``.

Run: python benchmarks/bench_flood.py [--clients 64] [--batch 4096] [--rounds 2]
     [--chunk BYTES] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from bench_serve import ROOT, build_models, free_port, start, stop


def peak_mb(pid: int) -> float:
    """A process's peak resident memory (``VmHWM``), in MiB."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return int(status["VmHWM"].split()[0]) / 1024


def exchange(port: int, request: bytes) -> int:
    """Send ``request`` (sending stops once an answer arrives); the status, 0 if none came."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            with contextlib.suppress(OSError):  # answered (and closed) before the body was sent
                sock.sendall(request)
            answer = b""
            while b"\r\n" not in answer:
                part = sock.recv(65536)
                if not part:
                    break
                answer += part
    except OSError:
        return 0
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0


def cpu_seconds(pid: int) -> float:
    """A process's user and system CPU time so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def chunked(body: bytes, size: int) -> bytes:
    """``body`` framed as ``Transfer-Encoding: chunked`` in chunks of ``size`` bytes."""
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def healthz(port: int) -> float:
    start_at = time.perf_counter()
    assert exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") == 200
    return time.perf_counter() - start_at


def flood(port: int, pid: int, warm: bytes, request: bytes, clients: int) -> dict[str, float]:
    """One flood against a server warmed by ``warm``: answers, memory, CPU, /healthz."""
    assert exchange(port, warm) == 200  # the largest batch's arena, before the baseline
    baseline, cpu = peak_mb(pid), cpu_seconds(pid)
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            latencies.append(healthz(port))
            time.sleep(0.1)

    poller = threading.Thread(target=poll)
    poller.start()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        statuses = list(pool.map(lambda _: exchange(port, request), range(clients)))
    done.set()
    poller.join()
    return {
        "ok": statuses.count(200),
        "busy": statuses.count(503),
        "other": clients - statuses.count(200) - statuses.count(503),
        "growth": peak_mb(pid) - baseline,
        "cpu": cpu_seconds(pid) - cpu,
        "p50": statistics.median(latencies) * 1e3,
        "worst": max(latencies) * 1e3,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk", type=int, help="send each body chunked, in this many bytes")
    parser.add_argument("--baseline", type=Path, help="another brittle checkout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, folder: Path) -> None:
    """Export the monitor into ``folder`` and flood its servers."""
    monitor = build_models(folder, 32, only="digits")["digits CNN (8x8, logit margin)"]["monitor"]
    rng = np.random.default_rng(0)
    body = json.dumps({"inputs": rng.random((args.batch, 1, 8, 8)).tolist()}).encode()
    head = "POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    warm = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    request = warm
    if args.chunk is not None:
        request = f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunked(body, args.chunk)
    variants = {"this checkout": ROOT}
    if args.baseline is not None:
        variants["baseline"] = args.baseline.resolve()
    framing = "" if args.chunk is None else f" in {args.chunk}-byte chunks"
    print(
        f"{args.clients} clients x {len(body) / 1e6:.1f} MB ({args.batch} digits){framing} at "
        f"once, {args.rounds} interleaved rounds; CPUs: {len(os.sched_getaffinity(0))}\n"
    )
    print(
        "| server | round | 200 | 503 | other | peak memory growth MiB | server CPU s "
        "| /healthz p50 ms | worst ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for round_ in range(args.rounds):
        for name, code in variants.items():
            port = free_port()
            command = [sys.executable, "-m", "brittle.serve", str(monitor), "--port", str(port)]
            proc = start(
                command + ["--max-batch", str(args.batch)],
                port,
                cwd=folder,
                PYTHONPATH=str(code),
            )
            try:
                row = flood(port, proc.pid, warm, request, args.clients)
            finally:
                stop(proc)
            print(
                f"| {name} | {round_ + 1} | {row['ok']} | {row['busy']} | {row['other']} | "
                f"{row['growth']:.0f} | {row['cpu']:.2f} | {row['p50']:.0f} | {row['worst']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
