"""apply / remove / stats / compile_blocks on a diffusers pipeline or a bare transformer."""

from __future__ import annotations

import logging
from typing import Any

import torch

from .adapters import adapter_for
from .config import LipConfig, TapeConfig
from .graphs import cuda_graph_factory
from .lip import LipPruner, LipState
from .runtime import attach, detach, pruner_of
from .stats import PruneStats
from .tape import TapePruner, TapeState

# config class -> (state class, pruner class)
METHODS = {TapeConfig: (TapeState, TapePruner), LipConfig: (LipState, LipPruner)}

_STATE_ATTRIBUTE = "_vidprune_state"
_COMPILED_ATTRIBUTE = "_vidprune_compiled"  # on a block whose forward compile_blocks compiled
# On a transformer whose pruned spans run as CUDA graphs: the graph factory (graphs.py; tests set
# graphs.EagerReplayGraph makers here to run the capture logic on the CPU).
_GRAPHS_ATTRIBUTE = "_vidprune_graphs"
_pruned_pipeline_classes: dict[type, type] = {}
_said: set[str] = set()  # what the log has said once per process


def _is_pipeline(target: Any) -> bool:
    return not isinstance(target, torch.nn.Module) and hasattr(target, "components")


def _transformers(pipeline: Any) -> list[torch.nn.Module]:
    found = [getattr(pipeline, name, None) for name in ("transformer", "transformer_2")]
    return [t for t in found if t is not None]


def _pruned_pipeline_class(cls: type) -> type:
    """A subclass of the pipeline class whose __call__ first resets the per-call state."""
    if cls not in _pruned_pipeline_classes:

        def __call__(self, *args, **kwargs):
            with getattr(self, _STATE_ATTRIBUTE).call(self):
                return cls.__call__(self, *args, **kwargs)

        _pruned_pipeline_classes[cls] = type(
            cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "_vidprune_base": cls}
        )
    return _pruned_pipeline_classes[cls]


def _targets(target: Any, function: str) -> list[torch.nn.Module]:
    """The transformers of a pipeline, or [target] for a transformer; an error naming `function`
    for anything else."""
    if _is_pipeline(target):
        transformers = _transformers(target)
        if not transformers:
            raise ValueError(f"{type(target).__name__} has no transformer for vidprune.{function}")
        return transformers
    if isinstance(target, torch.nn.Module):
        return [target]
    raise TypeError(f"vidprune.{function} takes a diffusers pipeline or transformer, got {type(target).__name__}")


def _check_target(target: Any, config: TapeConfig | LipConfig) -> list[torch.nn.Module]:
    """The transformers to prune, or an error saying why `target` cannot take `config`."""
    if type(config) not in METHODS:
        raise TypeError(f"config must be a vidprune.TapeConfig or vidprune.LipConfig, got {type(config).__name__}")
    transformers = _targets(target, "apply")
    adapters = [adapter_for(t) for t in transformers]
    tape = config if isinstance(config, TapeConfig) else config.tape
    if tape is not None and tape.needs_call and not _is_pipeline(target):
        raise ValueError(
            "this TapeConfig carries state across the steps of a pipeline call (cache, change and staleness terms, "
            "dense steps), and a bare transformer's forwards belong to no call: apply it to the pipeline, or use "
            "TapeConfig.paper(keep) (or naive/random), which select afresh at every forward"
        )
    if tape is not None and tape.cache == "block" and not all(adapter.supports_block_cache for adapter in adapters):
        name = next(type(t).__name__ for t, a in zip(transformers, adapters) if not a.supports_block_cache)
        raise ValueError(f"TapeConfig(cache='block') is not supported on {name}; use cache='span' (the default)")
    if tape is not None and tape.context == "full" and not all(adapter.supports_full_context for adapter in adapters):
        name = next(type(t).__name__ for t, a in zip(transformers, adapters) if not a.supports_full_context)
        raise ValueError(f"TapeConfig(context='full') is not supported on {name} yet (Wan's WanTransformer3DModel has "
                         "it); use context='kept' (the default)")
    if isinstance(config, LipConfig) and not all(adapter.supports_lip for adapter in adapters):
        name = next(type(t).__name__ for t, a in zip(transformers, adapters) if not a.supports_lip)
        raise ValueError(f"LIP is not supported on {name} yet; TAPE (vidprune.TapeConfig) is")
    if isinstance(config, LipConfig):
        for adapter in adapters:
            adapter.check_lip(config)
    if (isinstance(config, LipConfig) and config.mask is None and config.source_latents is None
            and not adapters[0].lip_source_in_forward):
        editing = adapters[0].video_to_video_pipelines
        if not _is_pipeline(target) or type(target).__name__ not in editing:
            # A family with no video-to-video pipeline in diffusers (LTX) takes the source as latents only.
            source = (f"LIP reads the source video of a video-to-video pipeline ({', '.join(editing)})" if editing
                      else f"diffusers has no video-to-video pipeline for {type(transformers[0]).__name__}")
            raise ValueError(f"{source}; for a {type(target).__name__} give LipConfig(source_latents=...) or "
                             "LipConfig(mask=...)")
    return transformers


