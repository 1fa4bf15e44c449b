"""FID, sFID, Inception Score, precision / recall, density / coverage, with the FID Inception-v3.

    python fid.py samples.npz VIRTUAL_imagenet256_labeled.npz  # every metric both sides allow
    python fid.py samples/ ref/ --metrics fid sfid is           # only FID, sFID, IS
    python fid.py samples/ --save-stats samples_stats.npz       # only save SAMPLES' statistics

SAMPLES, then REF (ADM's suite: REF SAMPLES): image folders, npz batches (arr_0, uint8 NHWC) and /
or statistics (mu, sigma, mu_s, sigma_s). --metrics: fid sfid is pr (precision / recall) dc
(density / coverage).
"""
import argparse
import contextlib
import functools
import math
import os
import sys
import types

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
FID_WEIGHTS_URL += FID_WEIGHTS_FILE
PREPROCESS_MODES = ("adm", "pytorch-fid")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".tif", ".tiff",
                    ".gif", ".ppm", ".pgm", ".pbm", ".pnm")
METRICS = ("fid", "sfid", "is", "pr", "dc")
SPATIAL_DIM = 7 * 17 * 17  # sFID's: 7 channels of a 17 x 17 map
PR_K = 3  # the k-th nearest neighbour of precision / recall (ADM)
DC_K = 5  # and of density / coverage (Naeem et al.)


# The FID Inception-v3 (ADM's TF graph, pytorch-fid's port): torchvision's layout, keys
class BasicConv2d(nn.Sequential):  # conv (no bias) -> BN (inference, TF's eps) -> ReLU
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        # running statistics used in eval mode; no num_batches_tracked, as the file
        self.bn = nn.BatchNorm2d(cout, eps=1e-3, track_running_stats=False)
        self.bn.register_buffer("running_mean", torch.zeros(cout))
        self.bn.register_buffer("running_var", torch.ones(cout))
        self.relu = nn.ReLU()


class Block(nn.Module):  # name=module, or name=(cin, cout, kernel, stride, padding)
    def __init__(self, **layers):
        super().__init__()
        for name, layer in layers.items():
            self.add_module(name, BasicConv2d(*layer) if isinstance(layer, tuple) else layer)


# TF's 'SAME' average pool: over real pixels (torchvision's counts padding)
avg_pool_tf = functools.partial(F.avg_pool2d, kernel_size=3, stride=1, padding=1,
                                count_include_pad=False)
ROW7, COL7 = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))  # kernel, stride, padding: 1xn, nx1 convs
ROW3, COL3 = ((1, 3), 1, (0, 1)), ((3, 1), 1, (1, 0))


class InceptionA(Block):  # 35x35 blocks Mixed_5b/c/d; out = 64 + 64 + 96 + pool_features
    def __init__(self, cin, pool_features):
        super().__init__(branch1x1=(cin, 64, 1), branch5x5_1=(cin, 48, 1),
                         branch5x5_2=(48, 64, 5, 1, 2), branch3x3dbl_1=(cin, 64, 1),
                         branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 1, 1),
                         branch_pool=(cin, pool_features, 1))

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionB(Block):  # Mixed_6a, 35 -> 17; out = 384 + 96 + cin channels
    def __init__(self, cin):
        super().__init__(branch3x3=(cin, 384, 3, 2), branch3x3dbl_1=(cin, 64, 1),
                         branch3x3dbl_2=(64, 96, 3, 1, 1), branch3x3dbl_3=(96, 96, 3, 2))

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(Block):  # 17x17 blocks Mixed_6b..e; out = 4 * 192
    def __init__(self, cin, c7):
        super().__init__(branch1x1=(cin, 192, 1), branch7x7_1=(cin, c7, 1),
                         branch7x7_2=(c7, c7, *ROW7), branch7x7_3=(c7, 192, *COL7),
                         branch7x7dbl_1=(cin, c7, 1), branch7x7dbl_2=(c7, c7, *COL7),
                         branch7x7dbl_3=(c7, c7, *ROW7), branch7x7dbl_4=(c7, c7, *COL7),
                         branch7x7dbl_5=(c7, 192, *ROW7), branch_pool=(cin, 192, 1))

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_tf(x))], 1)


