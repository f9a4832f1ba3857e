"""``Monitor.fit``: input margins on a holdout, consistency, threshold, pseudo-margin."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from brittle._modes import eval_mode
from brittle.attack import DEFAULT_ENGINE, ENGINES, AttackSettings, attack_batch
from brittle.cache import MarginCache
from brittle.data import batches
from brittle.distributed import Shard, shard
from brittle.head import NO_HEAD_HINT
from brittle.metrics import ScoreMetrics, nonrobust, score_metrics
from brittle.pseudo_train import MIN_TRAIN_SAMPLES, train_pseudo_margin
from brittle.report import ConsistencyReport
from brittle.threshold import conformal_threshold, min_positives, rates

if TYPE_CHECKING:
    from brittle.monitor import Monitor, ScoreKind

__all__ = ["fit_monitor", "Holdout", "collect_holdout", "holdout_report", "choose_score"]

# Share of the holdout the pseudo-margin network trains on; the rest calibrates.
PSEUDO_TRAIN_SHARE = 0.5


@dataclass
class Holdout:
    """Everything ``fit()`` keeps from one streamed pass over the holdout."""

    scores: dict[str, np.ndarray]
    margins: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    features: Tensor | None
    excluded: int


def _device(monitor: Monitor) -> torch.device:
    param = next(monitor.model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def collect_holdout(
    monitor: Monitor,
    data: Tensor | Iterable[Any],
    settings: AttackSettings,
    *,
    engine: str = DEFAULT_ENGINE,
    n_samples: int | None = None,
    progress: bool = True,
    cache: MarginCache | None = None,
    keep_features: bool = True,
    part: Shard | None = None,
) -> Holdout:
    """Stream the holdout once: scores, features, predictions, labels and input margins.

    Memory stays bounded by one batch of inputs plus the per-sample results.
    Samples with NaN or Inf are skipped and counted in ``excluded``. Under a
    process group (``part``), each rank attacks only the samples it owns and the
    margins are assembled on every rank.
    """
    part = part or Shard()
    device = _device(monitor)
    total = n_samples if n_samples is not None else _length(data)
    scores: dict[str, list[Tensor]] = {}
    preds, labels, feats, kept = [], [], [], []
    attacked: list[Tensor] = []
    margins: list[Tensor] = []
    has_labels, seen = True, 0
    show = progress and part.is_main
    with tqdm(total=total, unit="sample", disable=not show, desc="fit: input margins") as bar:
        for x, y in batches(data, limit=n_samples):
            x = monitor._check_input(x.to(device))
            with torch.no_grad(), eval_mode(monitor.model):
                run = monitor._run(x)
                values = monitor._all_scores(run)
            keep = (~run.bad).cpu()
            index = torch.arange(seen, seen + keep.numel())[keep]
            seen += keep.numel()
            bar.update(int(keep.numel()))
            if not keep.any():
                continue
            kept.append(index)
            pred = run.logits.argmax(dim=1)[keep.to(device)]
            mine = part.owns(index)
            if mine.any():
                x_mine = x[keep.to(device)][mine.to(device)]
                result = cache.get(x_mine) if cache is not None else None
                if result is None:
                    result = attack_batch(
                        monitor.model, x_mine, pred[mine.to(device)], settings, engine, index[mine]
                    ).cpu()
                    if cache is not None:
                        cache.put(x_mine, result)
                attacked.append(index[mine])
                margins.append(result)
            preds.append(pred.cpu())
            for kind, value in values.items():
                scores.setdefault(kind, []).append(value.detach().cpu()[keep])
            if keep_features and run.capture.features is not None:
                feats.append(run.capture.features.detach().cpu()[keep])
            if y is None:
                has_labels = False
            elif has_labels:
                labels.append(y.cpu()[keep])
    part.check_same_length(seen)
    if not kept:
        raise ValueError("the holdout yielded no usable samples (empty, or all NaN/Inf).")
    if not attacked:  # this rank owned no sample
        attacked, margins = [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    full = part.assemble(seen, torch.cat(attacked), torch.cat(margins))
    kept_index = torch.cat(kept)
    return Holdout(
        scores={k: torch.cat(v).double().numpy() for k, v in scores.items()},
        margins=full[kept_index].numpy(),
        predictions=torch.cat(preds).numpy(),
        labels=torch.cat(labels).numpy() if has_labels and labels else None,
        features=torch.cat(feats) if feats else None,
        excluded=seen - kept_index.numel(),
    )


def holdout_report(holdout: Holdout, *, eps: float, norm: str, **fields: Any) -> ConsistencyReport:
    """A report on ``holdout``: the arrays and figures the holdout determines, plus ``fields``.

    ``fields`` are the remaining :class:`ConsistencyReport` fields (metrics, chosen
    score, threshold and rates, timings, calibration mask, settings).
    """
    margins, labels = holdout.margins, holdout.labels
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


def _length(data: Any) -> int | None:
    try:
        dataset = getattr(data, "dataset", data)
        return len(dataset)
    except TypeError:
        return None


def _check_both_classes(margins: np.ndarray, eps: float) -> None:
    positive = nonrobust(margins, eps)
    n = margins.size
    if not positive.any():
        finite = margins[np.isfinite(margins)]
        smallest = f"{finite.min():.4g}" if finite.size else "inf (no adversarial found)"
        raise ValueError(
            f"none of the {n} holdout samples is non-robust at eps={eps:.4g} (smallest input "
            f"margin {smallest}), so no threshold can be calibrated. Use a larger eps, more "
            "samples, or more attack steps."
        )
    if positive.all():
        raise ValueError(
            f"all {n} holdout samples are non-robust at eps={eps:.4g} (largest input margin "
            f"{margins.max():.4g}), so robust and brittle decisions cannot be told apart. Use a "
            "smaller eps or more samples."
        )


def choose_score(metrics: dict[str, ScoreMetrics], min_tau: float) -> tuple[ScoreKind, str]:
    """Logit margin if its tau reaches ``min_tau``; else the score with the highest tau."""
    logit_tau = metrics["logit"].tau
    if logit_tau >= min_tau:
        return "logit", f"logit margin tau {logit_tau:.3f} >= min_tau {min_tau:.3f}"
    best = max(metrics, key=lambda k: -math.inf if math.isnan(metrics[k].tau) else metrics[k].tau)
    return best, (  # type: ignore[return-value]
        f"logit margin tau {logit_tau:.3f} < min_tau {min_tau:.3f}; {best} margin has the "
        f"highest tau ({metrics[best].tau:.3f})"
    )


def _validate(target_tpr: float, n_samples: int | None, engine: str, pseudo: object) -> None:
    if not 0.0 < target_tpr < 1.0:
        raise ValueError(f"target_tpr must be in (0, 1). Got {target_tpr}.")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be positive. Got {n_samples}.")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}. Got {engine!r}.")
    if pseudo not in (True, False, "auto"):
        raise ValueError(f"pseudo must be True, False or 'auto'. Got {pseudo!r}.")


def fit_monitor(
    monitor: Monitor,
    loader: Iterable[Any] | Tensor,
    *,
    target_tpr: float = 0.95,
    eps: float | None = None,
    n_samples: int | None = None,
    steps: int = 100,
    restarts: int = 1,
    pseudo: bool | Literal["auto"] = "auto",
    min_tau: float | None = None,
    engine: str = DEFAULT_ENGINE,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    distributed: bool | None = None,
) -> Monitor:
    """Calibrate ``monitor`` on a holdout and return it.

    1. Stream the holdout once: scores, features, predictions, labels, and FAB
       input margins against the predicted class (cached in ``cache_dir``).
    2. Kendall tau with a bootstrap interval and detection metrics for each score.
    3. Train the pseudo-margin network when asked (``pseudo=True``) or needed
       (``"auto"`` and no score reaches ``min_tau``), on a part of the holdout
       disjoint from the calibration part.
    4. Choose the score (``score="auto"``) and the split-conformal threshold at
       ``target_tpr`` on the calibration part.

    Args:
        monitor: The monitor to fit (modified in place).
        loader: Holdout: a tensor or a loader yielding ``x``, ``(x, y)`` or dicts,
            inputs in ``[0, 1]``.
        target_tpr: Share of non-robust decisions the flag must catch.
        eps: Budget defining non-robust (defaults to the monitor's ``eps``).
        n_samples: Use at most this many holdout samples.
        steps: FAB iterations per restart.
        restarts: FAB restarts per sample (the smallest verified norm is kept).
        pseudo: ``True``, ``False`` or ``"auto"``.
        min_tau: Consistency bar (defaults to the monitor's ``min_tau``).
        engine: Attack engine: ``"brittle"`` (brittle's fast FAB, the default) or
            ``"torchattacks"`` (the reference FAB).
        progress: Show a progress bar.
        cache_dir: Directory for resumable margin caching.
        seed: Seeds attacks, splits and training.
        distributed: Shard the attacks across the ranks of the initialised
            torch.distributed process group (``None``: whenever one is initialised).
            Every rank must iterate the same holdout in the same order; every rank
            ends with the same fitted monitor.

    Raises:
        ValueError: if the holdout has no non-robust or no robust samples at
            ``eps``, too few for the threshold or the pseudo-margin network.
    """
    from brittle.monitor import _check_eps

    _validate(target_tpr, n_samples, engine, pseudo)
    eps = monitor.eps if eps is None else _check_eps(eps)
    min_tau = monitor.min_tau if min_tau is None else float(min_tau)
    if pseudo is True and monitor.head_name is None and monitor.discovered:
        raise ValueError(f"pseudo=True needs the model's last linear layer. {NO_HEAD_HINT}")
    settings = AttackSettings(norm=monitor.norm, steps=steps, restarts=restarts, seed=seed)
    part = shard(distributed)
    cache = MarginCache(cache_dir, monitor.model, settings, engine) if cache_dir else None

    monitor.pseudo = None  # a refit starts from the model's own scores
    timings: dict[str, float] = {}
    start = time.perf_counter()
    holdout = collect_holdout(
        monitor,
        loader,
        settings,
        engine=engine,
        n_samples=n_samples,
        progress=progress,
        cache=cache,
        part=part,
    )
    timings["attack"] = time.perf_counter() - start
    margins, n = holdout.margins, holdout.margins.size
    _check_both_classes(margins, eps)

    start = time.perf_counter()
    calibration = np.ones(n, dtype=bool)
    metrics = {
        k: score_metrics(v, margins, eps, target_tpr, seed=seed) for k, v in holdout.scores.items()
    }
    best_tau = max(m.tau for m in metrics.values())
    wants_pseudo = pseudo is True or (pseudo == "auto" and not best_tau >= min_tau)
    if monitor.requested_score == "pseudo":
        wants_pseudo = True
    if wants_pseudo and monitor.head_name is None:
        if pseudo is True or monitor.requested_score == "pseudo":
            raise ValueError(
                f"the pseudo-margin needs the model's last linear layer. {NO_HEAD_HINT}"
            )
        wants_pseudo = False
    timings["metrics"] = time.perf_counter() - start

    pseudo_info = None
    if wants_pseudo:
        start = time.perf_counter()
        needed = math.ceil(MIN_TRAIN_SAMPLES / PSEUDO_TRAIN_SHARE)
        if n < needed:
            raise ValueError(
                f"the pseudo-margin network needs at least {needed} holdout samples "
                f"({MIN_TRAIN_SAMPLES} to train, the rest to calibrate). Got {n}: pass more "
                "samples or pseudo=False."
            )
        order = np.random.default_rng(seed).permutation(n)
        train = np.sort(order[: int(n * PSEUDO_TRAIN_SHARE)])
        calibration = np.ones(n, dtype=bool)
        calibration[train] = False
        if holdout.features is None:
            raise RuntimeError(
                "the head's input features were not captured during the holdout pass."
            )
        device = _device(monitor)
        net, info = train_pseudo_margin(
            holdout.features[torch.from_numpy(train)].to(device),
            torch.from_numpy(margins[train]),
            seed=seed,
        )
        part.broadcast_module(net)  # identical networks on every rank, whatever the device
        monitor.pseudo = net
        with torch.no_grad():
            values = [net(f.to(device)).cpu() for f in holdout.features.split(4096)]
        holdout.scores["pseudo"] = torch.cat(values).double().numpy()
        pseudo_info = asdict(info)
        timings["pseudo"] = time.perf_counter() - start
        _check_both_classes(margins[calibration], eps)
        metrics = {
            k: score_metrics(v[calibration], margins[calibration], eps, target_tpr, seed=seed)
            for k, v in holdout.scores.items()
        }

    if monitor.requested_score == "auto":
        chosen, reason = choose_score(metrics, min_tau)
    else:
        chosen = monitor.requested_score
        reason = f"requested with score={chosen!r}"
    positive = nonrobust(margins, eps)
    cal_scores = holdout.scores[chosen][calibration]
    threshold = conformal_threshold(cal_scores[positive[calibration]], target_tpr)
    tpr, fpr = rates(cal_scores, positive[calibration], threshold)

    monitor.eps = eps
    monitor.min_tau = min_tau
    monitor.chosen_score = chosen
    monitor.set_threshold(threshold)
    monitor.fitted.fill_(True)
    monitor._report = holdout_report(
        holdout,
        eps=eps,
        norm=monitor.norm,
        metrics=metrics,
        chosen=chosen,
        reason=reason,
        threshold=threshold,
        target_tpr=target_tpr,
        tpr=tpr,
        fpr=fpr,
        timings=timings,
        calibration=calibration,
        settings={
            "engine": engine,
            "steps": steps,
            "restarts": restarts,
            "seed": seed,
            "min_tau": min_tau,
            "min_positives": min_positives(target_tpr),
            "pseudo": pseudo_info,
        },
    )
    return monitor
