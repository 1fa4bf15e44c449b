r"""
PixelGen (arXiv 2602.02493) in one file: pixel-space diffusion with perceptual supervision.

    python pixelgen.py --train                    # demo: toy shapes, minutes on a CPU
    torchrun --nproc_per_node=8 pixelgen.py --train --data_path /data/imagenet/train
    torchrun --nproc_per_node=8 pixelgen.py --sample --ckpt PixelGen_XL_80ep.ckpt \
        --unsafe_load --num_samples 50000 --fid_ref VIRTUAL_imagenet256_labeled.npz

Notation (t = 0 is pure noise, t = 1 the clean image):
    x       clean image in [-1, 1], (B, 3, H, W)
    eps     Gaussian noise, like x
    t       time in [0, 1]
    y       class label; y = num_classes is the null class of CFG
    x_t     = t x + (1 - t) eps
    x_hat   = net(x_t, t, y), the clean image
    v       = (x - x_t) / (1 - t), v_hat = (x_hat - x_t) / (1 - t)

The method, top to bottom:
    x-prediction JiT denoiser        JiT                          Eq. (1)
    path, training time t            interpolate, sample_t        Eq. (2)
    velocities                       x_to_v                       Eqs. (3)-(4)
    flow-matching loss L_FM          PixelGenLoss.forward, fm     Eq. (5)
    total loss, noise gate g(t)      PixelGenLoss.forward, loss   Eq. (6)
    LPIPS of the gated samples       PixelGenLoss.forward, lpips  Eq. (7)
    P-DINO of the gated samples      PixelGenLoss.forward, pdino  Eq. (8)
    REPA alignment                   PixelGenLoss.forward, repa   Eq. (9)
    adaptive weight w_ad             PixelGenLoss.adapt
    one training step                train_step                   Algorithm 1
    Heun / Euler sampler, CFG        sample
    time shift                       time_grid
Then the engineering. NOTE(official) marks a deliberate difference from the released code.
"""
import argparse
import contextlib
import copy
import dataclasses
import datetime
import fcntl
import itertools
import json
import math
import os
import signal
import sys
import time
import traceback
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.serialization
from PIL import Image
from tqdm import tqdm

import dino as dinov2
import fid

# Model: JiT (arXiv 2511.13720), a plain ViT on 16x16 pixel patches that outputs the clean image;
# the constructor keywords are the official ones.

# preset -> constructor keywords (the run gives input_size and num_classes)
MODELS = {
    "JiT-B/16": dict(depth=12, hidden_size=768, num_heads=12,
                     bottleneck_dim=128, in_context_start=4),
    "JiT-L/16": dict(depth=24, hidden_size=1024, num_heads=16,
                     bottleneck_dim=128, in_context_start=8),
    "JiT-H/16": dict(depth=32, hidden_size=1280, num_heads=16,
                     bottleneck_dim=256, in_context_start=10),
    # 459M parameters
    "PixelGen-L/16": dict(depth=24, hidden_size=1024, num_heads=16,
                          bottleneck_dim=128, in_context_start=8),
    # 676M parameters
    "PixelGen-XL/16": dict(depth=28, hidden_size=1152, num_heads=16,
                           use_bottleneck=False, in_context_start=8, proj_drop=0.1),
    # small presets for CPU work (ours)
    "PixelGen-S/16": dict(depth=12, hidden_size=384, num_heads=6,
                          bottleneck_dim=128, in_context_start=4),
    "PixelGen-T/16": dict(depth=6, hidden_size=192, num_heads=3, bottleneck_dim=64,
                          in_context_len=8, in_context_start=2),
}
# REPA aligns the tokens entering this block (official: 8 for L and XL; REPA: 4 for B)
REPA_LAYER = {"JiT-B/16": 4, "JiT-L/16": 8, "JiT-H/16": 10, "PixelGen-L/16": 8,
              "PixelGen-XL/16": 8, "PixelGen-S/16": 4, "PixelGen-T/16": 2}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # in fp32, returned in the input dtype (as official)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rope_2d(grid, head_dim, n_prefix, theta=10000.0):
    """2-D RoPE angles (cos, sin), (n_prefix + grid^2, head_dim / 2): per pair of a head, the
    first half turn by the row, the second by the column; prefix tokens by 0."""
    d = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, d, 2)[: d // 2].float() / d)  # (d/2,)
    f = torch.outer(torch.arange(grid).float(), freqs)                   # (grid, d/2)
    rows = f[:, None].expand(grid, grid, d // 2)
    cols = f[None].expand(grid, grid, d // 2)
    ang = torch.cat([rows, cols], -1).flatten(0, 1)                      # (grid^2, d)
    cos = torch.cat([torch.ones(n_prefix, d), ang.cos()])
    sin = torch.cat([torch.zeros(n_prefix, d), ang.sin()])
    return cos, sin


def apply_rope(x, cos, sin):
    # x (B, heads, N, head_dim): each pair turns by its angle, in real arithmetic (compilable)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, heads, N, head_dim/2)
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1)
    return out.flatten(-2)                                  # (B, heads, N, head_dim)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        # qk-norm per head
        self.q_norm = RMSNorm(dim // num_heads)
        self.k_norm = RMSNorm(dim // num_heads)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rope):
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)               # 3 x (B, h, N, D/h)
        q = apply_rope(self.q_norm(q), *rope)
        k = apply_rope(self.k_norm(k), *rope)
        p = self.attn_drop if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        x = x.transpose(1, 2).reshape(B, N, D)              # (B, N, D)
        return self.proj_drop(self.proj(x))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden, drop=0.0):
        super().__init__()
        # 2/3 of the width: the FLOPs of a 4x GELU MLP
        hidden = int(hidden * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, -1)
        return self.w3(self.ffn_dropout(F.silu(x1) * x2))


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Block(nn.Module):
    # pre-norm transformer block, adaLN-Zero conditioning on c
    def __init__(self, dim, num_heads, mlp_ratio, attn_drop, proj_drop):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop, proj_drop)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio), proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):  # x (B, N, D), c (B, D)
        mods = self.adaLN_modulation(c).chunk(6, -1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        a = self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + gate1.unsqueeze(1) * a
        m = self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x + gate2.unsqueeze(1) * m


class FinalLayer(nn.Module):
    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*3)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        # t (B,) in [0, 1], raw (not x1000); [cos, sin] order
        half = self.freq_dim // 2
        k = torch.arange(half, device=t.device)
        freqs = torch.exp(-math.log(10000) * k / half)
        args = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))  # (B, D)


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        # the last row is CFG's null class
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):
        return self.embedding_table(y)


class PatchEmbed(nn.Module):
    # patches to tokens: one conv, or JiT's bottleneck p*p*3 -> bottleneck_dim -> D
    def __init__(self, patch, in_ch, dim, bottleneck_dim=None):
        super().__init__()
        if bottleneck_dim:
            self.proj1 = nn.Conv2d(in_ch, bottleneck_dim, patch, patch, bias=False)
            self.proj2 = nn.Conv2d(bottleneck_dim, dim, 1)
        else:
            self.proj1 = nn.Conv2d(in_ch, dim, patch, patch)

    def forward(self, x):  # (B, 3, H, W)
        x = self.proj1(x)
        if hasattr(self, "proj2"):
            x = self.proj2(x)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


def sincos_pos_embed(dim, grid):
    # the fixed 2-D sin-cos table (grid^2, dim): [column half, row half], each [sin, cos]
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    axis = np.arange(grid, dtype=np.float32)
    cols, rows = np.meshgrid(axis, axis)
    emb = []
    for p in (cols, rows):
        angles = np.outer(p.reshape(-1), omega)
        emb += [np.sin(angles), np.cos(angles)]
    return torch.from_numpy(np.concatenate(emb, 1)).float()


