"""Model families vidprune knows. Adding one is one file with an Adapter subclass."""

from __future__ import annotations

import torch

from .base import Adapter
from .cogvideox import CogVideoXAdapter
from .hunyuan import HunyuanVideoAdapter
from .ltx import LTXAdapter
from .wan import WanAdapter

ADAPTERS: tuple[Adapter, ...] = (WanAdapter(), LTXAdapter(), CogVideoXAdapter(), HunyuanVideoAdapter())


class UnsupportedModelError(TypeError):
    """The model is not one vidprune has an adapter for."""


def supported_classes() -> list[str]:
    return [cls.__name__ for adapter in ADAPTERS for cls in adapter.model_classes]


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter of a transformer, or UnsupportedModelError naming what is supported."""
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes):
            return adapter
    raise UnsupportedModelError(
        f"vidprune does not support {type(model).__name__}; supported transformer classes: "
        + ", ".join(supported_classes())
    )


__all__ = ["ADAPTERS", "Adapter", "UnsupportedModelError", "adapter_for", "supported_classes"]
