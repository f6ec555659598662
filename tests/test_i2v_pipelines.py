"""TAPE through the image-to-video and condition pipelines of LTX-Video, CogVideoX and
HunyuanVideo: tiny random transformers and VAEs, a small PIL image, prompt embeddings (no text
encoders), output_type="latent"."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from diffusers import (
    CogVideoXDDIMScheduler,
    CogVideoXImageToVideoPipeline,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoImageToVideoPipeline,
    HunyuanVideoTransformer3DModel,
    LTXConditionPipeline,
    LTXImageToVideoPipeline,
)
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition
from PIL import Image

import vidprune
from vidprune.adapters import adapter_for
from vidprune.bench import build_transformer

from conftest import record_block_calls
from tiny_vaes import cogvideox_vae, hunyuan_vae, ltx_vae

TEXT = 7
FRAME_TOKENS = 64  # every call below: 8 x 8 tokens per latent frame
# Single-block spans from layer 1 on, so a forward hook on a block sees its own kept outputs.
ONE_BLOCK_SPANS = dict(first_pruned_layer=1, reselect_every=1)


def image(side: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8))


@dataclass
class Case:
    build: Callable[[], Any]  # the pipeline
    call: Callable[[], dict]  # its call arguments, without the generator
    tokens: int  # video tokens of each transformer forward
    attention: str  # the blocks' self-attention module, which sees the (kept) video tokens
    batched_cfg: bool  # both CFG branches in one forward (else true CFG: one call per branch)


def _ltx_embeds() -> dict:
    embeds = torch.randn(2, 1, TEXT, 16, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, TEXT)
    return dict(prompt_embeds=embeds[0], prompt_attention_mask=mask, negative_prompt_embeds=embeds[1],
                negative_prompt_attention_mask=mask, guidance_scale=3.0)


def _ltx(cls: type) -> Callable[[], Any]:
    # the tiny VAE compresses 4x in time and space: 9 frames of 32x32 -> 3 x 8 x 8 latents
    return lambda: cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=ltx_vae(), text_encoder=None, tokenizer=None,
                       transformer=build_transformer("ltx-video-tiny", "cpu", torch.float32))


def _cogvideox(version: str) -> Callable[[], Any]:
    def build() -> CogVideoXImageToVideoPipeline:
        torch.manual_seed(0)
        # 1.0 I2V adds learned positions to RoPE; 1.5 patches 2 latent frames a token and embeds ofs.
        extra = (dict(use_learned_positional_embeddings=True) if version == "1.0"
                 else dict(patch_size_t=2, ofs_embed_dim=8, patch_bias=False))
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=8,
            text_embed_dim=16, num_layers=6, sample_width=16, sample_height=16, sample_frames=9,
            max_text_seq_length=TEXT, use_rotary_positional_embeddings=True, **extra).eval()
        return CogVideoXImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=cogvideox_vae(),
                                             transformer=transformer,
                                             scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))
    return build


def _cogvideox_call() -> dict:
    embeds = torch.randn(2, 1, TEXT, 16, generator=torch.Generator().manual_seed(0))
    return dict(image=image(128), prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=128, width=128,
                num_frames=9, max_sequence_length=TEXT, guidance_scale=6.0)


def _hunyuan(condition: str) -> Callable[[], Any]:
    def build() -> HunyuanVideoImageToVideoPipeline:
        torch.manual_seed(0)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=9 if condition == "latent_concat" else 4, out_channels=4, num_attention_heads=2,
            attention_head_dim=16, num_layers=2, num_single_layers=2, num_refiner_layers=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), image_condition_type=condition).eval()
        return HunyuanVideoImageToVideoPipeline(
            text_encoder=None, tokenizer=None, transformer=transformer, vae=hunyuan_vae(),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None, tokenizer_2=None,
            image_processor=None)
    return build


def _hunyuan_call() -> dict:
    generator = torch.Generator().manual_seed(0)
    positive, negative = ({"embeds": torch.randn(1, TEXT, 16, generator=generator),
                           "pooled": torch.randn(1, 8, generator=generator)} for _ in range(2))
    mask = torch.ones(1, TEXT)
    return dict(image=image(128), prompt_embeds=positive["embeds"], pooled_prompt_embeds=positive["pooled"],
                prompt_attention_mask=mask, negative_prompt_embeds=negative["embeds"],
                negative_pooled_prompt_embeds=negative["pooled"], negative_prompt_attention_mask=mask,
                true_cfg_scale=4.0, height=128, width=128, num_frames=9)


CASES = {
    "ltx-i2v": Case(_ltx(LTXImageToVideoPipeline),
                    lambda: dict(_ltx_embeds(), image=image(32), height=32, width=32, num_frames=9),
                    192, "attn1", True),
    "ltx-condition": Case(_ltx(LTXConditionPipeline),
                          lambda: dict(_ltx_embeds(), conditions=[LTXVideoCondition(image=image(32), frame_index=0)],
                                       height=32, width=32, num_frames=9),
                          192, "attn1", True),
    "cogvideox-i2v": Case(_cogvideox("1.0"), _cogvideox_call, 192, "attn1", True),
    # 3 latent frames padded to 4 for patch_size_t 2: 2 token frames
    "cogvideox1.5-i2v": Case(_cogvideox("1.5"), _cogvideox_call, 128, "attn1", True),
    "hunyuan-i2v": Case(_hunyuan("latent_concat"), _hunyuan_call, 192, "attn", False),
    "hunyuan-i2v-token-replace": Case(_hunyuan("token_replace"), _hunyuan_call, 192, "attn", False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    spec = CASES[request.param]
    pipeline = spec.build()
    pipeline.set_progress_bar_config(disable=True)
    yield spec, pipeline
    vidprune.remove(pipeline)


def generate(case_: tuple[Case, Any], steps: int = 3, **overrides) -> torch.Tensor:
    spec, pipeline = case_
    arguments = dict(spec.call(), num_inference_steps=steps, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    return pipeline(**{**arguments, **overrides}).frames


def test_keep_one_and_remove_bit_identical_default_and_paper(case):
    spec, pipeline = case
    reference = generate(case)
    for config in (vidprune.TapeConfig(budget="even", keep=1.0), vidprune.TapeConfig.paper(keep=1.0)):
        vidprune.apply(pipeline, config)
        assert torch.equal(generate(case), reference)
    for config in (vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, first_pruned_layer=1, reselect_every=2),
                   vidprune.TapeConfig.paper(keep=0.5)):
        vidprune.apply(pipeline, config)
        pruned = generate(case)
        assert vidprune.stats(pipeline).mean_keep == pytest.approx(0.5)
        assert torch.isfinite(pruned).all() and not torch.equal(pruned, reference)
    vidprune.remove(pipeline)
    assert torch.equal(generate(case), reference)


def test_keep_half_computes_half_the_tokens_in_the_blocks(case):
    """The paper preset at a constant keep 0.5: every block from layer 1 on runs its attention on
    half the video tokens (half of each frame), block 0 on all of them."""
    spec, pipeline = case
    blocks = adapter_for(pipeline.transformer).blocks(pipeline.transformer)
    seen = []  # (block, video tokens into its self-attention)
    handles = [getattr(block, spec.attention).register_forward_pre_hook(
        lambda m, a, kw, i=i: seen.append((i, (kw.get("hidden_states") if "hidden_states" in kw else a[0]).shape[1])),
        with_kwargs=True) for i, block in enumerate(blocks)]
    vidprune.apply(pipeline, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", first_pruned_layer=1,
                                                       reselect_every=2))
    try:
        generate(case)
    finally:
        for handle in handles:
            handle.remove()
    forwards = vidprune.stats(pipeline).forwards
    vidprune.remove(pipeline)
    assert all(f.tokens == spec.tokens for f in forwards)
    per_forward = [(0, spec.tokens)] + [(i, spec.tokens // 2) for i in range(1, len(blocks))]
    assert seen == per_forward * len(forwards)


def _gathered(family: str, inputs: dict, kept: torch.Tensor, frame_tokens: int) -> dict:
    """The test's own gather of a block's per-token inputs for the kept tokens `kept` (1-D):
    the reference the runtime's gathered inputs must equal."""
    gathered = {"hidden_states": inputs["hidden_states"][:, kept]}
    if family == "ltx":
        cos, sin = inputs["image_rotary_emb"]
        gathered["image_rotary_emb"] = (cos[:, kept], sin[:, kept])
        gathered["temb"] = inputs["temb"][:, kept]  # per token: the conditioning frame's timestep is smaller
    elif family == "cogvideox":
        gathered["image_rotary_emb"] = tuple(table[kept] for table in inputs["image_rotary_emb"])
    else:
        name = "freqs_cis" if "freqs_cis" in inputs else "image_rotary_emb"
        gathered[name] = tuple(table[kept] for table in inputs[name])
        mask, tokens = inputs["attention_mask"], inputs["hidden_states"].shape[1]
        gathered["attention_mask"] = torch.cat([mask[..., kept], mask[..., tokens:]], dim=-1)
        if inputs.get("token_replace_emb") is not None:  # the image frame's tokens among the kept
            gathered["num_tokens"] = sum(int(i) < frame_tokens for i in kept)
    return gathered


