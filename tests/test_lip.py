"""LIP in the runtime: Attention Recovery, restoration, and editing through
WanVideoToVideoPipeline on small random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vidprune
from vidprune.adapters.wan import apply_rope
from vidprune.interframe import reference_index
from vidprune.recovery import recovered_attention, recovery_keys, restore_from_references
from vidprune.tokens import TokenGrid, patches

from conftest import block_tokens, tiny_transformer, transformer_inputs

GRID = TokenGrid(4, 2, 3)


def example_mask() -> torch.Tensor:
    """Frame 0 kept; a few tokens of later frames kept; the rest pruned."""
    keep = torch.zeros(GRID.frames, GRID.height, GRID.width, dtype=torch.bool)
    keep[0] = True
    keep[1, 0, 0] = keep[2, 1, 2] = keep[3, 0, 1] = True
    return keep


def test_recovery_keys_take_the_nearest_duplicates():
    keep = example_mask()
    reference = reference_index(keep.unsqueeze(0))[0]
    flat = keep.flatten()
    every = recovery_keys(flat, reference, GRID, None)
    assert every.positions.tolist() == list(range(GRID.size)) and every.duplicate.tolist() == (~flat).tolist()
    none = recovery_keys(flat, reference, GRID, 0)
    assert none.positions.tolist() == flat.nonzero().squeeze(1).tolist() and not none.duplicate.any()
    one = recovery_keys(flat, reference, GRID, 1)
    # position (h=1, w=1) is kept only in frame 0: its duplicates are frames 1, 2, 3; one of them joins.
    assert 1 * 6 + 4 in one.positions.tolist() and 2 * 6 + 4 not in one.positions.tolist()
    slot_of = {int(p): i for i, p in enumerate(flat.nonzero().squeeze(1))}
    assert all(slot_of[int(reference[p])] == s for p, s in zip(every.positions, every.slots))


def test_recovered_attention_equals_full_attention_when_duplicates_are_exact():
    """If every pruned token's pre-RoPE key and value equal its reference's, kept queries get
    exactly the attention the unpruned model gives them."""
    generator = torch.Generator().manual_seed(0)
    keep = example_mask()
    flat = keep.flatten()
    reference = reference_index(keep.unsqueeze(0))[0]
    heads, dim = 2, 8
    q_full = torch.randn(1, GRID.size, heads, dim, generator=generator, dtype=torch.float64)
    k_full = torch.randn(1, GRID.size, heads, dim, generator=generator, dtype=torch.float64)[:, reference]
    v_full = torch.randn(1, GRID.size, heads, dim, generator=generator, dtype=torch.float64)[:, reference]
    angles = torch.rand(1, GRID.size, 1, dim // 2, generator=generator, dtype=torch.float64) * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)

    def attend(q, k, v):
        weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / dim**0.5, dim=-1)
        return torch.einsum("bhqk,bkhd->bqhd", weights, v)

    full = attend(apply_rope(q_full, cos, sin), apply_rope(k_full, cos, sin), v_full)[:, flat]
    kept = flat.nonzero().squeeze(1)
    keys = recovery_keys(flat, reference, GRID, None)
    recovered = recovered_attention(
        q_full[:, kept], k_full[:, kept], v_full[:, kept], keys,
        rotate_query=lambda x: apply_rope(x, cos[:, kept], sin[:, kept]),
        rotate_key=lambda x: apply_rope(x, cos[:, keys.positions], sin[:, keys.positions]),
        attend=attend,
    )
    torch.testing.assert_close(recovered, full, rtol=1e-12, atol=1e-12)
    plain = recovered_attention(
        q_full[:, kept], k_full[:, kept], v_full[:, kept], recovery_keys(flat, reference, GRID, 0),
        rotate_query=lambda x: apply_rope(x, cos[:, kept], sin[:, kept]),
        rotate_key=lambda x: apply_rope(x, cos[:, kept], sin[:, kept]), attend=attend,
    )
    assert (plain - full).abs().max() > 1e-3  # without recovery the softmax shifts


def static_video_inputs(frames: int = 4) -> dict:
    """Latents whose every frame equals the first: pruned tokens duplicate their references."""
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(1, 4, 1, 4, 6, generator=generator)
    return dict(hidden_states=first.expand(-1, -1, frames, -1, -1).contiguous(), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 7, 16, generator=generator), return_dict=False)


def test_one_block_with_recovery_matches_the_unpruned_model_on_kept_tokens():
    """On a static video through a one-block transformer, every kept token's output with
    Attention Recovery equals the unpruned model's; without recovery it does not."""
    model = tiny_transformer(layers=1)
    with torch.no_grad():  # peaked attention, so that which keys and where they sit matter
        model.blocks[0].attn1.norm_q.weight *= 8
        model.blocks[0].attn1.norm_k.weight *= 8
    inputs = static_video_inputs()
    keep = example_mask()
    reference = model(**inputs)[0]
    kept_rows = keep.flatten().nonzero().squeeze(1)
    tokens = lambda out: patches(out, (1, 2, 2)).flatten(1, 3)[:, kept_rows]  # noqa: E731
    vidprune.apply(model, vidprune.LipConfig(mask=keep, restore="prediction"))
    recovered = model(**inputs)[0]
    vidprune.apply(model, vidprune.LipConfig(mask=keep, recovery=False, restore="prediction"))
    plain = model(**inputs)[0]
    vidprune.remove(model)
    torch.testing.assert_close(tokens(recovered), tokens(reference), rtol=1e-5, atol=1e-5)
    assert (tokens(plain) - tokens(reference)).abs().max() > 1e-3
    assert torch.equal(model(**inputs)[0], reference)  # remove restores the processors


