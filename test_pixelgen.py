"""Offline CPU tests of pixelgen.py, dino.py and fid.py: random weights, no downloads, minutes in all.

Equality with the official code (github Zehong-Ma/PixelGen, facebookresearch/dinov2, pytorch-fid, torch-fidelity) was
checked beside this repository (see the README); these tests pin closed forms, hand-computed values, and the facts
that make that equality hold."""
import copy
import functools
import math
import os

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

torch.set_num_threads(min(2, torch.get_num_threads()))


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


# ---------------------------------------------------------------------------------------------------------------
# Model (issue: checkpoint compatibility)

# Official PixelGen-XL/16 and -L/16 state dicts, in order: the non-block keys, then per-block keys for each block.
BLOCK_KEYS = [("norm1.weight", ("D",)), ("attn.q_norm.weight", ("hd",)), ("attn.k_norm.weight", ("hd",)),
              ("attn.qkv.weight", ("3D", "D")), ("attn.qkv.bias", ("3D",)), ("attn.proj.weight", ("D", "D")),
              ("attn.proj.bias", ("D",)), ("norm2.weight", ("D",)), ("mlp.w12.weight", ("2F", "D")),
              ("mlp.w12.bias", ("2F",)), ("mlp.w3.weight", ("D", "F")), ("mlp.w3.bias", ("D",)),
              ("adaLN_modulation.1.weight", ("6D", "D")), ("adaLN_modulation.1.bias", ("6D",))]
OFFICIAL = {
    "PixelGen-XL/16": dict(D=1152, depth=28, hd=72, F=3072, n=406, params=676_994_112, embed=[
        ("x_embedder.proj1.weight", (1152, 3, 16, 16)), ("x_embedder.proj1.bias", (1152,))]),
    "PixelGen-L/16": dict(D=1024, depth=24, hd=64, F=2730, n=351, params=459_139_808, embed=[
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
                + [(f"blocks.{i}.{k}", tuple(dims[s] for s in shape)) for i in range(o["depth"]) for k, shape in BLOCK_KEYS]
                + [("final_layer.norm_final.weight", (D,)), ("final_layer.linear.weight", (768, D)),
                   ("final_layer.linear.bias", (768,)), ("final_layer.adaLN_modulation.1.weight", (2 * D, D)),
                   ("final_layer.adaLN_modulation.1.bias", (2 * D,))])
    with torch.device("meta"):
        model = pg.JiT(**pg.MODELS[name])
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert len(got) == o["n"] and got == expected
    assert sum(p.numel() for p in model.parameters()) == o["params"]  # 676M / 459M as the paper reports


def test_presets_and_official_keywords():
    for name, kw in pg.MODELS.items():
        assert set(kw) <= {"input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "mlp_ratio",
                           "attn_drop", "proj_drop", "num_classes", "bottleneck_dim", "use_bottleneck",
                           "in_context_len", "in_context_start"}, name
    assert pg.MODELS["PixelGen-L/16"] == pg.MODELS["JiT-L/16"]
    xl = pg.MODELS["PixelGen-XL/16"]
    assert xl["use_bottleneck"] is False and xl["proj_drop"] == 0.1 and xl["depth"] == 28
    with torch.device("meta"):  # dropout only in the middle half of the blocks
        m = pg.JiT(**xl)
    on = [i for i, b in enumerate(m.blocks) if b.attn.proj_drop.p > 0]
    assert on == list(range(7, 21))


def test_zero_init_gives_zero_prediction():
    m = tiny_jit()
    x_hat, h = m(torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([1, 10]), return_layer=2)
    assert torch.equal(x_hat, torch.zeros_like(x_hat)) and h.shape == (2, 4, 64)


def test_sincos_pos_embed_closed_form():
    D, g = 16, 4
    pe = pg.sincos_pos_embed(D, g)
    omega = 1.0 / 10000 ** (np.arange(4) / 4)
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        row = pe[r * g + c].numpy()
        want = np.concatenate([np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)])
        np.testing.assert_allclose(row, want, atol=1e-6)


def test_rope_is_relative_and_in_context_is_identity():
    hd, g, L = 8, 3, 2
    cos, sin = pg.rope_2d(g, hd, L)  # (L + 9, 4): one angle per pair
    assert torch.equal(cos[:L], torch.ones(L, 4)) and torch.equal(sin[:L], torch.zeros(L, 4))
    # hand-computed: token (row 1, col 2); pairs 0, 1 turn by row * (1, 1e4^-0.5), pairs 2, 3 by col * (1, 1e4^-0.5)
    i = L + 1 * g + 2
    want = torch.tensor([1.0, 10000 ** -0.5, 2.0, 2 * 10000 ** -0.5])
    torch.testing.assert_close(torch.atan2(sin[i], cos[i]), want)
    rope = torch.complex(cos, sin)
    x = torch.randn(hd)
    rx = pg.apply_rope(x[None, None, None], rope[i][None])[0, 0, 0]
    c, s_ = math.cos(1.0), math.sin(1.0)  # first pair by hand: (x0 c - x1 s, x0 s + x1 c)
    torch.testing.assert_close(rx[:2], torch.stack([x[0] * c - x[1] * s_, x[0] * s_ + x[1] * c]))
    q, k = torch.randn(hd), torch.randn(hd)
    dot = lambda a, b: (pg.apply_rope(q[None, None, None], rope[a][None]) * pg.apply_rope(k[None, None, None], rope[b][None])).sum()
    # the same relative offset (+1 row, +1 col) gives the same score: RoPE encodes relative positions
    torch.testing.assert_close(dot(L + 0, L + 4), dot(L + 4, L + 8))
    torch.testing.assert_close(dot(0, 1), (q * k).sum())  # in-context tokens are not rotated


def test_return_layer_feature_is_tokens_entering_block():
    m = randomize(tiny_jit(depth=4, in_context_start=1))
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([3, 4])
    seen = []
    for b in m.blocks:
        b.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    ref = m(x, t, y)
    for k in range(4):  # the image tokens entering block k; at k = in_context_start, before the class tokens join
        x_hat, h = m(x, t, y, return_layer=k)
        assert torch.equal(x_hat, ref) and torch.equal(h, seen[k][:, -4:]) and h.shape == (2, 4, 64)
    assert seen[1].shape[1] == 4 + 3  # block 1 runs with the in-context tokens


def test_forward_depends_on_class_and_time():
    m = randomize(tiny_jit(use_bottleneck=False))
    x = torch.randn(1, 3, 32, 32)
    a = m(x, torch.tensor([0.5]), torch.tensor([1]))
    assert not torch.allclose(a, m(x, torch.tensor([0.5]), torch.tensor([2])))
    assert not torch.allclose(a, m(x, torch.tensor([0.6]), torch.tensor([1])))


# ---------------------------------------------------------------------------------------------------------------
# Flow math and samplers

def test_time_grid_hand_computed():
    torch.testing.assert_close(pg.time_grid(4, 1.0), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    # t = s / (s + 2 (1 - s)): 0, 1/7, 1/3, 3/5, 1
    torch.testing.assert_close(pg.time_grid(4, 2.0), torch.tensor([0.0, 1 / 7, 1 / 3, 0.6, 1.0]))
    assert len(pg.time_grid(50, 2.0)) == 51 and pg.time_grid(50, 2.0)[-2] < 1


def test_flow_math():
    x, eps, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0.0, 0.5, 0.99])
    xt = pg.x_t(x, eps, t)
    torch.testing.assert_close(xt[1], 0.5 * x[1] + 0.5 * eps[1])
    v = pg.x_to_v(x, xt, t, 0.05)
    torch.testing.assert_close(v[:2], (x - eps)[:2])                  # v = x - eps away from t = 1
    torch.testing.assert_close(v[2], (x[2] - xt[2]) / 0.05)            # 1 - t clamped at t_eps
    g = torch.Generator().manual_seed(0)
    t = pg.sample_t(200_000, -0.8, 0.8, generator=g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() + 0.8) < 0.01 and abs(logit.std() - 0.8) < 0.01
    assert 0.50 < (t >= 0.3).float().mean() < 0.54  # SPEC: about 52% of samples pass the gate


