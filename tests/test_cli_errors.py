"""User errors of the `vidprune` command: one line on stderr, exit code 2, no file written, and,
for every argument, refused before any model loads. Model runs are faked where a test needs one
(a callable returning frames), so these tests take no model time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import vidprune.cli as cli
import vidprune.video_io as video_io
from vidprune.budget import BudgetProfile
from vidprune.cli import main
from vidprune.video_io import write_video

SMALL = ["--frames", "5", "--height", "32", "--width", "32", "--steps", "3"]


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of the command; 0 when it returns."""
    try:
        main(argv)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the command gets as far as loading or building a model."""
    def loaded(*args, **kwargs):
        pytest.fail("a model was loaded before the error was reported")

    monkeypatch.setattr(cli, "load_pipeline", loaded)
    monkeypatch.setattr(cli, "build_random_pipeline", loaded)


class FakePipe:
    """Stands in for a loaded pipeline: records its call and returns grey frames of the asked size."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs) -> SimpleNamespace:
        self.calls.append(kwargs)
        frames = len(kwargs["video"]) if "video" in kwargs else kwargs["num_frames"]
        return SimpleNamespace(frames=[np.full((frames, kwargs["height"], kwargs["width"], 3), 0.5, np.float32)])


@pytest.fixture
def fake_pipe(monkeypatch) -> FakePipe:
    pipe = FakePipe()
    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: pipe)
    return pipe


def frames_folder(path, count: int = 5, corrupt: int | None = None):
    path.mkdir()
    for f in range(count):
        if f == corrupt:
            (path / f"{f:03d}.png").write_bytes(b"not an image")
        else:
            Image.fromarray(np.full((32, 32, 3), 40 * f % 256, np.uint8)).save(path / f"{f:03d}.png")
    return path


def pipeline_folder(path, index: str):
    path.mkdir()
    (path / "model_index.json").write_text(index)
    return path


def make_setup(tmp_path, setup: str) -> None:
    """The files an error case needs in tmp_path."""
    if setup == "file":
        (tmp_path / "file").write_text("a regular file")
    elif setup == "folder.mp4":
        (tmp_path / "folder.mp4").mkdir()
    elif setup == "corrupt frames":
        frames_folder(tmp_path / "frames", corrupt=2)
    elif setup == "list index":
        pipeline_folder(tmp_path / "model", "[1, 2]")
    elif setup == "bad json":
        pipeline_folder(tmp_path / "model", "not json")
    elif setup == "no class":
        pipeline_folder(tmp_path / "model", "{}")


GEN = ["generate", "a red circle"]
EDIT = ["edit", "frames", "--prompt", "a red circle"]

