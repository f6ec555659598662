"""LIP on CogVideoX: a tiny random CogVideoXTransformer3DModel, bare and in a
CogVideoXVideoToVideoPipeline with a tiny random VAE, called with prompt embeddings."""

from __future__ import annotations

import pytest
import torch
from conftest import feed_forward_shapes
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXVideoToVideoPipeline,
)
from test_cogvideox import FRAMES, HEIGHT, TEXT, WIDTH, model_inputs, tiny_cogvideox
from test_lip import moving_square_video

import vidprune
from vidprune.adapters import adapter_for
from vidprune.interframe import keep_mask, reference_index
from vidprune.runtime import pruner_of
from vidprune.tokens import patches

V2V_GRID = (3, 4, 4)  # 9 frames at 64x64 -> 3 latent frames of 8x8 -> 3 x 4 x 4 tokens
V2V_TOKENS = 48
DETECTION = vidprune.LipDetection(tau=0.05, median=False, smooth=False, cleanup=False, dilate=False, tau2=None)


@pytest.fixture(scope="module")
def pipe() -> CogVideoXVideoToVideoPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()
    # v-prediction with zero terminal SNR, as the published CogVideoX scheduler configs
    scheduler = CogVideoXDDIMScheduler(timestep_spacing="trailing", prediction_type="v_prediction",
                                       rescale_betas_zero_snr=True, snr_shift_scale=1.0)
    pipeline = CogVideoXVideoToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                             transformer=tiny_cogvideox(), scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    vidprune.remove(pipeline)


@pytest.fixture
def clean_pipe(pipe):
    yield pipe
    vidprune.remove(pipe)



def edit(pipeline, **overrides) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 1, TEXT, 16, generator=generator)
    arguments = dict(video=moving_square_video(), prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                     height=64, width=64, num_inference_steps=3, strength=0.8, max_sequence_length=TEXT,
                     output_type="latent", generator=generator)
    return pipeline(**{**arguments, **overrides}).frames



def test_keep_all_mask_is_bit_identical_and_remove_restores(clean_pipe):
    reference = edit(clean_pipe)
    vidprune.apply(clean_pipe, vidprune.LipConfig(mask=torch.ones(*V2V_GRID, dtype=torch.bool)))
    assert torch.equal(edit(clean_pipe), reference)
    vidprune.apply(clean_pipe, vidprune.LipConfig(detection=DETECTION))
    assert not torch.equal(edit(clean_pipe), reference)
    vidprune.remove(clean_pipe)
    assert torch.equal(edit(clean_pipe), reference)
    assert all(type(block.attn1.processor).__name__ == "CogVideoXAttnProcessor2_0"
               for block in clean_pipe.transformer.transformer_blocks)


def source_mask(pipeline) -> torch.Tensor:
    """The keep mask LIP should find: DETECTION on the VAE's mode of the source video, scaled
    by the VAE's scaling factor, computed here without vidprune's pipeline watching."""
    video = pipeline.video_processor.preprocess_video(moving_square_video(), height=64, width=64)
    with torch.no_grad():
        latents = pipeline.vae.encode(video[0].unsqueeze(0)).latent_dist.mode()
    return keep_mask(latents * pipeline.vae.config.scaling_factor, (1, 2, 2), DETECTION)[0]


@pytest.mark.parametrize("config", [vidprune.LipConfig(detection=DETECTION),
                                    vidprune.LipConfig(detection=DETECTION, recovery=False),
                                    vidprune.LipConfig(detection=DETECTION, kv_source="clean", duplicates=1)],
                         ids=["lip", "lip-noar", "lip-clean-kv"])
