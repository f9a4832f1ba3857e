"""Saving and loading monitors: weights_only files, fitted state kept, wrong models refused."""

from __future__ import annotations

import contextlib
import copy
import math
import pickletools
import struct
import threading
import zipfile
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import brittle
from brittle.digits import DigitsSplit, digits_cnn
from brittle.io import checksum
from brittle.scores.pseudo import PseudoMargin


@pytest.fixture(scope="module")
def fitted_pseudo(pseudo_monitor: brittle.Monitor) -> brittle.Monitor:
    return pseudo_monitor


def test_round_trip_keeps_everything(
    fitted_pseudo: brittle.Monitor, robust_model: nn.Module, digits: DigitsSplit, tmp_path
) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    raw = torch.load(path, weights_only=True)  # no pickled code in the file
    assert not any(k.startswith("model.") for k in raw["state"])
    loaded = brittle.load(path, robust_model)
    x = digits.x_holdout[:50]
    a, b = fitted_pseudo(x), loaded(x)
    torch.testing.assert_close(a.margin, b.margin)
    assert torch.equal(a.flag, b.flag)
    assert loaded.score == "pseudo" and loaded.is_fitted and loaded.has_threshold
    assert loaded.threshold == fitted_pseudo.threshold
    np.testing.assert_array_equal(loaded.report.input_margins, fitted_pseudo.report.input_margins)
    assert loaded.report.metrics == fitted_pseudo.report.metrics
    assert torch.equal(loaded.pair_norms, fitted_pseudo.pair_norms)


def test_unfitted_monitor_round_trips(standard_model: nn.Module, tmp_path) -> None:
    # It has seen an input (example_input): its file identifies the model by probe logits.
    monitor = brittle.wrap(standard_model, norm="L1", eps=0.5, example_input=torch.rand(2, 1, 8, 8))
    loaded = brittle.load(monitor.save(tmp_path / "m.pt"), standard_model)
    assert loaded.norm == "L1" and loaded.eps == 0.5 and not loaded.has_threshold
    with pytest.raises(brittle.NotFittedError):
        _ = loaded.report


def test_loading_onto_another_head_shape_fails(fitted_pseudo: brittle.Monitor, tmp_path) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    with pytest.raises(ValueError, match=r"head '8' of shape \(10, 64\).*\(100, 64\)"):
        brittle.load(path, digits_cnn(num_classes=100))
    with pytest.raises(ValueError, match="head named '8'"):
        brittle.load(path, nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))


def test_loading_onto_other_weights_fails(fitted_pseudo: brittle.Monitor, tmp_path) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    other = copy.deepcopy(fitted_pseudo.model)
    with torch.no_grad():
        other[8].weight.mul_(1.5)
    with pytest.raises(ValueError, match="other weights"):
        brittle.load(path, other)


def test_loading_a_file_that_is_not_a_monitor(standard_model: nn.Module, tmp_path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a monitor saved by brittle"):
        brittle.load(tmp_path / "other.pt", standard_model)
    with pytest.raises(FileNotFoundError, match="no monitor file"):
        brittle.load(tmp_path / "missing.pt", standard_model)


def test_loading_onto_something_that_is_not_a_model(standard_model: nn.Module, tmp_path) -> None:
    # Before, the monitor's TypeError was caught as a sign of a damaged file: a sound
    # file passed with the model's state_dict (or arguments swapped) was called damaged.
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    path = monitor.save(tmp_path / "monitor.pt")
    for wrong in (standard_model.state_dict(), str(path), None):
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module\. Got "):
            brittle.load(path, wrong)  # type: ignore[arg-type]
    assert brittle.load(path, standard_model).input_shape == (1, 8, 8)


def test_a_pseudo_monitor_loads_onto_another_dtype(
    fitted_pseudo: brittle.Monitor, robust_model: nn.Module, digits: DigitsSplit, tmp_path
) -> None:
    # Before, a float64 copy failed on every call: its features met the float32 network
    # ("mat1 and mat2 must have the same dtype"); the half-precision copies promoted.
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    x = digits.x_holdout[:50]
    expected = fitted_pseudo(x).margin
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        loaded = brittle.load(path, copy.deepcopy(robust_model).to(dtype))
        got = loaded(x.to(dtype)).margin.float()
        # Measured: 2.5e-7 (float64), 1.5e-4 (float16), 2.2e-3 (bfloat16) on margins of 0.05-0.3.
        tol = 1e-5 if dtype == torch.float64 else 0.02
        torch.testing.assert_close(got, expected, rtol=0, atol=tol)


def test_a_monitor_saved_on_a_bfloat16_model_loads_onto_its_float32_original(
    standard_model: nn.Module, tmp_path
) -> None:
    # The tolerance was the loading model's dtype's alone: the bfloat16 probe logits,
    # 2.4e-3 of their scale from the float32 model's here, were held to float32's 1e-3
    # and the original model was refused as "a model with other weights".
    half = copy.deepcopy(standard_model).to(torch.bfloat16)
    monitor = brittle.wrap(half, example_input=torch.rand(2, 1, 8, 8, dtype=torch.bfloat16))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    for model in (half, standard_model, copy.deepcopy(standard_model).double()):
        assert float(brittle.load(path, model).threshold) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="other weights"):
        brittle.load(path, digits_cnn())  # another model stays refused


