"""diffusers CogVideoXTransformer3DModel (CogVideoX 1.0 and 1.5): TAPE on CogVideoXPipeline, LIP on
CogVideoXVideoToVideoPipeline.

The transformer takes latents (B, F, C, H, W), frames before channels, and patches them into
frame-major tokens (p_t latent frames per token when the config sets patch_size_t: 1.5).
Block call: block(hidden_states, encoder_hidden_states, temb, image_rotary_emb, attention_kwargs)
returning (hidden_states, encoder_hidden_states), where
- hidden_states (B, N, D): video tokens; encoder_hidden_states (B, T, D): the text tokens,
  which attend jointly with the video tokens and are updated by every block;
- temb: (B, time_embed_dim), one per sample: every block's modulation is per sample;
- image_rotary_emb: (cos, sin), each (N, head_dim) with no batch axis, or None when the config
  has no RoPE (1.0 2B: absolute positions are added before the blocks).

Only the video stream is pruned: text tokens stay queries and keys of every block.
The pipeline batches the CFG branches into one forward, [unconditional; conditional]: LIP's
mask is one for the batch (the union over its videos), so both halves compute the same tokens.
LIP: the schedulers (CogVideoXDDIMScheduler, CogVideoXDPMScheduler) are DDPM-style, so
restore="x0" reads the clean estimate from alphas_cumprod and the prediction type; Attention
Recovery runs the joint attention over [text; kept and duplicated video tokens], text queries
included. The video-to-video pipeline encodes the source with a sample of the VAE's latent
distribution; LIP detects on its mode (noise-free), times vae.config.scaling_factor as the
pipeline scales it.
TAPE's cache="block" is not implemented: the attention and the feed-forward run on the text and
video tokens joined, so their outputs are not per video token as BlockCache captures them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from ..context import full_context_attention
from ..recovery import recovered_attention
from ..tokens import TokenGrid, gather_tokens
from .base import Adapter, BenchmarkShape, WrappedProcessor

COGVIDEOX_SHAPES = {
    # THUDM/CogVideoX-5b transformer/config.json: 42 layers, 48 heads x 64 = 3072 wide, RoPE, patch 2,
    # time_embed_dim 512; text: T5-XXL, 226 tokens x 4096; VAE: 4x time, 8x space.
    # 49 frames at 720x480 -> 13 x 30 x 45 = 17550 video tokens (+ 226 text tokens).
    "cogvideox-5b": BenchmarkShape(
        "cogvideox", dict(num_attention_heads=48, attention_head_dim=64, num_layers=42,
                          use_rotary_positional_embeddings=True),
        (49, 480, 720), (226, 4096), (4, 8), "THUDM/CogVideoX-5b transformer/config.json", guidance_scale=6.0),
    "cogvideox-tiny": BenchmarkShape(
        "cogvideox", dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=8,
                          text_embed_dim=16, num_layers=6, sample_width=16, sample_height=16, sample_frames=9,
                          max_text_seq_length=16, use_rotary_positional_embeddings=True),
        (9, 128, 128), (16, 16), (4, 8), "vidprune's tiny test shape", tiny=True, guidance_scale=6.0),
}


def _heads(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, N, heads * head_dim) -> (B, heads, N, head_dim)."""
    return x.unflatten(2, (attn.heads, -1)).transpose(1, 2)


def _rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """CogVideoX's RoPE on x (batch, tokens, heads, head_dim) with tables (tokens, head_dim); none
    without RoPE (1.0 2B)."""
    return x if tables is None else apply_rotary_emb(x.transpose(1, 2), tables).transpose(1, 2)


