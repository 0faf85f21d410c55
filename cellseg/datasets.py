"""The training datasets of the two presets (SPEC §8.2-8.3) and their domain mixing.

- :class:`PaperDataset`: the whole tile resized to 224² (UCTransNet protocol);
- :class:`WsiDataset`: random 224² crops of tiles at a physical resolution (the shipped model);
- :class:`PatchMosaicDataset`: the same for patches smaller than a crop (CoNSeP), as 2×2 mosaics;
- :class:`BalancedDomains`: several of them, one per dataset, contributing equally.

Items are ``(3×224×224 float32 in [0, 1], 224×224 int64 class targets)``; targets are derived
after the geometric warp (:func:`_warped_targets`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg.augment import AugmentParams, augment_pair, random_resized_box, random_zoom_box
from cellseg.data import Sample
from cellseg.errors import DataError
from cellseg.resample import resize_image, resize_sample
from cellseg.targets import class_targets, paper_label_map, paper_targets_from


def item_rng(seed: int | None, epoch: int, index: int) -> np.random.Generator:
    """The random generator for one dataset item.

    With a ``seed``, the draws depend only on ``(seed, epoch, index)``: identical whatever the
    worker count or order (call ``set_epoch`` each epoch). Without one, the seed is drawn from
    torch's global generator, which ``torch.manual_seed`` fixes in the main process and the
    DataLoader seeds per worker (``base_seed + worker_id``), so runs still repeat with a seed.
    """
    if seed is None:
        return np.random.default_rng(int(torch.randint(0, 2**62, ())))
    return np.random.default_rng([seed, epoch, index])


class EpochSelector:
    """The epoch whose random stream the dataset draws from, shared with DataLoader workers.

    A one-element shared-memory tensor, so ``set_epoch`` in the main process reaches
    *persistent* worker processes too (they keep their own copy of the dataset object).
    """

    def __init__(self) -> None:
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's random stream (only used with a fixed ``seed``)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch)


def _warped_targets(
    image: torch.Tensor,
    label_map: torch.Tensor,
    box,
    out_px: int,
    rng: np.random.Generator,
    params: AugmentParams,
    targets_from,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment (image, label map) together, then derive the class targets from the WARPED map.

    Warping a class target with nearest sampling breaks the 1 px boundary rings under rotation
    and zoom (interior pixels end up touching background); warping the instance labels and
    computing the rings afterwards keeps them closed (issue 9 item 5).
    """
    image_out, labels_out = augment_pair(image, label_map, box, out_px, rng, params)
    targets = targets_from(labels_out.numpy())
    return image_out, torch.from_numpy(targets).long()


