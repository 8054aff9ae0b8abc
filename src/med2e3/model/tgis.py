"""Connectors and the Text-Guided Inter-Slice (TG-IS) scoring module.

Notation (the TG-IS module of Shi et al., arXiv 2411.12783, as the authors' release computes it): V3 = 3D connector output (B x N3 x Dl, depth-major:
G depth groups x P in-plane tokens), V2 = 2D connector output (B x S x N2 x Dl), t = projected
question feature (B x Dl).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class MLPConnector(nn.Module):
    """Linear(in, Dl) - activation - Linear(Dl, Dl)."""

    def __init__(self, in_features: int, out_features: int, act: str = "gelu"):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.act = ACT2FN[act]
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class Connector3D(nn.Module):
    """Patch tokens on a (d, h, w) grid -> 3D average pool -> MLP. Output stays depth-major."""

    def __init__(self, in_features: int, out_features: int, grid: tuple[int, int, int], pool: int, act: str):
        super().__init__()
        self.grid = grid
        self.pool = pool
        self.mlp = MLPConnector(in_features, out_features, act)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, c = tokens.shape  # B x (d*h*w) x C
        grid = tokens.transpose(1, 2).reshape(b, c, *self.grid)  # B x C x d x h x w
        pooled = F.avg_pool3d(grid, kernel_size=self.pool, stride=self.pool)  # B x C x d' x h' x w'
        return self.mlp(pooled.flatten(2).transpose(1, 2))  # B x N3 x Dl


class TGIS(nn.Module):
    """Scores each slice from its content and the question; softmax over slices.

    s_j = softmax_j(<z_j, t> / tau), with z_j the mean over the slice's 2D tokens and the 3D tokens of
    its depth group, and t = Linear(question feature). Dropout on s in training.
    """

    def __init__(
        self, question_features: int, hidden: int, depth_groups: int, temperature: float, score_dropout: float
    ):
        super().__init__()
        self.text_proj = nn.Linear(question_features, hidden)
        self.depth_groups = depth_groups
        self.temperature = temperature
        self.score_dropout = nn.Dropout(score_dropout)

    def slice_features(self, v3: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """z: B x S x Dl from V3 (B x N3 x Dl) and V2 (B x S x N2 x Dl)."""
        groups = v3.unflatten(1, (self.depth_groups, -1))  # B x G x P x Dl
        per_slice = groups.repeat_interleave(v2.shape[1] // self.depth_groups, dim=1)  # B x S x P x Dl
        return torch.cat([per_slice, v2], dim=2).mean(dim=2)  # B x S x Dl

    def forward(self, v3: torch.Tensor, v2: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """Slice scores B x S (rows sum to 1 in eval mode)."""
        z = self.slice_features(v3, v2)  # B x S x Dl
        t = self.text_proj(question)  # B x Dl
        logits = torch.einsum("bsd,bd->bs", z, t) / self.temperature  # B x S
        return self.score_dropout(logits.softmax(dim=-1).to(v2.dtype))


def aggregate_slices(scores: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
    """Sum over slices of score_j * slice_tokens_j: (B x S, B x S x N2 x Dl) -> B x N2 x Dl."""
    return torch.einsum("bs,bsnd->bnd", scores.to(v2.dtype), v2)
