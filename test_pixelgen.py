"""Offline CPU tests of pixelgen.py, dino.py and fid.py: random weights, no downloads, at most 3 minutes on 2 cores.

Equality with the official code (github Zehong-Ma/PixelGen, facebookresearch/dinov2, pytorch-fid, torch-fidelity) was
checked beside this repository (see the README); these tests pin closed forms, hand-computed values, and the facts
that make that equality hold. They follow the order of the code: pixelgen.py's method (model, flow, objective,
samplers), then its engineering (config and CLI, pretrained weights, data, training in one and in two processes,
sampling and evaluation, benchmark), then dino.py and fid.py. Training runs use small random perceptual networks
(`small_perceptual_nets`), since their size does not matter there."""
import copy
import fcntl
import functools
import gc
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
import weakref

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import dino
import fid
import pixelgen as pg

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))  # -n 2: 2 x 1


def small_random_nets(use_dino, use_lpips):
    """pg.random_nets of the training runs here: DINOv2 32 wide with 1 block, LPIPS on SqueezeNet,
    fixed weights in milliseconds (the global RNG is left alone)."""
    import lpips
    with torch.random.fork_rng():
        torch.manual_seed(0)
        d = dino.DINOv2(embed_dim=32, depth=1, num_heads=2) if use_dino else None
        lp = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=True, verbose=False) if use_lpips else None
    return d, lp


@pytest.fixture(autouse=True)
def _small_nets(monkeypatch):
    monkeypatch.setattr(pg, "random_nets", small_random_nets)


def tiny_jit(**kw):  # every code path of the real model at toy width
    args = dict(input_size=32, patch_size=16, hidden_size=64, depth=4, num_heads=4, bottleneck_dim=16,
                in_context_len=3, in_context_start=1, num_classes=10)
    args.update(kw)
    return pg.JiT(**args)


def randomize(model, std=0.05, seed=0):  # wake up the zero-initialised layers so outputs are non-trivial
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@functools.lru_cache(maxsize=None)
def frozen_nets():  # the objective's tests: DINOv2 at its real width (REPA targets are 768-d), LPIPS-VGG
    import lpips
    torch.manual_seed(0)
    d = dino.DINOv2(embed_dim=768, depth=2, num_heads=12)  # 2 blocks for speed
    with torch.no_grad():
        for n, p in d.named_parameters():
            if "gamma" in n:
                p.normal_(0, 0.3)
    return d, lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)


class Recorder(nn.Module):  # wraps a frozen net and records the batch shapes it sees
    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.embed_dim = net, [], getattr(net, "embed_dim", None)

    def forward(self, *a):
        self.calls.append(tuple(a[0].shape))
        return self.net(*a)


def make_loss(**kw):
    d, lp = frozen_nets()
    args = dict(repa_layer=2, num_classes=10)
    args.update(kw)
    return pg.PixelGenLoss(64, Recorder(d), Recorder(lp), **args)


def batch(B=4, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 3, S, S, generator=g) * 2 - 1, torch.randint(0, 10, (B,), generator=g),
            torch.randn(B, 3, S, S, generator=g))


def loss_of(loss_fn, model, x, y, t, eps, drop=None, adapt=False):  # the loss on given draws
    drop = torch.zeros(len(t), dtype=torch.bool) if drop is None else drop
    return loss_fn(model, x, y, t, eps, drop, adapt)


def small_cfg(out_dir, **kw):  # a tiny demo run: 32 px, batch 4, 4 steps, log and metrics every step
    base = {**pg.dataclasses.asdict(pg.Config()), **pg.RECIPES["demo"]}
    base.update(out_dir=str(out_dir), image_size=32, batch_size=4, perceptual_init="random", log_every=1,
                ckpt_every=2, sample_every=0, max_steps=4, cfg_interval=(0.1, 0.9))
    base.update(kw)
    return pg.Config(**base)


def flat(d):  # nested state dicts -> list of leaves, in a fixed order
    if isinstance(d, dict):
        return [x for k in sorted(d, key=str) for x in flat(d[k])]
    if isinstance(d, (list, tuple)):
        return [x for v in d for x in flat(v)]
    return [d]


def same(a, b):
    fa, fb = flat(a), flat(b)
    return len(fa) == len(fb) and all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(fa, fb))


