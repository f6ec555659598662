"""What stands in for the tokens LIP prunes: duplicated keys and values in attention
(Attention Recovery), and copied outputs at the model output (restoration).

Attention Recovery: kept queries should see about as many keys as the unpruned model gives
them, else every softmax shifts (a static region seen in 7 frames would count once).

A pruned token is assumed to equal its reference (the last computed occurrence at its
position). Its key and value are the reference's pre-RoPE key and value, rotated with RoPE at
the pruned token's own (t, h, w) position: duplicates of one reference then differ by their
positions, as the unpruned tokens would. `duplicates` limits how many of a reference's copies
take part (the nearest in time): 0 is plain pruning, None all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .tokens import TokenGrid, patches, unpatch

Rotate = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RecoveryKeys:
    """The key positions of recovered attention.

    positions: (keys,) sorted token positions that get a key and value;
    slots: (keys,) slot, in the kept sequence, of each position's source token;
    duplicate: (keys,) True where the position is a pruned token (a duplicate)."""

    positions: torch.Tensor
    slots: torch.Tensor
    duplicate: torch.Tensor


def recovery_keys(computed: torch.Tensor, reference: torch.Tensor, grid: TokenGrid,
                  duplicates: int | None) -> RecoveryKeys:
    """computed: (tokens,) bool, the tokens the attention runs on (LIP's kept tokens, or a
    subset of them that TAPE keeps); reference: (tokens,) index of each token's reference
    (LIP's kept tokens are their own). A token LIP pruned takes part if its reference is
    computed and it is at most `duplicates` frames after it (None: any distance)."""
    tokens = torch.arange(grid.size, device=computed.device)
    lip_pruned = reference != tokens
    included = computed | (lip_pruned & computed[reference])
    if duplicates is not None:
        frame = tokens // grid.per_frame
        included &= computed | (frame - frame[reference] <= duplicates)
    positions = included.nonzero().squeeze(1)
    slot_of_token = computed.long().cumsum(0) - 1  # each computed token's slot in the computed sequence
    return RecoveryKeys(positions, slot_of_token[reference[positions]], lip_pruned[positions])


def recovered_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: RecoveryKeys,
    rotate_query: Rotate,
    rotate_key: Rotate,
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    duplicate_key: torch.Tensor | None = None,
    duplicate_value: torch.Tensor | None = None,
) -> torch.Tensor:
    """Self-attention of the kept tokens over kept and duplicated keys.

    query, key, value: (batch, kept, heads, dim), keys before RoPE. rotate_query / rotate_key
    apply RoPE at the kept / key positions; attend(q, k, v) is the attention kernel on
    (batch, tokens, heads, dim). duplicate_key / duplicate_value, if given, are the kept tokens'
    keys and values from another pass (e.g. a clean one) to duplicate instead of the current."""
    all_keys, all_values = key[:, keys.slots], value[:, keys.slots]
    if duplicate_key is not None:
        pick = keys.duplicate.view(1, -1, 1, 1)
        all_keys = torch.where(pick, duplicate_key[:, keys.slots], all_keys)
        all_values = torch.where(pick, duplicate_value[:, keys.slots], all_values)
    return attend(rotate_query(query), rotate_key(all_keys), all_values)


def restore_from_references(
    prediction: torch.Tensor,
    noisy: torch.Tensor,
    reference: torch.Tensor,
    patch_size: tuple[int, int, int],
    x0_coefficients: tuple[float, float] | None,
    mode: str,
) -> torch.Tensor:
    """Model output with every pruned token's prediction made from its reference token.

    prediction, noisy: (B, C, F, H, W) model output and its noisy input x_t; reference:
    (tokens,) reference of every token. x0_coefficients (a, b): the clean-sample estimate is
    x0 = a x_t - b prediction (flow-matching velocity: (1, sigma); the adapter says).
    mode "prediction" copies the reference's prediction (x0_coefficients unused). Mode "x0"
    copies the reference's clean estimate and returns the prediction that leads from the
    token's *own* x_t to it, so the token keeps its own noise sample instead of inheriting the
    reference's."""
    channels = prediction.shape[1]
    shape = patches(prediction, patch_size).shape
    output = patches(prediction, patch_size).flatten(1, 3)
    if mode == "prediction" or x0_coefficients[1] == 0:  # b = 0: the output does not move x_t
        copied = output[:, reference]
    else:
        a, b = x0_coefficients
        x_t = patches(noisy.to(prediction.dtype), patch_size).flatten(1, 3)
        clean = a * x_t - b * output
        copied = (a * x_t - clean[:, reference]) / b
    pruned = (reference != torch.arange(reference.shape[0], device=reference.device)).view(1, -1, 1)
    restored = torch.where(pruned, copied, output)  # kept tokens stay bit for bit as computed
    return unpatch(restored.view(shape), patch_size, channels)