def test_restoration_copies_the_reference_prediction():
    generator = torch.Generator().manual_seed(2)
    keep = example_mask()
    reference = reference_index(keep.unsqueeze(0))[0]
    prediction = torch.randn(2, 4, 4, 4, 6, generator=generator)
    noisy = torch.randn(2, 4, 4, 4, 6, generator=generator)
    as_tokens = lambda x: patches(x, (1, 2, 2)).flatten(1, 3)  # noqa: E731
    copied = as_tokens(restore_from_references(prediction, noisy, reference, (1, 2, 2), (1.0, 0.6), "prediction"))
    assert torch.equal(copied, as_tokens(prediction)[:, reference])
    x0 = as_tokens(restore_from_references(prediction, noisy, reference, (1, 2, 2), (1.0, 0.6), "x0"))
    clean_estimate = as_tokens(noisy) - 0.6 * x0  # the restored velocity's x0 from the token's own x_t
    reference_clean = (as_tokens(noisy) - 0.6 * as_tokens(prediction))[:, reference]
    torch.testing.assert_close(clean_estimate, reference_clean)
    kept = keep.flatten()
    assert torch.equal(x0[:, kept], as_tokens(prediction)[:, kept])  # computed tokens untouched


def moving_square_video(frames: int = 9) -> list[Image.Image]:
    video = []
    for f in range(frames):
        array = np.full((64, 64, 3), 90, np.uint8)
        array[20:36, 4 + 4 * f : 20 + 4 * f] = (250, 30, 30)
        video.append(Image.fromarray(array))
    return video


def edit(pipe, **overrides):
    arguments = dict(prompt="a blue square", video=moving_square_video(), height=64, width=64, num_inference_steps=3,
                     strength=0.8, output_type="latent", max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    arguments.update(overrides)
    return pipe(**arguments).frames


@pytest.mark.parametrize("config", [vidprune.LipConfig(), vidprune.LipConfig(recovery=False),
                                    vidprune.LipConfig(kv_source="clean", duplicates=1)],
                         ids=["lip", "lip-noar", "lip-clean-kv"])
def test_edit_through_video_to_video_prunes_what_the_mask_says(clean, config):
    pipe = clean["v2v"]
    reference = edit(pipe)
    detection = vidprune.LipDetection(tau=0.05, median=False, smooth=False, cleanup=False, dilate=False, tau2=None)
    vidprune.apply(pipe, vidprune.LipConfig(detection=detection, recovery=config.recovery,
                                            kv_source=config.kv_source, duplicates=config.duplicates))
    with block_tokens(pipe.transformer) as seen:
        out = edit(pipe)
    seen = [tokens for _, tokens in seen]
    stats = vidprune.stats(pipe)
    kept = stats.forwards[0].spans[0].tokens
    assert 16 <= kept < 48 and all(f.spans[0].tokens == kept for f in stats.forwards)
    pruned_forwards = seen if config.kv_source == "current" else seen[len(pipe.transformer.blocks):]
    assert kept in pruned_forwards and set(pruned_forwards) <= {kept, 48}
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)


