"""MoNuSeg reading, training targets and the two training datasets (SPEC §8.1-8.3).

Layouts accepted by :func:`find_samples` (folder names matched case-insensitively):

- the shared layout ``ROOT/{train,test}/images/*.tif`` with ``annotations/*.xml`` and/or
  ``instance_masks/*.png`` (``ROOT`` itself means ``ROOT/train``);
- the official training download ``Tissue Images/*.tif`` + ``Annotations/*.xml``;
- the official test download, ``.tif`` and ``.xml`` side by side in one folder;
- patch folders such as CoNSeP's: ``ROOT/{train,test}/images/*.{png,jpg,tif}`` with
  ``instance_masks/*.png`` and ``mpp.json`` (``{stem: µm/px}``) beside them. Patches cut from one
  larger tile share a *group* (the stem without its last ``_NNN`` part: ``train_12_003`` belongs to
  ``train_12``), so a validation split can hold out whole tiles (:func:`split_by_group`).

When an image has both an XML and an instance PNG, the XML wins: it is the official annotation
and the PNGs were rendered from it. Array conventions follow docs/ARCHITECTURE.md: images are
``H×W×3 uint8`` RGB, instance label maps ``H×W int32`` (0 = background), class targets
``H×W uint8`` with 0 background, 1 nucleus interior, 2 nucleus boundary.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from defusedxml import DefusedXmlException, ElementTree
from PIL import Image
from skimage.draw import polygon
from skimage.segmentation import find_boundaries, relabel_sequential
from torch.utils.data import Dataset

from cellseg.augment import AugmentParams, augment_pair, random_resized_box, random_zoom_box
from cellseg.errors import DataError

DEFAULT_MPP = 0.25
"""Resolution assumed when the annotation does not give one: MoNuSeg tiles are 40× scans."""

UCTRANSNET_VAL_IDS = (
    "TCGA-18-5592-01Z-00-DX1",
    "TCGA-AY-A8YK-01A-01-TS1",
    "TCGA-E2-A14V-01Z-00-DX1",
    "TCGA-E2-A1B5-01Z-00-DX1",
    "TCGA-G9-6363-01Z-00-DX1",
    "TCGA-HE-7129-01Z-00-DX1",
)
"""The 6 validation tiles of the UCTransNet split (SPEC §8.1), for folders without val_ids.txt."""

_IMAGE_SUFFIXES = (".tif", ".tiff")
_PATCH_IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")  # beside instance_masks/
_MPP_FILE = "mpp.json"
_IMAGE_DIRS = ("images", "tissue images")
_XML_DIRS = ("annotations",)
_MASK_DIRS = ("instance_masks",)


@dataclass(frozen=True)
class SampleFiles:
    """The files of one tile: its image and at least one of XML annotation and instance PNG."""

    image_id: str
    image_path: Path
    xml_path: Path | None = None
    mask_path: Path | None = None
    mpp: float | None = None  # from mpp.json; the XML's MicronsPerPixel wins when present
    group: str | None = None  # the larger tile a patch was cut from (None: the tile itself)


@dataclass(frozen=True, eq=False)
class Sample:
    """One loaded tile: ``image`` H×W×3 uint8 RGB, ``labels`` H×W int32, ``mpp`` in µm/px."""

    image_id: str
    image: np.ndarray
    labels: np.ndarray
    mpp: float
    group: str | None = None  # see SampleFiles.group

    @property
    def group_id(self) -> str:
        """The unit a validation split must keep together: the source tile."""
        return self.group or self.image_id


# --------------------------------------------------------------------------- finding files


def find_samples(root: Path) -> list[SampleFiles]:
    """The tiles under ``root`` in any supported layout, sorted by image id.

    Raises :class:`DataError` for a missing folder, a folder without ``.tif`` images, an image
    without annotation, or two images with the same id.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder not found (or not a folder): {root}")
    folder = _child_dir(root, ("train",)) or root
    image_dir = _child_dir(folder, _IMAGE_DIRS) or folder
    xml_dir = _child_dir(folder, _XML_DIRS)
    mask_dir = _child_dir(folder, _MASK_DIRS)
    mpp_by_stem = _read_mpp_file(folder / _MPP_FILE)
    suffixes = _PATCH_IMAGE_SUFFIXES if mask_dir is not None else _IMAGE_SUFFIXES
    image_paths = [
        path for path in _list_dir(image_dir) if path.is_file() and path.suffix.lower() in suffixes
    ]
    if not image_paths:
        raise DataError(
            f"no images in {image_dir} (expected images/ or 'Tissue Images/' beside "
            "annotations/ or instance_masks/, or .tif and .xml files side by side)"
        )
    samples = [_sample_files(path, xml_dir, mask_dir) for path in image_paths]
    if mpp_by_stem is not None:
        samples = [_with_patch_info(files, mpp_by_stem, folder) for files in samples]
    _check_unique_ids(samples)
    return samples


