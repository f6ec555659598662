"""LIP on Wan2.1-VACE: the keep mask read from the control latents, on the tiny random
WanVACETransformer3DModel of test_wan_vace.py, bare and in its WanVACEPipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from test_wan_vace import FRAME_TOKENS, FRAMES, SCALES, VACE_LAYERS, generate, pipe, record_hints, tiny_vace  # noqa: F401

import vidprune
from vidprune.adapters import adapter_for
from vidprune.adapters.wan import WanRecoveryProcessor
from vidprune.interframe import reference_index
from vidprune.recovery import recovery_keys
from vidprune.runtime import pruner_of
from vidprune.tokens import patches

from conftest import record_block_calls

# No filters, clean-up or dilation: on a 4 x 4 token grid the 3 x 5 x 5 dilation covers a frame.
DETECTION = vidprune.LipDetection(tau=0.05, median=False, smooth=False, cleanup=False, dilate=False, tau2=None)
STILL = [Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))] * 9


@pytest.fixture
def clean_pipe(pipe):  # noqa: F811
    yield pipe
    vidprune.remove(pipe)


def constructed_control() -> tuple[torch.Tensor, torch.Tensor]:
    """Control latents (1, 96, 5, 8, 8): a reference-image frame, then 4 video frames of still
    inactive and reactive latents, and the keep mask (5, 4, 4) the rule gives them."""
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 32, 1, 8, 8, generator=g).repeat(1, 1, 4, 1, 1)
    mask = torch.zeros(1, 64, 4, 8, 8)
    mask[..., 6:] = 1.0  # token column 3 generated in every frame, where the control stands still
    video[:, :, 2:, :2, :2] += 1.0  # token (0, 0) changes at video frame 2 and stays
    mask[:, 5, 1, 4, 0] = 1.0  # one mask value in token (2, 0) at video frame 1: too little for detection
    reference = torch.cat([torch.randn(1, 16, 1, 8, 8, generator=g), torch.zeros(1, 80, 1, 8, 8)], dim=1)
    keep = torch.zeros(5, 4, 4, dtype=torch.bool)
    keep[:2] = True  # the reference frame and video frame 0
    keep[:, :, 3] = True  # generated
    keep[3, 0, 0] = True  # changed (and pruned again at the next frame, where it repeats)
    keep[2:4, 2, 0] = True  # generated at video frame 1, and the token after it
    return torch.cat([reference, torch.cat([video, mask], dim=1)], dim=2), keep


def bare_inputs(control: torch.Tensor) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, control.shape[2], 8, 8, generator=generator),
                timestep=torch.full((1,), 700.0), encoder_hidden_states=torch.randn(1, 7, 16, generator=generator),
                control_hidden_states=control, return_dict=False)


def test_keep_mask_follows_the_control_latents_and_the_mask():
    """Pruned: still control where the mask is zero. Computed: reference frames, video frame 0,
    changed tokens, tokens with any mask value, and the token after one of those in time."""
    model = tiny_vace()
    control, expected = constructed_control()
    mask = adapter_for(model).lip_keep_mask(model, bare_inputs(control), DETECTION)
    assert mask.shape == (1, 5, 4, 4) and torch.equal(mask[0], expected)


def test_a_bare_transformer_reads_each_forwards_own_control_latents():
    model = tiny_vace()
    control, expected = constructed_control()
    reference = model(**bare_inputs(control))[0]
    vidprune.apply(model, vidprune.LipConfig(detection=DETECTION))
    pruned = model(**bare_inputs(control))[0]
    (span,) = vidprune.stats(model).forwards[-1].spans
    assert torch.equal(span.index[0], expected.flatten().nonzero().squeeze(1))
    assert torch.isfinite(pruned).all() and not torch.equal(pruned, reference)
    generated = control.clone()
    generated[:, 32:, 1:] = 1.0  # the mask set everywhere: every token computed, as unpruned
    unpruned = model(**bare_inputs(generated))[0]
    assert vidprune.stats(model).forwards[-1].spans == []
    vidprune.remove(model)
    assert torch.equal(unpruned, model(**bare_inputs(generated))[0])


def test_a_given_mask_gets_the_reference_frames_whole():
    """LipConfig(mask=...) pruning a token of the second reference frame: LIP computes it, as
    every span must, so its output is its own, not its reference's in the first frame."""
    model = tiny_vace()
    control, _ = constructed_control()
    second = torch.cat([torch.randn(1, 16, 1, 8, 8, generator=torch.Generator().manual_seed(5)),
                        torch.zeros(1, 80, 1, 8, 8)], dim=1)
    control = torch.cat([control[:, :, :1], second, control[:, :, 1:]], dim=2)
    mask = torch.ones(6, 4, 4, dtype=torch.bool)
    mask[1, 0, 0] = mask[5, 1, 1] = False
    vidprune.apply(model, vidprune.LipConfig(mask=mask, restore="prediction"))
    out = patches(model(**bare_inputs(control))[0], (1, 2, 2)).flatten(1, 3)
    (span,) = vidprune.stats(model).forwards[-1].spans
    vidprune.remove(model)
    video_token = 5 * FRAME_TOKENS + 5  # (frame 5, 1, 1): pruned, copies frame 4's
    assert span.tokens == 6 * FRAME_TOKENS - 1 and video_token not in span.index[0].tolist()
    assert not torch.equal(out[:, FRAME_TOKENS], out[:, 0])
    assert torch.equal(out[:, video_token], out[:, video_token - FRAME_TOKENS])


