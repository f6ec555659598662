"""`vidprune generate --model DIR` on a local pipeline folder of every family: tiny pipelines
saved with save_pretrained, built offline (the demo's MiniLM tokenizer stands in for each
family's tokenizer; text encoders and VAEs are tiny random models of the family's classes)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    LTXPipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    WanVACEPipeline,
    WanVACETransformer3DModel,
)

from vidprune.bench import benchmark_shape, build_transformer
from vidprune.cli import main
from vidprune.demo.text_encoder import load_text_encoder

from tiny_vaes import cogvideox_vae, hunyuan_vae, ltx_vae

SIZE = ["--frames", "9", "--device", "cpu"]


def _t5(width: int):
    from transformers import T5Config, T5EncoderModel

    tokenizer, _ = load_text_encoder()
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=width, num_layers=1, num_heads=2, d_kv=8, d_ff=32)
    return tokenizer, T5EncoderModel(config).eval()


def ltx_pipeline() -> LTXPipeline:
    tokenizer, encoder = _t5(16)  # ltx-video-tiny's caption_channels
    vae = ltx_vae()
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=encoder,
                       tokenizer=tokenizer, transformer=build_transformer("ltx-video-tiny", "cpu", torch.float32))


def cogvideox_pipeline() -> CogVideoXPipeline:
    tokenizer, encoder = _t5(16)  # cogvideox-tiny's text_embed_dim
    vae = cogvideox_vae()
    return CogVideoXPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae,
                             transformer=build_transformer("cogvideox-tiny", "cpu", torch.float32),
                             scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))


def hunyuan_pipeline() -> HunyuanVideoPipeline:
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, _ = load_text_encoder()
    # 3 layers: the pipeline reads the hidden states 2 layers before the last
    llama = LlamaModel(LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=8, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, projection_dim=8,
                                        max_position_embeddings=77)).eval()
    vae = hunyuan_vae()
    return HunyuanVideoPipeline(text_encoder=llama, tokenizer=tokenizer, text_encoder_2=clip, tokenizer_2=tokenizer,
                                transformer=build_transformer("hunyuanvideo-tiny", "cpu", torch.float32), vae=vae,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def wan22_pipeline() -> WanPipeline:
    """Wan2.2 A14B-style: two experts split at boundary_ratio, with the demo's text encoder."""
    tokenizer, encoder = load_text_encoder()
    config = dict(benchmark_shape("wan2.2-tiny")[1].config, text_dim=encoder.config.hidden_size)
    experts = []
    for seed in range(2):
        torch.manual_seed(seed)
        experts.append(WanTransformer3DModel(**config).eval())
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=scheduler,
                       transformer=experts[0], transformer_2=experts[1], boundary_ratio=0.875)


# builder, frame side in pixels (LTX takes multiples of 32), steps (Wan2.2: the expert switch is a
# dense step too, so 3 steps could not average keep 0.5)
FAMILIES = {"LTXPipeline": (ltx_pipeline, 32, 3), "CogVideoXPipeline": (cogvideox_pipeline, 64, 3),
            "HunyuanVideoPipeline": (hunyuan_pipeline, 64, 3), "WanPipeline": (wan22_pipeline, 64, 6)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Each family's tiny pipeline saved to its own folder."""
    root = tmp_path_factory.mktemp("families")
    saved = {}
    for name, (build, _, _) in FAMILIES.items():
        torch.manual_seed(0)
        build().save_pretrained(root / name)
        saved[name] = root / name
    return saved


def run(arguments: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(arguments)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_runs_tape_on_a_pipeline_folder_of_every_family(folders, name, tmp_path, capsys):
    import imageio.v2 as imageio

    _, pixels, steps = FAMILIES[name]
    output = tmp_path / "clip.mp4"
    code, out, err = run(["generate", "a red ball", "--model", str(folders[name]), "--height", str(pixels), "--width",
                          str(pixels), "--steps", str(steps), "--budget", "even", "-o", str(output), *SIZE], capsys)
    assert code == 0, err
    assert f"({name})" in out and "mean keep 0.5" in out
    frames = imageio.mimread(output)
    assert len(frames) == 9 and frames[0].shape == (pixels, pixels, 3)
    # vidprune's stats table: one row per step; the dense ones keep 1.00: the first step, and for
    # Wan2.2 the step where the second expert takes over (so both experts ran, patched)
    dense = re.findall(r"^\s+\d+\s+[\d.]+\s+1\.00\s", out, flags=re.MULTILINE)
    assert len(dense) == (2 if name == "WanPipeline" else 1)


@pytest.mark.parametrize("name", ["LTXPipeline", "HunyuanVideoPipeline"])
def test_edit_refuses_families_without_lip_before_loading(folders, name, tmp_path, capsys, monkeypatch):
    import vidprune.cli as cli

    monkeypatch.setattr(cli, "read_video", lambda *a, **k: pytest.fail("the video was read before the refusal"))
    code, _, err = run(["edit", str(tmp_path / "in.mp4"), "--prompt", "x", "--model", str(folders[name]), "-o",
                        str(tmp_path / "out.mp4"), "--steps", "3", "--device", "cpu"], capsys)
    assert code == 2 and f"is a {name}: vidprune edit runs LIP, which is implemented for the pipelines " in err
    assert ("WanPipeline, WanVideoToVideoPipeline, CogVideoXPipeline, CogVideoXVideoToVideoPipeline, WanVACEPipeline "
            "only") in err
    assert "LTXPipeline" in err  # generate's list


def test_an_unsupported_pipeline_folder_lists_the_supported_ones(tmp_path, capsys):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "MochiPipeline"}))
    code, _, err = run(["generate", "x", "--model", str(tmp_path), "-o", str(tmp_path / "c.mp4"), "--steps", "3", *SIZE],
                       capsys)
    assert code == 2 and "is a MochiPipeline, which vidprune does not generate with" in err
    for supported in ("WanPipeline", "LTXPipeline", "CogVideoXPipeline", "HunyuanVideoPipeline"):
        assert supported in err


