"""What the benchmark feeds the pipelines: demo prompts, procedural source clips, random inputs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .models import RANDOM_MODELS, benchmark_shape


@dataclass(frozen=True)
class Input:
    """One pipeline input of a task: what the call gets besides the shared settings."""

    label: str
    seed: int
    arguments: dict


def generation_inputs(prompts: int, seeds: int) -> list[Input]:
    """Held-out captions of the demo data (prompts the demo model was not trained on)."""
    from ..demo.data import make_clip

    texts = [make_clip(1000 + i, split="heldout")[1] for i in range(prompts)]
    return [Input(text, seed, {"prompt": text}) for text in texts for seed in range(seeds)]


def edit_sources(count: int, frames: int = 17, height: int = 128, width: int = 128) -> list[tuple[np.ndarray, str]]:
    """Procedural still-camera clips (LIP's setting) and an edit prompt each: the caption with the
    main shape's colour changed."""
    from ..demo.data import make_clip

    still = (clip for seed in range(2000, 3000)
             if "camera is still" in (clip := make_clip(seed, frames, height, width))[1])
    sources = []
    for video, caption, _ in (next(still) for _ in range(count)):
        words = caption.split()
        sources.append((video, " ".join(["a", "red" if words[1] == "white" else "white", *words[2:]])))
    return sources


def edit_inputs(clips: int, seeds: int, frames: int, height: int, width: int) -> list[Input]:
    """`edit_sources` as video-to-video pipeline inputs."""
    from PIL import Image

    return [Input(prompt, seed, {"prompt": prompt, "video": [Image.fromarray(frame) for frame in video]})
            for video, prompt in edit_sources(clips, frames, height, width) for seed in range(seeds)]


def random_inputs(task: str, prompts: int, seeds: int, call: dict, model: str, device: str,
                  dtype: torch.dtype) -> list[Input]:
    """Random prompt embeddings of the random-weight model `model` (a RANDOM_MODELS name), as its
    family's pipeline takes them, and, to edit, random noisy latents."""
    adapter, shape = benchmark_shape(RANDOM_MODELS[model])
    generator = torch.Generator().manual_seed(0)
    temporal, spatial = shape.vae
    latent_shape = (1, shape.config["in_channels"], (call["num_frames"] - 1) // temporal + 1,
                    call["height"] // spatial, call["width"] // spatial)
    inputs = []
    for prompt in range(prompts):
        # the family's call (embeddings, masks, FramePack's image); the size, guidance and output are `call`'s
        arguments = {name: value for name, value in adapter.benchmark_call(shape, device, dtype, generator).items()
                     if name not in call and name != "output_type"}
        if task == "edit":
            arguments["latents"] = torch.randn(latent_shape, generator=generator).to(device, dtype)
        inputs += [Input(f"random text embedding {prompt}", seed, arguments) for seed in range(seeds)]
    return inputs


def fixed_lip_mask(frames: int, height: int, width: int, prune: float) -> torch.Tensor:
    """A (frames, height, width) keep mask over the token grid pruning about `prune` of the
    tokens: frame 0 whole (as LIP keeps it), the same leading tokens of every later frame pruned."""
    mask = torch.ones(frames, height * width, dtype=torch.bool)
    mask[1:, : min(height * width, round(prune * frames * height * width / max(frames - 1, 1)))] = False
    return mask.view(frames, height, width)
