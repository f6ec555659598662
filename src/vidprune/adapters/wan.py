"""diffusers WanTransformer3DModel (Wan2.1, Wan2.2): T2V, I2V and V2V pipelines.

Block call: block(hidden_states, encoder_hidden_states, temb, rotary_emb) where
- hidden_states (B, N, D): video tokens only; text and image context enter through
  encoder_hidden_states in cross-attention, so they are never pruned;
- temb: (B, 6, D), or (B, N, 6, D) per token for Wan2.2 TI2V;
- rotary_emb: (cos, sin), each (1, N, 1, head_dim).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from ..context import full_context_attention
from ..recovery import recovered_attention
from ..tokens import gather_tokens
from .base import Adapter, BenchmarkShape, WrappedProcessor, cross_attention_block_flops

# Wan-AI/Wan2.1-T2V-{1.3B,14B}-Diffusers and Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer/config.json
# (each A14B expert has the 14B config); text: UMT5-XXL, 512 tokens x 4096; VAE: 4x time, 8x space.
_WAN = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6)
_WAN_1_3B = dict(_WAN, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
_WAN_14B = dict(_WAN, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
_WAN_TINY = dict(_WAN, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=6)
_480P = (81, 480, 832)  # 81 frames at 832x480, Wan's 480p setting
_SOURCE = "Wan-AI Diffusers transformer/config.json"
WAN_SHAPES = {
    "wan-1.3b": BenchmarkShape("wan2.1", _WAN_1_3B, _480P, (512, 4096), (4, 8), f"Wan2.1-T2V-1.3B: {_SOURCE}"),
    # 14B is published for 480p and 720p; 480p keeps one forward near 3 s on an H200.
    "wan-14b": BenchmarkShape("wan2.1", _WAN_14B, _480P, (512, 4096), (4, 8), f"Wan2.1-T2V-14B: {_SOURCE}",
                              notes=("wan-14b: at 480p (the model also runs 720p)",)),
    "wan2.2-a14b": BenchmarkShape(
        "wan2.2", _WAN_14B, _480P, (512, 4096), (4, 8), f"Wan2.2-T2V-A14B: {_SOURCE}", experts=2, guidance_scale=4.0,
        notes=("wan2.2-a14b: two 14B experts switching at boundary_ratio 0.875, at 480p (the model also runs 720p)",)),
    "wan-tiny": BenchmarkShape("wan2.1", _WAN_TINY, (9, 64, 64), (512, 4096), (4, 8), "vidprune's tiny test shape",
                               tiny=True),
    "wan2.2-tiny": BenchmarkShape("wan2.2", _WAN_TINY, (9, 64, 64), (512, 4096), (4, 8), "vidprune's tiny test shape",
                                  tiny=True, experts=2, guidance_scale=4.0),
}


def wan_scheduler() -> UniPCMultistepScheduler:
    """The benchmark Wan pipelines' scheduler: UniPC on flow sigmas, flow_shift 3.0 (Wan's 480p setting)."""
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def wan_experts(transformers: list[torch.nn.Module]) -> dict[str, Any]:
    """A Wan pipeline's transformer arguments for the benchmark's random-weight `transformers`:
    Wan2.2 A14B's two experts, `transformer` denoising t >= 0.875 * 1000 and `transformer_2` the rest."""
    if len(transformers) == 2:
        return dict(transformer=transformers[0], transformer_2=transformers[1], boundary_ratio=0.875)
    return dict(transformer=transformers[0])


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Wan's interleaved RoPE on x (B, N, heads, head_dim) with tables (B or 1, N, 1, head_dim).

    exact=True rotates in the tables' precision (float64), as the model does; False in x's
    dtype, which is faster and enough for ranking tokens."""
    dtype = torch.promote_types(x.dtype, cos.dtype) if exact else x.dtype
    x1, x2 = x.to(dtype).unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2].to(dtype), sin[..., 1::2].to(dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(x.dtype)


def _projection(attn: torch.nn.Module, x: torch.Tensor, which: int) -> torch.Tensor:
    """Query (0), key (1) or value (2) projection, also when the QKV weights are fused."""
    if getattr(attn, "fused_projections", False):
        size = attn.inner_dim
        weight = attn.to_qkv.weight[which * size : (which + 1) * size]
        bias = attn.to_qkv.bias[which * size : (which + 1) * size]
        return F.linear(x, weight, bias)
    return (attn.to_q, attn.to_k, attn.to_v)[which](x)


def _heads(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x.unflatten(2, (attn.heads, -1))


def _key_value(attn: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention key and value (batch, tokens, heads, head_dim), before RoPE."""
    return _heads(attn, attn.norm_k(_projection(attn, hidden_states, 1))), _heads(attn, _projection(attn, hidden_states, 2))


