"""
PixelGen (arXiv 2602.02493) in one file: pixel-space diffusion with perceptual supervision.

A patch-16 JiT transformer predicts the clean image from a noisy one (x-prediction), is trained with the
flow-matching velocity loss plus noise-gated perceptual losses (LPIPS for local texture, P-DINO on frozen
DINOv2 features for global semantics) and REPA feature alignment, and is sampled with a Heun ODE solver and
classifier-free guidance. The paper reaches FID 5.11 on ImageNet-256 without guidance after 80 epochs.

    python pixelgen.py --train                                   # CPU/GPU demo on the built-in toy dataset
    torchrun --nproc_per_node=8 pixelgen.py --train --data_path /data/imagenet/train             # XL/16, 80 ep
    torchrun --nproc_per_node=8 pixelgen.py --train --recipe xl-160ep --data_path /data/imagenet/train
    torchrun --nproc_per_node=8 pixelgen.py --train --recipe l-200k --data_path /data/imagenet/train
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_endpoint=HOST:29500 pixelgen.py --train --data_path ...
    torchrun --nproc_per_node=8 pixelgen.py --sample --ckpt PixelGen_XL_80ep.ckpt --num_samples 50000
    python pixelgen.py --bench --recipe xl-80ep --batch_size 32 --compile   # speed, memory and MFU on one GPU
    python fid.py runs/pixelgen/samples.npz VIRTUAL_imagenet256_labeled.npz --is --pr

Notation (paper Sec. 3; t = 0 is pure noise, t = 1 is the clean image):
    x      clean image in [-1, 1], (B, 3, H, W)        eps    Gaussian noise, like x
    t      time in [0, 1]                              y      class label; y = num_classes is the null class
    x_t    = t x + (1 - t) eps                 Eq. (2) x_hat  = net(x_t, t, y), the predicted clean image  Eq. (1)
    v      = (x - x_t) / (1 - t)               Eq. (3) v_hat  = (x_hat - x_t) / (1 - t)                    Eq. (4)
The technical contract is SPEC.md of the project; every deliberate difference from the official code
(github Zehong-Ma/PixelGen) is marked `NOTE(official)`.
"""
import argparse
import copy
import dataclasses
import math
import os
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
    out_dir: str = "runs/pixelgen"    # checkpoints, log, grids, samples
    device: str = "auto"              # auto (cuda if available) | cpu | cuda
    seed: int = 1234                  # official seed_everything: 1234
    # optimisation (official PixelGen_XL.yaml)
    batch_size: int = 256             # global batch, split over ranks; paper 256
    lr: float = 1e-4                  # AdamW, constant, no warmup
    beta1: float = 0.9                # AdamW betas: torch defaults, as official
    beta2: float = 0.999
    weight_decay: float = 0.0         # official weight_decay: 0.0
    epochs: int = 80                  # paper: 80 epochs ~ 400k steps at batch 256
    max_steps: int = 0                # > 0 overrides epochs
    ema: float = 0.9999               # official SimpleEMA decay, every step, fp32
    num_workers: int = 8              # data loader workers per rank
    compile: bool = False             # torch.compile the denoiser and the frozen nets (CUDA; see --bench)
    # objective (paper Eq. 6-9; official training_repa_JiT_LPIPS_DINO_NoiseGating.py)
    P_mean: float = -0.8              # logit-normal t: t = sigmoid(P_mean + P_std n)
    P_std: float = 0.8
    t_eps: float = 0.05               # clamp of 1 - t in x -> v
    label_dropout: float = 0.1        # official null_condition_p
    lpips_weight: float = 0.1         # paper lambda_1
    pdino_weight: float = 0.01        # paper lambda_2
    repa_weight: float = 0.5          # official feat_loss_weight
    repa_layer: int = 8               # official align_layer
    gate_t: float = 0.3               # noise gate g(t) = 1[t >= gate_t]; official percept_t_threshold
    gate_pdino: bool = True           # False reproduces the released code, whose P-DINO is effectively ungated
    adaptive_from: int = -1           # >= 0: adaptive perceptual weight from this step (160-epoch recipe: 400000)
    perceptual_init: str = "pretrained"  # pretrained | random (explicit opt-in for smoke runs without weights)
    dino_path: str = ""               # dinov2_vitb14_pretrain.pth; "" = torch hub cache
    vgg_path: str = ""                # vgg16-397923af.pth for LPIPS; "" = torch hub cache
    # sampling (paper Sec. 4; official HeunSamplerJiT in PixelGen_XL.yaml)
    sampler: str = "heun"             # heun | euler | adams2
    sample_steps: int = 50            # paper: 50 steps
    cfg_scale: float = 1.0            # 1.0 = no guidance (FID 5.11); 2.25 for the 160-epoch model (FID 1.83)
    cfg_interval: tuple = (0.1, 0.9)  # guidance only while lo < t <= hi
    time_shift: float = 2.0           # XL: 2.0; L/16 ablations: 1.0
    num_samples: int = 64             # --sample: images to generate (50000 for FID, 50 per class)
    save_pngs: bool = False           # --sample: also write one PNG per image
    ckpt: str = ""                    # --sample: our checkpoint or an official Lightning .ckpt
    unsafe_load: bool = False         # allow unpickling arbitrary objects (trusted official files only)
    # bookkeeping
    resume: bool = True               # continue from OUT_DIR/ckpt.pt when it exists
    ckpt_every: int = 5000            # steps between checkpoints
    log_every: int = 100              # steps between log lines (the only host-device syncs)
    sample_every: int = 10000         # steps between sample grids (0 = never)
    bench_steps: int = 5              # --bench: timed steps after warm-up


