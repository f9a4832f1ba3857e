"""The argument parser of ``python -m brittle.check`` and the settings it resolves to."""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch

from brittle.attacks.attack import DEFAULT_ENGINE
from brittle.check.errors import UsageError
from brittle.scores.norms import NORMS, Norm

__all__ = [
    "build_parser",
    "parse_args",
    "Settings",
    "resolve_settings",
    "check_paths",
    "DEFAULT_EPS",
    "DEFAULT_TARGET_TPR",
]

# Budgets used when --eps is not given: the RobustBench leaderboards' CIFAR budgets
# (8/255 in Linf, 0.5 in L2) and the usual L1 budget of 12.
DEFAULT_EPS: dict[str, float] = {"Linf": 8 / 255, "L2": 0.5, "L1": 12.0}
# The target TPR of a fit when --target-tpr is not given.
DEFAULT_TARGET_TPR = 0.95

_DESCRIPTION = """\
Check whether a classifier's cheap margin scores rank its decisions as the input-space
margin does (margin consistency), calibrate a brittle-decision flag, and write a report.

Start with the built-in demo (no download; two small CNNs on scikit-learn's digits):

    python -m brittle.check --demo

Then your own model and data:

    python -m brittle.check --model robustbench:Wong2020Fast --model-dir models \\
        --data cifar10 --data-dir data --n 500 --out report
    python -m brittle.check --model my_models.py:build --data holdout.npz --eps 0.03
"""

_EPILOG = """\
exit status: 0 when the check ran (and passed --min-tau if given), 1 when the chosen
score's Kendall tau is below --min-tau (and only then), 2 for a usage or setup error
(bad argument, missing or unwritable file, unknown model spec, data the model cannot
take), 3 when the check itself failed; errors are printed on one line. Every path is
checked before any work starts.
"""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors become ``UsageError`` (one line, exit 2)."""

    def error(self, message: str) -> NoReturn:
        option = "arguments"
        if message.startswith("argument "):
            option, _, message = message[len("argument ") :].partition(": ")
            option = option.split("/")[-1]
        raise UsageError(option, message)


def _checked(
    convert: Callable[[str], Any], valid: Callable[[Any], bool], parse_msg: str, range_msg: str
) -> Callable[[str], Any]:
    """An argparse ``type`` that converts a value and checks its range, with two messages."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {parse_msg}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {range_msg}, got {value}")
        return value

    return parse


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer", "a positive integer")
# torch's generators take seeds below 2**64; a larger one failed after the whole fit.
_seed = _checked(int, lambda v: 0 <= v < 2**64, "an integer", "an integer in [0, 2**64)")
_positive_float = _checked(
    float,
    lambda v: math.isfinite(v) and v > 0,
    "a positive number",
    "a finite positive number",
)
_rate = _checked(float, lambda v: 0.0 < v < 1.0, "a number in (0, 1)", "a number in (0, 1)")
_tau = _checked(float, lambda v: -1.0 <= v <= 1.0, "a number in [-1, 1]", "a number in [-1, 1]")


