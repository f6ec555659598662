"""TAPE's token cache and refreshing selection: what a pruned token gets, that every token is
recomputed within K pruned steps, per-branch and per-call state, and the presets."""

from __future__ import annotations

import pytest
import torch

import vidprune
from vidprune.refresh import SpanMemory, due_now, memory_estimate, refresh_scores, remember_span
from vidprune.tokens import TokenGrid
from vidprune.runtime import bind_arguments, pruner_of

from conftest import SMALL_SPANS, replay_matches_block, run, tiny_transformer, transformer_inputs

ONE_SPAN = dict(first_pruned_layer=1, reselect_every=0)  # one span over layers 1..5 of the tiny pipeline
GRID_SIZE = 48  # 9 frames at 64x64: 3 latent frames of 4 x 4 tokens


# -- pure functions ---------------------------------------------------------------------------
def test_refresh_scores_weigh_normalised_terms_and_force_due_tokens_first():
    grid, budget = TokenGrid(1, 1, 4), torch.tensor([1])
    attention = torch.tensor([[4.0, 2.0, 1.0, 1.0]])  # mean 2
    change = torch.tensor([[0.0, 0.0, 3.0, 1.0]])  # mean 1
    staleness = torch.tensor([[0, 1, 2, 0]])  # mean 0.75
    only_attention = refresh_scores(attention, change, staleness, (1.0, 0.0, 0.0), 0, grid, budget)
    torch.testing.assert_close(only_attention, attention / 2)
    mixed = refresh_scores(attention, change, staleness, (1.0, 2.0, 0.5), 0, grid, budget)
    torch.testing.assert_close(mixed, attention / 2 + 2 * change + 0.5 * staleness / 0.75)
    forced = refresh_scores(attention, change, staleness, (1.0, 0.0, 0.0), 3, grid, budget)  # staleness 2: due
    assert forced.argmax().item() == 2


def test_due_tokens_are_forced_ahead_of_their_last_chance_when_they_would_pile_up():
    """K = 3, two tokens a step: three tokens at staleness 1 all reach their last chance at the
    next step, where only two fit, so one of them is due now already; two such tokens are not."""
    grid, budget = TokenGrid(1, 1, 4), torch.tensor([2])
    due = due_now(torch.tensor([[1, 1, 1, 0]]), grid, budget, 3)
    assert due.sum() == 1 and not due[0, 3]
    assert not due_now(torch.tensor([[1, 1, 0, 0]]), grid, budget, 3).any()


def test_a_pruned_token_leaves_the_span_with_its_input_plus_its_remembered_update():
    memory = SpanMemory()
    first_input = torch.randn(1, 6, 4)
    first_output = first_input + torch.randn(1, 6, 4)
    assert torch.equal(remember_span(memory, first_input, None, first_output, "span", True), first_output)
    assert memory.staleness.tolist() == [[0] * 6]
    now = torch.randn(1, 6, 4)  # the next step's span input
    index = torch.tensor([[1, 4]])
    kept_output = torch.randn(1, 2, 4)
    output = remember_span(memory, now, index, kept_output, "span", True)
    pruned = [0, 2, 3, 5]
    torch.testing.assert_close(output[:, pruned], now[:, pruned] + (first_output - first_input)[:, pruned])
    assert torch.equal(output[:, [1, 4]], kept_output)
    assert memory.staleness.tolist() == [[1, 0, 1, 1, 0, 1]]
    assert torch.equal(memory.compared_input[:, [1, 4]], now[:, [1, 4]])
    assert torch.equal(memory.compared_input[:, pruned], first_input[:, pruned])
    assert torch.equal(remember_span(SpanMemory(), now, index, kept_output, "none", False)[:, pruned], now[:, pruned])