def test_load_recognises_the_whole_model(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, score="feature", example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    other_backbone = copy.deepcopy(standard_model)
    with torch.no_grad():
        other_backbone[0].weight.mul_(1.5)  # same head weights, another model
    with pytest.raises(ValueError, match="other weights"):
        brittle.load(path, other_backbone)
    wider = nn.Sequential(*copy.deepcopy(standard_model), nn.Linear(10, 10))
    with pytest.raises(ValueError, match="another structure"):
        brittle.load(path, wider)
    # The same model behind DataParallel: told to load onto the model inside.
    with pytest.raises(ValueError, match=r"start with 'module\.'.*model\.module"):
        brittle.load(path, nn.DataParallel(standard_model))
    # The same model in another dtype is the same model: its outputs still match.
    for dtype in (torch.float64, torch.bfloat16):
        moved = copy.deepcopy(standard_model).to(dtype)
        loaded = brittle.load(path, moved)
        x = torch.rand(3, 1, 8, 8, dtype=dtype)
        torch.testing.assert_close(
            loaded(x).margin.float(), monitor(x.float()).margin, rtol=0.05, atol=0.05
        )


class _BufferLinear(nn.Module):
    """A linear classifier whose weights are buffers: a model without parameters."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T


def test_a_model_without_parameters_loads_in_another_dtype(tmp_path) -> None:
    # The probe read such a model's dtype from its buffers, but the tolerance from its
    # parameters: it had none, so the tolerance was 0 and the same model moved to
    # float64 (or to another device, which rounds otherwise) was refused as "a model
    # with other weights", where a model with parameters loads.
    model = _BufferLinear(torch.randn(10, 64, generator=torch.Generator().manual_seed(0)))
    monitor = brittle.wrap(model, score="logit", example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    loaded = brittle.load(path, copy.deepcopy(model).double())
    assert float(loaded.threshold) == pytest.approx(0.3)
    other = _BufferLinear(torch.randn(10, 64, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="other weights"):
        brittle.load(path, other)


def test_truncated_and_foreign_files_say_damaged(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a monitor")
    for name in ("cut.pt", "text.pt"):
        with pytest.raises(ValueError, match="damaged or not a brittle monitor file"):
            brittle.load(tmp_path / name, standard_model)


def _damage_memo_reference(path) -> None:
    """Point the pickle's first memo look-up at an entry that does not exist, in place.

    torch.save stores the pickle uncompressed and torch.load checks no CRC, so
    this is what one flipped byte on disk can do.
    """
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
        pkl = archive.read(name)
    assert data.count(pkl) == 1
    at = next(pos for op, _, pos in pickletools.genops(pkl) if op.name == "BINGET")
    data[data.index(pkl) + at + 1] = 250  # BINGET's one-byte memo index
    path.write_bytes(bytes(data))


def test_a_damaged_pickle_says_damaged(standard_model: nn.Module, tmp_path) -> None:
    # torch.load raised KeyError (IndexError, struct.error, AssertionError for other
    # bytes) through brittle.load instead of the documented ValueError.
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    _damage_memo_reference(path)
    with pytest.raises(ValueError, match="damaged or not a brittle monitor file"):
        brittle.load(path, standard_model)


def _threshold_offset(path, value: float) -> int:
    """Where the threshold's four bytes lie in the file (torch.save stores them raw)."""
    data = path.read_bytes()
    raw = struct.pack("<f", value)
    assert data.count(raw) == 1, "the threshold's bytes should be unique in the file"
    return data.index(raw)


def test_a_flipped_byte_in_the_threshold_says_damaged(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.2534)
    path = monitor.save(tmp_path / "m.pt")
    data = bytearray(path.read_bytes())
    at = _threshold_offset(path, 0.2534)
    data[at + 3] ^= 0x01  # the float's top byte: 0.2534 becomes another threshold
    flipped = tmp_path / "flipped.pt"
    flipped.write_bytes(bytes(data))
    # The file still loads as a torch file: only the checksum sees the change.
    changed = torch.load(flipped, weights_only=True)["state"]["threshold"]
    assert float(changed) != pytest.approx(0.2534)
    with pytest.raises(ValueError, match="damaged"):
        brittle.load(flipped, standard_model)
    assert float(brittle.load(path, standard_model).threshold) == pytest.approx(0.2534)


def _as_big_endian_holds_it(value: object) -> object:
    """The same values, in the bytes a big-endian machine holds them in."""
    if isinstance(value, torch.Tensor) and value.element_size() > 1:
        t = value.detach().contiguous()
        size = t.element_size()
        return t.reshape(-1).view(torch.uint8).view(-1, size).flip(1).view(t.dtype).view(t.shape)
    if isinstance(value, dict):
        return {key: _as_big_endian_holds_it(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_as_big_endian_holds_it(item) for item in value]
    return value


def test_a_file_checks_on_machines_of_either_byte_order(
    standard_model: nn.Module, tmp_path
) -> None:
    # The checksum hashed each tensor's bytes in this machine's order: torch.load hands
    # a big-endian machine the same values in its own order, and it called every file
    # written on a little-endian one damaged. Tensors are now read little-endian.
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.2534)
    payload = torch.load(monitor.save(tmp_path / "m.pt"), weights_only=True)
    state, model = payload["state"], payload["model"]
    held = _as_big_endian_holds_it(state), _as_big_endian_holds_it(model)
    assert not torch.equal(held[0]["threshold"], state["threshold"])  # other bytes
    assert checksum(*held, byteorder="big") == payload["checksum"]
    assert checksum(state, model, byteorder="little") == payload["checksum"]
    assert checksum(*held, byteorder="little") != payload["checksum"]
    with pytest.raises(ValueError, match="byteorder"):
        checksum(state, model, byteorder="middle")


def test_a_file_without_checksum_loads_with_a_warning(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    del payload["checksum"]  # as an older brittle wrote it
    torch.save(payload, path)
    with pytest.warns(UserWarning, match="no checksum"):
        loaded = brittle.load(path, standard_model)
    assert float(loaded.threshold) == pytest.approx(0.3)


def test_save_refuses_a_monitor_that_never_saw_an_input(
    standard_model: nn.Module, tmp_path
) -> None:
    monitor = brittle.wrap(standard_model)
    monitor.set_threshold(0.3)
    with pytest.raises(ValueError, match="never seen an input.*example_input"):
        monitor.save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    monitor(torch.rand(2, 1, 8, 8))
    path = monitor.save(tmp_path / "m.pt")
    # The file now records probe logits, so another model with the same structure
    # is refused.
    other = copy.deepcopy(standard_model)
    with torch.no_grad():
        other[0].weight.mul_(1.5)
    with pytest.raises(ValueError, match="other weights"):
        brittle.load(path, other)


def test_save_to_a_directory_says_so_and_leaves_nothing_behind(
    standard_model: nn.Module, tmp_path
) -> None:
    # Before, torch.save wrote the whole file as "<dir>.tmp" beside the directory,
    # the rename failed with "[Errno 21] Is a directory: '<dir>.tmp' -> '<dir>'", and
    # the stray file stayed.
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    folder = tmp_path / "monitors"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=r"is a directory; .*monitor\.pt"):
        monitor.save(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["monitors"]
    assert list(folder.iterdir()) == []


def test_two_saves_to_one_path_at_once_never_collide(standard_model: nn.Module, tmp_path) -> None:
    # Both saves wrote "<path>.tmp": one save's rename could move the other's half-written
    # file into place, or the other's failure handler could delete the file the first was
    # writing, so a save raised FileNotFoundError or left a file that did not load.
    monitors = [
        brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8)) for _ in range(2)
    ]
    for monitor, threshold in zip(monitors, (0.25, 0.75), strict=True):
        monitor.set_threshold(threshold)
    path = tmp_path / "m.pt"
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def keep_saving(monitor: brittle.Monitor) -> None:
        start.wait()
        try:
            for _ in range(40):
                monitor.save(path)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=keep_saving, args=(m,)) for m in monitors]
    for thread in threads:
        thread.start()
    for _ in range(40):
        with contextlib.suppress(FileNotFoundError):  # before the first rename
            assert float(brittle.load(path, standard_model).threshold) in (0.25, 0.75)
    for thread in threads:
        thread.join()
    assert errors == []
    assert float(brittle.load(path, standard_model).threshold) in (0.25, 0.75)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # no temporary file left
    (tmp_path / "plain").write_bytes(b"")  # the file is as open() makes one, not private
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_failed_save_removes_only_the_folders_it_created(
    standard_model: nn.Module, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Before, save created the missing parent folders first and left them behind when
    # the write failed.
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no space left on device (for the test)")

    monkeypatch.setattr(torch, "save", refuse)  # brittle.io calls torch.save
    with pytest.raises(OSError, match="no space left"):
        monitor.save(tmp_path / "a" / "b" / "m.pt")
    assert not (tmp_path / "a").exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(OSError, match="no space left"):
        monitor.save(kept / "new" / "m.pt")
    assert kept.is_dir() and list(kept.iterdir()) == []
    monkeypatch.undo()
    path = monitor.save(kept / "new" / "m.pt")  # the same call succeeds once it can write
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.pt"]


def _rewritten(path, edit) -> None:
    """Apply ``edit`` to a saved monitor file's payload and write it back with a valid checksum."""
    payload = torch.load(path, weights_only=True)
    edit(payload)
    payload["checksum"] = checksum(payload["state"], payload["model"])
    torch.save(payload, path)


def test_a_fitted_monitor_without_finite_threshold_is_refused(
    standard_model: nn.Module, tmp_path
) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    monitor.fitted.fill_(True)
    path = monitor.save(tmp_path / "m.pt")
    # Rewrite the file with a NaN threshold and a valid checksum: only the value is wrong.
    _rewritten(
        path, lambda payload: payload["state"].__setitem__("threshold", torch.tensor(math.nan))
    )
    with pytest.raises(ValueError, match="non-finite threshold"):
        brittle.load(path, standard_model)
    monitor.threshold.fill_(math.inf)
    with pytest.raises(ValueError, match="non-finite threshold"):
        monitor.save(tmp_path / "inf.pt")


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        # load_state_dict raised RuntimeError for these two (not the documented ValueError).
        ("threshold", torch.zeros(2), "does not match.*size mismatch"),
        ("pair_norms", "a string", "does not match.*expected torch.Tensor"),
        # These loaded and silently turned the domain check off, or rejected every input.
        ("domain", torch.tensor([-math.inf, -math.inf]), "input domain"),
        ("domain", torch.tensor([1.0, 0.0]), "input domain"),
        ("domain", torch.tensor([0.0, math.nan]), "input domain"),
    ],
    ids=["threshold-shape", "not-a-tensor", "infinite-domain", "reversed-domain", "half-nan"],
)
def test_a_state_that_could_not_have_been_saved_is_refused(
    fitted_pseudo: brittle.Monitor, robust_model: nn.Module, tmp_path, key, value, match
) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    _rewritten(path, lambda payload: payload["state"].__setitem__(key, value))
    with pytest.raises(ValueError, match=match):
        brittle.load(path, robust_model)


