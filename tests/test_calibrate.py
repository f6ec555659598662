"""`vidprune calibrate`: the search's parts on constructed errors, and a calibration of a tiny
pipeline whose profiles meet their costs and beat the even rule on the calibration prompts."""

from __future__ import annotations

import pytest
import torch

import vidprune
from vidprune.budget import BudgetProfile, plan_keeps
from vidprune.calibrate import Search, allocate, calibrate, neighbours, pipeline_search

from vidprune.runtime import pruner_of

from conftest import SMALL_SPANS, pipeline_inputs



def cost(keep: float) -> float:
    """A forward's cost: the layers outside the spans (0.1) and the span layers at `keep`."""
    return 0.1 + 0.9 * keep


def test_allocation_takes_the_least_sensitive_steps_within_the_cost():
    # steps 1..4; reuse is cheap where sensitivity is low (steps 2 and 4)
    sensitivity = {(1, 0.0): 9.0, (2, 0.0): 1.0, (3, 0.0): 5.0, (4, 0.0): 2.0,
                   (1, 0.5): 3.0, (2, 0.5): 0.5, (3, 0.5): 2.0, (4, 0.5): 1.0}
    keeps = allocate(5, (0.0, 0.5), sensitivity, cost, target=(3 + 2 * 0.1) / 5)
    assert keeps == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert allocate(5, (0.0, 0.5), sensitivity, cost, target=0.2) is None  # below the dense first step


def test_neighbours_stay_within_the_cost_and_keep_the_first_step_dense():
    sensitivity = {(s, level): float(s) for s in range(1, 4) for level in (0.0, 0.5)}
    keeps = [1.0, 1.0, 0.0, 0.5]
    target = sum(cost(k) for k in keeps) / 4
    moved = neighbours(keeps, (0.0, 0.5), sensitivity, cost, target)
    assert moved and all(m[0] == 1.0 for m in moved)
    assert all(sum(cost(k) for k in m) / 4 <= target + 1e-9 for m in moved)


def test_calibrate_measures_and_keeps_what_measures_best():
    """With a measured error that penalises adjacent reuse steps (not additive), the profile
    is no worse than any start it measured."""
    def error(keeps):
        reuse = [k == 0.0 for k in keeps]
        return sum(reuse) + 3 * sum(a and b for a, b in zip(reuse, reuse[1:])) + 0.5 * sum(0 < k < 1 for k in keeps)

    search = Search(8, error, cost)
    sigmas = [1 - i / 8 for i in range(8)]
    profiles = calibrate(search, vidprune.TapeConfig(), sigmas, targets=(0.6,), moves=4)
    profile = profiles[0]
    assert profile.cost <= 0.6 and profile.keeps[0] == 1.0
    assert profile.calibration["error"] == error(list(profile.keeps))
    assert profile.calibration["error"] <= min(profile.calibration["start_errors"].values())


def test_bad_targets_and_levels_are_refused():
    search = Search(4, lambda keeps: 0.0, cost)
    with pytest.raises(ValueError, match="targets must be costs in"):
        calibrate(search, vidprune.TapeConfig(), [1, 0.7, 0.4, 0.1], targets=(1.5,))
    with pytest.raises(ValueError, match=r"levels must be keeps in \[0, 1\)"):
        calibrate(search, vidprune.TapeConfig(), [1, 0.7, 0.4, 0.1], levels=(1.0,))


def test_calibrating_a_tiny_pipeline_meets_the_costs_and_beats_the_even_rule(clean, tmp_path):
    pipe = clean["t2v"]
    steps = 6

    def call():
        return pipe(**pipeline_inputs("t2v", num_inference_steps=steps)).frames

    config = vidprune.TapeConfig(**SMALL_SPANS)
    search, sigmas = pipeline_search(pipe, call, steps, config)
    assert pruner_of(pipe.transformer) is None  # the pipeline is left unpatched
    profiles = calibrate(search, config, sigmas, targets=(0.7, 0.5), moves=2, family="WanTransformer3DModel")
    for profile in profiles:
        assert profile.cost <= profile.target_cost + 1e-9 and profile.steps == steps
        errors = profile.calibration["start_errors"]
        assert profile.calibration["error"] <= errors.get("even", float("inf"))
        # the stated error is the one a call with the saved profile gives
        path = tmp_path / f"p{profile.target_cost}.json"
        profile.save(path)
        assert search.error(list(BudgetProfile.load(path).keeps)) == pytest.approx(profile.calibration["error"])
    vidprune.remove(pipe)


def test_neighbours_of_keeps_below_every_level_measure_them_as_the_cheapest_level():
    """The even rule's token keeps can fall below a tokens-only search's cheapest level."""
    sensitivity = {(s, level): float(s) * (1 - level) for s in range(1, 4) for level in (0.5, 0.25)}
    keeps = [1.0, 0.125, 0.125, 0.5]
    moved = neighbours(keeps, (0.5, 0.25), sensitivity, cost, sum(cost(k) for k in keeps) / 4)
    assert all(m[0] == 1.0 for m in moved)


def test_a_full_context_search_costs_every_key_records_its_context_and_refuses_a_mismatch(clean, tmp_path):
    pipe = clean["t2v"]
    steps = 4

    def call():
        return pipe(**pipeline_inputs("t2v", num_inference_steps=steps)).frames

    costs = {}
    for context in ("kept", "full"):
        config = vidprune.TapeConfig(budget="even", context=context, **SMALL_SPANS)
        search, sigmas = pipeline_search(pipe, call, steps, config)
        costs[context] = search.cost(0.5)
        if context == "full":
            profiles = calibrate(search, config, sigmas, targets=(0.7,), levels=(0.5,), moves=1)
    assert costs["kept"] < costs["full"] < 1.0  # a token step's queries see every key: dearer, still cheaper than dense
    found = profiles[0]  # a profile without token steps (the cycle rule can win) runs with any context: "kept"
    assert found.context == ("full" if any(0.0 < keep < 1.0 for keep in found.keeps) else "kept")
    profile = BudgetProfile(keeps=(1.0, 0.5, 0.0, 0.5), context="full")
    path = tmp_path / "full.json"
    profile.save(path)
    assert BudgetProfile.load(path).context == "full"
    vidprune.TapeConfig(budget=str(path), context="full")
    with pytest.raises(ValueError, match="'full', the context this budget profile's token steps were calibrated with"):
        vidprune.TapeConfig(budget=str(path))
