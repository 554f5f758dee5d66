"""Sequences as padded grids: what turns ragged samples into the (B, T) tensors the losses take.

Torch only; nothing here knows about models or the store.
"""

from __future__ import annotations

import numpy as np
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
    p_len = np.array([len(p) for p in prompts])  # (B,)
    r_len = np.array([len(r) for r in responses])  # (B,)
    width = int((p_len + r_len).max())
    ids = np.full((len(prompts), width), pad, dtype=np.int64)  # (B, L): filled in numpy, cheaper per row
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : p_len[i]] = p
        ids[i, p_len[i] : p_len[i] + r_len[i]] = r
    t = np.arange(width - 1)  # the logits at position t predict token t+1
    mask = (t >= p_len[:, None] - 1) & (t < (p_len + r_len - 1)[:, None])  # (B, L-1)
    if loss_masks is not None:
        for i, m in enumerate(loss_masks):
            if len(m) != r_len[i]:
                raise ValueError(
                    f"pack: row {i} has {r_len[i]} response tokens but a loss mask of {len(m)}; "
                    "a loss mask has one entry per response token"
                )
            mask[i, p_len[i] - 1 : p_len[i] - 1 + r_len[i]] = np.asarray(m, dtype=bool)
    grid = torch.from_numpy(ids)
    return grid, grid[:, 1:], torch.from_numpy(mask)


def on_grid(values: list[list[float]], mask: torch.Tensor) -> torch.Tensor:
    """Per-action values of each sample (B lists), placed at the mask's positions (B, T)."""
    grid = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    grid[mask] = torch.tensor([v for row in values for v in row], dtype=torch.float32, device=mask.device)
    return grid