class InceptionD(Block):  # Mixed_7a, 17 -> 8; out = 320 + 192 + cin channels
    def __init__(self, cin):
        super().__init__(branch3x3_1=(cin, 192, 1), branch3x3_2=(192, 320, 3, 2),
                         branch7x7x3_1=(cin, 192, 1), branch7x7x3_2=(192, 192, *ROW7),
                         branch7x7x3_3=(192, 192, *COL7), branch7x7x3_4=(192, 192, 3, 2))

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x)))
        return torch.cat([b3, self.branch7x7x3_4(b7), F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(Block):  # 8x8 blocks Mixed_7b/c; out = 320 + 768 + 768 + 192 = 2048
    def __init__(self, cin, pool):
        super().__init__(branch1x1=(cin, 320, 1), branch3x3_1=(cin, 384, 1),
                         branch3x3_2a=(384, 384, *ROW3), branch3x3_2b=(384, 384, *COL3),
                         branch3x3dbl_1=(cin, 448, 1), branch3x3dbl_2=(448, 384, 3, 1, 1),
                         branch3x3dbl_3a=(384, 384, *ROW3), branch3x3dbl_3b=(384, 384, *COL3),
                         branch_pool=(cin, 192, 1))
        self.pool = pool  # the graph's Mixed_7c max-pools, where the paper averages

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        pooled = avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)


class InceptionV3(Block):  # fc: 1000 ImageNet classes + 8 unused
    def __init__(self):
        super().__init__(Conv2d_1a_3x3=(3, 32, 3, 2), Conv2d_2a_3x3=(32, 32, 3),
                         Conv2d_2b_3x3=(32, 64, 3, 1, 1), Conv2d_3b_1x1=(64, 80, 1),
                         Conv2d_4a_3x3=(80, 192, 3), Mixed_5b=InceptionA(192, 32),
                         Mixed_5c=InceptionA(256, 64), Mixed_5d=InceptionA(288, 64),
                         Mixed_6a=InceptionB(288), Mixed_6b=InceptionC(768, 128),
                         Mixed_6c=InceptionC(768, 160), Mixed_6d=InceptionC(768, 160),
                         Mixed_6e=InceptionC(768, 192), Mixed_7a=InceptionD(768),
                         Mixed_7b=InceptionE(1280, "avg"), Mixed_7c=InceptionE(2048, "max"),
                         fc=nn.Linear(2048, 1008))

    def forward(self, x, spatial=False):  # preprocessed (B, 3, 299, 299)
        x = self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))  # (B, 32, 147, 147)
        x = F.max_pool2d(self.Conv2d_2b_3x3(x), 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))  # (B, 768, 17, 17)
        # sFID's (B, 2023): the graph's mixed_6/conv (Mixed_6d's 1x1, again), 7 channels, NHWC
        s = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1) if spatial else None
        x = self.Mixed_6e(self.Mixed_6d(x))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean((2, 3)), s  # pool3 (B, 2048); IS logits: pool3 @ fc.weight.T


def load_inception(path=None, device=None):  # `path`, else the hub cache's (downloaded)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = path is None
    path = os.path.join(folder, FID_WEIGHTS_FILE) if cached else path
    if cached and not os.path.exists(path):
        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, path)
        except Exception as e:
            raise FileNotFoundError(f"{FID_WEIGHTS_FILE} is not in {folder}, nor downloaded "
                                    f"({e}): put {FID_WEIGHTS_URL} there, or pass its path "
                                    f"(--weights)") from e
    with torch.device("meta"):  # the loaded tensors become the model's
        model = InceptionV3()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), assign=True)
    except Exception as e:  # no such file, not one torch reads, other keys or shapes
        fix = "delete it and download it again" if cached else f"the file is {FID_WEIGHTS_URL}"
        error = " ".join(str(e).split())[:300]
        raise RuntimeError(f"{path} is not the FID Inception weights ({error}); {fix}") from e
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.requires_grad_(False).eval().to(device)