def test_edit_computes_the_source_videos_kept_tokens_in_every_block(clean_pipe, config):
    expected = source_mask(clean_pipe).flatten()
    kept = int(expected.sum())
    assert 16 <= kept < V2V_TOKENS  # the moving square is kept, the still background is not
    reference = edit(clean_pipe)
    vidprune.apply(clean_pipe, vidprune.LipConfig(detection=DETECTION, recovery=config.recovery,
                                                  kv_source=config.kv_source, duplicates=config.duplicates))
    seen, handles = feed_forward_shapes(clean_pipe.transformer.transformer_blocks)
    out = edit(clean_pipe)
    for handle in handles:
        handle.remove()
    forwards = vidprune.stats(clean_pipe).forwards
    assert len(forwards) == 2  # strength 0.8 of 3 steps: 2 steps, each one forward of both CFG halves
    for forward in forwards:
        (span,) = forward.spans
        # one index for the batch: the [unconditional; conditional] halves compute the same tokens
        assert span.index.shape == (1, kept) and torch.equal(span.index[0], expected.nonzero().squeeze(1))
    layers = len(clean_pipe.transformer.transformer_blocks)
    clean_passes = [(2, V2V_TOKENS + TEXT)] * layers if config.kv_source == "clean" else []
    assert seen == clean_passes + [(2, kept + TEXT)] * (layers * 2)
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)


def test_restored_outputs_hold_the_references_clean_estimate(clean_pipe):
    """restore="x0" (the default) on v-prediction: a pruned token's output gives, from its own
    noisy input, the clean estimate sqrt(a) x_t - sqrt(1 - a) v its reference's gives."""
    transformer, scheduler = clean_pipe.transformer, clean_pipe.scheduler
    vidprune.apply(clean_pipe, vidprune.LipConfig(detection=DETECTION))
    calls = []
    handle = transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw["hidden_states"], kw["timestep"], out[0])), with_kwargs=True)
    edit(clean_pipe)
    handle.remove()
    reference = reference_index(source_mask(clean_pipe).unsqueeze(0))[0]
    pruned = reference != torch.arange(V2V_TOKENS)
    assert pruned.any() and len(calls) == 2
    tokens = lambda x: patches(x.transpose(1, 2), (1, 2, 2)).flatten(1, 3)  # noqa: E731  (B, F, C, H, W) in
    for noisy, timestep, output in calls:
        alpha = scheduler.alphas_cumprod[int(timestep[0])].item()
        x0 = tokens(alpha**0.5 * noisy - (1 - alpha) ** 0.5 * output)
        torch.testing.assert_close(x0[:, pruned], x0[:, reference[pruned]], rtol=1e-5, atol=1e-5)
        assert not torch.equal(tokens(output)[:, pruned], tokens(output)[:, reference[pruned]])


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon", "sample"])
def test_x0_coefficients_equal_the_schedulers_clean_estimate(prediction):
    scheduler = CogVideoXDDIMScheduler(prediction_type=prediction, timestep_spacing="trailing")
    scheduler.set_timesteps(5)
    adapter = adapter_for(tiny_cogvideox(layers=1))
    generator = torch.Generator().manual_seed(0)
    output, sample = torch.randn(2, 1, 3, 4, 4, 4, generator=generator)
    for timestep in scheduler.timesteps.tolist():
        a, b = adapter.x0_coefficients(scheduler, float(timestep), timestep / 1000)
        expected = scheduler.step(output, timestep, sample).pred_original_sample
        torch.testing.assert_close(a * sample - b * output, expected)


def static_inputs(model, frames: int = FRAMES) -> dict:
    """Inputs whose latent frames all equal the first: pruned tokens duplicate their references."""
    inputs = model_inputs(model, frames=frames)
    inputs["hidden_states"] = inputs["hidden_states"][:, :1].expand_as(inputs["hidden_states"]).contiguous()
    return inputs


def example_mask(frames: int = FRAMES) -> torch.Tensor:
    keep = torch.zeros(frames, HEIGHT, WIDTH, dtype=torch.bool)
    keep[0] = True
    keep[1, :3, :2] = keep[2, 5:, 4:] = True
    return keep


