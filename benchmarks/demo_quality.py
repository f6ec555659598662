"""Quality of the trained demo pipeline on held-out prompts, measured automatically.

For held-out caption combinations (data.py split="heldout": colour, shape, direction and
background kind never trained together), with a still camera and a single shape, it generates a
video per prompt (seeded) and measures (measure.py): the moving object's colour and direction
against the caption, how still the background is, and flicker (mean absolute difference of
consecutive frames). The same measurements on the real clips of those prompts check the
measurement; on those clips passed through the VAE they give the model's ceiling (the DiT can
draw no more than its VAE renders).
It also measures the VAE's reconstruction PSNR on held-out clips (any camera, any shapes).

The demo model is a small test bed trained for minutes on procedural clips: these numbers say how
well it follows its own caption grammar, nothing about real video models.

    python benchmarks/demo_quality.py --device cuda            # the shipped model
    python benchmarks/demo_quality.py --model out/model --device cpu
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vidprune.demo.data import make_clip
from vidprune.demo.measure import background_stillness, object_colour, object_direction, parse_caption
from vidprune.demo.pipeline import DEFAULT_CALL, load_demo_pipeline


def heldout_clips(count: int, frames: int, height: int, width: int, still_single: bool):
    """The first `count` held-out clips by seed (with a still camera and one shape if asked):
    (seed, uint8 video, caption)."""
    found, seed = [], 0
    while len(found) < count:
        video, caption, spec = make_clip(seed, frames, height, width, split="heldout")
        if not still_single or (spec.pan is None and len(spec.shapes) == 1):
            found.append((seed, video, caption))
        seed += 1
    return found


def flicker(video: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, pixels in [0, 1]."""
    video = video.astype(np.float32) / 255 if video.dtype == np.uint8 else video.astype(np.float32)
    return float(np.abs(np.diff(video, axis=0)).mean())


def measure(video: np.ndarray, caption: str) -> dict:
    asked = parse_caption(caption)
    colour, direction = object_colour(video), object_direction(video)
    return dict(colour=colour, direction=direction, colour_ok=colour == asked["colour"],
                direction_ok=direction == asked["direction"], stillness=background_stillness(video),
                flicker=flicker(video))


def summary(rows: list[dict]) -> dict:
    return dict(
        colour_accuracy=float(np.mean([r["colour_ok"] for r in rows])),
        direction_accuracy=float(np.mean([r["direction_ok"] for r in rows])),
        both_accuracy=float(np.mean([r["colour_ok"] and r["direction_ok"] for r in rows])),
        background_stillness=float(np.mean([r["stillness"] for r in rows])),
        flicker=float(np.mean([r["flicker"] for r in rows])),
    )


@torch.no_grad()
def reconstruct(pipe, videos: list[np.ndarray], device: str, batch: int) -> list[tuple[np.ndarray, float]]:
    """Each uint8 video (F, H, W, 3) through the pipeline's VAE (posterior mean): the
    reconstruction (float, [0, 1]) and its PSNR in dB."""
    results = []
    for start in range(0, len(videos), batch):
        video = torch.from_numpy(np.stack(videos[start:start + batch])).to(device)
        x = (video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1).to(pipe.vae.dtype)
        recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = ((recon - x.float()) / 2).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
        frames = ((recon + 1) / 2).permute(0, 2, 3, 4, 1).cpu().numpy()
        results += list(zip(frames, (-10 * torch.log10(mse)).tolist()))
    return results


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result: dict) -> str:
    gen, real, vae = result["generated"], result["real_clips"], result["vae_reconstruction"]
    call = result["call"]
    lines = [
        "# Demo model quality",
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; model: `{result['model']}`; {result['seconds']:.0f} s",
        "",
        f"{result['prompts']} held-out prompts (still camera, one shape), {call['num_frames']} frames of "
        f"{call['height']}x{call['width']}, {call['num_inference_steps']} steps, guidance {call['guidance_scale']}, "
        "one seeded video each.",
        "",
        "| | colour right | direction right | both | background stillness | flicker |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    rows = (("generated", gen), ("real clips through the VAE (the model's ceiling)", result["vae_clips"]),
            ("real clips (the measurement's ceiling)", real))
    for name, row in rows:
        lines.append(f"| {name} | {row['colour_accuracy']:.0%} | {row['direction_accuracy']:.0%} | "
                     f"{row['both_accuracy']:.0%} | {row['background_stillness']:.4f} | {row['flicker']:.4f} |")
    lines += [
        "",
        f"VAE reconstruction on {vae['clips']} held-out clips: PSNR mean {vae['psnr_mean']:.2f} dB "
        f"(min {vae['psnr_min']:.2f}, max {vae['psnr_max']:.2f}).",
        "",
        result["note"],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="pipeline folder (default: the shipped demo model)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--text-encoder", help="a folder from `python -m vidprune.demo.train pack-text-encoder`")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--recon-clips", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="prompts per pipeline call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_CALL["num_inference_steps"])
    parser.add_argument("--guidance", type=float, default=DEFAULT_CALL["guidance_scale"])
    parser.add_argument("--frames", type=int, default=DEFAULT_CALL["num_frames"])
    parser.add_argument("--size", type=int, default=DEFAULT_CALL["height"], help="height and width")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="demo_quality", help="output file name, without extension")
    args = parser.parse_args(argv)

    started = time.monotonic()
    pipe = load_demo_pipeline(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                              text_encoder_path=args.text_encoder)
    pipe.set_progress_bar_config(disable=True)
    call = {**DEFAULT_CALL, "num_frames": args.frames, "height": args.size, "width": args.size,
            "num_inference_steps": args.steps, "guidance_scale": args.guidance}

    prompts = heldout_clips(args.prompts, args.frames, args.size, args.size, still_single=True)
    rows, real_rows = [], []
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start:start + args.batch]
        # CPU generators: the same noise on every device.
        generators = [torch.Generator().manual_seed(args.seed + start + i) for i in range(len(chunk))]
        videos = pipe([c[2] for c in chunk], generator=generators, output_type="np", **call).frames
        for (seed, real, caption), video in zip(chunk, videos):
            rows.append(dict(clip_seed=seed, prompt=caption, **measure(np.asarray(video), caption)))
            real_rows.append(measure(real, caption))
        print(f"generated {len(rows)}/{len(prompts)}", flush=True)

    # A generated video can follow the prompt at best as well as the VAE renders the real clip.
    through_vae = reconstruct(pipe, [c[1] for c in prompts], args.device, args.batch)
    vae_rows = [measure(video, caption) for (video, _), (_, _, caption) in zip(through_vae, prompts)]
    recon = [value for _, value in reconstruct(
        pipe, [c[1] for c in heldout_clips(args.recon_clips, args.frames, args.size, args.size, False)],
        args.device, args.batch)]
    result = dict(
        command=shlex.join(["python", "benchmarks/demo_quality.py", *(argv if argv is not None else sys.argv[1:])]),
        device=device_name(args.device), model=str(args.model or "shipped demo model"), dtype=args.dtype,
        prompts=len(prompts), call=call, seed=args.seed,
        generated=summary(rows), vae_clips=summary(vae_rows), real_clips=summary(real_rows),
        vae_reconstruction=dict(clips=len(recon), psnr_mean=float(np.mean(recon)), psnr_min=float(np.min(recon)),
                                psnr_max=float(np.max(recon))),
        per_prompt=rows, seconds=time.monotonic() - started,
        note="The demo model is a small test bed trained briefly on procedural clips; these numbers say how well "
             "it follows its own caption grammar on held-out combinations, nothing about real video models.",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