def build_parser(engines: list[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; ``engines`` defaults to the keys of ``brittle.attacks.attack.ENGINES`` now.

    The engine list is read at call time because other modules register engines.
    """
    if engines is None:
        from brittle.attacks.attack import ENGINES

        engines = sorted(ENGINES)
    parser = _Parser(
        prog="python -m brittle.check",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_argument_group("what to check")
    what.add_argument(
        "--demo",
        action="store_true",
        help="check a standard and a PGD-trained CNN on scikit-learn's digits (their weights "
        "ship with brittle: nothing trains or downloads), fit a monitor for each and report "
        "both side by side. Uses "
        "Linf eps 0.1 and fast attack settings unless --eps, --n, --steps are given; about "
        "two minutes on 2 CPU cores.",
    )
    what.add_argument(
        "--model",
        metavar="SPEC",
        help="the classifier: 'robustbench:NAME' (loaded with RobustBench's load_model from "
        "--model-dir, see --dataset and --threat-model), 'path/to/file.py:factory' or "
        "'package.module:factory' (a callable returning an nn.Module that maps inputs in "
        "[0, 1] to logits), or 'MONITOR.pt@SPEC': a monitor saved with --save-monitor or "
        "Monitor.save, evaluated as saved (its norm, eps, score and threshold; nothing is "
        "refitted) on the model SPEC.",
    )
    what.add_argument(
        "--data",
        metavar="SPEC",
        help="the holdout: 'cifar10' or 'cifar100' (the test sets, read as RobustBench reads "
        "them from the files in --data-dir, never downloaded), 'digits' (scikit-learn's "
        "digits holdout), an .npz file with an array 'x' of shape (N, C, H, W) in [0, 1] "
        "(uint8 is divided by 255) and an optional integer array 'y', or a torchvision "
        "ImageFolder directory of 8-bit images (one sub-directory per class; see "
        "--image-size). Defaults to --dataset for RobustBench models.",
    )
    where = parser.add_argument_group("RobustBench and file locations")
    where.add_argument(
        "--dataset",
        choices=["cifar10", "cifar100", "imagenet"],
        default="cifar10",
        help="RobustBench dataset of a 'robustbench:NAME' model (default: cifar10).",
    )
    where.add_argument(
        "--threat-model",
        choices=["Linf", "L2"],
        default=None,
        help="RobustBench threat model of a 'robustbench:NAME' model (default: --norm, "
        "else Linf). Also the default --norm.",
    )
    where.add_argument(
        "--model-dir",
        type=Path,
        default=Path("models"),
        metavar="DIR",
        help="RobustBench checkpoints, read from DIR/DATASET/THREAT_MODEL/NAME.pt "
        "(default: ./models). Nothing is downloaded: a missing file is a usage error.",
    )
    where.add_argument(
        "--data-dir",
        type=Path,
        default=Path("data"),
        metavar="DIR",
        help="directory holding the CIFAR files for --data cifar10/cifar100, as torchvision "
        "lays them out (cifar-10-batches-py/, cifar-100-python/) (default: ./data).",
    )
    where.add_argument(
        "--image-size",
        type=_positive_int,
        default=None,
        metavar="PX",
        help="resize ImageFolder images to PX x PX pixels (default: keep their size, which "
        "must then be the same for every image).",
    )
    fit = parser.add_argument_group("fitting the monitor")
    fit.add_argument(
        "--eps",
        type=_positive_float,
        default=None,
        help="perturbation budget: a decision is non-robust when its input margin is <= eps "
        "(default: 8/255 for Linf, 0.5 for L2, 12 for L1; 0.1 with --demo).",
    )
    fit.add_argument(
        "--norm",
        choices=list(NORMS),
        default=None,
        help="threat model of the input margin (default: --threat-model, else Linf).",
    )
    fit.add_argument(
        "--n",
        type=_positive_int,
        default=None,
        help="holdout size: the first N samples of --data are attacked with FAB to measure "
        "their input margins (default: 1000; 400 with --demo). "
        "The attack dominates the run time.",
    )
    fit.add_argument(
        "--target-tpr",
        type=_rate,
        default=None,
        help="share of non-robust decisions the flag must catch; the threshold is the "
        "split-conformal one for this rate (default: 0.95). A saved monitor "
        "(--model MONITOR.pt@SPEC) keeps its threshold: its FPR figures are read at this "
        "rate (default: the target it was fitted at).",
    )
    fit.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="FAB iterations per sample (default: 100; 10 with --demo). More steps give "
        "tighter input margins.",
    )
    fit.add_argument(
        "--engine",
        choices=engines,
        default=DEFAULT_ENGINE if DEFAULT_ENGINE in engines else engines[0],
        help="attack engine for the input margins, one of brittle.attacks.attack.ENGINES: "
        "'brittle' (brittle's fast FAB) or 'torchattacks' (the reference FAB) (default: brittle).",
    )
    fit.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        help="samples per batch for the attacks and forward passes (default: 128; 512 with "
        "--demo, whose CNN is tiny).",
    )
    fit.add_argument(
        "--device",
        default=None,
        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu).",
    )
    fit.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seeds the attacks, the subset choice and the pseudo-margin network (default: 0).",
    )
    fit.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="cache input margins here so that a rerun or an interrupted run resumes "
        "(default: no margin cache).",
    )
    report = parser.add_argument_group("analyses, gate and outputs")
    report.add_argument(
        "--attack-subset",
        type=_positive_int,
        default=None,
        metavar="N",
        help="robust-accuracy estimate (the paper's Algorithm 1): a threshold is picked on N "
        "attacked samples and robust accuracy is then estimated on the whole --data from "
        "scores alone; PGD and FGSM examples are made for these N samples too "
        "(default: 500; 100 with --demo; capped at --n).",
    )
    report.add_argument(
        "--min-tau",
        type=_tau,
        default=None,
        metavar="X",
        help="gate for CI pipelines: exit with status 1 when the chosen score's Kendall tau "
        "is below X (with --demo: when any model's is). Default: no gate.",
    )
    report.add_argument(
        "--out",
        type=Path,
        default=Path("brittle-report"),
        metavar="DIR",
        help="write report.json, report.html and PNG plots here (default: ./brittle-report). "
        "Plots need matplotlib: pip install brittle[plot].",
    )
    report.add_argument(
        "--save-monitor",
        type=Path,
        default=None,
        metavar="PATH",
        help="save the fitted monitor (Monitor.save; load it with brittle.load(PATH, model)). "
        "With --demo, -standard and -robust are added to the file name.",
    )
    report.add_argument(
        "--export-onnx",
        type=Path,
        default=None,
        metavar="PATH",
        help="export the fitted monitor as one ONNX graph (input -> logits, pred, margin, "
        "flag), served by python -m brittle.serve or brittle.OnnxMonitor. With --demo, "
        "-standard and -robust are added to the file name.",
    )
    report.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (they go to stderr).",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when ``None``); raises ``UsageError``.

    ``--help`` still exits through ``SystemExit(0)``, as argparse does.
    """
    args = build_parser().parse_args(argv)
    if args.demo and args.model is not None:
        raise UsageError("--model", "--demo checks its own digits models; drop --model or --demo")
    if args.demo and args.data is not None:
        raise UsageError("--data", "--demo uses scikit-learn's digits; drop --data or --demo")
    if not args.demo and args.model is None:
        raise UsageError("--model", "give a model to check (or --demo for the built-in example)")
    if args.model is not None and "@" in args.model:
        # A saved monitor is evaluated as saved: these would be ignored, not applied.
        for option, value in (("--eps", args.eps), ("--norm", args.norm)):
            if value is not None:
                raise UsageError(
                    option,
                    "a saved monitor (--model MONITOR.pt@SPEC) is evaluated at the eps and norm "
                    f"it was fitted with; drop {option}, or fit a new monitor with --model SPEC",
                )
    return args


@dataclass(frozen=True)
class Settings:
    """What a check needs besides the model and the data, defaults resolved.

    ``target_tpr`` is ``None`` only for a saved monitor without ``--target-tpr``: its
    figures are then read at the target it was fitted at.
    """

    eps: float
    norm: Norm
    n: int
    target_tpr: float | None
    steps: int
    engine: str
    batch_size: int
    device: str
    seed: int
    cache_dir: Path | None
    attack_subset: int
    min_tau: float | None
    progress: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        out = asdict(self)
        out["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return out


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UsageError("--device", f"{name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device", f"{name!r} asked for, but CUDA is not available here")
    if device.type == "meta":  # tensors without data: no attack or forward pass can run
        raise UsageError("--device", "'meta' holds no data; give cpu or cuda")
    return str(device)


def resolve_settings(args: argparse.Namespace, *, demo: bool = False) -> Settings:
    """Fill the defaults that depend on other arguments (eps by norm, demo sizes)."""
    from brittle.digits import ROBUST_EPS

    norm: Norm = args.norm or args.threat_model or "Linf"
    saved = args.model is not None and "@" in args.model  # evaluated at its own target
    target_tpr = args.target_tpr
    if target_tpr is None and not saved:
        target_tpr = DEFAULT_TARGET_TPR
    if demo:
        eps = args.eps if args.eps is not None else ROBUST_EPS
        n = args.n if args.n is not None else 400
        steps = args.steps if args.steps is not None else 10
    else:
        eps = args.eps if args.eps is not None else DEFAULT_EPS[norm]
        n = args.n if args.n is not None else 1000
        steps = args.steps if args.steps is not None else 100
    return Settings(
        eps=float(eps),
        norm=norm,
        n=n,
        target_tpr=target_tpr,
        steps=steps,
        engine=args.engine,
        batch_size=args.batch_size or (512 if demo else 128),
        device=_device(args.device),
        seed=args.seed,
        cache_dir=args.cache_dir,
        attack_subset=args.attack_subset or (100 if demo else 500),
        min_tau=args.min_tau,
        progress=not args.no_progress,
    )


def _writable_dir(option: str, directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise UsageError(option, f"{str(directory)!r} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".brittle-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(option, f"cannot write to {str(directory)!r} ({err.strerror})") from None


def _writable_file(option: str, path: Path) -> None:
    if path.is_dir():
        raise UsageError(option, f"{str(path)!r} is a directory; give a file path")
    _writable_dir(option, path.parent if str(path.parent) else Path("."))


def check_paths(args: argparse.Namespace) -> None:
    """Check every output path (and the ONNX exporter) before any work starts.

    A typo in ``--out`` should cost a second, not a whole fit.

    Raises:
        UsageError: naming the option and what is wrong with its path.
    """
    _writable_dir("--out", args.out)
    if args.cache_dir is not None:
        _writable_dir("--cache-dir", args.cache_dir)
    if args.save_monitor is not None:
        _writable_file("--save-monitor", args.save_monitor)
    if args.export_onnx is not None:
        _writable_file("--export-onnx", args.export_onnx)
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(
                "--export-onnx", f"ONNX export needs {' and '.join(missing)}: pip install them"
            )
