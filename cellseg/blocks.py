"""Building blocks of CausalCellSegmenter (Fan et al., arXiv 2403.06066) and its baselines.

Each block is one concept: SimAM attention, squeeze-excitation, MBConv, the Diversified Aggregation
Convolution (DAC) stage, the stage-1 Transformer, and the U-Net decoder step. Section numbers refer
to ``../shared/docs/SPEC.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .precision import fp32_region


class ConvBNAct(nn.Sequential):
    """k×k convolution, BatchNorm and an activation (ReLU unless given)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int = 3,
        stride: int = 1,
        groups: int = 1,
        act: type[nn.Module] | None = nn.ReLU,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SimAM(nn.Module):
    """Parameter-free SimAM attention (Yang et al., ICML 2021; SPEC §2).

    Each neuron is weighted by ``sigmoid(1 / e_t*)`` where the minimal energy
    ``e_t* = 4(σ² + λ) / ((t - μ)² + 2σ² + 2λ)`` uses its channel's spatial mean and variance.
    Shape-preserving: ``B×C×H×W -> B×C×H×W``.
    """

    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.e_lambda = e_lambda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 island (docs/NOTES.md): in bf16 (8-bit mantissa) the mean-subtracted squares lose
        # most digits, the spatial sum of 49-12544 terms drifts, and ``v + 1e-4`` equals ``v``
        # for any v > 0.05, so the energy of near-constant channels -- where lambda is what keeps
        # 1/e_t finite -- is wrong. The cost is one elementwise pass over the stage's output.
        with fp32_region(x):
            xf = x.float()
            n = xf.shape[2] * xf.shape[3] - 1
            d = (xf - xf.mean(dim=(2, 3), keepdim=True)).pow(2)
            v = d.sum(dim=(2, 3), keepdim=True) / max(n, 1)
            inv_energy = d / (4 * (v + self.e_lambda)) + 0.5
            return (xf * torch.sigmoid(inv_energy)).to(x.dtype)


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 under autocast, returned in the input's dtype.

    fp32 island (docs/NOTES.md): the token mean and variance over ``dim`` features are a
    difference of nearly equal sums, and bf16 inputs give the statistics only 3 digits.
    (BatchNorm needs no such wrapper: its CPU and cuDNN kernels keep fp32 statistics and
    parameters for bf16 inputs.) Eval-mode fp32 inference keeps PyTorch's fused encoder path,
    which reads ``weight``/``bias`` directly.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with fp32_region(x):
            return super().forward(x.float()).to(x.dtype)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation as in EfficientNet: GAP, 1×1 reduce, SiLU, 1×1 expand, sigmoid."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze_channels, 1)
        self.expand = nn.Conv2d(squeeze_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.expand(F.silu(self.reduce(s)))
        return x * torch.sigmoid(s)


class MBConv(nn.Module):
    """EfficientNet MBConv (Tan & Le 2019; SPEC §5): 1×1 expand, depthwise 3×3, SE, 1×1 project.

    SE squeezes to ``0.25 * in_ch`` as in EfficientNet. The identity shortcut exists only when
    ``stride == 1 and in_ch == out_ch``; in the DAC stages the block downsamples (stride 2).
    ``B×in_ch×H×W -> B×out_ch×H/stride×W/stride``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 2, expand: int = 4) -> None:
        super().__init__()
        mid = in_ch * expand
        self.expand = ConvBNAct(in_ch, mid, 1, act=nn.SiLU)
        self.depthwise = ConvBNAct(mid, mid, 3, stride, groups=mid, act=nn.SiLU)
        self.se = SqueezeExcite(mid, max(1, in_ch // 4))
        self.project = ConvBNAct(mid, out_ch, 1, act=None)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.has_skip else y


class TransformerBranch(nn.Module):
    """ViT that enriches the stage-1 CNN features (paper §3.1; SPEC §6.2).

    ``B×C×H×W`` features are cut into ``patch×patch`` patches (196 tokens for 112² and patch 8),
    encoded by pre-LN Transformer layers with a learnable positional embedding, projected back to
    C channels and upsampled to H×W; the caller adds the result to its input.
    """

    def __init__(
        self,
        channels: int,
        dim: int,
        depth: int,
        heads: int,
        patch: int,
        grid: int,
        mlp_ratio: int = 4,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(channels, dim, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, dim, grid, grid))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim,
            heads,
            dim * mlp_ratio,
            dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        for encoder_layer in self.encoder.layers:  # same parameters, so state dicts are unchanged
            encoder_layer.norm1 = FP32LayerNorm(dim)
            encoder_layer.norm2 = FP32LayerNorm(dim)
        self.norm = FP32LayerNorm(dim)
        self.project = ConvBNAct(dim, channels, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)  # B×dim×h×w
        b, dim, h, w = tokens.shape
        pos = self.pos
        if pos.shape[-2:] != (h, w):  # other input sizes: resample the positional grid
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        seq = (tokens + pos).flatten(2).transpose(1, 2)  # B×(h·w)×dim
        seq = self.norm(self.encoder(seq))
        grid = seq.transpose(1, 2).reshape(b, dim, h, w)
        return F.interpolate(self.project(grid), size=x.shape[-2:], mode="bilinear")


class DACStage(nn.Module):
    """Diversified Aggregation Convolution stage (paper §3.1, eq. 1; SPEC §6.2).

    ``f_i = Conv2D(SimAM([k1·f1, k2·f2]))`` where f1 is a CNN branch (two 3×3 convs, the first at
    stride 2) and f2 an MBConv branch at stride 2; k1, k2 are learnable scalars initialised to 1.
    The fusion Conv2D is 1×1 (2C -> C). With ``use_dac=False`` only the CNN branch remains (the
    paper's "Backbone" ablation). An optional Transformer is added to the CNN branch (stage 1).
    ``B×in_ch×H×W -> B×out_ch×H/2×W/2``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        use_dac: bool = True,
        mbconv_expand: int = 4,
        simam_lambda: float = 1e-4,
        transformer: TransformerBranch | None = None,
    ) -> None:
        super().__init__()
        self.cnn = nn.Sequential(ConvBNAct(in_ch, out_ch, 3, 2), ConvBNAct(out_ch, out_ch, 3))
        self.transformer = transformer
        self.use_dac = use_dac
        if use_dac:
            self.mbconv = MBConv(in_ch, out_ch, stride=2, expand=mbconv_expand)
            self.k1 = nn.Parameter(torch.ones(()))
            self.k2 = nn.Parameter(torch.ones(()))
            self.simam = SimAM(simam_lambda)
            self.fuse = ConvBNAct(2 * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.cnn(x)
        if self.transformer is not None:
            f1 = f1 + self.transformer(f1)
        if not self.use_dac:
            return f1
        f2 = self.mbconv(x)
        return self.fuse(self.simam(torch.cat([self.k1 * f1, self.k2 * f2], dim=1)))


class UpBlock(nn.Module):
    """U-Net decoder step: 2×2 transposed conv, concatenate the skip, two 3×3 conv-BN-ReLU.

    ``(B×in_ch×H×W, B×skip_ch×2H×2W) -> B×out_ch×2H×2W``.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, 2, 2)
        self.convs = nn.Sequential(ConvBNAct(out_ch + skip_ch, out_ch), ConvBNAct(out_ch, out_ch))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([self.up(x), skip], dim=1))


class AttentionGate(nn.Module):
    """Additive attention gate of Attention U-Net (Oktay et al. 2018) on a skip connection.

    The gating signal ``g`` (already at the skip's resolution) weighs the skip ``x`` per pixel.
    """

    def __init__(self, gate_ch: int, skip_ch: int, inter_ch: int) -> None:
        super().__init__()
        self.w_g = ConvBNAct(gate_ch, inter_ch, 1, act=None)
        self.w_x = ConvBNAct(skip_ch, inter_ch, 1, act=None)
        self.psi = nn.Sequential(ConvBNAct(inter_ch, 1, 1, act=None), nn.Sigmoid())

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(F.relu(self.w_g(g) + self.w_x(x)))


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal init for convolutions (fan-out, ReLU), as torchvision's ResNet does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def token_grid(tile_px: int, stage1_stride: int, patch: int) -> int:
    """Side of the Transformer's token grid for a square input of ``tile_px`` pixels."""
    return max(1, math.ceil(tile_px / stage1_stride / patch))
