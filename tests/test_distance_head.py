"""The distance-map output (issue 10 point 4): targets, loss, model, predictor, labelling, store.

A distance-head model outputs four channels: the three classes' softmax, then the sigmoid of a
regressed per-nucleus distance map (``targets.distance_targets``) that seeds the watershed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import shapely
import torch
from oracle import DiscOracle
from slides import make_pyramid_tiff
from test_grid import FAST, MPP, dense_discs, geometry_set

from cellseg.checkpoint import load_bundle, save_bundle
from cellseg.inference import Predictor
from cellseg.instances import PostProcess, label_instances
from cellseg.losses import segmentation_loss
from cellseg.model import ModelConfig, build_model
from cellseg.predict import PredictOptions, SlideOutputs, predict_slide
from cellseg.store import PredictionStore
from cellseg.targets import class_targets, distance_targets
from cellseg.training import inherit_weights


def test_distance_targets_by_hand():
    labels = np.zeros((9, 16), np.int32)
    labels[1:8, 1:8] = 1  # a 7×7 square: interior 5×5, boundary ring 1 px
    labels[1:8, 8:15] = 2  # touching it on the right
    classes = class_targets(labels)
    d = distance_targets(classes)
    assert d.dtype == np.float32 and d.shape == labels.shape
    assert np.all(d[classes != 1] == 0)
    # Interior 5×5: Euclidean distance to the nearest non-interior pixel is 1, 2, 3, 2, 1 along
    # the middle row, divided by the maximum 3.
    np.testing.assert_allclose(d[4, 2:7], np.array([1, 2, 3, 2, 1]) / 3, rtol=1e-6)
    np.testing.assert_allclose(d[4, 9:14], np.array([1, 2, 3, 2, 1]) / 3, rtol=1e-6)
    assert d[4, 4] == d[4, 11] == 1.0  # each nucleus peaks at 1 on its own
    assert np.array_equal(distance_targets(np.stack([classes, classes])), np.stack([d, d]))


def test_distance_targets_normalise_each_nucleus_and_treat_the_border_as_outside():
    labels = np.zeros((40, 40), np.int32)
    labels[2:8, 2:8] = 1  # small
    labels[12:38, 12:38] = 2  # large
    labels[0:5, 30:40] = 3  # cut by the top and right edges
    d = distance_targets(class_targets(labels))
    for nucleus in (1, 2, 3):
        assert d[labels == nucleus].max() == pytest.approx(1.0)
    assert d[0, 35] > 0  # edge pixels of a cut nucleus are not boundary...
    assert d[0, 35] < d[2, 35]  # ...but the peak lies inside the crop


def test_config_round_trip_and_old_configs():
    cfg = ModelConfig.tiny(distance_head=True)
    assert cfg.output_channels == 4 and ModelConfig.from_dict(cfg.to_dict()) == cfg
    old = ModelConfig.tiny().to_dict()
    del old["distance_head"]  # bundles written before the option
    assert ModelConfig.from_dict(old).output_channels == 3
    with pytest.raises(ValueError, match="three classes"):
        ModelConfig.tiny(num_classes=2, distance_head=True)
    assert build_model(cfg)(torch.rand(1, 3, 64, 64)).shape == (1, 4, 64, 64)


def test_loss_adds_the_weighted_distance_mse():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 16, 16, requires_grad=True)
    labels = np.zeros((16, 16), np.int32)
    labels[3:12, 3:12] = 1
    y = torch.from_numpy(np.stack([class_targets(labels)] * 2)).long()
    d = torch.from_numpy(distance_targets(y.numpy()))
    without = segmentation_loss(logits[:, :3], y)
    terms = segmentation_loss(logits, y, distance_target=d)
    mse = ((torch.sigmoid(logits[:, 3]) - d) ** 2).mean()
    assert torch.allclose(terms.distance, mse)
    assert torch.allclose(terms.total, without.total + 2.0 * mse)
    assert set(terms.as_floats()) == {"total", "cim", "dice", "focal", "distance"}
    terms.total.backward()
    assert logits.grad[:, 3].abs().sum() > 0


def test_predictor_gives_softmax_then_sigmoid(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.tiny(distance_head=True)
    model = build_model(cfg).eval()
    path = tmp_path / "d.safetensors"
    save_bundle(path, model, cfg, {"mpp": 0.5, "tile_px": 64})
    predictor = Predictor(load_bundle(path, "cpu"), device="cpu", precision="fp32")
    assert predictor.num_classes == 4
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    probs = predictor(tiles)
    logits = model(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255).detach()
    np.testing.assert_allclose(probs[:, :3], torch.softmax(logits[:, :3], 1).numpy(), atol=1e-6)
    np.testing.assert_allclose(probs[:, 3], torch.sigmoid(logits[:, 3]).numpy(), atol=1e-6)


def test_distance_seeds_split_nuclei_the_interior_class_merges():
    """Two touching nuclei whose interior probability bridges them: the 3-class watershed sees
    one marker, the distance map two."""
    labels = np.zeros((24, 40), np.int32)
    labels[4:20, 4:20] = 1
    labels[4:20, 20:36] = 2
    classes = class_targets(labels)
    probs = np.zeros((4, 24, 40), np.float32)
    probs[1] = labels > 0  # interior everywhere: no boundary between the two
    probs[0] = 1 - probs[1]
    probs[3] = distance_targets(classes)
    params = PostProcess(marker_threshold=0.5, min_area_um2=0.0)
    assert label_instances(probs[:3], 0.5, params).max() == 1
    split = label_instances(probs, 0.5, params)
    assert split.max() == 2
    assert np.array_equal(split > 0, labels > 0)
    # Each nucleus is one instance but for the plateau where the floods meet (d = 0 on both
    # boundary columns: a tie, settled by position).
    for nucleus, other in ((1, 2), (2, 1)):
        ids, counts = np.unique(split[labels == nucleus], return_counts=True)
        assert counts.max() >= 0.9 * counts.sum()
        assert ids[counts.argmax()] != np.bincount(split[labels == other]).argmax()


def test_store_keeps_the_distance_channel_losslessly(tmp_path):
    store = PredictionStore.create(tmp_path / "s.zarr", (64, 64), num_classes=4, with_labels=False)
    assert store.has_distance
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], (64, 64)).transpose(2, 0, 1).astype(np.float32)
    probs = np.concatenate([probs, rng.random((1, 64, 64), np.float32)])
    store.write_cells([((0, 32, 0, 64), probs[:, :32]), ((32, 64, 0, 64), probs[:, 32:])])
    back = PredictionStore.open(tmp_path / "s.zarr", (64, 64)).read_float((0, 64, 0, 64))
    assert back.shape == (4, 64, 64)
    assert np.array_equal(back[[0, 1, 3]], probs[[0, 1, 3]])


class DistanceOracle(DiscOracle):
    """The disc oracle plus a fourth channel equal to its interior class."""

    num_classes = 4

    @staticmethod
    def probabilities(images: np.ndarray) -> np.ndarray:
        probs = DiscOracle.probabilities(images)
        return np.concatenate([probs, probs[:, 1:2]], axis=1)


def test_four_channel_pipeline_equals_three_channel_when_the_map_is_the_interior(tmp_path):
    """Stitching, the float store, the block-wise labelling and the polygons carry the fourth
    channel through: with ``d = p1`` the nuclei are exactly the three-class ones, whatever the
    block size."""
    image, _ = dense_discs(300, 420)
    path = make_pyramid_tiff(tmp_path / "dense.svs", image, MPP, levels=1)

    def run(oracle, name, **options):
        out = SlideOutputs(geojson=tmp_path / name / "n.geojson", zarr=tmp_path / name / "n.zarr")
        predict_slide(path, oracle, out, PredictOptions(**{**FAST, **options}))
        features = json.loads(out.geojson.read_text())["features"]
        return geometry_set([shapely.geometry.shape(f["geometry"]) for f in features])

    three = run(DiscOracle(), "three")
    assert len(three) > 300
    assert run(DistanceOracle(), "four") == three
    assert run(DistanceOracle(), "four-blocks", region_px=576) == three


def test_init_from_a_class_model_copies_every_weight():
    torch.manual_seed(0)
    base = build_model(ModelConfig.tiny()).eval()
    model = build_model(ModelConfig.tiny(distance_head=True)).eval()
    fresh_row = model.decoder.head.weight[3].detach().clone()
    inherit_weights(model, base)
    x = torch.rand(1, 3, 64, 64)
    # Equal but for the 1×1 convolution's summation order with 4 instead of 3 outputs.
    torch.testing.assert_close(model(x)[:, :3], base(x), rtol=0, atol=1e-5)
    assert torch.equal(model.decoder.head.weight[:3], base.decoder.head.weight)
    assert torch.equal(model.decoder.head.weight[3], fresh_row)
    with pytest.raises(ValueError, match="cannot fill"):
        inherit_weights(base, model)
