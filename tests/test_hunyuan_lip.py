"""LIP on HunyuanVideo through LipConfig(source_latents=...) and LipConfig(mask=...): a tiny random
HunyuanVideoTransformer3DModel (dual- and single-stream blocks), bare and in a
HunyuanVideoPipeline called with prompt embeddings."""

from __future__ import annotations

import pytest
import torch
from diffusers import HunyuanVideoPipeline, HunyuanVideoTransformer3DModel

import vidprune
from vidprune.interframe import keep_mask, reference_index
from vidprune.runtime import pruner_of
from vidprune.tokens import patches

from test_hunyuan import (FRAMES, HEIGHT, TEXT, TOKENS, WIDTH, count_attention_tokens, generate, model_inputs,  # noqa: F401
                          pipe, tiny_hunyuan)

PATCH = (1, 2, 2)
DETECTION = vidprune.LipDetection(tau=0.05, median=False, smooth=False, cleanup=False, dilate=False, tau2=None)


@pytest.fixture
def clean_pipe(pipe):  # noqa: F811
    yield pipe
    vidprune.remove(pipe)


def moving_square_source() -> torch.Tensor:
    """Clean source latents (1, 4, 3, 16, 16): a still random background and a square (2 x 2
    tokens) moving right by 2 tokens a frame."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 4, 1, 2 * HEIGHT, 2 * WIDTH, generator=generator).repeat(1, 1, FRAMES, 1, 1)
    for frame in range(FRAMES):
        latents[:, :, frame, 4:8, 4 * frame : 4 * frame + 4] += 2.0
    return latents


def tiny_variant(seed: int = 0, **overrides) -> HunyuanVideoTransformer3DModel:
    """tiny_hunyuan's model with some of its settings overridden (block counts, input channels)."""
    torch.manual_seed(seed)
    config = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                  num_single_layers=2, num_refiner_layers=1, text_embed_dim=16, pooled_projection_dim=8,
                  rope_axes_dim=(4, 6, 6))
    return HunyuanVideoTransformer3DModel(**{**config, **overrides}).eval()


def example_mask() -> torch.Tensor:
    keep = torch.zeros(FRAMES, HEIGHT, WIDTH, dtype=torch.bool)
    keep[0] = True
    keep[1, :3, :2] = keep[2, 5:, 4:] = True
    return keep


def test_keep_all_mask_is_bit_identical_and_remove_restores(clean_pipe):
    reference = generate(clean_pipe)
    vidprune.apply(clean_pipe, vidprune.LipConfig(mask=torch.ones(FRAMES, HEIGHT, WIDTH, dtype=torch.bool)))
    assert torch.equal(generate(clean_pipe), reference)
    vidprune.apply(clean_pipe, vidprune.LipConfig(source_latents=moving_square_source(), detection=DETECTION))
    assert not torch.equal(generate(clean_pipe), reference)
    vidprune.remove(clean_pipe)
    assert torch.equal(generate(clean_pipe), reference)
    blocks = [*clean_pipe.transformer.transformer_blocks, *clean_pipe.transformer.single_transformer_blocks]
    assert all(type(block.attn.processor).__name__ == "HunyuanVideoAttnProcessor2_0" for block in blocks)


@pytest.mark.parametrize("config", [vidprune.LipConfig(detection=DETECTION),
                                    vidprune.LipConfig(detection=DETECTION, recovery=False),
                                    vidprune.LipConfig(detection=DETECTION, kv_source="clean", duplicates=1)],
                         ids=["lip", "lip-noar", "lip-clean-kv"])
@pytest.mark.parametrize("true_cfg", [False, True])
def test_pipeline_computes_the_kept_tokens_in_blocks_of_both_kinds(clean_pipe, config, true_cfg):
    source = moving_square_source()
    expected = keep_mask(source, PATCH, DETECTION)[0].flatten()
    kept = int(expected.sum())
    assert HEIGHT * WIDTH < kept < TOKENS  # the moving square is kept, the still background is not
    reference = generate(clean_pipe, true_cfg=true_cfg)
    vidprune.apply(clean_pipe, vidprune.LipConfig(source_latents=source, detection=DETECTION, recovery=config.recovery,
                                                  kv_source=config.kv_source, duplicates=config.duplicates))
    seen, handles = count_attention_tokens(clean_pipe.transformer)
    out = generate(clean_pipe, true_cfg=true_cfg)
    for handle in handles:
        handle.remove()
    calls = 3 * (2 if true_cfg else 1)  # true CFG: a second transformer call per step
    forwards = vidprune.stats(clean_pipe).forwards
    assert len(forwards) == calls
    for forward in forwards:
        (span,) = forward.spans  # one span over the 2 dual-stream and 2 single-stream blocks
        assert (span.start, span.end) == (0, 3)
        assert span.index.shape == (1, kept) and torch.equal(span.index[0], expected.nonzero().squeeze(1))
    # a clean pass over every token per branch (text), then the kept tokens in every block, text all there
    full = [(i, TOKENS, TEXT) for i in range(4)] if config.kv_source == "clean" else []
    pruned = [(i, kept, TEXT) for i in range(4)]
    per_step = (full + pruned + full + pruned if true_cfg else full + pruned) + pruned * (2 if true_cfg else 1) * 2
    assert seen == per_step
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)


