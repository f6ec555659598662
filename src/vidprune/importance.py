"""Token importance: how much attention each key token receives from a sample of queries."""

from __future__ import annotations

import torch

from .tokens import TokenGrid


def attention_received(query: torch.Tensor, key: torch.Tensor, chunk_size: int = 128,
                       log_normalizer: torch.Tensor | None = None) -> torch.Tensor:
    """Mean softmax attention each key gets, over heads and the given queries.

    query: (batch, heads, queries, dim); key: (batch, heads, tokens, dim).
    Returns (batch, tokens) float32 whose rows sum to 1. Queries are processed in chunks so
    memory stays O(chunk_size x tokens) per head, never tokens x tokens. log_normalizer
    (batch, heads, queries), if given, is each query's log-sum-exp over a larger key set of
    which `key` is a part (context parallelism: the other ranks hold the rest).
    """
    batch, heads, num_queries, dim = query.shape
    scale = dim**-0.5
    received = torch.zeros(batch, heads, key.shape[2], dtype=torch.float32, device=key.device)
    key_t = key.transpose(-1, -2)
    normalizers = log_normalizer.split(chunk_size, dim=2) if log_normalizer is not None else None
    for i, chunk in enumerate(query.split(chunk_size, dim=2)):
        # Logits and probabilities in the input dtype (softmax accumulates in float32 inside;
        # bf16 is plenty for ranking and halves the memory traffic), sums in float32.
        logits = torch.matmul(chunk * scale, key_t)
        if normalizers is None:
            probabilities = logits.softmax(dim=-1)
        else:
            probabilities = (logits.float() - normalizers[i].unsqueeze(-1)).exp()
        received += probabilities.sum(dim=2, dtype=torch.float32)
    return received.mean(dim=1) / num_queries


def attention_log_normalizer(query: torch.Tensor, key: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """(batch, heads, queries) float32 log-sum-exp of each query's logits over `key`, as
    attention_received computes them."""
    scale = query.shape[-1] ** -0.5
    key_t = key.transpose(-1, -2)
    return torch.cat([torch.matmul(chunk * scale, key_t).float().logsumexp(dim=-1)
                      for chunk in query.split(chunk_size, dim=2)], dim=2)


def sample_queries(grid: TokenGrid, count: int, seed: int, device: torch.device) -> torch.Tensor:
    """Sorted indices of about `count` query tokens, the same number drawn in every frame at
    random positions, so every frame's content gets a say. Deterministic for a seed."""
    per_frame = max(1, min(grid.per_frame, -(-count // grid.frames)))
    generator = torch.Generator().manual_seed(seed)
    positions = torch.rand(grid.frames, grid.per_frame, generator=generator).argsort(dim=1)[:, :per_frame]
    offsets = torch.arange(grid.frames).unsqueeze(1) * grid.per_frame
    return (positions + offsets).flatten().sort().values.to(device)


def random_importance(batch: int, grid: TokenGrid, seed: int, device: torch.device) -> torch.Tensor:
    """Uniform random scores (batch, tokens): the random-pruning baseline. Drawn on `device`
    (no host-to-device copy in the denoising loop); deterministic per seed and device type."""
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(batch, grid.size, generator=generator, device=device)
