"""TAPE on Wan2.1-VACE (LIP: test_wan_vace_lip.py): a tiny random WanVACETransformer3DModel (6
main layers, control blocks whose hints land after layers 0, 2 and 4) in a WanVACEPipeline with a
tiny random VAE (the adapter's benchmark pipeline), called with prompt embeddings and
output_type="latent", and bare."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from diffusers import WanVACETransformer3DModel
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vidprune
from vidprune.adapters import adapter_for
from vidprune.adapters.wan_vace import reference_frames
from vidprune.bench import benchmark_shape
from vidprune.graphs import EagerReplayGraph
from vidprune.patch import _GRAPHS_ATTRIBUTE
from vidprune.runtime import bind_arguments, pruner_of

from conftest import record_block_calls

FRAMES, FRAME_TOKENS = 3, 16  # 9 frames of 64x64 px: 3 latent frames of 4 x 4 tokens
TOKENS = FRAMES * FRAME_TOKENS
TEXT, WIDTH = 7, 16  # prompt embedding tokens and width
VACE_LAYERS = [0, 2, 4]
SCALES = [0.5, 1.5, 2.0]  # conditioning_scale per control block: a hint is not added unscaled
# Spans 1-3 and 4-5: the hints of layers 2 and 4 land inside a span, layer 0's before any.
INSIDE = dict(first_pruned_layer=1, reselect_every=3)
# Spans 1-2, 3-4 and 5: every hint lands after a span's last block.
AT_ENDS = dict(first_pruned_layer=1, reselect_every=2)


def tiny_vace(seed: int = 0) -> WanVACETransformer3DModel:
    _, shape = benchmark_shape("wan-vace-tiny")
    torch.manual_seed(seed)
    return WanVACETransformer3DModel(**{**shape.config, "text_dim": WIDTH, "vace_layers": VACE_LAYERS}).eval()


@pytest.fixture(scope="module")
def pipe():
    adapter, shape = benchmark_shape("wan-vace-tiny")
    torch.manual_seed(0)
    pipeline = adapter.benchmark_pipeline([tiny_vace()], shape)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    vidprune.remove(pipeline)


def record_hints(model: WanVACETransformer3DModel, hints: list) -> list:
    """Hooks keeping the control blocks' hints of each forward in `hints`, in block order (read
    at their output projection, inside the block); returns the hook handles."""
    return [model.register_forward_pre_hook(lambda m, a: hints.clear()),
            *(block.proj_out.register_forward_hook(lambda m, a, out: hints.append(out)) for block in model.vace_blocks)]


def model_inputs(batch: int = 1) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, 16, FRAMES, 8, 8, generator=generator),
                timestep=torch.full((batch,), 700.0),
                encoder_hidden_states=torch.randn(batch, TEXT, WIDTH, generator=generator),
                control_hidden_states=torch.randn(batch, 96, FRAMES, 8, 8, generator=generator), return_dict=False)


def frames(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


def generate(pipeline, references: int = 0, steps: int = 3, **overrides) -> torch.Tensor:
    """A call with a control video, a mask over its left half and `references` reference images."""
    embeds = torch.randn(2, 1, TEXT, WIDTH, generator=torch.Generator().manual_seed(0))
    mask = [Image.fromarray(np.tile((np.arange(64) < 32).astype(np.uint8)[None, :, None] * 255, (64, 1, 3)))] * 9
    arguments = dict(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], video=frames(9, 1), mask=mask,
                     reference_images=frames(references, 2) or None, conditioning_scale=SCALES, height=64, width=64,
                     num_frames=9, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                     generator=torch.Generator().manual_seed(0))
    return pipeline(**{**arguments, **overrides}).frames


def pruned_forwards(pipeline, config, handles: list, references: int = 0, steps: int = 2, **overrides) -> list:
    """The forward records of one call under `config`; the hooks `handles` and vidprune are
    taken off after it."""
    vidprune.apply(pipeline, config)
    try:
        generate(pipeline, references, steps, **overrides)
    finally:
        for handle in handles:
            handle.remove()
    forwards = vidprune.stats(pipeline).forwards
    vidprune.remove(pipeline)
    return forwards


@pytest.mark.parametrize("spans", [INSIDE, AT_ENDS], ids=["hints-inside-spans", "hints-at-span-ends"])
@pytest.mark.parametrize("references", [0, 1])
def test_keep_one_and_remove_bit_identical_through_the_pipeline(pipe, spans, references):
    reference = generate(pipe, references)
    for config in (vidprune.TapeConfig(budget="even", keep=1.0, **spans), vidprune.TapeConfig.paper(keep=1.0, **spans)):
        vidprune.apply(pipe, config)
        assert torch.equal(generate(pipe, references), reference)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, dense_first=0.0, **spans))
    pruned = generate(pipe, references)
    stats = vidprune.stats(pipe)
    assert stats.mean_keep == 0.5 and len(stats.forwards) == 6  # CFG: two calls a step
    assert any(s.tokens < (FRAMES + references) * FRAME_TOKENS for f in stats.forwards for s in f.spans)
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, reference)
    vidprune.remove(pipe)
    assert torch.equal(generate(pipe, references), reference)


def test_main_blocks_compute_the_kept_tokens_and_control_blocks_all(pipe):
    """The paper preset at a constant keep 0.5: main blocks 1-5 run on half the tokens (spans 1-3,
    4-5), block 0 and every control block on all of them."""
    model = pipe.transformer
    seen = []  # (kind, block, tokens into its feed-forward)
    handles = [block.ffn.register_forward_pre_hook(lambda m, a, i=i, kind=kind: seen.append((kind, i, a[0].shape[1])))
               for kind, blocks in (("main", model.blocks), ("control", model.vace_blocks))
               for i, block in enumerate(blocks)]
    forwards = pruned_forwards(pipe, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **INSIDE), handles)
    assert [[(s.start, s.end, s.tokens) for s in f.spans] for f in forwards] == [[(1, 3, 24), (4, 5, 24)]] * 4
    per_forward = ([("control", i, TOKENS) for i in range(3)] + [("main", 0, TOKENS)]
                   + [("main", i, TOKENS // 2) for i in range(1, 6)])
    assert seen == per_forward * 4


def test_hints_reach_the_kept_tokens_at_their_layers(pipe):
    """Each span's kept outputs equal its blocks run by hand on the kept tokens (their own hidden
    states and RoPE rows), with hint j at the kept tokens times conditioning_scale[j] added after
    layer VACE_LAYERS[j] inside the span: fails if a hint is left out, added at other tokens or
    layers, or unscaled."""
    model = pipe.transformer
    hints = []  # the control hints of the last forward
    captured, handles = record_block_calls(model.blocks)  # block -> (full-length inputs, output) of the last forward
    config = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", record_selections=True, **INSIDE)
    spans = pruned_forwards(pipe, config, handles + record_hints(model, hints))[-1].spans
    scale = torch.tensor(SCALES, dtype=model.dtype)
    assert len(spans) == 2
    for span in spans:
        inputs, kept = captured[span.start][0], span.index[0]
        assert span.index.shape[0] == 1 and (kept < FRAME_TOKENS).any() and (kept >= 2 * FRAME_TOKENS).any()
        cos, sin = inputs["rotary_emb"]
        x = inputs["hidden_states"][:, kept]
        with torch.no_grad():
            for layer in range(span.start, span.end + 1):
                x = model.blocks[layer](x, inputs["encoder_hidden_states"], inputs["temb"],
                                        (cos[:, kept], sin[:, kept]))
                if layer in VACE_LAYERS and layer != span.end:  # after the span's last block: full length, below
                    j = VACE_LAYERS.index(layer)
                    x = x + hints[j][:, kept] * scale[j]
        assert torch.equal(captured[span.end][1][:, kept], x)


def test_a_hint_after_a_span_is_added_at_full_length(pipe):
    """The block after a span ending at a hint layer gets the scattered span output plus the whole
    hint, as unpruned."""
    model = pipe.transformer
    inputs, outputs, hints = {}, {}, []
    handles = [*record_hints(model, hints),
               model.blocks[3].register_forward_pre_hook(lambda m, a: inputs.__setitem__(3, a[0])),
               model.blocks[2].register_forward_hook(lambda m, a, out: outputs.__setitem__(2, out))]
    forwards = pruned_forwards(pipe, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **AT_ENDS), handles)
    assert [s.tokens for s in forwards[-1].spans] == [24, 24, 24]
    assert outputs[2].shape[1] == TOKENS
    assert torch.equal(inputs[3], outputs[2] + hints[1] * torch.tensor(SCALES[1]))


@pytest.mark.parametrize("references", [0, 1, 2])
def test_reference_image_frames_are_found_and_computed_whole(pipe, references):
    controls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: controls.append(kw["control_hidden_states"]), with_kwargs=True)
    config = vidprune.TapeConfig.paper(keep=0.5, schedule="constant", record_selections=True, **INSIDE)
    spans = [s for f in pruned_forwards(pipe, config, [handle], references) for s in f.spans]
    assert {reference_frames(pipe.transformer, control) for control in controls} == {references}
    grid_frames = FRAMES + references
    # the keep share of every frame, then the rest of the reference frames' tokens
    chosen = (grid_frames * FRAME_TOKENS // 2) // grid_frames
    for span in spans:
        assert span.kept_per_frame() == [FRAME_TOKENS] * references + [chosen] * FRAMES
        assert span.tokens == references * FRAME_TOKENS + FRAMES * chosen


def test_a_blank_masked_video_frame_is_not_a_reference_frame(pipe):
    """A frame the mask keeps whole (mask 0: nothing to generate there) has zero mask channels too,
    but its reactive latents are the VAE's encoding of a blank frame, not zeros."""
    controls = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: controls.append(kw["control_hidden_states"]), with_kwargs=True)
    blank = [Image.new("RGB", (64, 64))] * 9
    try:
        generate(pipe, steps=1, mask=blank)
    finally:
        handle.remove()
    assert not controls[0][:, 32:].any()  # the mask channels are all zero
    assert reference_frames(pipe.transformer, controls[0]) == 0


