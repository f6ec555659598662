"""diffusers HunyuanVideoTransformer3DModel: TAPE on HunyuanVideoPipeline and HunyuanVideoImageToVideoPipeline.

The transformer takes latents (B, C, F, H, W) and patches them into frame-major tokens. It runs
its dual-stream blocks (transformer_blocks) then its single-stream blocks
(single_transformer_blocks), nothing in between; `blocks` is both lists in that order. Both
kinds are called positionally as block(hidden_states, encoder_hidden_states, temb,
attention_mask, rope, token_replace_emb, first_frame_num_tokens) and return
(hidden_states, encoder_hidden_states), where
- hidden_states (B, N, D): video tokens; encoder_hidden_states (B, T, D): the refined text
  tokens, which attend jointly with the video tokens and are updated by every block;
- temb: (B, D), one per sample: every block's modulation is per sample;
- attention_mask: (B, 1, 1, N + T) bool over [video; text], False on the text padding;
- rope: (cos, sin), each (N, head_dim) with no batch axis. The dual-stream block names it
  `freqs_cis`, the single-stream block `image_rotary_emb`;
- token_replace_emb: (B, D) or None, num_tokens: int, the first frame's tokens (token_replace).

Only the video stream is pruned: text tokens stay queries and keys of every block.
HunyuanVideoPipeline embeds guidance_scale (the `guidance` input) and runs true CFG
(true_cfg_scale > 1 with negative prompt embeddings) as a second transformer call per step.
LIP and TAPE's cache="block" are not implemented: the attention (and, in the single-stream
blocks, the MLP) runs on the text and video tokens joined.

HunyuanVideoImageToVideoPipeline: with image_condition_type="latent_concat" the image latents
and a mask join the noisy latents along channels before patching, nothing per token. With
"token_replace" the blocks take token_replace_emb (the modulation at timestep 0) and
num_tokens, and modulate the first num_tokens video tokens (the clean image's frame) with it:
per-token modulation given by a count, so a span's blocks get the count of the first frame's
tokens among the kept ones (kept indices are sorted, so those come first).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline, HunyuanVideoTransformer3DModel
from diffusers.models.embeddings import apply_rotary_emb

from ..tokens import gather_tokens
from .base import Adapter, BenchmarkShape, random_text

HUNYUAN_SHAPES = {
    # hunyuanvideo-community/HunyuanVideo transformer/config.json (diffusers' defaults are this
    # model): 20 dual-stream + 40 single-stream blocks, 24 heads x 128 = 3072 wide, patch 1x2x2;
    # text: LLaVA-Llama-3 256 tokens x 4096 and CLIP-L pooled 768; VAE: 4x time, 8x space.
    # 129 frames at 960x544 -> 33 x 34 x 60 = 67320 video tokens (+ 256 text tokens).
    "hunyuanvideo-13b": BenchmarkShape(
        "hunyuanvideo", dict(num_attention_heads=24, attention_head_dim=128, num_layers=20, num_single_layers=40,
                             num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, text_embed_dim=4096,
                             pooled_projection_dim=768, rope_axes_dim=(16, 56, 56), guidance_embeds=True),
        (129, 544, 960), (256, 4096), (4, 8), "hunyuanvideo-community/HunyuanVideo transformer/config.json",
        guidance_scale=6.0,
        notes=("hunyuanvideo-13b: guidance-distilled: one forward per step (embedded guidance, no true CFG), as "
               "HunyuanVideoPipeline runs by default",)),
    "hunyuanvideo-tiny": BenchmarkShape(
        "hunyuanvideo", dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                             num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                             rope_axes_dim=(4, 6, 6)),
        (9, 128, 128), (16, 16), (4, 8), "vidprune's tiny test shape", tiny=True, guidance_scale=6.0),
}

# The names the two block kinds give the RoPE argument.
_ROPE_ARGUMENTS = ("freqs_cis", "image_rotary_emb")


class HunyuanVideoAdapter(Adapter):
    model_classes = (HunyuanVideoTransformer3DModel,)
    supports_lip = False
    supports_block_cache = False
    returns_text_stream = True
    guidance_batched = False
    text_to_video_pipelines = ("HunyuanVideoPipeline",)
    benchmark_shapes = HUNYUAN_SHAPES

    def benchmark_pipeline(self, transformers: list[torch.nn.Module], shape: BenchmarkShape) -> Any:
        pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=transformers[0], vae=None,
                                    scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                    tokenizer_2=None)
        pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial = shape.vae
        return pipe

    def benchmark_call(self, shape: BenchmarkShape, device: str, dtype: torch.dtype,
                       generator: torch.Generator) -> dict[str, Any]:
        (embeds,) = random_text(shape, 1, generator, device, dtype)
        pooled = torch.randn(1, shape.config["pooled_projection_dim"], generator=generator).to(device, dtype)
        frames, height, width = shape.video
        return dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled,
                    prompt_attention_mask=torch.ones(1, shape.text[0], device=device),
                    guidance_scale=shape.guidance_scale, num_frames=frames, height=height, width=width,
                    output_type="latent")

    def blocks(self, transformer: torch.nn.Module) -> torch.nn.ModuleList:
        return torch.nn.ModuleList([*transformer.transformer_blocks, *transformer.single_transformer_blocks])

    def check_graphs(self, transformer: torch.nn.Module) -> None:
        # A graph would replay the first frame's kept-token count of the selection it captured.
        if transformer.config.image_condition_type == "token_replace":
            raise ValueError("compile_blocks(graphs=True) does not support HunyuanVideo's image_condition_type="
                             "'token_replace' (its blocks take the first frame's kept-token count as a number, which "
                             "changes with every selection); use compile_blocks(graphs=False) or no compile_blocks")

    def patch_size(self, transformer: torch.nn.Module) -> tuple[int, int, int]:
        config = transformer.config
        return config.patch_size_t, config.patch_size, config.patch_size

    def gather_block_inputs(self, inputs: dict[str, Any], index: torch.Tensor) -> dict[str, Any]:
        # The blocks broadcast one RoPE table over the batch, so every sample must keep the same tokens.
        if index.shape[0] > 1 and not torch.equal(index, index[:1].expand_as(index)):
            raise ValueError(
                "HunyuanVideo's RoPE tables have no batch axis, so the samples of a batch must compute the same "
                "tokens: vidprune supports one video per call here"
            )
        kept = index[0]
        tokens = inputs["hidden_states"].shape[1]
        rope = tuple(table[kept] for table in _rope(inputs))
        mask = inputs["attention_mask"]
        gathered = {
            "hidden_states": gather_tokens(inputs["hidden_states"], index),
            # video part gathered with the kept tokens, text part (its padding) kept
            "attention_mask": torch.cat([mask[..., kept], mask[..., tokens:]], dim=-1),
        }
        # Under both names: a span may run from the dual-stream into the single-stream blocks.
        # Eagerly the runtime hands each block those among its own arguments; inside a CUDA
        # graph every block gets both and (not token_replace: refused there) **kwargs takes the other.
        gathered |= dict.fromkeys(_ROPE_ARGUMENTS, rope)
        if inputs.get("token_replace_emb") is not None:
            # The first frame's tokens keep their own modulation: count them among the kept.
            gathered["num_tokens"] = int((kept < inputs["num_tokens"]).sum())
        return gathered

    def query_key(
        self, block: torch.nn.Module, inputs: dict[str, Any], query_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # As both block kinds and HunyuanVideoAttnProcessor2_0 compute them for the video tokens:
        # the block's first modulated norm (per token, so the video tokens alone give theirs),
        # to_q/to_k, per-head RMSNorm, then RoPE. The text keys are left out: importance ranks
        # video tokens by the attention they get from video queries.
        hidden_states, temb = inputs["hidden_states"], inputs["temb"]
        norm = block.norm1 if hasattr(block, "norm1") else block.norm
        if inputs.get("token_replace_emb") is not None:  # the first frame's tokens modulated apart
            x = norm(hidden_states, temb, inputs["token_replace_emb"], inputs["num_tokens"])[0]
        else:
            x = norm(hidden_states, emb=temb)[0]
        attn = block.attn
        query = attn.norm_q(attn.to_q(x[:, query_index]).unflatten(2, (attn.heads, -1)))
        key = attn.norm_k(attn.to_k(x).unflatten(2, (attn.heads, -1)))
        cos, sin = _rope(inputs)
        query = apply_rotary_emb(query, (cos[query_index], sin[query_index]), sequence_dim=1)
        key = apply_rotary_emb(key, (cos, sin), sequence_dim=1)
        return query.transpose(1, 2), key.transpose(1, 2)

    def block_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int, keys: int | None = None) -> float:
        """FLOPs of one block, either kind: per token (video or text) a dual-stream block's q, k, v,
        out and feed-forward (dim -> mlp -> dim) and a single-stream block's q, k, v, proj_mlp
        (dim -> mlp) and proj_out (dim + mlp -> dim) both make 4 dim^2 + 2 dim mlp multiply-adds;
        the attention is joint over video and text. Multiply-adds count 2; the per-sample
        modulation projections of temb, norms and activations are left out."""
        dim = self.hidden_size(transformer)
        mlp = int(dim * transformer.config.mlp_ratio)
        joint = tokens + context_tokens
        joint_keys = (tokens if keys is None else keys) + context_tokens
        projections = 2 * joint * (4 * dim * dim + 2 * dim * mlp)
        attention = 2 * 2 * joint * joint_keys * dim  # scores and weighted values
        return float(projections + attention)


def _rope(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables among a block's inputs, under whichever name the block gives them."""
    return next(inputs[name] for name in _ROPE_ARGUMENTS if inputs.get(name) is not None)
