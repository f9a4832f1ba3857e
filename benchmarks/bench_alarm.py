"""The flag-rate alarm's promise and delay: the CUSUM against the sliding window and alibi-detect.

Part 1, the promise over holdouts. For each true flag rate ``p0`` in {0.05,
0.15, 0.3} and calibration size ``m`` in {200, 400, 1,000, 5,000}, draw
``--holdouts`` holdouts as ``Binomial(m, p0)`` flagged counts, build
``FlagRateAlarm((k, m), run_length=PROMISE)`` for each, and compute its exact
mean run length on clean traffic at ``p0`` (the Markov chain of
``brittle.deploy.alarm.cusum_run_length``: exact, so no stream is simulated).
Reported: the share of holdouts whose run length is at least the promise
(target >= 0.9) and the median run length over the promise (target <= 3 for
m >= 1,000), for the default odds ratio 2 and for 4 (tuned to a larger rise).
The CPU time of the slowest construction (the server's start-up) is printed too.

Part 1b, the alarm as served (``--part learn``): the chart that learns its
reference from the stream (``FlagRateAlarm``'s default). Its run length has no
single Markov chain, so it is computed semi-analytically: the reference doubles
at known stream times, its flagged count at each doubling is drawn
(``--paths`` draws per holdout), and between redesigns the chart runs with the
exact in-control run length of its design, as a constant hazard. Then the real
``FlagRateAlarm`` is run sample by sample on ``--check-streams`` clean streams
for holdouts of 200 and 1,000 at the 10/50/90 % quantile of their count, beside
the semi-analytic figure for the same holdout (seconds per stream of 10^5 samples).

Part 2, the delay, at a run length of ``DELAY_RUN_LENGTH`` = 10^4 for every
detector (alibi-detect configures ``FETDriftOnline`` by simulating at least
``ert`` streams: at 10^5 that is minutes of CPU per configuration, too slow on
a shared 2-core machine). For the median holdout (``k = p0 * m``, ``m =
1,000``), the median number of samples from a fresh detector to its first
alarm after the flag rate moves to 1.5x p0, 2x p0 and 1.0:

- the CUSUM as served (designed at the 90 % upper bound): exact, from the
  distribution of the Markov chain; odds ratio 2 and 4;
- the same CUSUM with the reference taken as exact (``FlagRateAlarm(k / m)``):
  what the detectors below know, with no guarantee over the holdout;
- the CUSUM as served once it has learned ``LEARNED`` samples at the true rate
  (its design at that reference's median count): the delay of a rise that
  comes after tens of thousands of clean samples;
- the sliding window this alarm replaces (1,000 samples), its critical count
  set for the same run length at the true ``p0`` (generous: an exact
  reference), counted on a 4x10^6-sample clean stream; its delay by
  simulation (``--streams`` streams);
- alibi-detect's ``FETDriftOnline`` (``ert=DELAY_RUN_LENGTH``, windows 20 and
  100, ``x_ref`` the holdout's flags; it too treats them as the truth), fed
  one sample at a time (``--fet-streams`` streams, cut at ``--fet-cap``).

alibi-detect is not a dependency of brittle: install it in a venv of its own.

    python3 -m venv /work/venvs/alarm
    /work/venvs/alarm/bin/pip install alibi-detect numpy scipy matplotlib
    PYTHONPATH=. nice /work/venvs/alarm/bin/python benchmarks/bench_alarm.py
    python benchmarks/bench_alarm.py --no-fet     # without alibi-detect

Part 3, the frontier (``--part frontier``; numpy only, seconds). Holdouts of
``FRONTIER_M`` = 1,000 at the promise of 10^5, for odds ratios from 2 to 16:
the median run length over the promise (500 holdouts, as in part 1) beside the
median delay after a shift (exact, the median holdout). The odds ratio that
brings the median under 3x also makes the CUSUM slower to see a rise: a chart
whose clean run length barely moves between the true rate and its upper bound
is by that token insensitive to small rises.

``--plot`` writes docs/img/alarm_run_length.png and docs/img/alarm_delay.png;
``--part promise|learn|delay|frontier`` runs one part (two processes on a shared machine).
"""

