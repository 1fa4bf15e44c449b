"""Offline CPU tests of pixelgen.py, dino.py and fid.py: random weights, no downloads.

They pin closed forms, hand-computed values, the official layouts and the facts that make the
equality with the official code hold, in the order of the code: the method (model, flow,
objective, samplers), the engineering (CLI, weights, data, training in one and two processes,
sampling and evaluation), then dino.py and fid.py. Training runs use small random perceptual
networks (`small_random_nets`): their size does not matter there."""
import copy
import fcntl
import functools
import gc
import json
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

# -n 2: two workers of one thread
WORKER = os.environ.get("PYTEST_XDIST_WORKER")
torch.set_num_threads(1 if WORKER else min(2, torch.get_num_threads()))


def small_random_nets(use_dino, use_lpips):
    """pg.random_nets of the training runs here: DINOv2 32 wide with 1 block, LPIPS on SqueezeNet,
    fixed weights in milliseconds (the global RNG is left alone)."""
    import lpips
    with torch.random.fork_rng():
        torch.manual_seed(0)
        d = dino.DINOv2(embed_dim=32, depth=1, num_heads=2) if use_dino else None
        lp = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=True, verbose=False)
    return d, lp if use_lpips else None


@pytest.fixture(autouse=True)
def _small_nets(monkeypatch):
    monkeypatch.setattr(pg, "random_nets", small_random_nets)


def tiny_jit(**kw):  # every code path of the real model at toy width
    args = dict(input_size=32, patch_size=16, hidden_size=64, depth=4, num_heads=4,
                bottleneck_dim=16, in_context_len=3, in_context_start=1, num_classes=10)
    args.update(kw)
    return pg.JiT(**args)


def randomize(model, std=0.05, seed=0):  # wake the zero-initialised layers: non-trivial outputs
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n != "pos_embed":
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


@functools.lru_cache(maxsize=None)
def frozen_nets():  # the objective's: DINOv2 at its real width (REPA targets 768-d), LPIPS-VGG
    import lpips
    torch.manual_seed(0)
    d = dino.DINOv2(embed_dim=768, depth=2, num_heads=12)  # 2 blocks for speed
    with torch.no_grad():
        for n, p in d.named_parameters():
            if "gamma" in n:
                p.normal_(0, 0.3)
    lp = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    return d, lp.eval().requires_grad_(False)


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


def small_cfg(out_dir, **kw):  # a tiny demo run: 32 px, batch 4, 4 steps, a log line each
    base = {**pg.dataclasses.asdict(pg.Config()), **pg.RECIPES["demo"]}
    base.update(out_dir=str(out_dir), image_size=32, batch_size=4, perceptual_init="random",
                log_every=1, ckpt_every=2, sample_every=0, max_steps=4, cfg_interval=(0.1, 0.9))
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
    eq = [torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(fa, fb)]
    return len(fa) == len(fb) and all(eq)


def ckpt(path):
    return torch.load(path, weights_only=True)


@pytest.fixture
def compiled(monkeypatch):
    """torch.compile with the aot_eager backend (front end and autograd, no code generation: fast
    on a CPU) wherever pixelgen compiles; yields the graphs it builds. Dynamo's caches are reset
    before and after: no test meets the recompilation limit because of others."""
    from torch._dynamo.backends.registry import lookup_backend
    torch._dynamo.reset()
    graphs, compile_ = [], torch.compile
    backend = lambda gm, inputs: graphs.append(gm) or lookup_backend("aot_eager")(gm, inputs)
    monkeypatch.setattr(torch, "compile",
                        lambda fn=None, **kw: compile_(fn, **{**kw, "backend": backend}))
    yield graphs
    torch._dynamo.reset()


