"""--precision: what auto picks, the fp32 islands, and bf16 agreeing with fp32 (issue 9 items 1-2).

bf16 runs on any CPU (emulated where it has no AMX/AVX512-BF16), so the agreement is tested here
on a tiny model fitted in a few steps to synthetic nuclei. Stated tolerances (bf16 vs fp32):
max |Δp| <= 0.05 per pixel, the same nucleus count, foreground Dice >= 0.99, AJI >= 0.95.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import synthetic_tile

from cellseg import precision
from cellseg.blocks import SimAM
from cellseg.checkpoint import ModelBundle
from cellseg.errors import CellsegError
from cellseg.inference import Predictor, predict_array
from cellseg.instances import PostProcess, label_instances
from cellseg.losses import segmentation_loss
from cellseg.metrics import aji, dice
from cellseg.model import ModelConfig, build_model
from cellseg.targets import class_targets

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_auto_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ())
    assert precision.resolve_precision("auto", CPU) == "fp32"
    assert precision.resolve_precision("bf16", CPU) == "bf16"  # runs, emulated
    assert precision.resolve_precision("fp32", CPU) == "fp32"
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("amx_bf16",))
    assert precision.resolve_precision("auto", CPU) == "bf16"
    assert precision.use_channels_last("bf16", CPU) and not precision.use_channels_last("fp32", CPU)
    with pytest.raises(CellsegError, match="--precision"):
        precision.resolve_precision("fp16", CPU)


def test_cpuinfo_flags_are_read_from_the_flags_line():
    text = "processor\t: 0\nflags\t\t: fpu sse2 avx2 amx_bf16 amx_tile\nbugs\t\t: none\n"
    assert {"amx_bf16", "avx2"} <= precision.cpuinfo_flags(text)
    assert "avx512_bf16" not in precision.cpuinfo_flags(text)
    assert precision.cpuinfo_flags("processor : 0\n") == set()


def test_simam_is_computed_in_fp32_under_autocast():
    x = (
        1 + 0.02 * torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    ).bfloat16()
    reference = SimAM()(x.float())  # fp32 arithmetic on the same (bf16-representable) input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = SimAM()(x)
    assert mixed.dtype == torch.bfloat16  # the next convolution still gets bf16
    # Only the output is rounded to bf16 (relative 2^-8); the energy itself was fp32.
    torch.testing.assert_close(mixed.float(), reference, rtol=2**-8, atol=0)


def fitted_tiny_model(steps: int = 12) -> torch.nn.Module:
    """The tiny config fitted for a few steps to 96 px synthetic discs (foreground Dice ~0.9)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)  # module fixture: runs before the per-test one_thread fixture
    model = build_model(ModelConfig.tiny())
    pairs = [synthetic_tile(96, n_nuclei=5, radius_px=7, seed=s) for s in range(16)]
    x = torch.stack([torch.from_numpy(im).permute(2, 0, 1).float() / 255 for im, _ in pairs])
    y = torch.stack([torch.from_numpy(class_targets(lab)).long() for _, lab in pairs])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(pairs), (8,), generator=order)
        loss = segmentation_loss(model(x[batch]), y[batch]).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def tiny_bundle() -> ModelBundle:
    with torch.random.fork_rng():
        model = fitted_tiny_model()
    meta = {"mpp": 0.5, "tile_px": 224, "postprocess": PostProcess().to_dict()}
    return ModelBundle(model, ModelConfig.tiny(), meta)


def test_bf16_gives_the_same_nuclei_as_fp32(tiny_bundle):
    image, truth = synthetic_tile(320, n_nuclei=24, radius_px=7, seed=99)
    runs = {}
    for name in ("fp32", "bf16"):
        predictor = Predictor(tiny_bundle, device="cpu", precision=name)
        assert predictor.precision == name and predictor.channels_last == (name == "bf16")
        probs = predict_array(image, predictor, 224, 64)
        runs[name] = probs, label_instances(probs, 0.5, PostProcess())
    (p32, l32), (p16, l16) = runs["fp32"], runs["bf16"]
    assert dice(l32 > 0, truth > 0) > 0.7  # the fitted model does find the discs
    assert np.abs(p32 - p16).max() <= 0.05
    assert l32.max() == l16.max() and l32.max() >= 20
    assert dice(l32 > 0, l16 > 0) >= 0.99
    assert aji(l32, l16) >= 0.95


@pytest.mark.gpu
def test_cuda_bf16_gives_the_same_probabilities_as_fp32(tiny_bundle):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    image, _ = synthetic_tile(320, n_nuclei=24, radius_px=7, seed=99)
    probs = {}
    for name in ("fp32", "bf16"):
        predictor = Predictor(tiny_bundle, device="cuda", precision=name)
        probs[name] = predict_array(image, predictor, 224, 64)
    assert np.abs(probs["fp32"] - probs["bf16"]).max() <= 0.05