# (command, setup, what stderr must say); every case runs in tmp_path with -o out.mp4.
PRE_LOAD_ERRORS = [
    # 3. invalid values that used to be replaced silently
    (GEN + ["--steps", "0"], None, "argument --steps: 0 is not accepted: give an integer >= 1"),
    (GEN + ["--frames", "-3"], None, "argument --frames: -3 is not accepted: give a frame count of the form 4k+1"),
    (GEN + ["--frames", "8"], None, "argument --frames: 8 is not accepted: give a frame count of the form 4k+1"),
    (EDIT + ["--strength", "1.5"], None, "argument --strength: 1.5 is not accepted: give a number in (0, 1]"),
    (EDIT + ["--max-frames", "0"], None, "argument --max-frames: 0 is not accepted: give an integer >= 5"),
    (GEN + ["--keep", "0"], None, "argument --keep: 0 is not accepted: give a number in (0, 1]"),
    (EDIT + ["--method", "lip-tape", "--keep", "nan"], None, "argument --keep: nan is not accepted"),
    (GEN + ["--guidance", "-1"], None, "argument --guidance: -1 is not accepted: give a finite number >= 0"),
    (GEN + ["--guidance", "inf"], None, "argument --guidance: inf is not accepted: give a finite number >= 0"),
    (GEN + ["--fps", "0"], None, "argument --fps: 0 is not accepted: give an integer >= 1"),
    (GEN + ["--seed", "-1"], None, "argument --seed: -1 is not accepted: give an integer in [0, 2**64 - 1]"),
    (GEN + ["--seed", str(2**64)], None, "argument --seed: 18446744073709551616 is not accepted"),
    (EDIT + ["--tau", "nan"], None, "argument --tau: nan is not accepted: give a finite number >= 0"),
    (EDIT + ["--target-prune", "1"], None, "argument --target-prune: 1 is not accepted: give a number in (0, 1)"),
    (GEN + ["--width", "100"], None, "argument --width: 100 is not accepted: give a positive multiple of 16"),
    (GEN + ["--steps", "two"], None, "argument --steps: two is not accepted: give an integer >= 1"),
    (GEN + ["--steps", "2", "--keep", "0.5", "--budget", "even"], None,
     "keep=0.5 cannot be met by token steps: 1 of the call's 2 steps"),
    (GEN + ["--steps", "1"], None, "(CLI: --method paper) prunes without a cache"),
    (EDIT + ["--method", "lip-tape", "--steps", "3"], None, "keep=0.5 cannot be met by token steps: 1 of the call's 2"),
    (GEN + ["--budget", "weekly"], None, "budget='weekly' is not accepted: budget must be one of 'even', 'cycle'"),
    (GEN + ["--budget", "missing.json"], None, "budget profile 'missing.json' could not be read"),
    (["bench", "--steps", "0"], None, "argument --steps: 0 is not accepted: give an integer >= 1"),
    (["bench", "--frames", "6"], None, "argument --frames: 6 is not accepted: give a frame count of the form 4k+1"),
    (["bench", "--methods", "lip:0.5", "--steps", "1"], None, "--strength 0.7 with 1 steps runs no denoising step"),
    # 2. user errors that used to end in a traceback
    (GEN + ["--height", "0"], None, "argument --height: 0 is not accepted: give a positive multiple of 16"),
    (EDIT + ["--strength", "0"], None, "argument --strength: 0 is not accepted: give a number in (0, 1]"),
    (EDIT + ["--strength", "0.01"], None,
     "--strength 0.01 with 25 steps runs no denoising step: give --strength >= 0.04"),
    (GEN + ["--device", "cuda"], None, "argument --device: no CUDA GPU is available; accepted here: cpu"),
    (GEN + ["--device", "cuda:1"], None, "argument --device: no CUDA GPU is available; accepted here: cpu"),
    (GEN + ["--device", "gpu"], None, "argument --device: gpu is not a device of this machine; accepted here: cpu"),
    (GEN + ["-o", "file/out.mp4"], "file", "output 'file/out.mp4' is not accepted: 'file' is a file, not a folder"),
    (EDIT, "corrupt frames", "could not read frame 'frames/002.png'"),
    # 5. a model folder that is not a pipeline
    (GEN + ["--model", "model"], "list index", "argument --model: model is not a diffusers pipeline folder"),
    (GEN + ["--model", "model"], "bad json",
     "argument --model: model is not a diffusers pipeline folder: could not read model/model_index.json"),
    (EDIT + ["--model", "model"], "no class", "model/model_index.json names no pipeline class (_class_name)"),
    (["bench", "--model", "model"], "no class", "model/model_index.json names no pipeline class"),
    # 1. outputs that cannot be written
    (GEN + ["-o", "folder.mp4"], "folder.mp4", "output 'folder.mp4' is not accepted: it is a folder"),
    (GEN + ["-o", "out.avi"], None, "must end in .mp4 or .gif"),
    (["bench", "--out", "file/reports"], "file",
     "--out 'file/reports' is not accepted: 'file' is a file, not a folder"),
    (["bench", "--out", "file"], "file", "--out 'file' is not accepted: 'file' is a file, not a folder"),
]


@pytest.mark.parametrize("command, setup, message", PRE_LOAD_ERRORS, ids=[
    " ".join(command[1:] if command[0] == "generate" else command) + (f" [{setup}]" if setup else "")
    for command, setup, _ in PRE_LOAD_ERRORS])
def test_user_errors_are_one_line_and_exit_2_before_any_model_loads(command, setup, message, tmp_path, monkeypatch,
                                                                    capsys, no_model):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    make_setup(tmp_path, setup)
    before = sorted(tmp_path.rglob("*"))
    if "-o" not in command and command[0] != "bench":
        command = [*command, "-o", "out.mp4"]
    code, _, err = run_cli(command, capsys)
    assert code == 2
    assert err.startswith("vidprune: ") and err.count("\n") == 1 and "Traceback" not in err
    assert message in err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_a_model_that_fails_to_load_is_a_user_error(tmp_path, capsys):
    # A folder naming a pipeline class whose components are missing: diffusers fails while loading.
    pipeline_folder(tmp_path / "model", '{"_class_name": "WanPipeline", "text_encoder": ["transformers", '
                                        '"UMT5EncoderModel"], "transformer": ["diffusers", "WanTransformer3DModel"]}')
    for model, message in ((tmp_path / "model", ""), (tmp_path / "missing", "there is no such folder")):
        code, _, err = run_cli([*GEN, "--model", str(model), "-o", str(tmp_path / "out.mp4"), *SMALL], capsys)
        assert code == 2 and "Traceback" not in err  # above the message: diffusers' loading progress bar
        assert f"vidprune: could not load a diffusers pipeline from --model '{model}': {message}" in err
    assert not (tmp_path / "out.mp4").exists()