class JiT(nn.Module):
    # --grad_ckpt: rerun each block in backward, less memory for ~1/3 more compute
    grad_ckpt = False

    def __init__(self, input_size=256, patch_size=16, in_channels=3, hidden_size=1024,
                 depth=24, num_heads=16, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0,
                 num_classes=1000, bottleneck_dim=128, use_bottleneck=True,
                 in_context_len=32, in_context_start=8):
        super().__init__()
        assert input_size % patch_size == 0 and hidden_size % num_heads == 0
        assert in_context_len == 0 or in_context_start < depth
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.grid = input_size // patch_size
        pos = sincos_pos_embed(hidden_size, self.grid)[None]
        self.pos_embed = nn.Parameter(pos, requires_grad=False)
        if in_context_len > 0:
            ic = torch.randn(1, in_context_len, hidden_size) * 0.02
            self.in_context_posemb = nn.Parameter(ic)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        bottleneck = bottleneck_dim if use_bottleneck else None
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, bottleneck)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            # dropout only in the middle half of the blocks (as official)
            mid = depth // 4 <= i < depth // 4 * 3
            drops = (attn_drop, proj_drop) if mid else (0.0, 0.0)
            self.blocks.append(Block(hidden_size, num_heads, mlp_ratio, *drops))
        self.final_layer = FinalLayer(hidden_size, patch_size**2 * in_channels)
        # RoPE without and with the in-context prefix (not in the state dict)
        head_dim = hidden_size // num_heads
        for name, n_prefix in (("rope", 0), ("rope_ic", in_context_len)):
            cos, sin = rope_2d(self.grid, head_dim, n_prefix)
            self.register_buffer(name + "_cos", cos, persistent=False)
            self.register_buffer(name + "_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        # as official: xavier linears, N(0, 0.02) embeddings, adaLN-Zero, zero output
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in self.x_embedder.children():
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # x_hat = 0 at init
        zero = [b.adaLN_modulation[-1] for b in self.blocks]
        zero += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x_t, t, y, return_layer=None):
        """x_t (B, 3, H, W), t (B,), y (B,) -> x_hat (B, 3, H, W); with return_layer=k, also
        the REPA feature h (B, N, D): the image tokens entering block k."""
        y_emb = self.y_embedder(y)
        c = self.t_embedder(t) + y_emb                    # (B, D)
        x = self.x_embedder(x_t) + self.pos_embed         # (B, N, D)
        L = self.in_context_len
        start = self.in_context_start
        h = None
        # Activation checkpointing keeps each block's input and reruns the block in backward
        # (dropout masks replayed); only when a backward will come.
        ckpt = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if i == return_layer:
                h = x[:, L:] if i > start else x
            if L > 0 and i == start:
                # prepend the class tokens
                ic = y_emb[:, None] + self.in_context_posemb
                x = torch.cat([ic, x], 1)                 # (B, L + N, D)
            # the class tokens' angle is 0: no rotation
            rope = (self.rope_cos, self.rope_sin)
            if L > 0 and i >= start:
                rope = (self.rope_ic_cos, self.rope_ic_sin)
            if ckpt:
                x = torch.utils.checkpoint.checkpoint(block, x, c, rope, use_reentrant=False)
            else:
                x = block(x, c, rope)
        x = self.final_layer(x[:, L:], c)                 # (B, N, p*p*3)
        # N = g x g patches of p x p pixels
        p = self.patch_size
        g = self.grid
        x = x.view(-1, g, g, p, p, self.in_channels)      # (B, rows, cols, p, p, 3)
        x = x.permute(0, 5, 1, 3, 2, 4)
        x_hat = x.reshape(-1, self.in_channels, g * p, g * p)  # (B, 3, H, W)
        if return_layer is None:
            return x_hat
        return x_hat, h


# Flow (Eqs. 1-5): the straight path from noise (t = 0) to the image (t = 1).

def sample_t(n, P_mean=-0.8, P_std=0.8, generator=None):
    # training times, logit-normal: t = sigmoid(P_mean + P_std n), n ~ N(0, 1)
    # NOTE(official): drawn on the host (official: the GPU), so g(t) needs no device sync
    return torch.sigmoid(torch.randn(n, generator=generator) * P_std + P_mean)


def interpolate(x, eps, t):
    # Eq. (2): x_t = t x + (1 - t) eps
    t = t.view(-1, 1, 1, 1)
    return t * x + (1 - t) * eps


def x_to_v(x_hat, x_t, t, t_eps=0.05):
    # Eqs. (3)-(4): the velocity that carries x_t to x_hat by t = 1; 1 - t at least t_eps
    return (x_hat - x_t) / (1 - t.view(-1, 1, 1, 1)).clamp_min(t_eps)


# Objective (Eqs. 5-9):
#     L = L_FM + w_ad g(t) (0.1 L_LPIPS + 0.01 L_PDINO) + 0.5 L_REPA,   g(t) = 1[t >= 0.3]

def to_device(u, device):
    # a host tensor to the device; the host does not wait (pinned memory on CUDA)
    if device.type == "cuda":
        u = u.pin_memory()
    return u.to(device, non_blocking=True)


class PixelGenLoss(nn.Module):
    """The objective of a denoiser. Owns the REPA projector and w_ad; uses the frozen DINOv2 and
    LPIPS, outside its module tree (not saved, trained or seen by DDP). A term of weight 0 runs
    no network."""
    # steps between updates of w_ad (official)
    adapt_every = 50

    def __init__(self, hidden_size, dino, lpips, *, patch_size=16, lpips_weight=0.1,
                 pdino_weight=0.01, repa_weight=0.5, repa_layer=8, gate_t=0.3, t_eps=0.05,
                 num_classes=1000, adaptive_from=-1):
        super().__init__()
        self.lpips_weight = lpips_weight
        self.pdino_weight = pdino_weight
        self.repa_weight = repa_weight
        self.repa_layer = repa_layer
        self.gate_t = gate_t
        self.t_eps = t_eps
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.adaptive_from = adaptive_from
        self.proj = None
        if repa_weight:
            # REPA's MLP: JiT tokens h -> DINOv2 features
            D = hidden_size
            self.proj = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D), nn.SiLU(),
                                      nn.Linear(D, dino.embed_dim))
        # w_ad: 1 unless adapted
        self.register_buffer("w_ad", torch.ones(()))
        self.__dict__["dino"] = dino if pdino_weight or repa_weight else None
        self.__dict__["lpips"] = lpips if lpips_weight else None

    def forward(self, model, x, y, t, eps, drop, adapt=False):
        """The loss of images x (b, 3, H, W), labels y (b,), times t (b,) and label dropout drop
        (b,) on the host, noise eps; each term a mean over this batch. -> the loss and its terms
        (detached). adapt: update w_ad first."""
        device = x.device
        # Eq. (6)'s gate g(t) = 1[t >= gate_t]: no perceptual loss where the noise is too high
        # for a sharp prediction. On the host: its count needs no device sync.
        gated = (t >= self.gate_t).nonzero()[:, 0]
        n_gated = len(gated)
        gated = to_device(gated, device)
        t = to_device(t, device)
        # CFG: some labels become the null class
        y = torch.where(to_device(drop, device), self.num_classes, y)
        x_t = interpolate(x, eps, t)                                  # Eq. (2)
        repa = self.proj is not None
        out = model(x_t, t, y, return_layer=self.repa_layer if repa else None)  # Eq. (1)
        x_hat, h = out if repa else (out, None)
        v_hat = x_to_v(x_hat, x_t, t, self.t_eps)
        v = x_to_v(x, x_t, t, self.t_eps)
        zero = x.new_zeros((), dtype=torch.float32)
        L = dict(fm=(v_hat - v).pow(2).mean(), lpips=zero, pdino=zero, repa=zero)  # Eq. (5)
        z = None
        if repa:
            with torch.no_grad():
                z = self.features(x)                               # (b, N, 768)
            # Eq. (9), not gated: 1 - cos over the features, a mean over samples and tokens
            L["repa"] = (1 - F.cosine_similarity(self.proj(h).float(), z, dim=-1)).mean()
        # NOTE(official): the nets see only the gated samples (official: all, masked)
        if n_gated:
            x_hat_g = x_hat[gated]
            x_g = x[gated]
            if self.lpips is not None:
                lp = self.lpips(self.lpips_scale(x_hat_g), self.lpips_scale(x_g))
                L["lpips"] = lp.float().mean()                             # Eq. (7)
            # NOTE(official): the released P-DINO mask broadcasts (B, N) x (B, 1, 1): ungated
            if self.pdino_weight:
                with torch.no_grad():
                    z_g = z[gated] if z is not None else self.features(x_g)
                cos = F.cosine_similarity(self.features(x_hat_g), z_g, dim=-1)
                L["pdino"] = (1 - cos).mean()                                  # Eq. (8)
        if adapt:
            self.adapt(model, L)
        perceptual = self.lpips_weight * L["lpips"] + self.pdino_weight * L["pdino"]
        loss = L["fm"] + self.w_ad * perceptual + self.repa_weight * L["repa"]  # Eq. (6)
        return dict(loss=loss, **{k: v.detach() for k, v in L.items()})

    def features(self, u):
        # f(u): DINOv2's last-block patch tokens (b, N, 768), one per JiT token; a compiled
        # DINOv2 makes one graph for any batch size, 1 included
        torch._dynamo.decorators.mark_unbacked(u, 0)
        # NOTE(official): resized by the model's patch (official: 16): tokens align for any
        return self.dino(u, self.patch_size).float()

    def lpips_scale(self, u):
        # LPIPS sees the image at patch-16 scale, as official; any batch size, one graph
        torch._dynamo.decorators.mark_unbacked(u, 0)
        size = u.shape[-1] * 16 // self.patch_size
        if size == u.shape[-1]:
            return u
        return F.interpolate(u, size=(size, size), mode="bilinear", antialias=True)

    def adapt_due(self, step):
        # the 160-epoch recipe: every 50 steps from step adaptive_from
        due = 0 <= self.adaptive_from <= step and step % self.adapt_every == 0
        return due and (self.lpips is not None or bool(self.pdino_weight))

    def adapt(self, model, L):
        """w_ad <- 0.8 w_ad + 0.2 w, w = |grad_W L_FM| / (|grad_W L_perc| + 1e-4) in [0, 100] at the
        last linear layer W: the perceptual gradient keeps pace with the FM gradient.
        NOTE(official): w_ad is checkpointed and averaged over processes (official: per GPU)."""
        W = model.final_layer.linear.weight
        perceptual = self.lpips_weight * L["lpips"] + self.pdino_weight * L["pdino"]
        g_fm = torch.autograd.grad(L["fm"], W, retain_graph=True)[0].norm()
        # as official, also with nothing gated
        g_p = 0.0
        if perceptual.requires_grad:
            g_p = torch.autograd.grad(perceptual, W, retain_graph=True)[0].norm()
        w = (g_fm / (g_p + 1e-4)).clamp(0, 100).detach()
        if dist.is_initialized():
            dist.all_reduce(w)
            w /= dist.get_world_size()
        self.w_ad.mul_(0.8).add_(0.2 * w)


