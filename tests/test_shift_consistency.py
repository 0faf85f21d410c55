"""The translation-consistency training term (issue 11 point 1, ``--shift-consistency``)."""

from __future__ import annotations

import json

import pytest
import torch
from synthetic import write_monuseg

from cellseg.losses import shift_consistency_loss
from cellseg.training import TILE_PX, Trainer, TrainOptions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_equal_content_at_the_shift_costs_nothing():
    """B = A moved by (dy, dx): the shared pixels agree exactly, whatever lies outside them."""
    torch.manual_seed(0)
    canvas = torch.randn(2, 4, 40, 50)
    for dy, dx in [(0, 0), (3, 7), (-5, 2), (6, -9), (-4, -4)]:
        a = canvas[..., 10 : 10 + 24, 10 : 10 + 30].clone()
        b = canvas[..., 10 + dy : 10 + dy + 24, 10 + dx : 10 + dx + 30].clone()
        assert shift_consistency_loss(a, b, (dy, dx)) == 0
        assert shift_consistency_loss(a, b, (dy, dx), distance_head=True) == 0
        if (dy, dx) != (0, 0):  # the wrong direction is penalised
            assert shift_consistency_loss(a, b, (-dy, -dx)) > 0


def test_by_hand():
    """One pixel shared (2x2 windows, shift (1, 1)): A's bottom right against B's top left."""
    a = torch.zeros(1, 2, 2, 2)
    b = torch.zeros(1, 2, 2, 2)
    b[0, 0, 0, 0] = float(torch.log(torch.tensor(3.0)))  # softmax (0.75, 0.25) against (0.5, 0.5)
    expected = 2 * 0.25**2
    assert shift_consistency_loss(a, b, (1, 1)).item() == pytest.approx(expected)
    b[0, 0, 1, 1] = 5.0  # outside the shared pixel: no effect
    assert shift_consistency_loss(a, b, (1, 1)).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="no shared pixels"):
        shift_consistency_loss(a, b, (2, 0))


def test_the_term_needs_the_wsi_preset_and_a_shift_inside_the_tile():
    with pytest.raises(ValueError, match="wsi preset"):
        TrainOptions(data="x", preset="paper", shift_consistency=1.0)
    with pytest.raises(ValueError, match="shift_px"):
        TrainOptions(data="x", shift_consistency=1.0, shift_px=TILE_PX)
    assert TrainOptions(data="x").crop_px == TILE_PX
    assert TrainOptions(data="x", shift_consistency=1.0, shift_px=32).crop_px == TILE_PX + 32


def test_a_run_with_the_term_logs_it_and_draws_repeatable_windows(tmp_path):
    data = write_monuseg(tmp_path / "monuseg", n_images=3, size_px=320, val=1)
    opts = TrainOptions(
        data=str(data),
        out=str(tmp_path / "run"),
        model_size="tiny",
        mpp=0.25,
        batch_size=2,
        epochs=1,
        crops_per_tile=1,
        device="cpu",
        threads=1,
        best_after_epoch=0,
        shift_consistency=10.0,
        shift_px=32,
    )
    trainer = Trainer(opts, progress=False)
    x, y = next(iter(trainer.loader))
    assert x.shape == (2, 3, 256, 256) and y.shape == (2, 256, 256)
    windows, targets, (dy, dx) = trainer.shifted_windows(x, y)
    assert windows.shape == (4, 3, TILE_PX, TILE_PX) and targets.shape == (2, TILE_PX, TILE_PX)
    assert abs(dy) <= 32 and abs(dx) <= 32

    # B's window is A's moved by the shift, over the same crop
    def shared(t: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
        return t[..., max(sy, 0) : TILE_PX + min(sy, 0), max(sx, 0) : TILE_PX + min(sx, 0)]

    assert torch.equal(shared(windows[:2], dy, dx), shared(windows[2:], -dy, -dx))
    again = trainer.shifted_windows(x, y)  # same iteration: the same corners (exact resume)
    assert torch.equal(again[0], windows) and again[2] == (dy, dx)
    trainer.run()
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert record["loss_consistency"] > 0
    assert record["loss_total"] == pytest.approx(
        record["loss_cim"]
        + 0.5 * (record["loss_dice"] + record["loss_focal"])
        + 10.0 * record["loss_consistency"],
        rel=1e-5,
    )
