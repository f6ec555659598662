"""The demo model's training script, run for a few steps at --tiny size on the CPU (so that it
cannot rot): vae and dit with a resume each, export, and loading the exported folder offline."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from safetensors import safe_open

from vidprune.demo import train
from vidprune.demo.training import common, dit as dit_mode, vae as vae_mode
from vidprune.demo.pipeline import DEFAULT_CALL, load_demo_pipeline
from vidprune.metrics import psnr

TINY_CALL = {**DEFAULT_CALL, "num_frames": 5, "height": 32, "width": 32, "num_inference_steps": 2}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Each training mode run twice (the second run resumes), then export."""
    root = tmp_path_factory.mktemp("demo_train")
    vae, dit, model = root / "vae", root / "dit", root / "model"
    saved = {}
    train.main(["vae", "--tiny", "--out", str(vae), "--steps", "2", "--workers", "1"])
    saved["vae_first"] = torch.load(vae / "checkpoint.pt", weights_only=True)
    train.main(["vae", "--tiny", "--out", str(vae), "--steps", "3"])
    train.main(["dit", "--tiny", "--vae", str(vae), "--out", str(dit), "--steps", "2"])
    train.main(["dit", "--tiny", "--vae", str(vae), "--out", str(dit), "--steps", "3"])
    saved["dit_second"] = torch.load(dit / "checkpoint.pt", weights_only=True)
    train.main(["dit", "--tiny", "--vae", str(vae), "--out", str(dit), "--minutes", "0"])  # stops at once
    train.main(["export", "--vae", str(vae), "--dit", str(dit), "--out", str(model)])
    # The VAE of an exported model, reused as it is (a DiT trained on with --vae MODEL).
    reexported = root / "reexported"
    train.main(["export", "--vae", str(model), "--dit", str(dit), "--out", str(reexported)])
    return dict(vae=vae, dit=dit, model=model, reexported=reexported, saved=saved)


def test_training_resumes_from_its_checkpoint(folders):
    vae = torch.load(folders["vae"] / "checkpoint.pt", weights_only=True)
    assert folders["saved"]["vae_first"]["step"] == 2
    assert (vae["step"], vae["runs"], len(vae["curve"])) == (3, 1, 3)
    # The optimiser went on counting from the first run instead of starting again.
    assert all(state["step"] == 3 for state in vae["optimizer"]["state"].values())

    dit = torch.load(folders["dit"] / "checkpoint.pt", weights_only=True)
    assert (dit["step"], dit["runs"], len(dit["curve"])) == (3, 2, 3)
    before = folders["saved"]["dit_second"]
    # A run that trains no step saves back exactly the weights it resumed from.
    for key in ("model", "ema"):
        assert all(torch.equal(before[key][name], dit[key][name]) for name in before[key])
    curve = json.loads((folders["dit"] / "curve.json").read_text())
    assert curve["step"] == 3 and len(curve["points"]) == 3


def test_export_of_an_exported_vae_keeps_its_training_curve(folders):
    curves = json.loads((folders["model"] / "training_curves.json").read_text())
    assert curves["vae"]["points"] and curves["dit"]["points"]
    assert json.loads((folders["reexported"] / "training_curves.json").read_text()) == curves


def test_vae_stores_latent_statistics(folders):
    config = json.loads((folders["vae"] / "vae" / "config.json").read_text())
    assert len(config["latents_mean"]) == len(config["latents_std"]) == 16
    assert config["latents_mean"][0] != -0.7571  # not Wan2.1's defaults
    assert all(std > 0 for std in config["latents_std"])
    assert (config["scale_factor_spatial"], config["scale_factor_temporal"]) == (4, 4)


