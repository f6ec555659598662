"""`vidprune bench`: pruning methods, their ablations and diffusers' caches side by side, in one
process, on one pipeline, with the same prompts, source clips and seeds.

Speed is the wall time of whole pipeline calls after warm-up (medians, as a ratio to the
unpruned calls of the same process) and the median transformer forward; fidelity is each
method's decoded video against the unpruned video of the same input
(`vidprune.metrics.fidelity_summary`). Random-weight models (`wan-1.3b-random`, ...) give real
speeds and no fidelity, so there the caches run at fixed skip patterns.

How vidprune composes with diffusers' caches (checked on Wan by counting the tokens that each
block computes):
- FirstBlockCache and MagCache skip the blocks after the first for a whole forward. They
  compose when vidprune is applied first and the cache enabled after: the cache's hooks then
  wrap vidprune's, see full-length tensors at the first and the last block, and a skipped
  forward never opens a pruned span. The other order fails (the cache's last-block residual
  meets the kept tokens only). Removal must be in the reverse order: diffusers' hook registry
  does not unwind a hook that is not the last one correctly.
- PyramidAttentionBroadcast, FasterCache and TaylorSeer reuse attention or FFN outputs per
  token across calls; TAPE's kept set changes from call to call, so the reused outputs belong
  to other tokens (and their count differs under a budget schedule). They do not compose.
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from diffusers import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    WanVideoToVideoPipeline,
)
from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK
from tqdm.auto import tqdm

import vidprune

from .adapters import ADAPTERS, Adapter, adapter_for
from .adapters.base import BenchmarkShape
from .config import LipConfig, TapeConfig
from .interframe import LipDetection
from .metrics import fidelity_summary
from .validation import check_fraction, check_int

# -- random-weight models: real speed of the real architectures --------------------------------

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
    return pipe if pipeline is None else pipeline.from_pipe(pipe)


def transformers_of(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's transformers: `transformer`, and Wan2.2 A14B's second expert."""
    return [model for model in (pipe.transformer, getattr(pipe, "transformer_2", None)) if model is not None]


class ForwardTimer:
    """Milliseconds of every forward of the modules (in call order): CUDA events on a GPU,
    perf_counter on a CPU. torch hooks run outside diffusers' hook chain, so pruning and cache
    hooks are timed too."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.cuda = next(modules[0].parameters()).is_cuda
        self.marks: list[list[Any]] = []
        self.open: list[int] = []  # forwards begun and not ended (a forward may run another inside)
        self.handles = [handle for module in modules
                        for handle in (module.register_forward_pre_hook(self._start), module.register_forward_hook(self._end))]

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _start(self, module, args) -> None:
        self.open.append(len(self.marks))
        self.marks.append([self._mark()])

    def _end(self, module, args, output) -> None:
        self.marks[self.open.pop()].append(self._mark())

    def take(self) -> list[float]:
        """The forwards' times since the last take."""
        if self.cuda:
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in self.marks]
        else:
            times = [(end - start) * 1000 for start, end in self.marks]
        self.marks = []
        return times

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# -- methods ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """One method name of `--methods`."""

    family: str  # "reference", "pruning" or "cache"
    task: str  # "generate" (text-to-video) or "edit" (video-to-video)
    value: str  # the number in NAME:VALUE, as --help names it ("" when the name takes none)
    default: float | None
    settings: str  # the table's description; {v} is the value
    unset: str = ""  # {v} when there is no value
    integer: bool = False
    residual_driven: bool = False  # decides from the model's residuals: nothing to measure on random weights
    notes: tuple[str, ...] = ()  # said under the table when the method runs
    generic: bool = True  # runs on every family; else only where adapter.runs_every_bench_method (Wan)


_CALL_COUNTER_NOTE = ("pab, faster: diffusers calls Wan's two CFG branches one after the other, and these hooks "
                      "count calls, not steps, with one counter for both branches: what they reuse alternates "
                      "between the branches.")