class Oracle(nn.Module):
    """A perfect x-predictor for a one-image dataset per class: x_hat = target[y]; counts network rows."""

    def __init__(self, targets):
        super().__init__()
        self.targets, self.num_classes, self.rows = targets, targets.shape[0] - 1, 0

    def forward(self, x, t, y):
        self.rows += x.shape[0]
        return self.targets[y]


@pytest.mark.parametrize("sampler", ["heun", "euler", "adams2"])
@pytest.mark.parametrize("shift", [1.0, 2.0])
def test_perfect_predictor_lands_on_the_image(sampler, shift):
    targets = torch.rand(4, 3, 8, 8) * 2 - 1
    noise, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    out = pg.sample(Oracle(targets), noise, y, steps=10, sampler=sampler, time_shift=shift)
    torch.testing.assert_close(out, targets[y], atol=1e-5, rtol=0)


def test_cfg_in_v_space_hand_written():
    targets = torch.rand(3, 3, 4, 4) * 2 - 1  # class 0, class 1, null (2)
    noise, y, w = torch.randn(2, 3, 4, 4), torch.tensor([0, 1]), 3.0
    ts = pg.time_grid(2, 1.0)  # 0, 0.5, 1
    x = noise.clone()
    for i in range(2):  # Euler by hand; guidance only while 0.1 < t <= 0.9, i.e. at t = 0.5 only
        t = ts[i]
        v_c, v_u = (targets[y] - x) / (1 - t), (targets[2] - x) / (1 - t)
        v = v_u + w * (v_c - v_u) if 0.1 < t <= 0.9 else v_c
        x = x + v * (ts[i + 1] - t)
    m = Oracle(targets)
    out = pg.sample(m, noise, y, steps=2, sampler="euler", cfg_scale=w, cfg_interval=(0.1, 0.9), time_shift=1.0)
    torch.testing.assert_close(out, x)
    assert m.rows == 2 + 4  # t = 0: conditional only; t = 0.5: both branches


def test_unguided_heun_runs_half_the_official_rows():
    m, N, B = Oracle(torch.zeros(2, 3, 4, 4)), 50, 3
    pg.sample(m, torch.randn(B, 3, 4, 4), torch.zeros(B, dtype=torch.long), steps=N, sampler="heun", cfg_scale=1.0)
    official_rows = 2 * B * (2 * N - 1)  # the official sampler always doubles the batch; NFE = 2N - 1
    assert m.rows == B * (2 * N - 1) == official_rows // 2
    m.rows = 0  # guided: both branches only inside (0.1, 0.9]
    pg.sample(m, torch.randn(B, 3, 4, 4), torch.zeros(B, dtype=torch.long), steps=N, cfg_scale=2.25, time_shift=2.0)
    ts = pg.time_grid(N, 2.0)
    guided = sum(1 for i in range(N) if 0.1 < ts[i] <= 0.9)
    assert m.rows == B * (2 * N - 1) + B * (2 * guided - (1 if 0.1 < ts[N - 1] <= 0.9 else 0))


def test_to_uint8_rounding():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert pg.to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]


class Fn(nn.Module):
    """An analytic x-predictor x_hat = f(x, t, y), t shaped (B, 1, 1, 1); records its calls, rows and times."""

    def __init__(self, f, num_classes=2):
        super().__init__()
        self.f, self.num_classes, self.rows, self.times = f, num_classes, 0, []

    def forward(self, x, t, y):
        self.rows += x.shape[0]
        self.times.append(t[0].item())
        return self.f(x, t.view(-1, 1, 1, 1), y)


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
    assert not torch.allclose(x2, x1 + 0.5 * v1)  # not Euler
    m = Fn(f)
    pg.sample(m, noise, y, steps=2, sampler="euler", cfg_scale=3.0, cfg_interval=(0.1, 0.5), time_shift=1.0)
    assert m.rows == 2 + 4  # euler: closed at hi, guided at t = 0.5


def test_adams2_exact_for_velocities_linear_in_t_on_a_shifted_grid():
    # v = p + q t (x_hat = x + (1 - t) v): after the Euler first step, each step integrates v exactly, on any grid, so
    # x_N = x_0 + int_0^1 v dt - (Euler's first-step error q h_0^2 / 2) = x_0 + p + q / 2 - q h_0^2 / 2; Euler itself
    # loses q h_i^2 / 2 on every step.
    p, q, x0 = torch.randn(3, 3, 4, 4).unbind()
    m = Fn(lambda x, t, y: x + (1 - t) * (p + q * t))
    ts = pg.time_grid(10, 3.0)
    out = pg.sample(m, x0[None], torch.zeros(1, dtype=torch.long), steps=10, sampler="adams2", time_shift=3.0)
    torch.testing.assert_close(out[0], x0 + p + q / 2 - q * ts[1] ** 2 / 2, atol=1e-5, rtol=1e-5)
    euler = pg.sample(m, x0[None], torch.zeros(1, dtype=torch.long), steps=10, sampler="euler", time_shift=3.0)
    torch.testing.assert_close(euler[0], x0 + p + q / 2 - q * (ts.diff() ** 2).sum() / 2, atol=1e-5, rtol=1e-5)


def test_adams2_net_time_is_the_float32_running_sum_of_dt():
    # NOTE(official): AdamLM feeds the net t_cur += dt, not the grid value; they differ (in the last bit) on a few
    # grids such as 7 steps at shift 3.
    ts, m = pg.time_grid(7, 3.0), Fn(lambda x, t, y: x)
    pg.sample(m, torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long), steps=7, sampler="adams2", time_shift=3.0)
    t_cur = [torch.zeros(())]
    for dt in ts.diff()[:-1]:
        t_cur.append(t_cur[-1] + dt)
    assert m.times == torch.stack(t_cur).tolist() and m.times[2] != ts[2].item()


def test_adams2_one_call_per_step_and_half_the_official_rows_unguided():
    B, N = 3, 25  # the T2I setting: 25 steps, shift 3, CFG 4 (there on the interval (0, 1))
    noise, y = torch.randn(B, 3, 4, 4), torch.zeros(B, dtype=torch.long)
    m = Fn(lambda x, t, y: x * t)
    pg.sample(m, noise, y, steps=N, sampler="adams2", cfg_scale=1.0, time_shift=3.0)
    assert len(m.times) == N and m.rows == B * N == 2 * B * N // 2  # the official sampler always doubles the batch
    for interval in ((0.0, 1.0), (0.1, 0.9)):
        m = Fn(lambda x, t, y: x * t)
        pg.sample(m, noise, y, steps=N, sampler="adams2", cfg_scale=4.0, cfg_interval=interval, time_shift=3.0)
        guided = sum(interval[0] < t < interval[1] for t in pg.time_grid(N, 3.0)[:N].tolist())
        assert len(m.times) == N and m.rows == B * (N + guided) and guided == {0.0: N - 1, 0.1: 18}[interval[0]]


