"""FID, sFID, Inception Score, precision / recall and density / coverage with the FID Inception-v3, from scratch.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz    # every metric both sides allow: the ADM suite's table
    python fid.py samples/ ref/ --is --sfid --cache-dir ~/.cache/fid  # only FID, IS, sFID; ref/'s features kept
    python fid.py samples/ --save-stats samples_stats.npz        # only save the statistics of SAMPLES
    python fid.py samples/ ref_stats.npz --preprocess pytorch-fid --batch_size 200 --weights pt_inception.pth

Each side is an image folder (searched recursively, hidden names skipped; transparency composited onto
--background, white by default, as pixelgen.py trains; unreadable files skipped with a warning), an ADM npz batch
(`arr_0`, uint8 NHWC) or a statistics npz (`mu`, `sigma`, optionally `mu_s`, `sigma_s`); ADM reference batches hold
both, and precomputed statistics are used as they are, like the ADM suite does. METRICS:
  fid   (always)  Fréchet distance between the 2048-d pool3 features' means / covariances.
  sfid  (--sfid)  the same for sFID's 2023 spatial features (below).
  is    (--is)    Inception Score of SAMPLES as the ADM suite's (splits of 5000), of the logits pool3 @ fc.weight.T
                  without the bias (its graph reads the MatMul before the bias add; torch-fidelity's logits_unbiased).
  pr    (--pr)    precision / recall of Kynkäänniemi et al., k = 3, as the ADM suite's ManifoldEstimator.
  dc    (--prdc)  density / coverage of Naeem et al. 2020, k = 5 (with precision / recall).
With no metric flag, every metric that both sides allow (a statistics npz: no IS, precision / recall, density /
coverage, nor sFID without mu_s / sigma_s); --all asks for all of them, and fails naming what a side lacks.

The network is pytorch-fid's FID Inception-v3, the PyTorch port of TF's 2015-12-05 graph that the ADM suite and TTUR
use (weights `pt_inception-2015-12-05-6726825d.pth`, torch hub cache or an explicit path). Two preprocessings:
  adm          (default) TF1 bilinear resize to 299 without half-pixel centres on the uint8 values, then (x-128)/128:
               the ADM suite's graph, equal to torch-fidelity's `inception-v3-compat`.
  pytorch-fid  x/255, F.interpolate(bilinear, align_corners=False) to 299, then 2x-1: pytorch-fid's default.
sFID reads the graph's tensor `mixed_6/conv`, first 7 channels, 17 x 17. The graph calls its eleven Inception blocks
mixed, mixed_1, ..., mixed_10 (Mixed_5b ... Mixed_7c here), so mixed_6 is Mixed_6d; its `conv` is the 1x1 branch
(the released weights of Mixed_6d.branch1x1 come from mixed_6/conv/conv2d_params and mixed_6/conv/batchnorm), and the
tensor named after that scope is its last op, the ReLU: the output of our Mixed_6d.branch1x1. The ADM suite reads it
in NHWC and flattens per image, so the 2023 values run (row, column, channel), channel fastest, as here: that order is
what lets ADM's precomputed mu_s / sigma_s be used.
"""
import argparse
import contextlib
import hashlib
import json
import os
import types
import warnings
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE
PREPROCESS_MODES = ("adm", "pytorch-fid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm",
                    ".pgm", ".pbm", ".pnm")  # lower case; matched case-insensitively
METRICS = ("fid", "sfid", "is", "pr", "dc")
SPATIAL_CHANNELS = 7
SPATIAL_DIM = SPATIAL_CHANNELS * 17 * 17  # 2023 sFID features
PR_K, DC_K = 3, 5  # neighbourhood sizes of precision / recall (ADM suite) and density / coverage (Naeem et al.)


# ----------------------------------------------------------------------------------------------------------------
# The FID Inception-v3: torchvision's layout and key names, with the TF graph's pooling (see the blocks' comments).


