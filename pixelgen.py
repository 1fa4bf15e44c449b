r"""
PixelGen (arXiv 2602.02493) in one file: pixel-space diffusion with perceptual supervision.

A patch-16 JiT transformer predicts the clean image from a noisy one (x-prediction). It is trained with the
flow-matching velocity loss plus noise-gated perceptual losses (LPIPS for local texture, P-DINO on frozen DINOv2
features for global semantics) and REPA feature alignment, and sampled with a Heun ODE solver and classifier-free
guidance. The paper reaches FID 5.11 on ImageNet-256 without guidance after 80 epochs.

    python pixelgen.py --train                                   # CPU/GPU demo on the built-in toy dataset
    torchrun --nproc_per_node=8 pixelgen.py --train --data_path /data/imagenet/train             # XL/16, 80 ep
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 pixelgen.py --train --recipe xl-160ep ...
    torchrun --nproc_per_node=8 pixelgen.py --sample --ckpt PixelGen_XL_80ep.ckpt --unsafe_load --num_samples 50000 \
        --fid_ref VIRTUAL_imagenet256_labeled.npz                          # FID-50K and friends, written to eval.json
    python pixelgen.py --bench --recipe xl-80ep --batch_size 32 --compile   # speed, memory and MFU on one GPU

Notation (paper Sec. 3; t = 0 is pure noise, t = 1 is the clean image):
    x      clean image in [-1, 1], (B, 3, H, W)        eps    Gaussian noise, like x
    t      time in [0, 1]                              y      class label; y = num_classes is the null class
    x_t    = t x + (1 - t) eps                 Eq. (2) x_hat  = net(x_t, t, y), the predicted clean image  Eq. (1)
    v      = (x - x_t) / (1 - t)               Eq. (3) v_hat  = (x_hat - x_t) / (1 - t)                    Eq. (4)

The method comes first and needs nothing below it: the JiT denoiser `JiT` (Eq. 1), the flow `sample_t`,
`interpolate` (Eq. 2) and `x_to_v` (Eqs. 3-4), the objective `PixelGenLoss` (Eqs. 5-9), a training step's draws and
EMA (`draw`, `update_ema`) and the ODE samplers `sample`. Below the banner is the engineering. Every deliberate
difference from the released code (github Zehong-Ma/PixelGen) is marked `NOTE(official)`.
"""
import argparse
import ast
import contextlib
import copy
import dataclasses
import datetime
import fcntl
import hashlib
import importlib
import inspect
import itertools
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import warnings
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import dino as dinov2
import fid

# ----------------------------------------------------------------------------------------------------------------
# Model: JiT, "Just image Transformer" (arXiv 2511.13720), as in official src/models/transformer/JiT.py. A plain ViT
# on 16x16 pixel patches that outputs the clean image; constructor keywords are the official ones, so an official
# YAML's denoiser.init_args can be passed as-is.

MODELS = {  # preset -> constructor keywords (input_size and num_classes come from the config)
    "JiT-B/16": dict(depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_start=4),
    "JiT-L/16": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_start=8),
    "JiT-H/16": dict(depth=32, hidden_size=1280, num_heads=16, bottleneck_dim=256, in_context_start=10),
    "PixelGen-L/16": dict(depth=24, hidden_size=1024, num_heads=16, bottleneck_dim=128, in_context_start=8),  # 459M
    "PixelGen-XL/16": dict(depth=28, hidden_size=1152, num_heads=16, use_bottleneck=False, in_context_start=8,
                           proj_drop=0.1),  # 676M
    # small presets for CPU work (ours)
    "PixelGen-S/16": dict(depth=12, hidden_size=384, num_heads=6, bottleneck_dim=128, in_context_start=4),
    "PixelGen-T/16": dict(depth=6, hidden_size=192, num_heads=3, bottleneck_dim=64, in_context_len=8,
                          in_context_start=2),
}
# The block whose input tokens REPA aligns with DINOv2 (official align_layer 8 for L and XL; REPA: 4 for B-size).
REPA_LAYER = {"JiT-B/16": 4, "JiT-L/16": 8, "JiT-H/16": 10, "PixelGen-L/16": 8, "PixelGen-XL/16": 8,
              "PixelGen-S/16": 4, "PixelGen-T/16": 2}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):  # normalised in fp32, returned in the input dtype (as official)
        xf = x.float()
        return (self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps))).to(x.dtype)


def rope_2d(grid, head_dim, n_prefix, theta=10000.0):
    """2-D RoPE angles as (cos, sin), (n_prefix + grid^2, head_dim / 2), one angle per pair (x_2j, x_2j+1) of a head:
    the first half of the pairs turns by the row index, the second half by the column index, at frequencies
    theta^(-4k/head_dim). Prefix (in-context) tokens get angle 0, the identity."""
    d = head_dim // 2                                                      # pairs per head
    freqs = 1.0 / theta ** (torch.arange(0, d, 2)[: d // 2].float() / d)  # (d/2,)
    f = torch.outer(torch.arange(grid).float(), freqs)                     # (grid, d/2)
    ang = torch.cat([f[:, None].expand(grid, grid, d // 2), f[None].expand(grid, grid, d // 2)], -1).flatten(0, 1)
    return torch.cat([torch.ones(n_prefix, d), ang.cos()]), torch.cat([torch.zeros(n_prefix, d), ang.sin()])


def apply_rope(x, cos, sin):  # x (B, heads, N, head_dim); cos, sin (N, head_dim/2): pair (x0, x1) turns by its angle
    # Real arithmetic, as the official t * cos + rotate_half(t) * sin (the compiler generates no code for complex).
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)              # (B, heads, N, head_dim/2) each
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1).flatten(-2)  # (B, heads, N, head_dim)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.q_norm, self.k_norm = RMSNorm(dim // num_heads), RMSNorm(dim // num_heads)  # qk-norm per head
        self.qkv, self.proj, self.proj_drop = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Dropout(proj_drop)

    def forward(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, D)))  # (B, N, D)


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        hidden = int(hidden * 2 / 3)  # keeps the FLOPs of a 4x GELU MLP
        self.w12, self.w3, self.ffn_dropout = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim), nn.Dropout(drop)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, -1)
        return self.w3(self.ffn_dropout(F.silu(x1) * x2))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):  # pre-norm transformer block with adaLN-Zero conditioning
    def __init__(self, dim, num_heads, mlp_ratio, attn_drop, proj_drop):
        super().__init__()
        self.norm1, self.attn = RMSNorm(dim), Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2, self.mlp = RMSNorm(dim), SwiGLU(dim, int(dim * mlp_ratio), proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):  # x (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, -1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm_final, self.linear = RMSNorm(dim), nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*3)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim, self.mlp = freq_dim, nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):  # t (B,) in [0, 1], used raw (not x1000), [cos, sin] order
        freqs = torch.exp(-math.log(10000) * torch.arange(self.freq_dim // 2, device=t.device) / (self.freq_dim // 2))
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))  # (B, D)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: the null class for CFG

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):  # conv k=s=p, or a linear bottleneck (p*p*3 -> bottleneck_dim -> D) as in JiT
    def __init__(self, patch, in_ch, dim, bottleneck_dim=None):
        super().__init__()
        if bottleneck_dim:
            self.proj1 = nn.Conv2d(in_ch, bottleneck_dim, patch, patch, bias=False)
            self.proj2 = nn.Conv2d(bottleneck_dim, dim, 1)
        else:
            self.proj1 = nn.Conv2d(in_ch, dim, patch, patch)

    def forward(self, x):  # (B, 3, H, W) -> (B, N, D)
        x = self.proj1(x)
        return (self.proj2(x) if hasattr(self, "proj2") else x).flatten(2).transpose(1, 2)


def sincos_pos_embed(dim, grid):  # fixed 2-D sin-cos table (grid^2, dim): [column half, row half], each [sin, cos]
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    emb = [np.concatenate([np.sin(np.outer(p.reshape(-1), omega)), np.cos(np.outer(p.reshape(-1), omega))], 1)
           for p in (cols, rows)]
    return torch.from_numpy(np.concatenate(emb, 1)).float()


