"""Configuration dataclasses. Every field is checked on construction; a bad value raises a
ValueError that names the field, the value given and what is accepted."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

IMPORTANCE_KINDS = ("attention", "random")
SCHEDULE_SHAPES = ("constant", "linear", "cosine", "step")


def _fail(name: str, value: Any, accepted: str) -> None:
    raise ValueError(f"{name}={value!r} is not accepted: {name} must be {accepted}")


def _check_fraction(name: str, value: Any, low_open: bool = True) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "a number")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        _fail(name, value, "in (0, 1]" if low_open else "in [0, 1]")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


@dataclass(frozen=True)
class TapeConfig:
    """TAPE: temporal-aware token pruning for text-to-video generation.

    Inside each span of blocks only the kept video tokens are computed; pruned tokens pass the
    span unchanged. A span starts at every reselection layer, where tokens are scored afresh.

    keep: mean keep ratio over the denoising steps of a pipeline call (see `schedule`).
    importance: "attention" (attention received, from sampled queries at the span's first
        block) or "random".
    query_samples: queries sampled (spread over all frames) to estimate attention received.
    temporal_sigma: Gaussian sigma, in latent frames, for smoothing importance along time;
        0 turns smoothing off.
    temporal_radius: half width of the smoothing window in latent frames.
    per_frame: True selects top-k in every latent frame (equal budget per frame); False
        selects top-k over the whole clip.
    first_pruned_layer: layers before it always run on all tokens (L0).
    reselect_every: a new selection every R layers after L0; 0 means one selection for the
        rest of the stack.
    reselect_layers: explicit span starts (overrides first_pruned_layer and reselect_every).
    schedule: keep ratio as a function of the step's noise level sigma: "constant", or
        "linear" / "cosine" / "step", which prune more at high sigma and less near sigma 0.
    schedule_spread: keep(sigma=0) - keep(sigma=1) before clamping, for non-constant shapes.
    min_keep: lower bound of any step's keep ratio.
    full_first_steps / full_last_steps: steps at the start / end of a pipeline call that run
        unpruned (counted in the mean keep). Need `vidprune.apply` on a pipeline.
    share_cfg_selection: the second transformer call of a step (the unconditional branch of
        classifier-free guidance) reuses the first call's selection instead of scoring again.
    seed: seed of the random query sample and of random importance.
    record_selections: keep every span's kept indices in `vidprune.stats` (for measuring
        selection jitter; costs memory).
    """

    keep: float = 0.5
    importance: str = "attention"
    query_samples: int = 512
    temporal_sigma: float = 1.0
    temporal_radius: int = 2
    per_frame: bool = True
    first_pruned_layer: int = 2
    reselect_every: int = 6
    reselect_layers: tuple[int, ...] | None = None
    schedule: str = "cosine"
    schedule_spread: float = 0.4
    min_keep: float = 0.1
    full_first_steps: int = 0
    full_last_steps: int = 0
    share_cfg_selection: bool = True
    seed: int = 0
    record_selections: bool = False

    def __post_init__(self) -> None:
        _check_fraction("keep", self.keep)
        _check_choice("importance", self.importance, IMPORTANCE_KINDS)
        _check_int("query_samples", self.query_samples, 1)
        if not isinstance(self.temporal_sigma, (int, float)) or self.temporal_sigma < 0:
            _fail("temporal_sigma", self.temporal_sigma, "a number >= 0 (0 disables smoothing)")
        _check_int("temporal_radius", self.temporal_radius, 0)
        if not isinstance(self.per_frame, bool):
            _fail("per_frame", self.per_frame, "True or False")
        _check_int("first_pruned_layer", self.first_pruned_layer, 0)
        _check_int("reselect_every", self.reselect_every, 0)
        if self.reselect_layers is not None:
            layers = tuple(self.reselect_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                _fail("reselect_layers", self.reselect_layers, "None or a non-empty list of layer indices >= 0")
            if list(layers) != sorted(set(layers)):
                _fail("reselect_layers", self.reselect_layers, "strictly increasing layer indices")
            object.__setattr__(self, "reselect_layers", layers)
        _check_choice("schedule", self.schedule, SCHEDULE_SHAPES)
        if not isinstance(self.schedule_spread, (int, float)) or not 0.0 <= self.schedule_spread <= 1.0:
            _fail("schedule_spread", self.schedule_spread, "in [0, 1]")
        _check_fraction("min_keep", self.min_keep)
        if self.min_keep > self.keep:
            _fail("min_keep", self.min_keep, f"<= keep ({self.keep})")
        _check_int("full_first_steps", self.full_first_steps, 0)
        _check_int("full_last_steps", self.full_last_steps, 0)
        if not isinstance(self.share_cfg_selection, bool):
            _fail("share_cfg_selection", self.share_cfg_selection, "True or False")
        _check_int("seed", self.seed, 0)
        if not isinstance(self.record_selections, bool):
            _fail("record_selections", self.record_selections, "True or False")

    @property
    def needs_step_list(self) -> bool:
        """Whether the budget needs the call's list of steps (only known through a pipeline)."""
        return self.full_first_steps > 0 or self.full_last_steps > 0

    def span_starts(self, num_layers: int) -> list[int]:
        """First layer of every pruned span; each span runs to the next start or the end."""
        if self.reselect_layers is not None:
            starts = list(self.reselect_layers)
        elif self.reselect_every == 0:
            starts = [self.first_pruned_layer]
        else:
            starts = list(range(self.first_pruned_layer, num_layers, self.reselect_every))
        if not starts or starts[-1] >= num_layers:
            field_name = "reselect_layers" if self.reselect_layers is not None else "first_pruned_layer"
            _fail(field_name, getattr(self, field_name), f"layer indices below the model's {num_layers} layers")
        return starts

    @classmethod
    def naive(cls, keep: float = 0.5, **overrides: Any) -> "TapeConfig":
        """Baseline: per-frame attention pruning with no smoothing, one selection, constant budget."""
        return cls(keep=keep, temporal_sigma=0.0, reselect_every=0, schedule="constant", **overrides)

    @classmethod
    def random(cls, keep: float = 0.5, **overrides: Any) -> "TapeConfig":
        """Baseline: random tokens per frame, one selection, constant budget."""
        return cls.naive(keep, importance="random", **overrides)

    def with_(self, **changes: Any) -> "TapeConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


__all__ = ["TapeConfig", "IMPORTANCE_KINDS", "SCHEDULE_SHAPES"]