def _set_config(key: str, value: object):
    return lambda payload: payload["state"]["_extra_state"].__setitem__(key, value)


def _set_identity(key: str, value: object):
    return lambda payload: payload["model"].__setitem__(key, value)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        # Loaded, and every forward pass then raised NotFittedError or picked no score.
        (_set_config("chosen", "bogus"), "chosen score"),
        # Allocated the network (2 PB here) before any shape was compared: RuntimeError.
        (_set_config("pseudo_features", 10**12), "pseudo-margin"),
        (_set_config("reference_counts", [1]), "reference counts"),  # IndexError
        # Loaded, and the flag-rate alarm then silently read (1, 10) or (3, 10) (int()
        # truncates 1.5 and reads "3"), or Telemetry.from_monitor raised later, at the
        # server's start: what an exported file with these counts is refused for.
        (_set_config("reference_counts", [1.5, 10]), "reference counts"),
        (_set_config("reference_counts", ["3", 10]), "reference counts"),
        (_set_config("reference_counts", [True, 10]), "reference counts"),
        (_set_config("reference_counts", [5, 3]), "reference counts"),
        (_set_config("reference_counts", [0, 0]), "reference counts"),
        # Raised TypeError or a bare "could not convert string to float" from
        # set_extra_state, half-way through the load; or loaded a rate or histogram
        # bounds that an exported file with them is refused for.
        (_set_config("reference_flag_rate", "0.1"), "reference flag rate"),
        (_set_config("reference_flag_rate", [0.1]), "reference flag rate"),
        (_set_config("reference_flag_rate", 1.5), "reference flag rate"),
        (_set_config("margin_buckets", 3), "margin buckets"),
        (_set_config("margin_buckets", ["a"]), "margin buckets"),
        (_set_config("margin_buckets", [0.2, math.nan]), "margin buckets"),
        (_set_config("margin_buckets", [0.2, 0.1]), "margin buckets"),
        # Loaded, and every input was then refused as of the wrong shape.
        (_set_config("input_shape", [3, 32, 32]), "input shape"),
        (_set_config("input_shape", [-1, 8, 8]), "input shape"),
        # The probe ran on a batch the model cannot take: RuntimeError.
        (_set_identity("input_shape", [1, 9, 9]), "input shape"),
    ],
    ids=[
        "unknown-choice",
        "huge-network",
        "one-count",
        "fractional-count",
        "string-count",
        "boolean-count",
        "more-flagged-than-judged",
        "no-judged-sample",
        "string-rate",
        "list-rate",
        "rate-above-one",
        "buckets-not-a-list",
        "string-bucket",
        "nan-bucket",
        "decreasing-buckets",
        "other-input-shape",
        "negative-input-shape",
        "probe-shape",
    ],
)
def test_a_configuration_no_monitor_could_have_written_is_refused(
    fitted_pseudo: brittle.Monitor, robust_model: nn.Module, tmp_path, edit, match
) -> None:
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    _rewritten(path, edit)
    with pytest.raises(ValueError, match=match):
        brittle.load(path, robust_model)


