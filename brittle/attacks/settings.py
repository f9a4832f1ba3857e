"""What an attack engine needs besides the model and the batch."""

from __future__ import annotations

from dataclasses import dataclass

from brittle.arguments import positive_int
from brittle.scores.norms import Norm, check_norm

__all__ = ["AttackSettings", "DEFAULT_ENGINE", "ENGINE_VERSIONS"]

# The engine of every entry point (fit, input_margins, attack_batch, the CLI):
# brittle's own FAB (brittle.attacks.fab), measured tighter than torchattacks' and several
# times faster (benchmarks/README.md). Kept here, beside the settings, so that the
# serving path can name it without importing the attack libraries.
DEFAULT_ENGINE = "brittle"
# Raised when an engine's margins change for the same settings, so that margin
# caches written by an earlier version are recomputed rather than reused.
# brittle 2: per-run patience, targeted run on the runner-up, boundary walk.
# brittle 3: runner-up by the largest-dual-norm fallback, logit ties broken, zero-gradient
# classes unreachable, adaptive extra restarts.
# brittle 4, torchattacks 2: a point whose logits are not finite changes the decision for
# every class, in the engine and in the verification (argmax called it class 0). Margins
# of models with finite logits everywhere are unchanged.
# brittle 5: projections without bisection loops (ties sorted in another order) and the
# targeted runs started per sample: margins move in their last digits.
# brittle 6: each projected hyperplane rescaled to a largest weight of 1: the L2 and L1
# margins of models with gradients below 1e-8 are no longer censored.
# brittle 7: a sample without an adversarial gets every extra restart (it got one); the
# walk stops a run's adversarial far behind its sample's nearest.
# brittle 8: the targeted run's class comes from the three highest logits; a sample
# without an adversarial starts each random restart twice as far out as the last.
# brittle 9: a sample where a targeted run's best was nearer than half the untargeted
# run's takes the extra restarts too.
# brittle 10: a point that changed the decision in the engine's pass but not in the
# check's (rounding by batch) is pushed farther out along its ray instead of censored.
# brittle 11: a half-precision model on a CPU steps in units of its own precision (the
# pooling wrapper had hidden its dtype): its margins move; float32 and float64 unchanged.
# brittle 12: each random restart is walked and bisected before the next one starts, so
# that more restarts never give a larger margin: margins with restarts >= 3 move.
# torchattacks 3: a float64 model's margins are no longer rounded to float32.
ENGINE_VERSIONS = {"brittle": 12, "torchattacks": 3}


@dataclass(frozen=True)
class AttackSettings:
    """What an engine needs besides the model and the batch."""

    norm: Norm = "Linf"
    steps: int = 100
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        check_norm(self.norm)
        # Checked here, every entry point's settings pass through: a float, a string
        # or a negative seed would otherwise fail deep inside the attack or after it
        # (range(), numpy's generator, torch.manual_seed). Stored as plain ints, so
        # that numpy integers pass and the margin cache's key stays JSON.
        for name, minimum in (("steps", 1), ("restarts", 1), ("seed", 0)):
            what = "a non-negative integer" if minimum == 0 else ""
            value = positive_int(name, getattr(self, name), minimum=minimum, what=what)
            object.__setattr__(self, name, value)
        if self.seed >= 2**64:  # torch.Generator().manual_seed refuses it, after the attacks
            raise ValueError(
                f"seed must be below 2**64 (torch's generators take no larger). Got {self.seed}."
            )
