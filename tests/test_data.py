"""MoNuSeg reading, targets, augmentations and datasets (cellseg.data, cellseg.augment)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from PIL import Image

from cellseg import annotations, augment, data, datasets, resample
from cellseg import targets as targets_mod
from cellseg.errors import DataError

SHARED_MONUSEG = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg"
needs_monuseg = pytest.mark.skipif(
    not (SHARED_MONUSEG / "train").is_dir(), reason="shared MoNuSeg data not available"
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# --------------------------------------------------------------------------- file helpers


def write_tif(path: Path, image: np.ndarray, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, image, compression="lzw", **kwargs)


def write_xml(path: Path, regions_xy: list[list[tuple[float, float]]], mpp: str | None) -> None:
    """An ImageScope-style annotation with one Region per polygon."""
    region_xml = "".join(
        f'<Region Id="{i + 1}"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
        + "</Vertices></Region>"
        for i, vertices in enumerate(regions_xy)
    )
    mpp_attr = f' MicronsPerPixel="{mpp}"' if mpp is not None else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'<Annotations{mpp_attr}><Annotation Id="1"><Regions>{region_xml}</Regions>'
        "</Annotation></Annotations>"
    )


def write_png(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint16)).save(path)


def rgb(height: int = 12, width: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


SQUARE = [(2, 3), (7, 3), (7, 8), (2, 8)]  # x 2..7, y 3..8 inclusive: 6 × 6 = 36 pixel centres


# --------------------------------------------------------------------------- layouts


def test_shared_layout_root_means_train_and_xml_wins(tmp_path):
    train = tmp_path / "train"
    write_tif(train / "images" / "a.tif", rgb())
    write_tif(train / "images" / "b.tif", rgb())
    write_xml(train / "annotations" / "a.xml", [SQUARE], "0.2527")
    write_png(train / "instance_masks" / "a.png", np.ones((12, 16)))
    write_png(train / "instance_masks" / "b.png", np.ones((12, 16)))
    write_tif(tmp_path / "test" / "images" / "c.tif", rgb())
    write_xml(tmp_path / "test" / "annotations" / "c.xml", [SQUARE], None)

    from_root = data.find_samples(tmp_path)
    assert from_root == data.find_samples(train)
    assert [s.image_id for s in from_root] == ["a", "b"]
    a, b = from_root
    assert a.xml_path == train / "annotations" / "a.xml"
    assert a.mask_path == train / "instance_masks" / "a.png"
    assert (b.xml_path, b.mask_path) == (None, train / "instance_masks" / "b.png")
    # XML wins over the PNG (which here is all foreground).
    assert (data.load_sample(a).labels > 0).sum() == 36
    assert (data.load_sample(b).labels > 0).all()
    assert [s.image_id for s in data.find_samples(tmp_path / "test")] == ["c"]


def test_official_training_layout(tmp_path):
    folder = tmp_path / "MoNuSeg 2018 Training Data"
    write_tif(folder / "Tissue Images" / "TCGA-x.tif", rgb())
    write_xml(folder / "Annotations" / "TCGA-x.xml", [SQUARE], "0.25")
    (sample,) = data.find_samples(folder)
    assert sample.image_path == folder / "Tissue Images" / "TCGA-x.tif"
    assert sample.xml_path == folder / "Annotations" / "TCGA-x.xml"


def test_official_test_layout_side_by_side(tmp_path):
    for name in ("p", "q"):
        write_tif(tmp_path / f"{name}.tif", rgb())
        write_xml(tmp_path / f"{name}.xml", [SQUARE], "0.25")
    samples = data.find_samples(tmp_path)
    assert [(s.image_id, s.xml_path) for s in samples] == [
        ("p", tmp_path / "p.xml"),
        ("q", tmp_path / "q.xml"),
    ]


# --------------------------------------------------------------------------- errors


def test_missing_annotation_names_the_image(tmp_path):
    write_tif(tmp_path / "images" / "a.tif", rgb())
    write_tif(tmp_path / "images" / "b.tif", rgb())
    write_xml(tmp_path / "annotations" / "a.xml", [SQUARE], None)
    with pytest.raises(DataError, match=r"no annotation for image .*b\.tif") as info:
        data.find_samples(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make", ["empty", "missing"])
def test_folder_without_images_names_the_folder(tmp_path, make):
    folder = tmp_path / "nothing"
    if make == "empty":
        folder.mkdir()
        (folder / "notes.txt").write_text("no images")
    with pytest.raises(DataError, match="nothing"):
        data.find_samples(folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_tif_names_the_file(tmp_path, damage):
    path = tmp_path / "bad.tif"
    if damage == "garbage":
        path.write_bytes(b"II*\x00garbage, not a TIFF")
    else:
        write_tif(path, rgb(64, 64))
        path.write_bytes(path.read_bytes()[:300])
    write_xml(tmp_path / "bad.xml", [SQUARE], None)
    (files,) = data.find_samples(tmp_path)
    with pytest.raises(DataError, match=r"cannot read image .*bad\.tif") as info:
        data.load_sample(files)
    assert "\n" not in str(info.value)


def test_mask_size_mismatch_names_the_mask(tmp_path):
    write_tif(tmp_path / "images" / "a.tif", rgb(12, 16))
    write_png(tmp_path / "instance_masks" / "a.png", np.zeros((12, 15)))
    (files,) = data.find_samples(tmp_path)
    with pytest.raises(DataError, match=r"instance_masks/a\.png is 15×12 px .* 16×12 px"):
        data.load_sample(files)


@pytest.mark.parametrize(
    "text",
    [
        "<Annotations><Region>",  # truncated
        '<!DOCTYPE a [<!ENTITY e "x">]><Annotations>&e;</Annotations>',  # entities refused
        '<Annotations><Region><Vertices><Vertex X="1"/></Vertices></Region></Annotations>',
        '<Annotations MicronsPerPixel="fast"/>',
    ],
)
def test_bad_xml_names_the_file(tmp_path, text):
    write_tif(tmp_path / "a.tif", rgb())
    (tmp_path / "a.xml").write_text(text)
    (files,) = data.find_samples(tmp_path)
    with pytest.raises(DataError, match=r"a\.xml"):
        data.load_sample(files)


# --------------------------------------------------------------------------- XML rasterisation


def test_xml_square_rasterises_to_exact_pixels(tmp_path):
    write_tif(tmp_path / "a.tif", rgb(12, 16))
    write_xml(tmp_path / "a.xml", [SQUARE], "0.2527")
    sample = data.load_sample(data.find_samples(tmp_path)[0])
    expected = np.zeros((12, 16), np.int32)
    expected[3:9, 2:8] = 1
    np.testing.assert_array_equal(sample.labels, expected)
    assert sample.labels.dtype == np.int32
    assert sample.mpp == pytest.approx(0.2527)


def test_overlap_keeps_earlier_region_and_labels_stay_consecutive():
    degenerate = np.array([[0.0, 0.0], [5.0, 5.0]])
    first = np.array(SQUARE, float)
    second = first + np.array([3, 0])  # overlaps columns 5..7 of the first
    hidden = np.array([(3, 4), (5, 4), (5, 6), (3, 6)], float)  # entirely under the first
    outside = np.array([(30, 30), (40, 30), (40, 40)], float)
    labels = annotations.rasterize_polygons([degenerate, first, hidden, second, outside], (12, 16))
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels[3:9, 2:8] == 1).all()
    assert (labels[3:9, 8:11] == 2).all() and (labels == 2).sum() == 18


def test_polygon_is_clipped_to_the_image():
    labels = annotations.rasterize_polygons([np.array(SQUARE, float) + np.array([10, 0])], (12, 16))
    assert (labels > 0).sum() == 6 * 4  # columns 12..15 of 12..17


def test_png_only_gets_default_mpp_and_alpha_and_planar_are_handled(tmp_path):
    image = rgb(12, 16)
    rgba = np.concatenate([image, np.full((12, 16, 1), 7, np.uint8)], axis=2)
    write_tif(tmp_path / "images" / "a.tif", rgba)
    write_tif(
        tmp_path / "images" / "b.tif",
        image.transpose(2, 0, 1).copy(),
        photometric="rgb",
        planarconfig="separate",
    )
    labels = np.zeros((12, 16), np.uint16)
    labels[2:5, 3:9] = 300  # 16-bit ids survive
    write_png(tmp_path / "instance_masks" / "a.png", labels)
    write_png(tmp_path / "instance_masks" / "b.png", labels)
    for files in data.find_samples(tmp_path):
        sample = data.load_sample(files)
        np.testing.assert_array_equal(sample.image, image)
        np.testing.assert_array_equal(sample.labels, labels.astype(np.int32))
        assert sample.mpp == data.DEFAULT_MPP


# --------------------------------------------------------------------------- ids and splits


def test_read_ids_find_ids_file_and_split(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val_ids.txt").write_text("# validation\nb\n\n  d  \n")
    ids_file = data.find_ids_file(tmp_path / "train")
    assert ids_file == tmp_path / "val_ids.txt"
    assert data.find_ids_file(tmp_path / "train", "absent.txt") is None
    val_ids = data.read_ids(ids_file)
    assert val_ids == ["b", "d"]
    files = [data.SampleFiles(name, tmp_path / f"{name}.tif") for name in "abcde"]
    train, val = data.split_samples(files, val_ids)
    assert [f.image_id for f in train] == ["a", "c", "e"]
    assert [f.image_id for f in val] == ["b", "d"]
    with pytest.raises(DataError, match="zz"):
        data.split_samples(files, ["b", "zz"])
    with pytest.raises(DataError, match=r"missing_ids\.txt"):
        data.read_ids(tmp_path / "missing_ids.txt")


# --------------------------------------------------------------------------- targets and resizing


def test_class_targets_separate_touching_squares():
    labels = np.zeros((7, 9), np.int32)
    labels[1:6, 1:5] = 1
    labels[1:6, 5:8] = 2  # touches square 1 along columns 4 | 5
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
            [0, 2, 2, 2, 2, 2, 2, 2, 0],
            [0, 2, 1, 1, 2, 2, 1, 2, 0],
            [0, 2, 1, 1, 2, 2, 1, 2, 0],
            [0, 2, 1, 1, 2, 2, 1, 2, 0],
            [0, 2, 2, 2, 2, 2, 2, 2, 0],
            [0, 0, 0, 0, 0, 0, 0, 0, 0],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(targets_mod.class_targets(labels), expected)
    # An instance cut by the image border has no boundary along the border.
    cut = np.zeros((3, 4), np.int32)
    cut[:, :2] = 5
    np.testing.assert_array_equal(targets_mod.class_targets(cut), [[1, 2, 0, 0]] * 3)


def test_paper_mask_matches_hand_computed_bilinear_taps():
    # 8 → 4: each output samples the 2×2 block around it (weights 1/4), so any foreground
    # pixel in the block makes it foreground.
    labels = np.zeros((8, 8), np.int32)
    labels[5, 2] = 1
    expected = np.zeros((4, 4), bool)
    expected[2, 1] = True
    np.testing.assert_array_equal(targets_mod.paper_mask(labels, 4), expected)
    # 10 → 4: output rows sample source rows (0, 1), (3, 4), (5, 6), (8, 9); rows 2 and 7 are
    # never seen, as with cv2.resize INTER_LINEAR.
    unseen = np.zeros((10, 10), np.int32)
    unseen[2, 2] = unseen[7, 7] = 1
    assert not targets_mod.paper_mask(unseen, 4).any()
    seen = np.zeros((10, 10), np.int32)
    seen[4, 4] = 1
    assert np.argwhere(targets_mod.paper_mask(seen, 4)).tolist() == [[1, 1]]


def test_paper_targets_foreground_is_paper_mask_and_interior_is_enclosed():
    rng = np.random.default_rng(1)
    labels = np.zeros((100, 100), np.int32)
    for label, (y, x) in enumerate(rng.integers(5, 90, (12, 2)), start=1):
        labels[y : y + 9, x : x + 7] = label
    targets = targets_mod.paper_targets(labels, 32)
    np.testing.assert_array_equal(targets > 0, targets_mod.paper_mask(labels, 32))
    assert set(np.unique(targets)) == {0, 1, 2}
    padded = np.pad(targets, 1)
    interior_y, interior_x = np.nonzero(targets == 1)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):  # 4-neighbours are never background
        assert (padded[interior_y + dy, interior_x + dx] > 0).all()


def test_resize_sample_halves_resolution():
    labels = np.kron(np.arange(16, dtype=np.int32).reshape(4, 4), np.ones((2, 2), np.int32))
    image = np.full((8, 8, 3), 77, np.uint8)
    sample = data.Sample("s", image, labels, mpp=0.25)
    half = resample.resize_sample(sample, 0.5)
    assert half.mpp == 0.5
    np.testing.assert_array_equal(half.labels, np.arange(16).reshape(4, 4))
    assert half.image.shape == (4, 4, 3) and (half.image == 77).all()
    assert resample.resize_sample(sample, 0.25) is sample


# --------------------------------------------------------------------------- augmentations


def test_no_augment_full_box_is_identity():
    rng = np.random.default_rng(0)
    image = torch.rand(3, 20, 24)
    target = torch.from_numpy(rng.integers(0, 3, (20, 24)))
    theta = augment.affine_theta(augment.full_box(20, 24), np.eye(2), (20, 24))
    image_out, target_out = augment.warp_pair(image, target, theta, (20, 24))
    torch.testing.assert_close(image_out, image, atol=1e-5, rtol=0)
    assert torch.equal(target_out, target.long())
    square_image, square_target = image[:, :20, :20], target[:20, :20]
    image_out, target_out = augment.augment_pair(
        square_image, square_target, augment.full_box(20, 20), 20, rng, augment.NO_AUGMENT
    )
    torch.testing.assert_close(image_out, square_image, atol=1e-5, rtol=0)
    assert torch.equal(target_out, square_target.long())


@pytest.mark.parametrize(
    ("params", "transforms"),
    [
        (
            augment.AugmentParams(hflip_p=1, vflip_p=0, rot90=False, rotate_p=0),
            [lambda t: t.flip(-1)],
        ),
        (
            augment.AugmentParams(hflip_p=0, vflip_p=0, rot90=True, rotate_p=0),
            [lambda t, k=k: t.rot90(k, (-2, -1)) for k in range(4)],
        ),
    ],
)
def test_flips_and_rot90_are_exact(params, transforms):
    image = torch.rand(3, 16, 16)
    target = torch.randint(0, 3, (16, 16))
    seen = set()
    for seed in range(12):
        rng = np.random.default_rng(seed)
        linear = augment.random_orientation(rng, params)
        theta = augment.affine_theta(augment.full_box(16, 16), linear, (16, 16))
        image_out, target_out = augment.warp_pair(image, target, theta, (16, 16))
        matches = [i for i, f in enumerate(transforms) if torch.equal(target_out, f(target))]
        assert len(matches) == 1
        torch.testing.assert_close(image_out, transforms[matches[0]](image), atol=1e-5, rtol=0)
        seen.add(matches[0])
    assert seen == set(range(len(transforms)))


def _one_hot_pair(size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """A class map of ring-edged blobs and the image whose channels are its one-hot encoding."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    target = torch.zeros(size, size, dtype=torch.long)
    for cy, cx, radius in ((15, 20, 11), (42, 44, 14), (50, 12, 10)):
        distance = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
        target[distance <= radius] = 1
        target[(distance <= radius) & (distance > radius - 4)] = 2
    image = F.one_hot(target, 3).permute(2, 0, 1).float()
    return image, target


