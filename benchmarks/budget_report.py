"""The report of one budget run: demo-model fidelity (budget_fidelity.json) against full-size
speed (budget_speed.json), as a markdown table and a Pareto plot.

Each method's full-size call time is predicted from its per-forward pattern on the demo run and
the per-forward times measured at full size (budget_speed.py says how); where a method was also
run as a whole call at full size, that time is shown beside the prediction.

    python benchmarks/budget_report.py DIR      # reads DIR/budget_fidelity.json, DIR/budget_speed.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SPEEDS = (1.5, 2.0, 2.5, 3.0)


def forward_ms(keep: float, times: dict[str, float], whole_stack: bool) -> float:
    """A TAPE forward's full-size time at `keep`: measured levels, linear between them."""
    if keep == 0.0:
        return times["reuse_whole_stack" if whole_stack else "reuse"]
    points = sorted([(float(name.split(":")[1]), ms) for name, ms in times.items() if name.startswith("token:")]
                    + [(1.0, times["dense_through_spans"])])
    if keep <= points[0][0]:
        return points[0][1]  # below the least measured keep: no cheaper than it (conservative)
    for (k0, t0), (k1, t1) in zip(points, points[1:]):
        if k0 <= keep <= k1:
            return t0 + (t1 - t0) * (keep - k0) / (k1 - k0)
    return points[-1][1]


def predicted_call_s(row: dict, speed: dict, stack_reuse: bool = False) -> float:
    """The method's full-size call as it ran on the demo; `stack_reuse`: with reuse forwards that
    run no block, as vidprune's reuse steps do since this run."""
    times, pipeline_ms = speed["forward_ms"], speed["pipeline_ms_per_call"]
    if row.get("forward_keeps") is not None:
        whole_stack = stack_reuse or ("first_pruned_layer=0" in row["config"] and "reselect_every=0" in row["config"])
        return (pipeline_ms + sum(forward_ms(k, times, whole_stack) for k in row["forward_keeps"])) / 1000
    kind = row["method"].split(":")[0]
    if kind in ("mag-fixed", "fbc-fixed", "taylor"):  # fixed patterns: measured as whole calls at full size
        return speed["calls"][row["method"]]["call_s"]
    computed = row["computed_forwards_mean"]
    skipped = row["forwards_per_call"] - computed
    if kind in ("mag", "mag-fixed", "fbc", "fbc-fixed"):
        skip_ms = times["mag_skipped" if kind.startswith("mag") else "fbc_skipped"]
        return (pipeline_ms + computed * times["dense"] + skipped * skip_ms) / 1000
    raise ValueError(f"no full-size time for {row['method']}")


def group(row: dict) -> str:
    name = row["method"]
    if name.startswith("profile"):
        return "vidprune calibrated profile"
    if name.startswith(("even", "cycle", "mixed")):
        return "vidprune budget rule"
    if name.startswith(("mag-fixed", "fbc-fixed", "taylor")):
        return "step cache, fixed pattern"
    return "step cache, calibrated"


def rows_with_speed(fidelity: dict, speed: dict) -> list[dict]:
    unpruned = speed["calls"]["unpruned"]["call_s"]
    rows = []
    for row in fidelity["rows"]:
        predicted = predicted_call_s(row, speed)
        measured = speed["calls"].get(row["method"], {}).get("call_s")
        reuses = row.get("forward_keeps") is not None and 0.0 in row["forward_keeps"]
        rows.append({**row, "method": row["method"].replace(" (TAPE default)", " (the default before this run)"),
                     "group": group(row), "full_size_speedup": unpruned / predicted,
                     "stack_reuse_speedup": unpruned / predicted_call_s(row, speed, True) if reuses else None,
                     "full_size_measured_speedup": None if measured is None else unpruned / measured})
    return rows


def best_at(rows: list[dict], speed: float, groups: tuple[str, ...]) -> dict | None:
    """The highest-PSNR row of `groups` whose full-size speedup is at least `speed`."""
    fast = [r for r in rows if r["group"] in groups and r["full_size_speedup"] >= speed]
    return max(fast, key=lambda r: r["psnr"]) if fast else None


