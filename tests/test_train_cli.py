"""End-to-end `cellseg train` / `cellseg evaluate` on a tiny synthetic MoNuSeg folder."""

import json

import pytest
import torch
from cellseg.cli.main import cellseg
from click.testing import CliRunner
from synthetic import write_monuseg

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def monuseg(tmp_path_factory):
    return write_monuseg(tmp_path_factory.mktemp("monuseg"), n_images=5, size_px=256)


def run(args):
    result = CliRunner().invoke(cellseg, args, catch_exceptions=False)
    return result


def test_version_and_help_examples():
    assert run(["--version"]).output.startswith("cellseg, version")
    for command in ("train", "evaluate", "predict"):
        out = run([command, "--help"])
        assert out.exit_code == 0
        assert "Example" in out.output


def test_train_resume_and_evaluate(monuseg, tmp_path):
    out = tmp_path / "run"
    common = [
        "--data",
        str(monuseg),
        "--out",
        str(out),
        "--model-size",
        "tiny",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    result = run(["train", "--preset", "paper", "--epochs", "2", *common])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert {
        "loss_total",
        "loss_cim",
        "loss_dice",
        "loss_focal",
        "val_dice",
        "cim_weight_std",
        "seconds",
    } <= set(log[0])
    assert (out / "best.safetensors").is_file() and (out / "last_state.pt").is_file()

    # --resume continues from epoch 2 with the stored options and optimiser state
    result = run(["train", "--preset", "paper", "--epochs", "3", "--resume", *common])
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]

    metrics = tmp_path / "m.json"
    result = run(
        [
            "evaluate",
            "--data",
            str(monuseg / "train"),
            "--model",
            str(out / "best.safetensors"),
            "--protocol",
            "native",
            "--json",
            str(metrics),
        ]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(metrics.read_text())
    assert {"dice", "iou", "aji", "pq", "dq", "sq"} <= set(data["summary"])
    assert len(data["per_image"]) == 5
    result = run(
        [
            "evaluate",
            "--data",
            str(monuseg / "train"),
            "--model",
            str(out / "best.safetensors"),
            "--protocol",
            "paper",
        ]
    )
    assert result.exit_code == 0 and "mean" in result.output


def test_wsi_preset_one_epoch_without_cim(monuseg, tmp_path):
    out = tmp_path / "wsi"
    result = run(
        [
            "train",
            "--data",
            str(monuseg),
            "--out",
            str(out),
            "--model-size",
            "tiny",
            "--batch-size",
            "4",
            "--epochs",
            "1",
            "--mpp",
            "0.25",
            "--no-cim",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "log.jsonl").read_text())
    assert "cim_weight_std" not in record and 0.0 <= record["val_dice"] <= 1.0


def test_bad_data_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(cellseg, ["train", "--data", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert result.output.strip().count("\n") == 0 and "nope" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(cellseg, ["train", "--data", str(empty)])
    assert result.exit_code != 0 and result.output.startswith("error:")
    assert result.output.strip().count("\n") == 0


def test_init_fine_tunes_from_a_bundle_and_rejects_another_config(monuseg, tmp_path):
    from cellseg.checkpoint import file_sha256, load_bundle, save_bundle
    from cellseg.model import ModelConfig, build_model
    from cellseg.training import Trainer, TrainOptions

    torch.manual_seed(123)
    source = build_model(ModelConfig.tiny(num_classes=3))
    init = tmp_path / "init.safetensors"
    save_bundle(init, source, ModelConfig.tiny(num_classes=3), {"mpp": 0.5})
    opts = TrainOptions(
        data=str(monuseg),
        out=str(tmp_path / "ft"),
        preset="paper",
        model_size="tiny",
        batch_size=2,
        epochs=1,
        device="cpu",
        init_from=str(init),
    )
    trainer = Trainer(opts, progress=False)
    assert trainer.load_init_weights() == file_sha256(init)
    expected = load_bundle(init).model.state_dict()
    got = trainer.model.state_dict()
    assert all(torch.equal(expected[k], got[k].cpu()) for k in expected)

    trainer.run()
    info = json.loads((tmp_path / "ft" / "options.json").read_text())
    assert info["init_sha256"] == file_sha256(init)
    assert load_bundle(tmp_path / "ft" / "best.safetensors").meta["init_from"] == str(init)

    # a model of another shape is refused in one line naming the differing keys
    bad = ["--out", str(tmp_path / "bad"), "--init", str(init), "--batch-size", "2"]
    result = run(["train", "--data", str(monuseg), "--preset", "paper", "--epochs", "1", *bad])
    assert result.exit_code != 0 and result.output.startswith("error:")
    assert "widths" in result.output and result.output.strip().count("\n") == 0
    assert not (tmp_path / "bad").exists()  # no empty run folder left behind


def test_paper_preset_with_two_datasets_is_a_usage_error(monuseg, tmp_path):
    out = tmp_path / "run"
    result = run(
        [
            "train",
            "--data",
            str(monuseg),
            "--data",
            str(monuseg),
            "--preset",
            "paper",
            "--out",
            str(out),
        ]
    )
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: the paper preset trains on one dataset (give --data once)"
    ]
    assert not out.exists()


def test_distance_map_with_binary_is_a_usage_error(monuseg, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(monuseg), "--binary", "--distance-map", "--out", str(out)]
    result = run(args)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: --distance-map needs the three classes (drop --binary)"
    ]
    assert not out.exists()


def test_shift_consistency_with_the_paper_preset_is_a_usage_error(monuseg, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", str(monuseg), "--preset", "paper", "--shift-consistency", "10"]
    result = run([*args, "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: --shift-consistency is for the wsi preset"]
    assert not out.exists()
