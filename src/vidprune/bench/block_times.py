"""The ceiling of a pruned forward's speed, from measured block times.

A pruned forward can at best cost its non-block work (embeddings, output head: the unpruned
forward minus its blocks) plus every block at the token count it runs on. `BlockTimes` measures
one block of each kind (the middle one of its class: Wan has one kind, HunyuanVideo two) on the
inputs it gets in a real forward, gathered to each token count asked for, so the benchmarks
compare measured pruned forwards with that ideal.
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from ..adapters import adapter_for
from ..arguments import bind_arguments
from ..stats import ForwardRecord
from .timing import time_ms


class BlockTimes:
    """Median block times of `transformer` at any token count, measured on demand (once per
    block kind and count) with the block inputs of one forward on `forward_inputs`.

    Measure with no pruning or cache hooks on the blocks: they would time themselves too."""

    def __init__(self, transformer: torch.nn.Module, forward_inputs: dict[str, Any], repeats: int = 5,
                 warmup: int = 2) -> None:
        self.adapter = adapter_for(transformer)
        self.blocks = list(self.adapter.blocks(transformer))
        self.repeats, self.warmup = repeats, warmup
        self.cuda = next(transformer.parameters()).is_cuda
        by_kind: dict[type, list[int]] = {}
        for layer, block in enumerate(self.blocks):
            by_kind.setdefault(type(block), []).append(layer)
        self.representative = {kind: layers[len(layers) // 2] for kind, layers in by_kind.items()}
        self.inputs: dict[type, dict[str, Any]] = {}  # each representative's inputs, by block kind
        handles = [self.blocks[layer].register_forward_pre_hook(self._capturer(kind), with_kwargs=True)
                   for kind, layer in self.representative.items()]
        try:
            with torch.no_grad():
                transformer(**forward_inputs)
        finally:
            for handle in handles:
                handle.remove()
        self.tokens = next(iter(self.inputs.values()))["hidden_states"].shape[1]  # the forward's video tokens
        self._ms: dict[tuple[type, int], float] = {}

    def _capturer(self, kind: type) -> Callable:
        def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self.inputs[kind] = bind_arguments(type(module).forward, args, kwargs)
        return capture

    def block_ms(self, layer: int, tokens: int) -> float:
        """Median milliseconds of block `layer`'s kind on `tokens` video tokens (evenly spaced
        over the forward's tokens, the other inputs gathered to them as a pruned span does)."""
        kind = type(self.blocks[layer])
        if (kind, tokens) not in self._ms:
            inputs = self.inputs[kind]
            device = inputs["hidden_states"].device
            index = torch.arange(tokens, device=device).unsqueeze(0) * (self.tokens // tokens)
            gathered = dict(inputs, **self.adapter.gather_block_inputs(inputs, index))
            block = self.blocks[self.representative[kind]]
            with torch.no_grad():
                times = time_ms(lambda: block(**gathered), self.repeats, self.warmup, self.cuda)
            self._ms[(kind, tokens)] = statistics.median(times)
        return self._ms[(kind, tokens)]

    def measured(self) -> dict[str, dict[int, float]]:
        """The block times measured so far: block class name -> tokens -> ms."""
        table: dict[str, dict[int, float]] = {}
        for (kind, tokens), ms in sorted(self._ms.items(), key=lambda item: -item[0][1]):
            table.setdefault(kind.__name__, {})[tokens] = ms
        return table

    def blocks_ms(self, tokens_at: dict[int, int] | None = None) -> float:
        """All blocks of one forward, block `layer` on tokens_at[layer] tokens (default: all;
        0: the block does not run)."""
        tokens_at = tokens_at or {}
        tokens = [tokens_at.get(layer, self.tokens) for layer in range(len(self.blocks))]
        return sum(self.block_ms(layer, count) for layer, count in enumerate(tokens) if count)

    def pruned_blocks_ms(self, record: ForwardRecord) -> float:
        """All blocks of a pruned forward as vidprune recorded it: each span's blocks on its tokens
        (none on a reuse step)."""
        return self.blocks_ms({layer: span.tokens for span in record.spans for layer in range(span.start, span.end + 1)})