# One training step (Algorithm 1). A sample's draws are a function of (seed, step, its position
# in the global batch): a resumed run draws the same, and so does any split of the batch.

def seed_for(*keys):
    # a 32-bit seed of non-negative integer keys (CPU generators use 32 bits)
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def draw(cfg, step):
    # on the host, for the global batch: times t, label dropout, flips (JiT's recipe)
    gen = torch.Generator().manual_seed(seed_for(cfg.seed, step))
    t = sample_t(cfg.batch_size, cfg.P_mean, cfg.P_std, gen)
    drop = torch.rand(cfg.batch_size, generator=gen) < cfg.label_dropout
    flip = torch.rand(cfg.batch_size, generator=gen) < 0.5
    return t, drop, flip


def noise(shape, seeds, device):
    # eps (len(seeds), *shape) ~ N(0, I), sample i from seeds[i]
    gen = torch.Generator(device)
    eps = [torch.randn(shape, generator=gen.manual_seed(s), device=device) for s in seeds]
    return torch.stack(eps)


@torch.no_grad()
def update_ema(emas, model):
    # each EMA: ema <- d ema + (1 - d) theta
    theta = list(model.parameters())
    for d, ema in emas.items():
        # NOTE(official): one fused lerp, ema + (1 - d)(theta - ema), not mul and add
        torch._foreach_lerp_(list(ema.parameters()), theta, 1 - d)


def train_step(net, opt, emas, batches, step, cfg, procs, meter):
    """Algorithm 1 on a global batch. Each of this process's K micro-batches of b images has
    its own means; their gradients are averaged (by DDP over the processes, on the last one);
    then one AdamW step and the EMA update."""
    K = cfg.grad_accum
    b = cfg.batch_size // (procs.world * K)
    device = procs.device
    module = net.module if procs.ddp else net
    adapt = module.loss_fn.adapt_due(step)
    t, drop, flip = draw(cfg, step)
    # for the log: the gated fraction of the global batch
    gate = (t >= cfg.gate_t).float().mean().item()
    for k in range(K):
        img, y, skipped = next(batches)
        # this micro-batch's positions in the global batch
        first = (procs.rank * K + k) * b
        pos = slice(first, first + b)
        x = img.to(device, non_blocking=True).float() / 127.5 - 1  # uint8 -> [-1, 1]
        if cfg.flip:
            x = torch.where(to_device(flip[pos], device).view(-1, 1, 1, 1), x.flip(-1), x)
        seeds = [seed_for(cfg.seed, step, i) for i in range(first, first + b)]
        eps = noise(x.shape[1:], seeds, device)
        # dropout masks: per process and micro-batch
        torch.manual_seed(seed_for(cfg.seed, step, procs.rank, k))
        sync = k == K - 1 or not procs.ddp
        # bf16 autocast on CUDA (forward passes only), fp32 on the CPU
        bf16 = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")
        with contextlib.nullcontext() if sync else net.no_sync():
            with bf16:
                y = y.to(device, non_blocking=True)
                out = net(x, y, t[pos], eps, drop[pos], adapt=adapt and k == 0)
            (out["loss"] / K).backward()
        meter.add(out, skipped, gate)
    opt.step()
    opt.zero_grad(set_to_none=True)
    update_ema(emas, module.model)


# Samplers (official HeunSamplerJiT(exact_henu=True), EulerSamplerJiT): t = 0 (noise) -> 1.

SAMPLERS = ("heun", "euler")


def time_grid(steps, shift=1.0):
    # N uniform steps on [0, 1 - 1/N], then 1; shifted towards the noise by `shift`
    s = torch.cat([torch.linspace(0.0, 1 - 1.0 / steps, steps), torch.ones(1)])
    return s / (s + (1 - s) * shift)


@torch.no_grad()
def sample(model, noise, y, steps=50, sampler="heun", cfg_scale=1.0, cfg_interval=(0.1, 0.9),
           time_shift=2.0, t_eps=0.05):
    # integrates dx/dt = v_hat(x, t) from noise (t = 0) to an image x (t = 1)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {', '.join(SAMPLERS)}")
    # the grid on the host: the CFG tests need no sync
    ts = time_grid(steps, time_shift)
    lo, hi = cfg_interval
    in_interval = (ts > lo) & (ts <= hi)
    guided = (in_interval & (cfg_scale != 1.0)).tolist()
    dts = ts.diff().to(noise.device)
    ts = ts.to(noise.device)
    null = torch.full_like(y, model.num_classes)

    def velocity(x, t, guide):
        # a contiguous t, as in training: one layout for a compiled model
        t = t.repeat(len(x))
        # NOTE(official): unguided, one branch (official: both, even at scale 1)
        if not guide:
            return x_to_v(model(x, t, y), x, t, t_eps)
        x2 = torch.cat([x, x])
        t2 = t.repeat(2)
        x_hat = model(x2, t2, torch.cat([null, y]))
        v_u, v_c = x_to_v(x_hat, x2, t2, t_eps).chunk(2)
        # CFG in v-space
        return v_u + cfg_scale * (v_c - v_u)

    x = noise
    for i in range(steps):
        v = velocity(x, ts[i], guided[i])
        # Heun: the mean with the slope at the end of the Euler step (the same CFG decision).
        # The last step is Euler: the net never sees t = 1.
        if sampler == "heun" and i < steps - 1:
            v_next = velocity(x + v * dts[i], ts[i + 1], guided[i])
            v = (v + v_next) / 2
        x = x + v * dts[i]
    return x


# =================================================================================================
# Engineering: config and recipes, pretrained weights, data, training (DDP, checkpoints,
# preemption), sampling and evaluation, command line.
# =================================================================================================

@dataclasses.dataclass
class Config:
    """Every field is a flag (--name); a recipe changes a few defaults; flags win."""
    # what to run
    recipe: str = "auto"             # a key of RECIPES; auto: demo without data, else xl-80ep
    model: str = "PixelGen-XL/16"    # a key of MODELS; official
    image_size: int = 256            # paper: ImageNet 256x256
    num_classes: int = 0             # 0 = the data's
    data_path: str = ""              # ImageNet-style class folders; "" = demo
    background: tuple = (255, 255, 255)  # under transparent pixels: white, as browsers
    flip: bool = False               # random flips: off in PixelGen, on in JiT
    out_dir: str = "runs/pixelgen"   # the run: checkpoints, logs, grids, samples
    device: str = "auto"             # auto (cuda if there) | cpu | cuda
    seed: int = 1234                 # official seed_everything(1234)
    # optimisation (official PixelGen_XL.yaml)
    batch_size: int = 256            # global B = processes x grad_accum x micro-batch
    grad_accum: int = 1              # micro-batches per process and step
    lr: float = 1e-4                 # AdamW, constant, no warmup
    beta1: float = 0.9               # official (torch's default)
    beta2: float = 0.999             # official (torch's default)
    weight_decay: float = 0.0        # official
    epochs: int = 80                 # paper: 80 epochs, about 400k steps
    max_steps: int = 0               # > 0 overrides epochs
    ema: tuple = (0.9999,)           # EMA decay(s), every step: official
    num_workers: int = 8             # data loader workers per process
    compile: bool = False            # torch.compile what runs every step
    grad_ckpt: bool = False          # activation checkpointing
    # objective (official training_repa_JiT_LPIPS_DINO_NoiseGating.py)
    P_mean: float = -0.8             # t = sigmoid(P_mean + P_std n): official
    P_std: float = 0.8               # official
    t_eps: float = 0.05              # 1 - t >= t_eps: official
    label_dropout: float = 0.1       # official null_condition_p
    lpips_weight: float = 0.1        # paper lambda_1; 0 skips LPIPS
    pdino_weight: float = 0.01       # paper lambda_2; 0 skips P-DINO
    repa_weight: float = 0.5         # official feat_loss_weight; 0 skips REPA
    repa_layer: int = -1             # -1 = the preset's (REPA_LAYER)
    gate_t: float = 0.3              # g(t) = 1[t >= gate_t]: official
    adaptive_from: int = -1          # >= 0: w_ad from this step (official 160 ep: 400k)
    perceptual_init: str = "pretrained"  # | random (tests, smoke runs)
    dino_path: str = ""              # dinov2_vitb14_pretrain.pth; "" = torch hub cache
    vgg_path: str = ""               # vgg16-397923af.pth; "" = torch hub cache
    # sampling and evaluation (paper Sec. 4; official HeunSamplerJiT)
    sampler: str = "heun"            # heun | euler: official
    sample_steps: int = 50           # paper: 50
    cfg_scale: tuple = (1.0,)        # 1 = none (FID 5.11); 160 ep: 2.25; several: a sweep
    cfg_interval: tuple = (0.1, 0.9)  # CFG while lo < t <= hi: official
    time_shift: float = 2.0          # XL: 2.0; L/16 ablations: 1.0
    num_samples: int = 64            # --sample: images per setting
    save_pngs: bool = False          # --sample: also a PNG per image
    ckpt: str = ""                   # --sample: a .pt or .ckpt; "" = OUT_DIR/ckpt.pt
    ema_decay: tuple = ()            # --sample: the EMAs to sample; () = the first
    unsafe_load: bool = False        # unpickle: trusted official .ckpt only
    fid_ref: str = ""                # an ADM reference npz or a folder
    fid_weights: str = ""            # pt_inception-2015-12-05-6726825d.pth; "" = hub cache
    fid_preprocess: str = "adm"      # adm (ADM suite) | pytorch-fid
    metrics: tuple = ()              # () = all that the reference allows
    eval_every: int = 0              # --train: evaluate every N steps
    eval_samples: int = 50000        # --train: images per evaluation: official
    # bookkeeping
    resume: bool = True              # continue OUT_DIR/ckpt.pt
    ckpt_every: int = 5000           # steps between checkpoints
    keep_every: int = 0              # also keep ckpt_STEP.pt (official: 100000)
    log_every: int = 100             # steps between log lines (device syncs)
    sample_every: int = 10000        # steps between sample grids