def _read_mpp_file(path: Path) -> dict[str, float] | None:
    """``mpp.json`` (``{stem: µm/px}``) of a patch folder, or None when there is none."""
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        mpp_by_stem = {str(stem): float(mpp) for stem, mpp in table.items()}
    except (OSError, ValueError, TypeError, AttributeError) as error:
        raise DataError(f"cannot read {path}: {_one_line(error)}") from error
    bad = [stem for stem, mpp in mpp_by_stem.items() if not 0.01 <= mpp <= 100]
    if bad:
        raise DataError(f"{path}: implausible µm/px for {bad[0]}: {mpp_by_stem[bad[0]]}")
    return mpp_by_stem


def _with_patch_info(
    files: SampleFiles, mpp_by_stem: dict[str, float], folder: Path
) -> SampleFiles:
    """Attach the patch's mpp (required in a folder with mpp.json) and its source-tile group."""
    if files.image_id not in mpp_by_stem:
        raise DataError(f"{folder / _MPP_FILE}: no µm/px for image {files.image_id}")
    match = _PATCH_STEM.match(files.image_id)
    group = match.group(1) if match else None
    return dataclasses.replace(files, mpp=mpp_by_stem[files.image_id], group=group)


_PATCH_STEM = re.compile(r"^(.+)_\d+$")