@contextlib.contextmanager
def full_fp32():  # IEEE fp32 convs and matmuls whatever training chose: TF32 moves features 1e-3
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    # by the legacy API (matmul.allow_tf32 = False): the new one makes its getters raise
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def resize_tf1_bilinear(x, size=299):
    """ADM's TF1 resize_bilinear: (B, C, H, W) -> (B, C, size, size); output i samples input
    i * in/out (F.interpolate: (i + 0.5) * in/out - 0.5)."""

    def axis(n):  # per output index: lower / upper source index (last repeated), upper weight
        pos = torch.arange(size, device=x.device) * torch.tensor(n / size, dtype=torch.float32)
        lo = pos.long()  # floor, pos >= 0
        return lo, (lo + 1).clamp(max=n - 1), (pos - lo).to(x.dtype)

    ylo, yhi, wy = axis(x.shape[2])
    xlo, xhi, wx = axis(x.shape[3])
    lerp = lambda rows: rows[..., xlo] + (rows[..., xhi] - rows[..., xlo]) * wx
    top = lerp(x[:, :, ylo])
    bottom = lerp(x[:, :, yhi])
    return top + (bottom - top) * wy[:, None]


def preprocess_images(images, mode="adm"):  # uint8 (B, 3, H, W) -> (B, 3, 299, 299) in [-1, 1]
    x = images.float()
    if mode == "adm":
        return (resize_tf1_bilinear(x) - 128) / 128
    if mode == "pytorch-fid":
        return 2 * F.interpolate(x / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")


def inception_outputs(model, images, preprocess="adm", spatial=False):  # of uint8 (B, H, W, 3)
    x = torch.as_tensor(images).to(next(model.parameters()).device).permute(0, 3, 1, 2)
    with torch.inference_mode(), full_fp32():
        pool3, s = model(preprocess_images(x, preprocess), spatial=spatial)
    return pool3.cpu().numpy(), None if s is None else s.cpu().numpy()  # (B, 2048), (B, 2023)


def statistics(features, chunk=10000):  # (N, D) -> float64 mu (D,), np.cov's sigma (D, D)
    if len(features) < 2:
        raise ValueError(f"FID statistics need at least 2 images, got {len(features)}")
    parts = range(0, len(features), chunk)
    mu = sum(np.asarray(features[i:i + chunk], np.float64).sum(0) for i in parts) / len(features)
    centred = (np.asarray(features[i:i + chunk], np.float64) - mu for i in parts)
    return mu, sum(x.T @ x for x in centred) / (len(features) - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) in float64, from the eigenvalues of the symmetric
    R^T S2 R (S1 = R R^T): 10x faster than sqrtm of the product."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    try:
        root = np.linalg.cholesky(sigma1)  # (D, D) lower triangular
    except np.linalg.LinAlgError:  # singular: the symmetric root
        w, v = np.linalg.eigh(sigma1)
        root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # (D, D)
    m = root.T @ sigma2 @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def inception_score(logits, split_size=5000):  # ADM's: the split mean of exp(mean KL(p || mean p))
    scores = []
    for i in range(0, len(logits), split_size):
        log_p = torch.log_softmax(torch.as_tensor(logits[i:i + split_size], dtype=torch.float64), 1)
        log_mean = torch.logsumexp(log_p, 0) - math.log(len(log_p))  # (C,)
        scores.append((log_p.exp() * (log_p - log_mean)).sum(1).mean().exp().item())
    return float(np.mean(scores))


def squared_distances(a, b):  # (n, D), (m, D) -> (n, m) clipped at 0 (as ADM), in one buffer
    d = (a @ b.T).mul_(-2)
    return d.add_((a * a).sum(1)[:, None]).add_((b * b).sum(1)[None]).clamp_min_(0)


def knn_radii(features, ks, chunk=10000):  # (N, len(ks)): squared k-th neighbour distances
    radii = []
    for rows in features.split(chunk):
        best = rows.new_empty(len(rows), 0)  # (r, <= max(ks) + 1); itself the 0-th
        for cols in features.split(chunk):
            best = torch.cat([best, squared_distances(rows, cols)], 1)
            best = best.topk(min(max(ks) + 1, best.shape[1]), dim=1, largest=False).values
        radii.append(best[:, list(ks)])
    return torch.cat(radii)


def neighbour_metrics(ref_features, sample_features, which=("pr", "dc"), k_pr=PR_K, k_dc=DC_K,
                      chunk=10000, device=None):
    """Precision / recall: samples in reference balls, reference points in sample balls (`<=`,
    ADM); density: (sample, reference ball) pairs, inside, / (k M); coverage: reference balls
    holding a sample (`<`, prdc). Balls reach the k-th neighbour. Float64: float32 misses some."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ref = torch.as_tensor(ref_features).to(device, torch.float64)  # (R, D)
    sam = torch.as_tensor(sample_features).to(device, torch.float64) - ref.mean(0)  # (S, D)
    ref = ref - ref.mean(0)  # centred: less rounding
    ks = {m: k for m, k in (("pr", k_pr), ("dc", k_dc)) if m in which}
    ball = dict(zip(ks, knn_radii(ref, list(ks.values()), chunk).T[..., None]))  # {m: (R, 1)}
    s_pr = knn_radii(sam, [k_pr], chunk)[:, 0] if "pr" in ks else None  # (S,)
    sam_in = sam.new_zeros(len(sam), dtype=torch.bool)  # in some reference ball
    ref_in = ref.new_zeros(len(ref), dtype=torch.bool)  # in some sample ball
    covered = ref.new_zeros(len(ref), dtype=torch.bool)  # ball holding a sample
    pairs = 0
    for i in range(0, len(ref), chunk):
        for j in range(0, len(sam), chunk):
            d = squared_distances(ref[i:i + chunk], sam[j:j + chunk])  # (r, s)
            if "pr" in ks:
                sam_in[j:j + chunk] |= (d <= ball["pr"][i:i + chunk]).any(0)
                ref_in[i:i + chunk] |= (d <= s_pr[j:j + chunk]).any(1)
            if "dc" in ks:
                inside = d < ball["dc"][i:i + chunk]  # (r, s)
                pairs += inside.sum().item()
                covered[i:i + chunk] |= inside.any(1)
    out = {}
    if "pr" in ks:
        out.update(precision=sam_in.double().mean().item(), recall=ref_in.double().mean().item())
    if "dc" in ks:
        out.update(density=pairs / (k_dc * len(sam)), coverage=covered.double().mean().item())
    return out


class Side(types.SimpleNamespace):  # images: an npz path or a folder's files
    def __init__(self, name, **given):
        held = dict.fromkeys("mu sigma mu_s sigma_s pool3 logits images background count".split())
        super().__init__(name=name, **{**held, **given})


def add_outputs(side, model, which, pool3, spatial=None):  # from its images' Inception outputs
    if not (np.isfinite(pool3).all() and (spatial is None or np.isfinite(spatial).all())):
        raise ValueError(f"the Inception outputs of {side.name} hold NaN or infinity")
    side.count = len(pool3)
    if "fid" in which:
        side.mu, side.sigma = statistics(pool3)
    if "sfid" in which:
        side.mu_s, side.sigma_s = statistics(spatial)
    if "is" in which:  # no bias, as the graph's MatMul
        side.logits = pool3.astype(np.float64) @ model.fc.weight.detach().cpu().double().numpy().T
    if "pr" in which or "dc" in which:
        side.pool3 = pool3
    return side


def compute_metrics(samples, ref, which=None, device=None):
    """The metrics `which` (default: all both Sides allow), keys as RESULTS."""
    which = resolve_metrics(which, ref, samples)
    out = {}
    if "fid" in which:
        out["fid"] = frechet_distance(samples.mu, samples.sigma, ref.mu, ref.sigma)
    if "sfid" in which:
        out["sfid"] = frechet_distance(samples.mu_s, samples.sigma_s, ref.mu_s, ref.sigma_s)
    if "is" in which:
        out["inception_score"] = inception_score(samples.logits)
    knn = [m for m in ("pr", "dc") if m in which]
    if knn:  # a k-th neighbour needs k + 1 points: pr's in both sets, dc's in the reference
        spare = dict(pr=min(len(ref.pool3), len(samples.pool3)) - PR_K, dc=len(ref.pool3) - DC_K)
        if min(spare[m] for m in knn) <= 0:
            small = " and ".join(m for m in knn if spare[m] <= 0)
            print(f"fid.py: warning: left out {small}: too few points", file=sys.stderr)
        knn = [m for m in knn if spare[m] > 0]
    if knn:
        out.update(neighbour_metrics(ref.pool3, samples.pool3, knn, device=device))
    return out


# each metric's Side attribute, else images
NEEDS = {"fid": "sigma", "sfid": "sigma_s", "is": "logits", "pr": "pool3", "dc": "pool3"}
RESULTS = dict(fid="FID", sfid="sFID", inception_score="Inception Score", precision="Precision",
               recall="Recall", density="Density", coverage="Coverage")


def resolve_metrics(requested, ref=None, samples=None):
    """`requested` in METRICS order, or all both Sides can give (IS: none of `ref`)."""
    can = lambda side, m: (side is None or m == "is" and side is not samples
                           or side.images is not None or getattr(side, NEEDS[m]) is not None)
    if not requested:
        return tuple(m for m in METRICS if can(ref, m) and can(samples, m))
    for side in (ref, samples):
        lacking = [m for m in METRICS if m in requested and not can(side, m)]
        if lacking:
            held = [k for k in ("mu", "mu_s", "logits", "pool3") if getattr(side, k) is not None]
            raise ValueError(f"{side.name} holds no images, nor what {' and '.join(lacking)} need"
                             f"{'s' if len(lacking) == 1 else ''} ({', '.join(held)})")
    return tuple(m for m in METRICS if m in requested)


def table(rows):  # evaluation rows, the best FID marked
    cols = [k for k in RESULTS if k in rows[0]]
    best = min(rows, key=lambda r: r["fid"]) if "fid" in cols and len(rows) > 1 else None
    width = {k: max(10, len(k)) + 1 for k in cols}
    lines = [f"{'ema':>8} {'cfg':>6}" + "".join(f"{k:>{width[k]}}" for k in cols)]
    for r in rows:
        line = f"{r['ema']!s:>8} {r['cfg_scale']:>6g}"
        line += "".join(f"{r[k]:>{width[k]}.4g}" for k in cols)
        lines.append(line + ("  <- best FID" if r is best else ""))
    return "\n".join(lines)


def scan(folder, recursive=True):
    """(image files, sorted; left out, relative: hidden names as ._x.png, others)"""
    files, left_out = [], []
    image = lambda name: not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)
    for root, dirs, names in os.walk(folder):
        rel = lambda name: os.path.relpath(os.path.join(root, name), folder)
        left_out += [rel(d) + "/" for d in sorted(dirs) if d.startswith(".") or not recursive]
        dirs[:] = [d for d in dirs if recursive and not d.startswith(".")]  # os.walk's next
        files += [os.path.join(root, name) for name in names if image(name)]
        left_out += [rel(name) for name in sorted(names) if not image(name)]
    return sorted(files), left_out


def read_image(path, background=(255, 255, 255)):
    """(H, W, 3) uint8 RGB of an image file: alpha onto `background` in integers;
    16-bit greys (I;16 modes; I: Pillow's 16-bit PGM) / 257, float ones (F) as 0..255, rounded,
    clipped; others PIL's convert("RGB"), no EXIF rotation (as ADM)."""
    if not (isinstance(background, (tuple, list)) and len(background) == 3
            and all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in background)):
        raise ValueError(f"background must be 3 integers in 0..255 (r, g, b), got {background!r}")
    try:
        with Image.open(path) as im:
            if im.mode in ("I", "F") or im.mode.startswith("I;"):
                grey = np.asarray(im, np.float64) / (1 if im.mode == "F" else 257)  # (H, W)
                grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2)
            if not {"A", "a"} & set(im.getbands()) and "transparency" not in im.info:
                return np.asarray(im.convert("RGB"))
            rgba = np.asarray(im.convert("RGBA"), dtype=np.int32)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    alpha = rgba[..., 3:]
    out = (alpha * rgba[..., :3] + (255 - alpha) * np.array(background, np.int32) + 127) // 255
    return out.astype(np.uint8)


