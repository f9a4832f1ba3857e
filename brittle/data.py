"""Reading batches from the many shapes a holdout comes in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["batches", "split_batch", "check_labels"]

_X_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values", "data")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


def split_batch(batch: Any) -> tuple[Tensor, Tensor | None]:
    """``(x, y)`` from a batch that is ``x``, ``(x, y, ...)`` or a dict."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        if x is None:
            raise ValueError(
                f"a dict batch needs one of the keys {_X_KEYS} for the inputs. Got {sorted(batch)}."
            )
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
        return _tensor(x, "inputs"), None if y is None else _tensor(y, "labels")
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        first = batch[0]
        if len(batch) > 1 and all(
            isinstance(t, Tensor) and t.shape == first.shape and t.dtype == first.dtype
            for t in batch[1:]
        ):
            # A loader with collate_fn=list yields its samples unstacked, all of one
            # shape and dtype, and x would be one sample. (x, y) with integer labels of
            # the inputs' shape (one-hot, a column) differs in dtype: read as (x, y).
            raise ValueError(
                f"a batch of {len(batch)} tensors of one shape {tuple(first.shape)} is a "
                "list of samples, not (x, y): a DataLoader with collate_fn=list yields "
                "those. Use the default collate_fn, which stacks them into one tensor."
            )
        y = batch[1] if len(batch) > 1 else None
        return batch[0], None if y is None else _tensor(y, "labels")
    raise ValueError(
        "each batch must be a tensor x, a tuple (x, y, ...) or a dict with an 'x' key. "
        f"Got {type(batch).__name__}."
    )


def _tensor(value: Any, what: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise ValueError(f"batch {what} must be tensors. Got {type(value).__name__}.")
    return value


def batches(
    data: Tensor | Iterable[Any], batch_size: int = 128, limit: int | None = None
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches from a tensor (sliced) or a loader (as it batches).

    Stops after ``limit`` samples when given, cutting the last batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive. Got {batch_size}.")
    if isinstance(data, Tensor):
        source: Iterable[Any] = torch.split(data[:limit] if limit is not None else data, batch_size)
    else:
        source = data
    seen = 0
    if limit is not None and limit <= 0:
        return
    for batch in source:
        x, y = split_batch(batch)
        if limit is not None:
            x, y = x[: limit - seen], None if y is None else y[: limit - seen]
        seen += x.shape[0]
        if x.shape[0]:
            yield x, y
        if limit is not None and seen >= limit:
            return  # before the loader reads (and maybe fails on) a batch nobody uses


def check_labels(y: Tensor, n: int, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``y`` holds ``n`` class indices in ``[0, num_classes)``.

    Called on every batch before it is attacked, so that one-hot or misaligned
    labels fail at once instead of after the attack has been paid for.

    Examples:
        >>> import torch
        >>> from brittle.data import check_labels
        >>> check_labels(torch.eye(3), 3, 3)
        Traceback (most recent call last):
        ...
        ValueError: labels must be class indices of shape (batch,) = (3,). Got shape (3, 3) ...
    """
    if y.dim() != 1 or y.shape[0] != n:
        hint = ""
        if y.dim() == 2 and y.shape[0] == n and y.shape[1] == 1:
            # A column of indices is no one-hot: its argmax would make every label 0.
            hint = " (a column? pass y.squeeze(1))"
        elif y.dim() == 2 and y.shape[0] == n:
            hint = " (one-hot? pass y.argmax(dim=1))"
        raise ValueError(
            f"labels must be class indices of shape (batch,) = ({n},). "
            f"Got shape {tuple(y.shape)}{hint}."
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class indices. Got {y.dtype}.")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}) for a {num_classes}-class model. "
            f"Got values in [{int(y.min())}, {int(y.max())}]."
        )