def ckpt(path):
    return torch.load(path, weights_only=True)


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile with the aot_eager backend (the compiler front end and autograd, no code generation: fast on a
    CPU) wherever pixelgen compiles; yields the list of graphs it builds. Dynamo's caches are reset before and after,
    so that no test meets the recompilation limit because of the tests before it."""
    from torch._dynamo.backends.registry import lookup_backend
    torch._dynamo.reset()
    graphs, compile_ = [], torch.compile
    backend = lambda gm, inputs: graphs.append(gm) or lookup_backend("aot_eager")(gm, inputs)
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: compile_(fn, **{**kw, "backend": backend}))
    yield graphs
    torch._dynamo.reset()


def _fake_network(monkeypatch):
    """For tests of the plumbing around them: the Inception becomes a fixed function of the pixels, and the Frechet
    distance of 2048-d statistics (seconds on 2 cores, more when singular) a cheap one of all their entries.
    Returns the list of batch sizes the Inception was called with."""
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda mu1, sigma1, mu2, sigma2: float(
        np.sum((mu1 - mu2) ** 2) + np.sum((sigma1 - sigma2) ** 2) + np.trace(sigma1) / 1000))

    def outputs(model, images, preprocess="adm", spatial=False):
        calls.append(len(images))
        x = np.asarray(images, np.float64).reshape(len(images), -1) / 255  # (B, H W 3)
        f = np.tile(x, (1, -(-2048 // x.shape[1])))[:, :2048] + (preprocess == "pytorch-fid")  # (B, 2048)
        return f.astype(np.float32), np.sqrt(f[:, :2023]).astype(np.float32) if spatial else None

    monkeypatch.setattr(fid, "inception_outputs", outputs)
    return calls


# --------------------------------------------------------------------------------------------------
# Model: JiT

# The official PixelGen-XL/16 and -L/16 state dicts: "key shape", in order
HEAD = """pos_embed 1,256,D  in_context_posemb 1,32,D
t_embedder.mlp.0.weight D,256  t_embedder.mlp.0.bias D  t_embedder.mlp.2.weight D,D
t_embedder.mlp.2.bias D  y_embedder.embedding_table.weight 1001,D"""
BLOCK = """norm1.weight D  attn.q_norm.weight hd  attn.k_norm.weight hd  attn.qkv.weight 3*D,D
attn.qkv.bias 3*D  attn.proj.weight D,D  attn.proj.bias D  norm2.weight D  mlp.w12.weight 2*F,D
mlp.w12.bias 2*F  mlp.w3.weight D,F  mlp.w3.bias D  adaLN_modulation.1.weight 6*D,D
adaLN_modulation.1.bias 6*D"""
FINAL = """final_layer.norm_final.weight D  final_layer.linear.weight 768,D
final_layer.linear.bias 768  final_layer.adaLN_modulation.1.weight 2*D,D
final_layer.adaLN_modulation.1.bias 2*D"""
OFFICIAL = {  # sizes, depth, parameters (as in the paper), patch embedding
    "PixelGen-XL/16": (dict(D=1152, hd=72, F=3072), 28, 676_994_112,
                       " x_embedder.proj1.weight D,3,16,16  x_embedder.proj1.bias D"),
    "PixelGen-L/16": (dict(D=1024, hd=64, F=2730), 24, 459_139_808, " x_embedder.proj1.weight "
                      "128,3,16,16  x_embedder.proj2.weight D,128,1,1  x_embedder.proj2.bias D")}


def layout(head, block, depth, tail, **sizes):  # "key 3*D,D ..." -> [("key", (3 * D, D)), ...]
    def keys(spec, pre=""):
        s = spec.split()
        return [(pre + k, eval(v + ",", sizes)) for k, v in zip(s[::2], s[1::2])]
    blocks = [kv for i in range(depth) for kv in keys(block, f"blocks.{i}.")]
    return keys(head) + blocks + keys(tail)


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_matches_official_layout(name):
    sizes, depth, params, embed = OFFICIAL[name]
    with torch.device("meta"):
        model = pg.JiT(**pg.MODELS[name])
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == layout(HEAD + embed, BLOCK, depth, FINAL, **sizes)
    assert sum(p.numel() for p in model.parameters()) == params
    drop = [i for i, b in enumerate(model.blocks) if b.attn.proj_drop.p > 0]
    assert drop == (list(range(7, 21)) if "XL" in name else [])  # XL: the middle half of the blocks


def test_position_encodings_closed_forms():
    r, c, w = 1, 3, 1.0 / 10000 ** (np.arange(4) / 4)  # sin-cos: half the channels for the column
    want = np.concatenate([np.sin(c * w), np.cos(c * w), np.sin(r * w), np.cos(r * w)])
    np.testing.assert_allclose(pg.sincos_pos_embed(16, 4)[r * 4 + c].numpy(), want, atol=1e-6)
    hd, g, L = 8, 3, 2
    cos, sin = pg.rope_2d(g, hd, L)  # (L + 9, 4): one angle per pair; the L prefix tokens turn by 0
    # token (row 1, col 2): pairs 0, 1 turn by row * (1, 0.01), pairs 2, 3 by col * (1, 0.01)
    angles = torch.tensor([[0.0] * 4, [1.0, 0.01, 2.0, 0.02]])
    polar = torch.polar(torch.ones(2, 4), angles)
    torch.testing.assert_close(torch.complex(cos, sin)[[L - 1, L + g + 2]], polar)
    # real cos / sin per pair (the official t cos + rotate_half(t) sin) is the complex product
    x = torch.randn(2, 4, L + g * g, hd)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
    torch.testing.assert_close(pg.apply_rope(x, cos, sin), torch.view_as_real(z).flatten(-2))
    q, k = torch.randn(2, hd)
    dot = lambda a, b: (pg.apply_rope(q, cos[a], sin[a]) * pg.apply_rope(k, cos[b], sin[b])).sum()
    torch.testing.assert_close(dot(L, L + 4), dot(L + 4, L + 8))  # offset (+1, +1): the same score


def test_forward_is_zero_at_init_conditioned_and_returns_the_tokens_entering_a_block():
    (x, y, _), t = batch(2), torch.rand(2)
    assert torch.equal(tiny_jit()(x, t, y), torch.zeros_like(x))  # the output layer starts at zero
    m, seen = randomize(tiny_jit(in_context_start=1)), []
    for b in m.blocks:
        b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    ref = m(x, t, y)
    for k in range(4):  # h: the image tokens entering block k (in_context_start: before the join)
        x_hat, h = m(x, t, y, return_layer=k)
        assert torch.equal(x_hat, ref) and torch.equal(h, seen[k][:, -4:])
    assert seen[1].shape[1] == 4 + 3  # block 1 runs with the in-context tokens
    assert not torch.allclose(ref, m(x, t, y + 1)) and not torch.allclose(ref, m(x, t + 0.1, y))


def _grads(net, model, k, seed=0):  # [x_hat, h (entering block k), grads of a scalar of both]
    x, y, _ = batch(2)
    model.zero_grad()
    torch.manual_seed(seed)  # the dropout masks
    x_hat, h = net(x, torch.tensor([0.2, 0.7]), y, return_layer=k)
    ((x_hat ** 2).mean() + h.mean()).backward()
    return [x_hat, h] + [p.grad for p in model.parameters() if p.requires_grad]


def test_grad_ckpt_replays_dropout_bitwise():
    model, calls = randomize(tiny_jit(attn_drop=0.2, proj_drop=0.3)).train(), []  # blocks 1, 2 drop
    for b in model.blocks:  # a pre-hook: checkpoint's recomputation stops before the block returns
        b.register_forward_pre_hook(lambda *a: calls.append(1))
    ref = _grads(model, model, 2)
    model.grad_ckpt = True  # bitwise: checkpoint replays each block's RNG state, so the masks agree
    assert all(torch.equal(a, b) for a, b in zip(_grads(model, model, 2), ref))
    assert len(calls) == 4 + 8  # checkpointed: each block ran again in backward
    assert not torch.equal(_grads(model, model, 2, seed=1)[0], ref[0])  # the masks matter
    calls.clear()
    _grads(model.eval(), model, 2)
    assert len(calls) == 4  # eval runs plainly, grad_ckpt or not


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_jit_compiles_fullgraph_with_repa_feature(grad_ckpt, compiled):
    model = randomize(tiny_jit(depth=2, in_context_start=0))  # block 1: REPA drops the class tokens
    model.grad_ckpt = grad_ckpt
    runs = [_grads(net, model, 1) for net in (model.train(), torch.compile(model, fullgraph=True))]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-6, atol=1e-7)  # measured: bitwise equal
    values = [n.meta.get("example_value") for g in compiled for m in g.modules()
              if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes]  # checkpointed too
    assert values and not any(torch.is_tensor(v) and v.is_complex() for v in values)


# --------------------------------------------------------------------------------------------------
# Flow

def test_flow_math_hand_computed():
    # t = s / (s + 2 (1 - s)) on s = 0, 1/4, 1/2, 3/4, 1
    torch.testing.assert_close(pg.time_grid(4, 2.0), torch.tensor([0.0, 1 / 7, 1 / 3, 0.6, 1.0]))
    (x, eps), t = torch.randn(2, 3, 3, 4, 4), torch.tensor([0.0, 0.5, 0.99])
    x_t = pg.interpolate(x, eps, t)
    v = pg.x_to_v(x, x_t, t, 0.05)
    torch.testing.assert_close(v[:2], (x - eps)[:2])  # x_t = t x + (1 - t) eps: v = x - eps
    torch.testing.assert_close(v[2], (x[2] - x_t[2]) / 0.05)  # 1 - t clamped at t_eps
    t = pg.sample_t(200_000, -0.8, 0.8, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() + 0.8) < 0.01 and abs(logit.std() - 0.8) < 0.01
    assert 0.50 < (t >= 0.3).float().mean() < 0.54  # about 52% of samples pass the gate


# ---------------------------------------------------------------------------------------------------------------
# Objective (paper Eqs. 5-9)

@pytest.mark.parametrize("ts", [[0.1, 0.5, 0.29, 0.9, 0.31, 0.05], [0.3, 0.5, 0.4, 0.9, 0.31, 0.6]])
def test_loss_terms_equal_the_official_masked_computation_on_the_whole_batch(ts):
    """The official code: nets on the whole batch, values masked by the gate, sum / count (P-DINO
    as released, ungated, where all are gated). Ours: nets on the gated samples, same terms and
    gradients. Dropped labels: the null class."""
    x, y, eps = batch(6)
    t, drop = torch.tensor(ts), torch.tensor([1, 0, 0, 1, 0, 0]).bool()
    (d, lp), m1, loss_fn = frozen_nets(), randomize(tiny_jit()), make_loss()
    m2 = copy.deepcopy(m1)
    out = loss_of(loss_fn, m1, x, y, t, eps, drop)
    out["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in loss_fn.proj.parameters())  # REPA's head trains
    head = {f"proj.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}
    assert set(loss_fn.state_dict()) == {"w_ad"} | head
    tt = t.view(-1, 1, 1, 1)
    x_t = tt * x + (1 - tt) * eps
    x_hat, h = m2(x_t, t, torch.where(drop, 10, y), return_layer=2)
    mask, z = (t >= 0.3).float(), d(x, 16)
    pd = 1 - F.cosine_similarity(d(x_hat, 16), z, dim=-1)  # (B, N)
    want = dict(fm=((x_hat - x) / (1 - tt)).pow(2).mean(),
                repa=(1 - F.cosine_similarity(loss_fn.proj(h), z, dim=-1)).mean(),
                lpips=(lp(x_hat, x).view(6) * mask).sum() / mask.sum(),
                pdino=pd.mean() if mask.all() else (pd.mean(1) * mask).sum() / mask.sum())
    want["loss"] = want["fm"] + 0.1 * want["lpips"] + 0.01 * want["pdino"] + 0.5 * want["repa"]
    want["loss"].backward()
    for k, v in want.items():
        torch.testing.assert_close(out[k], v.detach(), rtol=1e-5, atol=1e-6, msg=k)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("ts,n", [([0.1, 0.2, 0.29, 0.0], 0), ([0.3, 0.5, 0.99, 0.31], 4),
                                  ([0.1, 0.3, 0.2, 0.7], 2)])
def test_gate_edge_cases_run_nets_on_gated_samples_only(ts, n):
    model, loss_fn, (x, y, eps) = randomize(tiny_jit()), make_loss(), batch()
    out = loss_of(loss_fn, model, x, y, torch.tensor(ts), eps)
    out["loss"].backward()
    gated = [(n, 3, 32, 32)] * bool(n)
    # DINOv2: REPA's targets too
    assert loss_fn.lpips.calls == gated and loss_fn.dino.calls == [(4, 3, 32, 32)] + gated
    assert torch.isfinite(out["loss"])
    assert bool(out["lpips"]) == bool(out["pdino"]) == bool(n)  # zero when none is gated


def test_compiled_nets_make_no_new_graph_for_another_gated_count(compiled):
    d, lp = small_random_nets(True, True)
    [net.eval().requires_grad_(False).compile() for net in (d, lp)]
    loss_fn, model, (x, y, eps) = pg.PixelGenLoss(64, d, lp, repa_layer=2), tiny_jit(), batch()
    counts = []
    for n in (3, 1, 2, 4):  # gated samples
        t = torch.tensor([0.5] * n + [0.1] * (4 - n))
        loss_of(loss_fn, model, x, y, t, eps)["loss"].backward()
        counts.append(len(compiled))
    assert counts == counts[:1] * 4, counts


def test_lpips_resize_rule_when_patch_is_not_16():
    model, loss_fn, (x, y, eps) = tiny_jit(patch_size=8), make_loss(patch_size=8), batch(2)
    out = loss_of(loss_fn, model, x, y, torch.tensor([0.5, 0.9]), eps)
    assert loss_fn.lpips.calls == [(2, 3, 64, 64)]  # H * 16 // patch
    assert out["repa"] > 0  # DINO's tokens, (32/8)^2 = 16, align with the model's


def test_adaptive_perceptual_weight(monkeypatch):
    model, (x, y, eps), t = randomize(tiny_jit()), batch(), torch.tensor([0.5, 0.6, 0.2, 0.8])
    loss_fn = make_loss(adaptive_from=100)
    assert [loss_fn.adapt_due(s) for s in (50, 99, 100, 125, 150)] == [0, 0, 1, 0, 1]
    assert not make_loss(adaptive_from=0, lpips_weight=0, pdino_weight=0).adapt_due(0)
    # averaged with another process's w = 7
    monkeypatch.setattr(pg.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(pg.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(pg.dist, "all_reduce", lambda w: w.add_(7))
    out = loss_of(loss_fn, model, x, y, t, eps, adapt=True)
    W = model.final_layer.linear.weight  # by hand: grad_W of fm, and of fm + the perceptual terms
    grad = lambda **kw: torch.autograd.grad(
        loss_of(make_loss(repa_weight=0, **kw), model, x, y, t, eps)["loss"], W)[0]
    g_fm = grad(lpips_weight=0, pdino_weight=0)
    want = 0.8 + 0.2 * ((g_fm.norm() / ((grad() - g_fm).norm() + 1e-4)).clamp(0, 100) + 7) / 2
    torch.testing.assert_close(loss_fn.w_ad, want, rtol=1e-4, atol=0)
    perc = 0.1 * out["lpips"] + 0.01 * out["pdino"]
    torch.testing.assert_close(out["loss"], out["fm"] + want * perc + 0.5 * out["repa"])


def test_bf16_autocast_objective_close_to_fp32():
    # measured over 4 seeds: |bf16 - fp32| / fp32 <= 4.1e-3 (LPIPS; the others 2.2e-4), gradient
    # cosine >= 0.9996; bounds with a 5-10x margin. The terms come out in fp32.
    model, loss_fn, (x, y, eps) = randomize(tiny_jit()), make_loss(), batch()
    t = torch.tensor([0.1, 0.5, 0.29, 0.9])
    outs, grads = [], []
    for bf16 in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            outs.append(loss_of(loss_fn, model, x, y, t, eps))
        outs[-1]["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (ref, out), (g_ref, g) = outs, grads
    for k in ref:
        rtol = 2e-2 if k == "lpips" else 2e-3
        assert out[k].dtype == torch.float32 and 0 < abs(out[k] - ref[k]) <= rtol * ref[k], k
    for n in g:
        assert F.cosine_similarity(g[n].flatten(), g_ref[n].flatten(), dim=0) > 0.99, n


# --------------------------------------------------------------------------------------------------
# Samplers

class Fn(nn.Module):  # x_hat = f(x, t (B, 1, 1, 1), y); counts its calls and rows
    num_classes = 2

    def __init__(self, f):
        super().__init__()
        self.f, self.calls, self.rows = f, 0, 0

    def forward(self, x, t, y):
        self.calls, self.rows = self.calls + 1, self.rows + len(x)
        return self.f(x, t.view(-1, 1, 1, 1), y)


@pytest.mark.parametrize("sampler", ["heun", "euler"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_perfect_predictor_and_linear_velocity_closed_forms(sampler, shift):
    x0, p, q = torch.randn(3, 2, 3, 4, 4)
    y = torch.tensor([1, 0])
    out = pg.sample(Fn(lambda x, t, y: p[y]), x0, y, 7, sampler, time_shift=shift)
    torch.testing.assert_close(out, p[y])  # x_hat = the one image of each class: lands on it
    # v = p + q t: Heun is exact but on its last (Euler) step; Euler loses q h^2 / 2 on each step h
    m = Fn(lambda x, t, y: x + (1 - t) * (p + q * t))
    h = pg.time_grid(7, shift).diff()[-1 if sampler == "heun" else 0:]
    out = pg.sample(m, x0, y, 7, sampler, time_shift=shift)
    torch.testing.assert_close(out, x0 + p + q / 2 - q * (h ** 2).sum() / 2)


def test_cfg_in_v_space_hand_written():
    targets = torch.randn(3, 3, 4, 4)  # class 0, class 1, null (2)
    noise, y, w = torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), 3.0
    x, ts = noise, pg.time_grid(2, 1.0)  # 0, 0.5, 1
    for i in range(2):  # Euler by hand; guidance only while 0.1 < t <= 0.5, i.e. at t = 0.5 only
        t = ts[i]
        v_c, v_u = (targets[y] - x) / (1 - t), (targets[2] - x) / (1 - t)
        x = x + (v_u + w * (v_c - v_u) if 0.1 < t <= 0.5 else v_c) * (ts[i + 1] - t)
    m = Fn(lambda x, t, y: targets[y])
    out = pg.sample(m, noise, y, 2, "euler", cfg_scale=w, cfg_interval=(0.1, 0.5), time_shift=1.0)
    torch.testing.assert_close(out, x)
    assert m.rows == 2 + 4  # t = 0: conditional only; t = 0.5: both branches


@pytest.mark.parametrize("sampler, calls", [("heun", 2 * 25 - 1), ("euler", 25)])
def test_rows_unguided_are_half_the_official_guided_double_in_the_interval(sampler, calls):
    # The official samplers always run 2 B rows. T2I: 25 steps, shift 3, CFG 4
    B, N, ts = 3, 25, pg.time_grid(25, 3.0)
    noise, y = torch.randn(B, 3, 4, 4), torch.zeros(B, dtype=torch.long)
    for w, lo, hi in [(1, 0, 1), (4, 0, 1), (4, 0.1, 0.9), (4, *ts[[2, 5]].tolist())]:
        m = Fn(lambda x, t, y: x * t)
        pg.sample(m, noise, y, N, sampler, cfg_scale=w, cfg_interval=(lo, hi), time_shift=3.0)
        steps = [lo < t <= hi and w != 1 for t in ts[:N]]  # Heun's corrector: as its step
        guided = sum(steps) + (sum(steps[:-1]) if sampler == "heun" else 0)
        assert m.calls == calls and m.rows == B * (calls + guided)


def test_unknown_sampler_is_rejected_before_it_runs():
    m = Fn(lambda x, t, y: x)
    with pytest.raises(ValueError, match="unknown sampler 'Heun'; expected one of heun, euler"):
        pg.sample(m, torch.randn(1, 3, 4, 4), torch.zeros(1, dtype=torch.long), 2, "Heun")
    assert m.rows == 0


# ===============================================================================================================
# Engineering
# ---------------------------------------------------------------------------------------------------------------
# Config and CLI

def _write_ckpt(path, emas=("0.99",), step=1, **config):
    """A checkpoint of ours: a random PixelGen-T/16 of 10 classes at 32 px, which is also every
    EMA; config adds settings of the run. Returns the model."""
    model = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10))
    sd, conf = model.state_dict(), dict(model="PixelGen-T/16", image_size=32, num_classes=10)
    conf.update(config)
    torch.save(dict(model=sd, emas={d: sd for d in emas}, step=step, config=conf), path)
    return model


def test_cli_flags_recipes_and_errors(tmp_path, capsys, monkeypatch):
    d = str(tmp_path)
    flags = ["--train", "--no-resume", "--flip", "--ema", "0.9", "0.99", "--lr", "2e-4"]
    cfg, mode, given = pg.parse_args(flags)
    assert (mode, cfg.recipe, cfg.model, cfg.batch_size) == ("train", "demo", "PixelGen-T/16", 16)
    assert (cfg.resume, cfg.flip, cfg.ema, cfg.lr) == (False, True, (0.9, 0.99), 2e-4)
    assert given == {"resume", "flip", "ema", "lr"}
    cfg = pg.parse_args(["--sample", "--data_path", d, "--recipe", "l-200k", "--time_shift", "3",
                         "--cfg_interval", "0", "1", "--background", "0", "0", "0"])[0]
    assert (cfg.model, cfg.sampler, cfg.time_shift) == ("PixelGen-L/16", "euler", 3.0)
    assert (cfg.cfg_interval, cfg.background) == ((0.0, 1.0), (0, 0, 0))
    assert pg.parse_args(["--train", "--data_path", d])[0].recipe == "xl-80ep"  # auto
    for f, n in [([], 500), (["--max_steps", "9"], 9)]:  # flags win over the recipe
        assert pg.parse_args(["--train"] + f)[0].max_steps == n
    monkeypatch.setenv("WORLD_SIZE", "2")
    for bad, msg in [(["--model", "X"], "invalid choice"), (["--nope"], "unrecognized"),
                     (["--background", "255"], "expected 3"),
                     (["--batch_size", "-2"], "--batch_size must be positive"),
                     (["--keep_every", "-1"], "--keep_every must be 0 or more"),
                     (["--batch_size", "6", "--grad_accum", "2"],
                      "--batch_size 6 is not a multiple of 2 processes x --grad_accum 2"),
                     (["--image_size", "60"], "--image_size 60 is not a multiple of the patch"),
                     (["--vgg_path", d + "/x"], f"--vgg_path {d}/x: no such file or folder"),
                     (["--ema", "0.9", "1"], "--ema and --ema_decay take decays in [0, 1)")]:
        with pytest.raises(SystemExit):
            pg.parse_args(["--train"] + bad)
        err = capsys.readouterr().err
        assert msg in err and err.count("error:") == 1, (bad, err)
    assert pg.parse_args(["--sample", "--batch_size", "7"])[0].batch_size == 7  # needs no split
    with pytest.raises(SystemExit):
        pg.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--flip, --no-flip False" in out and "--gate_t GATE_T 0.3" in out
    assert "Each flag is a field of Config" in out


# ---------------------------------------------------------------------------------------------------------------
# Pretrained weights

def test_missing_weights_stop_a_run_and_the_offline_demo_trains_fm_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: 1 / 0)  # offline
    files = [f"{f}: download {u} and put it in {tmp_path}/checkpoints" for f, u in [
        (dino.WEIGHTS_FILE, dino.WEIGHTS_URL), (pg.VGG_FILE, pg.VGG_URL),
        (fid.FID_WEIGHTS_FILE, fid.FID_WEIGHTS_URL)]]
    cfg = pg.Config(perceptual_init="pretrained", eval_every=10, fid_ref="ref.npz")
    with pytest.raises(SystemExit) as e:  # a run on data: every missing file in one message
        pg.perceptual_nets(pg.dataclasses.replace(cfg, data_path=str(tmp_path)), pg.Procs(), print)
    assert all(f in str(e.value) for f in files)
    msgs = []  # the demo trains L_FM alone (not with random nets) and says once what to fetch
    cfg, d, lp = pg.perceptual_nets(cfg, pg.Procs(), msgs.append)
    assert (cfg.lpips_weight, cfg.pdino_weight, cfg.repa_weight, d, lp) == (0, 0, 0, None, None)
    assert len(msgs) == 1 and "\n" not in msgs[0] and all(f in msgs[0] for f in files)


def test_weight_files_local_rank_0_looks_up_first(monkeypatch):
    seen = []

    class Procs(pg.Procs):  # one process as local rank 0 or 1; a round is a collective
        def all_or_none(self, fn):
            seen.append("round")
            return fn()
    monkeypatch.setattr(dino, "hub_file", lambda path, name, url: seen.append(name) or name)
    for rank, want in [(0, ["round", pg.VGG_FILE, "round"]), (1, ["round", "round", pg.VGG_FILE])]:
        seen.clear()
        assert pg.weight_files(pg.Config(), Procs(local_rank=rank), ["vgg"]) == {"vgg": pg.VGG_FILE}
        assert seen == want


def test_lpips_loads_a_torchvision_vgg16_file(tmp_path, monkeypatch):
    import torchvision
    with torch.device("meta"):  # torchvision's layout, random values
        vgg = torchvision.models.vgg16().features
    init = lambda f: lambda m: [f(p) for p in m.parameters(False)]
    vgg.to_empty(device="cpu").apply(init(nn.init.normal_))
    torch.save({"features." + k: v for k, v in vgg.state_dict().items()}, tmp_path / "vgg.pth")
    # lpips' own VGG16: zeros (torchvision's random init takes seconds)
    blank = pg.argparse.Namespace(features=copy.deepcopy(vgg).apply(init(nn.init.zeros_)))
    monkeypatch.setattr(torchvision.models, "vgg16", lambda **_: blank)
    lp = pg.make_lpips(str(tmp_path / "vgg.pth"))
    assert same(list(lp.net.state_dict().values()), list(vgg.state_dict().values()))
    (tmp_path / "bad.pth").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match=f"bad.pth is not {pg.VGG_FILE}"):
        pg.make_lpips(str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------------------------------------------------
# Data

def folder(root, size=16, background=(255, 255, 255)):
    return pg.ImageFolderData(str(root), size, background, pg.Procs())


def test_read_image_composites_alpha(tmp_path):
    px = np.array([[[10, 100, 200, 128], [10, 100, 200, 0], [10, 100, 200, 255]]], np.uint8)
    Image.fromarray(px).save(tmp_path / "rgba.png")
    p = Image.fromarray(np.array([[0, 1, 2]], np.uint8), "P")
    p.putpalette([10, 100, 200] * 3)
    p.save(tmp_path / "p.png", transparency=bytes([128, 0, 255]))  # a palette with alphas (tRNS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning about transparency either
        read = [fid.read_image(tmp_path / f).tolist() for f in ("rgba.png", "p.png")]
    # by hand: round((128 * 10 + 127 * 255) / 255) = 132, ...
    assert read == [[[[132, 177, 227], [255] * 3, [10, 100, 200]]]] * 2
    with pytest.raises(ValueError, match="background"):
        fid.read_image(tmp_path / "p.png", background=(0, 0, 256))


def test_image_folder_layout_and_listing(tmp_path, monkeypatch):
    root = tmp_path / "icons"
    for d in ("cats/.cache", "dogs/sub", ".thumbnails"):
        (root / d).mkdir(parents=True)
    for f in ("cats/a.png", "cats/b.PNG", "cats/.cache/c.png", "cats/._a.png", "dogs/sub/d.png",
              ".thumbnails/t.png", "stray.png"):
        Image.new("RGB", (12, 12)).save(root / f, "PNG")
    for f in ("dogs/notes.txt", "cats/.DS_Store", "readme"):
        (root / f).write_text("not an image")
    data = folder(root)
    want = (["cats", "dogs"], [2, 1], [0, 0, 1])
    assert (data.classes, data.counts, data.labels.tolist()) == want
    files = [str(root / f) for f in ("cats/a.png", "cats/b.PNG", "dogs/sub/d.png")]
    assert [os.fsdecode(p) for p in data.paths] == files
    assert pg.class_table(data).splitlines() == [
        "data: 3 images in 2 classes", " label   images  class", "     0        2  cats",
        "     1        1  dogs",
        "ignored: 7 (.thumbnails, readme, stray.png, cats/.cache/, cats/.DS_Store)"]
    flat = folder(root / "cats")  # a flat folder: one class, named after it
    assert (flat.classes, flat.counts, flat.ignored[1:]) == (["cats"], [2], ["cats/.DS_Store",
                                                                             "cats/._a.png"])
    # Under torchrun rank 0 alone lists the folder (minutes for ImageNet) and sends it
    listing = pg.list_folder(str(root))
    monkeypatch.setattr(pg.dist, "broadcast_object_list", lambda box, **_: box.insert(0, listing))
    monkeypatch.setattr(pg, "list_folder", lambda root: pytest.fail("rank 1 listed the folder"))
    rank1 = pg.ImageFolderData(str(root), 16, (0, 0, 0), pg.Procs(True, 1, 2))
    assert (rank1.classes, rank1.counts, rank1.labels.tolist()) == want


def test_image_folder_items_and_unreadable_images(tmp_path):
    for d in "ab":
        (tmp_path / d).mkdir()
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), np.uint8))
    for f, im in [("a/x.JPEG", rgb), ("a/grey.JPEG", rgb.convert("L")),
                  ("b/cmyk.jpg", rgb.convert("CMYK")), ("b/palette.png", rgb.convert("P")),
                  ("b/tiny.bmp", rgb.crop((0, 0, 7, 5)))]:  # (tiny: upsampled)
        im.save(tmp_path / f)
    data = folder(tmp_path)
    for i in range(5):  # PIL's conversion to RGB, then the ADM crop
        with Image.open(os.fsdecode(data.paths[i])) as im:
            want = torch.from_numpy(pg.center_crop(im.convert("RGB"), 16).copy()).permute(2, 0, 1)
        assert data[i][0].dtype == torch.uint8 and torch.equal(data[i][0], want)
        assert data[i][1] == int(i > 1)
    # on the background: round(128 * 10 / 255) = 5, ...
    Image.new("RGBA", (40, 40), (10, 100, 200, 128)).save(tmp_path / "a" / "y.png")
    assert folder(tmp_path / "a", 16, (0, 0, 0))[2][0][:, 8, 8].tolist() == [5, 50, 100]
    # An unreadable image: its item says why; a readable one of its batch replaces it; the log says
    bad = tmp_path / "b" / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    why = f"{bad} (cannot identify image file '{bad}')"
    item = folder(tmp_path / "b")[0]
    assert item == why
    x, y, skipped = pg.collate([data[0], item])
    assert torch.equal(x[0], x[1]) and skipped == [why]
    meter = pg.Meter()
    meter.add(dict.fromkeys(meter.TERMS, torch.ones(())), skipped, 0.5)
    line = meter.report(1, 2, small_cfg(tmp_path), pg.Procs(), 1.0, 0.5)[0]
    assert line.endswith(f"\nskipped an unreadable image: {why}")


def test_data_that_cannot_train_says_what_to_do(tmp_path, monkeypatch):
    for d in ("birds", "empty", "vector"):
        (tmp_path / d).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "birds" / "a.png")
    (tmp_path / "vector" / "a.svg").write_text("<svg/>")
    (tmp_path / "empty" / "a.bmp").mkdir()  # a folder named like an image is not one
    with pytest.raises(SystemExit, match=r"no image files in empty, vector of "):
        folder(tmp_path)
    with pytest.raises(SystemExit, match="a.png is not a folder"):
        folder(tmp_path / "birds" / "a.png")
    # Too few images: the user's command with the largest batch that fits
    argv = ["pixelgen.py", "--train", "--data_path", "D", "--out_dir", "O", "--batch_size", "64"]
    monkeypatch.setattr(sys, "argv", argv)
    for world, fits in [(4, "; try python pixelgen.py --train --data_path D --out_dir O "
                            "--batch_size 8"), (8, "")]:
        with pytest.raises(SystemExit) as e:
            pg.check_run(pg.Config(batch_size=64, grad_accum=2), pg.ToyShapes(8, n=10),
                         pg.Procs(world=world), {})
        assert str(e.value) == ("error: 10 images are fewer than one global batch "
                                "(--batch_size 64)" + fits)


def test_adm_center_crop():
    blocks = np.random.default_rng(0).integers(0, 256, (16, 24, 3), np.uint8)
    a = np.kron(blocks, np.ones((4, 4, 1), np.uint8))  # 64x96, halved twice (BOX): the blocks
    assert np.array_equal(pg.center_crop(Image.fromarray(a), 16), blocks[:, 4:20])  # the centre
    assert pg.center_crop(Image.fromarray(a[:10, :20]), 32).shape == (32, 32, 3)  # upsampled


def test_global_batches_positions():
    it = pg.global_batches(26, 8, 1, 0, 1, seed=5)
    steps = [next(it) for _ in range(5)]  # epoch 0: steps 0-2 (26 // 8), the tail left out
    epoch = sum(steps[:3], [])
    assert len(set(epoch)) == 24 and set(steps[3]).isdisjoint(steps[4])  # permutations
    assert sorted(steps[3]) != sorted(epoch[:8])  # epoch 1: a new one
    for world, accum in [(1, 2), (2, 1), (2, 2)]:  # any split, resumed at step 2: the same batches
        its = [pg.global_batches(26, 8, world, r, accum, seed=5, step=2) for r in range(world)]
        for s in (2, 3, 4):
            parts = [next(it) for it in its for _ in range(accum)]
            assert sum(parts, []) == steps[s] and {len(p) for p in parts} == {8 // (world * accum)}


# ---------------------------------------------------------------------------------------------------------------
# Training in one process: the step, resume, checkpoints, signals, logs, EMAs, compilation

def _split_step(cfg, world, rank, K, model_seed=0):
    """What the loss receives in one train_step of the process (rank, world) with K micro-batches: per micro-batch the
    images (flipped or not) and the Draws. A simulated split: no process group is needed to slice the global batch."""
    seen = []

    class Spy(pg.DenoiserAndLoss):
        def forward(self, x, y, draws, adapt=False):
            seen.append((x, draws))
            zero = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0
            return dict(loss=zero, **{k: zero.detach() for k in ("fm", "lpips", "pdino", "repa")})

    torch.manual_seed(model_seed)
    model = tiny_jit()
    net = Spy(model, pg.PixelGenLoss(64, None, None, lpips_weight=0, pdino_weight=0, repa_weight=0))
    imgs = torch.randint(0, 256, (cfg.batch_size, 3, 32, 32), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    b, first = cfg.batch_size // (world * K), rank * (cfg.batch_size // world)
    batches = iter([(imgs[first + k * b: first + (k + 1) * b], torch.zeros(b, dtype=torch.long), []) for k in range(K)])
    pg.train_step(net, torch.optim.SGD(model.parameters(), lr=0.0), {0.9: copy.deepcopy(model)}, batches,
                  step=7, cfg=pg.dataclasses.replace(cfg, grad_accum=K), procs=pg.Procs(False, rank, world,
                  torch.device("cpu")), meter=pg.Meter())
    return imgs, seen


def test_each_sample_draws_from_seed_step_and_position_for_any_split():
    """A sample's t, noise, label dropout and flip are functions of (seed, step, position in the global batch), and the
    loss normalisers (B, G) are the global batch's: the same for any split over processes and micro-batches."""
    cfg = small_cfg("unused", batch_size=8, flip=True, label_dropout=0.5)
    gen = torch.Generator().manual_seed(pg.seed_for(cfg.seed, 7))  # the rule by hand, for step 7
    t = pg.sample_t(8, -0.8, 0.8, gen)
    drop, flip = torch.rand(8, generator=gen) < 0.5, torch.rand(8, generator=gen) < 0.5
    eps = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(pg.seed_for(cfg.seed, 7, i)))
                       for i in range(8)])
    for world, K in [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2)]:
        got = [s for r in range(world) for s in _split_step(cfg, world, r, K)[1]]
        imgs = _split_step(cfg, 1, 0, 1)[0].float() / 127.5 - 1
        x = torch.cat([x for x, _ in got])
        assert torch.equal(x, torch.where(flip.view(-1, 1, 1, 1), imgs.flip(-1), imgs)), (world, K)
        for k, want in dict(t=t, eps=eps, drop=drop).items():
            assert torch.equal(torch.cat([getattr(d, k) for _, d in got]), want), (world, K, k)
        gated = torch.cat([d.gated + i * len(d.t) for i, (_, d) in enumerate(got)])
        assert torch.equal(gated, (t >= 0.3).nonzero()[:, 0]) and {(d.B, d.G) for _, d in got} == {(8, len(gated))}
    assert 0 < drop.sum() < 8 and 0 < flip.sum() < 8 and 0 < len(gated) < 8  # every kind of sample occurs


