"""FID, sFID, Inception Score, precision / recall and density / coverage with the FID Inception-v3, from scratch.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz    # every metric both sides allow: the ADM suite's table
    python fid.py samples/ ref/ --is --sfid                      # only FID, IS, sFID
    python fid.py samples/ --save-stats samples_stats.npz        # only save the statistics of SAMPLES

Each side is an image folder (searched recursively, hidden names skipped, transparency composited onto --background,
unreadable files skipped with a warning), an ADM npz batch (`arr_0`, uint8 NHWC) and / or statistics (`mu`, `sigma`,
optionally `mu_s`, `sigma_s`: used as they are, like the ADM suite). The metrics, plain functions of the two sets'
Inception outputs: fid; sfid (--sfid); is (--is, of SAMPLES, splits of 5000); pr (--pr: precision / recall, k = 3, as
the ADM suite); dc (--prdc: density / coverage, k = 5, as Naeem et al. 2020). Without a flag, every metric both sides
allow; --all asks for all, or fails naming what a side lacks. The network is pytorch-fid's port of TF's 2015-12-05
graph that the ADM suite uses (`pt_inception-2015-12-05-6726825d.pth`); --preprocess adm (default: the ADM suite's,
torch-fidelity's inception-v3-compat) or pytorch-fid (see preprocess_images).
"""
import argparse
import contextlib
import math
import os
import warnings

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
SPATIAL_DIM = 7 * 17 * 17  # sFID's features: 7 channels of a 17 x 17 map
PR_K, DC_K = 3, 5  # neighbourhood sizes of precision / recall (ADM suite) and density / coverage (Naeem et al.)


# ----------------------------------------------------------------------------------------------------------------
# The FID Inception-v3: torchvision's layout and key names, with the TF graph's pooling (see the blocks' comments).


class BatchNorm(nn.Module):  # inference only, TF's eps 1e-3; no num_batches_tracked: the released file has none
    def __init__(self, c):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, training=False, eps=1e-3)


class BasicConv2d(nn.Module):  # conv (no bias) -> BN -> ReLU
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
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
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
    """The FID Inception-v3 (no aux head): preprocessed (B, 3, 299, 299) -> pool3 (B, 2048), and with spatial=True
    sFID's (B, 2023): the graph's `mixed_6/conv` (its blocks are named mixed, mixed_1, ...: Mixed_6d's 1x1 branch after
    the ReLU), first 7 channels, flattened per image in NHWC order, as ADM's precomputed mu_s / sigma_s were."""

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
        # sFID's Mixed_6d.branch1x1, computed once more (0.7% of the FLOPs) rather than fished out by a hook
        s = self.Mixed_6d.branch1x1(x)[:, :7] if spatial else None  # (B, 7, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(x))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        pool3 = x.mean((2, 3))  # (B, 2048); IS logits are pool3 @ fc.weight.T (see unbiased_logits)
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
    with torch.device("meta"):  # no random initialisation to overwrite: the loaded tensors become the model's
        model = InceptionV3()
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.requires_grad_(False).eval().to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def full_fp32():
    """cuDNN convolutions and CUDA matmuls in IEEE float32 whatever training chose: TF32 moves features by ~1e-3."""
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, mm.fp32_precision
    conv.fp32_precision = mm.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, mm.fp32_precision = saved


def resize_tf1_bilinear(x, size=299):
    """TF1 `resize_bilinear(align_corners=False)`, the ADM suite's: output pixel i samples input i * in/out in float32
    (F.interpolate: (i + 0.5) * in/out - 0.5), the last row / column repeated. (B, C, H, W) -> (B, C, size, size)."""

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
    """uint8 (B, 3, H, W) -> float32 (B, 3, 299, 299) in [-1, 1]. adm: TF1 resize of the uint8 values, (x - 128) / 128
    (the ADM suite's graph); pytorch-fid: x / 255, F.interpolate(bilinear, align_corners=False), 2x - 1."""
    x = images.float()
    if mode == "adm":
        return (resize_tf1_bilinear(x) - 128) / 128
    if mode == "pytorch-fid":
        x = F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1
    raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")