class BatchNorm(nn.Module):
    """Inference-only BatchNorm with TF's eps 1e-3. It holds exactly weight, bias, running_mean and running_var:
    the released file has no `num_batches_tracked`, so this is what lets it load with strict=True."""

    def __init__(self, c):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=1e-3)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BN -> ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = BatchNorm(cout)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):
    # TF's 3x3 'SAME' average pool divides by the number of real (non-padding) pixels; torchvision's blocks count the
    # zero padding. This is one of the two places where the FID network differs from torchvision's Inception-v3.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # 35x35 blocks Mixed_5b/c/d; out = 64 + 64 + 96 + pool_features channels
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35 -> 17; out = 384 + 96 + cin channels
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # 17x17 blocks Mixed_6b..e with factorised 7x7 convs; out = 4 * 192 channels
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17 -> 8; out = 320 + 192 + cin channels
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # 8x8 blocks Mixed_7b/c; out = 320 + 768 + 768 + 192 = 2048 channels
    def __init__(self, cin, pool):
        super().__init__()
        # The TF graph's last block (Mixed_7c) max-pools its pool branch where the paper averages; Mixed_7b averages.
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(nn.Module):
    """The FID Inception-v3 (no aux head). forward: preprocessed (B, 3, 299, 299) in [-1, 1] -> pool3 (B, 2048), and
    with spatial=True also sFID's features (B, 2023) (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)  # 1008 = 1000 ImageNet classes + 8 unused ones of the TF graph

    def forward(self, x, spatial=False):  # (B, 3, 299, 299)
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))  # (B, 32, 147, 147)
        x = F.max_pool2d(self.Conv2d_2b_3x3(x), 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        # sFID's mixed_6/conv is Mixed_6d's 1x1 branch after its ReLU: computed once more here from Mixed_6d's input
        # (0.7% of the network's FLOPs) rather than fished out of Mixed_6d by a hook.
        s = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS] if spatial else None  # (B, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool3 = x.mean((2, 3))  # (B, 2048); IS logits are pool3 @ fc.weight.T (see inception_outputs)
        return (pool3, s.permute(0, 2, 3, 1).flatten(1)) if spatial else pool3  # NHWC order, as the ADM suite's


def load_inception(path=None, device=None, download=True):
    """The FID Inception with the released weights: `path`, else the torch hub cache, else downloaded there."""
    if path is None:
        folder = os.path.join(torch.hub.get_dir(), "checkpoints")
        path = os.path.join(folder, FID_WEIGHTS_FILE)
        if not os.path.exists(path):
            hint = (f"FID Inception weights {FID_WEIGHTS_FILE} are not in {folder}. Download {FID_WEIGHTS_URL} "
                    f"into that folder, or pass its path (--weights)")
            if not download:
                raise FileNotFoundError(hint)
            try:
                os.makedirs(folder, exist_ok=True)
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, path)
            except Exception as e:  # offline, proxy, read-only cache, ...
                raise FileNotFoundError(f"{hint} (download failed: {e})") from e
    elif not os.path.isfile(path):
        raise FileNotFoundError(f"FID Inception weights not found: {path} (the file is {FID_WEIGHTS_URL})")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(f"cannot read FID Inception weights {path} ({e}); delete it and download it again") from e
    # The released file has no num_batches_tracked; drop it should a re-saved torchvision-BN copy carry it.
    state_dict = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    with torch.device("meta"):  # no random initialisation to overwrite: the loaded tensors become the model's
        model = InceptionV3()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.requires_grad_(False).eval().to(default_device() if device is None else device)


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def full_fp32():
    """Keep cuDNN convolutions and CUDA matmuls in IEEE float32 whatever the training code chose: TF32 (10-bit
    mantissa) moves Inception features by ~1e-3 relative. (Uses torch >= 2.9's fp32_precision flags.)"""
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, mm.fp32_precision
    conv.fp32_precision = mm.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, mm.fp32_precision = saved


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and features.


def resize_tf1_bilinear(x, size=299):
    """TF1 `tf.image.resize_bilinear(align_corners=False)` (no half-pixel centres), as in the ADM suite's graph.
    Output pixel i samples input coordinate i * in/out, so the grid is anchored at the top-left pixel and the last
    row / column is repeated past the edge (unlike F.interpolate's (i + 0.5) * in/out - 0.5). Coordinates are float32
    like TF's kernel. x: float (B, C, H, W) -> (B, C, size, size)."""

    def axis(n):  # per output index: lower / upper source index and the weight of the upper one
        pos = torch.arange(size, dtype=torch.float32, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = pos.long()  # floor, pos >= 0
        return lo, (lo + 1).clamp(max=n - 1), (pos - lo).to(x.dtype)

    ylo, yhi, wy = axis(x.shape[2])
    xlo, xhi, wx = axis(x.shape[3])
    top, bottom = x[:, :, ylo], x[:, :, yhi]  # (B, C, size, W)
    top = top[..., xlo] + (top[..., xhi] - top[..., xlo]) * wx  # (B, C, size, size)
    bottom = bottom[..., xlo] + (bottom[..., xhi] - bottom[..., xlo]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess_images(images, mode="adm"):
    """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) in [-1, 1], as the chosen reference implementation does."""
    x = images.float()
    if mode == "adm":
        return (resize_tf1_bilinear(x) - 128) / 128
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")


def as_uint8_nchw(batch):
    """Torch or numpy uint8 images, (N, 3, H, W) or (N, H, W, 3), as a torch (N, 3, H, W) tensor. A shape that fits
    both, (N, 3, H, 3), is read as NCHW."""
    x = torch.from_numpy(np.array(batch)) if isinstance(batch, np.ndarray) else batch  # np.array: a writable copy
    if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.ndim == 4 and 3 in (x.shape[1], x.shape[3])):
        shape, dtype = tuple(getattr(batch, "shape", ())), getattr(batch, "dtype", type(batch))
        raise ValueError(f"expected uint8 images (N, 3, H, W) or (N, H, W, 3), got {dtype} {shape}")
    return x if x.shape[1] == 3 else x.permute(0, 3, 1, 2)


def inception_outputs(model, images, preprocess="adm", spatial=False):
    """One batch of uint8 images (B, 3, H, W) or (B, H, W, 3) through the FID Inception on its device, in IEEE fp32:
    pool3 features (B, 2048) and unbiased logits (B, 1008), and with spatial=True sFID's features (B, 2023), all
    float64 numpy (the logits computed in float64)."""
    device = next(model.parameters()).device
    x = as_uint8_nchw(images).to(device)  # (B, 3, H, W) uint8
    with torch.inference_mode(), full_fp32():
        out = model(preprocess_images(x, preprocess), spatial=spatial)
    feats, *rest = [t.double().cpu().numpy() for t in (out if spatial else [out])]  # (B, 2048) [, (B, 2023)]
    return (feats, feats @ model.fc.weight.detach().double().cpu().numpy().T, *rest)  # logits without the bias


def feature_batches(model, images, preprocess="adm", batch_size=50, device=None, progress=False, total=None,
                    spatial=False):
    """`inception_outputs` per batch of <= batch_size images (inference mode and IEEE fp32 are set per batch, not
    held across yields)."""
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if device is not None:
        model.to(device)
    batches = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images
    total = len(images) if isinstance(images, (np.ndarray, torch.Tensor)) else total
    with tqdm(total=total, unit="img", desc=progress if isinstance(progress, str) else "inception",
              disable=not progress) as bar:
        for batch in batches:
            for start in range(0, len(batch), batch_size):
                out = inception_outputs(model, batch[start:start + batch_size], preprocess, spatial)
                bar.update(len(out[0]))
                yield out


def get_features(model, images, preprocess="adm", batch_size=50, device=None, return_logits=False, progress=False,
                 total=None, return_spatial=False):
    """pool3 features of uint8 images: (N, 2048) float64 numpy, followed by the (N, 1008) unbiased logits with
    return_logits and sFID's (N, 2023) features with return_spatial.

    images: a uint8 array / tensor (N, 3, H, W) or (N, H, W, 3) of any size, or an iterable of such batches (e.g.
    `Source.batches`, so that 50k samples never sit in memory at once); `total` = N for the progress bar then.
    preprocess: "adm" or "pytorch-fid" (see the module docstring). device: the model's by default (a given one moves
    the model there). progress: show a tqdm bar (a string labels it)."""
    out = list(feature_batches(model, images, preprocess, batch_size, device, progress, total, return_spatial))
    if not out:
        raise ValueError("no images to compute features of")
    feats, logits, *spatial = (np.concatenate(parts) for parts in zip(*out))  # (N, 2048), (N, 1008) [, (N, 2023)]
    picked = [feats] + [logits] * return_logits + spatial
    return tuple(picked) if len(picked) > 1 else feats


# ----------------------------------------------------------------------------------------------------------------
# Metrics.


class Stats:
    """Running float64 sums over the Inception outputs of n samples that give FID's (and with spatial_dim, sFID's)
    mu / sigma and the ADM IS for any order and sharding: sample i (global index) is in IS split i // split_size, as in
    `inception_score`. `tensors` are plain sums (float64, CPU): summed over processes (dist.all_reduce, SUM), they are
    those of one pass over all. Samples marked unreadable (`skip`) are left out: the statistics are those of the
    others, the IS splits keep their places (a split holds the readable ones of its indices).
    FID: mu = sum f / n, sigma = (sum f f^T - n mu mu^T) / (n - 1). IS: with p = softmax, P = sum_i p_i over a split
    of n_s samples, sum_i KL(p_i || P / n_s) = sum_i sum_c p_ic log p_ic - sum_c P_c log(P_c / n_s)."""

    name = "the samples' Stats"

    def __init__(self, n, split_size=5000, dim=2048, classes=1008, spatial_dim=0):
        self.n, self.split_size, self.spatial_dim, splits = n, split_size, spatial_dim, max(1, -(-n // split_size))
        shapes = [(1,), (1,), (dim,), (dim, dim), (splits,), (splits,), (splits, classes), (splits,)]
        shapes += [(spatial_dim,), (spatial_dim, spatial_dim)] if spatial_dim else []
        self.tensors = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
        # count, unreadable count, sum f, sum f f^T; per IS split: count, unreadable count, sum p, sum p log p
        (self.count, self.skipped, self.sum_f, self.sum_ff, self.split_count, self.split_skipped, self.sum_p,
         self.sum_plogp) = self.tensors[:8]
        self.sum_s, self.sum_ss = self.tensors[8:] if spatial_dim else (None, None)  # sum s, sum s s^T (sFID)

    def _index(self, index, size):  # (B,) global sample indices, default: consecutive after those added so far
        done = int(self.count + self.skipped)
        index = torch.arange(done, done + size) if index is None else torch.as_tensor(index).to("cpu", torch.long)
        if index.shape != (size,) or size and (index.min() < 0 or index.max() >= self.n):
            raise ValueError(f"index must hold {size} sample indices in [0, {self.n})")
        return index

    def add(self, features, logits=None, spatial=None, index=None):
        """features (B, dim), optional unbiased logits (B, classes) and sFID's features (B, spatial_dim) (given exactly
        when the Stats keep them), numpy or torch on any device, of the samples `index` (B,). IS needs all logits."""
        f = torch.as_tensor(features).to("cpu", torch.float64)  # (B, dim)
        if f.ndim != 2 or f.shape[1] != len(self.sum_f):
            raise ValueError(f"features must be (B, {len(self.sum_f)}), got {tuple(f.shape)}")
        index = self._index(index, len(f))  # (B,)
        if (spatial is None) != (not self.spatial_dim):
            raise ValueError(f"spatial features must be given exactly when the Stats keep them "
                             f"(spatial_dim={self.spatial_dim})")
        if logits is not None:
            logits = torch.as_tensor(logits).to("cpu", torch.float64)  # (B, classes)
            if logits.shape != (len(f), self.sum_p.shape[1]):
                raise ValueError(f"logits must be ({len(f)}, {self.sum_p.shape[1]}), got {tuple(logits.shape)}")
            split, log_p = index // self.split_size, torch.log_softmax(logits, 1)  # (B,), (B, classes)
            self.split_count.index_add_(0, split, torch.ones(len(f), dtype=torch.float64))
            self.sum_p.index_add_(0, split, log_p.exp())
            self.sum_plogp.index_add_(0, split, (log_p.exp() * log_p).sum(1))
        if spatial is not None:
            s = torch.as_tensor(spatial).to("cpu", torch.float64)  # (B, spatial_dim)
            if s.shape != (len(f), self.spatial_dim):
                raise ValueError(f"spatial features must be ({len(f)}, {self.spatial_dim}), got {tuple(s.shape)}")
            self.sum_s += s.sum(0)
            self.sum_ss.addmm_(s.T, s)
        self.count += len(f)
        self.sum_f += f.sum(0)
        self.sum_ff.addmm_(f.T, f)  # += f^T f without a (dim, dim) temporary

    def skip(self, index):
        """Marks the samples `index` (B,) as unreadable (see Source.batches): they count towards n, not the sums."""
        index = self._index(index, len(index))
        self.skipped += len(index)
        self.split_skipped.index_add_(0, index // self.split_size, torch.ones(len(index), dtype=torch.float64))

    @property
    def holds(self):  # what the metrics can come from (see resolve_metrics)
        return {"mu"} | ({"mu_s"} if self.spatial_dim else set()) | ({"logits"} if self.split_count.any() else set())

    def mu_sigma(self, spatial=False):
        """mu (dim,), sigma (dim, dim) float64 numpy of the pool3 features, or with spatial=True of sFID's; sigma is
        the unbiased covariance, as np.cov."""
        if spatial and not self.spatial_dim:
            raise ValueError("these Stats hold no sFID features: make them with spatial_dim=SPATIAL_DIM")
        n, skipped = self.count.item(), self.skipped.item()
        if n + skipped != self.n:
            also = f" ({skipped:.0f} more skipped)" if skipped else ""
            raise ValueError(f"FID statistics: features of {n:.0f} samples were added{also}, but the set has "
                             f"n={self.n}")
        if n < 2:
            raise ValueError(f"FID statistics need at least 2 samples, got {n:.0f}")
        total, outer = (self.sum_s, self.sum_ss) if spatial else (self.sum_f, self.sum_ff)
        mu = total / n
        return mu.numpy(), ((outer - n * torch.outer(mu, mu)) / (n - 1)).numpy()

    def inception_score(self):
        """The ADM suite's IS: per split exp(mean_i KL(p_i || mean_j p_j)), averaged over the splits."""
        sizes = (self.n - torch.arange(len(self.split_count)) * self.split_size).clamp(max=self.split_size).double()
        sizes -= self.split_skipped  # readable samples per split
        if self.n < 1 or not torch.equal(self.split_count, sizes) or not sizes.any():
            raise ValueError(f"IS needs the logits of all n={self.n} samples: got {self.split_count.long().tolist()} "
                             f"per split of {self.split_size}, expected {sizes.long().tolist()}")
        kl = self.sum_plogp - torch.xlogy(self.sum_p, self.sum_p / sizes[:, None]).sum(1)  # (S,) sum_i KL(p_i || q)
        return (kl / sizes)[sizes > 0].exp().mean().item()


def feature_statistics(features):
    """mu (D,), sigma (D, D) of (N, D) features in float64, the unbiased covariance like pytorch-fid / ADM."""
    features = np.asarray(features, np.float64)
    stats = Stats(len(features), dim=features.shape[-1])
    stats.add(features)
    return stats.mu_sigma()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)), in float64.

    With any R such that S1 = R R^T, S1 S2 has the eigenvalues of the symmetric PSD matrix R^T S2 R, so
    Tr sqrt(S1 S2) is the sum of the square roots of those; a symmetric eigensolver gets them accurately and ~10x
    faster than scipy's sqrtm of the non-symmetric product (what pytorch-fid and the ADM suite do), and agrees with it
    to ~1e-12 relative (~1e-7 when S1 or S2 is singular, where both have errors of that size). R is the Cholesky
    factor, or the symmetric square root when S1 is singular (fewer samples than dimensions). Rounding leaves some
    eigenvalues of singular products slightly negative; they are clipped at 0."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}")
    try:
        root = np.linalg.cholesky(sigma1)  # (D, D) lower triangular, S1 = R R^T
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D) symmetric square root
    m = root.T @ sigma2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):
    """The ADM suite's IS of (N, C) logits: consecutive splits of `split_size` samples (the last one may be shorter;
    fewer samples than that make one split), per split exp(mean_i KL(p_i || mean_j p_j)), averaged over splits."""
    logits = np.asarray(logits, np.float64)
    stats = Stats(len(logits), split_size, dim=0, classes=logits.shape[-1])
    stats.add(np.zeros((len(logits), 0)), logits)  # IS only: no features
    return stats.inception_score()


