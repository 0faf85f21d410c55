"""Class targets survive augmentation (issue 9 item 5): rings are derived after the warp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import synthetic_tile

from cellseg.augment import AugmentParams, augment_pair, random_zoom_box
from cellseg.data import Sample
from cellseg.datasets import PaperDataset, WsiDataset, item_rng
from cellseg.targets import class_targets, paper_mask, paper_targets

# Strong geometry on every item: rotation always, zoom from the datasets, flips and rot90.
GEOMETRY = AugmentParams(rotate_p=1.0, max_rotate_deg=45.0, blur_p=0.0, jitter_p=0.0)
SEEDS = range(60)
TILE_PX, CROP_PX = 128, 96  # small, so many seeds stay quick


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def crowded_sample(seed: int, mpp: float) -> Sample:
    """A tile with many touching and overlapping discs (later discs cut into earlier ones)."""
    image, labels = synthetic_tile(TILE_PX, n_nuclei=40, radius_px=6, seed=seed)
    return Sample(f"SYN-{seed}", image, labels, mpp)


def interior_touching_background(targets: np.ndarray) -> int:
    """Interior pixels (class 1) with a 4-neighbour of class 0, inside the image."""
    interior, background = targets == 1, targets == 0
    touching = np.zeros_like(interior)
    touching[1:] |= background[:-1]
    touching[:-1] |= background[1:]
    touching[:, 1:] |= background[:, :-1]
    touching[:, :-1] |= background[:, 1:]
    return int((interior & touching).sum())


@pytest.mark.parametrize("preset", ["wsi", "paper"])
def test_no_interior_pixel_touches_background_after_augmentation(preset):
    samples = [crowded_sample(seed, 0.5) for seed in range(2)]
    if preset == "wsi":
        dataset = WsiDataset(samples, mpp=0.5, crop_px=CROP_PX, crops_per_epoch_per_tile=2, seed=0)
    else:
        dataset = PaperDataset(samples, augment=True, size=CROP_PX, seed=0)
    dataset.params = GEOMETRY
    interiors = 0
    for epoch in SEEDS:
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            _, targets = dataset[index]
            targets = targets.numpy()
            assert interior_touching_background(targets) == 0, (epoch, index)
            interiors += int((targets == 1).sum())
    assert interiors > 200 * len(dataset) * len(SEEDS)  # the crops do hold nuclei


def test_warping_the_class_map_instead_breaks_rings():
    """The check above can fail: warping class targets (the old way) leaves interior pixels
    on background under the same rotations and zooms."""
    sample = crowded_sample(0, 0.5)
    image = torch.from_numpy(sample.image.transpose(2, 0, 1).copy()).float() / 255
    warped_classes = torch.from_numpy(class_targets(sample.labels))
    broken = 0
    for seed in SEEDS:
        rng = item_rng(0, seed, 0)
        box = random_zoom_box(TILE_PX, TILE_PX, CROP_PX, rng, zoom=(0.85, 1.15))
        _, targets = augment_pair(image, warped_classes, box, CROP_PX, rng, GEOMETRY)
        broken += interior_touching_background(targets.numpy())
    assert broken > 0


def test_unaugmented_targets_keep_their_meaning():
    sample = crowded_sample(1, 0.25)
    paper = PaperDataset([sample], augment=False, size=CROP_PX)
    _, targets = paper[0]
    np.testing.assert_array_equal(targets.numpy(), paper_targets(sample.labels, CROP_PX))
    np.testing.assert_array_equal(targets.numpy() > 0, paper_mask(sample.labels, CROP_PX))
    augmented = PaperDataset([sample], augment=True, size=CROP_PX, seed=0)
    augmented.params = AugmentParams(
        hflip_p=0, vflip_p=0, rot90=False, rotate_p=0, blur_p=0, jitter_p=0
    )
    _, crop = augmented[0]
    # Without rotation the crop's foreground is the paper mask resampled (nearest): same share.
    assert abs((crop.numpy() > 0).mean() - paper_mask(sample.labels, CROP_PX).mean()) < 0.05
