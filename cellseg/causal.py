"""Causal Inference Module (CIM): StableNet sample weighting for segmentation.

Paper §3.2 (Fan et al., arXiv 2403.06066) builds on StableNet (Zhang et al., CVPR 2021): random
Fourier features (RFF) of the bottleneck features, and per-batch sample weights learnt so that the
weighted features become independent, with a global memory of earlier batches ("saving and
reloading"). The algorithm follows SPEC.md §3-4 (a reading of StableNet's official code); this
module is a fresh implementation of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class CIMConfig:
    """StableNet's defaults (SPEC §3.6) with the segmentation adaptation of SPEC §4.

    ``lambda_p=None`` scales StableNet's 70 (calibrated for 512-d features) by ``(d / 512)²``,
    because the decorrelation loss grows with the number of feature pairs (SPEC §3.7).
    """

    num_f: int = 1  # RFF functions per feature (cos and sin of each)
    lr: float = 1.0  # lrbl: SGD learning rate of the weight learner
    inner_steps: int = 20  # epochb
    lambda_p: float | None = None
    decay_pow: int = 2  # penalty Σ w^decay_pow against concentrated weights
    presave_ratio: float = 0.9  # α of the global memory update
    memory_size: int = 8  # N_pre: one presaved group the size of a batch
    first_epoch_warm_iters: int = 10  # epoch-0 running-mean memory fill

    def resolved_lambda_p(self, feature_dim: int) -> float:
        if self.lambda_p is not None:
            return self.lambda_p
        return 70.0 * (feature_dim / 512) ** 2


def random_fourier_features(
    x: torch.Tensor, num_f: int = 1, sigma: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random Fourier features of every scalar feature (StableNet; SPEC §3.2).

    ``x``: ``n×r`` (n samples, r features) -> ``n×r×2·num_f``. ω ~ N(0, 1/σ²) and φ ~ U(0, 2π) are
    drawn fresh on each call. As in StableNet's code, ``ωx + φ`` is min-max normalised over the
    feature axis for each sample and scaled to [0, π/2] before cos and sin.
    """
    check_generator_device(generator, x.device)
    _n, r = x.shape
    omega = torch.randn(num_f, generator=generator, device=x.device, dtype=x.dtype) / sigma
    phase = torch.rand(r, num_f, generator=generator, device=x.device, dtype=x.dtype) * 2 * math.pi
    mid = x[:, :, None] * omega + phase  # n×r×num_f
    mid = mid - mid.amin(dim=1, keepdim=True)
    mid = mid / mid.amax(dim=1, keepdim=True).clamp_min(1e-12) * (math.pi / 2)
    return math.sqrt(2.0 / num_f) * torch.cat([torch.cos(mid), torch.sin(mid)], dim=-1)


def check_generator_device(generator: torch.Generator | None, device: torch.device) -> None:
    """Raises ``ValueError`` unless ``generator`` draws on ``device`` (or is ``None``).

    PyTorch rejects a CPU generator for a CUDA draw only at run time on a GPU machine; checking
    here makes the mistake visible in CPU tests too (tests/test_training.py).
    """
    if generator is None:
        return
    gen = generator.device
    if gen.type != device.type or (gen.index is not None and device.index not in (None, gen.index)):
        raise ValueError(f"generator on {gen} cannot draw the CIM's features on {device}")


