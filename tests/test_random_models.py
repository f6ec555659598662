"""Random-weight models of the published sizes (adapters' benchmark_shapes, bench's builder) and
benchmarks/family_speed.py end to end on the tiny shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidprune.adapters import ADAPTERS, adapter_for
from vidprune.bench import (RANDOM_MODELS, benchmark_shape, build_random_pipeline, build_transformer, detach,
                            enable_first_block_cache, transformers_of)

ROOT = Path(__file__).resolve().parents[1]
TINY = [name for adapter in ADAPTERS for name, shape in adapter.benchmark_shapes.items() if shape.tiny]

# Parameters of one transformer, in billions, as the models publish them (rounded): a wrong
# config (layers, width, heads, FFN) moves these.
PUBLISHED = {"wan-1.3b": 1.42, "wan-14b": 14.29, "wan2.2-a14b": 14.29, "cogvideox-5b": 5.57,
             "hunyuanvideo-13b": 12.82, "ltx-video-2b": 1.92}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_usual_sizes_have_the_published_parameter_counts(name):
    transformer = build_transformer(name, "meta")  # no memory: the count only
    assert sum(p.numel() for p in transformer.parameters()) / 1e9 == pytest.approx(PUBLISHED[name], abs=0.01)
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}


def test_every_family_has_a_usual_and_a_tiny_shape_and_random_names():
    families = {}
    for adapter in ADAPTERS:
        for name, shape in adapter.benchmark_shapes.items():
            families.setdefault(shape.family, set()).add(shape.tiny)
            assert RANDOM_MODELS[f"{name}-random"] == name
    families_expected = ("wan2.1", "wan2.2", "wan2.1-vace", "cogvideox", "hunyuanvideo", "hunyuanvideo-framepack", "ltx")
    assert families == {family: {False, True} for family in families_expected}
    with pytest.raises(ValueError, match="accepted: wan-1.3b"):
        benchmark_shape("wan-2b")


def test_the_builder_restores_the_default_dtype_and_builds_in_the_one_asked():
    transformer = build_transformer("wan-tiny", "cpu", torch.bfloat16)
    assert torch.get_default_dtype() == torch.float32
    assert {p.dtype for p in transformer.parameters()} == {torch.bfloat16}
    first, again = build_transformer("wan-tiny", "cpu", seed=3), build_transformer("wan-tiny", "cpu", seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))


def test_another_pipeline_class_keeps_the_dtype():
    """diffusers' from_pipe casts every module to float32 unless given a dtype (in place: the
    first pipeline's too): a bf16 benchmark model must stay bf16 as a video-to-video pipeline."""
    from diffusers import WanVideoToVideoPipeline

    pipe = build_random_pipeline("wan-tiny", "cpu", torch.bfloat16, pipeline=WanVideoToVideoPipeline)
    assert type(pipe).__name__ == "WanVideoToVideoPipeline"
    assert {p.dtype for p in pipe.transformer.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", TINY)
def test_tiny_pipelines_run_the_usual_call_on_the_shapes_latent_grid(name):
    adapter, shape = benchmark_shape(name)
    pipe = build_random_pipeline(name, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    assert len(transformers_of(pipe)) == shape.experts
    grids = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: grids.append(adapter_for(m).token_grid(m, kw)), with_kwargs=True)
    call = adapter.benchmark_call(shape, "cpu", torch.float32, torch.Generator().manual_seed(0))
    latents = pipe(**call, num_inference_steps=2).frames
    handle.remove()
    # FramePack's pipeline returns each section's latents
    assert all(torch.isfinite(part).all() for part in (latents if isinstance(latents, list) else [latents]))
    frames, height, width = shape.video
    temporal, spatial = shape.vae
    p_t, p_h, p_w = adapter.patch_size(pipe.transformer)
    grid = grids[0]
    assert (grid.frames, grid.height, grid.width) == (
        ((frames - 1) // temporal + 1) // p_t, height // spatial // p_h, width // spatial // p_w)


def test_family_speed_runs_end_to_end_on_the_cpu(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "family_speed.py"), "--device", "cpu", "--shape", "tiny",
               "--families", "hunyuanvideo", "ltx", "hunyuanvideo-framepack", "--full-context", "--repeats", "1",
               "--block-repeats", "1", "--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "family_speed.md", "family_speed_hunyuanvideo-framepack.json", "family_speed_hunyuanvideo.json",
        "family_speed_ltx.json"]
    (model,) = json.loads((tmp_path / "family_speed_ltx.json").read_text())["models"]
    tape = model["tape"]
    # 5 steps, one forward each (batched CFG): 1 dense, 4 pruned at (0.5 * 5 - 1) / 4
    assert [f["keep"] for f in tape["forwards"]] == [1.0] + [0.375] * 4
    assert tape["mean_keep"] == pytest.approx(0.5) and tape["pruned_keep"] == pytest.approx(0.375)
    assert model["batch"] == 2 and model["tokens"] == 3 * 4 * 4
    # the dense forward's ideal is the unpruned forward; a pruned one's is below it
    assert tape["forwards"][0]["ideal_ms"] == pytest.approx(model["unpruned"]["forward_ms_median"], abs=1e-3)
    # a pruned one's: layers 0-1 on all 48 tokens (first_pruned_layer=2), layers 2-5 on 18
    block = model["block_ms"]["LTXVideoTransformerBlock"]
    assert tape["forwards"][1]["ideal_ms"] == pytest.approx(model["non_block_ms"] + 2 * block["48"] + 4 * block["18"],
                                                            abs=1e-3)
    assert len(model["fbc"]["forward_ms"]) == 5 and len(model["tape_fbc"]["forward_ms"]) == 5
    assert set(model["block_ms"]["LTXVideoTransformerBlock"]) == {"48", "18"}
    full = model["tape_full_context"]  # the same call with context="full": as many forwards, as pruned
    assert len(full["forward_ms"]) == 5 and full["mean_keep"] == pytest.approx(0.5) and full["finite_output"]
    (framepack,) = json.loads((tmp_path / "family_speed_hunyuanvideo-framepack.json").read_text())["models"]
    assert framepack["fbc"] is None and any("sets no cache context" in note for note in framepack["notes"])
    assert framepack["tape"]["finite_output"] and framepack["tape_full_context"]["mean_keep"] < 1
    (hunyuan,) = json.loads((tmp_path / "family_speed_hunyuanvideo.json").read_text())["models"]
    assert set(hunyuan["block_ms"]) == {"HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"}
    assert "| ltx-video-tiny | 48 | TAPE default: pruned forwards, median | 0.375 |" in (
        tmp_path / "family_speed.md").read_text()


@pytest.mark.parametrize("name", ["ltx-video-tiny", "hunyuanvideo-tiny", "wan2.2-tiny"])
def test_fixed_first_block_cache_computes_all_blocks_every_nth_step_in_every_family(name):
    adapter, shape = benchmark_shape(name)
    pipe = build_random_pipeline(name, "cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    enable_first_block_cache(pipe, 0.0, every=2)
    calls = {"first": 0, "last": 0}
    handles = []
    for model in transformers_of(pipe):
        blocks = adapter.blocks(model)
        # on a module inside each block: the cache's hooks skip a block inside its forward
        for which, block in (("first", blocks[0]), ("last", blocks[-1])):
            inner = next(block.children())
            handles.append(inner.register_forward_pre_hook(lambda *a, w=which: calls.__setitem__(w, calls[w] + 1)))
    call = adapter.benchmark_call(shape, "cpu", torch.float32, torch.Generator().manual_seed(0))
    try:
        pipe(**call, num_inference_steps=5)
    finally:
        for handle in handles:
            handle.remove()
        detach(pipe)
    per_step = 1 if adapter.guidance_batched or name.startswith("hunyuan") else 2  # forwards per step
    # the first block every step; the others at steps 0, 2 and 4 only
    assert calls == {"first": 5 * per_step, "last": 3 * per_step}