def test_dropout_masks_follow_the_split_other_draws_do_not(tmp_path, monkeypatch):
    """The claim of the README: any split trains the same weights to float rounding when the model has no dropout
    (every preset but PixelGen-XL/16: the two-process test below); with dropout the masks depend on the split (they
    are seeded by process and micro-batch), and the same split gives the same run."""
    monkeypatch.setitem(pg.MODELS, "drop", dict(pg.MODELS["PixelGen-T/16"], proj_drop=0.5))
    run = lambda name, K: pg.train(small_cfg(tmp_path / name, model="drop", repa_layer=2, max_steps=1,
                                             grad_accum=K))[0]
    one, two, again = (torch.cat([p.detach().flatten() for p in run(n, K).parameters()])
                       for n, K in (("one", 1), ("two", 2), ("again", 2)))
    assert torch.equal(two, again) and (one - two).abs().max() > 1e-5


def test_one_tf32_api_so_full_fp32_can_read_the_flags():
    saved = torch.backends.cuda.matmul.fp32_precision
    try:
        pg.setup_dist(pg.Config(device="cpu"))
        with fid.full_fp32():
            assert torch.backends.cuda.matmul.allow_tf32 is False  # raises where the two APIs are mixed
    finally:
        torch.backends.cuda.matmul.fp32_precision = saved