def weighted_cross_covariance_loss(rff: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum of squared off-diagonal weighted covariances (paper eq. 7; SPEC §3.3).

    ``rff``: ``n×r×k`` features, ``weights``: ``n`` (summing to 1). For each slice
    ``Z = rff[..., j]``: ``Cov_w = (w⊙Z)ᵀZ - (Σ w Z)ᵀ(Σ w Z)``, and the loss adds
    ``‖Cov_w‖²_F - ‖diag Cov_w‖²``.
    """
    w = weights.reshape(-1, 1, 1)
    mean = (w * rff).sum(dim=0)  # r×k
    total = rff.new_zeros(())
    for j in range(rff.shape[-1]):
        z = rff[:, :, j]
        cov = (w[:, :, 0] * z).T @ z - mean[:, j : j + 1] @ mean[:, j : j + 1].T
        sq = cov * cov
        total = total + sq.sum() - torch.diagonal(sq).sum()
    return total


class SampleWeighting(nn.Module):
    """Per-batch sample-weight learner with a global memory (StableNet, SPEC §3.4).

    The memory (``memory_features``: ``N_pre×d``, ``memory_weights``: ``N_pre`` raw pre-softmax
    weights) is a pair of buffers, so it is saved with training checkpoints and restored on resume.
    ``forward(z, epoch, iteration)`` with ``z``: ``B×d`` detached features returns ``B`` weights
    that are positive and sum to 1. It never back-propagates into the segmentation network.
    """

    def __init__(self, feature_dim: int, cfg: CIMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CIMConfig()
        self.feature_dim = feature_dim
        self.lambda_p = self.cfg.resolved_lambda_p(feature_dim)
        self.register_buffer("memory_features", torch.zeros(self.cfg.memory_size, feature_dim))
        self.register_buffer("memory_weights", torch.ones(self.cfg.memory_size))

    def learn_weights(
        self, z: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Inner SGD loop on the raw weights of the current batch; returns them (``B``, raw)."""
        # fp32 island (docs/NOTES.md): the weights come from squared covariances of cos/sin
        # features in [-1, 1] (differences of near-equal sums) and a softmax; even if a caller
        # runs the CIM inside bf16 autocast, it computes in fp32.
        with torch.autocast(z.device.type, enabled=False):
            return self._learn_weights_fp32(z.detach().float(), generator)

    def _learn_weights_fp32(
        self, z: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        cfg = self.cfg
        raw = torch.ones(z.shape[0], device=z.device, requires_grad=True)
        all_features = torch.cat([z, self.memory_features.to(z.device)], dim=0)
        memory_raw = self.memory_weights.to(z.device)
        opt = torch.optim.SGD([raw], lr=cfg.lr, momentum=0.9)
        for step in range(cfg.inner_steps):
            for group in opt.param_groups:  # StableNet: lr × 0.1 for the second half
                group["lr"] = cfg.lr * 0.1 ** (step // max(1, cfg.inner_steps // 2))
            joint = torch.softmax(torch.cat([raw, memory_raw]), dim=0)
            rff = random_fourier_features(all_features, cfg.num_f, generator=generator)
            loss_b = weighted_cross_covariance_loss(rff, joint)
            loss_p = torch.softmax(raw, dim=0).pow(cfg.decay_pow).sum()
            loss = loss_b / self.lambda_p + loss_p
            opt.zero_grad()
            loss.backward()
            opt.step()
        return raw.detach()

    @torch.no_grad()
    def update_memory(self, z: torch.Tensor, raw: torch.Tensor, epoch: int, iteration: int) -> None:
        """Global memory update (paper §3.2 "saving and reloading"; SPEC §3.4).

        In the first iterations of epoch 0 the memory is a running mean; afterwards an exponential
        average with ``presave_ratio``. A batch smaller than the memory updates its first rows only.
        """
        b = min(z.shape[0], self.cfg.memory_size)
        z = z.detach().float()[:b].to(self.memory_features.device)
        raw = raw[:b].to(self.memory_weights.device)
        if epoch == 0 and iteration < self.cfg.first_epoch_warm_iters:
            keep, new = iteration / (iteration + 1), 1 / (iteration + 1)
        else:
            keep, new = self.cfg.presave_ratio, 1 - self.cfg.presave_ratio
        self.memory_features[:b] = keep * self.memory_features[:b] + new * z
        self.memory_weights[:b] = keep * self.memory_weights[:b] + new * raw

    def forward(
        self,
        z: torch.Tensor,
        epoch: int,
        iteration: int,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        with torch.enable_grad():
            raw = self.learn_weights(z, generator)
        self.update_memory(z, raw, epoch, iteration)
        return torch.softmax(raw, dim=0).to(z.device)


def weight_spread(weights: torch.Tensor) -> dict[str, float]:
    """Summary of a batch's weights relative to uniform (1 = uniform), for the training log."""
    rel = weights.detach().float() * weights.numel()
    return {"min": float(rel.min()), "max": float(rel.max()), "std": float(rel.std(correction=0))}
