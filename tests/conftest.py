"""Shared fixtures: small random Wan pipelines and transformers built in code (offline)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from PIL import Image

import vidprune
from vidprune.demo.random_pipeline import build_random_wan_pipeline

torch.set_num_threads(2)

# Spans starting at layers 1, 3 and 5 of the 6-layer tiny transformer.
SMALL_SPANS = dict(first_pruned_layer=1, reselect_every=2)


@pytest.fixture(scope="session")
def pipelines():
    """One pipeline of each kind, built once; tests must leave them unpatched."""
    built = {kind: build_random_wan_pipeline(kind) for kind in ("t2v", "i2v", "v2v")}
    for pipe in built.values():
        pipe.set_progress_bar_config(disable=True)
    return built


def pipeline_inputs(kind: str, seed: int = 0, **overrides) -> dict:
    """Small, fast call arguments for a pipeline of `kind`."""
    rng = np.random.default_rng(seed)
    frame = lambda: Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))  # noqa: E731
    inputs = dict(prompt="a red circle moves left", height=64, width=64, num_inference_steps=3,
                  output_type="latent", generator=torch.Generator().manual_seed(seed))
    if kind == "t2v":
        inputs.update(num_frames=9, max_sequence_length=32)
    elif kind == "i2v":  # diffusers' Wan I2V attention assumes 512 text tokens
        inputs.update(num_frames=9, image=frame())
    else:
        inputs.update(video=[frame() for _ in range(9)], strength=0.8, max_sequence_length=32)
    inputs.update(overrides)
    return inputs


def run(pipe, kind: str, seed: int = 0, **overrides) -> torch.Tensor:
    return pipe(**pipeline_inputs(kind, seed, **overrides)).frames


@pytest.fixture
def clean(pipelines):
    """Yields the pipelines and makes sure none stays patched after the test."""
    yield pipelines
    for pipe in pipelines.values():
        vidprune.remove(pipe)


@contextlib.contextmanager
def block_tokens(transformer) -> Iterator[list[tuple[int, int]]]:
    """(block, tokens it computed on) of every block call while open, in call order, read by
    plain torch hooks on each block's feed-forward (inside the block, independent of vidprune)."""
    seen: list[tuple[int, int]] = []
    handles = [block.ffn.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, a[0].shape[1])))
               for i, block in enumerate(transformer.blocks)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def tiny_transformer(layers: int = 4, heads: int = 2, head_dim: int = 12, seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=16, ffn_dim=32, num_layers=layers, rope_max_seq_len=64,
    ).eval()


def transformer_inputs(batch: int = 1, frames: int = 3, height: int = 8, width: int = 8, seed: int = 0,
                       dtype: torch.dtype = torch.float32, timestep: float = 700.0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, height, width, generator=generator).to(dtype),
        timestep=torch.full((batch,), timestep),
        encoder_hidden_states=torch.randn(batch, 7, 16, generator=generator).to(dtype),
        return_dict=False,
    )


def replay_matches_block(model: torch.nn.Module, block: torch.nn.Module, inputs: dict) -> tuple[bool, dict]:
    """Run `model` on `inputs`, capturing `block`'s arguments, output and branch outputs (the
    adapter's branch_modules); whether the adapter's replay_block of those branch outputs gives
    the block's output exactly, and the captured arguments."""
    from vidprune.adapters import adapter_for
    from vidprune.runtime import bind_arguments

    adapter = adapter_for(model)
    captured, outputs = {}, []
    handles = [
        block.register_forward_pre_hook(
            lambda m, a, kw: captured.update(bind_arguments(type(m).forward, a, kw)), with_kwargs=True),
        block.register_forward_hook(lambda m, a, out: captured.update(output=out)),
        *(module.register_forward_hook(lambda m, a, out: outputs.append(out))
          for module in adapter.branch_modules(block)),
    ]
    try:
        model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    assert len(outputs) == len(adapter.branch_modules(block))
    replayed = adapter.replay_block(block, captured, captured["hidden_states"], outputs)
    return torch.equal(replayed, captured["output"]), captured


def assert_exact_and_pruning(pipe, generate, spans: dict, **fields) -> None:
    """keep=1.0 and remove give `generate(pipe)` bit for bit; keep 0.5 on `spans` changes it and
    keeps half the tokens (a family's first pipeline test); `fields`: more TapeConfig fields for both."""
    reference = generate(pipe)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=1.0, **fields))
    assert torch.equal(generate(pipe), reference)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, **spans, **fields))
    pruned = generate(pipe)
    assert vidprune.stats(pipe).mean_keep == 0.5
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, reference)
    vidprune.remove(pipe)
    assert torch.equal(generate(pipe), reference)


def feed_forward_shapes(blocks) -> tuple[list, list]:
    """Hooks recording (batch, tokens) as every block's feed-forward sees them (joint-attention
    blocks: text tokens included); returns (the record, the hook handles)."""
    seen = []
    handles = [block.ff.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape[:2]))) for block in blocks]
    return seen, handles


def record_block_calls(blocks) -> tuple[dict, list]:
    """Hooks keeping each block's last call as [its arguments by name, its output], by block
    index: the arguments as the model passes them (full length: vidprune gathers inside the
    block's forward), the output as the model gets it (scattered back at a span's last block).
    Returns (the record, the hook handles)."""
    from vidprune.runtime import bind_arguments

    calls, handles = {}, []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda m, a, kw, i=i: calls.__setitem__(i, [bind_arguments(type(m).forward, a, kw)]), with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, out, i=i: calls[i].append(out)))
    return calls, handles


def forward_after_dense(pipe, config, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Two transformer forwards on the same `inputs` in one call of `pipe` patched with
    `config`, as branch 0 at the config's token-step keep (no steps, no CFG partners): the
    first computes every token and fills the memory, the second prunes with it. Returns (the
    dense output, the pruned output, the forwards' records); `pipe` is left unpatched."""
    from vidprune.patch import _STATE_ATTRIBUTE
    from vidprune.runtime import pruner_of

    vidprune.apply(pipe, config)
    try:
        with torch.no_grad(), getattr(pipe, _STATE_ATTRIBUTE).call(pipe):
            state = pruner_of(pipe.transformer).state
            state.pipeline = state.scheduler = None
            dense, pruned = (pipe.transformer(**inputs)[0] for _ in range(2))
            return dense, pruned, state.stats.forwards
    finally:
        vidprune.remove(pipe)
