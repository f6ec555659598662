"""What pruning did during a call: one record per transformer forward."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .selection import adjacent_frame_iou
from .tokens import TokenGrid


@dataclass
class SpanRecord:
    """One span of blocks [start, end] (inclusive) run on `tokens` tokens (a prefix's included:
    FramePack's history); `index`, when recorded, holds the selection's positions in `grid`."""

    start: int
    end: int
    tokens: int
    grid: TokenGrid
    index: torch.Tensor | None = None  # kept token indices (LIP; TAPE with record_selections=True)
    keys: int | None = None  # self-attention keys when they differ from tokens (LIP's recovery, TAPE's full context)
    graph: str | None = None  # with CUDA graphs (compile_blocks(graphs=True)): "eager", "captured" or "replayed"
    reused: bool = False  # a reuse step: no block ran; every token took its remembered residual

    def kept_per_frame(self) -> list[int]:
        """Tokens kept in each latent frame (first sample), from the recorded indices."""
        if self.index is None:
            raise ValueError("no selection was recorded for this span: use TapeConfig(record_selections=True)")
        frames = torch.div(self.index[0], self.grid.per_frame, rounding_mode="floor")
        return torch.bincount(frames, minlength=self.grid.frames).tolist()


@dataclass
class ForwardRecord:
    """One transformer forward: its noise level, keep ratio and the tokens each span ran on."""

    step: int | None
    sigma: float
    keep: float
    tokens: int  # the tokens every block runs on unpruned: the grid's and a prefix's (FramePack's history)
    context_tokens: int = 0
    spans: list[SpanRecord] = field(default_factory=list)
    shared_selection: bool = False
    block_flops: float = 0.0
    block_flops_unpruned: float = 0.0
    unpruned_skipped: bool = False  # a reuse step skipped the adapter's unpruned work (VACE's control blocks)

    @property
    def flops_saved(self) -> float:
        """Fraction of block FLOPs not spent (attention counted as quadratic)."""
        if self.block_flops_unpruned == 0:
            return 0.0
        return 1.0 - self.block_flops / self.block_flops_unpruned


@dataclass
class PruneStats:
    """All forwards of the current (or last) pipeline call."""

    forwards: list[ForwardRecord] = field(default_factory=list)
    memory_bytes: int = 0  # the most the spans' token memories (cache, history) held during the call

    @property
    def mean_keep(self) -> float:
        return sum(f.keep for f in self.forwards) / len(self.forwards) if self.forwards else 1.0

    @property
    def flops_saved(self) -> float:
        full = sum(f.block_flops_unpruned for f in self.forwards)
        return 1.0 - sum(f.block_flops for f in self.forwards) / full if full else 0.0

    def selection_iou(self) -> float:
        """Mean IoU of adjacent frames' kept sets over the recorded selections (1 = no jitter).
        Needs TapeConfig(record_selections=True)."""
        spans = [s for f in self.forwards for s in f.spans if s.index is not None]
        if not spans:
            raise ValueError("no selections were recorded: apply with TapeConfig(record_selections=True)")
        return sum(adjacent_frame_iou(s.index, s.grid) for s in spans) / len(spans)

    def as_dict(self) -> dict:
        return {
            "forwards": len(self.forwards),
            "mean_keep": self.mean_keep,
            "block_flops_saved": self.flops_saved,
            "memory_bytes": self.memory_bytes,
            "per_forward": [
                {
                    "step": f.step,
                    "sigma": f.sigma,
                    "keep": f.keep,
                    "tokens": f.tokens,
                    "shared_selection": f.shared_selection,
                    "block_flops_saved": f.flops_saved,
                    "spans": [[s.start, s.end, s.tokens] for s in f.spans],
                }
                for f in self.forwards
            ],
        }

    def __str__(self) -> str:
        """One row per denoising step (its forwards, e.g. the two CFG branches, folded)."""
        rows: list[list[ForwardRecord]] = []
        for record in self.forwards:
            if rows and record.step is not None and rows[-1][0].step == record.step:
                rows[-1].append(record)
            else:
                rows.append([record])
        lines = [f"{'step':>4} {'sigma':>6} {'keep':>5} {'calls':>5}  {'kept tokens per span (first-last layer: tokens)':<48} {'FLOPs saved':>11}"]
        for group in rows:
            f = group[0]
            if f.spans and all(s.reused for s in f.spans):
                spans = f"reuse: layers {f.spans[0].start}-{f.spans[-1].end} not run"
            else:
                spans = " ".join(f"{s.start}-{s.end}:{s.tokens}" for s in f.spans) + f" of {f.tokens}" if f.spans else "unpruned"
                pruned_keys = {s.keys for s in f.spans if s.keys is not None and s.tokens < f.tokens}
                if pruned_keys:  # LIP's recovered keys, or full context's every token
                    spans += f" (keys {'/'.join(map(str, sorted(pruned_keys)))})"
            step = "-" if f.step is None else str(f.step)
            lines.append(f"{step:>4} {f.sigma:6.3f} {f.keep:5.2f} {len(group):>5}  {spans:<48} {f.flops_saved:11.1%}")
        lines.append(
            f"{len(self.forwards)} transformer forwards, mean keep {self.mean_keep:.3f}, "
            f"estimated block FLOPs saved {self.flops_saved:.1%}"
            + (f", token memory {self.memory_bytes / 2**20:.1f} MiB" if self.memory_bytes else "")
        )
        return "\n".join(lines)
