"""Timestep budget: the keep ratio of each denoising step as a function of its noise level.

keep(sigma) = clamp(offset + spread * (0.5 - shape(sigma)), min_keep, 1), where shape rises
from 0 at sigma = 0 to 1 at sigma = 1: noisy early steps keep fewer tokens, the final
refinement steps more. The offset is solved so that the mean keep over the steps equals the
requested mean, so schedules of one mean cost about the same.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

from .config import TapeConfig

_UNIFORM_SIGMAS = [i / 100 for i in range(101)]


def shape_value(shape: str, sigma: float) -> float:
    """Where sigma sits on the schedule's ramp, in [0, 1]; each shape averages 0.5 over
    sigma uniform in [0, 1]."""
    if shape == "constant":
        return 0.5
    if shape == "linear":
        return sigma
    if shape == "cosine":
        return (1.0 - math.cos(math.pi * sigma)) / 2.0
    if shape == "step":
        return 1.0 if sigma > 0.5 else 0.0
    raise ValueError(f"schedule={shape!r} is not accepted: schedule must be constant, linear, cosine or step")


def _keep(config: TapeConfig, offset: float, sigma: float) -> float:
    value = offset + config.schedule_spread * (0.5 - shape_value(config.schedule, sigma))
    return min(1.0, max(config.min_keep, value))


def _solve_offset(config: TapeConfig, sigmas: Sequence[float], target_mean: float) -> float:
    """Offset whose clamped keeps average target_mean over sigmas (bisection: the mean is
    monotone in the offset)."""
    low, high = config.min_keep - config.schedule_spread, 1.0 + config.schedule_spread
    for _ in range(60):
        middle = (low + high) / 2
        mean = sum(_keep(config, middle, s) for s in sigmas) / len(sigmas)
        low, high = (middle, high) if mean < target_mean else (low, middle)
    return (low + high) / 2


def dense_steps(share: float, count: int) -> int:
    """Whole steps of `count` that a share of them rounds to (halves round up)."""
    return min(count, math.floor(share * count + 0.5))


def plan_keeps(config: TapeConfig, sigmas: Sequence[float], model_starts: Sequence[int] = ()) -> list[float]:
    """Keep ratio of every step of a call whose step noise levels are `sigmas` (in order).

    The first `dense_first` and last `dense_last` share of the steps run unpruned (the first
    step always, and each step in `model_starts` where another transformer takes over, when
    pruned tokens need a memory of the model's earlier step: a cache or the refreshing score);
    the others share the rest of the budget so that the mean over all steps is config.keep."""
    count = len(sigmas)
    if config.keep >= 1.0 or count == 0:
        return [1.0] * count
    first, last = dense_steps(config.dense_first, count), dense_steps(config.dense_last, count)
    if config.cache != "none" or config.refreshes:
        first = max(first, 1)
    full = set(range(first)) | set(range(count - last, count))
    if config.cache != "none" or config.refreshes:
        full |= {step for step in model_starts if 0 <= step < count}
    pruned = [i for i in range(count) if i not in full]
    if not pruned:
        return [1.0] * count
    target_mean = (config.keep * count - len(full)) / len(pruned)
    if target_mean < config.min_keep:
        raise ValueError(
            f"keep={config.keep} cannot be met with {len(full)} of {count} steps unpruned and "
            f"min_keep={config.min_keep}: raise keep, or lower dense_first/dense_last or min_keep"
        )
    offset = _solve_offset(config, [sigmas[i] for i in pruned], target_mean)
    return [1.0 if i in full else _keep(config, offset, sigmas[i]) for i in range(count)]


def keep_at(config: TapeConfig, sigma: float) -> float:
    """Keep ratio at one noise level when the call's steps are unknown (a bare transformer):
    the offset is solved for sigmas spread uniformly over [0, 1]."""
    if config.keep >= 1.0:
        return 1.0
    return _keep(config, _nominal_offset(config), sigma)


@functools.lru_cache(maxsize=32)
def _nominal_offset(config: TapeConfig) -> float:
    return _solve_offset(config, _UNIFORM_SIGMAS, config.keep)
