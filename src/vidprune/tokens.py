"""The token grid of a video DiT and the gather/scatter of tokens along the sequence axis.

Tokens are flattened frame-major: index = f * H * W + h * W + w. A selection is a LongTensor
of shape (batch, kept) holding sorted token indices; every sample keeps the same count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenGrid:
    """Token counts along time, height and width after patching."""

    frames: int
    height: int
    width: int

    @property
    def per_frame(self) -> int:
        return self.height * self.width

    @property
    def size(self) -> int:
        return self.frames * self.per_frame


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (batch, kept) of x along dim 1. x may have batch 1 (shared by all samples),
    e.g. RoPE tables of shape (1, tokens, 1, dim)."""
    if x.shape[0] == 1 and index.shape[0] > 1:
        x = x.expand(index.shape[0], *x.shape[1:])
    if index.shape[0] == 1 and x.shape[0] > 1:
        index = index.expand(x.shape[0], -1)
    expanded = index.view(*index.shape, *([1] * (x.ndim - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, expanded)


def scatter_tokens(full: torch.Tensor, index: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A copy of `full` (batch, tokens, ...) whose rows `index` are replaced by `kept`."""
    if index.shape[0] == 1 and full.shape[0] > 1:
        index = index.expand(full.shape[0], -1)
    expanded = index.view(*index.shape, *([1] * (full.ndim - 2))).expand(-1, -1, *full.shape[2:])
    return full.scatter(1, expanded, kept.to(full.dtype))


def with_prefix(index: torch.Tensor, prefix: int) -> torch.Tensor:
    """A sorted grid selection (batch or 1, kept) as positions in a sequence that holds `prefix`
    other tokens before the grid's, those first: (batch or 1, prefix + kept), still sorted."""
    leading = torch.arange(prefix, device=index.device).expand(index.shape[0], -1)
    return torch.cat([leading, index + prefix], dim=1)


def with_leading(index: torch.Tensor, leading: int, size: int) -> torch.Tensor:
    """A sorted grid selection (batch or 1, kept) of a grid of `size` tokens with its first
    `leading` tokens added: (batch or 1, kept'), sorted. The rows must come out equally long (they
    gather one batch): a selection with as many of those tokens in every row does."""
    if leading == 0:
        return index
    kept = torch.zeros(index.shape[0], size, dtype=torch.bool, device=index.device)
    kept.scatter_(1, index, True)
    kept[:, :leading] = True
    counts = kept.sum(dim=1)
    if index.shape[0] > 1 and not torch.equal(counts, counts[:1].expand_as(counts)):
        raise ValueError(f"the samples of a batch kept different numbers of the first {leading} tokens, which the model "
                         "computes in every span, so they cannot compute equal numbers of tokens: use "
                         "TapeConfig(per_frame=True) (the default), which keeps as many of every frame in each sample")
    return kept.nonzero()[:, 1].view(index.shape[0], -1)


def patches(latents: torch.Tensor, patch_size: tuple[int, int, int]) -> torch.Tensor:
    """(B, C, F, H, W) latents -> (B, F', H', W', C * pt * ph * pw): the values of each token."""
    b, c, f, h, w = latents.shape
    pt, ph, pw = patch_size
    x = latents.reshape(b, c, f // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, f // pt, h // ph, w // pw, -1)


def unpatch(tokens: torch.Tensor, patch_size: tuple[int, int, int], channels: int) -> torch.Tensor:
    """Inverse of `patches`: (B, F', H', W', C * pt * ph * pw) -> (B, C, F, H, W)."""
    b, f, h, w, _ = tokens.shape
    pt, ph, pw = patch_size
    x = tokens.reshape(b, f, h, w, channels, pt, ph, pw).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(b, channels, f * pt, h * ph, w * pw)
