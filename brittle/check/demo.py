"""``--demo``: the standard and the PGD-trained digits CNNs, checked side by side."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from brittle.check.cli import Settings
from brittle.check.runner import CheckResult, run_check, with_suffix_tag
from brittle.check.sources import ModelSource, load_data
from brittle.digits import digits_model

__all__ = ["run_demo", "DEMO_MODELS"]

DEMO_MODELS = {
    "standard": "digits CNN, standard training",
    "robust": "digits CNN, PGD adversarial training (Linf eps 0.1)",
}


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread, then restore the caller's setting.

    The digits CNN's ops are too small to gain from intra-op threads; on a busy
    machine oversubscribed threads stall them instead (the demo ran 2.5 times
    slower with two threads than with one on a shared 2-core machine).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_demo(
    settings: Settings,
    out_dir: Path,
    *,
    save_monitor: Path | None = None,
    export_onnx: Path | None = None,
) -> Iterator[CheckResult]:
    """Check both digits models; yields each result as soon as it is ready.

    The models come from ``brittle.digits.digits_model``: weights that ship with
    brittle, so nothing trains and every machine checks the same models. Each
    model's files go to ``out_dir/<name>/``.
    """
    data = load_data("digits")
    with _one_thread():
        for name, title in DEMO_MODELS.items():
            start = time.perf_counter()
            model = digits_model(name)  # type: ignore[arg-type]
            loaded = {"load": time.perf_counter() - start}
            yield run_check(
                ModelSource(model, f"brittle.digits:digits_model({name!r})"),
                data,
                settings,
                out_dir / name,
                name=name,
                title=f"{name}: {title}",
                save_monitor=None if save_monitor is None else with_suffix_tag(save_monitor, name),
                export_onnx=None if export_onnx is None else with_suffix_tag(export_onnx, name),
                timings=loaded,
            )
