"""Random-weight models of every family's published sizes: the real speed of the real
architectures (latency does not depend on the weights)."""

from __future__ import annotations

from typing import Any

import torch

from ..adapters import ADAPTERS, Adapter
from ..adapters.base import BenchmarkShape

# "<name>-random" for every BenchmarkShape of every adapter: wan-1.3b-random, cogvideox-5b-random, ...
RANDOM_MODELS = {f"{name}-random": name for adapter in ADAPTERS for name in adapter.benchmark_shapes}


def benchmark_shape(name: str) -> tuple[Adapter, BenchmarkShape]:
    """The adapter and shape of a random-weight model name (without "-random")."""
    for adapter in ADAPTERS:
        if name in adapter.benchmark_shapes:
            return adapter, adapter.benchmark_shapes[name]
    raise ValueError(f"{name!r} is not a random-weight model shape; accepted: "
                     + ", ".join(n for a in ADAPTERS for n in a.benchmark_shapes))


def build_transformer(name: str, device: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> torch.nn.Module:
    """The transformer of shape `name` with random weights, built on `device` directly in `dtype`:
    a 14B model initialised on the CPU in float32 first would take minutes and 56 GB."""
    adapter, shape = benchmark_shape(name)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = adapter.model_classes[0](**shape.config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()  # tensors a module creates in an explicit dtype too


def build_random_pipeline(name: str, device: str, dtype: torch.dtype = torch.bfloat16, pipeline: type | None = None) -> Any:
    """The family's text-to-video pipeline of shape `name` around random-weight transformers,
    without text encoder or VAE: call it with prompt embeddings (`adapter.benchmark_call`) and
    output_type="latent". `pipeline`: another pipeline class of the family, made with from_pipe."""
    adapter, shape = benchmark_shape(name)
    pipe = adapter.benchmark_pipeline([build_transformer(name, device, dtype, seed) for seed in range(shape.experts)],
                                      shape)
    # from_pipe casts every module to float32 unless told a dtype (diffusers 0.42), in place.
    return pipe if pipeline is None else pipeline.from_pipe(pipe, dtype=dtype)


def transformers_of(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's transformers: `transformer`, and Wan2.2 A14B's second expert."""
    return [model for model in (pipe.transformer, getattr(pipe, "transformer_2", None)) if model is not None]
