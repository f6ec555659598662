"""What the training modes share: sizes, model builders, the clip stream, caption encoding, device set-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import make_clip
from ..pipeline import HEIGHT, MAX_SEQUENCE_LENGTH, NUM_FRAMES, WIDTH

LATENT_CHANNELS = 16
TEXT_DIM = 384  # MiniLM's hidden size
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
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