def test_default_config_through_a_pipeline_call(pipe):
    """TapeConfig(): the first step dense, the later ones pruned in span 2-5 (hints of layers 2 and
    4 inside it), with a reference image computed whole."""
    reference = generate(pipe, references=1, steps=6)
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even"))
    out = generate(pipe, references=1, steps=6)
    stats = vidprune.stats(pipe)
    vidprune.remove(pipe)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert stats.mean_keep == pytest.approx(0.5) and stats.forwards[0].keep == 1.0
    pruned = [f for f in stats.forwards if f.keep < 1.0]
    assert pruned and all([(s.start, s.end) for s in f.spans] == [(2, 5)] for f in pruned)
    assert all(FRAME_TOKENS < s.tokens < (FRAMES + 1) * FRAME_TOKENS for f in pruned for s in f.spans)
    assert 0 < stats.flops_saved < 0.5


def test_bare_transformer_with_the_paper_preset():
    model, inputs = tiny_vace(seed=1), model_inputs(batch=2)
    reference = model(**inputs)[0]
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=1.0, **INSIDE))
    assert torch.equal(model(**inputs)[0], reference)
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **INSIDE))
    out = model(**inputs)[0]
    assert [s.tokens for s in vidprune.stats(model).forwards[-1].spans] == [24, 24]
    vidprune.remove(model)
    assert torch.isfinite(out).all() and not torch.equal(out, reference)
    assert torch.equal(model(**inputs)[0], reference)


