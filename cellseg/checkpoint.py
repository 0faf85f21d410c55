"""Model bundles: weights, architecture config and metadata in one safetensors file.

The JSON config and metadata (preset, mpp, post-processing thresholds, training facts) travel in
the safetensors header, so a model file rebuilds itself and nothing is ever unpickled. Training
state for ``--resume`` (optimiser, scheduler, CIM memory) is a tensors-and-primitives dict loaded
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_path
from .errors import ModelError
from .model import ModelConfig, build_model

FORMAT_VERSION = "1"
DEFAULT_MODEL = Path(__file__).with_name("weights") / "default.safetensors"


@dataclass
class ModelBundle:
    model: nn.Module
    config: ModelConfig
    meta: dict
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.meta.get("name") or (self.path.stem if self.path else "unnamed")


def default_model_path() -> Path:
    """The small trained model shipped inside the package."""
    return DEFAULT_MODEL


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_bundle(
    path: Path, model: nn.Module, config: ModelConfig, meta: dict, half: bool = False
) -> None:
    """Writes ``path`` atomically. ``half=True`` stores float weights as fp16 (shipping size)."""
    from safetensors.torch import save_file

    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu().contiguous()
        tensors[k] = v.half() if half and v.is_floating_point() else v
    header = {
        "format_version": FORMAT_VERSION,
        "config": json.dumps(config.to_dict()),
        "meta": json.dumps(meta),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load_bundle(path: Path | str, device: str | torch.device = "cpu") -> ModelBundle:
    """Loads a bundle written by :func:`save_bundle`; errors name the file in one line."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable cellseg model ({exc})") from None
    if "config" not in header:
        raise ModelError(f"{path}: safetensors file without a cellseg model config")
    try:
        config = ModelConfig.from_dict(json.loads(header["config"]))
        meta = json.loads(header.get("meta", "{}"))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{path}: invalid model config ({exc})") from None
    model = build_model(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ModelError(f"{path}: weights do not match the config ({first})") from None
    model.to(device).eval()
    return ModelBundle(model, config, meta, path)
