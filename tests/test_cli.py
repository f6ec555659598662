"""The `vidprune` command on the built-in demo pipeline (small sizes)."""

from __future__ import annotations

import re

import imageio.v2 as imageio
import pytest

from vidprune.cli import main

SMALL = ["--frames", "5", "--height", "64", "--width", "64", "--steps", "3"]


def test_generate_writes_a_video_and_prints_stats(tmp_path, capsys):
    output = tmp_path / "clip.mp4"
    main(["generate", "a red circle moves left", "--method", "tape", "--keep", "0.5", "-o", str(output), *SMALL])
    printed = capsys.readouterr().out
    # 3 steps at keep 0.5 with the cycle rule: dense, reuse, dense (whole steps, rounded up)
    assert "budget: the cycle rule" in printed and "reuse: layers 0-" in printed and "mean keep 0.667" in printed
    assert "FLOPs saved" in printed and str(output) in printed
    frames = imageio.mimread(output)
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)


def test_generate_with_comparison_reports_fidelity_against_the_unpruned_video(tmp_path, capsys):
    main(["generate", "a red circle moves left", "--keep", "0.5", "--compare", "-o", str(tmp_path / "clip.mp4"),
          *SMALL])
    printed = capsys.readouterr().out
    assert "unpruned video:" in printed and "PSNR against it" in printed and "inf dB" not in printed
    main(["generate", "a red circle moves left", "--keep", "1.0", "--compare", "-o", str(tmp_path / "same.mp4"),
          *SMALL])
    assert "PSNR against it inf dB" in capsys.readouterr().out  # keep 1.0 is the unpruned video, bit for bit


@pytest.mark.parametrize("command", [["generate", "x"], ["edit", "in.mp4", "--prompt", "x"]])
def test_compare_needs_a_pruning_method(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--method", "none", "--compare"])
    assert "needs a --method other than none" in capsys.readouterr().err


def test_generate_with_a_model_folder(tmp_path, capsys):
    from vidprune.demo.pipeline import MODEL_DIR

    main(["generate", "a red circle", "--model", str(MODEL_DIR), "-o", str(tmp_path / "clip.mp4"), *SMALL])
    assert f"model: {MODEL_DIR}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", str(tmp_path / "missing"), "-o", str(tmp_path / "c.mp4"), *SMALL])
    assert exit_info.value.code == 2 and "could not load a diffusers pipeline" in capsys.readouterr().err


def test_generate_unpruned(tmp_path, capsys):
    main(["generate", "a blue square", "--method", "none", "-o", str(tmp_path / "clip.gif"), *SMALL])
    assert "FLOPs saved" not in capsys.readouterr().out
    assert (tmp_path / "clip.gif").stat().st_size > 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--keep", "1.5"], "argument --keep: 1.5 is not accepted"),
        (["-o", "clip.avi"], "must end in .mp4 or .gif"),
    ],
)
def test_bad_arguments_are_reported(arguments, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", *SMALL, *arguments])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_method_is_rejected(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "x", "--method", "fast"])
    assert "invalid choice" in capsys.readouterr().err


def small_video(path, frames: int = 9) -> None:
    """A still striped background with a small square moving slowly in one corner."""
    import numpy as np

    from vidprune.video_io import write_video

    video = np.zeros((frames, 128, 160, 3), np.uint8)
    video[:, :, :, 2] = 60 + 40 * (np.arange(160) // 16 % 2)
    for f in range(frames):
        video[f, 8:24, 8 + f : 24 + f] = (240, 40, 40)
    write_video(video, path)


def test_edit_a_video_file_with_comparison(tmp_path, capsys):
    source, output = tmp_path / "source.mp4", tmp_path / "edited.mp4"
    small_video(source)
    main(["edit", str(source), "--prompt", "a blue square", "--steps", "2", "--target-prune", "0.3", "--compare",
          "-o", str(output)])
    printed = capsys.readouterr().out
    assert "pruned per latent frame: 0.00" in printed and "PSNR against it" in printed
    assert "tokens pruned: 0.0%" not in printed  # the fitted tau prunes some tokens
    frames = imageio.mimread(output)
    assert len(frames) == 9 and frames[0].shape == (128, 128, 3)  # the 160x128 source at the demo model's size


def test_edit_with_lip_then_tape(tmp_path, capsys):
    source = tmp_path / "source.mp4"
    small_video(source)
    main(["edit", str(source), "--prompt", "a blue square", "--steps", "5", "--target-prune", "0.3",
          "--method", "lip-tape", "--keep", "0.5", "-o", str(tmp_path / "edited.mp4")])
    pruned = re.search(r"tokens pruned: ([\d.]+)%", capsys.readouterr().out)
    assert 60 < float(pruned.group(1)) < 70  # 30% by LIP, then half of the rest by TAPE


def test_edit_a_folder_of_frames(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "frames"
    folder.mkdir()
    for f in range(6):  # 6 frames: the first 5 are used (4k+1)
        Image.fromarray(np.full((32, 48, 3), 30 * f, np.uint8)).save(folder / f"{f:03d}.png")
    main(["edit", str(folder), "--prompt", "x", "--steps", "2", "--method", "lip-noar", "-o", str(tmp_path / "e.gif")])
    assert "using the first 5 of 6 frames" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("not a video"), "could not read video"),
    (lambda p: None, "does not exist"),
    (lambda p: small_video(p, frames=3), "at least 5"),
])
def test_edit_input_errors(tmp_path, capsys, make, message):
    source = tmp_path / "input.mp4"
    make(source)
    with pytest.raises(SystemExit) as exit_info:
        main(["edit", str(source), "--prompt", "x", "-o", str(tmp_path / "e.mp4")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
