"""TAPE's budget over steps and tokens: reuse steps (keep 0), the budget rules, per-step lists
and profiles, and a budget's stated cost."""

from __future__ import annotations

import json
import re

import pytest
import torch

import vidprune
from vidprune.budget import BudgetProfile, forward_cost, plan_keeps
from vidprune.runtime import bind_arguments, pruner_of

from conftest import SMALL_SPANS, block_tokens, run

SIGMAS_6 = [1 - i / 6 for i in range(6)]


# -- rules -------------------------------------------------------------------------------------
def test_cycle_spaces_dense_steps_among_reuse_steps_after_the_dense_start():
    keeps = plan_keeps(vidprune.TapeConfig(keep=0.5), [1 - i / 25 for i in range(25)])  # the default rule: cycle
    assert keeps[:5] == [1.0] * 5 and set(keeps) == {0.0, 1.0}
    assert sum(keeps) / 25 >= 0.5 and sum(keeps) / 25 < 0.5 + 1 / 25  # whole steps, never cheaper than asked
    rest = keeps[5:]
    assert rest[0] == 0.0 and rest[-1] == 1.0  # reuse first, as a step cache skips; the last step dense
    assert max(len(run_) for run_ in "".join("r" if k == 0 else "d" for k in rest).split("d")) <= 2


def test_a_two_step_call_at_keep_half_runs_with_a_reuse_step():
    assert plan_keeps(vidprune.TapeConfig(keep=0.5, budget="cycle"), [1.0, 0.5]) == [1.0, 0.0]


def test_a_per_step_list_is_the_budget_and_its_mean_the_keep():
    config = vidprune.TapeConfig(budget=[1, 0, 1, 0.5, 0, 1])
    assert config.keep == pytest.approx(3.5 / 6) and config.reuses
    assert plan_keeps(config, SIGMAS_6) == [1.0, 0.0, 1.0, 0.5, 0.0, 1.0]
    with pytest.raises(ValueError, match="made for|list of keeps is for 6 steps and the call runs 5"):
        plan_keeps(config, SIGMAS_6[:5])


@pytest.mark.parametrize("budget, match", [
    ("weekly", "budget must be one of 'even', 'cycle'"),
    ([1.0, 1.5], r"each a number in \[0, 1\]"),
    ([], "non-empty"),
    ([0.5, 1.0], "first step is 1.0"),
    ([1.0, True], r"each a number in \[0, 1\]"),
])
def test_bad_budgets_are_refused_naming_what_is_accepted(budget, match):
    with pytest.raises(ValueError, match=match):
        vidprune.TapeConfig(budget=budget)


def test_reuse_steps_need_the_span_cache():
    with pytest.raises(ValueError, match="cache='none' is not accepted.*'span'"):
        vidprune.TapeConfig(budget=[1.0, 0.0], cache="none")
    with pytest.raises(ValueError, match="without reuse steps"):
        vidprune.LipConfig(tape=vidprune.TapeConfig(budget="cycle"))


def test_a_profile_round_trips_through_its_file_and_is_tied_to_its_step_count(tmp_path):
    profile = BudgetProfile(keeps=(1.0, 1.0, 0.0, 0.5, 0.0, 1.0), family="wan", model="demo", scheduler="UniPC",
                            guidance_scale=5.0, cost=0.61, target_cost=0.62, calibration={"prompts": 4})
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = BudgetProfile.load(path)
    assert loaded == profile and loaded.calibration == {"prompts": 4}
    assert json.loads(path.read_text())["steps"] == 6
    config = vidprune.TapeConfig(budget=str(path))
    assert config.budget == profile and config.keep == pytest.approx(3.5 / 6)
    assert plan_keeps(config, SIGMAS_6) == list(profile.keeps)
    with pytest.raises(ValueError, match="made for 6 steps and the call runs 8.*vidprune calibrate .*--steps 8"):
        plan_keeps(config, [1 - i / 8 for i in range(8)])
    (tmp_path / "other.json").write_text('{"keeps": [1, 0]}')
    with pytest.raises(ValueError, match="is not a vidprune budget profile"):
        vidprune.TapeConfig(budget=str(tmp_path / "other.json"))
    with pytest.raises(ValueError, match="could not be read"):
        vidprune.TapeConfig(budget=str(tmp_path / "missing.json"))