class JiT(nn.Module):
    grad_ckpt = False  # set True (--grad_ckpt) to recompute each block in backward: less memory, ~1/3 more compute

    def __init__(self, input_size=256, patch_size=16, in_channels=3, hidden_size=1024, depth=24, num_heads=16,
                 mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, num_classes=1000, bottleneck_dim=128,
                 use_bottleneck=True, in_context_len=32, in_context_start=8):
        super().__init__()
        assert input_size % patch_size == 0 and hidden_size % num_heads == 0 and hidden_size % 4 == 0
        assert in_context_len == 0 or in_context_start < depth, "in-context tokens must enter before the last block"
        self.patch_size, self.num_classes, self.in_channels = patch_size, num_classes, in_channels
        self.in_context_len, self.in_context_start = in_context_len, in_context_start
        self.grid = input_size // patch_size
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden_size, self.grid)[None], requires_grad=False)
        if in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.randn(1, in_context_len, hidden_size) * 0.02)
        self.t_embedder, self.y_embedder = TimestepEmbedder(hidden_size), LabelEmbedder(num_classes, hidden_size)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bottleneck_dim if use_bottleneck else None)
        # Dropout only in the middle half of the blocks, as official `depth // 4 * 3 > i >= depth // 4`
        mid = lambda i, p: p if depth // 4 <= i < depth // 4 * 3 else 0.0
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio, mid(i, attn_drop), mid(i, proj_drop))
                                    for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * in_channels)
        for name, (cos, sin) in (("rope", rope_2d(self.grid, hidden_size // num_heads, 0)),
                                 ("rope_ic", rope_2d(self.grid, hidden_size // num_heads, in_context_len))):
            self.register_buffer(name + "_cos", cos, persistent=False)  # not in the official state dict
            self.register_buffer(name + "_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self):  # as official: xavier linears, N(0, 0.02) embeddings, adaLN-Zero, zero output
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (m for m in self.x_embedder.children() if isinstance(m, nn.Conv2d)):  # proj1 (, proj2)
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias) if conv.bias is not None else None
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                  self.final_layer.linear]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)  # so x_hat = 0 at init

    def forward(self, x_t, t, y, return_layer=None):
        """x_t (B, 3, H, W), t (B,), y (B,) -> x_hat (B, 3, H, W); with return_layer=k also the REPA feature h
        (B, N, D): the image tokens entering block k."""
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb                                 # (B, D)
        x = self.x_embedder(x_t) + self.pos_embed                      # (B, N, D)
        h = None
        # Activation checkpointing: keep only each block's inputs, rerun the block in backward (dropout masks are
        # replayed: checkpoint restores the RNG state). Only when a backward will come: eval/no_grad run plainly.
        ckpt = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if i == return_layer:
                h = x[:, self.in_context_len:] if i > self.in_context_start else x
            if self.in_context_len > 0 and i == self.in_context_start:  # prepend the class tokens
                x = torch.cat([y_emb[:, None] + self.in_context_posemb, x], 1)  # (B, L + N, D)
            in_context = self.in_context_len > 0 and i >= self.in_context_start  # their angle is 0: no rotation
            rope = (self.rope_ic_cos, self.rope_ic_sin) if in_context else (self.rope_cos, self.rope_sin)
            x = torch.utils.checkpoint.checkpoint(block, x, c, rope, use_reentrant=False) if ckpt else block(x, c, rope)
        x = self.final_layer(x[:, self.in_context_len:], c)             # (B, N, p*p*3)
        p, grid = self.patch_size, self.grid                               # N = grid * grid patches of p x p pixels
        x = x.view(-1, grid, grid, p, p, self.in_channels)                 # (B, rows, cols, p, p, 3)
        x_hat = x.permute(0, 5, 1, 3, 2, 4).reshape(-1, self.in_channels, grid * p, grid * p)  # (B, 3, H, W)
        return x_hat if return_layer is None else (x_hat, h)


# ----------------------------------------------------------------------------------------------------------------
# Flow (paper Eqs. 1-5): the straight path from noise (t = 0) to the image (t = 1); one x_to_v serves the loss and
# the samplers.

def sample_t(n, P_mean=-0.8, P_std=0.8, generator=None):  # logit-normal training time
    # NOTE(official): drawn on the host (official: on the GPU), so the gate g(t) is known without a device sync
    return torch.sigmoid(torch.randn(n, generator=generator) * P_std + P_mean)


def interpolate(x, eps, t):  # Eq. (2): x_t = t x + (1 - t) eps
    t = t.view(-1, 1, 1, 1)
    return t * x + (1 - t) * eps


def x_to_v(x_hat, x_t, t, t_eps=0.05):  # Eqs. (3)-(4): the velocity that carries x_t to x_hat by t = 1; 1 - t clamped
    return (x_hat - x_t) / (1 - t.view(-1, 1, 1, 1)).clamp_min(t_eps)


# ----------------------------------------------------------------------------------------------------------------
# Objective (paper Eqs. 5-9):  L = L_FM + g(t) (0.1 L_LPIPS + 0.01 L_PDINO) + 0.5 L_REPA,  g(t) = 1[t >= 0.3].

def gate(t, gate_t=0.3):  # the noise gate of Eq. (6), g(t) = 1[t >= gate_t], as the indices of the samples it keeps
    return (t >= gate_t).nonzero()[:, 0]


class Draws(NamedTuple):
    """A batch's per-sample randomness, on the device (made by make_draws): time t (b,), noise eps (b, 3, H, W), label
    dropout drop (b,), and `gated`, the indices of the samples with g(t) = 1 (gate). The loss terms are means over a
    global batch of B samples, G of them gated, of which this batch's b samples are a part (B = b for a batch alone)."""
    t: torch.Tensor
    eps: torch.Tensor
    drop: torch.Tensor
    gated: torch.Tensor
    B: int
    G: int


class PixelGenLoss(nn.Module):
    """The PixelGen objective of a denoiser. Owns the trainable REPA projector and the adaptive weight w_ad; uses (does
    not own) the frozen DINOv2 and LPIPS networks. A term whose weight is 0 runs no network (DINOv2 not at all when
    P-DINO and REPA are both off; then `dino` may be None)."""
    adapt_every = 50  # steps between updates of the adaptive weight (official)

    def __init__(self, hidden_size, dino, lpips, *, patch_size=16, lpips_weight=0.1, pdino_weight=0.01,
                 repa_weight=0.5, repa_layer=8, gate_t=0.3, t_eps=0.05, num_classes=1000, gate_pdino=True,
                 adaptive_from=-1):
        super().__init__()
        self.lpips_weight, self.pdino_weight, self.repa_weight = lpips_weight, pdino_weight, repa_weight
        self.repa_layer, self.gate_t, self.t_eps, self.patch_size = repa_layer, gate_t, t_eps, patch_size
        self.num_classes, self.gate_pdino, self.adaptive_from = num_classes, gate_pdino, adaptive_from
        width = dino.embed_dim if repa_weight else 0  # REPA predicts DINOv2 features (its embedding width)
        self.proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size),
                                  nn.SiLU(), nn.Linear(hidden_size, width)) if repa_weight else None
        self.register_buffer("percept_weight", torch.ones(()))  # w_ad, the adaptive weight (1 unless adapted)
        # The frozen nets stay outside the module tree: not in state_dict(), not trained, not seen by DDP.
        frozen = lambda net, used: net.eval().requires_grad_(False) if used else None
        self.__dict__.update(dino=frozen(dino, pdino_weight or repa_weight), lpips=frozen(lpips, lpips_weight))

    def forward(self, model, x, y, d, adapt=False):
        """The loss of a batch x (B, 3, H, W) with labels y (B,) and Draws d, and its terms (detached, for logs).
        With d.B and d.G of a global batch each term is this micro-batch's share of the global mean, so the losses of
        the micro-batches add up to the loss of the global batch, however it is split. adapt: update w_ad first."""
        x_t = interpolate(x, d.eps, d.t)                                          # Eq. (2)
        y = torch.where(d.drop, self.num_classes, y)                              # CFG: some labels become null
        repa = self.proj is not None
        out = model(x_t, d.t, y, return_layer=self.repa_layer if repa else None)  # Eq. (1), and REPA's tokens h
        x_hat, h = out if repa else (out, None)
        L = self.terms(x, x_t, x_hat, h, d)
        if adapt:
            self.adapt(model, L)
        L = {k: v * self.shares(d)[k] for k, v in L.items()}
        loss = L["fm"] + self.percept_weight * (self.lpips_weight * L["lpips"] + self.pdino_weight * L["pdino"]) \
            + self.repa_weight * L["repa"]                                        # Eq. (6)
        return dict(loss=loss, **{k: v.detach() for k, v in L.items()})

    def terms(self, x, x_t, x_hat, h, d):
        """The four losses of Eq. (6), each a mean over this batch: FM (Eq. 5) and REPA (Eq. 9) over all samples,
        LPIPS (Eq. 7) and P-DINO (Eq. 8) over the gated ones: the gate g(t) keeps the perceptual losses away from high
        noise, where no sharp image can be predicted. Zero where a weight is 0 or no sample is gated."""
        fm = (x_to_v(x_hat, x_t, d.t, self.t_eps) - x_to_v(x, x_t, d.t, self.t_eps)).pow(2).mean()    # Eq. (5)
        lp = pd = repa = zero = fm.new_zeros((), dtype=torch.float32)
        cos = lambda a, b: (1 - F.cosine_similarity(a, b, dim=-1)).mean()    # mean over samples and tokens
        z = None
        if self.proj is not None:  # REPA: the tokens entering block repa_layer, projected, against DINOv2's of x
            with torch.no_grad():
                z = self.features(x)                                             # (B, N, DINOv2 width)
            repa = cos(self.proj(h).float(), z)                                  # Eq. (9), not gated
        if len(d.gated):  # NOTE(official): the nets see only the gated samples (official: all, masked): same loss
            x_hat_g, x_g = x_hat[d.gated], x[d.gated]
            if self.lpips is not None:
                lp = self.lpips(self.lpips_scale(x_hat_g), self.lpips_scale(x_g)).float().mean()  # Eq. (7)
            if self.pdino_weight and self.gate_pdino:
                with torch.no_grad():
                    z_g = z[d.gated] if z is not None else self.features(x_g)
                pd = cos(self.features(x_hat_g), z_g)                            # Eq. (8)
        if self.pdino_weight and not self.gate_pdino:
            pd = self.released_pdino(x, x_hat, z, d.G) if d.G else zero + 1
        return dict(fm=fm, lpips=lp, pdino=pd, repa=repa)

    def features(self, u):  # f(u): DINOv2 last-block patch tokens, (b, N, its width) float32, one per JiT token
        # NOTE(official): DINO resizes by the model's patch (official: always 16), so REPA tokens align for any patch.
        return self.dino(u, self.patch_size).float()

    def lpips_scale(self, u):  # LPIPS sees the image at patch-16 scale, as official (unchanged for patch 16)
        size = u.shape[-1] * 16 // self.patch_size
        return u if size == u.shape[-1] else F.interpolate(u, size=(size, size), mode="bilinear", antialias=True)

    def released_pdino(self, x, x_hat, z, G):
        """NOTE(official): the released P-DINO mask broadcasts (B, N) x (B, 1, 1), so it averages 1 - cos over the
        whole batch whenever any sample is gated, and is the constant 1 when none is (G = 0). On request only."""
        with torch.no_grad():
            z = z if z is not None else self.features(x)
        return (1 - F.cosine_similarity(self.features(x_hat), z, dim=-1)).mean()

    def shares(self, d):  # this batch's share of each global-batch mean: b/B over all samples, g/G over gated ones
        # NOTE(official): means over the global batch (official: each GPU's means, averaged), so any split is one update
        s, s_gated = len(d.t) / d.B, (len(d.gated) / d.G if d.G else 0.0)
        return dict(fm=s, repa=s, lpips=s_gated, pdino=s_gated if self.gate_pdino else s)

    def adapt_due(self, step):  # the 160-epoch recipe's adaptive weight: every 50 steps from step `adaptive_from`
        return 0 <= self.adaptive_from <= step and step % self.adapt_every == 0 and \
            (self.lpips is not None or bool(self.pdino_weight))

    def adapt(self, model, L):
        """w_ad <- 0.8 w_ad + 0.2 w, w = |grad_W L_FM| / (|grad_W L_perc| + 1e-4) clamped to [0, 100], at the last
        linear layer W: it keeps the perceptual gradient in proportion to the FM gradient late in training.
        NOTE(official): w_ad is checkpointed (official: a per-GPU float that restarts at 1 on resume), and over several
        processes it is the mean of their estimates, so every process uses the same value."""
        W, percept = model.final_layer.linear.weight, self.lpips_weight * L["lpips"] + self.pdino_weight * L["pdino"]
        g_fm = torch.autograd.grad(L["fm"], W, retain_graph=True)[0].norm()
        g_p = torch.autograd.grad(percept, W, retain_graph=True)[0].norm() if percept.requires_grad else 0.0
        w = (g_fm / (g_p + 1e-4)).clamp(0, 100).detach()  # official: also when nothing is gated (g_p = 0)
        if dist.is_initialized():
            dist.all_reduce(w)
            w /= dist.get_world_size()
        self.percept_weight.mul_(0.8).add_(0.2 * w)


# ----------------------------------------------------------------------------------------------------------------
# One training step (Alg. 1): draw t, eps and the label dropout per sample, take the loss above, one AdamW step, then
# the EMA of the weights, which is what samples. Every draw of a sample is a function of (seed, step, its position
# in the global batch), so any split of the batch over processes and micro-batches draws the same.

def seed_for(*keys):  # a 32-bit seed that mixes non-negative integer keys (CPU generators use 32 bits of a seed)
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def draw(B, seed, step, P_mean=-0.8, P_std=0.8, label_dropout=0.1):
    """(t, drop, gen) of a global batch of B, on the host: logit-normal t and the label dropout to the null class,
    and the generator they came from (for further draws, such as flips). The noise comes from seeded_noise."""
    gen = torch.Generator().manual_seed(seed_for(seed, step))
    return sample_t(B, P_mean, P_std, gen), torch.rand(B, generator=gen) < label_dropout, gen


def seeded_noise(shape, seeds, device):  # eps (len(seeds), *shape) ~ N(0, I), sample i drawn from its own seeds[i]
    gen = torch.Generator(device)
    return torch.stack([torch.randn(shape, generator=gen.manual_seed(s), device=device) for s in seeds])


@torch.no_grad()
def update_ema(emas, model):  # each ema <- d ema + (1 - d) model, one fused op; NOTE(official): lerp, not mul + add
    params = list(model.parameters())
    torch._foreach_lerp_([p for e in emas.values() for p in e.parameters()], params * len(emas),
                         [1 - d for d in emas for _ in params])


# ----------------------------------------------------------------------------------------------------------------
# Samplers (official HeunSamplerJiT(exact_henu=True), EulerSamplerJiT, AdamLMSamplerJiT(order=2)): t = 0 (noise) -> 1.

SAMPLERS = ("heun", "euler", "adams2")


def time_grid(steps, shift=1.0):  # N uniform steps on [0, 1 - 1/N], then 1; shifted towards noise by `shift`
    s = torch.cat([torch.linspace(0.0, 1 - 1.0 / steps, steps), torch.ones(1)])
    return s / (s + (1 - s) * shift)


@torch.no_grad()
def sample(model, noise, y, steps=50, sampler="heun", cfg_scale=1.0, cfg_interval=(0.1, 0.9), time_shift=2.0,
           t_eps=0.05):
    """Integrate dx/dt = v_hat(x, t) from noise (t = 0) to an image (t = 1); returns x in about [-1, 1]."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    ts, (lo, hi) = time_grid(steps, time_shift), cfg_interval  # float32 on the host: the CFG tests need no sync
    dts = ts.diff()                                             # the steps dt
    if sampler == "adams2":  # NOTE(official): AdamLM feeds the net t_cur, a float32 running sum of dt, rather than
        for i in range(steps):  # the grid value, and guides only on the open interval lo < t_cur < hi
            ts[i + 1] = ts[i] + dts[i]
    guided = ((ts > lo) & (ts < hi if sampler == "adams2" else ts <= hi) & (cfg_scale != 1.0)).tolist()
    ts_dev, dts_dev, null = ts.to(noise.device), dts.to(noise.device), torch.full_like(y, model.num_classes)  # once

    def velocity(x, t, guide):  # v_hat; with guidance, v = v_u + w (v_c - v_u) in v-space
        t = t.repeat(len(x))  # contiguous, as in training: a compiled model sees one layout
        if not guide:  # NOTE(official): the official samplers always run both branches, even at scale 1 or outside
            return x_to_v(model(x, t, y), x, t, t_eps)  # the interval
        x2, t2 = torch.cat([x, x]), t.repeat(2)
        v_u, v_c = x_to_v(model(x2, t2, torch.cat([null, y])), x2, t2, t_eps).chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    x, v_prev = noise, None
    for i in range(steps):
        v = slope = velocity(x, ts_dev[i], guided[i])
        if sampler == "heun" and i < steps - 1:  # Heun: average with the slope at the end of the Euler step (same CFG)
            slope = (v + velocity(x + v * dts_dev[i], ts_dev[i + 1], guided[i])) / 2
        elif sampler == "adams2" and i > 0:  # Adams-Bashforth 2: the line through the last two slopes, over the step
            a = dts[i] / dts[i - 1] / 2  # normalised Lagrange weights (-a, 1 + a); on a uniform grid (-1/2, 3/2)
            slope = (1 + a) * v - a * v_prev
        x, v_prev = x + slope * dts_dev[i], v  # Euler otherwise, Heun's last step too: the net never sees t = 1
    return x


# ================================================================================================================
# Engineering: what runs the method above on real machines. Config and recipes, pretrained weights, data, training
# (DDP, global batches, checkpoints, preemption), sampling and evaluation, benchmark, command line.
# ================================================================================================================

# ----------------------------------------------------------------------------------------------------------------
# Config: every field is a CLI flag (--name); a recipe (below) overrides a few defaults; explicit flags win.

@dataclasses.dataclass
class Config:
    # what to run
    recipe: str = "auto"              # xl-80ep | xl-160ep | l-200k | demo; auto: demo without --data_path, else xl-80ep
    model: str = "PixelGen-XL/16"     # a key of MODELS; official configs_c2i/PixelGen_XL.yaml
    image_size: int = 256             # paper: ImageNet 256x256
    num_classes: int = 0              # 0 = the data's (ImageNet-1k: 1000; the demo's toy shapes: 10); more is allowed
    data_path: str = ""               # ImageFolder layout (class subfolders) or a flat folder; "" = demo dataset
    background: tuple = (255, 255, 255)  # R G B under transparent pixels (training and FID): white, as browsers show
    flip: bool = False                # random horizontal flip: off in PixelGen, on in JiT's recipe
    out_dir: str = "runs/pixelgen"    # checkpoints, logs, metrics, grids, samples, eval.json
    device: str = "auto"              # auto (cuda if available) | cpu | cuda
    seed: int = 1234                  # official seed_everything: 1234
    # optimisation (official PixelGen_XL.yaml)
    batch_size: int = 256             # global batch B, split over processes x grad_accum micro-batches; paper 256
    grad_accum: int = 1               # micro-batches per process and step: any split gives the same update
    lr: float = 1e-4                  # AdamW, constant, no warmup
    beta1: float = 0.9                # AdamW beta1: torch default, as official
    beta2: float = 0.999              # AdamW beta2: torch default, as official
    weight_decay: float = 0.0         # official weight_decay: 0.0
    epochs: int = 80                  # paper: 80 epochs ~ 400k steps at batch 256
    max_steps: int = 0                # > 0 overrides epochs
    ema: tuple = (0.9999,)            # EMA decay(s), fp32, every step; official SimpleEMA 0.9999 (JiT also 0.9996)
    num_workers: int = 8              # data loader workers per process
    compile: bool = False             # torch.compile the denoiser and the frozen nets (CUDA; see --bench)
    grad_ckpt: bool = False           # activation checkpointing of the JiT blocks: less memory, one more forward
    # objective (paper Eq. 6-9; official training_repa_JiT_LPIPS_DINO_NoiseGating.py); a weight of 0 skips its net
    P_mean: float = -0.8              # logit-normal t = sigmoid(P_mean + P_std n): official P_mean
    P_std: float = 0.8                # official P_std
    t_eps: float = 0.05               # clamp of 1 - t in x -> v
    label_dropout: float = 0.1        # official null_condition_p
    lpips_weight: float = 0.1         # paper lambda_1
    pdino_weight: float = 0.01        # paper lambda_2
    repa_weight: float = 0.5          # official feat_loss_weight
    repa_layer: int = -1              # REPA feature: tokens entering this block; -1 = the preset's (REPA_LAYER)
    gate_t: float = 0.3               # noise gate g(t) = 1[t >= gate_t]; official percept_t_threshold; 0 = no gate
    gate_pdino: bool = True           # False reproduces the released code, whose P-DINO is effectively ungated
    adaptive_from: int = -1           # >= 0: adaptive perceptual weight from this step (160-epoch recipe: 400000)
    perceptual_init: str = "pretrained"  # pretrained | random (explicit opt-in for smoke runs without weights)
    dino_path: str = ""               # dinov2_vitb14_pretrain.pth; "" = torch hub cache
    vgg_path: str = ""                # vgg16-397923af.pth for LPIPS; "" = torch hub cache
    # sampling and evaluation (paper Sec. 4; official HeunSamplerJiT in PixelGen_XL.yaml)
    sampler: str = "heun"             # heun | euler | adams2
    sample_steps: int = 50            # paper: 50 steps
    cfg_scale: tuple = (1.0,)         # 1.0 = no guidance (FID 5.11); 2.25 for 160 epochs (FID 1.83); several = a sweep
    cfg_interval: tuple = (0.1, 0.9)  # guidance only while lo < t <= hi (adams2: lo < t < hi, as official)
    time_shift: float = 2.0           # XL: 2.0; L/16 ablations: 1.0
    num_samples: int = 64             # --sample: images per setting (FID-50K: 50000, 50 per class)
    save_pngs: bool = False           # --sample: also write one PNG per image
    ckpt: str = ""                    # --sample: our checkpoint or an official Lightning .ckpt; "" = OUT_DIR/ckpt.pt
    ema_decay: tuple = ()             # --sample: EMA decay(s) of the checkpoint to sample; () = its first
    unsafe_load: bool = False         # allow unpickling arbitrary objects (trusted official files only)
    fid_ref: str = ""                 # evaluate against an ADM reference batch, a statistics npz or an image folder
    fid_weights: str = ""             # pt_inception-2015-12-05-6726825d.pth; "" = torch hub cache
    fid_preprocess: str = "adm"       # adm (ADM suite, torch-fidelity) | pytorch-fid
    metrics: tuple = ()               # some of fid sfid is pr dc (fid.py); () = every one the reference allows
    eval_every: int = 0               # --train: evaluate the EMA model(s) every N steps and at the end; 0 = never
    eval_samples: int = 50000         # --train: images per online evaluation (official validation: 50000)
    # bookkeeping
    resume: bool = True               # continue from OUT_DIR/ckpt.pt when it exists (the same model, size and classes)
    new_data: bool = False            # resume although the data differ from the checkpoint's (fine-tuning)
    ckpt_every: int = 5000            # steps between writes of OUT_DIR/ckpt.pt
    keep_every: int = 0               # also keep OUT_DIR/ckpt_{step:07d}.pt every N steps (official: 100000); 0 = off
    log_every: int = 100              # steps between log lines (the only host-device syncs)
    sample_every: int = 10000         # steps between sample grids (0 = never)
    wandb: str = ""                   # also log to this Weights & Biases project (needs the wandb package)
    bench_steps: int = 5              # --bench: timed steps after warm-up


# One flag selects a paper run; each entry states only what differs from the Config defaults.
RECIPES = {
    "xl-80ep": dict(keep_every=100_000),                                # Table 2: FID 5.11, Heun 50, no CFG
    "xl-160ep": dict(epochs=160, cfg_scale=(2.25,), adaptive_from=400_000, keep_every=100_000),  # FID 1.83, CFG 2.25
    "l-200k": dict(model="PixelGen-L/16", max_steps=200_000, sampler="euler", time_shift=1.0),  # Table 5 ablations
    # Laptop demo: a 4M-parameter model on 64 px toy shapes; faster lr and EMA because it trains for minutes.
    "demo": dict(model="PixelGen-T/16", image_size=64, batch_size=16, lr=1e-3, ema=(0.99,),
                 max_steps=500, num_workers=0, sample_steps=25, time_shift=1.0, cfg_scale=(2.0,), ckpt_every=250,
                 log_every=25, sample_every=250, out_dir="runs/demo", num_samples=40),
}
DEMO_CUDA = dict(batch_size=64, max_steps=3000, log_every=100, ckpt_every=1000, sample_every=1000)  # GPU: not timed


# ----------------------------------------------------------------------------------------------------------------
# Frozen perceptual networks: DINOv2-B/14 (dino.py) and LPIPS-VGG (the lpips package, v0.1 heads from its wheel).

VGG_FILE, VGG_URL = "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"


def make_lpips(vgg_file=None):  # LPIPS-VGG: v0.1 heads from the lpips wheel, the VGG16 trunk from vgg_file (or random)
    import lpips  # imported here so `import pixelgen` stays light
    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips' `pretrained=` call
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if vgg_file:  # torchvision's VGG16 file, mapped onto lpips' slices (slice2.5.w <- features.5.w)
        try:
            sd = torch.load(vgg_file, map_location="cpu", weights_only=True)
            net.net.load_state_dict({k: sd[f"features.{k.split('.', 1)[1]}"] for k in net.net.state_dict()})
        except Exception as e:
            raise RuntimeError(f"{vgg_file} is not a torchvision VGG16 state dict ({VGG_FILE}, {VGG_URL}): {e}")
    return net.eval().requires_grad_(False)


def perceptual_nets(cfg, device, log=print):
    """(dino, lpips), None where the loss weights leave a net unused. Missing weights stop a real run; the demo goes
    on with random nets and says so."""
    use_dino, use_lpips = bool(cfg.pdino_weight or cfg.repa_weight), bool(cfg.lpips_weight)
    rand = lambda: (dinov2.DINOv2().to(device).eval().requires_grad_(False) if use_dino else None,
                    make_lpips().to(device) if use_lpips else None)
    if cfg.perceptual_init == "random":
        log("WARNING: --perceptual_init random: LPIPS and DINOv2 have RANDOM weights (smoke runs and tests only)")
        return rand()
    try:
        files = pretrained_files(cfg, inception=bool(cfg.eval_every and cfg.fid_ref))
        return (dinov2.load_dinov2(files["dino"], device=device) if use_dino else None,
                make_lpips(files["vgg"]).to(device) if use_lpips else None)
    except (FileNotFoundError, RuntimeError) as e:
        if cfg.data_path:
            raise SystemExit(f"error: {e}\n(--perceptual_init random runs without them, for smoke tests only)")
        log("!" * 100 + f"\nWARNING: pretrained perceptual networks unavailable ({e}).\nThe demo continues with "
            "RANDOMLY INITIALISED LPIPS-VGG and DINOv2: the perceptual losses are only a regulariser.\n" + "!" * 100)
        return rand()


def pretrained_files(cfg, inception=False):
    """{net: path} of the pretrained files the run needs: a flag's path, else the torch hub cache (downloaded there
    when possible). Every missing file is named in one message, with its URL and where to put it."""
    need = dict(dino=(cfg.dino_path, dinov2.WEIGHTS_FILE, dinov2.WEIGHTS_URL) if cfg.pdino_weight or cfg.repa_weight
                else None, vgg=(cfg.vgg_path, VGG_FILE, VGG_URL) if cfg.lpips_weight else None,
                inception=(cfg.fid_weights, fid.FID_WEIGHTS_FILE, fid.FID_WEIGHTS_URL) if inception else None)
    found, missing = {}, []
    for net, (path, name, url) in ((k, v) for k, v in need.items() if v):
        try:
            found[net] = dinov2.hub_file(path, name, url)
        except FileNotFoundError as e:
            missing.append(str(e))
    if missing:
        raise FileNotFoundError("\n".join(missing))
    return found


# ----------------------------------------------------------------------------------------------------------------
# Data: ImageNet-layout folders with the ADM center crop, or a procedural class-conditional toy dataset.

def center_crop(img, size):  # ADM: halve with BOX while min side >= 2 size, BICUBIC to size, center crop
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top: top + size, left: left + size]


def list_folder(root):  # (classes, images per class, ignored: hidden, stray or not images, paths: numpy bytes)
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data_path {root} is not a folder")
    top = sorted(os.scandir(root), key=lambda e: e.name)
    folders = [e.name for e in top if e.is_dir() and not e.name.startswith(".")]
    found = [fid.scan(os.path.join(root, c)) for c in folders] or [fid.scan(root, recursive=False)]
    classes, counts = folders or [os.path.basename(os.path.abspath(root))], [len(files) for files, _ in found]
    ignored = [e.name + "/" * e.is_dir() for e in top if folders and e.name not in folders] + [
        os.path.join(c, p) for c, (_, left_out) in zip(folders or [""], found) for p in left_out]
    empty = [os.path.join(root, c) if folders else root for c, n in zip(classes, counts) if n == 0]
    svg = any(p.lower().endswith(".svg") for files, left_out in found if not files for p in left_out)
    if empty:  # as torchvision's ImageFolder: a class needs an image
        raise SystemExit(f"error: no image files ({', '.join(fid.IMAGE_EXTENSIONS)}) in {', '.join(empty)}"
                         + "; SVG files must be converted first (to PNG, for example)" * svg + "\n"
                         + class_table(argparse.Namespace(classes=classes, counts=counts, ignored=ignored)))
    return classes, counts, ignored, np.array([os.fsencode(p) for files, _ in found for p in files], dtype=bytes)


class ImageFolderData(torch.utils.data.Dataset):
    """root/class_x/.../img.jpg: sorted class folders are the labels 0..K-1 (no class folders: one class). Items: uint8
    (3, H, W) by fid.read_image (alpha onto `background`) and the ADM crop, and the label; unreadable: the image path.
    Rank 0 lists the folder for all; `paths` and `labels` are numpy arrays, which data workers share, not copy."""

    def __init__(self, root, size, background=(255, 255, 255), procs=None):
        procs = procs or Procs(False, 0, 1, torch.device("cpu"))
        listing = [procs.all_or_none(lambda: None if procs.rank else list_folder(root))]
        if procs.ddp:
            dist.broadcast_object_list(listing, src=0, group=procs.ctrl)
        self.classes, self.counts, self.ignored, self.paths = listing[0]
        self.labels, self.num_classes = np.repeat(np.arange(len(self.counts)), self.counts), len(self.classes)
        self.size, self.background = size, background

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = os.fsdecode(self.paths[i])
        try:
            a = center_crop(Image.fromarray(fid.read_image(path, self.background)), self.size)
        except Exception:  # collate replaces it and reports its path
            return path
        return torch.from_numpy(a.copy()).permute(2, 0, 1), int(self.labels[i])  # uint8 (3, H, W)


class ToyShapes(torch.utils.data.Dataset):
    """The demo dataset: 10 classes of procedurally drawn shapes (class = shape and palette), any size, no files."""
    classes = ["red disc", "green square", "blue triangle", "yellow ring", "magenta cross", "cyan h-stripes",
               "orange v-stripes", "white diamond", "purple checker", "teal frame"]

    def __init__(self, size, n=50_000, seed=0):
        self.size, self.n, self.seed, self.num_classes = size, n, seed, 10
        self.counts, self.ignored = [n // 10 + (k < n % 10) for k in range(10)], []  # image i: class i mod 10

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        y, g, s = i % 10, np.random.default_rng([self.seed, i]), self.size
        colors = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 40, 220), (40, 220, 230),
                  (250, 140, 20), (245, 245, 245), (130, 50, 200), (0, 170, 150)]
        yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
        cy, cx, r = g.uniform(0.4, 0.6), g.uniform(0.4, 0.6), g.uniform(0.22, 0.32)
        dy, dx = yy - cy, xx - cx
        lo, hi = np.minimum(abs(dx), abs(dy)), np.maximum(abs(dx), abs(dy))
        m = [dx**2 + dy**2 < r**2, hi < r * 0.8, (dy < r * 0.7) & (abs(dx) < (dy + r) * 0.6),
             abs(np.sqrt(dx**2 + dy**2) - r * 0.8) < r * 0.25, (lo < r * 0.25) & (hi < r), np.sin(yy * 8 * np.pi) > 0,
             np.sin(xx * 8 * np.pi) > 0, abs(dx) + abs(dy) < r, ((xx * 6).astype(int) + (yy * 6).astype(int)) % 2 == 0,
             np.minimum(np.minimum(xx, 1 - xx), np.minimum(yy, 1 - yy)) < 0.16][y]
        bg = g.uniform(0, 90, size=3)
        fg = np.clip(np.array(colors[y]) + g.normal(0, 15, size=3), 0, 255)
        a = np.where(m[..., None], fg, bg) + g.normal(0, 6, size=(s, s, 3))
        return torch.from_numpy(np.clip(a, 0, 255).astype(np.uint8)).permute(2, 0, 1), y


def class_table(data, rows=20):  # for the log: images per class (the first and last rows / 2), what was left out
    lines = [f"{k:6d} {n:8d}  {c}" for k, (c, n) in enumerate(zip(data.classes, data.counts))]
    lines = lines if len(lines) <= rows else lines[:rows // 2] + ["   ..."] + lines[-rows // 2:]
    if data.ignored:
        lines.append(f"ignored: {len(data.ignored)} ({', '.join(data.ignored[:5])}{', ...' * (len(data.ignored) > 5)})")
    head = [f"data: {sum(data.counts)} images in {len(data.classes)} classes", " label   images  class"]
    return "\n".join(head + lines)


def collate(batch):  # (images, labels, skipped): the paths of unreadable items, each replaced by a readable one
    good, skipped = [b for b in batch if not isinstance(b, str)], [b for b in batch if isinstance(b, str)]
    if not good:
        raise RuntimeError(f"a whole batch of unreadable images ({', '.join(skipped)}): check the data folder")
    good += [good[i % len(good)] for i in range(len(skipped))]
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), skipped


def global_batches(n, batch, world, rank, accum, seed, step=0):
    """This process's micro-batches of dataset indices, from `step` on, without end. Step s of epoch e is positions
    [sB, (s + 1)B) of a permutation seeded by (seed, e) (a tail that fills no global batch is left out); process r
    takes the r-th of `world` contiguous slices of it, as `accum` contiguous micro-batches."""
    b, first, perm = batch // (world * accum), rank * (batch // world), None
    for step in itertools.count(step):
        epoch, s = divmod(step, n // batch)
        if perm is None or s == 0:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch)))
        for k in range(accum):
            start = s * batch + first + k * b
            yield perm[start: start + b].tolist()


def quiet_worker(_):  # data workers ignore the stop signals: the main process finishes its step, then ends them
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------------------
# Training: AdamW, fp32 EMAs, bf16 autocast on CUDA, DDP under torchrun. A step is defined on the global batch: its
# data, each sample's t, eps, label dropout and flip, and every loss normaliser depend only on (seed, step, position in
# the global batch), so any split over processes and micro-batches, and a resumed run, train the same weights.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # end the run after the step (preemption, Ctrl-C)
HOST_WAIT = datetime.timedelta(hours=2)  # how long a process waits on the host for the others (rank 0's writes)
DEVICE_WAIT = datetime.timedelta(minutes=30)  # NCCL's limit: a rank's first compilation of XL can take 10 minutes


def to_device(u, device):  # a host tensor to the device without blocking the host (from pinned memory on CUDA)
    return (u.pin_memory() if device.type == "cuda" else u).to(device, non_blocking=True)


def make_draws(t, drop, eps, gate_t, norm=None):  # t, drop (b,) on the host, where the gate needs no device sync
    gated = gate(t, gate_t)  # norm: (B, G) of the global batch (by default this batch's own)
    return Draws(to_device(t, eps.device), eps, to_device(drop, eps.device), to_device(gated, eps.device),
                 *(norm or (len(t), len(gated))))


class Procs(NamedTuple):
    """This process among the others. The step's collectives run on the device (NCCL on CUDA); what decides which come
    next (a stop, an evaluation's outcome) and waits for rank 0's slow work are agreed on the host, in the gloo group
    `ctrl` with the timeout HOST_WAIT, not NCCL's."""
    ddp: bool
    rank: int
    world: int
    device: torch.device
    ctrl: object = None  # the gloo group (None in a single process)

    def agree(self, flag):  # the largest of the processes' integer flags; every process must call it
        flag = torch.tensor(int(flag))
        if self.ctrl is not None:
            dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.ctrl)
        return int(flag)

    def all_or_none(self, fn, *args):  # fn(*args) on every process; if it raised on any, it raises on all
        try:
            out, err = fn(*args), None
        except (Exception, SystemExit) as e:
            out, err = None, e
            if self.rank:
                print(f"[process {self.rank}] {e!r}", file=sys.stderr)
        failed = self.agree(self.rank + 1 if err else 0)
        if failed:
            raise err or RuntimeError(f"it failed on process {failed - 1} (see its stderr)")
        return out

    def gather(self, u):  # every process's host tensor u, in rank order, in one buffer (one copy per process)
        out = torch.empty((self.world * len(u), *u.shape[1:]), dtype=u.dtype)
        dist.all_gather(list(out.chunk(self.world)), u, group=self.ctrl)
        return out


