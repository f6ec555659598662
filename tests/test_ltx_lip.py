"""LIP on LTX-Video through LipConfig(source_latents=...) and LipConfig(mask=...): a tiny random
LTXVideoTransformer3DModel, bare and in an LTXPipeline called with prompt embeddings."""

from __future__ import annotations

import pytest
import torch
from conftest import feed_forward_shapes
from diffusers import LTXPipeline
from test_ltx import FRAMES, HEIGHT, WIDTH, generate, ltx_inputs, pipe, tiny_ltx  # noqa: F401  (pipe: fixture)

import vidprune
from vidprune.adapters import adapter_for
from vidprune.interframe import keep_mask, reference_index
from vidprune.runtime import pruner_of

TOKENS = FRAMES * HEIGHT * WIDTH
DETECTION = vidprune.LipDetection(tau=0.05, median=False, smooth=False, cleanup=False, dilate=False, tau2=None)


@pytest.fixture
def clean_pipe(pipe):  # noqa: F811
    yield pipe
    vidprune.remove(pipe)


def moving_square_source() -> torch.Tensor:
    """Clean source latents (1, 8, 3, 8, 8): a still random background and a square moving right."""
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(1, 8, 1, HEIGHT, WIDTH, generator=generator).repeat(1, 1, FRAMES, 1, 1)
    for frame in range(FRAMES):
        latents[:, :, frame, 2:5, 2 * frame : 2 * frame + 3] += 2.0
    return latents



def test_keep_all_mask_is_bit_identical_and_remove_restores(clean_pipe):
    reference = generate(clean_pipe)
    vidprune.apply(clean_pipe, vidprune.LipConfig(mask=torch.ones(FRAMES, HEIGHT, WIDTH, dtype=torch.bool)))
    assert torch.equal(generate(clean_pipe), reference)
    vidprune.apply(clean_pipe, vidprune.LipConfig(source_latents=moving_square_source(), detection=DETECTION))
    assert not torch.equal(generate(clean_pipe), reference)
    vidprune.remove(clean_pipe)
    assert torch.equal(generate(clean_pipe), reference)
    assert all(type(block.attn1.processor).__name__ == "LTXVideoAttnProcessor"
               for block in clean_pipe.transformer.transformer_blocks)


def test_video_layout_is_ltxs_packing():
    """LIP's (B, C, F, H, W) view of the packed tokens is the inverse of LTXPipeline's packing,
    also with patches of 2 x 2 x 2."""
    model = tiny_ltx(layers=1)
    adapter = adapter_for(model)
    latents = torch.randn(2, 4, 2 * FRAMES, 2 * HEIGHT, 2 * WIDTH)
    model.register_to_config(patch_size=2, patch_size_t=2)  # the adapter reads the patch from the config
    inputs = dict(hidden_states=torch.zeros(2, TOKENS, 32), num_frames=FRAMES, height=HEIGHT, width=WIDTH)
    packed = adapter.from_video_layout(model, inputs, latents)
    assert torch.equal(packed, LTXPipeline._pack_latents(latents, 2, 2))
    assert torch.equal(adapter.to_video_layout(model, inputs, packed), latents)


@pytest.mark.parametrize("config", [vidprune.LipConfig(detection=DETECTION),
                                    vidprune.LipConfig(detection=DETECTION, recovery=False),
                                    vidprune.LipConfig(detection=DETECTION, kv_source="clean", duplicates=1)],
                         ids=["lip", "lip-noar", "lip-clean-kv"])
def test_pipeline_computes_the_source_latents_kept_tokens_in_every_block(clean_pipe, config):
    source = moving_square_source()
    expected = keep_mask(source, (1, 1, 1), DETECTION)[0].flatten()
    kept = int(expected.sum())
    assert HEIGHT * WIDTH < kept < TOKENS  # the moving square is kept, the still background is not
    reference = generate(clean_pipe)
    vidprune.apply(clean_pipe, vidprune.LipConfig(source_latents=source, detection=DETECTION, recovery=config.recovery,
                                                  kv_source=config.kv_source, duplicates=config.duplicates))
    seen, handles = feed_forward_shapes(clean_pipe.transformer.transformer_blocks)
    out = generate(clean_pipe)
    for handle in handles:
        handle.remove()
    forwards = vidprune.stats(clean_pipe).forwards
    assert len(forwards) == 3  # 3 steps, each one forward of both CFG halves
    for forward in forwards:
        (span,) = forward.spans
        assert span.index.shape == (1, kept) and torch.equal(span.index[0], expected.nonzero().squeeze(1))
    layers = len(clean_pipe.transformer.transformer_blocks)
    clean_passes = [(2, TOKENS)] * layers if config.kv_source == "clean" else []
    assert seen == clean_passes + [(2, kept)] * (layers * 3)
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
    reference = reference_index(keep_mask(source, (1, 1, 1), DETECTION))[0]
    pruned = reference != torch.arange(TOKENS)
    assert pruned.any() and len(calls) == 3
    for noisy, timestep, output in calls:  # packed tokens (batch, tokens, channels), patch 1
        x0 = noisy - timestep[0] / 1000 * output
        torch.testing.assert_close(x0[:, pruned], x0[:, reference[pruned]], rtol=1e-5, atol=1e-5)
        assert not torch.equal(output[:, pruned], output[:, reference[pruned]])


