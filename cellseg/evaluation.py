"""Evaluation protocols of ``cellseg evaluate`` (issue 2 point 8, issue 10 point 1; SPEC.md §8.4).

- ``paper``: each tile resized to 224² (UCTransNet lineage), per-image foreground Dice and IoU
  against the cv2-linear>0 resized mask, mean ± std over images.
- ``native``: what users get. Each tile goes through :func:`cellseg.predict.predict_slide` as a
  plain-image slide at its own mpp (same reading at the model's mpp, tiles, blending, precision,
  post-processing and polygons as ``cellseg predict``); the nuclei of the GeoJSON it writes are
  rasterised back onto the ground truth's grid (:func:`polygon_labels`, one id per polygon) and
  scored: Dice, IoU, AJI and PQ (DQ, SQ) per image. Changes to predict's internals therefore
  reach the evaluation with no second implementation to keep in step.

:func:`tune_postprocess` grid-searches the :class:`~cellseg.instances.PostProcess` parameters on
that same path (for *validation* tiles): the network runs once per tile (:class:`TileCache`
remembers its probabilities) and every candidate runs predict's blending, labelling, polygons and
the rasterisation again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from shapely.geometry import Polygon, shape
from skimage.draw import polygon as draw_polygon

from .checkpoint import ModelBundle
from .data import Sample
from .errors import ModelError
from .inference import Predictor
from .instances import PostProcess
from .metrics import dice, instance_metrics, iou, summarize
from .pipeline import TilePredictor
from .predict import PredictOptions, SlideOutputs, predict_slide
from .resample import resize_image
from .targets import paper_mask

PROTOCOLS = ("paper", "native")

# How evaluation runs predict: ``cellseg predict``'s defaults, with reading and labelling in
# threads (PipelineSettings: the number of workers does not change the results; processes would
# cost more to start than a 1000 px tile takes).
EVALUATION_OPTIONS = PredictOptions(workers=0, label_workers=0)

# Stages of :func:`tune_postprocess`: each grid is searched around the best of the stages before
# (coordinate search): thresholds, then minimum areas (0.25 µm² is one pixel at 0.5 µm/px), then
# the thresholds again at the new areas.
_THRESHOLD_GRID: Mapping[str, Sequence[float]] = {
    "fg_threshold": (0.4, 0.5, 0.6, 0.7),
    "marker_threshold": (0.5, 0.6, 0.7, 0.8, 0.9),
}
DEFAULT_TUNING_GRIDS: tuple[Mapping[str, Sequence[float]], ...] = (
    _THRESHOLD_GRID,
    {
        "min_marker_area_um2": (0.25, 0.5, 1.0, 2.0, 4.0),
        "min_area_um2": (2.0, 3.0, 5.0, 8.0),
    },
    _THRESHOLD_GRID,
)
TUNING_METRICS = ("aji", "pq", "dq", "sq", "dice")


# ------------------------------------------------------------------------- polygons -> labels


def polygon_labels(polygons: Sequence[Polygon], shape_hw: tuple[int, int]) -> np.ndarray:
    """``H×W`` int32 instance labels of level-0 polygons, ids 1..N in polygon order.

    Polygons are in predict's (QuPath's) pixel convention: pixel ``(r, c)`` covers ``[c, c+1) ×
    [r, r+1)``, so its centre is ``(c + 0.5, r + 0.5)``. A pixel belongs to a polygon when that
    centre is inside or on the outline (``skimage.draw.polygon`` on the vertices shifted by
    -0.5) and not inside one of its holes. Where polygons overlap the earlier one keeps the
    pixel; a polygon left without pixels (outside the grid, or covered) gets no id, so ids stay
    consecutive.
    """
    labels = np.zeros(shape_hw, np.int32)
    next_id = 1
    for geometry in polygons:
        inside = _centres_inside(geometry.exterior.coords, shape_hw)
        for ring in geometry.interiors:
            inside = np.setdiff1d(inside, _centres_inside(ring.coords, shape_hw))
        free = inside[labels.flat[inside] == 0]
        if len(free):
            labels.flat[free] = next_id
            next_id += 1
    return labels


def _centres_inside(ring_xy: Any, shape_hw: tuple[int, int]) -> np.ndarray:
    """Flat indices of the pixels whose centre is inside or on a ring of (x, y) vertices."""
    xy = np.asarray(ring_xy, dtype=np.float64)
    rows, cols = draw_polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape=shape_hw)
    return rows.astype(np.int64) * shape_hw[1] + cols  # distinct: draw_polygon lists each once


def read_geojson_polygons(path: Path) -> list[Polygon]:
    """The ``geometry`` of every Feature of a GeoJSON FeatureCollection written by predict (the
    nucleus for detections; the cell for ``--object-type cell``), in file order."""
    return [polygon for polygon, _ in read_geojson_nuclei(path)]


def read_geojson_nuclei(path: Path) -> list[tuple[Polygon, dict[str, float]]]:
    """``(geometry, measurements)`` of every Feature predict wrote, in file order (QuPath's
    "NaN"/"Inf" strings read back as floats)."""
    collection = json.loads(Path(path).read_text(encoding="utf-8"))
    return [
        (
            shape(feature["geometry"]),
            {k: float(v) for k, v in feature.get("properties", {}).get("measurements", {}).items()},
        )
        for feature in collection["features"]
    ]


def polygon_match_iou(polygons: Sequence[Polygon], gt: np.ndarray) -> np.ndarray:
    """``N`` float: each polygon's IoU with the true nucleus it overlaps most (0 for none).

    Each polygon is rasterised alone (:func:`polygon_labels`'s pixel-centre rule, holes
    ignored: predict's nuclei have none), so a polygon's label does not depend on the others;
    at IoU >= 0.5 the match is unique (PQ's matching).
    """
    areas = np.bincount(gt.ravel())
    out = np.zeros(len(polygons))
    for i, geometry in enumerate(polygons):
        inside = _centres_inside(geometry.exterior.coords, gt.shape)
        ids = gt.flat[inside]
        ids = ids[ids > 0]
        if not len(ids):
            continue
        counts = np.bincount(ids)
        best = int(counts.argmax())
        overlap = counts[best]
        out[i] = overlap / (len(inside) + areas[best] - overlap)
    return out


# --------------------------------------------------------------------------- the native path


def predict_polygons(
    sample: Sample,
    predictor: TilePredictor,
    options: PredictOptions = EVALUATION_OPTIONS,
    work_dir: Path | None = None,
) -> list[Polygon]:
    """The nucleus polygons ``cellseg predict`` writes for one tile (level-0 pixels)."""
    return [polygon for polygon, _ in predict_nuclei(sample, predictor, options, work_dir)]


def predict_nuclei(
    sample: Sample,
    predictor: TilePredictor,
    options: PredictOptions = EVALUATION_OPTIONS,
    work_dir: Path | None = None,
) -> list[tuple[Polygon, dict[str, float]]]:
    """The nucleus polygons ``cellseg predict`` writes for one tile (level-0 pixels), with their
    measurements (:func:`read_geojson_nuclei`).

    The tile's pixels are saved losslessly as a PNG and run through
    :func:`cellseg.predict.predict_slide` with ``mpp=sample.mpp``; the GeoJSON it writes is read
    back. ``options`` are predict's (``postprocess``: None for the model's own).

    Args:
        sample: the tile (``image`` H×W×3 uint8, ``mpp``).
        predictor: the model (as for predict).
        options: predict's options; ``mpp`` and ``overwrite`` are set here.
        work_dir: where the PNG and GeoJSON are written (removed afterwards); None: a
            temporary folder.
    """
    with _work_folder(work_dir) as folder:
        image_path = folder / "tile.png"
        Image.fromarray(sample.image).save(image_path, compress_level=0)  # fast, lossless
        geojson = folder / "tile.geojson"
        predict_slide(
            image_path,
            predictor,
            SlideOutputs(geojson=geojson),
            replace(options, mpp=sample.mpp, overwrite=True),
        )
        return read_geojson_nuclei(geojson)


@contextmanager
def _work_folder(parent: Path | None) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="cellseg-evaluate-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def score_labels(image_id: str, gt: np.ndarray, pred: np.ndarray) -> dict:
    """One image's row: foreground Dice and IoU, AJI, PQ (DQ, SQ, TP, FP, FN), nucleus counts."""
    pred_fg, gt_fg = pred > 0, gt > 0
    return {
        "image_id": image_id,
        "dice": dice(pred_fg, gt_fg),
        "iou": iou(pred_fg, gt_fg),
        **instance_metrics(gt, pred),
        "nuclei_true": int(len(np.unique(gt)) - (1 if 0 in gt else 0)),
        "nuclei_pred": int(pred.max()),
    }


def evaluate_paper(sample: Sample, predictor: Predictor) -> dict:
    """Per-image foreground Dice/IoU at 224² (SPEC §8.4 DEFAULT protocol)."""
    image = resize_image(sample.image, (224, 224), antialias=False)  # like cv2.INTER_LINEAR
    probs = predictor(image[None])[0]
    pred = (1 - probs[0]) > 0.5
    gt = paper_mask(sample.labels, 224)
    return {"image_id": sample.image_id, "dice": dice(pred, gt), "iou": iou(pred, gt)}


def evaluate_native(
    sample: Sample,
    predictor: TilePredictor,
    options: PredictOptions = EVALUATION_OPTIONS,
    work_dir: Path | None = None,
) -> dict:
    """Dice, IoU, AJI and PQ of what ``cellseg predict`` writes for one tile, on its GT grid."""
    polygons = predict_polygons(sample, predictor, options, work_dir)
    labels = polygon_labels(polygons, sample.labels.shape)
    return score_labels(sample.image_id, sample.labels, labels)


def postprocess_of(bundle: ModelBundle) -> PostProcess:
    """The post-processing parameters stored with a model (defaults if it has none)."""
    try:
        return PostProcess.from_dict(bundle.meta.get("postprocess", {}))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{bundle.path}: invalid post-processing parameters ({exc})") from None


def evaluate(
    bundle: ModelBundle,
    samples: list[Sample],
    protocol: str = "native",
    device: str = "auto",
    post: PostProcess | None = None,
    progress: bool = True,
    tta: bool = False,
    precision: str = "auto",
) -> dict:
    """Runs one protocol over ``samples``; returns per-image rows and their mean ± std.

    ``tta``: average the 8 rotations/reflections of each tile (:class:`Predictor`).
    ``precision``: ``auto``/``fp32``/``bf16`` (:mod:`cellseg.precision`); the resolved one is in
    the result. ``post``: post-processing for the native protocol; None: the model's own (what
    ``cellseg predict`` uses).
    """
    postprocess_of(bundle)  # a bad stored parameter is a ModelError before any work
    predictor = Predictor(bundle, device=device, precision=precision, tta=tta)
    result = evaluate_samples(predictor, samples, protocol, post=post, progress=progress)
    return {"protocol": protocol, "model": bundle.name, **result}


def evaluate_samples(
    predictor: TilePredictor,
    samples: Sequence[Sample],
    protocol: str = "native",
    post: PostProcess | None = None,
    progress: bool = False,
    options: PredictOptions = EVALUATION_OPTIONS,
) -> dict:
    """:func:`evaluate` for any predictor (a :class:`Predictor` or a test oracle).

    Returns ``model_mpp``, ``tta``, ``precision``, ``images``, ``per_image`` rows and their
    ``summary`` (mean ± std); native rows also count ``nuclei_true`` and ``nuclei_pred``.
    """
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}")
    if post is not None:
        options = replace(options, postprocess=post)
    rows = []
    for s in tqdm(samples, desc=f"evaluate ({protocol})", disable=not progress, leave=False):
        if protocol == "paper":
            rows.append(evaluate_paper(s, predictor))
        else:
            rows.append(evaluate_native(s, predictor, options))
    return {
        "model_mpp": float(predictor.mpp),
        "tta": bool(getattr(predictor, "tta", False)),
        "precision": str(getattr(predictor, "precision", "fp32")),
        "images": len(rows),
        "per_image": rows,
        "summary": summarize(rows),
    }