def _fake_network(monkeypatch):
    """For tests of the plumbing: the Inception becomes a fixed function of the pixels, and the
    Frechet distance of 2048-d statistics (seconds on 2 cores) a cheap one of all their entries.
    Returns the batch sizes the Inception was called with."""
    calls = []
    monkeypatch.setattr(fid, "frechet_distance", lambda mu1, sigma1, mu2, sigma2: float(
        np.sum((mu1 - mu2) ** 2) + np.sum((sigma1 - sigma2) ** 2) + np.trace(sigma1) / 1000))

    def outputs(model, images, preprocess="adm", spatial=False):
        calls.append(len(images))
        x = np.asarray(images, np.float64).reshape(len(images), -1) / 255  # (B, H W 3)
        # (B, 2048)
        f = np.tile(x, (1, -(-2048 // x.shape[1])))[:, :2048] + (preprocess == "pytorch-fid")
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


# -------------------------------------------------------------------------------------------------
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


# =================================================================================================
# Engineering
# -------------------------------------------------------------------------------------------------
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
    assert "--flip, --no-flip default False" in out and "--gate_t GATE_T default 0.3" in out
    assert "Each flag is a field of Config" in out


# -------------------------------------------------------------------------------------------------
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


# -------------------------------------------------------------------------------------------------
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


# -------------------------------------------------------------------------------------------------
# Training in one process: the step, resume, checkpoints, signals, logs, EMAs, compilation

def _split_step(cfg, imgs, world, rank, K):
    # per micro-batch of train_step 7: x, t, eps, drop and the seed of the dropout masks' RNG
    seen, w, b = [], torch.zeros(1, requires_grad=True), 8 // (world * K)

    def net(x, y, t, eps, drop, adapt):
        seen.append((x, t, eps, drop, torch.initial_seed()))
        return dict.fromkeys(pg.Meter.TERMS, w.sum())
    net.model, net.loss_fn = nn.Linear(1, 1), pg.PixelGenLoss(64, None, None, repa_weight=0)
    mine = iter([(x, torch.zeros(b).long(), []) for x in imgs[rank * 8 // world:].split(b)[:K]])
    pg.train_step(net, torch.optim.SGD([w]), {}, mine, 7, pg.dataclasses.replace(cfg, grad_accum=K),
                  pg.Procs(False, rank, world), pg.Meter())
    return seen


def test_a_sample_s_draws_are_the_same_for_any_split_its_dropout_masks_are_not():
    # t, noise, label dropout, flip: of (seed, step, position); dropout masks: of the split, so only
    # presets without dropout (all but XL) train alike for any split
    cfg = small_cfg("-", batch_size=8, flip=True, label_dropout=0.5)
    gen = torch.Generator().manual_seed(pg.seed_for(cfg.seed, 7))  # the rule by hand, step 7
    t = pg.sample_t(8, -0.8, 0.8, gen)
    drop, flip = torch.rand(8, generator=gen) < 0.5, torch.rand(8, generator=gen) < 0.5
    eps = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(
        pg.seed_for(cfg.seed, 7, i))) for i in range(8)])
    imgs = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    x = imgs.float() / 127.5 - 1
    want = (torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x), t, eps, drop)
    for world, K in [(1, 1), (1, 2), (2, 1), (2, 2), (4, 2)]:
        seen = [(r, k, s) for r in range(world)
                for k, s in enumerate(_split_step(cfg, imgs, world, r, K))]
        for i, w in enumerate(want):
            assert torch.equal(torch.cat([s[i] for _, _, s in seen]), w), (world, K, i)
        assert [s[4] for _, _, s in seen] == [pg.seed_for(cfg.seed, 7, r, k) for r, k, _ in seen]
    assert 0 < drop.sum() < 8 and 0 < flip.sum() < 8


def test_the_training_step_waits_for_nothing_on_the_device(monkeypatch):
    # no blocking host-to-device copy, no read of device data (meta has none); t and drop stay on
    # the host: DDP must not get device_ids (it would copy them, blocking)
    from torch.utils._python_dispatch import TorchDispatchMode
    aten, syncs = torch.ops.aten, []

    class Copies(TorchDispatchMode):  # records the copies between devices without non_blocking
        def __torch_dispatch__(self, func, types, args=(), kw=None):
            kw, a = kw or {}, args
            to = func is aten._to_copy.default and kw.get("device", a[0].device) != a[0].device
            copy = func is aten.copy_.default and a[0].device != a[1].device
            if to and not kw.get("non_blocking") or copy and a[2:] != (True,):
                syncs.append(func)
            return func(*args, **kw)

    procs, cfg = pg.Procs(device=torch.device("meta")), small_cfg("-", grad_accum=2, flip=True)
    monkeypatch.setattr(pg, "noise", lambda shape, seeds, device: torch.randn(
        len(seeds), *shape, device=device))  # (meta has no generators)
    _, model, emas, loss_fn, opt = pg.build(cfg, procs, log=print)
    batches = iter([(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2).long(), [])] * 2)
    with Copies():
        pg.train_step(pg.DenoiserAndLoss(model, loss_fn), opt, emas, batches, 0, cfg, procs,
                      pg.Meter())
    assert syncs == []
    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", lambda net, **kw: kw)
    assert "device_ids" not in pg.wrap_ddp(None, pg.Procs(True, device=torch.device("cuda", 0)))


def test_a_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    pg.train(small_cfg(tmp_path, max_steps=2))
    good, forward = (tmp_path / "ckpt.pt").read_bytes(), pg.PixelGenLoss.forward
    monkeypatch.setattr(pg.PixelGenLoss, "forward", lambda *a, **k: {
        n: v * float("nan") for n, v in forward(*a, **k).items()})
    with pytest.raises(SystemExit, match="non-finite loss at step 3"):
        pg.train(small_cfg(tmp_path, max_steps=4))
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_the_tf32_flags_read_after_setup():  # setting one of torch's two TF32 APIs breaks the other
    pg.setup_dist(small_cfg("-"))
    with fid.full_fp32():
        pass
    assert (torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()) == (
        False, "highest")


def test_checkpoint_writes_are_durable_and_a_failed_one_keeps_the_last(tmp_path, monkeypatch):
    import stat
    path, order, fsync, replace = str(tmp_path / "ckpt.pt"), [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: order.append(
        "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else os.fstat(fd).st_size) or fsync(fd))
    monkeypatch.setattr(os, "replace", lambda *a: order.append("rename") or replace(*a))
    pg.save_checkpoint({"step": 1}, path)
    assert order == [os.path.getsize(path), "rename", "dir"]  # all on disk, then renamed
    os.symlink("/dev/full", path + ".tmp")  # the disk fills up while writing
    with pytest.raises(SystemExit, match=r"failed \(\[Errno 28\] No space left on device\); "
                                         r"the last checkpoint is intact"):
        pg.save_checkpoint({"step": 2}, path)
    assert ckpt(path)["step"] == 1 and not os.path.lexists(path + ".tmp")


def test_compiled_runs_survive_the_adaptive_weight_also_after_a_resume(tmp_path, monkeypatch,
                                                                      compiled):
    # w_ad backpropagates twice through the graphs: a compiled backward with donated buffers refuses
    import torch._functorch.config
    monkeypatch.setattr(pg.PixelGenLoss, "adapt_every", 2)  # official: 50
    monkeypatch.setitem(pg.MODELS, "tiny", dict(pg.MODELS["PixelGen-T/16"], depth=2, num_heads=4,
                                                 hidden_size=64, in_context_start=1))  # quick
    kw = dict(compile=True, adaptive_from=1, keep_every=1, lpips_weight=0.0, model="tiny",
              repa_layer=1, max_steps=3)
    for run in ("scratch", "resumed"):  # steps 0, 1 plain, step 2 adapts; resumed at step 1
        with torch._functorch.config.patch(donated_buffer=True):  # torch's default
            pg.train(small_cfg(tmp_path / run, **kw))
        w_ad = ckpt(tmp_path / run / "ckpt.pt")["loss"]["w_ad"]
        assert w_ad != 1 and torch.isfinite(w_ad)
        if run == "scratch":
            (tmp_path / "resumed").mkdir()
            os.link(tmp_path / run / "ckpt_0000001.pt", tmp_path / "resumed" / "ckpt.pt")
    assert any("ls1" in gm.code for gm in compiled)  # DINOv2 (its LayerScale) ran compiled too


def test_sigterm_stops_after_the_step_and_resumes_exactly(tmp_path):
    run, log = tmp_path / "run", tmp_path / "run" / "log.txt"
    flags = "--train --image_size 32 --batch_size 4 --perceptual_init random --log_every 1 --ema"
    code = "import test_pixelgen as T; T.pg.random_nets = T.small_random_nets; T.pg.main()"
    proc = subprocess.Popen([sys.executable, "-c", code, *flags.split(), "0.9", "0.5", "--out_dir",
                             run], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads())))
    deadline = time.time() + 120
    while not (log.exists() and "step 2/" in log.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # SLURM's, then torchrun's forwarded copy 10 ms later
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    stopped = ckpt(run / "ckpt.pt")["step"]
    assert proc.returncode == 0 and f"stopped after step {stopped};" in log.read_text(), out
    for d in (run, tmp_path / "straight"):  # the restart, and a run without a stop
        pg.train(small_cfg(d, max_steps=stopped + 2, ema=(0.9, 0.5)))
    a, b = ckpt(run / "ckpt.pt"), ckpt(tmp_path / "straight" / "ckpt.pt")
    assert all(same(a[k], b[k]) for k in ("model", "emas", "loss", "opt")) and stopped > 1
    assert f"from step {stopped} of " in log.read_text()


def test_a_stop_signal_during_a_periodic_save_stops_right_after_it(tmp_path, monkeypatch):
    save, writes = pg.save_checkpoint, []
    monkeypatch.setattr(pg, "save_checkpoint", lambda *a: (
        writes.append(a[0]["step"]), os.kill(os.getpid(), signal.SIGTERM), save(*a)))
    pg.train(small_cfg(tmp_path, max_steps=4))  # a checkpoint every 2 steps
    assert writes == [2] and "stopped after step 2" in (tmp_path / "log.txt").read_text()


def test_a_resume_continues_emas_snapshots_metrics_keeps_no_copy_or_graph(tmp_path, monkeypatch):
    # a resume lets the file's tensors go (on a GPU: 2.7 GB each for XL's weights and EMAs)
    import re
    seen, held, loaded, train_step, load = [], [], [], pg.train_step, torch.load
    vec = lambda m: torch.cat([p.detach().flatten() for p in m.parameters()])

    def recorded(net, opt, emas, *a):
        train_step(net, opt, emas, *a)
        assert a[-1].sums.grad_fn is None and a[-1].n == 1  # the meter: no graph; reset at each log
        seen.append({d: vec(m) for d, m in [*emas.items(), ("model", net.model)]})
        if loaded:
            gc.collect()
            held.append(sum(r() is not None for r in loaded))

    def watched(*a, **k):  # weak references to the weights of every checkpoint loaded
        ck = load(*a, **k)
        loaded.extend(weakref.ref(v) for part in ("model", "emas") for v in flat(ck.get(part, {})))
        return ck

    monkeypatch.setattr(pg, "train_step", recorded)
    kw = dict(ckpt_every=3, keep_every=2)
    pg.train(small_cfg(tmp_path, max_steps=2, ema=(0.9, 0.5), **kw))
    monkeypatch.setattr(torch, "load", watched)
    pg.train(small_cfg(tmp_path, max_steps=4, ema=(0.9, 0.5, 0.99), **kw))  # 0.99: new
    assert len(loaded) > 100 and held == [0, 0]
    torch.manual_seed(1234)  # the run's seed: its initial weights, where each EMA starts
    init = vec(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10))
    want = {0.9: init, 0.5: init, 0.99: seen[1]["model"]}  # a new decay starts from the model
    for i, s in enumerate(seen):  # ema = d ema + (1 - d) model after every step
        for d in s.keys() - {"model"}:
            want[d] = d * want[d] + (1 - d) * s["model"]
            torch.testing.assert_close(s[d], want[d], rtol=1e-5, atol=1e-6, msg=f"{i} {d}")
    ck, snap = (ckpt(tmp_path / f) for f in ("ckpt.pt", "ckpt_0000002.pt"))
    assert list(ck["emas"]) == ["0.9", "0.5", "0.99"] and snap["step"] == 2  # a snapshot
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 <= r["gate"] <= 1 for r in rows)
    assert set(rows[0]) == {"step", "epoch", "loss", "fm", "lpips", "pdino", "repa", "gate",
                            "w_ad", "lr", "img_per_s"}
    log = (tmp_path / "log.txt").read_text()
    assert re.search(r"\nsaved \S+ and \S+_0000004.pt in \d+\.\d s\n", log)


