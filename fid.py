"""FID, Inception Score and precision / recall with the FID Inception-v3, written from scratch.

    python fid.py samples/ ref/                                          # FID between two image folders
    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz --is --pr  # the ADM suite's numbers
    python fid.py samples/ --save-stats samples_stats.npz                # only save mu / sigma of SAMPLES
    python fid.py samples/ ref_stats.npz --preprocess pytorch-fid --batch_size 200 --weights pt_inception.pth

Each side is an image folder (searched recursively, converted to RGB), an ADM npz batch (`arr_0`, uint8 NHWC) or a
statistics npz (`mu`, `sigma`); ADM reference batches hold both, and their precomputed mu / sigma are used for FID.

The network is pytorch-fid's FID Inception-v3, the PyTorch port of TF's 2015-12-05 graph that the ADM suite and TTUR
use (weights `pt_inception-2015-12-05-6726825d.pth`, torch hub cache or an explicit path). Features are the 2048-d
pool3 activations; IS uses the 1008-way logits `pool3 @ fc.weight.T` without the bias, like the ADM suite (whose
graph reads the MatMul before the bias add) and torch-fidelity's 'logits_unbiased'. Two preprocessings:
  adm          (default) TF1 bilinear resize to 299 without half-pixel centres on the uint8 values, then (x-128)/128:
               the ADM suite's graph, equal to torch-fidelity's `inception-v3-compat`.
  pytorch-fid  x/255, F.interpolate(bilinear, align_corners=False) to 299, then 2x-1: pytorch-fid's default.
Precision / recall follow Kynkäänniemi et al. (k = 3) as the ADM suite's ManifoldEstimator, IS the ADM suite's
splits of 5000. The suite's sFID (mu_s / sigma_s) is not computed.
"""
import argparse
import contextlib
import os
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
    """The FID Inception-v3 (no aux head). forward: preprocessed (B, 3, 299, 299) in [-1, 1] -> pool3 (B, 2048)."""

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

    def forward(self, x):  # (B, 3, 299, 299)
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))  # (B, 32, 147, 147)
        x = F.max_pool2d(self.Conv2d_2b_3x3(x), 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean((2, 3))  # (B, 2048) pool3; IS logits are pool3 @ fc.weight.T (see get_features)


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
    model = InceptionV3()
    model.load_state_dict(state_dict, strict=True)
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


def feature_batches(model, images, preprocess="adm", batch_size=50, device=None, progress=False, total=None):
    """`get_features` batch by batch: yields pool3 features (B, 2048) and unbiased logits (B, 1008), float64 numpy,
    per batch of <= batch_size images (inference mode and IEEE fp32 are set per batch, not held across yields)."""
    if preprocess not in PREPROCESS_MODES:
        raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    fc = model.fc.weight.detach().double().cpu().numpy().T  # (2048, 1008)
    batches = [images] if isinstance(images, (np.ndarray, torch.Tensor)) else images
    total = len(images) if isinstance(images, (np.ndarray, torch.Tensor)) else total
    with tqdm(total=total, unit="img", desc=progress if isinstance(progress, str) else "inception",
              disable=not progress) as bar:
        for batch in batches:
            for start in range(0, len(batch), batch_size):
                x = as_uint8_nchw(batch[start:start + batch_size]).to(device)  # (B, 3, H, W) uint8
                with torch.inference_mode(), full_fp32():
                    feats = model(preprocess_images(x, preprocess)).double().cpu().numpy()  # (B, 2048)
                bar.update(len(x))
                yield feats, feats @ fc  # logits without the bias


def get_features(model, images, preprocess="adm", batch_size=50, device=None, return_logits=False, progress=False,
                 total=None):
    """pool3 features of uint8 images: (N, 2048) float64 numpy, and (N, 1008) unbiased logits with return_logits.

    images: a uint8 array / tensor (N, 3, H, W) or (N, H, W, 3) of any size, or an iterable of such batches (e.g.
    `Source.batches`, so that 50k samples never sit in memory at once); `total` = N for the progress bar then.
    preprocess: "adm" or "pytorch-fid" (see the module docstring). device: the model's by default (a given one moves
    the model there). progress: show a tqdm bar (a string labels it). The logits are computed here in float64."""
    out = list(feature_batches(model, images, preprocess, batch_size, device, progress, total))
    if not out:
        raise ValueError("no images to compute features of")
    feats, logits = (np.concatenate(parts) for parts in zip(*out))  # (N, 2048), (N, 1008)
    return (feats, logits) if return_logits else feats


# ----------------------------------------------------------------------------------------------------------------
# Metrics.


class Stats:
    """Running float64 sums over the Inception outputs of n samples that give FID's mu / sigma and the ADM IS for any
    order and sharding: sample i (global index) is in IS split i // split_size, as in `inception_score`. `tensors`
    are plain sums (float64, CPU): summed over processes (dist.all_reduce, SUM), they are those of one pass over all.
    FID: mu = sum f / n, sigma = (sum f f^T - n mu mu^T) / (n - 1). IS: with p = softmax, P = sum_i p_i over a split
    of n_s samples, sum_i KL(p_i || P / n_s) = sum_i sum_c p_ic log p_ic - sum_c P_c log(P_c / n_s)."""

    def __init__(self, n, split_size=5000, dim=2048, classes=1008):
        self.n, self.split_size, splits = n, split_size, max(1, -(-n // split_size))
        shapes = [(1,), (dim,), (dim, dim), (splits,), (splits, classes), (splits,)]
        self.tensors = [torch.zeros(shape, dtype=torch.float64) for shape in shapes]
        # count, sum f, sum f f^T; per IS split: count, sum p, sum p log p
        self.count, self.sum_f, self.sum_ff, self.split_count, self.sum_p, self.sum_plogp = self.tensors

    def add(self, features, logits=None, index=None):
        """features (B, dim), optional unbiased logits (B, classes) (numpy or torch, any device) of the samples
        `index` (B,) (default: consecutive, after the rows added so far). IS needs the logits of every sample."""
        f = torch.as_tensor(features).to("cpu", torch.float64)  # (B, dim)
        index = (torch.arange(int(self.count), int(self.count) + len(f)) if index is None
                 else torch.as_tensor(index).to("cpu", torch.long))  # (B,)
        if f.ndim != 2 or f.shape[1] != len(self.sum_f):
            raise ValueError(f"features must be (B, {len(self.sum_f)}), got {tuple(f.shape)}")
        if index.shape != (len(f),) or len(f) and (index.min() < 0 or index.max() >= self.n):
            raise ValueError(f"index must hold {len(f)} sample indices in [0, {self.n})")
        if logits is not None:
            logits = torch.as_tensor(logits).to("cpu", torch.float64)  # (B, classes)
            if logits.shape != (len(f), self.sum_p.shape[1]):
                raise ValueError(f"logits must be ({len(f)}, {self.sum_p.shape[1]}), got {tuple(logits.shape)}")
            split, log_p = index // self.split_size, torch.log_softmax(logits, 1)  # (B,), (B, classes)
            self.split_count.index_add_(0, split, torch.ones(len(f), dtype=torch.float64))
            self.sum_p.index_add_(0, split, log_p.exp())
            self.sum_plogp.index_add_(0, split, (log_p.exp() * log_p).sum(1))
        self.count += len(f)
        self.sum_f += f.sum(0)
        self.sum_ff.addmm_(f.T, f)  # += f^T f without a (dim, dim) temporary

    def mu_sigma(self):
        """mu (dim,), sigma (dim, dim) float64 numpy; sigma is the unbiased covariance, as np.cov."""
        n = self.count.item()
        if n != self.n:
            raise ValueError(f"FID statistics: features of {n:.0f} samples were added, but the set has n={self.n}")
        if n < 2:
            raise ValueError(f"FID statistics need at least 2 samples, got {n:.0f}")
        mu = self.sum_f / n
        return mu.numpy(), ((self.sum_ff - n * torch.outer(mu, mu)) / (n - 1)).numpy()

    def inception_score(self):
        """The ADM suite's IS: per split exp(mean_i KL(p_i || mean_j p_j)), averaged over the splits."""
        sizes = (self.n - torch.arange(len(self.split_count)) * self.split_size).clamp(max=self.split_size).double()
        if self.n < 1 or not torch.equal(self.split_count, sizes):
            raise ValueError(f"IS needs the logits of all n={self.n} samples: got {self.split_count.long().tolist()} "
                             f"per split of {self.split_size}, expected {sizes.long().tolist()}")
        kl = self.sum_plogp - torch.xlogy(self.sum_p, self.sum_p / sizes[:, None]).sum(1)  # (S,) sum_i KL(p_i || q)
        return (kl / sizes).exp().mean().item()


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
    """(n, D), (m, D) -> (n, m) squared euclidean distances, ||a||^2 - 2 a.b + ||b||^2 clipped at 0 (as ADM)."""
    return ((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)


def manifold_radii(features, k=3, batch_size=10000):
    """Per point, the squared distance to its k-th nearest neighbour other than itself (float32 torch, (N,)).
    Memory: batch_size x N floats at a time."""
    if len(features) <= k:
        raise ValueError(f"precision / recall need more than k={k} samples per set, got {len(features)}")
    # Sorted distances from a point start with its own 0, so the k-th neighbour is at index k (the (k+1)-th value).
    return torch.cat([squared_distances(rows, features).kthvalue(k + 1, dim=1).values
                      for rows in features.split(batch_size)])


def precision_recall(ref_features, sample_features, k=3, batch_size=10000, device=None):
    """Kynkäänniemi et al. improved precision / recall as the ADM suite's ManifoldEstimator: each point of a set owns
    a ball of radius = distance to its k-th nearest neighbour in the same set. precision = fraction of samples inside
    some reference ball, recall = fraction of reference points inside some sample ball. Distances in float32 (ADM:
    float16 when finite), blocks of batch_size x batch_size; 50k x 50k works on GPU and CPU."""
    device = default_device() if device is None else torch.device(device)
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)  # (R, D)
    sam = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)  # (S, D)
    with full_fp32():
        ref_radii, sam_radii = manifold_radii(ref, k, batch_size), manifold_radii(sam, k, batch_size)
        sam_inside = torch.zeros(len(sam), dtype=torch.bool, device=device)  # sample in some reference ball
        ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=device)  # reference point in some sample ball
        for i in range(0, len(ref), batch_size):
            for j in range(0, len(sam), batch_size):
                d = squared_distances(ref[i:i + batch_size], sam[j:j + batch_size])  # (r, s)
                sam_inside[j:j + batch_size] |= (d <= ref_radii[i:i + batch_size, None]).any(0)
                ref_inside[i:i + batch_size] |= (d <= sam_radii[None, j:j + batch_size]).any(1)
    return sam_inside.double().mean().item(), ref_inside.double().mean().item()


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
    """One side of the comparison: `stats` = (mu, sigma) when an npz holds them, and len() images (folder files or
    npz arr_0) that `batches()` streams as uint8 (B, H, W, 3) numpy batches of equal-size images."""

    def __init__(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file or folder: {path}")
        self.path, self.stats, self.files, self.count = path, None, None, 0
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
            if "mu" in names and "sigma" in names:
                with np.load(path) as npz:
                    self.stats = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            if "arr_0" in names or self.stats is None:  # arr_0 missing and no stats either: _open_arr_0 says so
                f, shape = _open_arr_0(zf, path)
                f.close()
                self.count = shape[0]

    def __len__(self):
        return self.count

    def batches(self, batch_size=50, start=0, stop=None):
        """Images [start, stop) (default: all) as uint8 (B, H, W, 3) numpy batches."""
        stop = self.count if stop is None else min(stop, self.count)
        if not 0 <= start <= stop:
            raise ValueError(f"{self.path}: bad image range [{start}, {stop}) of {self.count} images")
        if self.files is not None:
            batch = []
            for file in self.files[start:stop]:
                image = read_image(file)
                if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
                    yield np.stack(batch)
                    batch = []
                batch.append(image)
            if batch:
                yield np.stack(batch)
            return
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
                    yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def reference_stats(path, model, preprocess="adm", batch_size=50, shard=(0, 1), reduce=None, progress=False):
    """FID's (mu, sigma) of a reference set: the precomputed ones of a statistics npz or ADM reference batch, else
    those of the images of `Source(path)`. shard = (rank, world): this process computes the features of the
    contiguous images [N rank // world, N (rank + 1) // world), and `reduce(tensors)`, called once by every process,
    sums the Stats tensors over the processes in place (e.g. dist.all_reduce of each)."""
    src, (rank, world) = Source(path), shard
    if src.stats is not None:
        return src.stats
    if len(src) < 2:
        raise ValueError(f"{path}: FID statistics need at least 2 images, got {len(src)}")
    if not 0 <= rank < world or (world > 1 and reduce is None):
        raise ValueError(f"shard {shard}: need 0 <= rank < world, and a reduce function when world > 1")
    stats, start, stop = Stats(len(src)), len(src) * rank // world, len(src) * (rank + 1) // world
    for feats, _ in feature_batches(model, src.batches(batch_size, start, stop), preprocess, batch_size,
                                    progress=progress, total=stop - start):
        stats.add(feats, index=np.arange(start, start + len(feats)))
        start += len(feats)
    if reduce is not None:
        reduce(stats.tensors)
    return stats.mu_sigma()


# ----------------------------------------------------------------------------------------------------------------
# Command line.


def main(argv=None):
    p = argparse.ArgumentParser(description="FID (and IS, precision, recall) between two image sets.",
                                epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("samples", help="image folder, ADM npz batch (arr_0) or statistics npz (mu, sigma)")
    p.add_argument("ref", nargs="?", help="the same kinds; ADM reference batches hold arr_0 and mu / sigma")
    p.add_argument("--is", dest="inception_score", action="store_true", help="Inception Score of SAMPLES")
    p.add_argument("--pr", action="store_true", help="precision and recall (k = 3); both sides need images")
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="adm")
    p.add_argument("--batch_size", "--batch-size", type=int, default=50)
    p.add_argument("--weights", help=f"path of {FID_WEIGHTS_FILE} (default: torch hub cache, else download)")
    p.add_argument("--save-stats", dest="save_stats", help="write mu / sigma of SAMPLES to this npz")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    args = p.parse_args(argv)
    if args.ref is None and args.save_stats is None:
        p.error("REF is required unless --save-stats is given")
    try:
        return _run(args)
    except (ValueError, OSError, RuntimeError) as e:
        raise SystemExit(f"fid.py: error: {e}") from e


def _run(args):
    device = torch.device(args.device) if args.device else default_device()
    sides = [("samples", Source(args.samples))] + ([("ref", Source(args.ref))] if args.ref else [])
    model, results, stats, feats = None, {}, {}, {}
    for name, src in sides:
        need_images = args.pr or (name == "samples" and args.inception_score)
        if src.stats is not None and not need_images:
            stats[name] = src.stats  # precomputed mu / sigma, e.g. of an ADM reference batch
            print(f"{name}: using the precomputed mu / sigma in {src.path}")
            continue
        if len(src) == 0:
            raise ValueError(f"{src.path} holds only mu / sigma, but --pr / --is need its images (arr_0)")
        if model is None:
            model = load_inception(args.weights, device)
        acc, kept, want_is = Stats(len(src)), [], name == "samples" and args.inception_score
        for f, logits in feature_batches(model, src.batches(args.batch_size), args.preprocess, args.batch_size,
                                         progress=name, total=len(src)):
            acc.add(f, logits if want_is else None)
            kept += [f] if args.pr else []  # precision / recall need all the features
        feats[name] = np.concatenate(kept) if args.pr else None
        stats[name] = src.stats if src.stats is not None else acc.mu_sigma()
        if want_is:
            results["inception_score"] = acc.inception_score()
    if args.save_stats:
        np.savez(args.save_stats, mu=stats["samples"][0], sigma=stats["samples"][1])
        print(f"saved mu / sigma of {args.samples} to {args.save_stats}")
    if args.ref:
        results["fid"] = frechet_distance(*stats["samples"], *stats["ref"])
    if args.pr:
        results["precision"], results["recall"] = precision_recall(feats["ref"], feats["samples"], device=device)
    for key, label in [("fid", "FID"), ("inception_score", "Inception Score"), ("precision", "Precision"),
                       ("recall", "Recall")]:
        if key in results:
            print(f"{label}: {results[key]:.6f}")
    return results


if __name__ == "__main__":
    main()
