"""Choosing the kept tokens from importance scores: temporal smoothing and top-k."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .tokens import TokenGrid


def gaussian_weights(sigma: float, radius: int) -> list[float]:
    """Normalised Gaussian taps at offsets -radius..radius (plain floats: no tensor has to be
    copied to the GPU inside the denoising loop)."""
    # z * z, not z ** 2: a tiny sigma makes z huge, and float ** raises where * gives inf (weight 0).
    weights = [math.exp(-0.5 * z * z) for z in (offset / sigma for offset in range(-radius, radius + 1))]
    total = sum(weights)
    return [w / total for w in weights]


def smooth_over_time(scores: torch.Tensor, grid: TokenGrid, sigma: float, radius: int) -> torch.Tensor:
    """Gaussian smoothing of (batch, tokens) scores along the frame axis, edges replicated.

    A token's score becomes a weighted mean of the same position in nearby frames, so the kept
    set follows regions that matter over time instead of jumping from frame to frame."""
    if sigma <= 0 or radius == 0 or grid.frames == 1:
        return scores
    frames = scores.float().view(scores.shape[0], grid.frames, grid.per_frame)
    first, last = frames[:, :1].expand(-1, radius, -1), frames[:, -1:].expand(-1, radius, -1)
    padded = torch.cat([first, frames, last], dim=1)
    # A weighted sum of 2 * radius + 1 shifted copies: a few elementwise kernels, where a
    # conv1d over (positions, 1, frames) is slow on GPUs.
    smoothed = sum(w * padded[:, i : i + grid.frames] for i, w in enumerate(gaussian_weights(sigma, radius)))
    return smoothed.reshape(scores.shape[0], grid.size)


def kept_per_frame(grid: TokenGrid, keep: float) -> int:
    """Tokens kept in each frame for a keep ratio (at least one)."""
    return max(1, min(grid.per_frame, round(keep * grid.per_frame)))


def select_per_frame(scores: torch.Tensor, grid: TokenGrid, keep: float) -> torch.Tensor:
    """Top-k tokens inside every frame, the same k in each. Returns sorted (batch, kept) indices."""
    batch = scores.shape[0]
    k = kept_per_frame(grid, keep)
    # Row-wise sorts of frame-sized rows are faster on GPUs than topk with a large k; sorting
    # each frame's picks makes the whole index sorted, as frames come in order.
    top = scores.view(batch, grid.frames, grid.per_frame).argsort(dim=2, descending=True)[..., :k]
    offsets = torch.arange(grid.frames, device=scores.device).view(1, -1, 1) * grid.per_frame
    return (top.sort(dim=2).values + offsets).view(batch, -1)


def select_global(scores: torch.Tensor, grid: TokenGrid, keep: float) -> torch.Tensor:
    """Top-k tokens over the whole clip (frames may keep different counts). Sorted indices."""
    k = kept_per_frame(grid, keep) * grid.frames
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def budgets_among(candidates: torch.Tensor, grid: TokenGrid, keep: float) -> torch.Tensor:
    """(frames,) tokens select_among keeps in each frame: keep x the frame's candidates, at
    least one where it has any."""
    frame_counts = candidates.view(grid.frames, grid.per_frame).sum(dim=1)
    # The same float64 arithmetic as select_among's total on the host, so they agree.
    return (frame_counts.double() * keep).round().long().clamp(min=1).minimum(frame_counts)


def select_among(scores: torch.Tensor, candidates: torch.Tensor, counts: Sequence[int], grid: TokenGrid,
                 keep: float) -> torch.Tensor:
    """Top-k among the candidate tokens of every frame, k = keep x that frame's candidates (at
    least one where a frame has any): TAPE's per-frame budget inside what another method (LIP)
    already keeps. scores: (batch, tokens), summed over the batch; candidates: (tokens,) bool;
    counts: each frame's number of candidates, on the host. Returns sorted (1, kept) indices
    shared by the batch, without a host sync."""
    in_frame = candidates.view(grid.frames, grid.per_frame)
    k = budgets_among(candidates, grid, keep)
    total = sum(min(count, max(1, round(count * keep))) for count in counts)
    frame_scores = scores.float().sum(dim=0).view(grid.frames, grid.per_frame).masked_fill(~in_frame, float("-inf"))
    rank = frame_scores.argsort(dim=1, descending=True).argsort(dim=1)
    chosen = ((rank < k.unsqueeze(1)) & in_frame).flatten()
    # A stable descending sort puts the chosen positions first, in order: nonzero() would sync.
    return chosen.to(torch.uint8).argsort(descending=True, stable=True)[:total].view(1, -1)


def adjacent_frame_iou(index: torch.Tensor, grid: TokenGrid) -> float:
    """Mean intersection-over-union of the kept positions of adjacent frames, over the batch:
    1 means the selection does not jitter at all (two frames keeping nothing count as equal).
    index: (batch, kept) token indices."""
    if grid.frames < 2:
        return 1.0
    mask = torch.zeros(index.shape[0], grid.size, dtype=torch.bool, device=index.device)
    mask.scatter_(1, index, True)
    mask = mask.view(-1, grid.frames, grid.per_frame)
    inter = (mask[:, 1:] & mask[:, :-1]).sum(dim=2).float()
    union = (mask[:, 1:] | mask[:, :-1]).sum(dim=2).float()
    return torch.where(union > 0, inter / union.clamp(min=1), 1.0).mean().item()