def _key_value(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key (per-head LayerNorm, before RoPE) and value (batch, tokens, heads, head_dim)."""
    key, value = (projection(x).unflatten(2, (attn.heads, -1)) for projection in (attn.to_k, attn.to_v))
    return (key if attn.norm_k is None else attn.norm_k(key)), value


class CogVideoXRecoveryProcessor(WrappedProcessor):
    """CogVideoX's joint attention whose text queries and kept video queries take a method's
    extra keys besides the text keys and the kept video keys: LIP's Attention Recovery
    (duplicates of their references' keys at the pruned positions: pre-RoPE key and value,
    rotated at the pruned token's position; records the kept tokens' video keys and values in
    LIP's clean pass) or TAPE's full context (context.py)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        if not self.pruning():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError("vidprune's attention on CogVideoX takes no attention mask (the pipelines pass none): drop "
                             "it from attention_kwargs, or use LipConfig(recovery=False) or TapeConfig(context='kept')")
        state, text, context = self.pruner.state, encoder_hidden_states.shape[1], self.pruner.context
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        # (batch, text + video tokens, heads, head_dim); norm_q / norm_k are per-head LayerNorms.
        query = attn.to_q(joint).unflatten(2, (attn.heads, -1))
        query = query if attn.norm_q is None else attn.norm_q(query)
        key, value = _key_value(attn, joint)
        if context is None and state.recording is not None:  # LIP's clean pass: keep the kept tokens' keys and values
            kept = state.lip_mask.index[0] + text
            state.recording.append((key[:, kept], value[:, kept]))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        span = state.current.span
        rope = span.inputs["image_rotary_emb"]

        def attend(video_query, video_key, video_value):  # rotated video parts, the text in front
            joined = (torch.cat([part[:, :text], video], dim=1).transpose(1, 2)
                      for part, video in ((query, video_query), (key, video_key), (value, video_value)))
            return F.scaled_dot_product_attention(*joined, dropout_p=0.0, is_causal=False).transpose(1, 2)

        if context is not None:  # TAPE's full context
            output = full_context_attention(
                context, self.layer, query[:, text:], key[:, text:], value[:, text:], rotate=_rotate,
                tables=image_rotary_emb, tables_at=lambda index: rope and tuple(table[index[0]] for table in rope),
                attend=attend)
            output = attn.to_out[1](attn.to_out[0](output.flatten(2, 3).type_as(query)))
            return output[:, text:], output[:, :text]
        keys = span.recovery_keys
        if rope is not None and span.key_rope is None:  # tables at the key positions, once per span
            span.key_rope = tuple(table[keys.positions] for table in rope)
        clean_key, clean_value = self.pruner.clean_keys_values(self.layer)
        output = recovered_attention(
            query[:, text:], key[:, text:], value[:, text:], keys,
            rotate_query=lambda q: _rotate(q, image_rotary_emb), rotate_key=lambda k: _rotate(k, span.key_rope),
            attend=attend, duplicate_key=clean_key, duplicate_value=clean_value,
        )
        output = attn.to_out[1](attn.to_out[0](output.flatten(2, 3).type_as(query)))
        return output[:, text:], output[:, :text]


class CogVideoXAdapter(Adapter):
    model_classes = (CogVideoXTransformer3DModel,)
    video_to_video_pipelines = ("CogVideoXVideoToVideoPipeline",)
    supports_block_cache = False
    returns_text_stream = True
    guidance_batched = True
    text_to_video_pipelines = ("CogVideoXPipeline",)
    benchmark_shapes = COGVIDEOX_SHAPES

    def benchmark_pipeline(self, transformers: list[torch.nn.Module], shape: BenchmarkShape) -> Any:
        # The scheduler sets the timesteps only, which do not change a forward's speed.
        pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformers[0],
                                 scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))
        pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial = shape.vae
        return pipe

    def benchmark_call(self, shape: BenchmarkShape, device: str, dtype: torch.dtype,
                       generator: torch.Generator) -> dict[str, Any]:
        return {**super().benchmark_call(shape, device, dtype, generator), "max_sequence_length": shape.text[0]}

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.transformer_blocks

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        config = transformer.config
        return config.patch_size_t or 1, config.patch_size, config.patch_size

    def token_grid(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> TokenGrid:
        p_t, p_h, p_w = self.patch_size(transformer)
        _, frames, _, height, width = inputs["hidden_states"].shape
        return TokenGrid(frames // p_t, height // p_h, width // p_w)

    def guidance_in_batch(self, pipeline: Any) -> bool:
        # CogVideoXPipeline has no do_classifier_free_guidance; it batches both branches when
        # guidance_scale > 1. use_dynamic_cfg rewrites the scale after each step to a value
        # >= 1: a step where it is exactly 1 would select per half (and be refused with RoPE).
        return getattr(pipeline, "guidance_scale", 1.0) > 1.0

    def to_video_layout(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                        latents: torch.Tensor) -> torch.Tensor:
        return latents.transpose(1, 2)  # (B, F, C, H, W) <-> (B, C, F, H, W)

    def from_video_layout(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                          latents: torch.Tensor) -> torch.Tensor:
        return latents.transpose(1, 2)

    def noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        # CogVideoX I2V concatenates the image latents after the noisy latents along channels (dim 2).
        return self.to_video_layout(transformer, inputs, inputs["hidden_states"][:, :, : transformer.config.out_channels])

    def with_noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                           latents: torch.Tensor) -> dict[str, Any]:
        hidden_states = inputs["hidden_states"]
        condition = hidden_states[:, :, transformer.config.out_channels :]
        latents = self.from_video_layout(transformer, inputs, latents.to(hidden_states))
        return {**inputs, "hidden_states": torch.cat([latents, condition], dim=2)}

    def source_latents(self, pipeline: Any, encodings: torch.Tensor) -> torch.Tensor:
        # As CogVideoXVideoToVideoPipeline.prepare_latents: scaled by the VAE's scaling factor.
        return encodings * pipeline.vae.config.scaling_factor

    def x0_coefficients(self, scheduler: Any, timestep: float, sigma: float) -> tuple[float, float]:
        # The DDPM-style schedulers' x0 from the output (their step's pred_original_sample), with
        # alpha = alphas_cumprod[t]: v: sqrt(a) x_t - sqrt(1 - a) v; epsilon: (x_t - sqrt(1 - a) eps) / sqrt(a).
        prediction = getattr(getattr(scheduler, "config", None), "prediction_type", None)
        alphas = getattr(scheduler, "alphas_cumprod", None)
        if alphas is None or prediction not in ("v_prediction", "epsilon", "sample"):
            raise ValueError(
                f"LipConfig(restore='x0') on CogVideoX turns the model output into a clean estimate with the "
                f"pipeline's scheduler (alphas_cumprod and prediction_type 'v_prediction', 'epsilon' or 'sample', as "
                f"CogVideoXDDIMScheduler and CogVideoXDPMScheduler have); this forward has "
                f"{type(scheduler).__name__ if scheduler is not None else 'no pipeline scheduler'}: apply LIP to a "
                f"CogVideoX pipeline, or use LipConfig(restore='prediction')"
            )
        alpha = float(alphas[int(round(timestep))])
        if prediction == "v_prediction":
            return alpha**0.5, (1 - alpha) ** 0.5
        if prediction == "sample":
            return 0.0, -1.0
        if alpha == 0:
            raise ValueError(f"LipConfig(restore='x0') with an epsilon-prediction scheduler at timestep {timestep:g}, "
                             "where alphas_cumprod is 0 (zero terminal SNR): x0 is undefined there; use "
                             "LipConfig(restore='prediction')")
        return alpha**-0.5, ((1 - alpha) / alpha) ** 0.5

    def self_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        return block.attn1

    def recovery_processor(self, original: Any, pruner: Any, layer: int) -> Any:
        return CogVideoXRecoveryProcessor(original, pruner, layer)

    supports_full_context = True

    def context_key_value(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                          index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As CogVideoXLayerNormZero (norm1) modulates the video tokens: one shift and scale per sample.
        norm = block.norm1
        shift, scale = norm.linear(norm.silu(inputs["temb"])).chunk(6, dim=1)[:2]
        return _key_value(block.attn1, norm.norm(hidden_states) * (1 + scale)[:, None, :] + shift[:, None, :])

    def gather_block_inputs(self, inputs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        gathered = {"hidden_states": gather_tokens(inputs["hidden_states"], index)}
        rope = inputs.get("image_rotary_emb")
        if rope is not None:
            # The block broadcasts one table over the batch, so every sample must keep the same
            # tokens: true for batch 1 and for CFG halves sharing their selection.
            if index.shape[0] > 1 and not torch.equal(index, index[:1].expand_as(index)):
                raise ValueError(
                    "CogVideoX's RoPE tables have no batch axis, so the samples of a batch must compute the same "
                    "tokens: vidprune supports one video per call here (CFG halves share their selection with "
                    "share_cfg_selection=True)"
                )
            gathered["image_rotary_emb"] = tuple(table[index[0]] for table in rope)
        return gathered

    def query_key(
        self, block: torch.nn.Module, inputs: dict[str, Any], query_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # As CogVideoXBlock and CogVideoXAttnProcessor2_0 compute them for the video tokens:
        # norm1's modulation, to_q/to_k, per-head LayerNorm, then RoPE. The text keys are left
        # out: importance ranks video tokens by the attention they get from video queries.
        hidden_states = inputs["hidden_states"]
        norm = block.norm1
        shift, scale = norm.linear(norm.silu(inputs["temb"])).chunk(6, dim=1)[:2]
        x = norm.norm(hidden_states) * (1 + scale)[:, None, :] + shift[:, None, :]
        attn = block.attn1
        x_query = x[:, query_index]
        query, key = _heads(attn, attn.to_q(x_query)), _heads(attn, attn.to_k(x))
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        rope = inputs.get("image_rotary_emb")
        if rope is not None:
            cos, sin = rope
            query = apply_rotary_emb(query, (cos[query_index], sin[query_index]))
            key = apply_rotary_emb(key, rope)
        return query, key

    def block_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int, keys: int | None = None) -> float:
        """FLOPs of one CogVideoXBlock: the text tokens join the video tokens in every projection,
        the attention (as queries and keys) and the feed-forward. Multiply-adds count 2; the two
        modulation projections of temb count once per sample; norms and activations are left out."""
        config = transformer.config
        dim = self.hidden_size(transformer)
        ffn_dim = self.blocks(transformer)[0].ff.net[0].proj.out_features
        joint = tokens + context_tokens
        joint_keys = (tokens if keys is None else keys) + context_tokens
        projections = 2 * joint * dim * dim * 4  # q, k, v, out
        attention = 2 * 2 * joint * joint_keys * dim  # scores and weighted values
        feed_forward = 2 * 2 * joint * dim * ffn_dim
        modulation = 2 * 2 * config.time_embed_dim * 6 * dim  # norm1, norm2
        return float(projections + attention + feed_forward + modulation)
