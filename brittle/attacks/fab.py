"""brittle's FAB: Croce & Hein's minimum-norm attack, linearising only the nearest classes.

FAB ("Minimally distorted adversarial examples with a Fast Adaptive Boundary
attack", Croce & Hein, ICML 2020) walks towards the nearest decision boundary
by projecting onto the linearised boundary of the closest class. The reference
implementations (torchattacks, AutoAttack) linearise *every* class at every
step: one backward pass per class, then a second forward pass to check labels.
This engine does the same walk with far less work, then spends what it saved
where FAB is weakest (AttackBench, Cina et al. 2025, ranks FAB below FMN, DDN
and APGD-based minimum-norm attacks):

* only the ``k`` classes whose boundary looks nearest are linearised: ranked by
  logit gap over the gradient norm last seen for that class (all classes, up
  to ten, are linearised once at the start). ``k`` (default 1) is adaptive per
  sample: it doubles for the next step whenever the next class's guessed
  distance is close enough to the chosen boundary's that it might be nearer;
* the ``k`` gradients come from one backward pass over ``k`` copies of each
  sample, whose forward pass also serves as the label check of the step; at a
  run's first step, where every sample linearises as many classes, from ``k``
  backward passes of one forward pass instead (half the cost);
* a sample leaves a run once the run's own best norm has stopped improving
  (patience counted per run, so that every restart gets its chance);
* after the runs, a short FMN-style walk along the boundary
  (``brittle.attacks.walk.boundary_walk``, one forward and one backward pass per
  step whatever the number of classes) slides every run's adversarial towards
  x, all runs in one batch;
* ``targeted`` extra runs each linearise one runner-up class only (among the
  three highest logits other than the best adversarial's class, the nearest by
  guessed distance; ``runner_up``): FAB commits to one boundary early, and the
  nearest one is often another class's. Each sample
  starts them as soon as its own untargeted run ends, in the same batch;
* the best adversarial is shrunk along its ray by bisection at the end;
* random restarts draw from a counter-based hash of ``(seed, index, restart)``,
  so a sample's result does not depend on the batch it is attacked in.

Gradients are taken with ``torch.autograd.grad`` with respect to the input
only; the model is borrowed in eval mode with frozen parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from brittle._modes import eval_mode, frozen
from brittle.attacks.ball import steepest
from brittle.attacks.projection import project
from brittle.attacks.settings import AttackSettings
from brittle.attacks.verify import (
    check_differentiable,
    check_unit_range,
    decision_changes,
    verified_points,
)
from brittle.attacks.walk import boundary_walk
from brittle.scores.head import model_output
from brittle.scores.norms import START_RADIUS, Norm, check_norm, dual_order, norm_order

__all__ = [
    "FabResult",
    "fab_attack",
    "guessed_distance",
    "runner_up",
    "brittle_engine",
    "brittle_points",
]

_MASK32 = 0xFFFFFFFF
# Widen a sample's candidate classes when the next class's guessed distance is
# below this many times the nearest linearised distance (gradients change en route).
_WIDEN_SLACK = 2.0
# Improvements of the best norm smaller than this (relative) do not reset patience:
# the final bisection recovers them far more cheaply than more FAB steps.
_IMPROVE_RTOL = 1e-3
# Classes linearised at the very first step, whatever ``candidates`` is.
_FIRST_WIDTH = 10
# Default patience: the boundary walk after the runs recovers the small late
# improvements of FAB far more cheaply than more FAB steps would.
_PATIENCE = 3
# The runner-up of the targeted runs is the nearest by guessed distance among the classes
# with the 3 highest logits at x0 (after the prediction and the class already found). At
# x0 the gradients misjudge far boundaries of weakly consistent models; among all
# classes, the nearest by guessed distance missed the class the references crossed into.
# On the certified (IBP) digits CNN, 671 -> 683 of the 719 holdout digits within 1 % of
# the references for Linf (562 -> 573 of 600 training digits), 634 -> 655 for L2, at the
# same cost.
_POOL = 3
# Default length of the boundary walk (at most ``steps``: a small budget stays small).
_WALK_STEPS = 20
# The adaptive budget: a sample gets another random restart while its last run lowered
# its margin by more than this (relative), up to _EXTRA_RESTARTS extra restarts.
_RESTART_RTOL = 0.005
_EXTRA_RESTARTS = 3
# A sample where a targeted run's best was nearer than half the untargeted run's
# enters the extra restarts too: its first run went to a far boundary, and random
# restarts are what closes such a tail. On the certified (IBP) digits CNN, 683 -> 685
# of the 719 holdout digits within 1 % of the references (Linf; L2: 656 -> 659), at
# 3.7 % more model rows (Linf; L2 4.6 %); no PGD-trained or standard digit triggers.
_RUGGED = 0.5
# A run's adversarial still more than 1.2x its sample's nearest after 40 % of the walk
# stops walking. Lossless on the three digits CNNs (Linf, all 719 holdout digits:
# the same shares within 1 % of the references), 3-6 % fewer model rows per sample.
_WALK_CUTOFF = (0.4, 1.2)
# Most extra boundary walks, each from the best point, while the last one still
# lowered the margin by more than _WALK_RTOL. A walk that gained 5 % marks a FAB
# run that stopped far from the nearest point of its boundary (the tail of weakly
# consistent models); smaller gains are left to the bisection.
_EXTRA_WALKS = 2
_WALK_RTOL = 0.05
# Most model rows per pass: a step that linearises many classes (ka copies of every
# sample) runs in parts, whose activations stay in the cache. At once, the 1,152 rows
# of the digits CNN's first step (nine classes) took 82-85 ms; in parts of 576, 53-65 ms.
# The first step now runs one row per sample and nine backward passes: 23-27 ms.
_MAX_COPIES = 512
# A point exactly on a boundary (a logit tie) projects onto itself: FAB's step and its
# overshoot are both zero. Steps shorter than this many units in the last place of the
# input dtype are lengthened to it along the gradient, so that the tie is broken.
_TIE_ULPS = 8.0


class FabResult(NamedTuple):
    """Outcome of ``fab_attack``.

    Attributes:
        adv: Best adversarial per sample, shape of ``x``; ``x`` itself where none was found.
        margin: ``(B,)`` norm of ``adv - x``; ``inf`` where no adversarial was found,
            ``nan`` for a row of ``x`` holding NaN or Inf.

    """

    adv: Tensor
    margin: Tensor


def fab_attack(
    model: nn.Module,
    x: Tensor,
    pred: Tensor | None = None,
    *,
    norm: Norm = "Linf",
    steps: int = 100,
    restarts: int = 1,
    seed: int = 0,
    index: Tensor | None = None,
    candidates: int = 1,
    patience: int | None = None,
    refine_steps: int = 10,
    eta: float = 1.05,
    beta: float = 0.9,
    alpha_max: float = 0.1,
    targeted: int = 1,
    walk_steps: int | None = None,
    extra_restarts: int = _EXTRA_RESTARTS,
    extra_walks: int = _EXTRA_WALKS,
    resolution: float | None = None,
) -> FabResult:
    """Untargeted minimum-norm FAB attack against ``pred`` (default: the model's prediction).

    Every returned adversarial changes the prediction and stays in ``[0, 1]``: it
    is the input of a forward pass whose argmax differed from ``pred``.

    Args:
        model: Classifier on inputs in ``[0, 1]``; borrowed in eval mode, parameters untouched.
        x: ``(B, ...)`` inputs in ``[0, 1]``.
        pred: ``(B,)`` class to move away from; the model's prediction when ``None``.
        norm: ``"Linf"``, ``"L2"`` or ``"L1"``.
        steps: FAB iterations per restart.
        restarts: Untargeted runs per sample; the first starts at ``x``, later ones
            (after the targeted runs and the walk) at a random point within half the
            best norm so far, each followed by its own walk and bisection. The
            smallest norm is kept; more restarts never give a larger one.
        seed: Seed of the random restarts.
        index: ``(B,)`` global position of each sample (default ``0..B-1``); a
            sample's restarts depend on ``(seed, index)`` only.
        candidates: Classes linearised per sample at first (widened when needed).
        patience: A sample with an adversarial leaves a run after this many steps
            without improving the run's best norm by 0.1 % (default 3).
        refine_steps: Bisection steps shrinking the best adversarial along its ray.
        eta: Overshoot of the projection step (FAB's ``eta``).
        beta: Backward step towards ``x`` after reaching an adversarial (FAB's ``beta``).
        alpha_max: Largest weight of the step projected from ``x`` (FAB's ``alpha_max``).
        targeted: Runs from ``x`` after the untargeted ones, each linearising a single
            runner-up class (``runner_up``): the ``i``-th nearest by guessed distance,
            the three highest logits first, skipping the class of the best
            adversarial so far.
        walk_steps: Steps of the boundary walk (0: none; default ``min(20, steps)``),
            taken after the runs by every run's adversarial at once; the nearest
            point seen is kept. A run's adversarial still more than 1.2 times its
            sample's nearest after 40 % of the steps stops walking.
        extra_restarts: Most random restarts added per sample, one at a time, while it
            has no adversarial yet, or while the last random restart (of ``restarts``,
            then of these) still lowered its margin by more than 0.5 %. A sample where
            a targeted run's best was nearer than half the untargeted run's enters
            them too, whatever ``restarts`` is.
        extra_walks: Most extra boundary walks per sample, each from the best point,
            while the last walk still lowered its margin by more than 5 %.
        resolution: Relative precision in which the model reads its inputs (default:
            the machine epsilon of ``x``'s dtype); a half-precision model seen through
            a float32 view reads float16 or bfloat16. No step is shorter than a few
            such units, or rounding would undo it.

    Returns:
        ``FabResult`` with the best adversarial and its norm per sample.

    Examples:
        >>> import torch
        >>> from brittle.attacks.fab import fab_attack
        >>> model = torch.nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.eye(2))
        ...     _ = model.bias.zero_()
        >>> result = fab_attack(model, torch.tensor([[0.7, 0.3]]), norm="L2", steps=10)
        >>> round(float(result.margin), 3)  # the boundary x0 == x1 is 0.4 / sqrt(2) away
        0.283
        >>> bool(model(result.adv).argmax() == 1)
        True

    """
    norm = check_norm(norm)
    walk_steps = min(_WALK_STEPS, steps) if walk_steps is None else walk_steps
    if (
        steps < 1
        or restarts < 1
        or candidates < 1
        or min(refine_steps, targeted, walk_steps, extra_restarts, extra_walks) < 0
    ):
        raise ValueError(
            f"steps, restarts and candidates must be positive and refine_steps, targeted, "
            f"walk_steps, extra_restarts and extra_walks non-negative. Got steps={steps}, "
            f"restarts={restarts}, candidates={candidates}, refine_steps={refine_steps}, "
            f"targeted={targeted}, walk_steps={walk_steps}, extra_restarts={extra_restarts}, "
            f"extra_walks={extra_walks}."
        )
    check_unit_range(x, "fab_attack works")
    patience = _PATIENCE if patience is None else patience
    finite = torch.isfinite(x.detach().flatten(1)).all(dim=1) if x.dim() > 1 else None
    if finite is not None and not bool(finite.all()):
        # A row with NaN or Inf has no distance to anything: its margin is NaN, its
        # "adversarial" the row itself, and the other rows are attacked as usual.
        adv, margin = x.detach().clone(), x.new_full((x.shape[0],), math.nan)
        if index is None:
            index = torch.arange(x.shape[0], device=x.device)
        good = fab_attack(
            model,
            x[finite],
            None if pred is None else pred[finite],
            norm=norm,
            steps=steps,
            restarts=restarts,
            seed=seed,
            index=index[finite],
            candidates=candidates,
            patience=patience,
            refine_steps=refine_steps,
            eta=eta,
            beta=beta,
            alpha_max=alpha_max,
            targeted=targeted,
            walk_steps=walk_steps,
            extra_restarts=extra_restarts,
            extra_walks=extra_walks,
            resolution=resolution,
        )
        adv[finite], margin[finite] = good.adv, good.margin.to(margin.dtype)
        return FabResult(adv, margin)
    with eval_mode(model), frozen(model):
        x = x.detach()
        if pred is None:
            with torch.no_grad():
                pred = model_output(model(x)).argmax(dim=1)
        if index is None:
            index = torch.arange(x.shape[0], device=x.device)
        if x.shape[0] == 0:
            return FabResult(x.clone(), torch.empty(0, device=x.device, dtype=x.dtype))
        resolution = torch.finfo(x.dtype).eps if resolution is None else resolution
        attack = _Fab(model, x, pred.to(x.device), norm, (eta, beta, alpha_max), patience)
        attack.min_step = _TIE_ULPS * resolution
        attack.run(attack.x0, steps, candidates, targeted=min(targeted, attack.num_classes - 2))
        rugged = _rugged(attack.runs)
        before = attack.best.clone()
        attack.walk(walk_steps)
        attack.refine(refine_steps)
        walking = _improved(before, attack.best, _WALK_RTOL)
        # FAB can stop on a boundary far from its nearest point (weakly consistent
        # models): where the walk still shortened the margin, walk on from the best.
        for _ in range(extra_walks):
            if not bool(walking.any()):
                break
            before = attack.best.clone()
            from_best = attack.best.masked_fill(~walking, math.inf)
            attack.runs.append((attack.best_adv.clone(), from_best))
            attack.walk(walk_steps)
            attack.refine(refine_steps, rows=walking)
            walking = walking & _improved(before, attack.best, _WALK_RTOL)
        # Random restarts come last and only ever lower a margin. Each is a run, a walk
        # and a bisection of its own, so that the ``r``-th restart starts from the same
        # point whatever ``restarts`` is, and the extra restarts below continue the
        # same sequence: more restarts never give a larger margin. (Run back to back
        # before one walk, the second restart drew its start from a best the first
        # restart's walk had not yet lowered, and went elsewhere than the same restart
        # drawn as an extra one after that walk.)
        busy = torch.zeros_like(attack.pred, dtype=torch.bool)
        for restart in range(1, restarts):
            before = attack.best.clone()
            attack.run(attack.random_start(seed, index, restart), steps, candidates)
            attack.walk(walk_steps)
            attack.refine(refine_steps)
            busy = _improved(before, attack.best)
        # The adaptive budget: more restarts only where the last random restart still
        # improved the margin, or where no run has found an adversarial yet, so that
        # the cost lands on the tail; and where a targeted run's best was nearer than
        # half the untargeted run's (``_rugged``). (Whether it beat the first run at all
        # predicted too little: on the PGD-trained digits CNN it cost 20 % more passes
        # for one sample in a hundred within 1 % of the references.)
        busy = busy | rugged | ~torch.isfinite(attack.best)
        for extra in range(extra_restarts):
            if not bool(busy.any()):
                break
            before = attack.best.clone()
            start = attack.random_start(seed, index, restarts + extra)
            attack.run(start, steps, candidates, rows=busy)
            attack.walk(walk_steps)
            attack.refine(refine_steps, rows=busy)
            busy = (busy & _improved(before, attack.best)) | ~torch.isfinite(attack.best)
        return FabResult(attack.best_adv.view_as(x).clone(), attack.best.clone())


def brittle_engine(
    model: nn.Module, x: Tensor, pred: Tensor, settings: AttackSettings, index: Tensor
) -> Tensor:
    """Run ``fab_attack`` as the ``"brittle"`` engine of ``brittle.input_margins``.

    Returns the verified margins (``inf`` where censored), as every engine does.
    """
    return brittle_points(model, x, pred, settings, index)[0]


def brittle_points(
    model: nn.Module, x: Tensor, pred: Tensor, settings: AttackSettings, index: Tensor
) -> tuple[Tensor, Tensor]:
    """``brittle_engine``'s margins and the adversarial point that realises each one.

    The points are ``fab_attack``'s best adversarials, pushed farther out along their
    ray where another batch's rounding undoes them (``verified_points``): where the
    margin is censored (``inf``) the point is ``x`` itself.
    """
    # A half-precision model behind a float32 view (``LogitsModel``) names its dtype.
    dtype = getattr(model, "dtype", None)
    adv = fab_attack(
        model,
        x,
        pred,
        norm=settings.norm,
        steps=settings.steps,
        restarts=settings.restarts,
        seed=settings.seed,
        index=index,
        resolution=torch.finfo(dtype if isinstance(dtype, torch.dtype) else x.dtype).eps,
    ).adv
    return verified_points(model, x, adv, pred, settings.norm)


class _Point(NamedTuple):
    """One FAB step's forward pass over the active samples, passed to ``_Fab._step``."""

    idx: Tensor  # the active samples' rows in the batch
    xa: Tensor  # their current points, flat
    x0: Tensor  # their clean points, flat
    c: Tensor  # their predicted classes
    ka: Tensor  # candidate classes to linearise, per sample
    xr: Tensor  # ka copies of each point (one gradient each), or the points if shared
    rows: Tensor  # the sample of each copy
    first: Tensor  # each sample's first copy
    logits: Tensor  # the copies' logits (with the graph when a step follows)
    z: Tensor  # each sample's logits, detached
    is_adv: Tensor  # whether the point is already adversarial
    last: Tensor  # whether the point ends its sample's run (label check only, no step)
    shared: bool  # one row per sample, ka backward passes (else ka copies, one pass)


@dataclass
class _Runs:
    """Per-sample state of ``_Fab.run``: the runs in progress, one row per sample."""

    steps: int  # FAB steps per run
    base: int  # classes linearised per step by an untargeted run
    targeted: int  # targeted runs after the untargeted one
    x1: Tensor  # current point, flat
    k: Tensor  # classes to linearise at the next step
    active: Tensor  # whether the sample still runs
    stale: Tensor  # steps since the run's best last improved
    count: Tensor  # steps taken in the current run
    phase: Tensor  # 0: the untargeted run; i: the i-th targeted run
    target: Tensor  # the class the targeted run linearises (-1: none)
    found: Tensor  # class of the best adversarial so far (the prediction where none)
    run_best: Tensor  # (runs, B) each run's best norm, inf where none
    run_adv: Tensor  # (runs, B, D) each run's best adversarial


def _parts(copies: Tensor, cap: int) -> list[slice]:
    """Consecutive slices of the samples, of at most ``cap`` ``copies`` each.

    One sample may exceed ``cap`` alone.
    """
    if int(copies.sum()) <= cap:
        return [slice(None)]
    group = (torch.cumsum(copies, 0) - 1) // cap
    ends = torch.cumsum(torch.unique_consecutive(group, return_counts=True)[1], 0).tolist()
    return [slice(start, end) for start, end in zip([0, *ends[:-1]], ends, strict=True)]


class _Fab:
    """State of one batch under attack: flattened inputs, best adversarials so far."""

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        pred: Tensor,
        norm: Norm,
        steps: tuple[float, float, float],
        patience: int,
    ) -> None:
        self.model, self.norm, self.shape = model, norm, x.shape[1:]
        (self.eta, self.beta, self.alpha_max), self.patience = steps, patience
        self.min_step = _TIE_ULPS * torch.finfo(x.dtype).eps
        # (adversarial, norm) of each run since the last walk, inf where none.
        self.runs: list[tuple[Tensor, Tensor]] = []
        self.x0 = x.flatten(1)
        self.pred = pred.long()
        with torch.no_grad():
            self.z0 = self._logits(self.x0)
        self.num_classes = int(self.z0.shape[1])
        if self.num_classes < 2:
            raise ValueError(f"the model must output at least 2 classes. Got {self.num_classes}.")
        self.best = torch.full((x.shape[0],), math.inf, device=x.device, dtype=x.dtype)
        self.best_adv = self.x0.clone()
        # Dual norm of grad(f_j - f_c) last seen per sample and class, to rank candidates.
        self.dual_seen = self.x0.new_zeros(x.shape[0], self.num_classes)
        self.known = torch.zeros_like(self.dual_seen, dtype=torch.bool)

    def _logits(self, x: Tensor) -> Tensor:
        return model_output(self.model(x.view(-1, *self.shape)))

    def run(
        self,
        start: Tensor,
        steps: int,
        candidates: int,
        rows: Tensor | None = None,
        targeted: int = 0,
    ) -> None:
        """One FAB run from ``start``, then ``targeted`` runs from x0; updates the best so far.

        The ``i``-th targeted run linearises one class only: the ``i``-th nearest by
        guessed distance, skipping the class of the best adversarial so far. Each
        sample starts its next run as soon as its last one ends, so that the runs
        share the batch's passes instead of following each other's stragglers;
        what a sample computes depends on that sample alone. With ``rows`` (a mask)
        only those samples run.
        """
        n, phases = self.x0.shape[0], 1 + targeted
        base = min(candidates, self.num_classes - 1)
        # The very first step linearises more classes, to learn their gradient norms.
        first_width = min(max(base, _FIRST_WIDTH), self.num_classes - 1)
        if self.known.any():  # later runs know the gradient norms
            first_width = base
        # Patience counts against each run's own best, so that a run is not cut
        # short by an earlier run's result: it stops when it stops improving itself.
        runs = _Runs(
            steps=steps,
            base=base,
            targeted=targeted,
            x1=start.clone(),
            k=torch.full_like(self.pred, first_width),
            active=torch.ones_like(self.pred, dtype=torch.bool) if rows is None else rows.clone(),
            stale=torch.zeros_like(self.pred),
            count=torch.zeros_like(self.pred),
            phase=torch.zeros_like(self.pred),
            target=torch.full_like(self.pred, -1),
            found=self._found_classes() if targeted else self.pred,
            run_best=self.best.new_full((phases, n), math.inf),
            run_adv=self.x0[None].repeat(phases, 1, 1),
        )
        self.runs.extend(zip(runs.run_adv.unbind(), runs.run_best.unbind(), strict=True))
        while True:
            idx = runs.active.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            # The last point of a run only needs its label check: one copy.
            ka = torch.where(runs.count[idx] == steps, 1, runs.k[idx])
            # A run's first step linearises the same number of classes for every sample:
            # one forward pass of the points serves all k backward passes.
            low, high, starting = torch.stack(
                (ka.min(), ka.max(), (runs.count[idx] == 0).all().long())
            ).tolist()  # one device synchronisation
            shared = 1 < low == high and bool(starting)
            for part in _parts(torch.ones_like(ka) if shared else ka, _MAX_COPIES):
                self._advance(runs, idx[part], ka[part], shared)

    def _advance(self, runs: _Runs, idx: Tensor, ka: Tensor, shared: bool = False) -> None:
        """One step of the runs of the samples ``idx``: label check, best so far, FAB step.

        ``ka`` is each sample's number of classes to linearise. Each sample gets ``ka``
        copies, whose one backward pass yields the gradients; with ``shared`` (the same
        ``ka`` for all) the points go through the model once, and ``ka`` backward passes
        of that graph yield them, which costs about half as much.
        """
        ph, last = runs.phase[idx], runs.count[idx] == runs.steps
        xa, x0, c = runs.x1[idx], self.x0[idx], self.pred[idx]
        stepping = not bool(last.all())
        # The forward pass that builds the gradients is also the label check of this point.
        arange = torch.arange(len(idx), device=xa.device)
        copies = arange if shared else torch.repeat_interleave(arange, ka)
        xr = xa[copies].requires_grad_(stepping)
        with torch.set_grad_enabled(stepping):
            logits = self._logits(xr)
        first = arange if shared else torch.cumsum(ka, 0) - ka
        z = logits.detach()[first]
        is_adv = decision_changes(z, c)
        point = _Point(idx, xa, x0, c, ka, xr, copies, first, logits, z, is_adv, last, shared)

        dist, best, own = _lp(xa - x0, self.norm), self.best[idx], runs.run_best[ph, idx]
        better = is_adv & (dist < best)
        progress = is_adv & (dist < (1 - _IMPROVE_RTOL) * own)
        self.best[idx] = torch.where(better, dist, best)
        self.best_adv[idx[better]] = xa[better]
        if runs.targeted:
            runs.found[idx[better]] = z[better].argmax(dim=1)
        nearer = is_adv & (dist < own)
        own = torch.where(nearer, dist, own)
        runs.run_best[ph, idx] = own
        runs.run_adv[ph[nearer], idx[nearer]] = xa[nearer]
        stale = torch.where(progress | ~torch.isfinite(own), 0, runs.stale[idx] + 1)
        runs.stale[idx], runs.count[idx] = stale, runs.count[idx] + 1
        if stepping:
            new, widen = self._step(point, runs.target[idx] if runs.targeted else None)
            runs.x1[idx] = torch.where(last[:, None], xa, new)
            base = torch.where(ph > 0, 1, runs.base)
            runs.k[idx] = torch.where(widen, (2 * ka).clamp(max=self.num_classes - 1), base)
        # A sample whose run has stopped improving (or is out of steps) is done with
        # it; it starts its next run from x0 at once, or stops.
        done = last | (stale >= self.patience)
        moving_on = done & (ph < runs.targeted)
        runs.active[idx] = ~done | moving_on
        if bool(moving_on.any()):
            on = idx[moving_on]
            runs.phase[on] += 1
            runs.target[on] = self._runner_up(on, runs.phase[on] - 1, runs.found[on])
            runs.x1[on], runs.k[on], runs.stale[on], runs.count[on] = self.x0[on], 1, 0, 0

    def _step(self, point: _Point, target: Tensor | None) -> tuple[Tensor, Tensor]:
        """FAB's projection step from ``point.xa``, linearising ``point.ka`` classes per sample.

        Candidates are the classes whose boundary looks nearest: logit gap over the
        gradient norm last seen for that class (the largest norm seen, if never);
        where ``target`` (one class per active sample, -1 for none) names one, that
        class only.
        """
        idx, xa, x0, c, ka, xr, rows, first, logits, z, is_adv, last, shared = point
        n, kmax, num_classes = len(xa), int(ka.max()), z.shape[1]
        zc = z.gather(1, c[:, None])
        dual_seen, known = self.dual_seen[idx], self.known[idx]
        guess = guessed_distance(z - zc, dual_seen, known).scatter(1, c[:, None], math.inf)
        guess_top, top_cls = guess.topk(min(kmax + 1, num_classes - 1), dim=1, largest=False)
        cls, aimed = top_cls[:, :kmax], None
        if target is not None:
            aimed = target >= 0
            cls = torch.where(aimed[:, None], target[:, None], cls)

        check_differentiable(logits)
        # dg = grad(f_j - f_c), padded to (n, kmax); df = f_j - f_c at xa.
        dg = (
            _shared_gradients(logits, xr, c, cls)
            if shared
            else _gradients(logits, xr, c, cls, rows, first)
        )
        df = z.gather(1, cls) - zc
        valid = torch.arange(kmax, device=xa.device)[None, :] < ka[:, None]

        # After an adversarial FAB steps back towards x0; the boundaries stay the
        # ones linearised at xa, which just crossed them.
        src = torch.where(is_adv[:, None], x0 + self.beta * (xa - x0), xa)
        value = df + torch.einsum("nkd,nd->nk", dg, src - xa)
        dual = _dual(dg, self.norm)
        # A class whose logit moves exactly with the predicted one (zero gradient of
        # the difference, e.g. a duplicated output unit) cannot be reached this way.
        reachable = valid & (dual > 0)
        lin_dist = torch.where(reachable, value.abs() / dual.clamp_min(1e-30), math.inf)
        nearest, j = lin_dist.min(dim=1)
        # A sample at the end of its run takes no step and learns nothing from it, so
        # that what it computes does not depend on whether others in the batch step.
        learn = valid & ~last[:, None]
        seen = torch.where(learn, dual, dual_seen.gather(1, cls))
        self.dual_seen[idx] = dual_seen.scatter(1, cls, seen)
        self.known[idx] = known.scatter(1, cls, learn | known.gather(1, cls))

        # Widen next step's candidates when the next class's guessed distance is
        # close enough to the chosen boundary's that it might be the nearer one.
        has_next = ka < num_classes - 1
        next_guess = guess_top.gather(1, ka.clamp(max=guess_top.shape[1] - 1)[:, None]).squeeze(1)
        widen = has_next & (next_guess < _WIDEN_SLACK * nearest)
        if aimed is not None:
            widen = widen & ~aimed

        u = torch.arange(n, device=xa.device)
        w = dg[u, j]
        b = -df[u, j] + (w * xa).sum(dim=1)
        d = project(torch.cat((src, x0)), torch.cat((w, w)), torch.cat((b, b)), self.norm)
        d = _break_ties(d, torch.cat((w, w)), self.norm, self.min_step)
        # No reachable candidate: stay put (the candidates widen for the next step).
        d = d.masked_fill(~torch.isfinite(torch.cat((nearest, nearest)))[:, None], 0.0)
        d1, d2 = d[:n], d[n:]
        a = _lp(d, self.norm).clamp_min(1e-8)
        a1, a2 = a[:n, None], a[n:, None]
        alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max)
        new = ((src + self.eta * d1) * (1 - alpha) + (x0 + self.eta * d2) * alpha).clamp(0, 1)
        return new, widen

    def random_start(self, seed: int, index: Tensor, restart: int) -> Tensor:
        """Draw a start within half the best norm so far (or the default radius) of ``x0``.

        A sample with no adversarial yet may sit in a flat region (every gradient
        zero, as behind dead ReLUs), which a start too near ``x0`` does not leave:
        its ``restart``-th start looks ``2 ** (restart - 1)`` times as far.
        """
        noise = _hash_uniform(seed, index, restart, self.x0.shape[1])
        if self.norm == "Linf":
            t = 2 * noise[..., 0] - 1
        else:  # Box-Muller: Gaussian directions, as torchattacks draws for L2 and L1
            t = torch.sqrt(-2 * torch.log(noise[..., 0])) * torch.cos(2 * math.pi * noise[..., 1])
        radius = self.best.clamp(max=START_RADIUS[self.norm])
        radius = torch.where(self.best.isfinite(), radius, radius * 2.0 ** (restart - 1))
        t = t / _lp(t, self.norm).clamp_min(1e-12)[:, None]
        return (self.x0 + 0.5 * radius[:, None] * t).clamp(0, 1)

    def _found_classes(self) -> Tensor:
        """The class of each sample's best adversarial so far (its prediction where none)."""
        found = self.pred.clone()
        has = torch.isfinite(self.best)
        if bool(has.any()):
            with torch.no_grad():
                found[has] = self._logits(self.best_adv[has]).argmax(dim=1)
        return found

    def _runner_up(self, rows: Tensor, rank: Tensor, found: Tensor) -> Tensor:
        """Per sample of ``rows``, the ``rank``-th ``runner_up`` class from x0.

        The predicted class and ``found``, the class of the best adversarial, are
        skipped; a class never linearised gets the largest gradient norm seen.
        """
        z0, pred = self.z0[rows], self.pred[rows, None]
        guess = guessed_distance(z0 - z0.gather(1, pred), self.dual_seen[rows], self.known[rows])
        skip = torch.zeros_like(guess, dtype=torch.bool).scatter(1, pred, True)
        return runner_up(z0, guess, skip.scatter(1, found[:, None], True), rank)

    def walk(self, steps: int) -> None:
        """Slide every run's adversarial along the boundary towards x0 (``boundary_walk``).

        The runs' adversarials walk together, one batch of up to ``runs x B`` rows:
        each run may have ended on another boundary, and the walk decides which is
        nearer; one batch keeps the number of sequential steps at ``steps``.
        """
        if not self.runs or steps == 0:
            return
        n = self.x0.shape[0]
        advs = torch.cat([adv for adv, _ in self.runs])
        dists = torch.cat([dist for _, dist in self.runs])
        rows = torch.isfinite(dists).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        sample = rows % n
        adv, dist = boundary_walk(
            self._logits,
            self.x0[sample],
            advs[rows],
            self.pred[sample],
            self.norm,
            steps,
            group=sample,
            cutoff=_WALK_CUTOFF,
        )
        dists[rows], advs[rows] = dist, adv
        nearest, run = dists.view(-1, n).min(dim=0)
        better = nearest < self.best
        chosen = advs.view(-1, n, advs.shape[1])[run, torch.arange(n, device=advs.device)]
        self.best_adv[better] = chosen[better]
        self.best[better] = nearest[better]
        self.runs.clear()

    def refine(self, steps: int, rows: Tensor | None = None) -> None:
        """Shrink each adversarial (of ``rows``) along its ray from x0 by bisection."""
        keep = torch.isfinite(self.best) if rows is None else torch.isfinite(self.best) & rows
        idx = keep.nonzero().squeeze(1)
        if idx.numel() == 0 or steps == 0:
            return
        x0, adv, c = self.x0[idx], self.best_adv[idx], self.pred[idx]
        delta = adv - x0
        lo, hi = torch.zeros_like(self.best[idx]), torch.ones_like(self.best[idx])
        for _ in range(steps):
            mid = (lo + hi) / 2
            # The clamp only undoes rounding: the segment lies in the convex box [0, 1].
            probe = (x0 + mid[:, None] * delta).clamp(0, 1)
            with torch.no_grad():
                flipped = decision_changes(self._logits(probe), c)
            # Keep exactly the point that was checked, not a recomputation of it.
            adv = torch.where(flipped[:, None], probe, adv)
            hi, lo = torch.where(flipped, mid, hi), torch.where(flipped, lo, mid)
        self.best_adv[idx] = adv
        self.best[idx] = _lp(adv - x0, self.norm)


def _gradients(
    logits: Tensor, xr: Tensor, c: Tensor, cls: Tensor, rows: Tensor, first: Tensor
) -> Tensor:
    """``(n, kmax, d)`` gradients of ``f_j - f_c`` from copies of the samples, one pass.

    ``rows`` names each copy's sample, ``first`` each sample's first copy: the
    ``r``-th copy of a sample takes the gradient of its ``r``-th class in ``cls``.
    Entries beyond a sample's copies stay zero.
    """
    rank = torch.arange(len(rows), device=xr.device) - first[rows]
    (grads,) = torch.autograd.grad(logits, xr, _difference(logits, cls[rows, rank], c[rows]))
    dg = xr.new_zeros(len(first), cls.shape[1], xr.shape[1])
    dg[rows, rank] = grads
    return dg


def _shared_gradients(logits: Tensor, xr: Tensor, c: Tensor, cls: Tensor) -> Tensor:
    """``(n, k, d)`` gradients of ``f_j - f_c`` for the ``k`` classes ``cls``, one pass each.

    One row per sample: the graph of the forward pass is kept for ``k`` backward passes.
    """
    grads = []
    for j in range(cls.shape[1]):
        last = j == cls.shape[1] - 1
        seed = _difference(logits, cls[:, j], c)
        grads.append(torch.autograd.grad(logits, xr, seed, retain_graph=not last)[0])
    return torch.stack(grads, dim=1)


def _difference(logits: Tensor, j: Tensor, c: Tensor) -> Tensor:
    """The backward seed of ``f_j - f_c`` per row of ``logits`` (+1 at ``j``, -1 at ``c``)."""
    seed = torch.zeros_like(logits)
    seed.scatter_(1, j[:, None], 1.0)
    return seed.scatter_add_(1, c[:, None], -torch.ones_like(seed[:, :1]))


def runner_up(
    logits: Tensor, guess: Tensor, skip: Tensor, rank: Tensor, pool: int = _POOL
) -> Tensor:
    """The ``rank``-th runner-up class of each sample, for a targeted run.

    The ``pool`` classes with the highest logits come first, the others after
    them, each group ordered by guessed distance; classes in ``skip`` come last.
    At the clean point the gradients misjudge far boundaries of weakly consistent
    models, so the nearest class by guessed distance alone is often not the one a
    strong attack crosses into; among the highest logits it more often is.

    Args:
        logits: ``(n, K)`` logits at the clean point.
        guess: ``(n, K)`` guessed distances (``guessed_distance``).
        skip: ``(n, K)`` classes not to choose (the prediction, the class already found).
        rank: ``(n,)`` which runner-up per sample, from 0.
        pool: How many of the highest logits come first.

    Returns:
        ``(n,)`` class indices.

    Examples:
        >>> import torch
        >>> from brittle.attacks.fab import runner_up
        >>> logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]])
        >>> guess = torch.tensor([[0.0, 0.3, 0.2, 0.1]])  # class 3 looks nearest
        >>> skip = torch.tensor([[True, False, False, False]])  # the prediction
        >>> runner_up(logits, guess, skip, torch.tensor([0]), pool=2)  # but its logit is low
        tensor([2])
        >>> runner_up(logits, guess, skip, torch.tensor([2]), pool=2)
        tensor([3])
    """
    guess, logits = guess.masked_fill(skip, math.inf), logits.masked_fill(skip, -math.inf)
    top = logits.topk(min(pool, logits.shape[1]), dim=1).indices
    pooled = torch.zeros_like(skip).scatter(1, top, True) & ~skip
    order = guess.argsort(dim=1)
    order = order.gather(1, (~pooled.gather(1, order)).argsort(dim=1, stable=True))
    return order.gather(1, rank[:, None]).squeeze(1)


def _rugged(runs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """``(B,)`` mask: a targeted run's best norm below ``_RUGGED`` times the untargeted run's.

    ``runs`` is ``_Fab.runs`` right after the first ``_Fab.run`` from x0, before
    ``walk`` clears it: the untargeted run's ``(adversarial, best norm)`` first, then
    one entry per targeted run (none for 2 classes or ``targeted=0``: no sample is
    marked). The nearest targeted run counts. A sample whose untargeted run found no
    adversarial is not marked, even where a targeted run found one.
    """
    first = runs[0][1]
    nearest = torch.stack([dist for _, dist in runs[1:]]).amin(0) if len(runs) > 1 else first
    return torch.isfinite(first) & (nearest < _RUGGED * first)


def _improved(before: Tensor, after: Tensor, rtol: float = _RESTART_RTOL) -> Tensor:
    """Where ``after`` is below ``before`` by more than ``rtol`` (or newly finite)."""
    return after < (1 - rtol) * before


def guessed_distance(gap: Tensor, dual_seen: Tensor, known: Tensor) -> Tensor:
    """Distance to each class's boundary as FAB guesses it: ``|gap|`` over a gradient norm.

    A class whose gradient was linearised uses the dual norm last seen for it; a
    class never linearised uses the largest one seen for that sample (1 if none), so
    that it ranks by its logit gap among the others instead of first (a guess of
    ``gap / inf = 0``) or last. A class seen with a zero gradient is unreachable: ``inf``.

    Args:
        gap: ``(n, K)`` logit of each class minus the predicted class's.
        dual_seen: ``(n, K)`` dual norm of ``grad(f_j - f_c)`` last seen per class.
        known: ``(n, K)`` whether ``dual_seen`` holds a measurement.

    Returns:
        ``(n, K)`` guessed distances (the predicted class is not masked here).

    Examples:
        >>> import torch
        >>> from brittle.attacks.fab import guessed_distance
        >>> gap = torch.tensor([[0.0, -1.0, -2.0, -3.0]])
        >>> dual = torch.tensor([[0.0, 4.0, 0.0, 0.0]])
        >>> known = torch.tensor([[False, True, False, True]])
        >>> guessed_distance(gap, dual, known)  # class 2 borrows the norm 4 of class 1
        tensor([[0.0000, 0.2500, 0.5000,    inf]])
    """
    fallback = dual_seen.masked_fill(~known, 0.0).amax(dim=1, keepdim=True)
    fallback = torch.where(fallback > 0, fallback, torch.ones_like(fallback))
    dual = torch.where(known, dual_seen, fallback)
    return torch.where(dual > 0, gap.abs() / dual.clamp_min(1e-30), math.inf)


def _break_ties(d: Tensor, w: Tensor, norm: Norm, tiny: float) -> Tensor:
    """Lengthen steps shorter than ``tiny`` by ``tiny`` along ``w``.

    ``w`` is the gradient of ``f_j - f_c``: moving along it crosses towards class ``j``.
    """
    short = _lp(d, norm) < tiny
    if not bool(short.any()):
        return d
    return torch.where(short[:, None], d + tiny * steepest(w, norm), d)


def _lp(delta: Tensor, norm: Norm) -> Tensor:
    return torch.linalg.vector_norm(delta, ord=norm_order(norm), dim=-1)


def _dual(g: Tensor, norm: Norm) -> Tensor:
    """Dual norm over the last axis: the p-distance to a hyperplane is |value| / ||w||_q."""
    return torch.linalg.vector_norm(g, ord=dual_order(norm), dim=-1)


def _mix(h: Tensor) -> Tensor:
    """Hash 32-bit integers (xorshift-multiply); int64 keeps the products exact."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & _MASK32
    h = h ^ (h >> 15)
    h = (h * 0x1B873593) & _MASK32
    return h ^ (h >> 16)


def _hash_uniform(seed: int, index: Tensor, restart: int, dim: int) -> Tensor:
    """``(B, dim, 2)`` uniforms in (0, 1), a pure function of ``(seed, index, restart)``.

    A counter-based generator instead of ``torch.Generator``: one vectorised call
    for the whole batch, the same numbers on every device and in every batch.
    """
    key = _mix(torch.tensor(seed & _MASK32, device=index.device, dtype=torch.long))
    # Each further 32 bits of a large seed are mixed in (seeds below 2**32 draw as they
    # always have), so that seed and seed + 2**32 do not draw the same restarts.
    high = seed >> 32
    while high:
        key = _mix(key ^ (high & _MASK32))
        high >>= 32
    key = _mix((key + restart * 0x9E3779B9) & _MASK32)
    key = _mix((key[None] ^ (index.long() & _MASK32)) & _MASK32)
    counter = torch.arange(2 * dim, device=index.device, dtype=torch.long)
    h = _mix((key[:, None] * 0x2545F491 + counter[None, :]) & _MASK32)
    # Two rounds decorrelate neighbouring counters before the 24-bit mantissa is kept.
    h = _mix(h ^ key[:, None])
    return ((h >> 8).float() + 0.5).div(2.0**24).view(-1, dim, 2)