def _chw_uint8(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


class PaperDataset(EpochSelector, Dataset):
    """Paper preset (SPEC §8.2-8.3): each whole tile resized to ``size×size``, as UCTransNet.

    Images are resized like ``cv2.resize`` (bilinear, no antialiasing), targets are
    :func:`paper_targets`; both are computed once here. With ``augment``, each item is a
    RandomResizedCrop of the resized tile (area 0.6-1.0, aspect ratio 0.9-1.1) warped back to
    ``size`` together with flips/rotations, then blurred and colour-jittered; the warp moves the
    :func:`paper_label_map` (nearest) and the targets are derived from it afterwards
    (:class:`~cellseg.augment.AugmentParams`). Items are ``(3×size×size float32 in [0, 1],
    size×size int64)``, not normalised (the model normalises).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        augment: bool,
        size: int = 224,
        params: AugmentParams | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.augment = augment
        self.size = size
        self.params = params or AugmentParams()
        self.seed = seed
        self.image_ids = [sample.image_id for sample in samples]
        self.images = [
            _chw_uint8(resize_image(s.image, (size, size), antialias=False)) for s in samples
        ]
        self.label_maps = [torch.from_numpy(paper_label_map(s.labels, size)) for s in samples]
        self.targets = [torch.from_numpy(paper_targets_from(m.numpy())) for m in self.label_maps]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].float() / 255.0
        target = self.targets[index]
        if not self.augment:
            return image, target.long()
        rng = item_rng(self.seed, self.epoch, index)
        box = random_resized_box(self.size, self.size, rng, scale=(0.6, 1.0), ratio=(0.9, 1.1))
        label_map = self.label_maps[index]
        return _warped_targets(
            image, label_map, box, self.size, rng, self.params, paper_targets_from
        )


class WsiDataset(EpochSelector, Dataset):
    """WSI preset: random ``crop_px`` crops at a physical resolution (default 0.5 µm/px).

    Each tile is resized once to ``mpp`` (0.25 → 0.5 µm/px halves 1000 px to 500 px) and its
    :func:`class_targets` computed at that resolution. An epoch draws
    ``crops_per_epoch_per_tile`` crops from every tile (item ``i`` comes from tile
    ``i // crops_per_epoch_per_tile``). With ``augment``, the crop box side is ``crop_px``
    times a zoom uniform in 0.85-1.15 (±15% around the physical mpp), warped with
    flips/rotations and then blurred and colour-jittered; the instance labels are warped with the
    image (nearest) and :func:`class_targets` computed after the warp. Without, it is a plain
    crop of the tile's targets at a
    random whole-pixel position. Items are ``(3×crop_px×crop_px float32 in [0, 1],
    crop_px×crop_px int64)``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        mpp: float = 0.5,
        crop_px: int = 224,
        crops_per_epoch_per_tile: int = 8,
        augment: bool = True,
        params: AugmentParams | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.mpp = mpp
        self.crop_px = crop_px
        self.crops_per_tile = crops_per_epoch_per_tile
        self.augment = augment
        self.params = params or AugmentParams()
        self.seed = seed
        self.image_ids = [sample.image_id for sample in samples]
        self.images: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []  # instance labels at mpp (warped by augmentation)
        self.targets: list[torch.Tensor] = []  # their class targets (plain crops)
        for sample in samples:
            resized = resize_sample(sample, mpp)
            if min(resized.labels.shape) < crop_px:
                raise DataError(
                    f"tile {sample.image_id} is {resized.labels.shape[1]}×"
                    f"{resized.labels.shape[0]} px at {mpp} µm/px, smaller than the "
                    f"{crop_px} px crop"
                )
            self.images.append(_chw_uint8(resized.image))
            self.labels.append(torch.from_numpy(resized.labels.astype(np.int32)))
            self.targets.append(torch.from_numpy(class_targets(resized.labels)))

    def __len__(self) -> int:
        return len(self.images) * self.crops_per_tile

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        tile = index // self.crops_per_tile
        image, target = self.images[tile], self.targets[tile]
        height, width = target.shape
        rng = item_rng(self.seed, self.epoch, index)
        if self.augment:
            box = random_zoom_box(height, width, self.crop_px, rng, zoom=(0.85, 1.15))
            labels = self.labels[tile]
            return _warped_targets(
                image.float() / 255.0, labels, box, self.crop_px, rng, self.params, class_targets
            )
        top = int(rng.integers(height - self.crop_px + 1))
        left = int(rng.integers(width - self.crop_px + 1))
        window = (slice(top, top + self.crop_px), slice(left, left + self.crop_px))
        return image[:, window[0], window[1]].float() / 255.0, target[window].long()


class PatchMosaicDataset(EpochSelector, Dataset):
    """WSI preset for patches smaller than the network tile (CoNSeP: 128 px at 0.5 µm/px).

    Each item is a 2×2 mosaic of four patches of one source tile (drawn afresh per item, without
    replacement when the tile has four), with white padding where patches are smaller than the
    largest, cropped and augmented exactly like :class:`WsiDataset`. Instance ids are made unique
    across the four quadrants, so nuclei cut at a patch edge stay separate instances, as in the
    ground truth; the mosaic's seams are visible edges the network learns to ignore. A mosaic
    uses every pixel of the 224² tile, where padding one patch would waste two thirds of it.
    Items are ``(3×crop_px×crop_px float32 in [0, 1], crop_px×crop_px int64)``; item ``i`` comes
    from group ``i % n_groups``.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        items_per_epoch: int,
        mpp: float = 0.5,
        crop_px: int = 224,
        params: AugmentParams | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.items_per_epoch = items_per_epoch
        self.crop_px = crop_px
        self.params = params or AugmentParams()
        self.seed = seed
        by_group: dict[str, list[Sample]] = {}
        for sample in samples:
            by_group.setdefault(sample.group_id, []).append(resize_sample(sample, mpp))
        self.group_ids = sorted(by_group)
        self.groups = [by_group[g] for g in self.group_ids]
        if not self.groups:
            raise DataError("no training patches")

    def __len__(self) -> int:
        return self.items_per_epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        rng = item_rng(self.seed, self.epoch, index)
        patches = self.groups[index % len(self.groups)]
        chosen = rng.choice(len(patches), size=4, replace=len(patches) < 4)
        image, labels = mosaic([patches[int(i)] for i in chosen])
        height, width = labels.shape
        box = random_zoom_box(height, width, self.crop_px, rng, zoom=(0.85, 1.15))
        return _warped_targets(
            _chw_uint8(image).float() / 255.0,
            torch.from_numpy(labels),
            box,
            self.crop_px,
            rng,
            self.params,
            class_targets,
        )


def mosaic(patches: Sequence[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Four patches as a 2×2 mosaic: ``(2h×2w×3 uint8 image, 2h×2w int32 labels)``.

    ``h``, ``w`` are the largest patch sides; smaller patches are padded with white and
    background. Instance ids of later quadrants are offset so that every nucleus keeps its own id.
    """
    cell_h = max(p.labels.shape[0] for p in patches)
    cell_w = max(p.labels.shape[1] for p in patches)
    image = np.full((2 * cell_h, 2 * cell_w, 3), 255, np.uint8)
    labels = np.zeros((2 * cell_h, 2 * cell_w), np.int32)
    offset = 0
    for k, patch in enumerate(patches[:4]):
        top, left = (k // 2) * cell_h, (k % 2) * cell_w
        h, w = patch.labels.shape
        image[top : top + h, left : left + w] = patch.image
        ids = patch.labels.astype(np.int32)
        labels[top : top + h, left : left + w] = np.where(ids > 0, ids + offset, 0)
        offset += int(ids.max(initial=0))
    return image, labels


class BalancedDomains(torch.utils.data.ConcatDataset):
    """One training set per domain (dataset), each contributing the same number of items per
    epoch, so a small second hospital weighs as much as a large first one; ``set_epoch`` reaches
    every part."""

    def set_epoch(self, epoch: int) -> None:
        for part in self.datasets:
            part.set_epoch(epoch)
