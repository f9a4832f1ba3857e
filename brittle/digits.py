"""Scikit-learn's digits as a real, download-free benchmark: data and small CNNs.

The 1,797 8x8 digit images ship inside scikit-learn. A standard CNN, a
PGD-trained one (torchattacks' PGD) and a certifiably trained one (interval
bound propagation) train in seconds on a CPU. Their weights ship with the
package (``digits_model``), so the tests, the examples and
``python -m brittle.check --demo`` give the same figures on every machine.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from brittle._modes import seeded

__all__ = [
    "DigitsSplit",
    "load_digits_split",
    "digits_cnn",
    "interval_bounds",
    "train_digits_cnn",
    "digits_model",
    "shipped_model_path",
    "MODEL_SHA256",
]

Kind = Literal["standard", "robust", "certified"]
KINDS: tuple[str, ...] = ("standard", "robust", "certified")
# PGD budget of the robust model: digits have 17 grey levels (steps of 1/16), so
# 8/255 is below one level; 0.1 is about one and a half.
ROBUST_EPS = 0.1
# IBP budget of the certified model (Linf): three times the robust model's, about
# five grey levels. Trained for such large margins, the model ranks its input
# margins poorly by its logit margin (Kendall tau about 0.25 on the holdout, against
# about 0.7 for the other two): a weakly margin-consistent model, as the paper's
# weakest. IBP at 0.1 or 0.2 gave tau about 0.6 instead.
CERTIFIED_EPS = 0.3
# Epochs per kind; IBP costs about three forward passes per step.
EPOCHS = {"standard": 30, "robust": 30, "certified": 20}


class DigitsSplit(NamedTuple):
    """Train and holdout tensors; images ``(N, 1, 8, 8)`` in ``[0, 1]``."""

    x_train: Tensor
    y_train: Tensor
    x_holdout: Tensor
    y_holdout: Tensor


def load_digits_split(holdout: float = 0.4, seed: int = 0) -> DigitsSplit:
    """Scikit-learn's digits, scaled to ``[0, 1]`` and split with a seeded permutation.

    Examples:
        >>> from brittle.digits import load_digits_split
        >>> split = load_digits_split()
        >>> split.x_train.shape, split.x_holdout.shape
        (torch.Size([1078, 1, 8, 8]), torch.Size([719, 1, 8, 8]))
    """
    from sklearn.datasets import load_digits

    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout must be in (0, 1). Got {holdout}.")
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.from_numpy(np.random.default_rng(seed).permutation(len(y)))
    cut = int(round(len(y) * (1.0 - holdout)))
    train, rest = order[:cut], order[cut:]
    return DigitsSplit(x[train], y[train], x[rest], y[rest])


def digits_cnn(num_classes: int = 10) -> nn.Sequential:
    """A small CNN for 8x8 digits; its last layer is an ``nn.Linear`` on 64 features."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def interval_bounds(model: nn.Sequential, lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Element-wise bounds on ``model``'s outputs for every input in ``[lower, upper]``.

    Interval bound propagation (Gowal et al., 2018): an affine layer maps the
    box's centre through the layer and its radius through the absolute
    weights; ReLU, max-pooling and flattening are monotone, so they map the
    two corners. Sound, not tight.

    Args:
        model: An ``nn.Sequential`` of ``Linear``, ``Conv2d``, ``ReLU``,
            ``MaxPool2d`` and ``Flatten`` layers.
        lower: Lower corner of the input box.
        upper: Upper corner, ``>= lower``.

    Examples:
        >>> import torch
        >>> from brittle.digits import interval_bounds
        >>> layer = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = layer.weight.copy_(torch.tensor([[1.0, -2.0]]))
        ...     _ = layer.bias.zero_()
        >>> interval_bounds(torch.nn.Sequential(layer), torch.zeros(1, 2), torch.ones(1, 2))
        (tensor([[-2.]], grad_fn=<SubBackward0>), tensor([[1.]], grad_fn=<AddBackward0>))
    """
    for layer in model:
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            centre, radius = (upper + lower) / 2, (upper - lower) / 2
            centre = layer(centre)
            if isinstance(layer, nn.Linear):
                radius = nn.functional.linear(radius, layer.weight.abs())
            else:
                radius = nn.functional.conv2d(
                    radius,
                    layer.weight.abs(),
                    None,
                    layer.stride,
                    layer.padding,
                    layer.dilation,
                    layer.groups,
                )
            lower, upper = centre - radius, centre + radius
        elif isinstance(layer, (nn.ReLU, nn.MaxPool2d, nn.Flatten)):
            lower, upper = layer(lower), layer(upper)
        else:
            raise TypeError(
                f"interval_bounds handles Linear, Conv2d, ReLU, MaxPool2d and Flatten. "
                f"Got {type(layer).__name__}."
            )
    return lower, upper


def _worst_case_logits(model: nn.Sequential, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Logits an attacker in the Linf ``eps``-ball could at worst reach, per class.

    Bounds the penultimate layer with IBP and then bounds ``z_j - z_y`` through
    the last linear layer directly (Gowal et al.'s elision), which is tighter
    than bounding each logit on its own. Entry ``y`` is 0.
    """
    lower, upper = interval_bounds(
        model[:-1],
        (x - eps).clamp(0.0, 1.0),
        (x + eps).clamp(0.0, 1.0),
    )
    head: nn.Linear = model[-1]  # type: ignore[assignment]
    centre, radius = (upper + lower) / 2, (upper - lower) / 2
    diff_w = head.weight[None, :, :] - head.weight[y][:, None, :]  # (B, K, d): w_j - w_y
    diff_b = head.bias[None, :] - head.bias[y][:, None]
    upper_gap = (diff_w @ centre[:, :, None]).squeeze(2) + diff_b
    upper_gap = upper_gap + (diff_w.abs() @ radius[:, :, None]).squeeze(2)
    return upper_gap