def test_export_is_a_fp16_pipeline_folder_without_text_encoder(folders):
    model = folders["model"]
    index = json.loads((model / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["text_encoder"] == [None, None]
    assert not (model / "text_encoder").exists() and not (model / "tokenizer").exists()
    for weights in model.glob("*/*.safetensors"):
        with safe_open(weights, "pt") as file:
            assert all(file.get_slice(name).get_dtype() == "F16" for name in file.keys())
    curves = json.loads((model / "training_curves.json").read_text())
    assert curves["vae"]["step"] == 3 and curves["dit"]["step"] == 3


def test_exported_pipeline_loads_offline_and_generates(folders):
    pipe = load_demo_pipeline(folders["model"])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.flow_shift == 3.0
    video = pipe("a red circle moves left over a navy checkered background, the camera is still",
                 generator=torch.Generator().manual_seed(0), output_type="np", **TINY_CALL).frames
    assert video.shape == (1, 5, 32, 32, 3)
    assert 0.0 <= video.min() and video.max() <= 1.0

    # The caption states the DiT was trained on are exactly what the pipeline gives it.
    captions = ["a green square moves up over a teal striped background, the camera pans left", ""]
    ours = common.encode_captions(pipe.tokenizer, pipe.text_encoder, captions, torch.device("cpu"))
    theirs, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                   max_sequence_length=DEFAULT_CALL["max_sequence_length"], device="cpu")
    assert torch.equal(ours, theirs)


def test_missing_model_says_where_and_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="vidprune.demo.train") as error:
        load_demo_pipeline(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(error.value)


def test_corrupt_model_gives_a_clear_error(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folders["model"], broken)
    weights = next((broken / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="vidprune.demo.train") as error:
        load_demo_pipeline(broken)
    assert str(broken) in str(error.value)

    (broken / "model_index.json").write_text("{ not json")
    with pytest.raises(ValueError, match="could not be loaded"):
        load_demo_pipeline(broken)


def test_quality_benchmark_runs(folders, tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "demo_quality.py"
    spec = importlib.util.spec_from_file_location("demo_quality", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    result = benchmark.main(["--model", str(folders["model"]), "--device", "cpu", "--prompts", "2",
                             "--recon-clips", "2", "--steps", "2", "--frames", "5", "--size", "32",
                             "--out", str(tmp_path)])
    assert result["prompts"] == 2 and len(result["per_prompt"]) == 2
    assert result["real_clips"]["colour_accuracy"] == 1.0  # the measurement itself reads real clips right
    assert set(result["vae_clips"]) == set(result["real_clips"])
    assert "through the VAE" in (tmp_path / "demo_quality.md").read_text()
    assert (tmp_path / "demo_quality.json").exists()

    # The reconstructions it measures are the VAE's, with the PSNR it reports.
    pipe = load_demo_pipeline(folders["model"], device="cpu")
    clip = benchmark.heldout_clips(1, 5, 32, 32, still_single=False)[0][1]
    (recon, value), = benchmark.reconstruct(pipe, [clip], "cpu", batch=1)
    assert recon.shape == clip.shape
    assert value == pytest.approx(psnr(recon, clip.astype(np.float32) / 255), abs=1e-3)


def test_static_latent_mask_marks_cells_still_over_both_latent_frames():
    video = torch.zeros(1, 3, 9, 16, 16)  # 9 frames -> latent frames {0}, {1..4}, {5..8}
    video[:, :, 6:, 0:4, 8:12] = 1.0  # a block appears at frame 6, inside latent frame 2's frames
    static = vae_mode.static_latent_mask(video)
    assert static.shape == (1, 2, 4, 4)
    assert static[0, 0].all()  # latent frames 0 and 1 see no change anywhere
    assert not static[0, 1, 0, 2] and static[0, 1].sum() == 15  # only the block's cell changes


def test_static_latent_change_is_zero_for_repeated_latents_and_grows_with_change():
    mean = torch.randn(2, 16, 1, 4, 4).repeat(1, 1, 3, 1, 1)
    static = torch.ones(2, 2, 4, 4, dtype=torch.bool)
    assert vae_mode.static_latent_change(mean, static) == 0
    changed = mean.clone()
    changed[:, :, 2] += 1.0
    assert vae_mode.static_latent_change(changed, static) > 0
    static[:, 1] = False  # the changed pair is not static: it is ignored
    assert vae_mode.static_latent_change(changed, static) == 0


def test_static_latent_mask_spans_the_frames_of_both_latent_frames():
    video = torch.zeros(1, 3, 9, 16, 16)
    video[:, :, 2:3, 4:8, 4:8] = 1.0  # a flash at frame 2 only: inside latent frame 1 (frames 1..4)
    static = vae_mode.static_latent_mask(video)
    # Pair (0, 1) covers frames 0..4 and pair (1, 2) frames 1..8: both see the flash.
    assert not static[0, 0, 1, 1] and not static[0, 1, 1, 1]
    assert static[0, :, 0, 0].all()


def test_random_crops_are_windows_of_each_video():
    video = torch.arange(2 * 9 * 32 * 32 * 3).reshape(2, 9, 32, 32, 3)
    crops = common.random_crops(video, 5, 16, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 5, 16, 16, 3)
    for clip, crop in zip(video, crops):
        first = (crop[0, 0, 0, 0] - clip[0, 0, 0, 0]).item()  # values encode (frame, row, column, channel)
        t, rest = divmod(first, 32 * 32 * 3)
        y, x = divmod(rest // 3, 32)
        assert torch.equal(crop, clip[t:t + 5, y:y + 16, x:x + 16])
    again = common.random_crops(video, 5, 16, torch.Generator().manual_seed(0))
    assert torch.equal(crops, again)
    with pytest.raises(ValueError, match="does not fit"):
        common.random_crops(video, 13, 16, torch.Generator())


def test_moving_pixels_are_those_off_the_temporal_median():
    video = torch.full((1, 3, 5, 8, 8), -0.5)
    video[:, 0, 2, 3, 4] = 0.5  # one pixel of one frame lights up in the red channel
    video[:, 1, 1, 0, 0] = -0.4  # a change below the threshold
    moving = vae_mode.moving_pixels(video)
    assert moving.shape == (1, 1, 5, 8, 8)
    assert moving.sum() == 1 and moving[0, 0, 2, 3, 4]


def test_latent_cells_group_frames_as_the_causal_vae():
    pixels = torch.zeros(1, 1, 9, 8, 8, dtype=torch.bool)  # latent frames {0}, {1..4}, {5..8}
    pixels[0, 0, 5, 6, 1] = True
    cells = vae_mode.latent_cells(pixels)
    assert cells.shape == (1, 1, 3, 2, 2)
    assert cells.sum() == 1 and cells[0, 0, 2, 1, 0]
    pixels[0, 0, 0, 0, 0] = True  # frame 0 belongs to latent frame 0 alone
    assert vae_mode.latent_cells(pixels)[0, 0, :, 0, 0].tolist() == [True, False, False]


def test_vae_loss_weights_errors_on_moving_shapes():
    x = torch.full((1, 3, 5, 8, 8), -0.5)
    x[:, :, 2, 3, 4] = 0.5  # a shape pixel

    class Posterior:
        mean, logvar = torch.zeros(1, 16, 2, 2, 2), torch.zeros(1, 16, 2, 2, 2)

    off_shape, on_shape = x.clone(), x.clone()
    off_shape[:, :, 1, 0, 0] += 0.1  # a middle frame, as the shape pixel: in two frame differences too
    on_shape[:, :, 2, 3, 4] += 0.1
    unweighted = [vae_mode.vae_loss(r, x, Posterior, 0.0, 0.0, 0.0) for r in (off_shape, on_shape)]
    weighted = [vae_mode.vae_loss(r, x, Posterior, 0.0, 0.0, 10.0) for r in (off_shape, on_shape)]
    assert unweighted[0] == pytest.approx(unweighted[1])
    assert weighted[1] > 5 * weighted[0]


def test_direction_probe_asks_each_direction_of_each_caption(folders, tmp_path):
    path = Path(__file__).parents[1] / "benchmarks" / "demo_direction_probe.py"
    spec = importlib.util.spec_from_file_location("demo_direction_probe", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    captions = probe.probe_captions("heldout", 2, 5, 32)
    assert len(captions) == 2 and all(c.endswith("the camera is still") and ", and a small" not in c for c in captions)
    result = probe.main(["--model", str(folders["model"]), "--prompts", "1", "--steps", "2", "--frames", "5",
                         "--size", "32", "--out", str(tmp_path)])
    (row,) = result["rows"]
    assert set(row["moved"]) == {"left", "right", "up", "down"}
    assert set(row["moved"].values()) <= {"left", "right", "up", "down", "none"}
    assert result["right"] == sum(row["moved"][d] == d for d in row["moved"])
    assert "asked left" in (tmp_path / "demo_direction_probe_heldout.md").read_text()


def test_training_sigmas_shift_as_the_sampler_does():
    from diffusers import UniPCMultistepScheduler

    torch.manual_seed(0)
    plain = dit_mode.training_sigmas(20000, 1.0, torch.device("cpu"))
    torch.manual_seed(0)
    shifted = dit_mode.training_sigmas(20000, 3.0, torch.device("cpu"))
    assert (plain > 0).all() and (plain < 1).all()
    assert (shifted > 0.9).float().mean() > 5 * (plain > 0.9).float().mean()
    # The same map the flow-matching scheduler applies to its sigmas with flow_shift=3.
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    scheduler.set_timesteps(10)
    unshifted = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0)
    unshifted.set_timesteps(10)
    s = unshifted.sigmas[:-1]
    assert torch.allclose(3 * s / (1 + 2 * s), scheduler.sigmas[:-1], atol=1e-5)
    assert torch.allclose(shifted, 3 * plain / (1 + 2 * plain))


def test_dit_loss_weights_the_cells_of_moving_shapes():
    x0, noise = torch.zeros(1, 16, 2, 4, 4), torch.zeros(1, 16, 2, 4, 4)
    video = torch.full((1, 3, 5, 16, 16), -0.5)
    video[:, :, 3, 0:4, 0:4] = 0.5  # a shape in frame 3: latent frame 1, cell (0, 0)
    weights = 1 + 10 * vae_mode.latent_cells(vae_mode.moving_pixels(video)).float()
    on_shape, off_shape = torch.zeros_like(x0), torch.zeros_like(x0)
    on_shape[:, :, 1, 0, 0] = 1.0
    off_shape[:, :, 1, 3, 3] = 1.0
    assert dit_mode.flow_loss(on_shape, noise, x0, weights) == pytest.approx(11 * dit_mode.flow_loss(off_shape, noise, x0, weights))
    assert dit_mode.flow_loss(on_shape, noise, x0, torch.ones_like(weights)) == dit_mode.flow_loss(off_shape, noise, x0, torch.ones_like(weights))


def test_each_mode_shows_its_own_defaults(capsys):
    for mode, lr in (("vae", 0.0002), ("dit", 0.0003)):
        with pytest.raises(SystemExit):
            train.main([mode, "--help"])
        assert f"(default {lr})" in capsys.readouterr().out
        assert train.build_parser().parse_args([mode, "--out", "x"] + ["--vae", "v"] * (mode == "dit")).lr == lr
    with pytest.raises(SystemExit) as error:  # dit without its VAE is an argparse error, not a traceback
        train.main(["dit", "--out", "x"])
    assert error.value.code == 2 and "--vae" in capsys.readouterr().err
