"""Frozen DINOv2 ViT-B/14, written from scratch, for PixelGen's perceptual and REPA losses.

PixelGen uses DINOv2 twice:
  * P-DINO loss: per sample mean over patches of 1 - cos(f(x_hat), f(x)), gradients flowing
    through the frozen network into the predicted image x_hat;
  * REPA loss: the JiT tokens entering block 8 are projected and aligned (cosine) with f(x).
f = `DINOv2.patch_tokens`: the last block's patch tokens after the final LayerNorm, on the image
resized so that one 14-pixel DINO patch covers one 16-pixel JiT patch (256 px -> 224 px -> 16x16
tokens).

The network is the official DINOv2 ViT-B/14 (facebookresearch/dinov2, hub entry `dinov2_vitb14`):
embed 768, depth 12, 12 heads, MLP ratio 4 with exact GELU, pre-norm LayerNorm (eps 1e-6),
LayerScale on both residual branches, patch 14, a CLS token, no registers, a learned position
embedding for 37x37 patches (518 px), bicubically resized for other sizes. Module and parameter
names are the official ones, so `dinov2_vitb14_pretrain.pth` (175 tensors) loads with
`strict=True`; with identical weights `forward_features` and `get_intermediate_layers` equal
the official ones to float32 round-off. Inference only: no masks (`mask_token` exists for
strict loading), no drop path, no block chunking.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = 'dinov2_vitb14_pretrain.pth'
WEIGHTS_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/' + WEIGHTS_FILE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens, as one strided convolution."""

    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):                                       # (B, 3, H, W)
        H, W = x.shape[-2:]
        p = self.patch_size
        assert H % p == 0 and W % p == 0, \
            f'DINOv2 input size {H}x{W} must be a multiple of the patch size {p}'
        # (B, H/p * W/p, D), patches in row-major order
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention, fused qkv projection with bias, softmax scale head_dim ** -0.5."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):                                       # (B, N, D)
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)          # 3 x (B, heads, N, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)             # (B, heads, N, D/heads)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))    # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()                                    # exact (erf) GELU
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):                                       # (B, N, D)
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (initialised to 1.0 in the hub model)."""

    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, dim, num_heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):                                       # (B, N, D)
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DINOv2(nn.Module):
    """DINOv2 ViT-B/14 with the official parameter names. Frozen and always in eval mode, but
    differentiable w.r.t. its input. Random weights until loaded (see `load_dinov2`)."""

    patch_size = 14
    grid = 37                               # position embedding trained for 37x37 patches (518 px)

    def __init__(self, embed_dim=768, depth=12, num_heads=12):
        super().__init__()
        # registration order = the official state_dict order
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # CLS slot + 37*37 patches
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, embed_dim))
        # used only by DINOv2's masked training
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(self.patch_size, embed_dim)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.embed_dim = embed_dim
        # ImageNet normalisation as non-persistent buffers: no host-to-device copy per call
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer('mean', mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', std.view(1, 3, 1, 1), persistent=False)
        # official random init (weights are normally loaded)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """Frozen feature extractor: stays in eval mode whatever the caller asks (e.g. a
        parent's .train())."""
        return super().train(False)

    def interpolate_pos_embed(self, h, w):
        """Position embedding for an h x w patch grid: (1, 1 + h*w, D).

        The official rule: the stored tensor, unchanged, for 37x37 patches (official test
        `npatch == N and w == h`); otherwise the 37x37 grid resized in float32, bicubic,
        antialias False, by scale_factor ((h + 0.1) / 37, (w + 0.1) / 37), not size=(h, w).
        The +0.1 is a historical offset; with a scale factor PyTorch maps output to input
        coordinates by 1 / scale_factor, so the numbers differ from the size-based mapping.
        """
        M = self.grid
        if h == w == M:
            return self.pos_embed
        pos = self.pos_embed.float()
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]                     # (1, 1, D), (1, M*M, D)
        D = pos.shape[-1]
        patch_pos = patch_pos.reshape(1, M, M, D).permute(0, 3, 1, 2)   # (1, D, M, M)
        patch_pos = F.interpolate(patch_pos, scale_factor=((h + 0.1) / M, (w + 0.1) / M),
                                  mode='bicubic', antialias=False)      # (1, D, h, w)
        assert patch_pos.shape[-2:] == (h, w), (patch_pos.shape, h, w)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, h * w, D)  # (1, h*w, D)
        return torch.cat([cls_pos, patch_pos], dim=1)                   # (1, 1 + h*w, D)

    def prepare_tokens(self, x):
        # x: (B, 3, H, W), H and W multiples of 14
        B, _, H, W = x.shape
        x = self.patch_embed(x)                                 # (B, h*w, D)
        # CLS first: (B, 1 + h*w, D)
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
        pos = self.interpolate_pos_embed(H // self.patch_size, W // self.patch_size)
        return x + pos.to(x.dtype)                              # (B, 1 + h*w, D)

    def forward_features(self, x):
        """Official `forward_features` (no masks): final-LayerNorm CLS and patch tokens, and
        the raw tokens of the last block."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)                                          # (B, 1 + h*w, D)
        x_norm = self.norm(x)
        return {'x_norm_clstoken': x_norm[:, 0],                # (B, D)
                'x_norm_patchtokens': x_norm[:, 1:],            # (B, h*w, D)
                'x_prenorm': x}                                 # (B, 1 + h*w, D)

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False,
                                norm=True):
        """Official semantics. `n` int: the last n blocks; list: 0-based block indices; outputs
        in block order (not list order). `norm`: final LayerNorm on each. Returns a tuple of
        patch tokens (B, h*w, D), or (B, D, h, w) with `reshape`; with `return_class_token`
        a tuple of pairs (patch tokens, CLS token (B, D))."""
        B, _, H, W = x.shape
        take = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)                                          # (B, 1 + h*w, D)
            if i in take:
                outputs.append(x)
        assert len(outputs) == len(take), \
            f'only {len(outputs)} / {len(take)} blocks found for n={n}'
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]           # (B, D)
        outputs = [out[:, 1:] for out in outputs]               # (B, h*w, D)
        if reshape:
            h, w = H // self.patch_size, W // self.patch_size
            # (B, D, h, w)
            outputs = [out.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous()
                       for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def patch_tokens(self, x, patch_size=16):
        """PixelGen's f(x): images (B, 3, H, W) in [-1, 1] -> (B, H/p * W/p, D) last-block
        tokens after the final LayerNorm, p = the pixel model's `patch_size`. As PixelGen's
        encoder: [0, 1], ImageNet mean/std, bicubic resize (no antialias) to 14H/p x 14W/p, so
        the DINO grid is the JiT grid. Normalised in float32 whatever the input dtype: under
        bf16 autocast a bf16 x_hat and a float32 x meet the same constants, so f(x_hat) = f(x)
        when x_hat = x. No torch.no_grad: callers wrap the target. Call `dino(x, p)`, not this
        method, so that a compiled module runs compiled."""
        H, W = x.shape[-2:]
        x = ((x.float() + 1) / 2 - self.mean) / self.std       # (B, 3, H, W) float32
        size = (int(14 * H / patch_size), int(14 * W / patch_size))
        x = F.interpolate(x, size=size, mode='bicubic')
        return self.get_intermediate_layers(x, n=1)[0]          # (B, h*w, D)

    forward = patch_tokens


def hub_file(path, name, url, download=True):
    """Weights file: an explicit path, else <torch hub dir>/checkpoints/name
    ($TORCH_HOME/hub/checkpoints, by default ~/.cache/torch/hub/checkpoints), downloaded there
    first when absent and `download`; a missing file is a FileNotFoundError naming the file,
    its URL and the folder for it."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'weights file {path} does not exist ({name}, from {url})')
        return path
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    dest = os.path.join(folder, name)
    if not os.path.isfile(dest) and download:
        try:
            os.makedirs(folder, exist_ok=True)
            # writes a temp file, renames it when complete
            torch.hub.download_url_to_file(url, dest, progress=False)
        except Exception as e:                                  # offline, proxy, disk full, ...
            print(f'download of {url} failed: {e!r}', file=sys.stderr)
    if not os.path.isfile(dest):
        raise FileNotFoundError(f'missing pretrained weights {name}: download {url} and put '
                                f'it in {folder} (the torch hub cache, set by $TORCH_HOME), '
                                f'or pass an explicit path to the file')
    return dest


def load_dinov2(path=None, device='cpu', download=True):
    """Frozen eval DINOv2 ViT-B/14 with the official weights, loaded strictly: `path`, else
    the torch hub cache, downloaded there from the official DINOv2 site when absent and
    `download` (see hub_file)."""
    path = hub_file(path, WEIGHTS_FILE, WEIGHTS_URL, download)
    try:
        state_dict = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise RuntimeError(f'could not read DINOv2 weights {path} (corrupt or incomplete '
                           f'file? delete it and fetch {WEIGHTS_URL} again): {e}') from e
    model = DINOv2()
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as e:
        msg = f'{path} is not a DINOv2 ViT-B/14 state dict ({WEIGHTS_FILE}): {e}'
        raise RuntimeError(msg) from e
    return model.to(device)
