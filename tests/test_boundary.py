"""Boundary points for the pseudo-margin: the attack's points, their copies, their targets."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

import brittle
from brittle.attacks.attack import attack_batch, attack_points
from brittle.attacks.settings import AttackSettings
from brittle.calibrate.boundary import COPIES, boundary_copies
from brittle.calibrate.cache import MarginCache
from brittle.calibrate.holdout import collect_holdout
from brittle.calibrate.pseudo_train import train_pseudo_margin
from brittle.scores.norms import per_sample_norm


def _two_class_linear() -> nn.Module:
    """Logits (x0, x1) of a 4-pixel input: the boundary is x0 = x1."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
        model[1].bias.zero_()
    return model


@pytest.mark.parametrize("norm", ["Linf", "L2", "L1"])
def test_copies_are_within_radius_of_their_point_and_their_target_is_that_distance(
    norm: str,
) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(32, 1, 4, 4, generator=g)
    points = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    margins = per_sample_norm(points - x, norm)
    margins[3] = math.inf  # censored: no boundary point
    rows, targets = boundary_copies(x, points, margins, 0.1, norm, seed=1)
    assert rows.shape == (32, COPIES, 1, 4, 4) and targets.shape == (32, COPIES)
    assert torch.equal(rows[:, 0], points)
    assert ((rows >= 0) & (rows <= 1)).all()
    # The target of every row is its distance to the boundary point, by brute force.
    for j in range(COPIES):
        distance = per_sample_norm(rows[:, j] - points, norm).float()
        keep = torch.arange(32) != 3
        torch.testing.assert_close(targets[keep, j], distance[keep])
    assert targets[3].isnan().all()
    assert (targets[torch.arange(32) != 3, 1:] <= 0.1 + 1e-6).all()
    again, _ = boundary_copies(x, points, margins, 0.1, norm, seed=1)
    assert torch.equal(rows, again)


def test_a_samples_copies_depend_on_its_position_not_its_batch() -> None:
    # Before, the copies were drawn for the whole batch from seed + its first index, so
    # a sample's rows changed with the loader's batch size and with the rank that
    # attacked it: a distributed fit trained its pseudo-margin on other rows.
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 1, 4, 4, generator=g)
    points = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    margins = per_sample_norm(points - x, "L2")
    whole, targets = boundary_copies(x, points, margins, 0.1, "L2", seed=3)
    for owner in (0, 1):  # the samples two ranks own: even and odd positions
        mine = torch.arange(owner, 12, 2)
        rows, own = boundary_copies(
            x[mine], points[mine], margins[mine], 0.1, "L2", seed=3, index=mine
        )
        assert torch.equal(rows, whole[mine]) and torch.equal(own, targets[mine])
    other, _ = boundary_copies(x, points, margins, 0.1, "L2", seed=4)
    assert not torch.equal(other[:, 1:], whole[:, 1:])
    with pytest.raises(ValueError, match="one position per sample"):
        boundary_copies(x, points, margins, 0.1, "L2", index=torch.arange(3))


def test_a_pass_keeps_the_same_boundary_rows_whatever_the_batch_size() -> None:
    model = _two_class_linear()
    monitor = brittle.wrap(model, eps=0.1)
    x = torch.rand(12, 4, generator=torch.Generator().manual_seed(1))
    settings = AttackSettings(steps=10)
    rows = [
        collect_holdout(monitor, data, settings, progress=False, boundary=0.1).boundary
        for data in (x, [x[i : i + 5] for i in range(0, 12, 5)])
    ]
    assert rows[0] is not None and rows[1] is not None
    torch.testing.assert_close(rows[0].margins, rows[1].margins, equal_nan=True)
    torch.testing.assert_close(rows[0].features, rows[1].features, equal_nan=True)


def test_the_past_copy_moves_away_from_the_sample() -> None:
    x = torch.full((64, 16), 0.5)
    g = torch.Generator().manual_seed(2)
    points = x + 0.1 * torch.randn(x.shape, generator=g).sign()  # inside [0, 1]: no clipping
    rows, _ = boundary_copies(x, points, torch.full((64,), 0.1), 0.05, "Linf", seed=0)
    before = per_sample_norm(points - x, "Linf")
    past = per_sample_norm(rows[:, 1] - x, "Linf")
    assert (past > before).all()


