"""Checkpoints: weights as safetensors (no pickle), training state loaded with weights_only=True.

``<name>.safetensors`` holds ``model.*`` (raw weights) and ``ema.*`` (EMA weights,
when used) plus the model's config in its metadata, so the file alone rebuilds
the model. ``<name>.state.pt`` holds the optimiser, step counters and RNG
states needed to resume exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import BrainVAEError, InputFileError
from ..models.registry import build, config_dict, lookup


def save_weights(path: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None, extra: dict | None = None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    metadata = {"brainvae_model": json.dumps(config_dict(model)), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_metadata(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise InputFileError(path, "checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise InputFileError(path, f"not a readable safetensors checkpoint ({exc})") from None
    if "brainvae_model" not in meta:
        raise InputFileError(path, "not a brainvae checkpoint (no model config in its metadata)")
    return {k: json.loads(v) for k, v in meta.items()}


def load_weights(path: Path, model: torch.nn.Module, *, prefer_ema: bool = False) -> None:
    """Load weights into ``model``; refuses a checkpoint of another architecture."""
    meta = read_metadata(path)
    arch = meta["brainvae_model"]["arch"]
    if arch != model.arch:
        raise InputFileError(path, f"checkpoint is from architecture {arch!r}, not {model.arch!r}")
    tensors = load_file(str(path))
    prefix = "ema." if prefer_ema and any(k.startswith("ema.") for k in tensors) else "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise InputFileError(path, f"weights do not fit the model config ({exc})") from None


def load_model(path: Path, *, prefer_ema: bool = True, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model from a checkpoint file alone (EMA weights when present)."""
    meta = read_metadata(path)
    cfg = dict(meta["brainvae_model"])
    arch = cfg.pop("arch")
    lookup(arch)
    model = build(arch, cfg)
    load_weights(path, model, prefer_ema=prefer_ema)
    return model.to(device, memory_format=torch.channels_last).eval()  # the layout training used


def ema_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    tensors = load_file(str(path))
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return ema or None


def save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BrainVAEError(f"{path}: no training state to resume from") from None
