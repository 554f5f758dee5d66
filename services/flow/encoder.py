"""A plug-in context encoder on a frozen flow backbone: inpainting by a small trainable module.

Bian et al. 2025, "VideoPainter: Any-length Video Inpainting and Editing with Plug-and-Play
Context Control" (arXiv 2503.05639): a pre-trained generator stays frozen; a lightweight
context encoder (about 6 % of the backbone's parameters there) reads the noisy latent, the
masked input and the mask, and its features are added to the backbone's hidden activations
through zero-initialised projections, so training starts exactly at the backbone and only
the encoder learns (and, for RL, only the encoder's tensors need to move).

Here the backbone is an unconditional `VelocityMLP` (pre-trained by services.flow.losses).
`ContextEncoder` is a small MLP over (x_t, condition, time embedding) whose output goes
through one zero-initialised linear layer per injected hidden layer; `EncoderFlow` runs the
backbone with those features added before each of its first `inject_layers` activations:

    h_0 = [x_t, emb(t)];   h_l = SiLU(W_l h_{l-1} + b_l + P_l e(x_t, c, t))   (l <= inject_layers)
    v   = W_out h_L + b_out

With P_l = 0 the output is the backbone's, bit for bit. EncoderFlow has VelocityMLP's
interface (dim, condition_dim, mean_flow, forward(x, t, cond)), evaluated in the same BLOCKs,
so FlowEngine serves it and the Flow-GRPO step scores it like any other flow policy. Its
parameters are named `backbone.*` and `encoder.*`: `trainer.trainable: {patterns:
["encoder.*"]}` trains and publishes the encoder alone.

Inpainting convention (`inpainting_loss`): the condition is the masked image and the mask,
concatenated, (B, 2D): c = [m * x, m] with m = 1 on known pixels, 0 on hidden ones. The
supervised loss is conditional flow matching weighted per pixel: 1 on the hidden region,
`known_weight` on the known one (0: the hidden region alone).

Knows nothing about engines, rewards, tasks or the data store.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from services.flow.model import BLOCK, VelocityMLP

__all__ = ["ContextEncoder", "EncoderFlow", "inpainting_loss", "training_only"]


class ContextEncoder(nn.Module):
    """e(x_t, c, t): an MLP whose features reach the backbone through zero-initialised projections."""

    def __init__(
        self, dim: int, condition_dim: int, widths: list[int], *, hidden_size: int = 32, num_layers: int = 2,
        time_features: int = 16,
    ):  # fmt: skip
        super().__init__()
        if dim < 1 or condition_dim < 1 or not widths or hidden_size < 1 or num_layers < 1:
            raise ValueError(
                f"ContextEncoder: need dim >= 1, condition_dim >= 1, at least one injected layer and sizes "
                f">= 1; got dim={dim}, condition_dim={condition_dim}, widths={widths}, "
                f"hidden_size={hidden_size}, num_layers={num_layers}"
            )
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), time_features)))
        layers: list[nn.Module] = []
        width = dim + condition_dim + 2 * time_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_size), nn.SiLU()]
            width = hidden_size
        self.net = nn.Sequential(*layers)
        projections = [nn.Linear(hidden_size, w) for w in widths]
        for projection in projections:  # zero: the backbone's own output until the encoder learns
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)
        self.inject = nn.ModuleList(projections)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> list[Tensor]:
        """One feature tensor per injected layer: (B, D), (B,), (B, C) -> [(B, width_l)]."""
        angles = t[:, None] * self.get_buffer("freqs")  # (B, F)
        h = self.net(torch.cat([x, cond, angles.sin(), angles.cos()], dim=-1))  # (B, H)
        return [projection(h) for projection in self.inject]


class EncoderFlow(nn.Module):
    """A frozen unconditional VelocityMLP steered by a ContextEncoder (see the module docstring)."""

    mean_flow = False

    def __init__(
        self, backbone: VelocityMLP, condition_dim: int, *, hidden_size: int = 32, num_layers: int = 2,
        inject_layers: int = 2,
    ):  # fmt: skip
        super().__init__()
        linears = [m for m in backbone.net if isinstance(m, nn.Linear)]
        hidden = linears[:-1]
        if backbone.condition_dim or backbone.mean_flow:
            raise ValueError(
                "EncoderFlow: the backbone must be an unconditional velocity model (condition_dim 0, "
                f"mean_flow False); got condition_dim={backbone.condition_dim}, "
                f"mean_flow={backbone.mean_flow}"
            )
        if not 1 <= inject_layers <= len(hidden):
            raise ValueError(
                f"EncoderFlow: inject_layers={inject_layers}, expected 1 to the backbone's {len(hidden)} "
                "hidden layers"
            )
        self.backbone = backbone
        self.encoder = ContextEncoder(
            backbone.dim, condition_dim, [m.out_features for m in hidden[:inject_layers]],
            hidden_size=hidden_size, num_layers=num_layers,
        )  # fmt: skip
        self.dim, self.condition_dim = backbone.dim, condition_dim

    def _block(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        backbone = self.backbone
        h = torch.cat([x, x.new_zeros(x.shape[0], 0), backbone._embed(t)], dim=-1)  # the backbone's input
        features = self.encoder(x, t, cond)
        modules = list(backbone.net)  # Linear, SiLU, ..., Linear
        for layer in range(len(modules) // 2):
            h = modules[2 * layer](h)
            if layer < len(features):
                h = h + features[layer]
            h = modules[2 * layer + 1](h)
        return modules[-1](h)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """Velocity at (x, t) given the context: (B, D), (B,), (B, C) -> (B, D)."""
        batch = x.shape[0]
        if x.dim() != 2 or x.shape[1] != self.dim or t.shape != (batch,):
            raise ValueError(
                f"EncoderFlow: x must be (B, {self.dim}) and t (B,), got {tuple(x.shape)} and "
                f"{tuple(t.shape)}"
            )
        if cond is None or cond.shape != (batch, self.condition_dim):
            raise ValueError(
                f"EncoderFlow: cond must be the context (B, {self.condition_dim}), got "
                f"{None if cond is None else tuple(cond.shape)}; pass the task's condition for every row"
            )
        pad = -batch % BLOCK
        inputs = [x, t, cond]
        if pad:
            inputs = [torch.cat([a, a.new_zeros((pad, *a.shape[1:]))]) for a in inputs]
        blocks = [self._block(*(a[i : i + BLOCK] for a in inputs)) for i in range(0, batch + pad, BLOCK)]
        return torch.cat(blocks)[:batch]


def inpainting_loss(
    model: nn.Module, x_data: Tensor, x_source: Tensor, cond: Tensor | None,
    generator: torch.Generator | None = None, *, known_weight: float = 0.1,
) -> Tensor:  # fmt: skip
    """Conditional flow matching with the hidden pixels weighted 1 and the known ones
    `known_weight` (summed over pixels, mean over rows); cond = [m * x, m], (B, 2D)."""
    dim = x_data.shape[1]
    if cond is None or cond.shape != (x_data.shape[0], 2 * dim):
        raise ValueError(
            f"inpainting_loss: cond must be [masked image, mask], (B, {2 * dim}), got "
            f"{None if cond is None else tuple(cond.shape)}"
        )
    if not known_weight >= 0:
        raise ValueError(f"inpainting_loss: known_weight={known_weight}, expected >= 0")
    known = cond[:, dim:]  # (B, D): 1 on known pixels
    weights = (1 - known) + known_weight * known
    t = torch.rand(x_data.shape[0], generator=generator)  # (B,)
    xt = (1 - t[:, None]) * x_data + t[:, None] * x_source
    err = (model(xt, t, cond) - (x_source - x_data)).square()  # (B, D)
    return (weights * err).sum(-1).mean()


@contextmanager
def training_only(model: nn.Module, part: nn.Module) -> Iterator[None]:
    """Within the block, exactly `part`'s parameters require gradients; the flags come back after."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    mine = {id(p) for p in part.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in mine)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
