"""LIP combined with TAPE (LipConfig(tape=...)): TAPE prunes among the tokens LIP keeps."""

from __future__ import annotations

import pytest
import torch

import vidprune
from vidprune.adapters.wan import WanAdapter
from vidprune.interframe import reference_index
from vidprune.recovery import recovery_keys
from vidprune.runtime import bind_arguments
from vidprune.selection import select_among
from vidprune.tokens import TokenGrid

from conftest import SMALL_SPANS, block_tokens, tiny_transformer
from test_lip import GRID as LIP_GRID
from test_lip import edit, example_mask, static_video_inputs

GRID = TokenGrid(3, 2, 3)


def test_select_among_takes_each_frames_share_of_its_candidates():
    candidates = torch.tensor([1, 1, 1, 1, 1, 1,  # frame 0: all 6
                               1, 0, 1, 0, 1, 1,  # frame 1: 4
                               0, 0, 0, 0, 0, 0], dtype=torch.bool)  # frame 2: none
    scores = torch.arange(18, dtype=torch.float32).flip(0).unsqueeze(0)  # earlier tokens score higher
    scores[0, 1] = 100.0  # a non-candidate's score must not matter... (token 1 is a candidate)
    scores[0, 7] = 1000.0  # ...token 7 is not one
    index = select_among(scores, candidates, [6, 4, 0], GRID, keep=0.5)
    assert index.tolist() == [[0, 1, 2, 6, 8]]  # 3 of 6 in frame 0, 2 of 4 in frame 1, none in frame 2
    one = select_among(scores, candidates, [6, 4, 0], GRID, keep=0.01)  # at least one where a frame has candidates
    assert one.tolist() == [[1, 6]]


@pytest.mark.parametrize("seed", range(20))
def test_select_among_equals_a_frame_by_frame_top_k(seed):
    grid, generator = TokenGrid(5, 4, 6), torch.Generator().manual_seed(seed)
    candidates = torch.rand(grid.size, generator=generator) < 0.6
    scores = torch.randn(2, grid.size, generator=generator)
    keep = float(torch.rand(1, generator=generator)) * 0.99 + 0.01
    counts = candidates.view(grid.frames, -1).sum(dim=1).tolist()
    expected, summed = [], scores.sum(dim=0).view(grid.frames, -1)
    for frame, count in enumerate(counts):
        positions = candidates.view(grid.frames, -1)[frame].nonzero().flatten()
        best = positions[summed[frame, positions].argsort(descending=True)[: min(count, max(1, round(count * keep)))]]
        expected += (best + frame * grid.per_frame).tolist()
    assert select_among(scores, candidates, counts, grid, keep).tolist() == [sorted(expected)]


def test_select_among_sums_the_batch():
    candidates = torch.ones(18, dtype=torch.bool)
    scores = torch.zeros(2, 18)
    scores[0, 3], scores[1, 3], scores[1, 4] = 1.0, 1.0, 1.5  # summed: token 3 wins frame 0
    assert select_among(scores, candidates, [6, 6, 6], GRID, keep=1 / 6)[0, 0].item() == 3


def test_recovery_keys_inside_a_tape_span_follow_the_computed_tokens():
    # LIP keeps 0, 1, 2 (frame 0); 3 and 4 are pruned, referring to 0 and 1. TAPE computes 0 and 2.
    grid = TokenGrid(2, 1, 3)
    reference = torch.tensor([0, 1, 2, 0, 1, 5])
    computed = torch.tensor([1, 0, 1, 0, 0, 1], dtype=torch.bool)
    keys = recovery_keys(computed, reference, grid, None)
    # 1 is TAPE-pruned (not a key); 4 duplicates 1, which is not computed (not a key).
    assert keys.positions.tolist() == [0, 2, 3, 5]
    assert keys.slots.tolist() == [0, 1, 0, 2]  # slots in the computed sequence (0, 2, 5)
    assert keys.duplicate.tolist() == [False, False, True, False]
    lip_only = recovery_keys(reference == torch.arange(6), reference, grid, None)
    assert lip_only.positions.tolist() == [0, 1, 2, 3, 4, 5]


def mask() -> torch.Tensor:
    """Frame 0 kept, 6 and 10 tokens of the two later frames of the tiny edit's 3x4x4 grid."""
    keep = torch.zeros(3, 4, 4, dtype=torch.bool)
    keep[0] = True
    keep[1, :2, :3] = True
    keep[2, 1:, 1:] = True
    keep[2, 0, 0] = True
    return keep


def tokens_per_block(pipe, config) -> tuple[torch.Tensor, list[int], vidprune.PruneStats]:
    vidprune.apply(pipe, config)
    with block_tokens(pipe.transformer) as seen:
        out = edit(pipe)
    return out, [tokens for _, tokens in seen], vidprune.stats(pipe)


