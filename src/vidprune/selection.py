"""Choosing the kept tokens from importance scores: temporal smoothing and top-k."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tokens import TokenGrid


def gaussian_weights(sigma: float, radius: int) -> torch.Tensor:
    """Normalised Gaussian taps at offsets -radius..radius."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return weights / weights.sum()


def smooth_over_time(scores: torch.Tensor, grid: TokenGrid, sigma: float, radius: int) -> torch.Tensor:
    """Gaussian smoothing of (batch, tokens) scores along the frame axis, edges replicated.

    A token's score becomes a weighted mean of the same position in nearby frames, so the kept
    set follows regions that matter over time instead of jumping from frame to frame."""
    if sigma <= 0 or radius == 0 or grid.frames == 1:
        return scores
    batch = scores.shape[0]
    # (batch * positions, 1, frames): one 1-D signal per spatial position.
    signals = scores.float().view(batch, grid.frames, grid.per_frame).transpose(1, 2).reshape(-1, 1, grid.frames)
    signals = F.pad(signals, (radius, radius), mode="replicate")
    kernel = gaussian_weights(sigma, radius).to(signals.device).view(1, 1, -1)
    smoothed = F.conv1d(signals, kernel)
    return smoothed.view(batch, grid.per_frame, grid.frames).transpose(1, 2).reshape(batch, grid.size)


def kept_per_frame(grid: TokenGrid, keep: float) -> int:
    """Tokens kept in each frame for a keep ratio (at least one)."""
    return max(1, min(grid.per_frame, round(keep * grid.per_frame)))


def select_per_frame(scores: torch.Tensor, grid: TokenGrid, keep: float) -> torch.Tensor:
    """Top-k tokens inside every frame, the same k in each. Returns sorted (batch, kept) indices."""
    batch = scores.shape[0]
    k = kept_per_frame(grid, keep)
    top = scores.view(batch, grid.frames, grid.per_frame).topk(k, dim=2).indices
    offsets = torch.arange(grid.frames, device=scores.device).view(1, -1, 1) * grid.per_frame
    return (top + offsets).view(batch, -1).sort(dim=1).values


def select_global(scores: torch.Tensor, grid: TokenGrid, keep: float) -> torch.Tensor:
    """Top-k tokens over the whole clip (frames may keep different counts). Sorted indices."""
    k = kept_per_frame(grid, keep) * grid.frames
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def adjacent_frame_iou(index: torch.Tensor, grid: TokenGrid) -> float:
    """Mean intersection-over-union of the kept positions of adjacent frames, over the batch:
    1 means the selection does not jitter at all. index: (batch, kept) token indices."""
    if grid.frames < 2:
        return 1.0
    mask = torch.zeros(index.shape[0], grid.size, dtype=torch.bool, device=index.device)
    mask.scatter_(1, index, True)
    mask = mask.view(-1, grid.frames, grid.per_frame)
    inter = (mask[:, 1:] & mask[:, :-1]).sum(dim=2).float()
    union = (mask[:, 1:] | mask[:, :-1]).sum(dim=2).float().clamp(min=1)
    return (inter / union).mean().item()
