"""Training loop for CausalCellSegmenter and its baselines (``cellseg train``).

A plain, readable loop in the style of nanoGPT's ``train.py``: one options dataclass, the model
config stored in every checkpoint, a JSON-lines log, best/last checkpoints and exact resume
(optimiser, scheduler, CIM memory and RNG state).

Presets (issue 2, SPEC §8.3):
- ``paper``: the whole 1000² tile resized to 224 (UCTransNet protocol), 24 train / 6 val, batch 8,
  AdamW lr 1e-3, cosine over the epoch budget, early stopping on validation Dice.
- ``wsi`` (the shipped model): random 224² crops at a physical resolution (0.5 µm/px by default),
  validated by sliding-window prediction over the full validation tiles. It takes several
  datasets (``--data A --data B``, one *domain* each: a hospital, a scanner): each is resampled
  from its own mpp, contributes the same number of crops per epoch (``data.BalancedDomains``) and
  holds out its own validation tiles; the validation score is the mean over domains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from .atomic import atomic_path, write_atomic
from .augment import AugmentParams
from .causal import CIMConfig, SampleWeighting
from .checkpoint import ModelBundle, file_sha256, load_bundle, save_bundle
from .data import UCTRANSNET_VAL_IDS, Sample, find_samples, load_sample, read_ids, split_by_group
from .datasets import BalancedDomains, PaperDataset, PatchMosaicDataset, WsiDataset
from .errors import DataError
from .inference import Predictor, predict_array, resolve_device
from .instances import PostProcess
from .losses import segmentation_loss, shift_consistency_loss
from .metrics import dice
from .model import ModelConfig, build_model, count_flops, count_parameters
from .precision import autocast, resolve_precision, use_channels_last
from .resample import resize_sample
from .targets import distance_targets

log = logging.getLogger(__name__)

PRESETS = ("paper", "wsi")
# Held-out tiles of datasets without val_ids.txt are drawn with this seed, not the run's: runs
# with different seeds (ablations, repeats) must be compared on the same validation tiles.
VAL_SPLIT_SEED = 0
MODEL_SIZES = ("default", "paper", "tiny")
TILE_PX = 224  # the network tile, the product's promise (predict feeds the same size)
SHIFT_STREAM = 11  # separates the shift-consistency draws from the other seeded streams


@dataclass
class TrainOptions:
    """Everything that defines a run; saved as ``options.json`` in the run folder."""

    data: str | list[str]  # one folder, or several (wsi preset): one domain each
    out: str = "runs/cellseg"
    preset: str = "wsi"
    arch: str = "causal"
    model_size: str = "default"
    epochs: int | None = None  # None: 400 (paper) / 150 (wsi)
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 1e-2
    min_lr: float = 1e-6
    patience: int = 50  # early stopping on validation Dice (UCTransNet: 50)
    best_after_epoch: int = 5  # ignore the noisy first epochs when keeping the best model
    use_cim: bool = True
    use_dac: bool = True
    num_classes: int = 3
    distance_head: bool = False  # issue 10 point 4: regress a distance map, seed instances on it
    mpp: float = 0.5  # wsi preset: physical resolution of the crops
    crops_per_tile: int = 8  # wsi preset: random crops per training tile per epoch
    val_overlap_px: int = 64
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 (cellseg.precision); resolved per machine
    seed: int = 0
    threads: int | None = None
    workers: int = 0  # DataLoader worker processes (0: augment in the main process)
    compile: bool = False  # torch.compile (minutes to compile on the CPU, no gain shown; off)
    init_from: str | None = None  # fine-tune: start from this bundle's weights (fresh optimiser)
    stain_aug: bool = True  # wsi preset: HED stain augmentation (augment.hed_jitter)
    val_fraction: float = 0.2  # datasets without val_ids.txt: share of source tiles held out
    # Issue 11, beyond the paper: weight of the translation-consistency term (0: off). Crops are
    # then tile_px + shift_px wide and two tile_px windows of each, up to shift_px apart, must
    # predict the same on their shared pixels (losses.shift_consistency_loss).
    shift_consistency: float = 0.0
    shift_px: int = 64

    def __post_init__(self) -> None:
        if isinstance(self.data, list | tuple) and len(self.data) == 1:
            self.data = str(self.data[0])
        if isinstance(self.data, list | tuple):
            self.data = [str(d) for d in self.data]
            if self.preset == "paper":
                raise ValueError("the paper preset trains on one dataset (give --data once)")
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}")
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model size must be one of {MODEL_SIZES}")
        if self.shift_consistency < 0 or not 0 < self.shift_px < TILE_PX:
            raise ValueError(f"shift consistency needs a weight >= 0 and 0 < shift_px < {TILE_PX}")
        if self.shift_consistency and self.preset == "paper":
            raise ValueError("shift consistency is for the wsi preset (its crops can be wider)")

    @property
    def crop_px(self) -> int:
        """Side of the training crops: the tile, widened for the two shifted windows."""
        return TILE_PX + self.shift_px if self.shift_consistency else TILE_PX

    @property
    def data_roots(self) -> list[str]:
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @property
    def epoch_budget(self) -> int:
        return self.epochs or (400 if self.preset == "paper" else 150)

    def model_config(self) -> ModelConfig:
        kwargs = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "use_dac": self.use_dac,
            "distance_head": self.distance_head,
        }
        if self.model_size == "paper":
            return ModelConfig.paper(**kwargs)
        if self.model_size == "tiny":
            return ModelConfig.tiny(**kwargs)
        return ModelConfig(**kwargs)


def inherit_weights(model: torch.nn.Module, source: torch.nn.Module) -> None:
    """Copies ``source``'s weights into ``model`` (same architecture). Where ``model`` has more
    output channels (a distance head on a class model), the 1×1 head's first rows come from
    ``source`` and the extra row keeps its fresh initialisation, so the class logits of the two
    models are equal at the start."""
    state = model.state_dict()
    for name, value in source.state_dict().items():
        if value.shape == state[name].shape:
            state[name] = value
        elif value.shape[1:] == state[name].shape[1:] and value.shape[0] < state[name].shape[0]:
            state[name] = torch.cat([value, state[name][value.shape[0] :]])
        else:
            raise ValueError(f"{name}: shape {tuple(value.shape)} cannot fill {state[name].shape}")
    model.load_state_dict(state)


def resolve_training_folder(data: Path) -> tuple[Path, Path | None]:
    """``--data`` may be the MoNuSeg root (with ``train/``) or the training folder itself.

    Returns the training folder and the ``val_ids.txt`` beside it or in its parent, if any.
    """
    data = Path(data)
    if not data.is_dir():
        raise DataError(f"{data}: data folder not found")
    train = data / "train" if (data / "train").is_dir() else data
    for candidate in (train / "val_ids.txt", train.parent / "val_ids.txt"):
        if candidate.is_file():
            return train, candidate
    return train, None


@dataclass(eq=False)
class Domain:
    """One training dataset (a hospital, a scanner): its folder, training and validation tiles."""

    name: str
    folder: Path
    train: list[Sample]
    val: list[Sample]
    val_resized: list[Sample] = dataclasses.field(default_factory=list)

    def needs_mosaic(self, mpp: float, crop_px: int) -> bool:
        """Whether its images are smaller than a crop at ``mpp`` (then 2×2 mosaics are cut)."""
        return any(min(s.labels.shape) * s.mpp / mpp < crop_px for s in self.train)


def load_domain(root: Path, opts: TrainOptions) -> Domain:
    """Read one ``--data`` folder and split it: ``val_ids.txt`` (or the UCTransNet ids) where
    there is one, else ``opts.val_fraction`` of its source tiles (whole tiles: never by patch)."""
    folder, val_ids_file = resolve_training_folder(root)
    samples = [load_sample(f) for f in find_samples(folder)]
    grouped = any(s.group is not None for s in samples)
    if grouped and val_ids_file is None:
        train, val = split_by_group(samples, opts.val_fraction, VAL_SPLIT_SEED)
    else:
        train, val = split_train_val(samples, val_ids_file, VAL_SPLIT_SEED)
    name = root.name if root.name.lower() not in ("train", "") else root.parent.name
    return Domain(name, folder, train, val)


def split_train_val(
    samples: list[Sample], val_ids_file: Path | None, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """The UCTransNet 24/6 split (``val_ids.txt`` or built-in ids), else a seeded 20 % hold-out."""
    if val_ids_file is not None:
        val_ids = set(read_ids(val_ids_file))
        unknown = val_ids - {s.image_id for s in samples}
        if unknown:
            raise DataError(f"{val_ids_file}: ids not in the training folder: {sorted(unknown)}")
    elif set(UCTRANSNET_VAL_IDS) <= {s.image_id for s in samples}:
        val_ids = set(UCTRANSNET_VAL_IDS)  # official download layouts carry no val_ids.txt
    else:
        rng = np.random.default_rng(seed)
        ids = sorted(s.image_id for s in samples)
        n_val = max(1, round(0.2 * len(ids)))
        val_ids = set(rng.choice(ids, size=n_val, replace=False).tolist())
    train = [s for s in samples if s.image_id not in val_ids]
    val = [s for s in samples if s.image_id in val_ids]
    if not train or not val:
        raise DataError("need at least one training and one validation image")
    return train, val


def cosine_lr(opts: TrainOptions, optimizer: torch.optim.Optimizer):
    """CosineAnnealingLR over the epoch budget, stepped once per epoch (SPEC §8.3 DEFAULT)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=opts.epoch_budget, eta_min=opts.min_lr
    )


