"""Model contract: shapes, ablation switches, k1/k2, SimAM, MBConv, checkpoint round trip."""

import json

import numpy as np
import pytest
import torch

from cellseg.blocks import MBConv, SimAM
from cellseg.checkpoint import load_bundle, save_bundle
from cellseg.errors import ModelError
from cellseg.inference import Predictor, blend_weights, predict_array, tile_origins
from cellseg.model import ModelConfig, build_model, count_parameters

torch.set_num_threads(1)


@pytest.mark.parametrize("arch", ["causal", "unet", "attention_unet"])
def test_forward_shapes_and_bottleneck(arch):
    cfg = ModelConfig.tiny(arch=arch)
    model = build_model(cfg).eval()
    x = torch.rand(2, 3, 64, 96)
    logits, f5 = model(x, return_bottleneck=True)
    assert logits.shape == (2, 3, 64, 96)
    assert f5.shape == (2, cfg.widths[-1], 2, 3)
    assert torch.equal(model(x), logits)


def test_dac_switch_removes_mbconv_simam_and_k():
    with_dac = build_model(ModelConfig.tiny())
    without = build_model(ModelConfig.tiny(use_dac=False))
    names = {n for n, _ in with_dac.named_parameters()}
    assert {f"stages.{i}.k1" for i in range(5)} <= names
    assert not any("mbconv" in n or n.endswith(".k1") for n, _ in without.named_parameters())
    assert count_parameters(without) < count_parameters(with_dac)
    for i in range(5):
        assert with_dac.stages[i].k1.item() == 1.0 and with_dac.stages[i].k2.item() == 1.0


def test_k_weights_receive_gradients():
    model = build_model(ModelConfig.tiny())
    model(torch.rand(2, 3, 64, 64)).sum().backward()
    assert all(model.stages[i].k1.grad is not None for i in range(5))


def test_transformer_only_on_first_stage():
    model = build_model(ModelConfig.tiny())
    assert model.stages[0].transformer is not None
    assert all(model.stages[i].transformer is None for i in range(1, 5))
    assert build_model(ModelConfig.tiny(use_transformer=False)).stages[0].transformer is None


def test_simam_matches_closed_form_energy():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 5, 5)
    lam = 1e-4
    out = SimAM(lam)(x)
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mu) ** 2).sum(dim=(2, 3), keepdim=True) / (25 - 1)
    energy = 4 * (var + lam) / ((x - mu) ** 2 + 2 * var + 2 * lam)
    assert torch.allclose(out, x * torch.sigmoid(1 / energy), atol=1e-6)
    assert sum(p.numel() for p in SimAM().parameters()) == 0


def test_mbconv_downsamples_with_squeeze_excitation():
    block = MBConv(8, 16, stride=2, expand=4)
    assert block(torch.rand(1, 8, 32, 32)).shape == (1, 16, 16, 16)
    assert block.se.reduce.out_channels == 2  # 0.25 × input channels
    assert not block.has_skip and MBConv(8, 8, stride=1).has_skip


def test_paper_size_matches_spec():
    # SPEC §6.3: 13.52 M parameters for the DEFAULT architecture with 2 classes.
    params = count_parameters(build_model(ModelConfig.paper(num_classes=2)))
    assert abs(params / 1e6 - 13.52) < 0.01


def test_bundle_round_trip_and_errors(tmp_path):
    cfg = ModelConfig.tiny()
    model = build_model(cfg).eval()
    path = tmp_path / "m.safetensors"
    save_bundle(path, model, cfg, {"mpp": 0.5, "preset": "wsi"})
    bundle = load_bundle(path)
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(bundle.model(x), model(x), atol=1e-6)
    assert bundle.meta["mpp"] == 0.5 and bundle.config == cfg
    with pytest.raises(ModelError, match="not found"):
        load_bundle(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match=r"bad\.safetensors"):
        load_bundle(bad)
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_half_precision_bundle_is_close(tmp_path):
    cfg = ModelConfig.tiny()
    model = build_model(cfg).eval()
    save_bundle(tmp_path / "h.safetensors", model, cfg, {}, half=True)
    x = torch.rand(1, 3, 64, 64)
    out = load_bundle(tmp_path / "h.safetensors").model(x)
    assert torch.allclose(torch.softmax(out, 1), torch.softmax(model(x), 1), atol=2e-2)