def test_the_training_step_waits_for_nothing_on_the_device(monkeypatch):
    """Between log steps a training step makes no blocking host-to-device copy and reads nothing back from the device.
    Its device is the meta device here (no data: any read fails), under modes that record every copy between devices
    without non_blocking, every host tensor made from device data, and device tensors made from host data; and the
    training net (DDP's input) gets device tensors only, which DDP passes on without a copy."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    aten, syncs, inputs = torch.ops.aten, [], []

    class Copies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (aten._to_copy.default, aten.copy_.default):
                to_copy = func is aten._to_copy.default
                src, dst = (args[0], kwargs.get("device")) if to_copy else (args[1], args[0].device)
                blocking = not kwargs.get("non_blocking", len(args) > 2 and args[2])
                to_host = dst is not None and torch.device(dst).type == "cpu"
                if dst is not None and torch.device(dst) != src.device and (blocking or to_host):
                    syncs.append(f"{func}: {src.device} -> {dst}")
            elif func in (aten._local_scalar_dense.default, aten.nonzero.default) and args[0].device.type != "cpu":
                syncs.append(str(func))
            return func(*args, **kwargs)

    class Factories(TorchFunctionMode):  # torch.tensor(data, device=...) copies below the dispatcher
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu").type != "cpu":
                syncs.append(f"{func.__name__}(..., device={kwargs['device']})")
            return func(*args, **kwargs)

    class Net(pg.DenoiserAndLoss):
        def forward(self, *args, **kwargs):
            inputs.extend(a for a in flat(list(args) + list(kwargs.values())) if torch.is_tensor(a))
            return super().forward(*args, **kwargs)

    meta, cfg = torch.device("meta"), small_cfg("unused", batch_size=4, grad_accum=2, flip=True)
    monkeypatch.setattr(pg, "seeded_noise", lambda shape, seeds, device: torch.randn(len(seeds), *shape, device=device))
    model, emas, loss_fn, opt = pg.build(cfg, meta, log=lambda m: None)  # (meta has no generators to seed)
    batches = iter([(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), [])] * 2)
    meter = pg.Meter()
    with Copies(), Factories():
        pg.train_step(Net(model, loss_fn), opt, emas, batches, 0, cfg, pg.Procs(False, 0, 1, meta), meter)
    assert syncs == [] and meter.sums.device == meta and len(inputs) == 2 * 6
    assert all(u.device == meta for u in inputs)


def test_the_meter_keeps_no_autograd_graph_and_a_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    meters, Meter = [], pg.Meter
    monkeypatch.setattr(pg, "Meter", type("Meter", (Meter,), {"__init__": lambda self: meters.append(self) or
                                                               Meter.__init__(self)}))
    pg.train(small_cfg(tmp_path, max_steps=2, log_every=2), hook=lambda step, model, emas: meters[0].sums.grad_fn
             and pytest.fail(f"the meter holds the graph of step {step}"))
    assert meters and meters[0].steps == 0  # read and reset at the log step
    good = (tmp_path / "ckpt.pt").read_bytes()
    forward = pg.PixelGenLoss.forward

    def poisoned(self, *a, **k):
        out = forward(self, *a, **k)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(pg.PixelGenLoss, "forward", poisoned)
    with pytest.raises(SystemExit, match="non-finite loss at step 3"):
        pg.train(small_cfg(tmp_path, max_steps=4))
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_failed_checkpoint_write_names_the_cause_and_keeps_the_last_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    pg.save_checkpoint({"step": 1}, path)
    with monkeypatch.context() as m:  # the job is killed while writing
        m.setattr(torch, "save", lambda obj, f: (open(f, "wb").write(b"PK\x03\x04 half"), (_ for _ in ()).throw(
            KeyboardInterrupt()))[1])
        with pytest.raises(KeyboardInterrupt):
            pg.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and not os.path.exists(path + ".tmp")

    def disk_full(obj, f):  # what torch.save raises when the disk fills up mid-write
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4096 vs 4000")

    pg.train(small_cfg(tmp_path / "run", max_steps=1))
    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        with pytest.raises(SystemExit, match=r"writing .*ckpt.pt failed: \[enforce fail(.|\n)*GiB are free(.|\n)*"
                                             r"last good checkpoint .*ckpt.pt is intact"):  # the run stops
            pg.train(small_cfg(tmp_path / "run", max_steps=2))
    assert not (tmp_path / "run" / "ckpt.pt.tmp").exists() and ckpt(tmp_path / "run" / "ckpt.pt")["step"] == 1


def test_compiled_runs_survive_the_adaptive_weight_from_scratch_and_after_a_resume(tmp_path, monkeypatch, compiled):
    """w_ad backpropagates twice through the compiled graphs (retain_graph), which a compiled backward built with
    donated buffers refuses: the 160-epoch recipe must run compiled, also within 50 steps after a resume."""
    import torch._functorch.config
    monkeypatch.setattr(pg.PixelGenLoss, "adapt_every", 2)  # (official: 50)
    monkeypatch.setitem(pg.MODELS, "tiny", dict(depth=2, hidden_size=64, num_heads=4, bottleneck_dim=16,
                                                 in_context_len=2, in_context_start=1))  # less to trace
    kw = dict(compile=True, adaptive_from=1, keep_every=1, lpips_weight=0.0, model="tiny", repa_layer=1)
    with torch._functorch.config.patch(donated_buffer=True):  # torch's default, whatever ran before
        pg.train(small_cfg(tmp_path / "scratch", max_steps=3, **kw))  # steps 0 and 1 plain, step 2 adapts
    (tmp_path / "resumed").mkdir()
    os.link(tmp_path / "scratch" / "ckpt_0000001.pt", tmp_path / "resumed" / "ckpt.pt")
    with torch._functorch.config.patch(donated_buffer=True):
        pg.train(small_cfg(tmp_path / "resumed", max_steps=3, **kw))  # resumed at step 1, not a multiple of 2
    for run in ("scratch", "resumed"):
        ck = ckpt(tmp_path / run / "ckpt.pt")
        assert ck["step"] == 3 and ck["loss"]["percept_weight"] != 1 and torch.isfinite(ck["loss"]["percept_weight"])
    assert any("ls1" in gm.code for gm in compiled)  # DINOv2 (its LayerScale) ran compiled too


def test_stop_signals_are_idempotent_and_a_second_ctrl_c_exits_at_once(tmp_path, monkeypatch, capsys):
    """SLURM signals every process of a job step and torchrun forwards its own: a repeated SIGTERM or SIGUSR1 while a
    stop is pending must not end the process before it saves. A second Ctrl-C does, in one line."""
    class Exited(Exception):
        pass

    monkeypatch.setattr(os, "_exit", lambda code: (_ for _ in ()).throw(Exited(code)))
    pg.save_checkpoint({"step": 7}, str(tmp_path / "ckpt.pt"))
    term = signal.getsignal(signal.SIGTERM)
    with pg.stop_signals(str(tmp_path)) as received:
        for sig in (signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            os.kill(os.getpid(), sig)  # none of these ends the process
        assert received[0] == "SIGTERM"
        with pytest.raises(Exited, match="130"):
            os.kill(os.getpid(), signal.SIGINT)
    assert capsys.readouterr().err.strip() == f"forced exit by a second Ctrl-C; the last checkpoint is " \
                                              f"{tmp_path}/ckpt.pt, at step 7"
    assert signal.getsignal(signal.SIGTERM) == term  # every handler is back after the block


def test_sigterm_stops_after_the_step_and_resumes_exactly(tmp_path):
    proc = subprocess.Popen(_cli("--train", "--out_dir", str(tmp_path / "run"), "--image_size", "32", "--batch_size",
                                 "4", "--perceptual_init", "random", "--log_every", "1", "--sample_every", "0",
                                 "--device", "cpu", "--max_steps", "1000", "--ckpt_every", "1000", "--ema", "0.9",
                                 "0.5"),
                            env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())),  # as in here
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = tmp_path / "run" / "log.txt"
    deadline = time.time() + 120
    while not (log.exists() and "step 2/" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # SLURM's, then torchrun's forwarded copy 10 ms later
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    stopped = ckpt(tmp_path / "run" / "ckpt.pt")["step"]
    assert 2 <= stopped < 1000 and f"stopped by SIGTERM after step {stopped}" in log.read_text()
    assert not (tmp_path / "run" / "ckpt.pt.tmp").exists()
    for run in ("run", "straight"):  # the restart, and a run without a stop
        pg.train(small_cfg(tmp_path / run, max_steps=stopped + 2, ckpt_every=1000, ema=(0.9, 0.5)))
    a, b = (ckpt(tmp_path / d / "ckpt.pt") for d in ("run", "straight"))
    for k in ("model", "ema", "emas", "loss", "opt"):
        assert same(a[k], b[k]), k
    assert not same(a["model"], a["ema"]) and f"resumed from {tmp_path}/run/ckpt.pt at step {stopped}" in \
        log.read_text()
    rows = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, stopped + 3))  # appended on resume


def test_snapshots_metrics_wandb_and_sampling_from_a_snapshot(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: the run stops before it writes anything
    with pytest.raises(ImportError, match="wandb"):
        pg.train(small_cfg(tmp_path / "x", max_steps=1, wandb="proj"))
    assert not (tmp_path / "x").exists()
    logged = []

    class Run:
        log = staticmethod(lambda row, step: logged.append((step, row)))
        finish = staticmethod(lambda: logged.append("finish"))

    fake = type(sys)("wandb")
    fake.init = lambda **kw: logged.append(kw) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for steps in (2, 4):  # a resumed run logs to the same wandb run
        pg.train(small_cfg(tmp_path, max_steps=steps, ckpt_every=3, keep_every=2, wandb="proj"))
    first, resumed = (x for x in logged if isinstance(x, dict) and "project" in x)
    assert first["project"] == "proj" and first["id"] == resumed["id"] and first["resume"] == "allow"
    assert [s for s, _ in logged[1:3]] == [1, 2] and logged[-1] == "finish"
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("ckpt")) == \
        ["ckpt.pt", "ckpt_0000002.pt", "ckpt_0000004.pt"]
    snap = torch.load(tmp_path / "ckpt_0000002.pt", weights_only=True)
    assert snap["step"] == 2 and not same(snap["model"], torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and logged[2][1] == rows[1]
    assert set(rows[0]) == {"step", "epoch", "loss", "fm", "lpips", "pdino", "repa", "gate", "w_ad", "lr", "img_per_s"}
    assert all(math.isfinite(r["loss"]) and 0 <= r["gate"] <= 1 for r in rows)
    cfg, _ = pg.parse_args(["--sample", "--ckpt", str(tmp_path / "ckpt_0000002.pt"), "--out_dir", str(tmp_path / "s"),
                            "--num_samples", "4", "--sample_steps", "2"])
    pg.sample_main(cfg)
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (4, 32, 32, 3)


def test_several_ema_decays_are_updated_saved_loaded_and_resumed_without_a_copy_in_memory(tmp_path, monkeypatch):
    """A resume copies the file into the run's tensors and lets it go: on a GPU its weights and EMAs (2.7 GB each for
    XL) would otherwise stay there for the whole run. (The SIGTERM test shows the resume exact.)"""
    decays = (0.9, 0.5)
    seen = []
    pg.train(small_cfg(tmp_path / "straight", max_steps=3, ema=decays),
             hook=lambda step, model, emas: seen.append(
                 {d: [p.clone() for p in e.parameters()] for d, e in emas.items()}
                 | {"model": [p.clone() for p in model.parameters()]}))
    for d in decays:  # each ema = d ema + (1 - d) model after every step, from the initial weights
        torch.manual_seed(1234)  # the run's seed: its initial weights
        want = [p.clone() for p in pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10).parameters()]
        for s in seen:
            want = [d * w + (1 - d) * m for w, m in zip(want, s["model"])]
            for w, e in zip(want, s[d]):
                torch.testing.assert_close(e, w, rtol=1e-5, atol=1e-6)
    ck = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    assert list(ck["emas"]) == ["0.9", "0.5"] and same(ck["ema"], ck["emas"]["0.9"])
    assert not same(ck["emas"]["0.9"], ck["emas"]["0.5"])
    models, _, _ = pg.load_denoiser(str(tmp_path / "straight" / "ckpt.pt"), decays=(0.5,))
    assert same(models[0.5].state_dict(), ck["emas"]["0.5"])
    loaded, load = [], torch.load

    def watched(*a, **k):  # weak references to the weights of every checkpoint loaded
        ck = load(*a, **k)
        loaded.extend(weakref.ref(v) for part in ("model", "ema", "emas") for v in flat(ck.get(part, {})))
        return ck

    monkeypatch.setattr(torch, "load", watched)
    held = []
    pg.train(small_cfg(tmp_path / "straight", max_steps=4, ema=(0.9, 0.5, 0.99)),  # a decay new to the run
             hook=lambda *a: (gc.collect(), held.append(sum(r() is not None for r in loaded))))
    assert len(loaded) > 100 and held == [0]
    assert "EMA 0.99 starts now" in (tmp_path / "straight" / "log.txt").read_text()


def test_a_resume_that_does_not_match_stops_with_what_differs_and_the_classes_follow_the_data(tmp_path):
    pg.train(small_cfg(tmp_path / "run", max_steps=2))
    before = {f: (tmp_path / "run" / f).read_bytes() for f in ("ckpt.pt", "log.txt", "metrics.jsonl")}
    with pytest.raises(SystemExit, match=r"ckpt.pt was written by another run: PixelGen-T/16 at 32 px with 10 "
                                         r"classes\. It differs in --model PixelGen-T/16 \(this run: PixelGen-S/16\)"
                                         r"\.\nUse another"):
        pg.train(small_cfg(tmp_path / "run", max_steps=4, model="PixelGen-S/16"))
    for c in ("apps", "devices", "places"):  # other data: 3 classes of 2 images
        (tmp_path / "icons" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(tmp_path / "icons" / c / f"{i}.png")
    with pytest.raises(SystemExit, match=r"its data: 10 classes \(red disc, green square, blue triangle, yellow ring, "
                                         r"\.\.\.\), 50000 images in toy shapes \(this run: 3 classes \(apps, devices, "
                                         r"places\), 6 images in .*icons; --new_data continues"):
        pg.train(small_cfg(tmp_path / "run", max_steps=4, data_path=str(tmp_path / "icons")))
    assert before == {f: (tmp_path / "run" / f).read_bytes() for f in before}  # a failed start touches nothing
    pg.train(small_cfg(tmp_path / "run", max_steps=3, data_path=str(tmp_path / "icons"), new_data=True))
    ck = ckpt(tmp_path / "run" / "ckpt.pt")  # fine-tuned on the icons, with the model's 10 class slots
    assert ck["step"] == 3 and ck["config"]["num_classes"] == 10 and ck["data"][1] == ["apps", "devices", "places"]
    run = lambda name, **kw: pg.train(small_cfg(tmp_path / name, data_path=str(tmp_path / "icons"), max_steps=1,
                                                num_workers=0, sample_every=1, num_samples=6, sample_steps=1, **kw))
    (tmp_path / "icons" / "apps" / "broken.png").write_bytes(b"\x89PNG truncated")
    model, _ = run("data", batch_size=7)  # the demo recipe's default is 0: the data's; every image in the step
    assert model.num_classes == 3 and ckpt(tmp_path / "data" / "ckpt.pt")["config"]["num_classes"] == 3
    log = (tmp_path / "data" / "log.txt").read_text()
    assert f"skipped an unreadable image: {tmp_path}/icons/apps/broken.png" in log
    assert Image.open(tmp_path / "data" / "grid_0000001.png").size == (3 * 34 + 2, 2 * 34 + 2)  # 3 columns
    assert run("more", num_classes=5)[0].num_classes == 5  # spare label rows are allowed (an ImageNet subset)
    with pytest.raises(SystemExit, match="the data has 3 classes but --num_classes is 2"):
        run("fewer", num_classes=2)


def test_a_failed_start_leaves_no_trace_and_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "file.png").write_bytes(b"")
    for kw, msg in [(dict(batch_size=100_000), r"50000 images are fewer than one global batch \(--batch_size 100000\)"),
                    (dict(data_path=str(tmp_path / "file.png")), "file.png is not a folder")]:
        with pytest.raises(SystemExit, match=msg):
            pg.train(small_cfg(tmp_path / "run", **kw))
        assert not (tmp_path / "run").exists()
    held = pg.hold_folder(str(tmp_path))  # as another run would
    with pytest.raises(SystemExit, match=rf"{tmp_path} is in use by another run \(process {os.getpid()} on "):
        pg.train(small_cfg(tmp_path, max_steps=1))
    assert not (tmp_path / "log.txt").exists()
    held.close()  # the OS lets go when that process ends, also when it crashed
    pg.hold_folder(str(tmp_path)).close()
    monkeypatch.setattr(pg, "build", lambda *a, **k: pytest.fail("built before the check"))
    (tmp_path / "icons" / "a").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "icons" / "a" / f"{i}.png")
    cfg, _ = pg.parse_args(["--train", "--data_path", str(tmp_path / "icons"), "--out_dir", str(tmp_path / "run"),
                            "--batch_size", "4"])  # the paper's recipe, on a machine without a GPU
    with pytest.raises(SystemExit, match=r"PixelGen-XL/16 at 256 px is a GPU run(.|\n)*python pixelgen\.py --train "
                                         rf"--recipe demo --data_path {tmp_path}/icons\n"):
        pg.train(cfg)
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(pg, "train_step", oom)
    with pytest.raises(SystemExit, match=r"out of GPU memory in a training step of PixelGen-T/16 at 32 px with micro-"
                                         r"batches of 2 images per GPU \(CUDA out of memory(.|\n)*--grad_accum 4"):
        pg.train(small_cfg(tmp_path / "oom", grad_accum=2))


def _cli(*args):  # a subprocess running pixelgen's CLI with the tests' small perceptual networks
    code = "import sys, test_pixelgen as T; T.pg.perceptual_nets = T.small_perceptual_nets; T.pg.main(sys.argv[1:])"
    return [sys.executable, "-c", code, *args]


# ---------------------------------------------------------------------------------------------------------------
# Training in two processes (gloo on CPU): one spawn runs every scenario, the tests below check one each

def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(rank, out, mp):  # the global batch of 8 over 2 processes, without and with 2 micro-batches
    for name, accum in (("ddp2", 1), ("ddp2_accum2", 2)):
        _next_port()
        weights = []
        pg.train(small_cfg(os.path.join(out, name), max_steps=2, batch_size=8, grad_accum=accum),
                 hook=lambda step, model, emas: weights.append(
                     torch.cat([p.detach().flatten() for p in model.parameters()])))
        torch.save(torch.stack(weights), os.path.join(out, f"{name}.rank{rank}.pt"))


def _grad(rank, out, mp):  # one backward through DDP on this rank's half of a fixed batch
    import torch.distributed as dist
    _next_port()
    dist.init_process_group("gloo")
    model, loss_fn, x, y, t, eps = _grad_setup()
    net, broadcasts = pg.wrap_ddp(pg.DenoiserAndLoss(model, loss_fn), pg.Procs(True, rank, 2, x.device)), []
    mp.setattr(dist, "_broadcast_coalesced", lambda *a, **k: broadcasts.append(1))  # buffers, before each forward
    half = slice(rank * 4, rank * 4 + 4)  # each rank's share of the global means; DDP averages, so x world
    draws = pg.make_draws(t[half], torch.zeros(4, dtype=torch.bool), eps[half], 0.3, norm=(8, int((t >= 0.3).sum())))
    (net(x[half], y[half], draws)["loss"] * 2).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert not broadcasts and all(g._base is not None for g in grads)  # no broadcast; gradients in the buckets
    torch.save([g.clone() for g in grads], os.path.join(out, f"grad{rank}.pt"))
    dist.destroy_process_group()


def _grad_setup():
    d, lp = small_perceptual_nets(small_cfg("unused"), torch.device("cpu"))  # the same (fixed) nets in every process
    torch.manual_seed(0)
    model = randomize(tiny_jit())
    loss_fn = pg.PixelGenLoss(64, d, lp, repa_layer=2, num_classes=10)
    x, y, eps = batch(8)
    t = torch.tensor([0.1, 0.5, 0.2, 0.2, 0.9, 0.35, 0.15, 0.4])  # one gated sample on rank 0, three on rank 1
    return model, loss_fn, x, y, t, eps


def _stop(rank, out, mp):  # only rank 1 is told to stop, during step 2
    _next_port()
    pg.train(small_cfg(out, max_steps=50, ckpt_every=1000), hook=lambda step, model, emas: rank == 1 and step == 2
             and os.kill(os.getpid(), signal.SIGUSR1))


def _late_stop(rank, out, mp):  # rank 1 is told to stop just after step 2's vote: all stop after step 3
    import torch.distributed as dist
    armed, all_reduce = [], dist.all_reduce

    def all_reduce_then_signal(tensor, op=dist.ReduceOp.SUM, group=None, **kw):
        work = all_reduce(tensor, op, group, **kw)
        if armed and op == dist.ReduceOp.MAX:  # the stop vote that follows the hook of step 2
            armed.clear()
            os.kill(os.getpid(), signal.SIGUSR1)
        return work

    mp.setattr(dist, "all_reduce", all_reduce_then_signal)
    _next_port()
    pg.train(small_cfg(out, max_steps=50, ckpt_every=1000),
             hook=lambda step, model, emas: rank == 1 and step == 2 and armed.append(1))


def _unshared(rank, out, mp):  # rank 1's --out_dir lies on its own node's disk, where rank 0's ckpt.pt is not
    for steps in (1, 2):
        _next_port()
        pg.train(small_cfg(out if rank == 0 else out + "_node1", max_steps=steps, ckpt_every=1))


def _eval_fails(rank, out, mp):  # failures on one process: its Inception, its metrics, its grid (an OOM, say)
    def fails_once(owner, name, on_rank):
        real, done = getattr(owner, name), []
        mp.setattr(owner, name, lambda *a, **k: real(*a, **k) if rank != on_rank or done else (
            done.append(1), (_ for _ in ()).throw(RuntimeError(f"{name} failed (a test)")))[1])

    _fake_network(mp)
    fails_once(fid, "inception_outputs", 1)  # step 1, rank 1: its images' Inception outputs (before the gather)
    fails_once(fid, "compute_metrics", 0)  # step 2, rank 0: the metrics (after it)
    fails_once(pg, "save_grid", 0)  # step 1: the grid, on rank 0 alone
    _next_port()
    root = os.path.dirname(out)
    pg.train(small_cfg(out, max_steps=3, eval_every=1, eval_samples=4, sample_steps=2, sample_every=1, num_samples=10,
                       fid_ref=os.path.join(root, "ref.npz"), fid_weights=os.path.join(root, "inception.pth")))


def _slow_save(rank, out, mp):  # rank 0 writes a checkpoint for longer than the process group's timeout
    import datetime
    import torch.distributed as dist
    mp.setattr(dist, "init_process_group", functools.partial(dist.init_process_group,
                                                             timeout=datetime.timedelta(seconds=1)))
    save, sleeps = pg.save_checkpoint, [2]  # the first write only: the one that steps follow
    mp.setattr(pg, "save_checkpoint", lambda *a: (time.sleep(sleeps.pop() if sleeps else 0), save(*a)))
    _next_port()
    pg.train(small_cfg(out, max_steps=3, ckpt_every=2))


def _sample_args(root, out, world):  # --sample of a sweep with every metric, 2 images per batch and process
    return ["--sample", "--ckpt", os.path.join(root, "ckpt.pt"), "--out_dir", out, "--num_samples", "8",
            "--batch_size", str(2 * world), "--sample_steps", "2", "--fid_ref", os.path.join(root, "ref.npz"),
            "--fid_weights", os.path.join(root, "inception.pth"), "--cfg_scale", "1", "2"]


def _eval_files(root):  # a small checkpoint, a reference batch and Inception weights, for both process counts
    _write_ckpt(os.path.join(root, "ckpt.pt"), emas=("0.9999",), step=0)
    _fid_files(root)


def _sample(rank, out, mp):  # --sample with a sweep and every metric, sharded over 2 processes
    _fake_network(mp)
    _next_port()
    pg.main(_sample_args(os.path.dirname(out), out, world=2))


SCENARIOS = dict(split=_split, grad=_grad, stop=_stop, late_stop=_late_stop, unshared=_unshared,
                 eval_fails=_eval_fails, slow_save=_slow_save, sample=_sample)
_PORTS = []


def _next_port():  # every process group of a scenario gets its own port, in the same order on both ranks
    os.environ["MASTER_PORT"] = str(_PORTS.pop(0))


def _two_process_worker(rank, root, ports):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    pg.perceptual_nets, _PORTS[:] = small_perceptual_nets, ports
    for name, scenario in SCENARIOS.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        try:
            t0 = time.time()
            with pytest.MonkeyPatch.context() as mp:
                scenario(rank, os.path.join(root, name), mp)
            open(os.path.join(root, f"{name}.rank{rank}.done"), "w").write(f"{time.time() - t0:.1f} s")
        except BaseException as e:  # noqa: B036 (SystemExit too): recorded for the test of this scenario
            open(os.path.join(root, f"{name}.rank{rank}.error"), "w").write(repr(e))
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


@pytest.fixture
def two_processes(tmp_path_factory):
    """Runs every scenario in one spawn of 2 processes (starting them costs more than most scenarios), once per test
    session: with pytest-xdist the first worker to get here runs it, the other waits for its results. A scenario
    that hangs (the failures these tests guard against) is killed after a while and reported by its test."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "two_processes"
    with open(f"{root}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not root.exists():
            root.mkdir()
            _eval_files(root)
            ctx = torch.multiprocessing.spawn(_two_process_worker, args=(str(root), [_free_port() for _ in range(20)]),
                                              nprocs=2, join=False)
            deadline = time.time() + 150
            try:
                while not ctx.join(timeout=2) and time.time() < deadline:
                    pass
            finally:
                for p in ctx.processes:
                    p.kill() if p.is_alive() else None
    return root


def _outcome(root, name):  # the scenario's folder, once both processes have finished it
    errors = [p.read_text() for p in root.glob(f"{name}.rank*.error")]
    assert not errors, errors
    assert all((root / f"{name}.rank{r}.done").exists() for r in (0, 1)), f"scenario {name} did not finish: a hang?"
    return root / name


def test_ddp_gradients_equal_one_process(two_processes):
    out = _outcome(two_processes, "grad")
    model, loss_fn, x, y, t, eps = _grad_setup()
    loss_of(loss_fn, model, x, y, t, eps)["loss"].backward()
    single = [p.grad for p in model.parameters() if p.requires_grad]
    for g0, g1, g in zip(torch.load(out / "grad0.pt"), torch.load(out / "grad1.pt"), single):
        torch.testing.assert_close(g0, g1)
        torch.testing.assert_close(g0, g, rtol=1e-4, atol=1e-6)


def test_any_split_of_the_global_batch_trains_the_same_weights(tmp_path, two_processes):
    out = _outcome(two_processes, "split")
    pg.train(small_cfg(tmp_path / "one", max_steps=2, batch_size=8))
    pg.train(small_cfg(tmp_path / "accum2", max_steps=2, batch_size=8, grad_accum=2))
    runs = dict(one=tmp_path / "one", accum2=tmp_path / "accum2", ddp2=out / "ddp2", ddp2_accum2=out / "ddp2_accum2")
    cks = {k: ckpt(d / "ckpt.pt") for k, d in runs.items()}
    rows = {k: [json.loads(line) for line in open(d / "metrics.jsonl")] for k, d in runs.items()}
    for k in runs:
        assert cks[k]["step"] == 2 and len(rows[k]) == 2
        for a, b in zip(rows["one"], rows[k]):  # every logged loss term of the global batch
            for term in ("loss", "fm", "lpips", "pdino", "repa", "gate"):
                assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-7), (k, term)
        for part in ("model", "ema", "loss"):  # 2 AdamW steps of lr 1e-3 move weights by up to 2e-3
            for n, v in cks["one"][part].items():
                torch.testing.assert_close(cks[k][part][n], v, rtol=0, atol=1e-4, msg=f"{k} {part} {n}")
    for name in ("ddp2", "ddp2_accum2"):  # both processes hold the same weights after every step
        w0, w1 = torch.load(out / f"{name}.rank0.pt"), torch.load(out / f"{name}.rank1.pt")
        assert w0.shape[0] == 2 and torch.equal(w0, w1) and not torch.equal(w0[0], w0[1])
    assert "global batch 8 = 2 processes x 2 micro-batches x 2" in (out / "ddp2_accum2" / "log.txt").read_text()


