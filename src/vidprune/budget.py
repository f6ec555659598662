"""TAPE's budget: the keep ratio of every denoising step of a call, in [0, 1].

keep 1 is a dense step (every token computed); keep 0 a *reuse step* (no block of a span runs:
every token leaves each span with its input plus the residual the span gave it when it was
last computed, as a step cache reuses a step); between, a token step computes that share of
every frame and the rest come from the token cache.

Where compute is best spent depends on the model: on the demo model whole steps of reuse keep
10 dB more than the same FLOPs spread over tokens, while on real Wan2.1 the peers found the
opposite (methods.md). So a budget is data: a rule ("even", "cycle"), a list of per-step keeps,
or a `BudgetProfile` that `vidprune calibrate` found for one model and step count.

Rules, for a call of n steps at mean keep k:
- "even": the first `dense_first` (and last `dense_last`) share of the steps dense, the others
  token steps at keep(sigma) = clamp(offset + spread * (0.5 - shape(sigma)), min_keep, 1),
  where shape rises from 0 at sigma = 0 to 1 at sigma = 1 (noisy steps keep fewer); the
  offset is solved so that the mean over all steps is k.
- "cycle": the same dense start and end, then dense steps spaced evenly among reuse steps, as
  many as make the mean k (keep 0.5 after the dense start: every other step).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .config import TapeConfig

BUDGET_RULES = ("even", "cycle")
PROFILE_FORMAT = "vidprune-budget/1"
CALIBRATE_HINT = "vidprune calibrate --model DIR --steps {steps}"
_UNIFORM_SIGMAS = [i / 100 for i in range(101)]


@dataclass(frozen=True)
class BudgetProfile:
    """A per-step budget made for one model and step count (`vidprune calibrate` writes them).

    keeps: the keep of every step, in [0, 1]. cost: its mean share of the block FLOPs of a
    dense call, as estimated from the model's block FLOPs. context: the TapeConfig.context its
    token steps were calibrated with (a config using the profile must run them with it).
    calibration: how it was made (method, prompts, errors, time), for the reader. A profile is tied to its step count: a call with
    another count is refused, naming the command that makes one for it (no interpolation: a
    reuse step's value depends on where its neighbours are)."""

    keeps: tuple[float, ...]
    family: str = ""
    model: str = ""
    scheduler: str = ""
    guidance_scale: float | None = None
    cost: float | None = None
    target_cost: float | None = None
    context: str = "kept"
    calibration: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keeps", check_keeps("BudgetProfile.keeps", self.keeps))

    @property
    def steps(self) -> int:
        return len(self.keeps)

    @property
    def mean_keep(self) -> float:
        return sum(self.keeps) / len(self.keeps)

    def to_dict(self) -> dict[str, Any]:
        return {"format": PROFILE_FORMAT, "steps": self.steps, "mean_keep": self.mean_keep,
                **{**asdict(self), "keeps": list(self.keeps)}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "BudgetProfile":
        """A profile from its JSON file; a ValueError naming the file and what is wrong."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"budget profile {str(path)!r} could not be read: {error}") from None
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT or "keeps" not in data:
            raise ValueError(f"{str(path)!r} is not a vidprune budget profile (JSON with format {PROFILE_FORMAT!r} "
                             "and keeps), as `vidprune calibrate` writes")
        names = ("family", "model", "scheduler", "guidance_scale", "cost", "target_cost", "context", "calibration")
        return cls(keeps=tuple(data["keeps"]), **{name: data[name] for name in names if name in data})


def check_keeps(name: str, keeps: Any) -> tuple[float, ...]:
    """A non-empty sequence of numbers in [0, 1] as a tuple of floats, or a ValueError."""
    accepted = "a non-empty list of per-step keeps, each a number in [0, 1]"
    if isinstance(keeps, (str, bytes)) or not hasattr(keeps, "__iter__"):
        raise ValueError(f"{name}={keeps!r} is not accepted: {name} must be {accepted}")
    values = tuple(keeps)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0]
    if not values or bad:
        raise ValueError(f"{name}={list(values)!r} is not accepted: {name} must be {accepted}")
    return tuple(float(v) for v in values)


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


def needs_filled_memory(config: TapeConfig) -> bool:
    """Whether pruned or reused tokens stand on a memory of an earlier step (a cache or the
    refreshing score's history): then a call's first step, and each step where another
    transformer takes over, must compute every token."""
    return config.cache != "none" or config.refreshes


def plan_keeps(config: TapeConfig, sigmas: Sequence[float], model_starts: Sequence[int] = ()) -> list[float]:
    """Keep of every step of a call whose step noise levels are `sigmas` (in order), by the
    config's budget; `model_starts`: steps where another transformer takes over (dense when
    the budget stands on memories, which start empty there).

    One rule for every budget, one transformer or two: a budget is met or refused. The plan's
    mean is the config's keep (the cycle rule: rounded up to whole steps) and at least one step
    prunes; where the call's steps cannot give that, a ValueError says what to change (tested
    to work), before any step runs."""
    count = len(sigmas)
    if config.keep >= 1.0 or count == 0:
        return [1.0] * count
    must_compute = {0, *(s for s in model_starts if 0 <= s < count)} if needs_filled_memory(config) else set()
    budget = config.budget
    if isinstance(budget, (tuple, BudgetProfile)):
        return _listed(budget, count, must_compute)
    if needs_filled_memory(config) and count == 1:
        raise ValueError(f"keep={config.keep} cannot be met in a 1-step call: its one step is dense, as it fills the "
                         "token cache; TapeConfig.paper(keep) (CLI: --method paper) prunes without a cache, or give more steps")
    first, last = dense_steps(config.dense_first, count), dense_steps(config.dense_last, count)
    full = set(range(first)) | set(range(count - last, count)) | must_compute
    rest = [i for i in range(count) if i not in full]
    switch = " (and each step where another transformer takes over)" if len(must_compute) > 1 else ""
    if not rest:
        if set(range(count)) == must_compute:
            raise ValueError(f"keep={config.keep} cannot be met in {count} steps: the first step and each step where "
                             "another transformer takes over are dense (they fill its token cache), and that is every "
                             "step: give more steps")
        raise ValueError(f"keep={config.keep} cannot be met: dense_first={config.dense_first} and "
                         f"dense_last={config.dense_last} make all {count} steps of the call dense{switch}: lower them")
    if budget == "cycle":
        return _cycle(config.keep, count, full, rest)
    target_mean = (config.keep * count - len(full)) / len(rest)
    if target_mean < config.min_keep:
        least = math.ceil((len(full) + config.min_keep * len(rest)) / count * 1000) / 1000
        raise ValueError(
            f"keep={config.keep} cannot be met by token steps: {len(full)} of the call's {count} steps are dense"
            f"{switch}, so the others would keep {max(target_mean, 0):.3g}, below min_keep={config.min_keep}: raise "
            f"keep to at least {least:g} (CLI: --keep {least:g}), or, for TAPE alone, use budget='cycle' (CLI: --budget "
            "cycle), whose reuse steps meet any keep"
        )
    offset = _solve_offset(config, [sigmas[i] for i in rest], target_mean)
    return [1.0 if i in full else _keep(config, offset, sigmas[i]) for i in range(count)]


def _listed(budget: tuple[float, ...] | BudgetProfile, count: int, must_compute: set[int]) -> list[float]:
    """A per-step list or profile, checked against the call: its step count, and dense steps
    where the call needs them (where another transformer takes over)."""
    keeps = list(budget.keeps if isinstance(budget, BudgetProfile) else budget)
    if len(keeps) != count:
        made = "this profile was made" if isinstance(budget, BudgetProfile) else "this list of keeps is"
        raise ValueError(f"TapeConfig(budget=...): {made} for {len(keeps)} steps and the call runs {count}: make a "
                         f"profile for {count} steps with `{CALIBRATE_HINT.format(steps=count)}`, or call with "
                         f"{len(keeps)} steps")
    undense = sorted(step for step in must_compute if keeps[step] < 1.0)
    if undense:
        raise ValueError(f"TapeConfig(budget=...) prunes step {undense[0]}, where another transformer takes over and its "
                         f"token cache starts empty: give that step keep 1.0")
    return keeps


def _cycle(keep: float, count: int, full: set[int], rest: list[int]) -> list[float]:
    """Dense steps spread evenly over `rest`, each closing its cycle (reuse first, as a step
    cache skips after its dense start; the last step is dense), the others reuse steps, so
    that the mean keep over all `count` steps is as close to `keep` as whole steps allow
    (rounded up: never cheaper than asked)."""
    dense = min(len(rest), max(0, math.ceil(keep * count - len(full) - 1e-9)))
    if dense == len(rest):
        raise ValueError(f"keep={keep} with budget='cycle' leaves no reuse step in {count} steps ({len(full)} dense at "
                         f"the start or end): lower keep to at most {math.floor((count - 1) / count * 1000) / 1000:g}, or "
                         "dense_first")
    chosen = {rest[math.ceil((j + 1) * len(rest) / dense) - 1] for j in range(dense)} if dense else set()
    return [1.0 if i in full or i in chosen else 0.0 for i in range(count)]


def keep_at(config: TapeConfig, sigma: float) -> float:
    """Keep ratio at one noise level when the call's steps are unknown (a bare transformer):
    the even rule's offset solved for sigmas spread uniformly over [0, 1]."""
    if config.keep >= 1.0:
        return 1.0
    return _keep(config, _nominal_offset(config), sigma)


@functools.lru_cache(maxsize=32)
def _nominal_offset(config: TapeConfig) -> float:
    return _solve_offset(config, _UNIFORM_SIGMAS, config.keep)


def forward_cost(keep: float, tokens_kept: Callable[[float], int], tokens: int, num_layers: int,
                 span_layers: int, block_flops: Callable[[int], float]) -> float:
    """Share of a dense forward's block FLOPs that a forward at `keep` computes: none on a reuse
    step (no block runs); else the layers before the first pruned span on every token and the
    `span_layers` pruned ones on `tokens_kept(keep)` tokens (every token at keep 1)."""
    if keep == 0.0:
        return 0.0
    kept = tokens if keep >= 1.0 else tokens_kept(keep)
    pruned_part = span_layers * block_flops(kept)
    return ((num_layers - span_layers) * block_flops(tokens) + pruned_part) / (num_layers * block_flops(tokens))
