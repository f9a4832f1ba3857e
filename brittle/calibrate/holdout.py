"""One streamed pass over a holdout: scores, features, labels and input margins."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from brittle._modes import eval_mode
from brittle.attacks.attack import PassCounter, attack_batch, attack_points
from brittle.attacks.distributed import Shard, sample_fingerprints
from brittle.attacks.settings import DEFAULT_ENGINE, AttackSettings
from brittle.attacks.verify import model_device, model_dtype
from brittle.calibrate.boundary import COPIES, boundary_copies
from brittle.calibrate.cache import MarginCache
from brittle.calibrate.metrics import nonrobust
from brittle.calibrate.report import ConsistencyReport
from brittle.data import batches, check_labels

if TYPE_CHECKING:
    from brittle.protocol import MonitorProtocol

__all__ = ["Holdout", "BoundaryRows", "collect_holdout", "holdout_report"]


@dataclass(frozen=True)
class BoundaryRows:
    """The head's view of each sample's boundary point and copies (``calibrate.boundary``).

    Attributes:
        features: ``(n, COPIES, d)`` the head's input at each row.
        logits: ``(n, COPIES, K)`` the model's logits there.
        margins: ``(n, COPIES)`` target margins; NaN for samples without a boundary point.
    """

    features: Tensor
    logits: Tensor
    margins: Tensor


@dataclass
class Holdout:
    """Everything one streamed pass over a holdout keeps.

    Attributes:
        scores: The model's own scores (logit, feature) per kept sample.
        margins: ``(n,)`` input margins, ``inf`` where censored.
        predictions: ``(n,)`` predicted classes.
        labels: ``(n,)`` labels, ``None`` when the data has none.
        features: ``(n, d)`` the head's input, ``None`` without a linear head.
        logits: ``(n, K)`` the model's logits.
        excluded: Samples skipped because they contain NaN or Inf.
        passes: Forward and backward passes per attacked sample, and the time spent.
        input_range: Smallest and largest input value of the kept samples.
        boundary: The boundary rows of the kept samples, when the pass captured them.
    """

    scores: dict[str, np.ndarray]
    margins: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    features: Tensor | None
    logits: Tensor
    excluded: int
    passes: dict[str, float]
    input_range: tuple[float, float] | None = None
    boundary: BoundaryRows | None = None


def _length(data: Any) -> int | None:
    """Samples ``data`` yields, for the progress bar; ``None`` when it cannot tell.

    A ``DataLoader`` yields what its sampler draws (a subset, one rank's share),
    less the last partial batch under ``drop_last``, not its whole dataset. A list
    of batches does not say how many samples its batches hold.
    """
    if isinstance(data, Tensor):
        return int(data.shape[0])
    batches = getattr(data, "batch_sampler", None)
    sampler = getattr(batches, "sampler", None)
    try:
        if batches is not None and sampler is not None:
            if getattr(batches, "drop_last", False):
                return len(batches) * int(batches.batch_size)
            return len(sampler)
        dataset = getattr(data, "dataset", None)
        return None if dataset is None else len(dataset)
    except TypeError:  # an iterable dataset: no length
        return None


def collect_holdout(
    monitor: MonitorProtocol,
    data: Tensor | Iterable[Any],
    settings: AttackSettings,
    *,
    engine: str = DEFAULT_ENGINE,
    n_samples: int | None = None,
    progress: bool = True,
    cache: MarginCache | None = None,
    keep_features: bool = True,
    part: Shard | None = None,
    desc: str = "fit: input margins",
    boundary: float | None = None,
    domain: bool = False,
) -> Holdout:
    """Stream ``data`` once: the model's scores, features, predictions, labels and margins.

    Memory stays bounded by one batch of inputs plus the per-sample results.
    Every batch is checked (inputs, labels and, under a process group, that all
    ranks hold the same samples in the same order, and first the same model)
    *before* it is attacked.
    Samples with NaN or Inf are skipped and counted in ``excluded``; with
    ``domain`` (``evaluate``), so are samples outside the monitor's fitted input
    domain, which the monitor rejects as it serves (``fit`` measures the new
    holdout's range instead). Under a
    process group (``part``), each rank attacks only the samples it owns and the
    margins are assembled on every rank.

    With ``boundary`` (a radius, the monitor's eps), the attack also returns the
    adversarial point behind each margin, and the pass keeps the head's
    features and logits at that point and at two perturbed copies of it
    (``brittle.calibrate.boundary.boundary_copies``) for the pseudo-margin
    network (``Holdout.boundary``). This needs brittle's engine; a model
    without a linear head gets no rows.
    """
    part = part or Shard()
    if boundary is not None and (engine != "brittle" or not keep_features):
        raise ValueError(
            "boundary rows need brittle's engine (the attack's points) and the head's features."
        )
    if boundary is not None and not boundary > 0:
        raise ValueError(f"boundary must be a positive radius. Got {boundary}.")
    # A model without parameters (weights in buffers) takes its buffers' dtype and device.
    device = model_device(monitor.model)
    dtype = model_dtype(monitor.model) or torch.float32
    length = _length(data)
    total = length if n_samples is None else min(n_samples, length or n_samples)
    scores: dict[str, list[Tensor]] = {}
    preds, labels, feats, logits, kept = [], [], [], [], []
    attacked: list[Tensor] = []
    margins: list[Tensor] = []
    rows: dict[str, list[Tensor]] = {"features": [], "logits": [], "margins": []}
    widths: list[tuple[int, ...]] = [(0,), (0,), ()]
    counter = PassCounter()
    has_labels, seen = True, 0
    low, high = math.inf, -math.inf
    show = progress and part.is_main
    start = time.perf_counter()
    part.check_same_model(monitor.model)
    with tqdm(total=total, unit="sample", disable=not show, desc=desc) as bar:
        for x, y in batches(data, limit=n_samples):
            # Detached: a holdout is data (a batch that requires grad warned on every read).
            x = monitor.check_input(x.detach().to(device=device, dtype=dtype))
            index = torch.arange(seen, seen + x.shape[0])
            part.check_same_samples(index, sample_fingerprints(x))
            with torch.no_grad(), eval_mode(monitor.model):
                view = monitor.inspect(x, features=keep_features, domain=domain)
            if y is not None:
                check_labels(y, x.shape[0], view.logits.shape[1])
            keep = (~view.bad).cpu()
            index = index[keep]
            seen += keep.numel()
            bar.update(int(keep.numel()))
            if not keep.any():
                continue
            kept.append(index)
            if view.features is not None:  # every rank sees every batch: same widths
                widths = [(view.features.shape[1],), (view.logits.shape[1],), ()]
            inside = x[keep.to(device)]
            low = min(low, float(inside.min()))
            high = max(high, float(inside.max()))
            pred = view.logits.argmax(dim=1)[keep.to(device)]
            mine = part.owns(index)
            if mine.any():
                x_mine = x[keep.to(device)][mine.to(device)]
                pred_mine = pred[mine.to(device)]
                if boundary is None or view.features is None:
                    result = cache.get(x_mine, index[mine]) if cache is not None else None
                    if result is None:
                        result = attack_batch(
                            monitor.model,
                            x_mine,
                            pred_mine,
                            settings,
                            engine,
                            index[mine],
                            counter=counter,
                        ).cpu()
                        if cache is not None:
                            cache.put(x_mine, index[mine], result)
                else:
                    hit = cache.get_points(x_mine, index[mine]) if cache is not None else None
                    if hit is None:
                        result, points = attack_points(
                            monitor.model, x_mine, pred_mine, settings, index[mine], counter=counter
                        )
                        result = result.cpu()
                        if cache is not None:
                            cache.put(x_mine, index[mine], result, points)
                    else:
                        result, points = hit
                    points = points.to(x_mine)
                    _boundary_rows(
                        monitor, x_mine, points, result, boundary, settings, index[mine], rows
                    )
                attacked.append(index[mine])
                margins.append(result.double())
            preds.append(pred.cpu())
            logits.append(view.logits.detach().cpu()[keep])
            for kind, value in view.scores.items():
                if kind != "pseudo":  # a refit starts from the model's own scores
                    scores.setdefault(kind, []).append(value.detach().cpu()[keep])
            if view.features is not None:
                feats.append(view.features.detach().cpu()[keep])
            if y is None:
                has_labels = False
            elif has_labels:
                labels.append(y.cpu()[keep])
    part.check_same_length(seen)
    # The attack's cost of the whole holdout, as every rank reports it (each counted its own).
    counts = part.total([counter.forward, counter.backward, counter.samples])
    counter.forward, counter.backward, counter.samples = (int(c) for c in counts)
    if not kept:
        why = "all NaN/Inf, or outside the monitor's input domain" if domain else "all NaN/Inf"
        raise ValueError(f"the holdout yielded no usable samples (empty, or {why}).")
    if not attacked:  # this rank owned no sample
        attacked, margins = [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    full = part.assemble(seen, torch.cat(attacked), torch.cat(margins))
    kept_index = torch.cat(kept)
    rows_kept = None
    if boundary is not None and widths[0] != (0,):  # a head, so rows were captured
        mine_index = torch.cat(attacked)
        rows_kept = BoundaryRows(
            **{
                name: part.assemble(seen, mine_index, _rows(values, width))[kept_index].float()
                for (name, values), width in zip(rows.items(), widths, strict=True)
            }
        )
    return Holdout(
        scores={k: torch.cat(v).double().numpy() for k, v in scores.items()},
        margins=full[kept_index].numpy(),
        predictions=torch.cat(preds).numpy(),
        labels=torch.cat(labels).numpy() if has_labels and labels else None,
        features=torch.cat(feats) if feats else None,
        logits=torch.cat(logits),
        excluded=seen - kept_index.numel(),
        passes={**counter.per_sample(), "attack_seconds": time.perf_counter() - start},
        input_range=(low, high),
        boundary=rows_kept,
    )


def _rows(values: list[Tensor], width: tuple[int, ...]) -> Tensor:
    """One kind of boundary row of this rank's samples (``(0, COPIES, *width)`` when none)."""
    return torch.cat(values) if values else torch.empty((0, COPIES, *width))


def _boundary_rows(
    monitor: MonitorProtocol,
    x: Tensor,
    points: Tensor,
    margins: Tensor,
    radius: float,
    settings: AttackSettings,
    index: Tensor,
    rows: dict[str, list[Tensor]],
) -> None:
    """Append the head's view of the boundary points of ``x`` and their copies to ``rows``."""
    inputs, targets = boundary_copies(
        x, points, margins, radius, settings.norm, seed=settings.seed, index=index
    )
    with torch.no_grad(), eval_mode(monitor.model):
        view = monitor.inspect(inputs.flatten(0, 1), features=True, domain=False)
    if view.features is None:  # pragma: no cover - the caller checked the head
        raise ValueError("boundary rows need the head's features.")
    b = x.shape[0]
    rows["features"].append(view.features.detach().cpu().view(b, COPIES, -1))
    rows["logits"].append(view.logits.detach().cpu().view(b, COPIES, -1))
    rows["margins"].append(targets.cpu())


def holdout_report(holdout: Holdout, *, eps: float, norm: str, **fields: Any) -> ConsistencyReport:
    """A report on ``holdout``: the arrays and figures the holdout determines, plus ``fields``.

    ``fields`` are the remaining :class:`ConsistencyReport` fields (metrics, chosen
    score, threshold and rates, timings, calibration mask, settings). The settings
    gain ``passes_per_sample``: the attack's forward and backward passes per attacked
    sample (AttackBench's measure of an attack's cost).
    """
    margins, labels = holdout.margins, holdout.labels
    passes = holdout.passes
    fields["settings"] = {
        **fields.get("settings", {}),
        "passes_per_sample": {
            "forward": float(passes.get("forward_per_sample", 0.0)),
            "backward": float(passes.get("backward_per_sample", 0.0)),
        },
    }
    return ConsistencyReport(
        n=int(margins.size),
        eps=eps,
        norm=norm,
        accuracy=None if labels is None else float((holdout.predictions == labels).mean()),
        nonrobust_fraction=float(nonrobust(margins, eps).mean()),
        censored=int(np.isinf(margins).sum()),
        input_margins=margins,
        score_values=holdout.scores,
        predictions=holdout.predictions,
        labels=labels,
        excluded=holdout.excluded,
        **fields,
    )
