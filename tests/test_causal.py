"""CIM: RFF shape/range, the decorrelation loss and the sample-weight learner (issue 2 point 4)."""

import math

import torch

from cellseg.causal import (
    CIMConfig,
    SampleWeighting,
    random_fourier_features,
    weighted_cross_covariance_loss,
)
from cellseg.losses import focal_loss, segmentation_loss, soft_dice_loss

torch.set_num_threads(1)


def correlated_features(n=16, d=32, seed=0):
    """Half the samples carry one shared factor with random loadings across the features.

    (A factor added equally to every feature would be invisible: StableNet's RFF min-max
    normalises each sample over its features.)
    """
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(n, d, generator=g)
    factor = torch.randn(n, 1, generator=g)
    loadings = torch.randn(1, d, generator=g)
    x[: n // 2] += 2 * factor[: n // 2] * loadings
    return x


def test_rff_shape_and_bounds():
    x = torch.randn(6, 10)
    z = random_fourier_features(x, num_f=2, generator=torch.Generator().manual_seed(0))
    assert z.shape == (6, 10, 4)
    assert z.abs().max() <= 1.0 + 1e-6  # sqrt(2 / num_f) with num_f = 2


def test_covariance_loss_zero_for_independent_constant_features():
    z = torch.ones(5, 4, 2)
    assert weighted_cross_covariance_loss(z, torch.full((5,), 0.2)).item() == 0.0


def test_covariance_loss_hand_computed():
    # Two features that are perfectly correlated: cov matrix [[v, v], [v, v]]; loss = 2 v².
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]])[:, :, None]
    w = torch.tensor([0.5, 0.5])
    v = 0.25  # weighted variance of {0, 1} with equal weights
    assert math.isclose(weighted_cross_covariance_loss(z, w).item(), 2 * v * v, rel_tol=1e-6)


def test_weights_positive_sum_to_one_and_decorrelate():
    z = correlated_features()
    n = z.shape[0]
    learner = SampleWeighting(z.shape[1], CIMConfig(memory_size=n, lambda_p=1.0))
    w = learner(z, epoch=1, iteration=0, generator=torch.Generator().manual_seed(0))
    assert w.shape == (n,)
    assert torch.all(w > 0)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-5)
    # Compare on the same RFF draws (averaged over several) against uniform weights.
    all_z = torch.cat([z, learner.memory_features])
    joint_learned = torch.softmax(torch.cat([torch.log(w * n), learner.memory_weights]), 0)
    uniform = torch.full((2 * n,), 1 / (2 * n))
    g = torch.Generator().manual_seed(123)
    learned_loss = uniform_loss = 0.0
    for _ in range(10):
        state = g.get_state()
        rff = random_fourier_features(all_z, generator=g)
        learned_loss += weighted_cross_covariance_loss(rff, joint_learned).item()
        g.set_state(state)
        rff = random_fourier_features(all_z, generator=g)
        uniform_loss += weighted_cross_covariance_loss(rff, uniform).item()
    assert learned_loss < uniform_loss


def test_correlated_samples_are_down_weighted():
    z = correlated_features()
    n = z.shape[0]
    learner = SampleWeighting(z.shape[1], CIMConfig(memory_size=n, lambda_p=1.0))
    w = learner(z, epoch=1, iteration=0, generator=torch.Generator().manual_seed(0))
    assert w[: n // 2].mean() < 0.5 * w[n // 2 :].mean()


def test_memory_running_mean_then_exponential():
    learner = SampleWeighting(4, CIMConfig(memory_size=2, inner_steps=1))
    z1, z2 = torch.ones(2, 4), 3 * torch.ones(2, 4)
    learner.update_memory(z1, torch.zeros(2), epoch=0, iteration=0)
    assert torch.allclose(learner.memory_features, z1)
    learner.update_memory(z2, torch.zeros(2), epoch=0, iteration=1)
    assert torch.allclose(learner.memory_features, 2 * torch.ones(2, 4))  # running mean
    learner.update_memory(torch.zeros(2, 4), torch.zeros(2), epoch=1, iteration=0)
    assert torch.allclose(learner.memory_features, 1.8 * torch.ones(2, 4))  # 0.9 × 2
    learner.update_memory(torch.zeros(1, 4), torch.zeros(1), epoch=1, iteration=1)  # short batch
    assert torch.allclose(learner.memory_features[1], 1.8 * torch.ones(4))


def test_lambda_p_scales_with_feature_dim():
    assert SampleWeighting(512).lambda_p == 70.0
    assert SampleWeighting(256).lambda_p == 17.5


def test_losses_hand_values():
    target = torch.tensor([[[0, 1], [2, 0]]])
    perfect = torch.zeros(1, 3, 2, 2)
    perfect.scatter_(1, target[:, None], 50.0)
    assert soft_dice_loss(perfect, target).item() < 1e-6
    assert focal_loss(perfect, target).item() < 1e-6
    uniform = torch.zeros(1, 3, 2, 2)
    # p_t = 1/3 everywhere; α_t: 0.2 (bg) ×2, 0.8 (fg) ×2
    expected = sum(a * (2 / 3) ** 2 * math.log(3) for a in (0.2, 0.8, 0.8, 0.2)) / 4
    assert math.isclose(focal_loss(uniform, target).item(), expected, rel_tol=1e-5)


def test_cim_weights_change_only_the_ce_term():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    uniform = segmentation_loss(logits, target, None)
    skewed = segmentation_loss(logits, target, torch.tensor([0.9, 0.1]))
    assert torch.isclose(uniform.dice, skewed.dice) and torch.isclose(uniform.focal, skewed.focal)
    ce = torch.nn.functional.cross_entropy(logits, target, reduction="none").flatten(1).mean(1)
    assert torch.isclose(skewed.cim, 0.9 * ce[0] + 0.1 * ce[1])


def test_two_class_loss_merges_boundary_into_nucleus():
    """A paper (2-class) model trains on 3-class targets: boundary counts as nucleus."""
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4)
    target = torch.randint(0, 3, (2, 4, 4))
    merged = segmentation_loss(logits, target.clamp(max=1))
    terms = segmentation_loss(logits, target)
    for name in ("total", "cim", "dice", "focal"):
        assert torch.isclose(getattr(terms, name), getattr(merged, name))