@pytest.mark.parametrize("command", [
    [*GEN, "--height", "0", *SMALL[:2]],  # refused by argparse
    [*EDIT, "--steps", "2"],  # refused while reading the frames, before loading
])
def test_no_traceback_from_the_installed_command(command, tmp_path):
    frames_folder(tmp_path / "frames", corrupt=1)
    result = subprocess.run([sys.executable, "-m", "vidprune.cli", *command, "-o", "out.mp4"], cwd=tmp_path,
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("vidprune: ") and result.stderr.count("\n") == 1
    assert not (tmp_path / "out.mp4").exists()


# -- overwriting and failed writes -------------------------------------------------------------


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, monkeypatch, capsys, no_model):
    output = tmp_path / "clip.gif"
    output.write_bytes(b"an earlier video")
    command = [*GEN, "--method", "none", "-o", str(output), *SMALL]
    code, _, err = run_cli(command, capsys)
    assert code == 2 and f"output '{output}' already exists: give --overwrite" in err
    assert output.read_bytes() == b"an earlier video"
    monkeypatch.setattr(cli, "load_pipeline", lambda *args, **kwargs: FakePipe())
    code, out, _ = run_cli([*command, "--overwrite"], capsys)
    assert code == 0 and f"-> {output}" in out
    assert output.read_bytes()[:6] == b"GIF89a" and Image.open(output).size == (32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.gif"]  # no temporary file left


def failing_encoder(frames, path, fps):
    path.write_bytes(b"half a video")
    raise OSError("No space left on device")


@pytest.mark.parametrize("encoder, message", [
    (failing_encoder, "No space left on device"),
    (lambda frames, path, fps: None, "the encoder wrote no file"),  # as imageio's ffmpeg does for some failures
])
def test_a_failed_write_leaves_no_file_and_keeps_the_old_one(encoder, message, tmp_path, monkeypatch):
    monkeypatch.setattr(video_io, "_encode", encoder)
    frames = np.zeros((5, 16, 16, 3), np.uint8)
    with pytest.raises(OSError, match=message):
        write_video(frames, tmp_path / "new.mp4")
    (tmp_path / "old.mp4").write_bytes(b"an earlier video")
    with pytest.raises(OSError, match=message):
        write_video(frames, tmp_path / "old.mp4", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.mp4"]
    assert (tmp_path / "old.mp4").read_bytes() == b"an earlier video"


def test_a_failed_write_is_reported_not_a_success(tmp_path, monkeypatch, capsys, fake_pipe):
    monkeypatch.setattr(video_io, "_encode", failing_encoder)
    code, out, err = run_cli([*GEN, "--method", "none", "-o", str(tmp_path / "clip.mp4")], capsys)
    assert code == 2
    assert err == f"vidprune: could not write '{tmp_path / 'clip.mp4'}': the video encoder failed (No space left on device)\n"
    assert "generated" not in out and list(tmp_path.iterdir()) == []


# A folder nobody can write in, root included (permission bits do not stop root).
PROC = "/proc"
linux_only = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")


def read_only_folder(tmp_path) -> str:
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return str(folder)


@pytest.mark.parametrize("folder", [
    pytest.param(lambda tmp_path: PROC, marks=linux_only, id="under /proc"),
    pytest.param(read_only_folder, id="read-only folder",
                 marks=pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                          reason="root writes in a read-only folder")),
])
@pytest.mark.parametrize("command", [GEN, EDIT], ids=["generate", "edit"])
def test_an_unwritable_output_is_refused_before_any_work(command, folder, tmp_path, monkeypatch, capsys, no_model):
    monkeypatch.chdir(tmp_path)
    frames_folder(tmp_path / "frames")
    monkeypatch.setattr(cli, "read_video", lambda *args: pytest.fail("the input was read before the output check"))
    output = os.path.join(folder(tmp_path), "sub", "out.mp4")
    before = sorted(tmp_path.rglob("*"))
    code, out, err = run_cli([*command, "-o", output], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"vidprune: output '{output}' is not accepted: could not write in folder '{folder(tmp_path)}'")
    assert err.endswith("give a path in a writable folder\n")
    assert out == "" and sorted(tmp_path.rglob("*")) == before


@linux_only
@pytest.mark.parametrize("command", [GEN, EDIT], ids=["generate", "edit"])
def test_a_write_failing_at_the_end_is_one_line_without_the_encoder_command(command, tmp_path, monkeypatch, capfd,
                                                                            fake_pipe):
    """The folder passes the check, then the real ffmpeg encoder cannot open its file (sent under /proc):
    one line of ours on stderr, none of ffmpeg's, no command line, no file left."""
    monkeypatch.chdir(tmp_path)
    frames_folder(tmp_path / "frames", count=17)  # the demo model's trained size: no warning
    encode = video_io._encode
    monkeypatch.setattr(video_io, "_encode", lambda frames, path, fps: encode(frames, Path("/proc") / path.name, fps))
    code, out, err = run_cli([*command, "--method", "none", "-o", "out.mp4"], capfd)
    assert code == 2 and fake_pipe.calls  # the call ran, then the write failed
    assert err.startswith("vidprune: could not write 'out.mp4': ")  # the encoder's error, or that it wrote no file
    assert err.count("\n") == 1 and "FFMPEG" not in err and "ffmpeg" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["frames"]


# -- the demo model on real footage ------------------------------------------------------------


def real_clip(path, frames: int = 25, height: int = 96, width: int = 176) -> None:
    """A clip larger and longer than the demo model was trained for."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[..., 1] = np.arange(width, dtype=np.uint8)
    write_video(video, path)


def test_edit_with_the_demo_model_defaults_to_its_trained_size(tmp_path, capsys, fake_pipe):
    real_clip(tmp_path / "clip.mp4")
    code, out, err = run_cli(["edit", str(tmp_path / "clip.mp4"), "--prompt", "x", "--method", "none",
                              "-o", str(tmp_path / "edited.mp4")], capsys)
    assert code == 0
    assert "demo model: --height 128 --width 128 --max-frames 17 by default" in out
    assert "encoding 17 frames" in out and "warning" not in err
    call = fake_pipe.calls[0]
    assert (len(call["video"]), call["height"], call["width"]) == (17, 128, 128)  # the pipeline resizes to these


def test_the_demo_model_warns_of_a_size_it_was_not_trained_for(tmp_path, capsys, fake_pipe):
    real_clip(tmp_path / "clip.mp4")
    code, out, err = run_cli(["edit", str(tmp_path / "clip.mp4"), "--prompt", "x", "--method", "none",
                              "--height", "96", "--max-frames", "25", "-o", str(tmp_path / "edited.mp4")], capsys)
    assert code == 0 and "demo model: --width 128 by default" in out
    assert ("vidprune: warning: the demo model was trained on 17 frames at 128x128, not 25 frames at 128x96"
            in err)
    assert (len(fake_pipe.calls[0]["video"]), fake_pipe.calls[0]["height"]) == (25, 96)
    code, _, err = run_cli([*GEN, "--method", "none", "--frames", "9", "-o", str(tmp_path / "clip.gif")], capsys)
    assert code == 0 and "not 9 frames at 128x128" in err


@pytest.mark.parametrize("argv, message", [
    (["--method", "none", "--context", "full"], "--context applies to pruning methods"),
    (["--method", "paper", "--context", "full"], "cache must be 'span' or 'block' with context='full'"),
    (["--context", "full", "--budget", "cycle"], "context must be 'kept' with a budget without token steps"),
])
def test_generate_refuses_a_context_it_cannot_run_before_loading(argv, message, capsys, no_model, tmp_path):
    code, _, err = run_cli(["generate", "a red circle", *SMALL, "-o", str(tmp_path / "out.mp4"), *argv], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.mp4").exists()


def test_generate_takes_a_profiles_context_and_refuses_another(capsys, no_model, tmp_path):
    profile = tmp_path / "full.json"
    BudgetProfile(keeps=(1.0, 0.5, 0.5), context="full").save(profile)
    code, _, err = run_cli(["generate", "a red circle", *SMALL, "--budget", str(profile), "--context", "kept",
                            "-o", str(tmp_path / "out.mp4")], capsys)
    assert code == 2 and "'full', the context this budget profile's token steps were calibrated with" in err
    args = SimpleNamespace(budget=str(profile), context=None)
    assert cli.budget_and_context(args) == {"budget": str(profile), "context": "full"}