@pytest.mark.parametrize("name, step", [("stop", 2), ("late_stop", 3), ("slow_save", 3)])
def test_a_signal_or_a_slow_save_on_one_process_holds_all_at_the_same_step(two_processes, name, step):
    """A signal to one process stops all after the same step. The stop is decided once per step, from the vote: a
    signal that lands after it counts at the next vote (a process that acted on it alone would leave the others
    waiting in a collective, or skip the write it logs). Rank 0 writing for longer than the process group's timeout
    (NCCL's watchdog: 10 minutes; 1 s here) is waited for on the host, in the gloo group of long timeout, not in a
    collective of the training step."""
    out = _outcome(two_processes, name)
    log = (out / "log.txt").read_text()
    assert ckpt(out / "ckpt.pt")["step"] == step
    if name != "slow_save":
        assert f"stopped by a signal to another process after step {step}" in log and "saved" in log.splitlines()[-2]


def test_the_resume_is_decided_once_and_an_unshared_out_dir_stops_every_process(two_processes):
    errors = [(two_processes / f"unshared.rank{r}.error").read_text() for r in (0, 1)]
    assert all("--out_dir must be on storage that every node sees" in e for e in errors), errors
    assert ckpt(two_processes / "unshared" / "ckpt.pt")["step"] == 1  # the second run stopped before a step


