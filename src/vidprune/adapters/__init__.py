"""Model families vidprune knows. Adding one is one file with an Adapter subclass."""

from __future__ import annotations

import torch

from .base import Adapter
from .cogvideox import CogVideoXAdapter
from .hunyuan import HunyuanVideoAdapter
from .ltx import LTXAdapter
from .wan import WanAdapter
from .wan_vace import WanVACEAdapter

ADAPTERS: tuple[Adapter, ...] = (WanAdapter(), LTXAdapter(), CogVideoXAdapter(), HunyuanVideoAdapter(),
                                 WanVACEAdapter())


class UnsupportedModelError(TypeError):
    """The model is not one vidprune has an adapter for."""


def supported_classes() -> list[str]:
    return [cls.__name__ for adapter in ADAPTERS for cls in adapter.model_classes]


def supported_pipelines() -> list[str]:
    """The pipeline classes the CLI loads: every family's text-to-video and video-to-video ones."""
    return [name for adapter in ADAPTERS for name in (*adapter.text_to_video_pipelines,
                                                       *adapter.video_to_video_pipelines)]


def adapter_for_pipeline(name: str) -> Adapter | None:
    """The adapter of a pipeline class name (None: no family has it)."""
    return next((adapter for adapter in ADAPTERS
                 if name in adapter.text_to_video_pipelines or name in adapter.video_to_video_pipelines), None)


def adapter_for(model: torch.nn.Module) -> Adapter:
    """The adapter of a transformer, or UnsupportedModelError naming what is supported."""
    for adapter in ADAPTERS:
        if isinstance(model, adapter.model_classes):
            return adapter
    raise UnsupportedModelError(
        f"vidprune does not support {type(model).__name__}; supported transformer classes: "
        + ", ".join(supported_classes())
    )


__all__ = ["ADAPTERS", "Adapter", "UnsupportedModelError", "adapter_for", "adapter_for_pipeline", "supported_classes",
           "supported_pipelines"]