class Trainer:
    """Owns the model, optimiser, scheduler, CIM and data of one run.

    Three random streams, each restored on resume: torch's global generator (weight init,
    dropout), ``data_generator`` (CPU: the DataLoader's shuffling) and ``cim_generator`` (on the
    training device: the CIM's random Fourier features). Keeping the CIM's draws off the data
    generator makes the data order of a ``--no-cim`` run equal to a CIM run's (the ablation sees
    the same batches); keeping them on the device lets CUDA draw them (a CPU generator cannot).
    Augmentation draws depend only on (seed, epoch, item) (``data.item_rng``).
    """

    def __init__(self, opts: TrainOptions, progress: bool = True) -> None:
        self.opts = opts
        self.progress = progress
        self.out = Path(opts.out)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.device = resolve_device(opts.device)
        self.precision = resolve_precision(opts.precision, self.device)
        self.channels_last = use_channels_last(self.precision, self.device)
        torch.manual_seed(opts.seed)
        self.data_generator = torch.Generator().manual_seed(opts.seed)
        self.cim_generator = torch.Generator(device=self.device).manual_seed(opts.seed + 1)
        self._load_data()
        self.model_config = opts.model_config()
        self.model = build_model(self.model_config).to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay
        )
        self.scheduler = cosine_lr(opts, self.optimizer)
        self.cim = SampleWeighting(
            self.model_config.widths[-1], CIMConfig(memory_size=opts.batch_size)
        ).to(self.device)
        # fp32 and bf16 need no loss scaling (bf16 has fp32's exponent range); the scaler stays
        # in the training state so that state files keep one layout.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.step_model = torch.compile(self.model) if opts.compile else self.model
        self.epoch = 0
        self.best_dice = -1.0
        self.best_epoch = -1
        self.iteration = 0

    # ----------------------------------------------------------------- data
    def _load_data(self) -> None:
        self.domains = [load_domain(Path(root), self.opts) for root in self.opts.data_roots]
        names = [d.name for d in self.domains]
        for i, domain in enumerate(self.domains):
            if names.count(domain.name) > 1:
                domain.name = f"{domain.name}-{i}"
        self.train_samples = [s for d in self.domains for s in d.train]
        self.val_samples = [s for d in self.domains for s in d.val]
        train_dir = ", ".join(str(d.folder) for d in self.domains)
        samples = self.train_samples + self.val_samples
        self.source_mpp = float(np.median([s.mpp for s in samples]))
        if self.opts.preset == "paper":
            self.train_set = PaperDataset(self.train_samples, augment=True, seed=self.opts.seed)
            self.val_set = PaperDataset(self.val_samples, augment=False)
            # The whole tile is squeezed into 224 px, so the effective resolution is coarser.
            side = np.median([s.image.shape[1] for s in samples])
            self.model_mpp = float(self.source_mpp * side / 224)
        else:
            self.train_set = self._wsi_train_set()
            for domain in self.domains:
                domain.val_resized = [resize_sample(s, self.opts.mpp) for s in domain.val]
            self.val_resized = [s for d in self.domains for s in d.val_resized]
            self.model_mpp = self.opts.mpp
        if len(self.train_set) < self.opts.batch_size:
            raise DataError(
                f"{train_dir}: {len(self.train_set)} training items, fewer than one batch"
            )
        # drop_last: the CIM memory update expects full batches (SPEC §4 implementation notes).
        # Workers augment the next batches beside the step; persistent, so they are forked once
        # (the datasets share their epoch with them, data.EpochSelector).
        workers = self.opts.workers
        self.loader = DataLoader(
            self.train_set,
            batch_size=self.opts.batch_size,
            shuffle=True,
            drop_last=True,
            generator=self.data_generator,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=2 if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
        )

    def _wsi_train_set(self):
        """One dataset per domain, each ``crops_per_tile × (most source tiles of any domain)``
        items long; a single domain is the plain :class:`WsiDataset` of earlier versions."""
        params = AugmentParams(hed_p=0.5 if self.opts.stain_aug else 0.0)
        units = [len({s.group_id for s in d.train}) for d in self.domains]
        items = self.opts.crops_per_tile * max(units)
        parts = []
        for domain, n_units in zip(self.domains, units, strict=True):
            common = {"mpp": self.opts.mpp, "crop_px": self.opts.crop_px, "params": params}
            if domain.needs_mosaic(self.opts.mpp, self.opts.crop_px):
                parts.append(PatchMosaicDataset(domain.train, items, seed=self.opts.seed, **common))
            else:
                per_tile = math.ceil(items / n_units)
                parts.append(
                    WsiDataset(
                        domain.train,
                        crops_per_epoch_per_tile=per_tile,
                        augment=True,
                        seed=self.opts.seed,
                        **common,
                    )
                )
        return parts[0] if len(parts) == 1 else BalancedDomains(parts)

    # ------------------------------------------------------------ training
    def _autocast(self):
        return autocast(self.precision, self.device)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One optimiser step on a batch; returns the loss terms as detached device tensors
        (no host synchronisation: the caller sums them on the device)."""
        shift_yx = None
        if self.opts.shift_consistency:
            x, y, shift_yx = self.shifted_windows(x, y)
        distance = None
        if self.model_config.distance_head:  # from the class map on the host (scipy)
            distance = torch.from_numpy(distance_targets(y.numpy())).to(self.device)
        x, y = self._to_device(x), y.to(self.device, non_blocking=True)
        with self._autocast():
            logits, f5 = self.step_model(x, return_bottleneck=True)
        if shift_yx is not None:  # one forward pass for both windows; A's half is supervised
            logits, logits_b = logits.chunk(2)
            f5 = f5.chunk(2)[0]
        weights = None
        terms = {}
        if self.opts.use_cim:
            z = f5.detach().float().mean(dim=(2, 3))  # GAP(f5): B×d (SPEC §4 point 1)
            weights = self.cim(z, self.epoch, step, generator=self.cim_generator)
            rel = weights.detach() * weights.numel()  # relative to uniform (1 = uniform)
            terms |= {"cim_weight_min": rel.min(), "cim_weight_max": rel.max()}
            terms["cim_weight_std"] = rel.std(correction=0)
        loss = segmentation_loss(logits, y, weights, distance_target=distance)
        if shift_yx is not None:
            head = self.model_config.distance_head
            loss.consistency = shift_consistency_loss(logits, logits_b, shift_yx, head)
            loss.total = loss.total + self.opts.shift_consistency * loss.consistency
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss.total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.iteration += 1
        terms |= {
            f"loss_{k}": v.detach() for k in loss.NAMES if (v := getattr(loss, k)) is not None
        }
        return terms

    def shifted_windows(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Two ``tile_px`` windows A and B of every crop, at corners drawn per step.

        Args:
            x: ``B×3×S×S`` crops, ``S = tile_px + shift_px``; y: ``B×S×S`` their class targets.

        Returns:
            ``(2B×3×T×T windows, A then B; B×T×T targets of A; B's shift from A, (dy, dx))``.
            The corners depend only on (seed, iteration), so a resumed run draws the same ones.
        """
        rng = np.random.default_rng([self.opts.seed, SHIFT_STREAM, self.iteration])
        top_a, left_a, top_b, left_b = (int(v) for v in rng.integers(0, self.opts.shift_px + 1, 4))

        def window(t: torch.Tensor, top: int, left: int) -> torch.Tensor:
            return t[..., top : top + TILE_PX, left : left + TILE_PX]

        windows = torch.cat([window(x, top_a, left_a), window(x, top_b, left_b)])
        return windows, window(y, top_a, left_a), (top_b - top_a, left_b - left_a)

    def train_epoch(self) -> dict:
        """One pass over the training set; returns the epoch means for the log."""
        from tqdm import tqdm

        self.model.train()
        self.train_set.set_epoch(self.epoch)  # seeded augmentation stream of this epoch
        sums: dict[str, torch.Tensor] = {}
        bar = tqdm(
            self.loader,
            desc=f"epoch {self.epoch + 1}/{self.opts.epoch_budget}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for step, (x, y) in enumerate(bar):
            for k, v in self.train_step(x, y, step).items():
                sums[k] = sums[k] + v if k in sums else v
            if self.progress and step % 10 == 9:  # a host sync only for the progress bar
                bar.set_postfix(loss=f"{float(sums['loss_total']) / (step + 1):.4f}")
        n = max(1, len(self.loader))
        return {k: float(v) / n for k, v in sums.items()}

    @torch.no_grad()
    def validate(self) -> float:
        """Mean per-image foreground Dice on the validation tiles."""
        self.model.eval()
        scores = []
        if self.opts.preset == "paper":
            for x, y in DataLoader(self.val_set, batch_size=self.opts.batch_size):
                with self._autocast():
                    logits = self.model(self._to_device(x))
                classes = logits[:, : self.model_config.num_classes].float()
                fg = (1 - torch.softmax(classes, dim=1)[:, 0]).cpu().numpy() > 0.5
                scores += [dice(p, t > 0) for p, t in zip(fg, y.numpy() > 0, strict=True)]
        else:
            # The predictor and blending of `cellseg predict`, at the training precision.
            meta = {"name": self.out.name, "mpp": self.model_mpp, "tile_px": 224}
            bundle = ModelBundle(self.model, self.model_config, meta)
            predictor = Predictor(bundle, device=str(self.device), precision=self.precision)
            self.val_dice_by_domain = {}
            for domain in self.domains:
                domain_scores = []
                for s in domain.val_resized:
                    probs = predict_array(s.image, predictor, 224, self.opts.val_overlap_px)
                    domain_scores.append(dice((1 - probs[0]) > 0.5, s.labels > 0))
                self.val_dice_by_domain[domain.name] = float(np.mean(domain_scores))
            # Each domain weighs the same, like in training (CoNSeP has 80 patches, MoNuSeg 6).
            scores = list(self.val_dice_by_domain.values())
        return float(np.mean(scores))

    # --------------------------------------------------------- checkpoints
    def bundle_meta(self, val_dice: float) -> dict:
        return {
            "name": self.out.name,
            "preset": self.opts.preset,
            "mpp": self.model_mpp,
            "tile_px": 224,
            "classes": ["background", "nucleus", "boundary"][: self.model_config.num_classes],
            "postprocess": PostProcess().to_dict(),
            "epoch": self.epoch,
            "val_dice": val_dice,
            "use_cim": self.opts.use_cim,
            "precision": self.precision,
            "seed": self.opts.seed,
            "init_from": self.opts.init_from,
            "train_ids": sorted(s.image_id for s in self.train_samples),
            "val_ids": sorted(s.image_id for s in self.val_samples),
            "datasets": {
                d.name: {"folder": str(d.folder), "train": len(d.train), "val": len(d.val)}
                for d in getattr(self, "domains", [])
            },
            "stain_aug": self.opts.stain_aug,
            "shift_consistency": self.opts.shift_consistency,
            "normalisation": "inside the model (ImageNet mean/std on [0, 1] RGB)",
            "cellseg_version": __version__,
        }

    def rng_state(self) -> dict:
        """Every random stream of the run (see the class docstring), for exact resume."""
        state = {
            "torch_rng": torch.get_rng_state(),
            "data_rng": self.data_generator.get_state(),
            "cim_rng": self.cim_generator.get_state(),
            "numpy_rng": _numpy_rng_state(),
            "python_rng": json.dumps(random.getstate()),
        }
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def set_rng_state(self, state: dict) -> None:
        if "data_rng" not in state:  # an older state file: one shared generator
            log.warning("resuming a run saved by an older cellseg: the CIM's stream restarts")
            torch.set_rng_state(state["torch_rng"].cpu())
            self.data_generator.set_state(state["generator_rng"].cpu())
            return
        torch.set_rng_state(state["torch_rng"].cpu())
        self.data_generator.set_state(state["data_rng"].cpu())
        self.cim_generator.set_state(state["cim_rng"].cpu())
        name, keys, pos, has_gauss, cached = state["numpy_rng"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        version, internal, gauss = json.loads(state["python_rng"])
        random.setstate((version, tuple(internal), gauss))
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)

    def save_state(self) -> None:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "cim": self.cim.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "precision": self.precision,
            **self.rng_state(),
        }
        with atomic_path(self.out / "last_state.pt") as tmp:
            torch.save(state, tmp)

    def load_state(self) -> None:
        path = self.out / "last_state.pt"
        if not path.is_file():
            raise DataError(f"{path}: nothing to resume (no last_state.pt in the run folder)")
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.cim.load_state_dict(state["cim"])
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.best_dice = float(state["best_dice"])
        self.best_epoch = int(state["best_epoch"])
        self.set_rng_state(state)
        self._fit_schedule_to_budget()

    def _fit_schedule_to_budget(self) -> None:
        """A resume with another ``--epochs`` re-targets the cosine at the new budget (closed
        form at the current epoch); with the same budget the restored schedule is untouched."""
        budget = self.opts.epoch_budget
        if self.scheduler.T_max == budget:
            return
        self.scheduler.T_max = budget
        progress = min(self.epoch, budget) / budget
        for group, base_lr in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, strict=True
        ):
            lr = (
                self.opts.min_lr
                + (base_lr - self.opts.min_lr) * (1 + math.cos(math.pi * progress)) / 2
            )
            group["lr"] = lr
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def load_init_weights(self) -> str:
        """Copies the weights of ``opts.init_from`` into the model; returns the file's SHA-256.

        A warm restart (SGDR, Loshchilov & Hutter 2017): the optimiser, schedule and CIM memory
        start fresh, only the weights are inherited. The bundle must have this run's config,
        except that a model without a distance head may start one with a distance head: every
        weight is copied and the head's extra output channel keeps its fresh initialisation.
        """
        bundle = load_bundle(self.opts.init_from)
        ours, theirs = self.model_config.to_dict(), bundle.config.to_dict()
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        adds_head = differ == ["distance_head"] and not bundle.config.distance_head
        if differ and not adds_head:
            raise DataError(
                f"{self.opts.init_from}: model config differs from this run's in "
                f"{', '.join(differ)}; pass matching --arch/--model-size/--binary/--no-dac"
            )
        inherit_weights(self.model, bundle.model)
        return file_sha256(self.opts.init_from)

    # ----------------------------------------------------------------- run
    def describe(self) -> dict:
        with torch.random.fork_rng(devices=[]):  # counting must not move the run's random stream
            model = build_model(self.model_config)
            flops = count_flops(model, 224)
        return {
            "params": count_parameters(model),
            "gflops_224": flops / 1e9,
            "train_images": len(self.train_samples),
            "val_images": len(self.val_samples),
            "train_items_per_epoch": len(self.train_set),
            "device": str(self.device),
            "precision": self.precision,
            "channels_last": self.channels_last,
            "model_mpp": self.model_mpp,
        }

    def run(self, resume: bool = False) -> dict:
        if resume:
            self.load_state()
        else:
            init = {}
            if self.opts.init_from:  # before mkdir: a bad --init leaves no empty run folder
                init = {"init_sha256": self.load_init_weights()}
            self.out.mkdir(parents=True, exist_ok=True)
            info = {
                "options": dataclasses.asdict(self.opts),
                **init,
                "model": self.model_config.to_dict(),
                **self.describe(),
            }
            write_atomic(self.out / "options.json", json.dumps(info, indent=2))
        log_path = self.out / "log.jsonl"
        val_dice = self.best_dice
        while self.epoch < self.opts.epoch_budget:
            if self.best_epoch >= 0 and self.epoch - self.best_epoch > self.opts.patience:
                break
            t0 = time.perf_counter()
            record = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            record["precision"] = self.precision
            record.update(self.train_epoch())
            self.scheduler.step()
            record["train_seconds"] = time.perf_counter() - t0
            val_dice = self.validate()
            record["val_dice"] = val_dice
            if len(getattr(self, "domains", [])) > 1 and self.opts.preset != "paper":
                record["val_dice_by_domain"] = self.val_dice_by_domain
            self.epoch += 1
            if self.epoch > self.opts.best_after_epoch and val_dice > self.best_dice:
                self.best_dice, self.best_epoch = val_dice, self.epoch
                save_bundle(
                    self.out / "best.safetensors",
                    self.model,
                    self.model_config,
                    self.bundle_meta(val_dice),
                )
                record["best"] = True
            save_bundle(
                self.out / "last.safetensors",
                self.model,
                self.model_config,
                self.bundle_meta(val_dice),
            )
            self.save_state()
            record["seconds"] = time.perf_counter() - t0
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.progress:
                print(_epoch_line(record), flush=True)
        if self.best_epoch < 0:  # too few epochs to pass best_after_epoch: last is the best we have
            write_atomic(
                self.out / "best.safetensors", (self.out / "last.safetensors").read_bytes()
            )
            self.best_epoch, self.best_dice = self.epoch, val_dice
        return {
            "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_dice,
        }