# -- reuse steps in the runtime ------------------------------------------------------------------
def test_a_reuse_step_runs_no_block_and_gives_every_token_its_input_plus_its_residual(clean):
    """Steps: dense, reuse, dense. On the reuse step each span's output is its input plus the
    residual it had at the dense step (checked by hooks on the span's first and last blocks), and
    no block runs: the layers before the first pruned span form a span of their own."""
    pipe = clean["t2v"]
    transformer = pipe.transformer
    vidprune.apply(pipe, vidprune.TapeConfig(budget=[1.0, 0.0, 0.5], **SMALL_SPANS))
    spans = pruner_of(transformer).spans
    assert (spans[0].start, spans[0].end) == (0, SMALL_SPANS["first_pruned_layer"] - 1)
    inputs, outputs = [], []  # per forward and span: the span's input and output
    handles = []
    for span in spans:
        first, last = transformer.blocks[span.start], transformer.blocks[span.end]
        handles.append(first.register_forward_pre_hook(
            lambda m, a, kw: inputs.append(bind_arguments(type(m).forward, a, kw)["hidden_states"]), with_kwargs=True))
        handles.append(last.register_forward_hook(lambda m, a, out: outputs.append(out)))
    try:
        with block_tokens(transformer) as seen:
            run(pipe, "t2v", num_inference_steps=3)
    finally:
        for handle in handles:
            handle.remove()
    forwards_per_step = 2  # CFG: conditional and unconditional calls
    layers = len(transformer.blocks)
    assert len(seen) == layers * forwards_per_step * 2  # the dense and token steps' blocks; none on the reuse step
    per_forward = len(spans)
    for branch in range(forwards_per_step):
        dense, reuse = branch * per_forward, (forwards_per_step + branch) * per_forward
        for s in range(per_forward):
            residual = outputs[dense + s] - inputs[dense + s]
            torch.testing.assert_close(outputs[reuse + s], inputs[reuse + s] + residual)
    records = vidprune.stats(pipe).forwards
    assert [r.keep for r in records] == [1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    assert all(s.reused and s.tokens == 0 for r in records[2:4] for s in r.spans)
    assert records[2].flops_saved == 1.0


def test_dense_and_reuse_steps_alone_run_one_span_and_keep_one_residual_per_branch(clean):
    """No token steps: one span over the stack, and no selection history (it would never be read)."""
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(keep=0.5, **SMALL_SPANS))  # the cycle rule
    assert [(s.start, s.end) for s in pruner_of(pipe.transformer).spans] == [(0, len(pipe.transformer.blocks) - 1)]
    run(pipe, "t2v", num_inference_steps=4)
    stats = vidprune.stats(pipe)
    grid = stats.forwards[0].spans[0].grid
    dim = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    assert stats.memory_bytes == 2 * grid.size * dim * 4  # two CFG branches, one float32 residual each


def test_without_reuse_steps_there_is_no_leading_span(clean):
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(budget=[1.0, 0.5, 1.0], **SMALL_SPANS))
    assert pruner_of(pipe.transformer).spans[0].start == SMALL_SPANS["first_pruned_layer"]


def test_keep_one_and_remove_are_exact_through_every_budget_kind(clean, tmp_path):
    pipe = clean["t2v"]
    reference = run(pipe, "t2v", num_inference_steps=4)
    path = tmp_path / "dense.json"
    BudgetProfile(keeps=(1.0,) * 4).save(path)
    for budget in ("even", "cycle", [1.0] * 4, str(path)):  # (keep=1.0 with the rules)
        vidprune.apply(pipe, vidprune.TapeConfig(keep=1.0, budget=budget) if isinstance(budget, str) and budget in
                       ("even", "cycle") else vidprune.TapeConfig(budget=budget))
        assert torch.equal(run(pipe, "t2v", num_inference_steps=4), reference), budget
    vidprune.apply(pipe, vidprune.TapeConfig(keep=0.5, budget="cycle", **SMALL_SPANS))
    assert not torch.equal(run(pipe, "t2v", num_inference_steps=4), reference)
    vidprune.remove(pipe)
    assert torch.equal(run(pipe, "t2v", num_inference_steps=4), reference)


def test_a_cycle_call_reuses_on_both_guidance_branches_alike(clean):
    pipe = clean["t2v"]
    vidprune.apply(pipe, vidprune.TapeConfig(keep=0.5, budget="cycle", dense_first=0.0, **SMALL_SPANS))
    run(pipe, "t2v", num_inference_steps=4)
    records = vidprune.stats(pipe).forwards
    keeps = [r.keep for r in records]
    assert keeps == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0] or keeps == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert vidprune.stats(pipe).mean_keep == 0.5


