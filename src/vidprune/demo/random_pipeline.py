"""Small Wan pipelines with randomly initialised VAE and transformer, built in code (offline).

They exercise exactly the diffusers code paths of real Wan checkpoints (WanPipeline,
WanImageToVideoPipeline, WanVideoToVideoPipeline) but produce noise-like videos: they are for
tests and for the CLI until the project's trained demo model is shipped.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLWan,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    WanVideoToVideoPipeline,
)

from .text_encoder import load_text_encoder

# name -> (heads, head_dim, ffn_dim, layers)
TRANSFORMER_SIZES = {"tiny": (2, 16, 64, 6), "small": (4, 32, 256, 8)}
PIPELINE_KINDS = ("t2v", "i2v", "v2v")
_IMAGE_ENCODER_DIM = 32


def _transformer(size: str, in_channels: int, image_dim: int | None) -> WanTransformer3DModel:
    heads, head_dim, ffn_dim, layers = TRANSFORMER_SIZES[size]
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=in_channels,
        out_channels=16,
        text_dim=384,
        freq_dim=32,
        ffn_dim=ffn_dim,
        num_layers=layers,
        image_dim=image_dim,
        added_kv_proj_dim=heads * head_dim if image_dim else None,
        rope_max_seq_len=64,
    )


def _image_encoder():
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=_IMAGE_ENCODER_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        image_size=32, patch_size=8,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return processor, CLIPVisionModel(config).eval()


def build_random_wan_pipeline(kind: str = "t2v", size: str = "tiny", seed: int = 0):
    """A Wan pipeline of `kind` ("t2v", "i2v", "v2v") with a random transformer of `size`."""
    if kind not in PIPELINE_KINDS:
        raise ValueError(f"kind={kind!r} is not accepted: kind must be one of {', '.join(PIPELINE_KINDS)}")
    if size not in TRANSFORMER_SIZES:
        raise ValueError(f"size={size!r} is not accepted: size must be one of {', '.join(TRANSFORMER_SIZES)}")
    torch.manual_seed(seed)
    tokenizer, text_encoder = load_text_encoder()
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    common = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler)
    if kind == "t2v":
        return WanPipeline(transformer=_transformer(size, 16, None).eval(), **common)
    if kind == "v2v":
        return WanVideoToVideoPipeline(transformer=_transformer(size, 16, None).eval(), **common)
    processor, image_encoder = _image_encoder()
    # I2V concatenates 20 condition channels (4 mask + 16 image latents) to the 16 noise channels.
    transformer = _transformer(size, 36, _IMAGE_ENCODER_DIM).eval()
    return WanImageToVideoPipeline(
        transformer=transformer, image_processor=processor, image_encoder=image_encoder, **common
    )