def _numpy_rng_state() -> list:
    """numpy's global MT19937 state as torch-loadable primitives (``weights_only=True``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _epoch_line(r: dict) -> str:
    cim = ""
    if "cim_weight_max" in r:
        cim = f" cim_w[{r['cim_weight_min']:.2f},{r['cim_weight_max']:.2f}]"
    star = " *" if r.get("best") else ""
    return (
        f"epoch {r['epoch']:4d} loss {r['loss_total']:.4f} (ce {r['loss_cim']:.4f} dice "
        f"{r['loss_dice']:.4f} focal {r['loss_focal']:.4f}){cim} val_dice {r['val_dice']:.4f} "
        f"{r['seconds']:.1f}s{star}"
    )


def train(opts: TrainOptions, resume: bool = False, progress: bool = True) -> dict:
    """Trains one run; returns a summary. Safe to call again with ``resume=True``."""
    if resume:
        saved = Path(opts.out) / "options.json"
        if saved.is_file():  # keep the run's own options; only the epoch budget may change
            stored = json.loads(saved.read_text())["options"]
            stored["epochs"] = opts.epochs or stored["epochs"]
            # Where and how fast it runs may change; what it computes may not.
            stored["device"] = opts.device
            stored["workers"] = opts.workers
            stored["threads"] = opts.threads or stored.get("threads")
            opts = TrainOptions(**stored)
    trainer = Trainer(opts, progress=progress)
    return trainer.run(resume=resume)