def test_a_budgets_stated_cost_equals_the_computed_one(clean):
    """forward_cost of each step, averaged, equals the block FLOPs the runtime counted."""
    pipe = clean["t2v"]
    keeps = [1.0, 0.0, 0.5, 1.0, 0.25]
    vidprune.apply(pipe, vidprune.TapeConfig(budget=keeps, **SMALL_SPANS))
    run(pipe, "t2v", num_inference_steps=5)
    stats = vidprune.stats(pipe)
    pruner = pruner_of(pipe.transformer)
    adapter, transformer = pruner.adapter, pipe.transformer
    grid = stats.forwards[0].spans[0].grid
    from vidprune.selection import kept_per_frame

    context = stats.forwards[0].context_tokens
    stated = sum(forward_cost(k, lambda keep: kept_per_frame(grid, keep) * grid.frames, grid.size,
                              len(transformer.blocks), sum(s.end - s.start + 1 for s in pruner.spans if s != pruner.lead),
                              lambda tokens: adapter.block_flops(transformer, tokens, context)) for k in keeps) / len(keeps)
    assert stated == pytest.approx(1 - stats.flops_saved, rel=1e-9)


# -- one rule for budgets a call cannot meet: met or refused, and the advice works -----------------
def _advice_keep(message: str) -> float:
    return float(re.search(r"--keep ([0-9.]+)", message).group(1))


@pytest.mark.parametrize("config, steps, match", [
    (vidprune.TapeConfig(keep=0.5, budget="even", dense_first=1.0), 3, "make all 3 steps of the call dense: lower them"),
    (vidprune.TapeConfig(keep=0.5, budget="even", dense_first=0.5, dense_last=0.5), 3, "make all 3 steps"),
    (vidprune.TapeConfig(keep=0.5, budget="even", dense_first=0.67), 3, "cannot be met by token steps"),
    (vidprune.TapeConfig(keep=0.5, budget="even"), 2, "cannot be met by token steps: 1 of the call's 2 steps"),
    (vidprune.TapeConfig(keep=0.3, budget="even"), 3, "cannot be met by token steps"),
    (vidprune.TapeConfig(keep=0.5), 1, "cannot be met in a 1-step call"),
    (vidprune.TapeConfig(keep=0.9, budget="cycle"), 3, "leaves no reuse step"),
])
def test_a_budget_the_call_cannot_meet_is_refused_and_following_the_advice_runs(clean, config, steps, match):
    """API: the call is refused before any step runs (the patched pipeline is left as it was);
    then the configuration the message advises runs, and its stats show the planned keep."""
    pipe = clean["t2v"]
    vidprune.apply(pipe, config.with_(**SMALL_SPANS))
    with block_tokens(pipe.transformer) as seen, pytest.raises(ValueError, match=match) as refused:
        run(pipe, "t2v", num_inference_steps=steps)
    assert seen == []  # no block ran
    message = str(refused.value)
    if "--keep" in message:
        advised = [config.with_(keep=_advice_keep(message)), config.with_(budget="cycle")]
    elif "lower them" in message:
        advised = [config.with_(dense_first=0.0, dense_last=0.0)]
    elif "1-step call" in message:
        advised = [vidprune.TapeConfig.paper(config.keep)]
    else:  # the cycle's advice: a lower keep
        advised = [config.with_(keep=float(re.search(r"at most ([0-9.]+)", message).group(1)))]
    for advice in advised:
        vidprune.apply(pipe, advice.with_(**SMALL_SPANS))
        run(pipe, "t2v", num_inference_steps=steps)
        stats = vidprune.stats(pipe)
        assert stats.mean_keep < 1.0 and stats.mean_keep >= advice.keep - 1e-9
        assert stats.mean_keep < advice.keep + 1 / steps


def test_the_cli_checks_the_same_rule_before_loading_and_takes_its_advice():
    from vidprune.cli_arguments import check_budget

    with pytest.raises(ValueError, match="--budget cycle") as refused:
        check_budget(vidprune.TapeConfig(keep=0.5, budget="even"), 2)
    assert check_budget(vidprune.TapeConfig(keep=0.5, budget="cycle"), 2) == [1.0, 0.0]
    assert sum(check_budget(vidprune.TapeConfig(keep=_advice_keep(str(refused.value)), budget="even"), 2)) / 2 >= 0.5
