"""`dit` mode: WanTransformer3DModel with Wan's rectified-flow loss on a pool of encoded clips,
with an EMA of the weights."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from ..pipeline import MAX_SEQUENCE_LENGTH, load_minilm
from .common import (
    CAPTION_DROPOUT,
    EMA_DECAY,
    FULL,
    LATENT_CHANNELS,
    SHARD_SIZE,
    TEXT_DIM,
    TINY,
    autocast,
    build_transformer,
    clip_batches,
    encode_captions,
    parameter_count,
    setup_device,
    to_model_input,
)
from .run import make_run
from .vae import latent_cells, moving_pixels, weighted_mean


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
