"""Running a benchmark: tasks (generation, editing), timed calls, fidelity, summaries."""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from diffusers import WanVideoToVideoPipeline
from tqdm.auto import tqdm

import vidprune

from ..adapters import adapter_for
from ..metrics import fidelity_summary
from ..validation import check_fraction, check_int
from .caches import MethodContext, calibrate_mag_ratios
from .inputs import Input, edit_inputs, generation_inputs, random_inputs
from .methods import FIXED_NOTE, REGISTRY, STACK_NOTE, UNPRUNED, Method, attach, detach
from .timing import ForwardTimer


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
class BenchTask:
    """One task's pipeline, methods (the unpruned reference first), inputs, call arguments and setup."""

    task: str
    pipe: Any
    methods: list[Method]
    inputs: list[Input]
    call: dict
    setup: MethodContext

    @property
    def calibrates(self) -> bool:
        """Whether MagCache's ratios must be calibrated first (one more call)."""
        return any(kind == "mag" for method in self.methods for kind, _ in method.parts)

    def calls(self, options: Options) -> int:
        """Pipeline calls the task makes (for the progress bar)."""
        return self.calibrates + len(self.methods) * (options.warmup + len(self.inputs) * options.repeats)


def build_tasks(pipe: Any, methods: list[Method], call: dict, options: Options, model: str) -> list[BenchTask]:
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
        setup = MethodContext(steps=call["num_inference_steps"])
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
        task_pipe = pipe if task == "generate" else WanVideoToVideoPipeline.from_pipe(pipe, dtype=pipe.transformer.dtype)
        task_pipe.set_progress_bar_config(disable=True)
        plans.append(BenchTask(task, task_pipe, [UNPRUNED, *chosen], inputs, task_call, setup))
    return plans


def run_task(plan: BenchTask, options: Options, progress: tqdm) -> list[dict]:
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
    if method.task == "generate" and any(span.index is not None for record in stats.forwards for span in record.spans):
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
    plans = build_tasks(pipe, methods, call, options, model)
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
    said += list(dict.fromkeys(note for kind in REGISTRY if kind in kinds for note in REGISTRY[kind].notes))
    if any(method.family == "stack" for method in methods):
        said.append(STACK_NOTE)
    return said
