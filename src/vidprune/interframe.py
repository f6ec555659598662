"""LIP detection: which DiT tokens of a source video barely change from one latent frame to the
next, so that they need not be computed (methods.md section 2).

Detection runs once per video on the clean source latents (batch, channels, frames, height,
width). A token is one transformer patch (pt, ph, pw) of those latents across all channels
(Wan: (1, 2, 2)). Masks are bools over the token grid (batch, F', H', W'), True = computed
(kept); tokens flatten frame-major, f * H' * W' + h * W' + w. Frame 0 is always kept, so every
pruned token has an earlier computed occurrence at its position to copy from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .tokens import patches
from .validation import check_choice, fail, is_number

METRICS = ("trimmed_l1", "l1", "l2", "cosine")
DILATION = (3, 5, 5)
BISECTION_STEPS = 40

PatchSize = tuple[int, int, int]


def _check_metric(metric: str, trim: float) -> None:
    check_choice("metric", metric, METRICS)
    if not is_number(trim) or not 0.0 <= trim < 0.5:
        fail("trim", trim, "a finite number in [0, 0.5)")


def patchify(latents: torch.Tensor, patch_size: PatchSize) -> torch.Tensor:
    """(B, C, F, H, W) latents -> (B, F', H', W', C*pt*ph*pw) float32: one row per token."""
    if latents.ndim != 5:
        fail("latents", tuple(latents.shape), "a (batch, channels, frames, height, width) tensor")
    if len(patch_size) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch_size):
        fail("patch_size", patch_size, "three integers >= 1 (frames, height, width)")
    _, _, f, h, w = latents.shape
    pt, ph, pw = patch_size
    if f % pt or h % ph or w % pw:
        fail("patch_size", patch_size, f"divisors of the latent (frames, height, width) {(f, h, w)}")
    return patches(latents.float(), patch_size)


def pair_distance(a: torch.Tensor, b: torch.Tensor, metric: str = "trimmed_l1", trim: float = 0.2) -> torch.Tensor:
    """Distance between token rows a and b (..., D), one value per token.

    trimmed_l1: mean |a - b| after dropping the floor(trim * D) smallest and largest values, so
    a few outlier values cannot decide alone; l1: mean |a - b|; l2: root mean square of a - b;
    cosine: 1 - cosine similarity."""
    _check_metric(metric, trim)
    diff = a - b
    if metric == "trimmed_l1":
        drop = int(trim * diff.shape[-1])
        ordered = diff.abs().sort(dim=-1).values
        return ordered[..., drop : diff.shape[-1] - drop].mean(dim=-1)
    if metric == "l1":
        return diff.abs().mean(dim=-1)
    if metric == "l2":
        return diff.pow(2).mean(dim=-1).sqrt()
    return 1.0 - F.cosine_similarity(a, b, dim=-1)


def token_distance(
    latents: torch.Tensor, patch_size: PatchSize, metric: str = "trimmed_l1", trim: float = 0.2
) -> torch.Tensor:
    """(B, F'-1, H', W'): each token's distance to the same position in the previous latent frame.
    Entry t compares token frame t + 1 with token frame t."""
    tokens = patchify(latents, patch_size)
    return pair_distance(tokens[:, 1:], tokens[:, :-1], metric, trim)


