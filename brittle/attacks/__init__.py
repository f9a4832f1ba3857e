"""Input margins by minimum-norm attacks, offline: brittle's FAB, the engines, the references.

``input_margins`` is the entry point; ``fab_attack`` and the boundary walk are
brittle's engine, ``torchattacks_engine`` and the reference attacks are the
independent libraries it is checked against, ``adaptive_attacks`` attack the
monitor itself. Imports ``brittle.scores`` only among the subpackages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from brittle.lazy import lazy_exports

if TYPE_CHECKING:
    from brittle.attacks.adaptive import AdaptiveResult, adaptive_attacks, adaptive_pgd
    from brittle.attacks.attack import ENGINES, PassCounter, attack_batch, input_margins
    from brittle.attacks.distributed import Shard, is_distributed, sample_fingerprints, shard
    from brittle.attacks.fab import FabResult, fab_attack
    from brittle.attacks.fab_references import REFERENCES, best_reference_margins, reference_margins
    from brittle.attacks.outcome import AttackOutcome
    from brittle.attacks.settings import DEFAULT_ENGINE, AttackSettings
    from brittle.attacks.torchattacks_fab import torchattacks_engine
    from brittle.attacks.verify import verified_margins, verified_points
    from brittle.attacks.walk import boundary_walk

_WHERE = {
    "input_margins": "brittle.attacks.attack",
    "attack_batch": "brittle.attacks.attack",
    "PassCounter": "brittle.attacks.attack",
    "ENGINES": "brittle.attacks.attack",
    "AttackSettings": "brittle.attacks.settings",
    "DEFAULT_ENGINE": "brittle.attacks.settings",
    "fab_attack": "brittle.attacks.fab",
    "FabResult": "brittle.attacks.fab",
    "boundary_walk": "brittle.attacks.walk",
    "torchattacks_engine": "brittle.attacks.torchattacks_fab",
    "REFERENCES": "brittle.attacks.fab_references",
    "reference_margins": "brittle.attacks.fab_references",
    "best_reference_margins": "brittle.attacks.fab_references",
    "adaptive_attacks": "brittle.attacks.adaptive",
    "adaptive_pgd": "brittle.attacks.adaptive",
    "AdaptiveResult": "brittle.attacks.adaptive",
    "AttackOutcome": "brittle.attacks.outcome",
    "verified_margins": "brittle.attacks.verify",
    "verified_points": "brittle.attacks.verify",
    "shard": "brittle.attacks.distributed",
    "Shard": "brittle.attacks.distributed",
    "is_distributed": "brittle.attacks.distributed",
    "sample_fingerprints": "brittle.attacks.distributed",
}
__all__ = [
    "input_margins",
    "attack_batch",
    "PassCounter",
    "ENGINES",
    "AttackSettings",
    "DEFAULT_ENGINE",
    "fab_attack",
    "FabResult",
    "boundary_walk",
    "torchattacks_engine",
    "REFERENCES",
    "reference_margins",
    "best_reference_margins",
    "adaptive_attacks",
    "adaptive_pgd",
    "AdaptiveResult",
    "AttackOutcome",
    "verified_margins",
    "verified_points",
    "shard",
    "Shard",
    "is_distributed",
    "sample_fingerprints",
]

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