KINDS = {
    "unpruned": Kind("reference", "generate", "", None, "the unpatched pipeline: the reference"),
    "tape": Kind("pruning", "generate", "KEEP", 0.5, "TAPE (default: token cache, refreshing selection, first 20% "
                 "of steps dense), mean keep {v}"),
    "tape-nocache": Kind("pruning", "generate", "KEEP", 0.5, "TAPE default, pruned tokens pass spans unchanged, "
                         "mean keep {v}"),
    "tape-norefresh": Kind("pruning", "generate", "KEEP", 0.5, "TAPE default, attention-only selection, mean keep {v}"),
    "tape-nodense": Kind("pruning", "generate", "KEEP", 0.5, "TAPE default, no dense first steps, mean keep {v}"),
    "paper": Kind("pruning", "generate", "KEEP", 0.5, "TAPE as its paper describes it (attention only, pruned tokens "
                  "unchanged, prune-early budget), mean keep {v}"),
    "naive": Kind("pruning", "generate", "KEEP", 0.5, "per-frame attention top-k, one selection, keep {v}"),
    "random": Kind("pruning", "generate", "KEEP", 0.5, "random tokens per frame, one selection, keep {v}"),
    "lip": Kind("pruning", "edit", "PRUNE", None, "LIP with Attention Recovery, pruning {v}",
                unset="by the default thresholds", generic=False),
    "lip-noar": Kind("pruning", "edit", "PRUNE", None, "LIP without recovery, pruning {v}",
                     unset="by the default thresholds", generic=False),
    "lip-tape": Kind("pruning", "edit", "KEEP", 0.5, "LIP with recovery (default thresholds), then TAPE keeping {v} "
                     "of LIP's tokens per frame", generic=False),
    "lip-tape-paper": Kind("pruning", "edit", "KEEP", 0.5, "lip-tape with TAPE's paper preset (pruned tokens "
                           "unchanged, attention-only selection), keep {v}", generic=False),
    "fbc": Kind("cache", "generate", "THRESHOLD", 0.1, "FirstBlockCache, threshold {v}", residual_driven=True),
    "fbc-fixed": Kind(
        "cache", "generate", "N", 2, "FirstBlockCache hooks, all blocks every {v} steps only", integer=True,
        notes=("fbc-fixed: FirstBlockCache's hooks with its residual test replaced by a fixed rule (all blocks run "
               "at steps 0, N, 2N, ... of each CFG branch, only the first block at the others): a fixed pattern.",)),
    "mag": Kind("cache", "generate", "THRESHOLD", 0.06, "MagCache, threshold {v}, calibrated ratios",
                residual_driven=True,
                notes=("mag: magnitude ratios calibrated by one unpruned call on the first input (diffusers' "
                       "calibration mode; the conditional branch's ratios, which diffusers applies to both).",), generic=False),
    "mag-fixed": Kind(
        "cache", "generate", "K", 2, "MagCache, all ratios 1.0: {v} skipped steps per computed one", integer=True,
        notes=("mag-fixed: MagCache with every magnitude ratio 1.0, so its error estimate stays 0: after the first "
               "20% of the steps, K skipped steps per computed one: a fixed pattern.",), generic=False),
    "taylor": Kind("cache", "generate", "N", 5, "TaylorSeer on attn1/attn2/ffn, computed every {v} steps",
                   integer=True,
                   notes=("taylor: TaylorSeer on every block's attn1, attn2 and ffn (its default module names match "
                          "nothing in Wan), first order, 3 full steps first.",), generic=False),
    "pab": Kind("cache", "generate", "N", 2, "PAB, self-attention every {v} calls, cross-attention every 2x{v}, "
                "t in (100, 800)", integer=True, notes=(_CALL_COUNTER_NOTE,), generic=False),
    "faster": Kind(
        "cache", "generate", "N", 2, "FasterCache, self-attention every {v} calls, t < 681", integer=True,
        notes=(_CALL_COUNTER_NOTE,
               "faster: is_guidance_distilled=True, because its CFG cache needs both branches in one batch, which "
               "Wan's pipelines never pass; what remains is its attention extrapolation (weight 0.5)."), generic=False),
}
TAPE_KINDS = ("tape", "tape-nocache", "tape-norefresh", "tape-nodense", "paper", "naive", "random")
LIP_TAPE_KINDS = {"lip-tape": "tape", "lip-tape-paper": "paper"}  # LipConfig(tape=...) of this TAPE kind
STACKABLE = ("fbc", "fbc-fixed", "mag", "mag-fixed")  # caches that compose with vidprune (module docstring)
TAYLOR_MODULES = r"blocks\.\d+\.(attn1|attn2|ffn)"
STACK_NOTE = ("stacks (PRUNING+CACHE): vidprune applied first, the cache enabled after, removed in reverse order; "
              "their mean keep counts the forwards that the cache skipped at their planned keep.")