def setup_dist(cfg):
    ddp, cuda = int(os.environ.get("RANK", -1)) != -1, torch.cuda.is_available() and cfg.device != "cpu"
    if not ddp:
        return Procs(False, 0, 1, torch.device("cuda" if cuda else "cpu"))
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=DEVICE_WAIT, device_id=device if cuda else None)
    ctrl = dist.new_group(backend="gloo", timeout=HOST_WAIT)
    return Procs(True, dist.get_rank(), dist.get_world_size(), device, ctrl)


def wrap_ddp(net, procs):
    """DDP, set for many GPUs: gradients live in the communication buckets (no second copy of the weights' size), no
    buffer is broadcast (all are constants, and w_ad is averaged already), and buckets of 256 MiB keep a compiled
    XL in a dozen graphs (the compiler cuts the graph at every bucket; 25 MiB ones made about a hundred)."""
    if not procs.ddp:
        return net
    return nn.parallel.DistributedDataParallel(net, device_ids=None if procs.device.type == "cpu" else [
        procs.device.index], gradient_as_bucket_view=True, broadcast_buffers=False, bucket_cap_mb=256)


def amp(device):  # bf16 autocast on CUDA, plain fp32 on the CPU; wraps forward passes only
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


class Log:  # rank 0's record: stdout (above the progress bar), OUT_DIR/log.txt, rows to metrics.jsonl and wandb

    def __init__(self, cfg, master):
        self.cfg, self.master, self.waiting, self.files, self.wandb = cfg, master, [], None, None

    def __call__(self, msg, row=None):  # held until start(), after every check: a failed start leaves no trace
        if self.master:
            tqdm.write(msg)
            self.write(msg, row) if self.files else self.waiting.append((msg, row))

    def start(self):  # takes the run folder, opens the files (and a wandb run), writes what waited
        if self.master:
            wandb = importlib.import_module("wandb") if self.cfg.wandb else None  # optional: pip install wandb
            os.makedirs(self.cfg.out_dir, exist_ok=True)
            self.lock = hold_folder(self.cfg.out_dir)
            self.files = [open(os.path.join(self.cfg.out_dir, f), "a") for f in ("log.txt", "metrics.jsonl")]
            where = os.path.abspath(self.cfg.out_dir)  # one wandb run per out_dir, continued on resume
            self.wandb = wandb and wandb.init(project=self.cfg.wandb, name=os.path.basename(where), resume="allow",
                                              id=hashlib.md5(where.encode()).hexdigest(), config=vars(self.cfg))
            for msg, row in self.waiting:
                self.write(msg, row)

    def write(self, msg, row):
        self.files[0].write(msg + "\n")
        self.files[1].write(json.dumps(row) + "\n" if row else "")
        for f in self.files:
            f.flush()
        if row and self.wandb:
            self.wandb.log(row, step=row["step"])

    def close(self):
        for f in self.files or ():
            f.close()
        if self.wandb:
            self.wandb.finish()


