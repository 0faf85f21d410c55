"""The CUDA path (issue 11 point 4): prediction, evaluation and a CIM training step on a GPU.

Everything here needs a CUDA device: the tests are marked ``gpu`` (deselected by default; run
them with ``python -m pytest -m gpu tests/test_gpu.py``) and skip without one. Each compares the
GPU's answer with the CPU's fp32 answer of the same code, so a wrong device, dtype, memory format
or a missing host copy shows as a difference, not only as a crash:

- the predictor (pinned memory, channels_last, bf16 autocast, batched TTA) against the CPU;
- ``predict_slide`` on a real slide region: the same nuclei as on the CPU;
- ``evaluate``: the same scores as on the CPU;
- one CIM training step under bf16 autocast: finite loss, gradients and weights on the GPU;
- ``torch.compile`` (``--compile``) against eager.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from synthetic import synthetic_tile

from cellseg.checkpoint import default_model_path, load_bundle
from cellseg.data import Sample
from cellseg.evaluation import evaluate
from cellseg.inference import Predictor
from cellseg.model import ModelConfig, build_model
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

# 600 × 600 level-0 px of CMU-1-Small-Region (tissue with ~300 nuclei), as in issue 11
ROI_XYWH = (800, 1200, 600, 600)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 on the GPU means fp32: TF32 convolutions differ from the CPU by ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture(scope="module")
def bundle():
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return load_bundle(path)


def tiles(n: int = 6, size_px: int = 224) -> np.ndarray:
    return np.stack([synthetic_tile(size_px, n_nuclei=10, seed=s)[0] for s in range(n)])


def test_cuda_predictor_matches_the_cpu(bundle):
    batch = tiles()
    cpu = Predictor(bundle, device="cpu", precision="fp32")(batch)
    fp32 = Predictor(bundle, device="cuda", precision="fp32")
    assert fp32.device.type == "cuda" and fp32.channels_last
    probs = fp32(batch)
    assert isinstance(probs, np.ndarray) and probs.dtype == np.float32
    assert np.abs(probs - cpu).max() <= 1e-3

    auto = Predictor(bundle, device="cuda", precision="auto")
    if torch.cuda.is_bf16_supported(including_emulation=False):
        assert auto.precision == "bf16"
    mixed = auto(batch)
    assert np.abs(mixed - cpu).max() <= 0.1
    assert (mixed.argmax(1) == cpu.argmax(1)).mean() >= 0.99

    tta_cpu = Predictor(bundle, device="cpu", precision="fp32", tta=True)(batch[:2])
    tta_cuda = Predictor(bundle, device="cuda", precision="fp32", tta=True)(batch[:2])
    assert np.abs(tta_cuda - tta_cpu).max() <= 1e-3


def test_cuda_predict_slide_finds_the_cpu_nuclei(bundle, cmu_slide, tmp_path):
    counts = {}
    for name, device, precision in (("cpu", "cpu", "fp32"), ("cuda", "cuda", "fp32")):
        out = tmp_path / name
        predictor = Predictor(bundle, device=device, precision=precision)
        options = PredictOptions(roi_xywh=ROI_XYWH, workers=0, label_workers=0, batch_size=64)
        outputs = SlideOutputs(geojson=out / "n.geojson", zarr=out / "n.zarr")
        summary = predict_slide(cmu_slide, predictor, outputs, options)
        assert summary["model"]["device"].startswith(device)
        counts[name] = summary["nuclei"]
        assert len(json.loads((out / "n.geojson").read_text())["features"]) == summary["nuclei"]
    assert counts["cpu"] >= 100
    assert abs(counts["cuda"] - counts["cpu"]) <= 0.01 * counts["cpu"]


def test_cuda_predict_slide_auto_precision(bundle, cmu_slide, tmp_path):
    predictor = Predictor(bundle, device="cuda", precision="auto")
    options = PredictOptions(roi_xywh=ROI_XYWH, workers=0, label_workers=0, batch_size=64)
    outputs = SlideOutputs(geojson=tmp_path / "n.geojson")
    summary = predict_slide(cmu_slide, predictor, outputs, options)
    assert summary["model"]["precision"] == predictor.precision
    assert summary["nuclei"] >= 100


def test_cuda_evaluate_matches_the_cpu(bundle):
    samples = []
    for seed in range(2):
        image, labels = synthetic_tile(256, n_nuclei=14, radius_px=8, seed=seed)
        samples.append(Sample(f"SYN-{seed}", image, labels, 0.5))
    results = {
        device: evaluate(bundle, samples, device=device, precision="fp32", progress=False)
        for device in ("cpu", "cuda")
    }
    assert results["cuda"]["precision"] == "fp32"
    for cpu_row, cuda_row in zip(
        results["cpu"]["per_image"], results["cuda"]["per_image"], strict=True
    ):
        for key, value in cpu_row.items():
            if isinstance(value, float) and np.isfinite(value):
                assert cuda_row[key] == pytest.approx(value, abs=0.01), key


def test_cuda_cim_training_step(tmp_path):
    from synthetic import write_monuseg

    from cellseg.training import Trainer, TrainOptions

    data = write_monuseg(tmp_path / "data", n_images=3, size_px=224, val=1)
    opts = TrainOptions(
        data=str(data),
        out=str(tmp_path / "run"),
        preset="paper",
        model_size="tiny",
        batch_size=2,
        device="cuda",
        precision="auto",
        best_after_epoch=0,
        epochs=1,
    )
    trainer = Trainer(opts, progress=False)
    x, y = next(iter(trainer.loader))
    terms = trainer.train_step(x, y, step=0)
    assert terms["loss_total"].device.type == "cuda"
    assert torch.isfinite(terms["loss_total"]).item()
    assert torch.isfinite(terms["cim_weight_min"]).item()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "cuda" for g in grads)


@pytest.mark.slow
def test_cuda_compiled_predictor_matches_eager(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig.tiny()
    from cellseg.checkpoint import ModelBundle

    bundle = ModelBundle(build_model(config).eval(), config, {"mpp": 0.5, "tile_px": 224})
    batch = tiles(4)
    eager = Predictor(bundle, device="cuda", precision="fp32")(batch)
    compiled = Predictor(bundle, device="cuda", precision="fp32", compile=True)
    compiled(batch)  # compiles
    assert np.abs(compiled(batch) - eager).max() <= 1e-3