def test_an_evaluation_or_grid_failing_on_one_process_is_skipped_by_all(two_processes):
    """Every cross-process step of an evaluation runs inside an agreement, so a failure on one process, before or
    after the gather, is one failure of the evaluation on all; a grid failing on rank 0 is logged the same way."""
    out = _outcome(two_processes, "eval_fails")
    log = (out / "log.txt").read_text()
    assert "evaluation at step 1 failed, training goes on: RuntimeError('it failed on process 1" in log
    assert "evaluation at step 2 failed, training goes on: RuntimeError('compute_metrics failed (a test)')" in log
    assert "sample grid at step 1 failed, training goes on: RuntimeError('save_grid failed (a test)')" in log
    assert "eval step 3 ema 0.99 cfg 2: FID " in log and (out / "grid_0000003.png").exists()  # then all is well
    assert ckpt(out / "ckpt.pt")["step"] == 3


def test_two_processes_sample_and_evaluate_as_one(tmp_path, two_processes, monkeypatch):
    """The images (sampled in batches of the same size) and their Inception outputs, gathered in image order, do not
    depend on the number of processes, and so neither does any metric."""
    out, threads = _outcome(two_processes, "sample"), torch.get_num_threads()
    _fake_network(monkeypatch)
    torch.set_num_threads(1)  # as each of the two processes: the same matmul kernels, the same rounding
    try:
        pg.main(_sample_args(str(two_processes), str(tmp_path), world=1))
    finally:
        torch.set_num_threads(threads)
    one, two = (json.load(open(d / "eval.json")) for d in (tmp_path, out))
    assert len(one) == len(two) == 2 and METRIC_KEYS <= set(one[0])
    assert [{k: r[k] for k in METRIC_KEYS} for r in one] == [{k: r[k] for k in METRIC_KEYS} for r in two]
    for setting in ("cfg1", "cfg2"):
        with np.load(tmp_path / f"samples_ema0.9999_{setting}.npz") as a, np.load(out / f"samples_ema0.9999_"
                                                                                  f"{setting}.npz") as b:
            assert np.array_equal(a["arr_0"], b["arr_0"])


# -------------------------------------------------------------------------------------------------
# Sampling and evaluation

METRIC_KEYS = set(fid.RESULTS)


def _fid_files(d):  # random FID Inception weights, an ADM reference batch of 6 images
    torch.save(fid.InceptionV3().state_dict(), f"{d}/inception.pth")
    ref = np.random.default_rng(3).integers(0, 256, (6, 32, 32, 3), np.uint8)
    np.savez(f"{d}/ref.npz", arr_0=ref)
    return f"{d}/inception.pth", f"{d}/ref.npz"


def _run_ckpt(path, emas):  # a tiny run's checkpoint at step 1, random weights in each EMA
    sd = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10)).state_dict()
    conf = pg.dataclasses.asdict(small_cfg(path, num_classes=10))
    torch.save(dict(emas={d: sd for d in emas}, step=1, config=conf), path)
    return sd


def test_load_checkpoints(tmp_path):
    m = _run_ckpt(tmp_path / "b.pt", ("0.9", "0.5"))  # ours
    sd = {**{"denoiser." + k: v for k, v in m.items()},  # official Lightning: EMA 0.9999
          **{"ema_denoiser." + k: -v for k, v in m.items()}}
    torch.save({"state_dict": sd, "global_step": 7}, tmp_path / "a.ckpt")
    got, conf, step, _ = pg.load_denoiser(str(tmp_path / "a.ckpt"))
    assert list(got) == [0.9999] and conf is None and step == 7
    assert same(got[0.9999].state_dict(), {k: -v for k, v in m.items()})
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "c.png")
    for name, change, msg in [
            ("b.pt", 0, "holds no EMA of decay 0.9999; it holds 0.9, 0.5"),
            ("d", {"x": torch.ones(1)}, "(?s)are not PixelGen-T/16's: .*Unexpected key.*\"x\""),
            ("e", {"pos_embed": torch.ones(1, 4, 100)}, r"\(depth 6, width 100\) fit no preset"),
            ("f", {"hp": pg.argparse.Namespace()}, "pickled Python objects .*--unsafe_load"),
            ("c.png", 0, "cannot read .*c.png as a checkpoint"),
            ("g", 0, "no checkpoint .*g: train first")]:
        if change:
            change = {"ema_denoiser." + k: v for k, v in change.items()}
            torch.save({"state_dict": {**sd, **change}}, tmp_path / name)
        with pytest.raises(SystemExit, match=msg):
            pg.load_denoiser(str(tmp_path / name), decays=(0.9999,))