# ------------------------------------------------------------------------------------ tuning


class TileCache:
    """A predictor that runs the model once per distinct tile and remembers its probabilities.

    ``cache(tiles)`` returns, for every ``tile_px×tile_px×3`` tile, the float32 probabilities the
    wrapped predictor gave for the same pixels the first time (keyed by a hash of the bytes), so
    that predict can be run again and again on the same tiles, with other post-processing,
    without the network. Other attributes (``mpp``, ``tile_px``, ``num_classes``, ``precision``,
    ``tta``, ``bundle``) are the wrapped predictor's, so predict's provenance is unchanged.

    Attributes:
        tiles_run: tiles the wrapped predictor was called on.
    """

    def __init__(self, predictor: TilePredictor) -> None:
        self.predictor = predictor
        self.tiles_run = 0
        self._probs: dict[bytes, np.ndarray] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "predictor":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.predictor, name)

    @property
    def tile_probabilities(self) -> Mapping[bytes, np.ndarray]:
        """``{tile key: C×tile_px×tile_px float32}`` of every distinct tile seen so far (the key
        hashes the tile's bytes, so two caches that saw the same tiles share their keys)."""
        return self._probs

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        keys = [hashlib.blake2b(tile.tobytes(), digest_size=16).digest() for tile in tiles]
        first_of = {key: i for i, key in reversed(list(enumerate(keys)))}  # repeats run once
        missing = sorted(i for key, i in first_of.items() if key not in self._probs)
        if missing:
            probs = self.predictor(np.ascontiguousarray(tiles[missing]))
            self.tiles_run += len(missing)
            for i, p in zip(missing, probs, strict=True):
                self._probs[keys[i]] = np.array(p, dtype=np.float32)
        return np.stack([self._probs[key] for key in keys])