# One flag selects a paper run; each entry states only what differs from the Config defaults.
RECIPES = {
    "xl-80ep": dict(),                                                   # Table 2: FID 5.11, Heun 50, no CFG
    "xl-160ep": dict(epochs=160, cfg_scale=2.25, adaptive_from=400_000),  # Table 2: FID 1.83, CFG 2.25 on (0.1, 0.9]
    "l-200k": dict(model="PixelGen-L/16", max_steps=200_000, sampler="euler", time_shift=1.0),  # Table 3 ablations
    # Laptop demo: a 4M-parameter model on 64 px toy shapes; faster lr and EMA because it trains for minutes.
    "demo": dict(model="PixelGen-T/16", image_size=64, num_classes=10, batch_size=16, lr=1e-3, ema=0.99,
                 max_steps=500, repa_layer=2, num_workers=0, sample_steps=25, time_shift=1.0, cfg_scale=2.0,
                 ckpt_every=250, log_every=25, sample_every=250, out_dir="runs/demo", num_samples=40),
}

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
    def __init__(self, input_size=256, patch_size=16, in_channels=3, hidden_size=1024, depth=24, num_heads=16,
                 mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, num_classes=1000, bottleneck_dim=128,
                 use_bottleneck=True, in_context_len=32, in_context_start=8):
        super().__init__()
        assert input_size % patch_size == 0 and hidden_size % num_heads == 0 and hidden_size % 4 == 0
        assert in_context_len == 0 or in_context_start < depth, "in-context tokens must enter before the last block"
        self.patch_size, self.num_classes, self.in_channels = patch_size, num_classes, in_channels
        self.in_context_len, self.in_context_start, self.grid = in_context_len, in_context_start, input_size // patch_size
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
        for conv in (self.x_embedder.proj1, getattr(self.x_embedder, "proj2", None)):
            if conv is not None:
                nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
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
        for i, block in enumerate(self.blocks):
            if i == return_layer:
                h = x[:, self.in_context_len:] if i > self.in_context_start else x
            if self.in_context_len > 0 and i == self.in_context_start:  # prepend the class tokens
                x = torch.cat([y_emb[:, None] + self.in_context_posemb, x], 1)  # (B, L + N, D)
            x = block(x, c, rope_ic if self.in_context_len > 0 and i >= self.in_context_start else rope)
        x = self.final_layer(x[:, self.in_context_len:], c)             # (B, N, p*p*3)
        p, g = self.patch_size, self.grid
        x_hat = x.view(-1, g, g, p, p, self.in_channels).permute(0, 5, 1, 3, 2, 4).reshape(-1, self.in_channels, g * p, g * p)
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
    """Owns the trainable REPA projector; uses (does not own) the frozen DINOv2 and LPIPS networks."""

    def __init__(self, hidden_size, dino, lpips, *, lpips_weight=0.1, pdino_weight=0.01, repa_weight=0.5,
                 repa_layer=8, gate_t=0.3, P_mean=-0.8, P_std=0.8, t_eps=0.05, label_dropout=0.1, num_classes=1000,
                 gate_pdino=True, adaptive_from=-1):
        super().__init__()
        self.lpips_weight, self.pdino_weight, self.repa_weight, self.repa_layer = lpips_weight, pdino_weight, repa_weight, repa_layer
        self.gate_t, self.P_mean, self.P_std, self.t_eps = gate_t, P_mean, P_std, t_eps
        self.label_dropout, self.num_classes, self.gate_pdino, self.adaptive_from = label_dropout, num_classes, gate_pdino, adaptive_from
        self.proj = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size),
                                  nn.SiLU(), nn.Linear(hidden_size, 768))  # REPA head, to DINOv2-B width
        self.register_buffer("percept_weight", torch.ones(()))  # adaptive weight w_ad of the 160-epoch recipe
        # The frozen nets stay outside the module tree: not in state_dict(), not trained, not seen by DDP.
        self.__dict__.update(dino=dino.eval().requires_grad_(False), lpips=lpips.eval().requires_grad_(False))

    def forward(self, model, x, y, t=None, noise=None, step=0):
        B, device = x.shape[0], x.device
        if t is None:  # drawn on the host, so the gate below is known without a device sync
            t = sample_t(B, self.P_mean, self.P_std)  # NOTE(official): same law, drawn on the GPU there
        gate = (t >= self.gate_t).cpu()                                          # g(t), Eq. (7)
        idx = gate.nonzero()[:, 0]
        t = t.to(device, non_blocking=True)
        eps = torch.randn_like(x) if noise is None else noise
        if self.training and self.label_dropout > 0:  # CFG: replace labels by the null class at rate 0.1
            y = torch.where(torch.rand(B, device=device) < self.label_dropout, self.num_classes, y)
        xt = x_t(x, eps, t)
        x_hat, h = model(xt, t, y, return_layer=self.repa_layer)                # Eq. (1)
        fm = (x_to_v(x_hat, xt, t, self.t_eps) - x_to_v(x, xt, t, self.t_eps)).pow(2).mean()  # Eq. (5)
        p = model.patch_size
        # NOTE(official): DINO resizes by the model's patch (official: always 16), so REPA tokens align for any patch.
        with torch.no_grad():
            z = self.dino.patch_tokens(x, p).float()                            # DINOv2 tokens of x, (B, N, 768)
        repa = (1 - F.cosine_similarity(self.proj(h).float(), z, dim=-1)).mean()  # Eq. (9), not gated
        # Perceptual terms only on the gated samples (NOTE(official): the official code runs both nets on the whole
        # batch and masks; this is the same loss and gradient at about half the cost).
        zero = x_hat.new_zeros(()).float()
        lp = pd = zero
        if len(idx):
            idx = idx.to(device, non_blocking=True)
            a, b = x_hat[idx], x[idx]
            if p != 16:  # LPIPS sees the image at patch-16 scale, as official
                size = x.shape[-1] * 16 // p
                a, b = (F.interpolate(u, size=(size, size), mode="bilinear", antialias=True) for u in (a, b))
            lp = self.lpips(a, b).float().mean()                              # Eq. (7): mean over gated samples
            if self.gate_pdino:                                                  # Eq. (8): likewise
                pd = (1 - F.cosine_similarity(self.dino.patch_tokens(x_hat[idx], p).float(), z[idx], dim=-1)).mean()
        if not self.gate_pdino:
            # NOTE(official): the released P-DINO mask broadcasts (B,N) x (B,1,1), so it averages 1 - cos over the
            # whole batch whenever any sample is gated, and is the constant 1 when none is. Reproduced on request.
            pd = (1 - F.cosine_similarity(self.dino.patch_tokens(x_hat, p).float(), z, dim=-1)).mean() if len(idx) else zero + 1
        percept = self.lpips_weight * lp + self.pdino_weight * pd
        # NOTE(official): w_ad is a buffer, so it is checkpointed and DDP broadcasts rank 0's value (official: a
        # per-rank float that restarts at 1 on resume).
        if self.training and 0 <= self.adaptive_from <= step and step % 50 == 0 and percept.requires_grad:
            W = model.final_layer.linear.weight  # balance |grad L_FM| and |grad L_perc| at the last layer
            g_fm, g_p = (torch.autograd.grad(l, W, retain_graph=True)[0].norm() for l in (fm, percept))
            self.percept_weight.mul_(0.8).add_(0.2 * (g_fm / (g_p + 1e-4)).clamp(0, 100).detach())
        loss = fm + self.percept_weight * percept + self.repa_weight * repa       # Eq. (6)
        return dict(loss=loss, fm=fm.detach(), lpips=lp.detach(), pdino=pd.detach(), repa=repa.detach(),
                    gate=gate.float().mean(), percept_weight=self.percept_weight.clone())


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
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"weights file not found: {path}")
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
    """(dino, lpips). Missing weights stop a real run; the demo goes on with random nets and says so."""
    import dino as dino_lib
    if cfg.perceptual_init == "random":
        log("WARNING: --perceptual_init random: LPIPS and DINOv2 have RANDOM weights (smoke runs and tests only)")
        return dino_lib.DINOv2().to(device).eval().requires_grad_(False), make_lpips(False).to(device)
    try:
        return (dino_lib.load_dinov2(cfg.dino_path or None, device=device),
                make_lpips(True, cfg.vgg_path).to(device))
    except (FileNotFoundError, RuntimeError) as e:
        if cfg.data_path:
            raise SystemExit(f"error: {e}\n(--perceptual_init random runs without them, for smoke tests only)")
        log("!" * 100 + f"\nWARNING: pretrained perceptual networks unavailable ({e}).\nThe demo continues with "
            "RANDOMLY INITIALISED LPIPS-VGG and DINOv2: the perceptual losses are then only a regulariser.\n" + "!" * 100)
        return dino_lib.DINOv2().to(device).eval().requires_grad_(False), make_lpips(False).to(device)