def test_a_resume_that_does_not_match_says_what_differs(tmp_path, monkeypatch):
    run = tmp_path / "run"
    pg.train(small_cfg(run, max_steps=2))
    before = {f: (run / f).read_bytes() for f in ("ckpt.pt", "log.txt", "metrics.jsonl")}
    (tmp_path / "icons").mkdir()  # other data: one class
    Image.new("RGB", (8, 8)).save(tmp_path / "icons" / "a.png")
    monkeypatch.setattr(sys, "argv", ["pixelgen.py", "--train", "--out_dir", str(run)])
    with pytest.raises(SystemExit, match=(
            r"ckpt.pt is another run's: --model PixelGen-T/16 \(this run: PixelGen-S/16\); "
            r"--image_size 32 \(this run: 64\); --num_classes 10 \(this run: 1\); --data_path "
            rf"\S* ?\(this run: \S+/icons\)\.\nFor a new run: python pixelgen.py --train "
            rf"--out_dir {run}_new$")):
        pg.train(small_cfg(run, model="PixelGen-S/16", image_size=64, batch_size=1,
                           data_path=str(tmp_path / "icons")))
    assert before == {f: (run / f).read_bytes() for f in before}  # a failed start touches nothing


def test_a_failed_start_says_what_to_do_and_the_folder_is_held_first(tmp_path, monkeypatch):
    import errno
    monkeypatch.setattr(sys, "argv", ["pixelgen.py", "--train"])
    with pytest.raises(SystemExit, match="; try python pixelgen.py --train --batch_size 50000$"):
        pg.train(small_cfg(tmp_path, batch_size=100_000))
    assert os.listdir(tmp_path) == ["lock"]
    held = open(tmp_path / "lock")  # held by another run: this one stops before it loads anything
    fcntl.flock(held, fcntl.LOCK_EX)
    monkeypatch.setattr(pg, "ToyShapes", lambda *a: pytest.fail("data loaded before the lock"))
    with pytest.raises(SystemExit, match=f"{tmp_path} is in use by another run"):
        pg.train(small_cfg(tmp_path))
    for e in (errno.ENOSYS, errno.ENOLCK):  # storage without locks (Lustre's noflock): unlocked
        monkeypatch.setattr(fcntl, "flock", lambda *a, e=e: (_ for _ in ()).throw(OSError(e, "")))
        pg.hold_folder(str(tmp_path))