def test_unknown_sampler_names_are_rejected():
    m, noise, y = Oracle(torch.zeros(2, 3, 4, 4)), torch.randn(1, 3, 4, 4), torch.zeros(1, dtype=torch.long)
    for name in ("adams", "Heun", "dpm"):
        with pytest.raises(ValueError, match=r"unknown sampler .*heun, euler, adams2"):
            pg.sample(m, noise, y, steps=2, sampler=name)
    assert m.rows == 0
    assert pg.parse_args(["--sample", "--sampler", "adams2"])[0].sampler == "adams2"
    with pytest.raises(SystemExit):
        pg.parse_args(["--sample", "--sampler", "adams"])


# ---------------------------------------------------------------------------------------------------------------
# Objective (paper Eq. 6-9)

@functools.lru_cache(maxsize=None)
def frozen_nets():
    import dino
    import lpips
    torch.manual_seed(0)
    d = dino.DINOv2(embed_dim=768, depth=2, num_heads=12)  # real width (REPA targets are 768-d), 2 blocks for speed
    with torch.no_grad():
        for n, p in d.named_parameters():
            if "gamma" in n:
                p.normal_(0, 0.3)
    return d, lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)


class Recorder(nn.Module):  # wraps a frozen net and records the batch shapes it sees
    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, *a):
        self.calls.append(tuple(a[0].shape))
        return self.net(*a)

    def patch_tokens(self, x, p):
        self.calls.append(tuple(x.shape))
        return self.net.patch_tokens(x, p)


def make_loss(**kw):
    d, lp = frozen_nets()
    args = dict(repa_layer=2, label_dropout=0.0, num_classes=10)
    args.update(kw)
    return pg.PixelGenLoss(64, Recorder(d), Recorder(lp), **args)


def batch(B=4, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(B, 3, S, S, generator=g) * 2 - 1, torch.randint(0, 10, (B,), generator=g),
            torch.randn(B, 3, S, S, generator=g))


def test_loss_terms_against_direct_computation():
    model, loss_fn = randomize(tiny_jit()), make_loss()
    x, y, eps = batch()
    t = torch.tensor([0.1, 0.5, 0.29, 0.9])
    out = loss_fn(model, x, y, t=t, noise=eps)
    d, lp = frozen_nets()
    xt = t.view(-1, 1, 1, 1) * x + (1 - t.view(-1, 1, 1, 1)) * eps
    x_hat, h = model(xt, t, y, return_layer=2)
    v_hat, v = (x_hat - xt) / (1 - t.view(-1, 1, 1, 1)), (x - xt) / (1 - t.view(-1, 1, 1, 1))
    fm = ((v_hat - v) ** 2).mean()
    z = d.patch_tokens(x, 16)
    repa = (1 - F.cosine_similarity(loss_fn.proj(h), z, dim=-1)).mean()
    gated = [1, 3]
    lpips_v = torch.stack([lp(x_hat[i:i + 1], x[i:i + 1]).squeeze() for i in gated]).mean()
    pdino = torch.stack([(1 - F.cosine_similarity(d.patch_tokens(x_hat[i:i + 1], 16), z[i:i + 1], dim=-1)).mean()
                         for i in gated]).mean()
    for k, want in [("fm", fm), ("repa", repa), ("lpips", lpips_v), ("pdino", pdino),
                    ("loss", fm + 0.1 * lpips_v + 0.01 * pdino + 0.5 * repa)]:
        torch.testing.assert_close(out[k].detach(), want.detach(), rtol=1e-5, atol=1e-6, msg=k)
    assert out["gate"] == 0.5 and lpips_v > 0 and pdino > 0


@pytest.mark.parametrize("ts,n_gated", [([0.1, 0.2, 0.29, 0.0], 0), ([0.3, 0.5, 0.99, 0.31], 4), ([0.1, 0.3, 0.2, 0.7], 2)])
def test_gate_edge_cases_run_nets_on_gated_samples_only(ts, n_gated):
    model, loss_fn = randomize(tiny_jit()), make_loss()
    x, y, eps = batch()
    out = loss_fn(model, x, y, t=torch.tensor(ts), noise=eps)
    out["loss"].backward()
    assert out["gate"] == n_gated / 4 and torch.isfinite(out["loss"])
    assert loss_fn.lpips.calls == ([(n_gated, 3, 32, 32)] if n_gated else [])
    assert loss_fn.dino.calls == [(4, 3, 32, 32)] + ([(n_gated, 3, 32, 32)] if n_gated else [])  # target + gated
    if not n_gated:
        assert out["lpips"] == 0 and out["pdino"] == 0


