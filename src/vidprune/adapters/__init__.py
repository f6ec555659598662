"""Model families vidprune knows. Adding one is one file with an Adapter subclass."""

from __future__ import annotations

import torch

from .base import Adapter
from .cogvideox import CogVideoXAdapter
from .hunyuan import HunyuanVideoAdapter
from .hunyuan_framepack import HunyuanVideoFramepackAdapter
from .ltx import LTXAdapter
from .wan import WanAdapter
from .wan_vace import WanVACEAdapter

ADAPTERS: tuple[Adapter, ...] = (WanAdapter(), LTXAdapter(), CogVideoXAdapter(), HunyuanVideoAdapter(),
                                 HunyuanVideoFramepackAdapter(), WanVACEAdapter())


class UnsupportedModelError(TypeError):
    """The model is not one vidprune has an adapter for."""


# Transformer classes vidprune refuses for a reason of their own, by class name (an older diffusers
# may not have them): the reason, and what runs instead, follow "vidprune does not support NAME".
REFUSED = {
    "WanAnimateTransformer3DModel": (
        "(Wan2.2-Animate, WanAnimatePipeline): the face adapter after every 5th block splits the tokens it gets into "
        "one equal run per latent frame, which a span's kept tokens are not. On Wan, TAPE runs on "
        "WanTransformer3DModel (WanPipeline, WanImageToVideoPipeline, WanVideoToVideoPipeline) and "
        "WanVACETransformer3DModel (WanVACEPipeline), and LIP on WanVideoToVideoPipeline and WanVACEPipeline"),
}


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
    name = type(model).__name__
    if name in REFUSED:
        raise UnsupportedModelError(f"vidprune does not support {name} {REFUSED[name]}; supported transformer "
                                    "classes: " + ", ".join(supported_classes()))
    raise UnsupportedModelError(
        f"vidprune does not support {type(model).__name__}; supported transformer classes: "
        + ", ".join(supported_classes())
    )


__all__ = ["ADAPTERS", "REFUSED", "Adapter", "UnsupportedModelError", "adapter_for", "adapter_for_pipeline",
           "supported_classes", "supported_pipelines"]
