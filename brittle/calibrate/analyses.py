"""The paper's analyses of a fitted monitor: robust accuracy, per-class bias, baselines, attacks.

Library functions with typed results (each with ``to_dict()`` for JSON): the
robust-accuracy estimate from a small attacked subset (Algorithm 1, appendix
F.1), per-class robustness bias (F.2), baseline scores beside the margins (max
softmax probability, entropy, input-gradient norm, feature density) and the
share of PGD/FGSM examples the monitor flags. The metrics come from
``brittle.functional``, so every number here is computed the way ``fit()``
computes its own. ``python -m brittle.check`` renders them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from brittle._modes import eval_mode, frozen, seeded
from brittle.attacks.outcome import AttackOutcome
from brittle.attacks.pgd import torchattacks_fgsm, torchattacks_pgd
from brittle.calibrate.jsonfloat import dump_float
from brittle.calibrate.metrics import (
    ScoreMetrics,
    clopper_pearson,
    kendall_tau,
    nonrobust,
    score_metrics,
    wilson_interval,
)
from brittle.calibrate.threshold import conformal_threshold
from brittle.output import flagged
from brittle.scores.head import LogitsModel, model_output
from brittle.scores.norms import Norm, dual_order

if TYPE_CHECKING:
    from brittle.output import MonitorOutput
    from brittle.protocol import MonitorProtocol

__all__ = [
    "RobustAccuracy",
    "PerClassBias",
    "BaselineMetrics",
    "AdversarialFlags",
    "robust_accuracy_estimate",
    "subset_indices",
    "estimate_threshold",
    "per_class_bias",
    "BASELINES",
    "baseline_scores",
    "kde_scores",
    "baseline_metrics",
    "adversarial_flags",
    "forward_pass",
    "ForwardPass",
    "jsonable",
]

# What each baseline score is, and why its sign is what it is: brittle's convention is
# that a *lower* score means a *more* brittle decision.
BASELINES: dict[str, str] = {
    "msp": "maximum softmax probability",
    "entropy": "negative entropy of the softmax (low = uncertain)",
    "gradnorm": "negative dual norm of the input gradient of the cross-entropy at the "
    "predicted class (low = steep loss)",
    "kde": "log kernel density of the penultimate features under the predicted class "
    "(Feinman et al. 2017; low = atypical)",
}


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars made Python, for strict JSON (``jsonfloat.dump_float``).

    Examples:
        >>> from brittle.calibrate.analyses import jsonable
        >>> jsonable({"a": float("nan"), "b": [1.5, float("inf")]})
        {'a': None, 'b': [1.5, 'Infinity']}

    """
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return dump_float(float(value))
    return value


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class RobustAccuracy:
    """The robust-accuracy estimate of ``robust_accuracy_estimate`` (see there)."""

    quantity: str
    score: str
    eps: float
    estimate: float
    n_estimated: int
    estimate_held_out: float
    attacked_held_out: float
    attacked_held_out_ci: tuple[float, float]
    n_held_out: int
    attacked_subset: float
    attacked_subset_ci: tuple[float, float]
    subset_size: int
    attacked_all: float
    n_attacked: int
    threshold: float
    clean_accuracy: float | None
    method: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary (NaN and infinities as ``None``)."""
        return jsonable(asdict(self))


@dataclass(frozen=True)
class PerClassBias:
    """Per-class robustness of ``per_class_bias``.

    Attributes:
        by: ``"label"`` or ``"prediction"``: what the classes are.
        classes: One row per class: ``class``, ``n``, ``accuracy``,
            ``nonrobust_by_margin`` with its 95 % Wilson interval
            ``nonrobust_ci``, ``nonrobust_by_flag`` and ``tau``.
        spread: Largest minus smallest non-robust share across classes. With
            few samples per class it is large even when every class is alike.
        most_brittle_class: The class with the largest non-robust share.
        chi2: Chi-square statistic of homogeneity of the non-robust share across classes.
        p_value: Its p-value (scipy's ``chi2_contingency``); NaN when untestable.
        significant: Whether ``p_value < level``: only then do the classes differ
            in robustness beyond chance, and is the spread reported as a bias.
        level: The test's significance level.
    """

    by: str
    classes: list[dict[str, Any]]
    spread: float
    most_brittle_class: int
    chi2: float = math.nan
    p_value: float = math.nan
    significant: bool = False
    level: float = 0.05

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary."""
        return jsonable(asdict(self))


@dataclass(frozen=True)
class BaselineMetrics:
    """One baseline score's values and figures (``baseline_metrics``)."""

    description: str
    metrics: ScoreMetrics
    threshold: float
    values: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary: the description, the metrics' fields, threshold, values."""
        return jsonable(
            {
                "description": self.description,
                **self.metrics.to_dict(),
                "threshold": self.threshold,
                "values": self.values,
            }
        )


@dataclass(frozen=True)
class AdversarialFlags:
    """Share of adversarial examples at eps that the monitor flags (``adversarial_flags``).

    Attributes:
        n: Clean samples attacked.
        eps: Attack budget.
        norm: Threat model.
        clean_flagged: Share of the clean samples flagged.
        attacks: Attack name -> its figures.
        skipped: Why no attack ran, or ``None``.
    """

    n: int
    eps: float
    norm: str
    clean_flagged: float
    attacks: dict[str, AttackOutcome] = field(default_factory=dict)
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dictionary with one entry per attack beside the totals."""
        if self.skipped is not None:
            return {"skipped": self.skipped, "n": 0}
        out: dict[str, Any] = {
            "n": self.n,
            "eps": self.eps,
            "norm": self.norm,
            "clean_flagged": self.clean_flagged,
        }
        out.update({name: outcome.to_dict() for name, outcome in self.attacks.items()})
        return jsonable(out)


# ------------------------------------------------------------ forward pass
class ForwardPass:
    """Per-sample results of one pass of a fitted monitor over the whole data set.

    Attributes:
        score: ``(N,)`` the monitor's active score (NaN for samples it cannot judge).
        flag: ``(N,)`` the monitor's flag.
        pred: ``(N,)`` predicted classes.
        probs: ``(N, K)`` softmax probabilities.
        features: ``(N, d)`` the head's input, or ``None`` without a linear head.

    """

    def __init__(
        self, score: Tensor, flag: Tensor, pred: Tensor, probs: Tensor, features: Tensor | None
    ) -> None:
        self.score = score.double().numpy()
        self.flag = flag.numpy()
        self.pred = pred.numpy()
        self.probs = probs.double().numpy()
        self.features = features


def forward_pass(monitor: MonitorProtocol, x: Tensor, batch_size: int, device: str) -> ForwardPass:
    """Run a fitted monitor over ``x`` once: scores, flags, predictions, softmax, features."""
    scores, flags, preds, probs, feats = [], [], [], [], []
    kind = monitor.score
    with torch.no_grad():
        for batch in x.split(batch_size):
            seen = monitor.inspect(batch.to(device), features=monitor.head is not None)
            if seen.flag is None:
                raise ValueError("forward_pass needs a monitor with a threshold.")
            scores.append(seen.scores[kind].cpu())
            flags.append(seen.flag.cpu())
            preds.append(seen.logits.argmax(dim=1).masked_fill(seen.bad, -1).cpu())
            probs.append(torch.softmax(seen.logits, dim=1).cpu())
            if seen.features is not None:
                feats.append(seen.features.detach().float().cpu())
    features = torch.cat(feats) if feats and len(feats) == len(scores) else None
    return ForwardPass(
        torch.cat(scores), torch.cat(flags), torch.cat(preds), torch.cat(probs), features
    )


# ------------------------------------------------------ robust accuracy
def subset_indices(
    n: int, size: int, seed: int = 0, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Sorted seeded random choice of ``size`` of ``range(n)``: the attacked subset.

    Samples where ``exclude`` (``(n,)`` booleans) is True are never chosen; when
    fewer than ``size`` remain, all of them are.

    Examples:
        >>> import numpy as np
        >>> from brittle.calibrate.analyses import subset_indices
        >>> subset_indices(10, 3, seed=0).tolist()
        [2, 4, 6]
        >>> subset_indices(10, 3, seed=0, exclude=np.arange(10) < 5).tolist()
        [7, 8, 9]

    """
    eligible = np.arange(n) if exclude is None else np.flatnonzero(~np.asarray(exclude)[:n])
    order = np.random.default_rng(seed).permutation(eligible.size)
    return np.sort(eligible[order[: min(int(size), eligible.size)]])


def estimate_threshold(scores: np.ndarray, robust_count: int) -> float:
    """Threshold leaving as near ``robust_count`` of ``scores`` above it as ties allow.

    Without a tie at the boundary exactly ``robust_count`` scores lie above. A
    tie can only move all its members together: the threshold then leaves the
    achievable count nearest ``robust_count`` above, the smaller one when two
    are equally near (the estimate errs toward brittle). The midpoint between
    neighbours keeps rounding from moving samples across; ``-inf`` puts every
    score above. NaN scores are ignored.

    Examples:
        >>> import numpy as np
        >>> from brittle.calibrate.analyses import estimate_threshold
        >>> round(estimate_threshold(np.array([0.1, 0.4, 0.2, 0.9]), 2), 6)
        0.3
        >>> estimate_threshold(np.array([0.1, 0.5, 0.5, 0.5, 0.9]), 3)  # 4 above is nearest
        0.3

    """
    s = np.sort(np.asarray(scores, dtype=np.float64))
    s = s[~np.isnan(s)]
    if s.size == 0 or int(robust_count) >= s.size:
        return -math.inf
    values, counts = np.unique(s, return_counts=True)
    # above[j]: scores strictly above a threshold placed just below values[j]
    # (j = len(values): at the largest value, nothing above).
    above = np.concatenate([s.size - np.cumsum(counts) + counts, [0]])
    distance = np.abs(above - int(robust_count))
    # Ties in distance: the later index leaves fewer above.
    j = int(np.flatnonzero(distance == distance.min())[-1])
    if j == 0:
        return -math.inf
    if j == values.size:
        return float(values[-1])
    return float((values[j - 1] + values[j]) / 2.0)


def robust_accuracy_estimate(
    *,
    score_all: np.ndarray,
    pred_all: np.ndarray,
    labels_all: np.ndarray | None,
    margins: np.ndarray,
    eps: float,
    subset_size: int,
    score_name: str,
    seed: int = 0,
    exclude: np.ndarray | None = None,
) -> RobustAccuracy:
    """Robust accuracy of the whole data set from an attacked subset (the paper's Algorithm 1).

    The first ``len(margins)`` samples of the data set were attacked (their input
    margins are ``margins``). A seeded random subset of ``subset_size`` of them
    (``subset_indices``)
    stands for the small attacked set of Algorithm 1. On it, the threshold ``t``
    on the score is picked so that "correct and score > t" counts exactly as many
    samples as "correct and input margin > eps", that is, so that the score-based
    figure reproduces the attacked one on the subset. Robust accuracy on the whole
    data set is then estimated from scores alone as the share of samples that are
    correct and score above ``t``. Matching counts, rather than maximising
    detection accuracy, is what makes the estimate unbiased when the score ranks
    samples as the input margin does (margin consistency).

    Without labels every prediction counts as correct, and the figures are the
    robust *share* of decisions instead. Attacked samples where ``exclude`` (one
    boolean per attacked sample) is True, the pseudo-margin network's training
    samples, whose scores are in sample, are neither in the subset nor among
    those the estimate is judged on; the estimate over the whole data set still
    counts them, by their scores, as it counts every sample.

    Returns:
        ``RobustAccuracy``: the estimate; the attacked figure on the subset it came
        from (with a Clopper-Pearson interval); the estimate and the attacked figure
        on the attacked samples *outside* the subset (``*_held_out``, NaN when the
        subset holds every attacked sample), where the estimate is judged; the
        attacked figure on all attacked samples; and the threshold.

    """
    n_all, n_attacked = int(score_all.size), int(margins.size)
    if exclude is not None:
        exclude = np.asarray(exclude, dtype=bool)
        if exclude.shape != (n_attacked,):
            raise ValueError(
                f"exclude must hold one boolean per attacked sample ({n_attacked}). "
                f"Got shape {exclude.shape}."
            )
    subset = subset_indices(n_attacked, subset_size, seed, exclude)
    m = int(subset.size)
    correct_all = np.ones(n_all, dtype=bool) if labels_all is None else pred_all == labels_all
    robust_attacked = correct_all[:n_attacked] & ~nonrobust(margins, eps)
    correct_sub = correct_all[subset]
    threshold = estimate_threshold(
        score_all[subset][correct_sub], int(robust_attacked[subset].sum())
    )
    # NaN scores (inputs the monitor cannot judge) compare False: never counted robust.
    robust_estimated = correct_all & (score_all > threshold)
    # The estimate is judged where the truth is known and the threshold was not matched:
    # on the subset itself it reproduces the attacked figure by construction.
    held_out = np.ones(n_attacked, dtype=bool) if exclude is None else ~exclude[:n_attacked]
    held_out[subset] = False
    n_held = int(held_out.sum())
    k_held = int(robust_attacked[held_out].sum())
    k_sub = int(robust_attacked[subset].sum())
    return RobustAccuracy(
        quantity="robust accuracy" if labels_all is not None else "robust share (no labels)",
        score=score_name,
        eps=eps,
        estimate=float(robust_estimated.mean()),
        n_estimated=n_all,
        estimate_held_out=float(robust_estimated[:n_attacked][held_out].mean())
        if n_held
        else math.nan,
        attacked_held_out=k_held / n_held if n_held else math.nan,
        attacked_held_out_ci=clopper_pearson(k_held, n_held),
        n_held_out=n_held,
        attacked_subset=k_sub / m if m else math.nan,
        attacked_subset_ci=clopper_pearson(k_sub, m),
        subset_size=m,
        attacked_all=float(robust_attacked.mean()),
        n_attacked=n_attacked,
        threshold=threshold,
        clean_accuracy=None if labels_all is None else float(correct_all.mean()),
        method="threshold matched on the attacked subset (Algorithm 1), then scores only; "
        "judged on the attacked samples outside the subset",
    )


# ---------------------------------------------------------- per-class bias
def per_class_bias(
    *,
    margins: np.ndarray,
    score: np.ndarray,
    threshold: float,
    preds: np.ndarray,
    labels: np.ndarray | None,
    eps: float,
    level: float = 0.05,
) -> PerClassBias:
    """Per class: share non-robust by input margin and by the flag, and the class's tau.

    Classes are the labels when there are labels, else the predictions. Whether
    the classes differ is a chi-square test of homogeneity of the non-robust
    share (scipy's ``chi2_contingency`` on the classes x {robust, non-robust}
    table); each class's share has a 95 % Wilson interval.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1). Got {level}.")
    classes = labels if labels is not None else preds
    positive = nonrobust(margins, eps)
    flags = flagged(score, threshold)
    rows: list[dict[str, Any]] = []
    shares: list[float] = []
    table = []
    for c in np.unique(classes):
        mask = classes == c
        tau = kendall_tau(score[mask], margins[mask]) if mask.sum() >= 3 else math.nan
        k, n = int(positive[mask].sum()), int(mask.sum())
        rows.append(
            {
                "class": int(c),
                "n": n,
                "accuracy": None if labels is None else float((preds[mask] == c).mean()),
                "nonrobust_by_margin": k / n,
                "nonrobust_ci": list(wilson_interval(k, n)),
                "nonrobust_by_flag": float(flags[mask].mean()),
                "tau": tau,
            }
        )
        shares.append(k / n)
        table.append([k, n - k])
    worst = rows[int(np.argmax(shares))]
    chi2, p_value = _homogeneity(np.asarray(table))
    return PerClassBias(
        by="label" if labels is not None else "prediction",
        classes=jsonable(rows),
        spread=max(shares) - min(shares),
        most_brittle_class=int(worst["class"]),
        chi2=chi2,
        p_value=p_value,
        significant=bool(p_value < level),
        level=level,
    )


def _homogeneity(table: np.ndarray) -> tuple[float, float]:
    """Chi-square statistic and p-value of equal shares across rows; NaN when untestable."""
    # One class, or a column of zeros (no sample, or every one, non-robust): nothing to test.
    if table.shape[0] < 2 or (table.sum(axis=0) == 0).any():
        return math.nan, math.nan
    result = stats.chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


# --------------------------------------------------------------- baselines
def _input_gradient_norm(
    model: nn.Module, x: Tensor, norm: Norm, batch_size: int, device: str
) -> np.ndarray:
    """Dual norm of d CE(f(x), argmax f(x)) / dx per sample, via ``torch.autograd.grad``.

    The model is borrowed in eval mode with frozen parameters, so no ``.grad`` is
    written into it and no parameter gradient is computed.
    """
    out = []
    # Gradients are needed even when the caller runs under torch.no_grad().
    with eval_mode(model), frozen(model), torch.enable_grad():
        for batch in x.split(batch_size):
            inputs = batch.to(device).detach().requires_grad_(True)
            logits = model_output(model(inputs))  # a tensor, dict, .logits or tuple
            # Summed loss: each sample's gradient is its own (eval mode, no batch statistics).
            loss = nn.functional.cross_entropy(logits, logits.argmax(dim=1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, inputs)
            out.append(torch.linalg.vector_norm(grad.flatten(1), ord=dual_order(norm), dim=1).cpu())
    return torch.cat(out).double().numpy()


def kde_scores(
    features: Tensor,
    preds: np.ndarray,
    query: np.ndarray,
    *,
    max_reference: int = 5000,
    seed: int = 0,
) -> np.ndarray:
    """Log Gaussian-kernel density of ``features[query]`` under their predicted class.

    The reference set is the whole data set's features grouped by predicted class
    (at most ``max_reference`` of them, drawn with ``seed``); a query sample is left
    out of its own density. The bandwidth is the median pairwise distance of the
    reference features (the median heuristic), one for all classes, as Feinman et
    al. use one bandwidth per data set.
    """
    feats = features.double()
    n = feats.shape[0]
    rng = np.random.default_rng(seed)
    reference = np.sort(rng.permutation(n)[:max_reference])
    ref = feats[torch.from_numpy(reference)]
    probe = ref[torch.from_numpy(rng.permutation(ref.shape[0])[:1000])]
    dist = torch.cdist(probe, probe)
    sigma = float(dist[dist > 0].median()) if (dist > 0).any() else 1.0
    ref_pred = preds[reference]
    out = np.empty(query.size, dtype=np.float64)
    for c in np.unique(preds[query]):
        rows = query[preds[query] == c]
        members = reference[ref_pred == c]
        if members.size == 0:
            out[np.isin(query, rows)] = -math.inf
            continue
        d2 = torch.cdist(feats[torch.from_numpy(rows)], feats[torch.from_numpy(members)]).square()
        logk = -d2 / (2 * sigma**2)
        same = torch.from_numpy(rows[:, None] == members[None, :])
        logk = logk.masked_fill(same, -math.inf)  # leave-one-out
        count = (~same).sum(dim=1).clamp(min=1).double()
        density = (torch.logsumexp(logk, dim=1) - count.log()).numpy()
        out[np.searchsorted(query, rows)] = density
    finite = np.isfinite(out)
    # A class with no other member has no density; rank it below everything seen.
    if not finite.all():
        floor = out[finite].min() - 1.0 if finite.any() else 0.0
        out[~finite] = floor
    return out


def baseline_scores(
    model: nn.Module,
    x: Tensor,
    *,
    probs: np.ndarray,
    features: Tensor | None,
    preds_all: np.ndarray,
    norm: Norm,
    batch_size: int,
    device: str,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Compute the baseline scores of the attacked samples ``x`` (the first ``len(x)`` of the data).

    ``probs``, ``features`` and ``preds_all`` cover the whole data set (from
    ``forward_pass``); the KDE uses all of it as its reference set.
    """
    n = x.shape[0]
    p = probs[:n]
    entropy = -(p * np.log(np.clip(p, 1e-300, None))).sum(axis=1)
    out = {
        "msp": p.max(axis=1),
        "entropy": -entropy,
        "gradnorm": -_input_gradient_norm(model, x, norm, batch_size, device),
    }
    if features is not None:
        out["kde"] = kde_scores(features, preds_all, np.arange(n), seed=seed)
    return out


def baseline_metrics(
    scores: dict[str, np.ndarray],
    margins: np.ndarray,
    mask: np.ndarray,
    eps: float,
    target_tpr: float,
    seed: int = 0,
) -> dict[str, BaselineMetrics]:
    """Tau (with interval), AUROC, AUPR and FPR@TPR of each baseline on the ``mask`` samples."""
    out: dict[str, BaselineMetrics] = {}
    positive = nonrobust(margins[mask], eps)
    for name, values in scores.items():
        # Fewer bootstrap resamples than fit() uses: four more scores would otherwise
        # double the time of the analyses, and these intervals only give context.
        metrics = score_metrics(
            values[mask], margins[mask], eps, target_tpr, n_resamples=500, seed=seed
        )
        try:
            threshold = conformal_threshold(values[mask][positive], target_tpr)
        except ValueError:
            threshold = math.nan
        out[name] = BaselineMetrics(BASELINES[name], metrics, threshold, values)
    return out


# ----------------------------------------------------------- adversarials
def _attacks(model: nn.Module, norm: Norm, eps: float, steps: int) -> dict[str, Any]:
    if norm not in ("Linf", "L2"):
        return {}
    # torchattacks needs a logits tensor; the model may return a dict, .logits or a tuple.
    logits = LogitsModel(model)
    return {
        "pgd": torchattacks_pgd(logits, norm, eps, steps),
        "fgsm": torchattacks_fgsm(logits, norm, eps),
    }


def adversarial_flags(
    monitor: MonitorProtocol,
    x: Tensor,
    *,
    norm: Norm,
    eps: float,
    batch_size: int,
    device: str,
    steps: int = 10,
    seed: int = 0,
    attacks: dict[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
) -> AdversarialFlags:
    """Share of torchattacks PGD and FGSM examples at ``eps`` that the fitted monitor flags.

    The attacks target the model's *predicted* class, so a successful example is
    one whose prediction changed. For L2 the FGSM entry is the fast gradient
    method (one PGD-L2 step of size eps); torchattacks has neither for L1.
    """
    if not monitor.has_threshold:
        raise ValueError("adversarial_flags needs a monitor with a threshold: fit it first.")
    model = monitor.model
    attacks = attacks if attacks is not None else _attacks(model, norm, eps, steps)
    if not attacks:
        skipped = f"torchattacks has no PGD or FGSM for the {norm} norm"
        return AdversarialFlags(0, eps, norm, math.nan, skipped=skipped)
    batches = [batch.to(device) for batch in x.split(batch_size)]
    with torch.no_grad():
        clean = [monitor(batch) for batch in batches]
    clean_flagged = float(torch.cat([_flags(c) for c in clean]).float().mean())
    results: dict[str, AttackOutcome] = {}
    # PGD's random start draws from the global generators: seed them for the block
    # only, so that the result is seeded and the caller's random state is left as it was.
    for name, attack in attacks.items():
        success, caught = [], []
        with seeded(seed, device):
            for batch, before in zip(batches, clean, strict=True):
                # The model is borrowed with frozen parameters: torchattacks differentiates
                # with respect to the input only and writes no .grad into the model.
                with eval_mode(model), frozen(model), torch.enable_grad():
                    adv = attack(batch, before.pred)
                with torch.no_grad():
                    after = monitor(adv)
                success.append((after.pred != before.pred).cpu())
                caught.append(_flags(after))
        hit, flag = torch.cat(success), torch.cat(caught)
        # torchattacks projects onto the eps-ball: every changed example is successful.
        changed, caught_changed = int(hit.sum()), int(flag[hit].sum())
        results[name] = AttackOutcome(
            name,
            n=int(hit.numel()),
            n_changed=changed,
            n_successful=changed,
            n_flagged=caught_changed,
            n_changed_flagged=caught_changed,
            n_examples_flagged=int(flag.sum()),
        )
    return AdversarialFlags(int(x.shape[0]), eps, norm, clean_flagged, results)


def _flags(output: MonitorOutput) -> Tensor:
    """The output's flags on the CPU (a monitor with a threshold always has them)."""
    if output.flag is None:
        raise ValueError("the monitor has no threshold, so it gives no flags.")
    return output.flag.cpu()