FIXED_NOTE = ("Random weights: no fidelity; fbc and mag decide from residuals, which mean nothing here, so only "
              "fixed patterns are measured (fbc-fixed, mag-fixed; taylor, pab and faster are fixed by nature); "
              "lip prunes a fixed mask of the requested ratio.")


@dataclass(frozen=True)
class Method:
    """A method to run: one part, or a pruning part and a cache stacked (PRUNING+CACHE)."""

    parts: tuple[tuple[str, float | None], ...]

    @property
    def name(self) -> str:
        return "+".join(kind if value is None else f"{kind}:{value:g}" for kind, value in self.parts)

    @property
    def family(self) -> str:
        return "stack" if len(self.parts) > 1 else KINDS[self.parts[0][0]].family

    @property
    def task(self) -> str:
        return KINDS[self.parts[0][0]].task

    @property
    def prunes(self) -> bool:
        return KINDS[self.parts[0][0]].family == "pruning"

    @property
    def settings(self) -> str:
        return " + ".join(KINDS[kind].settings.format(v=KINDS[kind].unset if value is None else f"{value:g}")
                          for kind, value in self.parts)


UNPRUNED = Method((("unpruned", None),))


def accepted_names() -> str:
    """--help text: every name, what its value means and its default."""
    lines = []
    for name, kind in KINDS.items():
        default = f"default {kind.default:g}" if kind.default is not None else f"no value: {kind.unset}"
        value = f":{kind.value} ({default})" if kind.value else ""
        lines.append(f"  {name}{value}: {kind.settings.format(v=kind.value)}")
    lines.append(f"A stack is one of {', '.join(TAPE_KINDS)} followed by one of {', '.join(STACKABLE)}, the caches "
                 "that compose with pruning. On random weights only fixed patterns run: not fbc or mag.")
    return "\n".join(lines)


def parse_method(text: str) -> Method:
    """A method from NAME, NAME:VALUE or PRUNING+CACHE (e.g. tape:0.5+fbc:0.1)."""
    parts = []
    for piece in text.split("+"):
        name, colon, value = piece.partition(":")
        kind = KINDS.get(name)
        if kind is None:
            raise ValueError(f"method {text!r} is not accepted: {name!r} is not a method name; accepted names: "
                             f"{', '.join(KINDS)} (NAME or NAME:VALUE, stacked as PRUNING+CACHE, e.g. "
                             "tape:0.5+fbc:0.1)")
        parts.append((name, _value(text, name, kind, value if colon else None)))
        if name in TAPE_KINDS:  # the configurations check their values now, not after the model loads
            tape_config(name, parts[-1][1])
        elif name in LIP_TAPE_KINDS:
            tape_config(LIP_TAPE_KINDS[name], parts[-1][1])
        elif name.startswith("lip") and parts[-1][1] is not None:
            LipDetection(target_prune=parts[-1][1])
    if len(parts) > 1 and (len(parts) != 2 or parts[0][0] not in TAPE_KINDS or parts[1][0] not in STACKABLE):
        raise ValueError(
            f"method {text!r} is not accepted: a stack is one of {', '.join(TAPE_KINDS)} followed by one of "
            f"{', '.join(STACKABLE)}. PAB, FasterCache and TaylorSeer reuse per-token attention or FFN outputs "
            "across calls, which belong to other tokens once TAPE's kept set changes; LIP is benchmarked on "
            "editing, without caches"
        )
    return Method(tuple(parts))


