"""Training loop for CausalCellSegmenter and its baselines (``cellseg train``).

A plain, readable loop in the style of nanoGPT's ``train.py``: one options dataclass, the model
config stored in every checkpoint, a JSON-lines log, best/last checkpoints and exact resume
(optimiser, scheduler, CIM memory and RNG state).

Presets (issue 2, SPEC §8.3):
- ``paper``: the whole 1000² tile resized to 224 (UCTransNet protocol), 24 train / 6 val, batch 8,
  AdamW lr 1e-3, cosine over the epoch budget, early stopping on validation Dice.
- ``wsi`` (the shipped model): random 224² crops at a physical resolution (0.5 µm/px by default),
  validated by sliding-window prediction over the full validation tiles.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import __version__
from .causal import CIMConfig, SampleWeighting, weight_spread
from .checkpoint import file_sha256, load_bundle, save_bundle
from .data import (
    UCTRANSNET_VAL_IDS,
    PaperDataset,
    Sample,
    WsiDataset,
    find_samples,
    load_sample,
    read_ids,
    resize_sample,
)
from .errors import DataError
from .inference import predict_array, resolve_device
from .instances import PostProcess
from .losses import segmentation_loss
from .metrics import dice
from .model import ModelConfig, build_model, count_flops, count_parameters

PRESETS = ("paper", "wsi")
MODEL_SIZES = ("default", "paper", "tiny")


@dataclass
class TrainOptions:
    """Everything that defines a run; saved as ``options.json`` in the run folder."""

    data: str
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
    mpp: float = 0.5  # wsi preset: physical resolution of the crops
    crops_per_tile: int = 8  # wsi preset: random crops per training tile per epoch
    val_overlap_px: int = 64
    device: str = "auto"
    seed: int = 0
    threads: int | None = None
    init_from: str | None = None  # fine-tune: start from this bundle's weights (fresh optimiser)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}")
        if self.model_size not in MODEL_SIZES:
            raise ValueError(f"model size must be one of {MODEL_SIZES}")

    @property
    def epoch_budget(self) -> int:
        return self.epochs or (400 if self.preset == "paper" else 150)

    def model_config(self) -> ModelConfig:
        kwargs = {"arch": self.arch, "num_classes": self.num_classes, "use_dac": self.use_dac}
        if self.model_size == "paper":
            return ModelConfig.paper(**kwargs)
        if self.model_size == "tiny":
            return ModelConfig.tiny(**kwargs)
        return ModelConfig(**kwargs)


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
    """Owns the model, optimiser, scheduler, CIM and data of one run."""

    def __init__(self, opts: TrainOptions, progress: bool = True) -> None:
        self.opts = opts
        self.progress = progress
        self.out = Path(opts.out)
        if opts.threads:
            torch.set_num_threads(opts.threads)
        self.device = resolve_device(opts.device)
        torch.manual_seed(opts.seed)
        self.generator = torch.Generator().manual_seed(opts.seed)
        self._load_data()
        self.model_config = opts.model_config()
        self.model = build_model(self.model_config).to(self.device)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay
        )
        self.scheduler = cosine_lr(opts, self.optimizer)
        self.cim = SampleWeighting(
            self.model_config.widths[-1], CIMConfig(memory_size=opts.batch_size)
        )
        self.amp_dtype = None
        if self.device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)
        self.epoch = 0
        self.best_dice = -1.0
        self.best_epoch = -1
        self.iteration = 0

    # ----------------------------------------------------------------- data
    def _load_data(self) -> None:
        train_dir, val_ids_file = resolve_training_folder(Path(self.opts.data))
        samples = [load_sample(f) for f in find_samples(train_dir)]
        self.train_samples, self.val_samples = split_train_val(
            samples, val_ids_file, self.opts.seed
        )
        self.source_mpp = float(np.median([s.mpp for s in samples]))
        if self.opts.preset == "paper":
            self.train_set = PaperDataset(self.train_samples, augment=True, seed=self.opts.seed)
            self.val_set = PaperDataset(self.val_samples, augment=False)
            # The whole tile is squeezed into 224 px, so the effective resolution is coarser.
            side = np.median([s.image.shape[1] for s in samples])
            self.model_mpp = float(self.source_mpp * side / 224)
        else:
            self.train_set = WsiDataset(
                self.train_samples,
                mpp=self.opts.mpp,
                crop_px=224,
                crops_per_epoch_per_tile=self.opts.crops_per_tile,
                augment=True,
                seed=self.opts.seed,
            )
            self.val_resized = [resize_sample(s, self.opts.mpp) for s in self.val_samples]
            self.model_mpp = self.opts.mpp
        if len(self.train_set) < self.opts.batch_size:
            raise DataError(
                f"{train_dir}: {len(self.train_set)} training items, fewer than one batch"
            )
        # drop_last: the CIM memory update expects full batches (SPEC §4 implementation notes)
        self.loader = DataLoader(
            self.train_set,
            batch_size=self.opts.batch_size,
            shuffle=True,
            drop_last=True,
            generator=self.generator,
        )

    # ------------------------------------------------------------ training
    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def train_epoch(self) -> dict:
        from tqdm import tqdm

        self.model.train()
        self.train_set.set_epoch(self.epoch)  # seeded augmentation stream of this epoch
        sums: dict[str, float] = {}
        spreads = []
        bar = tqdm(
            self.loader,
            desc=f"epoch {self.epoch + 1}/{self.opts.epoch_budget}",
            leave=False,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        for step, (x, y) in enumerate(bar):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self._autocast():
                logits, f5 = self.model(x, return_bottleneck=True)
            weights = None
            if self.opts.use_cim:
                z = f5.detach().float().mean(dim=(2, 3))  # GAP(f5): B×d (SPEC §4 point 1)
                weights = self.cim(z, self.epoch, step, generator=self.generator)
                spreads.append(weight_spread(weights))
            terms = segmentation_loss(logits, y, weights)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(terms.total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            for k, v in terms.as_floats().items():
                sums[k] = sums.get(k, 0.0) + v
            self.iteration += 1
            bar.set_postfix(loss=f"{sums['total'] / (step + 1):.4f}")
        n = max(1, len(self.loader))
        record = {f"loss_{k}": v / n for k, v in sums.items()}
        if spreads:
            record["cim_weight_min"] = float(np.mean([s["min"] for s in spreads]))
            record["cim_weight_max"] = float(np.mean([s["max"] for s in spreads]))
            record["cim_weight_std"] = float(np.mean([s["std"] for s in spreads]))
        return record

    @torch.no_grad()
    def validate(self) -> float:
        """Mean per-image foreground Dice on the validation tiles."""
        self.model.eval()
        scores = []
        if self.opts.preset == "paper":
            for x, y in DataLoader(self.val_set, batch_size=self.opts.batch_size):
                with self._autocast():
                    logits = self.model(x.to(self.device))
                fg = (1 - torch.softmax(logits.float(), dim=1)[:, 0]).cpu().numpy() > 0.5
                scores += [dice(p, t > 0) for p, t in zip(fg, y.numpy() > 0, strict=True)]
        else:
            predictor = self._tile_predictor()
            for s in self.val_resized:
                probs = predict_array(s.image, predictor, 224, self.opts.val_overlap_px)
                scores.append(dice((1 - probs[0]) > 0.5, s.labels > 0))
        return float(np.mean(scores))

    def _tile_predictor(self):
        def run(tiles: np.ndarray) -> np.ndarray:
            x = torch.from_numpy(tiles).to(self.device).permute(0, 3, 1, 2).float() / 255
            with self._autocast():
                logits = self.model(x)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

        return run

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
            "seed": self.opts.seed,
            "init_from": self.opts.init_from,
            "train_ids": sorted(s.image_id for s in self.train_samples),
            "val_ids": sorted(s.image_id for s in self.val_samples),
            "normalisation": "inside the model (ImageNet mean/std on [0, 1] RGB)",
            "cellseg_version": __version__,
        }

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
            "torch_rng": torch.get_rng_state(),
            "generator_rng": self.generator.get_state(),
        }
        tmp = self.out / "last_state.pt.partial"
        torch.save(state, tmp)
        tmp.replace(self.out / "last_state.pt")

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
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator_rng"])

    def load_init_weights(self) -> str:
        """Copies the weights of ``opts.init_from`` into the model; returns the file's SHA-256.

        A warm restart (SGDR, Loshchilov & Hutter 2017): the optimiser, schedule and CIM memory
        start fresh, only the weights are inherited. The bundle must have this run's config.
        """
        bundle = load_bundle(self.opts.init_from)
        ours, theirs = self.model_config.to_dict(), bundle.config.to_dict()
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        if differ:
            raise DataError(
                f"{self.opts.init_from}: model config differs from this run's in "
                f"{', '.join(differ)}; pass matching --arch/--model-size/--binary/--no-dac"
            )
        self.model.load_state_dict(bundle.model.state_dict())
        return file_sha256(self.opts.init_from)

    # ----------------------------------------------------------------- run
    def describe(self) -> dict:
        model = build_model(self.model_config)
        return {
            "params": count_parameters(model),
            "gflops_224": count_flops(model, 224) / 1e9,
            "train_images": len(self.train_samples),
            "val_images": len(self.val_samples),
            "train_items_per_epoch": len(self.train_set),
            "device": str(self.device),
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
            (self.out / "options.json").write_text(json.dumps(info, indent=2))
        log_path = self.out / "log.jsonl"
        val_dice = self.best_dice
        while self.epoch < self.opts.epoch_budget:
            if self.best_epoch >= 0 and self.epoch - self.best_epoch > self.opts.patience:
                break
            t0 = time.perf_counter()
            record = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
            record.update(self.train_epoch())
            self.scheduler.step()
            record["train_seconds"] = time.perf_counter() - t0
            val_dice = self.validate()
            record["val_dice"] = val_dice
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
            (self.out / "best.safetensors").write_bytes(
                (self.out / "last.safetensors").read_bytes()
            )
            self.best_epoch, self.best_dice = self.epoch, val_dice
        return {
            "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_dice,
        }


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
            stored["device"] = opts.device
            opts = TrainOptions(**stored)
    trainer = Trainer(opts, progress=progress)
    return trainer.run(resume=resume)
