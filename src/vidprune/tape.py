"""TAPE in the runtime: per-step budget, the refreshing selection at every span start (one
`Selector`, also used by LIP + TAPE), the token cache of pruned tokens, and sharing of a step's
selection between its two CFG calls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .config import TapeConfig
from .context import FullContext
from .importance import attention_log_normalizer, attention_received, random_importance, sample_queries
from .parallel import SequenceShard, select_sharded
from .refresh import SpanMemory, memory_estimate, refresh_scores, relative_change, remember_span
from .runtime import CallState, ForwardState, OpenSpan, Span, TokenPruner, spans_from_starts
from .budget import keep_at, plan_keeps
from .selection import (budgets_among, kept_per_frame, select_among, select_global, select_per_frame,
                        smooth_over_time)
from .tokens import TokenGrid, scatter_tokens, with_leading


class TapeState(CallState):
    """Per-call TAPE state: the query sample, and per denoising loop the keep of every step, the last
    selections (for the CFG partner call) and every span's memory of its tokens."""

    def reset(self, pipeline: Any = None) -> None:
        super().reset(pipeline)
        self._queries: dict[tuple[TokenGrid, torch.device], torch.Tensor] = {}
        self.start_loop()

    def start_loop(self) -> None:
        """Fresh state for a denoising loop, planned at its first forward."""
        self._loop_timesteps: Any = None  # the scheduler's timesteps the plan was made for
        self.step_sigmas: list[float] | None = None
        self.step_keeps: list[float] | None = None
        # (sigma, batch, {span start: index}) of the last forward, for its CFG partner call.
        self.last_selections: tuple[float, int, dict[int, torch.Tensor]] | None = None
        # (transformer, span start, guidance branch) -> what the span remembers of its tokens
        self.memory: dict[tuple[int, int, int], SpanMemory] = {}

    def step_and_keep(self, sigma: float, adapter: Any) -> tuple[int | None, float]:
        """Step index within the denoising loop (None when the call's steps are unknown) and keep
        ratio; `adapter` says where the pipeline switches transformers (their memories start empty)."""
        if self.scheduler is None:
            return None, keep_at(self.config, sigma)
        if self.scheduler.timesteps is not self._loop_timesteps:
            # The first forward of a denoising loop: the call's, or one after the pipeline set the
            # scheduler's timesteps again (FramePack denoises each latent section so, Wan2.2-Animate
            # each segment). Each loop gets a plan of its own, dense first steps included, and the
            # spans' memories of another loop's latents are dropped. set_timesteps is how every
            # diffusers pipeline starts a loop, so this needs no hook into a pipeline's own loop
            # (watching the timestep rise would miss a loop starting no higher than the last one
            # ended: one-step sections). Its steps are the scheduler's from this one on
            # (video-to-video starts part way down the schedule).
            self.start_loop()
            timesteps = self.scheduler.timesteps.tolist()
            all_sigmas = [t / self.num_train_timesteps for t in timesteps]
            first = min(range(len(all_sigmas)), key=lambda i: abs(all_sigmas[i] - sigma))
            self.step_sigmas = all_sigmas[first:]
            self.step_keeps = plan_keeps(self.config, self.step_sigmas, adapter.model_starts(self.pipeline, timesteps[first:]))
            self._loop_timesteps = self.scheduler.timesteps  # once planned (a refused plan is tried again)
        step = min(range(len(self.step_sigmas)), key=lambda i: abs(self.step_sigmas[i] - sigma))
        return step, self.step_keeps[step]

    def selections_for(self, sigma: float, batch: int, pruning: bool) -> tuple[dict[int, torch.Tensor] | None, dict]:
        """For a new forward: the selections of this step's first CFG call to reuse (None if this
        is the first call, sharing is off, or there is no call to share within), and the dict
        this call's own selections go in."""
        last, fresh = self.last_selections, {}
        if not self.in_call:
            return None, fresh
        if self.config.share_cfg_selection and last is not None and last[:2] == (sigma, batch):
            self.last_selections = None
            return last[2], fresh
        self.last_selections = (sigma, batch, fresh) if pruning else None
        return None, fresh

    def tracks_history(self, branch: int) -> bool:
        """Whether a forward of this guidance branch keeps its spans' change and staleness: the
        branch that selects does; a CFG partner that reuses its selection need not."""
        return (self.config.refreshes and self.config.token_steps
                and (not self.config.share_cfg_selection or branch == 0))

    def remembers(self, branch: int) -> bool:
        """Whether a forward of this branch keeps span memories: a cache, or its history."""
        return self.config.keep < 1.0 and (self.config.cache != "none" or self.tracks_history(branch))

    def memory_of(self, transformer: torch.nn.Module, span_start: int, branch: int) -> SpanMemory:
        return self.memory.setdefault((id(transformer), span_start, branch), SpanMemory())

    def memory_bytes(self) -> int:
        return sum(memory.nbytes() for memory in self.memory.values())

    def queries(self, grid: TokenGrid, device: torch.device) -> torch.Tensor:
        key = (grid, device)
        if key not in self._queries:
            self._queries[key] = sample_queries(grid, self.config.query_samples, self.config.seed, device)
        return self._queries[key]