def _value(text: str, name: str, kind: Kind, value: str | None) -> float | None:
    if value is None:
        return kind.default
    if not kind.value:
        raise ValueError(f"method {text!r} is not accepted: {name} takes no value")
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if kind.integer and not (number.is_integer() and number >= 1):
        raise ValueError(f"method {text!r} is not accepted: {name}:{kind.value} takes a whole number >= 1")
    if not number >= 0:  # also NaN
        raise ValueError(f"method {text!r} is not accepted: {name}:{kind.value} takes a number >= 0")
    return number


def parse_methods(texts: list[str], random_weights: bool) -> list[Method]:
    """The methods to run, each once, with the unpruned reference first."""
    methods = [UNPRUNED]
    for method in map(parse_method, texts):
        driven = [kind for kind, _ in method.parts if KINDS[kind].residual_driven]
        if random_weights and driven:
            raise ValueError(
                f"method {method.name!r} is not accepted on a random-weight model: {driven[0]} decides from the "
                f"model's residuals, which mean nothing with random weights; use {driven[0]}-fixed for speed"
            )
        if random_weights and method.parts[0][0] in LIP_TAPE_KINDS:
            raise ValueError(f"method {method.parts[0][0]!r} is not accepted on a random-weight model: its LIP mask comes from "
                             "the source video's detection; run it on the demo model")
        if random_weights and method.task == "edit" and method.parts[0][1] is None:
            raise ValueError(f"method {method.name!r} is not accepted on a random-weight model: give the ratio of "
                             f"tokens its fixed mask prunes, e.g. {method.name}:0.4")
        if method not in methods:
            methods.append(method)
    return methods


def check_family(methods: list[Method], adapter: Adapter) -> None:
    """Refuse methods that are set up for Wan only on another family (Kind.generic)."""
    if adapter.runs_every_bench_method:
        return
    wan_only = [method.name for method in methods if not all(KINDS[kind].generic for kind, _ in method.parts)]
    if wan_only:
        raise ValueError(
            f"method {wan_only[0]!r} is not accepted on a {adapter.model_classes[0].__name__}: on this family vidprune "
            f"bench runs TAPE ({', '.join(TAPE_KINDS)}) and FirstBlockCache (fbc, fbc-fixed), alone or stacked; LIP, "
            "MagCache, TaylorSeer, PAB and FasterCache are set up for Wan's pipelines")


def default_methods(random_weights: bool, adapter: Adapter | None = None) -> list[str]:
    """The issue's list: TAPE at several budgets, its ablations, the baselines, LIP, each cache at
    settings spanning similar speedups, and TAPE stacked with the caches that compose; on a
    family other than Wan (`adapter`), the ones that run there (check_family)."""
    names = _issue_methods(random_weights)
    if adapter is None or adapter.runs_every_bench_method:
        return names
    return [name for name in names if all(KINDS[kind].generic for kind, _ in parse_method(name).parts)]


