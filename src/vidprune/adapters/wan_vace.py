"""diffusers WanVACETransformer3DModel (Wan2.1-VACE; Wan2.2-VACE-Fun as two experts): TAPE and LIP on WanVACEPipeline.

The main blocks (`blocks`) are Wan's WanTransformerBlock, called as in WanTransformer3DModel,
so the Wan adapter's per-token inputs, queries and keys hold. What VACE adds:
- control blocks (`vace_blocks`): before the first main block, the model runs them in a chain
  on the patched control latents (the control video, its mask and any reference images) plus
  the patched noisy latents, and each gives a hint (batch, tokens, dim) at every token;
- after main block `vace_layers[j]` (in ascending order) the model adds hint j times
  `control_hidden_states_scale[j]` to the block's output, in its own block loop.

Hints inside a pruned span. Inside a span the main stream holds the kept tokens only, so a
full-length hint added after a block in the span's interior does not fit. The hint is gathered
at the span's kept tokens there: each kept token gets exactly the hint it gets unpruned, and the
span keeps its length and its one selection. Ending spans at every hint layer instead would
split them into pieces of two layers on Wan2.1-VACE-1.3B (a hint every second layer), each
with a selection of its own; pruning only between hint layers would leave those layers dense.
A pruned token gets what TAPE gives it (its cache of the span, whose residual includes the hints
of the step that computed it), as it does for the blocks' own work. The gather happens where the
model adds the hint: a hook on each control block whose hint lands inside a span hands the
model, on pruned forwards, a hint object whose `.to(device)` (the model's first use of it)
gathers at the kept tokens of the span open at that moment, or gives all of it when no span is
open (after a span's last block, which hands the model the full-length output). A hint after a
span's last block is thus added by the model at full length, as unpruned. The control blocks
are not pruned: they run before any main block, so before any selection (pruning them would
need one made from the control stream alone). They are 15 of Wan2.1-VACE-1.3B's 45 blocks and 8
of 14B's 48, which bounds TAPE's token steps' speedup there; their FLOPs are counted as unpruned
work (`unpruned_flops`). On a reuse step they do not run when every hint lands inside a span (as
with the default cycle budget's one span): the spans' remembered residuals hold the hints, and
the model adds none (`_NoHint`); where a hint lands after a span's last block they run.

Reference images (WanVACEPipeline(reference_images=...)) are extra latent frames before the
video's, in the noisy latents and in the control latents, and the model gives them RoPE
positions as frames 0..R-1 of one grid; the pipeline drops them after denoising. They stay
frames of the token grid, so the per-frame selection and its temporal smoothing run over them,
but every span computes all of their tokens (`leading_tokens`): the video reads the
subject's appearance from them through attention, so they are context, not content to skip,
and they are few (one latent frame per image, against 21 for 81 video frames). The pipeline
marks them: their control channels past the inactive video latents (the reactive video latents
and the mask) are exact zeros, which a video frame's are not (where a frame's mask is zero
everywhere, its reactive latents are the VAE's normalised encoding of a blank frame, not zeros). TAPE's keep applies to the selection before the
reference tokens are added, so a span's token count (`stats`) can be above it.

LIP (an edit with a mask). WanVACEPipeline hands the model its source video as control latents
(96 channels: the VAE latents of the video outside the mask, "inactive", and inside it,
"reactive", then the mask, the 8 x 8 pixels under each latent pixel), so LIP reads its mask from
each forward's `control_hidden_states` (`lip_keep_mask`; the pipeline's VAE calls encode the video
in two parts and each reference image, none of them the source). A video token is pruned when its
control latents, all 96 channels, repeat the previous latent frame's by LIP's detection
(`interframe.keep_mask`) and the mask is zero over it and over the token before it in time: there
the model reproduces the source, so what repeats in the control repeats in the output. Where the
mask is set the model generates new content, which may move where the control stands still: those
tokens count as detected motion (`keep_mask(forced=...)`: dilated, the drift bound measured from
them), and the token after one is computed too, so no pruned token's reference (its last computed
occurrence) is generated. mask=None sets the mask everywhere: nothing is pruned. Reference-image
frames join every LIP mask (`leading_tokens`, LipConfig(mask=...) too) and take no part in the
detection, whose frame 0, always kept, is the first video frame. LIP's one span covers all main
blocks, so every hint but the last block's is gathered at LIP's kept tokens; restoration and
Attention Recovery are Wan's. With LipConfig(tape=...), TAPE's selections get the reference frames
before their recovery keys are made. Refused: kv_source="clean" (the call generates from noise: no
clean latents of its video for the clean pass) and source_latents (the source is the control video).

Not with TAPE's cache="block" (its replay of the pruned tokens through the span's blocks would
miss the hints added between them), compile_blocks(graphs=True) (a graphed span runs its blocks
back to back, without the model's hint additions), or context parallelism (diffusers gives the
model no _cp_plan): each refused with a message.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import AutoencoderKLWan, WanVACEPipeline, WanVACETransformer3DModel
from diffusers.hooks import HookRegistry, ModelHook

from ..arguments import bind_arguments
from ..interframe import keep_mask
from ..tokens import gather_tokens, patches
from .base import BenchmarkShape, cross_attention_block_flops
from .wan import _WAN_1_3B, _WAN_14B, _WAN_TINY, WanAdapter, wan_experts, wan_scheduler

# Wan-AI/Wan2.1-VACE-{1.3B,14B}-diffusers transformer/config.json (as diffusers'
# scripts/convert_wan_to_diffusers.py writes them): the Wan2.1 T2V configs plus a control block
# after every second main layer (1.3B: 15 of 30) or every fifth (14B: 8 of 40), each taking the
# 96 control channels (16 inactive and 16 reactive video latents, a 64-channel mask).
_VACE_1_3B = dict(_WAN_1_3B, vace_layers=list(range(0, 30, 2)), vace_in_channels=96)
_VACE_14B = dict(_WAN_14B, vace_layers=list(range(0, 40, 5)), vace_in_channels=96)
_VACE_TINY = dict(_WAN_TINY, vace_layers=[0, 2, 4], vace_in_channels=96)
_SOURCE = "Wan-AI/Wan2.1-VACE-{}-diffusers transformer/config.json (diffusers' scripts/convert_wan_to_diffusers.py)"
_ENCODES = "WanVACEPipeline encodes its control video (zeros when none is given) with a random-weight VAE every call"
WAN_VACE_SHAPES = {
    "wan-vace-1.3b": BenchmarkShape("wan2.1-vace", _VACE_1_3B, (81, 480, 832), (512, 4096), (4, 8),
                                    _SOURCE.format("1.3B"), notes=(f"wan-vace-1.3b: {_ENCODES}",)),
    "wan-vace-14b": BenchmarkShape("wan2.1-vace", _VACE_14B, (81, 480, 832), (512, 4096), (4, 8),
                                   _SOURCE.format("14B"),
                                   notes=(f"wan-vace-14b: at 480p (the model also runs 720p); {_ENCODES}",)),
    "wan-vace-tiny": BenchmarkShape("wan2.1-vace", _VACE_TINY, (9, 64, 64), (512, 4096), (4, 8),
                                    "vidprune's tiny test shape", tiny=True),
}
# The benchmark pipelines' VAE: Wan2.1's (AutoencoderKLWan's defaults), or for the tiny shape
# one with the same compression (4x time, 8x space) and a few thousand weights.
_TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


class _KeptHint:
    """A control hint that the model adds, as `hint.to(device) * scale`, to the output of a main
    block: at the kept tokens of the span open at that moment, or all of it when none is."""

    def __init__(self, hint: torch.Tensor, state: Any) -> None:
        self.hint, self.state = hint, state

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        current = self.state.current
        span = current.span if current is not None else None
        hint = self.hint if span is None or span.index is None else gather_tokens(self.hint, span.index)
        return hint.to(*args, **kwargs)


class _NoHint:
    """The hint of a control block skipped on a reuse step: the model adds nothing."""

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(()).to(*args, **kwargs)


class _ControlBlockHook(ModelHook):
    """On a control block: on a pruned forward whose span is open where the model adds the hint
    (`gathers`), the hint (the first of the block's two outputs) becomes a _KeptHint; on a reuse
    step (`skips`: every hint lands inside a span, so the spans' remembered residuals hold them),
    the block does not run and gives no hint."""

    def __init__(self, pruner: Any, gathers: bool, skips: bool) -> None:
        super().__init__()
        self.pruner, self.gathers, self.skips = pruner, gathers, skips

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        current = self.pruner.state.current
        if self.skips and current is not None and self.pruner.reuses_forward():
            current.record.unpruned_skipped = True
            return _NoHint(), bind_arguments(type(module).forward, args, kwargs)["control_hidden_states"]
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not self.gathers or current is None or not current.active or output[0] is None:
            return output
        return _KeptHint(output[0], self.pruner.state), output[1]


class WanVACEAdapter(WanAdapter):
    model_classes = (WanVACETransformer3DModel,)
    video_to_video_pipelines = ("WanVACEPipeline",)  # LIP's source: the control latents (`lip_keep_mask`)
    text_to_video_pipelines = ()  # from Python: the CLI's generate does not pass control videos
    lip_source_in_forward = True
    supports_block_cache = False
    # A pruned token's replayed state would miss the hints the control blocks add between blocks.
    supports_full_context = False
    supports_context_parallel = False
    runs_every_bench_method = False
    benchmark_shapes = WAN_VACE_SHAPES

    def benchmark_pipeline(self, transformers: list[torch.nn.Module], shape: BenchmarkShape) -> Any:
        model = transformers[0]
        with torch.device(model.device):
            vae = AutoencoderKLWan(**(_TINY_VAE if shape.tiny else {})).eval()
        if vae.dtype != model.dtype:
            vae = vae.to(model.dtype)
        return WanVACEPipeline(tokenizer=None, text_encoder=None, vae=vae,
                               scheduler=wan_scheduler(), **wan_experts(transformers))

    def check_graphs(self, transformer: torch.nn.Module) -> None:
        raise ValueError("compile_blocks(graphs=True) does not support WanVACETransformer3DModel: a graphed span runs "
                         "its blocks back to back, without the control hints the model adds between them; use "
                         "compile_blocks(graphs=False) or no compile_blocks")

    def register_hooks(self, pruner: Any, name: str) -> None:
        transformer = pruner.transformer
        inside = {layer for span in pruner.spans for layer in range(span.start, span.end)}  # not a span's last
        layers = sorted(transformer.config.vace_layers)
        skips = all(layer in inside for layer in layers)  # then a reuse step needs no hint
        for block, layer in zip(transformer.vace_blocks, layers):
            if layer in inside or skips:
                hook = _ControlBlockHook(pruner, gathers=layer in inside, skips=skips)
                HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, name)

    def leading_tokens(self, transformer: torch.nn.Module, inputs: dict[str, Any]) -> int:
        grid = self.token_grid(transformer, inputs)
        return reference_frames(transformer, inputs["control_hidden_states"]) * grid.per_frame

    def check_lip(self, config: Any) -> None:
        if config.kv_source == "clean":
            raise ValueError("LipConfig(kv_source='clean') is not supported on WanVACETransformer3DModel: a VACE call "
                             "generates its video from noise, and its control latents hold the source only where the "
                             "mask keeps it, so there are no clean latents to run the clean pass on; use "
                             "kv_source='current' (the default)")
        if config.source_latents is not None:
            raise ValueError("LipConfig(source_latents=...) is not taken on WanVACETransformer3DModel: LIP reads the "
                             "source video from each forward's control latents (control_hidden_states); give "
                             "LipConfig() or LipConfig(mask=...)")

    def lip_keep_mask(self, transformer: torch.nn.Module, inputs: dict[str, Any], detection: Any) -> torch.Tensor:
        control, latents = inputs["control_hidden_states"], inputs["hidden_states"]
        video_channels = 2 * transformer.config.in_channels  # the inactive and reactive video latents
        if control.shape[2:] != latents.shape[2:] or control.shape[1] <= video_channels:
            raise ValueError(f"LIP on WanVACETransformer3DModel reads its mask from the control latents, which must "
                             f"cover the latents' (frames, height, width) {tuple(latents.shape[2:])} and hold a mask "
                             f"after the {video_channels} video latent channels, as WanVACEPipeline's do; this forward's "
                             f"are {tuple(control.shape)}")
        patch = self.patch_size(transformer)
        references = reference_frames(transformer, control)
        video = control[:, :, references * patch[0]:]
        generated = patches(video[:, video_channels:], patch).ne(0).any(dim=-1)
        forced = generated.clone()
        forced[:, 1:] |= generated[:, :-1]  # so that no pruned token's reference is a generated one
        keep = keep_mask(video, patch, detection, forced)
        return torch.cat([keep.new_ones(keep.shape[0], references, *keep.shape[2:]), keep], dim=1)

    def unpruned_flops(self, transformer: torch.nn.Module, tokens: int, context_tokens: int) -> float:
        """The control blocks on every token: each a Wan block plus its hint projection (dim x dim),
        the first also its input projection."""
        dim = self.hidden_size(transformer)
        blocks = len(transformer.config.vace_layers)
        block = cross_attention_block_flops(dim, transformer.config.ffn_dim, tokens, context_tokens)
        return blocks * block + (blocks + 1) * 2 * tokens * dim * dim


def reference_frames(transformer: torch.nn.Module, control: torch.Tensor) -> int:
    """How many token frames at the start of the control latents (batch, channels, frames,
    height, width) hold reference images in every sample: WanVACEPipeline gives a reference
    image's latent frame zeros in every channel past the inactive video latents (its
    `in_channels`), reactive latents and mask alike."""
    blank = (control[:, transformer.config.in_channels:] == 0).all(dim=4).all(dim=3).all(dim=1).all(dim=0)
    leading = int(blank.int().cumprod(dim=0).sum())
    return leading // transformer.config.patch_size[0]