@pytest.mark.parametrize("box_kind", ["resized", "zoom"])
def test_augment_keeps_image_and_target_aligned(box_kind):
    image, target = _one_hot_pair()
    params = augment.AugmentParams(blur_p=0, jitter_p=0)  # geometry only
    for seed in range(10):
        rng = np.random.default_rng(seed)
        if box_kind == "resized":
            box = augment.random_resized_box(64, 64, rng)
        else:
            box = augment.random_zoom_box(64, 64, 48, rng)
        image_out, target_out = augment.augment_pair(image, target, box, 48, rng, params)
        assert image_out.shape == (3, 48, 48) and target_out.shape == (48, 48)
        # Each output channel is the bilinear weight of its class among the four taps. The
        # nearest tap is one of them with weight >= 1/4, so the target's class has >= 1/4 ...
        target_weight = image_out.gather(0, target_out[None])[0]
        assert target_weight.min() > 0.25 - 1e-4
        # ... and where all taps agree (weight 1), the target is that class.
        pure = image_out.max(0).values > 1 - 1e-4
        assert pure.sum() > 48 * 48 // 2 and len(target_out[pure].unique()) == 3
        assert torch.equal(image_out.argmax(0)[pure], target_out[pure])


def test_hsv_round_trip_and_hue_rotation():
    image = torch.rand(3, 10, 10)
    torch.testing.assert_close(
        augment.hsv_to_rgb(augment.rgb_to_hsv(image)), image, atol=1e-5, rtol=0
    )
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    torch.testing.assert_close(
        augment.adjust_hue(red, 1 / 3), torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1)
    )
    grey = torch.full((3, 2, 2), 0.4)
    torch.testing.assert_close(augment.adjust_hue(grey, 0.25), grey)