def _issue_methods(random_weights: bool) -> list[str]:
    fbc, mag = (["fbc-fixed:2", "fbc-fixed:3"], ["mag-fixed:1", "mag-fixed:3"]) if random_weights else (
        ["fbc:0.05", "fbc:0.1", "fbc:0.2"], ["mag:0.06", "mag:0.12", "mag:0.24"])
    return [
        "tape:0.3", "tape:0.5", "tape:0.7", "tape-nocache:0.5", "tape-norefresh:0.5", "tape-nodense:0.5",
        "paper:0.5",
        "naive:0.5", "random:0.5", *fbc, *mag, "taylor:3", "taylor:5", "pab:2", "pab:3", "faster:2", "faster:3",
        f"tape:0.5+{fbc[0]}", f"tape:0.5+{mag[0]}", "lip:0.4", "lip-noar:0.4",
    ]


# -- attaching and detaching ------------------------------------------------------------------


@dataclass
class Setup:
    """What the methods' configurations depend on besides their values."""

    steps: int
    mag_ratios: list[float] | None = None  # calibrated when a "mag" method runs
    lip_grid: tuple[int, int, int] | None = None  # random weights: LIP prunes a fixed mask on this token grid


def tape_config(kind: str, keep: float) -> TapeConfig:
    """TAPE, an ablation or a baseline, recording selections for their jitter."""
    tape = TapeConfig(keep=keep, record_selections=True)
    return {
        "tape": tape,
        "tape-nocache": tape.with_(cache="none"),
        "tape-norefresh": tape.with_(change_weight=0.0, staleness_weight=0.0, refresh_every=0),
        "tape-nodense": tape.with_(dense_first=0.0),
        "paper": TapeConfig.paper(keep, record_selections=True),
        "naive": TapeConfig.naive(keep, record_selections=True),
        "random": TapeConfig.random(keep, record_selections=True),
    }[kind]


def cache_config(pipe: Any, kind: str, value: float, setup: Setup) -> Any:
    """diffusers' configuration of a cache method (see KINDS for what the values mean)."""
    timestep = lambda: pipe.current_timestep  # noqa: E731
    n = int(value)
    if kind == "mag":
        return MagCacheConfig(threshold=value, num_inference_steps=setup.steps, mag_ratios=setup.mag_ratios)
    if kind == "mag-fixed":
        return MagCacheConfig(mag_ratios=[1.0] * setup.steps, num_inference_steps=setup.steps, max_skip_steps=n)
    if kind == "taylor":
        return TaylorSeerCacheConfig(cache_interval=n, cache_identifiers=[TAYLOR_MODULES],
                                     taylor_factors_dtype=pipe.transformer.dtype)
    if kind == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n, cross_attention_block_skip_range=2 * n,
            current_timestep_callback=timestep,
        )
    return FasterCacheConfig(spatial_attention_block_skip_range=n, current_timestep_callback=timestep,
                             attention_weight_callback=lambda _: 0.5, is_guidance_distilled=True)


def fix_first_block_cache(pipe: Any, transformer: torch.nn.Module, every: int) -> None:
    """Replace FirstBlockCache's residual test by a fixed rule: all blocks at every `every`-th step
    of the call, the others only the first block (both CFG branches alike). The step is where the
    pipeline's current timestep sits in its scheduler's timesteps: every family's pipeline sets
    the former, while only Wan's names the step in the cache context."""
    hook = adapter_for(transformer).blocks(transformer)[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)

    def compute_all(residual: torch.Tensor) -> bool:
        return pipe.scheduler.timesteps.tolist().index(float(pipe.current_timestep)) % every == 0

    hook._should_compute_remaining_blocks = compute_all


def enable_first_block_cache(pipe: Any, threshold: float, every: int | None = None) -> None:
    """diffusers' FirstBlockCache on every transformer of the pipeline (Wan2.2 A14B: both
    experts), with the fixed rule of `fix_first_block_cache` when `every` is given."""
    for transformer in transformers_of(pipe):
        transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
        if every is not None:
            fix_first_block_cache(pipe, transformer, every)


