"""
PixelGen (arXiv 2602.02493) in one file: pixel-space diffusion with perceptual supervision.

A patch-16 JiT transformer predicts the clean image from a noisy one (x-prediction), is trained with the
flow-matching velocity loss plus noise-gated perceptual losses (LPIPS for local texture, P-DINO on frozen
DINOv2 features for global semantics) and REPA feature alignment, and is sampled with a Heun ODE solver and
classifier-free guidance. The paper reaches FID 5.11 on ImageNet-256 without guidance after 80 epochs.

    python pixelgen.py --train                                   # CPU/GPU demo on the built-in toy dataset
    torchrun --nproc_per_node=8 pixelgen.py --train --data_path /data/imagenet/train             # XL/16, 80 ep
    torchrun --nproc_per_node=8 pixelgen.py --train --recipe xl-160ep --data_path /data/imagenet/train
    torchrun --nproc_per_node=4 pixelgen.py --train --data_path /data/imagenet/train --grad_accum 2  # same update
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 pixelgen.py --train --data_path ...
    torchrun --nproc_per_node=8 pixelgen.py --sample --ckpt PixelGen_XL_80ep.ckpt --unsafe_load --num_samples 50000 \
        --fid_ref VIRTUAL_imagenet256_labeled.npz                          # FID-50K and IS, written to eval.json
    python pixelgen.py --bench --recipe xl-80ep --batch_size 32 --compile   # speed, memory and MFU on one GPU

Notation (paper Sec. 3; t = 0 is pure noise, t = 1 is the clean image):
    x      clean image in [-1, 1], (B, 3, H, W)        eps    Gaussian noise, like x
    t      time in [0, 1]                              y      class label; y = num_classes is the null class
    x_t    = t x + (1 - t) eps                 Eq. (2) x_hat  = net(x_t, t, y), the predicted clean image  Eq. (1)
    v      = (x - x_t) / (1 - t)               Eq. (3) v_hat  = (x_hat - x_t) / (1 - t)                    Eq. (4)
The technical contract is SPEC.md of the project; every deliberate difference from the official code
(github Zehong-Ma/PixelGen) is marked `NOTE(official)`.
"""
import argparse
import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import fid  # the image reader shared with FID (fid.py imports nothing from here)

# ----------------------------------------------------------------------------------------------------------------
# Config: every field is a CLI flag (--name); a recipe (below) overrides a few defaults; explicit flags win.


@dataclass
class Config:
    # what to run
    recipe: str = "auto"              # xl-80ep | xl-160ep | l-200k | demo; auto: demo without --data_path, else xl-80ep
    model: str = "PixelGen-XL/16"     # a key of MODELS; official configs_c2i/PixelGen_XL.yaml
    image_size: int = 256             # paper: ImageNet 256x256
    num_classes: int = 1000           # ImageNet-1k; the demo dataset has 10
    data_path: str = ""               # ImageFolder layout (class subfolders) or a flat folder; "" = demo dataset
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
    fid_ref: str = ""                 # FID/IS against an ADM reference batch, a statistics npz or an image folder
    fid_weights: str = ""             # pt_inception-2015-12-05-6726825d.pth; "" = torch hub cache
    fid_preprocess: str = "adm"       # adm (ADM suite, torch-fidelity) | pytorch-fid
    eval_every: int = 0               # --train: evaluate the EMA model(s) every N steps and at the end; 0 = never
    eval_samples: int = 50000         # --train: images per online evaluation (official validation: 50000)
    # bookkeeping
    resume: bool = True               # continue from OUT_DIR/ckpt.pt when it exists
    ckpt_every: int = 5000            # steps between writes of OUT_DIR/ckpt.pt
    keep_every: int = 0               # also keep OUT_DIR/ckpt_{step:07d}.pt every N steps (official: 100000); 0 = off
    log_every: int = 100              # steps between log lines (the only host-device syncs)
    sample_every: int = 10000         # steps between sample grids (0 = never)
    wandb: bool = False               # also log to Weights & Biases (needs the wandb package; not a dependency)
    wandb_project: str = "pixelgen"   # official WandbLogger project: universal_flow_JiT_XL_bs256
    wandb_name: str = ""              # run name; "" = the out_dir's name
    bench_steps: int = 5              # --bench: timed steps after warm-up


# One flag selects a paper run; each entry states only what differs from the Config defaults.
RECIPES = {
    "xl-80ep": dict(keep_every=100_000),                                # Table 2: FID 5.11, Heun 50, no CFG
    "xl-160ep": dict(epochs=160, cfg_scale=(2.25,), adaptive_from=400_000, keep_every=100_000),  # FID 1.83, CFG 2.25
    "l-200k": dict(model="PixelGen-L/16", max_steps=200_000, sampler="euler", time_shift=1.0),  # Table 5 ablations
    # Laptop demo: a 4M-parameter model on 64 px toy shapes; faster lr and EMA because it trains for minutes.
    "demo": dict(model="PixelGen-T/16", image_size=64, num_classes=10, batch_size=16, lr=1e-3, ema=(0.99,),
                 max_steps=500, num_workers=0, sample_steps=25, time_shift=1.0, cfg_scale=(2.0,), ckpt_every=250,
                 log_every=25, sample_every=250, out_dir="runs/demo", num_samples=40),
}
DEMO_CUDA = dict(batch_size=64, max_steps=3000, log_every=100, ckpt_every=1000, sample_every=1000)  # GPU: not timed

# ----------------------------------------------------------------------------------------------------------------
# Model: JiT, "Just image Transformer" (arXiv 2511.13720), as in official src/models/transformer/JiT.py.
# Constructor keywords are the official ones, so an official YAML's denoiser.init_args can be passed as-is.

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


def apply_rope(x, rope):  # x (B, heads, N, head_dim); rope (N, head_dim/2) complex: (x0 + i x1) e^(i angle)
    return torch.view_as_real(torch.view_as_complex(x.float().unflatten(-1, (-1, 2))) * rope).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, num_heads, attn_drop=0.0, proj_drop=0.0):
        super().__init__()
        self.num_heads, self.attn_drop = num_heads, attn_drop
        self.q_norm, self.k_norm = RMSNorm(dim // num_heads), RMSNorm(dim // num_heads)  # qk-norm per head
        self.qkv, self.proj, self.proj_drop = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), nn.Dropout(proj_drop)

    def forward(self, x, rope):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        q, k = apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope)
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
        # Dropout only in the middle half of the blocks, as official `depth // 4 * 3 > i >= depth // 4` (SPEC writes
        # 3 * depth // 4: the same for every depth that is a multiple of 4).
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
        rope, rope_ic = torch.complex(self.rope_cos, self.rope_sin), torch.complex(self.rope_ic_cos, self.rope_ic_sin)
        h = None
        # Activation checkpointing: keep only each block's inputs, rerun the block in backward (dropout masks are
        # replayed: checkpoint restores the RNG state). Only when a backward will come: eval/no_grad run plainly.
        ckpt = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if i == return_layer:
                h = x[:, self.in_context_len:] if i > self.in_context_start else x
            if self.in_context_len > 0 and i == self.in_context_start:  # prepend the class tokens
                x = torch.cat([y_emb[:, None] + self.in_context_posemb, x], 1)  # (B, L + N, D)
            r = rope_ic if self.in_context_len > 0 and i >= self.in_context_start else rope
            x = torch.utils.checkpoint.checkpoint(block, x, c, r, use_reentrant=False) if ckpt else block(x, c, r)
        x = self.final_layer(x[:, self.in_context_len:], c)             # (B, N, p*p*3)
        p, g = self.patch_size, self.grid
        x_hat = x.view(-1, g, g, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4).flatten(4, 5).flatten(2, 3)
        return x_hat if return_layer is None else (x_hat, h)


