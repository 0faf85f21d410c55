"""The model shipped inside the package: loads offline, matches its card, finds nuclei."""

import re

import numpy as np
import torch

from cellseg.checkpoint import default_model_path, file_sha256, load_bundle
from cellseg.inference import Predictor, predict_array
from cellseg.instances import PostProcess, label_instances
from cellseg.slide import open_slide

torch.set_num_threads(1)


def test_default_model_matches_its_card():
    path = default_model_path()
    assert path.is_file() and path.stat().st_size < 25 * 2**20
    card = (path.parent / "MODEL_CARD.md").read_text()
    assert re.search(r"SHA-256\*\*: `([0-9a-f]{64})`", card).group(1) == file_sha256(path)
    bundle = load_bundle(path)
    assert bundle.meta["mpp"] == 0.5 and bundle.config.num_classes == 3
    PostProcess.from_dict(bundle.meta["postprocess"])  # valid stored thresholds


def test_default_model_finds_nuclei_on_the_cmu_fixture(cmu_slide):
    bundle = load_bundle(default_model_path())
    predictor = Predictor(bundle, device="cpu")
    with open_slide(cmu_slide) as slide:
        # a cellular area of the CC0 Aperio fixture (level-0 px), read at the model's 0.5 µm/px
        image = slide.read_region_at_mpp((900, 1900), (224, 224), predictor.mpp)
    probs = predict_array(image, predictor, 224, 0)
    post = PostProcess.from_dict(bundle.meta["postprocess"])
    labels = label_instances(probs, predictor.mpp, post)
    n = int(labels.max())
    fg = float((labels > 0).mean())
    assert 10 <= n <= 200, n  # ~50 nuclei are visible in this 112 µm square
    assert 0.05 < fg < 0.6, fg
    assert np.allclose(probs.sum(axis=0), 1, atol=1e-4)