@pytest.mark.parametrize("table", [torch.full((10, 10), math.nan), torch.zeros(10, 10)])
def test_the_pair_norm_table_comes_from_the_model_not_the_file(
    standard_model: nn.Module, digits: DigitsSplit, tmp_path, table: torch.Tensor
) -> None:
    monitor = brittle.wrap(standard_model, score="feature", example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    # A NaN table gave NaN feature margins (every sample rejected); a zero one, infinite.
    _rewritten(path, lambda payload: payload["state"].__setitem__("pair_norms", table))
    loaded = brittle.load(path, standard_model)
    x = digits.x_holdout[:20]
    torch.testing.assert_close(loaded(x).margin, monitor(x).margin)
    assert torch.equal(loaded.pair_norms, monitor.pair_norms)


def test_a_file_without_probe_logits_loads_with_a_warning(
    standard_model: nn.Module, tmp_path
) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    monitor.set_threshold(0.3)
    path = monitor.save(tmp_path / "m.pt")
    _rewritten(path, lambda payload: payload["model"].__setitem__("probe_logits", None))
    other = copy.deepcopy(standard_model)
    with torch.no_grad():
        other[0].weight.mul_(1.5)
    # Structure alone cannot tell these two apart: the user is told so.
    with pytest.warns(UserWarning, match="no probe logits.*structure"):
        brittle.load(path, other)


def test_load_state_dict_into_a_fresh_wrap(
    fitted_pseudo: brittle.Monitor, robust_model: nn.Module, digits: DigitsSplit
) -> None:
    # A monitor that has not seen an input had an empty table and no pseudo network:
    # load_state_dict failed ("size mismatch for pair_norms", unexpected "pseudo.*").
    x = digits.x_holdout[:20]
    for fresh in (brittle.wrap(robust_model), brittle.wrap(robust_model, example_input=x)):
        fresh.load_state_dict(fitted_pseudo.state_dict())
        a, b = fitted_pseudo(x), fresh(x)
        torch.testing.assert_close(b.margin, a.margin)
        assert torch.equal(b.flag, a.flag) and fresh.score == "pseudo"
    # Onto a model without the saved head: PyTorch's error, naming the head.
    other = brittle.wrap(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    with pytest.raises(RuntimeError, match="head named '8'"):
        other.load_state_dict(fitted_pseudo.state_dict())


def test_loading_a_pseudo_monitor_leaves_the_global_random_state_alone(
    fitted_pseudo: brittle.Monitor, robust_model: nn.Module, tmp_path
) -> None:
    # Loading built the pseudo-margin network with nn.Linear's random initialisation
    # (overwritten at once by the saved weights) from the global generator: a seeded
    # script drew other numbers after brittle.load than without it.
    path = fitted_pseudo.save(tmp_path / "monitor.pt")
    state = fitted_pseudo.state_dict()
    for load in (
        lambda: brittle.load(path, robust_model),
        lambda: brittle.wrap(robust_model).load_state_dict(state),
    ):
        before = torch.random.get_rng_state()
        load()
        assert torch.equal(torch.random.get_rng_state(), before)


class _Placed(nn.Linear):
    """A layer that counts device or dtype conversions applied to it (``Module._apply``)."""

    conversions = 0

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        self.conversions += 1
        return super()._apply(fn, recurse)


def test_load_moves_the_monitor_onto_the_models_device_but_not_the_model(tmp_path) -> None:
    # from_state called monitor.to(first parameter's device), which applies to the
    # wrapped model too: a model split over devices (a pipeline over two GPUs, layers
    # offloaded to the CPU) was moved whole. Counting the conversions shows it on a CPU.
    torch.manual_seed(0)
    placed = _Placed(6, 8)
    model = nn.Sequential(placed, nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(5, 6)
    monitor = brittle.wrap(model, example_input=x)
    monitor.set_threshold(0.25)
    path = monitor.save(tmp_path / "monitor.pt")
    loaded = brittle.load(path, model)
    assert placed.conversions == 0
    assert loaded.threshold.device == placed.weight.device
    assert torch.equal(loaded(x).flag, monitor(x).flag)


def test_a_model_with_uninitialised_lazy_modules_is_refused_as_another_model(tmp_path) -> None:
    # Before, brittle.load raised PyTorch's RuntimeError "Can't access the shape of an
    # uninitialized parameter", not the ValueError it documents for another model.
    def lazy() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.LazyLinear(3)).eval()

    x = torch.rand(5, 6)
    model = lazy()
    monitor = brittle.wrap(model, example_input=x)  # its first batch initialises the model
    monitor.set_threshold(0.25)
    path = monitor.save(tmp_path / "monitor.pt")
    with pytest.raises(ValueError, match=r"'0\.weight' is not initialised.*lazy"):
        brittle.load(path, lazy())
    fresh = lazy()
    fresh.load_state_dict(model.state_dict())  # loading its weights initialises it
    assert torch.equal(brittle.load(path, fresh)(x).flag, monitor(x).flag)


class _RecordsPrecision(nn.Module):
    """A linear model that records the float32 precision its matrix products ran at."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: list[tuple[str, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backends = torch.backends
        self.seen.append(
            (
                backends.cuda.matmul.fp32_precision,
                backends.cudnn.conv.fp32_precision,
                backends.mkldnn.matmul.fp32_precision,
            )
        )
        return self.linear(x)


def test_the_probe_runs_in_ieee_float32_whatever_the_process_set(tmp_path) -> None:
    # The probe ran at the process's precision: TF32 convolutions (cuDNN's default on
    # recent GPUs) or TF32/bf16 matrix products after set_float32_matmul_precision, so
    # a monitor saved on a GPU could be refused on a CPU as "a model with other weights".
    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("the per-backend fp32_precision settings need torch >= 2.9")
    model = _RecordsPrecision()
    monitor = brittle.wrap(model, example_input=torch.rand(2, 4))
    monitor.set_threshold(0.1)
    backends = (
        torch.backends.cuda.matmul,
        torch.backends.cudnn.conv,
        torch.backends.mkldnn.matmul,
    )
    before = [backend.fp32_precision for backend in backends]
    lowered = ["tf32", "tf32", "bf16"]
    try:
        for backend, value in zip(backends, lowered, strict=True):
            backend.fp32_precision = value
        model.seen.clear()
        brittle.load(monitor.save(tmp_path / "m.pt"), model)
        after = [backend.fp32_precision for backend in backends]
    finally:
        for backend, value in zip(backends, before, strict=True):
            backend.fp32_precision = value
    assert model.seen == [("ieee", "ieee", "ieee")] * 2  # the probe at save, then at load
    assert after == lowered  # and the process's settings are back


def test_a_file_of_a_newer_format_says_to_upgrade(standard_model: nn.Module, tmp_path) -> None:
    monitor = brittle.wrap(standard_model, example_input=torch.rand(2, 1, 8, 8))
    path = monitor.save(tmp_path / "m.pt")
    _rewritten(path, lambda payload: payload.__setitem__("version", payload["version"] + 1))
    # Before, it was told to "fit and save it again", which an older brittle cannot read.
    with pytest.raises(ValueError, match="upgrade brittle"):
        brittle.load(path, standard_model)
    _rewritten(path, lambda payload: payload.__setitem__("version", 1))
    with pytest.raises(ValueError, match="fit and save it again"):
        brittle.load(path, standard_model)


def _narrow_pseudo_monitor() -> tuple[nn.Module, torch.Tensor, brittle.Monitor]:
    """A small model, an input, and a monitor of it with a 16-wide pseudo network."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.rand(4, 6)
    monitor = brittle.wrap(model, score="pseudo", example_input=x)
    monitor.pseudo = PseudoMargin(5, 3, hidden=16)
    monitor.set_threshold(0.5)
    return model, x, monitor


@pytest.mark.parametrize("route", ["load", "load_state_dict"])
def test_a_pseudo_network_of_another_width_loads(route: str, tmp_path) -> None:
    # train_pseudo_margin(hidden=...) makes networks of any width; loading built a
    # 512-wide one and refused the saved weights ("size mismatch for pseudo.net").
    model, x, monitor = _narrow_pseudo_monitor()
    path = monitor.save(tmp_path / "monitor.pt")
    if route == "load":
        loaded = brittle.load(path, model)
    else:
        loaded = brittle.wrap(model, score="pseudo")
        loaded.load_state_dict(monitor.state_dict())
    assert loaded.pseudo is not None and loaded.pseudo.net[0].out_features == 16
    torch.testing.assert_close(loaded(x).margin, monitor(x).margin, rtol=0, atol=0)


def test_a_state_without_a_pseudo_network_drops_it_under_strict_false() -> None:
    """``strict=False`` ignored the missing keys of the network and kept it: the loaded
    configuration said there was none while the monitor still scored with it."""
    model, x, with_net = _narrow_pseudo_monitor()
    without = brittle.wrap(model, score="logit", example_input=x)
    without.set_threshold(0.25)
    with pytest.raises(RuntimeError, match="Missing key"):
        with_net.load_state_dict(without.state_dict())
    assert with_net.pseudo is not None  # a refused load changes nothing
    result = with_net.load_state_dict(without.state_dict(), strict=False)
    assert with_net.pseudo is None and with_net.get_extra_state()["pseudo_features"] is None
    assert not [k for k in result.missing_keys if "pseudo" in k]
    assert "pseudo" not in with_net.scores(x) and with_net.score == "logit"
    torch.testing.assert_close(with_net(x).margin, without(x).margin, rtol=0, atol=0)


def _two_layer_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).eval()


def _norm_layers_model() -> nn.Module:
    torch.manual_seed(0)
    linear = nn.utils.parametrizations.weight_norm(nn.Linear(5, 3))
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), linear).eval()


