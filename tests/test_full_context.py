"""TAPE's full context (TapeConfig(context="full")): kept queries attend over every token, the
pruned ones with keys and values from their replayed state or remembered keys."""

from __future__ import annotations

import pytest
import torch

import vidprune
from vidprune.adapters import adapter_for
from vidprune.context import FullContext, TokenRows, pruned_index, store_rows
from vidprune.refresh import SpanMemory, memory_estimate
from vidprune.runtime import OpenSpan, bind_arguments, pruner_of

from conftest import SMALL_SPANS, forward_after_dense, run, transformer_inputs

FULL = dict(budget="even", keep=0.5, dense_first=0.34, context="full", **SMALL_SPANS)  # spans 1-2, 3-4, 5
KEY_SOURCES = [dict(context_keys="replayed"), dict(context_keys="remembered"), dict(cache="block"),
               dict(context_keys="replayed", context_storage="float8")]


# -- pure helpers -------------------------------------------------------------------------------
def test_pruned_index_is_the_sorted_complement_per_row():
    index = torch.tensor([[0, 2, 5], [1, 2, 3]])
    assert pruned_index(index, 6).tolist() == [[1, 3, 4], [0, 4, 5]]
    assert pruned_index(torch.arange(4).view(1, -1), 4).shape == (1, 0)


def test_store_rows_writes_in_place_at_the_index_for_every_sample():
    stored = torch.zeros(2, 4, 3)
    store_rows(stored, torch.tensor([[1, 3]]), torch.ones(2, 2, 3))
    assert stored[:, [1, 3]].eq(1).all() and stored[:, [0, 2]].eq(0).all()


def test_float8_rows_keep_each_row_within_a_few_percent_and_store_in_place():
    rows = torch.randn(2, 6, 3, 4) * torch.tensor([1e-3, 1.0, 1e3]).repeat(2).view(1, 6, 1, 1)  # tokens of any size
    held = TokenRows(rows, float8=True)
    error = (held.gather(torch.arange(6).view(1, -1)) - rows).abs().flatten(2).amax(2)
    assert (error <= 0.04 * rows.abs().flatten(2).amax(2)).all()  # per token, whatever its scale
    held.store(torch.tensor([[1, 4]]), torch.ones(2, 2, 3, 4))
    assert torch.equal(held.gather(torch.tensor([[1, 4]])), torch.ones(2, 2, 3, 4))
    assert held.nbytes() == 2 * 6 * (12 + 4)


# -- the adapter's keys: as the block computes them ---------------------------------------------
def test_wan_context_key_value_equals_the_blocks_own_keys_and_values():
    from conftest import tiny_transformer

    model = tiny_transformer()
    block, captured = model.blocks[1], {}
    attn = block.attn1
    handles = [
        block.register_forward_pre_hook(
            lambda m, a, kw: captured.update(inputs=bind_arguments(type(m).forward, a, kw)), with_kwargs=True),
        attn.to_k.register_forward_hook(lambda m, a, out: captured.update(key=out)),
        attn.to_v.register_forward_hook(lambda m, a, out: captured.update(value=out)),
    ]
    with torch.no_grad():
        model(**transformer_inputs())
        for handle in handles:
            handle.remove()
        inputs = captured["inputs"]
        index = torch.tensor([[0, 3, 7, 40]])
        key, value = adapter_for(model).context_key_value(block, inputs, inputs["hidden_states"][:, index[0]], index)
        expected_key = attn.norm_k(captured["key"]).unflatten(2, (attn.heads, -1))[:, index[0]]
        expected_value = captured["value"].unflatten(2, (attn.heads, -1))[:, index[0]]
    torch.testing.assert_close(key, expected_key, rtol=0, atol=1e-6)
    torch.testing.assert_close(value, expected_value, rtol=0, atol=1e-6)


def test_replayed_states_move_by_each_blocks_remembered_residual():
    """A pruned token's state at a block is its span input plus the residuals, from when it was
    last computed, of the blocks before; the computed tokens' residuals are written over."""
    class Pruner:  # what FullContext reads of a TAPE pruner
        config = vidprune.TapeConfig(**FULL)

    pruner = Pruner()
    memory = SpanMemory(layer_residuals={1: TokenRows(torch.full((1, 4, 2), 10.0), float8=False)})
    pruner.memory = lambda start: memory
    span = OpenSpan(1, torch.arange(8.0).view(1, 4, 2), {}, torch.tensor([[0, 2]]))
    pruner.state = type("State", (), {"current": type("Current", (), {"span": span})})()
    context = FullContext(pruner)
    assert context.pruned().index.tolist() == [[1, 3]]
    kept_input = span.input[:, [0, 2]]
    context.after_block(1, kept_input, kept_input + 1.0, last=False)
    assert memory.layer_residuals[1].values[0, :, 0].tolist() == [1.0, 10.0, 1.0, 10.0]
    assert torch.equal(span.context.states, span.input[:, [1, 3]] + 10.0)
    context.after_block(2, kept_input, kept_input, last=True)  # the last block: the span residual covers it
    assert 2 not in memory.layer_residuals