# ----------------------------------------------------------------------------------------------------------------
# Data: ImageNet-layout folders with the ADM center crop, or a procedural class-conditional toy dataset.

IMG_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".jpe")


def load_rgb(path):
    img = Image.open(path)
    if img.mode.startswith("I"):  # 16/32-bit grey: scale to 8 bits instead of clipping
        a = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(a * 255.0 / max(a.max(), 255.0), 0, 255).astype(np.uint8))
    elif img.mode == "P":  # palette (maybe with transparency)
        img = img.convert("RGBA")
    return img.convert("RGB")


def center_crop(img, size):  # ADM: halve with BOX while min side >= 2 size, BICUBIC to size, center crop
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    a = np.asarray(img)
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[top: top + size, left: left + size]


class ImageFolderData(torch.utils.data.Dataset):
    """root/class_x/img.jpg (sorted class folders -> labels 0..K-1), or a flat folder of images (one class)."""

    def __init__(self, root, size, flip=False):
        if not os.path.isdir(root):
            raise SystemExit(f"error: --data_path {root} is not a folder")
        classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
        walk = lambda d: sorted(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.lower().endswith(IMG_EXT))
        self.samples = [(p, k) for k, c in enumerate(classes) for p in walk(os.path.join(root, c))]
        if not classes:  # flat folder
            self.samples = [(os.path.join(root, f), 0) for f in sorted(os.listdir(root)) if f.lower().endswith(IMG_EXT)]
        if not self.samples:
            raise SystemExit(f"error: no images ({', '.join(IMG_EXT)}) found in {root}")
        self.size, self.flip, self.num_classes = size, flip, max(1, len(classes))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, y = self.samples[i]
        try:
            a = center_crop(load_rgb(path), self.size)
        except Exception as e:  # skipped: the collate function replaces it and the log counts it
            warnings.warn(f"skipping unreadable image {path}: {e}")
            return None
        if self.flip and torch.rand(()) < 0.5:
            a = a[:, ::-1]
        return torch.from_numpy(a.copy()).permute(2, 0, 1), y  # uint8 (3, H, W)


