"""The `vidprune` command on the built-in demo pipeline (small sizes)."""

from __future__ import annotations

import imageio.v2 as imageio
import pytest

from vidprune.cli import main

SMALL = ["--frames", "5", "--height", "64", "--width", "64", "--steps", "2"]


def test_generate_writes_a_video_and_prints_stats(tmp_path, capsys):
    output = tmp_path / "clip.mp4"
    main(["generate", "a red circle moves left", "--method", "tape", "--keep", "0.5", "-o", str(output), *SMALL])
    printed = capsys.readouterr().out
    assert "FLOPs saved" in printed and "mean keep 0.500" in printed and str(output) in printed
    frames = imageio.mimread(output)
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)


def test_generate_unpruned(tmp_path, capsys):
    main(["generate", "a blue square", "--method", "none", "-o", str(tmp_path / "clip.gif"), *SMALL])
    assert "FLOPs saved" not in capsys.readouterr().out
    assert (tmp_path / "clip.gif").stat().st_size > 0


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--keep", "1.5"], "keep=1.5 is not accepted"),
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
