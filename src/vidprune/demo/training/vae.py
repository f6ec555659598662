"""`vae` mode: diffusers' AutoencoderKLWan at 4x temporal and 4x spatial compression, with its
losses and the latent statistics WanPipeline normalises with."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

from .. import measure
from .common import (
    FULL,
    LATENT_CHANNELS,
    TINY,
    autocast,
    build_vae,
    clip_batches,
    parameter_count,
    random_crops,
    setup_device,
    to_model_input,
)
from .run import make_run


def static_latent_mask(x: torch.Tensor, tolerance: float = 2 / 127.5) -> torch.Tensor:
    """(B, T-1, h, w): True where latent frames t-1 and t of the VAE cover pixels that do not
    change (by more than `tolerance`, in [-1, 1] units) over all the frames the two encode.
    Latent frame 0 encodes frame 0, latent frame t >= 1 frames 4t-3..4t, and a latent cell
    covers a 4x4 pixel block."""
    change = x.diff(dim=2).abs().amax(dim=1)  # (B, F-1, H, W): frame f -> f + 1 at index f
    change = F.max_pool2d(change, 4)
    latent_frames = (x.shape[2] - 1) // 4 + 1
    pairs = [change[:, max(0, 4 * t - 7): 4 * t].amax(dim=1) for t in range(1, latent_frames)]
    return torch.stack(pairs, dim=1) < tolerance


def static_latent_change(mean: torch.Tensor, static: torch.Tensor, std: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute change between consecutive latent frames over static cells, in units of
    each channel's std (default: its spread in this batch): what LIP's duplicate detection sees
    on still content."""
    if std is None:
        std = mean.detach().transpose(0, 1).flatten(1).std(dim=1).clamp_min(1e-3)
    scale = std.view(1, -1, 1, 1, 1)
    change = (mean.diff(dim=2) / scale).abs().mean(dim=1)  # (B, T-1, h, w)
    return (change * static).sum() / static.sum().clamp_min(1)


def moving_pixels(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, F, H, W): the pixels of a (B, 3, F, H, W) video in [-1, 1] that measure.py counts
    as moving (off the temporal median): with a still camera, the shapes."""
    return measure.moving_pixels(x, 2 * measure.MOVING_THRESHOLD, time_dim=2, channel_dim=1)


def latent_cells(pixels: torch.Tensor) -> torch.Tensor:
    """(B, 1, F, H, W) boolean pixels -> (B, 1, T, H/4, W/4): True for each latent cell whose
    frames and 4x4 block hold a True pixel (latent frame 0 covers frame 0, latent frame t >= 1
    frames 4t-3..4t: three copies of frame 0 in front make that every fourth frame)."""
    padded = torch.cat([pixels[:, :, :1].expand(-1, -1, 3, -1, -1), pixels], dim=2).float()
    return F.max_pool3d(padded, 4) > 0


def weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean of `values` weighted by `weights` (broadcast to their shape)."""
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum()


def vae_loss(recon: torch.Tensor, x: torch.Tensor, posterior, kl_weight: float,
             static_weight: float, shape_weight: float) -> torch.Tensor:
    """L1, plus L1 of frame-to-frame differences (keeps motion and still backgrounds faithful),
    both with moving pixels weighted 1 + shape_weight (the shapes cover ~3% of a clip but are what
    the captions are about), plus a small KL to N(0, 1) that keeps the latents bounded and
    smooth for the DiT, plus the latent change over still content (LIP prunes tokens whose
    latent repeats the previous frame's: still content must encode to the same latent in every
    latent frame)."""
    weights = 1 + shape_weight * moving_pixels(x).float()
    l1 = weighted_mean((recon - x).abs(), weights)
    pair_weights = torch.maximum(weights[:, :, 1:], weights[:, :, :-1])  # a difference involving a moving pixel
    motion = weighted_mean((recon.diff(dim=2) - x.diff(dim=2)).abs(), pair_weights)
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    still = static_latent_change(mean, static_latent_mask(x))
    return l1 + 0.5 * motion + kl_weight * kl + static_weight * still