def open_side(path, background=(255, 255, 255)):  # checked before any image is read
    if os.path.isdir(path):
        files = scan(path)[0]
        if len(files) < 2:
            raise ValueError(f"{len(files) or 'no'} image files ({', '.join(IMAGE_EXTENSIONS)}) "
                             f"under {path}: need 2 or more")
        return Side(path, images=files, background=background)
    try:
        npz = np.load(path)
        keys = npz.files  # an .npy array has none
    except Exception as e:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no such file or folder: {path}") from e
        keys = []
    if "arr_0" not in keys and not {"mu", "sigma"} <= set(keys):  # a checkpoint, say
        raise ValueError(f"{path} is neither an image folder nor an npz of arr_0 or mu, sigma")
    with npz:
        stats = {k: npz[k].astype(float) for k in ("mu", "sigma", "mu_s", "sigma_s") if k in keys}
    if not all(np.isfinite(v).all() for v in stats.values()):
        raise ValueError(f"the statistics in {path} hold NaN or infinity")
    return Side(path, images=path if "arr_0" in keys else None, **stats)


def load_side(side, model, which, preprocess="adm", batch_size=50, progress=""):
    """Gives `side` what the metrics `which` need and it lacks."""
    own = [m for m in which if getattr(side, NEEDS[m]) is None]
    if not own:
        return side
    outputs = [(np.zeros((0, 2048), np.float32), np.zeros((0, SPATIAL_DIM), np.float32))]
    unreadable = []
    for batch in tqdm(image_batches(side, batch_size, unreadable), progress, disable=not progress):
        outputs.append(inception_outputs(model, batch, preprocess, "sfid" in own))
    if unreadable:
        print(f"fid.py: warning: {side.name}: skipped {len(unreadable)} unreadable of "
              f"{len(side.images)} images: {', '.join(unreadable)}", file=sys.stderr)
    pool3, spatial = zip(*outputs)
    spatial = np.concatenate(spatial) if "sfid" in own else None
    return add_outputs(side, model, own, np.concatenate(pool3), spatial)