def test_bench_refuses_wan_only_methods_on_another_family(folders, tmp_path, capsys):
    code, _, err = run(["bench", "--model", str(folders["LTXPipeline"]), "--methods", "taylor:3", "--out",
                        str(tmp_path / "b")], capsys)
    assert code == 2 and "'taylor:3' is not accepted on a LTXVideoTransformer3DModel" in err
    code, _, err = run(["bench", "--model", "cogvideox-tiny-random", "--methods", "lip:0.4", "--out",
                        str(tmp_path / "b")], capsys)
    assert code == 2 and "'lip:0.4' is not accepted on a CogVideoXTransformer3DModel" in err


@pytest.mark.parametrize("model", ["ltx-video-tiny-random", "hunyuanvideo-tiny-random"])
def test_bench_runs_tape_and_first_block_cache_on_other_families_random_weights(model, tmp_path, capsys):
    code, out, err = run(["bench", "--model", model, "--steps", "5", "--device", "cpu", "--warmup", "0",
                          "--repeats", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "bench.json").read_text())
    methods = report["tasks"]["generate"]["methods"]
    # the default list, less what is set up for Wan only; at the random model's own size
    assert "fbc-fixed:2" in methods and "tape-even:0.5+fbc-fixed:2" in methods and "taylor:3" not in methods
    assert methods["tape-even:0.5"]["mean_keep"] == pytest.approx(0.5)
    assert methods["tape:0.5"]["mean_keep"] == pytest.approx(0.6)  # the cycle rule in 5 steps: D r D r D
    assert methods["fbc-fixed:2"]["forwards_per_call"] == 5
    assert report["call"]["num_frames"] == (17 if model.startswith("ltx") else 9)