def hold_folder(out_dir):
    """An OS lock on OUT_DIR/lock while the run lives: two runs in one folder would resume from the same ckpt.pt and
    overwrite each other's. The OS releases it when the process ends, so a crashed run never blocks the next."""
    f = open(os.path.join(out_dir, "lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        raise SystemExit(f"error: {out_dir} is in use by another run ({f.read().strip()}): wait for it to end, stop "
                         f"it, or use another --out_dir") from None
    f.truncate(0)
    print(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M')}", file=f,
          flush=True)
    return f


LOSS_ARGS = ("lpips_weight", "pdino_weight", "repa_weight", "gate_t", "t_eps", "num_classes", "gate_pdino",
             "adaptive_from")  # the Config fields PixelGenLoss takes as they are


def build(cfg, device, log=print):  # a run's denoiser, its EMAs, the objective (with the frozen nets) and AdamW
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    model = JiT(**MODELS[cfg.model], input_size=cfg.image_size, num_classes=cfg.num_classes).to(device)
    model.grad_ckpt = cfg.grad_ckpt
    emas = {d: copy.deepcopy(model).requires_grad_(False).eval() for d in cfg.ema}  # fp32, sampled from
    dino, lp = perceptual_nets(cfg, device, log)
    loss_fn = PixelGenLoss(model.final_layer.linear.in_features, dino, lp, patch_size=model.patch_size,
                           repa_layer=REPA_LAYER[cfg.model] if cfg.repa_layer < 0 else cfg.repa_layer,
                           **{k: getattr(cfg, k) for k in LOSS_ARGS}).to(device)
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda" or None)
    if cfg.compile:  # what runs every step, and the EMAs that sample; DINOv2 and LPIPS are called as modules
        if cfg.adaptive_from >= 0:  # w_ad backpropagates twice through one graph (retain_graph), which a compiled
            importlib.import_module("torch._functorch.config").donated_buffer = False  # backward allows only
        for m in (model, *emas.values(), dino, lp):  # without donated buffers (a small memory saving)
            m.compile() if m is not None else None
    return model, emas, loss_fn, opt


def check_run(cfg, data, procs, ck):
    """The run's Config after the checks made before anything is built or written: the classes (the data's, or the
    checkpoint's when more), the checkpoint `ck` it resumes from (same model, size, classes, data), a CPU's limits."""
    if len(data) < cfg.batch_size:
        m = procs.world * cfg.grad_accum  # a global batch is a multiple of m
        raise SystemExit(f"error: {len(data)} images are fewer than one global batch (--batch_size {cfg.batch_size})"
                         + f"; --batch_size {len(data) // m * m} fits" * (len(data) >= m))
    if cfg.num_classes and cfg.num_classes < data.num_classes:
        raise SystemExit(f"error: the data has {data.num_classes} classes but --num_classes is {cfg.num_classes}")
    held = ck.get("config", {})
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or max(data.num_classes, held.get("num_classes", 0)))
    differ = [f"--{k} {held[k]} (this run: {getattr(cfg, k)})" for k in ("model", "image_size", "num_classes")
              if k in held and held[k] != getattr(cfg, k)]
    record = data_record(cfg, data)
    if ck.get("data", record)[1:] != record[1:] and not cfg.new_data:  # class names and counts (not the path)
        differ.append(f"its data: {describe(ck['data'])} (this run: {describe(record)}; --new_data continues on "
                      "other data, for fine-tuning)")
    if differ:
        raise SystemExit(f"error: {cfg.out_dir}/ckpt.pt was written by another run: {held.get('model')} at "
                         f"{held.get('image_size')} px with {held.get('num_classes')} classes. It differs in "
                         + "; ".join(differ) + ".\nUse another --out_dir for a new run.")
    if procs.device.type == "cpu" and cfg.device == "auto" and MODELS[cfg.model]["hidden_size"] >= 768:  # B and up
        raise SystemExit(f"error: no GPU here, and {cfg.model} at {cfg.image_size} px is a GPU run (on a CPU, days per "
                         f"epoch, and the memory may run out without a message). On a CPU, train the demo recipe on "
                         f"your images (PixelGen-T/16 at 64 px, minutes): python pixelgen.py --train --recipe demo"
                         + (f" --data_path {cfg.data_path}" if cfg.data_path else "")
                         + "\n(--device cpu runs this configuration on the CPU all the same.)")
    return cfg


