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
REAL_PERCEPTUAL_NETS = pg.perceptual_nets


def small_perceptual_nets(cfg, device, log=print):
    """pg.perceptual_nets for training runs in the tests: random DINOv2 (32 wide, 1 block) and LPIPS on SqueezeNet,
    built in milliseconds with fixed weights (the global RNG is left alone); real-size nets for --perceptual_init
    pretrained, whose tests need them."""
    if cfg.perceptual_init != "random":
        return REAL_PERCEPTUAL_NETS(cfg, device, log)
    import lpips
    with torch.random.fork_rng():
        torch.manual_seed(0)
        d = dino.DINOv2(embed_dim=32, depth=1, num_heads=2) if cfg.pdino_weight or cfg.repa_weight else None
        lp = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=True, verbose=False) if cfg.lpips_weight else None
    return tuple(n.to(device).eval().requires_grad_(False) if n is not None else None for n in (d, lp))


@pytest.fixture(autouse=True)
def _small_nets(monkeypatch):
    monkeypatch.setattr(pg, "perceptual_nets", small_perceptual_nets)


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


def loss_of(loss_fn, model, x, y, t, eps, drop=None, norm=None, adapt=False):  # the loss on given draws
    drop = torch.zeros(len(t), dtype=torch.bool) if drop is None else drop
    return loss_fn(model, x, y, pg.make_draws(t, drop, eps, loss_fn.gate_t, norm), adapt)


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


# ---------------------------------------------------------------------------------------------------------------
# Model: JiT

# Official PixelGen-XL/16 and -L/16 state dicts, in order: the non-block keys, then per-block keys for each block.
BLOCK_KEYS = [("norm1.weight", ("D",)), ("attn.q_norm.weight", ("hd",)), ("attn.k_norm.weight", ("hd",)),
              ("attn.qkv.weight", ("3D", "D")), ("attn.qkv.bias", ("3D",)), ("attn.proj.weight", ("D", "D")),
              ("attn.proj.bias", ("D",)), ("norm2.weight", ("D",)), ("mlp.w12.weight", ("2F", "D")),
              ("mlp.w12.bias", ("2F",)), ("mlp.w3.weight", ("D", "F")), ("mlp.w3.bias", ("D",)),
              ("adaLN_modulation.1.weight", ("6D", "D")), ("adaLN_modulation.1.bias", ("6D",))]
OFFICIAL = {
    "PixelGen-XL/16": dict(D=1152, depth=28, hd=72, F=3072, n=406, params=676_994_112, drop=range(7, 21), embed=[
        ("x_embedder.proj1.weight", (1152, 3, 16, 16)), ("x_embedder.proj1.bias", (1152,))]),
    "PixelGen-L/16": dict(D=1024, depth=24, hd=64, F=2730, n=351, params=459_139_808, drop=[], embed=[
        ("x_embedder.proj1.weight", (128, 3, 16, 16)), ("x_embedder.proj2.weight", (1024, 128, 1, 1)),
        ("x_embedder.proj2.bias", (1024,))]),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_state_dict_matches_official_layout(name):
    o = OFFICIAL[name]
    D, dims = o["D"], dict(D=o["D"], hd=o["hd"], F=o["F"], **{"3D": 3 * o["D"], "6D": 6 * o["D"], "2F": 2 * o["F"]})
    expected = ([("pos_embed", (1, 256, D)), ("in_context_posemb", (1, 32, D)), ("t_embedder.mlp.0.weight", (D, 256)),
                 ("t_embedder.mlp.0.bias", (D,)), ("t_embedder.mlp.2.weight", (D, D)), ("t_embedder.mlp.2.bias", (D,)),
                 ("y_embedder.embedding_table.weight", (1001, D))] + o["embed"]
                + [(f"blocks.{i}.{k}", tuple(dims[s] for s in shape))
                   for i in range(o["depth"]) for k, shape in BLOCK_KEYS]
                + [("final_layer.norm_final.weight", (D,)), ("final_layer.linear.weight", (768, D)),
                   ("final_layer.linear.bias", (768,)), ("final_layer.adaLN_modulation.1.weight", (2 * D, D)),
                   ("final_layer.adaLN_modulation.1.bias", (2 * D,))])
    with torch.device("meta"):
        model = pg.JiT(**pg.MODELS[name])
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == o["n"] and got == expected
    assert sum(p.numel() for p in model.parameters()) == o["params"]  # 676M / 459M as the paper reports
    # XL's dropout acts only in the middle half of the blocks
    assert [i for i, b in enumerate(model.blocks) if b.attn.proj_drop.p > 0] == list(o["drop"])


def test_position_encodings_closed_forms():
    D, g = 16, 4  # sin-cos: the first half of the channels encodes the column, the second the row
    pe = pg.sincos_pos_embed(D, g)
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        row = pe[r * g + c].numpy()
        want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
        np.testing.assert_allclose(row, want, atol=1e-6)
    hd, g, L = 8, 3, 2
    cos, sin = pg.rope_2d(g, hd, L)  # (L + 9, 4): one angle per pair
    assert torch.equal(cos[:L], torch.ones(L, 4)) and torch.equal(sin[:L], torch.zeros(L, 4))
    # hand-computed: token (row 1, col 2); pairs 0, 1 turn by row * (1, 1e4^-0.5), pairs 2, 3 by col * (1, 1e4^-0.5)
    i = L + 1 * g + 2
    want = torch.tensor([1.0, 10000 ** -0.5, 2.0, 2 * 10000 ** -0.5])
    torch.testing.assert_close(torch.atan2(sin[i], cos[i]), want)
    # turning each pair with real cos / sin (as the official t * cos + rotate_half(t) * sin) is the complex product
    x = torch.randn(2, 4, L + g * g, hd)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
    torch.testing.assert_close(pg.apply_rope(x, cos, sin), torch.view_as_real(z).flatten(-2), rtol=1e-6, atol=1e-6)
    q, k = torch.randn(hd), torch.randn(hd)
    rot = lambda u, j: pg.apply_rope(u[None, None, None], cos[j][None], sin[j][None])
    dot = lambda a, b: (rot(q, a) * rot(k, b)).sum()
    # the same relative offset (+1 row, +1 col) gives the same score: RoPE encodes relative positions
    torch.testing.assert_close(dot(L + 0, L + 4), dot(L + 4, L + 8))


def test_forward_is_zero_at_init_conditioned_and_returns_the_tokens_entering_a_block():
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([3, 4])
    assert torch.equal(tiny_jit()(x, t, y), torch.zeros_like(x))  # the output layer starts at zero
    m = randomize(tiny_jit(depth=4, in_context_start=1))
    seen = []
    for b in m.blocks:
        b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    ref = m(x, t, y)
    for k in range(4):  # the image tokens entering block k; at k = in_context_start, before the class tokens join
        x_hat, h = m(x, t, y, return_layer=k)
        assert torch.equal(x_hat, ref) and torch.equal(h, seen[k][:, -4:]) and h.shape == (2, 4, 64)
    assert seen[1].shape[1] == 4 + 3  # block 1 runs with the in-context tokens
    assert not torch.allclose(ref, m(x, t, y + 1)) and not torch.allclose(ref, m(x, t + 0.1, y))  # class, time


def _loss_and_grads(model, loss_fn, x, y, t, eps, seed=0, bf16=False):
    """One PixelGenLoss step -> (terms, grads of all trainables (model + REPA head), bytes saved for backward, and
    the number of block forward calls)."""
    model.zero_grad(set_to_none=True)
    loss_fn.zero_grad(set_to_none=True)
    saved, calls = [], []
    # a pre-hook: checkpoint's recomputation stops once it has what backward needs, so the block never returns
    hooks = [b.register_forward_pre_hook(lambda *a: calls.append(1)) for b in model.blocks]
    torch.manual_seed(seed)  # dropout masks
    keep = lambda a: saved.append(a.numel() * a.element_size()) or a  # the bytes autograd keeps for backward
    hook = torch.autograd.graph.saved_tensors_hooks(keep, lambda a: a)
    with hook, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = loss_of(loss_fn, model, x, y, t, eps)
    out["loss"].backward()
    [h.remove() for h in hooks]
    named = list(model.named_parameters()) + [("proj." + n, p) for n, p in loss_fn.proj.named_parameters()]
    return out, {n: p.grad for n, p in named if p.requires_grad}, sum(saved), len(calls)


def test_grad_ckpt_same_loss_and_gradients_with_dropout_and_repa():
    # dropout in blocks 1, 2 (middle half of 4), training mode; the REPA feature comes from block 2's input
    model, loss_fn = randomize(tiny_jit(attn_drop=0.2, proj_drop=0.3)).train(), make_loss().train()
    x, y, eps = batch()
    t = torch.tensor([0.1, 0.5, 0.29, 0.9])  # two gated samples: every loss term takes part
    ref, g_ref, saved_ref, calls_ref = _loss_and_grads(model, loss_fn, x, y, t, eps)
    model.grad_ckpt = True
    out, g, saved, calls = _loss_and_grads(model, loss_fn, x, y, t, eps)
    # bitwise: checkpoint replays each block with the RNG state of its first run, so the dropout masks agree
    for k in ("loss", "fm", "lpips", "pdino", "repa"):
        assert torch.equal(out[k], ref[k]), k
    assert g.keys() == g_ref.keys() and all(torch.equal(g[n], g_ref[n]) for n in g), "gradients differ"
    # it did checkpoint: every block ran twice (forward, then recomputed in backward), and autograd kept less
    assert (calls_ref, calls) == (4, 8) and saved < saved_ref
    # dropout really acts (so the equality above is about masks), and the seed picks the masks
    model.grad_ckpt = False
    assert not torch.equal(_loss_and_grads(model, loss_fn, x, y, t, eps, seed=1)[0]["loss"], ref["loss"])
    model.eval()  # eval / no_grad ignore grad_ckpt: no recomputation to pay for when there is no backward
    model.grad_ckpt = True
    assert _loss_and_grads(model, loss_fn, x, y, t, eps)[3] == 4


@pytest.mark.parametrize("grad_ckpt", [False, True])
def test_jit_compiles_fullgraph_with_repa_feature(grad_ckpt, compiled):
    """torch.compile(fullgraph=True) traces the whole denoiser, RoPE and checkpointed blocks included, into
    one graph (aot_eager: the compiler front end and autograd without code generation, fast on a CPU)."""
    # 2 blocks keep compilation short: block 0 adds the class tokens, the REPA feature (block 1) drops them again
    model = randomize(tiny_jit(depth=2, in_context_start=0)).train()
    model.grad_ckpt = grad_ckpt
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 10])
    runs = []
    for net in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        model.zero_grad(set_to_none=True)
        x_hat, h = net(x, t, y, return_layer=1)
        (x_hat.pow(2).mean() + h.pow(2).mean()).backward()
        runs.append([x_hat, h] + [p.grad for p in model.parameters() if p.requires_grad])
    assert h.shape == (2, 4, 64) and all(a is not None for a in runs[1])
    for a, b in zip(*runs):  # measured: bitwise equal on CPU float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    values = [n.meta.get("example_value") for g in compiled for n in g.graph.nodes]  # the traced tensors
    assert values and not any(torch.is_tensor(v) and v.is_complex() for v in values)  # no code for complex ones


