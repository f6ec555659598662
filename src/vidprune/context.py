"""Full context (TapeConfig(context="full")): in a span of a token step the kept tokens' queries
attend over every token, the pruned ones taking part with a key and value from their
remembered state.

Why: with kept-only attention every kept query sees half a video, and every softmax shifts.
Oracles on the demo model at keep 0.5 (methods.md): kept-only 22.6 dB; pruned tokens' keys from
their state frozen at the span input 21.9 (stale states mislead); from their state replayed
block by block 27.5; every token computed fresh 30.2. So a pruned token's state must move
through the span's blocks as it would have. Two sources (TapeConfig.context_keys):

- "replayed": each block but the span's last remembers every token's residual (block output
  minus input) from when the token was last computed; a pruned token's state at a block is its
  span input plus the residuals of the blocks before, and its key and value are computed from
  that state with the block's own modulation and projections (the adapter's
  `context_key_value`). Cost: two projections of the pruned tokens per block. The span's last
  block needs none: its residuals sum with the others to the span residual the cache holds.
  With cache "block" the replayed state is the block cache's (branch outputs, current gates).
- "remembered": each block remembers every token's key and value (before RoPE) from when the
  token was last computed. No compute; twice the memory, and the keys lag the current input.

What is held per block can be stored in float8 (TapeConfig.context_storage): half the memory.

`FullContext` is the runtime side (one per TAPE pruner): it opens the pruned tokens of a span,
moves their states after each block, and hands the adapter's attention processor their keys
and values. Pure helpers first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .refresh import SpanMemory
from .tokens import gather_tokens


def pruned_index(index: torch.Tensor, tokens: int) -> torch.Tensor:
    """(rows, tokens - kept) sorted positions of the tokens not in `index` (rows, kept). The count
    is known, so a stable sort finds them without waiting for the device (nonzero would)."""
    computed = torch.zeros(index.shape[0], tokens, dtype=torch.int8, device=index.device)
    computed.scatter_(1, index, 1)
    return computed.argsort(dim=1, stable=True)[:, : tokens - index.shape[1]]


def store_rows(stored: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """Write `rows` (batch, kept, ...) into `stored` (batch, tokens, ...) at `index` (batch or 1,
    kept), in place: a memory tensor is rewritten where tokens were computed, not copied."""
    if index.shape[0] == 1 and stored.shape[0] > 1:
        index = index.expand(stored.shape[0], -1)
    expanded = index.view(*index.shape, *([1] * (stored.ndim - 2))).expand(-1, -1, *stored.shape[2:])
    stored.scatter_(1, expanded, rows.to(stored.dtype))


FLOAT8_MAX = 448.0  # the largest finite float8_e4m3fn


class TokenRows:
    """What full context holds per block: one row per token (batch, tokens, ...), rewritten in
    place where tokens are computed and read where they are pruned. In the model's dtype, or in
    float8 (e4m3) with one float32 scale per token and sample: half of bf16's memory, within
    about 3% of each row's largest value."""

    def __init__(self, rows: torch.Tensor, float8: bool) -> None:
        self.dtype, self.float8 = rows.dtype, float8
        self.scales = self._scales(rows) if float8 else None
        self.values = self._encode(rows, self.scales) if float8 else rows

    @staticmethod
    def _encode(rows: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        # held as the float8 values' bytes: gather and scatter have no float8 kernels
        return (rows / scales).to(torch.float8_e4m3fn).view(torch.uint8)

    @staticmethod
    def _scales(rows: torch.Tensor) -> torch.Tensor:
        return rows.float().abs().flatten(2).amax(dim=2).clamp(min=1e-12).div(FLOAT8_MAX).view(
            *rows.shape[:2], *([1] * (rows.ndim - 2)))

    def store(self, index: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows `index` (batch or 1, kept) become `rows` (batch, kept, ...)."""
        if not self.float8:
            store_rows(self.values, index, rows)
            return
        scales = self._scales(rows)
        store_rows(self.scales, index, scales)
        store_rows(self.values, index, self._encode(rows, scales))

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (batch or 1, count), in the dtype they were given in."""
        values = gather_tokens(self.values, index)
        if not self.float8:
            return values
        return (values.view(torch.float8_e4m3fn).float() * gather_tokens(self.scales, index)).to(self.dtype)

    def nbytes(self) -> int:
        tensors = [self.values] + ([self.scales] if self.float8 else [])
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class PrunedTokens:
    """The pruned tokens of an open span (OpenSpan.context)."""

    index: torch.Tensor  # (batch or 1, pruned) sorted positions
    states: torch.Tensor | None  # (batch, pruned, dim) their states at the running block's input ("replayed")
    rope: Any = None  # the adapter's positional tables at their positions, made by its processor once per span


class FullContext:
    """Full context for one TAPE pruner (see the module's docstring). Its methods work on the
    span open in the pruner's forward and on that span's memory for the forward's branch."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner
        self.keys = pruner.config.context_keys
        self.from_block_cache = pruner.config.cache == "block"
        self.float8 = pruner.config.context_storage == "float8"

    def ready(self, span: Any, memory: SpanMemory) -> bool:
        """Whether the memory of `span` (a runtime Span) stands in for every block's pruned keys:
        a dense forward filled it."""
        if self.keys == "remembered":
            return all(layer in memory.keys_values for layer in range(span.start, span.end + 1))
        return self.from_block_cache or all(layer in memory.layer_residuals for layer in range(span.start, span.end))

    def _open(self) -> tuple[Any, SpanMemory]:
        """The open span, with its pruned tokens (at their span input) once it computes a subset,
        and its memory."""
        span = self.pruner.state.current.span
        if span.index is not None and span.context is None:
            index = pruned_index(span.index, span.input.shape[1])
            states = gather_tokens(span.input, index) if self.keys == "replayed" else None
            span.context = PrunedTokens(index, states)
        return span, self.pruner.memory(span.start)

    def after_block(self, layer: int, block_input: torch.Tensor, block_output: torch.Tensor, last: bool) -> None:
        """After a block of the open span that computed `block_input` -> `block_output` (its kept
        tokens, or every token when it prunes none): remember the computed tokens' residual and
        move the pruned tokens' states to the next block's input."""
        if self.keys != "replayed" or last:
            return
        span, memory = self._open()
        if self.from_block_cache:  # the block cache replayed every token (span.replayed)
            if span.context is not None:
                span.context.states = gather_tokens(span.replayed, span.context.index)
            return
        residual = block_output - block_input
        if span.index is None:
            memory.layer_residuals[layer] = TokenRows(residual, self.float8)
            return
        stored = memory.layer_residuals[layer]
        stored.store(span.index, residual)
        span.context.states = span.context.states + stored.gather(span.context.index)

    def remember_keys_values(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """The computed tokens' key and value (batch, computed, heads, head_dim), before RoPE, of
        the block's self-attention ("remembered" only)."""
        if self.keys != "remembered":
            return
        span, memory = self._open()
        if span.index is None:
            memory.keys_values[layer] = (TokenRows(key, self.float8), TokenRows(value, self.float8))
            return
        stored_key, stored_value = memory.keys_values[layer]
        stored_key.store(span.index, key)
        stored_value.store(span.index, value)

    def pruned(self) -> PrunedTokens | None:
        """The open span's pruned tokens; None while it computes every token."""
        return self._open()[0].context

    def keys_values(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The pruned tokens' key and value (batch, pruned, heads, head_dim), before RoPE, at the
        block of `layer`."""
        span, memory = self._open()
        pruned = span.context
        if self.keys == "remembered":
            key, value = memory.keys_values[layer]
            return key.gather(pruned.index), value.gather(pruned.index)
        adapter, transformer = self.pruner.adapter, self.pruner.transformer
        block = adapter.blocks(transformer)[layer]
        return adapter.context_key_value(block, span.inputs, pruned.states, pruned.index)


def full_context_attention(context: FullContext, layer: int, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, rotate: Callable[[torch.Tensor, Any], torch.Tensor], tables: Any,
                           tables_at: Callable[[torch.Tensor], Any],
                           attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The computed tokens' self-attention over their own keys and the pruned tokens' (the
    attention processors of the families with full context call it).

    query, key, value: (batch, computed, heads, head_dim) before RoPE; rotate(x, tables) applies
    the family's RoPE with `tables` (the computed tokens') or tables_at(index) (the tables at
    positions `index`, made once per span); attend(q, k, v) is the attention kernel. A forward
    that computes every token remembers its keys ("remembered") and attends over them alone."""
    context.remember_keys_values(layer, key, value)
    query, key = rotate(query, tables), rotate(key, tables)
    pruned = context.pruned()
    if pruned is not None:
        if pruned.rope is None:
            pruned.rope = tables_at(pruned.index)
        pruned_key, pruned_value = context.keys_values(layer)
        key = torch.cat([key, rotate(pruned_key, pruned.rope)], dim=1)
        value = torch.cat([value, pruned_value.to(value.dtype)], dim=1)
    return attend(query, key, value)