# -------------------------------------------------------------------------------------------------
# Training in two processes (gloo on CPU): one spawn runs every scenario; a test checks each

def _steps_grads(mp):  # each AdamW step's [(gradient, in DDP's buckets)]
    grads, step = [], torch.optim.AdamW.step
    mp.setattr(torch.optim.AdamW, "step", lambda opt, *a, **k: grads.append([
        (p.grad.clone(), p.grad._base is not None) for p in opt.param_groups[0]["params"]]) or
        step(opt, *a, **k))
    return grads


def _split(rank, out, mp):  # a global batch of 8 on 2 processes, in micro-batches of 4, then 2
    for K in (1, 2):
        grads = _steps_grads(mp)
        pg.train(small_cfg(f"{out}/{K}", max_steps=2, batch_size=8, grad_accum=K))
        torch.save(grads, f"{out}/{K}.{rank}.pt")


def _after_step(mp, rank, step, then):  # then() on rank 1 after its train_step of `step`
    real = pg.train_step
    mp.setattr(pg, "train_step", lambda *a: (real(*a), rank and a[4] + 1 == step and then()))


def _stop(rank, out, mp, late=False):  # rank 1 is told to stop in step 2 (late: after the vote)
    armed, all_reduce = [], pg.dist.all_reduce
    term = lambda *_: os.kill(os.getpid(), signal.SIGTERM)

    def vote(x, op=pg.dist.ReduceOp.SUM, **kw):
        all_reduce(x, op, **kw)
        if armed and op == pg.dist.ReduceOp.MAX:  # the stop vote
            term(armed.clear())

    mp.setattr(pg.dist, "all_reduce", vote)
    _after_step(mp, rank, 2, (lambda: armed.append(1)) if late else term)
    pg.train(small_cfg(out, max_steps=50, ckpt_every=1000))