# ---------------------------------------------------------------------------------------------------------------
# Flow

def test_flow_math_hand_computed():
    torch.testing.assert_close(pg.time_grid(4, 1.0), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # t = s / (s + 2 (1 - s)): 0, 1/7, 1/3, 3/5, 1
    torch.testing.assert_close(pg.time_grid(4, 2.0), torch.tensor([0.0, 1 / 7, 1 / 3, 0.6, 1.0]))
    x, eps, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0.0, 0.5, 0.99])
    x_t = pg.interpolate(x, eps, t)
    torch.testing.assert_close(x_t[1], 0.5 * x[1] + 0.5 * eps[1])
    v = pg.x_to_v(x, x_t, t, 0.05)
    torch.testing.assert_close(v[:2], (x - eps)[:2])                  # v = x - eps away from t = 1
    torch.testing.assert_close(v[2], (x[2] - x_t[2]) / 0.05)           # 1 - t clamped at t_eps
    g = torch.Generator().manual_seed(0)
    t = pg.sample_t(200_000, -0.8, 0.8, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() + 0.8) < 0.01 and abs(logit.std() - 0.8) < 0.01
    assert 0.50 < (t >= 0.3).float().mean() < 0.54  # about 52% of samples pass the gate


# ---------------------------------------------------------------------------------------------------------------
# Objective (paper Eqs. 5-9)

def test_loss_terms_equal_the_official_masked_computation_on_the_whole_batch():
    """Each term by hand, as the official code computes it: both nets on the whole batch, per-sample values masked by
    the gate, sum / count. The loss runs the nets on the gated samples only: the same terms and gradients (which
    reach the model through both perceptual nets)."""
    x, y, eps = batch(6)
    t = torch.tensor([0.1, 0.5, 0.29, 0.9, 0.31, 0.05])
    (d, lp), m1, loss_fn = frozen_nets(), randomize(tiny_jit()), make_loss()
    m2 = copy.deepcopy(m1)
    out = loss_of(loss_fn, m1, x, y, t, eps)
    out["loss"].backward()
    assert all(p.grad.abs().sum() > 0 for p in loss_fn.proj.parameters())  # REPA's head trains
    head = {f"proj.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}
    assert set(loss_fn.state_dict()) == {"percept_weight"} | head
    tt = t.view(-1, 1, 1, 1)
    x_t = tt * x + (1 - tt) * eps
    x_hat, h = m2(x_t, t, y, return_layer=2)
    mask, z = (t >= 0.3).float(), d(x, 16)
    want = dict(fm=((x_hat - x_t) / (1 - tt) - (x - x_t) / (1 - tt)).pow(2).mean(),
                repa=(1 - F.cosine_similarity(loss_fn.proj(h), z, dim=-1)).mean(),
                lpips=(lp(x_hat, x).view(6) * mask).sum() / mask.sum(),
                pdino=((1 - F.cosine_similarity(d(x_hat, 16), z, dim=-1)).mean(1) * mask).sum() / mask.sum())
    want["loss"] = want["fm"] + 0.1 * want["lpips"] + 0.01 * want["pdino"] + 0.5 * want["repa"]
    want["loss"].backward()
    for k, v in want.items():
        torch.testing.assert_close(out[k].detach(), v.detach(), rtol=1e-5, atol=1e-6, msg=k)
    assert want["lpips"] > 0 and want["pdino"] > 0
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        if p1.grad is not None:
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-7, msg=n)


@pytest.mark.parametrize("ts,n_gated", [([0.1, 0.2, 0.29, 0.0], 0), ([0.3, 0.5, 0.99, 0.31], 4),
                                        ([0.1, 0.3, 0.2, 0.7], 2)])
def test_gate_edge_cases_run_nets_on_gated_samples_only(ts, n_gated):
    model, loss_fn = randomize(tiny_jit()), make_loss()
    x, y, eps = batch()
    draws = pg.make_draws(torch.tensor(ts), torch.zeros(4, dtype=torch.bool), eps, 0.3)
    out = loss_fn(model, x, y, draws)
    out["loss"].backward()
    assert (draws.B, draws.G) == (4, n_gated) and torch.isfinite(out["loss"])
    assert loss_fn.lpips.calls == ([(n_gated, 3, 32, 32)] if n_gated else [])
    assert loss_fn.dino.calls == [(4, 3, 32, 32)] + ([(n_gated, 3, 32, 32)] if n_gated else [])  # target + gated
    if not n_gated:
        assert out["lpips"] == 0 and out["pdino"] == 0


def test_label_dropout_to_the_null_class():
    seen = []
    spy = lambda x, t, y, return_layer=None: seen.append(y.clone()) or x * 0  # the labels the denoiser receives
    loss_fn = pg.PixelGenLoss(64, None, None, lpips_weight=0, pdino_weight=0, repa_weight=0, num_classes=10)
    x, drop = torch.zeros(6, 3, 32, 32), torch.tensor([True, False, False, True, True, False])
    loss_fn(spy, x, torch.arange(6), pg.make_draws(torch.full((6,), 0.5), drop, torch.zeros_like(x), 0.3))
    assert seen[0].tolist() == [10, 1, 2, 10, 10, 5]  # the dropped labels become the null class num_classes


def test_lpips_resize_rule_when_patch_is_not_16():
    model, loss_fn = randomize(tiny_jit(patch_size=8, in_context_start=1)), make_loss(patch_size=8)
    x, y, eps = batch(2, 32)
    out = loss_of(loss_fn, model, x, y, torch.tensor([0.5, 0.9]), eps)
    assert loss_fn.lpips.calls == [(2, 3, 64, 64)]  # H * 16 // patch
    assert out["repa"] > 0 and torch.isfinite(out["loss"])  # DINO tokens (32/8)^2 = 16 align with the model's


def test_released_pdino_behaviour_on_request():
    model = randomize(tiny_jit())
    x, y, eps = batch()
    d, _ = frozen_nets()
    for ts in ([0.1, 0.5, 0.2, 0.9], [0.1, 0.1, 0.1, 0.1]):
        t = torch.tensor(ts)
        out = loss_of(make_loss(gate_pdino=False), model, x, y, t, eps)
        x_hat = model(pg.interpolate(x, eps, t), t, y)
        ungated = (1 - F.cosine_similarity(d.patch_tokens(x_hat, 16), d.patch_tokens(x, 16), dim=-1)).mean()
        want = ungated if max(ts) >= 0.3 else torch.tensor(1.0)  # released code: constant 1 when nothing is gated
        torch.testing.assert_close(out["pdino"], want.detach(), rtol=1e-5, atol=1e-6)


def test_adaptive_perceptual_weight():
    model = randomize(tiny_jit())
    x, y, eps = batch()
    t = torch.tensor([0.5, 0.6, 0.2, 0.8])
    loss_fn = make_loss(adaptive_from=100)
    assert [loss_fn.adapt_due(s) for s in (50, 99, 100, 150, 151)] == [False, False, True, True, False]  # every 50
    loss_of(loss_fn, model, x, y, t, eps)  # not this step: unchanged
    assert loss_fn.percept_weight == 1.0
    out = loss_of(loss_fn, model, x, y, t, eps, adapt=True)
    perc = 0.1 * out["lpips"] + 0.01 * out["pdino"]
    assert perc > 0
    d, lp = frozen_nets()  # both terms by hand, as the loss computes them (no labels dropped), on the same draws
    x_t = pg.interpolate(x, eps, t)
    x_hat, g = model(x_t, t, y), (t >= 0.3).nonzero()[:, 0]
    fm = (pg.x_to_v(x_hat, x_t, t) - pg.x_to_v(x, x_t, t)).pow(2).mean()
    pd = (1 - F.cosine_similarity(d.patch_tokens(x_hat[g], 16), d.patch_tokens(x[g], 16), dim=-1)).mean()
    W = model.final_layer.linear.weight
    g_fm = torch.autograd.grad(fm, W, retain_graph=True)[0].norm()
    g_p = torch.autograd.grad(0.1 * lp(x_hat[g], x[g]).mean() + 0.01 * pd, W)[0].norm()
    want = 0.8 * 1.0 + 0.2 * torch.clamp(g_fm / (g_p + 1e-4), 0, 100)
    torch.testing.assert_close(loss_fn.percept_weight, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["fm"] + want * perc + 0.5 * out["repa"], rtol=1e-4, atol=1e-6)
    assert not make_loss(adaptive_from=0, lpips_weight=0, pdino_weight=0).adapt_due(0)  # nothing to balance


