"""The pruning runtime: diffusers hooks that run spans of blocks on a kept subset of tokens.

One `TokenPruner` per transformer. A hook on the transformer reads each forward's grid and
noise level; hooks on the blocks gather the kept tokens (and their per-token inputs) at a
span's first block and scatter the results back at its last block, so pruned tokens pass the
span unchanged. Per-call state lives in one `CallState`, shared by the transformers of a
pipeline and reset at every pipeline call.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .adapters import Adapter
from .config import TapeConfig
from .importance import attention_received, random_importance, sample_queries
from .schedule import keep_at, plan_keeps
from .selection import kept_per_frame, select_global, select_per_frame, smooth_over_time
from .stats import ForwardRecord, PruneStats, SpanRecord
from .tokens import TokenGrid, scatter_tokens

HOOK_NAME = "vidprune"


@functools.lru_cache(maxsize=None)
def _parameters(function: Callable) -> list[str]:
    names = list(inspect.signature(function).parameters)
    return names[1:] if names and names[0] == "self" else names


def bind_arguments(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of a call of `function` (an unbound method) by parameter name."""
    named = dict(zip(_parameters(function), args))
    named.update(kwargs)
    return named


@dataclass
class ForwardState:
    """One transformer forward in progress."""

    grid: TokenGrid
    batch: int
    context_tokens: int
    sigma: float
    keep: float
    active: bool
    record: ForwardRecord
    reused: dict[int, torch.Tensor] | None
    selections: dict[int, torch.Tensor] = field(default_factory=dict)
    # The open span: its full-length input, the kept indices and gathered per-token inputs.
    span_input: torch.Tensor | None = None
    index: torch.Tensor | None = None
    token_inputs: dict[str, Any] = field(default_factory=dict)


class CallState:
    """State of one pipeline call; `reset` at the start of each call."""

    def __init__(self, config: TapeConfig) -> None:
        self.config = config
        self.reset()

    def reset(self, scheduler: Any = None) -> None:
        self.scheduler = scheduler
        self.stats = PruneStats()
        self.step_sigmas: list[float] | None = None
        self.plan: list[float] | None = None
        self.current: ForwardState | None = None
        # (sigma, batch, selections) of the last forward, for its CFG partner call.
        self.last_selections: tuple[float, int, dict[int, torch.Tensor]] | None = None
        self._queries: dict[tuple[TokenGrid, torch.device], torch.Tensor] = {}

    @property
    def num_train_timesteps(self) -> int:
        return getattr(getattr(self.scheduler, "config", None), "num_train_timesteps", 1000)

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

    def queries(self, grid: TokenGrid, device: torch.device) -> torch.Tensor:
        key = (grid, device)
        if key not in self._queries:
            self._queries[key] = sample_queries(grid, self.config.query_samples, self.config.seed, device)
        return self._queries[key]


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # inclusive


