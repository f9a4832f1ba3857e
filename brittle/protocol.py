"""What the offline steps read from a monitor: the protocol ``brittle.Monitor`` implements.

``fit``, ``evaluate``, saving, ONNX export and the analyses are written against
this protocol rather than the ``Monitor`` class, so that they sit below it in
the import graph: ``Monitor`` calls down into them, nothing calls back up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from torch import Tensor, nn

    from brittle.calibrate.calibration import ScoreKind
    from brittle.calibrate.report import ConsistencyReport
    from brittle.output import MonitorOutput, MonitorPass
    from brittle.scores.norms import Norm

__all__ = ["MonitorProtocol"]


class MonitorProtocol(Protocol):
    """The public face of a ``brittle.Monitor`` that the offline steps use."""

    model: nn.Module
    norm: Norm
    eps: float
    min_tau: float
    head_name: str | None
    num_classes: int | None
    input_shape: tuple[int, ...] | None
    threshold: Tensor
    pair_norms: Tensor
    reference_flag_rate: float | None
    reference_counts: tuple[int, int] | None
    margin_buckets: tuple[float, ...] | None

    @property
    def input_domain(self) -> tuple[float, float] | None: ...

    @property
    def requested_score(self) -> Literal["auto", "logit", "feature", "pseudo"]: ...

    @property
    def pseudo(self) -> nn.Module | None: ...

    @property
    def score(self) -> ScoreKind: ...

    @property
    def head(self) -> nn.Linear | None: ...

    @property
    def discovered(self) -> bool: ...

    @property
    def has_threshold(self) -> bool: ...

    @property
    def is_fitted(self) -> bool: ...

    @property
    def has_report(self) -> bool: ...

    @property
    def report(self) -> ConsistencyReport: ...

    def check_input(self, x: Any) -> Tensor: ...

    def inspect(self, x: Tensor, *, features: bool = False, domain: bool = True) -> MonitorPass: ...

    def graph(self) -> nn.Module: ...

    def state_dict(self, *args: Any, **kwargs: Any) -> Mapping[str, Any]: ...

    def modules(self) -> Iterator[nn.Module]: ...

    def eval(self) -> Any: ...

    def __call__(self, x: Tensor) -> MonitorOutput: ...