def inception_outputs(model, images, preprocess="adm", spatial=False):
    """uint8 images (B, H, W, 3), in IEEE fp32 -> pool3 (B, 2048), sFID's (B, 2023) or None: float32 numpy."""
    x = torch.as_tensor(images).to(next(model.parameters()).device).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8
    with torch.inference_mode(), full_fp32():
        out = model(preprocess_images(x, preprocess), spatial=spatial)
    pool3, s = out if spatial else (out, None)
    return pool3.cpu().numpy(), None if s is None else s.cpu().numpy()


def statistics(features, chunk=10000):
    """mu (D,), sigma (D, D) of (N, D) features: float64 mean and unbiased covariance (np.cov's), chunk by chunk."""
    if len(features) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(features)}")
    parts = range(0, len(features), chunk)
    mu = sum(np.asarray(features[i:i + chunk], np.float64).sum(0) for i in parts) / len(features)
    centred = (np.asarray(features[i:i + chunk], np.float64) - mu for i in parts)
    return mu, sum(x.T @ x for x in centred) / (len(features) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr(sqrt(S1 S2)) in float64. With S1 = R R^T (Cholesky, or the symmetric
    root when S1 is singular), S1 S2 has the eigenvalues of the symmetric PSD R^T S2 R: a symmetric eigensolver finds
    them ~10x faster than scipy's sqrtm of the product (pytorch-fid, ADM) and agrees to ~1e-12 (singular: ~1e-7)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    try:
        root = np.linalg.cholesky(sigma1)  # (D, D) lower triangular, S1 = R R^T
    except np.linalg.LinAlgError:
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D) symmetric square root
    m = root.T @ sigma2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def unbiased_logits(model, pool3):
    """IS logits, pool3 @ fc.weight.T without the bias (the graph's MatMul; torch-fidelity's logits_unbiased)."""
    return np.asarray(pool3, np.float64) @ model.fc.weight.detach().cpu().double().numpy().T