def test_subset_equals_full_batch_masking_loss_and_gradients():
    x, y, eps = batch(6)
    t = torch.tensor([0.1, 0.5, 0.29, 0.9, 0.31, 0.05])
    d, lp = frozen_nets()
    m1 = randomize(tiny_jit())
    m2 = copy.deepcopy(m1)
    loss_fn = make_loss()
    out = loss_fn(m1, x, y, t=t, noise=eps)
    out["loss"].backward()
    # the official way: both nets on the whole batch, per-sample values masked, sum / count
    proj = loss_fn.proj
    xt = pg.x_t(x, eps, t)
    x_hat, h = m2(xt, t, y, return_layer=2)
    mask = (t >= 0.3).float()
    z = d.patch_tokens(x, 16)
    fm = (pg.x_to_v(x_hat, xt, t) - pg.x_to_v(x, xt, t)).pow(2).mean()
    lp_all = (lp(x_hat, x).view(6) * mask).sum() / mask.sum()
    pd_all = ((1 - F.cosine_similarity(d.patch_tokens(x_hat, 16), z, dim=-1)).mean(1) * mask).sum() / mask.sum()
    loss = fm + 0.1 * lp_all + 0.01 * pd_all + 0.5 * (1 - F.cosine_similarity(proj(h), z, dim=-1)).mean()
    loss.backward()
    torch.testing.assert_close(out["loss"].detach(), loss.detach(), rtol=1e-6, atol=1e-6)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_gradients_reach_model_through_perceptual_nets_only_trainables_get_grads():
    model = randomize(tiny_jit())
    x, y, eps = batch()
    t = torch.tensor([0.5, 0.6, 0.7, 0.8])
    for w in [dict(lpips_weight=1.0, pdino_weight=0.0), dict(lpips_weight=0.0, pdino_weight=1.0)]:
        model.zero_grad()
        loss_fn = make_loss(repa_weight=0.0, **w)
        out = loss_fn(model, x, y, t=t, noise=eps)
        (out["loss"] - out["fm"]).backward()  # only the perceptual term
        assert model.final_layer.linear.weight.grad.abs().sum() > 0, w
    d, lp = frozen_nets()
    assert all(p.grad is None and not p.requires_grad for p in list(d.parameters()) + list(lp.parameters()))
    loss_fn = make_loss()
    loss_fn(model, x, y, t=t, noise=eps)["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss_fn.proj.parameters())  # REPA trains
    assert set(loss_fn.state_dict()) == {"percept_weight"} | {f"proj.{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}


def test_label_dropout_rate_and_null_class():
    seen = []

    class Spy(nn.Module):  # records the labels the denoiser receives
        patch_size = 16

        def forward(self, x, t, y, return_layer=None):
            seen.append(y.clone())
            return x * 0, x.new_zeros(x.shape[0], 4, 64)

    class ZeroDino:
        def patch_tokens(self, im, p):
            return im.new_zeros(im.shape[0], 4, 768)

    _, lp = frozen_nets()
    loss_fn = pg.PixelGenLoss(64, Recorder(nn.Identity()), lp, label_dropout=0.25, num_classes=10, repa_layer=0)
    loss_fn.__dict__["dino"] = ZeroDino()
    x, y = torch.zeros(4000, 3, 32, 32), torch.randint(0, 10, (4000,))
    torch.manual_seed(0)
    loss_fn(Spy(), x, y, t=torch.zeros(4000))
    frac = (seen[-1] == 10).float().mean().item()
    assert 0.23 < frac < 0.27 and torch.equal(seen[-1][seen[-1] != 10], y[seen[-1] != 10])
    loss_fn.eval()  # no label dropout outside training
    loss_fn(Spy(), x, y, t=torch.zeros(4000))
    assert torch.equal(seen[-1], y)


def test_lpips_resize_rule_when_patch_is_not_16():
    model, loss_fn = randomize(tiny_jit(patch_size=8, in_context_start=1)), make_loss()
    x, y, eps = batch(2, 32)
    out = loss_fn(model, x, y, t=torch.tensor([0.5, 0.9]), noise=eps)
    assert loss_fn.lpips.calls == [(2, 3, 64, 64)]  # H * 16 // patch
    assert out["repa"] > 0 and torch.isfinite(out["loss"])  # DINO tokens (32/8)^2 = 16 align with the model's


def test_released_pdino_behaviour_on_request():
    model = randomize(tiny_jit())
    x, y, eps = batch()
    d, _ = frozen_nets()
    for ts in ([0.1, 0.5, 0.2, 0.9], [0.1, 0.1, 0.1, 0.1]):
        t = torch.tensor(ts)
        out = make_loss(gate_pdino=False)(model, x, y, t=t, noise=eps)
        x_hat = model(pg.x_t(x, eps, t), t, y)
        ungated = (1 - F.cosine_similarity(d.patch_tokens(x_hat, 16), d.patch_tokens(x, 16), dim=-1)).mean()
        want = ungated if max(ts) >= 0.3 else torch.tensor(1.0)  # released code: constant 1 when nothing is gated
        torch.testing.assert_close(out["pdino"], want.detach(), rtol=1e-5, atol=1e-6)


def test_adaptive_perceptual_weight():
    model = randomize(tiny_jit())
    x, y, eps = batch()
    t = torch.tensor([0.5, 0.6, 0.2, 0.8])
    loss_fn = make_loss(adaptive_from=100)
    loss_fn(model, x, y, t=t, noise=eps, step=50)  # before the start: unchanged
    assert loss_fn.percept_weight == 1.0
    out = loss_fn(model, x, y, t=t, noise=eps, step=150)
    W = model.final_layer.linear.weight
    g_fm = torch.autograd.grad(_fm(model, x, y, t, eps), W)[0].norm()
    perc = 0.1 * out["lpips"] + 0.01 * out["pdino"]
    assert perc > 0
    g_p = torch.autograd.grad(_perc(model, x, y, t, eps), W)[0].norm()
    want = 0.8 * 1.0 + 0.2 * torch.clamp(g_fm / (g_p + 1e-4), 0, 100)
    torch.testing.assert_close(loss_fn.percept_weight, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["fm"] + want * perc + 0.5 * out["repa"], rtol=1e-4, atol=1e-6)
    before = loss_fn.percept_weight.clone()
    loss_fn(model, x, y, t=t, noise=eps, step=151)  # only every 50 steps
    assert torch.equal(loss_fn.percept_weight, before)


def _fm(model, x, y, t, eps):
    xt = pg.x_t(x, eps, t)
    return (pg.x_to_v(model(xt, t, y), xt, t) - pg.x_to_v(x, xt, t)).pow(2).mean()


def _perc(model, x, y, t, eps):
    d, lp = frozen_nets()
    xt = pg.x_t(x, eps, t)
    x_hat = model(xt, t, y)  # as the loss computes it, without labels dropped
    g = (t >= 0.3).nonzero()[:, 0]
    lp_v = lp(x_hat[g], x[g]).mean()
    pd = (1 - F.cosine_similarity(d.patch_tokens(x_hat[g], 16), d.patch_tokens(x[g], 16), dim=-1)).mean()
    return 0.1 * lp_v + 0.01 * pd


def test_loss_finite_and_trains_a_tiny_model():
    torch.manual_seed(0)
    model, loss_fn = tiny_jit(), make_loss()
    opt = torch.optim.AdamW(list(model.parameters()) + list(loss_fn.proj.parameters()), lr=1e-3)
    x, y, eps = batch(4)
    losses = []
    for _ in range(5):  # one fixed batch, t and noise: the loss must fall
        out = loss_fn(model, x, y, t=torch.tensor([0.2, 0.4, 0.6, 0.8]), noise=eps)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["fm"].item())
        assert all(torch.isfinite(v).all() for v in out.values())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------------------
# Training program: resume, NaN, atomic checkpoints, DDP

def small_cfg(out_dir, **kw):
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


def test_resume_is_exact(tmp_path):
    pg.train(small_cfg(tmp_path / "straight", max_steps=4))
    pg.train(small_cfg(tmp_path / "resumed", max_steps=2))
    pg.train(small_cfg(tmp_path / "resumed", max_steps=4))
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4 and set(a) >= {"model", "ema", "loss", "opt", "step", "config"}
    for k in ("model", "ema", "loss", "opt"):
        assert same(a[k], b[k]), k
    assert not same(a["model"], a["ema"])
    log = (tmp_path / "resumed" / "log.txt").read_text()
    assert "resumed from" in log and "config:" in log and "fm" in log and "img/s" in log


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    pg.train(small_cfg(tmp_path, max_steps=2))
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


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    pg.save_atomic({"step": 1, "w": torch.ones(3)}, path)

    def dies_mid_write(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the job is killed while writing

    monkeypatch.setattr(torch, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        pg.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 1


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, mode):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if mode == "train":  # weights after every step
        sums = []
        pg.train(small_cfg(out_dir, max_steps=3, batch_size=4, ckpt_every=3),
                 hook=lambda step, model, ema: sums.append(torch.cat([p.detach().flatten() for p in model.parameters()])))
        torch.save(torch.stack(sums), os.path.join(out_dir, f"rank{rank}.pt"))
    else:  # one backward through DDP on this rank's half of a fixed batch
        import torch.distributed as dist
        dist.init_process_group("gloo")
        model, loss_fn, x, y, t, eps = _grad_setup()
        net = nn.parallel.DistributedDataParallel(pg.TrainStep(model, loss_fn))
        half = slice(rank * 4, rank * 4 + 4)
        net(x[half], y[half], 0, t=t[half], noise=eps[half])["loss"].backward()
        torch.save([p.grad for p in model.parameters() if p.requires_grad], os.path.join(out_dir, f"grad{rank}.pt"))
        dist.destroy_process_group()


def _grad_setup():
    d, lp = frozen_nets()
    torch.manual_seed(0)  # after frozen_nets(), which is cached in one process and not in the other
    model = randomize(tiny_jit())
    loss_fn = pg.PixelGenLoss(64, d, lp, repa_layer=2, label_dropout=0.0, num_classes=10)
    x, y, eps = batch(8)
    t = torch.tensor([0.1, 0.5, 0.7, 0.2, 0.9, 0.05, 0.15, 0.4])  # two gated samples on each rank
    return model, loss_fn, x, y, t, eps


@pytest.mark.parametrize("mode", ["train", "grad"])
def test_ddp_two_cpu_processes(tmp_path, mode):
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2)
    if mode == "train":
        r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
        assert r0.shape[0] == 3 and torch.equal(r0, r1)  # identical weights on both ranks after each step
        assert not torch.equal(r0[0], r0[1])
    else:
        model, loss_fn, x, y, t, eps = _grad_setup()
        loss_fn(model, x, y, t=t, noise=eps)["loss"].backward()
        single = [p.grad for p in model.parameters() if p.requires_grad]
        for g0, g1, g in zip(torch.load(tmp_path / "grad0.pt"), torch.load(tmp_path / "grad1.pt"), single):
            torch.testing.assert_close(g0, g1)
            torch.testing.assert_close(g0, g, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Data and bad input

def test_image_folder_layouts_and_odd_images(tmp_path):
    root = tmp_path / "imagenet"
    (root / "n01").mkdir(parents=True)
    (root / "n02" / "sub").mkdir(parents=True)
    rgb = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(root / "n01" / "a.JPEG")
    Image.fromarray(rgb[..., 0]).save(root / "n01" / "gray.png")                       # L
    Image.fromarray(rgb).convert("P").save(root / "n02" / "palette.png")               # P
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(root / "n02" / "rgba.png")     # RGBA
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(root / "n02" / "sub" / "deep.png")  # 16-bit
    Image.fromarray(rgb[:5, :7]).save(root / "n02" / "tiny.bmp")                       # smaller than the target
    (root / "n02" / "notes.txt").write_text("not an image")
    data = pg.ImageFolderData(str(root), 16)
    assert data.num_classes == 2 and len(data) == 6 and [y for _, y in data.samples] == [0, 0, 1, 1, 1, 1]
    for i in range(len(data)):
        img, y = data[i]
        assert img.shape == (3, 16, 16) and img.dtype == torch.uint8
    deep = data[[p for p, _ in data.samples].index(str(root / "n02" / "sub" / "deep.png"))][0]
    assert 0 < deep.float().mean() < 255  # 16-bit scaled, not clipped to white
    flat_dir = root / "n01"
    assert pg.ImageFolderData(str(flat_dir), 16).num_classes == 1


def test_adm_center_crop():
    a = np.zeros((100, 300, 3), np.uint8)
    a[:, 100:200] = 255  # the center third is white
    out = pg.center_crop(Image.fromarray(a), 32)  # 300x100 -> halve (BOX) -> 150x50 -> bicubic 96x32 -> crop
    assert out.shape == (32, 32, 3) and out[:, 4:28].min() == 255
    out = pg.center_crop(Image.fromarray(a[:10, :20]), 32)  # upsampling a small image
    assert out.shape == (32, 32, 3)


def test_bad_data_folders(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        pg.ImageFolderData(str(tmp_path / "missing"), 16)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(SystemExit, match="no images"):
        pg.ImageFolderData(str(tmp_path / "empty"), 16)


def test_unreadable_image_is_skipped_and_counted(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    data = pg.ImageFolderData(str(tmp_path), 8)
    with pytest.warns(UserWarning, match="broken.png"):
        items = [data[i] for i in range(len(data))]
    x, y, bad = pg.collate(items)
    assert x.shape == (2, 3, 8, 8) and bad == 1


def test_cli_flags_and_errors(capsys):
    cfg, mode = pg.parse_args(["--train"])
    assert mode == "train" and cfg.recipe == "demo" and cfg.model == "PixelGen-T/16"
    cfg, _ = pg.parse_args(["--train", "--data_path", "/data/train"])
    assert (cfg.recipe, cfg.model, cfg.batch_size, cfg.lr, cfg.epochs, cfg.ema, cfg.sampler, cfg.time_shift) == \
        ("xl-80ep", "PixelGen-XL/16", 256, 1e-4, 80, 0.9999, "heun", 2.0)
    cfg, _ = pg.parse_args(["--train", "--data_path", "d", "--recipe", "xl-160ep"])
    assert cfg.epochs == 160 and cfg.cfg_scale == 2.25 and cfg.adaptive_from == 400_000
    cfg, _ = pg.parse_args(["--train", "--data_path", "d", "--recipe", "l-200k", "--lr", "2e-4", "--cfg_interval", "0", "1"])
    assert cfg.model == "PixelGen-L/16" and cfg.max_steps == 200_000 and cfg.sampler == "euler" and cfg.lr == 2e-4
    assert cfg.cfg_interval == (0.0, 1.0)
    for bad in (["--train", "--model", "PixelGen-XXL/16"], ["--train", "--sample_steps", "0"], ["--train", "--batch_size", "-2"],
                ["--train", "--sample"], ["--train", "--lr", "0"], ["--train", "--no-such-flag"],
                ["--sample", "--cfg_interval", "0.9", "0.1"], ["--sample", "--time_shift", "0"], ["--train", "--repa_layer", "6"]):
        with pytest.raises(SystemExit):
            pg.parse_args(bad)


def test_batch_must_split_over_ranks(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        pg.parse_args(["--train", "--batch_size", "8"])
    assert "not divisible by the world size 3" in capsys.readouterr().err
    assert pg.parse_args(["--train", "--batch_size", "9"])[0].batch_size == 9


def test_missing_pretrained_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*download.pytorch.org.*hub/checkpoints"):
        pg.make_lpips(True, download=False)
    cfg = pg.Config(data_path="/some/imagenet", perceptual_init="pretrained")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(SystemExit, match="dinov2_vitb14_pretrain.pth"):
        pg.perceptual_nets(cfg, "cpu")
    msgs = []  # the demo (no data path) goes on with random nets and says so
    d, lp = pg.perceptual_nets(pg.Config(perceptual_init="pretrained"), "cpu", log=msgs.append)
    assert "RANDOMLY INITIALISED" in msgs[0] and not any(p.requires_grad for p in d.parameters())


def test_lpips_loads_torchvision_vgg_file(tmp_path):
    import torchvision
    vgg = torchvision.models.vgg16()
    torch.save(vgg.state_dict(), tmp_path / "vgg.pth")
    lp = pg.make_lpips(True, str(tmp_path / "vgg.pth"))
    torch.testing.assert_close(getattr(lp.net.slice3, '10').weight, vgg.features[10].weight)  # conv3_1 lands in slice3
    torch.testing.assert_close(getattr(lp.net.slice5, '28').weight, vgg.features[28].weight)
    (tmp_path / "bad.pth").write_bytes(b"truncated")
    with pytest.raises(RuntimeError, match="bad.pth is not a readable torchvision VGG16"):
        pg.make_lpips(True, str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints for sampling, and the sampling program

def test_load_our_and_official_checkpoints(tmp_path):
    m = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10))
    ema = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10), seed=1)
    torch.save(dict(model=m.state_dict(), ema=ema.state_dict(), config={"seed": 1}), tmp_path / "ours.pt")
    got, conf = pg.load_denoiser(str(tmp_path / "ours.pt"))
    assert same(got.state_dict(), ema.state_dict()) and conf == {"seed": 1}
    assert same(pg.load_denoiser(str(tmp_path / "ours.pt"), use_ema=False)[0].state_dict(), m.state_dict())
    lightning = {"state_dict": {**{"denoiser." + k: v for k, v in m.state_dict().items()},
                                **{"ema_denoiser." + k: v for k, v in ema.state_dict().items()},
                                "diffusion_trainer.proj.0.0.weight": torch.zeros(2, 2)}, "global_step": 7}
    torch.save(lightning, tmp_path / "official.ckpt")
    got, conf = pg.load_denoiser(str(tmp_path / "official.ckpt"))
    assert same(got.state_dict(), ema.state_dict()) and conf is None and got.grid * got.patch_size == 32
    bad = dict(lightning["state_dict"])
    bad["ema_denoiser.final_layer.linear.weight"] = torch.zeros(5, 192)
    del bad["ema_denoiser.blocks.0.norm1.weight"]
    torch.save({"state_dict": bad}, tmp_path / "bad.ckpt")
    with pytest.raises(SystemExit, match=r"fit no preset(.|\n)*PixelGen-T/16: 2 differences.*blocks.0.norm1.weight"):
        pg.load_denoiser(str(tmp_path / "bad.ckpt"))
    (tmp_path / "corrupt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="cannot read checkpoint"):
        pg.load_denoiser(str(tmp_path / "corrupt.pt"))
    import argparse  # Lightning files often pickle an argparse.Namespace of hyper-parameters
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(SystemExit, match="--unsafe_load"):
        pg.load_denoiser(str(tmp_path / "pickled.ckpt"))


def test_sample_program_writes_npz_and_grid(tmp_path):
    m = randomize(pg.JiT(**pg.MODELS["PixelGen-T/16"], input_size=32, num_classes=10))
    torch.save(dict(model=m.state_dict(), ema=m.state_dict(), config={"sample_steps": 3, "cfg_scale": 1.5}), tmp_path / "ckpt.pt")
    cfg, mode = pg.parse_args(["--sample", "--out_dir", str(tmp_path), "--num_samples", "12", "--batch_size", "5", "--save_pngs"])
    assert mode == "sample" and cfg.sample_steps == 3 and cfg.cfg_scale == 1.5  # settings from the checkpoint
    pg.sample_main(cfg)
    with np.load(tmp_path / "samples.npz") as f:
        imgs, labels = f["arr_0"], f["arr_1"]
    assert imgs.shape == (12, 32, 32, 3) and imgs.dtype == np.uint8 and labels.tolist() == [i % 10 for i in range(12)]
    assert (tmp_path / "grid.png").exists() and len(os.listdir(tmp_path / "images")) == 12
    # image i depends only on (seed, i): another batch split (as with more processes) gives the same images, up to
    # the float rounding of batched matmuls (at most 1 of 255)
    pg.sample_main(pg.dataclasses.replace(cfg, batch_size=12, save_pngs=False))
    with np.load(tmp_path / "samples.npz") as f:
        assert np.abs(f["arr_0"].astype(int) - imgs).max() <= 1
    noise = torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(cfg.seed * 10**9 + 7))
    with torch.no_grad():
        one = pg.sample(m.eval(), noise[None], torch.tensor([7]), 3, cfg.sampler, 1.5, cfg.cfg_interval, cfg.time_shift)
    assert np.abs(pg.to_uint8(one)[0].numpy().astype(int) - imgs[7]).max() <= 1


def test_resume_from_incompatible_checkpoint_is_a_clear_error(tmp_path):
    pg.train(small_cfg(tmp_path, max_steps=2))
    before = (tmp_path / "ckpt.pt").read_bytes()
    with pytest.raises(SystemExit, match="cannot resume from .*ckpt.pt(.|\n)*--no-resume"):
        pg.train(small_cfg(tmp_path, max_steps=4, model="PixelGen-S/16", repa_layer=4))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


# ---------------------------------------------------------------------------------------------------------------
# dino.py: DINOv2 ViT-B/14 (bitwise equal to facebookresearch/dinov2 in float32 on CPU, checked beside the repo)

# Official dinov2_vitb14_pretrain.pth: 175 tensors = 3 tokens/embeddings + patch conv (2) + 12 blocks x 14 + final norm (2)
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
def _dino_model():
    """One shared random-weight ViT-B/14 (frozen, so tests cannot change it)."""
    torch.manual_seed(0)
    return dino.DINOv2()


@functools.lru_cache(maxsize=None)
def _dino_tiny():
    """Same architecture and code paths, narrow (64 wide, 12 blocks): for the semantics tests, fast on CPU."""
    torch.manual_seed(0)
    return dino.DINOv2(embed_dim=64, depth=12, num_heads=4)


def test_dino_state_dict_keys_and_shapes():
    sd = _dino_model().state_dict()
    assert len(DINO_EXPECTED) == len(sd) == 175
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == DINO_EXPECTED
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert sum(v.numel() for v in sd.values()) == 86_580_480


def test_dino_frozen_and_always_eval():
    model = _dino_model()
    assert not any(p.requires_grad for p in model.parameters())
    model.train()                                    # e.g. a parent module's .train(): must stay in eval
    assert not any(m.training for m in model.modules())


def test_dino_strict_roundtrip_and_hub_cache(tmp_path, monkeypatch):
    hub = tmp_path / 'hub'
    (hub / 'checkpoints').mkdir(parents=True)
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(hub))
    torch.manual_seed(1)
    sd = {k: torch.randn(shape) for k, shape in DINO_EXPECTED}
    path = hub / 'checkpoints' / dino.WEIGHTS_FILE
    torch.save(sd, path)
    for model in (dino.load_dinov2(str(path)), dino.load_dinov2(download=False)):  # explicit path, hub cache
        loaded = model.state_dict()
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
        assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_dino_missing_weights_message(tmp_path, monkeypatch):
    hub = tmp_path / 'hub'
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(hub))

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