class ToyShapes(torch.utils.data.Dataset):
    """The demo dataset: 10 classes of procedurally drawn shapes (class = shape and palette), any size, no files."""
    NAMES = ["red disc", "green square", "blue triangle", "yellow ring", "magenta cross", "cyan h-stripes",
             "orange v-stripes", "white diamond", "purple checker", "teal frame"]

    def __init__(self, size, n=50_000, seed=0):
        self.size, self.n, self.seed, self.num_classes = size, n, seed, 10

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        y, g, s = i % 10, np.random.default_rng([self.seed, i]), self.size
        colors = [(230, 40, 40), (40, 200, 60), (50, 80, 230), (240, 220, 40), (220, 40, 220), (40, 220, 230),
                  (250, 140, 20), (245, 245, 245), (130, 50, 200), (0, 170, 150)]
        yy, xx = (np.mgrid[0:s, 0:s] + 0.5) / s
        cy, cx, r = g.uniform(0.4, 0.6), g.uniform(0.4, 0.6), g.uniform(0.22, 0.32)
        dy, dx = yy - cy, xx - cx
        m = [dx**2 + dy**2 < r**2, np.maximum(abs(dx), abs(dy)) < r * 0.8, (dy < r * 0.7) & (abs(dx) < (dy + r) * 0.6),
             abs(np.sqrt(dx**2 + dy**2) - r * 0.8) < r * 0.25, (np.minimum(abs(dx), abs(dy)) < r * 0.25) & (np.maximum(abs(dx), abs(dy)) < r),
             np.sin(yy * 8 * np.pi) > 0, np.sin(xx * 8 * np.pi) > 0, abs(dx) + abs(dy) < r, ((xx * 6).astype(int) + (yy * 6).astype(int)) % 2 == 0,
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


class SkipSampler(torch.utils.data.Sampler):  # a DistributedSampler that can start mid-epoch (exact resume)
    def __init__(self, base, skip=0):
        self.base, self.skip = base, skip

    def __iter__(self):
        return iter(list(self.base)[self.skip:])

    def __len__(self):
        return len(self.base) - self.skip


# ----------------------------------------------------------------------------------------------------------------
# Training: AdamW, fp32 EMA, bf16 autocast on CUDA, DDP under torchrun. Randomness is a function of
# (seed, step, rank), so a resumed run continues exactly like an uninterrupted one.

class TrainStep(nn.Module):  # the denoiser and the REPA projector under one DDP wrapper
    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x, y, step, t=None, noise=None):
        return self.loss_fn(self.model, x, y, t=t, noise=noise, step=step)


