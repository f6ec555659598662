"""The one registry of benchmark methods: each name, what its value means, its description and
the configuration or cache it stands for; parsing of NAME, NAME:VALUE and PRUNING+CACHE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import vidprune

from ..adapters import Adapter
from ..config import LipConfig, TapeConfig
from ..interframe import LipDetection
from .caches import MethodContext, enable_cache_method
from .inputs import fixed_lip_mask
from .models import transformers_of


@dataclass(frozen=True)
class MethodSpec:
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
    tape: Callable[[float], TapeConfig] | None = None  # TAPE methods: the configuration at a keep


_CALL_COUNTER_NOTE = ("pab, faster: diffusers calls Wan's two CFG branches one after the other, and these hooks "
                      "count calls, not steps, with one counter for both branches: what they reuse alternates "
                      "between the branches.")
REGISTRY = {
    "unpruned": MethodSpec("reference", "generate", "", None, "the unpatched pipeline: the reference"),
    "tape": MethodSpec("pruning", "generate", "KEEP", 0.5, "TAPE default budget (cycle: the first 20% of steps dense, "
                 "then dense steps among reuse steps, which run no block), mean keep {v}",
        tape=lambda keep: TapeConfig(keep=keep)),
    "tape-even": MethodSpec("pruning", "generate", "KEEP", 0.5, "TAPE token steps (even budget: token cache, refreshing "
                      "selection, first 20% of steps dense), mean keep {v}",
        tape=lambda keep: TapeConfig(keep=keep, budget="even")),
    "tape-full": MethodSpec("pruning", "generate", "KEEP", 0.5, "tape-even with full context (kept tokens attend over "
                      "every token, the pruned ones' keys from their replayed state), mean keep {v}",
        tape=lambda keep: TapeConfig(keep=keep, budget="even", context="full")),
    "tape-nocache": MethodSpec("pruning", "generate", "KEEP", 0.5, "tape-even, pruned tokens pass spans unchanged, "
                         "mean keep {v}",
        tape=lambda keep: TapeConfig(keep=keep, budget="even", cache="none")),
    "tape-norefresh": MethodSpec("pruning", "generate", "KEEP", 0.5, "tape-even, attention-only selection, mean keep {v}",
        tape=lambda keep: TapeConfig(keep=keep, budget="even", change_weight=0.0, staleness_weight=0.0,
                                     refresh_every=0)),
    "tape-nodense": MethodSpec("pruning", "generate", "KEEP", 0.5, "tape-even, no dense first steps, mean keep {v}",
        tape=lambda keep: TapeConfig(keep=keep, budget="even", dense_first=0.0)),
    "paper": MethodSpec("pruning", "generate", "KEEP", 0.5, "TAPE as its paper describes it (attention only, pruned tokens "
                  "unchanged, prune-early budget), mean keep {v}",
        tape=TapeConfig.paper),
    "naive": MethodSpec("pruning", "generate", "KEEP", 0.5, "per-frame attention top-k, one selection, keep {v}",
        tape=TapeConfig.naive),
    "random": MethodSpec("pruning", "generate", "KEEP", 0.5, "random tokens per frame, one selection, keep {v}",
        tape=TapeConfig.random),
    "lip": MethodSpec("pruning", "edit", "PRUNE", None, "LIP with Attention Recovery, pruning {v}",
                unset="by the default thresholds", generic=False),
    "lip-noar": MethodSpec("pruning", "edit", "PRUNE", None, "LIP without recovery, pruning {v}",
                     unset="by the default thresholds", generic=False),
    "lip-tape": MethodSpec("pruning", "edit", "KEEP", 0.5, "LIP with recovery (default thresholds), then TAPE keeping {v} "
                     "of LIP's tokens per frame", generic=False),
    "lip-tape-paper": MethodSpec("pruning", "edit", "KEEP", 0.5, "lip-tape with TAPE's paper preset (pruned tokens "
                           "unchanged, attention-only selection), keep {v}", generic=False),
    "fbc": MethodSpec("cache", "generate", "THRESHOLD", 0.1, "FirstBlockCache, threshold {v}", residual_driven=True),
    "fbc-fixed": MethodSpec(
        "cache", "generate", "N", 2, "FirstBlockCache hooks, all blocks every {v} steps only", integer=True,
        notes=("fbc-fixed: FirstBlockCache's hooks with its residual test replaced by a fixed rule (all blocks run "
               "at steps 0, N, 2N, ... of each CFG branch, only the first block at the others): a fixed pattern.",)),
    "mag": MethodSpec("cache", "generate", "THRESHOLD", 0.06, "MagCache, threshold {v}, calibrated ratios",
                residual_driven=True,
                notes=("mag: magnitude ratios calibrated by one unpruned call on the first input (diffusers' "
                       "calibration mode; the conditional branch's ratios, which diffusers applies to both).",), generic=False),
    "mag-fixed": MethodSpec(
        "cache", "generate", "K", 2, "MagCache, all ratios 1.0: {v} skipped steps per computed one", integer=True,
        notes=("mag-fixed: MagCache with every magnitude ratio 1.0, so its error estimate stays 0: after the first "
               "20% of the steps, K skipped steps per computed one: a fixed pattern.",), generic=False),
    "taylor": MethodSpec("cache", "generate", "N", 5, "TaylorSeer on attn1/attn2/ffn, computed every {v} steps",
                   integer=True,
                   notes=("taylor: TaylorSeer on every block's attn1, attn2 and ffn (its default module names match "
                          "nothing in Wan), first order, 3 full steps first.",), generic=False),
    "pab": MethodSpec("cache", "generate", "N", 2, "PAB, self-attention every {v} calls, cross-attention every 2x{v}, "
                "t in (100, 800)", integer=True, notes=(_CALL_COUNTER_NOTE,), generic=False),
    "faster": MethodSpec(
        "cache", "generate", "N", 2, "FasterCache, self-attention every {v} calls, t < 681", integer=True,
        notes=(_CALL_COUNTER_NOTE,
               "faster: is_guidance_distilled=True, because its CFG cache needs both branches in one batch, which "
               "Wan's pipelines never pass; what remains is its attention extrapolation (weight 0.5)."), generic=False),
}
TAPE_METHODS = tuple(name for name, spec in REGISTRY.items() if spec.tape is not None)
LIP_TAPE_METHODS = {"lip-tape": "tape-even", "lip-tape-paper": "paper"}  # LipConfig(tape=...) of this TAPE kind
STACKABLE = ("fbc", "fbc-fixed", "mag", "mag-fixed")  # caches that compose with vidprune (module docstring)
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
        return "stack" if len(self.parts) > 1 else REGISTRY[self.parts[0][0]].family

    @property
    def task(self) -> str:
        return REGISTRY[self.parts[0][0]].task

    @property
    def prunes(self) -> bool:
        return REGISTRY[self.parts[0][0]].family == "pruning"

    @property
    def settings(self) -> str:
        return " + ".join(REGISTRY[kind].settings.format(v=REGISTRY[kind].unset if value is None else f"{value:g}")
                          for kind, value in self.parts)


UNPRUNED = Method((("unpruned", None),))


def accepted_names() -> str:
    """--help text: every name, what its value means and its default."""
    lines = []
    for name, kind in REGISTRY.items():
        default = f"default {kind.default:g}" if kind.default is not None else f"no value: {kind.unset}"
        value = f":{kind.value} ({default})" if kind.value else ""
        lines.append(f"  {name}{value}: {kind.settings.format(v=kind.value)}")
    lines.append(f"A stack is one of {', '.join(TAPE_METHODS)} followed by one of {', '.join(STACKABLE)}, the caches "
                 "that compose with pruning. On random weights only fixed patterns run: not fbc or mag.")
    return "\n".join(lines)


def parse_method(text: str) -> Method:
    """A method from NAME, NAME:VALUE or PRUNING+CACHE (e.g. tape:0.5+fbc:0.1)."""
    parts = []
    for piece in text.split("+"):
        name, colon, value = piece.partition(":")
        kind = REGISTRY.get(name)
        if kind is None:
            raise ValueError(f"method {text!r} is not accepted: {name!r} is not a method name; accepted names: "
                             f"{', '.join(REGISTRY)} (NAME or NAME:VALUE, stacked as PRUNING+CACHE, e.g. "
                             "tape:0.5+fbc:0.1)")
        parts.append((name, _value(text, name, kind, value if colon else None)))
        if name in TAPE_METHODS:  # the configurations check their values now, not after the model loads
            tape_config(name, parts[-1][1])
        elif name in LIP_TAPE_METHODS:
            tape_config(LIP_TAPE_METHODS[name], parts[-1][1])
        elif name.startswith("lip") and parts[-1][1] is not None:
            LipDetection(target_prune=parts[-1][1])
    if len(parts) > 1 and (len(parts) != 2 or parts[0][0] not in TAPE_METHODS or parts[1][0] not in STACKABLE):
        raise ValueError(
            f"method {text!r} is not accepted: a stack is one of {', '.join(TAPE_METHODS)} followed by one of "
            f"{', '.join(STACKABLE)}. PAB, FasterCache and TaylorSeer reuse per-token attention or FFN outputs "
            "across calls, which belong to other tokens once TAPE's kept set changes; LIP is benchmarked on "
            "editing, without caches"
        )
    return Method(tuple(parts))


def _value(text: str, name: str, kind: MethodSpec, value: str | None) -> float | None:
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
        driven = [kind for kind, _ in method.parts if REGISTRY[kind].residual_driven]
        if random_weights and driven:
            raise ValueError(
                f"method {method.name!r} is not accepted on a random-weight model: {driven[0]} decides from the "
                f"model's residuals, which mean nothing with random weights; use {driven[0]}-fixed for speed"
            )
        if random_weights and method.parts[0][0] in LIP_TAPE_METHODS:
            raise ValueError(f"method {method.parts[0][0]!r} is not accepted on a random-weight model: its LIP mask comes from "
                             "the source video's detection; run it on the demo model")
        if random_weights and method.task == "edit" and method.parts[0][1] is None:
            raise ValueError(f"method {method.name!r} is not accepted on a random-weight model: give the ratio of "
                             f"tokens its fixed mask prunes, e.g. {method.name}:0.4")
        if method not in methods:
            methods.append(method)
    return methods


def check_family(methods: list[Method], adapter: Adapter) -> None:
    """Refuse methods that are set up for Wan only on another family (MethodSpec.generic), and
    step caches on a family whose pipelines set no cache context."""
    cached = [method.name for method in methods if any(REGISTRY[kind].family == "cache" for kind, _ in method.parts)]
    if cached and not adapter.sets_cache_context:
        raise ValueError(
            f"method {cached[0]!r} is not accepted on a {adapter.model_classes[0].__name__}: its pipeline does not "
            f"open diffusers' cache context, where diffusers' step caches keep their state; on this family vidprune "
            f"bench runs TAPE ({', '.join(TAPE_METHODS)})")
    if adapter.runs_every_bench_method:
        return
    wan_only = [method.name for method in methods if not all(REGISTRY[kind].generic for kind, _ in method.parts)]
    if wan_only:
        raise ValueError(
            f"method {wan_only[0]!r} is not accepted on a {adapter.model_classes[0].__name__}: on this family vidprune "
            f"bench runs TAPE ({', '.join(TAPE_METHODS)}) and FirstBlockCache (fbc, fbc-fixed), alone or stacked; LIP, "
            "MagCache, TaylorSeer, PAB and FasterCache are set up for Wan's pipelines")


def default_methods(random_weights: bool, adapter: Adapter | None = None) -> list[str]:
    """The issue's list: TAPE at several budgets, its ablations, the baselines, LIP, each cache at
    settings spanning similar speedups, and TAPE stacked with the caches that compose; on a
    family other than Wan (`adapter`), the ones that run there (check_family)."""
    names = _issue_methods(random_weights)
    if adapter is None:
        return names

    def runs(kind: str) -> bool:
        spec = REGISTRY[kind]
        full_context = spec.tape is not None and spec.tape(0.5).context == "full"
        return ((spec.generic or adapter.runs_every_bench_method)
                and (not full_context or adapter.supports_full_context)
                and (spec.family != "cache" or adapter.sets_cache_context))

    return [name for name in names if all(runs(kind) for kind, _ in parse_method(name).parts)]


def _issue_methods(random_weights: bool) -> list[str]:
    # fixed patterns always (on random weights the residual tests mean nothing; on a trained model
    # they are the honest baseline beside the calibrated caches: the demo model's fixed MagCache
    # beat its calibrated one)
    fbc, mag = ["fbc-fixed:2", "fbc-fixed:3"], ["mag-fixed:1", "mag-fixed:2", "mag-fixed:3"]
    if not random_weights:
        fbc, mag = [*fbc, "fbc:0.05", "fbc:0.1", "fbc:0.2"], [*mag, "mag:0.06", "mag:0.12", "mag:0.24"]
    return [
        "tape:0.3", "tape:0.5", "tape:0.7", "tape-even:0.5", "tape-full:0.5", "tape-nocache:0.5", "tape-norefresh:0.5",
        "tape-nodense:0.5", "paper:0.5",
        "naive:0.5", "random:0.5", *fbc, *mag, "taylor:3", "taylor:5", "pab:2", "pab:3", "faster:2", "faster:3",
        # token steps stack with step caches; reuse steps are whole-step skipping already
        f"tape-even:0.5+{fbc[0]}", f"tape-even:0.5+{mag[0]}", "lip:0.4", "lip-noar:0.4",
    ]


def tape_config(name: str, keep: float, record_selections: bool = False) -> TapeConfig:
    """The TapeConfig of a TAPE method of the registry (TAPE_METHODS) at mean keep `keep`."""
    return REGISTRY[name].tape(keep).with_(record_selections=record_selections)


def attach(pipe: Any, method: Method, setup: MethodContext) -> None:
    """Apply the method's parts: vidprune first, then a cache (the order that composes)."""
    for kind, value in method.parts:
        if kind == "unpruned":
            continue
        if kind in TAPE_METHODS:
            vidprune.apply(pipe, tape_config(kind, value, record_selections=True))
        elif kind in LIP_TAPE_METHODS:
            vidprune.apply(pipe, LipConfig(tape=tape_config(LIP_TAPE_METHODS[kind], value, record_selections=True)))
        elif kind.startswith("lip"):
            detection = LipDetection() if value is None else LipDetection(target_prune=value)
            mask = fixed_lip_mask(*setup.lip_grid, value) if setup.lip_grid else None
            vidprune.apply(pipe, LipConfig(detection=detection, recovery=kind == "lip", mask=mask))
        else:
            enable_cache_method(pipe, kind, value, setup)


def detach(pipe: Any) -> None:
    """Undo `attach`, last in first out (diffusers' hook registry unwinds correctly only so)."""
    for transformer in transformers_of(pipe):
        if transformer.is_cache_enabled:
            transformer.disable_cache()
    vidprune.remove(pipe)