def test_memory_estimate_matches_what_the_spans_hold(clean):
    pipe = clean["t2v"]
    for cache in ("span", "block"):
        config = vidprune.TapeConfig(budget="even", keep=0.5, cache=cache, **SMALL_SPANS)  # spans 1-2, 3-4, 5
        vidprune.apply(pipe, config)
        run(pipe, "t2v")
        transformer = pipe.transformer
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        expected = memory_estimate(cache, True, spans=3, layers_in_spans=5, tokens=GRID_SIZE, dim=dim,
                                   element_bytes=4)
        assert vidprune.stats(pipe).memory_bytes == expected


# -- through the pipeline ---------------------------------------------------------------------
def span_ends(pipe):
    """(span input, span output) of the one span [1, 5] at every forward, read by torch hooks."""
    seen = []
    blocks = pipe.transformer.blocks
    handles = [
        blocks[1].register_forward_pre_hook(
            lambda m, a, kw: seen.append([bind_arguments(type(m).forward, a, kw)["hidden_states"]]), with_kwargs=True),
        blocks[5].register_forward_hook(lambda m, a, out: seen[-1].append(out)),
    ]
    return seen, handles


def test_through_the_pipeline_a_pruned_token_gets_its_update_from_its_last_computation(clean):
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.6, dense_first=0.34, record_selections=True, **ONE_SPAN))
    seen, handles = span_ends(pipe)
    run(pipe, "t2v")
    for handle in handles:
        handle.remove()
    stats = vidprune.stats(pipe)
    assert [f.keep for f in stats.forwards[::2]] == pytest.approx([1.0, 0.4, 0.4])
    # Step 0 (dense; its conditional forward is forward 0) computed every token. At step 1
    # (forward 2) a pruned token leaves the span with its span input plus its step-0 update.
    (in0, out0), (in2, out2) = seen[0], seen[2]
    computed = torch.zeros(GRID_SIZE, dtype=torch.bool)
    computed[stats.forwards[2].spans[0].index[0]] = True
    assert 0 < computed.sum() < GRID_SIZE
    pruned = ~computed
    torch.testing.assert_close(out2[:, pruned], in2[:, pruned] + (out0 - in0)[:, pruned])
    assert not torch.allclose(out2[:, computed], in2[:, computed] + (out0 - in0)[:, computed])


def test_every_token_is_recomputed_within_refresh_every_pruned_steps(clean):
    """With attention as the only soft term, top-k alone keeps some tokens out for good; the
    forced refresh brings every token back within K pruned steps."""
    pipe = clean["t2v"]
    k = 3
    gaps = {}
    for refresh_every in (k, 0):
        config = vidprune.TapeConfig(budget="even", keep=0.45, dense_first=0.1, change_weight=0.0, staleness_weight=0.0,
                                     refresh_every=refresh_every, schedule="constant", record_selections=True,
                                     **ONE_SPAN)
        vidprune.apply(pipe, config)
        run(pipe, "t2v", num_inference_steps=12)
        pruned = [f for f in vidprune.stats(pipe).forwards[::2] if f.keep < 1.0]
        assert len(pruned) == 11 and pruned[0].spans[0].tokens * k >= GRID_SIZE  # the budget allows K
        last_seen = {token: -1 for token in range(GRID_SIZE)}
        longest = 0
        for step, forward in enumerate(pruned):
            for token in forward.spans[0].index[0].tolist():
                last_seen[token] = step
            longest = max(longest, max(step - seen for seen in last_seen.values()))
        gaps[refresh_every] = longest
    assert gaps[k] < k, gaps  # never K pruned steps in a row uncomputed
    assert gaps[0] >= k, gaps  # without the forced refresh some token stays out longer


@pytest.mark.parametrize("cache", ["span", "block", "none"])
def test_keep_one_and_remove_are_bit_identical_through_every_cache(clean, cache):
    pipe = clean["t2v"]
    reference = run(pipe, "t2v")
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=1.0, cache=cache, **SMALL_SPANS))
    assert torch.equal(run(pipe, "t2v"), reference)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache=cache, dense_first=0.34, **SMALL_SPANS))
    pruned = run(pipe, "t2v")
    assert not torch.equal(pruned, reference) and torch.isfinite(pruned).all()
    assert torch.equal(run(pipe, "t2v"), pruned)  # two calls in a row: nothing carried between calls
    vidprune.remove(pipe)
    assert torch.equal(run(pipe, "t2v"), reference)
    assert all(not block._forward_hooks for b in pipe.transformer.blocks for block in (b.attn1, b.attn2, b.ffn))