@torch.no_grad()
def update_ema(ema, model, decay):  # ema <- decay ema + (1 - decay) model; NOTE(official): one lerp, not mul + add
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


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


@torch.no_grad()
def sample_images(model, idx, cfg, device):  # image i: class i % K, noise seeded by (seed, i) -> (B, H, W, 3) uint8
    size = model.grid * model.patch_size
    noise = torch.stack([torch.randn(3, size, size, generator=torch.Generator().manual_seed(cfg.seed * 10**9 + i))
                         for i in idx]).to(device)
    with amp(device):
        x = sample(model, noise, torch.tensor(idx, device=device) % model.num_classes, cfg.sample_steps, cfg.sampler,
                   cfg.cfg_scale, cfg.cfg_interval, cfg.time_shift, cfg.t_eps)
    return to_uint8(x).numpy()


def save_atomic(obj, path):  # temp file + rename: a run killed mid-write leaves the last checkpoint intact
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def save_grid(imgs, path, classes):  # (B, H, W, 3) uint8 -> one PNG; one column per class when that fits
    B, H, W, _ = imgs.shape
    nrow = classes if classes <= 16 and B % classes == 0 else math.ceil(math.sqrt(B))
    rows = math.ceil(B / nrow)
    grid = np.zeros((rows * (H + 2) + 2, nrow * (W + 2) + 2, 3), np.uint8)
    for i, im in enumerate(np.asarray(imgs)):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = im
    Image.fromarray(grid).save(path)


