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


# ---------------------------------------------------------------------------------------------------------------
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

_MODEL = []


def _images(n, h, w, seed=0):
    """Smooth random uint8 images (n, h, w, 3) with some noise on top."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g), size=(h, w), mode="bilinear")
    x = (x + 0.2 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1) * 255
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _random_inception():
    """The FID Inception with random weights whose BN statistics are calibrated on a batch, so features are O(1)."""
    if not _MODEL:
        torch.manual_seed(0)
        model = fid.InceptionV3().eval().requires_grad_(False)
        torch.nn.init.normal_(model.fc.weight, std=0.05)

        def set_stats(bn, inputs):  # BN input statistics become its running statistics (one forward, in order)
            bn.running_mean.copy_(inputs[0].mean((0, 2, 3)))
            bn.running_var.copy_(inputs[0].var((0, 2, 3)))

        hooks = []
        for m in model.modules():
            if isinstance(m, fid.BatchNorm):
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.3, 0.5)
                hooks.append(m.register_forward_pre_hook(set_stats))
        with torch.no_grad():
            model(fid.preprocess_images(torch.from_numpy(_images(2, 299, 299, seed=1)).permute(0, 3, 1, 2)))
        for h in hooks:
            h.remove()
        _MODEL.append(model)
    return _MODEL[0]


def _save_weights(path):
    torch.save(dict(_random_inception().state_dict()), path)
    return str(path)


@pytest.fixture(scope="session")
def fid_weights(tmp_path_factory):  # the random-weight Inception's file, written once
    return _save_weights(tmp_path_factory.mktemp("fid") / "inception.pth")


def test_fid_state_dict_keys_and_shapes():
    sd = fid.InceptionV3().state_dict()
    assert len(sd) == 472 and sum(v.numel() for v in sd.values()) == 23885392
    assert not any("num_batches_tracked" in k or "AuxLogits" in k for k in sd)
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
                "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1), "fc.weight": (1008, 2048)}
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert list(sd)[0] == "Conv2d_1a_3x3.conv.weight" and list(sd)[-1] == "fc.bias"


def test_fid_weights_load_strictly_or_say_what_is_missing(tmp_path):
    sd = {k: torch.randn_like(v) for k, v in fid.InceptionV3().state_dict().items()}  # plain dict: no _metadata
    torch.save(sd, tmp_path / "w.pth")
    model = fid.load_inception(str(tmp_path / "w.pth"), device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.Mixed_7c.branch_pool.bn.running_var, sd["Mixed_7c.branch_pool.bn.running_var"])
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "w2.pth")
    with pytest.raises(RuntimeError, match="fc.bias"):
        fid.load_inception(str(tmp_path / "w2.pth"), device="cpu")
    (tmp_path / "corrupt.pth").write_bytes(b"garbage")
    np.savez(tmp_path / "images.npz", arr_0=_images(2, 8, 8))
    for name, error in (("missing.pth", FileNotFoundError), ("corrupt.pth", RuntimeError)):
        with pytest.raises(error, match=name):
            fid.load_inception(str(tmp_path / name))
        with pytest.raises(SystemExit, match=name):  # the CLI: one line
            fid.main([str(tmp_path / "images.npz")] * 2 + ["--weights", str(tmp_path / name)])


def test_fid_outputs_pool3_and_sfid_features():
    model, x = _random_inception(), _images(2, 37, 53, seed=2)  # odd, non-square
    seen = []
    hook = model.Mixed_6d.branch1x1.register_forward_hook(lambda m, inputs, out: seen.append(out.clone()))
    try:
        pool3, spatial = fid.inception_outputs(model, x, spatial=True)
    finally:
        hook.remove()
    assert pool3.shape == (2, 2048) and pool3.dtype == np.float32 and 0.01 < np.abs(pool3).max() < 100
    assert spatial.shape == (2, fid.SPATIAL_DIM) == (2, 2023) and spatial.min() == 0 < spatial.max()  # after a ReLU
    # sFID's mixed_6/conv: our recomputation equals Mixed_6d's own branch (both ran); its first 7 channels, flattened
    # per image in NHWC order: value (h, w, c) at (h * 17 + w) * 7 + c.
    assert len(seen) == 2 and seen[0].shape == (2, 192, 17, 17) and torch.equal(seen[0], seen[1])
    np.testing.assert_array_equal(spatial, seen[1][:, :7].permute(0, 2, 3, 1).reshape(2, -1).numpy())
    one, none = fid.inception_outputs(model, x[1:])  # another batch, no sFID features: the same pool3
    assert none is None
    np.testing.assert_allclose(one, pool3[1:], rtol=1e-5, atol=1e-6)


def _tf1_resize_numpy(img, out_h, out_w):
    """Hand-written TF1 resize_bilinear(align_corners=False, half_pixel_centers=False) of one (H, W) image."""
    h, w = img.shape
    res = np.zeros((out_h, out_w))
    for i in range(out_h):
        y = np.float32(i) * np.float32(h / out_h)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, h - 1), float(y) - y0
        for j in range(out_w):
            x = np.float32(j) * np.float32(w / out_w)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, w - 1), float(x) - x0
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * fx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * fx
            res[i, j] = top + (bottom - top) * fy
    return res


def test_fid_adm_resize_matches_tf1_bilinear_and_pytorch_fid_preprocessing():
    # 2x2 -> 4x4 by hand: sample positions 0, .5, 1, 1.5 on both axes; the last row / column is repeated.
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    expected = [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]]
    assert fid.resize_tf1_bilinear(x, 4)[0, 0].tolist() == expected
    assert not torch.equal(F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=False), torch.tensor(expected))
    # Random small images, up and down, against the loop above.
    img = np.random.default_rng(0).uniform(0, 255, size=(7, 11))
    for size in (3, 13, 29):
        ours = fid.resize_tf1_bilinear(torch.tensor(img, dtype=torch.float32)[None, None], size)[0, 0].numpy()
        np.testing.assert_allclose(ours, _tf1_resize_numpy(img, size, size), rtol=0, atol=1e-3)
    # Constant images stay constant; at 299 the resize is the identity; then (x - 128) / 128.
    const = torch.full((1, 3, 37, 53), 77, dtype=torch.uint8)
    assert torch.equal(fid.preprocess_images(const, "adm"), torch.full((1, 3, 299, 299), (77 - 128) / 128))
    x299 = torch.from_numpy(_images(1, 299, 299)).permute(0, 3, 1, 2)
    assert torch.equal(fid.preprocess_images(x299, "adm"), (x299.float() - 128) / 128)
    # pytorch-fid's: torch's bilinear resize of [0, 1] images, then to [-1, 1].
    x = torch.from_numpy(_images(2, 45, 61)).permute(0, 3, 1, 2)
    expected = 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.equal(fid.preprocess_images(x, "pytorch-fid"), expected)
    assert not torch.allclose(fid.preprocess_images(x, "adm"), expected, atol=1e-2)  # the two modes differ
    with pytest.raises(ValueError, match="preprocess"):
        fid.preprocess_images(x, "tf2")


def _random_cov(d, n, seed):
    rng = np.random.default_rng(seed)
    return fid.statistics(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0)


def test_fid_frechet_distance_closed_forms_and_sqrtm():
    mu1, s1 = _random_cov(64, 500, 0)
    mu2 = mu1 + np.random.default_rng(1).standard_normal(64)
    assert fid.frechet_distance(mu1, s1, mu2, s1) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)
    d, c = 100, 2.5
    assert fid.frechet_distance(np.zeros(d), np.eye(d), np.zeros(d), c * np.eye(d)) == pytest.approx(
        d * (1 - math.sqrt(c)) ** 2, rel=1e-12)
    mu, s = _random_cov(512, 2000, 2)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-6
    with pytest.raises(ValueError, match="do not match"):
        fid.frechet_distance(mu1, s1, mu, s)
    for (n1, n2), seed in [((500, 400), 3), ((40, 300), 4)]:  # full rank, and a singular sigma1 (40 samples, 64-d)
        mu1, s1 = _random_cov(64, n1, seed)
        mu2, s2 = _random_cov(64, n2, seed + 10)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-7)


def test_fid_statistics_in_chunks_equal_np_cov():
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((103, 7)) * rng.uniform(0.1, 2, 7) + rng.uniform(-1, 3, 7)).astype(np.float32)
    for chunk in (10000, 10, 7):
        mu, sigma = fid.statistics(feats, chunk)
        assert mu.dtype == sigma.dtype == np.float64
        np.testing.assert_allclose(mu, feats.astype(np.float64).mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        fid.statistics(feats[:1])


def _inception_score_numpy(logits, split_size=5000):
    """The ADM suite's IS written out: consecutive splits, per split exp(mean_i KL(p_i || mean_j p_j)), averaged."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1))))
    return np.mean(scores)


