"""CausalCellSegmenter (Fan et al., arXiv 2403.06066) and the paper's Table 1 baselines.

One config dataclass drives every architecture (``arch``: ``causal``, ``unet``,
``attention_unet``); it is stored inside every checkpoint so a model file rebuilds itself.
Layer-by-layer layout: SPEC.md §6.2. All models take ``B×3×H×W`` floats in [0, 1] (normalisation
is inside the model) with H, W multiples of 32, and return ``B×output_channels×H×W`` logits:
``num_classes`` class logits, then (``distance_head``) one logit of the normalised distance map.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import (
    AttentionGate,
    ConvBNAct,
    DACStage,
    TransformerBranch,
    UpBlock,
    init_weights,
    token_grid,
)
from .precision import fp32_region

ARCHS = ("causal", "unet", "attention_unet")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    """Architecture hyper-parameters (JSON-serialisable; stored with every checkpoint).

    The default widths (16…256) are the SPEC's "narrow" variant: one paper-preset run (400 epochs of
    24 images at 224²) fits in about an hour on a 2-core CPU, and the shipped weights stay a few MB.
    The paper-size model is ``widths=(32, 64, 128, 256, 512), transformer_dim=256,
    transformer_depth=4, transformer_heads=8``.
    """

    arch: str = "causal"
    num_classes: int = 3  # background, nucleus interior, nucleus boundary (instance separation)
    # Issue 10 point 4: one more output channel regressing each nucleus's distance transform
    # normalised to [0, 1] (targets.distance_targets), which seeds the watershed instead of
    # the interior class (instances.label_instances). The class logits stay, so the paper's
    # binary metrics still come from the nucleus probability 1 - p0.
    distance_head: bool = False
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    use_dac: bool = True  # False: the paper's "Backbone" (CNN + Transformer) ablation
    use_transformer: bool = True
    transformer_dim: int = 128
    transformer_depth: int = 2
    transformer_heads: int = 4
    transformer_patch: int = 8
    transformer_mlp_ratio: int = 4
    dropout: float = 0.1
    mbconv_expand: int = 4
    simam_lambda: float = 1e-4  # SimAM's own default (SPEC §2)
    tile_px: int = 224  # positional-embedding grid is sized for this input
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.distance_head and self.num_classes != 3:
            raise ValueError("a distance head goes with the three classes (C = 4 channels)")
        if len(self.widths) != 5:
            raise ValueError(f"widths must list 5 stage widths, got {self.widths}")
        self.widths = tuple(int(w) for w in self.widths)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)

    @classmethod
    def tiny(cls, **overrides: object) -> ModelConfig:
        """A very small configuration for tests (about 60k parameters)."""
        base = {
            "widths": (8, 8, 16, 16, 32),
            "transformer_dim": 32,
            "transformer_depth": 1,
            "transformer_heads": 2,
        }
        return cls(**{**base, **overrides})

    @classmethod
    def paper(cls, **overrides: object) -> ModelConfig:
        """The SPEC §6.2 full-size model (13.5 M parameters with 2 classes)."""
        base = {
            "widths": (32, 64, 128, 256, 512),
            "transformer_dim": 256,
            "transformer_depth": 4,
            "transformer_heads": 8,
        }
        return cls(**{**base, **overrides})

    @property
    def output_channels(self) -> int:
        """Channels of the network output: the classes plus the distance map, if any."""
        return self.num_classes + int(self.distance_head)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class _Normalise(nn.Module):
    """Maps [0, 1] RGB to normalised input; mean/std live in the state dict with the weights."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _UNetDecoder(nn.Module):
    """Five U-Net up-steps from the bottleneck to full resolution, then a 1×1 head."""

    def __init__(self, widths: tuple[int, ...], stem: int, out_channels: int, gated: bool) -> None:
        super().__init__()
        skips = (stem, *widths[:-1])  # s0, e1..e4
        ins = widths[::-1]  # e5 (bottleneck), then each decoder output
        self.ups = nn.ModuleList()
        self.gates = nn.ModuleList() if gated else None
        for i, skip_ch in enumerate(reversed(skips)):
            self.ups.append(UpBlock(ins[i], skip_ch, skip_ch))
            if self.gates is not None:
                self.gates.append(AttentionGate(ins[i], skip_ch, max(skip_ch // 2, 4)))
        self.head = nn.Conv2d(stem, out_channels, 1)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for i, skip in enumerate(reversed(skips)):
            if self.gates is not None:
                g = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear")
                skip = self.gates[i](g, skip)
            x = self.ups[i](x, skip)
        # fp32 island (docs/NOTES.md): the logits feed the softmax, the losses and every
        # threshold of post-processing; a bf16 logit carries an error of up to 0.4 %, which near
        # a decision boundary flips pixels. The 1×1 head is a tiny share of the FLOPs.
        with fp32_region(x):
            return self.head(x.float())


class CausalCellSegmenter(nn.Module):
    """CausalCellSegmenter: stem, five DAC stages (Transformer on stage 1), U-Net decoder.

    ``forward(x)``: ``B×3×H×W`` in [0, 1] -> logits ``B×output_channels×H×W``;
    ``forward(x, return_bottleneck=True)`` also returns f5 (``B×widths[4]×H/32×W/32``), the
    feature map the Causal Inference Module decorrelates (paper §3.2).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        w = cfg.widths
        self.normalise = _Normalise(cfg.mean, cfg.std)
        self.stem = nn.Sequential(ConvBNAct(3, w[0]), ConvBNAct(w[0], w[0]))
        transformer = None
        if cfg.use_transformer:
            transformer = TransformerBranch(
                w[0],
                cfg.transformer_dim,
                cfg.transformer_depth,
                cfg.transformer_heads,
                cfg.transformer_patch,
                token_grid(cfg.tile_px, 2, cfg.transformer_patch),
                cfg.transformer_mlp_ratio,
                cfg.dropout,
            )
        ins = (w[0], *w[:-1])
        self.stages = nn.ModuleList(
            DACStage(
                ins[i],
                w[i],
                cfg.use_dac,
                cfg.mbconv_expand,
                cfg.simam_lambda,
                transformer if i == 0 else None,
            )
            for i in range(5)
        )
        self.decoder = _UNetDecoder(w, w[0], cfg.output_channels, gated=False)
        init_weights(self)

    def forward(
        self, x: torch.Tensor, return_bottleneck: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(self.normalise(x))
        skips = [x]
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        logits = self.decoder(x, skips[:-1])
        return (logits, x) if return_bottleneck else logits


class UNet(nn.Module):
    """U-Net baseline (Ronneberger et al. 2015) with the same widths and five down-steps.

    ``attention=True`` adds Attention U-Net gates on the skips (Oktay et al. 2018). Same I/O as
    :class:`CausalCellSegmenter`, including ``return_bottleneck`` so CIM can be applied to it.
    """

    def __init__(self, cfg: ModelConfig, attention: bool = False) -> None:
        super().__init__()
        self.config = cfg
        w = cfg.widths
        self.normalise = _Normalise(cfg.mean, cfg.std)
        self.stem = nn.Sequential(ConvBNAct(3, w[0]), ConvBNAct(w[0], w[0]))
        ins = (w[0], *w[:-1])
        self.stages = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ConvBNAct(ins[i], w[i]), ConvBNAct(w[i], w[i]))
            for i in range(5)
        )
        self.decoder = _UNetDecoder(w, w[0], cfg.output_channels, gated=attention)
        init_weights(self)

    def forward(
        self, x: torch.Tensor, return_bottleneck: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(self.normalise(x))
        skips = [x]
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        logits = self.decoder(x, skips[:-1])
        return (logits, x) if return_bottleneck else logits


def build_model(cfg: ModelConfig) -> nn.Module:
    """Builds the network named by ``cfg.arch``."""
    if cfg.arch == "causal":
        return CausalCellSegmenter(cfg)
    return UNet(cfg, attention=cfg.arch == "attention_unet")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, tile_px: int = 224) -> float:
    """FLOPs (2 × MACs) of one ``3×tile_px×tile_px`` forward pass, via torch's FLOP counter.

    Counted in train mode: the eval fast path of ``nn.TransformerEncoderLayer`` hides attention
    FLOPs from the counter (SPEC §6.3).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.train()
    x = torch.zeros(1, 3, tile_px, tile_px)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    model.train(was_training)
    return float(counter.get_total_flops())