def attach(pipe: Any, method: Method, setup: Setup) -> None:
    """Apply the method's parts: vidprune first, then a cache (the order that composes)."""
    for kind, value in method.parts:
        if kind == "unpruned":
            continue
        if kind in TAPE_KINDS:
            vidprune.apply(pipe, tape_config(kind, value))
        elif kind in LIP_TAPE_KINDS:
            vidprune.apply(pipe, LipConfig(tape=tape_config(LIP_TAPE_KINDS[kind], value)))
        elif kind.startswith("lip"):
            detection = LipDetection() if value is None else LipDetection(target_prune=value)
            mask = fixed_lip_mask(*setup.lip_grid, value) if setup.lip_grid else None
            vidprune.apply(pipe, LipConfig(detection=detection, recovery=kind == "lip", mask=mask))
        elif kind in ("fbc", "fbc-fixed"):
            enable_first_block_cache(pipe, value if kind == "fbc" else 0.0, int(value) if kind == "fbc-fixed" else None)
        else:
            pipe.transformer.enable_cache(cache_config(pipe, kind, value, setup))


def detach(pipe: Any) -> None:
    """Undo `attach`, last in first out (diffusers' hook registry unwinds correctly only so)."""
    for transformer in transformers_of(pipe):
        if transformer.is_cache_enabled:
            transformer.disable_cache()
    vidprune.remove(pipe)


def calibrate_mag_ratios(pipe: Any, call: Callable[[], Any], steps: int) -> list[float]:
    """MagCache's magnitude ratios for this model and step count, from diffusers' calibration
    mode (one unpruned call), which prints them per CFG branch: the first (conditional) list."""
    pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=steps))
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            call()
    finally:
        pipe.transformer.disable_cache()
    lists = [line for line in printed.getvalue().splitlines() if line.startswith("[") and not line.startswith("[Mag")]
    if not lists:
        raise RuntimeError(f"MagCache calibration printed no ratios (diffusers changed?): {printed.getvalue()!r}")
    return [float(r) for r in ast.literal_eval(lists[0])]


# -- inputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One pipeline input of a task: what the call gets besides the shared settings."""

    label: str
    seed: int
    arguments: dict


def generation_inputs(prompts: int, seeds: int) -> list[Input]:
    """Held-out captions of the demo data (prompts the demo model was not trained on)."""
    from .demo.data import make_clip

    texts = [make_clip(1000 + i, split="heldout")[1] for i in range(prompts)]
    return [Input(text, seed, {"prompt": text}) for text in texts for seed in range(seeds)]


def edit_sources(count: int, frames: int = 17, height: int = 128, width: int = 128) -> list[tuple[np.ndarray, str]]:
    """Procedural still-camera clips (LIP's setting) and an edit prompt each: the caption with the
    main shape's colour changed."""
    from .demo.data import make_clip

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
        # the tensors of the family's call (embeddings, masks); the size and guidance are `call`'s
        arguments = {name: value for name, value in adapter.benchmark_call(shape, device, dtype, generator).items()
                     if isinstance(value, torch.Tensor)}
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


# -- running ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """How much to run: inputs (prompts or clips, times seeds), warm-up and timed calls."""

    prompts: int = 16
    seeds: int = 2
    clips: int = 6
    repeats: int = 1
    warmup: int = 1
    strength: float = 0.7
    random_weights: bool = False  # speed only: random inputs, no fidelity

    def __post_init__(self) -> None:
        for name in ("prompts", "seeds", "clips", "repeats"):
            check_int(name, getattr(self, name), 1)
        check_int("warmup", self.warmup, 0)
        check_fraction("strength", self.strength)


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@dataclass
class Plan:
    """One task's pipeline, methods (the unpruned reference first), inputs, call arguments and setup."""

    task: str
    pipe: Any
    methods: list[Method]
    inputs: list[Input]
    call: dict
    setup: Setup

    @property
    def calibrates(self) -> bool:
        """Whether MagCache's ratios must be calibrated first (one more call)."""
        return any(kind == "mag" for method in self.methods for kind, _ in method.parts)

    def calls(self, options: Options) -> int:
        """Pipeline calls the task makes (for the progress bar)."""
        return self.calibrates + len(self.methods) * (options.warmup + len(self.inputs) * options.repeats)