def test_fid_inception_score():
    onehot = 50 * np.eye(10)
    assert fid.inception_score(np.tile(onehot[3], (40, 1))) == pytest.approx(1.0, abs=1e-9)
    assert fid.inception_score(np.tile(onehot, (4, 1))) == pytest.approx(10.0, rel=1e-9)
    # Against a direct numpy computation with ADM's split_size = 5000: splits of 5000, 5000, 2000.
    logits = np.random.default_rng(0).standard_normal((12000, 10)) * 3
    assert fid.inception_score(logits) == pytest.approx(_inception_score_numpy(logits), rel=1e-10)
    assert fid.inception_score(logits[:100], 40) == pytest.approx(_inception_score_numpy(logits[:100], 40), rel=1e-10)
    model = nn.Module()  # the IS logits: pool3 @ fc.weight.T, no bias, in float64
    model.fc = nn.Linear(6, 4)
    pool3 = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    expected = pool3.astype(np.float64) @ model.fc.weight.detach().double().numpy().T
    np.testing.assert_allclose(fid.unbiased_logits(model, pool3), expected, rtol=1e-15)


def test_fid_density_coverage_and_precision_recall_by_hand():
    # 1-D, k = 1 (nearest neighbour). Reference 0, 1, 3, 6: squared radii 1, 1, 4, 9. Samples 1, 2, 4.5, 10: squared
    # radii 1, 1, 6.25, 30.25. Sample 1 lies on the boundary of reference 0's ball (d^2 = 1), and of reference 3's;
    # sample 2 on reference 1's; reference 0 on sample 1's.
    ref, sam = np.array([[0.0], [1], [3], [6]]), np.array([[1.0], [2], [4.5], [10]])
    for b in (1, 3, 10000):
        got = fid.neighbour_metrics(ref, sam, k_pr=1, k_dc=1, chunk=b, device="cpu")
        # precision: 1, 2, 4.5 in some reference ball (boundaries count, `<=`); recall: every reference point is in a
        # sample ball, reference 0 only on the boundary of sample 1's.
        assert got["precision"] == 0.75 and got["recall"] == 1.0
        # density: strictly inside (`<`): sample 1 in ball 1 only, 2 in ball 3, 4.5 in balls 3 and 6, 10 in none:
        # 4 / (k M) = 4 / 4; coverage: balls 1, 3, 6 hold a sample, ball 0 only on its boundary: 3 / 4.
        assert got["density"] == 1.0 and got["coverage"] == 0.75
    # Duplicates: the two 0s are each other's nearest neighbour, radius 0: a sample at 0 is inside for precision
    # (0 <= 0) but not for density / coverage (0 < 0 is false). Ball radii^2: 0, 0, 1, 4; sample 2 is strictly inside
    # only reference 3's ball (d^2 1 < 4), on reference 1's boundary.
    ref, sam = np.array([[0.0], [0], [1], [3]]), np.array([[0.0], [2]])
    got = fid.neighbour_metrics(ref, sam, k_pr=1, k_dc=1, device="cpu")
    assert got == dict(precision=1.0, recall=1.0, density=0.5, coverage=0.25)
    assert fid.neighbour_metrics(ref, sam, ("dc",), k_dc=1, device="cpu") == dict(density=0.5, coverage=0.25)


