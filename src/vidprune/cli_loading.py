"""The `vidprune` command's model loading: a supported diffusers pipeline from a folder or hub id,
or the demo pipeline; the call settings that go with it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import WanPipeline, WanVideoToVideoPipeline

from .adapters import ADAPTERS, adapter_for, supported_pipelines
from .demo.pipeline import DEFAULT_CALL, MODEL_DIR, load_demo_pipeline



# -- loading -----------------------------------------------------------------------------------


def check_pipeline_class(name: str, model: str, video_to_video: bool = False) -> None:
    """Refuse a pipeline class the command cannot run (before its weights load, for a local
    folder), naming the ones it can: text-to-video pipelines of every family for generate and
    bench, the pipelines of the families LIP is implemented for for edit."""
    text_to_video = [n for adapter in ADAPTERS for n in adapter.text_to_video_pipelines]
    if video_to_video:
        editing = [n for adapter in ADAPTERS if adapter.video_to_video_pipelines
                   for n in (*adapter.text_to_video_pipelines, *adapter.video_to_video_pipelines)]
        if name not in editing:
            raise ValueError(f"--model {model!r} is a {name}: vidprune edit runs LIP, which is implemented for the "
                             f"pipelines {', '.join(editing)} only; give one of them (generate runs TAPE on "
                             f"{', '.join(text_to_video)})")
    elif name not in text_to_video:
        raise ValueError(f"--model {model!r} is a {name}, which vidprune does not generate with; supported "
                         f"text-to-video pipelines: {', '.join(text_to_video)} (and for edit: "
                         f"{', '.join(n for adapter in ADAPTERS for n in adapter.video_to_video_pipelines)})")


def folder_pipeline_class(model: str) -> str | None:
    """The pipeline class a local pipeline folder's model_index.json names (None: not a local folder)."""
    if not Path(model).exists():
        return None
    return json.loads((Path(model) / "model_index.json").read_text())["_class_name"]  # model_name checked it


def load_pipeline(model: str | None, device: str, dtype: torch.dtype, video_to_video: bool = False):
    """A supported diffusers pipeline from a local folder or hub id, or the demo pipeline; as
    its family's video-to-video variant when `video_to_video`. A model that cannot be loaded,
    or is not a supported pipeline, is a ValueError or TypeError naming it."""
    if model is not None and folder_pipeline_class(model) is not None:
        check_pipeline_class(folder_pipeline_class(model), model, video_to_video)
    print("loading the model...")
    if model is None or _is_demo_folder(model):  # the shipped demo model, or one retrained with vidprune.demo.train
        if model is None:
            print(f"model: vidprune's demo Wan pipeline ({MODEL_DIR}), a small model trained on procedural clips: "
                  "a test bed, not a product model")
        # in the class and dtype it runs in: from_pipe and .to(dtype) would cast Wan's float32 modules, and warn
        pipe = load_demo_pipeline(model, dtype=dtype,
                                  pipeline_class=WanVideoToVideoPipeline if video_to_video else WanPipeline)
    else:
        from diffusers import DiffusionPipeline

        try:
            pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
        except Exception as error:  # diffusers raises many types for a folder that is not a pipeline
            where = "" if Path(model).exists() else "there is no such folder, and as a hub id: "
            raise ValueError(f"could not load a diffusers pipeline from --model {model!r}: {where}"
                             f"{type(error).__name__}: {error}") from error
    if model is not None:
        print(f"model: {model} ({type(pipe).__name__})")
    if model is not None:
        check_pipeline_class(type(pipe).__name__, model, video_to_video)  # a hub id: known once loaded
    if getattr(pipe, "transformer", None) is None:
        raise ValueError(f"--model {model!r} is a {type(pipe).__name__}, which has no transformer: give one of "
                         + ", ".join(supported_pipelines()))
    adapter = adapter_for(pipe.transformer)  # other model families: a TypeError naming the supported ones
    editing = adapter.video_to_video_pipelines
    if video_to_video and type(pipe).__name__ not in editing:
        import diffusers

        pipe = getattr(diffusers, editing[0]).from_pipe(pipe, dtype=pipe.transformer.dtype)
    pipe = pipe.to(device)
    return pipe if dtype == pipe.transformer.dtype else pipe.to(dtype=dtype)


def _is_demo_folder(model: str) -> bool:
    """A local WanPipeline folder saved without its text encoder, as vidprune's demo model is."""
    try:
        index = json.loads((Path(model) / "model_index.json").read_text())
    except (OSError, ValueError):  # no such file, or not JSON: not a demo folder (diffusers says what is wrong)
        return False
    return (isinstance(index, dict) and index.get("_class_name") == "WanPipeline"
            and index.get("text_encoder") in (None, [None, None]))


def _device(requested: str | None) -> tuple[str, torch.dtype]:
    device = requested or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if device.startswith("cuda") else torch.float32


def call_settings(args: argparse.Namespace) -> dict:
    """Steps, guidance and text length: the demo model's own when it is used, else the
    command's defaults."""
    demo = args.model is None or _is_demo_folder(args.model)
    steps = DEFAULT_CALL["num_inference_steps"] if demo else 25
    settings = dict(num_inference_steps=steps if args.steps is None else args.steps, guidance_scale=args.guidance)
    if demo:
        settings["max_sequence_length"] = DEFAULT_CALL["max_sequence_length"]
    return settings


