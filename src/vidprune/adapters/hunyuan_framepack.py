"""diffusers HunyuanVideoFramepackTransformer3DModel (FramePack): TAPE on HunyuanVideoFramepackPipeline.

The blocks are HunyuanVideo's, called as in HunyuanVideoTransformer3DModel, so the HunyuanVideo
adapter's per-token inputs, queries and keys hold. What FramePack adds:
- history tokens: before the first block the model patches the clean history latents at 1x, 2x
  and 4x compression (its clean_x_embedder; 2x and 4x padded up to whole kernels) and joins them
  before the video tokens, the 4x ones first, each with the RoPE of its own frame indices: every
  block's hidden states and RoPE tables are [4x; 2x; 1x; video]. The output head keeps the last
  (video) tokens. The history is context: the video reads the clean past through attention, it
  is not denoised and there is no video position to prune it at. So it is a prefix
  (`prefix_tokens`) that every span computes whole; the selection, its importance (the
  prefix's keys share each sampled query's softmax, as in the model), temporal smoothing and
  the budget are over the video grid, and the RoPE tables are gathered at the computed tokens,
  prefix first. A pruned span's blocks thus run on prefix + kept video tokens; the stats count
  the prefix in every span's tokens and in the forward's.
- image tokens: the image encoder's embeddings, projected, join the text tokens before the
  blocks, so they are conditioning like the text (`context_tokens` counts them for the FLOPs).
- attention_mask: None at batch 1 (the model trims the text to its unpadded length instead); the
  HunyuanVideo adapter's gather passes it on as None.

HunyuanVideoFramepackPipeline denoises one latent section after another inside one call, each in a
loop of its own that sets the scheduler's timesteps anew; TAPE starts a fresh step plan and fresh
token memories at each (tape.TapeState.step_and_keep), so the dense first steps and the budget
apply per section. True CFG (true_cfg_scale > 1 with negative prompt embeddings) is a second
transformer call per step, as in HunyuanVideoPipeline.

TAPE's context="full" runs as on HunyuanVideo: its pruned tokens are positions in the blocks'
sequence, so they are video tokens only and the prefix is among the computed queries and keys;
so do CUDA graphs of whole spans (compile_blocks(graphs=True)), whose gather takes the
prefix with the kept tokens.

Not supported, each refused with a message naming what runs: LIP (FramePack is image-to-video:
there is no source video whose repeated tokens LIP could skip), TAPE's cache="block" (as on
HunyuanVideo), context parallelism (diffusers gives the model no _cp_plan). The CLI does not load
the pipeline (it needs an image and an image encoder): apply it from Python.

Benchmark shapes (`benchmark_shapes`): the transformer at its published size with random weights,
in the pipeline with a one-layer image encoder of SigLIP's width and token count and an 8-channel
VAE of the real compression (it encodes the image once a call; the call asks for latents back, so
nothing is decoded). Neither is the transformer's time, which the benchmarks measure.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoFramepackTransformer3DModel
from PIL import Image

from .base import BenchmarkShape
from .hunyuan import HUNYUAN_SHAPES, HunyuanVideoAdapter

# The history inputs as the model packs them (HunyuanVideoHistoryPatchEmbed): latents and frame
# indices by argument name, the patch kernel, and whether the latents are padded up to whole
# kernels first (the 1x projection is not: its kernel is the video's patch).
_HISTORY = (("latents_clean", "indices_latents_clean", (1, 2, 2), False),
            ("latents_history_2x", "indices_latents_history_2x", (2, 4, 4), True),
            ("latents_history_4x", "indices_latents_history_4x", (4, 8, 8), True))


_FRAMEPACK = dict(HUNYUAN_SHAPES["hunyuanvideo-13b"].config, has_image_proj=True, image_proj_dim=1152,
                  has_clean_x_embedder=True)
FRAMEPACK_SHAPES = {
    # lllyasviel/FramePackI2V_HY (diffusers' FramePack checkpoint): HunyuanVideo's 13B transformer
    # (20 + 40 blocks, 3072 wide) with the image projection of SigLIP so400m's 1152-wide embeddings
    # (384 px / 14 = 27 x 27 = 729 tokens) and the history patch embedders. One section of 33
    # frames (latent window 9) at 832x480, diffusers' example size: 9 x 52 x 30 = 14040 video
    # tokens, plus the history prefix (1x, 2x, 4x) and the text and image tokens.
    "framepack-13b": BenchmarkShape(
        "hunyuanvideo-framepack", _FRAMEPACK, (33, 832, 480), (256, 4096), (4, 8),
        "lllyasviel/FramePackI2V_HY transformer (HunyuanVideo 13B + image projection + history embedders)",
        guidance_scale=10.0,
        notes=("framepack-13b: guidance-distilled, one forward per step (true_cfg_scale 1, as diffusers' example); "
               "one 33-frame section per call (every section's forwards have the same shapes)",)),
    "framepack-tiny": BenchmarkShape(
        "hunyuanvideo-framepack", dict(HUNYUAN_SHAPES["hunyuanvideo-tiny"].config, has_image_proj=True,
                                       image_proj_dim=8, has_clean_x_embedder=True),
        (33, 64, 64), (16, 16), (4, 8), "vidprune's tiny test shape", tiny=True, guidance_scale=10.0),
}


class HunyuanVideoFramepackAdapter(HunyuanVideoAdapter):
    model_classes = (HunyuanVideoFramepackTransformer3DModel,)
    text_to_video_pipelines = ()  # image-to-video: the CLI's generate passes no image
    video_to_video_pipelines = ()
    supports_lip = False
    sets_cache_context = False  # HunyuanVideoFramepackPipeline (diffusers 0.42): no step cache runs on it
    benchmark_shapes = FRAMEPACK_SHAPES

    def prefix_tokens(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> int:
        # The model packs a history input when it is given with its frame indices.
        tokens = 0
        for latents_name, indices_name, kernel, padded in _HISTORY:
            latents = inputs.get(latents_name)
            if latents is not None and inputs.get(indices_name) is not None:
                tokens += math.prod(-(-size // k) if padded else size // k for size, k in zip(latents.shape[2:], kernel))
        return tokens

    def context_tokens(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> int:
        return super().context_tokens(transformer, inputs) + inputs["image_embeds"].shape[1]

    def benchmark_pipeline(self, transformers: list[torch.nn.Module], shape: BenchmarkShape) -> Any:
        # Imported here: importing the pipeline imports transformers' SigLIP image processor, which
        # warns where torchvision is missing, and the CLI must load quietly.
        from diffusers import HunyuanVideoFramepackPipeline
        from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

        transformer = transformers[0]
        device, dtype = transformer.device, transformer.dtype
        width = shape.config["image_proj_dim"]
        pixels, patch = (384, 14) if not shape.tiny else (16, 8)
        encoder = SiglipVisionModel(SiglipVisionConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
            image_size=pixels, patch_size=patch)).to(device, dtype).eval()
        latent = shape.config.get("in_channels", 16)
        vae = AutoencoderKLHunyuanVideo(  # the image's latents only
            in_channels=3, out_channels=3, latent_channels=latent, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
            norm_num_groups=4, temporal_compression_ratio=shape.vae[0],
            spatial_compression_ratio=shape.vae[1]).to(device, dtype).eval()
        return HunyuanVideoFramepackPipeline(
            text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
            image_encoder=encoder, feature_extractor=SiglipImageProcessor(size={"height": pixels, "width": pixels}))

    def benchmark_call(self, shape: BenchmarkShape, device: str, dtype: torch.dtype,
                       generator: torch.Generator) -> dict[str, Any]:
        call = super().benchmark_call(shape, device, dtype, generator)
        frames, height, width = shape.video
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
        return dict(call, image=Image.fromarray(pixels), latent_window_size=(frames - 1) // shape.vae[0] + 1)