def _slow_save(rank, out, mp):  # rank 0 writes for longer than the process group's timeout, 1 s
    init, save = pg.dist.init_process_group, pg.save_checkpoint
    mp.setattr(pg.dist, "init_process_group", lambda *a, **k: init(
        *a, **{**k, "timeout": pg.datetime.timedelta(0, 1)}))
    mp.setattr(pg, "save_checkpoint", lambda *a: (time.sleep(2 * (a[0]["step"] == 2)), save(*a)))
    pg.train(small_cfg(out, max_steps=3))


def _unshared(rank, out, mp):  # rank 1's --out_dir is on its node's own disk: no ckpt.pt there
    for steps in (1, 2):
        pg.train(small_cfg(out + "_node1" * rank, max_steps=steps, ckpt_every=1))


def _eval_fails(rank, out, mp):  # on one process: Inception, metrics, grid (an OOM, say)
    _fake_network(mp)
    for owner, name, r in [(fid, "inception_outputs", 1),  # step 1, rank 1: before the gather
                           (fid, "compute_metrics", 0),  # step 2, rank 0: after it
                           (pg, "save_grid", 0)]:  # step 1: rank 0's grid
        def once(*a, real=getattr(owner, name), e=RuntimeError(f"{name} failed"), n=[rank != r]):
            if n.pop() if n else 1:
                return real(*a)
            raise e
        mp.setattr(owner, name, once)
    pg.train(small_cfg(out, max_steps=3, eval_every=1, eval_samples=4, sample_steps=2,
                       sample_every=1, fid_ref=f"{out}/../ref.npz",
                       fid_weights=f"{out}/../inception.pth"))