@pytest.mark.parametrize("recovery", [True, False], ids=["lip", "lip-noar"])
def test_tape_prunes_among_the_tokens_lip_keeps(clean, recovery):
    pipe = clean["v2v"]
    tape = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", record_selections=True, **SMALL_SPANS)
    out, seen, stats = tokens_per_block(pipe, vidprune.LipConfig(mask=mask(), recovery=recovery, tape=tape))
    layers = len(pipe.transformer.blocks)
    lip_kept = int(mask().sum())  # 16 + 6 + 10
    tape_kept = 8 + 3 + 5  # half of each frame's LIP-kept tokens
    assert seen == ([lip_kept] + [tape_kept] * (layers - 1)) * len(stats.forwards)  # every forward of the edit
    allowed = set(mask().flatten().nonzero().flatten().tolist())
    for forward in stats.forwards:
        assert [s.tokens for s in forward.spans] == [lip_kept, tape_kept, tape_kept, tape_kept]
        for span in forward.spans[1:]:
            assert set(span.index.flatten().tolist()) <= allowed
    assert stats.forwards[0].keep == pytest.approx(lip_kept / 48 * 0.5)
    assert torch.isfinite(out).all()


def test_tape_keeping_everything_equals_lip_alone(clean):
    pipe = clean["v2v"]
    vidprune.apply(pipe, vidprune.LipConfig(mask=mask()))
    lip_alone = edit(pipe)
    combined = vidprune.TapeConfig(budget="even", keep=1.0, **SMALL_SPANS)
    vidprune.apply(pipe, vidprune.LipConfig(mask=mask(), tape=combined))
    assert torch.equal(edit(pipe), lip_alone)
    vidprune.apply(pipe, vidprune.LipConfig(mask=mask(), tape=vidprune.TapeConfig.paper(0.5, **SMALL_SPANS)))
    assert not torch.equal(edit(pipe), lip_alone)


def test_tape_with_its_token_cache_runs_and_detaches_exactly(clean):
    pipe = clean["v2v"]
    reference = edit(pipe)
    tape = vidprune.TapeConfig(budget="even", keep=0.7, dense_first=0.5, **SMALL_SPANS)  # 2 steps: 1.0, 0.4
    out, seen, _ = tokens_per_block(pipe, vidprune.LipConfig(mask=mask(), tape=tape))
    assert torch.isfinite(out).all() and min(seen) < int(mask().sum())
    vidprune.remove(pipe)
    assert torch.equal(edit(pipe), reference)


def test_combination_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="kv_source"):
        vidprune.LipConfig(kv_source="clean", tape=vidprune.TapeConfig())
    with pytest.raises(ValueError, match="per_frame=True"):
        vidprune.LipConfig(tape=vidprune.TapeConfig(budget="even", per_frame=False))
    with pytest.raises(ValueError, match="TapeConfig"):
        vidprune.LipConfig(tape=0.5)


def test_recovery_inside_a_tape_span_equals_attention_over_its_key_set():
    """A static video through a one-block transformer, LIP then TAPE over the whole block: each
    token TAPE computes gets exactly what the unpatched block gives it when run on the span's
    key set (the computed tokens plus the LIP-pruned tokens whose references are computed),
    since here every pruned token truly equals its reference."""
    model = tiny_transformer(layers=1)
    with torch.no_grad():  # peaked attention, so that which keys and where they sit matter
        model.blocks[0].attn1.norm_q.weight *= 8
        model.blocks[0].attn1.norm_k.weight *= 8
    block, inputs, keep = model.blocks[0], static_video_inputs(), example_mask()
    captured = {}
    handle = block.register_forward_pre_hook(
        lambda m, args, kwargs: captured.update(inputs=bind_arguments(type(m).forward, args, kwargs)),
        with_kwargs=True)
    model(**inputs)  # unpatched: the block's full-length inputs
    handle.remove()

    tape = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", importance="random", first_pruned_layer=0,
                                     reselect_every=0, record_selections=True)
    vidprune.apply(model, vidprune.LipConfig(mask=keep, tape=tape))
    handle = block.register_forward_hook(lambda m, args, output: captured.update(output=output))
    model(**inputs)
    handle.remove()
    computed_index = vidprune.stats(model).forwards[-1].spans[0].index[0]
    vidprune.remove(model)

    computed = torch.zeros(LIP_GRID.size, dtype=torch.bool)
    computed[computed_index] = True
    assert 0 < computed.sum() < keep.sum()  # TAPE dropped some of LIP's tokens
    reference = reference_index(keep.unsqueeze(0))[0]
    key_set = recovery_keys(computed, reference, LIP_GRID, None).positions
    assert len(key_set) > computed.sum()  # duplicates take part
    gathered = WanAdapter().gather_block_inputs(captured["inputs"], key_set.unsqueeze(0))
    expected = block(**{**captured["inputs"], **gathered})[:, torch.searchsorted(key_set, computed_index)]
    torch.testing.assert_close(captured["output"][:, computed_index], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [True, False])
def test_the_cfg_partner_call_reuses_the_selection_and_its_recovery_keys(clean, monkeypatch, share):
    import vidprune.lip

    calls = []
    counted = vidprune.lip.recovery_keys
    monkeypatch.setattr(vidprune.lip, "recovery_keys", lambda *a: calls.append(1) or counted(*a))
    pipe = clean["v2v"]
    tape = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", share_cfg_selection=share, **SMALL_SPANS)
    _, _, stats = tokens_per_block(pipe, vidprune.LipConfig(mask=mask(), tape=tape))
    forwards = len(stats.forwards)  # two per step: CFG
    assert forwards == 4 and [f.shared_selection for f in stats.forwards] == [False, share] * 2
    assert len(calls) == 1 + 3 * (forwards // 2 if share else forwards)  # LIP's plan, then per TAPE span