def test_all_kept_mask_is_bit_identical_and_remove_restores(clean):
    pipe = clean["v2v"]
    reference = edit(pipe)
    vidprune.apply(pipe, vidprune.LipConfig(mask=torch.ones(3, 4, 4, dtype=torch.bool)))
    assert torch.equal(edit(pipe), reference)
    vidprune.apply(pipe, vidprune.LipConfig(detection=vidprune.LipDetection(tau=0.0, tau2=None)))
    edit(pipe)
    vidprune.remove(pipe)
    assert torch.equal(edit(pipe), reference)


def test_mask_of_the_wrong_shape_is_a_clear_error(clean):
    pipe = clean["v2v"]
    vidprune.apply(pipe, vidprune.LipConfig(mask=torch.ones(3, 5, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match=r"mask of shape \(3, 5, 4\) does not fit this video.*\(3, 4, 4\)"):
        edit(pipe)
    with pytest.raises(ValueError, match="mask="):
        vidprune.LipConfig(mask=torch.ones(3, 4, 4))  # not bool
    first_frame_pruned = torch.ones(3, 4, 4, dtype=torch.bool)
    first_frame_pruned[0, 0, 0] = False
    vidprune.apply(pipe, vidprune.LipConfig(mask=first_frame_pruned))
    with pytest.raises(ValueError, match="frame 0"):
        edit(pipe)


def test_lip_needs_a_source_video(clean):
    with pytest.raises(ValueError, match="WanVideoToVideoPipeline"):
        vidprune.apply(clean["t2v"], vidprune.LipConfig())
    with pytest.raises(ValueError, match="mask="):
        vidprune.apply(tiny_transformer(), vidprune.LipConfig())
    model = tiny_transformer()
    vidprune.apply(model, vidprune.LipConfig(mask=example_mask(), kv_source="clean"))
    with pytest.raises(ValueError, match="kv_source='clean' needs the source video"):
        model(**static_video_inputs())


def test_given_source_latents_on_a_bare_transformer_with_clean_keys():
    model = tiny_transformer()
    inputs = static_video_inputs()
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.LipConfig(source_latents=inputs["hidden_states"], kv_source="clean"))
    out = model(**inputs)[0]
    record = vidprune.stats(model).forwards[-1]
    vidprune.remove(model)
    assert record.keep == pytest.approx(1 / 4)  # a still video: only frame 0 is computed
    assert torch.isfinite(out).all() and not torch.equal(out, reference)


def test_x0_restore_refuses_per_token_timesteps():
    """Wan2.2 TI2V gives its clean first frame timestep 0 and the rest the step's: restore="x0"
    would take every reference's clean estimate at the step's noise level, so it is refused
    before anything is computed; one timestep for all tokens, or restore="prediction", runs."""
    model = tiny_transformer()
    inputs = transformer_inputs(frames=3)
    tokens = 3 * (8 // 2) * (8 // 2)
    mask = torch.ones(3, 4, 4, dtype=torch.bool)
    mask[1:, :2] = False  # frames 1-2 prune half their tokens
    per_token = torch.full((1, tokens), 500.0)
    per_token[:, :16] = 0.0  # the first latent frame: clean
    vidprune.apply(model, vidprune.LipConfig(mask=mask))
    with pytest.raises(ValueError, match="restore='prediction'"):
        model(**{**inputs, "timestep": per_token})
    assert torch.isfinite(model(**{**inputs, "timestep": torch.full((1, tokens), 500.0)})[0]).all()
    vidprune.apply(model, vidprune.LipConfig(mask=mask, restore="prediction"))
    assert torch.isfinite(model(**{**inputs, "timestep": per_token})[0]).all()
    vidprune.remove(model)


def test_a_family_without_lip_is_refused_before_anything_changes(monkeypatch):
    """Every family has LIP today; an adapter that sets supports_lip=False (a new family whose LIP
    hooks are not written yet) gets a clear refusal instead of a NotImplementedError mid-call."""
    from vidprune.adapters.wan import WanAdapter

    monkeypatch.setattr(WanAdapter, "supports_lip", False)
    model = tiny_transformer()
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        vidprune.apply(model, vidprune.LipConfig(mask=torch.ones(3, 4, 4, dtype=torch.bool)))
    with pytest.raises(ValueError, match="not applied"):  # the refusal changed nothing
        vidprune.stats(model)
