"""Turning ``--model`` and ``--data`` specs into an ``nn.Module`` and tensors.

Every failure a user can cause (a missing file, an unknown model, data of the
wrong shape) becomes a ``UsageError`` naming the
argument, so the command prints one line instead of a traceback.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from brittle.check.errors import UsageError
from brittle.scores.head import model_output

__all__ = [
    "ModelSource",
    "DataSource",
    "load_model",
    "load_data",
    "check_compatible",
    "MODEL_FORMS",
]

MODEL_FORMS = (
    "robustbench:NAME, path/to/file.py:factory, package.module:factory or MONITOR.pt@MODEL_SPEC"
)
_CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_RB_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet": "imagenet"}


@dataclass
class ModelSource:
    """A loaded classifier and where it came from.

    Attributes:
        model: The classifier in eval mode, on the CPU.
        spec: The ``--model`` text it came from.
        monitor_path: A saved monitor to evaluate as saved, for ``MONITOR.pt@SPEC``.
        dataset: The RobustBench dataset of a ``robustbench:`` model (default ``--data``).

    """

    model: nn.Module
    spec: str
    monitor_path: Path | None = None
    dataset: str | None = None


@dataclass
class DataSource:
    """Inputs ``(N, C, H, W)`` float32 in ``[0, 1]`` and labels ``(N,)`` or ``None``."""

    x: Tensor
    y: Tensor | None
    spec: str

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _first_line(err: BaseException) -> str:
    if isinstance(err, SystemExit):
        return (
            f"SystemExit({err.code!r}): it called sys.exit() (as argparse does on arguments it "
            "does not know); keep that under if __name__ == '__main__':"
        )
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    if first.startswith("Error(s) in loading state_dict"):
        # What is wrong is on the lines after: missing and unexpected keys, shapes.
        problems = [_shorter_key_list(line.strip()) for line in text[1:] if line.strip()]
        if problems:
            first = f"{first.rstrip(':')}: {'; '.join(problems[:3])}"
    return f"{type(err).__name__}: {first}".rstrip(": ")


def _shorter_key_list(line: str, keep: int = 3) -> str:
    """``Missing key(s) in state_dict: "a", "b", ...`` with its first ``keep`` keys named."""
    head, colon, keys = line.partition(": ")
    if not head.endswith("key(s) in state_dict") or not colon:
        return line
    names = keys.rstrip(". ").split(", ")
    more = f" and {len(names) - keep} more" if len(names) > keep else ""
    return f"{head}: {', '.join(names[:keep])}{more}"


# ------------------------------------------------------------------- models
def load_model(
    spec: str,
    *,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    model_dir: Path = Path("models"),
) -> ModelSource:
    """Load the classifier that ``--model SPEC`` names.

    Args:
        spec: ``robustbench:NAME``, ``path/to/file.py:factory``,
            ``package.module:factory`` or ``MONITOR.pt@SPEC``.
        dataset: RobustBench dataset for ``robustbench:`` specs.
        threat_model: RobustBench threat model (``"Linf"`` or ``"L2"``).
        model_dir: RobustBench checkpoint root.

    Raises:
        UsageError: for anything wrong with the spec or the files it names.

    Examples:
        >>> from brittle.check.sources import load_model
        >>> source = load_model("brittle.digits:digits_cnn")
        >>> type(source.model).__name__
        'Sequential'

    """
    spec = spec.strip()
    split = _monitor_split(spec)
    if split is not None:
        monitor_text, model_spec = split
        monitor_path = Path(monitor_text)
        if not monitor_path.is_file():
            raise UsageError("--model", f"no saved monitor at {monitor_text!r} (in {spec!r})")
        source = load_model(
            model_spec, dataset=dataset, threat_model=threat_model, model_dir=model_dir
        )
        source.spec, source.monitor_path = spec, monitor_path
        return source
    if spec.startswith("robustbench:"):
        model = _robustbench_model(spec.split(":", 1)[1], dataset, threat_model, model_dir)
        return ModelSource(model.eval(), spec, dataset=dataset)
    if ":" in spec:
        where, _, factory = spec.rpartition(":")
        module = _import_file(where) if _looks_like_file(where) else _import_module(where)
        return ModelSource(_call_factory(module, where, factory).eval(), spec)
    if spec.endswith(".py"):
        raise UsageError("--model", f"name the factory in {spec!r}: --model {spec}:factory")
    if Path(spec).is_file():
        raise UsageError(
            "--model",
            f"{spec!r} is a file but not a model spec. Model weights (a state_dict) are loaded "
            "by your own code: --model file.py:factory, a function that builds the model and "
            "loads them (torch.load(PATH, weights_only=True)). A saved monitor holds no model "
            f"weights, so give its model too: --model {spec}@MODEL_SPEC",
        )
    raise UsageError("--model", f"unknown model spec {spec!r}; expected {MODEL_FORMS}")


def _monitor_split(spec: str) -> tuple[str, str] | None:
    """``(MONITOR, SPEC)`` of ``MONITOR.pt@SPEC``; ``None`` for a spec without a monitor.

    A folder's name may hold an "@" too (Jenkins' ``job@2`` workspaces): the split is
    at the "@" after an existing file; a spec naming an existing ``file.py`` whole is no
    split; else the split is at the first "@" after a name with a suffix (the monitor
    file that is missing), or at the first "@".
    """
    at = [i for i, char in enumerate(spec) if char == "@"]
    if not at:
        return None
    splits = [(spec[:i], spec[i + 1 :]) for i in at]
    found = next((pair for pair in splits if Path(pair[0]).is_file()), None)
    if found is not None:
        return found
    where = spec.rpartition(":")[0]
    if where and _looks_like_file(where) and Path(where).is_file():
        return None
    return next((pair for pair in splits if Path(pair[0]).suffix), splits[0])


def _looks_like_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def _import_file(where: str) -> Any:
    path = Path(where)
    if not path.is_file():
        what = "a directory, not a file" if path.is_dir() else "no such file"
        raise UsageError("--model", f"{what}: {where!r}")
    # A name unique per path, so two model files called models.py do not clash.
    name = f"_brittle_check_model_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError("--model", f"cannot import {where!r} as a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    # The user's code: any error is theirs to fix. SystemExit too: a training script that
    # parses its own arguments at import time exits, and would end the command with its code.
    except (Exception, SystemExit) as err:
        del sys.modules[name]
        raise UsageError("--model", f"importing {where!r} failed: {_first_line(err)}") from None
    return module


def _import_module(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ImportError as err:
        raise UsageError("--model", f"cannot import module {where!r}: {_first_line(err)}") from None
    except (Exception, SystemExit) as err:
        raise UsageError("--model", f"importing {where!r} failed: {_first_line(err)}") from None


def _call_factory(module: Any, where: str, factory: str) -> nn.Module:
    fn = getattr(module, factory, None)
    if fn is None or not callable(fn):
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        close = difflib.get_close_matches(factory, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError("--model", f"{where!r} has no callable {factory!r}{hint}")
    try:
        model = fn()
    except (Exception, SystemExit) as err:
        raise UsageError("--model", f"{where}:{factory}() failed: {_first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(
            "--model",
            f"{where}:{factory}() must return a torch.nn.Module; got {type(model).__name__}",
        )
    return model


@contextmanager
def _weights_only() -> Iterator[None]:
    """Every ``torch.load`` inside the block loads weights only, whatever its caller asked.

    RobustBench (and torchvision's ``load_state_dict_from_url``, which RobustBench's
    models call) load checkpoints without ``weights_only=True``: PyTorch's default
    is weights-only, but ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` (the usual advice for
    old checkpoints) turns it off, and ``load_state_dict_from_url`` asks for the
    full unpickler itself. A checkpoint's pickled objects would then run their code.
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides both; the environment is put back after.
    """
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _robustbench_model(name: str, dataset: str, threat_model: str, model_dir: Path) -> nn.Module:
    from brittle.compat import import_robustbench

    rb = import_robustbench()
    import timm  # RobustBench's own dependency
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    # RobustBench keys its model dicts by enums, not strings.
    ds, tm = BenchmarkDataset(_RB_DATASETS[dataset]), ThreatModel(threat_model)
    known = model_dicts[ds].get(tm, {})
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(
            "--model", f"RobustBench has no {dataset}/{threat_model} model {name!r}{hint}"
        )
    # load_model builds a timm model from the Hugging Face hub when timm knows the name,
    # and downloads every checkpoint file that is missing; this machine may be offline.
    timm_name = f"{name.lower().replace('-', '_')}_{ds.value.lower()}_{tm.value.lower()}"
    if timm.is_model(timm_name):
        raise UsageError(
            "--model",
            f"RobustBench loads {name!r} through timm from the Hugging Face hub, not from "
            "--model-dir, and nothing is downloaded here; build it in a file.py:factory "
            f"instead, for example with timm.create_model({timm_name!r}, "
            "checkpoint_path=LOCAL_WEIGHTS)",
        )
    parts = known[name].get("gdrive_id")
    if not parts:
        # No checkpoint of its own (ImageNet's Standard_R50): RobustBench builds it with
        # pretrained weights it reads from the torch hub cache, downloading them when missing.
        raise UsageError(
            "--model",
            f"RobustBench builds {name!r} with pretrained weights it downloads itself, not "
            "from --model-dir, and nothing is downloaded here; build it in a file.py:factory "
            "instead, loading local weights with torch.load(LOCAL_WEIGHTS, weights_only=True)",
        )
    folder = Path(model_dir) / ds.value / tm.value
    single = folder / f"{name}.pt"
    # An ensemble is stored as one file per member: NAME.pt_m0.pt, NAME.pt_m1.pt, ...
    files = (
        [single]
        if not isinstance(parts, list)
        else [folder / f"{name}.pt_m{i}.pt" for i in range(len(parts))]
    )
    missing = [f for f in files if not f.is_file()]
    if missing:
        what = f"no checkpoint at {str(missing[0])!r}"
        if len(files) > 1:
            what += f" ({len(missing)} of the ensemble's {len(files)} files are missing)"
        raise UsageError(
            "--model-dir",
            f"{what}; download it once with "
            f"robustbench.utils.load_model({name!r}, model_dir=...) on a machine with internet "
            "access, or point --model-dir at the directory holding it",
        )
    try:
        with _weights_only():
            model = rb.utils.load_model(name, model_dir=str(model_dir), dataset=ds, threat_model=tm)
    except pickle.UnpicklingError:
        where = repr(str(single)) if len(files) == 1 else f"{name}.pt_m*.pt in {str(folder)!r}"
        raise UsageError(
            "--model",
            f"RobustBench could not load {where}: it holds more than weights (pickled "
            "objects, whose code would run when loaded), and brittle loads weights only; "
            "save the checkpoint's state_dict alone (tensors) and load that",
        ) from None
    except Exception as err:
        raise UsageError(
            "--model", f"RobustBench could not load {str(single)!r}: {_first_line(err)}"
        ) from None
    return model


# --------------------------------------------------------------------- data
def load_data(
    spec: str, *, data_dir: Path = Path("data"), image_size: int | None = None
) -> DataSource:
    """Load the holdout that ``--data SPEC`` names.

    Args:
        spec: ``cifar10``, ``cifar100``, ``digits``, an ``.npz`` file or an
            ``ImageFolder`` directory.
        data_dir: Where the CIFAR files are.
        image_size: Side length ImageFolder images are resized to.

    Raises:
        UsageError: for a missing file, arrays of the wrong shape or range, or an
            unreadable image directory.

    Examples:
        >>> from brittle.check.sources import load_data
        >>> data = load_data("digits")
        >>> tuple(data.x.shape), tuple(data.y.shape)
        ((719, 1, 8, 8), (719,))

    """
    if spec == "digits":
        from brittle.digits import load_digits_split

        split = load_digits_split()
        return DataSource(split.x_holdout, split.y_holdout, spec)
    if spec == "imagenet":
        raise UsageError(
            "--data",
            "for ImageNet give the validation set as an ImageFolder directory of images already "
            "prepared as RobustBench prepares them (shorter side resized to 256, centre 224 "
            "cropped); --image-size 224 resizes each image to 224x224 whole, without the crop",
        )
    if spec in _CIFAR_FOLDERS:
        return _cifar(spec, Path(data_dir))
    path = Path(spec)
    if path.suffix == ".npz":
        if not path.is_file():
            what = "a directory, not a file" if path.is_dir() else "no such file"
            raise UsageError("--data", f"{what}: {spec!r}")
        return _npz(path, spec)
    if path.is_dir():
        return _image_folder(path, spec, image_size)
    if path.exists():
        raise UsageError("--data", f"{spec!r} is neither an .npz file nor an ImageFolder directory")
    raise UsageError(
        "--data",
        f"no such file or directory: {spec!r} (expected cifar10, cifar100, digits, an .npz "
        "file or an ImageFolder directory)",
    )


def _cifar(name: str, data_dir: Path) -> DataSource:
    folder = data_dir / _CIFAR_FOLDERS[name]
    if not folder.is_dir():
        raise UsageError(
            "--data-dir",
            f"no {name} test set in {str(data_dir)!r} (expected {_CIFAR_FOLDERS[name]}/ inside); "
            f"download it once with torchvision.datasets.{name.upper()}(root, download=True)",
        )
    from torchvision import datasets

    # torchvision's own class, as RobustBench's load_cifar10/100 use it, but with
    # download=False: theirs downloads whenever a file is missing or fails its md5
    # check, and this machine may be offline (or the user may not want 170 MB fetched).
    dataset_class = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    try:
        dataset = dataset_class(str(data_dir), train=False, download=False)
    except RuntimeError:
        raise UsageError(
            "--data-dir",
            f"the {name} files in {str(folder)!r} are incomplete or damaged (a file is missing "
            f"or fails its md5 check); download them again with "
            f"torchvision.datasets.{name.upper()}(root, download=True)",
        ) from None
    except Exception as err:
        raise UsageError(
            "--data-dir", f"could not read {name} from {str(data_dir)!r}: {_first_line(err)}"
        ) from None
    # As transforms.ToTensor reads each (32, 32, 3) uint8 image: channels first, / 255.
    x = torch.from_numpy(np.asarray(dataset.data)).permute(0, 3, 1, 2).float().div(255.0)
    return DataSource(x.contiguous(), torch.as_tensor(dataset.targets, dtype=torch.long), name)


def _npz(path: Path, spec: str) -> DataSource:
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as err:
        raise UsageError("--data", f"cannot read {spec!r} as .npz: {_first_line(err)}") from None
    with arrays:
        if "x" not in arrays.files:
            raise UsageError("--data", f"{spec!r} has no array 'x' (it has {sorted(arrays.files)})")
        x_np = arrays["x"]
        y_np = arrays["y"] if "y" in arrays.files else None
    if x_np.ndim != 4:
        raise UsageError(
            "--data", f"'x' in {spec!r} must have shape (N, C, H, W); got {tuple(x_np.shape)}"
        )
    if x_np.dtype == np.uint8:
        x_np = x_np.astype(np.float32) / 255.0
    if not np.issubdtype(x_np.dtype, np.floating):
        raise UsageError(
            "--data", f"'x' in {spec!r} must be float in [0, 1] or uint8; got {x_np.dtype}"
        )
    x = torch.from_numpy(np.ascontiguousarray(x_np, dtype=np.float32))
    _check_range(x, spec)
    y = None
    if y_np is not None:
        if y_np.shape != (x.shape[0],) or not np.issubdtype(y_np.dtype, np.integer):
            raise UsageError(
                "--data",
                f"'y' in {spec!r} must be integers of shape ({x.shape[0]},); got "
                f"{y_np.dtype} {tuple(y_np.shape)}",
            )
        y = torch.from_numpy(y_np.astype(np.int64))
    return DataSource(x, y, spec)


def _check_range(x: Tensor, spec: str) -> None:
    if x.shape[0] == 0:
        raise UsageError("--data", f"{spec!r} holds no samples")
    if x.numel() == 0:
        raise UsageError("--data", f"the samples in {spec!r} are empty: shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise UsageError("--data", f"{spec!r} contains NaN or Inf values")
    low, high = float(x.min()), float(x.max())
    if low < 0.0 or high > 1.0:
        raise UsageError(
            "--data",
            f"inputs in {spec!r} must lie in [0, 1] (normalisation belongs inside the model); "
            f"got values in [{low:.4g}, {high:.4g}]",
        )


def _rgb_image(file: str) -> Any:
    """An 8-bit image file as an RGB PIL image (torchvision's loader, with a check).

    PIL converts 16-bit and float pixels to RGB by clipping them at 255: a 16-bit
    PNG would load saturated, almost all white, without a word.
    """
    from PIL import Image

    with open(file, "rb") as handle:
        image = Image.open(handle)
        if image.mode.startswith(("I", "F")):
            raise ValueError(
                f"its pixels are {image.mode!r} (more than 8 bits per channel), which would be "
                "clipped to 8 bits; convert the images to 8 bits, or give the data as an .npz "
                "file of floats in [0, 1]"
            )
        return image.convert("RGB")


def _size(image: Tensor) -> str:
    """``"HxW"`` of a ``(C, H, W)`` image."""
    return f"{image.shape[1]}x{image.shape[2]}"


def _image_folder(path: Path, spec: str, image_size: int | None) -> DataSource:
    from torchvision import datasets, transforms

    steps: list[Any] = [transforms.Resize((image_size, image_size))] if image_size else []
    transform = transforms.Compose([*steps, transforms.ToTensor()])
    try:
        folder = datasets.ImageFolder(str(path), transform=transform, loader=_rgb_image)
    except (FileNotFoundError, RuntimeError) as err:
        raise UsageError("--data", f"{spec!r} is not an ImageFolder: {_first_line(err)}") from None
    images: list[Tensor] = []
    labels: list[int] = []
    for index in range(len(folder)):
        file = folder.samples[index][0]
        try:
            image, label = folder[index]
        except Exception as err:
            raise UsageError("--data", f"cannot read image {file!r}: {_first_line(err)}") from None
        # Compared as they come: a folder of many sizes (ImageNet's) would not fit in memory.
        if images and image.shape != images[0].shape:
            raise UsageError(
                "--image-size",
                f"images in {spec!r} have different sizes: {folder.samples[0][0]!r} is "
                f"{_size(images[0])}, {file!r} is {_size(image)}; pass --image-size to resize",
            )
        images.append(image)
        labels.append(label)
    x = torch.stack(images)
    _check_range(x, spec)
    return DataSource(x, torch.tensor(labels, dtype=torch.long), spec)


# ------------------------------------------------------------------- checks
def check_compatible(model: nn.Module, data: DataSource, device: str) -> int:
    """Run the model on one sample; returns the number of classes.

    Raises:
        UsageError: naming ``--data`` if the model cannot take the inputs, or
            ``--model`` if it does not return ``(batch, classes)`` logits.

    """
    sample = data.x[:1].to(device)
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as err:
        raise UsageError(
            "--data",
            f"the model cannot take inputs of shape {tuple(data.x.shape[1:])} from "
            f"{data.spec!r}: {_first_line(err)}",
        ) from None
    try:  # a tensor, or a dict, .logits or tuple holding it, as brittle.wrap takes them
        logits = model_output(out)
    except ValueError as err:
        raise UsageError("--model", str(err)) from None
    classes = int(logits.shape[1])
    if (
        data.y is not None
        and data.y.numel()
        and (int(data.y.min()) < 0 or int(data.y.max()) >= classes)
    ):
        raise UsageError(
            "--data",
            f"labels in {data.spec!r} range over [{int(data.y.min())}, {int(data.y.max())}] but "
            f"the model has {classes} classes",
        )
    return classes