def test_control_blocks_flops_are_counted_unpruned():
    """`unpruned_flops` equals the matrix-multiply FLOPs torch counts in the control blocks, and
    the stats count them in a forward's FLOPs, pruned or not."""
    model = tiny_vace()
    adapter = adapter_for(model)
    captured = {}
    for i, block in enumerate(model.vace_blocks):
        block.register_forward_pre_hook(
            lambda m, a, kw, i=i: captured.update({i: bind_arguments(type(m).forward, a, kw)}), with_kwargs=True)
    inputs = model_inputs()
    model(**inputs)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        for i, block in enumerate(model.vace_blocks):
            block(**captured[i])
    assert adapter.unpruned_flops(model, TOKENS, TEXT) == counter.get_total_flops()
    vidprune.apply(model, vidprune.TapeConfig.paper(keep=0.5, schedule="constant", **INSIDE))
    model(**inputs)
    record = vidprune.stats(model).forwards[-1]
    vidprune.remove(model)
    blocks = adapter.block_flops(model, TOKENS, TEXT) + 5 * adapter.block_flops(model, TOKENS // 2, TEXT)
    assert record.block_flops == adapter.unpruned_flops(model, TOKENS, TEXT) + blocks
    assert record.block_flops_unpruned == adapter.unpruned_flops(model, TOKENS, TEXT) + 6 * adapter.block_flops(
        model, TOKENS, TEXT)


def test_block_cache_and_cuda_graphs_are_refused_before_anything_changes(pipe):
    with pytest.raises(ValueError, match=r"cache='block'\) is not supported on WanVACETransformer3DModel"):
        vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache="block"))
    assert pruner_of(pipe.transformer) is None and not any(hooked_control_blocks(pipe.transformer))
    model = tiny_vace()
    setattr(model, _GRAPHS_ATTRIBUTE, lambda: EagerReplayGraph)  # as compile_blocks(graphs=True) marks it
    for config in (vidprune.TapeConfig.paper(keep=0.5), vidprune.LipConfig()):
        with pytest.raises(ValueError, match="graphs=True\\) does not support WanVACETransformer3DModel"):
            vidprune.apply(model, config)
    assert pruner_of(model) is None


def hooked_control_blocks(model: WanVACETransformer3DModel) -> list[bool]:
    """Which control blocks carry vidprune's hook."""
    registries = [getattr(block, "_diffusers_hook", None) for block in model.vace_blocks]
    return [registry is not None and registry.get_hook("vidprune") is not None for registry in registries]


def test_control_block_hooks_follow_the_spans_and_go_with_remove(pipe):
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, **INSIDE))
    assert hooked_control_blocks(pipe.transformer) == [False, True, True]  # layers 2 and 4: inside spans 1-3, 4-5
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, **AT_ENDS))  # applying again replaces them
    assert hooked_control_blocks(pipe.transformer) == [False] * 3
    vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, **INSIDE))
    vidprune.remove(pipe)
    assert hooked_control_blocks(pipe.transformer) == [False] * 3