# A paper run by name, with what it changes: Table 2 (FID 5.11, 1.83), Table 5 (ablations).
RECIPES = {
    "xl-80ep": dict(keep_every=100_000),
    "xl-160ep": dict(epochs=160, cfg_scale=(2.25,), adaptive_from=400_000, keep_every=100_000),
    "l-200k": dict(model="PixelGen-L/16", max_steps=200_000, sampler="euler", time_shift=1.0),
    # a laptop demo: 4M parameters, 64 px toy shapes; a faster lr and EMA for minutes
    "demo": dict(model="PixelGen-T/16", image_size=64, batch_size=16, lr=1e-3, ema=(0.99,),
                 max_steps=500, num_workers=0, sample_steps=25, time_shift=1.0,
                 cfg_scale=(2.0,), ckpt_every=250, log_every=25, sample_every=250,
                 out_dir="runs/demo", num_samples=40),
}


# Frozen perceptual networks: DINOv2-B/14 (dino.py) and LPIPS-VGG (the lpips package).

VGG_FILE = "vgg16-397923af.pth"
VGG_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"


def make_lpips(vgg_file=None):
    # LPIPS-VGG: v0.1 heads from the lpips wheel, the VGG16 trunk from vgg_file (or random)
    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if vgg_file:
        try:
            sd = torch.load(vgg_file, map_location="cpu", weights_only=True)
            # lpips' slice2.5.weight is torchvision's features.5.weight
            keys = net.net.state_dict()
            net.net.load_state_dict({k: sd["features." + k.split(".", 1)[1]] for k in keys})
        except Exception as e:
            raise RuntimeError(f"{vgg_file} is not {VGG_FILE} ({VGG_URL}): {e}")
    return net


def random_nets(use_dino, use_lpips):
    # (DINOv2, LPIPS) with random weights, None where unused
    return dinov2.DINOv2() if use_dino else None, make_lpips() if use_lpips else None


def weight_files(cfg, procs, nets):
    """{net: path}: a flag's, else the torch hub cache (each node's first process downloads
    first); one message names every missing file."""
    known = dict(dino=(cfg.dino_path, dinov2.WEIGHTS_FILE, dinov2.WEIGHTS_URL),
                 vgg=(cfg.vgg_path, VGG_FILE, VGG_URL),
                 inception=(cfg.fid_weights, fid.FID_WEIGHTS_FILE, fid.FID_WEIGHTS_URL))

    def find():
        found = {}
        missing = []
        for net in nets:
            try:
                found[net] = dinov2.hub_file(*known[net])
            except FileNotFoundError as e:
                missing.append(str(e))
        if missing:
            raise FileNotFoundError("\n".join(missing))
        return found
    first = procs.all_or_none(lambda: None if procs.local_rank else find())
    return procs.all_or_none(lambda: find() if procs.local_rank else first)


def perceptual_nets(cfg, procs, log):
    """(cfg, dino, lpips), None where unused. Offline, the demo trains L_FM alone."""
    use_dino = bool(cfg.pdino_weight or cfg.repa_weight)
    use_lpips = bool(cfg.lpips_weight)
    nets = (None, None)
    if cfg.perceptual_init == "random":
        log("WARNING: --perceptual_init random: LPIPS and DINOv2 have RANDOM weights")
        nets = random_nets(use_dino, use_lpips)
    elif use_dino or use_lpips:
        names = ["dino"] * use_dino + ["vgg"] * use_lpips
        names += ["inception"] * bool(cfg.eval_every and cfg.fid_ref)
        try:
            files = weight_files(cfg, procs, names)
        except FileNotFoundError as e:
            if cfg.data_path:
                raise SystemExit(f"error: {e}")
            log(f"offline demo: L_FM alone, no LPIPS, P-DINO, REPA; {' '.join(str(e).split())}")
            cfg = dataclasses.replace(cfg, lpips_weight=0.0, pdino_weight=0.0, repa_weight=0.0)
            return cfg, None, None
        nets = (dinov2.load_dinov2(files["dino"]) if use_dino else None,
                make_lpips(files["vgg"]) if use_lpips else None)
    nets = [n.to(procs.device).eval().requires_grad_(False) if n else None for n in nets]
    return cfg, *nets


# Data: ImageNet-layout folders with the ADM centre crop, or drawn toy shapes for the demo.

def center_crop(img, size):
    # ADM: halve (BOX) while the short side >= 2 size, BICUBIC to size, centre crop
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top = (a.shape[0] - size) // 2
    left = (a.shape[1] - size) // 2
    return a[top: top + size, left: left + size]


def list_folder(root):
    # (classes, images per class, ignored names, paths as a numpy bytes array)
    if not os.path.isdir(root):
        raise SystemExit(f"error: --data_path {root} is not a folder")
    top = sorted(os.scandir(root), key=lambda e: e.name)
    classes = [e.name for e in top if e.is_dir() and not e.name.startswith(".")]
    ignored = [e.name for e in top if classes and e.name not in classes]
    found = [fid.scan(os.path.join(root, c)) for c in classes]
    if not classes:
        # no class folders: one class, named after the folder
        found = [fid.scan(root, recursive=False)]
        classes = [os.path.basename(os.path.abspath(root))]
    for c, (_, left_out) in zip(classes, found):
        ignored += [os.path.join(c, p) for p in left_out]
    counts = [len(files) for files, _ in found]
    empty = [c for c, n in zip(classes, counts) if n == 0]
    if empty:
        raise SystemExit(f"error: no image files in {', '.join(empty)} of {root}")
    paths = [os.fsencode(p) for files, _ in found for p in files]
    return classes, counts, ignored, np.array(paths, dtype=bytes)


class ImageFolderData(torch.utils.data.Dataset):
    """root/CLASS/.../IMAGE, class folders labelled 0..K-1 in order. An item: the uint8 image
    (3, H, W) and its label, or why it is unreadable. Rank 0 lists the files for all."""

    def __init__(self, root, size, background, procs):
        listing = [procs.rank0(list_folder, root)]
        if procs.ddp:
            dist.broadcast_object_list(listing, src=0, group=procs.ctrl)
        self.classes, self.counts, self.ignored, self.paths = listing[0]
        self.labels = np.repeat(np.arange(len(self.counts)), self.counts)
        self.size = size
        self.background = background

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        path = os.fsdecode(self.paths[i])
        try:
            image = fid.read_image(path, self.background)
            a = center_crop(Image.fromarray(image), self.size)
        except Exception as e:
            return f"{path} ({e.__cause__ or e})"
        return torch.from_numpy(a.copy()).permute(2, 0, 1), int(self.labels[i])