def test_bad_radius_is_refused() -> None:
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="radius"):
        boundary_copies(x, x, torch.zeros(2), 0.0, "Linf")


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_attack_points_lie_on_the_boundary_at_the_margin(norm: str) -> None:
    model = _two_class_linear()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 4, generator=g)
    x[5] = math.nan
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    settings = AttackSettings(norm=norm, steps=20)
    margins, points = attack_points(model, x, pred, settings)
    finite = torch.isfinite(margins)
    assert int(finite.sum()) == 15 and margins[5].isnan()
    torch.testing.assert_close(
        margins[finite], per_sample_norm(points - x, norm)[finite].double(), atol=1e-6, rtol=0
    )
    # Exact: |x0 - x1| / 2 in Linf, / sqrt(2) in L2; the point sits on x0 = x1.
    gap = (x[:, 0] - x[:, 1]).abs().double()
    exact = gap / 2 if norm == "Linf" else gap / math.sqrt(2)
    torch.testing.assert_close(margins[finite], exact[finite], rtol=1e-3, atol=1e-5)
    assert ((points[finite, 0] - points[finite, 1]).abs() < 1e-3).all()
    assert torch.equal(points[5].isnan(), x[5].isnan())
    # The same margins as the engine's own entry point.
    torch.testing.assert_close(margins, attack_batch(model, x, pred, settings), equal_nan=True)


