"""Sequences as padded grids: what turns ragged samples into the (B, T) tensors the losses take.

Torch only; nothing here knows about models or the store.
"""

from __future__ import annotations

import torch

__all__ = ["on_grid", "pack"]


def pack(
    prompts: list[list[int]],
    responses: list[list[int]],
    pad: int = 0,
    loss_masks: list[list[int]] | None = None,
):
    """Right-padded prompt+response ids (B, L), next-token targets (B, L-1) and the mask of
    target positions that are response tokens (B, L-1), in row-major response order. With
    `loss_masks` (one 0/1 per response token: a multi-turn trajectory's model tokens are 1, the
    environment's 0) only the response tokens marked 1 are in the mask."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    ids = torch.full((len(prompts), max(lengths)), pad, dtype=torch.long)  # (B, L)
    mask = torch.zeros(len(prompts), max(lengths) - 1, dtype=torch.bool)  # (B, L-1)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        if loss_masks is None:
            mask[i, len(p) - 1 : len(p) - 1 + len(r)] = True  # the logits at position t predict token t+1
        else:
            if len(loss_masks[i]) != len(r):
                raise ValueError(
                    f"pack: row {i} has {len(r)} response tokens but a loss mask of {len(loss_masks[i])}; "
                    "a loss mask has one entry per response token"
                )
            mask[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(loss_masks[i], dtype=torch.bool)
    return ids, ids[:, 1:], mask


def on_grid(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-action values of each sample (B lists), placed at the mask's positions (B, T)."""
    grid = torch.zeros(mask.shape, dtype=torch.float32)
    grid[mask] = torch.tensor([v for row in values for v in row], dtype=torch.float32)
    return grid