def test_blend_weights_positive_and_crossfade():
    w = blend_weights(16, 4)
    assert w.min() > 0 and w.max() == 1.0
    ramp = w[8]
    # two tiles overlapping by 4 px: their weights at the shared columns are mirror images
    assert np.allclose(ramp[-4:], ramp[:4][::-1])
    assert tile_origins(100, 32, 24) == [0, 24, 48, 68]


def test_predict_array_exact_with_pixelwise_oracle():
    """A per-pixel oracle gives identical output whatever the tiling: the blend is exact."""

    def oracle(tiles):
        g = tiles.astype(np.float32).mean(axis=-1) / 255
        return np.stack([g, 1 - g], axis=1)

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(150, 170, 3), dtype=np.uint8)
    probs = predict_array(image, oracle, tile_px=64, overlap_px=16, batch_size=5)
    expected = oracle(image[None])[0]
    assert probs.shape == (2, 150, 170)
    assert np.allclose(probs, expected, atol=1e-5)


def test_predictor_returns_probabilities(tmp_path):
    cfg = ModelConfig.tiny()
    save_bundle(tmp_path / "m.safetensors", build_model(cfg), cfg, {"mpp": 0.5, "tile_px": 64})
    predictor = Predictor(load_bundle(tmp_path / "m.safetensors"), device="cpu")
    tiles = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    probs = predictor(tiles)
    assert probs.shape == (3, 3, 64, 64) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert predictor.mpp == 0.5 and predictor.tile_px == 64


def test_tta_is_the_d4_average_and_rotation_equivariant(tmp_path):
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    save_bundle(tmp_path / "m.safetensors", build_model(cfg), cfg, {"mpp": 0.5, "tile_px": 64})
    plain = Predictor(load_bundle(tmp_path / "m.safetensors"), device="cpu")
    tta = Predictor(load_bundle(tmp_path / "m.safetensors"), device="cpu", tta=True)
    tiles = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)

    # the 8 views, predicted one by one and mapped back by hand (axes: N, C, y, x)
    views = []
    for turns in range(4):
        for flip in (False, True):
            view = np.rot90(tiles, turns, axes=(1, 2))
            probs = plain(view[:, :, ::-1] if flip else view)
            probs = probs[..., ::-1] if flip else probs
            views.append(np.rot90(probs, -turns, axes=(2, 3)))
    averaged = tta(tiles)
    assert np.allclose(averaged, np.mean(views, axis=0), atol=1e-5)
    assert not np.allclose(averaged, plain(tiles), atol=1e-3)  # the views do differ

    # rotating or mirroring the input rotates or mirrors the TTA output
    turned = tta(np.rot90(tiles, 1, axes=(1, 2)).copy())
    assert np.allclose(turned, np.rot90(averaged, 1, axes=(2, 3)), atol=1e-5)
    mirrored = tta(tiles[:, ::-1].copy())
    assert np.allclose(mirrored, averaged[:, :, ::-1], atol=1e-5)


def test_tta_runs_its_views_batched_with_the_same_average(tmp_path):
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    save_bundle(tmp_path / "m.safetensors", build_model(cfg), cfg, {"mpp": 0.5, "tile_px": 64})
    batched = Predictor(
        load_bundle(tmp_path / "m.safetensors"), device="cpu", tta=True, max_tta_batch=16
    )
    one_by_one = Predictor(
        load_bundle(tmp_path / "m.safetensors"), device="cpu", tta=True, max_tta_batch=1
    )
    calls = []
    batched.model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    tiles = np.random.default_rng(3).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert np.allclose(batched(tiles), one_by_one(tiles), atol=1e-5)
    assert calls == [16]  # all 8 views of both tiles in one network call

    # non-square tiles: views turned an odd number of times are W×H, so two calls
    calls.clear()
    wide = np.random.default_rng(4).integers(0, 256, (1, 64, 96, 3), dtype=np.uint8)
    plain = Predictor(load_bundle(tmp_path / "m.safetensors"), device="cpu")
    views = []
    for turns in range(4):
        for flip in (False, True):
            view = np.rot90(wide, turns, axes=(1, 2))
            probs = plain(np.ascontiguousarray(view[:, :, ::-1] if flip else view))
            probs = probs[..., ::-1] if flip else probs
            views.append(np.rot90(probs, -turns, axes=(2, 3)))
    assert np.allclose(batched(wide), np.mean(views, axis=0), atol=1e-5)
    assert calls == [4, 4]