def test_recovery_on_a_static_video_matches_the_unpruned_model_on_kept_tokens():
    """Joint attention over text and recovered video keys: on a still video through one block,
    every kept token's output equals the unpruned model's; without recovery the softmax shifts."""
    model = tiny_cogvideox(layers=1, seed=1)
    with torch.no_grad():  # peaked attention, so that which keys and where they sit matter
        model.transformer_blocks[0].attn1.norm_q.weight *= 8
        model.transformer_blocks[0].attn1.norm_k.weight *= 8
    inputs = static_inputs(model)
    reference = model(**inputs)[0]
    kept = example_mask().flatten()
    tokens = lambda out: patches(out.transpose(1, 2), (1, 2, 2)).flatten(1, 3)[:, kept]  # noqa: E731
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), restore="prediction"))
    recovered = model(**inputs)[0]
    assert vidprune.stats(model).forwards[-1].spans[0].tokens == int(kept.sum())
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), restore="prediction", recovery=False))
    plain = model(**inputs)[0]
    vidprune.remove(model)
    torch.testing.assert_close(tokens(recovered), tokens(reference), rtol=1e-5, atol=1e-5)
    assert (tokens(plain) - tokens(reference)).abs().max() > 1e-3
    assert torch.equal(model(**inputs)[0], reference)


def test_prediction_restore_copies_the_references_output_with_temporal_patches():
    """CogVideoX 1.5 (patch_size_t=2), source latents given as (batch, channels, frames, ...):
    a still video keeps frame 0's tokens only; every other token's output is its reference's."""
    model = tiny_cogvideox(patch_size_t=2)
    inputs = static_inputs(model, frames=2 * FRAMES)
    source = inputs["hidden_states"].transpose(1, 2)
    vidprune.apply(model, vidprune.LipConfig(source_latents=source, restore="prediction", recovery=False))
    out = model(**inputs)[0]
    record = vidprune.stats(model).forwards[-1]
    vidprune.remove(model)
    assert record.keep == pytest.approx(1 / FRAMES) and record.spans[0].tokens == HEIGHT * WIDTH
    tokens = patches(out.transpose(1, 2), (2, 2, 2)).flatten(1, 3)
    per_frame = HEIGHT * WIDTH
    for frame in range(1, FRAMES):
        assert torch.equal(tokens[:, frame * per_frame : (frame + 1) * per_frame], tokens[:, :per_frame])


def test_refusals_name_what_is_accepted_and_change_nothing():
    model = tiny_cogvideox()
    inputs = model_inputs(model)
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask()))  # restore="x0" needs the scheduler
    with pytest.raises(ValueError, match=r"restore='x0'\) on CogVideoX.*no pipeline scheduler.*restore='prediction'"):
        model(**inputs)
    vidprune.remove(model)
    assert torch.equal(model(**inputs)[0], reference)
    text_to_video = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                      scheduler=CogVideoXDDIMScheduler())
    with pytest.raises(ValueError, match="CogVideoXVideoToVideoPipeline.*source_latents=.*mask="):
        vidprune.apply(text_to_video, vidprune.LipConfig())
    assert pruner_of(model) is None and type(text_to_video) is CogVideoXPipeline


def test_tape_prunes_among_lips_kept_tokens():
    """LipConfig(tape=...): layer 0 runs on LIP's kept tokens, TAPE's spans on a share of them."""
    model = tiny_cogvideox()
    inputs = model_inputs(model)
    tape = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", first_pruned_layer=1, reselect_every=2)
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), restore="prediction", tape=tape))
    out = model(**inputs)[0]
    spans = vidprune.stats(model).forwards[-1].spans
    vidprune.remove(model)
    kept = int(example_mask().sum())
    assert [(s.start, s.end) for s in spans] == [(0, 0), (1, 2), (3, 4), (5, 5)]
    assert spans[0].tokens == kept and all(0 < s.tokens < kept for s in spans[1:])
    assert torch.isfinite(out).all()