class ToyShapes(torch.utils.data.Dataset):
    # the demo: 10 classes of drawn shapes (shape and colour), image i of class i mod 10
    classes = ["red disc", "green square", "blue triangle", "yellow ring", "magenta cross",
               "cyan h-stripes", "orange v-stripes", "white diamond", "purple checker",
               "teal frame"]
    colors = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 40, 220),
              (40, 220, 230), (250, 140, 20), (245, 245, 245), (130, 50, 200), (0, 170, 150)]

    def __init__(self, size, n=50_000):
        self.size = size
        self.counts = [n // 10 + (k < n % 10) for k in range(10)]
        self.ignored = []

    def __len__(self):
        return sum(self.counts)

    def __getitem__(self, i):
        y = i % 10
        g = np.random.default_rng([0, i])
        s = self.size
        yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
        dy = yy - g.uniform(0.4, 0.6)
        dx = xx - g.uniform(0.4, 0.6)
        r = g.uniform(0.22, 0.32)
        d = np.sqrt(dx**2 + dy**2)
        lo = np.minimum(abs(dx), abs(dy))
        hi = np.maximum(abs(dx), abs(dy))
        edge = np.minimum(np.minimum(xx, 1 - xx), np.minimum(yy, 1 - yy))
        checker = ((xx * 6).astype(int) + (yy * 6).astype(int)) % 2 == 0
        shapes = [d < r, hi < r * 0.8, (dy < r * 0.7) & (abs(dx) < (dy + r) * 0.6),
                  abs(d - r * 0.8) < r * 0.25, (lo < r * 0.25) & (hi < r),
                  np.sin(yy * 8 * np.pi) > 0, np.sin(xx * 8 * np.pi) > 0,
                  abs(dx) + abs(dy) < r, checker, edge < 0.16]
        bg = g.uniform(0, 90, size=3)
        fg = np.clip(np.array(self.colors[y]) + g.normal(0, 15, size=3), 0, 255)
        a = np.where(shapes[y][..., None], fg, bg) + g.normal(0, 6, size=(s, s, 3))
        a = np.clip(a, 0, 255).astype(np.uint8)
        return torch.from_numpy(a).permute(2, 0, 1), y


def class_table(data):
    # for the log: images per class (the first and last 10 of more), what was left out
    table = [f"{k:6d} {n:8d}  {c}" for k, (c, n) in enumerate(zip(data.classes, data.counts))]
    if len(table) > 20:
        table = table[:10] + ["   ..."] + table[-10:]
    head = f"data: {sum(data.counts)} images in {len(data.classes)} classes\n label   images  class"
    tail = [f"ignored: {len(data.ignored)} ({', '.join(data.ignored[:5])})"] * bool(data.ignored)
    return "\n".join([head, *table, *tail])


def collate(batch):
    # (images, labels, unreadable): each unreadable item replaced by a readable one
    good = [b for b in batch if not isinstance(b, str)]
    bad = [b for b in batch if isinstance(b, str)]
    if not good:
        raise RuntimeError(f"a whole batch of unreadable images: {'; '.join(bad)}")
    good += [good[i % len(good)] for i in range(len(bad))]
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), bad


def global_batches(n, batch, world, rank, accum, seed, step=0):
    """This process's micro-batches of indices from `step` on. Step s of epoch e: positions
    [sB, (s + 1)B) of a permutation seeded by (seed, e); process r takes the r-th slice."""
    b = batch // (world * accum)
    perm = None
    for step in itertools.count(step):
        epoch, s = divmod(step, n // batch)
        if perm is None or s == 0:
            gen = torch.Generator().manual_seed(seed_for(seed, epoch))
            perm = torch.randperm(n, generator=gen)
        for k in range(accum):
            start = s * batch + (rank * accum + k) * b
            yield perm[start: start + b].tolist()


def loader(data, cfg, procs, step):
    # this process's micro-batches of uint8 images, from `step` on; workers ignore stop signals
    batches = global_batches(len(data), cfg.batch_size, procs.world, procs.rank,
                             cfg.grad_accum, cfg.seed, step)
    return iter(torch.utils.data.DataLoader(
        data, batch_sampler=batches, collate_fn=collate, num_workers=cfg.num_workers,
        worker_init_fn=quiet_worker, pin_memory=procs.device.type == "cuda"))


def quiet_worker(_):
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# Training: AdamW, fp32 EMAs, bf16 autocast on CUDA, DDP under torchrun.

# the run ends after the step: preemption (SLURM's and torchrun's SIGTERM), Ctrl-C
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclasses.dataclass
class Procs:
    """This process among the others. Decisions on the next collectives (a stop, an evaluation)
    and waits for rank 0 run on the host, in the gloo group `ctrl`."""
    ddp: bool = False
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    ctrl: object = None

    def agree(self, flag):
        # the largest of the processes' integer flags; every process calls it
        flag = torch.tensor(int(flag))
        if self.ctrl is not None:
            dist.all_reduce(flag, dist.ReduceOp.MAX, group=self.ctrl)
        return int(flag)

    def all_or_none(self, fn, *args):
        # fn(*args) on every process; if it raised on any, it raises on all
        try:
            out = fn(*args)
            err = None
        except (Exception, SystemExit) as e:
            err = e
        failed = self.agree(self.rank + 1 if err else 0)
        if err:
            raise err
        if failed:
            raise RuntimeError(f"it failed on process {failed - 1} (see its stderr)")
        return out

    def rank0(self, fn, *args):
        # fn(*args) on rank 0 while the others wait; if it raised, it raises on all
        return self.all_or_none(lambda: None if self.rank else fn(*args))

    def gather(self, u):
        # every process's host tensor u, in rank order, on rank 0 (None elsewhere)
        parts = [torch.empty_like(u) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(u, parts, dst=0, group=self.ctrl)
        return torch.cat(parts) if self.rank == 0 else None


def setup_dist(cfg):
    # one process under python; under torchrun one of many (NCCL on CUDA, else gloo)
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if "RANK" not in os.environ:
        return Procs(device=torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    # 30 minutes: a rank's first compilation of XL can take 10
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None,
                            timeout=datetime.timedelta(minutes=30))
    # waits for rank 0's checkpoint writes and evaluations: hours
    ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    return Procs(True, dist.get_rank(), dist.get_world_size(), local_rank, device, ctrl)


def wrap_ddp(net, procs):
    # gradients in the buckets (no copy); no buffer broadcast (w_ad is averaged, the rest are
    # constants); 256 MiB buckets keep a compiled XL in about 12 graphs; no device_ids, so the
    # host draws t and drop stay on the host
    if not procs.ddp:
        return net
    return nn.parallel.DistributedDataParallel(net, bucket_cap_mb=256, broadcast_buffers=False,
                                               gradient_as_bucket_view=True)


class DenoiserAndLoss(nn.Module):
    # the denoiser and the objective (the REPA projector): one module for DDP
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, x, y, t, eps, drop, adapt=False):
        return self.loss_fn(self.model, x, y, t, eps, drop, adapt)


def hold_folder(out_dir):
    # OUT_DIR/lock while the run lives; the OS drops it at exit
    os.makedirs(out_dir, exist_ok=True)
    f = open(os.path.join(out_dir, "lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        # another run holds it; another error: storage without flock (Lustre), no lock
        if isinstance(e, BlockingIOError):
            raise SystemExit(f"error: {out_dir} is in use by another run: use another --out_dir")
    return f


class Log:
    # rank 0's record: stdout (above the progress bar), OUT_DIR/log.txt and metrics.jsonl
    def __init__(self, out_dir, master):
        names = ("log.txt", "metrics.jsonl") if master else ()
        self.files = [open(os.path.join(out_dir, f), "a") for f in names]

    def __call__(self, msg, row=None):
        if self.files:
            tqdm.write(msg)
            self.files[0].write(msg + "\n")
            self.files[1].write(json.dumps(row) + "\n" if row else "")
            for f in self.files:
                f.flush()


def command(**change):
    # the user's command with some flags changed, for advice
    args = sys.argv[1:]
    for k, v in change.items():
        if f"--{k}" in args:
            args[args.index(f"--{k}") + 1] = str(v)
        else:
            args += [f"--{k}", str(v)]
    return " ".join(["python pixelgen.py", *args])


def build(cfg, procs, log):
    # (cfg, model, its EMAs, the objective, AdamW); cfg as the offline demo trains
    # the same initial weights on every process
    torch.manual_seed(cfg.seed)
    model = JiT(**MODELS[cfg.model], input_size=cfg.image_size, num_classes=cfg.num_classes)
    model = model.to(procs.device)
    model.grad_ckpt = cfg.grad_ckpt
    emas = {d: copy.deepcopy(model).requires_grad_(False).eval() for d in cfg.ema}
    cfg, dino, lp = perceptual_nets(cfg, procs, log)
    repa_layer = REPA_LAYER[cfg.model] if cfg.repa_layer < 0 else cfg.repa_layer
    loss_fn = PixelGenLoss(model.final_layer.linear.in_features, dino, lp,
                           patch_size=model.patch_size, lpips_weight=cfg.lpips_weight,
                           pdino_weight=cfg.pdino_weight, repa_weight=cfg.repa_weight,
                           repa_layer=repa_layer, gate_t=cfg.gate_t, t_eps=cfg.t_eps,
                           num_classes=cfg.num_classes, adaptive_from=cfg.adaptive_from)
    loss_fn = loss_fn.to(procs.device)
    params = [*model.parameters(), *loss_fn.parameters()]
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            weight_decay=cfg.weight_decay,
                            fused=procs.device.type == "cuda" or None)
    if cfg.compile:
        # w_ad backpropagates twice through a graph: no donated buffers
        if cfg.adaptive_from >= 0:
            from torch._functorch import config as functorch_config
            functorch_config.donated_buffer = False
        # what runs every step, and the EMAs that sample
        for m in (model, *emas.values(), dino, lp):
            if m is not None:
                m.compile()
    return cfg, model, emas, loss_fn, opt


def check_run(cfg, data, procs, ck):
    # the run's Config, checked before anything is built: classes, data, the checkpoint's run
    num_classes = cfg.num_classes or len(data.classes)
    if num_classes < len(data.classes):
        raise SystemExit(f"error: --num_classes {num_classes} < the data's {len(data.classes)}")
    data_path = os.path.abspath(cfg.data_path) if cfg.data_path else ""
    cfg = dataclasses.replace(cfg, num_classes=num_classes, data_path=data_path)
    if len(data) < cfg.batch_size:
        # the largest global batch that the data fills and the processes split
        split = procs.world * cfg.grad_accum
        fits = len(data) // split * split
        advice = f"; try {command(batch_size=fits)}" if fits else ""
        raise SystemExit(f"error: {len(data)} images are fewer than one global batch "
                         f"(--batch_size {cfg.batch_size}){advice}")
    keys = ("model", "image_size", "num_classes", "data_path")
    differ = [f"--{k} {ck['config'][k]} (this run: {getattr(cfg, k)})"
              for k in keys if ck and ck["config"][k] != getattr(cfg, k)]
    if differ:
        new = command(out_dir=cfg.out_dir.rstrip("/") + "_new")
        raise SystemExit(f"error: {cfg.out_dir}/ckpt.pt is another run's: "
                         f"{'; '.join(differ)}.\nFor a new run: {new}")
    return cfg


def read_checkpoint(path, unsafe=False):
    # torch.load, memory-mapped on the host; weights_only unless `unsafe`
    try:
        ck = torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=True)
    except Exception as e:
        # Lightning's hyper_parameters are pickled Python objects
        if "Unsupported global" in str(e):
            raise SystemExit(f"error: {path} holds pickled Python objects besides tensors; "
                             f"if you trust it, pass --unsafe_load")
        ck = None
    if not isinstance(ck, dict):
        raise SystemExit(f"error: cannot read {path} as a checkpoint: pass a ckpt.pt written "
                         f"by --train, or an official Lightning .ckpt")
    return ck


def resume_point(cfg, procs):
    # the checkpoint the run continues ({} if none): rank 0 decides, all must read the same
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    if not procs.agree(cfg.resume and procs.rank == 0 and os.path.isfile(path)):
        return {}
    unshared = (f"error: process 0 resumes from {path}, which another process cannot read or "
                f"sees at another step: --out_dir must be on storage that every node sees")
    if procs.agree(not os.path.isfile(path)):
        raise SystemExit(unshared)
    ck = procs.all_or_none(read_checkpoint, path)
    # the largest step must be the smallest
    if procs.agree(ck["step"]) != -procs.agree(-ck["step"]):
        raise SystemExit(unshared)
    return ck


def resume(ck, model, emas, loss_fn, opt):
    # the step to continue from, after loading ck into the run's tensors
    if not ck:
        return 0
    model.load_state_dict(ck["model"])
    loss_fn.load_state_dict(ck["loss"])
    opt.load_state_dict(ck["opt"])
    for d, e in emas.items():
        # an EMA decay new to the run starts from the weights
        e.load_state_dict(ck["emas"].get(str(d), ck["model"]))
    return ck["step"]


def save_checkpoint(obj, path, keep=None):
    """Atomic and durable: a temp file flushed to disk, renamed, the folder flushed; a snapshot
    `keep` is a hard link. A failed write leaves the last checkpoint as it was."""
    tmp = path + ".tmp"
    # no CRC per record: the write is one pass over the data
    torch.utils.serialization.config.save.compute_crc32 = False
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(folder)
        os.close(folder)
        if keep:
            if os.path.exists(keep):
                os.remove(keep)
            os.link(path, keep)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"error: writing {path} failed ({e}); the last checkpoint is intact. "
                         f"Free some space, then run the same command to continue.")