def data_record(cfg, data):  # (path, class names, images per class): what a checkpoint keeps to recognise its data
    return [os.path.abspath(cfg.data_path) if cfg.data_path else "toy shapes", list(data.classes), list(data.counts)]


def describe(record):  # "7 classes (app, device, file, folder, ...), 415 images in /data/icons"
    path, classes, counts = record
    names = classes if len(classes) <= 5 else classes[:4] + ["..."]
    return f"{len(classes)} classes ({', '.join(names)}), {sum(counts)} images in {path}"


def read_checkpoint(path, unsafe=False):  # torch.load, memory-mapped on the host, weights_only unless `unsafe`
    try:
        ck = torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # a valid file that pickles Python objects (Lightning's hyper_parameters)
            raise SystemExit(f"error: {path} holds pickled Python objects besides tensors "
                             f"({str(e).splitlines()[-1][:200]}).\nIf you trust the file, pass --unsafe_load.")
        ck = None
    if not isinstance(ck, dict):
        raise SystemExit(f"error: cannot read {path} as a checkpoint: pass a ckpt.pt written by --train, or an "
                         f"official Lightning .ckpt")
    return ck


def resume_point(cfg, procs):
    """The checkpoint the run continues from ({} for a new run), memory-mapped. Rank 0 alone decides whether
    OUT_DIR/ckpt.pt exists; a process that cannot read that same file stops them all: the folder is not shared."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not procs.agree(cfg.resume and procs.rank == 0 and os.path.isfile(path)):
        return {}
    unshared = (f"error: process 0 resumes from {path}, which another process cannot read or sees at another step: "
                f"--out_dir must be on storage that every node sees")
    if procs.agree(not os.path.isfile(path)):
        raise SystemExit(unshared)
    ck = procs.all_or_none(read_checkpoint, path)
    if procs.agree(ck["step"]) != -procs.agree(-ck["step"]):  # the largest step is not the smallest
        raise SystemExit(unshared)
    return ck


def resume(ck, model, emas, loss_fn, opt, path):
    """(step to continue from, EMA decays new to the run) after loading the checkpoint ck into the run's tensors. The
    caller drops ck: no copy stays in memory (on a GPU, 2.7 GB more for XL's model and each EMA)."""
    if not ck:
        return 0, ()
    try:
        for obj, k in ((model, "model"), (loss_fn, "loss"), (opt, "opt")):
            obj.load_state_dict(ck[k])
        for d, e in emas.items():  # an EMA decay new to this run starts from the current weights
            e.load_state_dict(ck["emas"].get(str(d), model.state_dict()))
    except Exception as e:
        raise SystemExit(f"error: cannot resume from {path}: {str(e)[:400]}\nUse another --out_dir or --no-resume.")
    return ck["step"], [d for d in emas if str(d) not in ck["emas"]]


def save_checkpoint(obj, path, keep=None):
    """Atomic write (temp file + rename), then a snapshot `keep` (a hard link where it can); a failed write stops the
    run naming its cause and leaves the last good checkpoint as it was."""
    target = path
    try:
        torch.save(obj, path + ".tmp")
        os.replace(path + ".tmp", path)
        if keep:
            target = keep
            os.remove(keep) if os.path.exists(keep) else None
            try:
                os.link(path, keep)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, keep)
    except BaseException as e:
        os.remove(path + ".tmp") if os.path.exists(path + ".tmp") else None
        if not isinstance(e, Exception):  # KeyboardInterrupt and the like go on as they are
            raise
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**30
        last = f"the last good checkpoint {path} is intact" if os.path.exists(path) else "no checkpoint was written yet"
        raise SystemExit(f"error: writing {target} failed: {str(e).strip().splitlines()[0][:300]}\n{free:.2f} GiB "
                         f"are free on its disk (a full disk or quota is the usual cause); {last}. Free some space, "
                         f"then rerun the same command to continue.")