def test_cfg_branches_keep_separate_memories_and_a_call_starts_empty(clean, monkeypatch):
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.34, **SMALL_SPANS))
    state = pipe._vidprune_state
    seen = {}
    reset = type(state).reset

    def watched_reset(self, pipeline=None):
        if self.memory:
            seen.update({key: memory.residual.clone() for key, memory in self.memory.items()})
        reset(self, pipeline)

    monkeypatch.setattr(type(state), "reset", watched_reset)
    run(pipe, "t2v")
    assert not state.memory  # dropped when the call ended
    spans = {key[1] for key in seen}
    assert spans == {1, 3, 5} and {key[2] for key in seen} == {0, 1}  # both branches, every span
    for span in spans:
        conditional, unconditional = (seen[key] for key in sorted(k for k in seen if k[1] == span))
        assert not torch.equal(conditional, unconditional)


def test_a_step_cache_skipping_the_first_call_makes_the_partner_select_afresh(clean, monkeypatch):
    """If the conditional call left nothing to share for a span (a cache skipped its blocks),
    the unconditional call selects itself: the same as not sharing at all."""
    pipe = clean["t2v"]
    config = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **SMALL_SPANS)
    vidprune.apply(pipe, config.with_(share_cfg_selection=False))
    separate = run(pipe, "t2v")
    vidprune.apply(pipe, config)
    shared = run(pipe, "t2v")
    state = pipe._vidprune_state
    plan_forward = type(pruner_of(pipe.transformer)).plan_forward

    def forget_shared(self, current):
        if state.last_selections is not None:
            state.last_selections[2].clear()
        plan_forward(self, current)

    monkeypatch.setattr(type(pruner_of(pipe.transformer)), "plan_forward", forget_shared)
    forgotten = run(pipe, "t2v")
    assert torch.equal(forgotten, separate) and not torch.equal(shared, separate)


def test_block_replay_is_the_block_on_its_own_branch_outputs():
    """The Wan adapter's replay_block gives what the block computes when its branches return
    what they returned: the formula the block cache relies on."""
    model = tiny_transformer(layers=1)
    assert replay_matches_block(model, model.blocks[0], transformer_inputs(frames=2, height=4, width=4))[0]


def test_presets_construct_what_they_say():
    paper = vidprune.TapeConfig.paper(0.4)
    assert (paper.keep, paper.cache, paper.schedule, paper.dense_first) == (0.4, "none", "cosine", 0.0)
    assert not paper.refreshes and not paper.needs_call and paper.attention_weight > 0
    naive = vidprune.TapeConfig.naive(0.4)
    assert (naive.temporal_sigma, naive.reselect_every, naive.schedule, naive.cache) == (0.0, 0, "constant", "none")
    assert vidprune.TapeConfig.random(0.4).importance == "random" and not vidprune.TapeConfig.random(0.4).refreshes
    default = vidprune.TapeConfig(0.4)
    assert default.cache == "span" and default.refreshes and default.dense_first == 0.2 and default.needs_call
    assert vidprune.TapeConfig.paper(0.4, cache="span").cache == "span"  # overrides win


def test_the_block_cache_is_refused_inside_lip():
    with pytest.raises(ValueError, match="cache"):
        vidprune.LipConfig(tape=vidprune.TapeConfig(budget="even", cache="block"))


def test_bare_transformer_paper_preset_runs():
    model = tiny_transformer()
    vidprune.apply(model, vidprune.TapeConfig.paper(0.5, first_pruned_layer=1))
    assert torch.isfinite(model(**transformer_inputs())[0]).all()
    vidprune.remove(model)