def grid_candidates(base: PostProcess, grid: Mapping[str, Sequence[float]]) -> list[PostProcess]:
    """Every combination of the ``grid`` values (``{field: values}``) applied to ``base``."""
    names = list(grid)
    return [
        replace(base, **dict(zip(names, values, strict=True)))
        for values in itertools.product(*(grid[name] for name in names))
    ]


def tune_postprocess(
    predictor: TilePredictor,
    samples: Sequence[Sample] | Mapping[str, Sequence[Sample]],
    base: PostProcess,
    grids: Sequence[Mapping[str, Sequence[float]]] = DEFAULT_TUNING_GRIDS,
    progress: bool = False,
    options: PredictOptions = EVALUATION_OPTIONS,
) -> tuple[PostProcess, list[dict]]:
    """Post-processing with the best mean AJI on ``samples`` (*validation* tiles only), on the
    native path: every candidate is scored as :func:`evaluate_native` scores predict's output.

    The network runs once per tile (:class:`TileCache`); each candidate repeats predict's
    blending, labelling and polygons and the rasterisation onto the ground truth. The grids are
    searched in stages: each stage tries every combination of its fields' values around the best
    parameters so far (``base``, scored first as stage 0), so ``[{fg, marker}, {min areas}]``
    costs the sum of the two grids, not their product. A candidate replaces the best only when
    its AJI is strictly higher (ties keep the earlier one).

    ``samples`` may map domain names to their validation samples (MoNuSeg's 6 tiles, CoNSeP's 80
    patches): each metric is then the mean over domains of the domain means, so that every
    hospital weighs the same, and each row also carries ``<metric>_<domain>``.

    Returns:
        ``(best, rows)``: the best parameters and one row per distinct candidate scored, in
        order: ``stage``, its parameters (``PostProcess.to_dict``) and the mean of each of
        :data:`TUNING_METRICS` over the samples.
    """
    from tqdm import tqdm

    groups = dict(samples) if isinstance(samples, Mapping) else {"": list(samples)}
    if not groups or not all(groups.values()):
        raise ValueError("tune_postprocess needs at least one sample (per domain)")
    cache = predictor if isinstance(predictor, TileCache) else TileCache(predictor)
    scored: dict[PostProcess, dict] = {}
    rows: list[dict] = []

    def score(post: PostProcess, stage: int) -> float:
        if post not in scored:
            per_group = {}
            for name, group in groups.items():
                result = evaluate_samples(cache, group, "native", post=post, options=options)
                per_group[name] = {k: result["summary"][k]["mean"] for k in TUNING_METRICS}
            scored[post] = {
                k: float(np.mean([m[k] for m in per_group.values()])) for k in TUNING_METRICS
            }
            detail = {}
            if len(groups) > 1:
                detail = {f"{k}_{g}": m[k] for g, m in per_group.items() for k in TUNING_METRICS}
            rows.append({"stage": stage, **post.to_dict(), **scored[post], **detail})
        return scored[post]["aji"]

    score(base, 0)  # stage 0: the parameters to improve on
    best = base
    for stage, grid in enumerate(grids, start=1):
        candidates = grid_candidates(best, grid)
        bar = tqdm(candidates, desc=f"tune stage {stage}", disable=not progress, leave=False)
        for post in bar:
            if score(post, stage) > score(best, stage):
                best = post
    return best, rows