def train(cfg, hook=None):
    ddp, rank, world, device = setup_dist(cfg)
    master = rank == 0
    os.makedirs(cfg.out_dir, exist_ok=True)
    logf = open(os.path.join(cfg.out_dir, "log.txt"), "a") if master else None

    def log(msg):
        if master:
            tqdm.write(msg)  # prints above the progress bar
            logf.write(msg + "\n")
            logf.flush()

    log(f"config: {dataclasses.asdict(cfg)}")
    cuda = device.type == "cuda"
    data = ImageFolderData(cfg.data_path, cfg.image_size, cfg.flip) if cfg.data_path else ToyShapes(cfg.image_size)
    if data.num_classes > cfg.num_classes:
        raise SystemExit(f"error: the data has {data.num_classes} classes but --num_classes is {cfg.num_classes}")
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = JiT(**MODELS[cfg.model], input_size=cfg.image_size, num_classes=cfg.num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # fp32, sampled from
    dino, lp = perceptual_nets(cfg, device, log)
    loss_fn = PixelGenLoss(model.final_layer.linear.in_features, dino, lp, lpips_weight=cfg.lpips_weight,
                           pdino_weight=cfg.pdino_weight, repa_weight=cfg.repa_weight, repa_layer=cfg.repa_layer,
                           gate_t=cfg.gate_t, P_mean=cfg.P_mean, P_std=cfg.P_std, t_eps=cfg.t_eps,
                           label_dropout=cfg.label_dropout, num_classes=cfg.num_classes, gate_pdino=cfg.gate_pdino,
                           adaptive_from=cfg.adaptive_from).to(device)
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay,
                            fused=cuda or None)
    log(f"{cfg.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{len(data)} images, {data.num_classes} classes, world size {world}, device {device}")
    step, path = 0, os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and os.path.isfile(path):
        try:  # a checkpoint from another config or a damaged file: say so, touch nothing
            ck = torch.load(path, map_location=device, weights_only=True)
            for obj, k in ((model, "model"), (ema, "ema"), (loss_fn, "loss"), (opt, "opt")):
                obj.load_state_dict(ck[k])
            step = ck["step"]
        except Exception as e:
            raise SystemExit(f"error: cannot resume from {path}: {str(e)[:400]}\nUse another --out_dir or --no-resume.")
        log(f"resumed from {path} at step {step}")
    if cfg.compile:
        model.compile()
        dino.compile()
        lp.compile()
    net = TrainStep(model, loss_fn)
    if ddp:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if cuda else None)
    local_bs = cfg.batch_size // world
    base = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=cfg.seed, drop_last=True)
    steps_per_epoch = len(base) // local_bs
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(data)} images are fewer than one global batch of {cfg.batch_size}")
    max_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
    log(f"{max_steps} steps, {steps_per_epoch} per epoch, global batch {cfg.batch_size} ({local_bs} per rank)")
    sums, gate_sum, bad_images, t0, t_log = None, 0.0, 0, time.time(), step
    bar = tqdm(total=max_steps, initial=step, disable=not master, dynamic_ncols=True)
    model.train()
    loss_fn.train()
    while step < max_steps:
        base.set_epoch(step // steps_per_epoch)
        loader = torch.utils.data.DataLoader(data, local_bs, sampler=SkipSampler(base, (step % steps_per_epoch) * local_bs),
                                             num_workers=cfg.num_workers, pin_memory=cuda, drop_last=True,
                                             collate_fn=collate, persistent_workers=False)
        for img, y, bad in loader:
            # NOTE(official): all randomness (t, eps, label dropout, dropout) is a function of (seed, step, rank).
            torch.manual_seed(cfg.seed + 1_000_003 * (step + 1) + 7919 * rank)
            x = img.to(device, non_blocking=True).float() / 127.5 - 1  # uint8 -> [-1, 1]
            y = y.to(device, non_blocking=True)
            with amp(device):
                out = net(x, y, step)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            update_ema(ema, model, cfg.ema)
            step += 1
            bad_images += bad
            vals = torch.stack([out[k].float() for k in ("loss", "fm", "lpips", "pdino", "repa")])  # on the device
            sums = vals if sums is None else sums + vals
            gate_sum += out["gate"].item()  # a host tensor: no sync
            bar.update(1)
            if hook:
                hook(step, model, ema)
            if step % cfg.log_every == 0 or step % cfg.ckpt_every == 0 or step == max_steps:
                if ddp:
                    dist.all_reduce(sums)
                avg = (sums / (world * (step - t_log))).tolist() + [gate_sum / (step - t_log)]  # the one host sync
                if not all(math.isfinite(v) for v in avg):
                    raise SystemExit(f"error: non-finite loss at step {step} ({avg}); last good checkpoint kept: {path}")
                dt, ips = time.time() - t0, cfg.batch_size * (step - t_log) / (time.time() - t0)
                log(f"step {step}/{max_steps} loss {avg[0]:.4f} fm {avg[1]:.4f} lpips {avg[2]:.4f} pdino {avg[3]:.4f} "
                    f"repa {avg[4]:.4f} gate {avg[5]:.2f} w_ad {loss_fn.percept_weight.item():.3f} lr {cfg.lr:g} "
                    f"img/s {ips:.1f} eta {(max_steps - step) * dt / (step - t_log) / 60:.1f} min bad_images {bad_images}")
                sums, gate_sum, t0, t_log = None, 0.0, time.time(), step
            if master and (step % cfg.ckpt_every == 0 or step == max_steps):
                save_atomic(dict(model=model.state_dict(), ema=ema.state_dict(), loss=loss_fn.state_dict(),
                                 opt=opt.state_dict(), step=step, config=dataclasses.asdict(cfg),
                                 rng=dict(seed=cfg.seed, step=step, world=world)), path)
                log(f"saved {path}")
            if master and cfg.sample_every and (step % cfg.sample_every == 0 or step == max_steps):
                grid = os.path.join(cfg.out_dir, f"grid_{step:07d}.png")
                save_grid(sample_images(ema, range(min(cfg.num_samples, 64)), cfg, device), grid, cfg.num_classes)
                log(f"sample grid: {grid}")
            if step >= max_steps or step % steps_per_epoch == 0:
                break
    bar.close()
    if master:
        logf.close()
    if ddp:
        dist.destroy_process_group()
    return model, ema


# ----------------------------------------------------------------------------------------------------------------
# Sampling program: our checkpoints or official Lightning ones (EMA weights) -> grid.png, samples.npz (ADM format).

def load_denoiser(path, unsafe=False, use_ema=True):
    """-> (JiT in eval mode, config dict or None); the preset is inferred from the weights' keys and shapes."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path} not found")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except Exception as e:
        if "Unsupported global" in str(e):  # a valid file that pickles Python objects (e.g. Lightning hyper_parameters)
            raise SystemExit(f"error: {path} holds pickled Python objects besides tensors ({str(e).splitlines()[-1][:200]}).\n"
                             "If you trust the file, pass --unsafe_load to unpickle it.")
        raise SystemExit(f"error: cannot read checkpoint {path} (corrupt or not a torch file): {str(e)[:300]}")
    if isinstance(ck, dict) and "ema" in ck and "model" in ck:  # ours
        sd, conf = ck["ema" if use_ema else "model"], ck.get("config")
    elif isinstance(ck, dict) and "state_dict" in ck:  # official Lightning: denoiser. / ema_denoiser. prefixes
        pre = "ema_denoiser." if use_ema else "denoiser."
        sd, conf = {k[len(pre):]: v for k, v in ck["state_dict"].items() if k.startswith(pre)}, None
    else:
        raise SystemExit(f"error: {path} is neither a PixelGen checkpoint (model/ema) nor a Lightning one (state_dict)")
    try:
        patch = sd["x_embedder.proj1.weight"].shape[-1]
        size, classes = int(math.isqrt(sd["pos_embed"].shape[1])) * patch, sd["y_embedder.embedding_table.weight"].shape[0] - 1
    except KeyError as e:
        raise SystemExit(f"error: {path} has no JiT weights (missing {e})")
    report = []
    for name, kw in MODELS.items():
        with torch.device("meta"):
            ref = {k: v.shape for k, v in JiT(**kw, input_size=size, patch_size=patch, num_classes=classes).state_dict().items()}
        diff = sorted(set(ref) ^ set(sd)) + [f"{k} {tuple(sd[k].shape)} vs {tuple(ref[k])}" for k in ref if k in sd and sd[k].shape != ref[k]]
        if not diff:
            model = JiT(**kw, input_size=size, patch_size=patch, num_classes=classes)
            model.load_state_dict(sd, strict=True)
            print(f"{path}: {name} at {size}px, {classes} classes ({'EMA' if use_ema else 'raw'} weights)")
            return model.eval(), conf
        report.append(f"  {name}: {len(diff)} differences, e.g. {'; '.join(diff[:3])}")
    raise SystemExit(f"error: the weights in {path} fit no preset:\n" + "\n".join(report))


@torch.no_grad()
def sample_main(cfg):
    ddp, rank, world, device = setup_dist(cfg)
    model, _ = load_denoiser(cfg.ckpt or os.path.join(cfg.out_dir, "ckpt.pt"), cfg.unsafe_load)
    model = model.to(device)
    if cfg.compile:
        model.compile()
    os.makedirs(os.path.join(cfg.out_dir, "images") if cfg.save_pngs else cfg.out_dir, exist_ok=True)
    size, K, bs = model.grid * model.patch_size, model.num_classes, max(1, cfg.batch_size // world)
    mine = list(range(rank, cfg.num_samples, world))  # this rank's image indices
    out = []
    for j in tqdm(range(0, len(mine), bs), disable=rank != 0, desc="sampling"):
        idx = mine[j: j + bs]
        out.append(sample_images(model, idx, cfg, device))
        for i, im in zip(idx, out[-1] if cfg.save_pngs else []):
            Image.fromarray(im).save(os.path.join(cfg.out_dir, "images", f"{i:06d}.png"))
    shard = os.path.join(cfg.out_dir, f"samples_rank{rank}.npz")
    np.savez(shard, arr_0=np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8), idx=np.array(mine, np.int64))
    if ddp:
        dist.barrier()
    if rank == 0:  # merge the shards in index order, so the result does not depend on the number of processes
        imgs = np.zeros((cfg.num_samples, size, size, 3), np.uint8)
        for r in range(world):
            f = os.path.join(cfg.out_dir, f"samples_rank{r}.npz")
            with np.load(f) as s:
                imgs[s["idx"]] = s["arr_0"]
            os.remove(f)
        np.savez(os.path.join(cfg.out_dir, "samples.npz"), arr_0=imgs, arr_1=np.arange(cfg.num_samples) % K)
        n = min(cfg.num_samples, 100)
        save_grid(imgs[:n], os.path.join(cfg.out_dir, "grid.png"), K)
        print(f"wrote {cfg.out_dir}/samples.npz ({cfg.num_samples} images) and {cfg.out_dir}/grid.png")
    if ddp:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Benchmark: full training steps and sampling, split by component, with analytic FLOPs and MFU on CUDA.

def bench(cfg):
    _, _, _, device = setup_dist(cfg)
    cuda, B, S = device.type == "cuda", cfg.batch_size, cfg.image_size
    torch.manual_seed(cfg.seed)
    model = JiT(**MODELS[cfg.model], input_size=S, num_classes=cfg.num_classes).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    dino, lp = perceptual_nets(dataclasses.replace(cfg, perceptual_init="random"), device, log=lambda m: None)  # same cost
    loss_fn = PixelGenLoss(model.final_layer.linear.in_features, dino, lp, repa_layer=cfg.repa_layer,
                           num_classes=cfg.num_classes).to(device)
    opt = torch.optim.AdamW([p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad],
                            lr=cfg.lr, fused=cuda or None)
    for net in (model, dino, lp) if cfg.compile else ():
        net.compile()
    x, y = torch.rand(B, 3, S, S, device=device) * 2 - 1, torch.randint(0, cfg.num_classes, (B,), device=device)
    g = (torch.rand(B) < 0.52).to(device)  # the gated share under logit-normal t
    xg, p = x[g].detach().requires_grad_(True), model.patch_size

    def timeit(fn, n=cfg.bench_steps):  # ms per call after two warm-up calls
        for i in range(n + 2):
            if i == 2:
                torch.cuda.synchronize() if cuda else None
                t0 = time.perf_counter()
            fn()
        torch.cuda.synchronize() if cuda else None
        return (time.perf_counter() - t0) / n * 1e3

    def full():  # one training step, as in train()
        with amp(device):
            out = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        update_ema(ema, model, cfg.ema)

    def denoiser():  # forward + backward of the denoiser and the REPA head
        with amp(device):
            x_hat, h = model(x, torch.rand(B, device=device), y, return_layer=loss_fn.repa_layer)
            l = x_hat.float().pow(2).mean() + loss_fn.proj(h).float().pow(2).mean()
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
    mem = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    ms.update(denoiser=timeit(denoiser), lpips=timeit(lpips_part), dino=timeit(dino_part), **{"opt+ema": timeit(lambda: (opt.step(), update_ema(ema, model, cfg.ema)))})
    noise = torch.randn(B, 3, S, S, device=device)
    with amp(device):
        ms_sample = timeit(lambda: sample(ema, noise, y, cfg.sample_steps, cfg.sampler, cfg.cfg_scale,
                                          cfg.cfg_interval, cfg.time_shift), n=1)
    print(f"{cfg.model} {S}px batch {B} on {device}{' compiled' if cfg.compile else ''}: train "
          f"{B / ms['step'] * 1e3:.1f} img/s ({ms['step']:.1f} ms/step; " +
          ", ".join(f"{k} {v:.1f}" for k, v in ms.items() if k != "step") + " ms), peak memory "
          f"{mem:.1f} GiB; sampling ({cfg.sampler} {cfg.sample_steps}, cfg {cfg.cfg_scale}) {B / ms_sample * 1e3:.2f} img/s")
    if cuda:  # analytic FLOPs of one step: matmuls and attention, x3 for forward + backward
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
# CLI: --train | --sample | --bench, and one flag per Config field. Precedence: Config < recipe < checkpoint
# config (for --sample) < explicit flags.

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], argument_default=argparse.SUPPRESS,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    for m in ("train", "sample", "bench"):
        mode.add_argument(f"--{m}", action="store_true")
    choices = dict(recipe=["auto", *RECIPES], model=list(MODELS), sampler=[*SAMPLERS], device=["auto", "cpu", "cuda"],
                   perceptual_init=["pretrained", "random"])
    for f in dataclasses.fields(Config):
        if f.type is bool:
            p.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=f"default {f.default}")
        elif f.type is tuple:
            p.add_argument(f"--{f.name}", type=float, nargs=2, help=f"default {f.default}")
        else:
            p.add_argument(f"--{f.name}", type=f.type, choices=choices.get(f.name), help=f"default {f.default}")
    args = vars(p.parse_args(argv))
    recipe = args.get("recipe", "auto")
    if recipe == "auto":
        recipe = "xl-80ep" if args.get("data_path") or args.get("ckpt") else "demo"
    conf = {**dataclasses.asdict(Config()), **RECIPES[recipe], "recipe": recipe}
    if args.get("sample"):  # our checkpoints carry their sampling settings
        path = args.get("ckpt") or os.path.join(args.get("out_dir", conf["out_dir"]), "ckpt.pt")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            conf.update({k: ck["config"][k] for k in ("sampler", "sample_steps", "cfg_scale", "cfg_interval",
                                                      "time_shift", "t_eps", "seed") if k in ck.get("config", {})})
        except Exception:
            pass  # load_denoiser reports unreadable files
    conf.update({k: v for k, v in args.items() if k in conf})
    cfg = Config(**{**conf, "cfg_interval": tuple(conf["cfg_interval"])})
    for name in ("batch_size", "sample_steps", "num_samples", "ckpt_every", "log_every", "image_size", "bench_steps"):
        if getattr(cfg, name) <= 0:
            p.error(f"--{name} must be positive, got {getattr(cfg, name)}")
    if cfg.max_steps < 0 or cfg.epochs <= 0 or cfg.lr <= 0 or not 0 <= cfg.ema < 1 or not 0 <= cfg.label_dropout < 1 \
            or cfg.time_shift <= 0 or cfg.cfg_interval[0] > cfg.cfg_interval[1]:
        p.error("need --max_steps >= 0, --epochs > 0, --lr > 0, 0 <= --ema < 1, 0 <= --label_dropout < 1, "
                "--time_shift > 0 and --cfg_interval LO HI with LO <= HI")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        p.error(f"--batch_size {cfg.batch_size} (global) is not divisible by the world size {world}")
    if cfg.image_size % MODELS[cfg.model].get("patch_size", 16) or cfg.repa_layer >= MODELS[cfg.model]["depth"]:
        p.error(f"--image_size must be a multiple of the patch size and --repa_layer < depth for {cfg.model}")
    return cfg, next(m for m in ("train", "sample", "bench") if args.get(m))


if __name__ == "__main__":
    cfg, mode = parse_args()
    {"train": train, "sample": sample_main, "bench": bench}[mode](cfg)
