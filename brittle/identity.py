"""Recognising the model a monitor was fitted for: its structure and its outputs on a probe.

A monitor's threshold and pair-norm table belong to one trained model. Comparing
head weights alone accepts another backbone under the same head and refuses the
same model in half precision; comparing the model's outputs on a fixed probe
batch does neither. The structure (every parameter's and buffer's name and
shape) is compared first, since it needs no forward pass and names what differs.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from brittle._modes import eval_mode
from brittle.attacks.verify import model_device, model_dtype
from brittle.scores.head import model_output

__all__ = ["model_identity", "check_identity", "wrapper_hint", "PROBE_SIZE"]

PROBE_SIZE = 4
_PROBE_SEED = 20240229
# Largest relative difference of the probe logits that still counts as the same model:
# float32/float64 copies on another device differ by rounding, half-precision copies
# by their 8- or 11-bit mantissas.
_TOLERANCE = {str(torch.float16): 5e-2, str(torch.bfloat16): 5e-2}
_DEFAULT_TOLERANCE = 1e-3
# Name prefixes of wrappers around the same model (nn.DataParallel, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# The backends whose float32 arithmetic a process may lower (TF32 on CUDA, bf16 in oneDNN).
_FLOAT32_BACKENDS = (
    ("cuda", "matmul"),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)
# The precision settings are process-wide: two probes at once must not restore each
# other's values.
_PRECISION = threading.Lock()


def wrapper_hint(model: nn.Module) -> str:
    """A sentence for refusals, when ``model`` is another model behind a wrapper; else ``""``.

    ``nn.DataParallel`` and ``torch.compile`` prefix every parameter's name
    (``module.``, ``_orig_mod.``): a monitor fitted for the model inside is refused
    on the wrapper, and the fix is to load onto the model inside.

    Examples:
        >>> import torch
        >>> wrapper_hint(torch.nn.DataParallel(torch.nn.Linear(2, 2)))[:31]
        " Its names start with 'module.'"
    """
    names = [name for name, _ in model.named_parameters()]
    prefix = next((p for p in _WRAPPER_PREFIXES if all(n.startswith(p) for n in names)), None)
    if not names or prefix is None:
        return ""
    return (
        f" Its names start with {prefix!r}: load onto the model inside the wrapper "
        "(model.module, or the model before torch.compile)."
    )


def _structure(model: nn.Module) -> list[list[Any]]:
    return [
        [name, list(t.shape)] for name, t in model.state_dict().items() if isinstance(t, Tensor)
    ]


@contextmanager
def _ieee_float32() -> Iterator[None]:
    """Float32 arithmetic as IEEE float32 inside the block, whatever the process set.

    cuDNN convolutions use TF32 by default on recent GPUs, and
    ``torch.set_float32_matmul_precision("high"/"medium")`` lowers matrix products
    to TF32 or bf16 (on CUDA, and on CPUs with bf16 units): the same float32 model's
    probe logits then differ between the machine that saved a monitor and the one
    that loads it by more than the tolerance (TF32 rounding, emulated on a CPU, moves
    a randomly initialised ResNet-18's by 2.7e-3 of their scale).
    """
    backends: list[Any] = [
        getattr(getattr(torch.backends, name, None), op, None) for name, op in _FLOAT32_BACKENDS
    ]
    with _PRECISION:
        if all(hasattr(backend, "fp32_precision") for backend in backends):  # torch >= 2.9
            saved = [backend.fp32_precision for backend in backends]
            try:
                for backend in backends:
                    backend.fp32_precision = "ieee"
                yield
            finally:
                for backend, value in zip(backends, saved, strict=True):
                    backend.fp32_precision = value
        else:
            cudnn, matmul = torch.backends.cudnn, torch.get_float32_matmul_precision()
            try:
                torch.set_float32_matmul_precision("highest")
                with cudnn.flags(
                    enabled=cudnn.enabled,
                    benchmark=cudnn.benchmark,
                    deterministic=cudnn.deterministic,
                    allow_tf32=False,
                ):
                    yield
            finally:
                torch.set_float32_matmul_precision(matmul)


def _probe(model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    # In the model's dtype and on its device, read from its buffers where it has no
    # parameters (the dtype it takes its inputs in, as check_input asks).
    dtype, device = model_dtype(model) or torch.float32, model_device(model)
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    x = torch.rand(PROBE_SIZE, *input_shape, generator=generator).to(device, dtype)
    with torch.no_grad(), eval_mode(model), _ieee_float32():
        return model_output(model(x)).detach().to("cpu", torch.float64)


def _dtype(model: nn.Module) -> str | None:
    """The dtype the model computes in, as text; ``None`` without a floating tensor.

    Read as the probe reads it (``verify.model_dtype``): a model without parameters
    from its buffers, so that its tolerance is its dtype's and not zero.
    """
    dtype = model_dtype(model)
    return None if dtype is None else str(dtype)


def model_identity(model: nn.Module, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
    """Plain values that identify ``model``: its structure and its logits on a probe batch.

    Args:
        model: The classifier, left as it was (modes restored, no gradients).
        input_shape: Shape of one input; without it only the structure is recorded.

    Examples:
        >>> import torch
        >>> from brittle.identity import check_identity, model_identity
        >>> model = torch.nn.Linear(4, 3)
        >>> saved = model_identity(model, (4,))
        >>> check_identity(model.double(), saved)  # the same model in float64
        >>> check_identity(torch.nn.Linear(4, 3), saved)
        Traceback (most recent call last):
        ...
        ValueError: the monitor was fitted for a model with other weights: ...
    """
    shape = None if input_shape is None else [int(s) for s in input_shape]
    logits = None if shape is None else _probe(model, tuple(shape)).tolist()
    return {
        "structure": _structure(model),
        "input_shape": shape,
        "probe_logits": logits,
        "dtype": _dtype(model),
    }


def check_identity(model: nn.Module, saved: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``model`` is the model ``saved`` describes.

    The same model moved to another device or dtype passes as long as its
    outputs still match within the precision of the coarser dtype, the saved
    model's or this one's.
    """
    structure = _structure(model)
    if structure != saved["structure"]:
        mine = {name: shape for name, shape in structure}
        theirs = {name: shape for name, shape in saved["structure"]}
        names = sorted(set(mine) | set(theirs))
        differ = [name for name in names if mine.get(name) != theirs.get(name)][:3]
        raise ValueError(
            "the monitor was fitted for a model of another structure (parameters and buffers "
            f"differ, e.g. {differ}). Fit a monitor for this model.{wrapper_hint(model)}"
        )
    if saved["probe_logits"] is None:
        warnings.warn(
            "this monitor file records no probe logits (saved by an older brittle before the "
            "monitor saw an input), so only the model's structure was checked, not its "
            "weights. Save the monitor again after monitor(batch).",
            UserWarning,
            stacklevel=3,
        )
        return
    expected = torch.tensor(saved["probe_logits"], dtype=torch.float64)
    got = _probe(model, tuple(saved["input_shape"]))
    # The coarser of the two precisions: probe logits saved from a bfloat16 model carry
    # its rounding when they are compared with the float32 model it was cast from.
    # (Files from before the dtype was recorded are judged by the loading model's.)
    dtype = _dtype(model)
    tol = 0.0
    if dtype is not None:
        dtypes = (dtype, str(saved.get("dtype", dtype)))
        tol = max(_TOLERANCE.get(d, _DEFAULT_TOLERANCE) for d in dtypes)
    scale = float(expected.abs().max()) + 1e-6
    worst = float((got - expected).abs().max()) / scale if got.shape == expected.shape else 1.0
    if not worst <= tol:
        raise ValueError(
            "the monitor was fitted for a model with other weights: on a fixed probe batch "
            f"this model's logits differ from the fitted model's by {worst:.2g} of their "
            f"scale (tolerance {tol:g}). Its threshold does not apply here; fit a monitor for "
            "this model."
        )