SAMPLE = ("--sample --ckpt {0}/split/1/ckpt.pt --out_dir {1} --num_samples 8 --batch_size 2 "
          "--sample_steps 2 --fid_ref {0}/ref.npz --fid_weights {0}/inception.pth --cfg_scale 1 2")


def _sample(rank, out, mp):  # --sample over 2 processes; what the gathers return on each
    _fake_network(mp)
    got, gather = [], pg.Procs.gather
    mp.setattr(pg.Procs, "gather", lambda *a: got.append(gather(*a)) or got[-1])
    pg.main(SAMPLE.format(f"{out}/..", out).split())
    torch.save(got, f"{out}/{rank}.pt")


def _fail(rank, out, mp):  # rank 1 fails in step 2; leaving the group hangs (as NCCL's can)
    mp.setattr(pg.dist, "destroy_process_group", lambda: time.sleep(600))
    _after_step(mp, rank, 2, lambda: (open(f"{out}.t", "w").write(str(time.time())), 1 / 0))
    pg.train(small_cfg(out, max_steps=50))


SCENARIOS = dict(split=_split, stop=_stop, late_stop=functools.partial(_stop, late=True),
                 unshared=_unshared, eval_fails=_eval_fails, slow_save=_slow_save,
                 sample=_sample, fail=_fail)  # fail ends both processes: last


def _two_process_worker(rank, root, ports):  # each process group on a port of its own
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    pg.random_nets, init = small_random_nets, pg.dist.init_process_group
    pg.dist.init_process_group = lambda *a, **k: os.environ.update(
        MASTER_PORT=str(ports.pop())) or init(*a, **k)
    for name, scenario in SCENARIOS.items():
        os.makedirs(f"{root}/{name}", exist_ok=True)
        try:
            with pytest.MonkeyPatch.context() as mp:
                scenario(rank, f"{root}/{name}", mp)
            open(f"{root}/{name}.{rank}.done", "w").close()
        except BaseException as e:  # noqa: B036 (SystemExit too): for the test of the scenario
            open(f"{root}/{name}.{rank}.error", "w").write(repr(e))
            pg.dist.destroy_process_group() if pg.dist.is_initialized() else None


