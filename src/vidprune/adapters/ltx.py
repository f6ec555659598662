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
LIP: diffusers has no LTX video-to-video pipeline, so the source is LipConfig(source_latents=...)
(clean latents, channels first: (B, C, F, H, W)) or LipConfig(mask=...). LIP's latents are the
packed tokens unpacked with the grid of the forward (the packing is vidprune's `patches`, as
LTX's pipelines pack). Flow matching: x0 = x_t - sigma v (the base class's coefficients).
Forwards with per-token timesteps (the I2V and condition pipelines' conditioning frames) are
refused: a token copied from a conditioning frame would need its reference's own sigma.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline, LTXVideoTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

from ..context import full_context_attention
from ..recovery import recovered_attention
from ..tokens import TokenGrid, gather_tokens, patches, unpatch
from .base import Adapter, BenchmarkShape, WrappedProcessor, cross_attention_block_flops, random_text

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


def _rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """LTX's RoPE on x (batch, tokens, heads, head_dim): the model rotates before splitting the
    heads, with tables (batch, tokens, heads * head_dim)."""
    return apply_rotary_emb(x.flatten(2), tables).unflatten(2, x.shape[2:])


def _key_value(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention key and value (batch, tokens, heads, head_dim), before RoPE: k is
    RMS-normalised across all heads, per token, as the model does."""
    return attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1)), attn.to_v(x).unflatten(2, (attn.heads, -1))


class LTXRecoveryProcessor(WrappedProcessor):
    """LTX self-attention (attn1) whose kept queries take a method's extra keys: LIP's Attention
    Recovery (the kept keys plus duplicates of their references' keys at the pruned positions:
    normalised, pre-RoPE key and value, rotated at the pruned token's position; records the kept
    tokens' keys and values in LIP's clean pass) or TAPE's full context (context.py)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not self.pruning():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is not None or attention_mask is not None or image_rotary_emb is None:
            raise ValueError("vidprune's attention on LTX runs in the blocks' self-attention (attn1: RoPE, no mask, no "
                             "context); use LipConfig(recovery=False) or TapeConfig(context='kept') for other calls")
        state = self.pruner.state
        context = self.pruner.context
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        key, value = _key_value(attn, hidden_states)
        backend = self._attention_backend

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return dispatch_attention_fn(q, k, v, dropout_p=0.0, is_causal=False, backend=backend)

        if context is not None:  # TAPE's full context
            tables = state.current.span.inputs["image_rotary_emb"]
            output = full_context_attention(
                context, self.layer, query, key, value, rotate=_rotate, tables=image_rotary_emb,
                tables_at=lambda index: tuple(gather_tokens(table, index) for table in tables), attend=attend)
            return attn.to_out[1](attn.to_out[0](output.flatten(2, 3).to(query.dtype)))
        if state.recording is not None:  # clean pass over all tokens: keep the kept tokens' keys and values
            self.record_clean(key, value)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        span = state.current.span
        keys = span.recovery_keys
        if span.key_rope is None:  # tables at the key positions, once per span
            positions = keys.positions.unsqueeze(0)
            span.key_rope = tuple(gather_tokens(table, positions) for table in span.inputs["image_rotary_emb"])
        clean_key, clean_value = self.pruner.clean_keys_values(self.layer)
        output = recovered_attention(
            query, key, value, keys,
            rotate_query=lambda q: _rotate(q, image_rotary_emb), rotate_key=lambda k: _rotate(k, span.key_rope),
            attend=attend, duplicate_key=clean_key, duplicate_value=clean_value,
        )
        return attn.to_out[1](attn.to_out[0](output.flatten(2, 3).to(query.dtype)))


class LTXAdapter(Adapter):
    model_classes = (LTXVideoTransformer3DModel,)
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

    def to_video_layout(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                        latents: torch.Tensor) -> torch.Tensor:
        grid = self.token_grid(transformer, inputs)
        patch = self.patch_size(transformer)
        channels = latents.shape[2] // (patch[0] * patch[1] * patch[2])
        return unpatch(latents.view(latents.shape[0], grid.frames, grid.height, grid.width, -1), patch, channels)

    def from_video_layout(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                          latents: torch.Tensor) -> torch.Tensor:
        return patches(latents, self.patch_size(transformer)).flatten(1, 3)

    def noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        timestep = inputs["timestep"]
        if timestep.ndim > 1 and not torch.equal(timestep, timestep[:, :1].expand_as(timestep)):
            raise ValueError(
                "LIP on LTX takes one timestep per sample: this forward gives its tokens different timesteps (the "
                "conditioning frames of LTXImageToVideoPipeline / LTXConditionPipeline), and a token copied from "
                "a conditioning frame would need its reference's own noise level; use LTXPipeline (or a bare "
                "transformer) with LipConfig(source_latents=...) or LipConfig(mask=...)")
        # LTX's I2V conditions by replacing latents, not by extra channels: every channel is noisy latents.
        return self.to_video_layout(transformer, inputs, inputs["hidden_states"])

    def with_noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                           latents: torch.Tensor) -> dict[str, Any]:
        hidden_states = inputs["hidden_states"]
        return {**inputs, "hidden_states": self.from_video_layout(transformer, inputs, latents.to(hidden_states))}

    def self_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        return block.attn1

    def recovery_processor(self, original: Any, pruner: Any, layer: int) -> Any:
        return LTXRecoveryProcessor(original, pruner, layer)

    supports_full_context = True

    def context_key_value(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                          index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As LTXVideoTransformerBlock.forward: norm1, then the self-attention shift and scale.
        temb = inputs["temb"]
        if temb.shape[1] != 1:  # per-token timesteps
            temb = gather_tokens(temb, index)
        shift, scale = _modulation(block, temb, hidden_states.shape[0])[:2]
        return _key_value(block.attn1, block.norm1(hidden_states) * (1 + scale) + shift)

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
