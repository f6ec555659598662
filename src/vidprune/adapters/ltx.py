"""diffusers LTXVideoTransformer3DModel (LTX-Video): TAPE on LTXPipeline, LTXImageToVideoPipeline and
LTXConditionPipeline (conditions at frame_index 0).

The transformer takes packed tokens: hidden_states (B, N, C), frame-major as TokenGrid orders
them, with the grid given by its num_frames, height and width arguments (token units: the
pipelines pass the latent sizes with patch size 1), or by video_coords (LTXConditionPipeline). Block call:
block(hidden_states, encoder_hidden_states, temb, image_rotary_emb, encoder_attention_mask) where
- hidden_states (B, N, D): video tokens only; text enters through cross-attention (attn2);
- temb: (B, 1, 6 * D), or (B, N, 6 * D) per token when the timestep is per token (the I2V and
  condition pipelines give the conditioning frames' tokens their own, smaller timesteps);
- image_rotary_emb: (cos, sin), each (B, N, D), applied before the heads are split.

The pipelines batch the CFG branches into one forward, [unconditional; conditional].
LIP is not implemented for LTX yet (it would need the source latents in packed form).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from ..tokens import TokenGrid, gather_tokens
from .base import Adapter, BenchmarkShape, cross_attention_block_flops, random_text

LTX_SHAPES = {
    # Lightricks/LTX-Video transformer/config.json (0.9.x 2B): 28 layers, 32 heads x 64 = 2048 wide,
    # patch 1, 128 latent channels; text: T5-XXL, 128 tokens x 4096; VAE: 8x time, 32x space.
    # 121 frames at 768x512 -> 16 x 16 x 24 = 6144 tokens.
    "ltx-video-2b": BenchmarkShape(
        "ltx", dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
                    attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096,
                    qk_norm="rms_norm_across_heads"),
        (121, 512, 768), (128, 4096), (8, 32), "Lightricks/LTX-Video transformer/config.json", guidance_scale=3.0),
    "ltx-video-tiny": BenchmarkShape(
        "ltx", dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=12,
                    cross_attention_dim=24, num_layers=6, caption_channels=16),
        (17, 128, 128), (16, 16), (8, 32), "vidprune's tiny test shape", tiny=True, guidance_scale=3.0),
}


def _modulation(block: torch.nn.Module, temb: torch.Tensor, batch: int) -> tuple[torch.Tensor, ...]:
    """The six (B, 1 or N, D) modulation vectors, as LTXVideoTransformerBlock.forward makes them:
    shift, scale, gate of self-attention; shift, scale, gate of the feed-forward."""
    table = block.scale_shift_table
    return (table[None, None].to(temb.device) + temb.reshape(batch, temb.size(1), table.shape[0], -1)).unbind(dim=2)


class LTXAdapter(Adapter):
    model_classes = (LTXVideoTransformer3DModel,)
    supports_lip = False
    guidance_batched = True
    text_to_video_pipelines = ("LTXPipeline",)
    benchmark_shapes = LTX_SHAPES

    def benchmark_pipeline(self, transformers: list[torch.nn.Module], shape: BenchmarkShape) -> Any:
        pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                           transformer=transformers[0])
        pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio = shape.vae
        return pipe

    def benchmark_call(self, shape: BenchmarkShape, device: str, dtype: torch.dtype,
                       generator: torch.Generator) -> dict[str, Any]:
        positive, negative = random_text(shape, 2, generator, device, dtype)
        mask = torch.ones(1, shape.text[0], device=device)
        frames, height, width = shape.video
        return dict(prompt_embeds=positive, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                    negative_prompt_attention_mask=mask, guidance_scale=shape.guidance_scale, num_frames=frames,
                    height=height, width=width, output_type="latent")

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        config = transformer.config
        return config.patch_size_t, config.patch_size, config.patch_size

    def token_grid(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> TokenGrid:
        tokens = inputs["hidden_states"].shape[1]
        if inputs.get("video_coords") is not None:  # LTXConditionPipeline; the model then ignores the sizes
            return _grid_of_coords(inputs["video_coords"], tokens)
        sizes = [inputs.get(name) for name in ("num_frames", "height", "width")]
        if any(size is None for size in sizes):
            raise ValueError("vidprune reads LTX's token grid from the transformer's num_frames, height and width "
                             "arguments, or from video_coords; this call gives neither")
        grid = TokenGrid(*(int(size) for size in sizes))
        if grid.size != tokens:
            raise ValueError(f"LTX call with num_frames, height, width = {sizes} ({grid.size} tokens) but "
                             f"{tokens} tokens in hidden_states")
        return grid

    def self_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        return block.attn1

    def branch_modules(self, block: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
        return block.attn1, block.attn2, block.ff

    def replay_block(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                     branch_outputs: list[torch.Tensor]) -> torch.Tensor:
        # As LTXVideoTransformerBlock.forward adds its branches, in the model's dtype:
        # self-attention and feed-forward times their gates, cross-attention ungated.
        _, _, gate, _, _, feed_forward_gate = _modulation(block, inputs["temb"], hidden_states.shape[0])
        self_attention, cross_attention, feed_forward = branch_outputs
        x = hidden_states + self_attention * gate
        x = x + cross_attention
        return x + feed_forward * feed_forward_gate

    def gather_block_inputs(self, inputs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        cos, sin = inputs["image_rotary_emb"]
        gathered = {
            "hidden_states": gather_tokens(inputs["hidden_states"], index),
            "image_rotary_emb": (gather_tokens(cos, index), gather_tokens(sin, index)),
        }
        if inputs["temb"].shape[1] != 1:  # per-token timesteps: modulation differs per token
            gathered["temb"] = gather_tokens(inputs["temb"], index)
        return gathered

    def query_key(
        self, block: torch.nn.Module, inputs: dict[str, Any], query_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states = inputs["hidden_states"]
        cos, sin = inputs["image_rotary_emb"]
        shift, scale = _modulation(block, inputs["temb"], hidden_states.shape[0])[:2]
        x = block.norm1(hidden_states) * (1 + scale) + shift
        attn = block.attn1
        # LTX normalises q and k across heads and rotates them before splitting the heads.
        key = apply_rotary_emb(attn.norm_k(attn.to_k(x)), (cos, sin)).unflatten(2, (attn.heads, -1))
        rows = query_index.unsqueeze(0)
        query = attn.norm_q(attn.to_q(gather_tokens(x, rows)))
        query = apply_rotary_emb(query, (gather_tokens(cos, rows), gather_tokens(sin, rows))).unflatten(2, (attn.heads, -1))
        return query.transpose(1, 2), key.transpose(1, 2)

    def block_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int, keys: int | None = None) -> float:
        # diffusers' FeedForward: dim -> ffn width (4 * dim by default) -> dim
        ffn_dim = self.blocks(transformer)[0].ff.net[0].proj.out_features
        return cross_attention_block_flops(self.hidden_size(transformer), ffn_dim, tokens, context_tokens, keys)


def _grid_of_coords(coords: torch.Tensor, tokens: int) -> TokenGrid:
    """The token grid of LTXConditionPipeline's video_coords (batch, 3, tokens): (time, y, x) of
    each token. TAPE's smoothing and per-frame selection need the tokens to be one frame-major
    grid; the pipeline prepends the tokens of conditions at frame_index > 0 (and of a video
    condition's frames past its prefix), which lie outside it, so such calls are refused."""
    if coords.ndim != 3 or coords.shape[1] != 3 or coords.shape[2] != tokens:
        raise ValueError(f"LTX video_coords must be (batch, 3, {tokens}) for {tokens} tokens in hidden_states, "
                         f"got {tuple(coords.shape)}")
    first = coords[0]
    if not torch.equal(coords, first.expand_as(coords)):
        raise ValueError("LTX video_coords differ between the samples of a batch: vidprune needs one token grid "
                         "per forward")
    axes = [torch.unique(axis) for axis in first]  # sorted distinct times, rows, columns
    grid = TokenGrid(*(len(axis) for axis in axes))
    layout = torch.stack(torch.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    if grid.size != tokens or not torch.equal(first, layout):
        raise ValueError(
            "LTX video_coords do not lay the tokens out as one frame-major grid: LTXConditionPipeline prepends the "
            "tokens of conditions at frame_index > 0 (and of a condition video's frames past its first ones), "
            "which vidprune does not prune around yet; conditions at frame_index 0 are supported")
    return grid
