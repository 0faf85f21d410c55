"""Synthetic H&E-like tiles with known nuclei, written in the MoNuSeg folder layouts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage.draw import disk


def synthetic_tile(
    size_px: int = 256, n_nuclei: int = 12, radius_px: float = 9, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A pink "tissue" tile with dark purple discs: ``(H×W×3 uint8 image, H×W int32 labels)``."""
    rng = np.random.default_rng(seed)
    image = np.empty((size_px, size_px, 3), np.uint8)
    image[:] = (236, 180, 210)
    labels = np.zeros((size_px, size_px), np.int32)
    for i in range(1, n_nuclei + 1):
        cy, cx = rng.uniform(radius_px, size_px - radius_px, size=2)
        rr, cc = disk((cy, cx), radius_px, shape=labels.shape)
        labels[rr, cc] = i
        image[rr, cc] = (90, 50, 140)
    noise = rng.normal(0, 6, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), labels


def write_monuseg(root: Path, n_images: int = 5, size_px: int = 256, val: int = 1) -> Path:
    """Writes ``root/train/{images,instance_masks}`` and ``root/val_ids.txt``; returns root."""
    (root / "train" / "images").mkdir(parents=True)
    (root / "train" / "instance_masks").mkdir(parents=True)
    ids = [f"TCGA-SYN-{i:02d}" for i in range(n_images)]
    for i, image_id in enumerate(ids):
        image, labels = synthetic_tile(size_px, seed=i)
        tifffile.imwrite(root / "train" / "images" / f"{image_id}.tif", image)
        Image.fromarray(labels.astype(np.uint16)).save(
            root / "train" / "instance_masks" / f"{image_id}.png"
        )
    (root / "val_ids.txt").write_text("\n".join(ids[:val]) + "\n")
    return root


def write_patch_folder(
    root: Path, n_tiles: int = 4, patches_per_tile: int = 4, size_px: int = 64, mpp: float = 0.25
) -> Path:
    """A CoNSeP-like patch folder: ``root/train/{images/*.png, instance_masks/*.png, mpp.json}``,
    stems ``train_<tile>_<patch>`` (patches of one tile form a group); returns root."""
    folder = root / "train"
    (folder / "images").mkdir(parents=True)
    (folder / "instance_masks").mkdir(parents=True)
    mpp_by_stem = {}
    for tile in range(1, n_tiles + 1):
        for patch in range(patches_per_tile):
            stem = f"train_{tile}_{patch:03d}"
            image, labels = synthetic_tile(
                size_px, n_nuclei=4, radius_px=5, seed=tile * 100 + patch
            )
            Image.fromarray(image).save(folder / "images" / f"{stem}.png")
            Image.fromarray(labels.astype(np.uint16)).save(
                folder / "instance_masks" / f"{stem}.png"
            )
            mpp_by_stem[stem] = mpp
    (folder / "mpp.json").write_text(json.dumps(mpp_by_stem))
    return root
