"""TAPE on a bare WanTransformer3DModel: shapes, dtypes, batches, Wan2.2 per-token timesteps,
and that the adapter reproduces the model's own attention inputs."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers import transformer_wan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vidprune
from vidprune.adapters import adapter_for
from vidprune.importance import sample_queries

from conftest import tiny_transformer, transformer_inputs

TRANSFORMER = tiny_transformer()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frames=st.integers(1, 4),
    height=st.sampled_from([2, 4, 6, 10]),  # latent sizes: token grids of 1, 2, 3 and 5 rows
    width=st.sampled_from([2, 6, 8]),
    batch=st.integers(1, 3),
    keep=st.floats(0.05, 1.0),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    per_frame=st.booleans(),
    importance=st.sampled_from(["attention", "random"]),
)
def test_any_grid_keep_batch_and_dtype(frames, height, width, batch, keep, dtype, per_frame, importance):
    model = TRANSFORMER.to(dtype)
    config = vidprune.TapeConfig.paper(keep=keep, min_keep=min(keep, 0.1), per_frame=per_frame, importance=importance,
                                 first_pruned_layer=1, reselect_every=2)
    inputs = transformer_inputs(batch, frames, height, width, dtype=dtype)
    vidprune.apply(model, config)
    try:
        out = model(**inputs)[0]
    finally:
        vidprune.remove(model)
    assert out.shape == inputs["hidden_states"].shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


def test_keep_one_and_remove_bit_identical_on_transformer():
    model = tiny_transformer()
    inputs = transformer_inputs(batch=2, frames=3, height=6, width=10)
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=1.0, first_pruned_layer=0, reselect_every=1))
    assert torch.equal(model(**inputs)[0], reference)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.3, first_pruned_layer=0, reselect_every=1))
    assert not torch.equal(model(**inputs)[0], reference)
    vidprune.remove(model)
    assert torch.equal(model(**inputs)[0], reference)


def test_per_sample_selection_in_a_batch():
    """Each sample of a batch gets its own selection: a sample's output does not depend on
    what else is in the batch."""
    model = tiny_transformer()
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.4, first_pruned_layer=1, share_cfg_selection=False))
    pair = transformer_inputs(batch=2, frames=3, height=8, width=8)
    alone = {k: (v[:1] if isinstance(v, torch.Tensor) else v) for k, v in pair.items()}
    torch.testing.assert_close(model(**pair)[0][:1], model(**alone)[0], rtol=1e-4, atol=1e-5)


def test_wan22_per_token_timestep_modulation_is_gathered():
    """Wan2.2 TI2V passes a timestep per token, so the block modulation differs per token and
    must be gathered with the kept tokens."""
    model = tiny_transformer()
    inputs = transformer_inputs(batch=1, frames=3, height=8, width=8)
    tokens = 3 * 4 * 4
    per_token = torch.full((1, tokens), 700.0)
    per_token[:, :16] = 0.0  # the first latent frame is the clean conditioning image
    inputs["timestep"] = per_token
    reference = model(**inputs)[0]
    seen = []  # (hidden_states, rotary cos) as the self-attention of block 2 gets them
    handle = model.blocks[2].attn1.register_forward_pre_hook(lambda m, a: seen.append((a[0], a[3][0])))
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=1.0, first_pruned_layer=1))
    assert torch.equal(model(**inputs)[0], reference)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", first_pruned_layer=1))
    out = model(**inputs)[0]
    handle.remove()
    vidprune.remove(model)
    hidden_states, cos = seen[-1]
    assert hidden_states.shape[1] == cos.shape[1] == 3 * 8
    # An ungathered (1, 48, 6, dim) modulation could not broadcast against 24 tokens: the run
    # itself shows it was gathered.
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


@pytest.mark.parametrize("fused", [False, True])
def test_adapter_query_key_equal_the_models_own(monkeypatch, fused):
    """The adapter's Q/K for scoring are the ones the block's attention computes (same
    modulation, norms and RoPE), also with fused QKV projections."""
    model = tiny_transformer(seed=3)
    if fused:
        model.fuse_qkv_projections()
    captured = {}
    original = transformer_wan.dispatch_attention_fn

    def spy(query, key, value, **kwargs):
        captured.setdefault("qk", (query, key))  # the first call is block 0's self-attention
        return original(query, key, value, **kwargs)

    block_inputs = {}
    model.blocks[0].register_forward_pre_hook(lambda m, a, kw: block_inputs.update(
        dict(zip(["hidden_states", "encoder_hidden_states", "temb", "rotary_emb"], a))), with_kwargs=True)
    monkeypatch.setattr(transformer_wan, "dispatch_attention_fn", spy)
    inputs = transformer_inputs(batch=2, frames=3, height=6, width=8)
    model(**inputs)
    grid = adapter_for(model).token_grid(model, inputs)
    everyone = torch.arange(grid.size)
    query, key = adapter_for(model).query_key(model.blocks[0], block_inputs, everyone)
    model_query, model_key = captured["qk"]  # (batch, tokens, heads, dim)
    torch.testing.assert_close(query, model_query.transpose(1, 2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(key, model_key.transpose(1, 2), rtol=1e-5, atol=1e-5)
    some = sample_queries(grid, 10, seed=0, device=torch.device("cpu"))
    sampled, _ = adapter_for(model).query_key(model.blocks[0], block_inputs, some)
    torch.testing.assert_close(sampled, query[:, :, some])


def test_a_bare_transformer_carries_nothing_from_one_forward_to_the_next():
    """Outside a pipeline call forwards belong to no call: a forward's selection does not depend
    on the forward before it, even at the same timestep and batch (no CFG sharing across them)."""
    model = tiny_transformer()
    config = vidprune.TapeConfig.paper(keep=0.5, first_pruned_layer=1)
    first, second = transformer_inputs(seed=1), transformer_inputs(seed=2)
    vidprune.apply(model, config)
    alone = model(**second)[0]
    model(**first)
    after_another = model(**second)[0]
    assert not any(f.shared_selection for f in vidprune.stats(model).forwards)
    vidprune.remove(model)
    assert torch.equal(after_another, alone)