@pytest.mark.parametrize("gate_pdino", [True, False])
def test_micro_batch_shares_add_up_to_the_global_batch(gate_pdino):
    x, y, eps = batch(6)
    t = torch.tensor([0.1, 0.5, 0.29, 0.9, 0.31, 0.05])  # gated: 1 of the first half, 2 of the second
    m1 = randomize(tiny_jit())
    m2 = copy.deepcopy(m1)
    loss_fn = make_loss(gate_pdino=gate_pdino)
    whole = loss_of(loss_fn, m1, x, y, t, eps)
    whole["loss"].backward()
    parts = [loss_of(loss_fn, m2, x[s], y[s], t[s], eps[s], norm=(6, 3)) for s in (slice(0, 3), slice(3, 6))]
    sum(p["loss"] for p in parts).backward()
    for k in ("loss", "fm", "lpips", "pdino", "repa"):
        torch.testing.assert_close(sum(p[k] for p in parts).detach(), whole[k].detach(), rtol=1e-5, atol=1e-7, msg=k)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)
    # per-micro-batch means (the official code's, per GPU) would weight the one gated sample of the first half like
    # the two of the second
    local = [loss_of(loss_fn, m2, x[s], y[s], t[s], eps[s]) for s in (slice(0, 3), slice(3, 6))]
    assert abs(sum(p["lpips"] for p in local) / 2 - whole["lpips"]) > 1e-5 * whole["lpips"]  # (float rounding: 1e-7)


def test_bf16_autocast_objective_close_to_fp32():
    """The GPU training step runs the whole objective under bf16 autocast; CPU autocast shows the same casts.
    Measured over 4 seeds, relative |bf16 - fp32|: loss and fm <= 2.2e-4, LPIPS <= 4.1e-3, P-DINO <= 1.9e-4,
    REPA <= 4e-5; per-parameter gradient cosine >= 0.9996. The bounds below keep a 5-10x margin."""
    model, loss_fn = randomize(tiny_jit()), make_loss()
    x, y, eps = batch()
    t = torch.tensor([0.1, 0.5, 0.29, 0.9])
    ref, g_ref, _, _ = _loss_and_grads(model, loss_fn, x, y, t, eps)
    out, g, _, _ = _loss_and_grads(model, loss_fn, x, y, t, eps, bf16=True)
    for k, rtol in dict(loss=2e-3, fm=2e-3, lpips=2e-2, pdino=2e-3, repa=2e-3).items():
        assert out[k].dtype == torch.float32 and out[k] != ref[k], k  # bf16 did run, the terms come out in fp32
        assert abs(out[k] - ref[k]) <= rtol * abs(ref[k]), (k, out[k], ref[k])
    for n in g:
        assert torch.isfinite(g[n]).all(), n
        assert F.cosine_similarity(g[n].flatten(), g_ref[n].flatten(), dim=0) > 0.99, n


# ---------------------------------------------------------------------------------------------------------------
# Samplers

class Fn(nn.Module):
    """An analytic x-predictor x_hat = f(x, t, y), t shaped (B, 1, 1, 1); records its calls, rows and times."""

    def __init__(self, f, num_classes=2):
        super().__init__()
        self.f, self.num_classes, self.rows, self.times = f, num_classes, 0, []

    def forward(self, x, t, y):
        self.rows += x.shape[0]
        self.times.append(t[0].item())
        return self.f(x, t.view(-1, 1, 1, 1), y)


@pytest.mark.parametrize("sampler", ["heun", "euler", "adams2"])
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_perfect_predictor_lands_on_the_image(sampler, shift):
    targets = torch.rand(4, 3, 8, 8) * 2 - 1  # a one-image dataset per class: x_hat = targets[y]
    noise, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    m = Fn(lambda x, t, y: targets[y], num_classes=3)
    out = pg.sample(m, noise, y, steps=10, sampler=sampler, time_shift=shift)
    torch.testing.assert_close(out, targets[y], atol=1e-5, rtol=0)


def test_cfg_in_v_space_hand_written():
    targets = torch.rand(3, 3, 4, 4) * 2 - 1  # class 0, class 1, null (2)
    noise, y, w = torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), 3.0
    ts = pg.time_grid(2, 1.0)  # 0, 0.5, 1
    x = noise.clone()
    for i in range(2):  # Euler by hand; guidance only while 0.1 < t <= 0.5 (closed at hi), i.e. at t = 0.5 only
        t = ts[i]
        v_c, v_u = (targets[y] - x) / (1 - t), (targets[2] - x) / (1 - t)
        v = v_u + w * (v_c - v_u) if 0.1 < t <= 0.5 else v_c
        x = x + v * (ts[i + 1] - t)
    m = Fn(lambda x, t, y: targets[y])
    out = pg.sample(m, noise, y, steps=2, sampler="euler", cfg_scale=w, cfg_interval=(0.1, 0.5), time_shift=1.0)
    torch.testing.assert_close(out, x)
    assert m.rows == 2 + 4  # t = 0: conditional only; t = 0.5: both branches


@pytest.mark.parametrize("w, interval, guided", [
    (1.0, (0.0, 1.0), False),  # scale 1: never guided
    (3.0, (0.0, 1.0), True),   # lo = 0 is open: t = 0 is not guided, t = 0.5 is
    (3.0, (0.1, 0.5), False),  # hi = 0.5 is open (heun / euler would guide at t = 0.5)
    (3.0, (0.5, 0.9), False),  # lo = 0.5 is open
])
def test_adams2_two_steps_hand_computed(w, interval, guided):
    c = torch.rand(3, 3, 4, 4) * 2 - 1  # class 0, class 1, null (2)
    f = lambda x, t, y: torch.tanh(x) * (1 + t) + c[y]  # noqa: E731
    noise, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])

    def v(x, t, guide):
        v_c, v_u = (f(x, t, y) - x) / (1 - t), (f(x, t, torch.tensor([2, 2])) - x) / (1 - t)
        return v_u + w * (v_c - v_u) if guide else v_c

    # Grid 0, 0.5, 1 (shift 1). Step 1 is Euler. Step 2 integrates the line through (0, v0), (0.5, v1) over [0.5, 1]:
    # int (t - 0.5) / (0 - 0.5) dt = -0.25, int (t - 0) / (0.5 - 0) dt = 0.75; normalised by their sum 0.5: (-0.5, 1.5).
    v0 = v(noise, 0.0, False)
    x1 = noise + 0.5 * v0
    v1 = v(x1, 0.5, guided)
    x2 = x1 + 0.5 * (-0.5 * v0 + 1.5 * v1)
    m = Fn(f)
    out = pg.sample(m, noise, y, steps=2, sampler="adams2", cfg_scale=w, cfg_interval=interval, time_shift=1.0)
    torch.testing.assert_close(out, x2)
    assert m.times == [0.0, 0.5] and m.rows == 2 + (4 if guided else 2)


def test_adams2_exact_for_velocities_linear_in_t_on_a_shifted_grid():
    # v = p + q t (x_hat = x + (1 - t) v): after the Euler first step, each step integrates v exactly, on any grid, so
    # x_N = x_0 + int_0^1 v dt - (Euler's first-step error q h_0^2 / 2) = x_0 + p + q / 2 - q h_0^2 / 2; Euler itself
    # loses q h_i^2 / 2 on every step.
    p, q, x0 = torch.randn(3, 3, 4, 4).unbind()
    m = Fn(lambda x, t, y: x + (1 - t) * (p + q * t))
    ts = pg.time_grid(7, 3.0)
    out = pg.sample(m, x0[None], torch.zeros(1, dtype=torch.long), steps=7, sampler="adams2", time_shift=3.0)
    torch.testing.assert_close(out[0], x0 + p + q / 2 - q * ts[1] ** 2 / 2, atol=1e-5, rtol=1e-5)
    # NOTE(official): AdamLM feeds the net t_cur += dt, not the grid value; on this grid they differ in the last bit
    t_cur = [torch.zeros(())]
    for dt in ts.diff()[:-1]:
        t_cur.append(t_cur[-1] + dt)
    assert m.times == torch.stack(t_cur).tolist() and m.times[2] != ts[2].item()
    euler = pg.sample(m, x0[None], torch.zeros(1, dtype=torch.long), steps=7, sampler="euler", time_shift=3.0)
    torch.testing.assert_close(euler[0], x0 + p + q / 2 - q * (ts.diff() ** 2).sum() / 2, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler, calls", [("heun", 2 * 25 - 1), ("adams2", 25)])
def test_rows_unguided_are_half_the_official_and_guidance_doubles_only_inside_the_interval(sampler, calls):
    # The official samplers always double the batch: 2 B rows per call. The T2I setting: 25 steps, shift 3, CFG 4.
    B, N = 3, 25
    noise, y = torch.randn(B, 3, 4, 4), torch.zeros(B, dtype=torch.long)
    m = Fn(lambda x, t, y: x * t)
    pg.sample(m, noise, y, steps=N, sampler=sampler, cfg_scale=1.0, time_shift=3.0)
    assert len(m.times) == calls and m.rows == B * calls
    times, ts = m.times, pg.time_grid(N, 3.0)[:N].tolist()
    for lo, hi in ((0.0, 1.0), (0.1, 0.9)):  # heun guides steps with lo < t <= hi, adams2 those with lo < t < hi
        m = Fn(lambda x, t, y: x * t)
        pg.sample(m, noise, y, steps=N, sampler=sampler, cfg_scale=4.0, cfg_interval=(lo, hi), time_shift=3.0)
        steps = [lo < t < hi or (sampler == "heun" and t == hi) for t in ts]
        guided = sum(steps) + (sum(steps[:-1]) if sampler == "heun" else 0)  # heun's corrector: as its step
        assert m.times == times and m.rows == B * (calls + guided) and 0 < guided < calls


def test_unknown_sampler_names_are_rejected():
    m, noise, y = Fn(lambda x, t, y: x), torch.randn(1, 3, 4, 4), torch.zeros(1, dtype=torch.long)
    for name in ("adams", "Heun", "dpm"):
        with pytest.raises(ValueError, match=r"unknown sampler .*heun, euler, adams2"):
            pg.sample(m, noise, y, steps=2, sampler=name)
    assert m.rows == 0
    assert pg.parse_args(["--sample", "--sampler", "adams2"])[0].sampler == "adams2"
    with pytest.raises(SystemExit):
        pg.parse_args(["--sample", "--sampler", "adams"])


# ===============================================================================================================
# Engineering
# ---------------------------------------------------------------------------------------------------------------
# Config and CLI

def _write_ckpt(path, emas=("0.99",), step=1, **config):
    """One of our checkpoints: a PixelGen-T/16 of 10 classes at 32 px, with random weights that are also every EMA;
    config adds settings of the run. Returns the model."""
    model = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10))
    sd, conf = model.state_dict(), dict(model="PixelGen-T/16", image_size=32, num_classes=10, **config)
    torch.save(dict(model=sd, ema=sd, emas={d: sd for d in emas}, step=step, config=conf), path)
    return model


