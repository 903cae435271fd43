"""Checkpoints: weights as safetensors (no pickle), training state loaded with weights_only=True.

``<name>.safetensors`` holds ``model.*`` (raw weights) and ``ema.*`` (EMA weights,
when used) plus the model's config in its metadata, so the file alone rebuilds
the model. ``<name>.state.pt`` holds the optimiser, step counters and RNG
states needed to resume exactly.

A pair is written as one unit as far as a file system allows: both files are
written to temporary names first, then renamed one right after the other.
Both record the training step (and stage), and :func:`load_state_for` refuses
a pair whose steps differ (a kill between the two renames), so a resumed run
never mixes the weights of one step with the optimiser state of another.
Files get the usual permissions (safetensors makes them 0600).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..errors import BrainVAEError, InputFileError
from ..io.atomic import usual_mode
from ..io.download import file_sha256
from ..models.registry import build, config_dict, lookup


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_weights(path: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None, extra: dict | None) -> None:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.items()})
    metadata = {"brainvae_model": json.dumps(config_dict(model)), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    save_file(tensors, str(path), metadata=metadata)
    usual_mode(path)


def save_weights(path: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None, extra: dict | None = None) -> None:
    path = Path(path)
    tmp = _tmp(path)
    try:
        _write_weights(tmp, model, ema, extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(weights: Path, state_file: Path, model: torch.nn.Module, ema: dict[str, torch.Tensor] | None,
                    extra: dict, state: dict) -> None:
    """Write a weights file and its training state as one unit (both written, then both renamed).

    ``extra`` (saved in the weights' metadata) and ``state["counters"]`` both carry ``step`` and ``stage``.
    """
    tmp_weights, tmp_state = _tmp(Path(weights)), _tmp(Path(state_file))
    try:
        _write_weights(tmp_weights, model, ema, extra)
        torch.save(state, tmp_state)
        usual_mode(tmp_state)
        os.replace(tmp_weights, weights)
        os.replace(tmp_state, state_file)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_state.unlink(missing_ok=True)


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
    try:
        return {k: json.loads(v) for k, v in meta.items()}
    except ValueError:
        raise InputFileError(path, "corrupt checkpoint metadata (not JSON)") from None


def describe_checkpoint(path: Path) -> dict:
    """What names a checkpoint in an output's meta.json: its path, SHA-256 and training step (and stage)."""
    meta = read_metadata(path)
    return {"path": str(path), "sha256": file_sha256(path), **{k: meta[k] for k in ("step", "stage") if k in meta}}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:  # e.g. truncated after its header
        raise InputFileError(path, f"not a readable safetensors checkpoint ({exc})") from None


def load_weights(path: Path, model: torch.nn.Module, *, prefer_ema: bool = False,
                 may_lack: tuple[str, ...] = ()) -> None:
    """Load weights into ``model``; refuses a checkpoint of another architecture. Keys starting with a
    ``may_lack`` prefix may be missing from the checkpoint (the model keeps its own)."""
    meta = read_metadata(path)
    arch = meta["brainvae_model"]["arch"]
    if arch != model.arch:
        raise InputFileError(path, f"checkpoint is from architecture {arch!r}, not {model.arch!r}")
    tensors = _tensors(path)
    prefix = "ema." if prefer_ema and any(k.startswith("ema.") for k in tensors) else "model."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith(may_lack)]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        example = (missing + unexpected + reshaped)[0]
        raise InputFileError(path, f"weights do not fit the model config ({len(missing)} missing, {len(unexpected)} "
                                   f"unexpected, {len(reshaped)} of another shape, e.g. {example!r})")
    model.load_state_dict({**expected, **state})


def load_model(path: Path, *, prefer_ema: bool = True, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a model from a checkpoint file alone (EMA weights when present)."""
    meta = read_metadata(path)
    try:
        cfg = dict(meta["brainvae_model"])
        arch = cfg.pop("arch")
        lookup(arch)
        model = build(arch, cfg)
    except (BrainVAEError, KeyError, TypeError, ValueError) as exc:  # its metadata does not build a model
        raise InputFileError(path, f"its model config does not build a model ({exc})") from None
    load_weights(path, model, prefer_ema=prefer_ema)
    return model.to(device, memory_format=torch.channels_last).eval()  # the layout training used


def ema_tensors(path: Path) -> dict[str, torch.Tensor] | None:
    tensors = _tensors(path)
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return ema or None


def load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BrainVAEError(f"{path}: no training state to resume from") from None
    except Exception as exc:  # truncated or not a torch file: torch raises many kinds, with long messages
        raise InputFileError(path, f"not a readable training state ({type(exc).__name__}; corrupt, or not "
                                   "written by brainvae)") from None


def load_state_for(weights: Path, state_file: Path) -> dict:
    """The training state saved with ``weights``; refuses a state from another step or stage."""
    meta = read_metadata(weights)
    state = load_state(state_file)
    counters = state.get("counters", {}) if isinstance(state, dict) else {}
    if "step" in meta:  # checkpoints of older versions lack it
        saved_with = (meta.get("stage", 0), meta["step"])
        found = (counters.get("stage", 0), counters.get("step"))
        if found != saved_with:
            raise InputFileError(state_file, f"training state of step {found[1]} (stage {found[0]}), but "
                                             f"{Path(weights).name} holds step {saved_with[1]} (stage {saved_with[0]}): "
                                             "the run was stopped while saving; the pair cannot be resumed exactly "
                                             "(start again with --force, or train on from its weights with --init)")
    return state
