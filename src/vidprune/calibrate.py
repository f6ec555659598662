"""`vidprune calibrate`: find, for one pipeline and step count, the per-step budget that keeps
the final latents closest to the unpruned call's at each of several costs.

A search over every per-step budget (Astraea's evolutionary search: tens of GPU-hours on a real
model) is not needed to do well. Here:
1. sensitivity: each step alone is made cheaper (a token step at each keep level, or a reuse
   step) with every other step dense, and the error of the final latents is measured: one call
   per step and level;
2. allocation: for each target cost, the per-step levels that minimise the summed sensitivity
   within the cost, by dynamic programming (a multiple-choice knapsack over whole steps);
3. a short local search from the best of that allocation and the "even" and "cycle" rules at the
   same cost, measured for real: moves that make one step cheaper and another dearer (most
   promising first by sensitivity), kept when the measured error falls.
Errors are not additive (a reuse step after a reuse step costs more than alone), which is why
step 3 measures; steps 1-2 only decide where it starts and which moves it tries.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .budget import BudgetProfile, forward_cost, plan_keeps
from .config import TapeConfig

DEFAULT_TARGETS = (0.7, 0.5, 0.35)
DEFAULT_LEVELS = (0.0, 0.5)  # cheaper choices of a step besides dense: a reuse step, a token step at 0.5
_COST_UNITS = 1000  # the knapsack counts cost in thousandths of a dense step


@dataclass
class Search:
    """What the search needs of a pipeline: `error(keeps)` runs the calibration prompts with that
    per-step budget and returns the error of their final latents against the unpruned call;
    `cost(keep)` is one step's share of a dense step's block FLOPs."""

    steps: int
    error: Callable[[list[float]], float]
    cost: Callable[[float], float]
    progress: Callable[[str], None] = lambda message: None
    calls: int = 0

    def measure(self, keeps: list[float]) -> float:
        self.calls += 1
        return self.error(keeps)

    def mean_cost(self, keeps: Sequence[float]) -> float:
        return sum(self.cost(k) for k in keeps) / len(keeps)


def sensitivities(search: Search, levels: Sequence[float]) -> dict[tuple[int, float], float]:
    """(step, level) -> the error when only that step runs at that level (the first step is
    always dense: it fills the cache)."""
    found = {}
    total = (search.steps - 1) * len(levels)
    for step in range(1, search.steps):
        for level in levels:
            keeps = [1.0] * search.steps
            keeps[step] = level
            found[(step, level)] = search.measure(keeps)
            search.progress(f"sensitivity {len(found)}/{total}")
    return found


def allocate(steps: int, levels: Sequence[float], sensitivity: dict[tuple[int, float], float],
             cost: Callable[[float], float], target: float) -> list[float] | None:
    """Per-step keeps whose mean cost is at most `target` and whose summed sensitivity is least
    (dense steps count 0); None when even the cheapest choice of every step costs more."""
    choices = [[(1.0, 0.0)]] + [[(1.0, 0.0)] + [(level, sensitivity[(step, level)]) for level in levels]
                                for step in range(1, steps)]
    units = lambda keep: math.ceil(cost(keep) * _COST_UNITS - 1e-6)  # noqa: E731  (never under-count)
    capacity = math.floor(target * steps * _COST_UNITS + 1e-6)
    best = {0: (0.0, [])}  # units spent -> (least error, keeps)
    for step_choices in choices:
        nxt: dict[int, tuple[float, list[float]]] = {}
        for spent, (error, keeps) in best.items():
            for keep, step_error in step_choices:
                total = spent + units(keep)
                if total <= capacity and (total not in nxt or error + step_error < nxt[total][0]):
                    nxt[total] = (error + step_error, keeps + [keep])
        best = nxt
    return min(best.values(), key=lambda entry: entry[0])[1] if best else None


def rule_at_cost(config: TapeConfig, rule: str, sigmas: Sequence[float], search: Search,
                 target: float) -> list[float] | None:
    """The keeps of a budget rule at the largest mean keep whose cost is at most `target`."""
    def keeps_at(keep: float) -> list[float] | None:
        try:
            # (the plan does not depend on the context; a rule without token steps takes "kept")
            rule_config = config.with_(budget=rule, keep=keep, min_keep=min(config.min_keep, keep), context="kept")
            return plan_keeps(rule_config, sigmas)
        except ValueError:  # a keep the rule cannot meet with this many steps
            return None

    low, high, found = 0.01, 1.0, None
    for _ in range(30):
        middle = (low + high) / 2
        keeps = keeps_at(middle)
        if keeps is not None and search.mean_cost(keeps) <= target:
            low, found = middle, keeps
        else:
            high = middle
    return found


def neighbours(keeps: list[float], levels: Sequence[float], sensitivity: dict[tuple[int, float], float],
               cost: Callable[[float], float], target: float) -> list[list[float]]:
    """Budgets one move away within the cost: one step to the next cheaper level and, where the
    cost allows, another to the next dearer one (a keep between levels, as the even rule
    makes, moves to the level beside it); the most promising first (least sensitivity added,
    most removed; between levels it is interpolated)."""
    ladder = sorted({1.0, *levels})  # cheapest first, dense last

    def error(step: int, keep: float) -> float:
        if keep >= 1.0:
            return 0.0
        if keep <= ladder[0]:  # at or below the cheapest level: as that level (no measurement below it)
            return sensitivity[(step, ladder[0])]
        above = min(level for level in ladder if level >= keep)
        below = max(level for level in ladder if level <= keep)
        at = lambda level: 0.0 if level == 1.0 else sensitivity[(step, level)]  # noqa: E731
        share = 0.0 if above == below else (keep - below) / (above - below)
        return at(below) + share * (at(above) - at(below))

    moves = []
    for down in range(1, len(keeps)):
        cheaper = max((level for level in ladder if level < keeps[down]), default=None)
        if cheaper is None:
            continue
        for up in range(1, len(keeps)):
            dearer = min((level for level in ladder if level > keeps[up]), default=None)
            if up == down or dearer is None:
                continue
            moved = list(keeps)
            moved[down], moved[up] = cheaper, dearer
            if sum(cost(k) for k in moved) / len(moved) > target + 1e-9:
                continue
            gain = (error(down, keeps[down]) - error(down, cheaper)) + (error(up, keeps[up]) - error(up, dearer))
            moves.append((-gain, moved))
    return [moved for _, moved in sorted(moves, key=lambda move: move[0])]


def search_budget(search: Search, config: TapeConfig, sigmas: Sequence[float], target: float, levels: Sequence[float],
                  sensitivity: dict[tuple[int, float], float], moves: int) -> tuple[list[float], float, dict[str, float]]:
    """The best budget found at `target` cost, its measured error, and the measured errors of
    the candidates it started from (allocation, even, cycle)."""
    starts = {"allocation": allocate(search.steps, levels, sensitivity, search.cost, target),
              "even": rule_at_cost(config, "even", sigmas, search, target),
              "cycle": rule_at_cost(config, "cycle", sigmas, search, target)}
    measured = {name: (keeps, search.measure(keeps)) for name, keeps in starts.items() if keeps is not None}
    if not measured:
        raise ValueError(f"no budget of {search.steps} steps costs at most {target} of the dense call's block FLOPs "
                         "(its first step is dense): raise the target cost")
    best, best_error = min(measured.values(), key=lambda entry: entry[1])
    tried = 0
    improved = True
    while improved and tried < moves:
        improved = False
        for candidate in neighbours(best, levels, sensitivity, search.cost, target):
            if tried >= moves:
                break
            tried += 1
            error = search.measure(candidate)
            search.progress(f"cost {target}: local search {tried}/{moves}")
            if error < best_error:
                best, best_error, improved = candidate, error, True
                break
    return best, best_error, {name: error for name, (_, error) in measured.items()}


def check_search(targets: Sequence[float], levels: Sequence[float], moves: int) -> None:
    """A ValueError naming what is accepted, for targets, levels or moves the search cannot take."""
    if not levels or any(not 0.0 <= level < 1.0 for level in levels):
        raise ValueError(f"levels={list(levels)!r} is not accepted: levels must be keeps in [0, 1) (dense is always a choice)")
    if not targets or any(not 0.0 < t <= 1.0 for t in targets):
        raise ValueError(f"targets={list(targets)!r} is not accepted: targets must be costs in (0, 1] (shares of the "
                         "dense call's block FLOPs)")
    if isinstance(moves, bool) or not isinstance(moves, int) or moves < 0:
        raise ValueError(f"moves={moves!r} is not accepted: moves must be an integer >= 0")


def calibrate(search: Search, config: TapeConfig, sigmas: Sequence[float], targets: Sequence[float] = DEFAULT_TARGETS,
              levels: Sequence[float] = DEFAULT_LEVELS, moves: int = 8, **profile_fields) -> list[BudgetProfile]:
    """One profile per target cost (see the module's docstring); `profile_fields` (family,
    model, scheduler, guidance_scale) go into each profile, with how it was made."""
    check_search(targets, levels, moves)
    started = time.perf_counter()
    sensitivity = sensitivities(search, levels)
    profiles = []
    for target in targets:
        keeps, error, starts = search_budget(search, config, sigmas, target, levels, sensitivity, moves)
        profiles.append(BudgetProfile(
            keeps=tuple(keeps), cost=search.mean_cost(keeps), target_cost=target, **profile_fields,
            context=config.with_budget(keeps).context,
            calibration={"method": "sensitivity + knapsack allocation + local search", "levels": list(levels),
                         "error": error, "start_errors": starts, "calls": search.calls,
                         "seconds": time.perf_counter() - started}))
    return profiles


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error of the final latents over the reference's mean square."""
    output, reference = output.float(), reference.float()
    return float((output - reference).pow(2).mean() / reference.pow(2).mean().clamp(min=1e-12))