def test_cli_flags_and_errors(tmp_path, capsys, monkeypatch):
    d = str(tmp_path)
    cfg, mode = pg.parse_args(["--train"])
    assert mode == "train" and cfg.recipe == "demo" and cfg.model == "PixelGen-T/16" and cfg.num_classes == 0
    cfg, _ = pg.parse_args(["--train", "--data_path", d])
    assert (cfg.recipe, cfg.model, cfg.batch_size, cfg.lr, cfg.epochs, cfg.ema, cfg.sampler, cfg.time_shift,
            cfg.keep_every) == ("xl-80ep", "PixelGen-XL/16", 256, 1e-4, 80, (0.9999,), "heun", 2.0, 100_000)
    cfg, _ = pg.parse_args(["--train", "--data_path", d, "--recipe", "xl-160ep"])
    assert cfg.epochs == 160 and cfg.cfg_scale == (2.25,) and cfg.adaptive_from == 400_000
    cfg, _ = pg.parse_args(["--train", "--data_path", d, "--recipe", "l-200k", "--lr", "2e-4", "--cfg_interval", "0",
                            "1", "--background", "0", "0", "0"])
    assert cfg.model == "PixelGen-L/16" and cfg.max_steps == 200_000 and cfg.sampler == "euler" and cfg.lr == 2e-4
    assert cfg.cfg_interval == (0.0, 1.0) and cfg.background == (0, 0, 0)
    # -1: each preset trains with its own REPA layer (8 for L and XL, as official), so a small model needs no flag
    assert pg.build(small_cfg(d), torch.device("cpu"), log=print)[2].repa_layer == pg.REPA_LAYER["PixelGen-T/16"] == 2
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU trains the demo longer; explicit flags win
    assert [pg.parse_args(["--train"] + f)[0].max_steps for f in ([], ["--device", "cpu"], ["--max_steps", "10"])] \
        == [3000, 500, 10] and pg.parse_args(["--train"])[0].batch_size == 64
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for bad, msg in [(["--model", "PixelGen-XXL/16"], "invalid choice"), (["--sample"], "not allowed"),
                     (["--batch_size", "-2"], "--batch_size must be positive, got -2"), (["--no-such-flag"], "unrecog"),
                     (["--lr", "0"], "--lr must be positive, got 0"), (["--keep_every", "-1"], "0 or more, got -1"),
                     (["--cfg_interval", "0.9", "0.1"], "--cfg_interval LO HI needs LO <= HI, got 0.9 0.1"),
                     (["--repa_layer", "6"], "--repa_layer 6 must be below 6, the depth of PixelGen-T/16"),
                     (["--image_size", "60"], "--image_size 60 is not a multiple of 16, the patch size of "),
                     (["--ema", "0.999", "1.0"], "--ema must be in [0, 1), got 0.999 1.0"),
                     (["--metrics", "fid", "kid"], "invalid choice: 'kid'"), (["--background", "255"], "expected 3"),
                     (["--background", "255", "0", "300"], "--background R G B takes values in 0..255"),
                     (["--batch_size", "16", "--grad_accum", "3"], "processes x --grad_accum = 1 x 3 = 3"),
                     (["--eval_every", "10", "--eval_samples", "1"], "at least 2 samples"),
                     (["--device", "cuda"], "--device cuda: PyTorch sees no GPU"),
                     (["--fid_ref", d + "/none.npz"], "no such file"), (["--data_path", d + "/none"], "no such file")]:
        with pytest.raises(SystemExit):
            pg.parse_args(["--train"] + bad)
        err = capsys.readouterr().err
        assert msg in err and err.count("error:") == 1, (bad, err)
    assert not os.listdir(d)  # bad flags write nothing
    cfg, _ = pg.parse_args(["--sample", "--ema", "0.9", "--num_classes", "10", "--image_size", "128",
                            "--cfg_scale", "2"])
    out = capsys.readouterr().out
    assert cfg.ema_decay == (0.9,) and "--sample reads --ema as --ema_decay 0.9" in out
    assert "--sample ignores --num_classes, --image_size" in out and "--cfg_scale" not in out
    monkeypatch.setenv("WORLD_SIZE", "3")  # the global batch splits over the processes; sampling's need not
    cfg = pg.parse_args(["--train", "--batch_size", "9"])[0]  # 9 = 3 processes x 3
    assert list(pg.flag_errors(pg.dataclasses.replace(cfg, grad_accum=2), "train")) == [
        "--batch_size 9: not a multiple of processes x --grad_accum = 3 x 2 = 6"]
    assert pg.parse_args(["--sample", "--batch_size", "8"])[0].batch_size == 8


@pg.dataclasses.dataclass
class Awkward:  # what --help must read right: a "#" and 2-byte letters in a default, two lines, no comment
    # first group
    url: str = "http://hôst/#añchör"  # a "#" in the default
    pair: tuple = (1.0,
                   2.0)               # the help follows the last line
    # second group
    bare: int = 3


def test_help_is_each_fields_comment_under_its_group(capsys):
    text = " ".join(pg.cli(Awkward).format_help().split())
    assert ("first group: --url URL a \"#\" in the default (default: http://hôst/#añchör) --pair PAIR [PAIR ...] "
            "the help follows the last line (default: 1.0 2.0) second group: --bare BARE (default: 3)") in text
    with pytest.raises(SystemExit):
        pg.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # below: a recipe's value, and an example as it is written
    assert "(default: 0.3)" in out and "demo: PixelGen-T/16" in out and "--num_samples 50000 \\ --fid_ref" in out


# ---------------------------------------------------------------------------------------------------------------
# Pretrained weights

def test_missing_pretrained_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cfg = pg.Config(data_path="/some/imagenet", perceptual_init="pretrained", eval_every=10, fid_ref="ref.npz")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit, match=r"dinov2_vitb14_pretrain.pth: download https://dl.fbaipublicfiles.com/.*"
                                         r"\n.*vgg16-397923af.pth: download https://download.pytorch.org/.*\n.*"
                                         r"pt_inception-2015-12-05-6726825d.pth: download https://github.com/"):
        pg.perceptual_nets(cfg, "cpu")  # every missing file the run needs, in one message
    msgs = []  # the demo (no data path) goes on with random nets and says so
    nets = frozen_nets()  # (their size does not matter here)
    monkeypatch.setattr(dino, "DINOv2", lambda: nets[0])
    monkeypatch.setattr(pg, "make_lpips", lambda *a: nets[1])
    d, lp = pg.perceptual_nets(pg.Config(perceptual_init="pretrained"), "cpu", log=msgs.append)
    assert "RANDOMLY INITIALISED" in msgs[0] and not any(p.requires_grad for p in d.parameters())


def test_lpips_loads_torchvision_vgg_file(tmp_path):
    import torchvision
    with torch.device("meta"):  # torchvision's layout, with random values: only the conv trunk is read
        vgg = torchvision.models.vgg16()
    vgg.features.to_empty(device="cpu").apply(lambda m: [nn.init.normal_(p) for p in m.parameters(recurse=False)])
    torch.save({"features." + k: v for k, v in vgg.features.state_dict().items()}, tmp_path / "vgg.pth")
    lp = pg.make_lpips(str(tmp_path / "vgg.pth"))
    torch.testing.assert_close(getattr(lp.net.slice3, '10').weight, vgg.features[10].weight)  # conv3_1 lands in slice3
    torch.testing.assert_close(getattr(lp.net.slice5, '28').weight, vgg.features[28].weight)
    (tmp_path / "bad.pth").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="bad.pth is not a torchvision VGG16"):
        pg.make_lpips(str(tmp_path / "bad.pth"))


def test_unused_networks_are_not_built_or_run(monkeypatch):
    import dino as dino_lib
    built, (d, lp) = [], frozen_nets()
    monkeypatch.setattr(pg, "make_lpips", lambda *a, **k: built.append("lpips") or lp)
    monkeypatch.setattr(dino_lib, "DINOv2", lambda *a, **k: built.append("dino") or d)
    for weights, want in [(dict(), ["dino", "lpips"]), (dict(lpips_weight=0.0), ["dino"]),
                          (dict(pdino_weight=0.0, repa_weight=0.0), ["lpips"]),
                          (dict(lpips_weight=0.0, pdino_weight=0.0, repa_weight=0.0), [])]:
        built.clear()
        nets = REAL_PERCEPTUAL_NETS(pg.Config(perceptual_init="random", **weights), "cpu", log=lambda m: None)
        assert sorted(built) == want and [n is not None for n in nets] == ["dino" in want, "lpips" in want]
    model, (x, y, eps) = randomize(tiny_jit()), batch()
    t = torch.tensor([0.5, 0.6, 0.1, 0.9])
    for weights, lpips_calls, dino_calls in [
            (dict(lpips_weight=0.0), 0, 2),                      # REPA targets + gated P-DINO
            (dict(pdino_weight=0.0), 1, 1),                      # LPIPS + REPA targets only
            (dict(repa_weight=0.0), 1, 2),                       # gated targets + gated P-DINO
            (dict(pdino_weight=0.0, repa_weight=0.0), 1, 0)]:    # no DINOv2 at all
        loss_fn = make_loss(**weights)
        out = loss_of(loss_fn, model, x, y, t, eps)
        out["loss"].backward()
        assert len(loss_fn.lpips.calls if loss_fn.lpips else []) == lpips_calls, weights
        assert len(loss_fn.dino.calls if loss_fn.dino else []) == dino_calls, weights
        assert (loss_fn.proj is None) == (weights.get("repa_weight", 0.5) == 0) and torch.isfinite(out["loss"])
        if weights.get("repa_weight", 0.5) == 0:
            assert loss_fn.dino is None or loss_fn.dino.calls[0][0] == 3  # targets of the 3 gated samples only


