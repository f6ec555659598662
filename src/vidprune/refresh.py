"""The token cache and the refreshing score: what a pruned token gets instead of being
computed, and which tokens a span computes next.

Measured on the demo model (methods.md): letting pruned tokens pass a span unchanged loses
most of the video, and so does a cache whose tokens are never refreshed, because attention
importance alone picks the same tokens step after step. So a pruned token gets the update it
had when last computed, and the score that picks the computed tokens adds how much a token's
input has drifted since then and how long ago that was.

Pure tensor functions and one dataclass per (span, guidance branch); the runtime owns the
instances (tape.py, lip.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .tokens import TokenGrid, gather_tokens, scatter_tokens


@dataclass
class SpanMemory:
    """What one span remembers of its tokens across the steps of a call, for one guidance branch.

    residual: (batch, tokens, dim) span output minus span input when each token was last
        computed (cache "span"); a reuse step adds it to every token.
    branch_outputs: per block of the span, the block's branch outputs (self-attention,
        cross-attention, feed-forward, before their gates) when each token was last computed
        (cache "block").
    compared_input: (batch, tokens, dim) the span input the change term compares with: each
        token's when it was last computed, or the last step's (only where this branch selects).
    staleness: (batch, tokens) selections since each token was last computed.
    layer_residuals: with full context from replayed states (context.py), per block of the
        span but its last, the block's output minus input when each token was last computed.
    keys_values: with full context from remembered keys, per block, the self-attention's key
        and value (before RoPE, (batch, tokens, heads, head_dim)) when each token was last computed."""

    residual: torch.Tensor | None = None
    text_residual: torch.Tensor | None = None  # a joint-attention span's text stream, the same way
    branch_outputs: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    compared_input: torch.Tensor | None = None
    staleness: torch.Tensor | None = None
    layer_residuals: dict[int, Any] = field(default_factory=dict)  # context.TokenRows
    keys_values: dict[int, tuple[Any, Any]] = field(default_factory=dict)  # context.TokenRows pairs

    @property
    def filled(self) -> bool:
        return self.residual is not None or bool(self.branch_outputs) or self.compared_input is not None

    def nbytes(self) -> int:
        tensors = [self.residual, self.text_residual, self.compared_input, self.staleness]
        tensors += [t for outputs in self.branch_outputs.values() for t in outputs]
        held = list(self.layer_residuals.values()) + [rows for pair in self.keys_values.values() for rows in pair]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None) + sum(r.nbytes() for r in held)


def mean_normalised(values: torch.Tensor, among: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, tokens) values divided by each sample's mean (over the tokens `among`, a
    (tokens,) bool, if given), so terms of different units weigh alike; a zero mean gives zeros."""
    values = values.float()
    if among is None:
        mean = values.mean(dim=1, keepdim=True)
    else:  # a masked mean: indexing with a bool mask would wait for the GPU
        mean = (values * among).sum(dim=1, keepdim=True) / among.sum().clamp(min=1)
    return torch.where(mean > 0, values / mean.clamp(min=1e-12), torch.zeros_like(values))