def _windows(volume: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """(B, T, H, W) -> (B, T, H, W, kt*kh*kw): each entry's box neighbourhood (odd sizes,
    t-major order), edges replicated."""
    kt, kh, kw = size
    pad = (kw // 2, kw // 2, kh // 2, kh // 2, kt // 2, kt // 2)
    x = F.pad(volume.float().unsqueeze(1), pad, mode="replicate").squeeze(1)
    for dim, k in zip((1, 2, 3), size):
        x = x.unfold(dim, k, 1)
    return x.reshape(*volume.shape, -1)


def median_filter3d(volume: torch.Tensor) -> torch.Tensor:
    """3x3x3 median of a (B, T, H, W) volume, edges replicated: removes isolated spikes (noise
    in a static region) and isolated dips (a still token inside a moving region)."""
    return _windows(volume, (3, 3, 3)).median(dim=-1).values


def causal_gaussian3d(volume: torch.Tensor, sigma: float = 1.5) -> torch.Tensor:
    """3x3x3 Gaussian smoothing of a (B, T, H, W) volume whose taps at t + 1 are zero (the rest
    renormalised), edges replicated: a frame's score never depends on later frames, as in the
    authors' chunk-causal model, which decides a chunk before it sees the next one."""
    taps = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0]) / sigma) ** 2)
    kernel = taps.view(3, 1, 1) * taps.view(1, 3, 1) * taps.view(1, 1, 3)
    kernel[2] = 0.0
    kernel = (kernel / kernel.sum()).to(volume.device)
    return _windows(volume, (3, 3, 3)) @ kernel.flatten()