# ---------------------------------------------------------------------------------------------------------------
# Data

def _composite(rgba, bg=(255, 255, 255)):  # the formula in floats: round((a rgb + (255 - a) bg) / 255)
    a = rgba[..., 3:].astype(np.float64)
    return np.round((a * rgba[..., :3] + (255 - a) * np.array(bg)) / 255).astype(np.uint8)


def test_read_image_composites_alpha(tmp_path):
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], np.uint8)
    index, alphas = np.array([[0, 1, 2], [3, 0, 1]], np.uint8), np.array([0, 128, 255, 64], np.uint8)
    grey, galpha = np.array([[0, 90, 255], [30, 200, 7]], np.uint8), np.array([[0, 128, 255], [255, 0, 64]], np.uint8)
    Image.fromarray(np.array([[[10, 100, 200, 128], [10, 100, 200, 0], [10, 100, 200, 255]]], np.uint8),
                    "RGBA").save(tmp_path / "px.png")
    p = Image.fromarray(index, "P")
    p.putpalette(colours.tobytes())
    p.save(tmp_path / "trns.png", transparency=alphas.tobytes())  # palette PNG with a tRNS chunk of alphas
    p.save(tmp_path / "index.gif", transparency=0)  # one transparent index
    Image.fromarray(np.dstack([grey, galpha]), "LA").save(tmp_path / "la.png")
    Image.fromarray(np.dstack([grey] * 3 + [galpha]), "RGBA").save(tmp_path / "grey_rgba.png")
    Image.fromarray(colours[index]).save(tmp_path / "rgb_trns.png", transparency=(9, 9, 9))  # a transparent colour
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning about transparency either
        read = {f: fid.read_image(tmp_path / f) for f in os.listdir(tmp_path)}
    # By hand: (10, 100, 200) at alpha 128 over white: round((128 * 10 + 127 * 255) / 255) = round(132.02), ...
    assert read["px.png"].tolist() == [[[132, 177, 227], [255, 255, 255], [10, 100, 200]]]
    # over (30, 60, 90): round((128 * 10 + 127 * 30) / 255) = round(19.96), round(80.08), round(145.22)
    assert fid.read_image(tmp_path / "px.png", (30, 60, 90)).tolist() == [[[20, 80, 145], [30, 60, 90], [10, 100, 200]]]
    np.testing.assert_array_equal(read["trns.png"], _composite(np.dstack([colours[index], alphas[index]])))
    np.testing.assert_array_equal(read["index.gif"], np.where(index[..., None] == 0, 255, colours[index]))
    np.testing.assert_array_equal(read["la.png"], read["grey_rgba.png"])
    np.testing.assert_array_equal(read["rgb_trns.png"], np.where(index[..., None] == 3, 255, colours[index]))
    for bad in ((0, 0, 256), (0, 0), "white", (0.5, 0, 0)):
        with pytest.raises(ValueError, match="background"):
            fid.read_image(tmp_path / "px.png", background=bad)


def test_image_folder_layout_and_listing(tmp_path, monkeypatch):
    root, icon = tmp_path / "icons", Image.new("RGB", (12, 12))
    for d in ("cats/.cache", "dogs/sub", ".thumbnails"):
        (root / d).mkdir(parents=True)
    for f in ("cats/a.png", "cats/b.PNG", "cats/.cache/c.png", "cats/._a.png", "dogs/sub/d.png", ".thumbnails/t.png",
              "stray.png"):
        icon.save(root / f, "PNG")
    for f in ("dogs/notes.txt", "dogs/logo.svg", "cats/.DS_Store", "readme"):
        (root / f).write_text("not an image")
    data = pg.ImageFolderData(str(root), 16)
    assert data.classes == ["cats", "dogs"] and data.counts == [2, 1] and data.num_classes == 2 and len(data) == 3
    files = [str(root / f) for f in ("cats/a.png", "cats/b.PNG", "dogs/sub/d.png")]
    assert [os.fsdecode(p) for p in data.paths] == files
    assert data.labels.tolist() == [0, 0, 1] == [data[i][1] for i in range(3)]
    assert pg.class_table(data).splitlines() == [
        "data: 3 images in 2 classes", " label   images  class", "     0        2  cats", "     1        1  dogs",
        "ignored: 8 (.thumbnails/, readme, stray.png, cats/.cache/, cats/.DS_Store, ...)"]
    assert data.ignored[5:] == ["cats/._a.png", "dogs/logo.svg", "dogs/notes.txt"]
    assert pg.class_table(pg.ToyShapes(16, n=10), rows=4).splitlines()[2:] == [
        "     0        1  red disc", "     1        1  green square", "   ...", "     8        1  purple checker",
        "     9        1  teal frame"]
    assert pg.ToyShapes(16, n=25).counts == [3] * 5 + [2] * 5 and not pg.ToyShapes(16).ignored
    # A flat folder is one class, named after the folder; its hidden subfolder does not make it a class folder.
    flat = pg.ImageFolderData(str(root / "cats"), 16)
    assert flat.classes == ["cats"] and flat.counts == [2] and flat.ignored == [".cache/", ".DS_Store", "._a.png"]
    # Under torchrun rank 0 alone lists the folder (minutes for ImageNet on a network disk) and sends the listing.
    sent, ctrl = [], object()

    def broadcast(box, src, group):  # rank 0 sends box[0]; the others receive it in theirs
        assert src == 0 and group is ctrl
        box[0] = sent[0] if sent else box[0]
        sent.append(box[0])
    monkeypatch.setattr(pg.dist, "all_reduce", lambda *a, group: None)
    monkeypatch.setattr(pg.dist, "broadcast_object_list", broadcast)
    first = pg.ImageFolderData(str(root), 16, procs=pg.Procs(True, 0, 2, torch.device("cpu"), ctrl))
    monkeypatch.setattr(fid, "scan", lambda *a, **k: pytest.fail("a rank other than 0 listed the folder"))
    other = pg.ImageFolderData(str(root), 16, procs=pg.Procs(True, 1, 2, torch.device("cpu"), ctrl))
    assert len(sent) == 2 and (other.classes, other.counts, other.ignored) == (data.classes, data.counts, data.ignored)
    assert all(np.array_equal(getattr(d, k), getattr(data, k)) for d in (first, other) for k in ("paths", "labels"))


