"""``python -m brittle.check``: margin-consistency reports, a CI gate and the paper's analyses.

The command fits a ``Monitor`` for a model on a holdout (or
evaluates a saved one), prints a table of every score's Kendall tau and
detection figures next to baseline scores, and writes ``report.json``,
``report.html`` and plots. See ``python -m brittle.check --help``.
matplotlib is optional: without it the command still writes the JSON report.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator

from brittle.check.cli import Settings, check_paths, parse_args, resolve_settings
from brittle.check.errors import UsageError
from brittle.check.runner import CheckResult

__all__ = ["main", "UsageError"]


def main(argv: list[str] | None = None) -> int:
    """Run the command with ``argv`` (``sys.argv[1:]`` when ``None``); returns the exit status.

    0: the check ran (and cleared ``--min-tau`` if given); 1: the chosen score's
    tau is below ``--min-tau``, and nothing else; 2: a usage or setup error, 3: the
    check itself failed; errors are printed on one line to stderr, without a
    traceback (``BRITTLE_DEBUG=1`` shows it).

    Args:
        argv: Command-line arguments, without the program name.

    Returns:
        The exit status.

    Examples:
        >>> from brittle.check import main
        >>> main(["--model", "no/such/models.py:build", "--data", "digits"])
        2

    """
    try:
        try:
            args = parse_args(argv)
        except SystemExit as done:  # --help ends here, as argparse intends
            return done.code if isinstance(done.code, int) else 0
        settings = resolve_settings(args, demo=args.demo)
        check_paths(args)
        return _run(args, settings)
    except UsageError as err:
        print(f"brittle-check: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("brittle-check: interrupted", file=sys.stderr)
        return 130
    # exit 1 is the gate's alone: a crash must not read as one, and a sys.exit() in the
    # user's model code must not read as a check that ran (exit 0) either.
    except (Exception, SystemExit) as err:
        if os.environ.get("BRITTLE_DEBUG"):
            raise
        print(
            f"brittle-check: error: the check failed: {type(err).__name__}: {err} "
            "(BRITTLE_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 3


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from brittle.check.console import model_table, side_by_side
    from brittle.check.html import write_html
    from brittle.check.plots import PLOT_HINT, plots_available

    start = time.perf_counter()
    results: list[CheckResult] = []
    for result in _results(args, settings):
        print(model_table(result.payload), flush=True)
        print(flush=True)
        results.append(result)
    summary = side_by_side([r.payload for r in results]) if len(results) > 1 else None
    if summary:
        print(summary, end="\n\n")
        # An index next to the per-model reports, so tools find them all from one file.
        index = {
            r.name: (r.out_dir / "report.json").relative_to(args.out).as_posix() for r in results
        }
        (args.out / "report.json").write_text(json.dumps({"models": index}, indent=1))
    page = write_html([(r.payload, r.plots) for r in results], args.out, summary=summary)
    print(f"report: {page}")
    if results[0].plots:
        print(f"plots: {', '.join(str(p) for r in results for p in r.plots[:1])}, ...")
    elif not plots_available():
        print(PLOT_HINT)
    for r in results:
        for kind, path in r.payload["written"].items():
            print(f"{kind}: {path}")
    print(f"total time {time.perf_counter() - start:.1f}s")
    failed = [r for r in results if r.gate_passed is False]
    for r in failed:
        print(
            f"brittle-check: {r.name}: chosen score {r.report.chosen} has tau "
            f"{r.chosen_tau:.3f} < --min-tau {settings.min_tau}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _results(args: argparse.Namespace, settings: Settings) -> Iterator[CheckResult]:
    from brittle.check.demo import run_demo
    from brittle.check.runner import run_check
    from brittle.check.sources import load_data, load_model

    if args.demo:
        yield from run_demo(
            settings, args.out, save_monitor=args.save_monitor, export_onnx=args.export_onnx
        )
        return
    start = time.perf_counter()
    try:
        source = load_model(
            args.model,
            dataset=args.dataset,
            threat_model=args.threat_model or ("L2" if settings.norm == "L2" else "Linf"),
            model_dir=args.model_dir,
        )
    except UsageError:
        raise
    except Exception as err:  # a factory that raises is a setup error, not a failed check
        raise UsageError("--model", f"could not build {args.model!r}: {err}") from None
    data_spec = args.data or source.dataset
    if data_spec is None:
        raise UsageError(
            "--data", "give the holdout: cifar10, cifar100, digits, an .npz file or an image folder"
        )
    try:
        data = load_data(data_spec, data_dir=args.data_dir, image_size=args.image_size)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError("--data", f"could not read {str(data_spec)!r}: {err}") from None
    yield run_check(
        source,
        data,
        settings,
        args.out,
        name="model",
        title=f"{args.model} on {data_spec}",
        save_monitor=args.save_monitor,
        export_onnx=args.export_onnx,
        timings={"load": time.perf_counter() - start},
    )
