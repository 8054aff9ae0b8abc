"""A 3D vision transformer whose parameter names match MONAI's ViT (and so M3D-CLIP's vision encoder).

Layout: perceptron patch embedding with a learned position embedding, a CLS token, pre-norm
transformer blocks, and a final LayerNorm. ``forward`` returns every block's output so the
caller can take a block's output *before* the final norm, as the release does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops.layers.torch import Rearrange
from torch import nn

from med2e3.config import ViT3DConfig


class PatchEmbedding3D(nn.Module):
    """Cut (B, C, D, H, W) into non-overlapping patches, project each, add learned positions."""

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        pd, ph, pw = config.patch_size
        n_patches = math.prod(config.grid_size)
        patch_dim = config.in_channels * pd * ph * pw
        # depth-major patch order; features ordered (pd, ph, pw, c) as MONAI's "perceptron" embedding
        self.patch_embeddings = nn.Sequential(
            Rearrange("b c (d pd) (h ph) (w pw) -> b (d h w) (pd ph pw c)", pd=pd, ph=ph, pw=pw),
            nn.Linear(patch_dim, config.hidden_size),
        )
        self.position_embeddings = nn.Parameter(torch.zeros(1, n_patches, config.hidden_size))
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.patch_embeddings(volume) + self.position_embeddings)  # B x N x C


class SelfAttention(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = config.dropout_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.dropout_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(x)))))


class Block(nn.Module):
    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT3D(nn.Module):
    """M3D-CLIP-compatible 3D ViT. Input (B, C, D, H, W); output tokens are [CLS, patches...]."""

    def __init__(self, config: ViT3DConfig):
        super().__init__()
        self.config = config
        self.patch_embedding = PatchEmbedding3D(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self, volume: torch.Tensor, num_blocks: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Return (final-normed last hidden state, outputs of each block run).

        With ``num_blocks`` only the first blocks run and the final norm is applied to the last of them.
        """
        x = self.patch_embedding(volume)  # B x N x C
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # B x (1 + N) x C
        outputs = []
        for block in self.blocks[: num_blocks or len(self.blocks)]:
            x = block(x)
            outputs.append(x)
        return self.norm(x), outputs

    def block_output(self, volume: torch.Tensor, layer: int) -> torch.Tensor:
        """Output of block ``layer`` (negative counts from the end), before the final norm: B x (1 + N) x C."""
        index = layer % len(self.blocks)
        return self(volume, num_blocks=index + 1)[1][index]  # through __call__, so hooks apply