def image_batches(side, batch_size, unreadable):  # uint8 (B, H, W, 3) of equal-size images
    if isinstance(side.images, str):
        with np.load(side.images) as npz:
            images = npz["arr_0"]
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"{side.name}: arr_0 must be uint8 (N, H, W, 3) images, got "
                             f"{images.dtype} {images.shape}")
        yield from (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        return
    batch = []
    for file in side.images:
        try:
            image = read_image(file, side.background)
        except ValueError as e:  # the first with its error
            unreadable.append(file if unreadable else str(e))
            continue
        if batch and (len(batch) == batch_size or image.shape != batch[0].shape):
            yield np.stack(batch)
            batch = []
        batch.append(image)
    if batch:
        yield np.stack(batch)


def main(argv=None):
    raw = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(epilog=__doc__, formatter_class=raw)
    p.add_argument("samples")
    p.add_argument("ref", nargs="?")
    p.add_argument("--metrics", nargs="+", choices=METRICS)
    p.add_argument("--preprocess", choices=PREPROCESS_MODES, default="adm")
    p.add_argument("--batch_size", "--batch-size", type=int, default=50)
    p.add_argument("--weights", help=f"{FID_WEIGHTS_FILE}; default: torch hub cache's")
    p.add_argument("--save-stats")
    p.add_argument("--device")
    p.add_argument("--background", type=int, nargs=3, default=(255, 255, 255), metavar=tuple("RGB"))
    args = p.parse_args(argv)
    if args.ref is None and args.save_stats is None:
        p.error("REF is required unless --save-stats is given")
    if args.batch_size < 1:
        p.error(f"--batch_size must be 1 or more, got {args.batch_size}")
    if not all(0 <= c <= 255 for c in args.background):
        p.error(f"--background takes 3 values in 0..255, got {args.background}")
    samples = open_side(args.samples, args.background)
    ref = open_side(args.ref, args.background) if args.ref else None
    if ref is not None and samples.images is not None and samples.mu is not None and ref.mu is None:
        raise ValueError(f"{args.samples} holds mu, sigma and {args.ref} not: fid.py takes SAMPLES "
                         f"REF (ADM's suite REF SAMPLES); swap them")
    # the reference first; else only the samples' statistics
    which = resolve_metrics(args.metrics if ref else ["fid", "sfid"], ref, samples)
    todo = [(ref, [m for m in which if m != "is"]), (samples, which)] if ref else [(samples, which)]
    images = any(getattr(side, NEEDS[m]) is None for side, ms in todo for m in ms)
    model = load_inception(args.weights, args.device) if images else None
    for side, ms in todo:
        load_side(side, model, ms, args.preprocess, args.batch_size, side.name)
    if args.save_stats:
        arrays = {k: getattr(samples, k) for k in ("mu", "sigma", "mu_s", "sigma_s")}
        np.savez(args.save_stats, **{k: v for k, v in arrays.items() if v is not None})
        print(f"saved {args.save_stats}")
    results = compute_metrics(samples, ref, which, args.device) if ref is not None else {}
    print(", ".join(f"{label}: {side.count} images" if side.count else f"{label}: statistics"
                    for label, side in (("samples", samples), ("reference", ref)) if side))
    for key, value in results.items():
        print(f"{RESULTS[key]}: {value:.6g}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"fid.py: error: {e}")