def test_with_reference_frames_the_span_attends_with_the_masks_own_recovery_keys(monkeypatch):
    """The reference frames are in LIP's mask already: its span is the mask's selection, whose
    recovery keys were made with the mask, not made again for the span."""
    import vidprune.lip as lip

    made = []
    monkeypatch.setattr(lip, "recovery_keys", lambda *args: made.append(1) or recovery_keys(*args))
    model = tiny_vace()
    control, _ = constructed_control()
    vidprune.apply(model, vidprune.LipConfig(detection=DETECTION, restore="prediction"))
    model(**bare_inputs(control))
    (span,) = vidprune.stats(model).forwards[-1].spans
    vidprune.remove(model)
    assert span.tokens < 5 * FRAME_TOKENS and span.index[0, :FRAME_TOKENS].tolist() == list(range(FRAME_TOKENS))
    assert len(made) == 1  # the mask's


@pytest.mark.parametrize("references", [0, 1])
def test_keep_all_and_remove_are_bit_identical_through_the_pipeline(clean_pipe, references):
    reference = generate(clean_pipe, references, steps=2)
    whole = generate(clean_pipe, references, steps=2, mask=None)  # WanVACEPipeline generates every pixel
    vidprune.apply(clean_pipe, vidprune.LipConfig(mask=torch.ones(FRAMES + references, 4, 4, dtype=torch.bool)))
    assert torch.equal(generate(clean_pipe, references, steps=2), reference)
    vidprune.apply(clean_pipe, vidprune.LipConfig())
    assert torch.equal(generate(clean_pipe, references, steps=2, mask=None), whole)
    assert vidprune.stats(clean_pipe).mean_keep == 1.0
    main = clean_pipe.transformer.blocks
    assert all(isinstance(block.attn1.processor, WanRecoveryProcessor) for block in main)
    assert not any(isinstance(block.attn1.processor, WanRecoveryProcessor) for block in clean_pipe.transformer.vace_blocks)
    vidprune.remove(clean_pipe)
    still = generate(clean_pipe, references, steps=2, video=STILL)
    vidprune.apply(clean_pipe, vidprune.LipConfig(detection=DETECTION))
    assert not torch.equal(generate(clean_pipe, references, steps=2, video=STILL), still)
    assert vidprune.stats(clean_pipe).mean_keep < 1.0
    vidprune.remove(clean_pipe)
    assert torch.equal(generate(clean_pipe, references, steps=2), reference)
    assert not any(isinstance(block.attn1.processor, WanRecoveryProcessor) for block in main)


def test_a_still_source_outside_the_mask_is_pruned_in_the_main_blocks(clean_pipe):
    """A still video, its left half masked, one reference image: the main blocks compute the
    reference frame, video frame 0 and the left half of the later frames; the control blocks
    every token. Pruned tokens leave with their reference's clean estimate (restore="x0")."""
    model = clean_pipe.transformer
    seen, calls = [], []
    handles = [block.ffn.register_forward_pre_hook(lambda m, a, kind=kind: seen.append((kind, a[0].shape[1])))
               for kind, blocks in (("main", model.blocks), ("control", model.vace_blocks)) for block in blocks]
    handles.append(model.register_forward_hook(
        lambda m, a, kw, out: calls.append((kw["hidden_states"], kw["timestep"], out[0])), with_kwargs=True))
    vidprune.apply(clean_pipe, vidprune.LipConfig(detection=DETECTION))
    try:
        generate(clean_pipe, references=1, steps=2, video=STILL)
    finally:
        for handle in handles:
            handle.remove()
    stats = vidprune.stats(clean_pipe)
    expected = torch.zeros(FRAMES + 1, 4, 4, dtype=torch.bool)
    expected[:2] = True
    expected[:, :, :2] = True  # the masked left half: 32 of the 64 pixels, columns of tokens 0 and 1
    kept = int(expected.sum())
    assert len(stats.forwards) == 4 and stats.mean_keep == pytest.approx(kept / expected.numel())
    for forward in stats.forwards:
        (span,) = forward.spans
        assert torch.equal(span.index[0], expected.flatten().nonzero().squeeze(1))
    tokens = (FRAMES + 1) * FRAME_TOKENS
    per_forward = [("control", tokens)] * len(VACE_LAYERS) + [("main", kept)] * len(model.blocks)
    assert seen == per_forward * 4 and 0 < stats.flops_saved < 1
    reference = reference_index(expected.unsqueeze(0))[0]
    pruned = reference != torch.arange(tokens)
    for noisy, timestep, output in calls:
        x0 = patches(noisy - timestep[0] / 1000 * output, (1, 2, 2)).flatten(1, 3)
        torch.testing.assert_close(x0[:, pruned], x0[:, reference[pruned]], rtol=1e-5, atol=1e-5)


