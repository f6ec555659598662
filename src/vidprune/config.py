"""Configuration dataclasses. Every field is checked on construction; a bad value raises a
ValueError that names the field, the value given and what is accepted."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .budget import BUDGET_RULES, BudgetProfile, check_keeps
from .interframe import LipDetection
from .validation import check_bool, check_choice, check_fraction, check_int, check_number, fail

IMPORTANCE_KINDS = ("attention", "random")
SCHEDULE_SHAPES = ("constant", "linear", "cosine", "step")
CACHE_KINDS = ("none", "span", "block")
CHANGE_REFERENCES = ("computed", "step")
CONTEXT_KINDS = ("kept", "full")
CONTEXT_KEYS = ("replayed", "remembered")
CONTEXT_STORAGE = ("model", "float8")
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class TapeConfig:
    """TAPE: temporal-aware token pruning for text-to-video generation, with a token cache.

    Inside each span of blocks only the kept video tokens are computed. A span starts at every
    reselection layer, where tokens are scored afresh. A pruned token is not left unchanged:
    it gets the update it had when the span last computed it (`cache`). Scores combine TAPE's
    temporally smoothed attention importance with how much each token's input changed since it
    was last computed and how long ago that was, so every token is refreshed regularly.

    keep: mean keep ratio over the denoising steps of a pipeline call, dense steps included.
        With a per-step budget (a list or a profile) it is that budget's mean, set from it.
    budget: how the keep is spread over a call's steps (budget.py): "cycle" (the default: the
        first `dense_first` share dense, then dense steps spaced evenly among reuse steps),
        "even" (the same dense start, the others token steps by `schedule`), a list of per-step
        keeps, a `BudgetProfile` or the path of a profile's JSON file (`vidprune calibrate`
        makes them per model and step count; a call with another step count is refused).
        keep 0 is a reuse step: no block runs, every token takes its input plus the residual
        the stack gave it when last computed (needs cache "span"); keep 1 a dense step; between,
        a token step. A call's first step is always dense (it fills the cache), as is a step
        where Wan2.2's second expert takes over. Why "cycle" by default: on the demo model reuse
        steps keep 4-8 dB more than token steps at every full-size speed measured, and on real
        Wan2.1 the peers measured whole-step skipping above token pruning whose kept tokens
        attend over kept tokens only, as they do here (benchmarks/results/budget). A budget the
        call cannot meet is refused before any step runs, saying what to change.
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
    schedule: keep ratio of the pruned steps as a function of the step's noise level sigma:
        "constant", or "linear" / "cosine" / "step", which prune more at high sigma and less
        near sigma 0 (the paper's prune-early budget).
    schedule_spread: keep(sigma=0) - keep(sigma=1) before clamping, for non-constant shapes.
    min_keep: lower bound of any step's keep ratio.
    dense_first / dense_last: share of a call's steps, at its start / end, that run unpruned
        (rounded to whole steps); the pruned steps keep less so that the mean stays `keep`.
        The first steps fix the video's layout and fill the cache.
    cache: what a pruned token gets inside a span: "span" (its span output minus span input
        from when it was last computed, added to its current input), "block" (per block, the
        self-attention, cross-attention and feed-forward outputs from when it was last computed,
        each times the current step's modulation gate) or "none" (it passes the span unchanged,
        as in the paper). A span with no cache yet for a branch computes every token.
    context: what the kept tokens of a token step attend over in a span: "kept" (the kept
        tokens only: fastest) or "full" (every token: the pruned tokens take part as keys and
        values, per `context_keys`). Kept-only attention shifts every softmax: on the demo
        model it costs most of a token step's error (benchmarks/results/context).
    context_keys: where a pruned token's key and value come from with context "full":
        "replayed" (computed in each block from its state replayed block by block: its span
        input plus each earlier block's residual from when it was last computed, held per
        block; with cache "block" its replayed branch outputs) or "remembered" (the key and
        value each block gave it when it was last computed, held per block).
    context_storage: the precision of what full context holds per block: "model" (the model's
        dtype) or "float8" (e4m3 with one scale per token: half of bf16's memory).
    attention_weight, change_weight, staleness_weight: weights of the three selection terms,
        each normalised to mean 1 over a sample's tokens: attention importance; the relative
        change of the token's span input since it was last computed; the number of selections
        since then. 0 turns a term off.
    change_since: what the change term compares a token's span input with: its input when it
        was last "computed", or at the last "step" (the span's previous selection).
    refresh_every: K: a token not computed in K - 1 selections in a row is computed at the
        next one (ahead of any score), so every token is recomputed at least once in every K
        pruned steps whenever a step keeps at least 1/K of each frame. 0: no forced refresh.
    share_cfg_selection: the second transformer call of a step (the unconditional branch of
        classifier-free guidance) reuses the first call's selection instead of scoring again;
        where the pipeline batches both branches into one call (LTX), the unconditional half
        of the batch computes the conditional half's selection.
    seed: seed of the random query sample and of random importance.
    record_selections: keep every span's kept indices in `vidprune.stats` (for measuring
        selection jitter; costs memory).

    The cache, the change and staleness terms and dense steps work across the steps of a
    pipeline call; on a bare transformer only configs without them apply (`TapeConfig.paper`).
    """

    keep: float = 0.5
    budget: str | tuple[float, ...] | BudgetProfile = "cycle"
    importance: str = "attention"
    query_samples: int = 512
    temporal_sigma: float = 1.0
    temporal_radius: int = 2
    per_frame: bool = True
    first_pruned_layer: int = 2
    reselect_every: int = 6
    reselect_layers: tuple[int, ...] | None = None
    schedule: str = "constant"
    schedule_spread: float = 0.4
    min_keep: float = 0.1
    dense_first: float = 0.2
    dense_last: float = 0.0
    cache: str = "span"
    context: str = "kept"
    context_keys: str = "replayed"
    context_storage: str = "model"
    attention_weight: float = 1.0
    change_weight: float = 1.0
    staleness_weight: float = 0.0
    refresh_every: int = 4
    change_since: str = "computed"
    share_cfg_selection: bool = True
    seed: int = 0
    record_selections: bool = False

    def __post_init__(self) -> None:
        self._check_budget()
        check_fraction("keep", self.keep)
        check_choice("importance", self.importance, IMPORTANCE_KINDS)
        check_int("query_samples", self.query_samples, 1)
        check_number("temporal_sigma", self.temporal_sigma, 0.0)
        check_int("temporal_radius", self.temporal_radius, 0)
        check_bool("per_frame", self.per_frame)
        check_int("first_pruned_layer", self.first_pruned_layer, 0)
        check_int("reselect_every", self.reselect_every, 0)
        if self.reselect_layers is not None:
            if isinstance(self.reselect_layers, (str, bytes)) or not hasattr(self.reselect_layers, "__iter__"):
                fail("reselect_layers", self.reselect_layers, "None or a non-empty list of layer indices >= 0")
            layers = tuple(self.reselect_layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                fail("reselect_layers", self.reselect_layers, "None or a non-empty list of layer indices >= 0")
            if list(layers) != sorted(set(layers)):
                fail("reselect_layers", self.reselect_layers, "strictly increasing layer indices")
            object.__setattr__(self, "reselect_layers", layers)
        check_choice("schedule", self.schedule, SCHEDULE_SHAPES)
        check_number("schedule_spread", self.schedule_spread, 0.0, 1.0)
        check_fraction("min_keep", self.min_keep)
        if self.min_keep > self.keep and self.budget in BUDGET_RULES:
            fail("min_keep", self.min_keep, f"<= keep ({self.keep})")
        check_number("dense_first", self.dense_first, 0.0, 1.0)
        check_number("dense_last", self.dense_last, 0.0, 1.0)
        if self.dense_first + self.dense_last > 1.0:
            fail("dense_last", self.dense_last, f"<= 1 - dense_first ({1 - self.dense_first})")
        check_choice("cache", self.cache, CACHE_KINDS)
        check_choice("context", self.context, CONTEXT_KINDS)
        check_choice("context_keys", self.context_keys, CONTEXT_KEYS)
        check_choice("context_storage", self.context_storage, CONTEXT_STORAGE)
        if self.context == "full" and self.cache == "none":
            fail("cache", self.cache, "'span' or 'block' with context='full' (a pruned token's key and value come from "
                 "its remembered state)")
        profile = self.budget if isinstance(self.budget, BudgetProfile) else None
        if profile is not None and self.token_steps and profile.context != self.context:
            fail("context", self.context, f"{profile.context!r}, the context this budget profile's token steps were "
                 "calibrated with")
        if self.context == "full" and not self.token_steps:
            fail("context", self.context, "'kept' with a budget without token steps (full context changes token steps "
                 "only: give budget='even', or a list or profile with keeps between 0 and 1)")
        for name in ("attention_weight", "change_weight", "staleness_weight"):
            check_number(name, getattr(self, name), 0.0)
        check_int("refresh_every", self.refresh_every, 0)
        if self.attention_weight == 0 and not self.refreshes:
            fail("attention_weight", 0, "> 0 when change_weight, staleness_weight and refresh_every are all 0 "
                 "(else nothing would rank the tokens)")
        if self.refresh_every == 1:
            fail("refresh_every", 1, "0 (off) or an integer >= 2 (1 would compute every token at every step)")
        check_choice("change_since", self.change_since, CHANGE_REFERENCES)
        check_bool("share_cfg_selection", self.share_cfg_selection)
        check_int("seed", self.seed, 0, MAX_SEED)
        check_bool("record_selections", self.record_selections)
        keeps = self.budget.keeps if isinstance(self.budget, BudgetProfile) else self.budget
        if isinstance(keeps, tuple) and keeps[0] < 1.0 and (self.cache != "none" or self.refreshes):
            fail("budget", list(keeps), "a budget whose first step is 1.0 (dense: it fills the token cache and the "
                 "selection's history that later steps stand on)")
        if self.reuses and self.cache != "span":
            fail("cache", self.cache, "'span' with a budget that has reuse steps (keep 0), which add each token's "
                 "remembered span residual")

    def _check_budget(self) -> None:
        """A budget rule, or a per-step budget (a list, a profile or its file) as a tuple or
        BudgetProfile, whose mean becomes `keep`."""
        budget = self.budget
        accepted = (f"one of {', '.join(map(repr, BUDGET_RULES))}, a list of per-step keeps in [0, 1], a "
                    "vidprune.budget.BudgetProfile or the path of a profile's .json file")
        if isinstance(budget, str) and budget in BUDGET_RULES:
            return
        if isinstance(budget, str) and budget.endswith(".json"):
            budget = BudgetProfile.load(budget)
        elif isinstance(budget, (list, tuple)):
            budget = check_keeps("budget", budget)
        elif not isinstance(budget, BudgetProfile):
            fail("budget", budget, accepted)
        keeps = budget.keeps if isinstance(budget, BudgetProfile) else budget
        if max(keeps) == 0.0:
            fail("budget", list(keeps), "a budget with at least one step above keep 0 (the first step fills the cache)")
        object.__setattr__(self, "budget", budget)
        object.__setattr__(self, "keep", sum(keeps) / len(keeps))

    @property
    def token_steps(self) -> bool:
        """Whether the budget has token steps (keeps strictly between 0 and 1)."""
        return _has_token_steps(self.budget)

    @property
    def reuses(self) -> bool:
        """Whether the budget has reuse steps (keep 0)."""
        if self.budget == "cycle":
            return self.keep < 1.0
        if isinstance(self.budget, str):
            return False
        keeps = self.budget.keeps if isinstance(self.budget, BudgetProfile) else self.budget
        return 0.0 in keeps

    @property
    def refreshes(self) -> bool:
        """Whether selection looks at a token's history (its change and staleness)."""
        return self.change_weight > 0 or self.staleness_weight > 0 or self.refresh_every > 0

    @property
    def needs_call(self) -> bool:
        """Whether the method carries state from step to step of a call (cache, history, dense
        steps), which only a pipeline call delimits."""
        carried = self.cache != "none" or self.refreshes or self.dense_first > 0 or self.dense_last > 0
        return self.keep < 1.0 and carried

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
    def paper(cls, keep: float = 0.5, **overrides: Any) -> "TapeConfig":
        """TAPE as the paper's abstract describes it: attention importance smoothed over time,
        reselection every few layers, a prune-early budget; pruned tokens pass spans unchanged,
        no dense steps, no refresh."""
        settings = dict(budget="even", schedule="cosine", dense_first=0.0, cache="none", change_weight=0.0,
                        staleness_weight=0.0, refresh_every=0)
        return cls(keep=keep, **{**settings, **overrides})

    @classmethod
    def naive(cls, keep: float = 0.5, **overrides: Any) -> "TapeConfig":
        """Baseline: per-frame attention pruning with no smoothing, one selection, constant budget."""
        return cls.paper(keep, **{**dict(temporal_sigma=0.0, reselect_every=0, schedule="constant"), **overrides})

    @classmethod
    def random(cls, keep: float = 0.5, **overrides: Any) -> "TapeConfig":
        """Baseline: random tokens per frame, one selection, constant budget."""
        return cls.naive(keep, **{**dict(importance="random"), **overrides})

    def with_(self, **changes: Any) -> "TapeConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def with_budget(self, budget: str | Sequence[float] | BudgetProfile) -> "TapeConfig":
        """A copy with `budget`, keeping this context where the budget has token steps and taking
        "kept" where it has none (full context changes token steps only, and is refused without)."""
        return replace(self, budget=budget, context=self.context if _has_token_steps(budget) else "kept")


def _has_token_steps(budget: str | Sequence[float] | BudgetProfile) -> bool:
    if isinstance(budget, str):
        return budget == "even"
    keeps = budget.keeps if isinstance(budget, BudgetProfile) else budget
    return any(0.0 < k < 1.0 for k in keeps)


KV_SOURCES = ("current", "clean")
RESTORE_MODES = ("x0", "prediction")


@dataclass(frozen=True)
class LipConfig:
    """LIP: latent inter-frame pruning for video editing (the video-to-video pipelines of the
    families whose adapter implements it).

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
        estimate and turns it into an output for the token's own noisy input (keeps the
        token's own noise; the adapter says how the model's output gives the estimate, e.g.
        from the scheduler's alphas_cumprod for a DDPM-style one); "prediction" copies the
        reference's output as it is.
    source_latents: the clean source latents (batch, channels, frames, height, width), in the
        space the transformer works in, for calls that do not encode the source video
        themselves (a pipeline given latents=..., or a bare transformer). Channels first for
        every family, also where the transformer takes (batch, frames, channels, ...).
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
        check_bool("recovery", self.recovery)
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
            if self.tape.reuses:
                fail("tape", f"TapeConfig(budget={self.tape.budget!r})", "a TapeConfig without reuse steps, e.g. "
                     "TapeConfig(keep=..., budget='even') (LIP restores its pruned tokens from their references at "
                     "every step)")
            if self.tape.context == "full":
                fail("tape", "TapeConfig(context='full')", "a TapeConfig with context 'kept' (LIP's Attention Recovery "
                     "decides the keys of its spans)")
            if self.tape.cache == "block":
                fail("tape", "TapeConfig(cache='block')", "a TapeConfig with cache 'span' or 'none' (LIP's recovered "
                     "attention runs its own processor)")


__all__ = ["TapeConfig", "LipConfig", "BudgetProfile", "IMPORTANCE_KINDS", "SCHEDULE_SHAPES", "CACHE_KINDS", "CONTEXT_KINDS",
           "CONTEXT_KEYS", "CONTEXT_STORAGE", "KV_SOURCES", "RESTORE_MODES"]
