"""Tiny random VAEs of each family's class, for pipelines that encode or decode pixels in tests
(offline, a few thousand weights each)."""

from __future__ import annotations

from diffusers import AutoencoderKLCogVideoX, AutoencoderKLHunyuanVideo, AutoencoderKLLTXVideo


def ltx_vae(latent_channels: int = 8) -> AutoencoderKLLTXVideo:
    """8x time, 32x space, like LTX-Video's."""
    return AutoencoderKLLTXVideo(
        latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False).eval()


def cogvideox_vae(latent_channels: int = 4) -> AutoencoderKLCogVideoX:
    """4x time, 8x space, like CogVideoX's."""
    return AutoencoderKLCogVideoX(latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                                  norm_num_groups=2, temporal_compression_ratio=4).eval()


def hunyuan_vae(latent_channels: int = 4) -> AutoencoderKLHunyuanVideo:
    """4x time, 8x space, like HunyuanVideo's."""
    return AutoencoderKLHunyuanVideo(latent_channels=latent_channels, block_out_channels=(8, 8, 8, 8),
                                     layers_per_block=1, norm_num_groups=2).eval()
