"""vidprune.compile_blocks: the pruning hooks wrap compiled blocks and compute the same."""

from __future__ import annotations

import pytest
import torch

import vidprune
from conftest import tiny_transformer, transformer_inputs

LIP_MASK = torch.arange(3 * 4 * 5).view(3, 4, 5) % 3 != 1  # grid 3 x 4 x 5, frame 0 kept whole
LIP_MASK[0] = True
CONFIGS = {
    "tape": vidprune.TapeConfig.paper(keep=0.5, first_pruned_layer=0, reselect_every=1),
    "lip": vidprune.LipConfig(mask=LIP_MASK, restore="prediction"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_blocks_give_the_eager_pruned_output(name):
    graphs = []

    def backend(graph, example_inputs):
        """Runs the graph dynamo traced as it is (no C++ compiler needed) and counts it."""
        graphs.append(graph)
        return graph.forward

    eager, compiled = tiny_transformer(), tiny_transformer()
    vidprune.compile_blocks(compiled, backend=backend)
    for model in (eager, compiled):
        vidprune.apply(model, CONFIGS[name])
    # Two inputs: a compiled graph must not keep the first call's selection.
    for seed in (0, 1):
        inputs = transformer_inputs(batch=2, frames=3, height=8, width=10, seed=seed)
        expected, got = eager(**inputs)[0], compiled(**inputs)[0]
        assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, tiny_transformer()(**inputs)[0], atol=1e-3)  # it did prune
    assert graphs, "no block ran compiled"
    vidprune.remove(compiled)
    assert torch.allclose(compiled(**inputs)[0], tiny_transformer()(**inputs)[0], atol=1e-5, rtol=1e-5)


def test_compile_blocks_refuses_what_it_cannot_compile():
    model = vidprune.apply(tiny_transformer(), CONFIGS["tape"])
    with pytest.raises(ValueError, match="before vidprune.apply"):
        vidprune.compile_blocks(model)
    with pytest.raises(TypeError, match="compile_blocks takes a diffusers pipeline or transformer"):
        vidprune.compile_blocks("not a model")