@contextlib.contextmanager
def stop_signals():
    # the stop signals received; a repeat (SLURM's, then torchrun's) changes nothing
    received = []
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, lambda sig, frame: received.append(sig))
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Meter:
    # sums since the last log line: the loss terms on the device (read at the log step)
    TERMS = ("loss", "fm", "lpips", "pdino", "repa")

    def __init__(self):
        self.sums = 0.0
        self.n = 0
        self.gate = 0.0
        self.skipped = []
        self.t0 = time.time()

    def add(self, out, skipped, gate):
        # one micro-batch's terms and unreadable images; its step's gated fraction
        self.sums = self.sums + torch.stack([out[k].detach().float() for k in self.TERMS])
        self.n += 1
        self.gate += gate
        self.skipped += skipped

    def report(self, step, max_steps, cfg, procs, w_ad, epoch):
        # (log line, metrics row): means over every process's micro-batches
        sums = self.sums
        skipped = [self.skipped] * procs.world
        if procs.ddp:
            dist.all_reduce(sums)
            dist.all_gather_object(skipped, self.skipped, group=procs.ctrl)
        m = {k: s / (self.n * procs.world) for k, s in zip(self.TERMS, sums.tolist())}
        m["gate"] = self.gate / self.n
        if not all(map(math.isfinite, m.values())):
            raise SystemExit(f"error: non-finite loss at step {step} ({m}); the last good "
                             f"checkpoint is {cfg.out_dir}/ckpt.pt")
        ips = cfg.batch_size * self.n / cfg.grad_accum / (time.time() - self.t0)
        row = dict(step=step, epoch=round(epoch, 3), **m, w_ad=w_ad, lr=cfg.lr,
                   img_per_s=round(ips, 2))
        if procs.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(procs.device)
            row["peak_mem_gib"] = round(peak / 2**30, 2)
        self.__init__()
        terms = " ".join(f"{k} {v:.4f}" for k, v in m.items())
        eta = (max_steps - step) * cfg.batch_size / ips / 60
        line = f"step {step}/{max_steps} {terms} w_ad {w_ad:.3f} img/s {ips:.1f} eta {eta:.0f} min"
        for p in sum(skipped, []):
            line += f"\nskipped an unreadable image: {p}"
        return line, row


def after_step(cfg, step, max_steps, stop):
    # what this step ends with, the same on every process
    last = step == max_steps
    keep = bool(cfg.keep_every) and step % cfg.keep_every == 0
    every = [bool(n) and (step % n == 0 or last) and not stop
             for n in (cfg.eval_every, cfg.sample_every)]
    # a checkpoint before each evaluation
    save = step % cfg.ckpt_every == 0 or last or bool(stop) or keep or every[0]
    return argparse.Namespace(log=step % cfg.log_every == 0 or save, save=save, keep=keep,
                              eval=every[0], grid=every[1])


def train(cfg):
    """The training program (--train), on every process under torchrun."""
    procs = setup_dist(cfg)
    # the folder is held first, before anything slow is loaded
    lock = procs.rank0(hold_folder, cfg.out_dir)
    if cfg.data_path:
        data = ImageFolderData(cfg.data_path, cfg.image_size, cfg.background, procs)
    else:
        data = ToyShapes(cfg.image_size)
    ck = resume_point(cfg, procs)
    cfg = check_run(cfg, data, procs, ck)
    log = Log(cfg.out_dir, procs.rank == 0)
    cfg, model, emas, loss_fn, opt = build(cfg, procs, log)
    step = resume(ck, model, emas, loss_fn, opt)
    del ck
    fid_ctx = fid_setup(cfg, procs) if cfg.eval_every and cfg.fid_ref else None
    epoch_steps = len(data) // cfg.batch_size
    max_steps = cfg.max_steps or cfg.epochs * epoch_steps
    b = cfg.batch_size // (procs.world * cfg.grad_accum)
    log(f"config: {dataclasses.asdict(cfg)}\n{class_table(data)}")
    log(f"{cfg.model}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters: "
        f"{max_steps} steps of {cfg.batch_size} images = {procs.world} x {cfg.grad_accum} x {b} "
        f"(processes x micro-batches x images) on {procs.device}"
        + f", from step {step} of {cfg.out_dir}/ckpt.pt" * (step > 0))
    net = wrap_ddp(DenoiserAndLoss(model, loss_fn), procs)
    batches = loader(data, cfg, procs, step)
    meter = Meter()
    bar = tqdm(total=max_steps, initial=step, disable=procs.rank != 0, dynamic_ncols=True)
    net.train()
    try:
        with stop_signals() as received:
            while step < max_steps:
                train_step(net, opt, emas, batches, step, cfg, procs, meter)
                step += 1
                bar.update(1)
                # decided by every process together, once per step
                stop = procs.agree(bool(received))
                todo = after_step(cfg, step, max_steps, stop)
                if todo.log:
                    w_ad = loss_fn.w_ad.item()
                    log(*meter.report(step, max_steps, cfg, procs, w_ad, step / epoch_steps))
                if todo.save:
                    save(model, emas, loss_fn, opt, step, cfg, procs, log, todo.keep, data)
                    # a signal during the save: this step's checkpoint is written, stop now
                    stop = stop or procs.agree(bool(received))
                if todo.eval and not stop:
                    evaluate_online(emas, cfg, procs, step, log, fid_ctx, data.classes)
                if todo.grid and not stop:
                    procs.rank0(write_grid, emas, cfg, procs.device, step, data.classes, log)
                if stop:
                    log(f"stopped after step {step}; run the same command to continue")
                    break
    except BaseException as e:
        # A failing process ends at once, so torchrun ends the others: none waits for a
        # collective until its timeout.
        if procs.ddp:
            print(e if isinstance(e, SystemExit) else traceback.format_exc(), file=sys.stderr)
            os._exit(1)
        raise
    finally:
        bar.close()
        del lock
    if procs.ddp:
        dist.destroy_process_group()
    return model, emas


