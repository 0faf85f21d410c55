"""Several training datasets (domains): patch folders, splits by source tile, mosaics, balance,
and the HED stain augmentation (issue 10 points 2 and 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from skimage.color import rgb2hed
from synthetic import write_monuseg, write_patch_folder

from cellseg import augment, data, datasets
from cellseg.augment import AugmentParams
from cellseg.errors import DataError
from cellseg.training import Trainer, TrainOptions


@pytest.fixture(scope="module")
def patches(tmp_path_factory):
    return write_patch_folder(tmp_path_factory.mktemp("patches"), n_tiles=5, mpp=0.25)


def test_patch_folder_gives_mpp_and_source_tile(patches):
    files = data.find_samples(patches)
    assert len(files) == 20
    assert {f.mpp for f in files} == {0.25}
    assert {f.group for f in files} == {f"train_{t}" for t in range(1, 6)}
    sample = data.load_sample(files[0])
    assert sample.mpp == 0.25 and sample.image.shape == (64, 64, 3)
    assert sample.group_id == "train_1" and sample.labels.max() > 0


def test_patch_folder_without_an_mpp_entry_is_an_error(tmp_path):
    root = write_patch_folder(tmp_path, n_tiles=1, patches_per_tile=2)
    table = json.loads((root / "train" / "mpp.json").read_text())
    table.pop("train_1_001")
    (root / "train" / "mpp.json").write_text(json.dumps(table))
    with pytest.raises(DataError, match="no µm/px for image train_1_001"):
        data.find_samples(root)
    (root / "train" / "mpp.json").write_text("{not json")
    with pytest.raises(DataError, match=r"cannot read .*mpp\.json"):
        data.find_samples(root)


def test_split_by_group_never_splits_a_tile(patches):
    samples = [data.load_sample(f) for f in data.find_samples(patches)]
    train, val = data.split_by_group(samples, 0.2, seed=0)
    train_groups = {s.group_id for s in train}
    val_groups = {s.group_id for s in val}
    assert len(val_groups) == 1 and len(train_groups) == 4
    assert not train_groups & val_groups
    assert len(train) + len(val) == len(samples)
    assert data.split_by_group(samples, 0.2, seed=0)[1] == val  # seeded


def test_mosaic_keeps_every_nucleus_its_own_id():
    rng = np.random.default_rng(0)
    patches = []
    for k in range(4):
        labels = np.zeros((10, 12 if k else 8), np.int32)
        labels[2:5, 2:5], labels[6:9, 1:4] = 1, 2
        image = rng.integers(0, 255, (*labels.shape, 3), dtype=np.uint8)
        patches.append(data.Sample(f"p{k}", image, labels, 0.5, "g"))
    image, labels = datasets.mosaic(patches)
    assert image.shape == (20, 24, 3) and labels.shape == (20, 24)
    assert sorted(np.unique(labels)) == list(range(9))  # 4 patches × 2 nuclei, ids 1..8
    np.testing.assert_array_equal(image[:10, :8], patches[0].image)
    np.testing.assert_array_equal(image[10:, 12:], patches[3].image)
    assert (image[:10, 8:12] == 255).all() and (labels[:10, 8:12] == 0).all()  # white padding


def test_mosaic_dataset_items_are_seeded_and_from_one_tile(patches):
    samples = [data.load_sample(f) for f in data.find_samples(patches)]
    ds = datasets.PatchMosaicDataset(samples, items_per_epoch=7, mpp=0.25, crop_px=64, seed=3)
    assert len(ds) == 7
    x, y = ds[2]
    assert x.shape == (3, 64, 64) and y.shape == (64, 64) and x.dtype == torch.float32
    assert set(torch.unique(y).tolist()) <= {0, 1, 2}
    x2, y2 = ds[2]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], x)


def test_two_domains_are_balanced_and_validated_separately(patches, tmp_path):
    monuseg = write_monuseg(tmp_path / "m", n_images=4, size_px=128, val=1)
    opts = TrainOptions(
        data=[str(monuseg), str(patches)],
        out=str(tmp_path / "run"),
        model_size="tiny",
        batch_size=4,
        epochs=1,
        mpp=0.5,
        crops_per_tile=2,
        device="cpu",
        precision="fp32",
        threads=1,
    )
    trainer = Trainer(opts, progress=False)
    names = [d.name for d in trainer.domains]
    assert names == ["m", patches.name]
    parts = trainer.train_set.datasets
    assert isinstance(parts[1], datasets.PatchMosaicDataset)  # 32 px patches at 0.5 µm/px
    assert len(parts[0]) == len(parts[1]) == 2 * 4  # crops_per_tile × most source tiles (4)
    val_groups = {s.group_id for s in trainer.domains[1].val}
    assert val_groups and not val_groups & {s.group_id for s in trainer.domains[1].train}
    summary = trainer.run()
    record = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert set(record["val_dice_by_domain"]) == {"m", patches.name}
    expected = np.mean(list(record["val_dice_by_domain"].values()))
    assert record["val_dice"] == pytest.approx(expected)
    assert summary["epochs"] == 1


def test_paper_preset_takes_one_dataset():
    with pytest.raises(ValueError, match="one dataset"):
        TrainOptions(data=["a", "b"], preset="paper")


def test_hed_round_trip_is_exact_and_matches_scikit_image():
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.uniform(0.05, 1.0, (3, 16, 16))).float()
    stains = augment.rgb_to_hed(image)
    torch.testing.assert_close(augment.hed_to_rgb(stains), image, atol=1e-5, rtol=0)
    reference = rgb2hed(image.permute(1, 2, 0).numpy().astype(np.float64))
    np.testing.assert_allclose(stains.clamp(min=0).permute(1, 2, 0).numpy(), reference, atol=1e-5)


def test_hed_jitter_changes_only_haematoxylin_and_eosin():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.uniform(0.2, 0.9, (3, 8, 8))).float()
    none = AugmentParams(hed_scale=0.0, hed_shift=0.0)
    torch.testing.assert_close(augment.hed_jitter(image, rng, none), image, atol=1e-5, rtol=0)
    out = augment.hed_jitter(image, np.random.default_rng(2), AugmentParams())
    before, after = augment.rgb_to_hed(image), augment.rgb_to_hed(out)
    unclipped = ((out > 0) & (out < 1)).all(dim=0)  # clipping to [0, 1] moves every stain
    assert unclipped.float().mean() > 0.5
    torch.testing.assert_close(after[2][unclipped], before[2][unclipped], atol=1e-4, rtol=0)
    assert (after[:2] - before[:2]).abs().max() > 1e-3  # H and E moved
    assert out.min() >= 0 and out.max() <= 1


def test_the_validation_tiles_do_not_depend_on_the_run_seed(patches):
    from cellseg.training import load_domain

    splits = [load_domain(patches, TrainOptions(data=str(patches), seed=seed)) for seed in (0, 7)]
    assert [s.image_id for s in splits[0].val] == [s.image_id for s in splits[1].val]
