"""TAPE through Wan2.2 pipelines on tiny random models: A14B-style two-expert denoising
(`transformer` for high noise, `transformer_2` for low noise) and TI2V-5B-style per-token
timesteps (`expand_timesteps=True`), text-to-video and image-to-video."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline, WanTransformer3DModel
from PIL import Image

import vidprune
from vidprune.runtime import pruner_of
from vidprune.budget import plan_keeps
from vidprune.selection import kept_per_frame
from vidprune.tokens import TokenGrid

from conftest import SMALL_SPANS, block_tokens, forward_after_dense, replay_matches_block, tiny_transformer, transformer_inputs

GRID = TokenGrid(3, 4, 4)  # 9 frames at 64x64 -> 3 latent frames of 8x8 -> 3 x 4 x 4 tokens
TEXT_DIM = 16
STEPS = 6


def _transformer(seed: int) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=6, rope_max_seq_len=64,
    ).eval()


def _common() -> dict:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    # Calls pass prompt embeddings, so no text encoder is needed.
    return dict(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler)


@pytest.fixture(scope="module")
def two_experts():
    """A14B-style: two experts split at boundary_ratio (t >= 800: `transformer`)."""
    pipe = WanPipeline(transformer=_transformer(0), transformer_2=_transformer(1), boundary_ratio=0.8, **_common())
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    vidprune.remove(pipe)


@pytest.fixture(scope="module")
def ti2v():
    """TI2V-5B-style: one transformer, per-token timesteps, for text-to-video and image-to-video."""
    common, transformer = _common(), _transformer(2)
    pipes = {"t2v": WanPipeline(transformer=transformer, expand_timesteps=True, **common),
             "i2v": WanImageToVideoPipeline(transformer=transformer, expand_timesteps=True, **common)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    yield pipes
    for pipe in pipes.values():
        vidprune.remove(pipe)


def run(pipe, seed: int = 0, **overrides) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(2, 8, TEXT_DIM, generator=generator)
    inputs = dict(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], height=64, width=64, num_frames=9,
                  num_inference_steps=STEPS, output_type="latent", generator=generator)
    if isinstance(pipe, WanImageToVideoPipeline):
        pixels = np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        inputs["image"] = Image.fromarray(pixels)
    inputs.update(overrides)
    return pipe(**inputs).frames


def _forwards_of(seen: list[tuple[int, int]], layers: int) -> list[list[int]]:
    """Per forward, the tokens each block computed on (from conftest.block_tokens)."""
    assert len(seen) % layers == 0 and [i for i, _ in seen] == list(range(layers)) * (len(seen) // layers)
    return [[n for _, n in seen[k : k + layers]] for k in range(0, len(seen), layers)]


def _check_bit_identical(pipe, config: vidprune.TapeConfig) -> None:
    reference = run(pipe)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=1.0, **SMALL_SPANS))
    assert torch.equal(run(pipe), reference)
    vidprune.apply(pipe, config)
    assert not torch.equal(run(pipe), reference)
    vidprune.remove(pipe)
    assert torch.equal(run(pipe), reference)


# -- A14B: two experts -------------------------------------------------------------------

def test_two_experts_hooked_and_bit_identical(two_experts):
    vidprune.apply(two_experts, vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS))
    assert pruner_of(two_experts.transformer) is not None and pruner_of(two_experts.transformer_2) is not None
    vidprune.remove(two_experts)
    assert pruner_of(two_experts.transformer) is None and pruner_of(two_experts.transformer_2) is None
    _check_bit_identical(two_experts, vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS))


def test_two_experts_token_counts_and_stats(two_experts):
    pipe = two_experts
    config = vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS)
    vidprune.apply(pipe, config)
    layers = len(pipe.transformer.blocks)
    with block_tokens(pipe.transformer) as high, block_tokens(pipe.transformer_2) as low:
        first = run(pipe)
    timesteps = pipe.scheduler.timesteps.tolist()
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    high_steps = [i for i, t in enumerate(timesteps) if t >= boundary]
    assert 0 < len(high_steps) < STEPS - 1  # both experts run, the low-noise one at least twice

    stats = vidprune.stats(pipe)
    records = stats.forwards
    assert [r.step for r in records] == [i for i in range(STEPS) for _ in range(2)]  # CFG: two forwards per step
    by_expert = {"high": [r for r in records if r.step in high_steps],
                 "low": [r for r in records if r.step not in high_steps]}
    computed = {"high": _forwards_of(high, layers), "low": _forwards_of(low, layers)}
    assert len(computed["high"]) == len(by_expert["high"]) and len(computed["low"]) == len(by_expert["low"])
    for expert in ("high", "low"):
        for record, tokens in zip(by_expert[expert], computed[expert]):
            expected = kept_per_frame(GRID, record.keep) * GRID.frames
            assert tokens == [GRID.size] + [expected] * (layers - 1)
            assert [s.tokens for s in record.spans] == [expected] * 3

    # Step 0 is dense (dense_first); the low-noise expert's token cache starts empty, so its
    # first step is planned dense too and the other steps keep less: the call's mean is `keep`.
    keeps = [r.keep for r in records[::2]]
    first_low = len(high_steps)
    assert keeps[0] == 1.0 and keeps[first_low] == 1.0
    assert all(k < 1.0 for i, k in enumerate(keeps) if i not in (0, first_low))
    assert stats.mean_keep == pytest.approx(0.5)
    sigmas = [t / pipe.scheduler.config.num_train_timesteps for t in timesteps]
    assert plan_keeps(config, sigmas, [first_low]) == pytest.approx(keeps)
    assert plan_keeps(config, sigmas)[first_low] < 1.0  # without the switch the plan would prune there

    assert torch.equal(run(pipe), first)
    assert [r.keep for r in vidprune.stats(pipe).forwards] == [r.keep for r in records]


# -- TI2V-5B: per-token timesteps -----------------------------------------------------------

@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_ti2v_bit_identical(ti2v, kind):
    _check_bit_identical(ti2v[kind], vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS))


@pytest.mark.parametrize("kind", ["t2v", "i2v"])
def test_ti2v_per_token_timesteps_sigma_and_token_counts(ti2v, kind):
    pipe = ti2v[kind]
    timesteps_seen: list[torch.Tensor] = []
    spy = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: timesteps_seen.append(kw["timestep"]), with_kwargs=True)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, **SMALL_SPANS))
    layers = len(pipe.transformer.blocks)
    try:
        with block_tokens(pipe.transformer) as seen:
            run(pipe)
    finally:
        spy.remove()
        records = vidprune.stats(pipe).forwards
        vidprune.remove(pipe)
    assert all(t.shape == (1, GRID.size) for t in timesteps_seen)
    if kind == "i2v":  # the conditioning first frame is at timestep 0, the others at t
        assert all((t[0, : GRID.per_frame] == 0).all() and (t[0, GRID.per_frame :] > 0).all() for t in timesteps_seen)
    scheduler = pipe.scheduler
    for record, timestep, t in zip(records, timesteps_seen, scheduler.timesteps.repeat_interleave(2)):
        assert record.sigma == pytest.approx(float(t) / scheduler.config.num_train_timesteps)
        assert record.sigma == float(timestep.max()) / scheduler.config.num_train_timesteps
    assert [r.step for r in records] == [i for i in range(STEPS) for _ in range(2)]
    keeps = [r.keep for r in records]
    assert keeps[:2] == [1.0, 1.0] and all(k < 1.0 for k in keeps[2:])
    for record, tokens in zip(records, _forwards_of(seen, layers)):
        expected = kept_per_frame(GRID, record.keep) * GRID.frames
        assert tokens == [GRID.size] + [expected] * (layers - 1)


def test_ti2v_block_cache_replays_with_per_token_gates(ti2v):
    pipe = ti2v["i2v"]
    reference = run(pipe)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=1.0, cache="block", **SMALL_SPANS))
    assert torch.equal(run(pipe), reference)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache="block", **SMALL_SPANS))
    block = run(pipe)
    assert torch.isfinite(block).all() and not torch.equal(block, reference)
    assert torch.equal(run(pipe), block)
    vidprune.remove(pipe)


def test_block_replay_with_per_token_modulation():
    """With per-token temb (batch, tokens, 6, dim), replay_block gives what the block computes
    when its branches return what they returned: each token gated by its own timestep."""
    model = tiny_transformer(layers=1)
    inputs = transformer_inputs(frames=2, height=4, width=4)
    exact, captured = replay_matches_block(model, model.blocks[0],
                                           {**inputs, "timestep": torch.linspace(0.0, 900.0, 8).unsqueeze(0)})
    assert captured["temb"].shape[:3] == (1, 8, 6)  # 2 x 2 x 2 tokens, each its own modulation
    assert exact


def test_two_experts_follow_the_one_budget_rule(two_experts):
    """Where the expert switch leaves no step to prune, the call is refused like one transformer's
    (naming the switch); the advice (more steps, or the keep it names) runs."""
    pipe = two_experts
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0))
    timesteps = _timesteps_of(pipe, 2)
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    assert timesteps[0] >= boundary > timesteps[1]  # a 2-step call switches experts at its second step
    with pytest.raises(ValueError, match="each step where another transformer takes over are dense.*give more steps"):
        run(pipe, num_inference_steps=2)
    run(pipe, num_inference_steps=STEPS)
    assert vidprune.stats(pipe).mean_keep == pytest.approx(0.5)
    vidprune.remove(pipe)


def _timesteps_of(pipe, steps: int) -> list[float]:
    pipe.scheduler.set_timesteps(steps)
    return pipe.scheduler.timesteps.tolist()


def test_full_context_with_per_token_modulation_gives_the_dense_forward_from_exact_states(ti2v):
    """Wan2.2 TI2V's per-token timesteps: a pruned token's key is made with its own modulation
    (context_key_value gathers temb at its position); from exact states, the dense output."""
    pipe = ti2v["t2v"]
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 8, 8), encoder_hidden_states=torch.randn(1, 8, TEXT_DIM),
                  timestep=torch.linspace(0.0, 900.0, GRID.size).unsqueeze(0), return_dict=False)
    full = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.34, context="full", **SMALL_SPANS)
    dense, pruned, records = forward_after_dense(pipe, full, inputs)
    assert records[1].keep == 0.5
    torch.testing.assert_close(pruned, dense, rtol=0, atol=1e-5)
    _, kept, _ = forward_after_dense(pipe, full.with_(context="kept"), inputs)
    assert (kept - dense).abs().max() > 1e-3