@dataclass(frozen=True)
class Candidates:
    """The tokens a TAPE span may choose from when another method (LIP) prunes first."""

    keep: torch.Tensor  # (tokens,) bool
    frame_counts: tuple[int, ...]  # candidates per frame, on the host
    reference: torch.Tensor  # (tokens,) each token's reference: a pruned position takes its reference's score
    queries: torch.Tensor  # the query sample among the candidates


class Selector:
    """TAPE's choice of the tokens a span computes: temporally smoothed attention importance,
    plus each token's change and staleness from the span's memory, then per-frame top-k."""

    def __init__(self, adapter: Any, config: TapeConfig) -> None:
        self.adapter, self.config = adapter, config

    def __call__(self, block: torch.nn.Module, inputs: dict[str, Any], state: TapeState, current: ForwardState,
                 span_start: int, keep: float, memory: SpanMemory | None,
                 candidates: Candidates | None = None) -> torch.Tensor:
        """Sorted (batch or 1, kept) indices, the tokens every span computes among them
        (`ForwardState.leading`); `memory` must hold the span's history when the config refreshes."""
        index = self._select(block, inputs, state, current, span_start, keep, memory, candidates)
        return with_leading(index, current.leading, current.grid.size)

    def _select(self, block: torch.nn.Module, inputs: dict[str, Any], state: TapeState, current: ForwardState,
                span_start: int, keep: float, memory: SpanMemory | None, candidates: Candidates | None) -> torch.Tensor:
        config, grid, shard = self.config, current.grid, current.shard
        hidden_states = inputs["hidden_states"]
        prefix = current.prefix  # the tokens before the grid's (FramePack's history): never selected
        # Under context parallelism every per-token term is computed on this rank's chunk and
        # gathered: all ranks score the full sequence alike and make the same selection.
        full = (lambda x: x) if shard is None else shard.gather
        attention = None
        if config.attention_weight > 0:
            queries = candidates.queries if candidates is not None else state.queries(grid, hidden_states.device)
            halved = candidates is None and shard is None and self.batched_guidance(state)
            # Batched CFG: only the conditional half's selection is used (below), so only that
            # half is scored (the importance was a third of CogVideoX-5B's pruned forward).
            scored = conditional_half(inputs, hidden_states.shape[0]) if halved else inputs
            attention = token_scores(self.adapter, block, scored, config, queries, current.sigma, span_start, grid,
                                     shard, prefix)
            if halved:
                attention = attention.repeat(2, 1)
            if candidates is not None:
                attention = attention[:, candidates.reference]
            attention = smooth_over_time(attention, grid, config.temporal_sigma, config.temporal_radius)
        scores = attention
        if config.refreshes:
            change = (full(relative_change(hidden_states[:, prefix:], memory.compared_input[:, prefix:]))
                      if config.change_weight > 0 else None)
            weights = (config.attention_weight, config.change_weight, config.staleness_weight)
            among = candidates.keep if candidates is not None else None
            if candidates is not None:
                budget = budgets_among(candidates.keep, grid, keep)
            else:  # per frame (select_global keeps about as many per frame)
                budget = torch.full((grid.frames,), kept_per_frame(grid, keep), device=hidden_states.device)
            scores = refresh_scores(attention, change, full(memory.staleness[:, prefix:]), weights, config.refresh_every,
                                    grid, budget, among)
        if candidates is not None:
            return select_among(scores, candidates.keep, candidates.frame_counts, grid, keep)
        if shard is not None:
            return select_sharded(scores, grid, kept_per_frame(grid, keep) * grid.frames, shard, config.per_frame)
        select = select_per_frame if config.per_frame else select_global
        if self.batched_guidance(state):
            # Both CFG branches in one batch: the unconditional half computes the tokens the
            # conditional half selects, as a step's second call reuses the first's when the
            # branches are separate calls (CFG branches must compute the same tokens). One
            # prompt's selection stays (1, kept), shared by broadcasting: no per-sample check.
            conditional = select(scores.chunk(2)[1], grid, keep)
            return conditional if conditional.shape[0] == 1 else conditional.repeat(2, 1)
        return select(scores, grid, keep)

    def batched_guidance(self, state: TapeState) -> bool:
        """Whether the forward carries both CFG branches as [unconditional; conditional] halves
        of its batch and shares one selection between them."""
        return self.config.share_cfg_selection and self.adapter.guidance_in_batch(state.pipeline)