def save(model, emas, loss_fn, opt, step, cfg, procs, log, keep, data):
    # rank 0 writes OUT_DIR/ckpt.pt (and a snapshot) while the others wait
    t0 = time.time()
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    snapshot = os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt") if keep else None
    ck = dict(model=model.state_dict(), emas={str(d): e.state_dict() for d, e in emas.items()},
              loss=loss_fn.state_dict(), opt=opt.state_dict(), step=step,
              config=dataclasses.asdict(cfg), classes=list(data.classes))
    procs.rank0(save_checkpoint, ck, path, snapshot)
    log(f"saved {path}" + f" and {snapshot}" * keep + f" in {time.time() - t0:.1f} s")


def evaluate_online(emas, cfg, procs, step, log, fid_ctx, classes):
    """Every EMA and CFG scale, as --sample does; a failure on any process is logged only."""
    t0 = time.time()
    n = cfg.eval_samples
    try:
        if fid_ctx:
            runs = itertools.product(emas.items(), cfg.cfg_scale)
            rows = [measure(my_images(m, w, n, cfg, procs), n, d, w, fid_ctx, cfg, procs)
                    for (d, m), w in runs]
        else:
            # without a reference the samples are kept (official validation hook)
            out_dir = f"{cfg.out_dir}/eval_{step:07d}"
            rows = write_samples(emas, n, cfg, procs, out_dir, None, classes)
    except Exception as e:
        return log(f"evaluation at step {step} failed, training goes on: {e!r}")
    seconds = round(time.time() - t0, 1)
    for r in rows:
        scores = ", ".join(f"{name} {r[k]:.4g}" for k, name in fid.RESULTS.items() if k in r)
        log(f"eval step {step} ema {r['ema']} cfg {r['cfg_scale']:g}: {scores} ({seconds} s)",
            dict(step=step, **r, eval_seconds=seconds))


def write_grid(emas, cfg, device, step, classes, log):
    # a sample grid of the first EMA; a failure is logged, training goes on
    path = f"{cfg.out_dir}/grid_{step:07d}.png"
    layout = grid_layout(min(cfg.num_samples, 64), classes)
    model = emas[cfg.ema[0]]
    try:
        images = sample_images(model, range(layout.n), cfg, device, cfg.cfg_scale[0])
        save_grid(images, path, layout)
    except Exception as e:
        return log(f"sample grid at step {step} failed, training goes on: {e!r}")
    log(f"sample grid (EMA {cfg.ema[0]}): {path}; {layout.note}")


# Sampling and evaluation: our checkpoints or official ones -> samples, grids, fid.py's metrics.

def load_denoiser(path, unsafe=False, decays=()):
    # ({decay: JiT}, config, step, class names) of a checkpoint; decays picks EMAs (or the first)
    if not os.path.isfile(path):
        raise SystemExit(f"error: no checkpoint {path}: train first, or pass --ckpt FILE")
    ck = read_checkpoint(path, unsafe)
    conf = ck.get("config")
    if "emas" in ck:
        held = {float(d): sd for d, sd in ck["emas"].items()}
        name = conf["model"]
        kw = dict(input_size=conf["image_size"], num_classes=conf["num_classes"])
    elif "state_dict" in ck:
        # official Lightning: ema_denoiser. prefix; SimpleEMA decay 0.9999
        sd = ck["state_dict"]
        held = {0.9999: {k[13:]: v for k, v in sd.items() if k.startswith("ema_denoiser.")}}
        name, kw = official_preset(held[0.9999], path)
    else:
        raise SystemExit(f"error: {path} is neither a PixelGen nor a Lightning checkpoint")
    step = ck.get("step", ck.get("global_step", 0))
    absent = [str(d) for d in decays if d not in held]
    if absent:
        raise SystemExit(f"error: {path} holds no EMA of decay {', '.join(absent)}; it holds "
                         f"{', '.join(map(str, held))}")
    models = {d: JiT(**MODELS[name], **kw).eval() for d in decays or list(held)[:1]}
    try:
        for d, m in models.items():
            m.load_state_dict(held[d], strict=True)
    except RuntimeError as e:
        raise SystemExit(f"error: the weights in {path} are not {name}'s: {str(e)[:400]}")
    print(f"{path}: {name} at {kw['input_size']} px, {kw['num_classes']} classes, step {step}, "
          f"EMA {', '.join(map(str, models))}")
    return models, conf, step, ck.get("classes")


def official_preset(sd, path):
    # (preset, its size keywords) of an official JiT state dict, by its depth and width
    try:
        depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
        tokens, width = sd["pos_embed"].shape[1:]
        p = sd["x_embedder.proj1.weight"].shape[-1]
        classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    except KeyError as e:
        raise SystemExit(f"error: {path} has no JiT weights (missing {e})")
    kw = dict(input_size=math.isqrt(tokens) * p, patch_size=p, num_classes=classes)
    for name, m in MODELS.items():
        if (m["depth"], m["hidden_size"]) == (depth, width):
            return name, kw
    raise SystemExit(f"error: the weights in {path} (depth {depth}, width {width}) fit no preset")