def loader(data, cfg, procs, step):  # this process's micro-batches of uint8 images, from `step` on, without end
    batches = global_batches(len(data), cfg.batch_size, procs.world, procs.rank, cfg.grad_accum, cfg.seed, step)
    return iter(torch.utils.data.DataLoader(data, batch_sampler=batches, collate_fn=collate,
                                            num_workers=cfg.num_workers, pin_memory=procs.device.type == "cuda",
                                            worker_init_fn=quiet_worker))


@contextlib.contextmanager
def stop_signals(out_dir):
    """Yields the names of the STOP_SIGNALS received: the run ends after the step. A stop is idempotent while it is
    pending: SLURM signals every process of a job step and torchrun forwards its own, so a worker gets SIGTERM twice
    and must still finish its step and save. A second Ctrl-C (SIGINT) is the one way out at once."""
    received, previous = [], {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def handle(sig, frame):
        if sig == signal.SIGINT and "SIGINT" in received:
            print(f"\nforced exit by a second Ctrl-C; {last_checkpoint(out_dir)}", file=sys.stderr, flush=True)
            os._exit(130)
        received.append(signal.Signals(sig).name)
    for s in STOP_SIGNALS:
        signal.signal(s, handle)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def last_checkpoint(out_dir):  # for a message: what a restart with the same command continues from
    try:
        return f"the last checkpoint is {out_dir}/ckpt.pt, at step {read_checkpoint(f'{out_dir}/ckpt.pt')['step']}"
    except (Exception, SystemExit):
        return f"no checkpoint in {out_dir} yet"


@contextlib.contextmanager
def memory_advice(cfg, procs):  # a GPU out of memory in a step: stop with what to change, naming the micro-batch
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise SystemExit(f"error: out of GPU memory in a training step of {cfg.model} at {cfg.image_size} px with "
                         f"micro-batches of {cfg.batch_size // (procs.world * cfg.grad_accum)} images per GPU "
                         f"({str(e).splitlines()[0][:200]}).\nSplit the batch further with --grad_accum "
                         f"{2 * cfg.grad_accum} (the same update), add --grad_ckpt (less memory for about a third more "
                         f"compute), use more GPUs or a smaller --model.") from None


class DenoiserAndLoss(nn.Module):  # the denoiser and the REPA projector, as one module for one DDP wrapper
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, draws, adapt=False):
        return self.loss_fn(self.model, x, y, draws, adapt)


class Meter:  # sums since the last log line: loss terms on the device (read at the log step), the rest on the host
    TERMS = ("loss", "fm", "lpips", "pdino", "repa")

    def __init__(self):
        self.sums, self.gate, self.skipped, self.steps, self.t0 = 0.0, 0.0, [], 0, time.time()

    def add(self, out, skipped):  # one micro-batch's terms (its shares of the global means); unreadable image paths
        self.sums, self.skipped = self.sums + torch.stack([out[k].detach().float() for k in self.TERMS]), \
            self.skipped + skipped

    def report(self, step, max_steps, cfg, procs, w_ad, epoch):  # (line, row) of the means over every process
        sums, skipped = self.sums, [self.skipped] * procs.world
        if procs.ddp:
            dist.all_reduce(sums)
            dist.all_gather_object(skipped, self.skipped, group=procs.ctrl)
        m = dict(zip(self.TERMS, (s / self.steps for s in sums.tolist())), gate=self.gate / self.steps)
        if not all(map(math.isfinite, m.values())):
            raise SystemExit(f"error: non-finite loss at step {step} ({m}); the last good checkpoint is "
                             f"{cfg.out_dir}/ckpt.pt")
        ips, mem = cfg.batch_size * self.steps / (time.time() - self.t0), procs.device.type == "cuda"
        row = dict(step=step, epoch=round(epoch, 4), **m, w_ad=w_ad, lr=cfg.lr, img_per_s=round(ips, 2), **(
            {"peak_mem_gib": round(torch.cuda.max_memory_allocated(procs.device) / 2**30, 2)} if mem else {}))
        self.__init__()
        eta, skipped = (max_steps - step) * cfg.batch_size / ips / 60, sum(skipped, [])
        return (f"step {step}/{max_steps} " + " ".join(f"{k} {m[k]:.4f}" for k in self.TERMS) + f" gate {m['gate']:.2f}"
                f" w_ad {w_ad:.3f} lr {cfg.lr:g} img/s {ips:.1f} eta {eta:.1f} min" + "".join(
                    f"\nskipped an unreadable image: {p}" for p in skipped), row)


def train_step(net, opt, emas, batches, step, cfg, procs, meter):
    """One AdamW step on the global batch: this process's K micro-batches, their gradients summed (DDP averages them
    over the processes on the last one), then the EMAs. Nothing waits for the device: the draws are made on the host."""
    loss_fn, model = (net.module if procs.ddp else net).loss_fn, (net.module if procs.ddp else net).model
    B, K, device = cfg.batch_size, cfg.grad_accum, procs.device
    b, first = B // (procs.world * K), procs.rank * (B // procs.world)  # micro-batch; this process's first position
    t, drop, gen = draw(B, cfg.seed, step, cfg.P_mean, cfg.P_std, cfg.label_dropout)  # the global batch's draws
    flip, norm = (torch.rand(B, generator=gen) < 0.5) & cfg.flip, (B, len(gate(t, loss_fn.gate_t)))
    for k in range(K):
        img, y, bad = next(batches)
        pos = slice(first + k * b, first + (k + 1) * b)  # this micro-batch's positions in the global batch
        x = img.to(device, non_blocking=True).float() / 127.5 - 1  # uint8 -> [-1, 1]
        x = torch.where(to_device(flip[pos], device).view(-1, 1, 1, 1), x.flip(-1), x) if cfg.flip else x
        eps = seeded_noise(x.shape[1:], [seed_for(cfg.seed, step, i) for i in range(pos.start, pos.stop)], device)
        draws = make_draws(t[pos], drop[pos], eps, loss_fn.gate_t, norm)
        torch.manual_seed(seed_for(cfg.seed, step, procs.rank, k))  # dropout masks
        with net.no_sync() if procs.ddp and k < K - 1 else contextlib.nullcontext():  # DDP syncs on the last one
            with amp(device):
                out = net(x, y.to(device, non_blocking=True), draws, adapt=k == 0 and loss_fn.adapt_due(step))
            (out["loss"] * procs.world).backward()  # DDP averages over processes; the shares add up
        meter.add(out, bad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(emas, model)
    meter.gate, meter.steps = meter.gate + norm[1] / B, meter.steps + 1


def after_step(cfg, step, max_steps, stopping):  # what this step ends with: the same decision on every process
    keep = bool(cfg.keep_every) and step % cfg.keep_every == 0  # also a snapshot ckpt_{step}.pt
    every = lambda n: bool(n) and (step % n == 0 or step == max_steps) and not stopping
    save = step % cfg.ckpt_every == 0 or step == max_steps or bool(stopping) or keep or every(cfg.eval_every)
    return argparse.Namespace(log=step % cfg.log_every == 0 or save, save=save, keep=keep,  # (a checkpoint before
                              eval=every(cfg.eval_every), grid=every(cfg.sample_every))  # an evaluation)


def train(cfg, hook=None):
    """The training program (--train), on every process under torchrun; hook(step, model, emas) after each step."""
    procs = setup_dist(cfg)
    data = ImageFolderData(cfg.data_path, cfg.image_size, cfg.background, procs) if cfg.data_path else \
        ToyShapes(cfg.image_size)
    ck = resume_point(cfg, procs)
    cfg = check_run(cfg, data, procs, ck)  # before anything is built or written
    log, epoch_steps = Log(cfg, procs.rank == 0), len(data) // cfg.batch_size
    max_steps = cfg.max_steps or cfg.epochs * epoch_steps
    model, emas, loss_fn, opt = build(cfg, procs.device, log)
    step, new_emas = resume(ck, model, emas, loss_fn, opt, os.path.join(cfg.out_dir, "ckpt.pt"))
    del ck
    fid_ctx = fid_setup(cfg, procs) if cfg.eval_every and cfg.fid_ref else None
    procs.all_or_none(log.start)  # every check has passed: the folder is this run's, and written from here on
    log(f"config: {dataclasses.asdict(cfg)}")
    log(class_table(data))
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; data: "
        f"{describe(data_record(cfg, data))}; {procs.world} process{'es' * (procs.world > 1)}, device {procs.device}")
    if step:
        log(f"resumed from {cfg.out_dir}/ckpt.pt at step {step}" + "".join(f"; EMA {d} starts now" for d in new_emas))
    b = cfg.batch_size // (procs.world * cfg.grad_accum)
    log(f"{max_steps} steps, {epoch_steps} per epoch, global batch {cfg.batch_size} = {procs.world} process"
        f"{'es' * (procs.world > 1)} x {cfg.grad_accum} micro-batches x {b}")
    net = wrap_ddp(DenoiserAndLoss(model, loss_fn), procs)
    batches, meter = loader(data, cfg, procs, step), Meter()
    bar = tqdm(total=max_steps, initial=step, disable=procs.rank != 0, dynamic_ncols=True)
    model.train()
    loss_fn.train()
    try:
        with stop_signals(cfg.out_dir) as received:
            while step < max_steps:
                with memory_advice(cfg, procs):
                    train_step(net, opt, emas, batches, step, cfg, procs, meter)
                step += 1
                bar.update(1)
                if hook:
                    hook(step, model, emas)
                stopping = procs.agree(bool(received))  # decided once per step, by every process together
                todo = after_step(cfg, step, max_steps, stopping)
                if todo.log:
                    log(*meter.report(step, max_steps, cfg, procs, loss_fn.percept_weight.item(), step / epoch_steps))
                if todo.save:
                    save(model, emas, loss_fn, opt, step, cfg, data, procs, log, todo.keep)
                if todo.eval:
                    evaluate_online(emas, cfg, procs, step, log, fid_ctx)
                if todo.grid:
                    procs.all_or_none(lambda: write_grid(emas, cfg, procs, step, log) if procs.rank == 0 else None)
                if stopping:
                    log(f"stopped by {received[0] if received else 'a signal to another process'} after "
                        f"step {step}; {cfg.out_dir}/ckpt.pt is written: run the same command to continue")
                    break
    finally:
        bar.close()
        log.close()
        if procs.ddp:
            dist.destroy_process_group()
    return model, emas


def save(model, emas, loss_fn, opt, step, cfg, data, procs, log, keep):  # rank 0 writes while the others wait
    path, snap = os.path.join(cfg.out_dir, "ckpt.pt"), os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt")
    ck = dict(model=model.state_dict(), ema=emas[cfg.ema[0]].state_dict(), loss=loss_fn.state_dict(), step=step,
              emas={str(d): e.state_dict() for d, e in emas.items()}, opt=opt.state_dict(),  # (storage shared
              config=dataclasses.asdict(cfg), data=data_record(cfg, data))                   # with ema in the file)
    procs.all_or_none(lambda: save_checkpoint(ck, path, snap if keep else None) if procs.rank == 0 else None)
    log(f"saved {path}" + (f" and {os.path.basename(snap)}" if keep else ""))  # (a failed write stops every process)


