"""Concurrent callers of one Monitor, and the forward pass under torch.compile."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import brittle
from brittle.digits import DigitsSplit

THREADS = 4
CALLS = 500  # per thread: 2,000 calls in all


def _batches(x: torch.Tensor, seed: int) -> list[torch.Tensor]:
    """CALLS batches of 1 to 8 samples, a few with a NaN row, drawn with a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(CALLS):
        size = int(torch.randint(1, 9, (1,), generator=g))
        batch = x[torch.randint(0, x.shape[0], (size,), generator=g)].clone()
        if float(torch.rand(1, generator=g)) < 0.05:
            batch[0, 0, 0, 0] = float("nan")
        out.append(batch)
    return out


def _hammer(monitor: brittle.Monitor, x: torch.Tensor) -> int:
    """Mismatches between threaded calls and a single-threaded reference of the same batches."""
    work = [_batches(x, seed) for seed in range(THREADS)]
    with torch.no_grad():
        reference = [[monitor(b) for b in batches] for batches in work]
    results: list[list[object]] = [[] for _ in range(THREADS)]
    barrier = threading.Barrier(THREADS)

    def run(i: int) -> None:
        barrier.wait()
        with torch.no_grad():
            for batch in work[i]:
                try:
                    results[i].append(monitor(batch))
                except Exception as err:  # a crash counts as a mismatch, with its reason
                    results[i].append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    mismatches = 0
    for got_list, want_list in zip(results, reference, strict=True):
        assert len(got_list) == CALLS
        for got, want in zip(got_list, want_list, strict=True):
            if isinstance(got, Exception):
                mismatches += 1
                continue
            same = torch.equal(got.pred, want.pred) and torch.equal(got.flag, want.flag)
            same = same and torch.allclose(got.margin, want.margin, rtol=1e-5, equal_nan=True)
            mismatches += not same
    return mismatches


@pytest.mark.parametrize("score", ["logit", "feature"])
def test_threads_get_their_own_numbers(
    standard_model: nn.Module, digits: DigitsSplit, score: str
) -> None:
    monitor = brittle.wrap(standard_model, score=score, eps=0.1)
    monitor.set_threshold(0.5)
    monitor(digits.x_holdout[:2])  # discovery happens once, before the threads
    assert _hammer(monitor, digits.x_holdout[:200]) == 0


def test_threads_get_their_own_pseudo_margins(
    pseudo_monitor: brittle.Monitor, digits: DigitsSplit
) -> None:
    # The pseudo-margin needs the head's input: a forward hook per call, which
    # must record only its own thread's features.
    assert pseudo_monitor.score == "pseudo"
    assert _hammer(pseudo_monitor, digits.x_holdout[:200]) == 0


def test_threads_racing_on_the_first_call(standard_model: nn.Module, digits: DigitsSplit) -> None:
    monitor = brittle.wrap(copy.deepcopy(standard_model), score="feature")
    barrier = threading.Barrier(THREADS)
    outs: list[object] = [None] * THREADS

    def first(i: int) -> None:
        barrier.wait()
        with torch.no_grad():
            outs[i] = monitor(digits.x_holdout[i : i + 3])

    threads = [threading.Thread(target=first, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert monitor.head_name == "8" and monitor.input_shape == (1, 8, 8)
    for i, out in enumerate(outs):
        torch.testing.assert_close(out.margin, monitor(digits.x_holdout[i : i + 3]).margin)


@pytest.mark.parametrize("score", ["logit", "feature"])
def test_compiles_with_fullgraph(
    standard_model: nn.Module, digits: DigitsSplit, score: str
) -> None:
    monitor = brittle.wrap(standard_model, score=score, eps=0.1, example_input=digits.x_holdout[:2])
    monitor.set_threshold(0.5)
    torch._dynamo.reset()
    # "eager" captures the graph (fullgraph=True fails on any graph break) without
    # needing a C++ toolchain for code generation.
    compiled = torch.compile(monitor, fullgraph=True, backend="eager")
    x = digits.x_holdout[:16].clone()
    x[3] = float("nan")
    with torch.no_grad():
        got, want = compiled(x), monitor(x)
    torch.testing.assert_close(got.margin, want.margin, equal_nan=True)
    assert torch.equal(got.flag, want.flag) and torch.equal(got.pred, want.pred)
    assert bool(got.flag[3]) and int(got.pred[3]) == -1


def _compiled_feature_monitor() -> tuple[nn.Module, brittle.Monitor, Any]:
    """A small model, its feature-margin monitor (threshold 0.3) and that monitor compiled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    monitor = brittle.wrap(model, score="feature", norm="L2", example_input=torch.rand(2, 4))
    monitor.set_threshold(0.3)
    torch._dynamo.reset()
    return model, monitor, torch.compile(monitor, fullgraph=True, backend="eager")


def test_a_compiled_monitor_takes_new_head_weights_from_one_eager_call() -> None:
    # A compiled call cannot see the head's weights change in place (no version counter
    # in a graph): it keeps the pair-norm table, and the guide said every "next call"
    # recomputes it, so a checkpoint loaded into a compiled server's model served
    # feature margins divided by the first weights' norms, 3 times too large here.
    model, monitor, compiled = _compiled_feature_monitor()
    x = torch.rand(5, 4)
    with torch.no_grad():
        compiled(x)
        model.load_state_dict({k: v * 3 for k, v in model.state_dict().items()})
        fresh = brittle.wrap(copy.deepcopy(model), score="feature", norm="L2")
        want = fresh(x).margin
        # What the guide now says: the compiled call keeps the table as it stands ...
        assert not torch.allclose(compiled(x).margin, want)
        monitor(x)  # ... until one call of the monitor itself recomputes it.
        torch.testing.assert_close(compiled(x).margin, want)
    text = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    guide = " ".join(text.split())
    section = guide[guide.index("On the first call `wrap` finds the head") :]
    section = section[: section.index("The wrapper never changes your model")]
    assert "torch.compile" in section and "call the monitor itself once" in section


def test_a_compiled_monitor_of_inference_weights_takes_new_ones_from_graph() -> None:
    # Weights built under inference mode keep no version counter: the eager call
    # measures their rows at each call and leaves the stored table alone, so the
    # compiled one kept the first weights' table after an eager call too.
    with torch.inference_mode():
        model, monitor, compiled = _compiled_feature_monitor()
        x = torch.rand(5, 4)
        compiled(x)
        model.load_state_dict({k: v * 3 for k, v in model.state_dict().items()})
        want = monitor(x).margin
        assert not torch.allclose(compiled(x).margin, want)
        monitor.graph()  # recomputes the table, as the guide says
        torch.testing.assert_close(compiled(x).margin, want)
    text = (Path(__file__).resolve().parents[1] / "docs" / "guide.md").read_text()
    guide = " ".join(text.split())
    assert "under `torch.inference_mode()`), call `monitor.graph()` instead" in guide
