"""Fidelity and temporal metrics of decoded videos: (frames, H, W, 3) arrays, uint8 or floats
in [0, 1]."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from .selection import adjacent_frame_iou
from .tokens import TokenGrid
from .video_io import to_uint8

SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
# torchvision's AlexNet_Weights.IMAGENET1K_V1 file, which lpips.LPIPS(net="alex") loads through torch hub.
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"


def _unit(video: np.ndarray) -> np.ndarray:
    return to_uint8(np.asarray(video)).astype(np.float64) / 255.0


def _pair(video: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both videos in float64 [0, 1] units, checked to be comparable frame by frame."""
    a, b = _unit(video), _unit(reference)
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(
            f"videos of shapes {a.shape} and {b.shape} cannot be compared: they must have one shape, "
            "(frames, H, W, channels)"
        )
    return a, b


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over the whole video (inf when identical)."""
    a, b = _pair(video, reference)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _gaussian_blur(images: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter of (N, 1, H, W) images over 'valid' windows only (no padding)."""
    taps = torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2
    window = torch.exp(-(taps**2) / (2 * SSIM_SIGMA**2))
    window = window / window.sum()
    rows = torch.nn.functional.conv2d(images, window.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(rows, window.view(1, 1, -1, 1))


def ssim(video: np.ndarray, reference: np.ndarray) -> float:
    """Mean structural similarity (Wang et al. 2004) over frames, computed per RGB channel and
    averaged (not on luma): Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 1, over
    the windows that fit inside the frame (as scikit-image's gaussian_weights=True,
    use_sample_covariance=False). 1 = identical; it sees structure that PSNR averages away."""
    a, b = _pair(video, reference)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        size = f"{SSIM_WINDOW}x{SSIM_WINDOW}"
        raise ValueError(f"frames of {a.shape[2]}x{a.shape[1]} are too small for SSIM: it needs at least {size}")
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    means = []
    for x, y in zip(a, b):  # one frame at a time bounds memory at 480x832 and 81 frames
        x = torch.from_numpy(x).permute(2, 0, 1).unsqueeze(1)  # channels as a batch: (3, 1, H, W)
        y = torch.from_numpy(y).permute(2, 0, 1).unsqueeze(1)
        mu_x, mu_y, xx, yy, xy = _gaussian_blur(torch.cat([x, y, x * x, y * y, x * y])).chunk(5)
        var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
        similarity = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        means.append(similarity.mean().item())
    return float(np.mean(means))


def flicker(video: np.ndarray) -> float:
    """Mean absolute difference of consecutive frames, in [0, 1] units (the quantity behind
    VBench's temporal-flickering score: lower is steadier)."""
    frames = _unit(video)
    if frames.shape[0] < 2:
        return 0.0
    return float(np.mean(np.abs(frames[1:] - frames[:-1])))


def static_flicker(video: np.ndarray, reference: np.ndarray, threshold: float = 0.02) -> float:
    """flicker() of the video over the pixels the reference holds still (no channel changes by
    more than `threshold`, in [0, 1] units, between any two consecutive frames): there, any change
    is flicker the method added, not motion. NaN when the reference has no static pixel; 0.0 for
    fewer than 2 frames, as flicker()."""
    a, b = _pair(video, reference)
    if a.shape[0] < 2:
        return 0.0
    static = np.all(np.abs(np.diff(b, axis=0)) <= threshold, axis=(0, 3))  # (H, W)
    if not static.any():
        return float("nan")
    return float(np.mean(np.abs(np.diff(a, axis=0))[:, static]))


def selection_iou(kept: np.ndarray | torch.Tensor) -> float:
    """Mean intersection-over-union of adjacent frames' kept tokens, kept: booleans of shape
    (frames, tokens_per_frame) or (frames, h, w). Higher = steadier selection: 1.0 when every
    frame keeps the same tokens; two empty sets count as identical (1). The same quantity as
    PruneStats.selection_iou, for a mask saved or built outside a pipeline."""
    mask = torch.as_tensor(kept)
    if mask.dtype != torch.bool or mask.ndim not in (2, 3):
        raise ValueError(
            f"kept of shape {tuple(mask.shape)} and dtype {mask.dtype} is not accepted: it must be booleans "
            "of shape (frames, tokens_per_frame) or (frames, h, w)"
        )
    mask = mask.reshape(mask.shape[0], -1)
    if mask.shape[0] < 2:
        return 1.0
    index = mask.flatten().nonzero().view(1, -1)
    return adjacent_frame_iou(index, TokenGrid(mask.shape[0], 1, mask.shape[1]))


class _Unavailable(Exception):
    """A learned metric whose package or weights are not on this machine (the message says which)."""


@functools.lru_cache(maxsize=1)
def _lpips_model():
    import lpips

    return lpips.LPIPS(net="alex", verbose=False).eval()


@functools.lru_cache(maxsize=1)
def _clip_model(path: str):
    from transformers import AutoImageProcessor, CLIPModel

    return (CLIPModel.from_pretrained(path, local_files_only=True).eval(),
            AutoImageProcessor.from_pretrained(path, local_files_only=True))


def _lpips(a: np.ndarray, b: np.ndarray) -> float:
    try:
        import lpips  # noqa: F401  (is it installed? _lpips_model loads it once the weights are found)
    except ImportError as error:
        raise _Unavailable(
            "lpips: package 'lpips' not installed (pip install lpips; it needs its AlexNet weights locally)"
        ) from error
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT
    if not checkpoint.is_file():
        raise _Unavailable(f"lpips: AlexNet weights not found at {checkpoint} (lpips would download them; vidprune does not)")
    model = _lpips_model()

    def image(frame: np.ndarray) -> torch.Tensor:  # (1, 3, H, W) in [0, 1], taken with normalize=True
        return torch.from_numpy(frame).permute(2, 0, 1)[None].float()

    with torch.no_grad():
        distances = [model(image(x), image(y), normalize=True) for x, y in zip(a, b)]
    return torch.stack(distances).mean().item()


def _clip_similarity(a: np.ndarray, b: np.ndarray, path: str | None) -> float:
    path = path or os.environ.get("VIDPRUNE_CLIP_PATH")
    if not path:
        raise _Unavailable("clip_similarity: no local CLIP model (set VIDPRUNE_CLIP_PATH to a CLIP model folder or pass clip_path)")
    if not Path(path).is_dir():
        raise _Unavailable(f"clip_similarity: CLIP model folder {path!r} does not exist")
    model, processor = _clip_model(path)

    def embed(frames: np.ndarray) -> torch.Tensor:
        pixels = processor(images=list(to_uint8(frames)), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            features = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        return torch.nn.functional.normalize(features, dim=-1)

    return (embed(a) * embed(b)).sum(dim=-1).mean().item()


def optional_metrics(
    video: np.ndarray, reference: np.ndarray, clip_path: str | None = None
) -> tuple[dict[str, float], list[str]]:
    """Learned metrics whose weights are already on this machine: "lpips" (AlexNet, mean over
    frames; lower = closer) and "clip_similarity" (mean cosine of matching frames' CLIP image
    embeddings; higher = closer; model folder from clip_path or $VIDPRUNE_CLIP_PATH). Returns the
    values and why each missing one was skipped: nothing is downloaded, nothing is substituted."""
    a, b = _pair(video, reference)
    values, skipped = {}, []
    for name, metric in (("lpips", _lpips), ("clip_similarity", lambda x, y: _clip_similarity(x, y, clip_path))):
        try:
            values[name] = metric(a, b)
        except _Unavailable as reason:
            skipped.append(str(reason))
    return values, skipped


def fidelity_summary(
    video: np.ndarray, reference: np.ndarray, learned: bool = True, clip_path: str | None = None
) -> dict[str, float]:
    """How far a method's video strays from the unpruned video of the same prompt and seed:
    "psnr", "ssim", "flicker" (of video), "reference_flicker", "flicker_ratio" (NaN when the
    reference does not change at all) and "static_flicker"; plus optional_metrics() when learned
    is true, with a warning for each one skipped."""
    video, reference = to_uint8(np.asarray(video)), to_uint8(np.asarray(reference))  # convert once
    video_flicker, reference_flicker = flicker(video), flicker(reference)
    summary = {
        "psnr": psnr(video, reference),
        "ssim": ssim(video, reference),
        "flicker": video_flicker,
        "reference_flicker": reference_flicker,
        "flicker_ratio": video_flicker / reference_flicker if reference_flicker else float("nan"),
        "static_flicker": static_flicker(video, reference),
    }
    if learned:
        values, skipped = optional_metrics(video, reference, clip_path)
        summary.update(values)
        for reason in skipped:
            warnings.warn(reason, stacklevel=2)
    return summary