def _box_any(mask: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    return _windows(mask, size).amax(dim=-1) > 0


def _box_all(mask: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    return _windows(mask, size).amin(dim=-1) > 0


def clean_mask(moving: torch.Tensor) -> torch.Tensor:
    """3x3x3 majority vote, then per-frame 3x3 opening and closing of the kept set, on a
    (B, T, H, W) bool mask: drops kept specks and fills small holes, so computed regions are
    compact and have few borders with copied tokens."""
    voted = _windows(moving, (3, 3, 3)).mean(dim=-1) > 0.5
    frame_box = (1, 3, 3)
    opened = _box_any(_box_all(voted, frame_box), frame_box)
    return _box_all(_box_any(opened, frame_box), frame_box)


def dilate(mask: torch.Tensor, size: tuple[int, int, int] = DILATION) -> torch.Tensor:
    """Grow the kept set of a (B, T, H, W) bool mask by a box: a margin of computed tokens
    around motion, where a copied token would sit next to a changed one."""
    return _box_any(mask, size)


def drift_bound(
    tokens: torch.Tensor, mask: torch.Tensor, tau2: float, metric: str = "trimmed_l1", trim: float = 0.2
) -> torch.Tensor:
    """Also keep every pruned token whose distance to the last computed occurrence at its
    position exceeds tau2, so a slowly drifting patch is not copied forever.

    tokens: (B, F', H', W', D) from `patchify`; mask: (B, F', H', W') with frame 0 all True.
    Sequential over frames: a token kept here becomes the reference for the frames after it."""
    mask = mask.clone()
    reference = tokens[:, 0]
    for f in range(1, tokens.shape[1]):
        mask[:, f] |= pair_distance(tokens[:, f], reference, metric, trim) > tau2
        reference = torch.where(mask[:, f, ..., None], tokens[:, f], reference)
    return mask


@dataclass(frozen=True)
class LipDetection:
    """Which tokens LIP computes; every stage can be switched off.

    metric / trim: token distance to the previous latent frame (see `pair_distance`).
    tau: keep a token where its (smoothed) distance exceeds tau, in latent units.
    tau2: drift bound: also keep a token whose distance to its last computed occurrence exceeds
        tau2; None turns the bound off.
    median / smooth: 3x3x3 median filter / causal 3x3x3 Gaussian (sigma) on the distances.
    cleanup: majority vote and per-frame opening and closing of the kept set (`clean_mask`).
    dilate: grow the kept set by a 3 (time) x 5 x 5 box.
    target_prune: if set, ignore tau and pick, per video, the tau whose mask prunes this
        fraction of all tokens (frame 0 included) as closely as possible (`fit_tau`).
    """

    metric: str = "trimmed_l1"
    trim: float = 0.2
    tau: float = 0.149
    tau2: float | None = 0.3
    median: bool = True
    smooth: bool = True
    sigma: float = 1.5
    cleanup: bool = True
    dilate: bool = True
    target_prune: float | None = None

    def __post_init__(self) -> None:
        _check_metric(self.metric, self.trim)
        if not is_number(self.tau) or self.tau < 0:
            fail("tau", self.tau, "a finite number >= 0")
        if self.tau2 is not None and (not is_number(self.tau2) or self.tau2 <= 0):
            fail("tau2", self.tau2, "None (no drift bound) or a finite number > 0")
        for name in ("median", "smooth", "cleanup", "dilate"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "True or False")
        if not is_number(self.sigma) or self.sigma <= 0:
            fail("sigma", self.sigma, "a finite number > 0")
        if self.target_prune is not None and (not is_number(self.target_prune) or not 0 <= self.target_prune < 1):
            fail("target_prune", self.target_prune, "None or a number in [0, 1)")


def _scores(tokens: torch.Tensor, detection: LipDetection) -> torch.Tensor:
    """The (B, F'-1, H', W') volume that tau thresholds: distances, median filtered and smoothed."""
    if tokens.shape[1] < 2:
        fail("latents", f"{tokens.shape[1]} token frame(s)", "at least 2 token frames (frames / pt >= 2)")
    scores = pair_distance(tokens[:, 1:], tokens[:, :-1], detection.metric, detection.trim)
    if detection.median:
        scores = median_filter3d(scores)
    if detection.smooth:
        scores = causal_gaussian3d(scores, detection.sigma)
    return scores


def _mask_at(tokens: torch.Tensor, scores: torch.Tensor, tau: float, detection: LipDetection,
             forced: torch.Tensor | None) -> torch.Tensor:
    """The keep mask for one tau, given the tau-independent scores."""
    # Frame 0 is kept, not detected: it enters the dilation as still (kept, the time dilation
    # would mark all of frame 1 as kept). Forced tokens, frame 0's too, count as motion from the
    # dilation on (the clean-up, which drops specks, would drop some).
    moving = scores > tau
    if detection.cleanup:
        moving = clean_mask(moving)
    moving = torch.cat([torch.zeros_like(moving[:, :1]), moving], dim=1)
    if forced is not None:
        moving = moving | forced
    mask = dilate(moving) if detection.dilate else moving
    mask[:, 0] = True
    # The drift bound comes last so that it holds on the final mask: every pruned token is within
    # tau2 of its last computed occurrence. Run before the clean-up, the median vote or the
    # opening could drop the very tokens it kept. The tokens it adds are not dilated.
    if detection.tau2 is not None:
        mask = drift_bound(tokens, mask, detection.tau2, detection.metric, detection.trim)
    return mask


def _pruned(mask: torch.Tensor) -> float:
    return 1.0 - mask.float().mean().item()


def _fit_one(tokens: torch.Tensor, scores: torch.Tensor, detection: LipDetection,
             forced: torch.Tensor | None) -> tuple[float, torch.Tensor]:
    """Bisection on tau for one video. The prune ratio grows with tau, though not strictly (the
    drift bound depends on earlier decisions), so the closest mask seen is returned."""
    target = detection.target_prune
    tolerance = 1.0 / (tokens.shape[2] * tokens.shape[3])  # one token per frame, over all tokens
    low, high = 0.0, scores.max().item()
    highest = _mask_at(tokens, scores, high, detection, forced)
    if _pruned(highest) <= target:  # the most this video can prune (only frame 0 and drift kept)
        return high, highest
    lowest = _mask_at(tokens, scores, low, detection, forced)
    if _pruned(lowest) >= target:
        return low, lowest
    best = min((high, highest), (low, lowest), key=lambda fit: abs(_pruned(fit[1]) - target))
    for _ in range(BISECTION_STEPS):
        tau = (low + high) / 2
        mask = _mask_at(tokens, scores, tau, detection, forced)
        pruned = _pruned(mask)
        if abs(pruned - target) < abs(_pruned(best[1]) - target):
            best = (tau, mask)
        if abs(pruned - target) <= tolerance:
            break
        low, high = (tau, high) if pruned < target else (low, tau)
    return best


def _tokens(latents: torch.Tensor, patch_size: PatchSize, forced: torch.Tensor | None) -> torch.Tensor:
    """`patchify`, with `forced` checked against the token grid."""
    tokens = patchify(latents, patch_size)
    if forced is not None and (forced.dtype != torch.bool or forced.shape != tokens.shape[:4]):
        fail("forced", f"a {forced.dtype} tensor {tuple(forced.shape)}",
             f"None or a bool tensor {tuple(tokens.shape[:4])} over the token grid")
    return tokens


def fit_tau(
    latents: torch.Tensor, patch_size: PatchSize, detection: LipDetection, forced: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tau per video (B,) that prunes `detection.target_prune` of its tokens, within one
    token per frame where the mask allows it, and the keep mask at that tau (B, F', H', W');
    `forced` as in `keep_mask`."""
    if detection.target_prune is None:
        fail("target_prune", None, "a number in [0, 1) to fit tau to")
    tokens = _tokens(latents, patch_size, forced)
    scores = _scores(tokens, detection)
    fits = [_fit_one(tokens[i : i + 1], scores[i : i + 1], detection, None if forced is None else forced[i : i + 1])
            for i in range(tokens.shape[0])]
    return torch.tensor([tau for tau, _ in fits]), torch.cat([mask for _, mask in fits])


def keep_mask(latents: torch.Tensor, patch_size: PatchSize, detection: LipDetection = LipDetection(),
              forced: torch.Tensor | None = None) -> torch.Tensor:
    """LIP's keep mask (B, F', H', W') for clean source latents (B, C, F, H, W): True = compute
    the token, False = copy it from its last computed occurrence (`reference_index`).

    forced: (B, F', H', W') bool, tokens to compute whatever their change (VACE's generated
    region): they count as detected motion, so the dilation grows them and the drift bound
    measures from them."""
    if detection.target_prune is not None:
        return fit_tau(latents, patch_size, detection, forced)[1]
    tokens = _tokens(latents, patch_size, forced)
    return _mask_at(tokens, _scores(tokens, detection), detection.tau, detection, forced)


@dataclass(frozen=True)
class PruneReport:
    """Fraction of tokens not computed: per video (B,) and per video and frame (B, F')."""

    overall: torch.Tensor
    per_frame: torch.Tensor


def prune_report(mask: torch.Tensor) -> PruneReport:
    """Achieved prune ratios of a keep mask (B, F', H', W')."""
    per_frame = (~mask).flatten(2).float().mean(dim=2)
    return PruneReport(overall=per_frame.mean(dim=1), per_frame=per_frame)


def reference_index(mask: torch.Tensor) -> torch.Tensor:
    """(B, N) flat index of every token's reference: the last kept occurrence at its (h, w) in
    the same or an earlier frame (kept tokens are their own reference)."""
    b, f, h, w = mask.shape
    if not mask[:, 0].all():
        fail("mask", "a mask with pruned tokens in frame 0", "a mask whose frame 0 is all kept")
    frames = torch.arange(f, device=mask.device).view(1, f, 1, 1)
    last_kept = torch.where(mask, frames, -1).cummax(dim=1).values
    positions = torch.arange(h * w, device=mask.device).view(1, 1, h, w)
    return (last_kept * (h * w) + positions).reshape(b, -1)


__all__ = [
    "METRICS",
    "LipDetection",
    "PruneReport",
    "causal_gaussian3d",
    "clean_mask",
    "dilate",
    "drift_bound",
    "fit_tau",
    "keep_mask",
    "median_filter3d",
    "pair_distance",
    "patchify",
    "prune_report",
    "reference_index",
    "token_distance",
]