from __future__ import annotations

import argparse
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from brittle.deploy.alarm import (
    DEFAULT_CONFIDENCE,
    MAX_REFERENCE_RATE,
    FlagRateAlarm,
    binomial_sf,
    critical_count,
    cusum_run_length,
    design_cusum,
)

PROMISE = 100_000
P0S = (0.05, 0.15, 0.3)
MS = (200, 400, 1000, 5000)
SHIFTS = (1.5, 2.0, None)  # None: every sample flagged
DELAY_M = 1000
DELAY_RUN_LENGTH = 10_000
WINDOW = 1000
FRONTIER_M = 1000
FRONTIER_ODDS = (2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
LEARNED = 64_000  # a reference of 64 x DELAY_M: the learning chart after about 70,000 samples
LEARN_GRID = 800  # design rates at which the learning chart's run length is computed
CHECK_MS = (200, 1000)  # holdout sizes at which the real class checks the semi-analytic


def promise_table(
    holdouts: int, odds_ratio: float, seed: int, sizes: tuple[int, ...] = MS
) -> list[dict[str, float]]:
    """Share of holdouts keeping the promise and median run length / promise, per (p0, m)."""
    rows = []
    for p0 in P0S:
        for m in sizes:
            flagged = np.random.default_rng(seed).binomial(m, p0, size=holdouts)
            run_length, slowest = {}, 0.0
            for k in np.unique(flagged).tolist():
                start = time.process_time()
                design = FlagRateAlarm((k, m), run_length=PROMISE, odds_ratio=odds_ratio).design
                slowest = max(slowest, time.process_time() - start)
                run_length[k] = cusum_run_length(design.up, design.down, design.threshold, p0)
            arl = np.array([run_length[k] for k in flagged.tolist()])
            rows.append(
                {
                    "p0": p0,
                    "m": m,
                    "share": float((arl >= PROMISE).mean()),
                    "median": float(np.median(arl) / PROMISE),
                    "startup": slowest,
                }
            )
    return rows


def cusum_median_delay(alarm: FlagRateAlarm, p: float, cap: int = 10**6) -> int:
    """Median samples from zero to the first alarm at flag rate ``p``: the chain's distribution."""
    d = alarm.design
    states = np.arange(d.threshold)
    down = np.maximum(states - d.down, 0)
    up = states + d.up
    stay = up < d.threshold
    mass, fired = np.zeros(d.threshold), 0.0
    mass[0] = 1.0
    for t in range(1, cap + 1):
        new = np.bincount(down, weights=mass * (1 - p), minlength=d.threshold)
        new += np.bincount(up[stay], weights=mass[stay] * p, minlength=d.threshold)
        fired += p * mass[~stay].sum()
        mass = new
        if fired >= 0.5:
            return t
    return cap


def window_critical(p0: float, seed: int, length: int = 4 * 10**6) -> int:
    """Smallest critical count whose clean run length (episodes on a long stream) is the promise."""
    rng = np.random.default_rng(seed)
    counts = np.empty(length - WINDOW + 1, dtype=np.int32)
    total = np.concatenate([[0], np.cumsum(rng.random(length) < p0, dtype=np.int32)])
    counts[:] = total[WINDOW:] - total[:-WINDOW]
    # Start from the binomial test at level window / run length (the old docs' reading).
    k = critical_count(WINDOW, p0, WINDOW / DELAY_RUN_LENGTH)
    while True:
        on = counts >= k
        episodes = int(on[0]) + int(np.count_nonzero(on[1:] & ~on[:-1]))
        if episodes == 0 or len(counts) / episodes >= DELAY_RUN_LENGTH:
            return k
        k += 1


def window_median_delay(critical: int, p: float, streams: int, seed: int) -> float:
    """Median first time t >= WINDOW at which the last WINDOW samples hold ``critical`` flags."""
    rng = np.random.default_rng(seed)
    horizon = WINDOW * 20
    delays = []
    for _ in range(streams):
        flags = rng.random(horizon) < p
        total = np.concatenate([[0], np.cumsum(flags)])
        hits = np.flatnonzero(total[WINDOW:] - total[:-WINDOW] >= critical)
        delays.append(hits[0] + WINDOW if hits.size else horizon)
    return float(np.median(delays))


def fet_median_delays(
    p0: float, flagged: int, shifts: list[float], streams: int, cap: int, seed: int
) -> list[float]:
    """alibi-detect's FETDriftOnline on the same holdout: median delay at each shifted rate."""
    from alibi_detect.cd import FETDriftOnline

    rng = np.random.default_rng(seed)
    x_ref = np.zeros(DELAY_M)
    x_ref[:flagged] = 1.0
    rng.shuffle(x_ref)
    start = time.process_time()
    detector = FETDriftOnline(
        x_ref,
        ert=DELAY_RUN_LENGTH,
        window_sizes=[20, 100],
        n_bootstraps=12 * DELAY_RUN_LENGTH // 10,
        alternative="greater",
        verbose=False,
    )
    print(f"  FETDriftOnline configured in {time.process_time() - start:.0f} s CPU", flush=True)
    out = []
    for p in shifts:
        delays = []
        for _ in range(streams):
            detector.reset_state()
            t = cap
            for i in range(1, cap + 1):
                x = np.array([float(rng.random() < p)])
                if detector.predict(x)["data"]["is_drift"]:
                    t = i
                    break
            delays.append(t)
        out.append(float(np.median(delays)))
    return out


# ------------------------------------------------------------- the learning chart
def _design_grid(p0: float, points: int = LEARN_GRID) -> tuple[np.ndarray, np.ndarray]:
    """Exact in-control run lengths at ``p0`` of the charts designed on a grid of rates."""
    rates = np.exp(np.linspace(np.log(0.4 * p0), np.log(min(2.5 * p0, MAX_REFERENCE_RATE)), points))
    log_arl = np.empty(points)
    for i, rate in enumerate(rates.tolist()):
        d = design_cusum(rate, PROMISE)
        log_arl[i] = np.log(cusum_run_length(d.up, d.down, d.threshold, p0))
    return rates, log_arl


def learning_mean_run_lengths(
    flagged: np.ndarray,
    m: int,
    p0: float,
    grid: tuple[np.ndarray, np.ndarray],
    rng: Any,
    paths: int,
) -> np.ndarray:
    """The learning chart's mean clean run length from each holdout ``(flagged, m)``.

    Semi-analytic: the reference doubles at fixed stream times (``lag`` after the
    samples that make it up), and its flagged count at each doubling is drawn
    (``paths`` draws per holdout). Between redesigns the chart runs with the exact
    in-control run length of its design (the Markov chain, log-interpolated on
    ``grid``; the bound is scipy's beta quantile, which ``upper_rate`` equals),
    treated as a constant hazard. ``simulated_mean_run_length`` checks it.
    """
    from scipy.stats import beta

    rates, log_arl = grid
    lag = np.array(
        [FlagRateAlarm((k, m), run_length=PROMISE).lag for k in flagged.tolist()], dtype=float
    )[:, None]
    k = np.repeat(flagged[:, None], paths, axis=1).astype(np.int64)
    n, t = m, np.zeros_like(lag)
    survival, mean = np.ones(k.shape), np.zeros(k.shape)
    while survival.max() > 1e-9:
        bound = beta.ppf(DEFAULT_CONFIDENCE, k + 1, n - k)
        arl = np.exp(np.interp(bound, rates, log_arl))
        end = 2 * n - m + lag  # the stream time at which the reference reaches 2n
        gone = np.exp(-(end - t) / arl)
        mean += survival * arl * (1.0 - gone)
        survival *= gone
        k, n, t = k + rng.binomial(n, p0, size=k.shape), 2 * n, end
    return mean.mean(axis=1)


def learning_table(
    holdouts: int, paths: int, seed: int, sizes: tuple[int, ...] = MS
) -> list[dict[str, float]]:
    """As ``promise_table``, for the chart that learns (the default), semi-analytic."""
    rows = []
    for p0 in P0S:
        grid = _design_grid(p0)
        for m in sizes:
            flagged = np.random.default_rng(seed).binomial(m, p0, size=holdouts)
            rng = np.random.default_rng(seed + 1)
            arl = learning_mean_run_lengths(flagged, m, p0, grid, rng, paths)
            rows.append(
                {
                    "p0": p0,
                    "m": m,
                    "share": float((arl >= PROMISE).mean()),
                    "median": float(np.median(arl) / PROMISE),
                    "lag": FlagRateAlarm((round(p0 * m), m), run_length=PROMISE).lag,
                }
            )
    return rows


def simulated_mean_run_length(
    flagged: int, m: int, p0: float, streams: int, seed: int, batch: int = 256
) -> tuple[float, float]:
    """Mean and standard error of the run length of the real ``FlagRateAlarm``, stream by stream.

    Each clean stream goes through ``update`` in batches; a run is counted to the
    end of the batch it fired in (at most ``batch`` samples late).
    """
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(streams):
        alarm, t = FlagRateAlarm((flagged, m), run_length=PROMISE), 0
        while not alarm.update(rng.random(batch) < p0).episodes:
            t += batch
        runs.append(t + batch)
    return float(np.mean(runs)), float(np.std(runs) / np.sqrt(streams))


def _learning_part(holdouts: int, paths: int, seed: int, check_streams: int) -> None:
    print(
        f"\nThe chart as served (learning), promise {PROMISE:,} samples, odds ratio 2, "
        f"{holdouts} holdouts x {paths} reference paths (semi-analytic)"
    )
    print("| p0 | m | share ARL >= promise | median ARL / promise | lag (samples) |")
    print("|---|---|---|---|---|")
    for r in learning_table(holdouts, paths, seed):
        print(
            f"| {r['p0']} | {r['m']:,} | {r['share']:.3f} | {r['median']:.2f} | {r['lag']:,} |",
            flush=True,
        )
    if not check_streams:
        return
    from scipy.stats import binom

    print(
        f"\nCheck: the real FlagRateAlarm on {check_streams} clean streams per holdout "
        "against the semi-analytic mean, holdouts at the 10/50/90 % quantile of their count"
    )
    print("| p0 | m | flagged | simulated mean ARL / promise (+- s.e.) | semi-analytic |")
    print("|---|---|---|---|---|")
    for p0 in P0S:
        grid = _design_grid(p0)
        for m in CHECK_MS:
            for q in (0.1, 0.5, 0.9):
                k = int(binom.ppf(q, m, p0))
                sim, err = simulated_mean_run_length(k, m, p0, check_streams, seed)
                rng = np.random.default_rng(seed)
                semi = float(learning_mean_run_lengths(np.array([k]), m, p0, grid, rng, 500)[0])
                print(
                    f"| {p0} | {m:,} | {k} | {sim / PROMISE:.2f} +- {err / PROMISE:.2f} | "
                    f"{semi / PROMISE:.2f} |",
                    flush=True,
                )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_promise(
    tables: dict[float, list[dict[str, float]]], learning: list[dict[str, float]], folder: Path
) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    # (name, rows, line style): the charts without learning dashed, the one served solid.
    series = [
        (f"odds ratio {odds:g}, no learning", rows, "--" if odds == 2.0 else ":")
        for odds, rows in tables.items()
    ]
    series.append(("as served (learning, odds ratio 2)", learning, "-"))
    for name, rows, style in series:
        for p0 in P0S:
            sel = [r for r in rows if r["p0"] == p0]
            label = f"p0={p0}, {name}"
            axes[0].plot(
                [r["m"] for r in sel], [r["share"] for r in sel], style, marker="o", label=label
            )
            axes[1].plot(
                [r["m"] for r in sel], [r["median"] for r in sel], style, marker="o", label=label
            )
    axes[0].axhline(0.9, color="k", lw=0.8)
    axes[0].set(
        xscale="log", xlabel="calibration samples m", ylabel="share of holdouts with ARL >= promise"
    )
    axes[1].axhline(3, color="k", lw=0.8)
    axes[1].set(
        xscale="log", yscale="log", xlabel="calibration samples m", ylabel="median ARL / promise"
    )
    axes[1].legend(fontsize=7)
    for ax in axes:
        ax.set_xticks(MS, [f"{m:,}" for m in MS])
        ax.minorticks_off()
    fig.suptitle(f"Flag-rate CUSUM, promise {PROMISE:,} samples, 90 % Clopper-Pearson bound")
    fig.tight_layout()
    fig.savefig(folder / "alarm_run_length.png", dpi=110)


def _plot_delays(delays: list[dict], folder: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = ["cusum", "exact", "window", "fet"]
    labels = [f"p0={d['p0']}, {d['shift']}" for d in delays]
    x = np.arange(len(delays))
    legend = {
        "cusum": "CUSUM (as served)",
        "exact": "CUSUM, reference as exact",
        "window": "sliding window 1,000",
        "fet": "FETDriftOnline",
    }
    for i, name in enumerate(names):
        ax.bar(x + (i - 1.5) * 0.2, [d[name] for d in delays], 0.2, label=legend[name])
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    title = f"Delay to alarm, m={DELAY_M:,}, run length {DELAY_RUN_LENGTH:,}"
    ax.set(yscale="log", ylabel="median delay (samples)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "alarm_delay.png", dpi=110)


def main() -> None:
    global P0S, DELAY_RUN_LENGTH  # --p0 and --delay-run-length set what the parts read
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--holdouts", type=int, default=500)
    parser.add_argument("--streams", type=int, default=400, help="sliding-window streams")
    parser.add_argument("--fet-streams", type=int, default=20)
    parser.add_argument("--fet-cap", type=int, default=3000)
    parser.add_argument("--no-fet", action="store_true", help="skip alibi-detect")
    parser.add_argument("--plot", action="store_true", help="write docs/img/alarm_*.png")
    parser.add_argument(
        "--part",
        choices=["all", "promise", "learn", "delay", "frontier"],
        default="all",
        help="which part to run",
    )
    parser.add_argument("--p0", type=float, nargs="+", default=list(P0S), help="true flag rates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", type=int, default=20, help="learned reference paths")
    parser.add_argument(
        "--check-streams", type=int, default=200, help="real alarms per checked holdout (0: none)"
    )
    parser.add_argument(
        "--delay-run-length",
        type=float,
        default=DELAY_RUN_LENGTH,
        help="expected clean run length of every detector in the delay part",
    )
    args = parser.parse_args()
    if args.part in ("all", "delay") and not args.no_fet and find_spec("alibi_detect") is None:
        # Checked before any part runs: the delay part comes after minutes of the others.
        raise SystemExit(
            "alibi-detect is not installed in this Python: install it in a venv of its "
            "own (see this script's docstring), or pass --no-fet"
        )
    DELAY_RUN_LENGTH = int(args.delay_run_length)
    folder = Path(__file__).resolve().parents[1] / "docs" / "img"
    P0S = tuple(args.p0)
    if args.part in ("all", "promise"):
        _promise_part(args.holdouts, args.seed, folder if args.plot else None, args.paths)
    if args.part in ("all", "learn"):
        _learning_part(args.holdouts, args.paths, args.seed, args.check_streams)
    if args.part in ("all", "delay"):
        _delay_part(args, folder if args.plot else None)
    if args.part in ("all", "frontier"):
        _frontier_part(args.holdouts, args.seed)


def _frontier_part(holdouts: int, seed: int) -> None:
    print(
        f"\nFrontier: holdouts of {FRONTIER_M:,}, promise {PROMISE:,}; median ARL / promise "
        f"over {holdouts} holdouts, and median delays (samples, the median holdout)"
    )
    print("| p0 | odds ratio | median ARL / promise | share >= promise | 1.5x p0 | 2x p0 | all |")
    print("|---|---|---|---|---|---|---|")
    for odds in FRONTIER_ODDS:
        for row in promise_table(holdouts, odds, seed, (FRONTIER_M,)):
            p0 = row["p0"]
            alarm = FlagRateAlarm(
                (round(p0 * FRONTIER_M), FRONTIER_M), run_length=PROMISE, odds_ratio=odds
            )
            delays = [cusum_median_delay(alarm, min(f * p0, 1.0) if f else 1.0) for f in SHIFTS]
            print(
                f"| {p0} | {odds:g} | {row['median']:.2f} | {row['share']:.3f} | "
                + " | ".join(f"{d:,}" for d in delays)
                + " |",
                flush=True,
            )


def _promise_part(holdouts: int, seed: int, folder: Path | None, paths: int) -> None:
    tables = {}
    for odds in (2.0, 4.0):
        tables[odds] = promise_table(holdouts, odds, seed)
        print(f"\nPromise {PROMISE:,} samples, odds ratio {odds:g}, {holdouts} holdouts")
        print("| p0 | m | share ARL >= promise | median ARL / promise | slowest start-up (CPU s) |")
        print("|---|---|---|---|---|")
        for r in tables[odds]:
            print(
                f"| {r['p0']} | {r['m']:,} | {r['share']:.3f} | {r['median']:.2f} | "
                f"{r['startup']:.3f} |",
                flush=True,
            )
    if folder is not None:
        _plot_promise(tables, learning_table(holdouts, paths, seed), folder)


def _delay_part(args: argparse.Namespace, folder: Path | None) -> None:
    delays: list[dict] = []
    print(
        f"\nMedian delay (samples) from a fresh detector, run length {DELAY_RUN_LENGTH:,}, "
        f"holdout {DELAY_M:,} at its median count"
    )
    print(
        "| p0 | shift to | CUSUM (odds 2) | CUSUM (odds 4) | CUSUM, exact reference "
        f"| CUSUM after learning {LEARNED:,} | window 1,000 | FETDriftOnline |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for p0 in P0S:
        k = round(p0 * DELAY_M)
        alarms = {
            o: FlagRateAlarm((k, DELAY_M), run_length=DELAY_RUN_LENGTH, odds_ratio=o)
            for o in (2.0, 4.0)
        }
        exact = FlagRateAlarm(k / DELAY_M, run_length=DELAY_RUN_LENGTH)
        # The chart as designed once its reference holds LEARNED samples at the true rate.
        learned = FlagRateAlarm((round(p0 * LEARNED), LEARNED), run_length=DELAY_RUN_LENGTH)
        critical = window_critical(p0, args.seed)
        rates = [min(f * p0, 1.0) if f else 1.0 for f in SHIFTS]
        fet = (
            [np.nan] * len(rates)
            if args.no_fet
            else fet_median_delays(p0, k, rates, args.fet_streams, args.fet_cap, args.seed)
        )
        for f, p, fet_delay in zip(SHIFTS, rates, fet, strict=True):
            row = {
                "p0": p0,
                "shift": "all flagged" if f is None else f"{f:g}x p0",
                "cusum": cusum_median_delay(alarms[2.0], p),
                "cusum4": cusum_median_delay(alarms[4.0], p),
                "exact": cusum_median_delay(exact, p),
                "learned": cusum_median_delay(learned, p),
                "window": window_median_delay(critical, p, args.streams, args.seed),
                "fet": fet_delay,
            }
            delays.append(row)
            print(
                f"| {p0} | {row['shift']} | {row['cusum']} | {row['cusum4']} | {row['exact']} | "
                f"{row['learned']} | {row['window']:.0f} | {row['fet']:.0f} |",
                flush=True,
            )
        tail = binomial_sf(critical, WINDOW, p0)
        print(f"  (window: fires at {critical} flags of {WINDOW}, per-check level {tail:.2g})")
        print(f"  (the CUSUM as served starts learning after {alarms[2.0].lag:,} samples)")
    if folder is not None:
        _plot_delays(delays, folder)


if __name__ == "__main__":
    main()
