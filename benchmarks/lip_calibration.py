"""LIP detection on real Wan2.1 latents: prune ratio against tau, and what each stage of the
detection pipeline does to it. CPU, well under a minute.

    .venv/bin/python benchmarks/lip_calibration.py

Writes benchmarks/results/lip_calibration.json and .md and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from vidprune.interframe import LipDetection, fit_tau, keep_mask, prune_report, token_distance

ROOT = Path(__file__).resolve().parents[1]
PATCH = (1, 2, 2)
TAUS = (0.05, 0.1, 0.149, 0.2, 0.3)
TARGETS = (0.3, 0.5, 0.7)
RAW = LipDetection(median=False, smooth=False, cleanup=False, dilate=False, tau2=None)
STAGES = (
    ("raw threshold only", RAW),
    ("+ median / causal Gaussian", replace(RAW, median=True, smooth=True)),
    ("+ clean-up (vote, open, close)", replace(RAW, median=True, smooth=True, cleanup=True)),
    ("+ dilation 3x5x5", replace(RAW, median=True, smooth=True, cleanup=True, dilate=True)),
    ("+ drift bound (tau2 0.3) = default", LipDetection()),
)


def measure(latents: torch.Tensor) -> dict:
    distance = token_distance(latents, PATCH)
    per_tau = {}
    for tau in TAUS:
        mask = keep_mask(latents, PATCH, LipDetection(tau=tau))
        unbounded = keep_mask(latents, PATCH, LipDetection(tau=tau, tau2=None))
        report = prune_report(mask)
        per_tau[str(tau)] = {
            "overall": report.overall.item(),
            "per_frame": report.per_frame[0].tolist(),
            "kept_by_drift_bound": (mask & ~unbounded).sum().item(),
        }
    stages = {name: prune_report(keep_mask(latents, PATCH, d)).overall.item() for name, d in STAGES}
    targets = {}
    for target in TARGETS:
        tau, mask = fit_tau(latents, PATCH, LipDetection(target_prune=target))
        targets[str(target)] = {"tau": tau.item(), "achieved": prune_report(mask).overall.item()}
    return {
        "latents_shape": list(latents.shape),
        "patch_size": list(PATCH),
        "raw_distance": {
            "below_0.149": (distance < 0.149).float().mean().item(),
            "below_0.1": (distance < 0.1).float().mean().item(),
            "mean_per_frame_pair": distance.mean(dim=(0, 2, 3)).tolist(),
        },
        "prune_vs_tau": per_tau,
        "prune_by_stage_at_tau_0.149": stages,
        "target_prune": targets,
    }


def markdown(results: dict, command: str) -> str:
    frames = len(results["prune_vs_tau"][str(TAUS[0])]["per_frame"])
    raw = results["raw_distance"]
    lines = [
        "# LIP detection calibration on real Wan2.1 latents",
        "",
        "Real Wan2.1 latents of a low-motion clip (example files of the MIT-licensed taehv project,",
        f"madebyollin/taehv), shape {tuple(results['latents_shape'])}, patch (1, 2, 2):",
        f"{frames} x 20 x 32 tokens. CPU. Made by `{command}`.",
        "",
        f"Raw trimmed-L1 distance to the previous latent frame: below 0.149 for {raw['below_0.149']:.1%}",
        f"of tokens, below 0.1 for {raw['below_0.1']:.1%}. Mean per frame pair (1-0, 2-1, ...): "
        + ", ".join(f"{d:.3f}" for d in raw["mean_per_frame_pair"]) + ".",
        "(Wan's VAE encodes latent frame 0 from one video frame and later latent frames from four,",
        "which is a likely reason for the large 1-0 distance.)",
        "",
        "## Prune ratio per latent frame against tau (default pipeline, tau2 0.3)",
        "",
        "| tau | overall | drift-kept tokens | " + " | ".join(f"f{f}" for f in range(frames)) + " |",
        "|---|---|---|" + "---|" * frames,
    ]
    for tau, row in results["prune_vs_tau"].items():
        cells = [tau, f"{row['overall']:.3f}", str(row["kept_by_drift_bound"])] + [f"{p:.2f}" for p in row["per_frame"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Overall prune ratio as the stages are added (tau 0.149)", ""]
    lines += ["| stages | prune ratio |", "|---|---|"]
    lines += [f"| {name} | {ratio:.3f} |" for name, ratio in results["prune_by_stage_at_tau_0.149"].items()]
    lines += ["", "## target_prune: tau found by bisection (default pipeline)", ""]
    lines += ["| target | tau | achieved |", "|---|---|---|"]
    lines += [f"| {t} | {r['tau']:.4f} | {r['achieved']:.3f} |" for t, r in results["target_prune"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", default="../shared/data/wan21_latents/test_latents_wan.pth",
                        help="latents file, relative to the repository root")
    parser.add_argument("--out", default="benchmarks/results", help="output folder, relative to the repository root")
    args = parser.parse_args()
    latents = torch.load(ROOT / args.latents, map_location="cpu", weights_only=True)
    results = measure(latents)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "lip_calibration.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results, ".venv/bin/python benchmarks/lip_calibration.py")
    (out / "lip_calibration.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
