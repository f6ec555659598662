"""CUDA graphs of pruned spans (compile_blocks(graphs=True), vidprune/graphs.py).

On the CPU the capture logic runs with graphs.EagerReplayGraph, which has a real graph's
contract: a capture computes nothing (its outputs are NaN until a replay), a replay re-runs the
recorded work on the buffers it was captured with. The last test runs real CUDA graphs."""

from __future__ import annotations

import contextlib

import pytest
import torch

import vidprune
from vidprune.graphs import EagerReplayGraph, SpanGraphs
from vidprune.patch import _GRAPHS_ATTRIBUTE
from vidprune.runtime import pruner_of

from conftest import SMALL_SPANS, tiny_transformer, transformer_inputs
from test_lip import edit, moving_square_video
from test_lip_tape import mask as lip_tape_mask

LIP_MASK = torch.arange(3 * 4 * 5).view(3, 4, 5) % 3 != 1  # grid 3 x 4 x 5, frame 0 kept whole
LIP_MASK[0] = True


def fake_graphs() -> type[EagerReplayGraph]:
    return EagerReplayGraph


@contextlib.contextmanager
def graphed(*transformers):
    """Pruned spans of these transformers run through EagerReplayGraph (as compile_blocks(graphs=True)
    sets up CudaGraph on a GPU)."""
    for transformer in transformers:
        setattr(transformer, _GRAPHS_ATTRIBUTE, fake_graphs)
    try:
        yield
    finally:
        for transformer in transformers:
            delattr(transformer, _GRAPHS_ATTRIBUTE)


# -- the runner ---------------------------------------------------------------------------------

def affine(inputs):
    return {"y": inputs["x"] * inputs["scale"][0] + 1, "n": inputs["n"]}


def test_runner_runs_eager_then_captures_then_replays_on_new_values():
    runner = SpanGraphs(EagerReplayGraph)
    seen = []
    for seed in range(5):
        x = torch.randn(3, 2, generator=torch.Generator().manual_seed(seed))
        inputs = {"x": x, "scale": (torch.tensor(2.0),), "n": 5}
        output, how = runner.run("span", inputs, affine)
        seen.append(how)
        assert torch.equal(output["y"], x * 2 + 1) and output["n"] == 5  # this call's values, not the captured ones
    assert seen == ["eager", "eager", "captured", "replayed", "replayed"]
    assert runner.counts == {"eager": 2, "captured": 1, "replayed": 2}


def test_runner_outputs_are_copies_of_the_static_buffers():
    runner = SpanGraphs(EagerReplayGraph, capture_at=2)

    def inputs(value: float) -> dict:
        return {"x": torch.full((2,), float(value)), "scale": (torch.tensor(1.0),), "n": 0}

    runner.run("span", inputs(0), affine)
    first, _ = runner.run("span", inputs(1), affine)  # captured
    second, _ = runner.run("span", inputs(5), affine)  # replayed into the same buffers
    assert first["y"].tolist() == [2.0, 2.0] and second["y"].tolist() == [6.0, 6.0]
    second["y"].zero_()
    third, _ = runner.run("span", inputs(5), affine)
    assert third["y"].tolist() == [6.0, 6.0]


def test_runner_captures_anew_for_new_shapes_keys_and_constants_and_evicts_the_oldest():
    runner = SpanGraphs(EagerReplayGraph, capacity=2, capture_at=2)

    def run(key, rows, n=0):
        inputs = {"x": torch.ones(rows, 2), "scale": (torch.tensor(3.0),), "n": n}
        for _ in range(2):
            output, _ = runner.run(key, inputs, affine)
            assert torch.equal(output["y"], torch.full((rows, 2), 4.0)) and output["n"] == n

    run("a", 3)
    run("a", 4)  # another shape
    run("b", 3)  # another span
    assert runner.counts["captured"] == 3 and len(runner.entries) == 2  # "a" at 3 rows dropped
    run("b", 3, n=1)  # another constant
    assert runner.counts["captured"] == 4
    _, how = runner.run("a", {"x": torch.ones(3, 2), "scale": (torch.tensor(3.0),), "n": 0}, affine)
    assert how == "captured"  # it was evicted: captured again, not replayed from freed buffers


# -- in the runtime ------------------------------------------------------------------------------