# -- through the pipeline -----------------------------------------------------------------------
@pytest.mark.parametrize("source", KEY_SOURCES, ids=lambda s: "-".join(s.values()))
def test_with_exact_remembered_states_the_pruned_forward_equals_the_dense_one(clean, source):
    """With the memory filled from the same inputs every remembered state is exact, so with full
    context the pruned forward gives the dense output (1e-5, float32; float8 storage within its
    precision); with kept-only attention it does not."""
    pipe = clean["t2v"]
    generator = torch.Generator().manual_seed(0)
    inputs = transformer_inputs(frames=3, height=8, width=8)
    inputs["encoder_hidden_states"] = torch.randn(1, 7, pipe.transformer.config.text_dim, generator=generator)
    inputs["hidden_states"] = torch.randn(1, 16, 3, 8, 8, generator=generator)
    dense, full, records = forward_after_dense(pipe, vidprune.TapeConfig(**FULL, **source), inputs)
    assert [f.keep for f in records] == [1.0, 0.5]
    assert [s.tokens for s in records[1].spans] == [24, 24, 24]  # of 48
    _, kept, _ = forward_after_dense(pipe, vidprune.TapeConfig(**{**FULL, "context": "kept", **source}), inputs)
    tolerance = 2e-3 if source.get("context_storage") == "float8" else 1e-5  # float8: ~4e-4 here
    torch.testing.assert_close(full, dense, rtol=0, atol=tolerance)
    # the pruned tokens' keys matter: without them the error is ~0.1 here
    assert (kept - dense).abs().max() > 100 * max((full - dense).abs().max(), 1e-6)


@pytest.mark.parametrize("source", KEY_SOURCES, ids=lambda s: "-".join(s.values()))
def test_full_context_prunes_counts_every_key_and_keeps_what_the_estimate_says(clean, source):
    pipe = clean["t2v"]
    reference = run(pipe, "t2v", num_inference_steps=6)
    config = vidprune.TapeConfig(**FULL, **source)
    vidprune.apply(pipe, config)
    output = run(pipe, "t2v", num_inference_steps=6)
    stats = vidprune.stats(pipe)
    pruned = [f for f in stats.forwards if f.keep < 1.0]
    assert pruned and all(s.tokens == 12 and s.keys == 48 for f in pruned for s in f.spans)
    assert not torch.equal(output, reference)
    transformer = pipe.transformer
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    expected = memory_estimate(config.cache, True, spans=3, layers_in_spans=5, tokens=48, dim=dim, element_bytes=4,
                               context_keys=config.context_keys, context_float8=config.context_storage == "float8")
    assert stats.memory_bytes == expected
    vidprune.remove(pipe)
    assert torch.equal(run(pipe, "t2v", num_inference_steps=6), reference)


def test_full_context_is_closer_to_the_unpruned_video_than_kept_only(clean):
    pipe = clean["t2v"]
    reference = run(pipe, "t2v", num_inference_steps=6)
    errors = {}
    for context in ("kept", "full"):
        vidprune.apply(pipe, vidprune.TapeConfig(**{**FULL, "context": context}))
        errors[context] = (run(pipe, "t2v", num_inference_steps=6) - reference).pow(2).mean().item()
        vidprune.remove(pipe)
    assert errors["full"] < errors["kept"]


def test_keep_one_and_remove_are_bit_identical_with_full_context(clean):
    pipe = clean["t2v"]
    reference = run(pipe, "t2v")
    vidprune.apply(pipe, vidprune.TapeConfig(**{**FULL, "keep": 1.0}))
    assert torch.equal(run(pipe, "t2v"), reference)
    processors = [block.attn1.processor for block in pipe.transformer.blocks]
    vidprune.remove(pipe)
    assert torch.equal(run(pipe, "t2v"), reference)
    assert [type(block.attn1.processor) for block in pipe.transformer.blocks] != [type(p) for p in processors]