def _list_dir(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; :class:`DataError` if it cannot be listed."""
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        raise DataError(f"cannot list folder {folder}: {_one_line(error)}") from error


def _child_dir(folder: Path, names: Sequence[str]) -> Path | None:
    """The first sub-folder of ``folder`` whose lower-cased name is in ``names``."""
    for child in _list_dir(folder):
        if child.is_dir() and child.name.lower() in names:
            return child
    return None


def _sample_files(image_path: Path, xml_dir: Path | None, mask_dir: Path | None) -> SampleFiles:
    """Pair an image with its annotations: the XML in ``annotations/`` or else beside the image,
    and the PNG in ``instance_masks/``."""
    image_id = image_path.stem
    xml_candidates = [image_path.with_suffix(".xml")]
    if xml_dir is not None:
        xml_candidates.insert(0, xml_dir / f"{image_id}.xml")
    mask_candidates = [mask_dir / f"{image_id}.png"] if mask_dir is not None else []
    xml_path = next((path for path in xml_candidates if path.is_file()), None)
    mask_path = next((path for path in mask_candidates if path.is_file()), None)
    if xml_path is None and mask_path is None:
        expected = " or ".join(str(path) for path in [xml_candidates[0], *mask_candidates])
        raise DataError(f"no annotation for image {image_path} (expected {expected})")
    return SampleFiles(image_id, image_path, xml_path, mask_path)


def _check_unique_ids(samples: Sequence[SampleFiles]) -> None:
    seen: dict[str, Path] = {}
    for files in samples:
        if files.image_id in seen:
            raise DataError(
                f"two images with id {files.image_id}: {seen[files.image_id]} and "
                f"{files.image_path}"
            )
        seen[files.image_id] = files.image_path


def find_ids_file(root: Path, name: str = "val_ids.txt") -> Path | None:
    """``name`` in ``root`` or, when ``root`` is a training folder itself, in its parent."""
    for folder in (Path(root), Path(root).parent):
        if (folder / name).is_file():
            return folder / name
    return None


def read_ids(path: Path) -> list[str]:
    """Image ids from a ``*_ids.txt`` file: one per line; blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read id list {path}: {_one_line(error)}") from error
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


class _HasImageId(Protocol):
    @property
    def image_id(self) -> str: ...


SampleT = TypeVar("SampleT", bound=_HasImageId)


def split_samples(
    samples: Sequence[SampleT], val_ids: Sequence[str]
) -> tuple[list[SampleT], list[SampleT]]:
    """``(train, val)``: the samples whose id is in ``val_ids`` go to ``val``, order kept.

    Works on :class:`SampleFiles` (split before loading) and :class:`Sample` alike.
    """
    wanted = set(val_ids)
    missing = wanted - {sample.image_id for sample in samples}
    if missing:
        raise DataError(f"validation ids not in the dataset: {', '.join(sorted(missing))}")
    train = [sample for sample in samples if sample.image_id not in wanted]
    val = [sample for sample in samples if sample.image_id in wanted]
    return train, val


def split_by_group(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """``(train, val)`` holding out about ``fraction`` of the source tiles (at least one).

    Patches cut from one tile share tissue (and, in CoNSeP's cut, some overlap by 24 px), so a
    split by patch would leak the validation tissue into training: whole groups go one way.
    """
    groups = sorted({sample.group_id for sample in samples})
    if len(groups) < 2:
        raise DataError("need at least two source tiles to hold one out for validation")
    n_val = min(len(groups) - 1, max(1, round(fraction * len(groups))))
    rng = np.random.default_rng(seed)
    val_groups = set(rng.choice(groups, size=n_val, replace=False).tolist())
    train = [sample for sample in samples if sample.group_id not in val_groups]
    val = [sample for sample in samples if sample.group_id in val_groups]
    return train, val


# --------------------------------------------------------------------------- reading files


def load_sample(files: SampleFiles) -> Sample:
    """Read one tile; the XML annotation is preferred over the instance PNG (module docstring).

    ``mpp`` comes from the XML ``MicronsPerPixel`` attribute, else ``mpp.json``, else
    :data:`DEFAULT_MPP`.
    """
    image = read_image(files.image_path)
    shape_hw = image.shape[:2]
    mpp = None
    if files.xml_path is not None:
        labels, mpp = read_xml_annotation(files.xml_path, shape_hw)
    elif files.mask_path is not None:
        labels = read_instance_png(files.mask_path)
        if labels.shape != shape_hw:
            raise DataError(
                f"instance mask {files.mask_path} is {labels.shape[1]}×{labels.shape[0]} px but "
                f"its image is {shape_hw[1]}×{shape_hw[0]} px"
            )
    else:
        raise DataError(f"no annotation for image {files.image_path}")
    mpp = mpp if mpp is not None else files.mpp
    return Sample(files.image_id, image, labels, DEFAULT_MPP if mpp is None else mpp, files.group)


def read_image(path: Path) -> np.ndarray:
    """An RGB tile as ``H×W×3 uint8``: tifffile first, Pillow as fallback; alpha dropped,
    grey replicated."""
    try:
        array = tifffile.imread(path, key=0)
    except Exception as tiff_error:  # decoders raise many types; any of them means "unreadable"
        try:
            with Image.open(path) as image:
                array = np.array(image)  # a writable copy (torch warns on read-only arrays)
        except Exception:
            raise DataError(f"cannot read image {path}: {_one_line(tiff_error)}") from tiff_error
    if array.ndim < 2 or array.size == 0:
        raise DataError(f"cannot read image {path}: no image data")
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[2] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (separate) TIFF: channels first
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
        raise DataError(f"image {path} is not 8-bit RGB (shape {array.shape}, {array.dtype})")
    return np.ascontiguousarray(array[:, :, :3])


def read_instance_png(path: Path) -> np.ndarray:
    """A single-channel instance label PNG (8 or 16 bit) as ``H×W int32``."""
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except Exception as error:  # Pillow raises OSError, ValueError, SyntaxError, ...
        raise DataError(f"cannot read instance mask {path}: {_one_line(error)}") from error
    if array.ndim != 2:
        raise DataError(f"instance mask {path} is not a single-channel label image")
    return array.astype(np.int32)


def read_xml_annotation(path: Path, shape_hw: tuple[int, int]) -> tuple[np.ndarray, float | None]:
    """Rasterise a MoNuSeg (Aperio ImageScope) XML: ``(labels H×W int32, mpp or None)``.

    One ``Region`` per nucleus, ``Vertex`` X/Y in tile pixels. Parsed with defusedxml, since the
    files come from outside; see :func:`rasterize_polygons` for the drawing rules.
    """
    try:
        root = ElementTree.parse(path).getroot()
    except (ElementTree.ParseError, DefusedXmlException, OSError) as error:
        raise DataError(f"cannot parse annotation {path}: {_one_line(error)}") from error
    polygons_xy = [_region_vertices_xy(region, path) for region in root.iter("Region")]
    if not polygons_xy:
        # An annotation without nuclei is almost always the wrong file (or an empty export);
        # accepting it scores the model against empty ground truth.
        raise DataError(f"annotation {path} has no Region (no nucleus outlines)")
    return rasterize_polygons(polygons_xy, shape_hw), _xml_mpp(root, path)


def _region_vertices_xy(region: ElementTree.Element, path: Path) -> np.ndarray:
    """``N×2`` float64 (x, y) vertices of one ``Region``."""
    try:
        vertices = [(float(v.get("X")), float(v.get("Y"))) for v in region.iter("Vertex")]
    except (TypeError, ValueError) as error:
        raise DataError(f"bad vertex in region {region.get('Id')} of {path}") from error
    array = np.asarray(vertices, dtype=np.float64).reshape(-1, 2)
    if not np.isfinite(array).all():
        raise DataError(f"non-finite vertex (NaN or Inf) in region {region.get('Id')} of {path}")
    return array


def _xml_mpp(root: ElementTree.Element, path: Path) -> float | None:
    """The ``MicronsPerPixel`` attribute of the root element, ``None`` when absent or empty."""
    text = (root.get("MicronsPerPixel") or "").strip()
    if not text:
        return None
    try:
        mpp = float(text)
    except ValueError:
        mpp = float("nan")
    if not 0 < mpp < float("inf"):
        raise DataError(f"invalid MicronsPerPixel {text!r} in {path}")
    return mpp


def rasterize_polygons(polygons_xy: Sequence[np.ndarray], shape_hw: tuple[int, int]) -> np.ndarray:
    """Instance label map ``H×W int32`` from ``N×2`` (x, y) polygons, labels 1..N in order.

    - A pixel belongs to a polygon when its centre is inside or on the outline
      (``skimage.draw.polygon``); polygons are clipped to the image. The shared instance PNGs
      were drawn the same way (matched-nucleus IoU 0.97-0.995 on the 13 tiles that have both,
      0.90 on TCGA-B0-5710), so XML and PNG tiles get the same labels. MoNuSeg vertices mostly
      sit on whole pixels, so "on the outline" counts about 8% more pixels than the polygon
      area; a top-left fill rule would match the area, and reproduces the test-set foreground
      of SPEC §8.2 (0.199 nearest, 0.221 paper) where this rule gives 0.215 and 0.238.
    - Where polygons overlap, the EARLIER one keeps the pixel, again as in the shared PNGs: on
      TCGA-21-5784 they agree with first-wins on 97% of overlap pixels, with last-wins on 3%.
    - Polygons with fewer than 3 vertices are skipped; ids of skipped, fully covered or
      off-image polygons are closed up so labels stay consecutive.
    """
    labels = np.zeros(shape_hw, np.int32)
    next_label = 1
    for vertices_xy in polygons_xy:
        if len(vertices_xy) < 3:
            continue
        rows, cols = polygon(vertices_xy[:, 1], vertices_xy[:, 0], shape=shape_hw)
        free = labels[rows, cols] == 0
        labels[rows[free], cols[free]] = next_label
        next_label += 1
    return relabel_sequential(labels)[0].astype(np.int32, copy=False)


def _one_line(error: BaseException) -> str:
    """The first line of an exception's message (messages from decoders can span lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --------------------------------------------------------------------------- targets and resizing


def class_targets(labels: np.ndarray) -> np.ndarray:
    """``H×W uint8`` classes from ``H×W`` instance labels: 0 background, 1 interior, 2 boundary.

    The boundary is each instance's own pixels that 4-touch background or another instance
    (``find_boundaries(mode="inner", connectivity=1)``): 1 px wide against background, and 2 px
    (one per side) between touching nuclei, so interiors of touching nuclei never touch and can
    seed one watershed marker each. Instance edges on the image border are not boundary.
    """
    targets = (labels > 0).astype(np.uint8)
    targets[find_boundaries(labels, connectivity=1, mode="inner")] = 2
    return targets


def paper_mask(labels: np.ndarray, size: int = 224) -> np.ndarray:
    """UCTransNet ground truth (SPEC §8.2): the binary mask resized to ``size×size`` with
    bilinear interpolation as ``cv2.resize`` (half-pixel centres, no antialiasing), then ``> 0``.

    Returns ``size×size bool``. The threshold slightly dilates the nuclei (test-set foreground
    0.221 against 0.198 with nearest resizing, SPEC §8.2); kept for comparability.
    """
    foreground = torch.from_numpy((labels > 0).astype(np.float32))[None, None]
    resized = F.interpolate(
        foreground, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )
    return (resized[0, 0] > 0).numpy()


def paper_targets(labels: np.ndarray, size: int = 224) -> np.ndarray:
    """``size×size uint8`` class targets of the paper preset.

    Foreground is :func:`paper_mask`. Boundary (class 2) is the inner boundary of the
    nearest-resized instance map plus the rim that the bilinear threshold adds around it, so
    every interior pixel lies inside a boundary ring and the rim cannot bridge the interiors
    of neighbouring nuclei. The nearest map lies inside the paper mask (its sample is one of
    the bilinear taps, with weight ≥ 0.5), so binary metrics see exactly :func:`paper_mask`.
    """
    return paper_targets_from(paper_label_map(labels, size))


PAPER_RIM = -1
"""Label of the paper mask's rim in :func:`paper_label_map`: foreground outside every nucleus."""


def paper_label_map(labels: np.ndarray, size: int = 224) -> np.ndarray:
    """``size×size int32``: the nearest-resized instance map, plus :data:`PAPER_RIM` on the
    pixels that only the bilinear :func:`paper_mask` counts as foreground.

    This one map carries both parts of :func:`paper_targets`, so a geometric augmentation can
    warp it (nearest) and derive the targets afterwards with :func:`paper_targets_from`: the
    foreground keeps its SPEC §8.2 meaning and the boundary rings stay closed.
    """
    nearest = resize_labels_nearest(labels, (size, size)).astype(np.int32)
    combined = nearest.copy()
    combined[paper_mask(labels, size) & (nearest == 0)] = PAPER_RIM
    return combined


def paper_targets_from(label_map: np.ndarray) -> np.ndarray:
    """Class targets (``H×W uint8``) of a :func:`paper_label_map` (possibly warped)."""
    foreground = label_map != 0
    nearest = np.where(label_map == PAPER_RIM, 0, label_map)
    boundary = find_boundaries(nearest, connectivity=1, mode="inner") | (nearest == 0)
    targets = foreground.astype(np.uint8)
    targets[boundary & foreground] = 2
    return targets


def resize_labels_nearest(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize sampling at pixel centres (``torch`` ``nearest-exact``)."""
    rows = _nearest_indices(labels.shape[0], size_hw[0])
    cols = _nearest_indices(labels.shape[1], size_hw[1])
    return labels[np.ix_(rows, cols)]


def _nearest_indices(in_px: int, out_px: int) -> np.ndarray:
    centres = (np.arange(out_px) + 0.5) * (in_px / out_px)
    return np.minimum(centres.astype(np.int64), in_px - 1)


def resize_image(image: np.ndarray, size_hw: tuple[int, int], antialias: bool) -> np.ndarray:
    """Bilinear resize of ``H×W×3 uint8`` to ``size_hw`` (half-pixel centres), rounded to uint8.

    ``antialias=False`` reproduces ``cv2.resize`` INTER_LINEAR; ``antialias=True`` widens the
    filter when downsampling (as Pillow), so no aliasing when changing resolution.
    """
    tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float()
    resized = F.interpolate(
        tensor, size=size_hw, mode="bilinear", align_corners=False, antialias=antialias
    )
    return resized[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_sample(sample: Sample, target_mpp: float) -> Sample:
    """``sample`` resampled to about ``target_mpp`` µm/px.

    The image is bilinear with antialiasing when downsampling, labels are nearest. Sizes are
    rounded to whole pixels, so the returned ``mpp`` is the one achieved along x
    (e.g. 0.2527 µm/px at 1000 px → 505 px at 0.50040 µm/px).
    """
    height, width = sample.labels.shape
    factor = sample.mpp / target_mpp
    size_hw = (max(1, round(height * factor)), max(1, round(width * factor)))
    if size_hw == (height, width):
        return sample
    image = resize_image(sample.image, size_hw, antialias=factor < 1)
    labels = resize_labels_nearest(sample.labels, size_hw)
    return Sample(sample.image_id, image, labels, sample.mpp * width / size_hw[1], sample.group)


# --------------------------------------------------------------------------- datasets


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