def test_dino_corrupt_or_wrong_file(tmp_path):
    bad = tmp_path / 'corrupt.pth'
    bad.write_bytes(b'\x00not a checkpoint' * 10)
    with pytest.raises(RuntimeError, match='corrupt.pth'):
        dino.load_dinov2(str(bad))
    wrong = tmp_path / 'wrong.pth'
    torch.save({'cls_token': torch.zeros(1, 1, 768)}, wrong)
    with pytest.raises(RuntimeError, match='wrong.pth'):
        dino.load_dinov2(str(wrong))


def test_dino_token_shapes():
    model = _dino_model()
    with torch.no_grad():
        for (H, W), (h, w) in {(224, 224): (16, 16), (224, 308): (16, 22), (518, 518): (37, 37)}.items():
            out = model.forward_features(torch.randn(1, 3, H, W))
            assert out['x_norm_clstoken'].shape == (1, 768)
            assert out['x_norm_patchtokens'].shape == (1, h * w, 768)
            assert out['x_prenorm'].shape == (1, 1 + h * w, 768)


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
        assert fmap.shape == (2, 64, 2, 3)
        assert torch.equal(fmap[:, :, 1, 2], last[:, 1 * 3 + 2])                 # row-major patch order
        fmap, = model.get_intermediate_layers(torch.randn(1, 3, 224, 308), n=1, reshape=True)
        assert fmap.shape == (1, 64, 16, 22)                                    # (B, D, H/14, W/14)
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