def train_digits_cnn(
    kind: Kind = "standard",
    *,
    epochs: int | None = None,
    eps: float | None = None,
    seed: int = 0,
    split: DigitsSplit | None = None,
) -> nn.Sequential:
    """Train ``digits_cnn`` normally, adversarially or certifiably (Linf, ``eps``).

    - ``"standard"``: cross-entropy on clean images.
    - ``"robust"``: PGD adversarial training (torchattacks' PGD, 7 steps) at
      ``eps`` (default ``ROBUST_EPS``).
    - ``"certified"``: interval bound propagation (Gowal et al., 2018): a mix of
      clean cross-entropy and cross-entropy on the worst-case logits of the
      ``eps``-box (default ``CERTIFIED_EPS``), with ``eps`` ramped up from 0 and
      the clean weight from 1 down to 1/2 over the first half of training. Such
      large-margin training gives a model whose logit margin ranks input margins
      poorly (weakly margin-consistent, as the paper's weakest models).

    Seeded and CPU-friendly (seconds for the standard model, about half a minute
    for the others on 2 idle cores). Returns the model in eval mode.

    Args:
        kind: ``"standard"``, ``"robust"`` or ``"certified"``.
        epochs: Passes over the training split (default ``EPOCHS[kind]``).
        eps: Linf budget of PGD or IBP (default ``ROBUST_EPS`` or ``CERTIFIED_EPS``).
        seed: Seeds the initialisation, the shuffling and the attacks.
        split: Data to train on (default ``load_digits_split()``).

    Examples:
        >>> from brittle.digits import train_digits_cnn
        >>> model = train_digits_cnn("certified", epochs=1)
        >>> model.training
        False
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}. Got {kind!r}.")
    if eps is None:
        eps = CERTIFIED_EPS if kind == "certified" else ROBUST_EPS
    if epochs is None:
        epochs = EPOCHS[kind]
    if not eps > 0:
        raise ValueError(f"eps must be strictly positive. Got {eps}.")
    split = split or load_digits_split()
    threads = torch.get_num_threads()
    # One thread: a parallel reduction sums in an order that depends on the thread
    # count, and the weights would differ from machine to machine.
    torch.set_num_threads(1)
    try:
        return _train(kind, epochs=epochs, eps=eps, seed=seed, split=split)
    finally:
        torch.set_num_threads(threads)


def _train(kind: str, *, epochs: int, eps: float, seed: int, split: DigitsSplit) -> nn.Sequential:
    import torchattacks

    with seeded(seed):
        model = digits_cnn()
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        pgd = torchattacks.PGD(model, eps=eps, alpha=eps / 4, steps=7, random_start=True)
        generator = torch.Generator().manual_seed(seed)
        batches = torch.randperm(len(split.y_train), generator=generator).split(64)
        ramp = max(1, (epochs * len(batches)) // 2)
        step = 0
        for _ in range(epochs):
            for idx in torch.randperm(len(split.y_train), generator=generator).split(64):
                x, y = split.x_train[idx], split.y_train[idx]
                if kind == "robust":
                    x = pgd(x, y)
                model.train()
                optimiser.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                if kind == "certified":
                    share = min(1.0, step / ramp)
                    worst = _worst_case_logits(model, x, y, eps * share)
                    loss = (1 - share / 2) * loss + share / 2 * nn.functional.cross_entropy(
                        worst, y
                    )
                loss.backward()
                optimiser.step()
                step += 1
        # A freshly trained model looks like a loaded one: no .grad left behind.
        optimiser.zero_grad(set_to_none=True)
    return model.eval()


# The shipped weights: train_digits_cnn(kind) with the defaults (seed 0, one thread),
# saved as float32 state_dicts. Their digests make a damaged install fail loudly
# instead of giving other figures.
MODEL_SHA256 = {
    "standard": "d133510b6257b9b5fe03bca03fdd8bc2331800fac9f39d8a4752e84fa648d49a",
    "robust": "8451c944dad64eaec70ec386fd54f33d5585e8df3b82f7d17288f1d5ba61dff3",
    "certified": "d76e5e62ea8de1a2e886a64c67b8395ece80b57cfe94b81c72a4913102760877",
}


def shipped_model_path(kind: Kind) -> Path:
    """Where the weights of ``digits_model(kind)`` ship inside the package."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}. Got {kind!r}.")
    return Path(__file__).parent / "models" / f"digits-{kind}.pt"


