"""``AttackOutcome``: what one attack achieved against a monitor, as counts.

One type for every attack the monitor is measured against: the plain PGD and
FGSM of the report (``brittle.calibrate.analyses.adversarial_flags``) and the
attacks that know the monitor (``brittle.attacks.adaptive``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["AttackOutcome"]


@dataclass(frozen=True)
class AttackOutcome:
    """What one attack achieved against a monitor.

    Attributes:
        attack: The attack's name (``"pgd"``, ``"fgsm"``, ``"adaptive_pgd"``, ``"cw"``).
        n: Samples attacked.
        n_changed: Examples whose prediction differs from the clean one (any distance).
        n_successful: Changed examples that also lie inside the eps-ball (in the
            monitor's norm) and inside ``[0, 1]``.
        n_flagged: Successful examples the monitor flags.
        n_changed_flagged: Changed examples the monitor flags, inside the ball or
            not (an attacker with a larger budget than eps).
        n_examples_flagged: All examples the monitor flags, successful or not;
            ``None`` where the attack does not count them.

    Examples:
        >>> outcome = AttackOutcome("pgd", n=10, n_changed=4, n_successful=4, n_flagged=3)
        >>> outcome.success_rate, outcome.flagged_of_successful
        (0.4, 0.75)
    """

    attack: str
    n: int
    n_changed: int
    n_successful: int
    n_flagged: int
    n_changed_flagged: int = 0
    n_examples_flagged: int | None = None

    @property
    def success_rate(self) -> float:
        """Share of the ``n`` samples with a successful example."""
        return self.n_successful / self.n if self.n else math.nan

    @property
    def flagged_of_successful(self) -> float:
        """Share of the successful examples the monitor flags (NaN when there are none)."""
        return self.n_flagged / self.n_successful if self.n_successful else math.nan

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready values (NaN as ``None``)."""
        rate, caught = self.success_rate, self.flagged_of_successful
        return {
            "attack": self.attack,
            "n": self.n,
            "n_changed": self.n_changed,
            "n_successful": self.n_successful,
            "n_flagged": self.n_flagged,
            "n_changed_flagged": self.n_changed_flagged,
            "success_rate": None if math.isnan(rate) else rate,
            "flagged_of_successful": None if math.isnan(caught) else caught,
        } | (
            {}
            if self.n_examples_flagged is None or not self.n
            else {"flagged_of_all": self.n_examples_flagged / self.n}
        )