@pytest.mark.parametrize("old_keys", ["weight-norm-g-v", "no-num-batches-tracked"])
def test_load_state_dict_takes_what_the_models_own_loaders_take(old_keys: str) -> None:
    # The check made before anything is copied refused these states, which
    # nn.Module.load_state_dict loads: weight norm renames the weight_g / weight_v keys
    # of older states (a load hook), batch norm reads states saved without
    # num_batches_tracked (its own _load_from_state_dict).
    x = torch.rand(4, 6)
    source = brittle.wrap(_norm_layers_model(), example_input=x)
    with torch.no_grad():
        source.model[0].weight.mul_(2.0)
    source.set_threshold(0.3)
    state = dict(source.state_dict())
    if old_keys == "weight-norm-g-v":
        state["model.3.weight_g"] = state.pop("model.3.parametrizations.weight.original0")
        state["model.3.weight_v"] = state.pop("model.3.parametrizations.weight.original1")
    else:
        state.pop("model.1.num_batches_tracked")
    plain = brittle.wrap(_norm_layers_model(), example_input=x)
    nn.Module.load_state_dict(plain, state)  # what PyTorch itself takes
    monitor = brittle.wrap(_norm_layers_model(), example_input=x)
    monitor.load_state_dict(state)
    assert torch.equal(monitor.model[0].weight, source.model[0].weight)
    assert float(monitor.threshold) == pytest.approx(0.3)
    assert torch.equal(monitor(x).margin, source(x).margin)
    # A shape error in a module that loads the plain way is still refused before the copy.
    state["model.0.weight"] = torch.zeros(5, 7)
    fresh = brittle.wrap(_norm_layers_model(), example_input=x)
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch for model.0.weight"):
        fresh.load_state_dict(state)
    _assert_same_tensors(before, fresh.state_dict())


