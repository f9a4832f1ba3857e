"""Models the benchmark scripts share: a 100-class digits CNN, random ResNet-18s, GPU precision.

Imported by ``bench_fab.py`` and ``bench_margins.py`` as ``models`` (this file
sits beside them, and a script's own folder is the first entry of
``sys.path``).
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import Tensor, nn

from brittle.digits import digits_model, load_digits_split


def hundred_class_digits(seed: int = 0) -> tuple[nn.Module, Tensor]:
    """The robust digits CNN with a 100-class head, trained briefly; and its holdout.

    The 100 classes are digit x 10 + a k-means sub-cluster (10 per digit) of the
    digit's images, a task the CNN can partly learn. The body starts from the
    PGD-trained digits CNN and the whole network is trained for 15 epochs with
    Adam (a few seconds on a CPU).

    Args:
        seed: Seeds k-means, the new head and the training order.

    Returns:
        The model in eval mode, and the holdout images ``(N, 1, 8, 8)`` in ``[0, 1]``.
    """
    from sklearn.cluster import KMeans

    split = load_digits_split()
    x_all = torch.cat((split.x_train, split.x_holdout))
    y_all = torch.cat((split.y_train, split.y_holdout))
    fine = torch.empty_like(y_all)
    for digit in range(10):
        mask = y_all == digit
        km = KMeans(n_clusters=10, n_init=3, random_state=seed).fit(x_all[mask].flatten(1).numpy())
        fine[mask] = digit * 10 + torch.from_numpy(km.labels_).long()
    y_train = fine[: len(split.y_train)]
    model = copy.deepcopy(digits_model("robust"))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model[-1] = nn.Linear(64, 100)
        optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(15):
            for idx in torch.randperm(len(y_train)).split(64):
                optimiser.zero_grad()
                nn.functional.cross_entropy(model(split.x_train[idx]), y_train[idx]).backward()
                optimiser.step()
    return model.eval(), split.x_holdout


def resnet18(num_classes: int = 10, size: int = 32, n: int = 72) -> tuple[nn.Module, Tensor]:
    """A torchvision ResNet-18 with random weights (seed 0), and uniform random inputs.

    Timing and tightness at ImageNet's number of classes without ImageNet: the
    weights are torchvision's initialisation, the inputs ``torch.rand``.

    Args:
        num_classes: Width of the head.
        size: Height and width of the inputs (32 or 64 keep it cheap on a CPU).
        n: Number of inputs.

    Returns:
        The model in eval mode, and ``(n, 3, size, size)`` inputs in ``[0, 1]``.
    """
    import torchvision

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = torchvision.models.resnet18(num_classes=num_classes).eval()
        x = torch.rand(n, 3, size, size)
    return model, x


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` (the GPU where there is one) and ``--tf32`` (see ``gpu_precision``)."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="on a GPU, keep PyTorch's TF32 convolutions (default: float32; docs/margins.md)",
    )


def gpu_precision(tf32: bool) -> str:
    """Allow or forbid TF32 in cuDNN convolutions; name the choice.

    PyTorch runs cuDNN convolutions in TF32 (10-bit mantissas) by default on
    Ampere and later GPUs. On an H200 that censored one image of 32 of the random
    ResNet-18 (its top two logits 5e-6 apart) and loosened brittle's margins on the
    1,000-class one (``benchmarks/README.md``, "On a GPU"): margins within TF32's
    rounding are not resolved. The attack benchmarks measure the float32 model
    unless ``--tf32`` keeps PyTorch's default. Matrix products stay in float32 either
    way, PyTorch's default for them.
    """
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    return "TF32 allowed" if tf32 else "float32 (TF32 off)"