@torch.no_grad()
def latent_statistics(vae: AutoencoderKLWan, batches, clips: int,
                      device: torch.device) -> tuple[list[float], list[float], float, float]:
    """Per-channel mean and std of the posterior means over `clips` clips, the mean
    reconstruction PSNR (dB, pixels in [0, 1]) of those clips, and their static latent change
    (static_latent_change, in units of the measured per-channel std)."""
    vae.eval()
    total = torch.zeros(LATENT_CHANNELS, dtype=torch.float64)
    squares = torch.zeros(LATENT_CHANNELS, dtype=torch.float64)
    count, seen, psnr, latents, masks = 0, 0, [], [], []
    while seen < clips:
        video, _ = next(batches)
        x = to_model_input(video.to(device))
        with autocast(device):
            z = vae.encode(x).latent_dist.mode()
            recon = vae.decode(z).sample
        latents.append(z.float().cpu())
        masks.append(static_latent_mask(x).cpu())
        z = z.float().transpose(0, 1).reshape(LATENT_CHANNELS, -1).double().cpu()
        total += z.sum(dim=1)
        squares += z.pow(2).sum(dim=1)
        count += z.shape[1]
        mse = ((recon.float() - x) / 2).pow(2).flatten(1).mean(dim=1).clamp_min(1e-10)
        psnr += (-10 * torch.log10(mse)).tolist()
        seen += len(video)
    mean = total / count
    std = (squares / count - mean.pow(2)).clamp_min(1e-6).sqrt()
    change = static_latent_change(torch.cat(latents), torch.cat(masks), std.float())
    return mean.tolist(), std.tolist(), float(np.mean(psnr)), float(change)


def train_vae(args: argparse.Namespace) -> None:
    sizes = TINY if args.tiny else FULL
    device = setup_device(args.device)
    run = make_run(args, "vae", sizes)
    torch.manual_seed(args.seed)
    vae = build_vae(sizes).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    state = run.resume()
    if state is not None:
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.manual_seed(args.seed + 1000 * run.runs)  # new noise draws in a resumed run
    elif args.init is not None:  # continue from an exported model (a new optimiser)
        initial = AutoencoderKLWan.from_pretrained(Path(args.init) / "vae", local_files_only=True)
        vae.load_state_dict(initial.float().state_dict())
        print(f"[vae] initialised from {args.init}", flush=True)
    batch = args.batch or sizes.vae_batch
    crop = tuple(args.crop) if args.crop else sizes.vae_crop
    print(f"[vae] {parameter_count(vae) / 1e6:.2f}M parameters, {sizes.frames}x{sizes.height}x{sizes.width} clips, "
          f"batch {batch} crops of {crop[0]}x{crop[1]}x{crop[1]}, device {device}", flush=True)
    batches = clip_batches(sizes, batch, args.workers, args.seed, run.runs, device)
    crops = torch.Generator().manual_seed(args.seed + 1000 * run.runs)

    def save() -> None:
        run.save(dict(model=vae.state_dict(), optimizer=optimizer.state_dict()))

    vae.train()
    run.begin()
    while not run.done():
        video = next(batches)[0].to(device, non_blocking=True)
        video = random_crops(video, *crop, crops)  # on the device: the CPUs are busy making clips
        x = to_model_input(video)
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample
        run.optimize(vae_loss(recon.float(), x, posterior, args.kl, args.static, args.shape_weight), vae, optimizer)
        run.tick(save, batch)
    save()

    # WanPipeline un-normalises the latents it generates with latents_mean/std of the VAE config.
    stats_batches = clip_batches(sizes, batch, args.workers, args.seed + 1, 0, device)
    mean, std, psnr, still = latent_statistics(vae, stats_batches, sizes.stats_clips, device)
    final = copy.deepcopy(vae).cpu().half()
    final.register_to_config(latents_mean=mean, latents_std=std)
    final.save_pretrained(run.out / "vae")
    run.save(dict(model=vae.state_dict(), optimizer=optimizer.state_dict()),
             extra=dict(psnr_db=psnr, static_latent_change=still, latents_mean=mean, latents_std=std))
    print(f"[vae] wrote {run.out / 'vae'}: reconstruction PSNR {psnr:.2f} dB on {sizes.stats_clips} clips, "
          f"static latent change {still:.3f}, "
          f"latent std {min(std):.3f}..{max(std):.3f}", flush=True)
