"""wrap() on real architectures: torchvision, timm, RobustBench (loaded through its own code)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.compat import import_robustbench
from tests.test_margins import brute_feature_margin


def _check(model: nn.Module, x: torch.Tensor, head: str, norm: str = "L2") -> brittle.Monitor:
    model.eval()
    monitor = brittle.wrap(model, score="feature", norm=norm)  # type: ignore[arg-type]
    with torch.no_grad():
        out = monitor(x)
        reference = model(x)
    assert monitor.head_name == head
    torch.testing.assert_close(out.logits, reference)
    weight = monitor.head.weight.detach()  # type: ignore[union-attr]
    np.testing.assert_allclose(
        out.margin.numpy(), brute_feature_margin(reference, weight, norm), rtol=1e-4
    )
    return monitor


def test_torchvision_resnet() -> None:
    from torchvision.models import resnet18

    _check(resnet18(num_classes=10), torch.rand(4, 3, 32, 32), "fc", norm="Linf")


@pytest.mark.parametrize(
    ("name", "kwargs", "head"),
    [
        ("resnet10t", {}, "fc"),
        ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, "head"),
    ],
)
def test_timm_models(name: str, kwargs: dict, head: str) -> None:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    _check(model, torch.rand(3, 3, 32, 32), head)


def test_robustbench_model_loaded_from_a_local_checkpoint(tmp_path) -> None:
    rb = import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    # RobustBench's load_model reads {model_dir}/{dataset}/{threat_model}/{name}.pt
    # and downloads only when the file is missing.
    entry = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]["Wong2020Fast"]
    torch.manual_seed(0)
    reference = entry["model"]()
    target = tmp_path / "cifar10" / "Linf"
    target.mkdir(parents=True)
    torch.save({"state_dict": reference.state_dict()}, target / "Wong2020Fast.pt")
    model = rb.utils.load_model(
        "Wong2020Fast", model_dir=str(tmp_path), dataset="cifar10", threat_model="Linf"
    )
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)
    # Its forward normalises the input first: the head is still found.
    _check(model, torch.rand(2, 3, 32, 32), "linear")