def test_dino_size_must_be_multiple_of_14():
    model = _dino_tiny()
    for H, W in [(225, 224), (224, 230)]:
        with pytest.raises(AssertionError, match='multiple of the patch size 14'):
            model.forward_features(torch.randn(1, 3, H, W))


def test_dino_patch_tokens():
    model = _dino_model()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert model.patch_tokens(torch.rand(1, 3, 256, 256) * 2 - 1).shape == (1, 256, 768)
        assert model.patch_tokens(torch.rand(1, 3, 64, 128) * 2 - 1, patch_size=32).shape == (1, 8, 768)
        # the recipe spelled out: [0,1], ImageNet mean/std, bicubic to 14/16 of the size, last block + norm
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        y = F.interpolate(((x + 1) / 2 - mean[:, None, None]) / std[:, None, None], size=(56, 56), mode='bicubic')
        ref = model.forward_features(y)['x_norm_patchtokens']
    x.requires_grad_(True)
    feats = model.patch_tokens(x)
    assert feats.shape == (2, 16, 768) and torch.allclose(feats, ref, atol=1e-6)
    assert torch.equal(model(x), feats)                                      # forward = patch_tokens
    (1 - F.cosine_similarity(feats, ref.flip(0), dim=-1)).mean().backward()  # P-DINO-like loss, other target
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_dino_bf16_autocast():
    model = _dino_tiny()
    x = torch.rand(1, 3, 32, 48) * 2 - 1            # -> 28x42 DINO input, 2x3 tokens
    with torch.no_grad():
        ref = model.patch_tokens(x)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model.patch_tokens(x)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    assert F.cosine_similarity(low.float(), ref, dim=-1).min() > 0.999