def squared_distances(a, b):
    """(n, D), (m, D) -> (n, m) squared euclidean distances, ||a||^2 - 2 a.b + ||b||^2 clipped at 0 (as ADM), in place
    on the product so that a block costs one (n, m) buffer."""
    return (a @ b.T).mul_(-2).add_((a * a).sum(1)[:, None]).add_((b * b).sum(1)[None]).clamp_min_(0)


def knn_radii(features, ks, batch_size=10000):
    """Per point, the squared distance to its k-th nearest neighbour other than itself, for each k of ks: float32
    (N, len(ks)). One pass over blocks of batch_size x N distances serves every k: the max(ks) + 1 smallest of a row
    (topk) start with the point itself at 0, so the k-th neighbour is at position k (a duplicate of the point is a
    neighbour at distance 0), as in the ADM suite's and Naeem et al.'s code."""
    kmax = max(ks)
    if len(features) <= kmax:
        raise ValueError(f"the {kmax}-th nearest neighbour needs more than k={kmax} points per set, got "
                         f"{len(features)}")
    return torch.cat([squared_distances(rows, features).topk(kmax + 1, dim=1, largest=False).values[:, list(ks)]
                      for rows in features.split(batch_size)])


def neighbour_metrics(ref_features, sample_features, which=("pr", "dc"), ref_radii=None, k_pr=PR_K, k_dc=DC_K,
                      batch_size=10000, device=None):
    """Precision / recall ("pr") and density / coverage ("dc") of pool3 features: real = reference, fake = samples.

    A point's ball reaches its k-th nearest neighbour in its own set. precision = fraction of samples inside some
    reference ball, recall = fraction of reference points inside some sample ball: k = 3, `<=`, as the ADM suite's
    ManifoldEstimator. density = (number of (sample, reference ball) pairs with the sample inside) / (k M), coverage =
    fraction of reference balls holding some sample: k = 5 and a strict `<`, as Naeem et al.'s reference code (prdc),
    so a sample exactly on a reference ball's boundary is inside for precision but not for density / coverage.
    The radii of a set are found in one pass for both ks (knn_radii; ref_radii = {k: (R,)} skips the reference's), and
    each reference x sample block of distances feeds all four. Squared distances in float32 (ADM: float16 when
    finite), blocks of batch_size x batch_size, so 50k x 50k fits on GPU and CPU. Returns a dict of the asked ones."""
    device = default_device() if device is None else torch.device(device)
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)  # (R, D)
    sam = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)  # (S, D)
    pr, dc, b = "pr" in which, "dc" in which, batch_size
    ks = sorted({k for k, on in ((k_pr, pr), (k_dc, dc)) if on})
    with full_fp32():
        if ref_radii is None or not all(k in ref_radii for k in ks):
            ref_radii = dict(zip(ks, knn_radii(ref, ks, b).T))
        r_pr, r_dc = (torch.as_tensor(ref_radii[k], dtype=torch.float32, device=device) if on else None
                      for k, on in ((k_pr, pr), (k_dc, dc)))  # (R,)
        s_pr = knn_radii(sam, [k_pr], b)[:, 0] if pr else None  # (S,); density / coverage use no sample balls
        # sample in some reference ball, reference point in some sample ball, reference ball holding some sample
        sam_in, ref_in, covered = (torch.zeros(len(x), dtype=torch.bool, device=device) for x in (sam, ref, ref))
        pairs = torch.zeros((), dtype=torch.int64, device=device)  # (sample, reference ball) pairs, sample inside
        for i in range(0, len(ref), b):
            for j in range(0, len(sam), b):
                d = squared_distances(ref[i:i + b], sam[j:j + b])  # (r, s)
                if pr:
                    sam_in[j:j + b] |= (d <= r_pr[i:i + b, None]).any(0)
                    ref_in[i:i + b] |= (d <= s_pr[None, j:j + b]).any(1)
                if dc:
                    inside = d < r_dc[i:i + b, None]  # (r, s)
                    pairs += inside.sum()
                    covered[i:i + b] |= inside.any(1)
    out = dict(precision=sam_in.double().mean().item(), recall=ref_in.double().mean().item()) if pr else {}
    if dc:
        out.update(density=pairs.item() / (k_dc * len(sam)), coverage=covered.double().mean().item())
    return out


