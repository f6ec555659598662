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
TAPE's cache="block" is not implemented: the attention (and, in the single-stream blocks, the
MLP) runs on the text and video tokens joined.
LIP: diffusers has no HunyuanVideo video-to-video pipeline, so the source is
LipConfig(source_latents=...) (clean latents (B, C, F, H, W), the transformer's own layout) or
LipConfig(mask=...), on HunyuanVideoPipeline calls and bare transformers. One LIP span runs over
both block kinds. Flow matching: x0 = x_t - sigma v (the base class's coefficients). Attention
Recovery runs in both kinds' joint attention, over [kept and duplicated video; text], text
queries included. The image-to-video variants are refused (see noisy_latents).

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
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

from ..context import full_context_attention
from ..recovery import recovered_attention
from ..tokens import gather_tokens
from .base import Adapter, BenchmarkShape, WrappedProcessor, random_text

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


class HunyuanRecoveryProcessor(WrappedProcessor):
    """HunyuanVideo's joint attention (both block kinds) whose kept video queries and text
    queries take a method's extra video keys besides the kept video keys and the text keys:
    LIP's Attention Recovery (duplicates of their references' keys at the pruned positions:
    pre-RoPE key and value, rotated at the pruned token's position; records the kept tokens'
    video keys and values in LIP's clean pass) or TAPE's full context (context.py)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if not self.pruning():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if encoder_hidden_states is None or image_rotary_emb is None:
            raise ValueError("vidprune's attention on HunyuanVideo runs in the blocks' joint attention (text tokens "
                             "and RoPE given); use LipConfig(recovery=False) or TapeConfig(context='kept') for other "
                             "calls")
        state, text, context = self.pruner.state, encoder_hidden_states.shape[1], self.pruner.context
        # Per token, as HunyuanVideoAttnProcessor2_0: the dual-stream blocks project the text
        # with their own add_*_proj and norms, the single-stream blocks with the video's.
        dual = attn.add_q_proj is not None
        projections = ((attn.to_q, attn.norm_q), (attn.to_k, attn.norm_k), (attn.to_v, None))
        text_projections = (((attn.add_q_proj, attn.norm_added_q), (attn.add_k_proj, attn.norm_added_k),
                             (attn.add_v_proj, None)) if dual else projections)
        query, key, value = (_project(x, attn, hidden_states) for x in projections)
        text_qkv = [_project(x, attn, encoder_hidden_states) for x in text_projections]
        if context is None and state.recording is not None:  # LIP's clean pass: keep the kept tokens' keys and values
            self.record_clean(key, value)
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        span = state.current.span
        backend = self._attention_backend

        def attend(video_query, video_key, video_value):  # rotated video parts, the text after them
            # The video tokens are never masked: every video key is True, the text padding stays masked.
            mask = None if attention_mask is None else torch.cat(
                [attention_mask[..., :1].expand(*attention_mask.shape[:-1], video_key.shape[1]),
                 attention_mask[..., -text:]], dim=-1)
            joined = (torch.cat([video, part], dim=1) for video, part in
                      zip((video_query, video_key, video_value), text_qkv))
            return dispatch_attention_fn(*joined, attn_mask=mask, dropout_p=0.0, is_causal=False, backend=backend)

        def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return apply_rotary_emb(x, tables, sequence_dim=1)

        if context is not None:  # TAPE's full context
            output = full_context_attention(
                context, self.layer, query, key, value, rotate=rotate, tables=image_rotary_emb,
                tables_at=lambda index: tuple(table[index[0]] for table in _rope(span.inputs)), attend=attend)
        else:
            keys = span.recovery_keys
            if span.key_rope is None:  # tables at the key positions, once per span (of both block kinds)
                span.key_rope = tuple(table[keys.positions] for table in _rope(span.inputs))
            clean_key, clean_value = self.pruner.clean_keys_values(self.layer)
            output = recovered_attention(
                query, key, value, keys, rotate_query=lambda q: rotate(q, image_rotary_emb),
                rotate_key=lambda k: rotate(k, span.key_rope), attend=attend,
                duplicate_key=clean_key, duplicate_value=clean_value,
            )
        output = output.flatten(2, 3).to(query.dtype)
        video, text_output = output[:, :-text], output[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            video = attn.to_out[1](attn.to_out[0](video))
        if getattr(attn, "to_add_out", None) is not None:
            text_output = attn.to_add_out(text_output)
        return video, text_output


def _project(projection: tuple[torch.nn.Module, torch.nn.Module | None], attn: torch.nn.Module,
             x: torch.Tensor) -> torch.Tensor:
    """x (B, N, D) through a linear projection and its per-head norm (if any): (B, N, heads, head_dim)."""
    linear, norm = projection
    x = linear(x).unflatten(2, (attn.heads, -1))
    return x if norm is None else norm(x)


class HunyuanVideoAdapter(Adapter):
    model_classes = (HunyuanVideoTransformer3DModel,)
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

    def noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        condition = transformer.config.image_condition_type
        if condition is not None:
            # latent_concat: the image latents and mask ride along the channels; token_replace:
            # the first frame is the clean image, modulated at timestep 0, so a token copied
            # from it would need its own noise level. Neither is worked out for LIP.
            raise ValueError(
                f"LIP on HunyuanVideo supports the text-to-video transformer (image_condition_type None, as "
                f"HunyuanVideoPipeline runs it); this one has image_condition_type={condition!r} "
                f"(HunyuanVideoImageToVideoPipeline), which LIP does not support: use TAPE (vidprune.TapeConfig) there")
        return inputs["hidden_states"]

    def with_noisy_latents(self, transformer: torch.nn.Module, inputs: dict[str, Any],
                           latents: torch.Tensor) -> dict[str, Any]:
        return {**inputs, "hidden_states": latents.to(inputs["hidden_states"])}

    def self_attention(self, block: torch.nn.Module) -> torch.nn.Module:
        return block.attn

    def recovery_processor(self, original: Any, pruner: Any, layer: int) -> Any:
        return HunyuanRecoveryProcessor(original, pruner, layer)

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
            # video part gathered with the kept tokens, text part (its padding) kept; None (FramePack
            # at batch 1, the text trimmed to its unpadded length) stays None
            "attention_mask": None if mask is None else torch.cat([mask[..., kept], mask[..., tokens:]], dim=-1),
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
        hidden_states = inputs["hidden_states"]
        x = _attention_input(block, inputs, hidden_states, inputs.get("num_tokens"))
        attn = block.attn
        query = attn.norm_q(attn.to_q(x[:, query_index]).unflatten(2, (attn.heads, -1)))
        key = attn.norm_k(attn.to_k(x).unflatten(2, (attn.heads, -1)))
        cos, sin = _rope(inputs)
        query = apply_rotary_emb(query, (cos[query_index], sin[query_index]), sequence_dim=1)
        key = apply_rotary_emb(key, (cos, sin), sequence_dim=1)
        return query.transpose(1, 2), key.transpose(1, 2)

    supports_full_context = True

    def context_key_value(self, block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                          index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first_frame = None  # token_replace: the first frame's tokens among `index` (sorted: they come first)
        if inputs.get("token_replace_emb") is not None:
            first_frame = int((index[0] < inputs["num_tokens"]).sum())
        x = _attention_input(block, inputs, hidden_states, first_frame)
        attn = block.attn
        return _project((attn.to_k, attn.norm_k), attn, x), _project((attn.to_v, None), attn, x)

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


def _attention_input(block: torch.nn.Module, inputs: dict[str, Any], hidden_states: torch.Tensor,
                     first_frame_tokens: int | None) -> torch.Tensor:
    """The video tokens `hidden_states` after the block's first modulated norm (either kind; per
    token, so video tokens alone give theirs): with token_replace, the first `first_frame_tokens`
    of them modulated at timestep 0."""
    norm = block.norm1 if hasattr(block, "norm1") else block.norm
    if inputs.get("token_replace_emb") is not None:
        return norm(hidden_states, inputs["temb"], inputs["token_replace_emb"], first_frame_tokens)[0]
    return norm(hidden_states, emb=inputs["temb"])[0]


def _rope(inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (cos, sin) tables among a block's inputs, under whichever name the block gives them."""
    return next(inputs[name] for name in _ROPE_ARGUMENTS if inputs.get(name) is not None)