def evaluate_online(emas, cfg, procs, step, log, fid_ctx):  # a failure (on any process) is logged; training goes on
    t0, n, runs = time.time(), cfg.eval_samples, itertools.product(emas.items(), cfg.cfg_scale)
    try:  # without a reference the samples are kept, as the official validation hook does
        rows = write_samples(emas, n, cfg, procs, f"{cfg.out_dir}/eval_{step:07d}") if fid_ctx is None else [
            measure(my_images(m, w, n, cfg, procs), n, d, w, fid_ctx, cfg, procs) for (d, m), w in runs]
    except Exception as e:
        return log(f"evaluation at step {step} failed, training goes on: {e!r}")
    for r in rows:
        log(f"eval step {step} ema {r['ema']} cfg {r['cfg_scale']:g}: " + ", ".join(
            f"{name} {r[k]:.4g}" for k, name in fid.RESULTS.items() if k in r) + f" ({time.time() - t0:.0f} s)",
            dict(step=step, **r, eval_seconds=round(time.time() - t0, 1)))


def write_grid(emas, cfg, procs, step, log):  # rank 0: a sample grid of the first EMA; a failure is logged, as above
    (n, _, note), path = grid_shape(min(cfg.num_samples, 64), cfg.num_classes), f"{cfg.out_dir}/grid_{step:07d}.png"
    try:
        save_grid(sample_images(emas[cfg.ema[0]], range(n), cfg, procs.device, cfg.cfg_scale[0]), path, cfg.num_classes)
    except Exception as e:
        return log(f"sample grid at step {step} failed, training goes on: {e!r}")
    log(f"sample grid (EMA {cfg.ema[0]}): {path}{note}")


# ----------------------------------------------------------------------------------------------------------------
# Sampling program: our checkpoints or official Lightning ones (EMA weights) -> samples (ADM npz), grids, FID and IS.

def load_denoiser(path, unsafe=False, decays=()):
    """-> ({decay: JiT in eval mode}, config dict or None, step); decays picks EMA models (default: the first one).
    Our checkpoints name their preset; an official Lightning file's is found by the depth and width of its weights."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found: train a model first (python pixelgen.py --train, with "
                         f"the same --out_dir), or pass --ckpt FILE (a ckpt.pt, a snapshot or an official .ckpt)")
    ck = read_checkpoint(path, unsafe)
    if "emas" in ck:  # ours
        conf, step, held = ck["config"], ck["step"], {float(d): sd for d, sd in ck["emas"].items()}
        name, kw = conf["model"], dict(input_size=conf["image_size"], num_classes=conf["num_classes"])
    elif "state_dict" in ck:  # official Lightning: denoiser. / ema_denoiser. prefixes; SimpleEMA decay 0.9999
        conf, step = None, ck.get("global_step")
        held = {0.9999: {k[13:]: v for k, v in ck["state_dict"].items() if k.startswith("ema_denoiser.")}}
        name, kw = official_preset(held[0.9999], path)
    else:
        raise SystemExit(f"error: {path} is neither a PixelGen checkpoint (emas) nor a Lightning one (state_dict)")
    if any(d not in held for d in decays):
        raise SystemExit(f"error: {path} holds no EMA of decay {', '.join(str(d) for d in decays if d not in held)}; "
                         f"it holds {', '.join(map(str, held))}")
    models = {d: JiT(**MODELS[name], **kw).eval() for d in decays or list(held)[:1]}
    try:
        for d, m in models.items():
            m.load_state_dict(held[d], strict=True)
    except RuntimeError as e:
        raise SystemExit(f"error: the weights in {path} are not those of {name}: {str(e)[:400]}")
    print(f"{path}: {name} at {kw['input_size']} px, {kw['num_classes']} classes, EMA {', '.join(map(str, models))}")
    return models, conf, step


def official_preset(sd, path):  # (preset, its size keywords) of an official JiT state dict, by its depth and width
    try:
        depth, width = len({k.split(".")[1] for k in sd if k.startswith("blocks.")}), sd["pos_embed"].shape[-1]
        p = sd["x_embedder.proj1.weight"].shape[-1]
        kw = dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * p, patch_size=p,
                  num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    except KeyError as e:
        raise SystemExit(f"error: {path} has no JiT weights (missing {e})")
    name = next((n for n, m in MODELS.items() if (m["depth"], m["hidden_size"]) == (depth, width)), None)
    if name is None:
        raise SystemExit(f"error: the weights in {path} (depth {depth}, width {width}) fit no preset of MODELS")
    return name, kw


@torch.no_grad()
def sample_images(model, idx, cfg, device, cfg_scale, batch=0):  # image i: class i % K, noise from (seed, i)
    full, size = list(idx) + list(idx[-1:]) * (batch - len(idx)), model.grid * model.patch_size  # padded
    noise = seeded_noise((3, size, size), [seed_for(cfg.seed, i) for i in full], "cpu").to(device)  # any device: same
    with amp(device):
        x = sample(model, noise, torch.tensor(full, device=device) % model.num_classes, cfg.sample_steps, cfg.sampler,
                   cfg_scale, cfg.cfg_interval, cfg.time_shift, cfg.t_eps)[:len(idx)]
    return ((x.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # fp2uint8


def grid_shape(n, classes):  # (images, columns, note) of a grid of at most n: a column per class up to 16, whole rows
    cols = min(n, classes) if classes <= 16 else math.ceil(math.sqrt(n))
    return n - n % cols, cols, f"; classes {n}-{classes - 1} are left out ({n} images)" if n < classes else ""


def save_grid(images, path, classes):  # (B, H, W, 3) uint8 -> a PNG in rows of grid_shape, 2 px black borders
    from torchvision.utils import save_image  # (a short last row is fine)
    save_image(torch.from_numpy(images).permute(0, 3, 1, 2) / 255, path, nrow=grid_shape(len(images), classes)[1])


def fid_setup(cfg, procs):  # made once per run and kept: the Inception (on the CPU), the metrics, the reference
    def setup():
        net, ref = fid.load_inception(cfg.fid_weights or None, procs.device), fid.open_side(cfg.fid_ref, cfg.background)
        metrics = fid.resolve_metrics(cfg.metrics or None, ref)
        if procs.rank == 0:  # the others wait on the host
            fid.load_side(ref, net, [m for m in metrics if m != "is"], cfg.fid_preprocess, progress="reference")
        return argparse.Namespace(inception=net.cpu(), reference=ref, metrics=metrics)
    try:
        return procs.all_or_none(setup)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {str(e).replace('(--weights)', '(--fid_weights)')}")


def my_images(model, w, n, cfg, procs):  # this process's share of n images (image i on process i % world), by batch
    mine, b = range(procs.rank, n, procs.world), max(1, cfg.batch_size // procs.world)
    for j in tqdm(range(0, len(mine), b), disable=procs.rank != 0, desc=f"sampling cfg {w:g}", leave=False):
        yield sample_images(model, mine[j:j + b], cfg, procs.device, w, b)


def measure(batches, n, ema, w, fid_ctx, cfg, procs):  # rank 0's row of metrics of n images; this process's in batches
    net, m, which = fid_ctx.inception.to(procs.device), -(-n // procs.world), fid_ctx.metrics  # m rows per process

    def outputs():  # this process's rows [pool3 (2048) | sFID's], padded to m
        out = [fid.inception_outputs(net, images, cfg.fid_preprocess, "sfid" in which) for images in batches]
        rows = np.concatenate([np.zeros((0, 2048 + fid.SPATIAL_DIM * ("sfid" in which)), np.float32)] + [
            np.hstack([p, s] if s is not None else [p]) for p, s in out])
        return F.pad(torch.from_numpy(rows), (0, 0, 0, m - len(rows)))

    def metrics(rows):  # rank 0: row j of process r is image j world + r
        rows = rows.view(procs.world, m, -1).transpose(0, 1).flatten(0, 1)[:n].numpy()
        samples = fid.add_outputs(fid.Side("the samples"), net, which, rows[:, :2048], rows[:, 2048:])
        return fid.compute_metrics(samples, fid_ctx.reference, which, procs.device)
    try:  # every cross-process step inside an agreement: a failure on any process fails them all
        rows = procs.all_or_none(outputs)
        rows = procs.all_or_none(procs.gather, rows) if procs.ddp else rows
        return dict(ema=ema, cfg_scale=w, sampler=cfg.sampler, sample_steps=cfg.sample_steps, time_shift=cfg.time_shift,
                    num_samples=n, **procs.all_or_none(lambda: metrics(rows) if procs.rank == 0 else {}))
    finally:
        net.cpu()  # the Inception does not stay in GPU memory between evaluations


def write_samples(models, n, cfg, procs, out_dir, fid_ctx=None):
    """--sample, and online evaluation without a reference: each setting's npz, grid (PNGs) in out_dir; metrics."""
    rows, mine = [], range(procs.rank, n, procs.world)
    for (d, model), w in itertools.product(models.items(), cfg.cfg_scale):
        tag = "" if len(models) * len(cfg.cfg_scale) == 1 else f"_ema{d}_cfg{w:g}"

        def shard():  # this process's images by batch, and a file of them for rank 0 to merge
            batches = list(my_images(model, w, n, cfg, procs))
            images = np.concatenate(batches or [np.zeros((0, 1, 1, 3), np.uint8)])  # (none when n < world)
            os.makedirs(os.path.join(out_dir, f"images{tag}") if cfg.save_pngs else out_dir, exist_ok=True)
            for i, image in zip(mine, images if cfg.save_pngs else []):
                Image.fromarray(image).save(os.path.join(out_dir, f"images{tag}", f"{i:06d}.png"))
            np.savez(os.path.join(out_dir, f"samples{tag}_rank{procs.rank}.npz"), idx=mine, arr_0=images)
            return batches
        batches = procs.all_or_none(shard)
        procs.all_or_none(merge_samples, n, os.path.join(out_dir, f"samples{tag}.npz"), model.num_classes, procs)
        rows += [measure(batches, n, d, w, fid_ctx, cfg, procs)] if fid_ctx else []
    return rows


def merge_samples(n, path, classes, procs):  # rank 0: the shards -> one ADM npz in image order, and its grid
    if procs.rank:
        return
    for r in range(procs.world):  # in image order: the same file for any number of processes
        with np.load(path.replace(".npz", f"_rank{r}.npz")) as part:
            out = np.zeros((n, *part["arr_0"].shape[1:]), np.uint8) if r == 0 else out
            out[part["idx"]] = part["arr_0"]
        os.remove(path.replace(".npz", f"_rank{r}.npz"))
    np.savez(path, arr_0=out, arr_1=np.arange(n) % classes)
    save_grid(out[:grid_shape(min(n, 100), classes)[0]], path.replace("samples", "grid")[:-3] + "png", classes)
    print(f"wrote {path} ({n} images) and its grid{grid_shape(n, classes)[2]}")


