"""The pruning runtime: diffusers hooks that run spans of blocks on a kept subset of tokens.

One pruner per transformer. A hook on the transformer reads each forward's inputs; hooks on
the blocks gather the kept tokens (and their per-token inputs) at a span's first block and
scatter the results back at its last block. Which forwards prune, which tokens they keep and
what the pruned tokens get is the method's business (tape.py, lip.py); a selection is over the
video's token grid, and tokens a model holds before the grid's in its blocks' hidden states (a
prefix: FramePack's history) are computed in every span. Per-call state lives in one `CallState`,
shared by the transformers of a pipeline and reset at every pipeline call.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

from .adapters import Adapter
from .arguments import bind_arguments
from .graphs import Graph, SpanGraphs
from .parallel import SequenceShard, check_shard_length, is_cp_hook, shard_of
from .stats import ForwardRecord, PruneStats, SpanRecord
from .tokens import TokenGrid, scatter_tokens, with_prefix

HOOK_NAME = "vidprune"


def _taken(gathered: dict[str, Any], inputs: dict[str, Any]) -> dict[str, Any]:
    """The gathered per-token inputs a block takes: those among its own arguments. A span may
    run over blocks of two kinds that name an input differently (HunyuanVideo's RoPE tables),
    and a block without **kwargs refuses the other kind's name."""
    return {name: value for name, value in gathered.items() if name in inputs}


@dataclass
class OpenSpan:
    """The span a forward is in: its full-length input and first block's inputs, the computed
    tokens, their gathered per-token block inputs, and what a method keeps per span."""

    start: int
    input: torch.Tensor  # (batch, tokens, dim) hidden states entering the span
    inputs: dict[str, Any]  # the span's first block's arguments by name, full length
    index: torch.Tensor | None  # (batch or 1, kept) computed tokens; None: every token
    token_inputs: dict[str, Any] = field(default_factory=dict)  # gathered per-token inputs, hidden states aside
    replayed: torch.Tensor | None = None  # TAPE cache "block": the pruned tokens' state through the span
    recovery_keys: Any = None  # LIP: the key positions of recovered attention in this span
    key_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # LIP: RoPE tables at those positions
    context: Any = None  # TAPE's full context: the span's pruned tokens (context.PrunedTokens)
    # (output, rest) of the whole span, made at its first block, so its blocks pass: the kept
    # output of a CUDA graph of the span, or every token's output on a reuse step
    done: tuple[torch.Tensor, Any] | None = None
    reused: bool = False  # a reuse step: no block of the span ran


@dataclass
class ForwardState:
    """One transformer forward in progress."""

    grid: TokenGrid
    inputs: dict[str, Any]  # the transformer's forward arguments by name
    sigma: float
    branch: int  # guidance branch: the forward's place among the step's forwards (0: conditional)
    record: ForwardRecord
    active: bool = False
    tape_keep: float = 1.0  # LIP + TAPE: the share of LIP's kept tokens TAPE's spans compute
    span: OpenSpan | None = None
    shard: SequenceShard | None = None  # this rank's chunk of the tokens under context parallelism
    # Tokens the blocks' hidden states hold before the grid's (adapter.prefix_tokens: FramePack's
    # history): every span computes them; a method's selections and scores are over the grid's.
    prefix: int = 0
    # Grid tokens every span computes (adapter.leading_tokens: VACE's reference-image frames).
    leading: int = 0


class CallState:
    """State of one pipeline call; `reset` at the start of each call. Outside a pipeline call
    (a bare transformer) every forward stands alone: nothing is carried to the next."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.reset()

    def reset(self, pipeline: Any = None) -> None:
        self.pipeline = pipeline
        self.scheduler = getattr(pipeline, "scheduler", None)
        self.stats = PruneStats()
        self.current: ForwardState | None = None
        self.span_graphs: dict[int, SpanGraphs] = {}  # per pruner (id); dropped with the call
        self._step_sigma: float | None = None
        self._forwards_in_step = 0

    @property
    def in_call(self) -> bool:
        return self.pipeline is not None

    @contextlib.contextmanager
    def call(self, pipeline: Any) -> Iterator[None]:
        """Around one pipeline call: fresh state, dropped again after the call (its caches
        would otherwise hold device memory; the stats stay)."""
        self.reset(pipeline)
        try:
            yield
        finally:
            stats = self.stats
            self.reset()
            self.stats = stats

    def branch_of(self, sigma: float) -> int:
        """Which guidance branch a new forward at noise level sigma is: the diffusers pipelines
        call the transformer once per branch and step, conditional first."""
        if not self.in_call or sigma != self._step_sigma:
            self._step_sigma, self._forwards_in_step = sigma, 0
        self._forwards_in_step += 1
        return self._forwards_in_step - 1

    @property
    def num_train_timesteps(self) -> int:
        return getattr(getattr(self.scheduler, "config", None), "num_train_timesteps", 1000)


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # inclusive


def spans_from_starts(starts: list[int], num_layers: int) -> list[Span]:
    """Each span runs from its start to the layer before the next start, the last to the end."""
    return [Span(s, e - 1) for s, e in zip(starts, starts[1:] + [num_layers])]


class TokenPruner:
    """Runs spans of one transformer's blocks on kept tokens. Subclasses decide, per forward,
    whether to prune (`plan_forward`) and which tokens a span keeps (`select`), and may post-
    process the output (`finish_forward`)."""

    def __init__(self, transformer: torch.nn.Module, adapter: Adapter, config: Any, state: CallState,
                 spans: list[Span]) -> None:
        self.transformer = transformer
        self.adapter = adapter
        self.config = config
        self.state = state
        self.spans = spans
        self.num_layers = len(adapter.blocks(transformer))
        # vidprune.compile_blocks(graphs=True): makes the graph maker of a call's SpanGraphs
        self.graph_factory: Callable[[], Callable[[], Graph]] | None = None
        self.block_forwards: dict[int, Callable] = {}  # each span block's forward under vidprune's hook
        self.context: Any = None  # TAPE's full context (context.FullContext), which the processors ask

    # -- to be provided by a method -----------------------------------------------------
    def plan_forward(self, current: ForwardState) -> None:
        """Set current.active and the record's keep ratio and step for a new forward."""
        raise NotImplementedError

    def select(self, block: torch.nn.Module, inputs: dict[str, Any], span: Span) -> torch.Tensor | None:
        """Sorted kept token indices (batch or 1, kept) for the span starting at this block, the
        tokens every span computes among them (`ForwardState.leading`), or None to compute every
        token."""
        raise NotImplementedError

    def finish_forward(self, current: ForwardState, output: Any) -> Any:
        return output

    def held_bytes(self) -> int:
        """Device memory the method holds across forwards (its token caches)."""
        return 0

    def reuses_forward(self) -> bool:
        """Whether the forward in progress is a reuse step on which no span will run a block
        (an adapter can then skip work that only feeds the blocks: VACE's control blocks)."""
        return False

    def attention_keys(self) -> int | None:
        """Self-attention keys inside spans when they differ from the kept tokens."""
        return None

    def records_selections(self, span: Span) -> bool:
        """Whether the span's records keep the kept indices."""
        return getattr(self.config, "record_selections", False)

    def handles_forward(self) -> bool:
        """False while the method runs a forward of its own that must not be pruned."""
        return True

    def check_graphs(self) -> None:
        """Raise ValueError if this method's spans cannot run as CUDA graphs."""

    def on_attach(self) -> None:
        """After the hooks are registered (e.g. to install attention processors)."""

    def on_detach(self) -> None:
        """When the hooks are removed: undo `on_attach`."""

    def check_parallel(self, shard: SequenceShard) -> None:
        """Refuse, before a context-parallel forward computes anything, what the method cannot
        do on a chunk of the tokens (a ValueError naming it)."""
        if not self.adapter.supports_context_parallel:
            raise ValueError(f"vidprune does not prune {type(self.transformer).__name__} under context parallelism "
                             "yet; Wan (WanTransformer3DModel) is supported")
        if self.graph_factory is not None:  # the graphed span would run inside diffusers' split hooks' chain
            raise ValueError("compile_blocks(graphs=True) does not compose with context parallelism: compile without "
                             "graphs=True, or run on one GPU")

    # -- transformer level --------------------------------------------------------------
    def begin_forward(self, inputs: dict[str, Any]) -> None:
        if not self.handles_forward():
            return
        check_step_cache(self)
        if self.graph_factory is not None and torch.is_grad_enabled():
            # A replay records no autograd graph: gradients through it would be silently wrong.
            raise RuntimeError("compile_blocks(graphs=True) runs pruned spans for inference only: call the model "
                               "under torch.no_grad() (pipelines do), or compile_blocks without graphs=True")
        grid = self.adapter.token_grid(self.transformer, inputs)
        shard = shard_of(self.transformer, grid)
        if shard is not None:
            self.check_parallel(shard)
        sigma = float(inputs[self.adapter.timestep_argument].max()) / self.state.num_train_timesteps
        prefix = self.adapter.prefix_tokens(self.transformer, inputs)
        record = ForwardRecord(step=None, sigma=sigma, keep=1.0, tokens=prefix + grid.size,
                               context_tokens=self.adapter.context_tokens(self.transformer, inputs))
        self.state.current = ForwardState(grid, inputs, sigma, self.state.branch_of(sigma), record, shard=shard,
                                          prefix=prefix, leading=self.adapter.leading_tokens(self.transformer, inputs))
        self.plan_forward(self.state.current)

    def end_forward(self, output: Any) -> Any:
        current = self.state.current
        if current is None or not self.handles_forward():
            return output
        record = current.record
        span_at = {layer: span for span in record.spans for layer in range(span.start, span.end + 1)}
        flops = functools.partial(self.adapter.block_flops, self.transformer, context_tokens=record.context_tokens)
        unpruned = self.adapter.unpruned_flops(self.transformer, record.tokens, record.context_tokens)
        record.block_flops = (0.0 if record.unpruned_skipped else unpruned) + sum(
            (0.0 if span_at[layer].reused else flops(span_at[layer].tokens, keys=span_at[layer].keys))
            if layer in span_at else flops(record.tokens)
            for layer in range(self.num_layers)
        )
        record.block_flops_unpruned = unpruned + self.num_layers * flops(record.tokens)
        self.state.stats.forwards.append(record)
        self.state.stats.memory_bytes = max(self.state.stats.memory_bytes, self.held_bytes())
        output = self.finish_forward(current, output) if current.active else output
        self.state.current = None
        return output

    # -- block level --------------------------------------------------------------------
    def run_block(self, block: torch.nn.Module, forward: Callable, span: Span, layer: int, args: tuple, kwargs: dict):
        current = self.state.current
        if current is None or not current.active or not self.handles_forward():
            return forward(*args, **kwargs)
        inputs = bind_arguments(type(block).forward, args, kwargs)
        if layer == span.start:
            hidden_states = inputs["hidden_states"]
            check_shard_length(current.shard, current.grid, hidden_states.shape[1] - current.prefix)
            current.span = OpenSpan(span.start, hidden_states, inputs, None)
            reused = self.reuse_span(span, current.span)
            if reused is not None:  # a reuse step: nothing to score, select, gather or scatter
                current.span.done, current.span.reused = reused, True
                current.record.spans.append(SpanRecord(span.start, span.end, 0, current.grid, reused=True))
                return self._pass_block(span, layer, current.span)
            # A selection is global (the same on every rank under context parallelism); the
            # span runs on this rank's part of it.
            index = self.select(block, inputs, span)
            recorded = index if index is not None and self.records_selections(span) else None
            if index is not None and current.prefix:  # from grid positions to the blocks' sequence
                index = with_prefix(index, current.prefix)
            current.record.spans.append(SpanRecord(
                span.start, span.end, current.record.tokens if index is None else index.shape[1], current.grid,
                recorded, self.attention_keys(),
            ))
            if index is not None and current.shard is not None:
                index = current.shard.local_index(index)
            current.span.index = index
            if index is not None and self.graph_factory is not None:
                current.span.done = self._graphed_span(span)
            elif index is not None:
                gathered = self.adapter.gather_block_inputs(inputs, index)
                current.span.token_inputs = {k: v for k, v in gathered.items() if k != "hidden_states"}
                inputs = {**inputs, **_taken(gathered, inputs)}
        else:
            inputs = {**inputs, **_taken(current.span.token_inputs, inputs)}
        open_span = current.span
        if open_span.done is not None:
            return self._pass_block(span, layer, open_span)
        output = forward(**inputs)
        self.after_block(block, layer, open_span, inputs["hidden_states"], self.adapter.split_block_output(output)[0])
        if layer != span.end:
            return output
        hidden_states, rest = self.adapter.split_block_output(output)
        return self._close_span(span, open_span, hidden_states, rest)

    def _pass_block(self, span: Span, layer: int, open_span: OpenSpan) -> Any:
        """A block of a span whose output was made at its first block (`OpenSpan.done`): the
        blocks before the last pass their input on; the last returns the span's output."""
        hidden_states, rest = open_span.done
        if layer != span.end:
            return self.adapter.join_block_output(open_span.input, rest)
        if open_span.reused:
            self.state.current.span = None
            return self.adapter.join_block_output(hidden_states, rest)
        return self._close_span(span, open_span, hidden_states, rest)

    def _close_span(self, span: Span, open_span: OpenSpan, hidden_states: torch.Tensor, rest: Any) -> Any:
        """The span's last block's output: the method's full-length video tokens and the rest.
        Only the video tokens were pruned; what else the block returns (a joint-attention block's
        text stream) is full length already."""
        self.state.current.span = None
        return self.adapter.join_block_output(self.finish_span(span, open_span, hidden_states),
                                              self.finish_rest(span, open_span, rest))

    def _graphed_span(self, span: Span) -> tuple[torch.Tensor, Any]:
        """The kept output of the span's blocks (and the rest of its last block's output), its
        gather and blocks run as one CUDA graph per call and shape (graphs.py)."""
        blocks = self.adapter.blocks(self.transformer)
        for layer in range(span.start, span.end + 1):
            # The graph runs every block's forward under vidprune's hook, so a hook wrapping one
            # (a step cache enabled after apply) would see pass-through outputs: refuse it.
            order = getattr(getattr(blocks[layer], "_diffusers_hook", None), "_hook_order", [HOOK_NAME])
            if order[-1] != HOOK_NAME:
                later = ", ".join(order[order.index(HOOK_NAME) + 1:])
                raise ValueError(f"block {layer} has hooks registered after vidprune's ({later}), which CUDA graphs of "
                                 "whole spans would bypass: compile_blocks(graphs=True) does not compose with them")
        current = self.state.current
        runner = self.state.span_graphs.get(id(self))
        if runner is None:
            runner = self.state.span_graphs[id(self)] = SpanGraphs(self.graph_factory())
        open_span = current.span
        inputs = {"block": open_span.inputs, "index": open_span.index, "recovery_keys": open_span.recovery_keys}

        def work(static: dict[str, Any]) -> tuple[torch.Tensor, Any]:
            # Read from `static` only, and say so to the open span (the attention processors read
            # it): a replay runs on these buffers, not on the forward that captured it.
            now = self.state.current.span
            now.inputs, now.index, now.recovery_keys, now.key_rope = (
                static["block"], static["index"], static["recovery_keys"], None)
            gathered = self.adapter.gather_block_inputs(static["block"], static["index"])
            now.token_inputs = {k: v for k, v in gathered.items() if k != "hidden_states"}
            block_inputs = {**static["block"], **gathered}
            for layer in range(span.start, span.end + 1):
                output = self.block_forwards[layer](**block_inputs)
                block_inputs = self.adapter.next_block_inputs(block_inputs, output)
            return self.adapter.split_block_output(output)

        output, how = runner.run(span.start, inputs, work)
        open_span.inputs, open_span.index, open_span.recovery_keys = inputs["block"], inputs["index"], inputs["recovery_keys"]
        current.record.spans[-1].graph = how
        return output

    def after_block(self, block: torch.nn.Module, layer: int, span: OpenSpan, block_input: torch.Tensor,
                    block_output: torch.Tensor) -> None:
        """After each block of an open span that computed its video tokens `block_input` ->
        `block_output` (the kept ones, or all when span.index is None): a method's bookkeeping."""

    def extends_attention(self) -> bool:
        """Whether the self-attention of the block running now takes the method's keys (LIP's
        duplicates, TAPE's pruned tokens): the switch of the attention processors a method
        installs, which otherwise do what the model's own do."""
        current = self.state.current
        return current is not None and current.active and current.span is not None

    def reuse_span(self, span: Span, open_span: OpenSpan) -> tuple[torch.Tensor, Any] | None:
        """On a reuse step, the span's (output, rest) without running its blocks; else None."""
        return None

    def finish_rest(self, span: Span, open_span: OpenSpan, rest: Any) -> Any:
        """What the span's last block returns besides the video tokens (a joint-attention
        block's text stream), as the span passes it on."""
        return rest

    def finish_span(self, span: Span, open_span: OpenSpan, kept_output: torch.Tensor) -> torch.Tensor:
        """The span's full-length output: pruned tokens pass the span unchanged."""
        if open_span.index is None:
            return kept_output
        return scatter_tokens(open_span.input, open_span.index, kept_output)


def check_step_cache(pruner: TokenPruner) -> None:
    """Refuse diffusers' FirstBlockCache deciding on a block that vidprune prunes (a ValueError,
    before the forward computes anything): the cache subtracts that block's input from its output
    and compares the result between steps, tensors of different lengths inside a span. MagCache
    reads only the first block's input and the last block's output, full length around any span."""
    blocks = pruner.adapter.blocks(pruner.transformer)
    for span in pruner.spans:
        for layer in range(span.start, span.end + 1):
            registry = getattr(blocks[layer], "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_FBC_LEADER_BLOCK_HOOK) is not None:
                if getattr(pruner.config, "reuses", False):
                    raise ValueError("diffusers' FirstBlockCache and a TAPE budget with reuse steps both skip whole "
                                     "steps, and a reuse step skips FirstBlockCache's first block too: use one of "
                                     "them (a budget without keep-0 steps composes with it)")
                raise ValueError(
                    f"diffusers' FirstBlockCache decides from block {layer}'s output, which vidprune prunes (layers "
                    f"{span.start}-{span.end}): that block must run on all tokens. With TAPE give "
                    "TapeConfig(first_pruned_layer >= 1); LIP prunes from block 0, so stack it with MagCache instead "
                    "(or disable the cache)")


class TransformerHook(ModelHook):
    """Hands each forward's inputs to the pruner, and its output after."""

    def __init__(self, pruner: TokenPruner) -> None:
        super().__init__()
        self.pruner = pruner

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.pruner.begin_forward(bind_arguments(type(module).forward, args, kwargs))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return self.pruner.end_forward(output)

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        self.pruner.on_detach()
        return module


class BlockHook(ModelHook):
    """Runs one block of a span on the kept tokens."""

    def __init__(self, pruner: TokenPruner, span: Span, layer: int) -> None:
        super().__init__()
        self.pruner, self.span, self.layer = pruner, span, layer

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        return self.pruner.run_block(module, self.fn_ref.original_forward, self.span, self.layer, args, kwargs)


def _inside_cp_hooks(module: torch.nn.Module, change: Callable[[HookRegistry], None]) -> None:
    """Run `change` on the module's hook registry with diffusers' context-parallel hooks lifted
    off and put back after, so they wrap vidprune's: a block's inputs are split into the
    rank's chunk before vidprune's hook sees them, whichever of enable_parallelism and apply
    came first. (They only split inputs or gather outputs, so they can leave the middle of a
    chain.)"""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    lifted = [(name, registry.hooks[name]) for name in registry._hook_order if is_cp_hook(name)]
    for name, _ in lifted:
        registry.remove_hook(name, recurse=False)
    change(registry)
    for name, hook in lifted:
        registry.register_hook(hook, name)


def attach(pruner: TokenPruner) -> TokenPruner:
    """Register the hooks of `pruner` on its transformer and the blocks of its spans."""
    transformer = pruner.transformer
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(TransformerHook(pruner), HOOK_NAME)
    blocks = pruner.adapter.blocks(transformer)
    for span in pruner.spans:
        for layer in range(span.start, span.end + 1):
            hook = BlockHook(pruner, span, layer)
            _inside_cp_hooks(blocks[layer], lambda block_registry: block_registry.register_hook(hook, HOOK_NAME))
            pruner.block_forwards[layer] = hook.fn_ref.original_forward
    pruner.adapter.register_hooks(pruner, HOOK_NAME)
    registry.invalidate_child_registries_cache()
    pruner.on_attach()
    return pruner


def detach(transformer: torch.nn.Module) -> None:
    """Remove vidprune's hooks from `transformer` (and its blocks), if any. Hooks registered
    after vidprune's (a diffusers cache enabled after vidprune.apply) must go first: diffusers
    cannot unlink a hook from the middle of a chain."""
    for module in transformer.modules():
        order = getattr(getattr(module, "_diffusers_hook", None), "_hook_order", [])
        later = [name for name in order[order.index(HOOK_NAME) + 1:] if not is_cp_hook(name)] if HOOK_NAME in order else []
        if later:
            later = ", ".join(later)
            raise ValueError(f"hooks registered after vidprune's ({later}) must be removed first: call "
                             "transformer.disable_cache() (or remove those hooks) before vidprune.remove or apply")
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(HOOK_NAME, recurse=True)
        registry.invalidate_child_registries_cache()


def pruner_of(transformer: torch.nn.Module) -> TokenPruner | None:
    registry = getattr(transformer, "_diffusers_hook", None)
    hook = registry.get_hook(HOOK_NAME) if registry is not None else None
    return hook.pruner if hook is not None else None