def apply(target: Any, config: TapeConfig | LipConfig) -> Any:
    """Prune the transformer(s) of a diffusers pipeline, or a bare transformer, per `config`:
    TapeConfig for generation, LipConfig for video-to-video editing.

    Applying again replaces the earlier patch. Returns `target`. Step caches that skip whole
    blocks (diffusers' FirstBlockCache, MagCache) stack with TAPE: enable them after this call
    and disable them before `remove`. FirstBlockCache needs the first block unpruned (TAPE's
    first_pruned_layer >= 1; not LIP), which the first forward checks. Caches that reuse per-token attention or FFN outputs
    across steps (PyramidAttentionBroadcast, FasterCache, TaylorSeer) do not compose with a
    selection that changes between steps.
    """
    transformers = _check_target(target, config)
    state_class, pruner_class = METHODS[type(config)]
    state = state_class(config)
    # Every pruner is built (and its spans checked against its model) before anything changes.
    pruners = [pruner_class(transformer, adapter_for(transformer), config, state) for transformer in transformers]
    for pruner in pruners:
        pruner.graph_factory = getattr(pruner.transformer, _GRAPHS_ATTRIBUTE, None)
        if pruner.graph_factory is not None:
            pruner.check_graphs()
            pruner.adapter.check_graphs(pruner.transformer)
    remove(target)
    for pruner in pruners:
        attach(pruner)
    if _is_pipeline(target):
        setattr(target, _STATE_ATTRIBUTE, state)
        target.__class__ = _pruned_pipeline_class(type(target))
    if isinstance(config, TapeConfig) and isinstance(config.budget, str) and config.keep < 1.0 and "rule" not in _said:
        _said.add("rule")
        logging.getLogger("vidprune").info(
            "TapeConfig(budget=%r) is a rule for any model; `vidprune calibrate` finds a budget for this model and "
            "step count (TapeConfig(budget=PROFILE.json))", config.budget)
    return target


def remove(target: Any) -> Any:
    """Undo `apply`: the model computes exactly as before. A no-op on an unpatched model."""
    if _is_pipeline(target):
        for transformer in _transformers(target):
            detach(transformer)
        base = getattr(type(target), "_vidprune_base", None)
        if base is not None:
            target.__class__ = base
        if hasattr(target, _STATE_ATTRIBUTE):
            delattr(target, _STATE_ATTRIBUTE)
    elif isinstance(target, torch.nn.Module):
        detach(target)
    return target


def compile_blocks(target: Any, graphs: bool = False, compile: bool = True, **compile_options: Any) -> Any:
    """Make a pipeline's or transformer's pruned forwards cheaper to launch, in place; call it
    before `apply`. Why: on a GPU the kernels of a pruned forward are short, so launching them
    sets its time.

    compile=True: torch.compile the forward of every transformer block. The pruning hooks then
    wrap the compiled blocks: gathering, selection and scattering stay eager, each block's own
    kernels are fused. Shapes are dynamic by default (token counts change with pruning);
    `compile_options` go to torch.compile.
    graphs=True (CUDA only): every pruned span (the gather of its kept tokens and all its
    blocks) runs as a CUDA graph, captured at the third forward of a pipeline call with its
    shapes and replayed after (vidprune/graphs.py); dropped at the end of each call. Unpruned
    forwards are not affected. Not with TapeConfig(cache="block"), LipConfig(kv_source="clean"),
    hooks added to the blocks after `apply` (step caches), or autograd (inference only).

    `remove` undoes neither (a later `apply` uses them again). Returns `target`."""
    transformers = _targets(target, "compile_blocks")
    if not compile and not graphs:
        raise ValueError("compile_blocks(compile=False) does nothing without graphs=True")
    if compile_options and not compile:
        raise ValueError(f"compile_blocks got torch.compile options ({', '.join(compile_options)}) with compile=False")
    for transformer in transformers:
        if pruner_of(transformer) is not None:
            raise ValueError("compile_blocks must come before vidprune.apply (the pruning hooks wrap the compiled "
                             "blocks): call vidprune.remove, then compile_blocks, then apply again")
        device = next(transformer.parameters()).device
        if graphs and device.type != "cuda":
            raise ValueError(f"compile_blocks(graphs=True) captures CUDA graphs: {type(transformer).__name__} is on "
                             f"{device}; move the model to a CUDA device first (pipe.to('cuda')), or use graphs=False")
    for transformer in transformers:
        if graphs:
            setattr(transformer, _GRAPHS_ATTRIBUTE, cuda_graph_factory)
        for block in adapter_for(transformer).blocks(transformer) if compile else ():
            if not getattr(block, _COMPILED_ATTRIBUTE, False):
                block.forward = torch.compile(block.forward, **{"dynamic": True, **compile_options})
                setattr(block, _COMPILED_ATTRIBUTE, True)
    return target


def stats(target: Any) -> PruneStats:
    """What pruning did in the last pipeline call (for a bare transformer: since `apply`)."""
    if _is_pipeline(target):
        state = getattr(target, _STATE_ATTRIBUTE, None)
    else:
        pruner = pruner_of(target) if isinstance(target, torch.nn.Module) else None
        state = pruner.state if pruner is not None else None
    if state is None:
        raise ValueError(f"vidprune is not applied to this {type(target).__name__}: call vidprune.apply first")
    return state.stats
