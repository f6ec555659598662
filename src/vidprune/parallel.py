"""Pruning inside diffusers' context parallelism (`transformer.enable_parallelism(config=
ContextParallelConfig(ulysses_degree=N) or (ring_degree=N))`).

diffusers splits the video tokens into equal contiguous chunks, one per rank, where the
model's `_cp_plan` says (Wan: the first block's hidden states and the RoPE tables), runs every
block on its rank's chunk (attention exchanges keys and values itself) and gathers at the
output projection. vidprune runs inside that engine, on each rank's chunk:

- Every rank builds the same full-length (batch, tokens) scores: the per-token terms are
  computed on the local chunk and gathered (a few floats per token); attention importance
  is normalised over all keys with one exchanged log-sum-exp per query.
- Each rank then computes the same global selection and takes its own part. The selection is
  per (frame, rank) piece: a frame split between two ranks gets its budget split between the
  pieces by position (cumulative rounding), so every rank keeps exactly total / world tokens
  and attention's exchanges line up. Where no frame is split (frames divisible by the
  degree) this is the single-process per-frame top-k; in a split frame the top-k is per piece.
- Caches and histories hold the local chunk only (they are indexed by the local selection).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .tokens import TokenGrid

try:  # diffusers' names of its context-parallel hooks
    from diffusers.hooks.context_parallel import (_CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE,
                                                  _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE)
    CP_HOOK_PREFIXES = tuple(t.split("{")[0] for t in (_CONTEXT_PARALLEL_INPUT_HOOK_TEMPLATE,
                                                        _CONTEXT_PARALLEL_OUTPUT_HOOK_TEMPLATE))
except ImportError:  # a diffusers without context parallelism
    CP_HOOK_PREFIXES = ()


def is_cp_hook(name: str) -> bool:
    return bool(CP_HOOK_PREFIXES) and name.startswith(CP_HOOK_PREFIXES)


@dataclass(frozen=True)
class SequenceShard:
    """This rank's chunk of the video tokens under context parallelism."""

    rank: int
    world: int
    group: Any  # the process group of the flattened (ring, ulysses) mesh
    tokens: int  # all video tokens

    @property
    def size(self) -> int:
        return self.tokens // self.world

    @property
    def start(self) -> int:
        return self.rank * self.size

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The ranks' chunks of x (equal sizes along `dim`) concatenated in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=self.group)
        return x

    def local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's chunk of a full-length (batch, tokens, ...) tensor."""
        return full[:, self.start : self.start + self.size]

    def local_index(self, index: torch.Tensor) -> torch.Tensor:
        """This rank's part of a balanced global selection (batch or 1, kept): the r-th of
        `world` equal chunks of the sorted indices, as positions in the local chunk."""
        kept = index.shape[1] // self.world
        return index[:, self.rank * kept : (self.rank + 1) * kept] - self.start


def shard_of(transformer: torch.nn.Module, grid: TokenGrid) -> SequenceShard | None:
    """The shard of this forward when diffusers' context parallelism is enabled on
    `transformer` (None otherwise), or an error naming what vidprune cannot prune inside."""
    config = getattr(getattr(transformer, "_parallel_config", None), "context_parallel_config", None)
    if config is None:
        return None
    if config.ulysses_anything or config.ring_anything:
        raise ValueError("vidprune does not prune under ContextParallelConfig(ulysses_anything=True or "
                         "ring_anything=True) (unequal chunks per rank): use equal chunks (the default)")
    mesh = config._flattened_mesh
    world = mesh.size()
    if grid.size % world:
        raise ValueError(f"context parallelism over {world} ranks needs the {grid.size} video tokens ({grid}) to "
                         f"divide evenly; choose a video size whose token count is a multiple of {world}")
    group = mesh.get_group()
    return SequenceShard(dist.get_rank(group), world, group, grid.size)