class TokenPruner:
    """Pruning of one transformer: spans, selection and the per-forward bookkeeping."""

    def __init__(self, transformer: torch.nn.Module, adapter: Adapter, config: TapeConfig, state: CallState):
        self.transformer = transformer
        self.adapter = adapter
        self.config = config
        self.state = state
        num_layers = len(adapter.blocks(transformer))
        starts = config.span_starts(num_layers)
        self.spans = [Span(s, e - 1) for s, e in zip(starts, starts[1:] + [num_layers])]

    # -- transformer level --------------------------------------------------------------
    def begin_forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, context_tokens: int) -> None:
        state = self.state
        grid = self.adapter.token_grid(self.transformer, hidden_states)
        sigma = float(timestep.max()) / state.num_train_timesteps
        step, keep = state.step_and_keep(sigma)
        batch = hidden_states.shape[0]
        reused = None
        last = state.last_selections
        if self.config.share_cfg_selection and last is not None and last[0] == sigma and last[1] == batch:
            reused, state.last_selections = last[2], None
        active = keep < 1.0 and kept_per_frame(grid, keep) < grid.per_frame
        record = ForwardRecord(step=step, sigma=sigma, keep=keep if active else 1.0, tokens=grid.size,
                               shared_selection=reused is not None and active)
        state.current = ForwardState(grid, batch, context_tokens, sigma, keep, active, record, reused)

    def end_forward(self) -> None:
        state, current = self.state, self.state.current
        if current is None:
            return
        record = current.record
        tokens_at = {layer: span.tokens for span in record.spans for layer in range(span.start, span.end + 1)}
        num_layers = len(self.adapter.blocks(self.transformer))
        flops = functools.partial(self.adapter.block_flops, self.transformer, context_tokens=current.context_tokens)
        record.block_flops = sum(flops(tokens_at.get(layer, record.tokens)) for layer in range(num_layers))
        record.block_flops_unpruned = num_layers * flops(record.tokens)
        state.stats.forwards.append(record)
        if current.reused is None:
            state.last_selections = (current.sigma, current.batch, current.selections) if current.active else None
        state.current = None

    # -- block level --------------------------------------------------------------------
    def run_block(self, block: torch.nn.Module, forward: Callable, span: Span, layer: int, args: tuple, kwargs: dict):
        current = self.state.current
        if current is None or not current.active:
            return forward(*args, **kwargs)
        inputs = bind_arguments(type(block).forward, args, kwargs)
        if layer == span.start:
            index = self._select(block, inputs, span.start)
            gathered = self.adapter.gather_block_inputs(inputs, index)
            current.span_input, current.index = inputs["hidden_states"], index
            current.token_inputs = {k: v for k, v in gathered.items() if k != "hidden_states"}
            recorded = index if self.config.record_selections else None
            current.record.spans.append(SpanRecord(span.start, span.end, index.shape[1], current.grid, recorded))
            inputs.update(gathered)
        else:
            inputs.update(current.token_inputs)
        output = forward(**inputs)
        if layer == span.end:
            output = scatter_tokens(current.span_input, current.index, output)
            current.span_input, current.index, current.token_inputs = None, None, {}
        return output

    def _select(self, block: torch.nn.Module, inputs: dict[str, Any], span_start: int) -> torch.Tensor:
        current, config = self.state.current, self.config
        if current.reused is not None:
            return current.reused[span_start]
        hidden_states, grid = inputs["hidden_states"], current.grid
        if hidden_states.shape[1] != grid.size:
            raise RuntimeError(
                f"vidprune expected {grid.size} video tokens ({grid}) but the block got {hidden_states.shape[1]}; "
                "sequence-splitting parallelism is not supported inside pruned spans"
            )
        if config.importance == "random":
            seed = hash((config.seed, round(current.sigma, 6), span_start)) % (2**31)
            scores = random_importance(hidden_states.shape[0], grid, seed, hidden_states.device)
        else:
            query, key = self.adapter.query_key(block, inputs, self.state.queries(grid, hidden_states.device))
            scores = attention_received(query, key)
        scores = smooth_over_time(scores, grid, config.temporal_sigma, config.temporal_radius)
        select = select_per_frame if config.per_frame else select_global
        index = select(scores, grid, current.keep)
        current.selections[span_start] = index
        return index


class TransformerHook(ModelHook):
    """Reads each forward's token grid and noise level; records stats after it."""

    def __init__(self, pruner: TokenPruner) -> None:
        super().__init__()
        self.pruner = pruner

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        named = bind_arguments(type(module).forward, args, kwargs)
        context = named.get("encoder_hidden_states")
        self.pruner.begin_forward(
            named["hidden_states"],
            named[self.pruner.adapter.timestep_argument],
            context.shape[1] if context is not None else 0,
        )
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.pruner.end_forward()
        return output


class BlockHook(ModelHook):
    """Runs one block of a span on the kept tokens."""

    def __init__(self, pruner: TokenPruner, span: Span, layer: int) -> None:
        super().__init__()
        self.pruner, self.span, self.layer = pruner, span, layer

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.pruner.run_block(module, self.fn_ref.original_forward, self.span, self.layer, args, kwargs)


def attach(transformer: torch.nn.Module, adapter: Adapter, config: TapeConfig, state: CallState) -> TokenPruner:
    """Register the hooks of a new pruner on `transformer`."""
    pruner = TokenPruner(transformer, adapter, config, state)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(TransformerHook(pruner), HOOK_NAME)
    blocks = adapter.blocks(transformer)
    for span in pruner.spans:
        for layer in range(span.start, span.end + 1):
            block_registry = HookRegistry.check_if_exists_or_initialize(blocks[layer])
            block_registry.register_hook(BlockHook(pruner, span, layer), HOOK_NAME)
    registry.invalidate_child_registries_cache()
    return pruner


def detach(transformer: torch.nn.Module) -> None:
    """Remove vidprune's hooks from `transformer` (and its blocks), if any."""
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(HOOK_NAME, recurse=True)
        registry.invalidate_child_registries_cache()


def pruner_of(transformer: torch.nn.Module) -> TokenPruner | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.pruner if hook is not None else None
