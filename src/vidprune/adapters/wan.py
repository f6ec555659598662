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
from diffusers import WanTransformer3DModel

from ..tokens import TokenGrid, gather_tokens
from .base import Adapter


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved RoPE on x (B, N, heads, head_dim) with tables (B or 1, N, 1, head_dim),
    computed in x's dtype (the model itself rotates in the tables' float64: slower, and more
    precision than ranking tokens needs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2].to(x.dtype), sin[..., 1::2].to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _projection(attn: torch.nn.Module, x: torch.Tensor, which: int) -> torch.Tensor:
    """Query (0) or key (1) projection, also when the QKV weights are fused."""
    if getattr(attn, "fused_projections", False):
        size = attn.inner_dim
        weight = attn.to_qkv.weight[which * size : (which + 1) * size]
        bias = attn.to_qkv.bias[which * size : (which + 1) * size]
        return F.linear(x, weight, bias)
    return (attn.to_q, attn.to_k)[which](x)


class WanAdapter(Adapter):
    model_classes = (WanTransformer3DModel,)

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return transformer.blocks

    def token_grid(self, transformer: torch.nn.Module, hidden_states: torch.Tensor) -> TokenGrid:
        p_t, p_h, p_w = transformer.config.patch_size
        _, _, frames, height, width = hidden_states.shape
        return TokenGrid(frames // p_t, height // p_h, width // p_w)

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

    def block_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int) -> float:
        config = transformer.config
        dim = config.num_attention_heads * config.attention_head_dim
        projections = 2 * tokens * dim * dim * 6  # self q, k, v, out; cross q, out
        context_projections = 2 * context_tokens * dim * dim * 2  # cross k, v: not pruned
        self_attention = 2 * 2 * tokens * tokens * dim
        cross_attention = 2 * 2 * tokens * context_tokens * dim
        feed_forward = 2 * 2 * tokens * dim * config.ffn_dim
        return float(projections + context_projections + self_attention + cross_attention + feed_forward)