# ----------------------------------------------------------------------------------------------------------------
# Flow math (paper Eqs. 1-5). One x_to_v serves the loss and the samplers.

def sample_t(batch, P_mean=-0.8, P_std=0.8, generator=None):  # logit-normal training time (on the CPU: see loss)
    return torch.sigmoid(torch.randn(batch, generator=generator) * P_std + P_mean)


def x_t(x, eps, t):  # Eq. (2)
    t = t.view(-1, 1, 1, 1)
    return t * x + (1 - t) * eps


def x_to_v(x_hat, x_t, t, t_eps=0.05):  # Eqs. (3)-(4): velocity from a clean-image estimate, 1 - t clamped
    return (x_hat - x_t) / (1 - t.view(-1, 1, 1, 1)).clamp_min(t_eps)


# ----------------------------------------------------------------------------------------------------------------
# Objective (paper Eq. 6): L = L_FM + g(t) (0.1 L_LPIPS + 0.01 L_PDINO) + 0.5 L_REPA, g(t) = 1[t >= 0.3].

class PixelGenLoss(nn.Module):
    """Owns the trainable REPA projector; uses (does not own) the frozen DINOv2 and LPIPS networks. A term whose
    weight is 0 runs no network (DINOv2 not at all when P-DINO and REPA are both off; then `dino` may be None)."""

    def __init__(self, hidden_size, dino, lpips, *, lpips_weight=0.1, pdino_weight=0.01, repa_weight=0.5,
                 repa_layer=8, gate_t=0.3, P_mean=-0.8, P_std=0.8, t_eps=0.05, label_dropout=0.1, num_classes=1000,
                 gate_pdino=True, adaptive_from=-1):
        super().__init__()
        self.lpips_weight, self.pdino_weight, self.repa_weight = lpips_weight, pdino_weight, repa_weight
        self.repa_layer, self.gate_t, self.P_mean, self.P_std, self.t_eps = repa_layer, gate_t, P_mean, P_std, t_eps
        self.label_dropout, self.num_classes, self.gate_pdino = label_dropout, num_classes, gate_pdino
        self.adaptive_from = adaptive_from
        self.proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size),
                                  nn.SiLU(), nn.Linear(hidden_size, 768)) if repa_weight else None  # to DINOv2-B width
        self.register_buffer("percept_weight", torch.ones(()))  # adaptive weight w_ad of the 160-epoch recipe
        # The frozen nets stay outside the module tree: not in state_dict(), not trained, not seen by DDP.
        frozen = lambda net, used: net.eval().requires_grad_(False) if used else None
        self.__dict__.update(dino=frozen(dino, pdino_weight or repa_weight), lpips=frozen(lpips, lpips_weight))

    def forward(self, model, x, y, t=None, noise=None, step=0, drop=None, norm=None, adapt=True):
        """The loss of one batch, or of one micro-batch of a global batch when norm = (samples, gated samples) of
        the global batch: then every term is this micro-batch's share of the global mean (SPEC 8.1), and the shares
        of all micro-batches add up to the loss of the global batch."""
        B, device = x.shape[0], x.device
        if t is None:  # drawn on the host, so the gate below is known without a device sync
            t = sample_t(B, self.P_mean, self.P_std)  # NOTE(official): same law, drawn on the GPU there
        gate = (t >= self.gate_t).cpu()                                          # g(t), Eq. (7)
        idx = gate.nonzero()[:, 0]
        n, n_gated = norm or (B, len(idx))
        t = t.to(device, non_blocking=True)
        eps = torch.randn_like(x) if noise is None else noise
        if self.training and self.label_dropout > 0:  # CFG: replace labels by the null class at rate 0.1
            drop = torch.rand(B, device=device) < self.label_dropout if drop is None else drop.to(device)
            y = torch.where(drop, self.num_classes, y)
        xt = x_t(x, eps, t)
        repa_on = self.proj is not None
        out = model(xt, t, y, return_layer=self.repa_layer if repa_on else None)      # Eq. (1)
        x_hat, h = out if repa_on else (out, None)
        fm = (x_to_v(x_hat, xt, t, self.t_eps) - x_to_v(x, xt, t, self.t_eps)).pow(2).mean()  # Eq. (5)
        p, zero, z = model.patch_size, x_hat.new_zeros(()).float(), None
        lp = pd = repa = zero
        # NOTE(official): DINO resizes by the model's patch (official: always 16), so REPA tokens align for any patch.
        tokens = lambda u: self.dino.patch_tokens(u, p).float()  # DINOv2 last-block patch tokens, (b, N, 768)
        if repa_on:
            with torch.no_grad():
                z = tokens(x)                                                   # targets of x, (B, N, 768)
            repa = (1 - F.cosine_similarity(self.proj(h).float(), z, dim=-1)).mean()  # Eq. (9), not gated
        # Perceptual terms only on the gated samples (NOTE(official): the official code runs both nets on the whole
        # batch and masks; this is the same loss and gradient at about half the cost).
        if len(idx):
            idx = idx.to(device, non_blocking=True)
            if self.lpips is not None:
                a, b = x_hat[idx], x[idx]
                if p != 16:  # LPIPS sees the image at patch-16 scale, as official
                    size = x.shape[-1] * 16 // p
                    a, b = (F.interpolate(u, size=(size, size), mode="bilinear", antialias=True) for u in (a, b))
                lp = self.lpips(a, b).float().mean()                          # Eq. (7): mean over gated samples
            if self.pdino_weight and self.gate_pdino:                            # Eq. (8): likewise
                with torch.no_grad():
                    zg = z[idx] if repa_on else tokens(x[idx])
                pd = (1 - F.cosine_similarity(tokens(x_hat[idx]), zg, dim=-1)).mean()
        if self.pdino_weight and not self.gate_pdino:
            # NOTE(official): the released P-DINO mask broadcasts (B,N) x (B,1,1), so it averages 1 - cos over the
            # whole batch whenever any sample is gated, and is the constant 1 when none is. Reproduced on request.
            if n_gated:
                with torch.no_grad():
                    z = z if repa_on else tokens(x)
            pd = (1 - F.cosine_similarity(tokens(x_hat), z, dim=-1)).mean() if n_gated else zero + 1
        percept = self.lpips_weight * lp + self.pdino_weight * pd
        # NOTE(official): w_ad is a buffer, so it is checkpointed (official: a per-rank float that restarts at 1 on
        # resume); over several processes it is the mean of their estimates, so every process uses the same value.
        if self.training and 0 <= self.adaptive_from <= step and step % 50 == 0 and adapt and \
                (self.lpips is not None or self.pdino_weight):
            W = model.final_layer.linear.weight  # balance |grad L_FM| and |grad L_perc| at the last layer
            g_fm = torch.autograd.grad(fm, W, retain_graph=True)[0].norm()
            g_p = torch.autograd.grad(percept, W, retain_graph=True)[0].norm() if percept.requires_grad else 0.0
            w = (g_fm / (g_p + 1e-4)).clamp(0, 100).detach()  # official: also when nothing is gated (g_p = 0)
            if dist.is_initialized():
                dist.all_reduce(w)
                w /= dist.get_world_size()
            self.percept_weight.mul_(0.8).add_(0.2 * w)
        sb, sg = B / n, (len(idx) / n_gated if n_gated else 0.0)  # this batch's shares of the global means
        pd_share = sg if self.gate_pdino else sb
        loss = sb * fm + self.percept_weight * (self.lpips_weight * sg * lp + self.pdino_weight * pd_share * pd) \
            + self.repa_weight * sb * repa                                     # Eq. (6)
        return dict(loss=loss, fm=sb * fm.detach(), lpips=sg * lp.detach(), pdino=pd_share * pd.detach(),
                    repa=sb * repa.detach(), gate=gate.float().mean(), percept_weight=self.percept_weight.clone())


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
    dts, tn = ts.diff(), ts.clone()  # the steps; the times the net sees
    if sampler == "adams2":  # NOTE(official): AdamLM feeds the net t_cur, a float32 running sum of dt (not the grid
        for i in range(steps):  # value), and guides only on the open interval lo < t_cur < hi
            tn[i + 1] = tn[i] + dts[i]
    guide = ((tn > lo) & (tn < hi if sampler == "adams2" else tn <= hi) & (cfg_scale != 1.0)).tolist()
    tn_dev, dts_dev, null = tn.to(noise.device), dts.to(noise.device), torch.full_like(y, model.num_classes)  # once

    def velocity(x, t, guide):  # v_hat; with guidance, v = v_u + w (v_c - v_u) in v-space
        tb = t.expand(x.shape[0])
        if not guide:  # NOTE(official): the official samplers always run both branches, even at scale 1 or outside
            return x_to_v(model(x, tb, y), x, tb, t_eps)  # the interval
        xx, tt = torch.cat([x, x]), tb.repeat(2)
        v_u, v_c = x_to_v(model(xx, tt, torch.cat([null, y])), xx, tt, t_eps).chunk(2)
        return v_u + cfg_scale * (v_c - v_u)

    x = noise
    for i in range(steps):
        v, dt = velocity(x, tn_dev[i], guide[i]), dts_dev[i]
        if sampler == "heun" and i < steps - 1:  # predict with Euler, correct with the mean of both slopes (same CFG)
            x = x + (v + velocity(x + v * dt, tn_dev[i + 1], guide[i])) / 2 * dt
        elif sampler == "adams2" and i > 0:  # AB2: integrate the line through the last two velocities over the step
            a = dts[i] / dts[i - 1] / 2  # normalised Lagrange weights (-a, 1 + a) of (v_prev, v); uniform: (-0.5, 1.5)
            x = x + ((1 + a) * v - a * v_prev) * dt
        else:  # Euler; also adams2's first step and Heun's last (the net never sees t = 1)
            x = x + v * dt
        v_prev = v
    return x