def test_restored_outputs_hold_the_references_clean_estimate(clean_pipe):
    """restore="x0" (the default), flow matching: a pruned token's output gives, from its own
    noisy input, the clean estimate x_t - sigma v its reference's gives."""
    source = moving_square_source()
    vidprune.apply(clean_pipe, vidprune.LipConfig(source_latents=source, detection=DETECTION))
    calls = []
    handle = clean_pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw["hidden_states"], kw["timestep"], out[0])), with_kwargs=True)
    generate(clean_pipe)
    handle.remove()
    reference = reference_index(keep_mask(source, PATCH, DETECTION))[0]
    pruned = reference != torch.arange(TOKENS)
    assert pruned.any() and len(calls) == 3
    for noisy, timestep, output in calls:
        x0 = patches(noisy - timestep[0] / 1000 * output, PATCH).flatten(1, 3)
        torch.testing.assert_close(x0[:, pruned], x0[:, reference[pruned]], rtol=1e-5, atol=1e-5)
        tokens = patches(output, PATCH).flatten(1, 3)
        assert not torch.equal(tokens[:, pruned], tokens[:, reference[pruned]])


def static_inputs() -> dict:
    """Inputs whose latent frames all equal the first: pruned tokens duplicate their references."""
    inputs = model_inputs()
    inputs["hidden_states"] = inputs["hidden_states"][:, :, :1].expand(-1, -1, FRAMES, -1, -1).contiguous()
    return inputs


@pytest.mark.parametrize("layers", [dict(num_layers=1, num_single_layers=0), dict(num_layers=0, num_single_layers=1)],
                         ids=["dual-stream", "single-stream"])
def test_recovery_on_a_static_video_matches_the_unpruned_model_on_kept_tokens(layers):
    """Attention Recovery in either block kind (text joined, its padding masked): on a still
    video through one block, every kept token's output equals the unpruned model's; without
    recovery the softmax shifts."""
    model = tiny_variant(seed=1, **layers)
    (block,) = [*model.transformer_blocks, *model.single_transformer_blocks]
    with torch.no_grad():  # peaked attention, so that which keys and where they sit matter
        block.attn.norm_q.weight *= 8
        block.attn.norm_k.weight *= 8
        if block.attn.norm_added_k is not None:  # dual-stream: the text keys' own norm
            block.attn.norm_added_k.weight *= 8
    inputs = static_inputs()
    kept = example_mask().flatten()
    to_tokens = lambda out: patches(out, PATCH).flatten(1, 3)  # noqa: E731
    reference = to_tokens(model(**inputs)[0])
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), restore="prediction"))
    recovered = to_tokens(model(**inputs)[0])
    assert vidprune.stats(model).forwards[-1].spans[0].tokens == int(kept.sum())
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), restore="prediction", recovery=False))
    plain = to_tokens(model(**inputs)[0])
    vidprune.remove(model)
    torch.testing.assert_close(recovered[:, kept], reference[:, kept], rtol=1e-5, atol=1e-5)
    assert (plain[:, kept] - reference[:, kept]).abs().max() > 1e-3
    assert torch.equal(to_tokens(model(**inputs)[0]), reference)


def test_prediction_restore_copies_the_references_output_on_a_bare_model():
    """Source latents of a still video: only frame 0 is computed; every other frame's output is
    frame 0's."""
    model = tiny_hunyuan()
    inputs = static_inputs()
    vidprune.apply(model, vidprune.LipConfig(source_latents=inputs["hidden_states"], restore="prediction",
                                             recovery=False))
    out = model(**inputs)[0]
    record = vidprune.stats(model).forwards[-1]
    vidprune.remove(model)
    assert record.keep == pytest.approx(1 / FRAMES) and record.spans[0].tokens == HEIGHT * WIDTH
    assert all(torch.equal(out[:, :, f], out[:, :, 0]) for f in range(1, FRAMES))


@pytest.mark.parametrize("condition", ["latent_concat", "token_replace"])
def test_image_to_video_variants_are_refused_and_change_nothing(condition):
    channels = dict(in_channels=2 * 4 + 1) if condition == "latent_concat" else {}
    model = tiny_variant(image_condition_type=condition, **channels)
    inputs = model_inputs()
    if condition == "latent_concat":
        inputs["hidden_states"] = torch.randn(1, 9, FRAMES, 2 * HEIGHT, 2 * WIDTH)
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask()))
    with pytest.raises(ValueError, match=f"image_condition_type={condition!r}.*LIP does not support.*TapeConfig"):
        model(**inputs)
    vidprune.remove(model)
    assert torch.equal(model(**inputs)[0], reference)


def test_refusals_name_what_is_accepted_and_change_nothing(pipe):  # noqa: F811
    with pytest.raises(ValueError, match=r"no video-to-video pipeline for HunyuanVideoTransformer3DModel; for a "
                                         r"HunyuanVideoPipeline give LipConfig\(source_latents=...\) or "
                                         r"LipConfig\(mask=...\)"):
        vidprune.apply(pipe, vidprune.LipConfig())
    assert pruner_of(pipe.transformer) is None and type(pipe) is HunyuanVideoPipeline
    model = tiny_hunyuan()
    inputs = model_inputs()
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.LipConfig(source_latents=torch.zeros(1, 4, FRAMES, 2 * HEIGHT, 4 * WIDTH)))
    with pytest.raises(ValueError, match="source latents of shape .* do not fit"):
        model(**inputs)
    vidprune.remove(model)
    assert torch.equal(model(**inputs)[0], reference)