def digits_model(kind: Kind = "standard", cache_dir: str | Path | None = None) -> nn.Sequential:
    """The trained digits CNN that ships with brittle, in eval mode.

    The weights are a plain ``state_dict`` in the package (``brittle/models``),
    loaded with ``weights_only=True`` after a sha256 check, so every machine gets
    the same model and nothing trains. ``train_digits_cnn(kind)`` made them.

    Args:
        kind: ``"standard"``, ``"robust"`` or ``"certified"``.
        cache_dir: Not used: the weights ship with the package. Accepted so that
            calls written when the models were trained into a cache still work.

    Raises:
        RuntimeError: when the shipped file is missing or its digest differs.

    Examples:
        >>> from brittle.digits import digits_model
        >>> digits_model("robust")[-1]
        Linear(in_features=64, out_features=10, bias=True)
    """
    del cache_dir  # kept for callers of the cached version
    path = shipped_model_path(kind)
    if not path.is_file():
        raise RuntimeError(f"the digits model {kind!r} is missing from the install ({path}).")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != MODEL_SHA256[kind]:
        raise RuntimeError(
            f"the digits model file {path} is damaged: sha256 {digest[:12]}..., expected "
            f"{MODEL_SHA256[kind][:12]}.... Reinstall brittle."
        )
    model = digits_cnn()
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()