def test_fid_neighbour_metrics_far_from_the_origin_and_in_blocks():
    """Inception features have norms near 2e4: squared distances by expansion in float32 would lose the differences
    between points there; centred on the reference mean, the metrics equal a float64 computation of Kynkaanniemi et
    al.'s and Naeem et al.'s definitions (k = 3 and 5), near the origin and far from it, in blocks of any size and with
    the reference radii kept from one call to the next."""
    rng = np.random.default_rng(0)
    ref, sam = rng.standard_normal((80, 64)), rng.standard_normal((60, 64)) * 1.2 + 0.3
    d2 = lambda a, b: ((a[:, None] - b[None]) ** 2).sum(-1)
    r3, r5, s3 = (np.sort(d2(x, x), 1)[:, k] for x, k in ((ref, 3), (ref, 5), (sam, 3)))
    d = d2(ref, sam)  # (R, S) in float64
    expected = dict(precision=(d <= r3[:, None]).any(0).mean(), recall=(d <= s3[None]).any(1).mean(),
                    density=(d < r5[:, None]).sum() / (5 * len(sam)), coverage=(d < r5[:, None]).any(1).mean())
    assert 0 < min(expected.values()) and max(expected.values()) < 1
    radii = {}
    for shift, kw in [(0, {}), (2500, {}), (2500, dict(chunk=7)), (2500, dict(ref_radii=radii, chunk=11)),
                      (2500, dict(ref_radii=radii))]:  # 2500 in every coordinate: norm 2e4
        got = fid.neighbour_metrics((ref + shift).astype(np.float32), (sam + shift).astype(np.float32), device="cpu",
                                    **kw)
        assert got == pytest.approx(expected, abs=1e-12), (shift, kw)
    assert set(radii) == {3, 5}
    knn = fid.knn_radii(torch.tensor(ref, dtype=torch.float32), (3, 5), chunk=11)  # (80, 2), blocks of 11 x 11
    np.testing.assert_allclose(knn.numpy(), np.stack([r3, r5], 1), rtol=1e-5)
    with pytest.raises(ValueError, match="5-th nearest neighbour needs more than 5 points per set, got 5"):
        fid.neighbour_metrics(ref[:5], sam, ("dc",), device="cpu")
    assert fid.neighbour_metrics(ref[:6], sam[:3], ("dc",), device="cpu")  # density / coverage use no sample balls