def to_uint8(x):  # (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, rounded as official fp2uint8
    return ((x.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


# ----------------------------------------------------------------------------------------------------------------
# Frozen perceptual networks: DINOv2-B/14 (dino.py) and LPIPS-VGG (the lpips package, v0.1 heads from its wheel).

VGG_FILE, VGG_URL = "vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"


def hub_file(path, name, url, download=True):
    """An explicit path, else TORCH_HOME/hub/checkpoints/name, downloaded there when online; else a clear error."""
    if path and not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path:
        return path
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    dest = os.path.join(folder, name)
    if not os.path.isfile(dest) and download:
        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(url, dest, progress=False)
        except Exception as e:  # offline, proxy, disk: say what to fetch and where to put it
            print(f"download of {url} failed: {e}", file=sys.stderr)
    if not os.path.isfile(dest):
        raise FileNotFoundError(f"missing pretrained weights {name}: download {url} and put it in {folder}/ "
                                f"(or pass an explicit path)")
    return dest


def make_lpips(pretrained=True, path="", download=True):
    import lpips  # imported here so `import pixelgen` stays light
    with warnings.catch_warnings():  # torchvision's deprecation notes about lpips' `pretrained=` call
        warnings.simplefilter("ignore", UserWarning)
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # v0.1 heads ship in the wheel
    if pretrained:  # the VGG16 trunk from torchvision's file, mapped onto lpips' slices (slice2.5.w <- features.5.w)
        f = hub_file(path, VGG_FILE, VGG_URL, download)
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
            net.net.load_state_dict({k: sd[f"features.{k.split('.', 1)[1]}"] for k in net.net.state_dict()})
        except Exception as e:
            raise RuntimeError(f"{f} is not a readable torchvision VGG16 state dict ({VGG_FILE}, {VGG_URL}): {e}")
    return net.eval().requires_grad_(False)


def perceptual_nets(cfg, device, log=print):
    """(dino, lpips), None where the loss weights leave a net unused. Missing weights stop a real run; the demo goes
    on with random nets and says so."""
    import dino as dino_lib
    use_dino, use_lpips = bool(cfg.pdino_weight or cfg.repa_weight), bool(cfg.lpips_weight)
    rand = lambda: (dino_lib.DINOv2().to(device).eval().requires_grad_(False) if use_dino else None,
                    make_lpips(False).to(device) if use_lpips else None)
    if cfg.perceptual_init == "random":
        log("WARNING: --perceptual_init random: LPIPS and DINOv2 have RANDOM weights (smoke runs and tests only)")
        return rand()
    try:
        return (dino_lib.load_dinov2(cfg.dino_path or None, device=device) if use_dino else None,
                make_lpips(True, cfg.vgg_path).to(device) if use_lpips else None)
    except (FileNotFoundError, RuntimeError) as e:
        if cfg.data_path:
            raise SystemExit(f"error: {e}\n(--perceptual_init random runs without them, for smoke tests only)")
        log("!" * 100 + f"\nWARNING: pretrained perceptual networks unavailable ({e}).\nThe demo continues with "
            "RANDOMLY INITIALISED LPIPS-VGG and DINOv2: the perceptual losses are only a regulariser.\n" + "!" * 100)
        return rand()


# ----------------------------------------------------------------------------------------------------------------
# Data: ImageNet-layout folders with the ADM center crop, or a procedural class-conditional toy dataset.

IMG_EXT = fid.IMAGE_EXTENSIONS  # one list, and one reader (fid.read_image), for training and for FID


def center_crop(img, size):  # ADM: halve with BOX while min side >= 2 size, BICUBIC to size, center crop
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top: top + size, left: left + size]


def class_table(classes, counts, ignored=(), max_rows=40):
    """Text for the log: the totals, a (label, images, class) row per class (the first and last max_rows / 2 rows,
    and the smallest and largest class, when there are more), then one line per kind of entry the scan ignored."""
    K, half = len(classes), max_rows // 2
    lines = [f"data: {sum(counts)} images in {K} classes", "  label   images  class"]
    for k in range(K) if K <= max_rows else [*range(half), None, *range(K - half, K)]:
        lines.append(f"    ... {K - 2 * half} more classes" if k is None else f"  {k:5d} {counts[k]:8d}  {classes[k]}")
    if K > max_rows:
        lo, hi = min(range(K), key=counts.__getitem__), max(range(K), key=counts.__getitem__)
        lines.append(f"  images per class: {counts[lo]} ({classes[lo]}) to {counts[hi]} ({classes[hi]})")
    return "\n".join(lines + [f"ignored: {msg}" for msg in ignored])


class ImageFolderData(torch.utils.data.Dataset):
    """root/class_x/.../img.jpg: the sorted class folders are labels 0..K-1, each holding the image files found in it
    recursively; a folder without subfolders is one class of its own images. Names starting with "." (.thumbnails/,
    .DS_Store, ._img.png) are skipped; a class folder without an image file is an error; other entries left out
    (top-level files beside class folders, files with other extensions) are counted, with examples, in `ignored`.
    `classes` (names) and `counts` (images per class) are per label; describe() formats them for the log.
    An item is uint8 (3, size, size): fid.read_image (alpha composited onto `background`), then the ADM crop."""

    def __init__(self, root, size, background=(255, 255, 255)):
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data_path {root} is not a folder")
        if not (isinstance(background, (tuple, list)) and len(background) == 3
                and all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in background)):
            raise SystemExit(f"error: the background must be three integers in 0..255, got {background!r}")
        self.size, self.background, skipped, other_ext = size, tuple(background), {}, {}

        def skip(kind, path, folder=False):  # count an entry left out, keeping three (relative to root) as examples
            n, examples = skipped.get(kind, (0, []))
            rel = os.path.relpath(path, root) + "/" * folder
            skipped[kind] = n + 1, examples if len(examples) == 3 else examples + [rel]

        def image_files(folder, recursive):  # sorted full paths of the image files under folder
            found = []
            for r, dirs, files in os.walk(folder):  # sorted, so the examples of what is skipped are too
                for d in sorted(dirs):
                    if d.startswith("."):
                        skip("hidden", os.path.join(r, d), folder=True)
                dirs[:] = sorted(d for d in dirs if recursive and not d.startswith("."))
                for f in sorted(files):
                    ext = os.path.splitext(f)[1].lower()
                    if f.startswith("."):
                        skip("hidden", os.path.join(r, f))
                    elif ext in IMG_EXT:
                        found.append(os.path.join(r, f))
                    else:
                        skip("other", os.path.join(r, f))
                        other_ext[ext or "no extension"] = other_ext.get(ext or "no extension", 0) + 1
            return sorted(found)

        top = sorted(os.scandir(root), key=lambda e: e.name)
        self.classes = [e.name for e in top if e.is_dir() and not e.name.startswith(".")]
        flat = not self.classes
        if not flat:
            for e in top:
                if e.name.startswith("."):
                    skip("hidden", e.path, folder=e.is_dir())
                elif not e.is_dir():
                    skip("top-level", e.path)
            found = [image_files(os.path.join(root, c), recursive=True) for c in self.classes]
        else:  # a flat folder: one class of the image files in it
            self.classes, found = [os.path.basename(os.path.abspath(root))], [image_files(root, recursive=False)]
        self.counts, self.num_classes = [len(f) for f in found], len(self.classes)
        self.samples = [(p, k) for k, f in enumerate(found) for p in f]
        exts = ", ".join(f"{e} {n}" for e, n in sorted(other_ext.items()))
        what = {"hidden": "hidden entries (names starting with '.')",
                "top-level": "top-level files beside the class folders",
                "other": f"files with other extensions ({exts})"}
        self.ignored = [f"{what[kind]}: {n} ({', '.join(ex)}{', ...' * (n > len(ex))})"
                        for kind, (n, ex) in sorted(skipped.items(), key=lambda kv: list(what).index(kv[0]))]
        empty = [c for c, n in zip(self.classes, self.counts) if n == 0]
        if empty:
            names = ", ".join(empty[:10]) + (f" and {len(empty) - 10} more" if len(empty) > 10 else "")
            where = root if flat else f"the class folder{'s' * (len(empty) > 1)} {names} of {root}"
            raise SystemExit(f"error: no images ({', '.join(IMG_EXT)}) in {where}" +
                             "".join(f"\nignored: {msg}" for msg in self.ignored))

    def describe(self, max_rows=40):
        """The class table (label, images, name) and what the scan ignored, as lines of text for the log."""
        return class_table(self.classes, self.counts, self.ignored, max_rows)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        try:
            a = center_crop(Image.fromarray(fid.read_image(path, self.background)), self.size)
        except Exception as e:  # skipped: the collate function replaces it and the log counts it
            warnings.warn(f"skipping unreadable image {path}: {e.__cause__ or e}")
            return None
        return torch.from_numpy(a.copy()).permute(2, 0, 1), y  # uint8 (3, H, W)