def test_bench_on_framepack_random_weights_runs_tape_and_refuses_step_caches(tmp_path, capsys):
    """diffusers' FramePack pipeline opens no cache context, so no step cache runs on it; its call
    needs the image, which the random model's inputs carry."""
    code, _, err = run(["bench", "--model", "framepack-tiny-random", "--methods", "tape-even:0.5+fbc-fixed:2", "--out",
                        str(tmp_path / "b")], capsys)
    assert code == 2 and "'tape-even:0.5+fbc-fixed:2' is not accepted on a HunyuanVideoFramepackTransformer3DModel" in err
    assert "does not open diffusers' cache context" in err and not (tmp_path / "b").exists()
    code, _, err = run(["bench", "--model", "framepack-tiny-random", "--steps", "5", "--device", "cpu", "--warmup", "0",
                        "--repeats", "1", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    methods = json.loads((tmp_path / "bench.json").read_text())["tasks"]["generate"]["methods"]
    assert "tape-full:0.5" in methods and not any("fbc" in name or "mag" in name for name in methods)
    assert methods["tape-even:0.5"]["mean_keep"] == pytest.approx(0.5)


def test_edit_runs_lip_on_a_cogvideox_pipeline_folder(folders, tmp_path, capsys):
    """The folder holds a CogVideoXPipeline: edit loads it as CogVideoXVideoToVideoPipeline."""
    import imageio.v2 as imageio

    rng = np.random.default_rng(0)
    source = tmp_path / "in.mp4"
    imageio.mimwrite(source, [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(9)], fps=8)
    output = tmp_path / "out.mp4"
    code, out, err = run(["edit", str(source), "--prompt", "a red ball", "--model", str(folders["CogVideoXPipeline"]),
                          "--steps", "3", "--method", "lip-noar", "--tau", "0.05", "-o", str(output), "--device", "cpu"],
                         capsys)
    assert code == 0, err
    assert "(CogVideoXPipeline)" in out and "tokens pruned:" in out
    frames = imageio.mimread(output)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)


def test_edit_runs_lip_on_a_wan_vace_folder_where_the_mask_keeps_the_source(tmp_path, capsys):
    """A WanVACEPipeline folder: edit passes the video and --mask; the still right half, which the
    mask keeps, is pruned. Without --mask (every pixel regenerated) it is refused before loading."""
    from PIL import Image

    tokenizer, encoder = load_text_encoder()
    torch.manual_seed(0)
    config = dict(benchmark_shape("wan-vace-tiny")[1].config, text_dim=encoder.config.hidden_size)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    WanVACEPipeline(tokenizer=tokenizer, text_encoder=encoder, vae=vae, scheduler=scheduler,
                    transformer=WanVACETransformer3DModel(**config).eval()).save_pretrained(tmp_path / "vace")
    still = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    left = Image.fromarray(np.tile((np.arange(128) < 64).astype(np.uint8)[None, :, None] * 255, (128, 1, 3)))
    for name, frame in (("video", still), ("mask", left)):
        (tmp_path / name).mkdir()
        for i in range(9):
            frame.save(tmp_path / name / f"{i:02d}.png")
    command = ["edit", str(tmp_path / "video"), "--prompt", "a red ball", "--model", str(tmp_path / "vace"), "--steps",
               "2", "--method", "lip-noar", "--tau", "0.05", "-o", str(tmp_path / "out.mp4"), "--device", "cpu"]
    code, out, err = run([*command, "--mask", str(tmp_path / "mask")], capsys)
    assert code == 0, err
    assert "(WanVACEPipeline)" in out and f"mask {tmp_path / 'mask'}" in out
    assert float(re.search(r"tokens pruned: ([\d.]+)%", out).group(1)) > 0, out
    code, out, err = run([*command, "--overwrite"], capsys)
    assert code == 2 and "with no mask it regenerates every pixel: give --mask VIDEO" in err
    assert "loading the model" not in out  # refused before the model loads


def test_calibrate_writes_profiles_that_generate_takes(folders, tmp_path, capsys):
    """`vidprune calibrate` on a saved pipeline folder writes one profile per target, each at most
    its cost; `generate --budget PROFILE` runs it; a profile for other steps is refused by name."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\na blue square moves left\n")
    out = tmp_path / "profiles"
    code, printed, err = run(["calibrate", "--model", str(folders["CogVideoXPipeline"]), "--prompts", str(prompts),
                              "--steps", "4", "--height", "64", "--width", "64", "--targets", "0.7", "0.4",
                              "--moves", "1", "--out", str(out), *SIZE], capsys)
    assert code == 0, err
    assert "sensitivity 6/6" in printed  # progress from the start: 3 steps x 2 levels
    files = sorted(out.glob("*.json"))
    assert [f.name.split("-cost")[1] for f in files] == ["0.40.json", "0.70.json"]
    for path in files:
        profile = json.loads(path.read_text())
        assert profile["steps"] == 4 and profile["cost"] <= profile["target_cost"] + 1e-9
        assert profile["scheduler"] and profile["calibration"]["prompts"] == 2
    output = tmp_path / "clip.mp4"
    code, printed, err = run(["generate", "a red ball", "--model", str(folders["CogVideoXPipeline"]), "--height", "64",
                              "--width", "64", "--steps", "4", "--budget", str(files[0]), "-o", str(output), *SIZE], capsys)
    assert code == 0, err
    assert "budget profile for 4 steps" in printed
    code, _, err = run(["generate", "a red ball", "--model", str(folders["CogVideoXPipeline"]), "--steps", "5",
                        "--budget", str(files[0]), "-o", str(tmp_path / "other.mp4"), *SIZE], capsys)
    assert code == 2 and "made for 4 steps and the call runs 5" in err and "vidprune calibrate" in err


def test_calibrate_needs_prompts_for_a_model_of_your_own(folders, tmp_path, capsys):
    code, _, err = run(["calibrate", "--model", str(folders["CogVideoXPipeline"]), "--out", str(tmp_path), *SIZE], capsys)
    assert code == 2 and "--prompts FILE is needed with --model" in err


@pytest.mark.parametrize("arguments, message", [(["--levels", "1.5"], "levels must be keeps in"),
                                                (["--moves", "-1"], "moves must be an integer >= 0"),
                                                (["--prompts", "missing.txt"], "missing.txt")])
def test_calibrate_refuses_bad_arguments_before_loading(arguments, message, tmp_path, capsys, monkeypatch):
    import vidprune.cli_calibrate as command

    monkeypatch.setattr(command, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = run(["calibrate", "--out", str(tmp_path), *arguments], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