def test_cache_keeps_points_beside_margins(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _two_class_linear()
    settings = AttackSettings(steps=5)
    x, at = torch.rand(4, 4), torch.arange(4)
    cache = MarginCache(tmp_path, model, settings, "brittle")
    margins = torch.tensor([0.1, 0.2, math.inf, 0.3], dtype=torch.float64)
    cache.put(x, at, margins)
    assert cache.get_points(x, at) is None  # stored without points: the attack runs again
    torch.testing.assert_close(cache.get(x, at), margins)
    points = torch.rand(4, 4)
    cache.put(x, at, margins, points)
    got = cache.get_points(x, at)
    assert got is not None
    torch.testing.assert_close(got[0], margins)
    torch.testing.assert_close(got[1], points)
    # Damaged points are never trusted: the entry goes.
    (entry,) = tmp_path.glob("*.pt")
    saved = torch.load(entry, weights_only=True)
    saved["points"] = points + 1
    torch.save(saved, entry)
    assert cache.get_points(x, at) is None and cache.damaged == 1
    assert not entry.exists()


def test_cache_entries_written_at_once_or_failing_leave_one_whole_file(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    # Each put wrote "<entry>.<pid>.tmp": two threads of one process storing the same
    # batch wrote, renamed and replaced one file (FileNotFoundError on a rename), and a
    # failed write left its temporary file in the cache folder.
    model = _two_class_linear()
    cache = MarginCache(tmp_path, model, AttackSettings(steps=5), "brittle")
    x, at = torch.rand(4, 4), torch.arange(4)
    margins = torch.tensor([0.1, 0.2, math.inf, 0.3], dtype=torch.float64)
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def keep_putting() -> None:
        start.wait()
        try:
            for _ in range(60):
                cache.put(x, at, margins)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=keep_putting) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    torch.testing.assert_close(cache.get(x, at), margins)
    assert len(list(tmp_path.iterdir())) == 1  # the entry, no temporary file

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("no space left on device (for the test)")

    monkeypatch.setattr(torch, "save", refuse)
    with pytest.raises(OSError, match="no space left"):
        cache.put(x + 1, at, margins)
    assert len(list(tmp_path.iterdir())) == 1


def test_training_takes_the_boundary_rows_of_its_training_split_only() -> None:
    g = torch.Generator().manual_seed(0)
    n, d, k = 150, 8, 3
    features, logits = torch.randn(n, d, generator=g), torch.randn(n, k, generator=g)
    margins = features[:, 0].exp()
    rows = (
        torch.randn(n, COPIES, d, generator=g),
        torch.randn(n, COPIES, k, generator=g),
        torch.rand(n, COPIES, generator=g),
    )
    rows[2][:10] = math.nan  # samples without a boundary point
    _, plain = train_pseudo_margin(features, logits, margins, hidden=16, max_epochs=2)
    _, info = train_pseudo_margin(features, logits, margins, hidden=16, max_epochs=2, boundary=rows)
    assert plain.n_boundary == 0
    # Seeded split: the same 120 training samples; those among the first ten have no rows.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    train = order[30:]
    assert info.n_train == plain.n_train == 120
    assert info.n_boundary == COPIES * int((train >= 10).sum())
    with pytest.raises(ValueError, match="shapes"):
        train_pseudo_margin(features, logits, margins, boundary=(rows[0][:, 0], *rows[1:]))
    with pytest.raises(ValueError, match="same 150 samples"):
        train_pseudo_margin(
            features,
            logits,
            margins,
            boundary=tuple(t[:-1] for t in rows),  # type: ignore[arg-type]
        )


def test_a_pass_keeps_the_head_view_of_each_boundary_point(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = _two_class_linear()
    monitor = brittle.wrap(model, eps=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(12, 4, generator=g)
    x[2, :2] = 0.5  # exactly on the boundary: margin 0
    settings = AttackSettings(steps=10)
    cache = MarginCache(tmp_path, model, settings, "brittle")
    holdout = collect_holdout(monitor, x, settings, progress=False, boundary=0.1, cache=cache)
    rows = holdout.boundary
    assert rows is not None
    assert rows.features.shape == (12, COPIES, 4) and rows.logits.shape == (12, COPIES, 2)
    finite = torch.from_numpy(holdout.margins).isfinite()
    assert torch.equal(rows.margins[:, 0].isnan(), ~finite)
    assert (rows.margins[finite, 0] == 0).all()
    # The boundary point's logits tie (x0 = x1), up to the bisection's tolerance.
    tie = (rows.logits[finite, 0, 0] - rows.logits[finite, 0, 1]).abs()
    assert (tie < 1e-3).all()
    # A second pass reads the points from the cache: the same rows, no attack.
    again = collect_holdout(monitor, x, settings, progress=False, boundary=0.1, cache=cache)
    assert cache.hits == 1 and again.boundary is not None
    torch.testing.assert_close(again.boundary.logits, rows.logits)
    with pytest.raises(ValueError, match="brittle's engine"):
        collect_holdout(monitor, x, settings, progress=False, boundary=0.1, engine="torchattacks")


@pytest.mark.parametrize("boundary", [True, False])
def test_fit_trains_on_boundary_rows_unless_told_not_to(
    robust_model: nn.Module,
    digits,
    boundary: bool,  # type: ignore[no-untyped-def]
) -> None:
    monitor = brittle.wrap(robust_model, eps=0.1, score="pseudo")
    with pytest.warns(UserWarning, match="trained on only"):
        monitor.fit(
            digits.x_holdout[:400],
            steps=5,
            target_tpr=0.9,
            progress=False,
            pseudo=True,
            pseudo_boundary=boundary,
        )
    info = monitor.report.settings["pseudo"]
    assert info["source"] == "holdout split"
    if boundary:
        # Every training sample with a finite margin gives COPIES rows.
        assert info["n_boundary"] > 0 and info["n_boundary"] % COPIES == 0
        assert "boundary_note" not in info
    else:
        assert info["n_boundary"] == 0 and "natural samples only" in info["boundary_note"]


def test_pseudo_boundary_must_be_a_bool() -> None:
    monitor = brittle.wrap(_two_class_linear(), eps=0.1)
    with pytest.raises(ValueError, match="pseudo_boundary"):
        monitor.fit(torch.rand(8, 4), pseudo_boundary="yes")  # type: ignore[arg-type]


def test_the_progress_bar_counts_what_the_loader_yields(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The bar's total was len(loader.dataset): 12 of 100 samples drawn by a sampler
    # showed as 12/100, and a list of batches as 1 sample.
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    model = _two_class_linear()
    data = TensorDataset(torch.rand(100, 4, generator=torch.Generator().manual_seed(0)))
    settings = AttackSettings(steps=2)
    for loader, shown in (
        (DataLoader(data, batch_size=5, sampler=SubsetRandomSampler(range(12))), "12/12"),
        (DataLoader(data, batch_size=40, drop_last=True), "80/80"),
        ([torch.rand(6, 4)], ": 6sample ["),  # no total: the count alone
    ):
        monitor = brittle.wrap(model, eps=0.1)
        collect_holdout(monitor, loader, settings, progress=True)
        assert shown in capsys.readouterr().err