# -- what is refused ----------------------------------------------------------------------------
def test_config_refuses_full_context_where_it_cannot_apply():
    with pytest.raises(ValueError, match="context.*'kept' with a budget without token steps"):
        vidprune.TapeConfig(context="full")  # the default budget "cycle" has no token steps
    with pytest.raises(ValueError, match="cache.*'span' or 'block' with context='full'"):
        vidprune.TapeConfig(budget="even", context="full", cache="none")
    with pytest.raises(ValueError, match="context_keys.*'replayed', 'remembered'"):
        vidprune.TapeConfig(budget="even", context="full", context_keys="fresh")
    with pytest.raises(ValueError, match="context 'kept'"):
        vidprune.LipConfig(tape=vidprune.TapeConfig(budget="even", context="full"))


def test_with_budget_keeps_full_context_only_where_the_budget_has_token_steps():
    from vidprune.budget import BudgetProfile

    full = vidprune.TapeConfig(budget="even", context="full", refresh_every=3)
    assert full.with_budget([1.0, 0.5, 0.0, 0.5]).context == "full"
    steps_only = full.with_budget([1.0, 0.0, 1.0, 0.0])  # reuse and dense steps: full context has nothing to change
    assert steps_only.context == "kept" and steps_only.refresh_every == 3 and steps_only.keep == 0.5
    profile = BudgetProfile(keeps=(1.0, 0.4), cost=0.7, target_cost=0.7, context="full")
    assert full.with_budget(profile).context == "full" and full.with_budget("cycle").context == "kept"


def test_full_context_is_refused_with_cuda_graphs():
    from vidprune.tape import check_graphs

    with pytest.raises(ValueError, match="context='kept'"):
        check_graphs(vidprune.TapeConfig(budget="even", context="full"))


def test_a_call_without_room_is_refused_naming_a_setting_that_needs_less():
    from vidprune.tape import refuse_without_room

    refuse_without_room(vidprune.TapeConfig(**FULL), needed=2**30, free=2**31, tokens=48, device="cuda:0")
    expected = [({}, "context_storage='float8'"), (dict(context_storage="float8"), "context='kept'"),
                (dict(context_keys="remembered", context_storage="float8"), "context_keys='replayed'"),
                (dict(cache="block"), "cache='span'")]
    for fields, advice in expected:
        with pytest.raises(ValueError, match=f"needs about 2.0 GiB .* 1.0 GiB are free on cuda:0: use {advice}"):
            refuse_without_room(vidprune.TapeConfig(**FULL, **fields), needed=2**31, free=2**30, tokens=48,
                                device="cuda:0")


def test_full_context_is_refused_under_context_parallelism_before_the_forward_computes(clean):
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(**FULL))
    pruner = pruner_of(pipe.transformer)
    with pytest.raises(ValueError, match="context='full'.*context parallelism.*use context='kept'"):
        pruner.check_parallel(shard=None)  # what begin_forward asks of a forward split over ranks
    vidprune.remove(pipe)


def test_the_stats_table_shows_the_keys_a_full_context_span_attends_over(clean):
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(**FULL))
    run(pipe, "t2v", num_inference_steps=6)
    table = str(vidprune.stats(pipe))
    vidprune.remove(pipe)
    assert "1-2:12 3-4:12 5-5:12 of 48 (keys 48)" in table


@pytest.mark.parametrize("fields", [dict(context="full"), dict(context="full", context_keys="remembered"),
                                    dict(context="full", context_storage="float8"), {}],
                         ids=["replayed", "remembered", "float8", "kept"])
def test_the_room_check_needs_what_the_spans_hold_with_a_lead_span(clean, monkeypatch, fields):
    """With reuse steps the layers before the first pruned span form a lead span: one residual
    per branch, no history, no context rows (the GPU's room check must not count them)."""
    pipe = clean["t2v"]
    config = vidprune.TapeConfig(budget=(1.0, 1.0, 0.0, 0.5, 0.0, 0.5), first_pruned_layer=2, reselect_every=2,
                                 **fields)
    vidprune.apply(pipe, config)
    pruner, needed = pruner_of(pipe.transformer), []
    assert pruner.lead is not None and pruner.lead.end == 1
    monkeypatch.setattr(pruner, "check_memory_fits", lambda current: needed.append(pruner.memory_needed(current)))
    run(pipe, "t2v", num_inference_steps=6)
    assert needed == [vidprune.stats(pipe).memory_bytes]
    vidprune.remove(pipe)