def static_inputs(batch: int = 1) -> dict:
    """Inputs whose latent frames all equal the first: pruned tokens duplicate their references."""
    inputs = ltx_inputs(batch=batch)
    first = inputs["hidden_states"].view(batch, FRAMES, HEIGHT * WIDTH, -1)[:, :1]
    inputs["hidden_states"] = first.expand(-1, FRAMES, -1, -1).reshape(batch, TOKENS, -1).contiguous()
    return inputs


def example_mask() -> torch.Tensor:
    keep = torch.zeros(FRAMES, HEIGHT, WIDTH, dtype=torch.bool)
    keep[0] = True
    keep[1, :3, :2] = keep[2, 5:, 4:] = True
    return keep


def test_recovery_on_a_static_video_matches_the_unpruned_model_on_kept_tokens():
    """Attention Recovery with LTX's RoPE: on a still video through one block, every kept token's
    output equals the unpruned model's; without recovery the softmax shifts."""
    model = tiny_ltx(layers=1, seed=1)
    with torch.no_grad():  # peaked attention, so that which keys and where they sit matter
        model.transformer_blocks[0].attn1.norm_q.weight *= 8
        model.transformer_blocks[0].attn1.norm_k.weight *= 8
    inputs = static_inputs(batch=2)
    reference = model(**inputs)[0]
    kept = example_mask().flatten()
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), restore="prediction"))
    recovered = model(**inputs)[0]
    assert vidprune.stats(model).forwards[-1].spans[0].tokens == int(kept.sum())
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), restore="prediction", recovery=False))
    plain = model(**inputs)[0]
    vidprune.remove(model)
    torch.testing.assert_close(recovered[:, kept], reference[:, kept], rtol=1e-5, atol=1e-5)
    assert (plain[:, kept] - reference[:, kept]).abs().max() > 1e-3
    assert torch.equal(model(**inputs)[0], reference)


def test_prediction_restore_copies_the_references_output_on_a_bare_model():
    """Source latents of a still video: only frame 0 is computed; every other token's output is
    its reference's (frame 0 at its position)."""
    model = tiny_ltx(layers=2)
    inputs = static_inputs()
    source = adapter_for(model).to_video_layout(model, inputs, inputs["hidden_states"])
    vidprune.apply(model, vidprune.LipConfig(source_latents=source, restore="prediction", recovery=False))
    out = model(**inputs)[0]
    record = vidprune.stats(model).forwards[-1]
    vidprune.remove(model)
    assert record.keep == pytest.approx(1 / FRAMES) and record.spans[0].tokens == HEIGHT * WIDTH
    frames = out.view(1, FRAMES, HEIGHT * WIDTH, -1)
    assert all(torch.equal(frames[:, f], frames[:, 0]) for f in range(1, FRAMES))


def test_refusals_name_what_is_accepted_and_change_nothing(pipe):  # noqa: F811
    model = tiny_ltx(layers=2)
    inputs = ltx_inputs()
    # LTXImageToVideoPipeline's timesteps: 0 on the conditioning frame's tokens, t elsewhere.
    per_token = torch.full((1, TOKENS), 700.0)
    per_token[:, : HEIGHT * WIDTH] = 0.0
    i2v = {**inputs, "timestep": per_token}
    reference = model(**i2v)[0]
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask()))
    with pytest.raises(ValueError, match="one timestep per sample.*LTXImageToVideoPipeline.*LipConfig"):
        model(**i2v)
    uniform = model(**{**inputs, "timestep": torch.full((1, TOKENS), 700.0)})[0]  # one timestep, per token: runs
    torch.testing.assert_close(uniform, model(**inputs)[0])
    vidprune.remove(model)
    assert torch.equal(model(**i2v)[0], reference)
    with pytest.raises(ValueError, match=r"no video-to-video pipeline for LTXVideoTransformer3DModel; for a "
                                         r"LTXPipeline give LipConfig\(source_latents=...\) or LipConfig\(mask=...\)"):
        vidprune.apply(pipe, vidprune.LipConfig())
    assert pruner_of(pipe.transformer) is None and type(pipe) is LTXPipeline
    vidprune.apply(model, vidprune.LipConfig(source_latents=torch.zeros(1, 8, FRAMES, HEIGHT, 2 * WIDTH)))
    with pytest.raises(ValueError, match="source latents of shape .* do not fit"):
        model(**inputs)
    vidprune.remove(model)