def test_span_blocks_run_on_the_kept_tokens_own_per_token_inputs(case):
    """Each single-block span's kept outputs equal the block run by hand on the kept tokens with
    their own RoPE rows, per-token timestep modulation (LTX's conditioning frame) and
    first-frame count (HunyuanVideo token_replace): fails if any is left ungathered or taken
    for other tokens."""
    spec, pipeline = case
    family = {"LTXVideoTransformer3DModel": "ltx", "CogVideoXTransformer3DModel": "cogvideox"}.get(
        type(pipeline.transformer).__name__, "hunyuan")
    blocks = adapter_for(pipeline.transformer).blocks(pipeline.transformer)
    captured, handles = record_block_calls(blocks)  # block -> (full-length inputs, output), of the last forward
    vidprune.apply(pipeline, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", record_selections=True,
                                                       **ONE_BLOCK_SPANS))
    try:
        generate(case, steps=2)
    finally:
        for handle in handles:
            handle.remove()
    spans = vidprune.stats(pipeline).forwards[-1].spans
    vidprune.remove(pipeline)
    if family == "ltx":  # the conditioning frame's tokens are modulated apart: a per-token temb
        temb = captured[0][0]["temb"]
        assert temb.shape[1] == spec.tokens and not torch.equal(temb[:, 0], temb[:, -1])
    if family == "hunyuan" and captured[0][0].get("token_replace_emb") is not None:
        assert captured[0][0]["num_tokens"] == FRAME_TOKENS
    for span in spans:
        inputs, output = captured[span.start]
        kept = span.index[0]
        assert torch.equal(span.index, span.index[:1].expand_as(span.index))  # CFG halves share it
        assert (kept < FRAME_TOKENS).any() and (kept >= FRAME_TOKENS).any()
        with torch.no_grad():
            expected = blocks[span.start](**{**inputs, **_gathered(family, inputs, kept, FRAME_TOKENS)})
        hidden = output[0] if isinstance(output, tuple) else output
        torch.testing.assert_close(hidden[:, kept], expected[0] if isinstance(expected, tuple) else expected)