def relative_change(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """(batch, tokens): |now - before| / |before| per token over the feature axis, in float32."""
    difference = torch.linalg.vector_norm((now - before).float(), dim=-1)
    return difference / torch.linalg.vector_norm(before.float(), dim=-1).clamp(min=1e-6)


def due_now(staleness: torch.Tensor, grid: TokenGrid, budget: torch.Tensor, refresh_every: int,
            among: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, tokens) bool: the tokens to compute now so that none goes refresh_every = K
    selections in a row uncomputed, if every coming step keeps `budget` (frames,) per frame.

    Earliest deadline first: a token of staleness s must be computed within the next K - s
    selections, so within the next d selections at least count(s >= K - d) tokens are due,
    of which d - 1 later selections can take (d - 1) x budget: the rest is due now, the stalest
    first (ties by position). Only forcing tokens at their last chance would let them pile up
    past the budget."""
    batch = staleness.shape[0]
    stale = staleness.view(batch, grid.frames, grid.per_frame)
    valid = torch.ones_like(stale, dtype=torch.bool) if among is None else among.view(1, grid.frames, -1).expand_as(stale)
    due_within = torch.stack([((stale >= refresh_every - d) & valid).sum(dim=2) for d in range(1, refresh_every + 1)], 2)
    later = torch.arange(refresh_every, device=stale.device) * budget.view(1, -1, 1)
    needed = (due_within - later).amax(dim=2).clamp(min=0).minimum(budget.view(1, -1))
    rank = stale.masked_fill(~valid, -1).float().argsort(dim=2, descending=True, stable=True).argsort(dim=2)
    return ((rank < needed.unsqueeze(2)) & valid).view(batch, grid.size)


def refresh_scores(attention: torch.Tensor | None, change: torch.Tensor | None, staleness: torch.Tensor,
                   weights: tuple[float, float, float], refresh_every: int, grid: TokenGrid, budget: torch.Tensor,
                   among: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, tokens) selection scores: the weighted sum of the mean-normalised attention
    importance, change and staleness (a term that is None or weighs 0 is left out; means over
    the tokens `among` if given). With refresh_every = K > 0 the tokens `due_now` score above
    every other, so no token goes K selections in a row uncomputed while each step keeps at
    least 1/K of every frame."""
    terms = [(w, t) for w, t in zip(weights, (attention, change, staleness)) if w > 0 and t is not None]
    score = sum(w * mean_normalised(t, among) for w, t in terms) if terms else torch.zeros_like(staleness, dtype=torch.float32)
    if refresh_every > 0:
        forced = score.amax(dim=1, keepdim=True) + 1.0 + staleness.float()  # above the rest, stalest first
        score = torch.where(due_now(staleness, grid, budget, refresh_every, among), forced, score)
    return score


def remember_span(memory: SpanMemory, span_input: torch.Tensor, index: torch.Tensor | None,
                  kept_output: torch.Tensor, cache: str, tracks_history: bool,
                  replayed: torch.Tensor | None = None, change_since: str = "computed") -> torch.Tensor:
    """The span's full-length output, and `memory` updated with what the span computed.

    index: (batch or 1, kept) computed tokens, None for all. A pruned token leaves the span
    with, for cache "span", its input plus its remembered residual; for "block", `replayed`
    (the caller ran its remembered branch outputs through the span's blocks); for "none", its
    input unchanged. With tracks_history, each token's input when computed (or, change_since
    "step", every token's input now) and its staleness are kept for the next selection."""
    if index is None:
        output = kept_output
    elif cache == "block":
        output = scatter_tokens(replayed, index, kept_output)
    elif cache == "span" and memory.residual is not None:
        output = scatter_tokens(span_input + memory.residual, index, kept_output)
    else:
        output = scatter_tokens(span_input, index, kept_output)
    if cache == "span":
        memory.residual = output - span_input  # fresh for computed tokens, carried for pruned
    if not tracks_history:
        return output
    batch, tokens = span_input.shape[:2]
    if index is None or memory.compared_input is None or change_since == "step":
        memory.compared_input = span_input.clone()
        if index is None or memory.staleness is None:
            memory.staleness = torch.zeros(batch, tokens, dtype=torch.int32, device=span_input.device)
            return output
    else:
        memory.compared_input = scatter_tokens(memory.compared_input, index, gather_tokens(span_input, index))
    computed = torch.zeros(batch, tokens, dtype=torch.bool, device=span_input.device)
    computed.scatter_(1, index.expand(batch, -1), True)
    memory.staleness = torch.where(computed, 0, memory.staleness + 1)
    return output


def memory_estimate(cache: str, tracks_history: bool, spans: int, layers_in_spans: int, tokens: int, dim: int,
                    element_bytes: int, branches: int = 2, batch: int = 1, branch_modules: int = 3,
                    context_keys: str | None = None, context_float8: bool = False) -> int:
    """Bytes the spans' memories hold in a call: per guidance branch and span, the residual
    (cache "span") or every block's branch outputs (cache "block"), (batch, tokens, dim) each;
    for the selecting branch, each span's computed inputs and int32 staleness. With full
    context (`context_keys` given), per branch also every block's residual but each span's
    last ("replayed", with cache "span"), or every block's key and value ("remembered"); in
    float8, one byte a value and a float32 scale per token."""
    row = batch * tokens * dim * element_bytes
    cached = {"none": 0, "span": spans * row, "block": layers_in_spans * branch_modules * row}[cache]
    context_row = batch * tokens * (dim + 4) if context_float8 else row
    if context_keys == "replayed" and cache == "span":
        cached += (layers_in_spans - spans) * context_row
    elif context_keys == "remembered":
        cached += layers_in_spans * 2 * context_row
    history = spans * (row + batch * tokens * 4) if tracks_history else 0
    return cached * branches + history