@torch.no_grad()
def sample_main(cfg):
    """The sampling program (--sample): a checkpoint's EMA model(s) -> samples, grids and, with --fid_ref, eval.json."""
    procs = setup_dist(cfg)
    path = cfg.ckpt or os.path.join(cfg.out_dir, "ckpt.pt")
    models, conf, step = load_denoiser(path, cfg.unsafe_load, cfg.ema_decay)
    held = {k: conf[k] for k in RUN_SAMPLING if k in (conf or {}) and k not in getattr(cfg, "given", ())}
    cfg = dataclasses.replace(cfg, **held)  # the run's sampling settings where no flag gives others
    for m in models.values():
        m.to(procs.device).compile() if cfg.compile else m.to(procs.device)
    fid_ctx = fid_setup(cfg, procs) if cfg.fid_ref else None
    rows = write_samples(models, cfg.num_samples, cfg, procs, cfg.out_dir, fid_ctx)
    if procs.rank == 0 and rows:  # eval.json: a list of rows, appended to; the table marks the best FID
        out, rows = os.path.join(cfg.out_dir, "eval.json"), [dict(ckpt=path, step=step, **r) for r in rows]
        with open(out + ".tmp", "w") as f:
            json.dump((json.load(open(out)) if os.path.isfile(out) else []) + rows, f, indent=1)
        os.replace(out + ".tmp", out)
        print(fid.table(rows) + f"\nappended {len(rows)} row(s) to {out}")
    if procs.ddp:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: train()'s own step and sampling, timed; the step's FLOPs counted by PyTorch; MFU on CUDA.

def bench(cfg):  # -> the numbers it prints
    import resource  # on the CPU, peak memory is the process's peak resident set
    from torch.utils.flop_counter import FlopCounterMode
    procs, cfg = setup_dist(cfg), dataclasses.replace(cfg, num_classes=cfg.num_classes or 1000)  # no data: ImageNet's
    device, cuda, B, S = procs.device, procs.device.type == "cuda", cfg.batch_size, cfg.image_size
    model, emas, loss_fn, opt = build(dataclasses.replace(cfg, perceptual_init="random"), device,
                                      log=lambda m: None)  # random perceptual weights: the same cost
    img, y = torch.randint(0, 256, (B, 3, S, S), dtype=torch.uint8), torch.randint(0, cfg.num_classes, (B,))
    batches, net = itertools.repeat((img.pin_memory() if cuda else img, y, [])), DenoiserAndLoss(model, loss_fn)

    def ms(fn, n=cfg.bench_steps):  # ms per call after two warm-up calls
        for i in range(n + 2):
            if i == 2:
                torch.cuda.synchronize() if cuda else None
                t0 = time.perf_counter()
            fn()
        torch.cuda.synchronize() if cuda else None
        return (time.perf_counter() - t0) / n * 1e3

    step = lambda: train_step(net, opt, emas, batches, 0, cfg, procs, Meter())  # exactly train()'s step
    with FlopCounterMode(display=False) as counter:  # matmuls, convolutions and attention, forward and backward
        step()
    torch.cuda.reset_peak_memory_stats() if cuda else None
    step_ms, flops = ms(step), counter.get_total_flops()
    mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sample_ms = ms(lambda: sample_images(next(iter(emas.values())), range(B), cfg, device, cfg.cfg_scale[0]), n=1)
    ran = ("compiled" if cfg.compile else "eager") + (", grad_ckpt" if cfg.grad_ckpt else "")
    print(f"{cfg.model} {S}px batch {B} on {device}, {ran}: train {B / step_ms * 1e3:.1f} img/s ({step_ms:.1f} "
          f"ms/step, {flops / 1e12:.3g} TFLOP/step), peak memory {mem / 2**30:.2f} GiB; sampling ({cfg.sampler} "
          f"{cfg.sample_steps}, cfg {cfg.cfg_scale[0]}) {B / sample_ms * 1e3:.2f} img/s")
    if cuda:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        peak = 2 * 8192**3 / ms(lambda: a @ a, n=20) / 1e9  # the card's dense bf16 rate, measured, in TFLOP/s
        print(f"MFU {flops / step_ms / 1e9 / peak:.1%} of a measured bf16 matmul rate of {peak:.0f} TFLOP/s")
    return dict(step_ms=step_ms, flops=flops, peak_mem=mem, sample_ms=sample_ms)


# ----------------------------------------------------------------------------------------------------------------
# CLI: --train | --sample | --bench, and one flag per Config field, documented by its comment in Config.
# Precedence: Config < recipe < the checkpoint's sampling settings (--sample, in sample_main) < explicit flags.

MODES = dict(train="train; under torchrun on all processes; resumes from OUT_DIR/ckpt.pt",
             sample="sample a checkpoint: samples.npz and grid.png per setting; FID and IS with --fid_ref (eval.json)",
             bench="time the training step and sampling; peak memory, FLOPs per step (MFU on CUDA)")

RUN_SAMPLING = ("sampler", "sample_steps", "cfg_scale", "cfg_interval", "time_shift", "t_eps", "seed", "background",
                "batch_size")  # what --sample takes from the checkpoint's config where no flag gives it
SAMPLE_FLAGS = RUN_SAMPLING + ("recipe", "out_dir", "device", "compile", "num_samples", "save_pngs", "ckpt",
                               "ema_decay", "unsafe_load", "fid_ref", "fid_weights", "fid_preprocess", "metrics")


def cli(cls=Config):  # the modes, then one flag per field of the dataclass cls
    # A flag's help is its field's comment in cls's source: the source and --help say one thing, written once.
    p = argparse.ArgumentParser(description=__doc__, usage="%(prog)s (--train | --sample | --bench) [options]",
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("mode").add_mutually_exclusive_group(required=True)
    for m, text in MODES.items():
        mode.add_argument(f"--{m}", action="store_true", help=text)
    choices = dict(recipe=["auto", *RECIPES], model=list(MODELS), sampler=list(SAMPLERS), metrics=list(fid.METRICS),
                   device=["auto", "cpu", "cuda"], perceptual_init=["pretrained", "random"],
                   fid_preprocess=["adm", "pytorch-fid"])
    tuples = dict(cfg_interval=(float, 2), background=(int, 3), metrics=(str, "+"))  # (type, count); else floats
    fmt = lambda r, v: f"{r}: {' '.join(map(str, v)) if isinstance(v, tuple) else v}"  # by default, in recipe r
    src = inspect.getsource(cls)  # (a class at module level)
    lines, group, end, groups = src.splitlines(), "", 0, {}
    for n in [n for n in ast.parse(src).body[0].body if isinstance(n, ast.AnnAssign)]:  # the fields, in order
        f = cls.__dataclass_fields__[n.target.id]
        group = ([s.strip()[1:].strip() for s in lines[end:n.lineno - 1] if s.strip().startswith("#")] or [group])[-1]
        tail = lines[n.end_lineno - 1].encode()[n.end_col_offset:].decode()  # after the field (ast counts bytes)
        text, end = tail.partition("#")[2].strip(), n.end_lineno
        kind = dict(type=f.type, choices=choices.get(f.name))
        if f.type is bool:
            kind = dict(action=argparse.BooleanOptionalAction)
        elif f.type is tuple:
            kind = dict(zip(("type", "nargs"), tuples.get(f.name, (float, "+"))), choices=choices.get(f.name))
        shown = [fmt(r, v[f.name]) for r, v in dict(default={f.name: f.default}, **RECIPES).items() if f.name in v]
        groups.setdefault(group, p.add_argument_group(group)).add_argument(
            f"--{f.name}", help=f"{text} ({'; '.join(shown)})".replace("%", "%%"), **kind)
    return p


def parse_args(argv=None):
    """(Config, mode); bad values stop here, before anything is built or written, each with its own message."""
    p = cli()
    args = vars(p.parse_args(argv))
    mode = next(m for m in MODES if args.pop(m, False))
    if mode == "sample" and "ema" in args and "ema_decay" not in args:  # the obvious meaning: the EMA to sample
        args["ema_decay"] = args.pop("ema")
        print(f"note: --sample reads --ema as --ema_decay {' '.join(map(str, args['ema_decay']))}")
    if mode == "sample" and [k for k in args if k not in SAMPLE_FLAGS]:
        print(f"note: --sample ignores {', '.join('--' + k for k in args if k not in SAMPLE_FLAGS)}: the checkpoint "
              f"fixes the model, its image size and classes, and the rest is for training")
    recipe = args.pop("recipe", "auto")
    if recipe == "auto":
        recipe = "xl-80ep" if args.get("data_path") or args.get("ckpt") else "demo"
    conf = {**RECIPES[recipe], "recipe": recipe}
    if recipe == "demo" and torch.cuda.is_available() and args.get("device") != "cpu":
        conf.update(DEMO_CUDA)  # a GPU trains the demo longer and on larger batches in the same minutes
    cfg = Config(**conf | {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    cfg.given = frozenset(args)  # the fields the flags set, which sample_main keeps (not a field: never saved)
    for message in flag_errors(cfg, mode):
        p.error(message)
    return cfg, mode


def flag_errors(cfg, mode):  # a message for each bad value, in order; parse_args stops at the first
    for k in ("batch_size", "grad_accum", "sample_steps", "num_samples", "ckpt_every", "log_every", "image_size",
              "bench_steps", "epochs", "lr", "time_shift"):
        if getattr(cfg, k) <= 0:
            yield f"--{k} must be positive, got {getattr(cfg, k):g}"
    for k in ("max_steps", "keep_every", "eval_every", "sample_every", "seed", "num_classes"):
        if getattr(cfg, k) < 0:
            yield f"--{k} must be 0 or more, got {getattr(cfg, k)}"
    for k in ("fid_ref", "fid_weights", "dino_path", "vgg_path", "data_path"):
        if getattr(cfg, k) and not os.path.exists(getattr(cfg, k)):
            yield f"--{k} {getattr(cfg, k)}: no such file or folder"
    for k, v in dict(ema=cfg.ema, ema_decay=cfg.ema_decay, label_dropout=(cfg.label_dropout,)).items():
        if not all(0 <= d < 1 for d in v):
            yield f"--{k} must be in [0, 1), got {' '.join(map(str, v))}"
    if cfg.cfg_interval[0] > cfg.cfg_interval[1]:
        yield f"--cfg_interval LO HI needs LO <= HI, got {cfg.cfg_interval[0]:g} {cfg.cfg_interval[1]:g}"
    if not all(0 <= c <= 255 for c in cfg.background):
        yield f"--background R G B takes values in 0..255, got {' '.join(map(str, cfg.background))}"
    world, K = int(os.environ.get("WORLD_SIZE", 1)), cfg.grad_accum
    if cfg.batch_size % (world * K) and mode != "sample":  # (sampling: batch_size // world each)
        yield f"--batch_size {cfg.batch_size}: not a multiple of processes x --grad_accum = {world} x {K} = {world * K}"
    if cfg.device == "cuda" and not torch.cuda.is_available():
        yield "--device cuda: PyTorch sees no GPU on this machine (torch.cuda.is_available() is False)"
    if cfg.image_size % 16:
        yield f"--image_size {cfg.image_size} is not a multiple of 16, the patch size of {cfg.model}"
    if cfg.repa_layer >= MODELS[cfg.model]["depth"]:
        yield f"--repa_layer {cfg.repa_layer} must be below {MODELS[cfg.model]['depth']}, the depth of {cfg.model}"
    if (cfg.eval_samples if mode == "train" and cfg.eval_every else cfg.num_samples if cfg.fid_ref else 2) < 2:
        yield "FID needs at least 2 samples (--eval_samples, --num_samples)"


def main(argv=None):
    cfg, mode = parse_args(argv)
    {"train": train, "sample": sample_main, "bench": bench}[mode](cfg)


if __name__ == "__main__":
    main()
