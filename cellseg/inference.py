"""Running a trained model on image tiles: device choice, precision and blending.

``Predictor`` turns ``N×H×W×3 uint8`` tiles into softmax probabilities; ``predict_array`` slides it
over an in-memory image with overlapping tiles blended by taper weights (no seams). The whole-slide
pipeline (``predict.py``) uses the same predictor and weights.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from .checkpoint import ModelBundle
from .precision import autocast, resolve_precision, use_channels_last
from .tiling import blend_weights, tile_origins

__all__ = ["Predictor", "blend_weights", "predict_array", "resolve_device", "tile_origins"]

TilePredictor = Callable[[np.ndarray], np.ndarray]


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without a GPU is an error."""
    from .errors import CellsegError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CellsegError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


class Predictor:
    """Callable ``tiles (N×H×W×3 uint8) -> probabilities (N×C×H×W float32)``.

    ``precision`` is ``auto``, ``fp32`` or ``bf16`` (:mod:`cellseg.precision`): ``auto`` runs bf16
    autocast where the device has native bf16 (CUDA with bf16, CPUs with AMX/AVX512-BF16) and fp32
    elsewhere; the resolved choice is in ``self.precision`` (recorded in every output). The model
    uses channels_last where that is faster (:func:`~cellseg.precision.use_channels_last`); on
    CUDA the tiles go through pinned host memory.

    ``tta=True`` averages the softmax over the 8 rotations and reflections of each tile (the
    dihedral group D4: nuclei have no preferred orientation), at 8x the network cost. The average
    is equivariant (up to float rounding): rotating the input rotates the output. Its measured
    effect on the shipped model is in docs/RESULTS.md. The views run batched: up to
    ``max_tta_batch`` view tiles per network call (:meth:`_tta_softmax`; default 128 on CUDA;
    1 on the CPU, i.e. one call per view, which measured faster there).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        device: str = "auto",
        precision: str = "auto",
        compile: bool = False,
        tta: bool = False,
        max_tta_batch: int | None = None,
    ) -> None:
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        self.tta = tta
        # A GPU is fed best by big batches. On this project's CPU (bf16, 1 thread) bigger
        # calls were slower: 8 tiles as 1 call of 64 view tiles took 1.6-2.3x, as 4 calls of
        # 16 1.1-1.2x, and 2 tiles as 2 calls of 8 1.1-1.4x the time of one call per view
        # (benchmarks/README.md), so on the CPU the views keep one call each.
        default_batch = 128 if self.device.type == "cuda" else 1
        self.max_tta_batch = max_tta_batch or default_batch
        self.bundle = bundle
        self.model = bundle.model.to(self.device).eval()
        self.mpp = float(bundle.meta.get("mpp", 0.5))
        self.tile_px = int(bundle.meta.get("tile_px", bundle.config.tile_px))
        # Output channels C: the classes' softmax, then the distance map for distance-head models
        # (the attribute keeps the TilePredictor protocol's name).
        self.num_classes = bundle.config.output_channels
        self._softmax_channels = bundle.config.num_classes
        self.channels_last = use_channels_last(self.precision, self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model = torch.compile(self.model)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(tiles))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.tta:
            return self._softmax(x).cpu().numpy()
        return self._tta_softmax(x).cpu().numpy()

    def _tta_softmax(self, x: torch.Tensor) -> torch.Tensor:
        """Mean softmax (``N×C×H×W`` float32) over the 8 D4 views of ``x`` (``N×3×H×W``).

        The views go through the network together, stacked along the batch axis, in as few
        calls as ``max_tta_batch`` allows (on CUDA one call for a batch of up to 16 square
        tiles): a big batch keeps a GPU busier than 8 calls one after another. Views of
        non-square tiles with an odd number of quarter turns are ``W×H`` and go in calls of
        their own.
        """
        views = [(turns, flip) for turns in range(4) for flip in (False, True)]
        groups: dict[tuple[int, ...], list[tuple[int, bool]]] = {}
        for turns, flip in views:
            shape = tuple(x.shape[2:]) if turns % 2 == 0 else tuple(x.shape[:1:-1])
            groups.setdefault(shape, []).append((turns, flip))
        per_call = max(1, self.max_tta_batch // max(1, len(x)))
        total: torch.Tensor | None = None
        for group in groups.values():
            for start in range(0, len(group), per_call):
                chosen = group[start : start + per_call]
                stacked = torch.cat([_d4_view(x, turns, flip) for turns, flip in chosen])
                if self.channels_last:
                    stacked = stacked.contiguous(memory_format=torch.channels_last)
                probs = self._softmax(stacked).split(len(x))
                for (turns, flip), view_probs in zip(chosen, probs, strict=True):
                    back = _d4_unview(view_probs, turns, flip)
                    total = back if total is None else total + back
        assert total is not None
        return total / len(views)

    def _softmax(self, x: torch.Tensor) -> torch.Tensor:
        """``N×3×H×W`` float in [0, 1] -> ``N×C×H×W`` float32: softmax probabilities of the
        classes, then (distance head) the sigmoid of the distance logit, also in [0, 1]."""
        with self._autocast():
            logits = self.model(x).float()
        k = self._softmax_channels
        if logits.shape[1] == k:
            return torch.softmax(logits, dim=1)
        return torch.cat([torch.softmax(logits[:, :k], dim=1), torch.sigmoid(logits[:, k:])], 1)


def _d4_view(x: torch.Tensor, quarter_turns: int, flip: bool) -> torch.Tensor:
    """One D4 view of ``x`` (``N×C×H×W``): ``quarter_turns`` rotations, then a left-right flip."""
    view = torch.rot90(x, quarter_turns, dims=(2, 3))
    return view.flip(3) if flip else view


def _d4_unview(probs: torch.Tensor, quarter_turns: int, flip: bool) -> torch.Tensor:
    """The inverse of :func:`_d4_view`: maps a view's output back to the input's orientation."""
    probs = probs.flip(3) if flip else probs
    return torch.rot90(probs, -quarter_turns, dims=(2, 3))


def predict_array(
    image: np.ndarray,
    predictor: TilePredictor,
    tile_px: int = 224,
    overlap_px: int = 64,
    batch_size: int = 16,
    num_classes: int | None = None,
) -> np.ndarray:
    """Sliding-window prediction of an ``H×W×3 uint8`` image -> ``C×H×W float32`` probabilities.

    Images smaller than a tile are reflect-padded; overlapping tiles are blended with
    :func:`blend_weights`. The image must already be at the predictor's resolution.
    """
    h, w = image.shape[:2]
    pad_y, pad_x = max(0, tile_px - h), max(0, tile_px - w)
    if pad_y or pad_x:
        image = np.pad(image, ((0, pad_y), (0, pad_x), (0, 0)), mode="reflect")
    ph, pw = image.shape[:2]
    stride = tile_px - overlap_px
    origins = [
        (y, x) for y in tile_origins(ph, tile_px, stride) for x in tile_origins(pw, tile_px, stride)
    ]
    weights = blend_weights(tile_px, overlap_px)
    acc = None
    norm = np.zeros((ph, pw), dtype=np.float32)
    for i in range(0, len(origins), batch_size):
        batch = origins[i : i + batch_size]
        tiles = np.stack([image[y : y + tile_px, x : x + tile_px] for y, x in batch])
        probs = predictor(tiles)
        if acc is None:
            acc = np.zeros((num_classes or probs.shape[1], ph, pw), dtype=np.float32)
        for (y, x), p in zip(batch, probs, strict=True):
            acc[:, y : y + tile_px, x : x + tile_px] += p * weights
            norm[y : y + tile_px, x : x + tile_px] += weights
    return (acc / norm)[:, :h, :w]