def test_image_folder_items(tmp_path):
    photo, exif = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8), Image.Exif()
    exif[0x0112] = 6  # orientation "rotate 90": ignored, as by torchvision and the ADM suite
    (tmp_path / "a" / "sub").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    rgb = Image.fromarray(photo)
    for f, im in [("a/x.JPEG", rgb), ("a/grey.JPEG", rgb.convert("L")), ("a/cmyk.JPEG", rgb.convert("CMYK")),
                  ("b/palette.png", rgb.convert("P")), ("b/tiny.bmp", rgb.crop((0, 0, 7, 5)))]:  # (tiny: upsampled)
        im.save(tmp_path / f)
    rgb.crop((0, 0, 70, 20)).save(tmp_path / "a" / "sub" / "turned.jpg", exif=exif)
    data = pg.ImageFolderData(str(tmp_path), 16)
    assert len(data) == 6 and Image.open(tmp_path / "a" / "sub" / "turned.jpg").getexif()[0x0112] == 6
    for i in range(len(data)):  # PIL's conversion to RGB (without alpha), then the ADM crop
        with Image.open(os.fsdecode(data.paths[i])) as im:
            want = torch.from_numpy(pg.center_crop(im.convert("RGB"), 16).copy()).permute(2, 0, 1)
        assert torch.equal(data[i][0], want) and data[i][1] == int(i > 3)
    # The listing is numpy arrays, no Python object per image (each data worker would copy those as it reads them).
    assert data.paths.dtype.kind == "S" and data.labels.dtype.kind == "i"
    assert not [k for k, v in vars(data).items() if isinstance(v, (list, tuple)) and len(v) == len(data)]
    # Transparency: the pixels composited onto the data's background make the item.
    (tmp_path / "icons").mkdir()
    rgba = np.random.default_rng(1).integers(0, 256, (40, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "icons" / "a.png")  # halved, then resized
    for bg in ((255, 255, 255), (0, 0, 0)):
        want = pg.center_crop(Image.fromarray(_composite(rgba, bg)), 16)
        assert np.array_equal(pg.ImageFolderData(str(tmp_path / "icons"), 16, bg)[0][0].permute(1, 2, 0).numpy(), want)


def test_data_that_cannot_train_says_what_to_do(tmp_path):
    for d in ("birds", "empty", "vector"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "birds" / "a.png")
    (tmp_path / "birds" / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "vector" / "a.svg").write_text("<svg/>")
    svg = r"; SVG files must be converted first \(to PNG, for example\)\n"
    with pytest.raises(SystemExit, match=r"no image files \(.png, .*\) in \S*empty, \S*vector" + svg) as e:
        pg.ImageFolderData(str(tmp_path), 8)
    assert "ignored: 1 (vector/a.svg)" in str(e.value) and "     0        2  birds" in str(e.value)
    with pytest.raises(SystemExit, match=r"in \S*vector" + svg):  # a flat folder
        pg.ImageFolderData(str(tmp_path / "vector"), 8)
    (tmp_path / "empty" / "a.bmp").mkdir()  # a folder named like an image is not an image
    (tmp_path / "vector" / "b.webp").write_bytes(b"")  # an image file, even unreadable, makes a class
    with pytest.raises(SystemExit, match=r"in \S*empty\n"):
        pg.ImageFolderData(str(tmp_path), 8)
    # An unreadable image is replaced by a readable one of its batch; its path comes with the batch, for the log.
    birds = pg.ImageFolderData(str(tmp_path / "birds"), 8)
    x, y, skipped = pg.collate([birds[0], birds[1]])
    assert torch.equal(x[0], x[1]) and x.shape == (2, 3, 8, 8) and skipped == [str(tmp_path / "birds" / "broken.png")]
    with pytest.raises(RuntimeError, match="broken.png"):
        pg.collate([birds[1]])
    # Fewer images than a global batch: the largest that fits, a multiple of processes x micro-batches.
    for world, fits in [(1, "; --batch_size 10 fits"), (4, "; --batch_size 8 fits"), (8, "")]:
        with pytest.raises(SystemExit) as e:
            pg.check_run(pg.Config(batch_size=16, grad_accum=2), pg.ToyShapes(8, n=10),
                         pg.Procs(world > 1, 0, world, torch.device("cpu")), {})
        assert str(e.value) == "error: 10 images are fewer than one global batch (--batch_size 16)" + fits


def test_adm_center_crop():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255  # the center third is white
    out = pg.center_crop(Image.fromarray(a), 32)  # 300x100 -> halve (BOX) -> 150x50 -> bicubic 96x32 -> crop
    assert out.shape == (32, 32, 3) and out[:, 4:28].min() == 255
    out = pg.center_crop(Image.fromarray(a[:10, :20]), 32)  # upsampling a small image
    assert out.shape == (32, 32, 3)


def test_global_batches_positions():
    seen = {}
    for world, accum in [(1, 1), (1, 2), (2, 1), (2, 2)]:
        got = [[] for _ in range(3)]  # steps 2, 3, 4 (epoch 0 has 3 steps of 8 out of 26 images)
        for rank in range(world):
            it = pg.global_batches(26, 8, world, rank, accum, seed=5, step=2)
            for s in range(3):
                for _ in range(accum):
                    got[s].append(next(it))
        seen[world, accum] = [sorted(sum(g, [])) for g in got]
        assert all(len(m) == 8 // (world * accum) for g in got for m in g)
    assert all(v == seen[1, 1] for v in seen.values())  # every split sees the same global batches
    flat = [i for it in [pg.global_batches(26, 8, 1, 0, 1, seed=5)] for _ in range(3) for i in next(it)]
    assert len(set(flat)) == 24 and seen[1, 1][0] == sorted(flat[16:])  # an epoch is a permutation; resume mid-epoch
    assert set(seen[1, 1][1]).isdisjoint(seen[1, 1][2])  # steps 3 and 4: the batches of an epoch do not overlap
    assert seen[1, 1][1] != sorted(flat[:8])  # epoch 1 is a new permutation


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


# ---------------------------------------------------------------------------------------------------------------
# Sampling and evaluation

def test_load_our_and_official_checkpoints(tmp_path):
    m = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10))
    ema = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10), seed=1)
    # ours name their preset; --ema_decay picks among the EMA decays, a missing one is listed
    conf = dict(model="PixelGen-T/16", image_size=32, num_classes=10)
    emas = {"0.9999": ema.state_dict(), "0.9996": m.state_dict()}
    torch.save(dict(model=m.state_dict(), ema=ema.state_dict(), emas=emas, step=5, config=conf), tmp_path / "two.pt")
    got, _, step = pg.load_denoiser(str(tmp_path / "two.pt"))
    assert list(got) == [0.9999] and step == 5 and same(got[0.9999].state_dict(), ema.state_dict())
    got, _, _ = pg.load_denoiser(str(tmp_path / "two.pt"), decays=(0.9996, 0.9999))
    assert list(got) == [0.9996, 0.9999] and same(got[0.9996].state_dict(), m.state_dict())
    with pytest.raises(SystemExit, match="holds no EMA of decay 0.999; it holds 0.9999, 0.9996"):
        pg.load_denoiser(str(tmp_path / "two.pt"), decays=(0.999,))
    lightning = {"state_dict": {**{"denoiser." + k: v for k, v in m.state_dict().items()},
                                **{"ema_denoiser." + k: v for k, v in ema.state_dict().items()},
                                "diffusion_trainer.proj.0.0.weight": torch.zeros(2, 2)}, "global_step": 7}
    torch.save(lightning, tmp_path / "official.ckpt")
    got, conf, step = pg.load_denoiser(str(tmp_path / "official.ckpt"))
    assert list(got) == [0.9999] and conf is None and step == 7  # the official EMA decay
    assert same(got[0.9999].state_dict(), ema.state_dict()) and got[0.9999].grid * got[0.9999].patch_size == 32
    for k, v, msg in [("final_layer.linear.weight", torch.zeros(5, 192), "are not those of PixelGen-T/16: (.|\n)*size "
                       "mismatch for final_layer.linear.weight"),
                      ("pos_embed", torch.zeros(1, 4, 100), "fit no preset")]:
        torch.save({"state_dict": {**lightning["state_dict"], "ema_denoiser." + k: v}}, tmp_path / "bad.ckpt")
        with pytest.raises(SystemExit, match=msg):
            pg.load_denoiser(str(tmp_path / "bad.ckpt"))
    import argparse  # Lightning files often pickle an argparse.Namespace of hyper-parameters
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(SystemExit, match="--unsafe_load"):
        pg.load_denoiser(str(tmp_path / "pickled.ckpt"))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "grid.png")
    for name in ("grid.png", "two.pt.missing"):  # not a checkpoint; not there
        with pytest.raises(SystemExit, match=r"cannot read .*grid.png as a checkpoint: pass a ckpt.pt written by "
                                             r"--train|two.pt.missing not found: train a model first"):
            pg.load_denoiser(str(tmp_path / name))


def test_sample_program_writes_npz_and_grid_with_the_run_settings_where_no_flag_gives_others(tmp_path, monkeypatch):
    m = _write_ckpt(tmp_path / "ckpt.pt", batch_size=8, sample_steps=3, sampler="euler", cfg_scale=(1.5,))
    cfg, mode = pg.parse_args(["--sample", "--out_dir", str(tmp_path), "--num_samples", "12", "--batch_size", "5",
                               "--save_pngs"])
    pg.sample_main(cfg)  # with the checkpoint's settings
    with np.load(tmp_path / "samples.npz") as f:
        imgs, labels = f["arr_0"], f["arr_1"]
    assert imgs.shape == (12, 32, 32, 3) and imgs.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(12)]
    assert len(os.listdir(tmp_path / "images")) == 12
    assert Image.open(tmp_path / "grid.png").size == (10 * 34 + 2, 34 + 2)  # a column per class: 10 of the 12
    # image i depends only on (seed, i), not on its batch (padded or not), up to the float rounding of batched matmuls
    noise = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(pg.seed_for(cfg.seed, 7)))
    one = pg.sample(m.eval(), noise[None], torch.tensor([7]), 3, "euler", 1.5, cfg.cfg_interval, cfg.time_shift)
    one = ((one + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)[0].numpy()
    assert np.abs(one.astype(int) - imgs[7]).max() <= 1
    calls = []
    monkeypatch.setattr(pg, "sample", lambda model, noise, y, steps, sampler, *a, **k:
                        calls.append((len(noise), steps, sampler)) or noise)
    for flags, first_call in [([], (8, 3, "euler")), (["--batch_size", "3", "--sampler", "heun"], (3, 3, "heun"))]:
        cfg = pg.parse_args(["--sample", "--out_dir", str(tmp_path), "--num_samples", "9"] + flags)[0]
        assert cfg.sample_steps == pg.RECIPES["demo"]["sample_steps"]  # parse_args reads no checkpoint
        calls.clear()
        pg.sample_main(cfg)
        assert calls[0] == first_call  # the checkpoint's settings and batch, not the recipe's; explicit flags win


def test_a_sweep_compiles_one_graph_per_batch_shape(tmp_path, monkeypatch):  # the last batch padded, t contiguous
    graphs, compile_ = [], torch.compile
    backend = lambda gm, inputs: graphs.append(gm) or gm.forward  # one backend for all: dynamo's graphs, run eagerly
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: compile_(fn, backend=backend))
    _write_ckpt(tmp_path / "ckpt.pt", emas=("0.9", "0.5"))
    torch._dynamo.reset()  # before and after: no other test meets dynamo's recompilation limit because of this one
    pg.sample_main(pg.parse_args(["--sample", "--out_dir", str(tmp_path), "--num_samples", "5", "--batch_size", "4",
                                  "--sample_steps", "2", "--ema_decay", "0.9", "0.5", "--cfg_scale", "1", "2",
                                  "--compile"])[0])
    torch._dynamo.reset()
    assert len(graphs) == 2  # two EMAs x two CFG scales: unguided batches of 4, guided ones of 8, shared by the EMAs


