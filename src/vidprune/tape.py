"""TAPE in the runtime: per-step budget, attention-received scoring, smoothing and top-k at
every span start, and sharing of a step's selection between its two CFG calls."""

from __future__ import annotations

from typing import Any

import torch

from .config import TapeConfig
from .importance import attention_received, random_importance, sample_queries
from .runtime import CallState, ForwardState, Span, TokenPruner, spans_from_starts
from .schedule import keep_at, plan_keeps
from .selection import kept_per_frame, select_global, select_per_frame, smooth_over_time
from .tokens import TokenGrid, scatter_tokens


class TapeState(CallState):
    """Per-call TAPE state: the step plan, the last selections (for the CFG partner call) and
    the query sample."""

    def reset(self, pipeline: Any = None) -> None:
        super().reset(pipeline)
        self.step_sigmas: list[float] | None = None
        self.plan: list[float] | None = None
        # (sigma, batch, {span start: index}) of the last forward, for its CFG partner call.
        self.last_selections: tuple[float, int, dict[int, torch.Tensor]] | None = None
        self._queries: dict[tuple[TokenGrid, torch.device], torch.Tensor] = {}
        # (guidance branch, span start) -> last span residual of every token, with reuse_residuals
        self.residuals: dict[tuple[int, int], torch.Tensor] = {}

    def step_and_keep(self, sigma: float) -> tuple[int | None, float]:
        """Step index within the call (None when the call's steps are unknown) and keep ratio."""
        if self.scheduler is None:
            return None, keep_at(self.config, sigma)
        if self.plan is None:
            # The first forward of the call: its steps are the scheduler's from this one on
            # (video-to-video starts part way down the schedule).
            all_sigmas = [t / self.num_train_timesteps for t in self.scheduler.timesteps.tolist()]
            first = min(range(len(all_sigmas)), key=lambda i: abs(all_sigmas[i] - sigma))
            self.step_sigmas = all_sigmas[first:]
            self.plan = plan_keeps(self.config, self.step_sigmas)
        step = min(range(len(self.step_sigmas)), key=lambda i: abs(self.step_sigmas[i] - sigma))
        return step, self.plan[step]

    def selections_for(self, sigma: float, batch: int, pruning: bool) -> tuple[dict[int, torch.Tensor] | None, dict]:
        """For a new forward: the selections of this step's first CFG call to reuse (None if this
        is the first call, or sharing is off), and the dict this call's own selections go in."""
        last, fresh = self.last_selections, {}
        if self.config.share_cfg_selection and last is not None and last[:2] == (sigma, batch):
            self.last_selections = None
            return last[2], fresh
        self.last_selections = (sigma, batch, fresh) if pruning else None
        return None, fresh

    def queries(self, grid: TokenGrid, device: torch.device) -> torch.Tensor:
        key = (grid, device)
        if key not in self._queries:
            self._queries[key] = sample_queries(grid, self.config.query_samples, self.config.seed, device)
        return self._queries[key]


class TapePruner(TokenPruner):
    def __init__(self, transformer: torch.nn.Module, adapter, config: TapeConfig, state: TapeState) -> None:
        num_layers = len(adapter.blocks(transformer))
        super().__init__(transformer, adapter, config, state, spans_from_starts(config.span_starts(num_layers), num_layers))
        self.reused: dict[int, torch.Tensor] | None = None
        self.selections: dict[int, torch.Tensor] = {}
        self.keep_all = False

    def plan_forward(self, current: ForwardState) -> None:
        state, grid = self.state, current.grid
        step, keep = state.step_and_keep(current.sigma)
        batch = current.inputs["hidden_states"].shape[0]
        pruning = keep < 1.0 and kept_per_frame(grid, keep) < grid.per_frame
        # With reuse_residuals, unpruned steps still run through the spans (keeping every
        # token) so that they record every token's residual.
        self.keep_all = not pruning and self.config.reuse_residuals and self.config.keep < 1.0
        current.active = pruning or self.keep_all
        current.record.step, current.record.keep = step, keep if pruning else 1.0
        self.reused, self.selections = state.selections_for(current.sigma, batch, pruning)
        current.record.shared_selection = self.reused is not None and pruning

    def select(self, block: torch.nn.Module, inputs: dict[str, Any], span: Span) -> torch.Tensor:
        if self.keep_all:
            return torch.arange(self.state.current.grid.size, device=inputs["hidden_states"].device).unsqueeze(0)
        # A cache (FirstBlockCache, MagCache) can skip this span in the step's first call: then
        # there is nothing to share and this call selects afresh.
        if self.reused is not None and span.start in self.reused:
            return self.reused[span.start]
        current, config = self.state.current, self.config
        grid = current.grid
        queries = self.state.queries(grid, inputs["hidden_states"].device)
        scores = token_scores(self.adapter, block, inputs, config, queries, current.sigma, span.start, grid)
        scores = smooth_over_time(scores, grid, config.temporal_sigma, config.temporal_radius)
        select = select_per_frame if config.per_frame else select_global
        index = select(scores, grid, current.record.keep)
        self.selections[span.start] = index
        return index

    def finish_span(self, span: Span, span_input: torch.Tensor, index: torch.Tensor, kept_output: torch.Tensor) -> torch.Tensor:
        if not self.config.reuse_residuals:
            return super().finish_span(span, span_input, index, kept_output)
        key = (self.state.current.branch, span.start)
        return scatter_with_residuals(self.state.residuals, key, span_input, index, kept_output)


def token_scores(adapter, block: torch.nn.Module, inputs: dict[str, Any], config: TapeConfig, queries: torch.Tensor,
                 sigma: float, span_start: int, grid: TokenGrid) -> torch.Tensor:
    """(batch, tokens) importance of every token at a span's first block: attention received
    from `queries`, or random (seeded by the step and span)."""
    hidden_states = inputs["hidden_states"]
    if config.importance == "random":
        seed = hash((config.seed, round(sigma, 6), span_start)) % (2**31)
        return random_importance(hidden_states.shape[0], grid, seed, hidden_states.device)
    query, key = adapter.query_key(block, inputs, queries)
    return attention_received(query, key)


def scatter_with_residuals(residuals: dict, key: tuple[int, int], span_input: torch.Tensor, index: torch.Tensor,
                           kept_output: torch.Tensor) -> torch.Tensor:
    """A span's full output with reuse_residuals: a pruned token gets the residual it had when
    the span last computed it, kept in `residuals` under key (guidance branch, span start),
    instead of passing unchanged."""
    cached = residuals.get(key)
    base = span_input if cached is None else span_input + cached
    output = scatter_tokens(base, index, kept_output)
    residuals[key] = output - span_input  # fresh for kept tokens, carried for pruned
    return output