def _query_key_value(attn: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention query, key and value (batch, tokens, heads, head_dim), before RoPE."""
    return (_heads(attn, attn.norm_q(_projection(attn, hidden_states, 0))), *_key_value(attn, hidden_states))


class WanRecoveryProcessor(WrappedProcessor):
    """Wan self-attention whose kept queries take a method's extra keys: LIP's Attention Recovery
    (the kept keys plus duplicates of their references' keys at the pruned positions; records
    the kept tokens' keys and values during LIP's clean pass) or TAPE's full context (every
    pruned token's own key and value, context.py). Does what the original processor does
    whenever the method is not pruning."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if not self.pruning():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if self.pruner.context is not None:
            return self._full_context(attn, hidden_states, rotary_emb)
        state = self.pruner.state
        current, recording = state.current, state.recording is not None
        query, key, value = _query_key_value(attn, hidden_states)
        # Under context parallelism this rank holds one chunk of the tokens: the kept tokens'
        # keys and values of all ranks are gathered (in rank order they are the kept tokens in
        # order), and this rank's queries attend to all of them here, outside diffusers'
        # Ulysses/ring attention, as the recovered key set is not split evenly over the ranks.
        shard = current.shard if current is not None else None
        gather = (lambda x: x) if shard is None else shard.gather
        if recording:  # clean pass over all tokens: keep the kept tokens' keys and values
            kept = state.lip_mask.index if shard is None else shard.local_index(state.lip_mask.index)
            state.recording.append((gather(key[:, kept[0]]), gather(value[:, kept[0]])))
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        key, value = gather(key), gather(value)
        span = current.span
        keys = span.recovery_keys
        if span.key_rope is None:  # tables at the key positions, once per span
            cos, sin = (gather(table) for table in span.inputs["rotary_emb"])
            positions = keys.positions.unsqueeze(0)
            span.key_rope = (gather_tokens(cos, positions), gather_tokens(sin, positions))
        key_cos, key_sin = span.key_rope
        clean_key, clean_value = self.pruner.clean_keys_values(self.layer)
        output = recovered_attention(
            query, key, value, keys,
            rotate_query=lambda q: apply_rope(q, *rotary_emb, exact=True),
            rotate_key=lambda k: apply_rope(k, key_cos, key_sin, exact=True),
            attend=self._attend, duplicate_key=clean_key, duplicate_value=clean_value,
        )
        return self._out(attn, output, query)

    def _full_context(self, attn, hidden_states, rotary_emb):
        """TAPE's full context: the kept queries over the kept keys and the pruned tokens' keys."""
        context = self.pruner.context
        query, key, value = _query_key_value(attn, hidden_states)
        tables = self.pruner.state.current.span.inputs["rotary_emb"]
        output = full_context_attention(
            context, self.layer, query, key, value, rotate=lambda x, rope: apply_rope(x, *rope, exact=True),
            tables=rotary_emb, tables_at=lambda index: tuple(gather_tokens(table, index) for table in tables),
            attend=self._attend)
        return self._out(attn, output, query)

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return dispatch_attention_fn(query, key, value, dropout_p=0.0, is_causal=False, backend=self._attention_backend)

    @staticmethod
    def _out(attn, output: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        output = output.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](output))


