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
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel

from .hunyuan import HunyuanVideoAdapter

# The history inputs as the model packs them (HunyuanVideoHistoryPatchEmbed): latents and frame
# indices by argument name, the patch kernel, and whether the latents are padded up to whole
# kernels first (the 1x projection is not: its kernel is the video's patch).
_HISTORY = (("latents_clean", "indices_latents_clean", (1, 2, 2), False),
            ("latents_history_2x", "indices_latents_history_2x", (2, 4, 4), True),
            ("latents_history_4x", "indices_latents_history_4x", (4, 8, 8), True))


class HunyuanVideoFramepackAdapter(HunyuanVideoAdapter):
    model_classes = (HunyuanVideoFramepackTransformer3DModel,)
    text_to_video_pipelines = ()  # image-to-video: the CLI's generate passes no image
    video_to_video_pipelines = ()
    supports_lip = False
    benchmark_shapes = {}

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