def inception_score(logits, split_size=5000):
    """The ADM suite's IS of (N, C) logits: per consecutive split, exp(mean_i KL(p_i || mean_j p_j)), averaged."""
    scores = []
    for i in range(0, len(logits), split_size):
        log_p = torch.log_softmax(torch.as_tensor(np.asarray(logits[i:i + split_size], np.float64)), 1)  # (n, C)
        log_mean = torch.logsumexp(log_p, 0) - math.log(len(log_p))  # (C,): log of the split's mean p
        scores.append((log_p.exp() * (log_p - log_mean)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def squared_distances(a, b):
    """(n, D), (m, D) -> (n, m): ||a||^2 - 2 a.b + ||b||^2 clipped at 0 (as ADM), in place: one (n, m) buffer."""
    return (a @ b.T).mul_(-2).add_((a * a).sum(1)[:, None]).add_((b * b).sum(1)[None]).clamp_min_(0)


def knn_radii(features, ks, chunk=10000):
    """Per point, the squared distance to its k-th nearest neighbour other than itself, for each k of ks: (N, len(ks)).
    In blocks of chunk x chunk, the max(ks) + 1 smallest of a row so far: the point itself at 0 first, as in ADM."""
    kmax = max(ks)
    if len(features) <= kmax:
        raise ValueError(f"the {kmax}-th nearest neighbour needs more than {kmax} points per set, got {len(features)}")
    radii = []
    for rows in features.split(chunk):
        best = rows.new_empty(len(rows), 0)  # (r, <= kmax + 1)
        for cols in features.split(chunk):
            best = torch.cat([best, squared_distances(rows, cols)], 1)
            best = best.topk(min(kmax + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, list(ks)])
    return torch.cat(radii)


def neighbour_metrics(ref_features, sample_features, which=("pr", "dc"), ref_radii=None, k_pr=PR_K, k_dc=DC_K,
                      chunk=10000, device=None):
    """Precision / recall ("pr") and density / coverage ("dc") of pool3 features; a ball reaches its centre's k-th
    nearest neighbour in its set. precision / recall: the fraction of samples in some reference ball / of reference
    points in some sample ball, k = 3, `<=` (ADM); density: (sample, reference ball) pairs, sample inside, / (k M);
    coverage: the fraction of reference balls holding a sample; k = 5, `<` (prdc). Both sets are centred on the
    reference mean: far from the origin (norms ~2e4), float32 distances by expansion lose their differences.
    ref_radii: {k: (R,)}, the missing ones added in place."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ref, sam = (torch.as_tensor(f) for f in (ref_features, sample_features))
    centre = (sum(x.double().sum(0) for x in ref.split(chunk)) / len(ref)).round()  # (D,): whole, so that ties stay
    ref, sam = (torch.cat([(x.double() - centre).float().to(device) for x in f.split(chunk)]) for f in (ref, sam))
    pr, dc, b, ref_radii = "pr" in which, "dc" in which, chunk, {} if ref_radii is None else ref_radii
    with full_fp32():
        ks = [k for k, on in ((k_pr, pr), (k_dc, dc)) if on and k not in ref_radii]
        ref_radii.update(zip(ks, knn_radii(ref, ks, b).cpu().T) if ks else ())
        r_pr, r_dc = (ref_radii[k].to(device) if on else None for k, on in ((k_pr, pr), (k_dc, dc)))  # (R,)
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


class Side:
    """One set as the metrics see it: statistics, pool3, logits (None until had), k-NN radii, its images' path."""

    def __init__(self, name, mu=None, sigma=None, mu_s=None, sigma_s=None, images=None, background=(255, 255, 255)):
        self.name, self.mu, self.sigma, self.mu_s, self.sigma_s = name, mu, sigma, mu_s, sigma_s
        self.images, self.background, self.pool3, self.logits, self.radii = images, tuple(background), None, None, {}

    @property
    def holds(self):  # what the metrics can come from (see resolve_metrics)
        return {h for h, v in (("mu", self.sigma), ("mu_s", self.sigma_s), ("features", self.pool3),
                               ("logits", self.logits), ("images", self.images)) if v is not None}


def add_outputs(side, model, which, pool3, spatial=None):
    """Gives `side` what the metrics `which` need, from its images' Inception outputs (see inception_outputs)."""
    if "fid" in which:
        side.mu, side.sigma = statistics(pool3)
    if "sfid" in which:
        side.mu_s, side.sigma_s = statistics(spatial)
    if "is" in which:
        side.logits = unbiased_logits(model, pool3)
    if "pr" in which or "dc" in which:
        side.pool3 = pool3
    return side


def compute_metrics(samples, ref, which=None, device=None):
    """Every metric of `which` (default: all both Sides allow), keys as RESULTS: fid.py's, --sample's, online."""
    which, out = resolve_metrics(which, ref, samples), {}
    if "fid" in which:
        out["fid"] = frechet_distance(samples.mu, samples.sigma, ref.mu, ref.sigma)
    if "sfid" in which:
        out["sfid"] = frechet_distance(samples.mu_s, samples.sigma_s, ref.mu_s, ref.sigma_s)
    if "is" in which:
        out["inception_score"] = inception_score(samples.logits)
    if "pr" in which or "dc" in which:
        out.update(neighbour_metrics(ref.pool3, samples.pool3, which, ref.radii, device=device))
    return out


NEEDS = {"fid": "mu", "sfid": "mu_s", "is": "logits", "pr": "features", "dc": "features"}  # or else images
RESULTS = dict(fid="FID", sfid="sFID", inception_score="Inception Score", precision="Precision", recall="Recall",
               density="Density", coverage="Coverage")


def resolve_metrics(requested, ref=None, samples=None):
    """`requested` in METRICS order, or every metric both Sides can give (IS needs nothing of `ref`); ValueError."""
    can = lambda side, m: side is None or m == "is" and side is not samples or {NEEDS[m], "images"} & side.holds
    if not requested:
        return tuple(m for m in METRICS if can(ref, m) and can(samples, m))
    if set(requested) - set(METRICS):
        raise ValueError(f"unknown metrics {sorted(set(requested) - set(METRICS))}: choose from {', '.join(METRICS)}")
    for side in (ref, samples):
        lacking = [m for m in METRICS if m in requested and not can(side, m)]
        if lacking:
            raise ValueError(f"{side.name} holds no images, nor what {' and '.join(lacking)} need"
                             f"{'s' if len(lacking) == 1 else ''} ({', '.join(sorted(side.holds)) or 'nothing'})")
    return tuple(m for m in METRICS if m in requested)


def table(rows):  # evaluation rows: a line per setting (ema, cfg) with its metrics; the best FID marked among several
    cols = [k for k in RESULTS if k in rows[0]]
    best = min(rows, key=lambda r: r["fid"]) if "fid" in cols and len(rows) > 1 else None
    width = {k: max(10, len(k)) + 1 for k in cols}
    lines = [f"{'ema':>8} {'cfg':>6}" + "".join(f"{k:>{width[k]}}" for k in cols)]
    for r in rows:
        lines.append(f"{r['ema']!s:>8} {r['cfg_scale']:>6g}" + "".join(f"{r[k]:>{width[k]}.4g}" for k in cols)
                     + ("  <- best FID" if r is best else ""))
    return "\n".join(lines)


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


def read_image(path, background=(255, 255, 255)):
    """(H, W, 3) uint8 RGB of an image file: the one image reader of training (pixelgen.py) and of FID folders.
    Transparency is composited onto `background` in integers, round((a rgb + (255 - a) background) / 255), so files
    with the same visible pixels read the same whatever colours they hide; 16/32-bit and float greys are scaled by
    255 / max(peak, 255); other modes are PIL's convert("RGB"). EXIF orientation is ignored, as the ADM suite does."""
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


def open_side(path, background=(255, 255, 255)):
    """The Side of a folder or npz before any image is read: an npz's mu, sigma, mu_s, sigma_s, and its images."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file or folder: {path}")
    if os.path.isdir(path):
        return Side(path, images=path, background=background)
    try:
        npz = np.load(path)  # no pickles
        keys = npz.files if isinstance(npz, np.lib.npyio.NpzFile) else []
    except Exception:
        keys = []
    if "arr_0" not in keys and not {"mu", "sigma"} <= set(keys):  # e.g. a checkpoint, itself a zip
        raise ValueError(f"{path} is neither an image folder nor an npz batch (arr_0) or statistics file (mu, sigma)")
    with npz:
        stats = [npz[k].astype(np.float64) if k in keys else None for k in ("mu", "sigma", "mu_s", "sigma_s")]
    return Side(path, *stats, images=path if "arr_0" in keys else None, background=background)


def image_batches(path, background=(255, 255, 255), batch_size=50):
    """A folder's images (sorted; the unreadable ones skipped, with a warning) or an npz's arr_0: uint8 (B, H, W, 3)
    batches of equal-size images, in order."""
    if not os.path.isdir(path):
        with np.load(path) as npz:
            images = npz["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"{path}: arr_0 must be uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        yield from (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        return
    files, batch, unreadable = scan(path)[0], [], []
    if not files:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    for file in files:
        try:
            image = read_image(file, background)
        except Exception as e:  # whatever the decoder raises
            unreadable.append(f"{file} ({e})" if not unreadable else file)
            continue
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)
    if unreadable:
        warnings.warn(f"{path}: skipped {len(unreadable)} unreadable of {len(files)} images: "
                      f"{', '.join(unreadable[:3])}{', ...' if len(unreadable) > 3 else ''}", stacklevel=2)


def load_side(side, model, which, preprocess="adm", batch_size=50, progress=""):
    """Gives `side` (open_side) what the metrics `which` need and it lacks, from its images (precomputed statistics
    are kept, as ADM does; model: the FID Inception)."""
    own = [m for m in which if NEEDS[m] not in side.holds]
    if not own:
        return side
    pool3, spatial = [np.zeros((0, 2048), np.float32)], [np.zeros((0, SPATIAL_DIM), np.float32)]
    for batch in tqdm(image_batches(side.images, side.background, batch_size), desc=progress, disable=not progress):
        p, s = inception_outputs(model, batch, preprocess, "sfid" in own)
        pool3.append(p)
        spatial.append(s)
    return add_outputs(side, model, own, np.concatenate(pool3), np.concatenate(spatial) if "sfid" in own else None)


def main(argv=None):
    p = argparse.ArgumentParser(epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="image folder, ADM npz batch (arr_0) or statistics npz (mu, sigma)")
    p.add_argument("ref", nargs="?", help="the same kinds; ADM reference batches hold arr_0 and mu / sigma")
    for flag, what in (("--is", "Inception Score"), ("--sfid", "sFID"), ("--pr", "precision, recall"),
                       ("--prdc", "precision, recall, density, coverage"), ("--all", "every metric")):
        p.add_argument(flag, action="store_true", help=f"{what} (besides FID)")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="adm")
    p.add_argument("--batch_size", "--batch-size", type=int, default=50)
    p.add_argument("--weights", help=f"path of {FID_WEIGHTS_FILE} (default: torch hub cache, else download)")
    p.add_argument("--save-stats", dest="save_stats", help="write mu / sigma (and mu_s / sigma_s) of SAMPLES here")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--background", type=int, nargs=3, default=(255, 255, 255), metavar=("R", "G", "B"),
                   help="colour under transparent pixels of folder images (default: white, as pixelgen.py trains)")
    args = p.parse_args(argv)
    if args.ref is None and args.save_stats is None:
        p.error("REF is required unless --save-stats is given")
    flags = [m for m, on in (("is", getattr(args, "is")), ("sfid", args.sfid), ("pr", args.pr or args.prdc),
                             ("dc", args.prdc)) if on]
    try:
        return _run(args, METRICS if args.all else ["fid"] + flags if flags else None)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"fid.py: error: {e}") from e


def _run(args, requested):
    if not all(0 <= c <= 255 for c in args.background):
        raise ValueError(f"--background R G B takes values in 0..255, got {' '.join(map(str, args.background))}")
    samples, ref = (open_side(path, args.background) if path else None for path in (args.samples, args.ref))
    if ref is None:  # only the samples' statistics to save, and their IS when asked
        requested = ["fid", "sfid"] + ["is"] * ("is" in (requested or ()))
    which = resolve_metrics(requested, ref, samples)
    todo = [(samples, which)] + ([(ref, [m for m in which if m != "is"])] if ref is not None else [])
    model = None
    if any(NEEDS[m] not in side.holds for side, ms in todo for m in ms):
        model = load_inception(args.weights, args.device)
    for side, ms in todo:
        load_side(side, model, ms, args.preprocess, args.batch_size, side.name)
    if args.save_stats:
        arrays = dict(mu=samples.mu, sigma=samples.sigma, mu_s=samples.mu_s, sigma_s=samples.sigma_s)
        np.savez(args.save_stats, **{k: v for k, v in arrays.items() if v is not None})
        print(f"saved the statistics of {args.samples} to {args.save_stats}")
    results = compute_metrics(samples, ref, which, args.device) if ref is not None else (
        {"inception_score": inception_score(samples.logits)} if "is" in which else {})
    for key, value in results.items():
        print(f"{RESULTS[key]}: {value:.6g}")
    return results


if __name__ == "__main__":
    main()