# ---------------------------------------------------------------------------------------------------------------
# fid.py: FID Inception, features, FID / IS / precision / recall, I/O, CLI

_MODEL = []


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
            model(fid.preprocess_images(_images(2, 299, 299, seed=1), "adm"))
        for h in hooks:
            h.remove()
        _MODEL.append(model)
    return _MODEL[0]


def _images(n, h, w, seed=0):
    """Smooth random uint8 images (n, 3, h, w) with some noise on top."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 3, max(2, h // 8), max(2, w // 8), generator=g), size=(h, w), mode="bilinear")
    return ((x + 0.2 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1) * 255).to(torch.uint8)


def _save_weights(path):
    torch.save(dict(_random_inception().state_dict()), path)
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# Network


def test_fid_state_dict_keys_and_shapes():
    sd = fid.InceptionV3().state_dict()
    assert len(sd) == 472 and sum(v.numel() for v in sd.values()) == 23885392
    assert not any("num_batches_tracked" in k or "AuxLogits" in k for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3),
        "Conv2d_1a_3x3.bn.running_var": (32,),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7b.branch_pool.conv.weight": (192, 1280, 1, 1),
        "Mixed_7c.branch3x3dbl_1.conv.weight": (448, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.running_var": (192,),
        "fc.weight": (1008, 2048),
        "fc.bias": (1008,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert list(sd)[0] == "Conv2d_1a_3x3.conv.weight" and list(sd)[-1] == "fc.bias"


def test_fid_strict_load_without_num_batches_tracked(tmp_path):
    sd = {k: torch.randn_like(v) for k, v in fid.InceptionV3().state_dict().items()}  # plain dict: no _metadata
    torch.save(sd, tmp_path / "w.pth")
    model = fid.load_inception(str(tmp_path / "w.pth"), device="cpu")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert torch.equal(model.Mixed_7c.branch_pool.bn.running_var, sd["Mixed_7c.branch_pool.bn.running_var"])
    del sd["fc.bias"]
    torch.save(sd, tmp_path / "w2.pth")
    with pytest.raises(RuntimeError, match="fc.bias"):
        fid.load_inception(str(tmp_path / "w2.pth"), device="cpu")


def test_fid_feature_shapes_and_layouts():
    model = _random_inception()
    x = _images(2, 37, 53, seed=2)  # odd, non-square
    ref, logits = fid.get_features(model, x, return_logits=True)
    assert ref.shape == (2, 2048) and ref.dtype == np.float64 and np.isfinite(ref).all()
    assert 0.01 < np.abs(ref).max() < 100  # calibrated, not exploding
    assert logits.shape == (2, 1008)
    np.testing.assert_allclose(logits, ref @ model.fc.weight.double().numpy().T, rtol=1e-12)
    nhwc = x.permute(0, 2, 3, 1)
    for variant, rows in ((nhwc.numpy(), [0, 1]), (nhwc[1:].contiguous(), [1]), (x[:1].numpy(), [0])):
        np.testing.assert_allclose(fid.get_features(model, variant, batch_size=1), ref[rows], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        fid.get_features(model, x.float())
    with pytest.raises(ValueError, match="preprocess"):
        fid.get_features(model, x, preprocess="tf2")


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


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


def test_fid_adm_resize_matches_tf1_bilinear():
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
    x299 = _images(1, 299, 299)
    assert torch.equal(fid.preprocess_images(x299, "adm"), (x299.float() - 128) / 128)


def test_fid_pytorch_fid_preprocessing():
    x = _images(2, 45, 61)
    expected = 2 * F.interpolate(x.float() / 255, size=(299, 299), mode="bilinear", align_corners=False) - 1
    assert torch.equal(fid.preprocess_images(x, "pytorch-fid"), expected)
    assert not torch.allclose(fid.preprocess_images(x, "adm"), expected, atol=1e-2)  # the two modes differ


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def _random_cov(d, n, seed):
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 1.0
    return fid.feature_statistics(feats)


def test_fid_frechet_distance_closed_forms():
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


def test_fid_frechet_distance_against_sqrtm():
    for (n1, n2), seed in [((500, 400), 3), ((40, 300), 4)]:  # full rank, and a singular sigma1 (40 samples, 64-d)
        mu1, s1 = _random_cov(64, n1, seed)
        mu2, s2 = _random_cov(64, n2, seed + 10)
        covmean = scipy.linalg.sqrtm(s1 @ s2).real
        direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-7)


def test_fid_feature_statistics():
    feats = np.random.default_rng(0).standard_normal((50, 6)).astype(np.float32)
    mu, sigma = fid.feature_statistics(feats)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)


def test_fid_inception_score():
    onehot = 50 * np.eye(10)
    assert fid.inception_score(np.tile(onehot[3], (40, 1))) == pytest.approx(1.0, abs=1e-9)
    assert fid.inception_score(np.tile(onehot, (4, 1))) == pytest.approx(10.0, rel=1e-9)
    # Against a direct numpy computation with ADM's split_size = 5000: splits of 5000, 5000, 2000.
    logits = np.random.default_rng(0).standard_normal((12000, 10)) * 3
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(0, 12000, 5000):
        part = p[i:i + 5000]
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), 1))))
    assert fid.inception_score(logits) == pytest.approx(np.mean(scores), rel=1e-10)
    assert fid.inception_score(logits[:100]) == pytest.approx(fid.inception_score(logits[:100], split_size=100))


def _precision_recall_numpy(ref, sam, k=3):
    def d2(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]  # index 0 is the point itself
    r_sam = np.sort(d2(sam, sam), axis=1)[:, k]
    precision = np.mean((d2(sam, ref) <= r_ref[None]).any(1))
    recall = np.mean((d2(ref, sam) <= r_sam[None]).any(1))
    return precision, recall


def test_fid_precision_recall():
    rng = np.random.default_rng(0)
    # Integer features: squared distances are exact in float32 and float64, ties included.
    ref = rng.integers(-20, 21, size=(60, 5)).astype(np.float64)
    sam = rng.integers(-10, 31, size=(47, 5)).astype(np.float64)
    expected = _precision_recall_numpy(ref, sam)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert fid.precision_recall(ref, sam, device="cpu") == pytest.approx(expected, abs=1e-12)
    assert fid.precision_recall(ref, sam, batch_size=7, device="cpu") == pytest.approx(expected, abs=1e-12)
    assert fid.precision_recall(ref, ref, batch_size=9, device="cpu") == (1.0, 1.0)
    assert fid.precision_recall(ref, sam + 1000, device="cpu") == (0.0, 0.0)
    radii = fid.manifold_radii(torch.tensor(ref, dtype=torch.float32), k=3, batch_size=11)
    np.testing.assert_array_equal(radii.numpy(), np.sort(((ref[:, None] - ref[None]) ** 2).sum(-1), 1)[:, 3])
    with pytest.raises(ValueError, match="more than k"):
        fid.precision_recall(ref[:3], sam, device="cpu")


# ---------------------------------------------------------------------------------------------------------------
# Inputs and errors


def _write_folder(folder, sizes, seed=0):
    """RGB PNGs of the given (h, w) sizes, plus a grayscale, an RGBA and a JPEG one in a subfolder."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    h, w = sizes[0]
    Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(folder / "sub" / "gray.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA").save(folder / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / "sub" / "photo.JPG")