def test_grids_and_online_evaluations_change_no_training_and_their_failures_are_logged(tmp_path, monkeypatch):
    run, kw = tmp_path / "eval", dict(eval_every=2, eval_samples=6, sample_steps=2, ema=(0.9, 0.5), ckpt_every=100,
                                      sample_every=1, num_samples=25)
    pg.train(small_cfg(tmp_path / "plain", max_steps=3))
    pg.train(small_cfg(run, max_steps=2, **kw))
    monkeypatch.setattr(pg, "save_grid", lambda *a: 1 / 0)
    monkeypatch.setattr(pg, "write_samples", lambda *a: 1 / 0)
    pg.train(small_cfg(run, max_steps=3, **kw))
    a, b = ckpt(tmp_path / "plain" / "ckpt.pt"), ckpt(run / "ckpt.pt")
    assert same(a["model"], b["model"]) and same(a["opt"], b["opt"])
    for d in (0.9, 0.5):  # without --fid_ref the samples are kept
        with np.load(run / "eval_0000002" / f"samples_ema{d}_cfg2.npz") as f:
            assert f["arr_0"].shape == (6, 32, 32, 3) and f["arr_1"].tolist() == [i % 10 for i in range(6)]
    # 10 classes: whole rows of one column per class, 20 of the 25 images; 32 px images, 2 px borders
    assert Image.open(run / "grid_0000001.png").size == (10 * 34 + 2, 2 * 34 + 2)
    log = (run / "log.txt").read_text()
    assert f"sample grid (EMA 0.9): {run}/grid_0000001.png\n" in log
    for what in ("sample grid", "evaluation"):  # at the last step: logged alike, and the run ends normally
        assert f"{what} at step 3 failed, training goes on: ZeroDivisionError" in log


def _fid_files(tmp_path):  # random-weight Inception weights and a small ADM-style reference batch
    ref = tmp_path / "ref.npz"
    np.savez(ref, arr_0=_images(6, 32, 32, seed=3))
    return _save_weights(tmp_path / "inception.pth"), str(ref)


METRIC_KEYS = {"fid", "sfid", "inception_score", "precision", "recall", "density", "coverage"}


def test_online_rows_equal_sample_rows_equal_fid_py_for_every_metric(tmp_path, monkeypatch):
    calls = _fake_network(monkeypatch)  # the plumbing is under test: the same outputs in, the same numbers out
    weights, ref = _fid_files(tmp_path)
    pg.train(small_cfg(tmp_path / "run", max_steps=2, eval_every=2, eval_samples=5, keep_every=2, sample_steps=2,
                       ema=(0.9, 0.5), fid_ref=ref, fid_weights=weights))
    online = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl") if '"fid"' in line]
    assert [(r["step"], r["ema"], r["num_samples"]) for r in online] == [(2, 0.9, 5), (2, 0.5, 5)]
    assert all(r["eval_seconds"] > 0 and r["inception_score"] >= 1 and METRIC_KEYS <= set(r) for r in online)
    assert not list((tmp_path / "run").glob("eval_*"))  # with a reference, no samples are kept
    assert "eval step 2 ema 0.9 cfg 2: FID " in (tmp_path / "run" / "log.txt").read_text()
    out = tmp_path / "sampled"
    args = ["--sample", "--ckpt", str(tmp_path / "run" / "ckpt_0000002.pt"), "--out_dir", str(out), "--num_samples",
            "5", "--batch_size", "4", "--ema_decay", "0.9", "0.5", "--fid_ref", ref, "--fid_weights", weights]
    calls.clear()
    pg.sample_main(pg.parse_args(args)[0])
    assert sum(calls) == 6 + 2 * 5  # the reference once for the whole sweep, then each setting's samples
    rows = json.load(open(out / "eval.json"))
    assert [(r["step"], r["ema"], r["cfg_scale"], r["sample_steps"]) for r in rows] == [(2, 0.9, 2.0, 2),
                                                                                      (2, 0.5, 2.0, 2)]
    assert set(rows[0]) == {"ckpt", "step", "ema", "cfg_scale", "sampler", "sample_steps", "time_shift",
                            "num_samples"} | METRIC_KEYS
    for r, o in zip(rows, online):  # the same images in the same batches: the same numbers
        res = fid.main([str(out / f"samples_ema{r['ema']}_cfg2.npz"), ref, "--weights", weights, "--all"])
        for k in METRIC_KEYS:
            assert r[k] == pytest.approx(o[k], rel=1e-9) and res[k] == pytest.approx(r[k], rel=1e-6), k
    assert online[0]["fid"] != online[1]["fid"]


def test_sweep_rows_same_noise_and_best_marked(tmp_path, capsys, monkeypatch):
    _fake_network(monkeypatch)
    weights, ref = _fid_files(tmp_path)
    _write_ckpt(tmp_path / "ckpt.pt", emas=("0.9", "0.5"))
    args = ["--sample", "--out_dir", str(tmp_path), "--num_samples", "4", "--sample_steps", "2", "--fid_ref", ref,
            "--fid_weights", weights]
    pg.sample_main(pg.parse_args(args + ["--ema_decay", "0.9", "0.5", "--cfg_scale", "1", "3"])[0])
    rows = json.load(open(tmp_path / "eval.json"))
    assert [(r["ema"], r["cfg_scale"]) for r in rows] == [(0.9, 1.0), (0.9, 3.0), (0.5, 1.0), (0.5, 3.0)]
    table = capsys.readouterr().out
    assert "samples_ema0.9_cfg1.npz (4 images) and its grid; classes 4-9 are left out (4 images)" in table
    assert Image.open(tmp_path / "grid_ema0.9_cfg1.png").size == (4 * 34 + 2, 34 + 2)  # one short row
    best = min(rows, key=lambda r: r["fid"])
    marked = [line for line in table.splitlines() if "<- best FID" in line]
    header = "     ema    cfg        fid       sfid inception_score  precision     recall    density   coverage"
    assert header in table and len(marked) == 1 and f" {best['fid']:>10.4g} " in marked[0]  # every column
    pg.sample_main(pg.parse_args(args + ["--ema_decay", "0.5", "--cfg_scale", "3"])[0])  # one setting alone
    with np.load(tmp_path / "samples.npz") as a, np.load(tmp_path / "samples_ema0.5_cfg3.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])  # every setting starts from the same noise
    assert len(json.load(open(tmp_path / "eval.json"))) == 5  # appended


def test_evaluation_metrics_follow_the_reference_and_the_flag_and_bad_input_says_what_it_is(tmp_path, monkeypatch):
    _fake_network(monkeypatch)
    weights, ref = _fid_files(tmp_path)
    with np.load(ref) as f:  # a statistics-only reference: mu and sigma of its images, nothing else
        mu, sigma = fid.statistics(fid.inception_outputs(None, f["arr_0"])[0])
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    (tmp_path / "run").mkdir()
    _write_ckpt(tmp_path / "run" / "ckpt.pt")
    base = ["--sample", "--out_dir", str(tmp_path / "run"), "--num_samples", "4", "--sample_steps", "1",
            "--fid_weights", weights]
    for extra, want in [(["--fid_ref", str(tmp_path / "stats.npz")], {"fid", "inception_score"}),  # all it allows
                        (["--fid_ref", ref, "--metrics", "fid", "dc"], {"fid", "density", "coverage"}),
                        (["--fid_ref", ref, "--metrics", "is"], {"inception_score"})]:  # (a table without FID)
        pg.sample_main(pg.parse_args(base + extra)[0])
        assert set(json.load(open(tmp_path / "run" / "eval.json"))[-1]) & METRIC_KEYS == want
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    for bad_ref, msg in [(tmp_path / "empty", "no image files"), (tmp_path / "junk.npz", "junk.npz is neither"),
                         (tmp_path / "stats.npz", r"stats.npz holds no images, nor what pr needs \(mu\)")]:
        with pytest.raises(SystemExit, match=msg):
            pg.sample_main(pg.parse_args(base + ["--fid_ref", str(bad_ref), "--metrics", "fid", "pr"])[0])
    base = base[:-2]  # no --fid_weights
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit, match="pt_inception-2015-12-05-6726825d.pth.*hub/checkpoints.*"
                                         "github.com/mseitzer.*--fid_weights"):
        pg.sample_main(pg.parse_args(base + ["--fid_ref", ref])[0])
    with pytest.raises(SystemExit, match="holds no EMA of decay 0.5; it holds 0.99"):
        pg.sample_main(pg.parse_args(base + ["--ema_decay", "0.99", "0.5"])[0])


# ---------------------------------------------------------------------------------------------------------------
# Benchmark

def test_bench_counts_one_train_step_and_times_what_it_compiles(monkeypatch, capsys):
    calls = {}  # --compile: the denoiser, DINOv2 and LPIPS train, the EMA samples; here compiling counts their calls

    def counting(fn, **kw):  # Module.compile passes the module's _call_impl
        name = type(fn.__self__).__name__ + str(len([k for k in calls if k.startswith(type(fn.__self__).__name__)]))
        calls[name] = 0
        return lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or fn(*a, **k)

    monkeypatch.setattr(torch, "compile", counting)
    cfg, mode = pg.parse_args(["--bench", "--image_size", "32", "--batch_size", "2", "--bench_steps", "1",
                               "--sample_steps", "1", "--compile"])
    got = pg.bench(cfg)
    assert mode == "bench" and "compiled: train" in capsys.readouterr().out
    assert set(calls) == {"JiT0", "JiT1", "DINOv20", "LPIPS0"} and all(calls.values()), calls  # every one ran
    cfg = pg.dataclasses.replace(cfg, num_classes=1000, perceptual_init="random", compile=False)
    model, emas, loss_fn, opt = pg.build(cfg, torch.device("cpu"))
    x, y = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.tensor([0, 999])
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        pg.train_step(pg.DenoiserAndLoss(model, loss_fn), opt, emas, iter([(x, y, [])]), 0, cfg,
                      pg.Procs(False, 0, 1, torch.device("cpu")), pg.Meter())
    assert got["flops"] == counter.get_total_flops() > 0 and got["step_ms"] > 0 and got["sample_ms"] > 0


# ---------------------------------------------------------------------------------------------------------------
# dino.py: DINOv2 ViT-B/14 (bitwise equal to facebookresearch/dinov2 in float32 on CPU, checked beside the repo)