def test_fid_folders_and_npz_files(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate([(20, 24), (20, 24), (31, 17)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"img{i}.png")
    grey, rgba = rng.integers(0, 256, (20, 24), dtype=np.uint8), rng.integers(0, 256, (20, 24, 4), dtype=np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "imgs" / "sub" / "grey.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "imgs" / "sub" / "rgba.png")
    (tmp_path / "imgs" / "sub" / "broken.png").write_bytes(b"not a png")
    side = fid.open_side(str(tmp_path / "imgs"))
    assert side.holds == {"images"}
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable of 6 images: .*broken.png \(cannot read image"):
        batches = list(fid.image_batches(side.images, batch_size=2))
    # sorted paths: img0, img1, img2 (another size: a batch of its own), then sub/grey, sub/rgba (broken skipped)
    assert [b.shape for b in batches] == [(2, 20, 24, 3), (1, 31, 17, 3), (2, 20, 24, 3)]
    np.testing.assert_array_equal(batches[2][0], np.repeat(grey[..., None], 3, axis=2))
    a = rgba[..., 3:].astype(int)  # transparency composited onto the background asked for
    black = next(fid.image_batches(str(tmp_path / "imgs" / "sub"), (0, 0, 0), batch_size=2))[1]
    np.testing.assert_array_equal(black, (a * rgba[..., :3] + 127) // 255)
    arr = rng.integers(0, 256, (5, 16, 12, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "batch.npz", arr_0=arr, mu=np.zeros(4, np.float32), sigma=np.eye(4))
        side = fid.open_side(str(tmp_path / "batch.npz"))
        assert side.holds == {"images", "mu"} and side.mu.dtype == np.float64 and side.mu_s is None
        parts = list(fid.image_batches(side.images, batch_size=2))
        assert [len(b) for b in parts] == [2, 2, 1] and np.array_equal(np.concatenate(parts), arr)


def test_fid_bad_inputs_say_what_they_are(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        next(fid.image_batches(str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fid.open_side(str(tmp_path / "nowhere"))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="arr_0 must be uint8"):
        next(fid.image_batches(str(tmp_path / "float.npz")))
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    torch.save({f"w{i}": torch.zeros(8) for i in range(100)}, tmp_path / "ckpt.pt")  # a checkpoint: a zip, not an npz
    (tmp_path / "junk.npz").write_bytes(b"not an npz")
    for name in ("other.npz", "ckpt.pt", "junk.npz"):
        with pytest.raises(SystemExit) as e:
            fid.main([str(tmp_path / name), str(tmp_path / "other.npz")])
        assert str(e.value) == (f"fid.py: error: {tmp_path / name} is neither an image folder nor an npz batch (arr_0) "
                                f"or statistics file (mu, sigma)")


def test_fid_cli_every_metric_and_the_statistics(tmp_path, monkeypatch, capsys, fid_weights):
    _fake_network(monkeypatch)  # the route is under test: the same outputs in, the same numbers out
    model, sam_images = _random_inception(), _images(9, 8, 8, seed=7)
    (tmp_path / "samples").mkdir()
    for i, image in enumerate(sam_images):
        Image.fromarray(image).save(tmp_path / "samples" / f"{i:02d}.png")
    ref, sam = str(tmp_path / "ref.npz"), str(tmp_path / "samples")
    ref_images = _images(8, 8, 8, seed=8)
    np.savez(ref, arr_0=ref_images)
    cli = fid.main([sam, ref, "--weights", fid_weights, "--device", "cpu", "--batch_size", "4"])
    assert list(cli) == ["fid", "sfid", "inception_score", "precision", "recall", "density", "coverage"]
    out = capsys.readouterr().out
    assert all(f"{fid.RESULTS[k]}: {v:.6g}\n" in out for k, v in cli.items())
    # By hand from the outputs: the statistics, the logits, the nearest neighbours, then the Frechet distance.
    (sp, ss), (rp, rs) = (fid.inception_outputs(model, x, spatial=True) for x in (sam_images, ref_images))
    expected = dict(fid=fid.frechet_distance(*fid.statistics(sp), *fid.statistics(rp)),
                    sfid=fid.frechet_distance(*fid.statistics(ss), *fid.statistics(rs)),
                    inception_score=_inception_score_numpy(sp.astype(np.float64) @ model.fc.weight.double().numpy().T),
                    **fid.neighbour_metrics(rp, sp, device="cpu"))
    assert cli == pytest.approx(expected, rel=1e-9)
    # --save-stats; a statistics-only reference gives the metrics it allows, the same; asked for more, an error.
    assert fid.main([ref, "--save-stats", str(tmp_path / "ref_stats.npz"), "--weights", fid_weights]) == {}
    with np.load(tmp_path / "ref_stats.npz") as z:
        assert sorted(z.files) == ["mu", "mu_s", "sigma", "sigma_s"]
        np.testing.assert_allclose(z["sigma_s"], fid.statistics(rs)[1], rtol=1e-12)
        mu, sigma = z["mu"], z["sigma"]
    np.savez(tmp_path / "mu_only.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "adm.npz", arr_0=ref_images, mu=mu + 1, sigma=sigma)  # an ADM batch: its mu / sigma used
    stats_only = fid.main([sam, str(tmp_path / "ref_stats.npz"), "--weights", fid_weights])
    assert stats_only == {k: pytest.approx(cli[k], rel=1e-9) for k in ("fid", "sfid", "inception_score")}
    assert fid.main([sam, str(tmp_path / "mu_only.npz"), "--weights", fid_weights]).keys() == {"fid", "inception_score"}
    adm = fid.main([sam, str(tmp_path / "adm.npz"), "--weights", fid_weights, "--pr"])
    assert adm == pytest.approx(dict(fid=fid.frechet_distance(*fid.statistics(sp), mu + 1, sigma),
                                     precision=cli["precision"], recall=cli["recall"]), rel=1e-9)
    for flags, message in [(["--prdc"], r"mu_only.npz holds no images, nor what pr and dc need \(mu\)"),
                           (["--sfid"], r"nor what sfid needs \(mu\)"),
                           (["--all"], "nor what sfid and pr and dc need")]:
        with pytest.raises(SystemExit, match=message):
            fid.main([sam, str(tmp_path / "mu_only.npz"), "--weights", fid_weights, *flags])
    with pytest.raises(SystemExit, match=r"--background R G B takes values in 0..255, got 0 0 256"):
        fid.main([sam, ref, "--background", "0", "0", "256"])
    # Tiny values print as such (e.g. the FID of a set with itself, rounding errors), not as 0.000000.
    monkeypatch.setattr(fid, "frechet_distance", lambda *stats: 2.5e-14)
    fid.main([sam, str(tmp_path / "mu_only.npz"), "--weights", fid_weights])
    assert "FID: 2.5e-14\n" in capsys.readouterr().out
