"""One registry of architectures: name -> (model class, config class).

    @register("vae", VAEConfig)
    class VAE(BrainModel): ...

    model = build("vae", {"latent_dim": 64})   # or build_from_config(cfg)

A model is rebuilt from its config alone (saved beside every checkpoint). Importing this
module hands ``brainvae.config`` the lookup RunConfig validates its [model] section with
(config.py sits below the models and imports none of them).
"""

from __future__ import annotations

from typing import Any, Callable

from ..config import from_dict, set_architecture_lookup, to_dict
from ..errors import BrainVAEError

_REGISTRY: dict[str, tuple[type, type]] = {}


def register(name: str, config_cls: type) -> Callable[[type], type]:
    def deco(model_cls: type) -> type:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} registered twice")
        _REGISTRY[name] = (model_cls, config_cls)
        model_cls.arch = name
        return model_cls
    return deco


def _load_all() -> None:
    from . import cevae, dae, fae, ldm, resvae, vae, vqvae  # noqa: F401  (registration side effects)


def architectures() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def lookup(name: str) -> tuple[type, type]:
    _load_all()
    if name not in _REGISTRY:
        raise BrainVAEError(f"unknown architecture {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def config_and_stages(name: str) -> tuple[type, tuple[str, ...], tuple[str, ...]]:
    """(config class, training stages, optional stages) of architecture ``name``: what RunConfig needs to
    validate a run and plan its stages."""
    model_cls, config_cls = lookup(name)
    return config_cls, model_cls.stages, model_cls.optional_stages


set_architecture_lookup(config_and_stages)


def make_config(name: str, values: dict[str, Any] | None = None, source: str = "model config"):
    """The validated config dataclass of architecture ``name``; unknown keys are an error."""
    _, config_cls = lookup(name)
    return from_dict(config_cls, dict(values or {}), source)


def build(name: str, values: dict[str, Any] | None = None):
    model_cls, _ = lookup(name)
    return model_cls(make_config(name, values))


def config_dict(model) -> dict[str, Any]:
    return {"arch": model.arch, **to_dict(model.config)}