@pytest.fixture
def two_processes(tmp_path_factory):
    # one spawn, once per session (the first xdist worker here runs it, the other waits); when
    # both processes had ended (a hang: at 150 s), and how
    import socket
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "two_processes"
    with open(f"{root}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not root.exists():
            root.mkdir()
            _fid_files(root)
            ports = []
            for _ in range(12):
                with socket.socket() as s:
                    ports.append(s.bind(("127.0.0.1", 0)) or s.getsockname()[1])
            spawn = torch.multiprocessing.spawn(_two_process_worker, (str(root), ports), 2, False)
            deadline = time.time() + 150
            while any(p.is_alive() for p in spawn.processes) and time.time() < deadline:
                time.sleep(0.05)
            codes = [p.exitcode for p in spawn.processes]
            (root / "ended").write_text(json.dumps([time.time(), codes]))
            for p in spawn.processes:
                p.kill()
    return root


def _outcome(root, name):  # the scenario's folder, once both processes are done
    errors = [p.read_text() for p in root.glob(f"{name}.*.error")]
    assert not errors and len(list(root.glob(f"{name}.*.done"))) == 2, errors or "did not finish"
    return root / name


def test_ddp_and_any_split_into_the_same_micro_batches_train_alike(tmp_path, two_processes):
    out = _outcome(two_processes, "split")  # a micro-batch's loss is its mean; presets w/o dropout
    for K in (1, 2):  # 2 processes x K micro-batches of b images train as 1 x 2K of b
        with pytest.MonkeyPatch.context() as mp:
            grads = _steps_grads(mp)
            pg.train(small_cfg(tmp_path / str(K), max_steps=2, batch_size=8, grad_accum=2 * K))
        for (g, _), (ddp, in_buckets) in zip(grads[0], torch.load(out / f"{K}.0.pt")[0]):
            torch.testing.assert_close(ddp, g, rtol=1e-4, atol=1e-6)
            assert in_buckets  # no second copy
        one, two = (ckpt(d / str(K) / "ckpt.pt") for d in (tmp_path, out))
        for part in ("model", "emas", "loss"):  # 2 AdamW steps of lr 1e-3: weights move by 2e-3
            torch.testing.assert_close(two[part], one[part], rtol=0, atol=1e-4, msg=f"{K} {part}")


@pytest.mark.parametrize("name, step", [("stop", 2), ("late_stop", 3), ("slow_save", 3)])
def test_a_signal_or_a_slow_save_on_one_process_holds_all_at_one_step(two_processes, name, step):
    # a stop: decided once per step, by a vote (a signal after it counts at the next); a slow
    # write: waited for on the host, in the gloo group of long timeout, not in a collective
    out = _outcome(two_processes, name)
    assert ckpt(out / "ckpt.pt")["step"] == step
    assert name == "slow_save" or f" s\nstopped after step {step};" in (out / "log.txt").read_text()


def test_an_unshared_out_dir_stops_every_process(two_processes):  # the resume: decided once
    errors = [(two_processes / f"unshared.{r}.error").read_text() for r in (0, 1)]
    assert all("--out_dir must be on storage that every node sees" in e for e in errors), errors
    assert ckpt(two_processes / "unshared" / "ckpt.pt")["step"] == 1  # no step in the second run


def test_an_evaluation_or_grid_failing_on_one_process_fails_on_all(two_processes):
    # each cross-process step of an evaluation runs in an agreement
    log = (_outcome(two_processes, "eval_fails") / "log.txt").read_text()
    for what, step, e in [("evaluation", 1, "it failed on process 1"),
                          ("sample grid", 1, "save_grid"), ("evaluation", 2, "compute_metrics")]:
        assert f"{what} at step {step} failed, training goes on: RuntimeError('{e}" in log
    assert "eval step 3 ema 0.99 cfg 2: FID " in log  # then all is well


def test_two_processes_sample_and_evaluate_as_one(tmp_path, two_processes, monkeypatch):
    # images (in batches of the same size) and their Inception outputs, gathered in image order
    # on rank 0 alone, do not depend on the number of processes: nor do the metrics
    out, threads = _outcome(two_processes, "sample"), torch.get_num_threads()
    _fake_network(monkeypatch)
    torch.set_num_threads(1)  # as each of the two processes: the same kernels, the same rounding
    try:
        pg.main(SAMPLE.format(two_processes, tmp_path).split())
    finally:
        torch.set_num_threads(threads)
    one, two = ([{k: r[k] for k in METRIC_KEYS} for r in json.load(open(d / "eval.json"))]
                for d in (tmp_path, out))
    assert len(one) == 2 and one == two
    for f in ("cfg1", "cfg2"):
        f = f"samples_0000002/samples_ema0.99_{f}.npz"
        assert np.array_equal(np.load(tmp_path / f)["arr_0"], np.load(out / f)["arr_0"])
    assert [len(u) for u in torch.load(out / "0.pt")] == [8, 8]  # 2 settings x 4 images x 2
    assert torch.load(out / "1.pt") == [None, None]


def test_one_process_failing_ends_the_job_at_once(two_processes):  # torchrun ends the rest
    ended, codes = json.loads((two_processes / "ended").read_text())
    assert codes == [1, 1] and ended - float((two_processes / "fail.t").read_text()) < 10


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


# -------------------------------------------------------------------------------------------------
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
