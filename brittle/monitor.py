"""``brittle.wrap`` and the ``Monitor`` module it returns."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn

from brittle._modes import eval_mode
from brittle.attack import DEFAULT_ENGINE
from brittle.errors import NotFittedError
from brittle.head import (
    NO_HEAD_HINT,
    HeadCapture,
    capture_head,
    discover_head,
    model_output,
    resolve_head,
)
from brittle.margins import feature_margin, logit_margin, pair_norm_table
from brittle.norms import Norm, check_norm
from brittle.output import MonitorOutput
from brittle.pseudo import PseudoMargin

if TYPE_CHECKING:
    from collections.abc import Iterable

    from brittle.report import ConsistencyReport

__all__ = ["Monitor", "wrap", "Score", "ScoreKind"]

Score = Literal["auto", "logit", "feature", "pseudo"]
ScoreKind = Literal["logit", "feature", "pseudo"]
SCORES: tuple[str, ...] = get_args(Score)

# Above this size the (K, K) pair-norm table is not stored; the rows needed by a
# batch are computed from the head weight instead.
TABLE_LIMIT_BYTES = 256 * 2**20
_STATE_VERSION = 1


def _check_eps(eps: float) -> float:
    eps = float(eps)
    if not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite positive number. Got {eps}.")
    return eps


def _check_score(score: str) -> Score:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}. Got {score!r}.")
    return score  # type: ignore[return-value]


def _fingerprint(weight: Tensor) -> list[float]:
    """Cheap summary of the head weight that tells one trained model from another.

    The position-weighted sum changes when classes are permuted.
    """
    w = weight.detach().to(torch.float64).flatten()
    ramp = torch.linspace(-1.0, 1.0, w.numel(), dtype=torch.float64, device=w.device)
    return [float(w.sum()), float(w.square().sum()), float((w * ramp).sum())]


@dataclass
class _Pass:
    """One forward pass of the model with everything the scores need."""

    logits: Tensor
    capture: HeadCapture
    bad: Tensor


class Monitor(nn.Module):
    """A classifier that also returns a per-sample margin and a non-robust flag.

    Build it with ``brittle.wrap``. The wrapped model runs once per call; the
    head's input (the penultimate features) is captured by a forward hook that
    lives only for the duration of the call, so the user's model is never left
    with hooks, gradients or a changed mode.

    Args:
        model: The classifier. It must map ``(B, ...)`` inputs to ``(B, K)`` logits.
        score: ``"logit"``, ``"feature"`` (exact feature margin), ``"pseudo"``
            (learned pseudo-margin, needs ``fit``) or ``"auto"`` (logit margin
            until ``fit`` picks the best consistent score).
        norm: Threat model of the input margin: ``"Linf"``, ``"L2"`` or ``"L1"``.
        eps: Perturbation budget that defines a non-robust decision.
        head: Module name of the ``nn.Linear`` producing the logits. Found
            automatically on the first call when omitted.
        example_input: A batch to find the head with now rather than on the first call.
        min_tau: Kendall tau the logit margin must reach for ``score="auto"`` to keep it.

    Examples:
        >>> import torch, brittle
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> monitor = brittle.wrap(model, norm="L2")
        >>> out = monitor(torch.rand(5, 4))
        >>> out.logits.shape, out.margin.shape, out.flag
        (torch.Size([5, 3]), torch.Size([5]), None)
        >>> monitor.head_name
        '1'
        >>> monitor.set_threshold(0.1)
        >>> monitor(torch.rand(5, 4)).flag.dtype
        torch.bool
    """

    threshold: Tensor
    fitted: Tensor
    pair_norms: Tensor

    def __init__(
        self,
        model: nn.Module,
        *,
        score: Score = "auto",
        norm: Norm = "Linf",
        eps: float = 8 / 255,
        head: str | None = None,
        example_input: Tensor | None = None,
        min_tau: float = 0.5,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module. Got {type(model).__name__}.")
        self.model = model
        self.norm: Norm = check_norm(norm)
        self.eps = _check_eps(eps)
        self.requested_score: Score = _check_score(score)
        self.min_tau = float(min_tau)
        self.chosen_score: ScoreKind | None = None
        self.head_name: str | None = None
        self.num_classes: int | None = None
        self.feature_dim: int | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.head_fingerprint: list[float] | None = None
        self.pseudo: PseudoMargin | None = None
        self._report: ConsistencyReport | None = None
        self._has_threshold = False
        self.register_buffer("threshold", torch.tensor(math.nan))
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("pair_norms", torch.empty(0, 0))
        if head is not None:
            self._attach_head(head)
        if example_input is not None:
            with torch.no_grad(), eval_mode(model):
                self._run(self._check_input(example_input))

    # ------------------------------------------------------------------ head
    @property
    def head(self) -> nn.Linear | None:
        """The ``nn.Linear`` producing the logits; ``None`` if there is none or not found yet."""
        return None if self.head_name is None else resolve_head(self.model, self.head_name)

    def _attach_head(self, name: str) -> None:
        head = resolve_head(self.model, name)
        if self.num_classes is not None and head.out_features != self.num_classes:
            raise ValueError(
                f"head {name!r} has {head.out_features} outputs but the model returns "
                f"{self.num_classes} logits. {NO_HEAD_HINT}"
            )
        self.head_name = name
        self.num_classes, self.feature_dim = head.out_features, head.in_features
        self.head_fingerprint = _fingerprint(head.weight)
        k = head.out_features
        if k * k * head.weight.element_size() <= TABLE_LIMIT_BYTES:
            self.pair_norms = pair_norm_table(head.weight, self.norm)
        else:
            self.pair_norms = head.weight.new_empty(0, 0)

    @property
    def discovered(self) -> bool:
        """Whether the monitor has seen the model's input and output shapes."""
        return self.input_shape is not None

    def _adopt(self, x: Tensor, logits: Tensor, found: str | None) -> None:
        head = self.head
        if head is not None and head.out_features != logits.shape[1]:
            raise ValueError(
                f"head {self.head_name!r} has {head.out_features} outputs but the model returns "
                f"{logits.shape[1]} logits. {NO_HEAD_HINT}"
            )
        self.input_shape = tuple(x.shape[1:])
        self.num_classes = logits.shape[1]
        if self.head_name is None and found is not None:
            self._attach_head(found)
        if self.head_name is None and self.requested_score in ("feature", "pseudo"):
            raise ValueError(
                f"score={self.requested_score!r} needs the model's last linear layer, and no "
                f"nn.Linear output equals the model's output. {NO_HEAD_HINT}"
            )

    # ----------------------------------------------------------------- input
    def _expected(self) -> str:
        shape = ", ".join(str(s) for s in self.input_shape or ())
        return f"(batch, {shape})"

    def _check_input(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            raise ValueError(f"input must be a torch.Tensor. Got {type(x).__name__}.")
        expected = self._expected() if self.discovered else "(batch, ...)"
        if not x.is_floating_point():
            raise ValueError(
                f"input must be a floating-point tensor of shape {expected}. Got dtype {x.dtype}."
            )
        if x.dim() < 2:
            raise ValueError(f"input must have shape {expected}. Got {tuple(x.shape)}.")
        if self.input_shape is not None and (
            x.dim() != len(self.input_shape) + 1 or x.shape[1] != self.input_shape[0]
        ):
            raise ValueError(f"input must have shape {expected}. Got {tuple(x.shape)}.")
        param = next(self.model.parameters(), None)
        if param is not None and (param.dtype != x.dtype or param.device != x.device):
            raise ValueError(
                f"input must be a {param.dtype} tensor on {param.device} like the model. "
                f"Got {x.dtype} on {x.device}."
            )
        return x

    def _call_model(self, x: Tensor) -> Tensor:
        try:
            return model_output(self.model(x))
        except RuntimeError as err:
            if isinstance(err, torch.cuda.OutOfMemoryError) or not self.discovered:
                raise
            if tuple(x.shape[1:]) == self.input_shape:
                raise
            raise ValueError(
                f"the model could not process an input of shape {tuple(x.shape)}; "
                f"expected {self._expected()}. ({err})"
            ) from err

    def _run(self, x: Tensor) -> _Pass:
        """One forward pass on an already checked, non-empty batch."""
        ok = torch.isfinite(x).flatten(1).all(dim=1)
        # Non-finite samples are zeroed before the forward pass so that they cannot
        # leak into other samples (batch statistics, attention over the batch).
        safe = torch.where(ok.view(-1, *([1] * (x.dim() - 1))), x, 0.0)
        if not self.discovered:
            with capture_head(self.head) as named:
                logits, found, capture = discover_head(self.model, safe)
            self._adopt(x, logits, found)
            if named.calls:  # a head given by name need not produce the logits exactly
                capture = named
        else:
            with capture_head(self.head) as capture:
                logits = self._call_model(safe)
        bad = ~(ok & torch.isfinite(logits).all(dim=1))
        return _Pass(logits, capture, bad)

    def _empty(self, x: Tensor) -> MonitorOutput:
        k = self.num_classes or 0
        logits = x.new_empty(0, k)
        margin = x.new_empty(0)
        pred = torch.empty(0, dtype=torch.long, device=x.device)
        flag = torch.empty(0, dtype=torch.bool, device=x.device) if self._has_threshold else None
        return MonitorOutput(logits, pred, margin, flag)

    # ---------------------------------------------------------------- scores
    @property
    def available_scores(self) -> tuple[ScoreKind, ...]:
        """Score kinds this monitor can compute now."""
        kinds: list[ScoreKind] = ["logit"]
        if self.head_name is not None:
            kinds.append("feature")
        if self.pseudo is not None:
            kinds.append("pseudo")
        return tuple(kinds)

    @property
    def score(self) -> ScoreKind:
        """The active score kind: the requested one, or for ``"auto"`` what ``fit`` chose."""
        if self.requested_score != "auto":
            return self.requested_score
        return self.chosen_score or "logit"

    def _score(self, kind: ScoreKind, run: _Pass) -> Tensor:
        if kind == "logit":
            return logit_margin(run.logits)
        if kind == "feature":
            head = self.head
            if head is None:
                raise ValueError(
                    f"score='feature' needs the model's last linear layer. {NO_HEAD_HINT}"
                )
            self._check_capture(run.capture)
            table = self.pair_norms if self.pair_norms.numel() else None
            return feature_margin(run.capture.output, head.weight, self.norm, table)  # type: ignore[arg-type]
        if self.pseudo is None:
            raise NotFittedError(
                "score='pseudo' needs a trained pseudo-margin network: "
                "call monitor.fit(loader) first."
            )
        self._check_capture(run.capture)
        return self.pseudo(run.capture.features)

    def _check_capture(self, capture: HeadCapture) -> None:
        if capture.calls == 0 or capture.features is None or capture.features.dim() != 2:
            raise RuntimeError(
                f"head {self.head_name!r} did not receive (batch, features) inputs during the "
                f"forward pass. {NO_HEAD_HINT}"
            )

    def _finish(self, margin: Tensor, bad: Tensor) -> tuple[Tensor, Tensor | None]:
        margin = margin.masked_fill(bad, math.nan)
        if not self._has_threshold:
            return margin, None
        return margin, (margin <= self.threshold) | bad

    def forward(self, x: Tensor) -> MonitorOutput:
        """Logits, prediction, margin and flag for a batch, from one pass of the model.

        Args:
            x: ``(B, ...)`` floating-point inputs on the model's device and dtype.

        Returns:
            ``MonitorOutput``. Samples with NaN or Inf get NaN logits
            and margin, prediction ``-1`` and flag True; the others are unaffected.

        Raises:
            ValueError: if ``x`` has the wrong rank, channel count, dtype or device.
        """
        x = self._check_input(x)
        if x.shape[0] == 0:
            return self._empty(x)
        run = self._run(x)
        margin, flag = self._finish(self._score(self.score, run), run.bad)
        logits = run.logits.masked_fill(run.bad[:, None], math.nan)
        pred = run.logits.argmax(dim=1).masked_fill(run.bad, -1)
        return MonitorOutput(logits, pred, margin, flag)

    def scores(self, x: Tensor) -> dict[str, Tensor]:
        """Every available score for a batch, from one pass of the model.

        Returns:
            ``{"logit": ..., "feature": ..., "pseudo": ...}`` with the keys in
            ``available_scores``; NaN for samples with NaN or Inf.

        Examples:
            >>> import torch, brittle
            >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), norm="L2")
            >>> sorted(monitor.scores(torch.rand(2, 4)))
            ['feature', 'logit']
        """
        x = self._check_input(x)
        if x.shape[0] == 0:
            return {kind: x.new_empty(0) for kind in self.available_scores}
        return self._all_scores(self._run(x))

    def _all_scores(self, run: _Pass) -> dict[str, Tensor]:
        return {
            kind: self._score(kind, run).masked_fill(run.bad, math.nan)
            for kind in self.available_scores
        }

    # ------------------------------------------------------------- threshold
    @property
    def has_threshold(self) -> bool:
        """Whether flags are produced (a threshold was set or fitted)."""
        return self._has_threshold

    def set_threshold(self, threshold: float) -> None:
        """Flag samples whose active score is ``<= threshold``.

        Args:
            threshold: A finite value in the units of the active score.
        """
        value = float(threshold)
        if not math.isfinite(value):
            raise ValueError(f"threshold must be a finite number. Got {threshold}.")
        self.threshold.fill_(value)
        self._has_threshold = True

    # ------------------------------------------------------------------ fit
    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` has run (or a fitted monitor was loaded)."""
        return bool(self.fitted)

    @property
    def report(self) -> ConsistencyReport:
        """The ``ConsistencyReport`` of the last ``fit``."""
        if self._report is None:
            raise NotFittedError(
                "this monitor has no consistency report yet: "
                "call monitor.fit(holdout_loader) first."
            )
        return self._report

    def fit(
        self,
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
        """Estimate input margins on a holdout, verify consistency and pick the threshold.

        See ``brittle.fit.fit_monitor`` for the arguments. Returns ``self``.
        """
        from brittle.fit import fit_monitor

        return fit_monitor(
            self,
            loader,
            target_tpr=target_tpr,
            eps=eps,
            n_samples=n_samples,
            steps=steps,
            restarts=restarts,
            pseudo=pseudo,
            min_tau=min_tau,
            engine=engine,
            progress=progress,
            cache_dir=cache_dir,
            seed=seed,
            distributed=distributed,
        )

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> dict[str, Any]:
        """Configuration and report, as plain Python values (loadable with ``weights_only``)."""
        return {
            "version": _STATE_VERSION,
            "score": self.requested_score,
            "chosen": self.chosen_score,
            "norm": self.norm,
            "eps": self.eps,
            "min_tau": self.min_tau,
            "head": self.head_name,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "head_fingerprint": self.head_fingerprint,
            "pseudo_features": None if self.pseudo is None else self.pseudo.mean.numel(),
            "report": None if self._report is None else self._report.to_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_extra_state`` wrote (called by ``load_state_dict``)."""
        from brittle.report import ConsistencyReport

        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("this state was not written by this version of brittle.Monitor.")
        self.requested_score = state["score"]
        self.chosen_score = state["chosen"]
        self.norm = state["norm"]
        self.eps = state["eps"]
        self.min_tau = state["min_tau"]
        self.head_name = state["head"]
        self.num_classes = state["num_classes"]
        self.feature_dim = state["feature_dim"]
        shape = state["input_shape"]
        self.input_shape = None if shape is None else tuple(shape)
        self.head_fingerprint = state["head_fingerprint"]
        report = state["report"]
        self._report = None if report is None else ConsistencyReport.from_dict(report)
        self._has_threshold = bool(torch.isfinite(self.threshold))

    def save(self, path: str | Path) -> Path:
        """Write the monitor's state (not the model's weights) to ``path``.

        The file holds tensors and plain Python values only and loads with
        ``torch.load(path, weights_only=True)``; restore it with ``brittle.load``.
        """
        from brittle.io import save

        return save(self, path)

    def export_onnx(
        self,
        path: str | Path,
        example_input: Tensor,
        *,
        opset: int | None = None,
        dynamic_batch: bool = True,
    ) -> Path:
        """Write the monitor as one ONNX graph: input -> logits, pred, margin, flag.

        See ``brittle.onnx.export_onnx``.
        """
        from brittle.onnx import export_onnx

        return export_onnx(self, path, example_input, opset=opset, dynamic_batch=dynamic_batch)

    def extra_repr(self) -> str:
        """Score, norm, eps, head, threshold and whether the monitor is fitted."""
        threshold = f"{float(self.threshold):.4g}" if self._has_threshold else None
        return (
            f"score={self.score!r}, norm={self.norm!r}, eps={self.eps:.4g}, "
            f"head={self.head_name!r}, threshold={threshold}, fitted={self.is_fitted}"
        )


def wrap(
    model: nn.Module,
    *,
    score: Score = "auto",
    norm: Norm = "Linf",
    eps: float = 8 / 255,
    head: str | None = None,
    example_input: Tensor | None = None,
    min_tau: float = 0.5,
) -> Monitor:
    """Wrap a classifier so that each forward pass also returns margins and flags.

    Args:
        model: A PyTorch classifier returning ``(B, K)`` logits. It is not modified.
        score: ``"auto"``, ``"logit"``, ``"feature"`` or ``"pseudo"``.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``, the threat model of the input margin.
        eps: Perturbation budget: a decision is non-robust if its input margin is ``<= eps``.
        head: Module name of the last ``nn.Linear`` (found automatically when omitted).
        example_input: Optional batch to find the head with right away.
        min_tau: Kendall tau the logit margin must reach for ``score="auto"`` to keep it.

    Returns:
        A ``Monitor``; call it like the model.

    Examples:
        >>> import torch, brittle
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
        >>> monitor = brittle.wrap(model, norm="L2", eps=0.5)
        >>> logits, pred, margin, flag = monitor(torch.rand(8, 1, 8, 8))
        >>> bool((margin >= 0).all())
        True
    """
    return Monitor(
        model,
        score=score,
        norm=norm,
        eps=eps,
        head=head,
        example_input=example_input,
        min_tau=min_tau,
    )