def pipeline_search(pipe, call: Callable[[], torch.Tensor], steps: int, config: TapeConfig,
                    progress: Callable[[str], None] = lambda message: None) -> tuple[Search, list[float]]:
    """The search on a diffusers pipeline: `call()` runs the calibration prompts through it (as
    it is patched at the time) and returns their final latents (output_type="latent"). Returns
    the search and the call's step noise levels. The pipeline is left unpatched."""
    from .patch import apply, remove, stats
    from .runtime import pruner_of
    from .selection import kept_per_frame

    if steps < 2:
        raise ValueError(f"calibration needs calls of at least 2 steps (a first step is dense), not {steps}")
    remove(pipe)
    reference = call()
    # A call to read the forwards from: their noise levels, and the token grid of a token step
    # (the last; a first step is dense)
    apply(pipe, config.with_(budget=[1.0] * (steps - 1) + [0.5], record_selections=False))
    try:
        call()
        records = stats(pipe).forwards
        if not records or records[0].step is None:
            raise ValueError("calibration needs a pipeline call whose scheduler gives its steps")
        pruner = pruner_of(pipe.transformer)
    finally:
        remove(pipe)
    transformer, adapter, record = pipe.transformer, pruner.adapter, records[0]
    grid = records[-1].spans[0].grid
    span_layers = sum(span.end - span.start + 1 for span in pruner.spans if span != pruner.lead)
    sigmas = [next(r.sigma for r in records if r.step == step) for step in range(steps)]

    keys = grid.size if config.context == "full" else None  # full context: a token step's queries see every key

    def cost(keep: float) -> float:
        return forward_cost(keep, lambda k: kept_per_frame(grid, k) * grid.frames, grid.size, len(adapter.blocks(transformer)),
                            span_layers, lambda tokens: adapter.block_flops(transformer, tokens, record.context_tokens, keys))

    def error(keeps: list[float]) -> float:
        apply(pipe, config.with_budget(keeps))
        try:
            return relative_error(call(), reference)
        finally:
            remove(pipe)

    return Search(steps, error, cost, progress), sigmas