def test_grid_rows_for_any_number_of_classes(tmp_path):
    abc = [chr(65 + k) for k in range(26)]  # A..Z: rows of ~sqrt(n) images, whole
    for n, cols, note in [(40, 7, "rows start at A, H, O, V, C"),
                          (64, 8, "rows start at A, I, Q, Y, G, O, W, E"),
                          (20, 5, "rows start at A, F, K, P; left out: U, V, W, X, Y, Z")]:
        layout = pg.grid_layout(n, abc)
        pg.save_grid(np.full((n, 4, 4, 3), 255, np.uint8), tmp_path / "g.png", layout)
        g = np.asarray(Image.open(tmp_path / "g.png"))  # 4 px images, 2 px borders
        assert (layout.cols, layout.note) == (cols, note)
        assert g.shape == (n // cols * 6 + 2, cols * 6 + 2, 3) and (g[2::6, 2::6] == 255).all()


def test_evaluation_batch_is_per_process(monkeypatch):
    monkeypatch.setattr(pg, "sample_images", lambda m, idx, cfg, device, w, b: (list(idx), b))
    got = pg.my_images(None, 1, 11, small_cfg("", batch_size=4), pg.Procs(rank=1, world=2))
    assert list(got) == [([1, 3, 5, 7], 4), ([9], 4)]


def test_sample_program_output_and_settings(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "run" / "samples_0000001"
    pg.train(small_cfg(run, max_steps=1, sample_every=1, sample_steps=3, sampler="euler",
                       cfg_scale=(1.5,), lr=0.05, ema=(0.0,)))  # not the demo recipe's
    before = {p: p.read_bytes() for p in run.iterdir()}
    pg.main(["--sample", "--out_dir", str(run), "--num_samples", "12", "--batch_size", "5",
             "--sampler", "heun", "--save_pngs"])
    assert ", step 1, " in capsys.readouterr().out
    assert {p: p.read_bytes() for p in before} == before  # the run's files
    assert set(run.iterdir()) - set(before) == {out}
    assert sorted(os.listdir(out / "images"))[3] == "000003_yellow_ring.png"
    with np.load(out / "samples.npz") as f:
        x, y = f["arr_0"], f["arr_1"]
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.uint8 and y.tolist() == [*range(10), 0, 1]
    # image 11, in the padded batch: its own noise, the flag's sampler, the run's other settings
    eps = pg.noise((3, 32, 32), [pg.seed_for(1234, 11)], "cpu")
    z = pg.sample(pg.load_denoiser(str(run / "ckpt.pt"))[0][0.0], eps, torch.tensor([1]), 3,
                  "heun", 1.5, (0.1, 0.9), 1.0)[0]
    assert np.abs(((z + 1) * 127.5 + 0.5).clamp(0, 255).int().permute(1, 2, 0) - x[11]).max() <= 1


def test_sweep_compiles_one_graph_per_batch_shape(tmp_path, compiled):  # last batch padded
    _run_ckpt(tmp_path / "ckpt.pt", ("0.9", "0.5"))
    pg.main(["--sample", "--out_dir", str(tmp_path), "--num_samples", "5", "--batch_size", "4",
             "--sample_steps", "2", "--ema_decay", "0.9", "0.5", "--cfg_scale", "1", "2",
             "--compile"])
    assert len(compiled) == 2  # batches of 4 unguided, of 8 guided, for both EMAs


def test_grids_and_evaluations_change_no_training_failures_logged(tmp_path, monkeypatch):
    run, kw = tmp_path / "eval", dict(ema=(0.9, 0.5), eval_every=2, eval_samples=6,
                                      sample_steps=2, sample_every=1, num_samples=25)
    pg.train(small_cfg(tmp_path / "plain", max_steps=3, ema=(0.9, 0.5)))
    pg.train(small_cfg(run, max_steps=2, **kw))
    monkeypatch.setattr(pg, "save_grid", lambda *a: 1 / 0)
    monkeypatch.setattr(pg, "write_samples", lambda *a: 1 / 0)
    pg.train(small_cfg(run, max_steps=3, **kw))
    a, b = ckpt(tmp_path / "plain" / "ckpt.pt"), ckpt(run / "ckpt.pt")
    assert all(same(a[k], b[k]) for k in ("model", "emas", "opt"))
    with np.load(run / "eval_0000002" / "samples_ema0.5_cfg2.npz") as f:  # no --fid_ref: kept
        assert f["arr_0"].shape == (6, 32, 32, 3) and f["arr_1"].tolist() == [0, 1, 2, 3, 4, 5]
    log = (run / "log.txt").read_text()
    assert f"(EMA 0.9): {run}/grid_0000001.png; columns: red disc, green" in log
    for what in ("sample grid", "evaluation"):
        assert f"{what} at step 3 failed, training goes on: ZeroDivisionError" in log


def test_evaluation_rows_online_sample_fid_py_agree(tmp_path, monkeypatch, capsys):
    calls = _fake_network(monkeypatch)  # the plumbing is under test
    (weights, ref), run, out = _fid_files(tmp_path), tmp_path / "run", tmp_path / "sampled"
    pg.train(small_cfg(run, max_steps=2, eval_every=2, eval_samples=5, keep_every=2,
                       sample_steps=2, ema=(0.9, 0.5), fid_ref=ref, fid_weights=weights))
    online = [json.loads(line) for line in open(run / "metrics.jsonl") if '"fid"' in line]
    assert [(r["ema"], r["num_samples"]) for r in online] == [(0.9, 5), (0.5, 5)]
    main = lambda *a: pg.main(["--sample", "--ckpt", f"{run}/ckpt_0000002.pt", "--out_dir",
                               str(out), "--num_samples", "5", "--batch_size", "4",
                               "--fid_weights", weights, "--fid_ref", *a])
    main(ref, "--ema_decay", "0.9", "0.5", "--cfg_scale", "2", "3")
    assert sum(calls) == 2 * 6 + 6 * 5  # the reference once per program
    rows = json.load(open(out / "eval.json"))
    assert [(r["step"], r["ema"], r["cfg_scale"]) for r in rows] == [
        (2, 0.9, 2), (2, 0.9, 3), (2, 0.5, 2), (2, 0.5, 3)]
    for r, o in zip(rows[::2], online):  # the same images in the same batches: the same numbers
        res = fid.main([f"{out}/samples_0000002/samples_ema{r['ema']}_cfg2.npz", ref,
                        "--weights", weights])
        for k in METRIC_KEYS:
            assert r[k] == pytest.approx(o[k], rel=1e-9) and res[k] == pytest.approx(r[k], rel=1e-6)
    marked = [line for line in capsys.readouterr().out.splitlines() if "<- best FID" in line]
    assert len(marked) == 1 and f" {min(r['fid'] for r in rows):>10.4g} " in marked[0]
    main(ref, "--ema_decay", "0.5", "--cfg_scale", "3")  # one setting alone: the same noise
    with np.load(f"{out}/samples_0000002/samples.npz") as a, \
            np.load(f"{out}/samples_0000002/samples_ema0.5_cfg3.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    stats = f"{out}/stats.npz"  # statistics alone
    fid.main([ref, "--save-stats", stats, "--weights", weights])
    for a, want in [([stats], {"fid", "sfid", "inception_score"}),  # all it allows
                    ([ref, "--metrics", "fid", "dc"], {"fid", "density", "coverage"})]:
        main(*a)
        rows = json.load(open(out / "eval.json"))
        assert set(rows[-1]) & METRIC_KEYS == want
    assert len(rows) == 7  # added to
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    for bad, msg in [(f"{tmp_path}/junk.npz", "is neither"), (stats, "no images, nor what pr")]:
        with pytest.raises(SystemExit, match=msg):
            main(bad, "--metrics", "fid", "pr")


# --------------------------------------------------------------------------------------------------
# dino.py: DINOv2 ViT-B/14 (bitwise equal to facebookresearch/dinov2 in float32 on CPU, checked)

# Official dinov2_vitb14_pretrain.pth, "key shape" in order (D = 768): DINO_BLOCK for blocks 0 to 11
DINO_HEAD = """cls_token 1,1,D  pos_embed 1,1370,D  mask_token 1,D
patch_embed.proj.weight D,3,14,14  patch_embed.proj.bias D"""
DINO_BLOCK = """norm1.weight D  norm1.bias D  attn.qkv.weight 3*D,D  attn.qkv.bias 3*D
attn.proj.weight D,D  attn.proj.bias D  ls1.gamma D  norm2.weight D  norm2.bias D
mlp.fc1.weight 4*D,D  mlp.fc1.bias 4*D  mlp.fc2.weight D,4*D  mlp.fc2.bias D  ls2.gamma D"""
DINO_LAYOUT = layout(DINO_HEAD, DINO_BLOCK, 12, "norm.weight D  norm.bias D", D=768)


def dino_tiny(depth=3):  # toy width; the 37 x 37 position table stays
    torch.manual_seed(0)
    return dino.DINOv2(embed_dim=32, depth=depth, num_heads=2)


def test_dino_official_layout_and_frozen():
    with torch.device("meta"):
        model = dino.DINOv2()  # ViT-B/14
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == DINO_LAYOUT
    assert sum(p.numel() for p in model.parameters()) == 86_580_480
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.train().modules())  # a parent's .train(): still eval


def test_dino_loads_strictly_and_bad_files_name_themselves(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", None)  # no download, even by mistake
    sd = {k: torch.tensor(i + 0.5).expand(s) for i, (k, s) in enumerate(DINO_LAYOUT)}  # one a key
    (path := tmp_path / "checkpoints" / dino.WEIGHTS_FILE).parent.mkdir()  # the hub cache
    torch.save(sd, path)
    for model in (dino.load_dinov2(str(path)), dino.load_dinov2(download=False)):
        assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"download https://dl.fbaipublicfiles.com/dinov2/"
                       f"dinov2_vitb14/dinov2_vitb14_pretrain.pth and put it in {path.parent}"):
        dino.load_dinov2(download=False)
    torch.save({"cls_token": torch.zeros(1, 1, 768)}, tmp_path / "part.pth")  # strict: keys missing
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    for name in ("none.pth", "bad.pth", "part.pth"):
        with pytest.raises((FileNotFoundError, RuntimeError), match=name):
            dino.load_dinov2(str(tmp_path / name))


def test_dino_intermediate_layers_semantics():
    model, x = dino_tiny(), torch.randn(2, 3, 28, 42)  # 3 blocks, a 2 x 3 patch grid
    layers = functools.partial(model.get_intermediate_layers, x)
    with torch.no_grad():
        ff, all3 = model.forward_features(x), torch.stack(layers(n=3))
        last = ff["x_norm_patchtokens"]
        assert torch.equal(layers()[0], last) and torch.equal(all3[2], last)  # n = 1: the last
        # int n: the last n blocks; a list: 0-based indices, in block order whatever the list's
        assert torch.equal(torch.stack(layers(n=2)), all3[1:]) and not torch.equal(all3[0], all3[2])
        assert torch.equal(torch.stack(layers(n=[2, 0])), all3[::2])
        assert torch.equal(layers(norm=False)[0], ff["x_prenorm"][:, 1:])
        (tokens, cls), = layers(return_class_token=True)
        assert torch.equal(cls, ff["x_norm_clstoken"]) and torch.equal(tokens, last)
        fmap = layers(reshape=True)[0]  # (B, D, h, w), patches in row-major order
        assert fmap.shape == (2, 32, 2, 3) and torch.equal(fmap.flatten(2).mT, last)
        with pytest.raises(AssertionError):
            layers(n=[3])
        with pytest.raises(AssertionError, match="multiple of the patch size 14"):
            model.forward_features(x[..., :30])


def test_dino_pos_embed_interpolation():
    model = dino_tiny(1).bfloat16()  # resized in float32 whatever the stored dtype
    assert model.interpolate_pos_embed(37, 37) is model.pos_embed  # 518 x 518: the stored tensor
    pos = model.pos_embed.float()
    grid = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    for h, w in [(16, 16), (37, 38), (4, 3)]:  # bicubic, no antialias, by scale (h + 0.1) / 37
        ref = F.interpolate(grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode="bicubic")
        got = model.interpolate_pos_embed(h, w)
        assert got.dtype == torch.float32
        assert torch.equal(got, torch.cat([pos[:, :1], ref.flatten(2).mT], 1))


def test_dino_patch_tokens_recipe_and_bf16():
    model = dino_tiny(1)
    x = (torch.rand(2, 3, 64, 64) * 2 - 1).bfloat16().float()  # values a bf16 x_hat holds exactly
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():  # [0, 1], ImageNet mean / std, bicubic to 14/16 of the size, last block
        y = F.interpolate(((x + 1) / 2 - mean) / std, size=(56, 56), mode="bicubic")
        ref = model.forward_features(y)["x_norm_patchtokens"]
        torch.testing.assert_close(model(x), ref)  # forward = patch_tokens
        assert model.patch_tokens(x, patch_size=32).shape == (2, 4, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 x_hat, float32 x: f(x_hat) = f(x)
            low = model(x)
            assert torch.equal(model(x.bfloat16()), low)
    assert F.cosine_similarity(low.float(), ref, dim=-1).min() > 0.999


def test_dino_compiles_fullgraph_and_backpropagates(compiled):
    model, runs = dino_tiny(1), []
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()  # a 28 x 28 DINO input: 2 x 2 tokens
    for fn in (model, torch.compile(model, fullgraph=True)):
        x.grad = None
        f = fn(x)
        (1 - F.cosine_similarity(f, f.detach().flip(0), dim=-1)).mean().backward()  # as P-DINO
        runs.append((f, x.grad))
    assert x.grad.abs().sum() > 0  # measured 2.6e-6: the traced bicubic rounds differently
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------------------------
# fid.py: FID Inception, preprocessing, metrics from Inception outputs, inputs, CLI


def _images(n, h, w, seed=0):  # smooth random uint8 (n, h, w, 3), some noise on top
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g), size=(h, w),
                      mode="bilinear")
    x = (x + 0.2 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1) * 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


@functools.lru_cache(maxsize=None)
def _random_inception():  # default initialisation: tiny features
    torch.manual_seed(0)
    return fid.InceptionV3().eval().requires_grad_(False)


def _save_weights(path):
    torch.save(dict(_random_inception().state_dict()), path)
    return str(path)


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):
    return _save_weights(tmp_path_factory.mktemp("fid") / "inception.pth")


def test_fid_py_and_its_tests_fit_their_budgets():
    me = open(__file__).read()
    for text, chars, lines in ((open(fid.__file__).read(), 21500, 540),
                               (me[me.index("# fid.py: FID Inception,"):], 11000, 10 ** 9)):
        assert len("".join(text.split())) <= chars and len(text.splitlines()) <= lines
        assert max(len(line) for line in text.splitlines()) <= 100