def precision_recall(ref_features, sample_features, k=PR_K, batch_size=10000, device=None):
    """(precision, recall) of `neighbour_metrics` with neighbourhood size k."""
    out = neighbour_metrics(ref_features, sample_features, ("pr",), k_pr=k, batch_size=batch_size, device=device)
    return out["precision"], out["recall"]


# What each metric can be computed from, the first way needing no images (see resolve_metrics), and names.
SOURCES = {"fid": ("mu", "images"), "sfid": ("mu_s", "images"), "is": ("logits", "images"),
           "pr": ("features", "images"), "dc": ("features", "images")}
HOLDINGS = {"mu": "mu / sigma", "mu_s": "mu_s / sigma_s", "features": "pool3 features", "logits": "logits",
            "images": "images (arr_0)"}
LABELS = {"fid": "FID", "sfid": "sFID", "is": "IS", "pr": "precision / recall", "dc": "density / coverage"}
RESULTS = dict(fid="FID", sfid="sFID", inception_score="Inception Score", precision="Precision", recall="Recall",
               density="Density", coverage="Coverage")


def resolve_metrics(requested, ref=None, samples=None):
    """The metrics to compute, in METRICS order: `requested` (names from METRICS), or for None / empty every one that
    `ref` and `samples` can both give. Each side (a Source, Reference or Stats, or None) tells what it `holds`: mu /
    sigma, mu_s / sigma_s, pool3 features, logits, images; IS needs nothing of the reference. A request that a side
    cannot meet is a ValueError naming what it lacks."""
    sides = [(s, [m for m in METRICS if m != "is" or s is samples]) for s in (ref, samples) if s is not None]
    if not requested:
        return tuple(m for m in METRICS if all(set(SOURCES[m]) & side.holds for side, ms in sides if m in ms))
    unknown = sorted(set(requested) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: choose from {', '.join(METRICS)}")
    for side, ms in sides:
        lacking = [m for m in ms if m in requested and not set(SOURCES[m]) & side.holds]
        if lacking:
            held = " and ".join(text for h, text in HOLDINGS.items() if h in side.holds) or "nothing usable"
            needs = {}  # the same needs, one clause
            for m in lacking:
                needs.setdefault(" or ".join(HOLDINGS[h] for h in SOURCES[m]), []).append(LABELS[m])
            clauses = [f"{' and '.join(labels)} need{'' if '/' in labels[-1] or len(labels) > 1 else 's'} {what}"
                       for what, labels in needs.items()]
            raise ValueError(f"{side.name} holds only {held}: {'; '.join(clauses)}")
    return tuple(m for m in METRICS if m in requested)


def compute_metrics(samples, ref, sample_features=None, which=None, batch_size=10000, device=None):
    """Every metric of `which` (default: all that `ref` and the samples allow, see resolve_metrics), as a dict with the
    keys fid, sfid, inception_score, precision, recall, density, coverage (those computed).

    samples: the samples' Stats (summed over the processes), or a Reference holding their precomputed statistics.
    ref: the Reference (build_reference). sample_features: the samples' pool3 features (N, 2048) for pr / dc, all of
    them on every process (gather_features). The CLI and pixelgen.py both come here: equal numbers by construction."""
    side = samples if sample_features is None else types.SimpleNamespace(
        name=samples.name, holds=samples.holds | {"features"})
    which = resolve_metrics(which, ref, side)
    out = {}
    if "fid" in which:
        out["fid"] = frechet_distance(*samples.mu_sigma(), *ref.mu_sigma())
    if "sfid" in which:
        out["sfid"] = frechet_distance(*samples.mu_sigma(spatial=True), *ref.mu_sigma(spatial=True))
    if "is" in which:
        out["inception_score"] = samples.inception_score()
    if "pr" in which or "dc" in which:
        out.update(neighbour_metrics(ref.features, sample_features, which, ref.radii, batch_size=batch_size,
                                     device=device))
    return out


class Evaluation:
    """One process's share of evaluating n samples against a Reference: add() batches of its uint8 images with their
    indices (any order and sharding: sums of Inception outputs, and pool3 features for pr / dc), then collect() sums
    and gathers them over the processes (reduce, gather: see build_reference), then metrics()."""

    def __init__(self, model, ref, which, n, preprocess="adm"):
        self.model, self.ref, self.which, self.preprocess, self.spatial = model, ref, which, preprocess, "sfid" in which
        self.stats = Stats(n, spatial_dim=SPATIAL_DIM if self.spatial else 0)
        self.features = [np.zeros((0, 2048), np.float32)] if {"pr", "dc"} & set(which) else None

    def add(self, images, index):
        feats, logits, *spatial = inception_outputs(self.model, images, self.preprocess, self.spatial)
        self.stats.add(feats, logits, *spatial, index=index)
        if self.features is not None:
            self.features.append(feats.astype(np.float32))

    def collect(self, world=1, reduce=None, gather=None):  # every process calls it
        if reduce is not None:
            reduce(self.stats.tensors)
        if self.features is not None:
            self.features = [gather_features(np.concatenate(self.features), self.stats.n, world, gather)]

    def metrics(self, device=None):
        feats = None if self.features is None else self.features[0]
        return compute_metrics(self.stats, self.ref, feats, self.which, device=device)

def table(rows):  # evaluation rows: a line per setting (ema, cfg) with its metrics; the best FID marked among several
    cols = [k for k in RESULTS if k in rows[0]]
    best = min(rows, key=lambda r: r["fid"]) if "fid" in cols and len(rows) > 1 else None
    width = {k: max(10, len(k)) + 1 for k in cols}
    lines = [f"{'ema':>8} {'cfg':>6}" + "".join(f"{k:>{width[k]}}" for k in cols)]
    for r in rows:
        lines.append(f"{r['ema']!s:>8} {r['cfg_scale']:>6g}" + "".join(f"{r[k]:>{width[k]}.4g}" for k in cols)
                     + ("  <- best FID" if r is best else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Inputs: image folders, ADM npz batches (arr_0) and statistics npz files (mu, sigma).


def scan(folder, recursive=True):
    """(image files, left out): the image files under folder, sorted, and what was left out of it, relative to it:
    hidden names (starting with "."; .thumbnails/, .DS_Store, macOS's ._name.png) and files of other extensions."""
    files, left_out = [], []
    for root, dirs, names in os.walk(folder):
        rel = lambda name: os.path.relpath(os.path.join(root, name), folder)
        left_out += [rel(d) + "/" for d in sorted(dirs) if d.startswith(".") or not recursive]
        dirs[:] = [d for d in dirs if recursive and not d.startswith(".")]  # os.walk does not enter the others
        for name in sorted(names):
            image = not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
            files.append(os.path.join(root, name)) if image else left_out.append(rel(name))
    return sorted(files), left_out


def list_images(folder):
    """The image files under folder (see scan); ValueError when there are none."""
    files = scan(folder)[0]
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return files


def read_image(path, background=(255, 255, 255)):
    """(H, W, 3) uint8 RGB of an image file: the one image reader of training (pixelgen.py) and of FID folders.

    Transparency is composited onto `background` (r, g, b integers in 0..255, white by default) in integers,
    out = round((a rgb + (255 - a) background) / 255) (never a tie: 255 is odd), so alpha 0 gives exactly the
    background whatever colour the file keeps there, alpha 255 exactly the colour, and files with the same visible
    pixels read the same. Dropping alpha instead shows those hidden colours: on a folder of icons it put some on
    black, some on white, and turned faint drop shadows into dark halos. Alpha comes from RGBA, LA, PA, RGBa and from
    palette, grey or RGB images with a transparent colour (PNG tRNS, GIF). 16/32-bit and float greys (I;16, I, F) are
    scaled by 255 / max(peak, 255) and truncated, not clipped; other modes (1, L, P, CMYK, YCbCr, LAB) are PIL's
    convert("RGB"), so JPEGs read exactly as torchvision's ImageFolder reads them. Animated files: the first frame.
    EXIF orientation is ignored, like torchvision and the ADM suite, whose reference statistics were made without it.
    ValueError naming the path when the file cannot be read or decoded."""
    if not (isinstance(background, (tuple, list)) and len(background) == 3
            and all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in background)):
        raise ValueError(f"background must be three integers in 0..255 (r, g, b), got {background!r}")
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;"):
                a = np.asarray(im, dtype=np.float64)
                grey = np.clip(a * 255.0 / max(a.max(), 255.0), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if not {"A", "a"} & set(im.getbands()) and "transparency" not in im.info:
                return np.asarray(im.convert("RGB"))
            rgba = np.asarray(im.convert("RGBA"), dtype=np.int32)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    alpha = rgba[..., 3:]
    out = (alpha * rgba[..., :3] + (255 - alpha) * np.array(background, np.int32) + 127) // 255
    return out.astype(np.uint8)


def _open_arr_0(zf, path):
    """The arr_0 member of an open npz zip, positioned at its data (read lazily), and the array's shape."""
    if "arr_0.npy" not in zf.namelist():
        raise ValueError(f"{path} has no 'arr_0' images (nor 'mu' and 'sigma'); it holds "
                         f"{[n[:-4] for n in zf.namelist()]}")
    f = zf.open("arr_0.npy")
    version = np.lib.format.read_magic(f)
    shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                             else np.lib.format.read_array_header_2_0(f))
    if fortran or dtype != np.uint8 or len(shape) != 4:
        f.close()
        raise ValueError(f"{path}: 'arr_0' must be a C-ordered uint8 (N, H, W, 3) array, got {dtype} {shape}")
    return f, shape


class Source:
    """One side of the comparison: `stats` = (mu, sigma) and `spatial_stats` = (mu_s, sigma_s) when an npz holds them,
    and len() images (folder files or npz arr_0) that `batches()` streams as uint8 (B, H, W, 3) numpy batches."""

    def __init__(self, path, background=(255, 255, 255)):  # background: under transparent pixels (read_image)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file or folder: {path}")
        self.path = self.name = path
        self.background = tuple(background)
        self.stats, self.spatial_stats, self.files, self.count = None, None, None, 0
        if os.path.isdir(path):
            self.files = list_images(path)
            self.count = len(self.files)
            return
        try:
            zf = zipfile.ZipFile(path)  # an npz is a zip of .npy files
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path} is neither an image folder nor a readable .npz file ({e})") from e
        with zf:
            names = [n[:-4] for n in zf.namelist()]
            with np.load(path) as npz:
                for attr, keys in (("stats", ("mu", "sigma")), ("spatial_stats", ("mu_s", "sigma_s"))):
                    if all(k in names for k in keys):
                        setattr(self, attr, tuple(npz[k].astype(np.float64) for k in keys))
            if "arr_0" in names or self.stats is None:  # arr_0 missing and no stats either: _open_arr_0 says so
                f, shape = _open_arr_0(zf, path)
                f.close()
                self.count = shape[0]

    def __len__(self):
        return self.count

    @property
    def holds(self):  # what the metrics can come from (see resolve_metrics)
        return ({"images"} if self.count else set()) | ({"mu"} if self.stats else set()) | (
            {"mu_s"} if self.spatial_stats else set())

    def batches(self, batch_size=50, start=0, stop=None, indices=False):
        """Images [start, stop) (default: all) as uint8 (B, H, W, 3) numpy batches of equal-size images, with
        indices=True as (index (B,), images) pairs. Folder images that `read_image` cannot read are skipped, and one
        warning at the end says how many and names the first few."""
        stop = self.count if stop is None else min(stop, self.count)
        if not 0 <= start <= stop:
            raise ValueError(f"{self.path}: bad image range [{start}, {stop}) of {self.count} images")
        pairs = (self._folder_batches if self.files is not None else self._npz_batches)(batch_size, start, stop)
        return pairs if indices else (images for _, images in pairs)

    def _folder_batches(self, batch_size, start, stop):
        batch, index, unreadable = [], [], []
        for i in range(start, stop):
            try:
                image = read_image(self.files[i], self.background)
            except Exception as e:  # whatever the decoder raises
                unreadable.append(f"{self.files[i]} ({e})" if not unreadable else self.files[i])
                continue
            if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
                yield np.array(index), np.stack(batch)
                batch, index = [], []
            batch.append(image)
            index.append(i)
        if batch:
            yield np.array(index), np.stack(batch)
        if unreadable:
            warnings.warn(f"{self.path}: skipped {len(unreadable)} unreadable of {stop - start} images: "
                          f"{', '.join(unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}", stacklevel=3)

    def _npz_batches(self, batch_size, start, stop):
        with zipfile.ZipFile(self.path) as zf:  # arr_0 batch by batch: 50k samples at 256px are 10 GB
            f, shape = _open_arr_0(zf, self.path)
            with f:
                image_bytes = int(np.prod(shape[1:]))
                f.seek(f.tell() + start * image_bytes)  # skipped by 16 MiB reads (Python >= 3.12 seeks stored npz)
                for i in range(start, stop, batch_size):
                    n = min(batch_size, stop - i)
                    data = f.read(n * image_bytes)
                    if len(data) != n * image_bytes:
                        raise ValueError(f"{self.path}: arr_0 is truncated")
                    yield np.arange(i, i + n), np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def read_outputs(model, src, stats, preprocess="adm", batch_size=50, start=0, stop=None, logits=True,
                 keep_features=False, progress=False):
    """Adds the Inception outputs of src's images [start, stop) to `stats` (pool3, the logits with logits=True, sFID's
    features when the Stats keep them) and marks the unreadable ones skipped. Returns their pool3 features (n, 2048)
    float32 numpy in index order with keep_features, else None."""
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    stop = len(src) if stop is None else stop
    read, kept = np.zeros(stop - start, bool), [np.zeros((0, len(stats.sum_f)), np.float32)]
    with tqdm(total=stop - start, unit="img", desc=progress if isinstance(progress, str) else "inception",
              disable=not progress) as bar:
        for index, images in src.batches(batch_size, start, stop, indices=True):
            feats, lg, *spatial = inception_outputs(model, images, preprocess, spatial=bool(stats.spatial_dim))
            stats.add(feats, lg if logits else None, *spatial, index=index)
            kept += [feats.astype(np.float32)] if keep_features else []
            read[index - start] = True
            bar.update(len(index))
    stats.skip(start + np.flatnonzero(~read))
    return np.concatenate(kept) if keep_features else None


def gather_features(features, total, world=1, gather=None):
    """Every process's pool3 features (n_r, D), in process order, on every process: float32 numpy (sum_r n_r, D).

    total: the number of samples over all processes, of which each has at most m = ceil(total / world) (fewer when
    some were unreadable). Each pads its rows to m with NaN rows; `gather(tensor)` takes this process's (m, D) CPU
    float32 tensor and returns every process's, concatenated in rank order, (world m, D) on any device (e.g.
    dist.all_gather_into_tensor on the GPU); the NaN rows are dropped. One copy of the features per process (a second
    while dropping, only when there was padding)."""
    features = np.asarray(features, np.float32)
    if world == 1:
        return features
    m = -(-total // world)
    if len(features) > m:
        raise ValueError(f"a process holds {len(features)} features, more than ceil({total} / {world}) = {m}")
    padded = torch.full((m, features.shape[1]), float("nan"))
    padded[:len(features)] = torch.from_numpy(features)
    out = gather(padded).cpu()  # (world m, D)
    keep = ~out[:, 0].isnan()
    return (out if keep.all() else out[keep]).numpy()


class Reference:
    """The reference side of every metric, computed once (build_reference): FID's mu / sigma, sFID's mu_s / sigma_s
    (or None), the pool3 features (R, 2048) float32 (or None) with their k-NN radii {k: (R,)} for precision / recall
    and density / coverage."""

    def __init__(self, name, mu, sigma, mu_s=None, sigma_s=None, features=None, radii=None):
        self.name, self.mu, self.sigma, self.mu_s, self.sigma_s = name, mu, sigma, mu_s, sigma_s
        self.features, self.radii = features, radii or {}

    @property
    def holds(self):  # what the metrics can come from (see resolve_metrics)
        return {"mu"} | ({"mu_s"} if self.mu_s is not None else set()) | (
            {"features"} if self.features is not None else set())

    def mu_sigma(self, spatial=False):
        if spatial and self.mu_s is None:
            raise ValueError(f"{self.name}: the reference holds no mu_s / sigma_s")
        return (self.mu_s, self.sigma_s) if spatial else (self.mu, self.sigma)


def build_reference(path, model, which=None, preprocess="adm", batch_size=50, shard=(0, 1), reduce=None, gather=None,
                    cache_dir=None, progress=False, background=(255, 255, 255)):
    """The Reference of an image folder, ADM reference batch or statistics npz for the metrics `which` (default: all
    that it allows, see resolve_metrics): precomputed mu / sigma and mu_s / sigma_s are used as they are (as the ADM
    suite does), the rest comes from the images, unreadable ones skipped. model: the FID Inception (unused when
    nothing is computed); the k-NN radii are computed on its device.

    shard = (rank, world): this process reads the images [m rank, m (rank + 1)), m = ceil(N / world); every process
    calls `reduce(tensors)`, which sums a list of float64 CPU tensors over the processes in place (dist.all_reduce of
    each), and for precision / recall or density / coverage `gather` (see gather_features), equally often, and all
    get the same Reference. cache_dir: keep the result in an npz there, used again while its key holds: the reference
    file (absolute path, size, mtime_ns) or folder (each image's, and the background under transparent pixels), a
    hash of the Inception's weights, the preprocessing; it holds what was computed, and a request for more
    recomputes. All processes use the cache or none does (one more reduce call); rank 0 writes it (atomically)."""
    src, (rank, world) = Source(path, background), shard
    which = [m for m in resolve_metrics(which, src) if m != "is"]
    keep = "pr" in which or "dc" in which  # the features
    if not any(SOURCES[m][0] not in src.holds for m in which):  # everything is precomputed, or nothing needed (IS)
        return Reference(path, *(src.stats or (None, None)), *(src.spatial_stats or (None, None)))
    if len(src) < 2:
        raise ValueError(f"{path}: FID statistics need at least 2 images, got {len(src)}")
    if not 0 <= rank < world or world > 1 and (reduce is None or keep and gather is None):
        raise ValueError(f"shard {shard}: need 0 <= rank < world, and a reduce function when world > 1 (and a gather "
                         f"function for precision / recall or density / coverage)")
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if cache_dir:
        file, key = _cache_file(cache_dir, path, preprocess), _cache_key(src, model, preprocess)
        cached = _load_cache(file, key, path)
        usable = cached is not None and all(SOURCES[m][0] in cached.holds for m in which)
        if world > 1:  # all or none: a process that finds no cache must not compute alone
            flag = [torch.tensor([float(not usable)], dtype=torch.float64)]
            reduce(flag)
            usable = flag[0].item() == 0
        if usable:
            return cached
        if cached is not None:  # the same key: keep what it held
            which = [m for m in METRICS if m in which or m != "is" and SOURCES[m][0] in cached.holds]
            keep = "pr" in which or "dc" in which
    spatial = "sfid" in which and src.spatial_stats is None
    m = -(-len(src) // world)
    stats = Stats(len(src), spatial_dim=SPATIAL_DIM if spatial else 0)
    feats = read_outputs(model, src, stats, preprocess, batch_size, min(len(src), m * rank),
                         min(len(src), m * (rank + 1)), logits=False, keep_features=keep, progress=progress)
    if world > 1:
        reduce(stats.tensors)
        feats = gather_features(feats, len(src), world, gather) if keep else None
    mu_sigma = src.stats or stats.mu_sigma()
    mu_s_sigma_s = src.spatial_stats or (stats.mu_sigma(spatial=True) if spatial else (None, None))
    radii = None
    if keep:  # the radii of both neighbourhood sizes when the set allows (one pass): a later request finds them
        ks = sorted({k for k, m in ((PR_K, "pr"), (DC_K, "dc")) if m in which or k < len(feats)})
        with full_fp32():
            r = knn_radii(torch.as_tensor(feats, device=next(model.parameters()).device), ks)  # (R, len(ks))
        radii = {k: r[:, i].cpu().numpy() for i, k in enumerate(ks)}
    ref = Reference(path, *mu_sigma, *mu_s_sigma_s, feats, radii)
    if cache_dir and rank == 0:
        _save_cache(file, key, ref)
    return ref


def _cache_file(cache_dir, path, preprocess):  # one file per reference and preprocessing, overwritten when stale
    path = os.path.abspath(path)
    tag = hashlib.sha256(f"{path}\n{preprocess}".encode()).hexdigest()[:12]
    return os.path.join(cache_dir, f"{os.path.basename(path)}.{preprocess}.{tag}.npz")


def _cache_key(src, model, preprocess):
    """What a cached reference depends on, as a string: see build_reference. The weights enter by a hash of their
    values (~0.2 s), not their file: any copy of the same weights matches, any other weights do not."""
    path = os.path.abspath(src.path)
    if src.files is None:
        st = os.stat(path)
        reference = [path, st.st_size, st.st_mtime_ns]
    else:
        listing = hashlib.sha256()
        for file in src.files:
            st = os.stat(file)
            listing.update(f"{os.path.relpath(file, src.path)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        reference = [path, listing.hexdigest(), list(src.background)]
    weights = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().numpy())
    return json.dumps(dict(version=1, reference=reference, weights=weights.hexdigest(), preprocess=preprocess))


def _load_cache(file, key, name):  # the cached Reference, or None when there is none under this key
    try:
        with np.load(file) as z:
            if str(z["key"]) != key:
                return None
            get = {k: z[k] for k in z.files}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    radii = {int(k[len("radii_"):]): v for k, v in get.items() if k.startswith("radii_")}
    return Reference(name, get["mu"], get["sigma"], get.get("mu_s"), get.get("sigma_s"), get.get("features"), radii)


def _save_cache(file, key, ref):  # tmp + os.replace: a reader sees the old file or the new one, never half of one
    arrays = dict(key=np.array(key), mu=ref.mu, sigma=ref.sigma)
    arrays.update({k: v for k, v in (("mu_s", ref.mu_s), ("sigma_s", ref.sigma_s), ("features", ref.features))
                   if v is not None})
    arrays.update({f"radii_{k}": v for k, v in ref.radii.items()})
    os.makedirs(os.path.dirname(file) or ".", exist_ok=True)
    tmp = f"{file}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, file)


def reference_stats(path, model, preprocess="adm", batch_size=50, shard=(0, 1), reduce=None, progress=False):
    """FID's (mu, sigma) of a reference set: build_reference(path, model, ("fid",), ...)'s."""
    ref = build_reference(path, model, ("fid",), preprocess, batch_size, shard, reduce, progress=progress)
    return ref.mu, ref.sigma


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
    p = argparse.ArgumentParser(description="FID, sFID, IS, precision / recall and density / coverage of two image "
                                "sets.", epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="image folder, ADM npz batch (arr_0) or statistics npz (mu, sigma)")
    p.add_argument("ref", nargs="?", help="the same kinds; ADM reference batches hold arr_0 and mu / sigma")
    p.add_argument("--is", dest="inception_score", action="store_true", help="Inception Score of SAMPLES")
    p.add_argument("--sfid", action="store_true", help="sFID (spatial features; precomputed mu_s / sigma_s or images)")
    p.add_argument("--pr", action="store_true", help="precision and recall (k = 3); both sides need images")
    p.add_argument("--prdc", action="store_true", help="precision, recall, density and coverage (k = 3, 5)")
    p.add_argument("--all", action="store_true", help="every metric, or an error naming what a side lacks (without "
                   "metric flags, every metric that both sides allow is computed)")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="adm")
    p.add_argument("--batch_size", "--batch-size", type=int, default=50)
    p.add_argument("--weights", help=f"path of {FID_WEIGHTS_FILE} (default: torch hub cache, else download)")
    p.add_argument("--save-stats", dest="save_stats", help="write mu / sigma (and mu_s / sigma_s) of SAMPLES here")
    p.add_argument("--cache-dir", dest="cache_dir", help="keep REF's features and statistics here for later runs")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--background", type=int, nargs=3, default=(255, 255, 255), metavar=("R", "G", "B"),
                   help="colour under transparent pixels of folder images (default: white, as pixelgen.py trains)")
    args = p.parse_args(argv)
    if args.ref is None and args.save_stats is None:
        p.error("REF is required unless --save-stats is given")
    flags = [m for m, on in (("is", args.inception_score), ("sfid", args.sfid), ("pr", args.pr or args.prdc),
                             ("dc", args.prdc)) if on]
    requested = METRICS if args.all else ["fid"] + flags if flags else None
    try:
        return _run(args, requested)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"fid.py: error: {e}") from e


