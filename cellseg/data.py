"""Finding annotated tiles in a dataset folder, loading them, and splitting them (SPEC §8.1).

Where the rest lives: file formats in :mod:`cellseg.annotations`, class targets in
:mod:`cellseg.targets`, resolution changes in :mod:`cellseg.resample`, the training datasets in
:mod:`cellseg.datasets`.

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

from cellseg.annotations import one_line, read_image, read_instance_png, read_xml_annotation
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
        raise DataError(f"cannot read {path}: {one_line(error)}") from error
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
        raise DataError(f"cannot list folder {folder}: {one_line(error)}") from error


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
        raise DataError(f"cannot read id list {path}: {one_line(error)}") from error
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
