"""The pure parts of TAPE on constructed tensors: importance, smoothing, top-k, schedules,
configuration errors."""

from __future__ import annotations

import math

import pytest
import torch

import vidprune
from vidprune.importance import attention_received, sample_queries
from vidprune.budget import keep_at, plan_keeps
from vidprune.selection import (
    adjacent_frame_iou,
    gaussian_weights,
    select_global,
    select_per_frame,
    smooth_over_time,
)
from vidprune.tokens import TokenGrid, gather_tokens, scatter_tokens

from conftest import tiny_transformer


# -- importance -----------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_attention_received_with_all_queries_is_the_exact_column_mean(chunk_size):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 50, 8, generator=generator, dtype=torch.float64)
    key = torch.randn(2, 3, 50, 8, generator=generator, dtype=torch.float64)
    exact = torch.softmax(query @ key.transpose(-1, -2) / math.sqrt(8), dim=-1).mean(dim=2).mean(dim=1)
    estimate = attention_received(query, key, chunk_size=chunk_size)
    # float32 accumulation of float64 probabilities: agreement to 1e-6 relative.
    torch.testing.assert_close(estimate, exact.float(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(estimate.sum(dim=1), torch.ones(2), rtol=1e-6, atol=1e-6)


def test_attention_received_finds_the_attended_token():
    key = torch.zeros(1, 1, 10, 4)
    key[0, 0, 6] = 5.0
    query = torch.ones(1, 1, 3, 4)
    assert attention_received(query, key).argmax().item() == 6


def test_query_sample_covers_every_frame_and_is_deterministic():
    grid = TokenGrid(5, 6, 7)
    queries = sample_queries(grid, 20, seed=1, device=torch.device("cpu"))
    assert torch.equal(queries, sample_queries(grid, 20, seed=1, device=torch.device("cpu")))
    assert not torch.equal(queries, sample_queries(grid, 20, seed=2, device=torch.device("cpu")))
    per_frame = torch.bincount(queries // grid.per_frame, minlength=grid.frames)
    assert per_frame.tolist() == [4] * 5 and len(set(queries.tolist())) == 20


# -- smoothing and top-k --------------------------------------------------------------------
def test_smoothing_spreads_an_impulse_with_the_gaussian_weights():
    grid = TokenGrid(7, 1, 2)
    scores = torch.zeros(1, grid.size)
    scores[0, 3 * 2] = 1.0  # frame 3, position 0
    smoothed = smooth_over_time(scores, grid, sigma=1.0, radius=2).view(7, 2)
    weights = torch.tensor(gaussian_weights(1.0, 2))
    torch.testing.assert_close(smoothed[1:6, 0], weights)
    assert smoothed[:, 1].abs().max() == 0 and smoothed[0, 0] == 0  # other positions, out of reach


def test_smoothing_keeps_constants_and_replicates_edges():
    grid = TokenGrid(4, 2, 2)
    constant = torch.full((2, grid.size), 3.0)
    torch.testing.assert_close(smooth_over_time(constant, grid, 2.0, 3), constant)
    ramp = torch.arange(4.0).repeat_interleave(4).unsqueeze(0)  # frame f has score f
    smoothed = smooth_over_time(ramp, grid, 1.0, 1).view(4, 4)
    w = gaussian_weights(1.0, 1)
    assert smoothed[0, 0].item() == pytest.approx(w[0] * 0 + w[1] * 0 + w[2] * 1)  # edge frame replicated
    assert smooth_over_time(ramp, grid, 0.0, 2) is ramp


def test_per_frame_top_k_keeps_the_same_count_in_every_frame():
    grid = TokenGrid(3, 2, 3)
    scores = torch.tensor([[9, 1, 8, 2, 3, 0, 0, 1, 0, 0, 7, 0, 5, 6, 1, 2, 3, 4.0]])
    index = select_per_frame(scores, grid, keep=0.34)  # 2 of 6 per frame
    assert index.tolist() == [[0, 2, 7, 10, 12, 13]]
    assert select_global(scores, grid, keep=0.34).tolist() == [[0, 2, 10, 12, 13, 17]]


def test_gather_and_scatter_round_trip_with_shared_batch():
    x = torch.arange(2 * 5 * 3.0).view(2, 5, 3)
    index = torch.tensor([[0, 3], [1, 4]])
    kept = gather_tokens(x, index)
    assert kept[1, 1].tolist() == x[1, 4].tolist()
    table = torch.arange(5.0).view(1, 5, 1)  # batch-1 table shared by both samples
    assert gather_tokens(table, index).squeeze(-1).tolist() == [[0, 3], [1, 4]]
    restored = scatter_tokens(x, index, kept * 10)
    assert restored[0, 3].tolist() == (x[0, 3] * 10).tolist() and torch.equal(restored[0, 1], x[0, 1])


def test_adjacent_frame_iou_on_known_sets():
    grid = TokenGrid(2, 1, 4)
    assert adjacent_frame_iou(torch.tensor([[0, 1, 4, 5]]), grid) == 1.0
    assert adjacent_frame_iou(torch.tensor([[0, 1, 5, 6]]), grid) == pytest.approx(1 / 3)


def moving_object_scores(grid: TokenGrid, seed: int = 0) -> torch.Tensor:
    """Importance of a blob drifting one token per frame, plus per-frame noise (the jitter a
    per-frame selection reacts to)."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.arange(grid.height).view(-1, 1).float()
    w = torch.arange(grid.width).view(1, -1).float()
    frames = [torch.exp(-((h - 6) ** 2 + (w - 4 - f) ** 2) / 18) for f in range(grid.frames)]
    blob = torch.stack(frames).flatten()
    return (blob + 0.25 * torch.rand(grid.size, generator=generator)).unsqueeze(0)


def test_temporal_smoothing_lowers_selection_jitter():
    grid = TokenGrid(12, 12, 16)
    scores = moving_object_scores(grid)
    naive = adjacent_frame_iou(select_per_frame(scores, grid, 0.3), grid)
    smoothed = adjacent_frame_iou(select_per_frame(smooth_over_time(scores, grid, 1.0, 2), grid, 0.3), grid)
    assert smoothed > naive + 0.05


def test_tape_is_steadier_than_naive_inside_the_model():
    """Through the runtime on a transformer fed a video with a moving square: TAPE's kept sets
    jitter less across frames than naive per-frame pruning's."""
    model = tiny_transformer(layers=4)
    generator = torch.Generator().manual_seed(0)
    video = 0.3 * torch.randn(1, 4, 8, 16, 16, generator=generator)
    for f in range(8):
        video[:, :, f, 4:9, 2 + f : 7 + f] += 3.0
    inputs = dict(hidden_states=video, timestep=torch.tensor([600.0]),
                  encoder_hidden_states=torch.randn(1, 7, 16, generator=generator), return_dict=False)
    ious = {}
    for name, config in {"tape": vidprune.TapeConfig.paper(keep=0.3, schedule="constant", temporal_sigma=1.5,
                                                      reselect_every=0, first_pruned_layer=1,
                                                      record_selections=True),
                         "naive": vidprune.TapeConfig.naive(0.3, first_pruned_layer=1, record_selections=True)}.items():
        vidprune.apply(model, config)
        model(**inputs)
        ious[name] = vidprune.stats(model).selection_iou()
        vidprune.remove(model)
    assert ious["tape"] > ious["naive"] + 0.05, ious


def test_a_tiny_smoothing_sigma_keeps_each_frame_to_itself():
    """Found by the config fuzz: sigma 3e-215 overflowed the Gaussian's square."""
    from vidprune.selection import gaussian_weights

    assert gaussian_weights(3e-215, 2) == [0.0, 0.0, 1.0, 0.0, 0.0]


# -- schedules ------------------------------------------------------------------------------
SIGMAS = [1 - i / 19 for i in range(20)]
SHIFTED = [3 * s / (1 + 2 * s) for s in SIGMAS]  # Wan's shifted flow schedule: mostly high noise


@pytest.mark.parametrize("shape", ["constant", "linear", "cosine", "step"])
@pytest.mark.parametrize("sigmas", [SIGMAS, SHIFTED])
@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_plan_meets_the_mean_keep_and_relaxes_towards_the_end(shape, sigmas, keep):
    config = vidprune.TapeConfig.paper(keep=keep, schedule=shape, min_keep=0.1)
    plan = plan_keeps(config, sigmas)
    assert sum(plan) / len(plan) == pytest.approx(keep, abs=1e-6)
    assert all(0.1 <= k <= 1.0 for k in plan)
    assert plan == sorted(plan)  # sigma falls step by step, so keep never falls
    if shape != "constant":
        assert plan[-1] > plan[0]


def test_dense_first_and_last_steps():
    config = vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.1, dense_last=0.05)  # 2 and 1 of 20 steps
    plan = plan_keeps(config, SIGMAS)
    assert plan[:2] == [1.0, 1.0] and plan[2] < 1.0 and plan[-1] == 1.0 and plan[-2] < 1.0
    assert sum(plan) / 20 == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="cannot be met"):
        plan_keeps(vidprune.TapeConfig(budget="even", keep=0.2, dense_first=0.6, min_keep=0.15), SIGMAS[:5])


def test_the_default_runs_the_first_fifth_of_the_steps_unpruned_at_a_constant_budget():
    plan = plan_keeps(vidprune.TapeConfig(budget="even", keep=0.5), [1 - i / 25 for i in range(25)])
    assert plan[:5] == [1.0] * 5 and len(set(plan[5:])) == 1
    assert plan[5] == pytest.approx((0.5 * 25 - 5) / 20)


def test_keep_at_is_calibrated_on_uniform_noise_levels():
    config = vidprune.TapeConfig(budget="even", keep=0.5, schedule="linear")
    uniform = [keep_at(config, i / 100) for i in range(101)]
    assert sum(uniform) / 101 == pytest.approx(0.5, abs=1e-3)
    assert keep_at(config, 1.0) < keep_at(config, 0.0)
    assert keep_at(vidprune.TapeConfig(budget="even", keep=1.0), 0.9) == 1.0


# -- configuration errors -------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("keep", 0.0), ("keep", 1.5), ("keep", "half"), ("importance", "norm"), ("query_samples", 0),
        ("temporal_sigma", -1.0), ("temporal_radius", -1), ("per_frame", 1), ("first_pruned_layer", -2),
        ("reselect_every", 1.5), ("reselect_layers", []), ("reselect_layers", [4, 2]), ("schedule", "exp"),
        ("schedule_spread", 2.0), ("min_keep", 0.9), ("dense_first", -0.1), ("dense_last", 1.5),
        ("share_cfg_selection", "yes"), ("seed", -1), ("record_selections", None),
    ],
)
def test_invalid_config_names_the_field_and_what_is_accepted(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.* is not accepted: {field} must be"):
        vidprune.TapeConfig(**{field: value})


def test_span_layers_must_fit_the_model():
    model = tiny_transformer(layers=4)
    with pytest.raises(ValueError, match="first_pruned_layer=4"):
        vidprune.apply(model, vidprune.TapeConfig.paper(first_pruned_layer=4))
    with pytest.raises(ValueError, match="reselect_layers"):
        vidprune.apply(model, vidprune.TapeConfig.paper(reselect_layers=(1, 9)))
    assert vidprune.TapeConfig(reselect_layers=[1, 3]).span_starts(4) == [1, 3]
    assert vidprune.TapeConfig(first_pruned_layer=2, reselect_every=6).span_starts(30) == [2, 8, 14, 20, 26]


def test_unsupported_model_names_the_class_and_the_supported_ones():
    with pytest.raises(vidprune.UnsupportedModelError, match=r"Linear.*supported transformer classes: WanTransformer3DModel"):
        vidprune.apply(torch.nn.Linear(2, 2), vidprune.TapeConfig())
    with pytest.raises(TypeError, match="pipeline or transformer"):
        vidprune.apply("model", vidprune.TapeConfig())
    with pytest.raises(TypeError, match="TapeConfig"):
        vidprune.apply(tiny_transformer(), {"keep": 0.5})


@pytest.mark.parametrize("changes", [{}, dict(budget="even", cache="none", change_weight=0.0, staleness_weight=0.0,
                                                refresh_every=0),
                                     dict(budget="even", dense_first=0.0, cache="none", refresh_every=0, change_weight=0,
                                          staleness_weight=0.0, dense_last=0.1)])
def test_state_across_steps_needs_a_pipeline(changes):
    """The default, and any config carrying a cache, history or dense steps, is refused on a
    bare transformer, whose forwards belong to no call; the paper preset applies."""
    model = tiny_transformer()
    with pytest.raises(ValueError, match="bare transformer's forwards belong to no call"):
        vidprune.apply(model, vidprune.TapeConfig(**changes))
    assert vidprune.stats(vidprune.apply(model, vidprune.TapeConfig.paper())) is not None
    vidprune.remove(model)


def test_conditional_half_takes_the_second_half_of_every_batched_input():
    from vidprune.tape import conditional_half

    batch = torch.arange(4 * 3).view(4, 3).float()  # a batch of 4: two prompts x [uncond; cond]
    rope = (torch.randn(4, 5, 2), torch.randn(4, 5, 2))  # per-sample tables, as LTX's
    shared = torch.randn(5, 2)  # no batch dimension (CogVideoX's RoPE tables): left as it is
    half = conditional_half({"hidden_states": batch, "rotary_emb": rope, "table": shared, "n": 3}, batch=4)
    assert torch.equal(half["hidden_states"], batch[2:])
    assert all(torch.equal(h, r[2:]) for h, r in zip(half["rotary_emb"], rope))
    assert half["table"] is shared and half["n"] == 3