def test_fid_inception_layout_and_sfid_features():
    sd = fid.InceptionV3().state_dict()  # as reference/fid_inception_v3_state_dict.tsv
    assert len(sd) == 472 and sum(v.numel() for v in sd.values()) == 23885392
    assert list(sd)[:2] == ["Conv2d_1a_3x3.conv.weight", "Conv2d_1a_3x3.bn.weight"]
    model, seen = _random_inception(), []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: seen.append(out))
    pool3, spatial = fid.inception_outputs(model, _images(2, 37, 53), spatial=True)
    hook.remove()
    # sFID's: Mixed_6d's own 1x1 branch (both ran), 7 channels, value (h, w, c) at (h 17 + w) 7 + c
    assert torch.equal(seen[0], seen[1]) and pool3.shape == (2, 2048)
    np.testing.assert_array_equal(spatial, seen[1][:, :7].permute(0, 2, 3, 1).reshape(2, 2023))


def test_fid_preprocessing():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]  # by hand: at 0, .5, 1, 1.5 (= 1)
    expected = [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]]
    assert fid.resize_tf1_bilinear(x, 4)[0, 0].tolist() == expected
    # 7 to 29: output j samples input j 7 / 29, in float32 (TF1's), the last one repeated
    row = torch.rand(1, 1, 1, 7) * 255
    pos = np.arange(29, dtype=np.float32) * np.float32(7 / 29)
    ref = np.interp(pos, np.arange(7), row.flatten().numpy())
    np.testing.assert_allclose(fid.resize_tf1_bilinear(row, 29)[0, 0, 0], ref, atol=1e-4)
    x = torch.from_numpy(_images(2, 299, 299)).permute(0, 3, 1, 2)  # 299: no resize
    assert torch.equal(fid.preprocess_images(x, "adm"), (x.float() - 128) / 128)
    assert torch.equal(fid.preprocess_images(x, "pytorch-fid"), x.float() / 255 * 2 - 1)


def test_fid_statistics_frechet_distance_and_inception_score():
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((103, 7)) * 2 + 1
    mu, sigma = fid.statistics(feats, chunk=10)
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-10)
    got = fid.frechet_distance(np.zeros(100), np.eye(100), np.ones(100), 2.25 * np.eye(100))
    assert got == pytest.approx(125, rel=1e-12)  # |1|^2 d + (1 - 1.5)^2 d
    for n in (400, 40):  # full rank; singular sigma1
        mu1, s1 = fid.statistics(rng.standard_normal((n, 64)) @ rng.standard_normal((64, 64)))
        mu2, s2 = fid.statistics(rng.standard_normal((300, 64)) @ rng.standard_normal((64, 64)))
        direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-7)
    assert fid.inception_score(np.tile(50 * np.eye(10), (4, 1))) == pytest.approx(10, rel=1e-9)
    logits = rng.standard_normal((12000, 10)) * 3  # splits of 5000, 5000, 2000
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    kl = [(q * np.log(q / q.mean(0))).sum(1).mean() for q in (p[:5000], p[5000:10000], p[10000:])]
    assert fid.inception_score(logits) == pytest.approx(np.exp(kl).mean(), rel=1e-10)


def _knn_numpy(ref, sam, k_pr=3, k_dc=5):  # the definitions, in float64 by direct differences
    d2 = lambda a, b: ((a[:, None].astype(float) - b[None]) ** 2).sum(-1)
    rr, d = np.sort(d2(ref, ref), 1), d2(ref, sam)
    inside = d < rr[:, k_dc, None]
    return dict(precision=(d <= rr[:, k_pr, None]).any(0).mean(),
                recall=(d <= np.sort(d2(sam, sam), 1)[:, k_pr]).any(1).mean(),
                density=inside.sum() / (k_dc * len(sam)), coverage=inside.any(1).mean())


def test_fid_neighbour_metrics_by_hand_and_exact_far_from_the_mean():
    # 1-D, k = 1. Reference 0, 1, 3, 6 (balls^2 1, 1, 4, 9), samples 1, 2, 4.5, 10 (1, 1, 6.25,
    # 30.25). Precision (`<=`): 1, 2, 4.5; recall: all (0 on an edge). Density (`<`): 1 in ball
    # 1, 2 in 3, 4.5 in 3 and 6: 4 / 4; coverage: not ball 0 (1 on its edge)
    ref, sam = np.array([[0.0], [1], [3], [6]]), np.array([[1.0], [2], [4.5], [10]])
    for chunk in (1, 3):
        got = fid.neighbour_metrics(ref, sam, k_pr=1, k_dc=1, chunk=chunk, device="cpu")
        assert got == dict(precision=0.75, recall=1, density=1, coverage=0.75)
    # tight clusters 2e4 from their mean, neighbours 5 apart: float32 distances lose them
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((4, 64)) * 2500
    cluster = lambda n, s: centres[rng.integers(0, 4, n)] + rng.standard_normal((n, 64)) * s
    ref, sam = cluster(200, 0.5).astype(np.float32), cluster(150, 0.6).astype(np.float32)
    expected = _knn_numpy(ref, sam)  # density, coverage: prdc's 0.118667, 0.37
    assert (expected["density"], expected["coverage"]) == pytest.approx((0.118667, 0.37), 1e-5)
    for chunk in (10000, 37):
        got = fid.neighbour_metrics(ref, sam, chunk=chunk, device="cpu")
        assert got == pytest.approx(expected, abs=1e-12)


def test_fid_read_image_keeps_the_scale_of_deep_greys(tmp_path):
    dark = np.array([[0, 128, 129], [300, 1000, 5000]], np.uint16)  # 16 bits: / 257, not stretched
    Image.fromarray(dark).save(tmp_path / "g.png")  # I;16
    Image.frombytes("I;16B", (3, 2), dark.astype(">u2").tobytes()).save(tmp_path / "g.tif")
    (tmp_path / "g.pgm").write_bytes(b"P5 3 2 65535\n" + dark.astype(">u2").tobytes())  # I
    Image.fromarray(np.float32([[-3, 0.4, 100.6]])).save(tmp_path / "f.tif")  # F: 0..255
    for name in ("g.png", "g.tif", "g.pgm"):
        assert fid.read_image(tmp_path / name)[..., 1].tolist() == [[0, 0, 1], [1, 4, 19]]
    assert fid.read_image(tmp_path / "f.tif")[..., 2].tolist() == [[0, 0, 101]]


def _err(capsys):  # fid.py's lines on stderr
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("fid.py")]


def test_fid_folders_and_npz_files(tmp_path, monkeypatch, capsys):
    calls = _fake_network(monkeypatch)
    (tmp_path / "f" / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate([(20, 24), (20, 24), (31, 17), (20, 24)]):
        Image.fromarray(_images(1, h, w, i)[0]).save(tmp_path / "f" / f"{'sub/' * (i > 2)}{i}.png")
    (tmp_path / "f" / "sub" / "broken.png").write_bytes(b"not a png")
    side = fid.load_side(fid.open_side(str(tmp_path / "f")), None, ["pr"], batch_size=2)
    # sorted: 0, 1; 2 (another size); sub/3; broken named in one line
    assert calls == [2, 1, 1] and side.count == 4
    assert _err(capsys) == [f"fid.py: warning: {tmp_path}/f: skipped 1 unreadable of 5 images: "
                            f"cannot read image {tmp_path}/f/sub/broken.png: cannot identify image "
                            f"file '{tmp_path}/f/sub/broken.png'"]
    np.savez(tmp_path / "b.npz", arr_0=_images(5, 16, 12), mu=np.zeros(4), sigma=np.eye(4))
    side = fid.load_side(fid.open_side(str(tmp_path / "b.npz")), None, ["fid", "sfid"], "adm", 2)
    assert calls[3:] == [2, 2, 1] and side.mu.shape == (4,) and side.mu_s.shape == (2023,)


def test_fid_cli_every_metric_counts_and_statistics(tmp_path, monkeypatch, capsys, fid_weights):
    _fake_network(monkeypatch)
    model, sam_images, ref_images = _random_inception(), _images(9, 8, 8, 7), _images(8, 8, 8, 8)
    sam, ref, stats = (str(tmp_path / n) for n in ("samples", "ref.npz", "stats.npz"))
    os.mkdir(sam)
    for i, image in enumerate(sam_images):
        Image.fromarray(image).save(f"{sam}/{i}.png")
    np.savez(ref, arr_0=ref_images)
    cli = fid.main([sam, ref, "--weights", fid_weights, "--batch_size", "4"])
    out = "".join(f"{fid.RESULTS[k]}: {v:.6g}\n" for k, v in cli.items())
    assert capsys.readouterr().out == "samples: 9 images, reference: 8 images\n" + out
    (sp, ss), (rp, rs) = (fid.inception_outputs(model, x, "adm", True) for x in (sam_images,
                                                                                 ref_images))
    logits = sp.astype(float) @ model.fc.weight.double().numpy().T  # no bias
    expected = dict(fid=fid.frechet_distance(*fid.statistics(sp), *fid.statistics(rp)),
                    sfid=fid.frechet_distance(*fid.statistics(ss), *fid.statistics(rs)),
                    inception_score=fid.inception_score(logits), **_knn_numpy(rp, sp))
    assert cli == pytest.approx(expected, rel=1e-9) and list(cli) == list(expected)
    assert fid.main([ref, "--save-stats", stats, "--weights", fid_weights]) == {}
    assert capsys.readouterr().out == f"saved {stats}\nsamples: 8 images\n"
    only = fid.main([sam, stats, "--weights", fid_weights])  # all that statistics allow
    assert only == {k: pytest.approx(cli[k], rel=1e-9) for k in ("fid", "sfid", "inception_score")}
    assert capsys.readouterr().out.startswith("samples: 9 images, reference: statistics\n")


def test_fid_inputs_checked_first_small_sets_lose_knn_only(tmp_path, monkeypatch, capsys,
                                                           fid_weights):
    calls = _fake_network(monkeypatch)
    for n in (9, 5, 3):
        np.savez(tmp_path / f"{n}.npz", arr_0=_images(n, 8, 8))
    os.mkdir(tmp_path / "empty")
    os.mkdir(tmp_path / "one")
    Image.fromarray(_images(1, 8, 8)[0]).save(tmp_path / "one" / "a.png")
    np.savez(tmp_path / "adm.npz", arr_0=_images(9, 8, 8), mu=np.zeros(3), sigma=np.eye(3))
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    run = lambda s, r, *a: fid.main([str(tmp_path / s), str(tmp_path / r), "--weights",
                                     fid_weights, *a])
    for ref, message in [("one", "1 image files .* under .*one: need 2"), ("empty", "no image"),
                         ("nan.npz", "statistics in .*nan.npz hold NaN"), ("none", "no such")]:
        with pytest.raises((ValueError, OSError), match=message):
            run("9.npz", ref)
    with pytest.raises(ValueError, match="adm.npz holds mu, sigma and .*9.npz not: .* SAMPLES REF "
                                         ".*; swap them"):
        run("adm.npz", "9.npz")
    assert calls == []  # before any Inception pass
    for s, r, lost in [(9, 5, "dc"), (3, 9, "pr"), (3, 5, "pr and dc")]:
        got = run(f"{s}.npz", f"{r}.npz")
        assert ("recall" in got, "coverage" in got) == ("pr" not in lost, "dc" not in lost)
        assert _err(capsys) == [f"fid.py: warning: left out {lost}: too few points"]
        assert {"fid", "sfid", "inception_score"} <= set(got)
    calls.clear()
    monkeypatch.setattr(fid, "knn_radii", None)  # one pass a side, no k-NN distances
    assert list(run("9.npz", "3.npz", "--metrics", "is", "fid")) == ["fid", "inception_score"]
    assert calls == [3, 9]
    monkeypatch.setattr(fid, "inception_outputs", lambda m, x, *a: (np.full((9, 2048), np.nan), 0))
    with pytest.raises(ValueError, match="Inception outputs of .*9.npz hold NaN"):
        run("9.npz", "9.npz", "--metrics", "fid")


def test_fid_weights_and_batch_size_errors_say_what_is_wrong(tmp_path, monkeypatch, capsys):
    sd = dict(_random_inception().state_dict())
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "w2.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    for name in ("w2.pth", "junk.pth", "none.pth"):
        with pytest.raises(RuntimeError, match=f"{name} is not the FID Inception weights .*"
                                               f"the file is https") as e:
            fid.load_inception(str(tmp_path / name))
        assert "delete" not in str(e.value) and (name != "w2.pth" or "fc.bias" in str(e.value))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    os.mkdir(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / fid.FID_WEIGHTS_FILE).write_bytes(b"junk")  # the cached copy
    with pytest.raises(RuntimeError, match="delete it and download it again"):
        fid.load_inception()
    with pytest.raises(SystemExit):
        fid.main(["a", "b", "--batch_size", "0"])
    assert "--batch_size must be 1 or more, got 0" in capsys.readouterr().err


def test_fid_full_fp32_leaves_the_legacy_tf32_getters_readable():
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 set as training scripts often do
    try:
        with fid.full_fp32():
            assert torch.backends.cuda.matmul.allow_tf32 is torch.backends.cudnn.allow_tf32 is False
        assert torch.backends.cuda.matmul.allow_tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]