CONFIGS = {
    "lip": vidprune.LipConfig(mask=LIP_MASK, restore="prediction"),
    "lip-noar": vidprune.LipConfig(mask=LIP_MASK, recovery=False),
    "lip-dup1": vidprune.LipConfig(mask=LIP_MASK, duplicates=1),
    "tape": vidprune.TapeConfig.paper(keep=0.5, **SMALL_SPANS),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_graphed_spans_compute_what_eager_spans_compute(name):
    eager, graphs = tiny_transformer(), tiny_transformer()
    vidprune.apply(eager, CONFIGS[name])
    with graphed(graphs):
        vidprune.apply(graphs, CONFIGS[name])
    hows = []
    inputs = transformer_inputs(batch=2, frames=3, height=8, width=10)
    with pytest.raises(RuntimeError, match=r"for inference only: call the model under torch.no_grad\(\)"):
        graphs(**inputs)
    for seed in range(5):  # new values at every forward: the static buffers must be refilled
        inputs = transformer_inputs(batch=2, frames=3, height=8, width=10, seed=seed)
        with torch.no_grad():
            assert torch.equal(graphs(**inputs)[0], eager(**inputs)[0])
        hows.append([span.graph for span in vidprune.stats(graphs).forwards[-1].spans])
    assert all(span.graph is None for f in vidprune.stats(eager).forwards for span in f.spans)
    spans = len(hows[0])
    if name == "tape":  # a fresh selection each forward, same shapes: only the index changes
        assert hows == [["eager"] * spans] * 2 + [["captured"] * spans] + [["replayed"] * spans] * 2
    else:
        assert hows == [["eager"], ["eager"], ["captured"], ["replayed"], ["replayed"]]
    vidprune.remove(graphs)
    inputs = transformer_inputs(batch=2, frames=3, height=8, width=10, seed=9)
    assert torch.equal(graphs(**inputs)[0], tiny_transformer()(**inputs)[0])


def test_an_all_kept_mask_stays_bit_identical_with_graphs():
    model = tiny_transformer()
    with graphed(model):
        vidprune.apply(model, vidprune.LipConfig(mask=torch.ones(3, 4, 5, dtype=torch.bool)))
    inputs = transformer_inputs(frames=3, height=8, width=10)
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], tiny_transformer()(**inputs)[0])
    assert vidprune.stats(model).forwards[0].spans == []


@pytest.mark.parametrize("config", [vidprune.LipConfig(), vidprune.LipConfig(recovery=False),
                                    vidprune.LipConfig(mask=lip_tape_mask(), tape=vidprune.TapeConfig.paper(
                                        keep=0.5, schedule="constant", **SMALL_SPANS))],
                         ids=["lip", "lip-noar", "lip-tape"])
def test_graphs_in_edits_match_eager_and_are_dropped_with_each_call(clean, config):
    """Two edits of different videos in a row: the second must not replay the first's graphs."""
    pipe = clean["v2v"]
    vidprune.apply(pipe, config)
    other_video = [frame.transpose(0) for frame in moving_square_video()]  # mirrored: another mask
    expected = [edit(pipe), edit(pipe, video=other_video)]
    with graphed(pipe.transformer):
        vidprune.apply(pipe, config)
        got = [edit(pipe)]
        hows = [span.graph for f in vidprune.stats(pipe).forwards for span in f.spans]
        assert pipe._vidprune_state.span_graphs == {}  # dropped at the end of the call
        got.append(edit(pipe, video=other_video))
        vidprune.remove(pipe)
    assert "replayed" in hows and hows.count("eager") >= 1
    for e, g in zip(expected, got):
        assert torch.equal(g, e)
    assert not torch.equal(expected[0], expected[1])


def test_graphs_refuse_what_they_cannot_run_and_change_nothing(clean):
    model = tiny_transformer()
    with pytest.raises(ValueError, match="captures CUDA graphs: WanTransformer3DModel is on cpu"):
        vidprune.compile_blocks(model, graphs=True)
    assert not hasattr(model, _GRAPHS_ATTRIBUTE) and not hasattr(model.blocks[0], "_vidprune_compiled")
    with pytest.raises(ValueError, match="does nothing without graphs=True"):
        vidprune.compile_blocks(model, compile=False)
    with pytest.raises(ValueError, match=r"torch.compile options \(mode\) with compile=False"):
        vidprune.compile_blocks(model, graphs=True, compile=False, mode="max-autotune")
    pipe = clean["t2v"]
    with graphed(model, pipe.transformer):
        with pytest.raises(ValueError, match="kv_source='clean'"):
            vidprune.apply(model, vidprune.LipConfig(mask=LIP_MASK, kv_source="clean"))
        with pytest.raises(ValueError, match="cache='block'"):
            vidprune.apply(pipe, vidprune.TapeConfig(budget="even", keep=0.5, cache="block"))
    assert pruner_of(model) is None and pruner_of(pipe.transformer) is None


def test_graphs_refuse_hooks_registered_after_vidprunes():
    """A step cache's hooks on the span's blocks would see the pass-through outputs of blocks
    whose work ran in the graph at the span's first block."""
    from diffusers.hooks import HookRegistry, ModelHook

    model = tiny_transformer()
    with graphed(model):
        vidprune.apply(model, CONFIGS["lip"])
    HookRegistry.check_if_exists_or_initialize(model.blocks[2]).register_hook(ModelHook(), "later")
    with torch.no_grad(), pytest.raises(ValueError, match=r"block 2 has hooks registered after vidprune's \(later\)"):
        model(**transformer_inputs(frames=3, height=8, width=10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["lip", "lip-noar", "tape"])
def test_real_cuda_graphs_match_eager(name):
    eager, graphs = tiny_transformer().cuda(), tiny_transformer().cuda()
    vidprune.compile_blocks(graphs, graphs=True, compile=False)
    for model in (eager, graphs):
        vidprune.apply(model, CONFIGS[name])
    for seed in range(5):
        inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
                  for k, v in transformer_inputs(batch=2, frames=3, height=8, width=10, seed=seed).items()}
        with torch.no_grad():
            torch.testing.assert_close(graphs(**inputs)[0], eager(**inputs)[0], atol=1e-4, rtol=1e-4)
    assert vidprune.stats(graphs).forwards[-1].spans[0].graph == "replayed"
