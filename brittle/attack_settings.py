"""What an attack engine needs besides the model and the batch."""

from __future__ import annotations

from dataclasses import dataclass

from brittle.norms import Norm, check_norm

__all__ = ["AttackSettings"]


@dataclass(frozen=True)
class AttackSettings:
    """What an engine needs besides the model and the batch."""

    norm: Norm = "Linf"
    steps: int = 100
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_norm(self.norm)
        if self.steps < 1 or self.restarts < 1:
            raise ValueError(
                f"steps and restarts must be positive. Got steps={self.steps}, "
                f"restarts={self.restarts}."
            )