# Official dinov2_vitb14_pretrain.pth: 175 tensors = 3 tokens/embeddings + patch conv (2) + 12 blocks x 14 + norm (2)
DINO_BLOCK_SUFFIXES = [  # (suffix, shape), in state-dict order
    ('norm1.weight', (768,)), ('norm1.bias', (768,)),
    ('attn.qkv.weight', (2304, 768)), ('attn.qkv.bias', (2304,)),
    ('attn.proj.weight', (768, 768)), ('attn.proj.bias', (768,)),
    ('ls1.gamma', (768,)), ('norm2.weight', (768,)), ('norm2.bias', (768,)),
    ('mlp.fc1.weight', (3072, 768)), ('mlp.fc1.bias', (3072,)),
    ('mlp.fc2.weight', (768, 3072)), ('mlp.fc2.bias', (768,)), ('ls2.gamma', (768,))]
DINO_EXPECTED = (
    [('cls_token', (1, 1, 768)), ('pos_embed', (1, 1370, 768)), ('mask_token', (1, 768)),
     ('patch_embed.proj.weight', (768, 3, 14, 14)), ('patch_embed.proj.bias', (768,))]
    + [(f'blocks.{i}.{s}', shape) for i in range(12) for s, shape in DINO_BLOCK_SUFFIXES]
    + [('norm.weight', (768,)), ('norm.bias', (768,))])


@functools.lru_cache(maxsize=None)
def _dino_tiny():
    """Same architecture and code paths, narrow (64 wide, 12 blocks): for the semantics tests, fast on CPU."""
    torch.manual_seed(0)
    return dino.DINOv2(embed_dim=64, depth=12, num_heads=4)


def test_dino_official_layout_token_shapes_and_frozen():
    with torch.device("meta"):  # ViT-B/14: shapes without computing
        model = dino.DINOv2()
    sd = model.state_dict()
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == DINO_EXPECTED
    assert sum(v.numel() for v in sd.values()) == 86_580_480
    with torch.no_grad():
        for (H, W), (h, w) in {(224, 224): (16, 16), (224, 308): (16, 22), (518, 518): (37, 37)}.items():
            out = model.forward_features(torch.randn(1, 3, H, W, device="meta"))
            assert out['x_norm_clstoken'].shape == (1, 768)
            assert out['x_norm_patchtokens'].shape == (1, h * w, 768)
            assert out['x_prenorm'].shape == (1, 1 + h * w, 768)
        for H, W in [(225, 224), (224, 230)]:
            with pytest.raises(AssertionError, match='multiple of the patch size 14'):
                model.forward_features(torch.randn(1, 3, H, W, device="meta"))
    assert not any(p.requires_grad for p in model.parameters())
    model.train()                                    # e.g. a parent module's .train(): must stay in eval
    assert not any(m.training for m in model.modules())


def test_dino_loading(tmp_path, monkeypatch):
    """A strict load from a path or the hub cache; a missing, corrupt or wrong file names itself and where to put
    the official weights."""
    hub = tmp_path / 'hub'
    (hub / 'checkpoints').mkdir(parents=True)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(hub))
    sd = {k: torch.tensor(float(i)).expand(shape) for i, (k, shape) in enumerate(DINO_EXPECTED)}  # a float per key
    path = hub / 'checkpoints' / dino.WEIGHTS_FILE
    torch.save(sd, path)
    for model in (dino.load_dinov2(str(path)), dino.load_dinov2(download=False)):  # explicit path, hub cache
        loaded = model.state_dict()
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    path.unlink()

    def offline(url, dst, *args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    for download in (False, True):                  # download disabled, and a failed download
        with pytest.raises(FileNotFoundError) as e:
            dino.load_dinov2(download=download)
        msg = str(e.value)
        assert dino.WEIGHTS_FILE in msg and dino.WEIGHTS_URL in msg
        assert str(hub / 'checkpoints') in msg and 'path' in msg
    assert dino.WEIGHTS_URL == 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth'
    with pytest.raises(FileNotFoundError, match='nowhere.pth'):
        dino.load_dinov2(str(tmp_path / 'nowhere.pth'))
    bad = tmp_path / 'corrupt.pth'
    bad.write_bytes(b'\x00not a checkpoint' * 10)
    with pytest.raises(RuntimeError, match='corrupt.pth'):
        dino.load_dinov2(str(bad))
    wrong = tmp_path / 'wrong.pth'
    torch.save({'cls_token': torch.zeros(1, 1, 768)}, wrong)
    with pytest.raises(RuntimeError, match='wrong.pth'):
        dino.load_dinov2(str(wrong))


def test_dino_intermediate_layers_semantics():
    model = _dino_tiny()
    x = torch.randn(2, 3, 28, 42)                   # 2x3 patch grid: fast
    with torch.no_grad():
        ff = model.forward_features(x)
        last, = model.get_intermediate_layers(x, n=[11])
        assert torch.equal(last, ff['x_norm_patchtokens'])
        assert torch.equal(model.get_intermediate_layers(x)[0], last)           # default n=1: last block
        raw, = model.get_intermediate_layers(x, n=1, norm=False)
        assert torch.equal(raw, ff['x_prenorm'][:, 1:])
        # int n = the last n blocks, list = 0-based indices, outputs in block order whatever the list order
        two = model.get_intermediate_layers(x, n=2)
        pair = model.get_intermediate_layers(x, n=[10, 11])
        assert len(two) == 2 and all(torch.equal(a, b) for a, b in zip(two, pair))
        first_last = model.get_intermediate_layers(x, n=[11, 0])
        all12 = model.get_intermediate_layers(x, n=12)
        assert torch.equal(first_last[0], all12[0]) and torch.equal(first_last[1], all12[11])
        assert not torch.equal(all12[0], all12[11])
        # class token and reshape
        (tok, cls), = model.get_intermediate_layers(x, n=1, return_class_token=True)
        assert torch.equal(cls, ff['x_norm_clstoken']) and torch.equal(tok, last)
        fmap, = model.get_intermediate_layers(x, n=1, reshape=True)
        assert fmap.shape == (2, 64, 2, 3)                                      # (B, D, H/14, W/14)
        assert torch.equal(fmap[:, :, 1, 2], last[:, 1 * 3 + 2])                 # row-major patch order
        with pytest.raises(AssertionError):
            model.get_intermediate_layers(x, n=[12])


def test_dino_pos_embed_interpolation():
    model = _dino_tiny()
    assert model.interpolate_pos_embed(37, 37) is model.pos_embed             # 518x518: the stored tensor
    pos = model.pos_embed.detach()
    D = pos.shape[-1]
    grid = pos[:, 1:].reshape(1, 37, 37, D).permute(0, 3, 1, 2)
    for h, w in [(16, 16), (16, 22), (37, 38), (4, 3)]:
        got = model.interpolate_pos_embed(h, w)
        ref = F.interpolate(grid, scale_factor=((h + 0.1) / 37, (w + 0.1) / 37), mode='bicubic', antialias=False)
        assert got.shape == (1, 1 + h * w, D) and got.dtype == torch.float32
        assert torch.equal(got[:, 0], pos[:, 0])                             # CLS slot untouched
        assert torch.equal(got[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, h * w, D))
    by_size = F.interpolate(grid, size=(16, 22), mode='bicubic')             # NOT what the official code does
    assert not torch.allclose(model.interpolate_pos_embed(16, 22)[:, 1:].reshape(1, 16, 22, D),
                              by_size.permute(0, 2, 3, 1), atol=1e-4)


def test_dino_patch_tokens():
    model = _dino_tiny()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert model.patch_tokens(torch.rand(1, 3, 64, 128) * 2 - 1, patch_size=32).shape == (1, 8, 64)
        # the recipe spelled out: [0,1], ImageNet mean/std, bicubic to 14/16 of the size, last block + norm
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        y = F.interpolate(((x + 1) / 2 - mean[:, None, None]) / std[:, None, None], size=(56, 56), mode='bicubic')
        ref = model.forward_features(y)['x_norm_patchtokens']
        feats = model.patch_tokens(x)
        assert feats.shape == (2, 16, 64) and torch.allclose(feats, ref, atol=1e-6)
        assert torch.equal(model(x), feats)                                  # forward = patch_tokens


def test_dino_bf16_autocast():
    """Under autocast x_hat is bf16 and x float32; both meet the exact ImageNet constants in float32, so P-DINO compares
    like with like: f(x_hat) = f(x) when x_hat = x (in bf16 the constants round, 0.485 -> 0.484375)."""
    model = _dino_tiny()
    x = (torch.rand(1, 3, 32, 48) * 2 - 1).bfloat16().float()  # values a bf16 x_hat holds exactly; 2x3 tokens
    with torch.no_grad():
        ref = model.patch_tokens(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model.patch_tokens(x)
            assert torch.equal(model.patch_tokens(x.bfloat16()), low)
    assert F.cosine_similarity(low.float(), ref, dim=-1).min() > 0.999


def test_dino_compiles_fullgraph_and_backpropagates(compiled):
    torch.manual_seed(0)
    model = dino.DINOv2(embed_dim=64, depth=2, num_heads=4)  # all code paths of patch_tokens, 2 blocks
    x = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)  # -> 28x28 DINO input, 2x2 tokens
    runs = []
    for fn in (model.patch_tokens, torch.compile(model.patch_tokens, fullgraph=True, backend="aot_eager")):
        x.grad = None
        f = fn(x, 16)
        (1 - F.cosine_similarity(f, f.detach().flip(0), dim=-1)).mean().backward()  # P-DINO-like, into the image
        runs.append((f, x.grad))
    assert runs[1][1].abs().sum() > 0 and all(p.grad is None for p in model.parameters())
    for a, b in zip(*runs):  # measured 2.6e-6: the traced bicubic resize rounds differently from the eager kernel
        torch.testing.assert_close(a, b, rtol=1e-4, atol=2e-5)


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