@torch.no_grad()
def sample_images(model, idx, cfg, device, cfg_scale, batch=0):
    # uint8 (len(idx), H, W, 3): image i of class i % K, noise from (seed, i); padded to `batch`
    # images, a compiled model sees one shape
    full = list(idx) + list(idx[-1:]) * (batch - len(idx))
    size = model.grid * model.patch_size
    # drawn on the CPU: the same noise on any device
    eps = noise((3, size, size), [seed_for(cfg.seed, i) for i in full], "cpu").to(device)
    y = torch.tensor(full, device=device) % model.num_classes
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        x = sample(model, eps, y, cfg.sample_steps, cfg.sampler, cfg_scale, cfg.cfg_interval,
                   cfg.time_shift, cfg.t_eps)[:len(idx)]
    # as official: clip((x + 1) 127.5 + 0.5, 0, 255)
    x = ((x.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid_layout(n, classes):
    # up to n images, image i of class i % K: up to 16 classes a column per class, else whole
    # rows; `note` names the columns' classes or each row's first
    K = len(classes)
    cols = min(n, K) if K <= 16 else math.ceil(math.sqrt(n))
    n -= n % cols
    if K <= 16:
        note = f"columns: {', '.join(classes[:cols])}"
    else:
        note = f"rows start at {', '.join(classes[i % K] for i in range(0, n, cols))}"
    if n < K:
        note += f"; left out: {', '.join(classes[n:])}"
    return argparse.Namespace(n=n, cols=cols, note=note)


def save_grid(images, path, layout):
    # (n, H, W, 3) uint8 -> a PNG of layout.cols columns, 2 px black borders
    from torchvision.utils import save_image
    x = torch.from_numpy(images[:layout.n]).permute(0, 3, 1, 2) / 255
    save_image(x, path, nrow=layout.cols)


def fid_setup(cfg, procs):
    # once per run: the Inception (kept on the CPU), the metrics, the reference's outputs
    try:
        weights = weight_files(cfg, procs, ["inception"])["inception"]
        ref = procs.all_or_none(fid.open_side, cfg.fid_ref, cfg.background)
        metrics = procs.all_or_none(fid.resolve_metrics, cfg.metrics or None, ref)
        net = procs.all_or_none(fid.load_inception, weights, procs.device)
        own = [m for m in metrics if m != "is"]
        # rank 0 reads the reference; the others wait on the host
        procs.rank0(fid.load_side, ref, net, own, cfg.fid_preprocess, 50, "reference")
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}")
    return argparse.Namespace(inception=net.cpu(), reference=ref, metrics=metrics)


def my_images(model, w, n, cfg, procs):
    # this process's images (image i on process i % world), batch_size at a time
    mine = range(procs.rank, n, procs.world)
    b = cfg.batch_size
    for j in tqdm(range(0, len(mine), b), disable=procs.rank != 0, leave=False):
        yield sample_images(model, mine[j:j + b], cfg, procs.device, w, b)


def measure(batches, n, ema, w, fid_ctx, cfg, procs):
    """Rank 0's row of metrics of n images, of which this process made `batches`."""
    net = fid_ctx.inception.to(procs.device)
    which = fid_ctx.metrics
    spatial = "sfid" in which
    # rows per process
    m = -(-n // procs.world)

    def outputs():
        # this process's rows [pool3 (2048) | sFID's (2023)], padded to m
        rows = [np.zeros((0, 2048 + fid.SPATIAL_DIM * spatial), np.float32)]
        for images in batches:
            pool3, s = fid.inception_outputs(net, images, cfg.fid_preprocess, spatial)
            rows.append(np.hstack([pool3, s]) if spatial else pool3)
        rows = torch.from_numpy(np.concatenate(rows))
        return F.pad(rows, (0, 0, 0, m - len(rows)))

    def metrics(rows):
        if procs.rank:
            return {}
        # row j of process r is image j world + r
        rows = rows.view(procs.world, m, -1).transpose(0, 1).flatten(0, 1)[:n].numpy()
        side = fid.add_outputs(fid.Side("the samples"), net, which, rows[:, :2048],
                               rows[:, 2048:])
        return fid.compute_metrics(side, fid_ctx.reference, which, procs.device)
    # each cross-process step in an agreement: a failure on any process fails all
    try:
        rows = procs.all_or_none(outputs)
        if procs.ddp:
            rows = procs.all_or_none(procs.gather, rows)
        scores = procs.all_or_none(metrics, rows)
    finally:
        # no Inception in GPU memory between evaluations
        net.cpu()
    return dict(ema=ema, cfg_scale=w, sampler=cfg.sampler, sample_steps=cfg.sample_steps,
                time_shift=cfg.time_shift, num_samples=n, **scores)


def write_samples(models, n, cfg, procs, out_dir, fid_ctx, classes):
    """Per EMA and CFG scale: n images into out_dir as an ADM npz and a grid (and PNGs with
    --save_pngs); with fid_ctx, the rows of their metrics."""
    rows = []
    mine = range(procs.rank, n, procs.world)
    for (d, model), w in itertools.product(models.items(), cfg.cfg_scale):
        one = len(models) * len(cfg.cfg_scale) == 1
        tag = "" if one else f"_ema{d}_cfg{w:g}"

        def shard():
            # this process's images, and a file of them for rank 0 to merge
            batches = list(my_images(model, w, n, cfg, procs))
            images = np.concatenate(batches or [np.zeros((0, 1, 1, 3), np.uint8)])
            pngs = os.path.join(out_dir, f"images{tag}")
            os.makedirs(pngs if cfg.save_pngs else out_dir, exist_ok=True)
            for i, image in zip(mine, images if cfg.save_pngs else []):
                name = "".join(c if c.isalnum() else "_" for c in classes[i % len(classes)])
                Image.fromarray(image).save(f"{pngs}/{i:06d}_{name}.png")
            np.savez(f"{out_dir}/samples{tag}_rank{procs.rank}.npz", idx=mine, arr_0=images)
            return batches
        batches = procs.all_or_none(shard)
        procs.rank0(merge_samples, n, out_dir, tag, classes, procs.world)
        if fid_ctx:
            rows.append(measure(batches, n, d, w, fid_ctx, cfg, procs))
    return rows


def merge_samples(n, out_dir, tag, classes, world):
    # the shards -> one ADM npz in image order (the same for any process count), and a grid
    for r in range(world):
        with np.load(f"{out_dir}/samples{tag}_rank{r}.npz") as part:
            if r == 0:
                out = np.zeros((n, *part["arr_0"].shape[1:]), np.uint8)
            out[part["idx"]] = part["arr_0"]
        os.remove(f"{out_dir}/samples{tag}_rank{r}.npz")
    np.savez(f"{out_dir}/samples{tag}.npz", arr_0=out, arr_1=np.arange(n) % len(classes))
    layout = grid_layout(min(n, 100), classes)
    save_grid(out, f"{out_dir}/grid{tag}.png", layout)
    print(f"wrote {out_dir}/samples{tag}.npz ({n} images) and grid{tag}.png ({layout.note})")


@torch.no_grad()
def sample_main(cfg, given=()):
    """The sampling program (--sample): a checkpoint's EMAs -> OUT_DIR/samples_STEP/, and with
    --fid_ref, rows of metrics added to OUT_DIR/eval.json. The run's sampling settings hold
    where no flag (`given`) sets them."""
    procs = setup_dist(cfg)
    path = cfg.ckpt or os.path.join(cfg.out_dir, "ckpt.pt")
    models, conf, step, classes = load_denoiser(path, cfg.unsafe_load, cfg.ema_decay)
    cfg = dataclasses.replace(cfg, **{k: conf[k] for k in RUN_SAMPLING if conf and k not in given})
    for m in models.values():
        m.to(procs.device)
        if cfg.compile:
            m.compile()
    fid_ctx = fid_setup(cfg, procs) if cfg.fid_ref else None
    out_dir = os.path.join(cfg.out_dir, f"samples_{step:07d}")
    classes = classes or [str(k) for k in range(next(iter(models.values())).num_classes)]
    rows = write_samples(models, cfg.num_samples, cfg, procs, out_dir, fid_ctx, classes)
    if procs.rank == 0 and rows:
        # a list of rows, added to; the table marks the best FID
        out = os.path.join(cfg.out_dir, "eval.json")
        rows = [dict(ckpt=path, step=step, **r) for r in rows]
        old = json.load(open(out)) if os.path.isfile(out) else []
        with open(out + ".tmp", "w") as f:
            json.dump(old + rows, f, indent=1)
        os.replace(out + ".tmp", out)
        print(fid.table(rows) + f"\nadded {len(rows)} row(s) to {out}")
    if procs.ddp:
        dist.destroy_process_group()


# Command line: --train | --sample, and a flag per Config field. Precedence: Config < recipe <
# the checkpoint's sampling settings (--sample) < the flags given.

# what --sample takes from the checkpoint's config where no flag gives it
RUN_SAMPLING = ("sampler", "sample_steps", "cfg_scale", "cfg_interval", "time_shift", "t_eps",
                "seed", "background")
CHOICES = dict(recipe=["auto", *RECIPES], model=MODELS, sampler=SAMPLERS, metrics=fid.METRICS,
               device=["auto", "cpu", "cuda"], perceptual_init=["pretrained", "random"],
               fid_preprocess=["adm", "pytorch-fid"])
# tuple fields: (element type, count); the others are floats, one or more
TUPLES = dict(cfg_interval=(float, 2), background=(int, 3), metrics=(str, "+"))


def parse_args(argv=None):
    """(Config, mode, the fields the flags set); a bad value stops here in one line."""
    p = argparse.ArgumentParser(description=__doc__, argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Each flag is a field of Config in pixelgen.py; its "
                                       "comment there explains it.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--train", action="store_true", help="train, or continue OUT_DIR's run")
    mode.add_argument("--sample", action="store_true", help="sample a checkpoint, evaluate")
    for f in dataclasses.fields(Config):
        kind = dict(type=f.type)
        if f.type is bool:
            kind = dict(action=argparse.BooleanOptionalAction)
        if f.type is tuple:
            kind = dict(zip(("type", "nargs"), TUPLES.get(f.name, (float, "+"))))
        p.add_argument(f"--{f.name}", choices=CHOICES.get(f.name), help=f"default {f.default}",
                       **kind)
    args = vars(p.parse_args(argv))
    mode = "train" if args.pop("train", False) else "sample"
    args.pop("sample", None)
    recipe = args.pop("recipe", "auto")
    if recipe == "auto":
        recipe = "xl-80ep" if args.get("data_path") or args.get("ckpt") else "demo"
    conf = {**RECIPES[recipe], "recipe": recipe}
    conf.update({k: tuple(v) if isinstance(v, list) else v for k, v in args.items()})
    cfg = Config(**conf)
    for message in flag_errors(cfg, mode):
        p.error(message)
    return cfg, mode, set(args)


def flag_errors(cfg, mode):
    # a message for each value that would waste a run or spoil it silently
    for k in ("batch_size", "grad_accum", "sample_steps", "num_samples", "ckpt_every",
              "log_every", "image_size", "epochs", "eval_samples"):
        if getattr(cfg, k) <= 0:
            yield f"--{k} must be positive"
    for k in ("max_steps", "keep_every", "eval_every", "sample_every", "num_classes"):
        if getattr(cfg, k) < 0:
            yield f"--{k} must be 0 or more"
    for k in ("data_path", "ckpt", "fid_ref", "fid_weights", "dino_path", "vgg_path"):
        if getattr(cfg, k) and not os.path.exists(getattr(cfg, k)):
            yield f"--{k} {getattr(cfg, k)}: no such file or folder"
    world = int(os.environ.get("WORLD_SIZE", 1))
    if mode == "train" and cfg.batch_size % (world * cfg.grad_accum):
        yield (f"--batch_size {cfg.batch_size} is not a multiple of {world} processes x "
               f"--grad_accum {cfg.grad_accum}")
    if cfg.image_size % 16:
        yield f"--image_size {cfg.image_size} is not a multiple of the patch size, 16"
    if not all(0 <= d < 1 for d in cfg.ema + cfg.ema_decay):
        yield "--ema and --ema_decay take decays in [0, 1)"


def main(argv=None):
    cfg, mode, given = parse_args(argv)
    if mode == "train":
        train(cfg)
    else:
        sample_main(cfg, given)


if __name__ == "__main__":
    main()