def test_cfg_branches_as_the_pipeline_calls_the_model(case):
    """Batched CFG (LTX, CogVideoX): one forward per step holding both halves, which compute the
    conditional half's selection. HunyuanVideo's true CFG: two calls per step, one per branch."""
    spec, pipeline = case
    batches = []
    handle = pipeline.transformer.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    vidprune.apply(pipeline, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, refresh_every=0, record_selections=True,
                                                 first_pruned_layer=1, reselect_every=2))
    try:
        generate(case)
    finally:
        handle.remove()
    forwards = vidprune.stats(pipeline).forwards
    vidprune.remove(pipeline)
    indices = [s.index for f in forwards for s in f.spans if s.index is not None]
    assert indices
    if spec.batched_cfg:
        assert batches == [2, 2, 2] and [f.step for f in forwards] == [0, 1, 2]
        assert all(index.shape[0] == 1 for index in indices)
    else:
        assert batches == [1] * 6 and [f.step for f in forwards] == [0, 0, 1, 1, 2, 2]


def test_ltx_condition_beyond_the_first_frame_is_refused_before_computing():
    """A condition at frame_index > 0 prepends its tokens outside the grid: a clear refusal."""
    spec = CASES["ltx-condition"]
    pipeline = spec.build()
    pipeline.set_progress_bar_config(disable=True)
    vidprune.apply(pipeline, vidprune.TapeConfig.paper(keep=0.5))
    arguments = dict(spec.call(), conditions=[LTXVideoCondition(image=image(32), frame_index=8)],
                     num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match="frame_index 0 are supported"):
        pipeline(**arguments)
    vidprune.remove(pipeline)