def test_color_jitter_identity_at_zero_strength_and_stays_in_range():
    image = torch.rand(3, 8, 8)
    still = augment.AugmentParams(brightness=0, contrast=0, saturation=0, hue=0)
    jittered = augment.color_jitter(image, np.random.default_rng(0), still)
    torch.testing.assert_close(jittered, image, atol=1e-5, rtol=0)
    strong = augment.AugmentParams(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5)
    for seed in range(5):
        out = augment.color_jitter(image, np.random.default_rng(seed), strong)
        assert out.min() >= 0 and out.max() <= 1 and not torch.equal(out, image)


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((3, 9, 9), 0.3)
    torch.testing.assert_close(augment.gaussian_blur(flat, 1.2), flat)
    impulse = torch.zeros(1, 15, 15)
    impulse[0, 7, 7] = 1
    blurred = augment.gaussian_blur(impulse, 1.0)[0]
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert blurred[7, 7] == blurred.max() and torch.equal(blurred, blurred.T)
    torch.testing.assert_close(blurred, blurred.flip(0))


# --------------------------------------------------------------------------- datasets


def _synthetic_samples(count: int, size: int) -> list[data.Sample]:
    samples = []
    for i in range(count):
        rng = np.random.default_rng(i)
        labels = np.zeros((size, size), np.int32)
        for label, (y, x) in enumerate(rng.integers(0, size - 8, (size // 6, 2)), start=1):
            labels[y : y + 8, x : x + 6] = label
        samples.append(data.Sample(f"t{i}", rgb(size, size, seed=i), labels, 0.25))
    return samples


def test_paper_dataset_items():
    samples = _synthetic_samples(3, 96)
    plain = datasets.PaperDataset(samples, augment=False, size=32)
    assert len(plain) == 3
    image, target = plain[1]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert target.shape == (32, 32) and target.dtype == torch.int64
    np.testing.assert_array_equal(target.numpy(), targets_mod.paper_targets(samples[1].labels, 32))
    expected_image = resample.resize_image(samples[1].image, (32, 32), antialias=False)
    np.testing.assert_array_equal((image * 255).round().byte().permute(1, 2, 0), expected_image)

    augmented = datasets.PaperDataset(samples, augment=True, size=32, seed=5)
    first = augmented[2]
    again = augmented[2]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    augmented.set_epoch(1)
    assert not torch.equal(augmented[2][0], first[0])
    assert first[0].min() >= 0 and first[0].max() <= 1
    assert set(first[1].unique().tolist()) <= {0, 1, 2}


def test_wsi_dataset_resizes_once_and_crops():
    samples = _synthetic_samples(2, 128)
    # Red/green encode the column/row at 0.5 µm/px, so a plain crop shows where it came from.
    yy, xx = np.mgrid[0:128, 0:128]
    for sample in samples:
        sample.image[..., 0] = xx // 2 * 4
        sample.image[..., 1] = yy // 2 * 4
    plain = datasets.WsiDataset(
        samples, mpp=0.5, crop_px=32, crops_per_epoch_per_tile=3, augment=False, seed=0
    )
    assert len(plain) == 6 and plain.images[0].shape == (3, 64, 64)
    for index in range(len(plain)):
        image, target = plain[index]
        assert image.shape == (3, 32, 32) and target.dtype == torch.int64
        columns = (image[0, 0] * 255 / 4).round()
        rows = (image[1, :, 0] * 255 / 4).round()
        assert torch.equal(columns, columns[0] + torch.arange(32)) and torch.equal(
            rows, rows[0] + torch.arange(32)
        )
        window = (
            slice(int(rows[0]), int(rows[0]) + 32),
            slice(int(columns[0]), int(columns[0]) + 32),
        )
        assert torch.equal(target, plain.targets[index // 3][window].long())

    augmented = datasets.WsiDataset(
        samples, mpp=0.5, crop_px=32, crops_per_epoch_per_tile=3, seed=0
    )
    image, target = augmented[4]
    assert image.shape == (3, 32, 32) and target.shape == (32, 32)
    with pytest.raises(DataError, match="t0 is 64×64 px"):
        datasets.WsiDataset(samples, mpp=0.5, crop_px=80)


def test_item_rng_without_seed_follows_torch_seed():
    torch.manual_seed(3)
    first = datasets.item_rng(None, 0, 0).random()
    torch.manual_seed(3)
    assert datasets.item_rng(None, 0, 0).random() == first
    assert datasets.item_rng(7, 1, 2).random() == datasets.item_rng(7, 1, 2).random()
    assert datasets.item_rng(7, 1, 2).random() != datasets.item_rng(7, 2, 2).random()


# --------------------------------------------------------------------------- shared MoNuSeg


def _matched_iou(predicted: np.ndarray, reference: np.ndarray) -> float:
    """Mean over reference nuclei of the best IoU with any predicted nucleus."""
    both = reference > 0
    pairs, overlap = np.unique(
        np.stack([reference[both], predicted[both]]), axis=1, return_counts=True
    )
    reference_area = np.bincount(reference.ravel())
    predicted_area = np.bincount(predicted.ravel(), minlength=predicted.max() + 1)
    keep = pairs[1] > 0
    ref_ids, pred_ids, overlap = pairs[0][keep], pairs[1][keep], overlap[keep]
    iou = overlap / (reference_area[ref_ids] + predicted_area[pred_ids] - overlap)
    best = np.zeros(reference_area.size)
    np.maximum.at(best, ref_ids, iou)
    return float(best[np.unique(reference[both])].mean())


@needs_monuseg
def test_xml_rasterisation_matches_shared_instance_png():
    files = {f.image_id: f for f in data.find_samples(SHARED_MONUSEG)}
    xml_files = files["TCGA-G9-6362-01Z-00-DX1"]
    assert xml_files.xml_path is not None and xml_files.mask_path is not None
    sample = data.load_sample(xml_files)
    png_labels = annotations.read_instance_png(xml_files.mask_path)
    assert sample.image.shape == (1000, 1000, 3) and sample.mpp == pytest.approx(0.252)
    assert sample.labels.max() == png_labels.max()
    assert _matched_iou(sample.labels, png_labels) > 0.99


@needs_monuseg
@pytest.mark.slow
def test_all_shared_tiles_load_and_agree_with_pngs():
    train = data.find_samples(SHARED_MONUSEG)
    test = data.find_samples(SHARED_MONUSEG / "test")
    assert len(train) == 30 and len(test) == 14
    assert sum(f.xml_path is not None for f in train) == 13
    assert all(f.xml_path is not None for f in test)
    assert [f.image_id for f in train] == data.read_ids(SHARED_MONUSEG / "train_ids.txt")
    _, val = data.split_samples(train, data.read_ids(data.find_ids_file(SHARED_MONUSEG)))
    assert tuple(f.image_id for f in val) == data.UCTRANSNET_VAL_IDS

    ious = {}
    for files in train:
        sample = data.load_sample(files)
        assert sample.image.shape == (1000, 1000, 3) and sample.labels.max() > 100
        if files.xml_path is not None:
            ious[files.image_id] = _matched_iou(
                sample.labels, annotations.read_instance_png(files.mask_path)
            )
    # README: 0.98-0.995 except TCGA-B0-5710 (0.90), whose PNG differs from its XML.
    assert min(ious.values()) > 0.89 and sorted(ious.values())[1] > 0.97

    test_samples = [data.load_sample(f) for f in test]
    assert sum(int(s.labels.max()) for s in test_samples) == 6697
    nearest = np.mean(
        [(resample.resize_labels_nearest(s.labels, (224, 224)) > 0).mean() for s in test_samples]
    )
    bilinear = np.mean([targets_mod.paper_mask(s.labels).mean() for s in test_samples])
    assert 0.19 < nearest < bilinear < 1.15 * nearest  # the cv2-linear > 0 dilation (SPEC §8.2)


@needs_monuseg
@pytest.mark.slow
def test_wsi_epoch_of_24_tiles_is_fast():
    files, _ = data.split_samples(data.find_samples(SHARED_MONUSEG), data.UCTRANSNET_VAL_IDS)
    dataset = datasets.WsiDataset([data.load_sample(f) for f in files], seed=0)
    assert len(dataset) == 24 * 8
    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    assert time.perf_counter() - start < 10.0
