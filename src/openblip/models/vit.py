"""ViT image encoder with the module names of the original BLIP checkpoints.

Pre-norm blocks, one fused ``qkv`` projection with bias, a learned class token and
absolute position embeddings; the final LayerNorm is applied to every token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import VisionConfig
from . import half
from .linear import Linear
from .skip_init import Conv2d, init_skipped


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B,3,S,S) -> (B,D,S/p,S/p) -> (B,S²/p²,D)
        return half.conv2d(x, self.proj).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = Linear(width, 3 * width)
        self.proj = Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # (B,N,3D) -> 3 x (B,H,N,d)
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = half.attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: VisionConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """Returns the full token sequence ``(B, 1 + S²/p², D)``; token 0 is the image feature."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.width))
        # Linear stochastic-depth ramp over depth, as timm and BLIP.
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if init_skipped():
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values)
        if x.shape[1] + 1 != self.pos_embed.shape[1]:
            raise ValueError(
                f"image of {tuple(pixel_values.shape[-2:])} pixels gives {x.shape[1]} patches but the model "
                f"has position embeddings for {self.pos_embed.shape[1] - 1} ({self.cfg.image_size}px); "
                f"resize images to {self.cfg.image_size} or load the model with image_size=..."
            )
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B,1+N,D)
        for blk in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


def resize_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize ``(1, 1+N, D)`` position embeddings to ``1+num_patches`` tokens.

    The class slot is kept; the square grid is resized bicubically with
    ``align_corners=False``, as BLIP does when loading a checkpoint at another
    image size.
    """
    old = pos_embed.shape[1] - 1
    if old == num_patches:
        return pos_embed
    old_side, new_side = math.isqrt(old), math.isqrt(num_patches)
    if old_side**2 != old or new_side**2 != num_patches:
        raise ValueError(f"cannot resize a non-square position grid ({old} -> {num_patches} patches)")
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    d = grid.shape[-1]
    grid = grid.reshape(1, old_side, old_side, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, d).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)
