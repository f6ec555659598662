"""Loading the shipped demo pipeline is quiet: no library warning of its BertModel text encoder or
of a cast of float32 modules; a user's own pipeline (--model DIR) still gets its warnings."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Iterator

import pytest
import torch

from vidprune.cli_loading import load_pipeline
from vidprune.demo.random_pipeline import build_random_wan_pipeline

DEMO_WARNINGS = ("Expected types for text_encoder", "should be kept in float32")


class _Records(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def library_warnings() -> Iterator[list[str]]:
    """The warnings diffusers' and transformers' loggers and Python's warnings module give while open."""
    messages: list[str] = []
    handler = _Records(messages)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(warning.message) for warning in caught)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


@pytest.mark.parametrize("dtype, video_to_video", [(torch.float32, False), (torch.float32, True),
                                                   (torch.bfloat16, False)],
                         ids=["generate", "edit", "generate-bf16"])
def test_loading_the_demo_pipeline_gives_no_library_warning(dtype, video_to_video):
    with library_warnings() as messages:
        pipe = load_pipeline(None, "cpu", dtype, video_to_video=video_to_video)
    assert [m for m in messages if any(w in m for w in DEMO_WARNINGS)] == []
    assert type(pipe).__name__ == ("WanVideoToVideoPipeline" if video_to_video else "WanPipeline")
    assert type(pipe.text_encoder).__name__ == "BertModel" and pipe.text_encoder.dtype == dtype
    assert pipe.transformer.dtype == pipe.vae.dtype == dtype
    assert pipe.transformer.scale_shift_table.dtype == torch.float32  # kept in float32, as Wan loads


def test_a_users_pipeline_folder_still_gets_its_warnings(tmp_path):
    """The same BertModel text encoder in a pipeline folder of the user's: diffusers' warning of
    it is shown (nothing is filtered beyond the demo's own load)."""
    build_random_wan_pipeline("t2v").save_pretrained(tmp_path / "model")
    with library_warnings() as messages:
        load_pipeline(str(tmp_path / "model"), "cpu", torch.float32)
    assert any(m.startswith("Expected types for text_encoder") and "BertModel" in m for m in messages)


def test_the_command_line_starts_without_a_library_warning():
    """Importing every adapter must not import pipelines whose imports warn (diffusers' FramePack
    pipeline imports transformers' SigLIP image processor, which warns without torchvision)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "vidprune.cli", "bench", "--help"], capture_output=True, text=True,
                          cwd=root, env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