def _changed_norm_layers_state(x: torch.Tensor) -> dict[str, object]:
    """The state of a monitor of ``_norm_layers_model`` whose weights moved, threshold 0.3."""
    source = brittle.wrap(_norm_layers_model(), example_input=x)
    with torch.no_grad():
        source.model[0].weight.mul_(2.0)
        source.model[1].running_mean.add_(1.0)
    source.set_threshold(0.3)
    return dict(source.state_dict())


def _hook_that_raises(*args: object) -> None:
    raise KeyError("a hook that refuses the state")


@pytest.mark.parametrize("fault", ["batch-norm-shape", "weight-norm-shape", "load-hook-raises"])
def test_a_refused_own_loader_leaves_the_model_as_it_was(fault: str) -> None:
    # The keys of modules that load their own way are left to PyTorch, which copied
    # every other weight (model.0's among them) before raising: the refused load left
    # the model part-loaded. Each such module now loads its part first, on its own.
    x = torch.rand(4, 6)
    state = _changed_norm_layers_state(x)
    model = _norm_layers_model()
    if fault == "batch-norm-shape":
        state["model.1.running_mean"] = torch.zeros(7)
        error, match = RuntimeError, r"size mismatch for running_mean.*'model\.1'"
    elif fault == "weight-norm-shape":
        state["model.3.parametrizations.weight.original1"] = torch.zeros(3, 9)
        error, match = RuntimeError, r"size mismatch.*'model\.3'"
    else:
        model[1]._register_load_state_dict_pre_hook(_hook_that_raises)
        error, match = KeyError, "refuses the state"
    monitor = brittle.wrap(model, example_input=x)
    before = copy.deepcopy(monitor.state_dict())
    with pytest.raises(error, match=match):
        monitor.load_state_dict(state)
    _assert_same_tensors(before, monitor.state_dict())
    assert not monitor.has_threshold


def _tensors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, bool]]:
    """Each parameter and buffer of ``model``: the object, a copy of its values, requires_grad."""
    held = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: (t, t.detach().clone(), t.requires_grad) for k, t in held.items()}


def _assert_same_tensors(before: dict, after: dict) -> None:
    """Every tensor of the state dict ``before`` has the same values in ``after`` (NaN equal)."""
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key].nan_to_num(), value.nan_to_num()), key


def _assert_as_it_was(model: nn.Module, before: dict) -> None:
    after = _tensors(model)
    assert after.keys() == before.keys()
    for key, (tensor, values, grad) in before.items():
        assert after[key][0] is tensor, key
        assert torch.equal(after[key][1].nan_to_num(), values.nan_to_num()), key
        assert after[key][2] == grad, key


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("interrupt", [RuntimeError, KeyboardInterrupt])
def test_a_load_that_fails_after_the_own_loaders_puts_them_back(
    monkeypatch: pytest.MonkeyPatch, assign: bool, interrupt: type[BaseException]
) -> None:
    # The modules that load their own way load first; a failure in the final copy
    # (here in the monitor's own configuration, which PyTorch sets before it copies
    # the model's weights) left them loaded, though the model's other weights and
    # the monitor were as they had been.
    x = torch.rand(4, 6)
    source = brittle.wrap(_norm_layers_model(), example_input=x)
    with torch.no_grad():
        source.model[1].running_mean.add_(1.0)
        source.model[3].parametrizations.weight.original1.mul_(2.0)
    source.set_threshold(0.3)
    state = source.state_dict()
    monitor = brittle.wrap(_norm_layers_model(), example_input=x)
    before = _tensors(monitor.model)

    def refuse(self: brittle.Monitor, config: dict) -> None:
        raise interrupt("refused in the final copy")

    monkeypatch.setattr(brittle.Monitor, "set_extra_state", refuse)
    with pytest.raises(interrupt, match="final copy"):
        monitor.load_state_dict(state, assign=assign)
    _assert_as_it_was(monitor.model, before)
    assert not monitor.has_threshold