def plan_tasks(pipe: Any, methods: list[Method], call: dict, options: Options, model: str) -> list[Plan]:
    """Text-to-video on `pipe` and, when editing methods are asked for, video-to-video on the same
    components, each with its unpruned reference. `model`: the RANDOM_MODELS name of a
    random-weight pipeline (with options.random_weights)."""
    device, dtype = pipe.transformer.device, pipe.transformer.dtype
    frames, height, width = call["num_frames"], call["height"], call["width"]
    plans = []
    for task in ("generate", "edit"):
        chosen = [method for method in methods if method.task == task and method != UNPRUNED]
        if not chosen and (task == "edit" or any(m.task == "edit" for m in methods)):
            continue  # no such methods (the unpruned generation still runs when nothing else does)
        setup = Setup(steps=call["num_inference_steps"])
        task_call = dict(call, output_type="latent" if options.random_weights else "np")
        if options.random_weights:
            inputs = random_inputs(task, options.prompts, options.seeds, call, model, device, dtype)
        elif task == "edit":
            inputs = edit_inputs(options.clips, options.seeds, frames, height, width)
        else:
            inputs = generation_inputs(options.prompts, options.seeds)
        if task == "edit":
            del task_call["num_frames"]  # the source video's
            task_call["strength"] = options.strength
            if options.random_weights:
                setup.lip_grid = ((frames - 1) // 4 + 1, height // 16, width // 16)
        task_pipe = pipe if task == "generate" else WanVideoToVideoPipeline.from_pipe(pipe)
        task_pipe.set_progress_bar_config(disable=True)
        plans.append(Plan(task, task_pipe, [UNPRUNED, *chosen], inputs, task_call, setup))
    return plans


def run_task(plan: Plan, options: Options, progress: tqdm) -> list[dict]:
    """Every method on every input: warm-up calls per method first, then, input by input, the
    unpruned reference and each method in turn, each call timed `repeats` times."""
    pipe, setup = plan.pipe, plan.setup

    def run(item: Input) -> Any:
        generator = torch.Generator(pipe.transformer.device).manual_seed(item.seed)
        return pipe(**plan.call, **item.arguments, generator=generator).frames[0]

    if plan.calibrates:
        progress.set_postfix_str(f"{plan.task}: MagCache calibration")
        setup.mag_ratios = calibrate_mag_ratios(pipe, lambda: run(plan.inputs[0]), setup.steps)
        progress.update()
    timer = ForwardTimer(pipe.transformer)
    runs = []
    try:
        for method in plan.methods:
            progress.set_postfix_str(f"{plan.task} {method.name} (warm-up)")
            attach(pipe, method, setup)
            for _ in range(options.warmup):
                run(plan.inputs[0])
                progress.update()
            detach(pipe)
        timer.take()
        for number, item in enumerate(plan.inputs):
            reference = None  # the unpruned output, which comes first
            for method in plan.methods:
                progress.set_postfix_str(f"{plan.task} {method.name}")
                attach(pipe, method, setup)
                seconds = []
                for _ in range(options.repeats):
                    _synchronize()
                    started = time.perf_counter()
                    output = run(item)
                    _synchronize()
                    seconds.append(time.perf_counter() - started)
                    progress.update()
                record = {"task": plan.task, "method": method.name, "input": number, "label": item.label,
                          "seed": item.seed, "call_s": seconds, "forward_ms": [round(t, 3) for t in timer.take()]}
                record.update(pruning_numbers(pipe, method))
                if not options.random_weights:
                    reference = output if reference is None else reference
                    record.update(fidelity_summary(output, reference))
                detach(pipe)
                runs.append(record)
    finally:
        timer.remove()
        detach(pipe)
    return runs


def pruning_numbers(pipe: Any, method: Method) -> dict[str, float]:
    """What vidprune's stats say of the last call of a pruning method (nothing for the others)."""
    if not method.prunes:
        return {}
    stats = vidprune.stats(pipe)
    numbers = {"mean_keep": stats.mean_keep, "block_flops_saved": stats.flops_saved}
    if method.task == "generate" and any(record.spans for record in stats.forwards):
        numbers["selection_iou"] = stats.selection_iou()
    return numbers


def summarize(runs: list[dict], methods: list[Method]) -> dict[str, dict]:
    """Per method: medians over all its timed calls and forwards, speedups against the unpruned
    calls (the first method), the mean keep ratio and medians of the fidelity numbers."""
    raw = {"task", "method", "input", "label", "seed", "call_s", "forward_ms"}
    summary: dict[str, dict] = {}
    for method in methods:
        mine = [run for run in runs if run["method"] == method.name]
        calls = [s for run in mine for s in run["call_s"]]
        forwards = [t for run in mine for t in run["forward_ms"]]
        entry = {"family": method.family, "settings": method.settings, "calls": len(calls),
                 "call_s_median": statistics.median(calls), "forward_ms_median": statistics.median(forwards),
                 "forward_ms_mean": statistics.mean(forwards), "forwards_per_call": len(forwards) / len(calls)}
        base = next(iter(summary.values()), entry)
        entry["speedup"] = base["call_s_median"] / entry["call_s_median"]
        entry["forward_speedup"] = base["forward_ms_median"] / entry["forward_ms_median"]
        for key in sorted({key for run in mine for key in run} - raw):
            values = [run[key] for run in mine if key in run and not math.isnan(run[key])]
            if values:
                entry[key] = statistics.mean(values) if key == "mean_keep" else statistics.median(values)
        summary[method.name] = entry
    return summary


def run_bench(pipe: Any, methods: list[Method], call: dict, options: Options, model: str, command: str) -> dict:
    """Run every method (`parse_methods`) with the shared call arguments `call` (num_frames,
    height, width, num_inference_steps, guidance_scale, ...); returns the report that
    `write_report` writes, which names the `model` and the `command` that made it."""
    plans = plan_tasks(pipe, methods, call, options, model)
    runs = []
    with tqdm(total=sum(plan.calls(options) for plan in plans), desc="vidprune bench", unit="call") as progress:
        for plan in plans:
            runs += run_task(plan, options, progress)
    return {
        "command": command,
        "model": model,
        "info": environment(pipe.transformer),
        "call": call,
        "options": asdict(options),
        "notes": notes(methods, options),
        "tasks": {
            plan.task: {
                "inputs": list(dict.fromkeys(item.label for item in plan.inputs)),
                "mag_ratios": plan.setup.mag_ratios,
                "methods": summarize([run for run in runs if run["task"] == plan.task], plan.methods),
            }
            for plan in plans
        },
        "runs": runs,
    }


def environment(transformer: torch.nn.Module) -> dict:
    """Where the numbers come from."""
    import diffusers

    device = transformer.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    return {"device": name, "dtype": str(transformer.dtype).removeprefix("torch."), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "vidprune": vidprune.__version__, "python": platform.python_version(),
            "transformer_layers": len(adapter_for(transformer).blocks(transformer)),
            "transformer_parameters": sum(p.numel() for p in transformer.parameters())}


def notes(methods: list[Method], options: Options) -> list[str]:
    """What a reader must know to read the numbers of these methods."""
    kinds = {kind for method in methods for kind, _ in method.parts}
    said = [FIXED_NOTE] if options.random_weights else []
    said += list(dict.fromkeys(note for kind in KINDS if kind in kinds for note in KINDS[kind].notes))
    if any(method.family == "stack" for method in methods):
        said.append(STACK_NOTE)
    return said