def _run(args, requested):
    device = torch.device(args.device) if args.device else default_device()
    background = tuple(args.background)
    if not all(0 <= c <= 255 for c in background):
        raise ValueError(f"--background R G B takes values in 0..255, got {' '.join(map(str, background))}")
    samples, ref = Source(args.samples, background), Source(args.ref, background) if args.ref else None
    if ref is not None:
        which = resolve_metrics(requested, ref, samples)
    else:  # the samples' statistics to save (FID's, and sFID's when they can be had) and their IS when asked
        which = [m for m in ("fid", "sfid") if set(SOURCES[m]) & samples.holds]
        which += resolve_metrics(["is"], None, samples) if requested and "is" in requested else ()
    own = [m for m in which if SOURCES[m][0] not in samples.holds]  # metrics that need the samples' images
    ref_which = [m for m in which if m != "is"]
    model = None
    if own or ref is not None and any(SOURCES[m][0] not in ref.holds for m in ref_which):
        model = load_inception(args.weights, device)
    if ref is not None:
        ref = build_reference(args.ref, model, ref_which, args.preprocess, args.batch_size, cache_dir=args.cache_dir,
                              progress="ref", background=background)
    feats = None
    if own:  # statistics of the samples' images
        side = Stats(len(samples), spatial_dim=SPATIAL_DIM if "sfid" in which else 0)
        feats = read_outputs(model, samples, side, args.preprocess, args.batch_size, logits="is" in which,
                             keep_features="pr" in which or "dc" in which, progress="samples")
    else:  # precomputed statistics only
        side = build_reference(args.samples, None, [m for m in which if m != "is"], background=background)
        print(f"samples: using the precomputed statistics in {args.samples}")
    if args.save_stats:
        arrays = dict(zip(("mu", "sigma"), side.mu_sigma()))
        if "mu_s" in side.holds:
            arrays.update(zip(("mu_s", "sigma_s"), side.mu_sigma(spatial=True)))
        np.savez(args.save_stats, **arrays)
        print(f"saved {' / '.join(arrays)} of {args.samples} to {args.save_stats}")
    results = compute_metrics(side, ref, feats, which, device=device) if ref is not None else (
        {"inception_score": side.inception_score()} if "is" in which else {})
    for key, value in results.items():
        print(f"{RESULTS[key]}: {value:.6g}")
    return results


if __name__ == "__main__":
    main()