@pytest.mark.parametrize(
    ("value", "assign"),
    [
        (torch.empty(5, device="meta"), False),
        (torch.zeros(5).to_sparse(), False),
        (torch.zeros(5, dtype=torch.long), True),  # no gradient for an integer parameter
    ],
    ids=["meta", "sparse", "integer-assigned"],
)
def test_a_value_pytorch_cannot_copy_is_refused_before_the_copy(
    value: torch.Tensor, assign: bool
) -> None:
    # Of the right shape, these passed the checks made before the copy, and PyTorch
    # refused them only after it had copied (or, with assign, taken) every other
    # tensor: model.0.weight and the own-loading modules' parts stayed loaded.
    x = torch.rand(4, 6)
    state = _changed_norm_layers_state(x)
    state["model.0.bias"] = value
    plain = brittle.wrap(_norm_layers_model(), example_input=x)
    with pytest.raises(RuntimeError, match="model.0.bias"):
        nn.Module.load_state_dict(plain, state, assign=assign)  # PyTorch refuses it too
    monitor = brittle.wrap(_norm_layers_model(), example_input=x)
    before = _tensors(monitor.model)
    with pytest.raises(RuntimeError, match="model.0.bias"):
        monitor.load_state_dict(state, assign=assign)
    _assert_as_it_was(monitor.model, before)
    assert not monitor.has_threshold


