"""The report of `vidprune bench` (bench.py): bench.json, a markdown table per task and a plot of
speed against fidelity."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..extras import require
from .methods import UNPRUNED

TASK_TITLES = {"generate": "Text-to-video", "edit": "Video editing (video-to-video)"}
COLUMNS = ("method", "settings", "call s (median)", "speedup", "forward ms (median)", "forward ms (mean)", "mean keep",
           "PSNR dB", "SSIM", "flicker ratio", "static flicker")


def _finite(value: Any) -> Any:
    """JSON has no inf or NaN: null instead (PSNR of identical videos, flicker ratio of a still one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _cell(value: float | None, digits: int) -> str:
    if value is None:
        return ""
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """Tables of the summary, one per task, with what they were measured on."""
    info, call, options = report["info"], report["call"], report["options"]
    lines = [
        f"# vidprune bench on {info['device']}",
        "",
        f"Model: {report['model']} ({info['transformer_layers']} transformer layers, "
        f"{info['transformer_parameters'] / 1e6:.1f}M parameters, {info['dtype']}). {call['num_frames']} frames at "
        f"{call['height']}x{call['width']}, {call['num_inference_steps']} steps, CFG {call['guidance_scale']}"
        + (f", editing strength {options['strength']}" if "edit" in report["tasks"] else "") + ". "
        f"torch {info['torch']}, diffusers {info['diffusers']}. Speedup = median unpruned call time / median call "
        f"time, same process; {options['warmup']} warm-up call(s) per method, {options['repeats']} timed call(s) "
        "per input; forward = one transformer call (two a step with CFG); a cache's forwards are a mix of skipped "
        "and full ones, so see its mean too. Mean keep = video tokens kept in pruned spans, mean over steps and "
        "inputs. "
        + ("No fidelity: random weights." if options["random_weights"] else
           "Fidelity against the unpruned video of the same input, medians over inputs."),
        "",
        f"Made by `{report['command']}`.",
    ]
    for task, results in report["tasks"].items():
        count = len(results["inputs"])
        what = "random inputs" if options["random_weights"] else "prompts" if task == "generate" else "source clips"
        lines += ["", f"## {TASK_TITLES[task]}: {count} {what} x {options['seeds']} seed(s)", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        for name, e in results["methods"].items():
            fidelity = [_cell(e.get("psnr"), 2), _cell(e.get("ssim"), 4), _cell(e.get("flicker_ratio"), 3)]
            if name == UNPRUNED.name:
                fidelity = ["reference", "", ""]
            cells = [name, e["settings"], _cell(e["call_s_median"], 3), f"{e['speedup']:.2f}x",
                     _cell(e["forward_ms_median"], 1), _cell(e["forward_ms_mean"], 1), _cell(e.get("mean_keep"), 3),
                     *fidelity,
                     _cell(e.get("static_flicker"), 4)]
            lines.append("| " + " | ".join(cells) + " |")
    if report["notes"]:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def pyplot() -> Any:
    """matplotlib's pyplot without a display, or a clear error (checked before a long run)."""
    require("bench", "vidprune bench's plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


FAMILY_STYLES = {"pruning": ("tab:blue", "o"), "cache": ("tab:orange", "s"), "stack": ("tab:green", "D"),
                 "reference": ("black", "*")}


def plot(report: dict, path: Path) -> None:
    """Speed against fidelity, one point per method and setting (one panel per task); on random
    weights, where there is no fidelity, the speedups alone."""
    plt = pyplot()
    tasks = report["tasks"]
    figure, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5.5), squeeze=False)
    for axis, (task, results) in zip(axes[0], tasks.items()):
        methods = results["methods"]
        if report["options"]["random_weights"]:
            names = list(methods)
            axis.barh(names, [methods[n]["speedup"] for n in names],
                      color=[FAMILY_STYLES[methods[n]["family"]][0] for n in names])
            axis.invert_yaxis()
            axis.axvline(1.0, color="grey", linewidth=0.8)
            axis.set_xlabel("call speedup over unpruned")
        else:
            finite = [e["psnr"] for e in methods.values() if e.get("psnr") is not None and math.isfinite(e["psnr"])]
            ceiling = max(finite, default=40.0) + 3  # where videos identical to the unpruned one are drawn
            for name, e in methods.items():
                if name == UNPRUNED.name or e.get("psnr") is None:
                    continue
                identical = math.isinf(e["psnr"])
                colour, marker = FAMILY_STYLES[e["family"]]
                y = ceiling if identical else e["psnr"]
                axis.scatter(e["speedup"], y, color=colour, marker=marker)
                axis.annotate(name + (" (identical)" if identical else ""), (e["speedup"], y),
                              textcoords="offset points", xytext=(4, 3), fontsize=7)
            for family, (colour, marker) in FAMILY_STYLES.items():
                if family != "reference" and any(e["family"] == family for e in methods.values()):
                    axis.scatter([], [], color=colour, marker=marker, label=family)
            axis.axvline(1.0, color="grey", linewidth=0.8)
            axis.legend(loc="best", fontsize=8)
            axis.set_xlabel("call speedup over unpruned (same process)")
            axis.set_ylabel("PSNR against the unpruned video (dB, median)")
            axis.grid(alpha=0.3)
        axis.set_title(f"{TASK_TITLES[task]}, {report['info']['device']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=130)
    plt.close(figure)


def write_report(report: dict, out: Path) -> list[Path]:
    """bench.json, bench.md and bench.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.md", out / "bench.png"]
    paths[0].write_text(json.dumps(_finite(report), indent=1, allow_nan=False))
    paths[1].write_text(markdown(report))
    plot(report, paths[2])
    return paths