def conditional_half(inputs: dict[str, Any], batch: int) -> dict[str, Any]:
    """A forward's block inputs restricted to the conditional (second) half of a batch of
    [unconditional; conditional] samples: every tensor (alone or in a tuple, like RoPE tables)
    whose leading dimension is the batch; the rest as it is."""
    def half(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value.chunk(2)[1]
        if isinstance(value, tuple):
            return tuple(half(item) for item in value)
        return value

    return {name: half(value) for name, value in inputs.items()}


def check_graphs(config: TapeConfig) -> None:
    """Refuse what CUDA graphs of whole spans cannot run: cache "block" replays each block, full
    context moves the pruned tokens' states after each block."""
    if config.cache == "block":
        raise ValueError("TapeConfig(cache='block') replays every block on the pruned tokens, per block outside "
                         "a graph: with compile_blocks(graphs=True) use cache='span' (the default)")
    if config.context == "full":
        raise ValueError("TapeConfig(context='full') keeps the pruned tokens' states per block, outside a graph: with "
                         "compile_blocks(graphs=True) use context='kept', or compile_blocks() without graphs=True")


def refuse_without_room(config: TapeConfig, needed: int, free: int, tokens: int, device: str) -> None:
    """A ValueError when a call's token memory (`needed` bytes) exceeds the `free` bytes of its
    device, naming the setting that needs less: the block cache's, full context's storage, its keys."""
    if needed <= free:
        return
    settings = f"cache={config.cache!r}" + (f", context='full', context_keys={config.context_keys!r}, "
                                             f"context_storage={config.context_storage!r}" if config.context == "full" else "")
    lighter = ("cache='span' (one residual per span and branch)" if config.cache == "block" else
               "context_storage='float8' (half the memory)" if config.context_storage != "float8" else
               "context_keys='replayed' (one residual per block, half the keys' size)"
               if config.context_keys == "remembered" else "context='kept' (one residual per span)")
    raise ValueError(f"TapeConfig({settings}) needs about {needed / 2**30:.1f} GiB for its token cache at {tokens} "
                     f"tokens and {free / 2**30:.1f} GiB are free on {device}: use {lighter}")


class TapePruner(TokenPruner):
    def __init__(self, transformer: torch.nn.Module, adapter, config: TapeConfig, state: TapeState) -> None:
        num_layers = len(adapter.blocks(transformer))
        starts = config.span_starts(num_layers)
        if not config.token_steps:  # dense and reuse steps only: one span, one residual per branch
            starts = [0]
        # With reuse steps, the layers before the first pruned span form a span of their own that
        # never prunes: on a reuse step no block runs at all, as a step cache skips a step (measured
        # on a Wan2.1-1.3B shape, H200: a reuse forward 2.1 ms this way, 41.3 ms running layers 0-1;
        # on the demo model within 0.2 dB of each other: benchmarks/results/budget).
        self.lead = Span(0, starts[0] - 1) if config.reuses and starts[0] > 0 else None
        spans = spans_from_starts(starts, num_layers)
        super().__init__(transformer, adapter, config, state, [self.lead, *spans] if self.lead else spans)
        self.selector = Selector(adapter, config)
        self.partner_selections: dict[int, torch.Tensor] | None = None  # this step's first CFG call's
        self.selections: dict[int, torch.Tensor] = {}
        self.fills = False  # this forward computes every token to fill the spans' memory
        self.reusing = False  # a reuse step (keep 0): spans with a memory run no block
        self.block_cache = BlockCache(self) if config.cache == "block" else None
        self.context = FullContext(self) if config.context == "full" else None
        self._span_end = {span.start: span.end for span in spans}  # the pruned spans (not the lead)
        self._originals: list[tuple[torch.nn.Module, Any]] = []  # attention processors replaced for full context

    def check_graphs(self) -> None:
        check_graphs(self.config)

    def check_parallel(self, shard: SequenceShard) -> None:
        super().check_parallel(shard)
        if self.context is not None:
            raise ValueError("TapeConfig(context='full') is not supported under context parallelism yet (each rank would "
                             "need every rank's pruned keys): use context='kept', or run on one GPU")

    def on_attach(self) -> None:
        if self.block_cache is not None:
            self.block_cache.attach()
        if self.context is not None:  # the pruned spans' self-attention takes the pruned tokens' keys
            blocks = self.adapter.blocks(self.transformer)
            for start, end in self._span_end.items():
                for layer in range(start, end + 1):
                    attention = self.adapter.self_attention(blocks[layer])
                    self._originals.append((attention, attention.processor))
                    attention.processor = self.adapter.recovery_processor(attention.processor, self, layer)

    def on_detach(self) -> None:
        if self.block_cache is not None:
            self.block_cache.detach()
        for attention, processor in self._originals:
            attention.processor = processor
        self._originals = []

    def extends_attention(self) -> bool:
        # A span computing every token adds no keys; it only has keys to remember ("remembered").
        current = self.state.current
        return (self.context is not None and super().extends_attention() and current.span.start in self._span_end
                and self.state.remembers(current.branch)
                and (current.span.index is not None or self.context.keys == "remembered"))

    def attention_keys(self) -> int | None:
        return self.state.current.record.tokens if self.context is not None else None

    def plan_forward(self, current: ForwardState) -> None:
        state, grid = self.state, current.grid
        step, keep = state.step_and_keep(current.sigma, self.adapter)
        batch = current.inputs["hidden_states"].shape[0]
        self.reusing = keep == 0.0
        pruning = 0.0 < keep < 1.0 and kept_per_frame(grid, keep) < grid.per_frame
        # Unpruned steps still run through the spans, keeping every token, so that the spans
        # remember every token's update for the pruned and reuse steps.
        self.fills = not pruning and not self.reusing and state.remembers(current.branch)
        current.active = pruning or self.reusing or self.fills
        current.record.step, current.record.keep = step, keep if pruning or self.reusing else 1.0
        self.partner_selections, self.selections = state.selections_for(current.sigma, batch, pruning)
        current.record.shared_selection = self.partner_selections is not None and pruning
        if current.active and not state.memory:
            self.check_memory_fits(current)

    def check_memory_fits(self, current: ForwardState) -> None:
        """At a call's first forward on a GPU: refuse a token cache the device has no room for,
        before any step runs, naming a setting that needs less."""
        hidden_states = current.inputs["hidden_states"]
        config = self.config
        if not hidden_states.is_cuda or (config.cache != "block" and config.context != "full"):
            return
        refuse_without_room(config, self.memory_needed(current), torch.cuda.mem_get_info(hidden_states.device)[0],
                            current.grid.size, str(hidden_states.device))

    def memory_needed(self, current: ForwardState) -> int:
        """The bytes the spans' memories will hold in this call (refresh.memory_estimate). The
        lead span (with reuse steps) holds one residual per branch and nothing else: it never
        selects, so it needs no history and no context rows."""
        hidden_states = current.inputs["hidden_states"]
        config, adapter, transformer = self.config, self.adapter, self.transformer
        pruned = [span for span in self.spans if span != self.lead]
        tokens = current.record.tokens if current.shard is None else current.shard.size  # prefix included
        branches = 1 if adapter.guidance_batched else 2  # batched CFG: both branches are in the batch
        # (the families without the block cache have no branch_modules; the count is used for it alone)
        branch_modules = len(adapter.branch_modules(adapter.blocks(transformer)[0])) if config.cache == "block" else 0
        needed = memory_estimate(
            config.cache, config.refreshes, len(pruned), sum(s.end - s.start + 1 for s in pruned), tokens,
            adapter.hidden_size(transformer), hidden_states.element_size(), branches=branches,
            batch=hidden_states.shape[0], branch_modules=branch_modules,
            context_keys=config.context_keys if config.context == "full" else None,
            context_float8=config.context_storage == "float8",
        )
        lead_residual = hidden_states.shape[0] * tokens * adapter.hidden_size(transformer) * hidden_states.element_size()
        return needed + (branches * lead_residual if self.lead is not None else 0)

    def held_bytes(self) -> int:
        return self.state.memory_bytes()

    def memory(self, span_start: int) -> SpanMemory:
        return self.state.memory_of(self.transformer, span_start, self.state.current.branch)

    def select(self, block: torch.nn.Module, inputs: dict[str, Any], span: Span) -> torch.Tensor | None:
        current = self.state.current
        if self.fills or self.reusing:  # (a reuse step whose span has no memory yet computes every token)
            current.record.keep = 1.0
            return None
        if span == self.lead:  # computes every token, for the next reuse step's residual
            return None
        memory = self.memory(span.start) if self.state.remembers(current.branch) else None
        if memory is not None and not memory.filled:  # nothing to stand in for pruned tokens yet
            current.record.keep = 1.0
            return None
        if self.context is not None and not self.context.ready(span, memory):  # (a step cache skipped the fill)
            return None
        # A cache (FirstBlockCache, MagCache) can skip this span in the step's first call: then
        # there is nothing to share and this call selects afresh.
        if self.partner_selections is not None and span.start in self.partner_selections:
            return self.partner_selections[span.start]
        if self.config.refreshes and memory.compared_input is None:
            return None  # this branch has no history to select with (a step cache skipped its partner's span)
        index = self.selector(block, inputs, self.state, current, span.start, current.record.keep, memory)
        self.selections[span.start] = index
        return index

    def after_block(self, block: torch.nn.Module, layer: int, span: OpenSpan, block_input: torch.Tensor,
                    block_output: torch.Tensor) -> None:
        if self.block_cache is not None:
            self.block_cache.after_block(block, layer, span, self.memory(span.start))
        if self.context is not None and span.start in self._span_end and self.state.remembers(self.state.current.branch):
            self.context.after_block(layer, block_input, block_output, last=layer == self._span_end[span.start])

    def reuses_forward(self) -> bool:
        return self.reusing and all(self.memory(span.start).residual is not None for span in self.spans)

    def reuse_span(self, span: Span, open_span: OpenSpan) -> tuple[torch.Tensor, Any] | None:
        """A reuse step: every token leaves the span with its input plus the residual the span
        gave it when last computed; a text stream (joint attention) likewise with its own."""
        if not self.reusing:
            return None
        memory = self.memory(span.start)
        if memory.residual is None or (self.adapter.returns_text_stream and memory.text_residual is None):
            return None
        text = open_span.inputs["encoder_hidden_states"] + memory.text_residual if self.adapter.returns_text_stream else None
        return open_span.input + memory.residual, text

    def finish_rest(self, span: Span, open_span: OpenSpan, rest: Any) -> Any:
        if self.config.reuses and self.adapter.returns_text_stream and self.state.remembers(self.state.current.branch):
            # the text stream's span residual, for reuse steps (next_block_inputs: the text
            # stream enters a block as encoder_hidden_states)
            self.memory(span.start).text_residual = rest - open_span.inputs["encoder_hidden_states"]
        return rest

    def finish_span(self, span: Span, open_span: OpenSpan, kept_output: torch.Tensor) -> torch.Tensor:
        branch = self.state.current.branch
        if not self.state.remembers(branch):
            return super().finish_span(span, open_span, kept_output)
        if span == self.lead:  # every token computed; only the residual is kept, for reuse steps
            self.memory(span.start).residual = kept_output - open_span.input
            return kept_output
        return remember_span(self.memory(span.start), open_span.input, open_span.index, kept_output, self.config.cache,
                             self.state.tracks_history(branch), open_span.replayed, self.config.change_since)


class BlockCache:
    """TAPE's cache "block": every block of a span remembers its branch outputs (self-attention,
    cross-attention, feed-forward, before their modulation gates) for each token; a pruned
    token goes through the span's blocks on its remembered outputs with the current step's
    gates (the adapter's replay_block), as token caches for DiTs do."""

    def __init__(self, pruner: TapePruner) -> None:
        self.pruner = pruner
        self.captured: list[torch.Tensor | None] = []
        self.handles: list[Any] = []

    def attach(self) -> None:
        pruner = self.pruner
        blocks = pruner.adapter.blocks(pruner.transformer)
        for span in pruner.spans:
            for layer in range(span.start, span.end + 1):
                for i, module in enumerate(pruner.adapter.branch_modules(blocks[layer])):
                    self.handles.append(module.register_forward_hook(self._capture(i)))

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _capture(self, position: int):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
            current = self.pruner.state.current
            if current is not None and current.span is not None:
                while len(self.captured) <= position:
                    self.captured.append(None)
                self.captured[position] = output
        return hook

    def after_block(self, block: torch.nn.Module, layer: int, span: OpenSpan, memory: SpanMemory) -> None:
        outputs, self.captured = self.captured, []
        if span.index is None:  # every token computed: remember all
            memory.branch_outputs[layer] = outputs
            return
        remembered = memory.branch_outputs[layer]
        state = span.input if span.replayed is None else span.replayed
        span.replayed = self.pruner.adapter.replay_block(block, span.inputs, state, remembered)
        memory.branch_outputs[layer] = [scatter_tokens(r, span.index, o) for r, o in zip(remembered, outputs)]


def token_scores(adapter, block: torch.nn.Module, inputs: dict[str, Any], config: TapeConfig, queries: torch.Tensor,
                 sigma: float, span_start: int, grid: TokenGrid, shard: SequenceShard | None = None,
                 prefix: int = 0) -> torch.Tensor:
    """(batch, tokens) importance of every token of the grid at a span's first block: attention
    received from `queries` (grid positions; the blocks' sequence holds `prefix` other tokens
    first), or random (seeded by the step and span). With a shard, `inputs` are its chunk and the
    importance is still over all tokens (see sharded_attention_received)."""
    hidden_states = inputs["hidden_states"]
    if config.importance == "random":  # drawn alike on every rank
        seed = hash((config.seed, round(sigma, 6), span_start)) % (2**31)
        return random_importance(hidden_states.shape[0], grid, seed, hidden_states.device)
    if shard is not None:
        return sharded_attention_received(adapter, block, inputs, queries, shard)
    query, key = adapter.query_key(block, inputs, queries + prefix)
    # The prefix's keys share each query's softmax, as in the model; only the grid's scores count.
    return attention_received(query, key)[:, prefix:]


def sharded_attention_received(adapter, block: torch.nn.Module, inputs: dict[str, Any], queries: torch.Tensor,
                               shard: SequenceShard) -> torch.Tensor:
    """Attention received by every token from the sampled `queries` (global indices) when each
    rank holds one chunk of the tokens: the queries are assembled from the ranks that hold
    them, each rank scores its own keys, normalised by the log-sum-exp over all ranks' keys."""
    # The query sample is sorted, so this rank's queries are one contiguous run of it.
    bounds = torch.tensor([shard.start, shard.start + shard.size], device=queries.device)
    low, high = torch.searchsorted(queries, bounds).tolist()
    query, key = adapter.query_key(block, inputs, queries[low:high] - shard.start)
    every_query = query.new_zeros(*query.shape[:2], queries.shape[0], query.shape[3])
    every_query[:, :, low:high] = query
    every_query = shard.sum(every_query)  # zeros elsewhere: the sum is the union
    log_normalizer = shard.gather(attention_log_normalizer(every_query, key).unsqueeze(0), dim=0).logsumexp(dim=0)
    return shard.gather(attention_received(every_query, key, log_normalizer=log_normalizer))