def test_hints_are_added_at_lips_kept_tokens(clean_pipe):
    """Plain pruning (no recovery): LIP's span (all main blocks) computes exactly its blocks run by
    hand on the kept tokens with each hint at those tokens, scaled, after its layer."""
    model = clean_pipe.transformer
    hints = []
    captured, handles = record_block_calls(model.blocks)
    handles += record_hints(model, hints)
    vidprune.apply(clean_pipe, vidprune.LipConfig(detection=DETECTION, recovery=False))
    try:
        generate(clean_pipe, references=1, steps=1, video=STILL)
    finally:
        for handle in handles:
            handle.remove()
    (span,) = vidprune.stats(clean_pipe).forwards[-1].spans
    kept = span.index[0]
    inputs = captured[0][0]
    cos, sin = inputs["rotary_emb"]
    x = inputs["hidden_states"][:, kept]
    assert span.start == 0 and span.end == len(model.blocks) - 1 and 0 < kept.numel() < (FRAMES + 1) * FRAME_TOKENS
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            x = block(x, inputs["encoder_hidden_states"], inputs["temb"], (cos[:, kept], sin[:, kept]))
            if layer in VACE_LAYERS:
                j = VACE_LAYERS.index(layer)
                x = x + hints[j][:, kept] * torch.tensor(SCALES[j])
    assert torch.equal(captured[span.end][1][:, kept], x)


def test_refusals_name_what_is_accepted_and_change_nothing(clean_pipe):
    for config, words in ((vidprune.LipConfig(kv_source="clean"), r"kv_source='clean'\) is not supported on "
                          r"WanVACETransformer3DModel.*use kv_source='current'"),
                          (vidprune.LipConfig(source_latents=torch.zeros(1, 16, FRAMES, 8, 8)),
                           r"source_latents=...\) is not taken on WanVACETransformer3DModel.*LipConfig\(mask=...\)")):
        with pytest.raises(ValueError, match=words):
            vidprune.apply(clean_pipe, config)
        assert pruner_of(clean_pipe.transformer) is None
    model = tiny_vace()
    control, _ = constructed_control()
    short = {**bare_inputs(control), "control_hidden_states": control[:, :, :3]}  # the model pads it with zeros
    unpatched = model(**short)[0]
    vidprune.apply(model, vidprune.LipConfig())
    with pytest.raises(ValueError, match=r"must cover the latents' \(frames, height, width\) \(5, 8, 8\)"):
        model(**short)
    vidprune.remove(model)
    assert torch.equal(model(**short)[0], unpatched)


def test_tape_inside_lip_computes_the_reference_frame_and_attends_with_its_keys(clean_pipe):
    """LipConfig(tape=...): TAPE's spans choose among LIP's kept tokens and compute the reference
    frame whole; their recovery keys are those of the tokens they compute (each of them, and the
    duplicates of the LIP-pruned tokens whose references they are)."""
    tape = vidprune.TapeConfig(keep=0.5, budget="even", dense_first=0.0, first_pruned_layer=1, reselect_every=3,
                               record_selections=True)
    vidprune.apply(clean_pipe, vidprune.LipConfig(detection=DETECTION, tape=tape))
    out = generate(clean_pipe, references=1, steps=3, video=STILL)
    forwards = vidprune.stats(clean_pipe).forwards
    grid = forwards[0].spans[0].grid
    lip = torch.zeros(grid.size, dtype=torch.bool).index_fill_(0, forwards[0].spans[0].index[0], True)
    reference = reference_index(lip.view(1, grid.frames, grid.height, grid.width))[0]
    spans = [span for forward in forwards for span in forward.spans if span.start > 0 and span.tokens < lip.sum()]
    assert spans and torch.isfinite(out).all()
    for span in spans:
        assert span.kept_per_frame()[0] == FRAME_TOKENS
        computed = torch.zeros_like(lip).index_fill_(0, span.index[0], True)
        assert span.keys == recovery_keys(computed, reference, grid, None).positions.numel()
