"""``brittle.wrap`` and the ``Monitor`` module it returns."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from brittle._modes import changes_in_train_mode, eval_mode
from brittle.arguments import are_bounds
from brittle.attacks.settings import DEFAULT_ENGINE
from brittle.attacks.verify import first_floating, model_device
from brittle.calibrate.calibration import Calibration, ScoreKind
from brittle.deploy.alarm import OLD_REFERENCE_WARNING, parse_reference
from brittle.errors import NotFittedError
from brittle.identity import wrapper_hint
from brittle.output import MonitorOutput, MonitorPass, flagged
from brittle.scores.finite import domain_bounds, finite_rows, judged_rows, zero_rows
from brittle.scores.head import (
    NO_HEAD_HINT,
    HeadCapture,
    capture_head,
    computes_linear,
    discover_head,
    model_output,
    resolve_head,
    same_values,
)
from brittle.scores.margins import (
    feature_margin,
    has_distinct_rows,
    logit_margin,
    pair_norm_table,
)
from brittle.scores.norms import Norm, check_eps, check_norm
from brittle.scores.pseudo import HIDDEN, PseudoMargin
from brittle.state_dicts import (
    SavedTensors,
    load_errors,
    load_own_loaders,
    own_loaders,
    put_back,
    saved_tensors,
)

if TYPE_CHECKING:
    from collections.abc import Iterable

    from brittle.calibrate.report import ConsistencyReport

__all__ = ["Monitor", "MonitorPass", "wrap", "Score", "ScoreKind"]

Score = Literal["auto", "logit", "feature", "pseudo"]
SCORES: tuple[str, ...] = get_args(Score)
# Head discovery writes the monitor's shape state once; callers racing on the first
# call wait here. (A module-level lock: an nn.Module holding a lock cannot be copied.)
_DISCOVERY = threading.Lock()

# Above this size the (K, K) pair-norm table is not stored; the rows needed by a
# batch are computed from the head weight instead.
TABLE_LIMIT_BYTES = 256 * 2**20
_STATE_VERSION = 2


# The tensors a head weight is made of, each with its version counter and an alias
# of its data (``_stamp``).
_Stamp = tuple[tuple[Tensor, int, Tensor], ...]
# torch has no public test for a tensor wrapped by a torch.func transform; without
# this private one (a later torch), transformed weights are taken as plain ones.
_IS_FUNCTORCH_WRAPPED = getattr(
    getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None
)


def _check_score(score: str) -> Score:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}. Got {score!r}.")
    return score  # type: ignore[return-value]


@dataclass
class _Run:
    """One forward pass of the model with what the scores need."""

    logits: Tensor
    capture: HeadCapture | None
    ok: Tensor  # (B,) the samples judged; the others are rejected


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
    domain: Tensor

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
        _refuse_monitors(model)
        self.model = model
        self.norm: Norm = check_norm(norm)
        self.eps = check_eps(eps)
        self.requested_score: Score = _check_score(score)
        self.min_tau = float(min_tau)
        self.chosen_score: ScoreKind | None = None
        self.head_name: str | None = None
        # Whether the head's output is exactly the model's logits: then the feature
        # margin needs the logits alone, and no hook runs in the forward pass.
        self.head_exact = False
        self.num_classes: int | None = None
        self.feature_dim: int | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.pseudo: PseudoMargin | None = None
        self._report: ConsistencyReport | None = None
        self._has_threshold = False
        # From fit(): the calibration samples' flag rate (the flag-rate alarm's
        # reference) and margin histogram bounds (brittle.Telemetry).
        self.reference_flag_rate: float | None = None
        # (flagged, accepted) calibration samples: the alarm bounds the rate from them.
        self.reference_counts: tuple[int, int] | None = None
        self.margin_buckets: tuple[float, ...] | None = None
        # The monitor's own state starts on the model's device, so that a monitor of a
        # model on a GPU is on that GPU: fit trains the pseudo-margin network there,
        # and the network lands beside the features it scores.
        device = model_device(model)
        self.register_buffer("threshold", torch.tensor(math.nan, device=device))
        self.register_buffer("fitted", torch.tensor(False, device=device))
        self.register_buffer("pair_norms", torch.empty(0, 0, device=device))
        # The tensors the head weight was made of when the table was computed (the
        # weight, or its parametrization's), their version counters and data: an
        # in-place change (an optimizer step, model.load_state_dict), new data
        # (weight.data = ...) or a new weight makes the table stale, and the next eager
        # call recomputes it.
        self._table_stamp: _Stamp | None = None
        # Whether the stored table has no two equal weight rows: the feature margin
        # then skips the step that makes such a class unreachable.
        self._distinct_rows = False
        # The accepted input values (low, high) from fit(): the holdout's range with a
        # tolerance. NaN until fitted; samples outside are rejected like NaN ones.
        self.register_buffer("domain", torch.full((2,), math.nan, device=device))
        self._has_domain = False
        if head is not None:
            self._attach_head(head)
        if example_input is not None:
            with torch.no_grad(), eval_mode(model):
                self._run(self.check_input(example_input), features=False)

    # ------------------------------------------------------------------ head
    @property
    def head(self) -> nn.Linear | None:
        """The ``nn.Linear`` producing the logits; ``None`` if there is none or not found yet."""
        return None if self.head_name is None else resolve_head(self.model, self.head_name)

    def _attach_head(self, name: str) -> None:
        head = resolve_head(self.model, name)
        if torch.nn.parameter.is_lazy(head.weight):
            raise ValueError(
                f"head {name!r} is a lazy module whose weight is not created yet (an "
                "nn.LazyLinear before its first call). Run the model once on a batch before "
                "wrapping it with head=, or leave head= out: the first call finds the head."
            )
        if self.num_classes is not None and head.out_features != self.num_classes:
            raise ValueError(
                f"head {name!r} has {head.out_features} outputs but the model returns "
                f"{self.num_classes} logits. {NO_HEAD_HINT}"
            )
        self.head_name = name
        self.num_classes, self.feature_dim = head.out_features, head.in_features
        k = head.out_features
        if k * k * head.weight.element_size() <= TABLE_LIMIT_BYTES:
            self.pair_norms = pair_norm_table(head.weight, self.norm)
            self._distinct_rows = has_distinct_rows(self.pair_norms)
        else:
            self.pair_norms = head.weight.new_empty(0, 0)
        self._table_stamp = _stamp(head)

    def _pair_norm_table(self, head: nn.Linear, *, refresh: bool = False) -> Tensor | None:
        """The pair-norm table of the head's current weight; ``None`` when none is stored.

        Recomputed when the weight changed since the table was (a model trained or
        given a checkpoint after ``wrap``). Traced or compiled, the stored table is
        used as it is: ``graph()`` brings it up to date (``refresh``) before an
        export traces. Inside a ``torch.func`` transform (``vmap`` or ``grad`` of
        ``functional_call``) the weight is a wrapped tensor, whose table is computed
        and not stored. An inference tensor (a model built under ``inference_mode``)
        keeps no version counter, so its change in place cannot be seen: it gets
        ``None`` (its rows measured at each call), and ``refresh`` recomputes it.
        """
        if not self.pair_norms.numel():
            return None
        if torch.compiler.is_compiling():
            return self.pair_norms
        weight = head.weight  # computed at each access under a parametrization
        if _transformed(weight):
            # Stored, it would outlive the transform in the monitor's state.
            return pair_norm_table(weight, self.norm)
        inference = torch.is_inference(weight)
        if inference and not refresh:
            return None
        if inference or _changed(head, self._table_stamp):
            table = pair_norm_table(weight, self.norm)
            self.pair_norms = table.to(self.pair_norms)
            self._distinct_rows = has_distinct_rows(self.pair_norms)
            self._table_stamp = _stamp(head)
        return self.pair_norms

    @property
    def discovered(self) -> bool:
        """Whether the monitor has seen the model's input and output shapes."""
        return self.input_shape is not None

    def _adopt(self, x: Tensor, logits: Tensor, found: str | None, exact: bool) -> None:
        if logits.shape[1] < 2:
            raise ValueError(
                f"the model returns {logits.shape[1]} logit per sample; a margin needs at "
                "least 2 classes. For a binary classifier with one logit z, wrap a model "
                "returning torch.cat([torch.zeros_like(z), z], dim=1)."
            )
        head = self.head
        if head is not None and head.out_features != logits.shape[1]:
            raise ValueError(
                f"head {self.head_name!r} has {head.out_features} outputs but the model returns "
                f"{logits.shape[1]} logits. {NO_HEAD_HINT}"
            )
        if self.head_name is None and found is not None:
            self._attach_head(found)
        if self.head_name is None and self.requested_score in ("feature", "pseudo"):
            k = logits.shape[1]
            names = [
                n
                for n, m in self.model.named_modules()
                if isinstance(m, nn.Linear) and m.out_features == k
            ]
            # NO_HEAD_HINT's example name, 'fc', is seldom this model's.
            hint = (
                f"Pass head='<module name>' naming one of its nn.Linear modules with {k} "
                f"outputs, {names}, or use score='logit'."
                if names
                else f"It has no nn.Linear with {k} outputs (the logits come from a "
                "convolution or a functional layer): use score='logit', or give the model an "
                "nn.Linear head and pass head='<module name>' naming it (see the FAQ)."
            )
            raise ValueError(
                f"score={self.requested_score!r} needs the model's last linear layer, and no "
                f"nn.Linear output equals the model's output. {hint}"
            )
        if _looks_like_probabilities(logits):
            warnings.warn(
                "the model's outputs look like probabilities (rows in [0, 1] summing to 1): "
                "margins are then gaps between probabilities, not logits, and rank samples "
                "less faithfully. Wrap the model without its final softmax.",
                stacklevel=4,
            )
        self.head_exact = exact
        self.num_classes = logits.shape[1]
        self.input_shape = tuple(x.shape[1:])  # last: marks the discovery complete

    # ----------------------------------------------------------------- input
    def _expected(self) -> str:
        shape = ", ".join(str(s) for s in self.input_shape or ())
        return f"(batch, {shape})"

    def check_input(self, x: Any) -> Tensor:
        """Return ``x`` if the model can take it, else raise a ``ValueError`` that says why.

        Checks the type, rank, channel count, dtype and device against the model
        (and, once the monitor has seen an input, against its shape).

        Examples:
            >>> import torch, brittle
            >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), example_input=torch.rand(1, 4))
            >>> monitor.check_input(torch.rand(2, 4, dtype=torch.float64))
            Traceback (most recent call last):
            ...
            ValueError: input must be a torch.float32 tensor on cpu like the model. ...
        """
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
        # One walk of the model (this runs on every call): its first floating tensor, a
        # buffer where it has no parameters.
        tensor = first_floating(self.model)
        if tensor is None:
            return x
        dtype, device = tensor.dtype, tensor.device
        if self.threshold.device != device:
            # The model moved without the monitor: the feature margin's table and the
            # pseudo-margin network would meet the model's tensors on another device.
            raise ValueError(
                f"the model is on {device} and the monitor's own state on "
                f"{self.threshold.device}: move the monitor (monitor.to(device) moves its "
                "model too), not only the model."
            )
        if dtype != x.dtype or device != x.device:
            raise ValueError(
                f"input must be a {dtype} tensor on {device} like the model. "
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

    def _discover(self, x: Tensor) -> tuple[Tensor, HeadCapture]:
        with capture_head(self.head) as named:
            logits, found, capture = discover_head(self.model, x)
        exact = found is not None and (self.head_name is None or found == self.head_name)
        if named.calls:  # a head given by name need not produce the logits exactly
            head, features, output = self.head, named.features, named.output
            if (
                self.requested_score in ("feature", "auto")  # the scores that read the weight
                and head is not None
                and features is not None
                and output is not None
                and not computes_linear(head, features, output)
            ):
                raise ValueError(
                    f"head {self.head_name!r} ({type(head).__name__}) does not compute "
                    "features @ weight.T + bias (a quantization-aware or normalized linear "
                    "layer): its weight does not describe its output, which the feature "
                    "margin needs. Use score='logit', or score='pseudo' (from its input)."
                )
            capture = named
        self._adopt(x, logits, found, exact)
        return logits, capture

    def _needs_features(self, kind: ScoreKind) -> bool:
        return kind == "pseudo" or (kind == "feature" and not self.head_exact)

    def _run(self, x: Tensor, features: bool, domain: bool = True) -> _Run:
        """One forward pass on an already checked, non-empty batch.

        The head's forward hook is registered only when ``features`` are needed;
        the logit margin and an exact head's feature margin need none, which
        keeps that path free of hooks (thread-safe and ``torch.compile``-able).
        With ``domain`` (and a fitted domain), samples outside it are rejected.
        """
        # "Judged" rather than "rejected" masks: the exported graph then needs no negation.
        judged = judged_rows(x, self.domain if domain and self._has_domain else None)
        safe = zero_rows(x, judged)
        capture: HeadCapture | None = None
        # Before discovery too: a freshly built model is in train mode, and its first
        # call (which discovers the head) is the one most likely to be served so.
        if self.model.training and changes_in_train_mode(self.model):
            warnings.warn(
                "the wrapped model is in train mode: batch norm and dropout make every "
                "sample's margin depend on the rest of the batch and on chance. Call "
                "model.eval() before serving.",
                stacklevel=3,
            )
        if not self.discovered:
            with _DISCOVERY:
                if not self.discovered:
                    logits, capture = self._discover(safe)
                    return _Run(logits, capture, judged & finite_rows(logits))
        if features and self.head_name is not None:
            with capture_head(self.head) as capture:
                logits = self._call_model(safe)
        else:
            logits = self._call_model(safe)
        return _Run(logits, capture, judged & finite_rows(logits))

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

    def _score(self, kind: ScoreKind, run: _Run) -> Tensor:
        if kind == "logit":
            return logit_margin(run.logits)
        if kind == "feature":
            head = self.head
            if head is None:
                raise ValueError(
                    f"score='feature' needs the model's last linear layer. {NO_HEAD_HINT}"
                )
            table = self._pair_norm_table(head)
            output = run.logits if self.head_exact else self._captured(run).output
            distinct = table is self.pair_norms and self._distinct_rows  # the stored table's
            return feature_margin(
                output,  # type: ignore[arg-type]
                head.weight,
                self.norm,
                table,
                distinct_rows=distinct,
            )
        if self.pseudo is None:
            raise NotFittedError(
                "score='pseudo' needs a trained pseudo-margin network: "
                "call monitor.fit(loader) first."
            )
        return self.pseudo(self._captured(run).features, run.logits)

    def _captured(self, run: _Run) -> HeadCapture:
        capture = run.capture
        if capture is not None and capture.calls > 1:
            # A head called again after producing the logits (a shared classifier also
            # applied to other features): its latest call's input is not the features.
            single = None
            if self.head_exact:
                by_value = not torch.compiler.is_compiling()
                single = capture.call_producing(run.logits, by_value=by_value)
            if single is None:
                raise RuntimeError(
                    f"head {self.head_name!r} was called {capture.calls} times in one forward "
                    "pass and none of its outputs is the model's logits tensor, so which call's "
                    "input are the features is ambiguous. Name with head= an nn.Linear called "
                    "once per forward pass, return that call's output as the logits, or use "
                    "score='logit'."
                )
            capture = single
        if capture is None or capture.calls == 0 or capture.features is None:
            raise RuntimeError(
                f"head {self.head_name!r} did not receive (batch, features) inputs during the "
                f"forward pass. {NO_HEAD_HINT}"
            )
        if capture.features.dim() != 2:
            raise RuntimeError(
                f"head {self.head_name!r} received inputs of shape "
                f"{tuple(capture.features.shape)}, not (batch, features). {NO_HEAD_HINT}"
            )
        return capture

    def _check_exact(self, run: _Run) -> None:
        """Refuse a head found exact whose output is no longer the model's logits.

        Exactness is found on the first call, and ``forward`` then takes the feature
        margin from the logits without a hook: a temperature or a scale applied after
        the head since then would silently scale every margin. ``inspect`` (behind
        ``fit``, ``evaluate`` and ``export_onnx``) captures the head's output anyway,
        so it checks here; the forward pass cannot without a hook.

        Raises:
            RuntimeError: if no call of the head produced the logits.
        """
        capture = run.capture
        if not self.head_exact or capture is None or not capture.calls:
            return
        # By value too: a head output that is the logits tensor but was scaled in place
        # after the head (logits /= temperature) is not the logits' values.
        single = capture.call_producing(run.logits)
        if (
            single is not None
            and single.output is not None
            and same_values(single.output, run.logits)
        ):
            return
        raise RuntimeError(
            f"head {self.head_name!r} no longer produces the model's logits: something after "
            "it changed since the monitor first ran the model (a temperature or a scale set "
            "after wrap), and the feature margin taken from the logits would be wrong. Wrap "
            f"the model again naming the head, brittle.wrap(model, head={self.head_name!r}): "
            "its feature margin is then computed from the head's own output."
        )

    def _flag(self, margin: Tensor, ok: Tensor) -> tuple[Tensor, Tensor | None]:
        margin = torch.where(ok, margin, math.nan)
        if not self._has_threshold:
            return margin, None
        return margin, flagged(margin, self.threshold)

    def _outputs(self, run: _Run, kind: ScoreKind) -> MonitorOutput:
        margin, flag = self._flag(self._score(kind, run), run.ok)
        logits = torch.where(run.ok[:, None], run.logits, math.nan)
        pred = torch.where(run.ok, run.logits.argmax(dim=1), -1)
        return MonitorOutput(logits, pred, margin, flag)

    def forward(self, x: Tensor) -> MonitorOutput:
        """Logits, prediction, margin and flag for a batch, from one pass of the model.

        Safe to call from several threads at once: each call's numbers are its
        own batch's. After the first call (or ``example_input=``) the forward
        pass has no host synchronisation and, for the logit margin and an exact
        head's feature margin, no hook: ``torch.compile(monitor, fullgraph=True)``
        compiles it. A compiled call keeps the feature margin's pair-norm table as
        it stands: after changing the head's weights in place, call the monitor
        itself once, which recomputes it, before the compiled one (``graph()``
        for weights that are inference tensors).

        Args:
            x: ``(B, ...)`` floating-point inputs on the model's device and dtype.

        Returns:
            ``MonitorOutput``. Samples with NaN or Inf, or (once fitted) with values
            outside the input domain (``input_domain``), get NaN logits and margin,
            prediction ``-1`` and flag True; the others are unaffected.

        Raises:
            ValueError: if ``x`` has the wrong rank, channel count, dtype or device.
        """
        x = self.check_input(x)
        if x.shape[0] == 0:
            return self._empty(x)
        kind = self.score
        return self._outputs(self._run(x, features=self._needs_features(kind)), kind)

    def inspect(self, x: Tensor, *, features: bool = False, domain: bool = True) -> MonitorPass:
        """Logits, every available score and (optionally) the features, from one pass.

        The public protocol behind ``fit``, ``evaluate``, the analyses and the
        command line: the numbers are those ``forward`` serves.

        Args:
            x: ``(B, ...)`` inputs on the model's device and dtype.
            features: Also return the head's input (needs a linear head).
            domain: Reject samples outside the fitted input domain, as ``forward``
                does. ``fit`` passes ``False``: a refit measures the new holdout's
                range instead of clipping it to the old one.

        Examples:
            >>> import torch, brittle
            >>> monitor = brittle.wrap(torch.nn.Linear(4, 3), norm="L2")
            >>> seen = monitor.inspect(torch.rand(2, 4), features=True)
            >>> sorted(seen.scores), tuple(seen.features.shape)
            (['feature', 'logit'], (2, 4))
        """
        x = self.check_input(x)
        kinds = self.available_scores
        if x.shape[0] == 0:
            k, d = self.num_classes or 0, self.feature_dim or 0
            return MonitorPass(
                x.new_empty(0, k),
                x.new_empty(0, d) if features and self.head_name is not None else None,
                {kind: x.new_empty(0) for kind in kinds},
                torch.empty(0, dtype=torch.bool, device=x.device),
                torch.empty(0, dtype=torch.bool, device=x.device) if self._has_threshold else None,
            )
        # An exact head's output is captured too, to check that it still is exact.
        want = (
            features
            or self.head_exact
            or any(self._needs_features(kind) for kind in self.available_scores)
        )
        run = self._run(x, features=want, domain=domain)
        self._check_exact(run)
        kinds = self.available_scores  # the first call may have found the head
        scores: dict[str, Tensor] = {
            kind: torch.where(run.ok, self._score(kind, run), math.nan) for kind in kinds
        }
        feats = None
        if features and self.head_name is not None:
            feats = self._captured(run).features
        logits = torch.where(run.ok[:, None], run.logits, math.nan)
        _, flag = self._flag(scores[self.score], run.ok) if self.score in scores else (None, None)
        return MonitorPass(logits, feats, scores, ~run.ok, flag)

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
        return self.inspect(x).scores

    def graph(self) -> nn.Module:
        """A module computing ``(logits, pred, margin, flag)`` without the Python-side checks.

        What ``forward`` computes for an already checked, non-empty batch, as a
        tuple of tensors: the form graph exporters (``torch.onnx.export``) trace.

        Raises:
            NotFittedError: if the monitor has no threshold.
        """
        if not self._has_threshold:
            raise NotFittedError(
                "the monitor's graph needs a flag threshold: call monitor.fit(holdout_loader) "
                "(or monitor.set_threshold(value)) first."
            )
        head = self.head
        if head is not None:
            self._pair_norm_table(head, refresh=True)  # an export traces it as it stands
        return _Graph(self, self.score)

    @property
    def input_domain(self) -> tuple[float, float] | None:
        """The input values the monitor judges, ``(low, high)``; ``None`` before ``fit``.

        ``fit`` records the holdout's range and widens it by
        ``brittle.scores.finite.DOMAIN_TOLERANCE`` of its width on each side; a sample
        with any value outside is rejected (margin NaN, flag True).
        """
        if not self._has_domain:
            return None
        low, high = self.domain.tolist()
        return float(low), float(high)

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
        dtype = self.threshold.dtype
        if not (math.isfinite(value) and abs(value) <= torch.finfo(dtype).max):
            raise ValueError(
                f"threshold must be a finite number within the monitor's {dtype}. Got {threshold}."
            )
        self._writable_buffers()
        self.threshold.fill_(value)
        self._has_threshold = True
        # The holdout's flag rate and margin quantiles belonged to the old threshold.
        self.reference_flag_rate = None
        self.reference_counts = None
        self.margin_buckets = None

    def _writable_buffers(self) -> None:
        """Replace the monitor's inference-tensor buffers by copies it can write in place.

        A monitor built (or moved) under ``torch.inference_mode()`` holds inference
        tensors, which PyTorch writes in place outside that mode and then refuses,
        raising after the value changed. Their copies hold the same values. Nothing
        changes inside inference mode, where they can be written.
        """
        if torch.is_inference_mode_enabled():
            return
        for name, buffer in self._buffers.items():
            if buffer is not None and torch.is_inference(buffer):
                self._buffers[name] = buffer.clone()

    # ------------------------------------------------------------------ fit
    @property
    def is_fitted(self) -> bool:
        """Whether ``fit`` has run (or a fitted monitor was loaded)."""
        return bool(self.fitted)

    @property
    def has_report(self) -> bool:
        """Whether the monitor holds a consistency report (``fit`` ran, or one was loaded)."""
        return self._report is not None

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
        pseudo_data: Iterable[Any] | Tensor | None = None,
        min_tau: float | None = None,
        engine: str = DEFAULT_ENGINE,
        progress: bool = True,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        distributed: bool | None = None,
        pseudo_boundary: bool = True,
    ) -> Monitor:
        """Estimate input margins on a holdout, verify consistency and pick the threshold.

        ``brittle.calibrate.fit.calibrate`` computes the calibration without touching the
        monitor, and ``apply_calibration`` installs it in one step: a fit that
        raises or is interrupted leaves the monitor as it was (a head found on the
        first holdout batch is forgotten again). See ``calibrate`` for the
        arguments. Returns ``self``.
        """
        from brittle.calibrate.fit import calibrate

        # What the first holdout batch discovers (head, shapes, the pair-norm table)
        # is undone too when the fit fails.
        discovery = self._discovery()
        try:
            calibration = calibrate(
                self,
                loader,
                target_tpr=target_tpr,
                eps=eps,
                n_samples=n_samples,
                steps=steps,
                restarts=restarts,
                pseudo=pseudo,
                pseudo_data=pseudo_data,
                min_tau=min_tau,
                engine=engine,
                progress=progress,
                cache_dir=cache_dir,
                seed=seed,
                distributed=distributed,
                pseudo_boundary=pseudo_boundary,
            )
        except BaseException:
            self._restore_discovery(discovery)
            raise
        self.apply_calibration(calibration)
        return self

    # What head discovery (``_adopt``, ``_attach_head``) writes: restored after a failed fit.
    _DISCOVERED = (
        "head_name",
        "head_exact",
        "num_classes",
        "feature_dim",
        "input_shape",
        "pair_norms",
        "_table_stamp",
        "_distinct_rows",
    )

    def _discovery(self) -> tuple[Any, ...]:
        """The attributes head discovery writes, to restore after a failed fit."""
        return tuple(getattr(self, name) for name in self._DISCOVERED)

    def _restore_discovery(self, state: tuple[Any, ...]) -> None:
        """Put back what ``_discovery`` returned."""
        for name, value in zip(self._DISCOVERED, state, strict=True):
            setattr(self, name, value)

    def apply_calibration(self, calibration: Calibration) -> None:
        """Install a calibration from ``brittle.calibrate.fit.calibrate`` (what ``fit`` does last).

        Everything that can fail (moving the network to the model's device,
        checking the values) happens before the first attribute changes.
        """
        threshold = float(calibration.threshold)
        if not math.isfinite(threshold):
            raise ValueError(f"a calibration needs a finite threshold. Got {threshold}.")
        eps = check_eps(calibration.eps)
        pseudo = calibration.pseudo
        if pseudo is not None:
            if not isinstance(pseudo, PseudoMargin):
                raise TypeError(f"pseudo must be a PseudoMargin. Got {type(pseudo).__name__}.")
            pseudo = pseudo.to(self.threshold.device)
        if calibration.chosen == "pseudo" and pseudo is None:
            raise ValueError("a calibration that chose the pseudo-margin must carry its network.")
        span = calibration.input_range
        bounds = None if span is None else domain_bounds(float(span[0]), float(span[1]))
        self._writable_buffers()
        self.pseudo = pseudo
        self.eps = eps
        self.min_tau = float(calibration.min_tau)
        self.chosen_score = calibration.chosen
        self._report = calibration.report
        self.threshold.fill_(threshold)
        self.fitted.fill_(True)
        self._has_threshold = True
        rate = calibration.reference_flag_rate
        self.reference_flag_rate = None if rate is None else float(rate)
        counts = calibration.reference_counts
        self.reference_counts = None if counts is None else (int(counts[0]), int(counts[1]))
        buckets = calibration.margin_buckets
        self.margin_buckets = None if buckets is None else tuple(float(b) for b in buckets)
        if bounds is None:
            self.domain.fill_(math.nan)
        else:
            self.domain.copy_(torch.tensor(bounds, dtype=self.domain.dtype))
        self._has_domain = bounds is not None

    def evaluate(
        self,
        loader: Iterable[Any] | Tensor,
        *,
        n_samples: int | None = None,
        steps: int = 100,
        restarts: int = 1,
        engine: str = DEFAULT_ENGINE,
        progress: bool = True,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        distributed: bool | None = None,
        target_tpr: float | None = None,
    ) -> ConsistencyReport:
        """How the monitor does on new data, its score and threshold unchanged.

        Measures input margins on ``loader`` and reports every score's tau and
        detection figures, and the achieved TPR/FPR of the monitor's own flag.
        Nothing is recalibrated: score, threshold and report stay as they are. See
        ``brittle.calibrate.evaluate.evaluate`` for the arguments.

        Raises:
            NotFittedError: if the monitor has no threshold.
        """
        from brittle.calibrate.evaluate import evaluate

        return evaluate(
            self,
            loader,
            n_samples=n_samples,
            steps=steps,
            restarts=restarts,
            engine=engine,
            progress=progress,
            cache_dir=cache_dir,
            seed=seed,
            distributed=distributed,
            target_tpr=target_tpr,
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
            "head_exact": self.head_exact,
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "input_shape": None if self.input_shape is None else list(self.input_shape),
            "pseudo_features": None if self.pseudo is None else self.pseudo.in_features,
            "report": None if self._report is None else self._report.to_dict(),
            "reference_flag_rate": self.reference_flag_rate,
            "reference_counts": None
            if self.reference_counts is None
            else list(self.reference_counts),
            "margin_buckets": None if self.margin_buckets is None else list(self.margin_buckets),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what ``get_extra_state`` wrote (called by ``load_state_dict``).

        Raises:
            ValueError: if no monitor of this version could have written ``state``;
                nothing is changed then.
        """
        report = _checked_config(state)
        self.requested_score = state["score"]
        self.chosen_score = state["chosen"]
        self.norm = state["norm"]
        self.eps = state["eps"]
        self.min_tau = state["min_tau"]
        self.head_name = state["head"]
        self.head_exact = state["head_exact"]
        self.num_classes = state["num_classes"]
        self.feature_dim = state["feature_dim"]
        shape = state["input_shape"]
        self.input_shape = None if shape is None else tuple(shape)
        self._report = report
        self._has_threshold = bool(torch.isfinite(self.threshold))
        # Absent from files saved before the flag-rate alarm: Telemetry then says so.
        rate, buckets = state.get("reference_flag_rate"), state.get("margin_buckets")
        self.reference_flag_rate = None if rate is None else float(rate)
        self.margin_buckets = None if buckets is None else tuple(float(b) for b in buckets)
        counts = state.get("reference_counts")
        self.reference_counts = None if counts is None else (int(counts[0]), int(counts[1]))
        if rate is not None and counts is None:
            warnings.warn(OLD_REFERENCE_WARNING, UserWarning, stacklevel=2)
        self._has_domain = bool(torch.isfinite(self.domain).all())

    def load_state_dict(
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Load another monitor's ``state_dict`` (model weights included), all or nothing.

        Everything is checked before anything is copied: the configuration, the
        threshold and the input domain as ``brittle.load`` checks them, then every
        tensor's name and shape, and whether PyTorch can copy it (not out of a meta
        or sparse tensor), as PyTorch does, the model's weights included. A
        load that fails leaves the monitor and its model as they were. A module of
        the model that loads its own way, with a load hook, its own
        ``_load_from_state_dict`` (batch norm reads states without
        ``num_batches_tracked``, weight norm renames old keys) or its own
        ``set_extra_state``, accepts (or refuses) keys no plain check can judge, so
        that every state PyTorch loads still loads: each such module loads its part
        first, on its own, and its tensors are put back if PyTorch refuses it, a hook
        or ``set_extra_state`` raises, or the rest of the load fails
        (``brittle.state_dicts``); an extra state it took is not set back. Only an
        interrupt during the final copy of the model's other weights can leave them
        part-loaded, as ``nn.Module.load_state_dict`` would; the monitor's own state
        is put back.

        Args:
            state_dict: What ``Monitor.state_dict`` returned.
            strict: Refuse missing and unexpected keys (as ``nn.Module.load_state_dict``).
                With ``False``, a state saved without a pseudo network drops this
                monitor's, as the loaded configuration says.
            assign: Take the tensors of ``state_dict`` instead of copying them.

        Returns:
            PyTorch's ``(missing_keys, unexpected_keys)``.

        Raises:
            ValueError: if the state holds a configuration, a threshold or an input
                domain no monitor could have saved.
            RuntimeError: if a tensor is missing, unexpected (``strict``), not a tensor,
                of another shape or not one PyTorch can copy, or the model has no head of
                the saved name and shape.
        """
        saved = self._own_state()
        loaded: SavedTensors = []  # the model's own-loading modules, as they were
        try:
            config = state_dict.get("_extra_state")
            if config is not None:
                _checked_config(config)
            errors: list[str] = []
            if isinstance(config, dict):
                # Sizing first: the saved table and pseudo network fix the expected shapes.
                try:
                    self._size_as_saved(config, _pseudo_width(state_dict, ""))
                except ValueError as err:
                    errors.append(str(err))
                if not strict:
                    self._drop_unsaved_pseudo(config)
            if not errors:
                errors = load_errors(
                    self.state_dict(keep_vars=True),
                    state_dict,
                    strict,
                    own_loaders(self.model),
                    assign,
                )
            if errors:
                raise RuntimeError(
                    f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                    + "\n\t".join(errors)
                )
            _check_values(state_dict)
            loaded = load_own_loaders(self.model, state_dict, strict, assign)
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except BaseException:
            put_back(loaded)
            self._restore_own_state(saved)
            raise

    # What loading a state writes on the monitor besides its tensors.
    _LOADED = (
        *_DISCOVERED,
        "requested_score",
        "chosen_score",
        "norm",
        "eps",
        "min_tau",
        "pseudo",
        "_report",
        "_has_threshold",
        "_has_domain",
        "reference_flag_rate",
        "reference_counts",
        "margin_buckets",
    )

    def _own_state(self) -> tuple[tuple[Any, ...], SavedTensors]:
        """The monitor's attributes, and its own tensors with a copy of their values.

        Its own tensors are its buffers and its pseudo network's (``saved_tensors``),
        so that ``_restore_own_state`` puts back the same tensor objects with the
        same values.
        """
        attributes = tuple(getattr(self, name) for name in self._LOADED)
        modules: list[nn.Module] = [self]
        if self.pseudo is not None:
            modules.extend(self.pseudo.modules())
        return attributes, saved_tensors(modules)

    def _restore_own_state(self, saved: tuple[tuple[Any, ...], SavedTensors]) -> None:
        """Put back what ``_own_state`` returned."""
        attributes, tensors = saved
        for name, value in zip(self._LOADED, attributes, strict=True):
            setattr(self, name, value)
        put_back(tensors)

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        config = state_dict.get(prefix + "_extra_state")
        if isinstance(config, dict):
            try:
                self._size_as_saved(config, _pseudo_width(state_dict, prefix))
            except ValueError as err:  # PyTorch's way: reported with the other errors
                error_msgs.append(str(err))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        key = prefix + "domain"
        if key in missing_keys:
            # Saved before the monitor recorded its input domain: still usable.
            missing_keys.remove(key)
            self.domain.fill_(math.nan)
            self._has_domain = False
            if bool(self.fitted):
                warnings.warn(
                    "this monitor was saved without an input domain (by an older brittle): "
                    "inputs far outside the holdout's range are judged instead of rejected. "
                    "Refit it with monitor.fit(holdout) and save it again.",
                    stacklevel=2,
                )

    def _size_as_saved(self, config: dict[str, Any], hidden: int) -> None:
        """Give this monitor the saved head table and pseudo network, where it has none.

        A state saved with no head empties this monitor's table instead.

        ``from_state`` builds a loaded monitor so, and a plain ``load_state_dict`` into
        a fresh ``wrap(model)`` (with or without ``example_input``) then works as
        ``brittle.load`` does. ``hidden`` is the saved pseudo network's width.

        Raises:
            ValueError: if the model has no head of the saved name and shape (whether
                or not this monitor has a head already).
        """
        name, features = config.get("head"), config.get("pseudo_features")
        # Checked even when this monitor has a head already: the state names the one it loads.
        if isinstance(name, str):
            try:
                head = resolve_head(self.model, name)
            except ValueError as err:
                raise ValueError(
                    f"the monitor was saved for a model with a head named {name!r}: "
                    f"{err}{wrapper_hint(self.model)}"
                ) from err
            saved = (config.get("num_classes"), config.get("feature_dim"))
            if tuple(head.weight.shape) != saved:
                raise ValueError(
                    f"the monitor was saved for a head {name!r} of shape {saved} (classes, "
                    f"features); this model's head has shape {tuple(head.weight.shape)}. Fit a "
                    "monitor for this model."
                )
            if self.head_name is None:
                self._attach_head(name)
        elif name is None and self.pair_norms.numel():
            # Saved with no head (before its first input, or for a model without a
            # linear head): the table is the head's, and the loaded monitor has none.
            self.pair_norms = self.pair_norms.new_empty(0, 0)
            self._table_stamp = None
        if isinstance(features, int) and self.pseudo is None:
            # The random initial weights are overwritten by the saved ones: drawn from a
            # fork of the CPU generator, they leave the caller's random state as it was.
            with torch.random.fork_rng(devices=[]):
                pseudo = PseudoMargin(features, int(config["num_classes"]), hidden)
            self.pseudo = pseudo.to(self.threshold.device)

    def _drop_unsaved_pseudo(self, config: dict[str, Any]) -> None:
        """Drop the pseudo network when the saved monitor had none (``strict=False``).

        The missing keys ``strict=False`` ignores are the network's own; kept, it
        would score with weights of another fit while the loaded configuration says
        there is no network. (``strict=True`` refuses them as missing.) Only
        ``Monitor.load_state_dict`` knows ``strict``: PyTorch calls a submodule's
        ``_load_from_state_dict`` with ``strict=True`` whatever its caller asked.
        """
        if config.get("pseudo_features") is None and self.pseudo is not None:
            self.pseudo = None

    def _own_state_to(self, device: torch.device) -> None:
        """Move the monitor's buffers and pseudo network to ``device``, and not the model.

        ``self.to(device)`` would move the wrapped model too: one split over devices
        (a pipeline over two GPUs, layers offloaded to the CPU) would end up whole on
        ``device``.
        """
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(device)
        if self.pseudo is not None:
            self.pseudo = self.pseudo.to(device)

    @classmethod
    def from_state(cls, model: nn.Module, state: dict[str, Tensor | Any]) -> Monitor:
        """A monitor on ``model`` with the state of another's ``state_dict`` (no model keys).

        Raises:
            ValueError: if ``model`` has no head of the saved name and shape, or the
                state does not match this version of ``Monitor``.
        """
        config = state.get("_extra_state")
        if not isinstance(config, dict):
            raise ValueError("the state holds no brittle.Monitor configuration.")
        _check_config(config)
        monitor = cls(model, score=config["score"], norm=config["norm"], eps=config["eps"])
        monitor._size_as_saved(config, _pseudo_width(state, ""))
        param = next(model.parameters(), None)
        if param is not None:
            monitor._own_state_to(param.device)
        derived = monitor.pair_norms.clone()  # from this model's head
        try:
            missing, unexpected = monitor.load_state_dict(state, strict=False)
        except RuntimeError as err:  # a tensor of another shape, or a value that is not one
            raise ValueError(
                "the state does not match this version of brittle.Monitor: "
                f"{str(err).splitlines()[-1].strip()}"
            ) from err
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise ValueError(
                "the state does not match this version of brittle.Monitor "
                f"(missing {missing}, unexpected {unexpected})."
            )
        # The table is computed from the head's weights: this model's, not a copy in the file.
        monitor.pair_norms = derived
        return monitor

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

        See ``brittle.deploy.onnx.export_onnx``.
        """
        from brittle.deploy.onnx import export_onnx

        return export_onnx(self, path, example_input, opset=opset, dynamic_batch=dynamic_batch)

    def extra_repr(self) -> str:
        """Score, norm, eps, head, threshold and whether the monitor is fitted."""
        threshold = f"{float(self.threshold):.4g}" if self._has_threshold else None
        return (
            f"score={self.score!r}, norm={self.norm!r}, eps={self.eps:.4g}, "
            f"head={self.head_name!r}, threshold={threshold}, fitted={self.is_fitted}"
        )


class _Graph(nn.Module):
    """``Monitor.graph()``: the forward pass for a checked, non-empty batch, as a tuple."""

    def __init__(self, monitor: Monitor, kind: ScoreKind) -> None:
        super().__init__()
        self.monitor = monitor
        self.kind: ScoreKind = kind

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        monitor = self.monitor
        run = monitor._run(x, features=monitor._needs_features(self.kind))
        out = monitor._outputs(run, self.kind)
        if out.flag is None:  # graph() checked the threshold; this keeps the type exact
            raise NotFittedError("the monitor lost its threshold.")
        return out.logits, out.pred, out.margin, out.flag


def _weight_sources(head: nn.Linear) -> list[Tensor]:
    """The tensors the head's weight is made of: its parametrization's, or the weight.

    A parametrized weight (``torch.nn.utils.parametrizations.weight_norm``,
    ``spectral_norm``, ``orthogonal``) is a new tensor at each access, computed from
    the parametrization's parameters and buffers: those say whether it changed.
    """
    if "parametrizations" in head._modules and parametrize.is_parametrized(head, "weight"):
        chain = head.get_submodule("parametrizations.weight")
        return [*chain.parameters(), *chain.buffers()]
    return [head.weight]


def _stamp(head: nn.Linear) -> _Stamp | None:
    """The head weight's sources, their version counters and data; ``None`` for inference tensors.

    The data is held by an alias (``detach()``): assigning ``weight.data``
    (``nn.utils.vector_to_parameters``, ``model.to(dtype)``) gives the weight other
    values without a new version, and the alias keeps the old memory, so no new data
    can be placed at its address before the table is recomputed.
    """
    sources = _weight_sources(head)
    if any(torch.is_inference(t) for t in sources):
        return None
    return tuple((t, t._version, t.detach()) for t in sources)


def _changed(head: nn.Linear, stamp: _Stamp | None) -> bool:
    """Whether the head's weight sources are other tensors than ``stamp``'s, or changed since.

    Changed in place (a version counter) or given new data (``weight.data = ...``).
    """
    sources = _weight_sources(head)
    if stamp is not None and len(sources) == len(stamp) == 1:  # a plain weight: the common case
        (weight,), ((then, version, data),) = sources, stamp
        if weight is then and weight._version == version:  # stamped: not an inference tensor
            return not _same_data(weight, data)
    inference = any(torch.is_inference(t) for t in sources)  # stamped None: no counter
    if inference or stamp is None:
        return not (inference and stamp is None)
    if len(sources) != len(stamp):
        return True
    return any(
        t is not then or t._version != version or not _same_data(t, data)
        for t, (then, version, data) in zip(sources, stamp, strict=True)
    )


def _transformed(weight: Tensor) -> bool:
    """Whether ``weight`` is wrapped by a ``torch.func`` transform (``vmap``, ``grad``)."""
    return _IS_FUNCTORCH_WRAPPED is not None and bool(_IS_FUNCTORCH_WRAPPED(weight))


def _same_data(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory alike (``True`` for tensors without it)."""
    try:
        pointers = a.data_ptr(), b.data_ptr()
    except RuntimeError:  # a tensor subclass without storage: its version counter decides
        return True
    return (
        pointers[0] == pointers[1]
        and a.device == b.device
        and a.dtype == b.dtype
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def _looks_like_probabilities(logits: Tensor) -> bool:
    """Whether every row lies in [0, 1] and sums to 1 (a softmax output)."""
    rows = logits.detach().double()
    finite = torch.isfinite(rows).all(dim=1)
    if not bool(finite.any()):
        return False
    rows = rows[finite]
    sums = rows.sum(dim=1)
    return bool(((rows >= 0) & (rows <= 1)).all() and torch.allclose(sums, torch.ones_like(sums)))


def _pseudo_width(state: Mapping[str, Any], prefix: str) -> int:
    """Width of the pseudo network saved in ``state`` (the default where it holds none).

    Read from its first and second layers' weights, which must agree: a network
    built to this width takes no more memory than those weights already do.
    """
    first = state.get(prefix + "pseudo.net.0.weight")
    second = state.get(prefix + "pseudo.net.2.weight")
    if isinstance(first, Tensor) and isinstance(second, Tensor) and first.dim() == 2:
        width = first.shape[0]
        if width >= 1 and tuple(second.shape) == (width, width):
            return int(width)
    return HIDDEN


def _refuse_monitors(model: nn.Module) -> None:
    """Raise ``TypeError`` when ``model`` is, or holds, a ``Monitor``.

    A monitor's forward returns a ``MonitorOutput``, not logits, and the first
    call of two nested monitors waited forever on the discovery lock.
    """
    for name, module in model.named_modules():
        if isinstance(module, Monitor):
            where = "model" if not name else f"model.{name}"
            raise TypeError(
                f"{where} is already a brittle.Monitor; wrap the classifier it monitors "
                f"instead: brittle.wrap({where}.model, ...)."
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
            The monitor's own state starts on the model's device (first parameter,
            else buffer); ``.to()`` moves both.
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


def _checked_config(state: Any) -> ConsistencyReport | None:
    """The report of a ``get_extra_state`` dict, once the whole dict is checked.

    Raises:
        ValueError: if no monitor of this version could have written ``state``.
    """
    if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
        raise ValueError("this state was not written by this version of brittle.Monitor.")
    try:
        _check_config(state)
        _check_score(state["score"])
        check_norm(state["norm"])
        check_eps(state["eps"])
        report = state["report"]
        if report is None:
            return None
        from brittle.calibrate.report import ConsistencyReport

        return ConsistencyReport.from_dict(report)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"the state's configuration is damaged ({type(err).__name__}: {err}); it was not "
            "written by this version of brittle.Monitor."
        ) from err


def _check_values(state: Mapping[str, Any]) -> None:
    """Refuse a threshold or an input domain no monitor could have saved.

    Read from a ``state_dict`` whose shapes are already checked. NaN marks "no
    threshold yet"; an infinite threshold, or a fitted monitor without a finite one,
    would silently flag nothing (or everything).
    """
    threshold, fitted = state.get("threshold"), state.get("fitted")
    if isinstance(threshold, Tensor):
        value = float(threshold.reshape(()))
        is_fitted = isinstance(fitted, Tensor) and bool(fitted.reshape(()))
        if math.isinf(value) or (is_fitted and not math.isfinite(value)):
            raise ValueError(
                f"the state holds a non-finite threshold ({value}): a monitor with it cannot "
                "judge anything. Fit and save the monitor again."
            )
    domain = state.get("domain")
    if isinstance(domain, Tensor):
        _check_domain(domain.reshape(-1))


def _check_config(config: dict[str, Any]) -> None:
    """Refuse a configuration that no monitor could have written, before anything is built.

    The pseudo-margin network is allocated from the recorded sizes before any tensor's
    shape is compared, and a choice of score or an input shape no monitor makes would
    load and then fail every forward pass.
    """
    chosen, features = config["chosen"], config["pseudo_features"]
    if chosen not in (None, *get_args(ScoreKind)) or (chosen == "pseudo" and features is None):
        raise ValueError(
            f"the state's chosen score {chosen!r} is not one this monitor can compute."
        )
    if features is not None and (config["head"] is None or features != config["feature_dim"]):
        raise ValueError(
            f"the state's pseudo-margin network takes {features!r} features, not the "
            f"{config['feature_dim']!r} of the head {config['head']!r}."
        )
    shape = config["input_shape"]
    if shape is not None and not (
        isinstance(shape, list) and shape and all(isinstance(s, int) and s > 0 for s in shape)
    ):
        raise ValueError(f"the state's input shape {shape!r} is not a list of positive sizes.")
    min_tau = config["min_tau"]
    if type(min_tau) not in (int, float) or not -1.0 <= min_tau <= 1.0:
        raise ValueError(f"the state's min_tau {min_tau!r} is not a number in [-1, 1].")
    if type(config["head_exact"]) is not bool:
        raise ValueError(f"the state's head_exact {config['head_exact']!r} is not true or false.")
    counts = config.get("reference_counts")
    if counts is not None and not _are_reference_counts(counts):
        raise ValueError(
            f"the state's reference counts {counts!r} are not (flagged, accepted) counts: "
            "two integers with 0 <= flagged <= accepted and accepted >= 1."
        )
    rate = config.get("reference_flag_rate")
    if rate is not None and not (type(rate) in (int, float) and 0.0 <= rate <= 1.0):
        raise ValueError(f"the state's reference flag rate {rate!r} is not a number in [0, 1].")
    buckets = config.get("margin_buckets")
    if buckets is not None and not _are_margin_buckets(buckets):
        raise ValueError(
            f"the state's margin buckets {buckets!r} are not finite, strictly increasing numbers."
        )


def _are_margin_buckets(buckets: Any) -> bool:
    """Whether ``buckets`` is a list of histogram bounds that ``fit`` could have saved.

    Finite, strictly increasing numbers (``brittle.deploy.telemetry.margin_buckets``),
    as ``OnnxMonitor`` requires of the same bounds in an exported file.
    """
    if not (isinstance(buckets, list) and all(type(b) in (int, float) for b in buckets)):
        return False
    return are_bounds(buckets)


def _are_reference_counts(counts: Any) -> bool:
    """Whether ``counts`` is a ``[flagged, accepted]`` list that ``fit`` could have saved.

    Integers only (``int()`` would truncate 1.5, read ``"3"`` and take ``True`` as 1),
    then the alarm's own check of counts, as ``OnnxMonitor`` applies to the same
    counts in an exported file.
    """
    if not (isinstance(counts, list) and all(type(c) is int for c in counts)):
        return False
    try:
        parse_reference(counts)
    except ValueError:
        return False
    return True


def _check_domain(domain: Tensor) -> None:
    """Refuse a loaded input domain that no monitor could have saved.

    A domain is either unrecorded (NaN) or two finite bounds in order; anything
    else would silently turn the domain check off or reject every input.
    """
    low, high = domain.tolist()
    if math.isnan(low) and math.isnan(high):
        return
    try:
        domain_bounds(low, high, tolerance=0.0)  # the check fit's own range passes
    except ValueError:
        raise ValueError(
            f"the state's input domain ({low}, {high}) is neither two finite bounds in order "
            "nor unrecorded."
        ) from None