class _Tagged(nn.Module):
    """A layer with extra state that refuses tags it does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.tag = nn.Linear(5, 5), "a"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def get_extra_state(self) -> dict[str, str]:
        return {"tag": self.tag}

    def set_extra_state(self, state: dict[str, str]) -> None:
        if state["tag"] not in ("a", "b"):
            raise ValueError(f"unknown tag {state['tag']!r}")
        self.tag = state["tag"]


def test_a_model_module_that_refuses_its_extra_state_leaves_the_model_as_it_was() -> None:
    # PyTorch sets a module's extra state while it copies the model's weights, and
    # set_extra_state's error propagated from there: model.0's weights were loaded.
    x = torch.rand(4, 6)

    def tagged() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), _Tagged(), nn.ReLU(), nn.Linear(5, 3)).eval()

    source = brittle.wrap(tagged(), example_input=x)
    with torch.no_grad():
        source.model[0].weight.mul_(2.0)
    state = dict(source.state_dict())
    monitor = brittle.wrap(tagged(), example_input=x)
    monitor.load_state_dict(state)  # a known tag loads
    assert torch.equal(monitor.model[0].weight, source.model[0].weight)
    state["model.1._extra_state"] = {"tag": "z"}
    monitor = brittle.wrap(tagged(), example_input=x)
    before = _tensors(monitor.model)
    with pytest.raises(ValueError, match="unknown tag"):
        monitor.load_state_dict(state)
    _assert_as_it_was(monitor.model, before)
    assert monitor.model[1].tag == "a"


def test_a_refused_own_loader_puts_back_a_weight_it_shares_with_one_loaded_before() -> None:
    # Put back in the order they were saved, the second module's copy (taken after
    # the first had loaded their shared weight) was the last word: the weight stayed
    # loaded.
    x = torch.rand(4, 6)

    def tied() -> nn.Module:
        torch.manual_seed(0)
        first, second = nn.BatchNorm1d(6), nn.BatchNorm1d(6)
        second.weight = first.weight
        return nn.Sequential(first, second, nn.Linear(6, 3)).eval()

    source = brittle.wrap(tied(), example_input=x)
    with torch.no_grad():
        source.model[0].weight.mul_(2.0)
    state = dict(source.state_dict())
    state["model.1.running_mean"] = torch.zeros(7)
    monitor = brittle.wrap(tied(), example_input=x)
    before = _tensors(monitor.model)
    with pytest.raises(RuntimeError, match="size mismatch for running_mean"):
        monitor.load_state_dict(state)
    _assert_as_it_was(monitor.model, before)


def test_a_module_the_model_holds_twice_loads_its_own_way_under_both_names() -> None:
    # Only the first name of a module held twice was left to its own loader: under
    # the second, an older batch-norm state (no num_batches_tracked), which PyTorch
    # loads, was refused as missing a key.
    x = torch.rand(4, 6)

    def shared() -> nn.Module:
        torch.manual_seed(0)
        norm = nn.BatchNorm1d(6)
        return nn.Sequential(norm, nn.Linear(6, 6), nn.Sequential(norm), nn.Linear(6, 3)).eval()

    source = brittle.wrap(shared(), example_input=x)
    with torch.no_grad():
        source.model[0].running_mean.add_(1.0)
    state = {k: v for k, v in source.state_dict().items() if "num_batches" not in k}
    nn.Module.load_state_dict(brittle.wrap(shared(), example_input=x), state)
    monitor = brittle.wrap(shared(), example_input=x)
    monitor.load_state_dict(state)
    assert torch.equal(monitor.model[0].running_mean, source.model[0].running_mean)
    state["model.2.0.running_var"] = torch.zeros(7)
    monitor = brittle.wrap(shared(), example_input=x)
    before = _tensors(monitor.model)
    with pytest.raises(RuntimeError, match="size mismatch for running_var"):
        monitor.load_state_dict(state)
    _assert_as_it_was(monitor.model, before)


def _set_state(key: str, value: object):
    return lambda state: state.__setitem__(key, value)


def _set_extra(key: str, value: object):
    return lambda state: state["_extra_state"].__setitem__(key, value)


@pytest.mark.parametrize(
    "edit",
    [
        _set_state("bogus", torch.zeros(1)),
        lambda state: state.pop("model.0.bias"),
        _set_state("threshold", torch.zeros(2)),
        _set_state("model.2.weight", torch.zeros(4, 5)),
        _set_state("pair_norms", "a string"),
        _set_state("pseudo.net.2.weight", torch.zeros(16, 8)),
        _set_state("threshold", torch.tensor(math.inf)),
        _set_state("domain", torch.tensor([1.0, 0.0])),
        _set_extra("chosen", "bogus"),
        _set_extra("version", 99),
        _set_extra("report", {"not": "a report"}),
        _set_extra("reference_counts", [1]),
        _set_extra("norm", "L3"),
        _set_extra("head", "7"),
        _set_extra("min_tau", math.nan),
        _set_extra("head_exact", "yes"),
        _set_extra("margin_buckets", 3),
    ],
    ids=[
        "unexpected-key",
        "missing-key",
        "threshold-shape",
        "model-weight-shape",
        "not-a-tensor",
        "pseudo-width",
        "infinite-threshold",
        "reversed-domain",
        "unknown-choice",
        "other-version",
        "damaged-report",
        "one-count",
        "unknown-norm",
        "no-such-head",
        "nan-min-tau",
        "head-exact-not-bool",
        "buckets-not-a-list",
    ],
)
def test_a_failed_load_state_dict_leaves_the_monitor_as_it_was(edit) -> None:
    # load_state_dict copied tensor after tensor and raised at the end (or from
    # set_extra_state, half-way): a fitted monitor was left with the other state's
    # buffers and a pseudo network, or a head its model lacks. Some of these states
    # (infinite threshold, reversed domain, unknown choice) loaded without an error.
    x = torch.rand(4, 6)
    source_model = _two_layer_model()
    with torch.no_grad():
        source_model[0].weight.mul_(2.0)
    source = brittle.wrap(source_model, score="pseudo", example_input=x)
    source.pseudo = PseudoMargin(5, 3, hidden=16)
    source.set_threshold(0.5)
    state = copy.deepcopy(source.state_dict())
    edit(state)
    monitor = brittle.wrap(_two_layer_model(), score="feature", example_input=x)
    monitor.set_threshold(0.1)
    before, out = copy.deepcopy(monitor.state_dict()), monitor(x)
    with pytest.raises((ValueError, RuntimeError)):
        monitor.load_state_dict(state)
    after = monitor.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(after[key].nan_to_num(), value.nan_to_num()), key
        else:
            assert after[key] == value, key
    assert monitor.score == "feature" and monitor.pseudo is None
    assert float(monitor.threshold) == pytest.approx(0.1)
    again = monitor(x)
    for name in ("logits", "pred", "margin", "flag"):
        assert torch.equal(getattr(again, name), getattr(out, name)), name
    # A fresh monitor keeps nothing either: not the head nor the network sized for the state.
    fresh = brittle.wrap(_two_layer_model())
    with pytest.raises((ValueError, RuntimeError)):
        fresh.load_state_dict(state)
    assert fresh.head_name is None and fresh.pseudo is None and not fresh.discovered
    assert fresh.pair_norms.shape == (0, 0)


def test_a_state_saved_before_the_first_input_loads_into_a_monitor_that_has_run() -> None:
    # The empty pair-norm table of a monitor that had not seen an input was refused by
    # a monitor that had ("size mismatch for pair_norms"): the loaded monitor is the
    # saved one, which finds its head at its first input.
    torch.manual_seed(0)
    x = torch.rand(4, 6)
    model = _two_layer_model()
    unseen = brittle.wrap(model, score="feature", eps=0.1)
    unseen.set_threshold(0.2)
    state = unseen.state_dict()
    ran = brittle.wrap(_two_layer_model(), score="feature", eps=0.1, example_input=x)
    assert ran.pair_norms.shape == (3, 3)
    ran.load_state_dict(state)
    assert not ran.discovered and ran.head is None and ran.pair_norms.numel() == 0
    assert float(ran.threshold) == pytest.approx(0.2)
    out = ran(x)
    assert ran.pair_norms.shape == (3, 3)
    torch.testing.assert_close(out.margin, unseen(x).margin, rtol=0, atol=0)


def test_a_monitor_first_called_under_inference_mode_refuses_a_load_and_keeps_its_model() -> None:
    # A first call under torch.inference_mode() (serving) made the pair-norm table an
    # inference tensor, which takes no copy outside that mode: load_state_dict loaded
    # the model's weights anyway, then crashed putting the table back, and the error
    # was PyTorch's alone. The load is refused first now; inside the mode it loads.
    x = torch.rand(4, 6)
    source_model = _two_layer_model()
    with torch.no_grad():
        source_model[0].weight.mul_(2.0)
    source = brittle.wrap(source_model, score="feature", example_input=x)
    source.set_threshold(0.5)
    state = source.state_dict()
    model = _two_layer_model()
    monitor = brittle.wrap(model, score="feature")
    with torch.inference_mode():
        monitor(x)
    assert torch.is_inference(monitor.pair_norms)
    before = copy.deepcopy(monitor.state_dict())
    with pytest.raises(RuntimeError, match=r"inference tensor.*inside torch\.inference_mode"):
        monitor.load_state_dict(state)
    _assert_same_tensors(before, monitor.state_dict())
    assert not monitor.has_threshold
    with torch.inference_mode():
        monitor.load_state_dict(state)
    assert monitor.has_threshold and float(monitor.threshold) == pytest.approx(0.5)
    assert torch.equal(model[0].weight, source_model[0].weight)