class ToyShapes(torch.utils.data.Dataset):
    """The demo dataset: 10 classes of procedurally drawn shapes (class = shape and palette), any size, no files."""
    classes = ["red disc", "green square", "blue triangle", "yellow ring", "magenta cross", "cyan h-stripes",
               "orange v-stripes", "white diamond", "purple checker", "teal frame"]
    describe = ImageFolderData.describe  # the same class table

    def __init__(self, size, n=50_000, seed=0):
        self.size, self.n, self.seed, self.num_classes = size, n, seed, 10
        self.counts, self.ignored = [n // 10 + (k < n % 10) for k in range(10)], []

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


def collate(batch):  # replaces unreadable images by readable ones of the same batch, counting them
    good = [b for b in batch if b is not None]
    if not good:
        raise RuntimeError("a whole batch of unreadable images: check the data folder")
    bad = len(batch) - len(good)
    good += [good[i % len(good)] for i in range(bad)]
    return torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]), bad


class GlobalBatches(torch.utils.data.Sampler):
    """This process's micro-batches of dataset indices, from `step` on, without end. Step s of epoch e is positions
    [sB, (s + 1)B) of a permutation seeded by (seed, e) (a tail that fills no global batch is left out); process r
    takes the r-th of `world` contiguous slices of it, as `accum` contiguous micro-batches (SPEC 8.1)."""

    def __init__(self, n, batch, world, rank, accum, seed, step=0):
        self.n, self.B, self.accum, self.seed, self.step = n, batch, accum, seed, step
        self.b, self.first = batch // (world * accum), rank * (batch // world)

    def __iter__(self):
        perm, steps = None, self.n // self.B
        for step in itertools.count(self.step):
            epoch, s = divmod(step, steps)
            if perm is None or s == 0:
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_for(self.seed, epoch)))
            for k in range(self.accum):
                start = s * self.B + self.first + k * self.b
                yield perm[start: start + self.b].tolist()


def quiet_worker(_):  # data workers ignore the stop signals: the main process finishes its step, then ends them
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------------------------
# Training: AdamW, fp32 EMAs, bf16 autocast on CUDA, DDP under torchrun. A step is defined on the global batch: its
# data, each sample's t, eps and label dropout, and every loss normaliser depend only on (seed, step, position in the
# global batch), so any split over processes and micro-batches, and a resumed run, train the same weights.

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)  # end the run after the step (preemption, Ctrl-C)


def seed_for(*keys):  # a 32-bit seed that mixes non-negative integer keys (CPU generators use 32 bits of a seed)
    return int(np.random.SeedSequence(keys).generate_state(1)[0])


def seeded_noise(shape, seeds, device):  # (len(seeds), *shape) N(0, I), sample i drawn from its own seed seeds[i]
    g = torch.Generator(device)
    return torch.stack([torch.randn(shape, generator=g.manual_seed(s), device=device) for s in seeds])


class TrainStep(nn.Module):  # the denoiser and the REPA projector under one DDP wrapper
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, step, **kw):
        return self.loss_fn(self.model, x, y, step=step, **kw)


@torch.no_grad()
def update_ema(emas, model):  # each ema <- d ema + (1 - d) model, one fused op; NOTE(official): lerp, not mul + add
    params = list(model.parameters())
    torch._foreach_lerp_([p for e in emas.values() for p in e.parameters()], params * len(emas),
                         [1 - d for d in emas for _ in params])


def setup_dist(cfg):
    ddp = int(os.environ.get("RANK", -1)) != -1
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if ddp:
        dist.init_process_group("nccl" if cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
    else:
        rank, world, device = 0, 1, torch.device("cuda" if cuda else "cpu")
    torch.set_float32_matmul_precision("high")  # TF32 matmuls on CUDA (cuDNN convolutions use TF32 by default)
    return ddp, rank, world, device


def amp(device):  # bf16 autocast on CUDA, plain fp32 on the CPU; wraps forward passes only
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


def all_sum(tensors, device):  # sum CPU tensors over the processes, in place (NCCL reduces device tensors)
    for t in tensors if dist.is_initialized() else ():
        u = t.to(device)
        dist.all_reduce(u)
        t.copy_(u)


def save_checkpoint(obj, path, keep=None):
    """Atomic write (temp file + rename), then a snapshot `keep` (a hard link where the disk allows). A failed write
    stops the run naming its cause, removes the temp file and leaves the last good checkpoint as it was."""
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


LOSS_ARGS = ("lpips_weight", "pdino_weight", "repa_weight", "repa_layer", "gate_t", "P_mean", "P_std", "t_eps",
             "label_dropout", "num_classes", "gate_pdino", "adaptive_from")  # Config fields PixelGenLoss takes


def build(cfg, device, log=print):  # a run's denoiser, its EMAs, the frozen nets, the objective and AdamW
    torch.manual_seed(cfg.seed)  # identical initial weights on every process
    model = JiT(**MODELS[cfg.model], input_size=cfg.image_size, num_classes=cfg.num_classes).to(device)
    model.grad_ckpt = cfg.grad_ckpt
    emas = {d: copy.deepcopy(model).requires_grad_(False).eval() for d in cfg.ema}  # fp32, sampled from
    dino, lp = perceptual_nets(cfg, device, log)
    loss_fn = PixelGenLoss(model.final_layer.linear.in_features, dino, lp,
                           **{k: getattr(cfg, k) for k in LOSS_ARGS}).to(device)
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda" or None)
    for m in (model, dino, lp) if cfg.compile else ():
        m.compile() if m is not None else None
    return model, emas, dino, lp, loss_fn, opt


def start_wandb(cfg):  # optional: imported only when --wandb asks; one wandb run per out_dir, resumed with it
    import wandb
    id_file = os.path.join(cfg.out_dir, "wandb_id.txt")
    run_id = open(id_file).read().strip() if os.path.isfile(id_file) else wandb.util.generate_id()
    with open(id_file, "w") as f:
        f.write(run_id)
    return wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or os.path.basename(os.path.abspath(cfg.out_dir)),
                      id=run_id, resume="allow", config=dataclasses.asdict(cfg), dir=cfg.out_dir)