def check_shard_length(shard: SequenceShard | None, grid: TokenGrid, length: int) -> None:
    """A span's first block must see this rank's chunk (or all tokens without parallelism)."""
    expected = grid.size if shard is None else shard.size
    if length != expected:
        where = "" if shard is None else f" (rank {shard.rank}'s chunk of {shard.world})"
        raise RuntimeError(
            f"vidprune expected {expected} video tokens{where} of {grid} at a pruned span's first block but it got "
            f"{length}: only diffusers' context parallelism (equal chunks per rank) is supported inside pruned spans"
        )


def sharded_budget_ends(grid: TokenGrid, kept: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pieces a frame-major sequence splits into at frame and rank boundaries, as
    (ends (pieces,), budgets (pieces,)): cumulative rounding of `kept` over positions, so each
    rank's pieces sum to kept / world exactly when `world` divides `kept` and each whole frame
    gets kept / frames exactly when `frames` divides it."""
    chunk = grid.size // world
    ends = sorted({f * grid.per_frame for f in range(1, grid.frames + 1)} | {r * chunk for r in range(1, world + 1)})
    ends_tensor = torch.tensor(ends, dtype=torch.long)
    # Exact rational cumulative count at each end, rounded half up: integer at rank boundaries.
    cumulative = (ends_tensor * kept * 2 + grid.size) // (2 * grid.size)
    budgets = torch.diff(cumulative, prepend=torch.zeros(1, dtype=torch.long))
    return ends_tensor, budgets


def select_in_pieces(scores: torch.Tensor, ends: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Top-`budgets[p]` tokens by score inside every piece p of consecutive positions (piece p
    ends before ends[p]). scores: (batch, tokens). Returns sorted (batch, sum(budgets)) indices."""
    batch, tokens = scores.shape
    device = scores.device
    ends, budgets = ends.to(device), budgets.to(device)
    piece = torch.bucketize(torch.arange(tokens, device=device), ends, right=True)  # piece of each position
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    # Positions ordered by piece, best score first inside each piece (two stable sorts).
    by_score = scores.float().argsort(dim=1, descending=True, stable=True)
    grouped = by_score.gather(1, piece[by_score].argsort(dim=1, stable=True))
    rank_in_piece = torch.arange(tokens, device=device).unsqueeze(0) - starts[piece[grouped]]
    chosen = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    chosen.scatter_(1, grouped, rank_in_piece < budgets[piece[grouped]])
    total = int(budgets.sum())
    return chosen.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :total]


def select_sharded(scores: torch.Tensor, grid: TokenGrid, kept: int, shard: SequenceShard,
                   per_frame: bool) -> torch.Tensor:
    """The global selection of `kept` tokens, balanced over the shard's ranks: per frame and
    rank piece (per_frame), or the top kept / world of every rank's chunk. kept is rounded to a
    multiple of the degree (attention needs equal chunks); sorted (batch, kept') indices."""
    kept = max(shard.world, shard.world * round(kept / shard.world))
    if per_frame:
        ends, budgets = sharded_budget_ends(grid, kept, shard.world)
    else:
        ends = torch.arange(1, shard.world + 1) * shard.size
        budgets = torch.full((shard.world,), kept // shard.world)
    return select_in_pieces(scores, ends, budgets)


def balance_keep(keep: torch.Tensor, reference: torch.Tensor, grid: TokenGrid, world: int) -> torch.Tensor:
    """LIP's (tokens,) keep mask with every rank's chunk holding as many kept tokens as the
    fullest chunk: a chunk short of it also computes its pruned tokens whose reference is the
    furthest back in time (the stalest copies; ties by position). Attention needs equal chunks."""
    chunks = keep.view(world, -1)
    target = int(chunks.sum(dim=1).max())
    frame = torch.arange(grid.size, device=keep.device) // grid.per_frame
    distance = (frame - frame[reference]).view(world, -1).float()
    # Kept tokens first, then pruned ones by distance; take the first `target` of each chunk.
    priority = torch.where(chunks, float("inf"), distance)
    order = priority.argsort(dim=1, descending=True, stable=True)[:, :target]
    return torch.zeros_like(chunks).scatter_(1, order, True).view(-1)