def test_fid_folder_and_npz_reading(tmp_path):
    _write_folder(tmp_path / "imgs", [(20, 24), (20, 24), (31, 17)])
    src = fid.Source(str(tmp_path / "imgs"))
    assert len(src) == 6 and src.stats is None
    batches = list(src.batches(batch_size=2))
    # sorted paths: img0, img1, img2 (other size: own batch), then sub/gray, sub/photo.JPG, sub/rgba
    assert [b.shape for b in batches] == [(2, 20, 24, 3), (1, 31, 17, 3), (2, 20, 24, 3), (1, 20, 24, 3)]
    assert all(b.dtype == np.uint8 for b in batches)
    gray = np.asarray(Image.open(tmp_path / "imgs" / "sub" / "gray.png"))
    np.testing.assert_array_equal(batches[2][0], np.repeat(gray[..., None], 3, axis=2))
    rgba = np.asarray(Image.open(tmp_path / "imgs" / "sub" / "rgba.png"))
    np.testing.assert_array_equal(batches[3][0], rgba[..., :3])

    arr = np.random.default_rng(0).integers(0, 256, (5, 16, 12, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "batch.npz", arr_0=arr)
        src = fid.Source(str(tmp_path / "batch.npz"))
        parts = list(src.batches(batch_size=2))
        assert len(src) == 5 and [len(b) for b in parts] == [2, 2, 1]
        np.testing.assert_array_equal(np.concatenate(parts), arr)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4, np.float32), sigma=np.eye(4))
    src = fid.Source(str(tmp_path / "stats.npz"))
    assert len(src) == 0 and src.stats[0].dtype == np.float64 and src.stats[1].shape == (4, 4)


def test_fid_error_messages(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        fid.Source(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fid.Source(str(tmp_path / "nowhere"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        list(fid.Source(str(tmp_path / "bad")).batches())
    np.savez(tmp_path / "other.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="arr_0"):
        fid.Source(str(tmp_path / "other.npz"))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        fid.Source(str(tmp_path / "float.npz"))
    # Weights: missing with download disabled, missing explicit path, corrupt file.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError) as e:
        fid.load_inception(download=False)
    for part in (fid.FID_WEIGHTS_FILE, fid.FID_WEIGHTS_URL, str(tmp_path / "hub" / "checkpoints")):
        assert part in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        fid.load_inception(str(tmp_path / "missing.pth"))
    (tmp_path / "corrupt.pth").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="corrupt.pth"):
        fid.load_inception(str(tmp_path / "corrupt.pth"))
    # The CLI turns them into one-line exits.
    with pytest.raises(SystemExit, match="nowhere"):
        fid.main([str(tmp_path / "nowhere"), str(tmp_path / "other.npz")])
    with pytest.raises(SystemExit, match="missing.pth"):
        fid.main([str(tmp_path / "bad"), str(tmp_path / "bad"), "--weights", str(tmp_path / "missing.pth")])


def test_fid_cli_end_to_end(tmp_path, capsys):
    weights = _save_weights(tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    sam = rng.integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    ref = np.concatenate([sam[:2], rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)])
    (tmp_path / "samples").mkdir()
    for i, img in enumerate(sam):
        Image.fromarray(img).save(tmp_path / "samples" / f"{i}.png")
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    model = _random_inception()
    feats, logits = fid.get_features(model, np.concatenate([sam, ref]), return_logits=True)
    fs, fr = feats[:4], feats[4:]

    res = fid.main([str(tmp_path / "samples"), str(tmp_path / "ref.npz"), "--is", "--pr", "--save-stats",
                    str(tmp_path / "s.npz"), "--weights", weights, "--device", "cpu", "--batch_size", "3"])
    out = capsys.readouterr().out
    assert all(label in out for label in ("FID:", "Inception Score:", "Precision:", "Recall:"))
    with np.load(tmp_path / "s.npz") as saved:  # --save-stats wrote the samples' statistics
        np.testing.assert_allclose(saved["mu"], fs.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(saved["sigma"], np.cov(fs, rowvar=False), rtol=1e-5, atol=1e-9)
    assert res["inception_score"] == pytest.approx(fid.inception_score(logits[:4]), rel=1e-6)
    assert (res["precision"], res["recall"]) == fid.precision_recall(fr, fs, device="cpu")

    # The same FID from statistics alone (no network: the weights path is never opened), with an ADM-style
    # reference batch holding arr_0 and mu / sigma, whose precomputed statistics are used.
    mu, sigma = fid.feature_statistics(fr)
    np.savez(tmp_path / "ref_adm.npz", arr_0=ref, mu=mu, sigma=sigma)
    res2 = fid.main([str(tmp_path / "s.npz"), str(tmp_path / "ref_adm.npz"), "--weights", str(tmp_path / "none")])
    assert res2["fid"] == pytest.approx(res["fid"], rel=1e-6)
    with pytest.raises(SystemExit, match="only mu / sigma"):
        fid.main([str(tmp_path / "s.npz"), str(tmp_path / "ref.npz"), "--pr", "--weights", weights])


def test_bench_smoke(capsys):  # the benchmark runs end to end (its numbers are for the notes, not for tests)
    cfg, mode = pg.parse_args(["--bench", "--image_size", "32", "--batch_size", "4", "--bench_steps", "1",
                               "--sample_steps", "2"])
    ms = pg.bench(cfg)
    assert mode == "bench" and set(ms) == {"step", "denoiser", "lpips", "dino", "opt+ema"}
    assert "img/s" in capsys.readouterr().out


def test_training_writes_sample_grids(tmp_path):
    pg.train(small_cfg(tmp_path, max_steps=2, sample_every=2, sample_steps=2, num_samples=20))
    grid = Image.open(tmp_path / "grid_0000002.png")
    assert grid.size == (10 * 34 + 2, 2 * 34 + 2)  # one column per class, 32 px images with 2 px borders
    assert "sample grid:" in (tmp_path / "log.txt").read_text()