def train(cfg, hook=None):
    ddp, rank, world, device = setup_dist(cfg)
    cfg = dataclasses.replace(cfg, repa_layer=REPA_LAYER[cfg.model] if cfg.repa_layer < 0 else cfg.repa_layer)
    master, cuda = rank == 0, device.type == "cuda"
    os.makedirs(cfg.out_dir, exist_ok=True)
    files = [open(os.path.join(cfg.out_dir, f), "a") for f in ("log.txt", "metrics.jsonl")] if master else []
    wandb_run = start_wandb(cfg) if master and cfg.wandb else None

    def log(msg, row=None):  # rank 0: stdout (above the progress bar) and log.txt; a row to metrics.jsonl and wandb
        if master:
            tqdm.write(msg)
            files[0].write(msg + "\n")
            files[1].write(json.dumps(row) + "\n" if row else "")
            for f in files:
                f.flush()
            if row and wandb_run:
                wandb_run.log(row, step=row["step"])

    log(f"config: {dataclasses.asdict(cfg)}")
    data = ImageFolderData(cfg.data_path, cfg.image_size) if cfg.data_path else ToyShapes(cfg.image_size)
    if data.num_classes > cfg.num_classes:
        raise SystemExit(f"error: the data has {data.num_classes} classes but --num_classes is {cfg.num_classes}")
    model, emas, dino, lp, loss_fn, opt = build(cfg, device, log)
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{len(data)} images, {data.num_classes} classes, {world} processes, device {device}")
    step, path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and os.path.isfile(path):
        try:  # a checkpoint from another config or a damaged file: say so, touch nothing
            ck = torch.load(path, map_location=device, weights_only=True)
            for obj, k in ((model, "model"), (loss_fn, "loss"), (opt, "opt")):
                obj.load_state_dict(ck[k])
            held = ck.get("emas", {str(cfg.ema[0]): ck["ema"]})
            for d, e in emas.items():  # an EMA decay new to this run starts from the current weights
                e.load_state_dict(held.get(str(d), model.state_dict()))
            step = ck["step"]
        except Exception as e:
            raise SystemExit(f"error: cannot resume from {path}: {str(e)[:400]}\nUse another --out_dir or --no-resume.")
        log(f"resumed from {path} at step {step}" + "".join(f"; EMA {d} starts now" for d in emas
                                                                  if str(d) not in held))
    net = TrainStep(model, loss_fn)
    if ddp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
        ctrl = dist.new_group(backend="gloo")  # agreement on stopping, on the host: no device sync
    B, K = cfg.batch_size, cfg.grad_accum
    b, first = B // (world * K), rank * (B // world)  # micro-batch size; this process's first position in a batch
    steps_per_epoch = len(data) // B
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(data)} images are fewer than one global batch of {B}")
    max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    log(f"{max_steps} steps, {steps_per_epoch} per epoch, global batch {B} = {world} processes x {K} micro-batches "
        f"x {b}")
    sampler = GlobalBatches(len(data), B, world, rank, K, cfg.seed, step)
    batches = iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate, pin_memory=cuda,
                                               num_workers=cfg.num_workers, worker_init_fn=quiet_worker))
    fid_ctx = fid_setup(cfg, device, rank, world) if cfg.eval_every and cfg.fid_ref else None
    stop, handlers = [], {}

    def on_signal(sig, frame):  # finish the step, write ckpt.pt, stop; a second signal acts at once
        stop.append(signal.Signals(sig).name)
        signal.signal(sig, handlers[sig])

    handlers.update({s: signal.signal(s, on_signal) for s in STOP_SIGNALS})
    sums, gate_sum, bad_images, t0, t_log = None, 0.0, 0, time.time(), step
    bar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    loss_fn.train()
    try:
        while step < max_steps:
            g = torch.Generator().manual_seed(seed_for(cfg.seed, step))  # t, label dropout, flips of the global batch
            t_all, drop_all = sample_t(B, cfg.P_mean, cfg.P_std, g), torch.rand(B, generator=g) < cfg.label_dropout
            flip_all = (torch.rand(B, generator=g) < 0.5) & cfg.flip
            norm = (B, int((t_all >= cfg.gate_t).sum()))  # the global batch's samples and gated samples
            for k in range(K):
                img, y, bad = next(batches)
                pos = slice(first + k * b, first + (k + 1) * b)  # this micro-batch's positions in the global batch
                x = img.to(device, non_blocking=True).float() / 127.5 - 1  # uint8 -> [-1, 1]
                x = torch.where(flip_all[pos].to(device).view(-1, 1, 1, 1), x.flip(-1), x) if cfg.flip else x
                eps = seeded_noise(x.shape[1:], [seed_for(cfg.seed, step, i) for i in range(pos.start, pos.stop)],
                                   device)
                torch.manual_seed(seed_for(cfg.seed, step, rank, k))  # dropout masks
                with net.no_sync() if ddp and k < K - 1 else contextlib.nullcontext():  # DDP syncs on the last one
                    with amp(device):
                        out = net(x, y.to(device, non_blocking=True), step, t=t_all[pos], noise=eps,
                                  drop=drop_all[pos], norm=norm, adapt=k == 0)
                    (out["loss"] * world).backward()  # DDP averages over processes; the shares add up
                vals = torch.stack([out[n].float() for n in ("loss", "fm", "lpips", "pdino", "repa")])  # on the device
                sums = vals if sums is None else sums + vals
                bad_images += bad
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_ema(emas, model)
            step += 1
            gate_sum += norm[1] / B
            bar.update(1)
            if hook:
                hook(step, model, emas)
            if ddp:  # every process stops at the same step
                flag = torch.tensor(len(stop))
                dist.all_reduce(flag, dist.ReduceOp.MAX, group=ctrl)
                stop += ["a signal to another process"] if flag and not stop else []
            keep = cfg.keep_every and step % cfg.keep_every == 0  # also a snapshot ckpt_{step}.pt
            save = step % cfg.ckpt_every == 0 or step == max_steps or bool(stop) or keep
            if step % cfg.log_every == 0 or save:
                tot = torch.cat([sums, sums.new_tensor([bad_images])])
                if ddp:
                    dist.all_reduce(tot)
                avg = (tot[:5] / (step - t_log)).tolist() + [gate_sum / (step - t_log)]  # the one host sync
                if not all(math.isfinite(v) for v in avg):
                    raise SystemExit(f"error: non-finite loss at step {step} ({avg}); last good checkpoint: {path}")
                dt = time.time() - t0
                ips, eta = B * (step - t_log) / dt, (max_steps - step) * dt / (step - t_log)
                row = dict(step=step, epoch=round(step / steps_per_epoch, 4), **dict(zip(
                    ("loss", "fm", "lpips", "pdino", "repa", "gate"), avg)), w_ad=loss_fn.percept_weight.item(),
                    lr=cfg.lr, img_per_s=round(ips, 2), **({"peak_mem_gib": round(torch.cuda.max_memory_allocated(
                        device) / 2**30, 2)} if cuda else {}))
                log(f"step {step}/{max_steps} loss {avg[0]:.4f} fm {avg[1]:.4f} lpips {avg[2]:.4f} pdino {avg[3]:.4f} "
                    f"repa {avg[4]:.4f} gate {avg[5]:.2f} w_ad {row['w_ad']:.3f} lr {cfg.lr:g} img/s {ips:.1f} eta "
                    f"{eta / 60:.1f} min bad_images {int(tot[5])}", row)
                sums, gate_sum, bad_images, t0, t_log = None, 0.0, 0, time.time(), step
            if save and master:
                save_checkpoint(dict(model=model.state_dict(), ema=emas[cfg.ema[0]].state_dict(), emas={
                    str(d): e.state_dict() for d, e in emas.items()}, loss=loss_fn.state_dict(), opt=opt.state_dict(),
                    step=step, config=dataclasses.asdict(cfg)), path,
                    os.path.join(cfg.out_dir, f"ckpt_{step:07d}.pt") if keep else None)
                log(f"saved {path}" + (f" and ckpt_{step:07d}.pt" if keep else ""))
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == max_steps) and not stop:
                t1 = time.time()
                try:  # an evaluation that fails never costs the run its checkpoint or its progress
                    rows = evaluate(emas, cfg.eval_samples, cfg, device, rank, world,
                                    None if fid_ctx else os.path.join(cfg.out_dir, f"eval_{step:07d}"), fid_ctx)
                    for r in rows:
                        log(f"eval step {step} ema {r['ema']} cfg {r['cfg_scale']:g}: FID {r['fid']:.3f} "
                            f"IS {r['inception_score']:.2f} ({time.time() - t1:.0f} s)",
                            dict(step=step, **r, eval_seconds=round(time.time() - t1, 1)))
                except Exception as e:
                    log(f"evaluation at step {step} failed, training goes on: {e!r}")
            if master and cfg.sample_every and (step % cfg.sample_every == 0 or step == max_steps) and not stop:
                grid = os.path.join(cfg.out_dir, f"grid_{step:07d}.png")
                save_grid(sample_images(emas[cfg.ema[0]], range(min(cfg.num_samples, 64)), cfg, device,
                                        cfg.cfg_scale[0]), grid, cfg.num_classes)
                log(f"sample grid: {grid}")
            if stop:
                log(f"stopped by {stop[0]} after step {step}; {path} is written: run the same command to continue")
                break
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)
        for f in files:
            f.close()
        if wandb_run:
            wandb_run.finish()
        if ddp:
            dist.destroy_process_group()
    return model, emas