def markdown(fidelity: dict, speed: dict, rows: list[dict]) -> str:
    info, sinfo = fidelity["info"], speed["info"]
    lines = [
        "# One budget over steps and tokens: demo-model fidelity against full-size speed", "",
        f"Fidelity: {info['device']}, vidprune's demo model (a small test bed, not a product model), "
        f"{info['evaluation_prompts']} held-out prompts x {info['seeds']} seeds, {info['call']}; medians against the "
        "unpruned video of the same prompt and seed. Profiles calibrated on "
        f"{len(info['calibration_prompts'])} captions of the training split (disjoint from the evaluation prompts); "
        f"MagCache's ratios calibrated on one of them. `{info['command']}`; the calibrated caches, FirstBlockCache "
        "and TaylorSeer in a second run of the same script (`--caches ...`, same prompts, seeds and model, its own "
        "unpruned references), where the first run's time ran out.", "",
        f"Speed: {sinfo['device']}, {sinfo['model']} with {sinfo['weights']}, {sinfo['dtype']}, video "
        f"{sinfo['video']}, {sinfo['steps']} steps, CFG {sinfo['guidance_scale']}: the unpruned call "
        f"{speed['calls']['unpruned']['call_s']:.2f} s. Full-size speedup = unpruned call over the call predicted "
        "from the method's per-forward pattern on the demo run and the per-forward times measured at full size; "
        "'measured' = a whole call of the method at full size (same run). 'Reuse skipping every block' = the "
        "same pattern with reuse forwards that run no block (vidprune's reuse steps since this run; in this run they "
        "ran the layers before the first pruned span, except in the 'whole-stack reuse' rows, which measure the "
        "change's fidelity: within 0.2 dB). "
        f"`{sinfo['command']}`.", "",
        "| method | group | PSNR dB | SSIM | flicker ratio | colour / direction kept | block FLOPs | demo speedup | "
        "full-size speedup (predicted) | measured | reuse skipping every block (predicted) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["group"], -r["full_size_speedup"])):
        flops = "-" if r["flops_computed"] is None else f"{r['flops_computed']:.2f}"
        measured = "-" if r["full_size_measured_speedup"] is None else f"{r['full_size_measured_speedup']:.2f}x"
        lines.append(f"| {r['method']} | {r['group']} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['flicker_ratio']:.2f} | "
                     f"{r['colour_kept']:.0%} / {r['direction_kept']:.0%} | {flops} | {r['speedup']:.2f}x | "
                     f"{r['full_size_speedup']:.2f}x | {measured} | "
                     f"{'-' if r['stack_reuse_speedup'] is None else format(r['stack_reuse_speedup'], '.2f') + 'x'} |")
    lines += ["", "Best PSNR at a full-size speedup of at least:", "",
              "| speedup | vidprune (profiles and rules) | best step cache | difference |", "|---|---|---|---|"]
    ours = ("vidprune calibrated profile", "vidprune budget rule")
    theirs = ("step cache, fixed pattern", "step cache, calibrated")
    for s in SPEEDS:
        a, b = best_at(rows, s, ours), best_at(rows, s, theirs)
        text = lambda r: "none" if r is None else f"{r['method']}: {r['psnr']:.2f} dB ({r['full_size_speedup']:.2f}x)"  # noqa: E731
        diff = "-" if a is None or b is None else f"{a['psnr'] - b['psnr']:+.2f} dB"
        lines.append(f"| {s}x | {text(a)} | {text(b)} | {diff} |")
    times = speed["forward_ms"]
    ceiling = speed["ceiling"]
    lines += ["", "Full-size forwards (ms, medians): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items())),
              f"; pipeline time per call {speed['pipeline_ms_per_call']:.0f} ms. Ceiling of a reuse forward (non-block "
              f"time {ceiling['non_block_ms']:.1f} ms + the layers before the first span at {ceiling['block_ms']:.1f} ms "
              f"each): {ceiling['reuse_forward_ms']:.1f} ms (measured {times['reuse']:.1f}, "
              f"{times['reuse'] / ceiling['reuse_forward_ms'] - 1:+.1%}); whole-stack reuse ceiling "
              f"{ceiling['whole_stack_reuse_forward_ms']:.1f} ms (measured {times['reuse_whole_stack']:.1f}).", "",
              "Calibration: " + "; ".join(f"{k}: {v['calls']} calls, {v['seconds']:.0f} s" for k, v in fidelity["calibration"].items()),
              "", "Prediction against whole calls at full size (same run):", "",
              "| method | predicted s | measured s |", "|---|---|---|"]
    for r in rows:
        if r["full_size_measured_speedup"] is not None:
            unpruned = speed["calls"]["unpruned"]["call_s"]
            lines.append(f"| {r['method']} | {unpruned / r['full_size_speedup']:.2f} | "
                         f"{unpruned / r['full_size_measured_speedup']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"vidprune calibrated profile": "tab:red", "vidprune budget rule": "tab:orange",
               "step cache, fixed pattern": "tab:blue", "step cache, calibrated": "tab:cyan"}
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for name, colour in colours.items():
        chosen = [r for r in rows if r["group"] == name]
        axes.scatter([r["full_size_speedup"] for r in chosen], [r["psnr"] for r in chosen], c=colour, label=name, s=30)
        for r in chosen:
            axes.annotate(r["method"].replace(" (TAPE default)", ""), (r["full_size_speedup"], r["psnr"]), fontsize=6,
                          xytext=(3, 2), textcoords="offset points")
    axes.set_xlabel("call speedup at full size (Wan2.1-1.3B shape, random weights, H200, predicted from forward times)")
    axes.set_ylabel("PSNR against the unpruned video, dB (demo model, held-out prompts)")
    axes.set_title("Fidelity (demo model) against full-size speed")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    fidelity = json.loads((args.folder / "budget_fidelity.json").read_text())
    # a second run of the calibrated step caches (same prompts, seeds and references), where the
    # first run's time ran out; its rows replace any of the same name
    extra = args.folder / "budget_fidelity_caches.json"
    if extra.exists():
        later = {row["method"]: row for row in json.loads(extra.read_text())["rows"]}
        fidelity["rows"] = [row for row in fidelity["rows"] if row["method"] not in later] + list(later.values())
    speed = json.loads((args.folder / "budget_speed.json").read_text())
    rows = rows_with_speed(fidelity, speed)
    (args.folder / "budget.md").write_text(markdown(fidelity, speed, rows))
    plot(rows, args.folder / "budget_pareto.png")
    print((args.folder / "budget.md").read_text())


if __name__ == "__main__":
    main()