class WanAdapter(Adapter):
    model_classes = (WanTransformer3DModel,)
    video_to_video_pipelines = ("WanVideoToVideoPipeline",)
    # WanTransformer3DModel._cp_plan: hidden states split at blocks.0, RoPE tables at the rope
    # module's output (per-token timesteps at the model input), gathered at proj_out.
    supports_context_parallel = True
    text_to_video_pipelines = ("WanPipeline",)
    runs_every_bench_method = True
    benchmark_shapes = WAN_SHAPES

    def benchmark_pipeline(self, transformers: list[torch.nn.Module], shape: BenchmarkShape) -> Any:
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=wan_scheduler(),
                           **wan_experts(transformers))
        pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial = shape.vae
        return pipe

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.blocks

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        return tuple(transformer.config.patch_size)

    def self_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        return block.attn1

    def model_starts(self, pipeline: Any, timesteps: list[float]) -> list[int]:
        # Wan2.2 A14B: `transformer` denoises t >= boundary_ratio * num_train_timesteps,
        # `transformer_2` the rest (WanPipeline.__call__).
        ratio = getattr(getattr(pipeline, "config", None), "boundary_ratio", None)
        if ratio is None or getattr(pipeline, "transformer_2", None) is None:
            return []
        boundary = ratio * pipeline.scheduler.config.num_train_timesteps
        return [i for i in range(1, len(timesteps)) if timesteps[i - 1] >= boundary > timesteps[i]]

    def noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        # Wan I2V concatenates the image condition after the noisy latents along channels.
        return inputs["hidden_states"][:, : transformer.config.out_channels]

    def with_noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                           latents: torch.Tensor) -> dict[str, Any]:
        hidden_states = inputs["hidden_states"]
        condition = hidden_states[:, transformer.config.out_channels :]
        return {**inputs, "hidden_states": torch.cat([latents.to(hidden_states), condition], dim=1)}

    def source_latents(self, pipeline: Any, encodings: torch.Tensor) -> torch.Tensor:
        # As WanVideoToVideoPipeline.prepare_latents: (latents - latents_mean) / latents_std per channel.
        config = pipeline.vae.config
        mean = torch.tensor(config.latents_mean, device=encodings.device, dtype=encodings.dtype).view(1, -1, 1, 1, 1)
        std = torch.tensor(config.latents_std, device=encodings.device, dtype=encodings.dtype).view(1, -1, 1, 1, 1)
        return (encodings - mean) / std

    def branch_modules(self, block: torch.nn.Module) -> tuple[torch.nn.Module, ...]:
        return block.attn1, block.attn2, block.ffn

    def replay_block(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                     branch_outputs: list[torch.Tensor]) -> torch.Tensor:
        # As WanTransformerBlock.forward adds its branches: self-attention and feed-forward
        # times their gates (the 3rd and 6th modulation vectors), cross-attention ungated.
        temb = inputs["temb"]
        if temb.ndim == 4:  # Wan2.2 TI2V: per-token modulation (batch, tokens, 6, dim)
            modulation = (block.scale_shift_table.unsqueeze(0) + temb.float()).unbind(2)
        else:  # (batch, 6, dim): one vector per sample, broadcast over the tokens
            modulation = (block.scale_shift_table + temb.float()).split(1, dim=1)
        gate, feed_forward_gate = modulation[2], modulation[5]
        self_attention, cross_attention, feed_forward = branch_outputs
        x = (hidden_states.float() + self_attention * gate).type_as(hidden_states)
        x = x + cross_attention
        return (x.float() + feed_forward.float() * feed_forward_gate).type_as(x)

    def recovery_processor(self, original: Any, pruner: Any, layer: int) -> Any:
        return WanRecoveryProcessor(original, pruner, layer)

    supports_full_context = True

    def context_key_value(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                          index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # As WanTransformerBlock.forward: the first two modulation vectors shift and scale the
        # norm1 of the block input, in float32.
        temb = inputs["temb"]
        if temb.ndim == 4:  # Wan2.2 TI2V: per-token modulation (batch, tokens, 6, dim)
            modulation = block.scale_shift_table.unsqueeze(0) + gather_tokens(temb, index).float()
            shift, scale = modulation[:, :, 0], modulation[:, :, 1]
        else:  # (batch, 6, dim)
            modulation = block.scale_shift_table + temb.float()
            shift, scale = modulation[:, 0:1], modulation[:, 1:2]
        x = (block.norm1(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        return _key_value(block.attn1, x)

    def gather_block_inputs(self, inputs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        cos, sin = inputs["rotary_emb"]
        gathered = {
            "hidden_states": gather_tokens(inputs["hidden_states"], index),
            "rotary_emb": (gather_tokens(cos, index), gather_tokens(sin, index)),
        }
        if inputs["temb"].ndim == 4:  # Wan2.2 TI2V: modulation differs per token
            gathered["temb"] = gather_tokens(inputs["temb"], index)
        return gathered

    def query_key(
        self, block: torch.nn.Module, inputs: dict[str, Any], query_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, temb = inputs["hidden_states"], inputs["temb"]
        cos, sin = inputs["rotary_emb"]
        # The first two of the six modulation vectors are the self-attention shift and scale.
        # The block modulates in float32; in the model's dtype it is one fused kernel and half
        # the memory traffic, which is all ranking needs.
        if temb.ndim == 4:
            shift, scale = (block.scale_shift_table.unsqueeze(0) + temb.float())[:, :, :2].unbind(2)
        else:
            shift, scale = (block.scale_shift_table + temb.float())[:, :2].unsqueeze(2).unbind(1)
        dtype = hidden_states.dtype
        x = torch.addcmul(shift.to(dtype), block.norm1(hidden_states), (1 + scale).to(dtype))
        attn = block.attn1

        key = attn.norm_k(_projection(attn, x, 1)).unflatten(2, (attn.heads, -1))
        key = apply_rope(key, cos, sin)

        query_rows = query_index.unsqueeze(0)
        x_query = gather_tokens(x, query_rows)
        query = attn.norm_q(_projection(attn, x_query, 0)).unflatten(2, (attn.heads, -1))
        query = apply_rope(query, gather_tokens(cos, query_rows), gather_tokens(sin, query_rows))
        return query.transpose(1, 2), key.transpose(1, 2)

    def block_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int, keys: int | None = None) -> float:
        return cross_attention_block_flops(self.hidden_size(transformer), transformer.config.ffn_dim, tokens,
                                           context_tokens, keys)