# ----------------------------------------------------------------------------------------------------------------
# Sampling program: our checkpoints or official Lightning ones (EMA weights) -> samples (ADM npz), grids, FID and IS.

def load_denoiser(path, unsafe=False, decays=(), use_ema=True):
    """-> ({decay: JiT in eval mode}, config dict or None, step); decays picks EMA models (default: the first one).
    The preset is inferred from the weights' keys and shapes."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=True)
    except Exception as e:
        if "Unsupported global" in str(e):  # a valid file that pickles Python objects (e.g. Lightning hyper_parameters)
            raise SystemExit(f"error: {path} holds pickled Python objects besides tensors "
                             f"({str(e).splitlines()[-1][:200]}).\nIf you trust the file, pass --unsafe_load.")
        raise SystemExit(f"error: cannot read checkpoint {path} (corrupt or not a torch file): {str(e)[:300]}")
    ck = ck if isinstance(ck, dict) else {}
    conf, step = ck.get("config"), ck.get("step", ck.get("global_step"))
    if "ema" in ck and "model" in ck:  # ours; files from before several EMAs hold one
        held = {float(d): sd for d, sd in ck["emas"].items()} if "emas" in ck else {
            (conf or {}).get("ema", "ema"): ck["ema"]}
    elif "state_dict" in ck:  # official Lightning: denoiser. / ema_denoiser. prefixes; SimpleEMA decay 0.9999
        held = {0.9999: {k[13:]: v for k, v in ck["state_dict"].items() if k.startswith("ema_denoiser.")}}
        ck = dict(model={k[9:]: v for k, v in ck["state_dict"].items() if k.startswith("denoiser.")})
    else:
        raise SystemExit(f"error: {path} is neither a PixelGen checkpoint (model/ema) nor a Lightning one (state_dict)")
    if any(d not in held for d in decays):
        raise SystemExit(f"error: {path} holds no EMA of decay {', '.join(str(d) for d in decays if d not in held)}; "
                         f"it holds {', '.join(map(str, held))}")
    want = {d: held[d] for d in decays or list(held)[:1]} if use_ema else {"raw": ck["model"]}
    sd = next(iter(want.values()))
    try:
        p = sd["x_embedder.proj1.weight"].shape[-1]
        kw = dict(input_size=math.isqrt(sd["pos_embed"].shape[1]) * p, patch_size=p,
                  num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1)
    except KeyError as e:
        raise SystemExit(f"error: {path} has no JiT weights (missing {e})")
    report = []
    for name, preset in MODELS.items():
        with torch.device("meta"):
            ref = {k: v.shape for k, v in JiT(**preset, **kw).state_dict().items()}
        diff = sorted(set(ref) ^ set(sd)) + [f"{k} {tuple(sd[k].shape)} vs {tuple(ref[k])}" for k in ref
                                             if k in sd and sd[k].shape != ref[k]]
        if not diff:
            print(f"{path}: {name} at {kw['input_size']}px, {kw['num_classes']} classes, "
                  f"{'EMA ' + ', '.join(map(str, want)) if use_ema else 'raw'} weights")
            models = {d: JiT(**preset, **kw).eval() for d in want}
            for d, m in models.items():
                m.load_state_dict(want[d], strict=True)
            return models, conf, step
        report.append(f"  {name}: {len(diff)} differences, e.g. {'; '.join(diff[:3])}")
    raise SystemExit(f"error: the weights in {path} fit no preset:\n" + "\n".join(report))


@torch.no_grad()
def sample_images(model, idx, cfg, device, cfg_scale):  # image i: class i % K, noise from (seed, i) -> (b, H, W, 3)
    size = model.grid * model.patch_size
    noise = seeded_noise((3, size, size), [seed_for(cfg.seed, i) for i in idx], "cpu").to(device)  # any device: same
    with amp(device):
        x = sample(model, noise, torch.tensor(idx, device=device) % model.num_classes, cfg.sample_steps, cfg.sampler,
                   cfg_scale, cfg.cfg_interval, cfg.time_shift, cfg.t_eps)
    return to_uint8(x).numpy()


def save_grid(imgs, path, classes):  # (B, H, W, 3) uint8 -> one PNG; one column per class when that fits
    B, H, W, _ = imgs.shape
    nrow = classes if classes <= 16 and B % classes == 0 else math.ceil(math.sqrt(B))
    grid = np.zeros((math.ceil(B / nrow) * (H + 2) + 2, nrow * (W + 2) + 2, 3), np.uint8)
    for i, im in enumerate(np.asarray(imgs)):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = im
    Image.fromarray(grid).save(path)


def fid_setup(cfg, device, rank, world):  # (FID Inception, kept on the CPU; reference (mu, sigma)), once per run
    import fid
    try:
        net = fid.load_inception(cfg.fid_weights or None, device)
        ref = fid.reference_stats(cfg.fid_ref, net, cfg.fid_preprocess, shard=(rank, world),
                                  reduce=lambda ts: all_sum(ts, device))
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {str(e).replace('(--weights)', '(--fid_weights)')}")
    return net.cpu(), ref


def evaluate(emas, n, cfg, device, rank, world, out_dir=None, fid_ctx=None):
    """The sampling loop of --sample, online evaluation and sweeps. For every EMA model and CFG scale: n images, image
    i of class i % K from noise seeded by (seed, i) (the same for every setting), sharded over the processes (rank
    i mod world). With out_dir, writes each setting's samples (ADM npz, grid, PNGs with --save_pngs); with fid_ctx =
    (Inception, reference stats), returns a row of FID and IS per setting, from features sharded like the images."""
    import fid
    mine, bs, rows = list(range(rank, n, world)), max(1, cfg.batch_size // world), []
    net = fid_ctx[0].to(device) if fid_ctx else None
    os.makedirs(out_dir, exist_ok=True) if out_dir else None
    for d, model in emas.items():
        for w in cfg.cfg_scale:
            tag = "" if len(emas) * len(cfg.cfg_scale) == 1 else f"_ema{d}_cfg{w:g}"
            stats, imgs = fid.Stats(n) if net else None, []
            os.makedirs(os.path.join(out_dir, f"images{tag}"), exist_ok=True) if out_dir and cfg.save_pngs else None
            for j in tqdm(range(0, len(mine), bs), disable=rank != 0, desc=f"sampling{tag}", leave=False):
                idx = mine[j: j + bs]
                im = sample_images(model, idx, cfg, device, w)
                if net:
                    stats.add(*fid.get_features(net, im, cfg.fid_preprocess, return_logits=True), index=idx)
                if out_dir:
                    imgs.append(im)
                    for i, a in zip(idx, im if cfg.save_pngs else []):
                        Image.fromarray(a).save(os.path.join(out_dir, f"images{tag}", f"{i:06d}.png"))
            if out_dir:
                write_samples(imgs, mine, n, os.path.join(out_dir, f"samples{tag}.npz"), model, rank, world)
            if net:
                all_sum(stats.tensors, device)
                rows.append(dict(ema=d, cfg_scale=w, sampler=cfg.sampler, sample_steps=cfg.sample_steps,
                                 time_shift=cfg.time_shift, num_samples=n, fid=fid.frechet_distance(
                                     *stats.mu_sigma(), *fid_ctx[1]), inception_score=stats.inception_score()))
    if net:
        net.cpu()  # the Inception does not stay in GPU memory between evaluations
    return rows


def write_samples(imgs, mine, n, path, model, rank, world):  # shards -> one ADM npz in index order (+ a grid)
    size, K = model.grid * model.patch_size, model.num_classes
    shard = path.replace(".npz", f"_rank{rank}.npz")
    np.savez(shard, arr_0=np.concatenate(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8), idx=mine)
    if world > 1:
        dist.barrier()
    if rank == 0:  # merged in index order, so the file does not depend on the number of processes
        out = np.zeros((n, size, size, 3), np.uint8)
        for r in range(world):
            f = path.replace(".npz", f"_rank{r}.npz")
            with np.load(f) as s:
                out[s["idx"]] = s["arr_0"]
            os.remove(f)
        np.savez(path, arr_0=out, arr_1=np.arange(n) % K)
        save_grid(out[:100], path.replace("samples", "grid").replace(".npz", ".png"), K)
        print(f"wrote {path} ({n} images) and its grid")


@torch.no_grad()
def sample_main(cfg):
    ddp, rank, world, device = setup_dist(cfg)
    path = cfg.ckpt or os.path.join(cfg.out_dir, "ckpt.pt")
    models, _, step = load_denoiser(path, cfg.unsafe_load, cfg.ema_decay)
    for m in models.values():
        m.to(device).compile() if cfg.compile else m.to(device)
    fid_ctx = fid_setup(cfg, device, rank, world) if cfg.fid_ref else None
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows = [dict(ckpt=path, step=step, **r) for r in evaluate(models, cfg.num_samples, cfg, device, rank, world,
                                                                cfg.out_dir, fid_ctx)]
    if rank == 0 and rows:  # eval.json: a list of rows, appended to; the table marks the best FID
        out = os.path.join(cfg.out_dir, "eval.json")
        with open(out + ".tmp", "w") as f:
            json.dump((json.load(open(out)) if os.path.isfile(out) else []) + rows, f, indent=1)
        os.replace(out + ".tmp", out)
        best = min(rows, key=lambda r: r["fid"])
        print(f"{'ema':>8} {'cfg':>6} {'FID':>9} {'IS':>9}")
        for r in rows:
            print(f"{r['ema']!s:>8} {r['cfg_scale']:>6g} {r['fid']:>9.3f} {r['inception_score']:>9.2f}"
                  + ("  <- best FID" if r is best and len(rows) > 1 else ""))
        print(f"appended {len(rows)} row(s) to {out}")
    if ddp:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: full training steps and sampling, split by component, with analytic FLOPs and MFU on CUDA.

def bench(cfg):
    _, _, _, device = setup_dist(cfg)
    cuda, B, S = device.type == "cuda", cfg.batch_size, cfg.image_size
    model, emas, dino, lp, loss_fn, opt = build(dataclasses.replace(cfg, perceptual_init="random"), device,
                                                log=lambda m: None)  # random perceptual weights: the same cost
    x, y = torch.rand(B, 3, S, S, device=device) * 2 - 1, torch.randint(0, cfg.num_classes, (B,), device=device)
    g = (torch.rand(B) < 0.52).to(device)  # the gated share under logit-normal t
    xg, p, model_ema = x[g].detach().requires_grad_(True), model.patch_size, next(iter(emas.values()))

    def timeit(fn, n=cfg.bench_steps):  # ms per call after two warm-up calls
        for i in range(n + 2):
            if i == 2:
                torch.cuda.synchronize() if cuda else None
                t0 = time.perf_counter()
            fn()
        torch.cuda.synchronize() if cuda else None
        return (time.perf_counter() - t0) / n * 1e3

    def full():  # one training step as in train(): host t and label dropout, per-sample noise, global normalisers
        t, eps = sample_t(B, cfg.P_mean, cfg.P_std), seeded_noise(x.shape[1:], [seed_for(i) for i in range(B)], device)
        with amp(device):
            out = loss_fn(model, x, y, t=t, noise=eps, drop=torch.rand(B) < cfg.label_dropout,
                          norm=(B, int((t >= cfg.gate_t).sum())))
        out["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(emas, model)

    def denoiser():  # forward + backward of the denoiser and the REPA head
        with amp(device):
            x_hat, h = model(x, torch.rand(B, device=device), y, return_layer=loss_fn.repa_layer)
            l = x_hat.float().pow(2).mean() + (loss_fn.proj(h).float().pow(2).mean() if loss_fn.proj else 0)
        l.backward()

    def lpips_part():  # forward on the gated share, input-gradient backward
        with amp(device):
            l = lp(xg, x[g]).float().mean()
        l.backward()

    def dino_part():  # targets of the whole batch, then forward + input-gradient backward on the gated share
        with amp(device):
            with torch.no_grad():
                dino.patch_tokens(x, p)
            l = dino.patch_tokens(xg, p).float().pow(2).mean()
        l.backward()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = {"step": timeit(full)}
    import resource  # CPU: the process's peak resident memory
    mem = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    parts = dict(denoiser=denoiser, lpips=lpips_part if lp else None, dino=dino_part if dino else None,
                 **{"opt+ema": lambda: (opt.step(), update_ema(emas, model))})
    ms.update({k: timeit(fn) for k, fn in parts.items() if fn})
    noise = torch.randn(B, 3, S, S, device=device)
    with amp(device):
        ms_sample = timeit(lambda: sample(model_ema, noise, y, cfg.sample_steps, cfg.sampler, cfg.cfg_scale[0],
                                          cfg.cfg_interval, cfg.time_shift), n=1)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if k != "step")
    print(f"{cfg.model} {S}px batch {B} on {device}{' compiled' if cfg.compile else ''}"
          f"{' grad_ckpt' if cfg.grad_ckpt else ''}: train {B / ms['step'] * 1e3:.1f} img/s ({ms['step']:.1f} ms/step; "
          f"{parts} ms), peak memory {mem / 2**30:.2f} GiB; sampling ({cfg.sampler} {cfg.sample_steps}, cfg "
          f"{cfg.cfg_scale[0]}) {B / ms_sample * 1e3:.2f} img/s")
    if cuda and dino and lp:  # analytic FLOPs of one step: matmuls and attention, x3 for forward + backward
        T, D, gated = model.grid ** 2 + model.in_context_len, model.pos_embed.shape[-1], g.float().mean().item()
        # per-token weights (qkv, proj, SwiGLU); adaLN acts on one vector per image and is left out
        lin = sum(w.numel() for n, w in model.named_parameters() if w.dim() == 2 and "blocks" in n and "adaLN" not in n)
        f_den = 3 * (2 * lin * T + len(model.blocks) * 4 * T * T * D) * B
        Nd, dp = (S // p) ** 2 + 1, sum(w.numel() for w in dino.parameters() if w.dim() == 2)
        f_dino = (1 + 2 * gated) * B * (2 * dp * Nd + 12 * 4 * Nd * Nd * 768)  # targets; gated fwd + input-grad bwd
        f_vgg = 3 * gated * B * 2 * 15.35e9 * (S * 16 // p / 224) ** 2  # VGG16 convs: 15.35 GMAC at 224 px
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        peak = 2 * 8192**3 / timeit(lambda: a @ a, n=20) * 1e3  # the card's dense bf16 rate, measured
        flops = (f_den + f_dino + f_vgg) / ms["step"] * 1e3
        print(f"model FLOPs {flops / 1e12:.0f} TFLOP/s, measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s, "
              f"MFU {100 * flops / peak:.1f}% (denoiser {f_den / 1e12:.2f}, DINO {f_dino / 1e12:.2f}, VGG "
              f"{f_vgg / 1e12:.2f} TFLOP per step)")
    return ms


# ----------------------------------------------------------------------------------------------------------------
# CLI: --train | --sample | --bench, and one flag per Config field, documented by its comment in Config.
# Precedence: Config < recipe < the checkpoint's sampling settings (--sample) < explicit flags.

MODES = dict(train="train; under torchrun on all processes; resumes from OUT_DIR/ckpt.pt",
             sample="sample a checkpoint: samples.npz and grid.png per setting; FID and IS with --fid_ref (eval.json)",
             bench="time the training step by component, sampling, peak memory (MFU on CUDA)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, usage="%(prog)s (--train | --sample | --bench) [options]",
                                argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("mode").add_mutually_exclusive_group(required=True)
    for m, text in MODES.items():
        mode.add_argument(f"--{m}", action="store_true", help=text)
    choices = dict(recipe=["auto", *RECIPES], model=list(MODELS), sampler=list(SAMPLERS),
                   device=["auto", "cpu", "cuda"], perceptual_init=["pretrained", "random"],
                   fid_preprocess=["adm", "pytorch-fid"])
    group, groups = "", {}
    for line in inspect.getsource(Config).splitlines():  # the help of each field is its comment in Config
        name, _, text = line.strip().partition("#")
        if line.startswith("    #"):
            group = text.strip()
        elif line.startswith("    ") and ":" in name:
            f = Config.__dataclass_fields__[name.split(":")[0].strip()]
            fmt = lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else v
            text = (f"{text.strip()} (default: {fmt(f.default)}" + "".join(
                f"; {r}: {fmt(v[f.name])}" for r, v in RECIPES.items() if f.name in v) + ")").replace("%", "%%")
            kind = dict(action=argparse.BooleanOptionalAction) if f.type is bool else dict(
                type=float, nargs=2 if f.name == "cfg_interval" else "+") if f.type is tuple else dict(
                type=f.type, choices=choices.get(f.name))
            groups.setdefault(group, p.add_argument_group(group)).add_argument(f"--{f.name}", help=text, **kind)
    args = vars(p.parse_args(argv))
    recipe = args.get("recipe", "auto")
    if recipe == "auto":
        recipe = "xl-80ep" if args.get("data_path") or args.get("ckpt") else "demo"
    conf = {**dataclasses.asdict(Config()), **RECIPES[recipe], "recipe": recipe}
    if recipe == "demo" and torch.cuda.is_available() and args.get("device") != "cpu":
        conf.update(DEMO_CUDA)  # a GPU trains the demo longer and on larger batches in the same minutes
    if args.get("sample"):  # our checkpoints carry their sampling settings
        path = args.get("ckpt") or os.path.join(args.get("out_dir", conf["out_dir"]), "ckpt.pt")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            conf.update({k: ck["config"][k] for k in ("sampler", "sample_steps", "cfg_scale", "cfg_interval",
                                                      "time_shift", "t_eps", "seed") if k in ck.get("config", {})})
        except Exception:
            pass  # load_denoiser reports unreadable files
    conf.update({k: v for k, v in args.items() if k in conf})
    cfg = Config(**{k: tuple(v) if isinstance(v, (list, tuple)) else (v,) if isinstance(Config.__dataclass_fields__[
        k].default, tuple) else v for k, v in conf.items()})
    cfg = dataclasses.replace(cfg, repa_layer=REPA_LAYER[cfg.model] if cfg.repa_layer < 0 else cfg.repa_layer)
    for name in ("batch_size", "grad_accum", "sample_steps", "num_samples", "ckpt_every", "log_every", "image_size",
                 "bench_steps", "epochs"):
        if getattr(cfg, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("max_steps", "keep_every", "eval_every", "sample_every", "seed"):
        if getattr(cfg, name) < 0:
            p.error(f"--{name} must be 0 or more, got {getattr(cfg, name)}")
    if cfg.lr <= 0 or not all(0 <= d < 1 for d in cfg.ema + cfg.ema_decay) or not 0 <= cfg.label_dropout < 1 \
            or cfg.time_shift <= 0 or cfg.cfg_interval[0] > cfg.cfg_interval[1]:
        p.error("need --lr > 0, EMA decays (--ema, --ema_decay) in [0, 1), 0 <= --label_dropout < 1, "
                "--time_shift > 0 and --cfg_interval LO HI with LO <= HI")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % (world * cfg.grad_accum):
        p.error(f"--batch_size {cfg.batch_size} (global) does not split into {world} processes x {cfg.grad_accum} "
                f"micro-batches (--grad_accum): make it a multiple of {world * cfg.grad_accum}")
    if cfg.image_size % MODELS[cfg.model].get("patch_size", 16) or cfg.repa_layer >= MODELS[cfg.model]["depth"]:
        p.error(f"--image_size must be a multiple of the patch size and --repa_layer < depth for {cfg.model}")
    if cfg.eval_every and cfg.eval_samples < 2 or args.get("sample") and cfg.fid_ref and cfg.num_samples < 2:
        p.error("FID needs at least 2 samples (--eval_samples, --num_samples)")
    for name in ("fid_ref", "fid_weights", "dino_path", "vgg_path", "data_path"):
        if getattr(cfg, name) and not os.path.exists(getattr(cfg, name)):
            p.error(f"--{name} {getattr(cfg, name)}: no such file or folder")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        p.error("--wandb needs the wandb package (pip install wandb); it is not a dependency of this project")
    return cfg, next(m for m in MODES if args.get(m))


if __name__ == "__main__":
    cfg, mode = parse_args()
    {"train": train, "sample": sample_main, "bench": bench}[mode](cfg)