def cycle_call(pipeline, blocks, steps: int) -> tuple[torch.Tensor, int, Any]:
    """A call with the default cycle budget at keep 0.5 (no dense start): its output, how many
    times `blocks` ran their feed-forward, and its stats; the pipeline is left unpatched."""
    vidprune.apply(pipeline, vidprune.TapeConfig(keep=0.5, dense_first=0.0))
    calls = []
    handles = [block.ffn.register_forward_hook(lambda m, a, o: calls.append(1)) for block in blocks]
    try:
        out = generate(pipeline, references=1, steps=steps)
    finally:
        for handle in handles:
            handle.remove()
    stats = vidprune.stats(pipeline)
    vidprune.remove(pipeline)
    return out, len(calls), stats


def test_a_cycle_budget_runs_with_hints_and_reuse_steps_run_no_main_block(pipe):
    """Reuse steps with VACE: no main block runs on them (the hints are added to reused outputs
    as to computed ones), and the call stays finite."""
    reference = generate(pipe, references=1, steps=6)
    out, calls, stats = cycle_call(pipe, pipe.transformer.blocks, steps=6)
    reused = [f for f in stats.forwards if f.keep == 0.0]
    assert reused and torch.isfinite(out).all() and not torch.equal(out, reference)
    assert calls == len(pipe.transformer.blocks) * (len(stats.forwards) - len(reused))


def test_reuse_steps_skip_the_control_blocks_and_change_nothing_else(pipe, monkeypatch):
    """Every hint lands inside the span of a cycle budget, so on a reuse step the spans' residuals
    hold them: the control blocks do not run there, the output is the one they would give, and the
    FLOPs of those forwards are 0."""
    from vidprune.tape import TapePruner

    skipped, skipped_calls, stats = cycle_call(pipe, pipe.transformer.vace_blocks, steps=4)
    monkeypatch.setattr(TapePruner, "reuses_forward", lambda self: False)  # the control blocks run
    ran, ran_calls, _ = cycle_call(pipe, pipe.transformer.vace_blocks, steps=4)
    reused = [f for f in stats.forwards if f.keep == 0.0]
    blocks = len(pipe.transformer.vace_blocks)
    assert reused and torch.equal(skipped, ran)
    assert ran_calls == blocks * len(stats.forwards) and skipped_calls == blocks * (len(stats.forwards) - len(reused))
    assert all(f.unpruned_skipped and f.block_flops == 0.0 for f in reused)


def test_control_blocks_run_on_reuse_steps_when_a_hint_lands_after_a_span():
    """Spans [0, 0], [1, 5] (a lead span before first_pruned_layer=1): hint 0 is added after the
    lead span's last block, outside every remembered residual, so no control block may skip (hints
    2 and 4 are still gathered); with one span over the stack every one may."""
    from vidprune.adapters import adapter_for
    from vidprune.runtime import attach, detach
    from vidprune.tape import TapePruner, TapeState

    model = tiny_vace()

    def control_hooks(config: vidprune.TapeConfig) -> tuple[list, list]:
        pruner = attach(TapePruner(model, adapter_for(model), config, TapeState(config)))
        try:
            registries = [getattr(block, "_diffusers_hook", None) for block in model.vace_blocks]
            hooks = [r.get_hook("vidprune") for r in registries if r is not None and r.get_hook("vidprune")]
            return [(s.start, s.end) for s in pruner.spans], hooks
        finally:
            detach(model)

    spans, hooks = control_hooks(vidprune.TapeConfig(budget=[1.0, 0.0, 0.5], first_pruned_layer=1, reselect_every=0))
    assert spans == [(0, 0), (1, 5)] and len(hooks) == 2 and not any(hook.skips for hook in hooks)
    spans, hooks = control_hooks(vidprune.TapeConfig(keep=0.5))
    assert spans == [(0, 5)] and len(hooks) == len(model.vace_blocks) and all(hook.skips for hook in hooks)


def test_with_leading_adds_the_leading_tokens_sorted_and_refuses_unequal_rows():
    from vidprune.tokens import with_leading

    index = torch.tensor([[1, 5, 6], [4, 5, 7]])
    assert torch.equal(with_leading(index, 0, 8), index)
    same = torch.tensor([[1, 5, 6], [2, 5, 7]])  # one leading token in each row: equal counts after
    assert with_leading(same, 3, 8).tolist() == [[0, 1, 2, 5, 6], [0, 1, 2, 5, 7]]
    with pytest.raises(ValueError, match="different numbers of the first 4 tokens"):
        with_leading(index, 4, 8)  # row 0 holds one of them, row 1 none
