"""Configuration dataclasses. Every field is checked on construction; a bad value raises a
ValueError that names the field, the value given and what is accepted."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .interframe import LipDetection
from .validation import check_choice, check_fraction, check_int, fail

IMPORTANCE_KINDS = ("attention", "random")
SCHEDULE_SHAPES = ("constant", "linear", "cosine", "step")


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
    reuse_residuals: beyond the paper: a pruned token gets the residual (span output minus
        span input) it had when the span last computed it, instead of passing unchanged; the
        full first/last steps compute every token and so fill this cache. Costs one
        (batch, tokens, dim) tensor per span and CFG branch.
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
    reuse_residuals: bool = False

    def __post_init__(self) -> None:
        check_fraction("keep", self.keep)
        check_choice("importance", self.importance, IMPORTANCE_KINDS)
        check_int("query_samples", self.query_samples, 1)
        if not isinstance(self.temporal_sigma, (int, float)) or self.temporal_sigma < 0:
            fail("temporal_sigma", self.temporal_sigma, "a number >= 0 (0 disables smoothing)")
        check_int("temporal_radius", self.temporal_radius, 0)
        if not isinstance(self.per_frame, bool):
            fail("per_frame", self.per_frame, "True or False")
        check_int("first_pruned_layer", self.first_pruned_layer, 0)
        check_int("reselect_every", self.reselect_every, 0)
        if self.reselect_layers is not None:
            layers = tuple(self.reselect_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                fail("reselect_layers", self.reselect_layers, "None or a non-empty list of layer indices >= 0")
            if list(layers) != sorted(set(layers)):
                fail("reselect_layers", self.reselect_layers, "strictly increasing layer indices")
            object.__setattr__(self, "reselect_layers", layers)
        check_choice("schedule", self.schedule, SCHEDULE_SHAPES)
        if not isinstance(self.schedule_spread, (int, float)) or not 0.0 <= self.schedule_spread <= 1.0:
            fail("schedule_spread", self.schedule_spread, "in [0, 1]")
        check_fraction("min_keep", self.min_keep)
        if self.min_keep > self.keep:
            fail("min_keep", self.min_keep, f"<= keep ({self.keep})")
        check_int("full_first_steps", self.full_first_steps, 0)
        check_int("full_last_steps", self.full_last_steps, 0)
        if not isinstance(self.share_cfg_selection, bool):
            fail("share_cfg_selection", self.share_cfg_selection, "True or False")
        check_int("seed", self.seed, 0)
        for name in ("record_selections", "reuse_residuals"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "True or False")

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
            fail(field_name, getattr(self, field_name), f"layer indices below the model's {num_layers} layers")
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


KV_SOURCES = ("current", "clean")
RESTORE_MODES = ("x0", "prediction")


@dataclass(frozen=True)
class LipConfig:
    """LIP: latent inter-frame pruning for video editing (WanVideoToVideoPipeline).

    Tokens of the source video that barely change from the previous latent frame are not
    computed at any denoising step; their output is restored from their reference token (the
    last computed occurrence at the same position).

    detection: how the keep mask is found on the clean source latents (see LipDetection).
    recovery: Attention Recovery: kept queries also attend to duplicates of the references'
        keys and values at the pruned positions (False: plain pruning, "lip-noar").
    duplicates: how many duplicates per reference take part, nearest in time first (None: all).
    kv_source: where duplicated keys and values come from: "current" (the reference's, this
        step) or "clean" (the reference's from a pass over the clean source latents at t=0,
        free of the reference's noise sample; costs one extra forward per call and branch).
    restore: how a pruned token's output is made: "x0" copies the reference's clean-sample
        estimate and turns it into a velocity for the token's own noisy input (keeps the
        token's own noise); "prediction" copies the reference's output as it is.
    source_latents: the clean source latents (batch, channels, frames, height, width), in the
        space the transformer works in, for calls that do not encode the source video
        themselves (a pipeline given latents=..., or a bare transformer).
    mask: an explicit keep mask over the token grid, (frames, height, width) or
        (batch, frames, height, width) bool, instead of detection.
    tape: a TapeConfig to prune further among the tokens LIP keeps: from its first pruned
        layer on, each of its spans computes the top `keep` share of every frame's LIP-kept
        tokens (per-frame budgets; scores smoothed over time, LIP-pruned positions taking
        their reference's score; one selection for all videos of the batch). Layers before
        run on LIP's kept tokens. Not with kv_source="clean", nor per_frame=False.
    """

    detection: LipDetection = LipDetection()
    recovery: bool = True
    duplicates: int | None = None
    kv_source: str = "current"
    restore: str = "x0"
    source_latents: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    tape: TapeConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.detection, LipDetection):
            fail("detection", self.detection, "a vidprune.LipDetection")
        if not isinstance(self.recovery, bool):
            fail("recovery", self.recovery, "True or False")
        if self.duplicates is not None:
            check_int("duplicates", self.duplicates, 0)
        check_choice("kv_source", self.kv_source, KV_SOURCES)
        check_choice("restore", self.restore, RESTORE_MODES)
        if self.source_latents is not None and (
            not isinstance(self.source_latents, torch.Tensor) or self.source_latents.ndim != 5
        ):
            shape = getattr(self.source_latents, "shape", type(self.source_latents).__name__)
            fail("source_latents", tuple(shape) if isinstance(shape, torch.Size) else shape,
                 "None or a (batch, channels, frames, height, width) tensor")
        if self.mask is not None and (
            not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.ndim not in (3, 4)
        ):
            shape = tuple(self.mask.shape) if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__
            fail("mask", shape, "None or a bool tensor (frames, height, width) or (batch, frames, height, width)")
        if self.tape is not None:
            if not isinstance(self.tape, TapeConfig):
                fail("tape", self.tape, "None or a vidprune.TapeConfig")
            if self.kv_source == "clean":
                fail("kv_source", self.kv_source, "'current' when tape is set (clean-pass keys follow LIP's kept tokens)")
            if not self.tape.per_frame:
                fail("tape", "TapeConfig(per_frame=False)", "a TapeConfig with per_frame=True (LIP keeps per frame)")


__all__ = ["TapeConfig", "LipConfig", "IMPORTANCE_KINDS", "SCHEDULE_SHAPES", "KV_SOURCES", "RESTORE_MODES"]
