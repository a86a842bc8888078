"""Tests for svfap. They read like the paper's claims; each asserts numbers or behaviour."""

import argparse
import ast
import contextlib
import fractions
import gc
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import beta as beta_dist, ks_2samp, kstest, pearsonr
from torch.utils._python_dispatch import TorchDispatchMode

import data as D
from data import (DEMO_CLASSES, DEMO_FRAMES, DEMO_SIZE, demo_clip_plan, demo_identity, demo_splits,
                  make_demo_dataset, render_demo_clip, ten_percent)
import finetune
import metrics
import model as M
import pretrain
from model import CONFIGS, IMAGENET_MEAN, IMAGENET_STD, SVFAP, SVFAPClassifier, SVFAPConfig, tube_mask

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = CONFIGS["tiny"]

# =====================================================================================================
# model.py


def tiny_video(batch=2, cfg=TINY, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, generator=g)


def model_seeded(cls, *args, seed=0):
    torch.manual_seed(seed)
    return cls(*args).eval()


def masked_pixel_positions(mask, cfg):
    """Bool (B, 1, T, H, W): True on the pixels of masked tubelets, built with explicit loops."""
    B = mask.shape[0]
    Tg, Hg, Wg = cfg.grid
    kt, p = cfg.tubelet_size, cfg.patch_size
    out = torch.zeros(B, 1, cfg.num_frames, cfg.img_size, cfg.img_size, dtype=torch.bool)
    for b in range(B):
        for n in range(cfg.num_patches):
            if mask[b, n]:
                t, rest = divmod(n, Hg * Wg)
                i, j = divmod(rest, Wg)
                out[b, :, t * kt:(t + 1) * kt, i * p:(i + 1) * p, j * p:(j + 1) * p] = True
    return out


def test_tube_mask_masks_floor_rho_S_positions_the_same_in_every_slice():
    for ratio in (0.5, 0.75, 0.9, 0.95, 0.29):
        cfg = replace(TINY, mask_ratio=ratio)
        mask = tube_mask(16, cfg, generator=torch.Generator().manual_seed(1))
        T, S = cfg.grid[0], cfg.num_spatial
        assert mask.dtype == torch.bool and mask.shape == (16, T * S)
        per_slice = mask.view(16, T, S)
        assert (per_slice.sum(-1) == math.floor(ratio * S + 1e-9)).all()
        assert (per_slice == per_slice[:, :1]).all(), "every temporal slice masks the same positions"
        assert len({tuple(m.tolist()) for m in per_slice[:, 0]}) > 1, "clips get different masks"
    a = tube_mask(4, TINY, generator=torch.Generator().manual_seed(7))
    b = tube_mask(4, TINY, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_masked_pixels_never_reach_the_prediction():
    model = model_seeded(SVFAP, TINY)
    video = tiny_video()
    mask = tube_mask(2, TINY, generator=torch.Generator().manual_seed(0))
    where = masked_pixel_positions(mask, TINY).expand_as(video)
    changed = torch.where(where, torch.randn_like(video) * 3, video)
    assert not torch.equal(changed, video)
    with torch.no_grad():
        loss_a, pred_a = model(video, mask)
        loss_b, pred_b = model(changed, mask)
        # the same edit on a visible pixel must show: the test can fail
        visible_edit = video.clone()
        visible_edit[~where] += 1.0
        _, pred_c = model(visible_edit, mask)
    assert torch.equal(pred_a, pred_b)
    assert loss_a != loss_b, "the loss moves through its target only"
    assert not torch.allclose(pred_a, pred_c)


def slow_reference_loss(video, pred, mask, cfg):
    """Independent MSE over masked tubelets, with explicit loops over tokens and channels."""
    mean = torch.tensor(M.IMAGENET_MEAN).view(3, 1, 1, 1)
    std = torch.tensor(M.IMAGENET_STD).view(3, 1, 1, 1)
    Tg, Hg, Wg = cfg.grid
    kt, p = cfg.tubelet_size, cfg.patch_size
    total, count = 0.0, 0
    for b in range(video.shape[0]):
        raw = video[b].double() * std.double() + mean.double()  # (3, T, H, W) in [0, 1]
        k = 0
        for n in range(cfg.num_patches):
            if not mask[b, n]:
                continue
            t, rest = divmod(n, Hg * Wg)
            i, j = divmod(rest, Wg)
            cube = raw[:, t * kt:(t + 1) * kt, i * p:(i + 1) * p, j * p:(j + 1) * p]  # (3, kt, p, p)
            target = torch.empty(kt, p, p, 3, dtype=torch.float64)
            for c in range(3):
                ch = cube[c]
                target[..., c] = (ch - ch.mean()) / (ch.std(unbiased=True) + 1e-6)
            diff = pred[b, k].double() - target.reshape(-1)
            total += float((diff ** 2).sum())
            count += diff.numel()
            k += 1
        assert k == pred.shape[1]
    return total / count


def test_loss_equals_slow_reference():
    model = model_seeded(SVFAP, TINY)
    video = tiny_video()
    mask = tube_mask(2, TINY, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, pred = model(video, mask)
    assert pred.shape == (2, TINY.grid[0] * TINY.num_masked_spatial, 2 * 8 * 8 * 3)
    ref = slow_reference_loss(video, pred, mask, TINY)
    assert abs(loss.item() - ref) < 1e-5 * max(1.0, ref)


def test_loss_without_norm_pix_uses_raw_pixels():
    cfg = replace(TINY, norm_pix_loss=False)
    model = model_seeded(SVFAP, cfg)
    video = tiny_video(1)
    mask = tube_mask(1, cfg, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        loss, pred = model(video, mask)
    raw = M.patchify(video * model.std + model.mean, 2, 8)[mask].view(pred.shape)
    assert torch.allclose(loss, F.mse_loss(pred, raw))


def test_patch_embedding_is_the_release_conv3d():
    model = model_seeded(SVFAPClassifier, TINY, 6)
    pe = model.encoder.patch_embed
    video = tiny_video()
    conv = F.conv3d(video, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride).flatten(2).transpose(1, 2)
    assert (pe(video) - conv).abs().max() < 1e-5


def test_reconstruct_returns_the_video_when_the_prediction_is_perfect():
    model = model_seeded(SVFAP, TINY)
    video = tiny_video()
    mask = tube_mask(2, TINY, generator=torch.Generator().manual_seed(0))
    target = model.target_patches(video)[mask].view(2, -1, TINY.patch_dim)
    rec = model.reconstruct(video, target, mask)
    assert rec.shape == video.shape
    original = (video * model.std + model.mean).clamp(0, 1)
    assert (rec - original).abs().max() < 1e-4


def test_spatial_attention_normalises_over_the_spatial_tokens_of_each_slice():
    torch.manual_seed(0)
    sa = M.SpatialAttention(32, num_tokens=5, hidden=16)
    x = torch.randn(2, 4, 9, 32)  # (B, T, S, C)
    w = sa.weights(x)
    assert w.shape == (2, 4, 9, 5)
    assert torch.allclose(w.sum(dim=2), torch.ones(2, 4, 5), atol=1e-6)
    z = sa(x).view(2, 4, 5, 32)
    for b in range(2):
        for t in range(4):
            for k in range(5):
                ref = sum(w[b, t, s, k] * x[b, t, s] for s in range(9))
                assert torch.allclose(z[b, t, k], ref, atol=1e-5)
    # a slice's bottleneck tokens depend on that slice alone
    y = x.clone()
    y[:, 2] += 1.0
    z2 = sa(y).view(2, 4, 5, 32)
    assert torch.equal(z2[:, [0, 1, 3]], z[:, [0, 1, 3]]) and not torch.allclose(z2[:, 2], z[:, 2])


def test_multiscale_fusion_keeps_every_token_at_its_spatial_position():
    model = SVFAP(TINY)
    B, S, C = 2, 7, 3
    # each value encodes (stage, time, spatial position): 10000*stage + 100*t + s
    outs = [torch.zeros(B, T, S, C) for T in (8, 4, 2)]
    for k, x in enumerate(outs):
        for t in range(x.shape[1]):
            for s in range(S):
                x[:, t, s] = 10000 * k + 100 * t + s
    fused = model.multiscale_fusion(outs)
    assert fused.shape == (B, 8, S, C)
    for t in range(8):
        for s in range(S):
            expected = (0 + 100 * t + s) + (10000 + 100 * (t // 2) + s) + (20000 + 100 * (t // 4) + s)
            assert (fused[:, t, s] == expected).all(), (t, s)
    # a single stage's tokens land exactly where they were
    only_last = model.multiscale_fusion([torch.zeros(B, 8, S, C), torch.zeros(B, 4, S, C), outs[2]])
    assert torch.equal(only_last[:, :, :, 0] % 100, torch.arange(S).float().expand(B, 8, S))
    no_fusion = SVFAP(replace(TINY, multiscale_fusion=False)).multiscale_fusion(outs)
    assert torch.equal(no_fusion, outs[2].repeat_interleave(4, dim=1))


def naive_attention(q, k, v):
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q @ k.transpose(-2, -1)) * scale, dim=-1) @ v


def test_sdpa_attention_equals_naive_softmax_reference():
    torch.manual_seed(0)
    dim, heads = 24, 4
    attn = M.Attention(dim, heads)
    cross = M.Attention(dim, heads, cross=True)
    for p in list(attn.parameters()) + list(cross.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    x, ctx = torch.randn(2, 10, dim), torch.randn(2, 6, dim)

    def heads_of(t):
        return t.view(t.shape[0], t.shape[1], heads, dim // heads).transpose(1, 2)

    w = attn.qkv.weight
    q = x @ w[:dim].T + attn.q_bias
    k = x @ w[dim:2 * dim].T
    v = x @ w[2 * dim:].T + attn.v_bias
    out = naive_attention(heads_of(q), heads_of(k), heads_of(v)).transpose(1, 2).reshape(2, 10, dim)
    assert torch.allclose(attn(x), attn.proj(out), atol=1e-5)

    q = x @ cross.q.weight.T + cross.q_bias
    k = ctx @ cross.kv.weight[:dim].T
    v = ctx @ cross.kv.weight[dim:].T + cross.v_bias
    out = naive_attention(heads_of(q), heads_of(k), heads_of(v)).transpose(1, 2).reshape(2, 10, dim)
    assert torch.allclose(cross(x, ctx), cross.proj(out), atol=1e-5)


def assert_every_parameter_has_a_gradient(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_one_pretraining_step_gives_every_parameter_a_gradient():
    model = SVFAP(TINY).train()
    loss, _ = model(tiny_video(), tube_mask(2, TINY))
    loss.backward()
    assert_every_parameter_has_a_gradient(model)


@pytest.mark.parametrize("over", [{}, dict(stage_depths=(1, 2, 1), temporal_pyramid=False),
                                  dict(spatial_bottleneck=False, temporal_downsample="max")])
def test_one_finetuning_step_gives_every_parameter_a_gradient(over):
    cfg = replace(TINY, drop_path=0.1, **over)
    model = SVFAPClassifier(cfg, 6).train()
    logits = model(tiny_video(cfg=cfg))
    assert logits.shape == (2, 6)
    F.cross_entropy(logits, torch.tensor([1, 4])).backward()
    assert_every_parameter_has_a_gradient(model)


def test_encoder_returns_every_stage_and_embeddings_have_their_shapes():
    model = model_seeded(SVFAPClassifier, TINY, 3)
    video = tiny_video()
    outs = model.encoder(video, return_all_stages=True)
    assert [tuple(o.shape) for o in outs] == [(2, 8, 64, 128), (2, 4, 64, 128), (2, 2, 64, 128)]
    pooled, tokens = model.embed(video)
    assert pooled.shape == (2, 128) and tokens.shape == (2, 2 * 64, 128)
    masked = model.encoder(video, tube_mask(2, TINY), return_all_stages=True)
    assert [tuple(o.shape) for o in masked] == [(2, 8, 7, 128), (2, 4, 7, 128), (2, 2, 7, 128)]


@pytest.mark.parametrize("field,over", [
    ("num_frames", dict(num_frames=12)),  # 12 / 2 = 6 slices cannot be halved twice
    ("img_size", dict(img_size=60)),
    ("mask_ratio", dict(mask_ratio=-0.1)),
    ("mask_ratio", dict(mask_ratio=1.0)),
    ("mask_ratio", dict(mask_ratio=0.0)),  # nothing to reconstruct: the decoder would predict the visible tokens
    ("num_bottleneck_tokens", dict(num_bottleneck_tokens=65)),
    ("temporal_downsample", dict(temporal_downsample="mean")),
    ("embed_dim", dict(embed_dim=130)),
    ("stage_depths", dict(stage_depths=(2, 0, 1))),
    ("patch_size", dict(patch_size=0)),
    ("drop_path", dict(drop_path=1.0)),
])
def test_bad_config_raises_value_error_naming_the_field(field, over):
    with pytest.raises(ValueError, match=rf"SVFAPConfig\.{field}="):
        replace(TINY, **over)


def test_a_bfloat16_model_trains_with_drop_path_without_autocast():
    """model.py copied elsewhere and cast with .bfloat16(): stochastic depth keeps the residual stream in bf16."""
    model = M.SVFAPClassifier(replace(TINY, drop_path=0.5), 3).bfloat16().train()
    video = torch.randn(2, 3, TINY.num_frames, TINY.img_size, TINY.img_size, dtype=torch.bfloat16)
    model(video).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


def test_config_round_trips_through_a_plain_dict():
    d = TINY.to_dict()
    assert SVFAPConfig.from_dict(d) == TINY
    with pytest.raises(ValueError, match="unknown field"):
        SVFAPConfig.from_dict({**d, "depth": 3})


def test_the_encoder_asserts_a_tube_mask_on_the_device():
    """TPSBT.forward checks its mask with torch._assert_async (no host read; on the CPU it raises at once)."""
    mask = tube_mask(3, TINY, generator=torch.Generator().manual_seed(0))
    SVFAP(TINY)(tiny_video(3), mask)
    one_slice = mask.clone()
    one_slice[1, 0] = ~one_slice[1, 0]  # one token of one slice differs from the other slices
    T, S = TINY.grid[0], TINY.num_spatial
    wrong_count = mask.view(3, T, S).clone()
    wrong_count[2, :, wrong_count[2, 0].nonzero()[0]] = False  # the same in every slice, one position short
    for bad in (one_slice, wrong_count.view(3, -1)):
        with pytest.raises(RuntimeError, match="mask must be a tube mask"):
            SVFAP(TINY)(tiny_video(3), bad)
    with pytest.raises(ValueError, match=r"bool tube mask \(3, 512\)"):
        SVFAP(TINY)(tiny_video(3), mask.float())


class DeviceReads(TorchDispatchMode):
    """Counts the operators that read a tensor's values back to the host (a device sync on a GPU)."""
    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique2", "aten.equal")

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.READS):
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def test_forward_and_backward_read_nothing_back_from_the_device():
    cfg = replace(TINY, drop_path=0.1)
    mask = tube_mask(2, cfg)
    for model, loss_of in ((SVFAP(cfg).train(), lambda m, v: m(v, mask)[0]),
                           (SVFAPClassifier(cfg, 6).train(), lambda m, v: F.cross_entropy(m(v), torch.tensor([1, 4])))):
        with DeviceReads() as counter:
            loss_of(model, tiny_video(cfg=cfg)).backward()
        assert counter.reads == [], type(model).__name__
    with DeviceReads() as counter:  # the counter sees a read: the test can fail
        bool(mask.any())
    assert counter.reads


def test_lr_layer_ids_follow_the_release_block_order():
    model = SVFAPClassifier(TINY, 6)
    ids = {n: model.lr_layer_id(n) for n, _ in model.named_parameters()}
    assert model.num_lr_layers == sum(TINY.stage_depths) + 2
    assert ids["encoder.patch_embed.proj.weight"] == 0
    assert ids["encoder.stages.0.blocks.0.attn.qkv.weight"] == 1
    assert ids["encoder.stages.1.blocks.0.cross_attn.q.weight"] == 3
    assert ids["encoder.stages.1.reverse_block.norm1.weight"] == 4
    assert ids["encoder.stages.2.reverse_block.mlp.fc2.bias"] == 6
    assert ids["head.weight"] == ids["encoder.stages.1.spatial_attention.norm.weight"] == 7


def release_layout(model, pretraining):
    """Our weights renamed to the release's keys (reference section 9), written independently of model.py."""
    sd = model.state_dict()
    enc_prefix = "encoder." if pretraining else ""
    out = {}
    i = 0
    for s, stage in enumerate(model.encoder.stages):
        names = [f"stages.{s}.blocks.{j}" for j in range(len(stage.blocks))]
        if stage.reverse_block is not None:
            names.append(f"stages.{s}.reverse_block")
        for name in names:
            for k, v in sd.items():
                if k.startswith(f"encoder.{name}."):
                    out[f"{enc_prefix}blocks.{i}.{k.split(name + '.', 1)[1]}"] = v
            i += 1
        if s:
            for k, v in sd.items():
                if k.startswith(f"encoder.stages.{s}.temporal_pyramid.conv."):
                    out[f"{enc_prefix}temporal_downsamples.{s - 1}.{k.rsplit('.', 1)[1]}"] = v
                if k.startswith(f"encoder.stages.{s}.spatial_attention."):
                    out[f"{enc_prefix}spatial_downsamples.{s - 1}.{k.split('spatial_attention.', 1)[1]}"] = v
    for p in ("weight", "bias"):
        out[f"{enc_prefix}patch_embed.proj.{p}"] = sd[f"encoder.patch_embed.proj.{p}"]
    if pretraining:
        for p in ("weight", "bias"):
            out[f"encoder.norm.{p}"] = sd[f"fusion_norm.{p}"]
        for k, v in sd.items():
            if k.startswith("decoder.") or k in ("encoder_to_decoder.weight", "mask_token"):
                out[k] = v
    else:
        for k in ("fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"):
            out[k] = sd[k]
    assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
    return out


def test_release_checkpoints_load_and_reproduce_outputs_exactly():
    video = tiny_video()
    mask = tube_mask(2, TINY, generator=torch.Generator().manual_seed(5))
    # pre-training layout, wrapped as {"model": ...}
    src = model_seeded(SVFAP, TINY, seed=1)
    for p in src.parameters():  # make every tensor matter (zero biases would hide a missed key)
        p.data.add_(torch.randn_like(p) * 0.01)
    ckpt = {"model": release_layout(src, pretraining=True), "epoch": 99}
    dst = model_seeded(SVFAP, TINY, seed=2)
    missing, unused = M.load_official_state_dict(dst, ckpt)
    assert missing == [] and unused == []
    with torch.no_grad():
        assert torch.equal(src(video, mask)[1], dst(video, mask)[1])
    # its encoder into a classifier: every encoder tensor loads, the decoder is reported unused
    clf = model_seeded(SVFAPClassifier, TINY, 6, seed=3)
    missing, unused = M.load_official_state_dict(clf, ckpt)
    assert missing == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert unused and all(k.startswith(("decoder.", "encoder.norm", "encoder_to_decoder", "mask_token")) for k in unused)
    with torch.no_grad():
        assert torch.equal(clf.encoder(video), src.encoder(video))
    # fine-tuned layout, wrapped as {"module": ...}
    src_clf = model_seeded(SVFAPClassifier, TINY, 6, seed=4)
    for p in src_clf.parameters():
        p.data.add_(torch.randn_like(p) * 0.01)
    dst_clf = model_seeded(SVFAPClassifier, TINY, 6, seed=5)
    missing, unused = M.load_official_state_dict(dst_clf, {"module": release_layout(src_clf, pretraining=False)})
    assert missing == [] and unused == []
    with torch.no_grad():
        assert torch.equal(src_clf(video), dst_clf(video))
    # a bare state dict with a wrong shape fails loudly, naming the key
    bad = release_layout(src_clf, pretraining=False)
    bad["blocks.0.attn.qkv.weight"] = bad["blocks.0.attn.qkv.weight"][:, :64]
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv\.weight"):
        M.load_official_state_dict(dst_clf, bad)


def test_sizes_match_the_paper_within_0_4_percent():
    for label in ("TPSBT-B (base)", "ViT baseline (12,8,4)", "K = 4"):  # K = 4 has the largest gap, -0.39%
        _, paper, gaps = M.paper_gaps(label)
        assert max(map(abs, gaps)) < 0.4, (label, paper, gaps)
    assert M.paper_gaps("TPSBT-B (base)")[0][0] == pytest.approx(77.64, abs=0.005)


def test_peak_tflops_comes_from_the_gpu_name():
    assert [M.peak_tflops(n) for n in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H200",
                                       "NVIDIA L40S", "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 3090")] == \
        [312, 989, 989, 362, 165, 71]
    assert M.peak_tflops("NVIDIA H100 PCIe") == 756 and M.peak_tflops("Tesla T4") is None
    assert M.peak_tflops("cpu") is None and M.peak_tflops(torch.device("cpu")) is None


def test_step_benchmark_runs_its_gpu_code_path_on_the_cpu(capsys, monkeypatch):
    """The --device=cuda benchmark with a tiny config on the CPU: bf16 autocast, fused AdamW, eager and
    compiled (backend aot_eager: inductor's code generation takes minutes on a CPU, so it is not run here)."""
    M.bench("cpu", (("tiny", 2, 2),), compiles=(False, "aot_eager"), dtype=torch.bfloat16, steps=1, rounds=1)
    out = capsys.readouterr().out
    for mode in ("eager", "compiled"):
        for label in ("tiny pre-training, batch 2", "tiny fine-tuning, batch 2", "ViT baseline fine-tuning, batch 2"):
            assert re.search(rf"{label}, {mode} +\d+\.\d +\d+\.\d +- +-", out), (label, mode, out)
    assert len(re.findall(r"tiny: fine-tuning takes \d\.\d\dx the ViT baseline's time; MACs ratio 0\.50", out)) == 2
    monkeypatch.setattr(M, "peak_tflops", lambda device: 0.5)  # MFU = 3 forwards x 2 FLOPs per MAC / peak
    r = {stage: M.bench_steps(TINY, "cpu", 2, stage, steps=1, dtype=torch.float32, rounds=2)
         for stage in ("pretrain", "finetune")}
    _, ft, pt = M.sizes(TINY)
    masked_embed = TINY.grid[0] * TINY.num_masked_spatial * TINY.patch_dim * TINY.embed_dim / 1e9
    assert r["finetune"]["gmacs"] == pytest.approx(ft) and r["pretrain"]["gmacs"] == pytest.approx(pt - masked_embed)
    for v in r.values():
        assert v["ms"] > 0 and v["clips_s"] == pytest.approx(2000 / v["ms"]) and v["peak_mb"] is None
        assert v["mfu"] == pytest.approx(6 * v["gmacs"] * v["clips_s"] / 500)


def test_video_of_the_wrong_shape_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"expects video \(B, 3, 16, 64, 64\)"):
        SVFAPClassifier(TINY, 6)(torch.zeros(1, 3, 8, 64, 64))


# =====================================================================================================
# metrics: Tests for metrics.py: every metric against an independent plain-Python computation, the prediction
# file round trip, and the CLI's pooling of cross-validation folds.


METRICS_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics.py")

# -----------------------------------------------------------------------------
# independent references: plain Python loops over lists, no numpy


def metrics_loop_confusion(y_true, y_pred, num_classes):
    cm = [[0] * num_classes for _ in range(num_classes)]
    for t, p in zip(y_true, y_pred):
        cm[t][p] += 1
    return cm


def metrics_loop_recalls(y_true, y_pred, num_classes):
    """{class: recall} for the classes that occur in y_true."""
    recalls = {}
    for c in range(num_classes):
        hits = [p == c for t, p in zip(y_true, y_pred) if t == c]
        if hits:
            recalls[c] = sum(hits) / len(hits)
    return recalls


def metrics_loop_weighted_f1(y_true, y_pred, num_classes):
    total = 0.0
    for c in range(num_classes):
        tp = sum(1 for t, p in zip(y_true, y_pred) if t == c and p == c)
        fp = sum(1 for t, p in zip(y_true, y_pred) if t != c and p == c)
        fn = sum(1 for t, p in zip(y_true, y_pred) if t == c and p != c)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        total += f1 * (tp + fn)
    return total / len(y_true)


def metrics_loop_ccc(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


def metrics_random_classes(seed, n=300, num_classes=7):
    """Imbalanced labels where class num_classes-1 never occurs in y_true and class 0 is never predicted,
    plus a (n, C) score matrix whose argmax is y_pred."""
    rng = np.random.default_rng(seed)
    prior = 0.5 ** np.arange(num_classes - 1)  # class 0 is ~32x more frequent than class 5
    y_true = rng.choice(num_classes - 1, size=n, p=prior / prior.sum())
    # right about 60% of the time, never predicts class 0
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.integers(0, num_classes, n))
    y_pred = np.where(y_pred == 0, rng.integers(1, num_classes, n), y_pred)
    scores = rng.random((n, num_classes))
    scores[np.arange(n), y_pred] += 1.0
    return y_true, y_pred, scores


# -----------------------------------------------------------------------------
# classification metrics


@pytest.mark.parametrize("seed", range(4))
def test_class_metrics_match_plain_python_loops(seed):
    C = 7
    y_true, y_pred, scores = metrics_random_classes(seed, num_classes=C)
    t, p = y_true.tolist(), y_pred.tolist()
    # the data has what the test is about: imbalance, a class missing from y_true and from y_pred
    counts = np.bincount(y_true, minlength=C)
    assert counts[C - 1] == 0 and 0 not in set(p) and counts.max() >= 10 * counts[counts > 0].min()

    recalls = metrics_loop_recalls(t, p, C)
    ref_uar = sum(recalls.values()) / len(recalls)
    ref_war = sum(a == b for a, b in zip(t, p)) / len(t)
    for pred in (y_pred, scores):  # labels and score matrices give the same numbers
        assert metrics.confusion_matrix(y_true, pred, C).tolist() == metrics_loop_confusion(t, p, C)
        assert metrics.war(y_true, pred, C) == pytest.approx(ref_war, abs=1e-12)
        assert metrics.uar(y_true, pred, C) == pytest.approx(ref_uar, abs=1e-12)
        assert metrics.weighted_f1(y_true, pred, C) == pytest.approx(metrics_loop_weighted_f1(t, p, C), abs=1e-12)
        rec = metrics.per_class_recall(y_true, pred, C)
        assert rec.shape == (C,) and np.isnan(rec[C - 1]) and rec[0] == 0.0
        for c in range(C - 1):
            assert rec[c] == pytest.approx(recalls[c], abs=1e-12)
    # UAR really differs from WAR on imbalanced data, so the two are not confused
    assert abs(ref_uar - ref_war) > 0.01


def test_uar_counts_a_never_predicted_class_as_zero_and_skips_an_absent_one():
    y_true = [0, 0, 0, 1]
    y_pred = [0, 0, 0, 0]
    assert metrics.uar(y_true, y_pred, num_classes=5) == 0.5  # (1 + 0) / 2; classes 2..4 absent
    assert metrics.war(y_true, y_pred) == 0.75


def test_score_matrix_fixes_num_classes_and_argmax_picks_the_label():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert metrics.confusion_matrix([1, 2], scores).tolist() == [[0, 0, 0], [0, 1, 0], [1, 0, 0]]
    assert metrics.per_class_recall([1, 2], scores).shape == (3,)


def test_torch_tensors_are_accepted():
    torch = pytest.importorskip("torch")
    y_true, y_pred, scores = metrics_random_classes(0)
    assert metrics.uar(torch.from_numpy(y_true), torch.from_numpy(scores).float()) == \
        pytest.approx(metrics.uar(y_true, y_pred, 7))


# -----------------------------------------------------------------------------
# regression metrics


def metrics_correlated(seed, n=200, dims=3):
    rng = np.random.default_rng(seed)
    t = rng.random((n, dims))
    p = 0.6 * t + 0.3 * rng.random((n, dims)) + 0.05  # correlated, biased, shrunk: CCC < PCC
    return t, p


@pytest.mark.parametrize("seed", range(3))
def test_pcc_matches_scipy_pearsonr(seed):
    t, p = metrics_correlated(seed)
    per_dim = metrics.pcc(t, p)
    assert per_dim.shape == (3,)
    for d in range(3):
        ref = pearsonr(t[:, d], p[:, d])[0]
        assert metrics.pcc(t[:, d], p[:, d]) == pytest.approx(ref, abs=1e-12)
        assert per_dim[d] == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_ccc_matches_plain_python_loop(seed):
    t, p = metrics_correlated(seed)
    per_dim = metrics.ccc(t, p)
    for d in range(3):
        ref = metrics_loop_ccc(t[:, d].tolist(), p[:, d].tolist())
        assert metrics.ccc(t[:, d], p[:, d]) == pytest.approx(ref, abs=1e-12)
        assert per_dim[d] == pytest.approx(ref, abs=1e-12)
        assert per_dim[d] < metrics.pcc(t[:, d], p[:, d])  # bias and scale cost CCC, not PCC


def test_ccc_is_one_only_for_agreement_and_pcc_ignores_shift():
    x = np.random.default_rng(0).random(50)
    assert metrics.ccc(x, x) == pytest.approx(1.0)
    assert metrics.pcc(x, 2 * x + 1) == pytest.approx(1.0)
    assert metrics.ccc(x, 2 * x + 1) < 0.5


@pytest.mark.parametrize("seed", range(3))
def test_personality_acc_matches_plain_python_loop(seed):
    t, p = metrics_correlated(seed)
    per_dim = metrics.personality_acc(t, p)
    for d in range(3):
        ref = 1 - sum(abs(a - b) for a, b in zip(p[:, d].tolist(), t[:, d].tolist())) / len(t)
        assert metrics.personality_acc(t[:, d], p[:, d]) == pytest.approx(ref, abs=1e-12)
        assert per_dim[d] == pytest.approx(ref, abs=1e-12)


def test_constant_inputs_give_the_documented_values_without_nan_or_warnings():
    x = np.random.default_rng(0).random(20)
    const = np.full(20, 0.1)  # 0.1 is inexact in binary: a centred copy is ~1e-17, not 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.pcc(x, const) == 0.0 and metrics.pcc(const, x) == 0.0
        assert metrics.pcc(const, const) == 0.0
        assert metrics.ccc(x, const) == pytest.approx(0.0, abs=1e-15)
        assert metrics.ccc(const, const) == 1.0  # same constant: perfect agreement
        assert metrics.ccc(const, const + 1) == 0.0
        assert metrics.pcc([1.0], [2.0]) == 0.0  # one sample is a constant
        assert metrics.uar([2, 2], [2, 2], num_classes=3) == 1.0


# -----------------------------------------------------------------------------
# bad input


CLASS_FUNCS = [metrics.war, metrics.uar, metrics.per_class_recall, metrics.confusion_matrix, metrics.weighted_f1]
REG_FUNCS = [metrics.ccc, metrics.pcc, metrics.personality_acc]


@pytest.mark.parametrize("fn", CLASS_FUNCS)
@pytest.mark.parametrize("y_true, y_pred, kwargs, reason", [
    ([], [], {}, "empty"),
    ([0, 1, 1], [0, 1], {}, "3 samples but y_pred has 2"),
    ([0, 1, 3], [0, 1, 1], {"num_classes": 3}, r"y_true\[2\] = 3 is outside the valid labels 0..2"),
    ([0, 1, 2], [0, -1, 1], {"num_classes": 3}, r"y_pred\[1\] = -1 is outside"),
    ([0, 1, 2], np.zeros((3, 4)), {"num_classes": 3}, "4 score columns but num_classes=3"),
    ([0, np.nan, 1], [0, 1, 1], {}, r"y_true contains NaN \(first at sample 1\)"),
    ([0, 1, 1], [[0.1, 0.9], [np.nan, 0], [0, 1]], {}, r"y_pred contains NaN \(first at sample 1\)"),
    ([0, 1.5, 1], [0, 1, 1], {}, "whole-number class labels"),
])
def test_class_metrics_reject_bad_input_with_the_reason(fn, y_true, y_pred, kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        fn(y_true, y_pred, **kwargs)


@pytest.mark.parametrize("fn", REG_FUNCS)
@pytest.mark.parametrize("y_true, y_pred, reason", [
    ([], [], "empty"),
    ([0.1, 0.2, 0.3], [0.1, 0.2], "3 samples but y_pred has 2"),
    ([0.1, np.nan, 0.3], [0.1, 0.2, 0.3], "y_true contains NaN"),
    ([0.1, 0.2, 0.3], [0.1, 0.2, np.nan], "y_pred contains NaN"),
    (np.zeros((3, 2)), np.zeros((3, 3)), "equal shapes"),
])
def test_regression_metrics_reject_bad_input_with_the_reason(fn, y_true, y_pred, reason):
    with pytest.raises(ValueError, match=reason):
        fn(y_true, y_pred)


def test_personality_acc_rejects_labels_outside_unit_interval():
    with pytest.raises(ValueError, match=r"labels in \[0, 1\]"):
        metrics.personality_acc([0.2, 1.5], [0.2, 0.9])


# -----------------------------------------------------------------------------
# prediction files


def test_classification_predictions_round_trip_exactly(tmp_path):
    y_true, _, scores = metrics_random_classes(1, n=40)
    ids = [f"videos/clip {i},take \"{i}\".mp4" for i in range(40)]  # commas and quotes survive
    names = ["neutral", "happy", "sad", "angry", "surprise", "disgust", "fear"]
    path = tmp_path / "fold1" / "test_predictions.csv"
    metrics.write_predictions(path, ids, y_true, scores, class_names=names, task="classification")
    with open(path) as f:
        assert f.readline().strip() == "id,target," + ",".join("score_" + c for c in names)
    r = metrics.read_predictions(path)
    assert r.task == "classification" and r.ids == ids and r.class_names == names
    assert r.targets.dtype == np.int64 and (r.targets == y_true).all()
    assert np.array_equal(r.scores, scores)  # bit-exact floats
    assert os.listdir(path.parent) == ["test_predictions.csv"]  # no temp file left behind


def test_task_is_inferred_and_index_names_read_back_as_none(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "p.csv"
    metrics.write_predictions(path, ["a", "b"], torch.tensor([1, 0]), torch.tensor([[0.2, 0.8], [0.6, 0.4]]))
    r = metrics.read_predictions(path)
    assert r.task == "classification" and r.class_names is None and r.targets.tolist() == [1, 0]
    assert np.allclose(r.scores, [[0.2, 0.8], [0.6, 0.4]])


@pytest.mark.parametrize("dims, names", [(1, None), (3, ["arousal", "valence", "dominance"])])
def test_regression_predictions_round_trip_exactly(tmp_path, dims, names):
    t, p = metrics_correlated(0, n=30, dims=dims)
    if dims == 1:
        t, p = t[:, 0], p[:, 0]  # (N,) is accepted and stored as one dimension
    path = tmp_path / "reg.csv"
    metrics.write_predictions(path, range(30), t, p, class_names=names)
    r = metrics.read_predictions(path)
    assert r.task == "regression" and r.ids == [str(i) for i in range(30)] and r.class_names == names
    assert r.targets.shape == r.scores.shape == (30, dims)
    assert np.array_equal(r.targets, t.reshape(30, dims)) and np.array_equal(r.scores, p.reshape(30, dims))


def test_failed_write_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "p.csv"
    metrics.write_predictions(path, ["a"], [0], [[0.9, 0.1]])
    before = path.read_text()
    with pytest.raises(ValueError, match="NaN"):
        metrics.write_predictions(path, ["a"], [0], [[np.nan, 0.1]])
    with pytest.raises(ValueError, match="2 ids but 1 targets"):
        metrics.write_predictions(path, ["a", "b"], [0], [[0.9, 0.1]])
    with pytest.raises(ValueError, match="target 2 is outside 0..1"):
        metrics.write_predictions(path, ["a"], [2], [[0.9, 0.1]])
    assert path.read_text() == before and os.listdir(tmp_path) == ["p.csv"]


@pytest.mark.parametrize("text, reason", [
    ("", "empty file"),
    ("id,target,score_0\n", "no prediction rows"),
    ("video,target,score_0\na,0,1.0\n", "first column must be 'id'"),
    ("id,label,prob\na,0,1.0\n", "unrecognised header"),
    ("id,target_a,pred_b\na,0,1.0\n", "unrecognised header"),
    ("id,target,score_0,score_1\na,0,0.1,0.9\nb,1,0.5\n", r"p.csv:3: 3 fields but the header has 4"),
    ("id,target,score_0,score_1\na,0,0.1,high\n", r"p.csv:2: column 'score_1' must be a finite number, got 'high'"),
    ("id,target,score_0,score_1\na,0,0.1,0.9\nb,1,nan,0.5\n", r"p.csv:3: column 'score_0' must be a finite number, got 'nan'"),
    ("id,target,score_0,score_1\na,0,0.1,-inf\n", r"p.csv:2: column 'score_1' must be a finite number, got '-inf'"),
    ("\nid,target,score_0\na,0,1.0\n", r"p.csv:1: the header's first column must be 'id', got ''"),
    ("id,target,score_0\na,0,1.0\nb,0," + "9" * 200000 + "\n", r"p.csv:3: not a CSV file of predictions \(field larger"),
    (b"id,target,score_0\na,0,1.0\n\xff\n", r"p.csv:\d+: not a CSV file of predictions \('utf-8' codec can't decode"),
    ("id,target,score_0,score_1\na,2,0.1,0.9\n", r"p.csv:2: target '2' is not a class index in 0..1"),
])
def test_read_predictions_names_file_and_line_of_a_bad_file(tmp_path, text, reason):
    path = tmp_path / "p.csv"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(ValueError, match=reason):
        metrics.read_predictions(path)


# -----------------------------------------------------------------------------
# pooling cross-validation folds and the CLI


def metrics_run_cli(*files):
    return subprocess.run([sys.executable, METRICS_PY, *map(str, files)], capture_output=True, text=True,
                          timeout=120)


def metrics_two_folds():
    """Fold 1: class 0 is big and right, class 1 is one wrong sample; fold 2 the mirror image.
    Each fold has UAR 0.5, but pooled every class has recall 10/11."""
    y1 = [0] * 10 + [1]
    p1 = [0] * 10 + [0]
    y2 = [0] + [1] * 10
    p2 = [1] + [1] * 10
    return (y1, p1), (y2, p2)


def test_cli_prints_the_pooled_uar_not_the_mean_of_fold_uars(tmp_path):
    folds = metrics_two_folds()
    files = []
    for k, (y, p) in enumerate(folds):
        path = tmp_path / f"fold{k + 1}.csv"
        metrics.write_predictions(path, [f"f{k}_{i}" for i in range(len(y))], y, np.eye(2)[p],
                                  class_names=["neutral", "happy"])
        files.append(path)
    mean_of_folds = np.mean([metrics.uar(y, p) for y, p in folds])
    pooled = metrics.uar(sum((y for y, _ in folds), []), sum((p for _, p in folds), []))
    assert mean_of_folds == pytest.approx(0.5) and pooled == pytest.approx(10 / 11)

    out = metrics_run_cli(*files)
    assert out.returncode == 0, out.stderr
    printed_uar = float(re.search(r"^UAR\s+([\d.]+)\s*$", out.stdout, re.M).group(1))
    printed_war = float(re.search(r"^WAR\s+([\d.]+)\s*$", out.stdout, re.M).group(1))
    assert printed_uar == round(100 * pooled, 2) == 90.91
    assert printed_war == 90.91
    assert abs(printed_uar - 100 * mean_of_folds) > 40
    # the per-class table and the confusion matrix are labelled with the class names
    assert re.search(r"^neutral\s+11\s+90\.91$", out.stdout, re.M)
    assert re.search(r"^happy\s+1\s+10$", out.stdout, re.M)  # confusion row: 1 wrong, 10 right


def test_cli_pools_regression_folds_and_labels_personality_acc(tmp_path):
    t, p = metrics_correlated(2, n=60, dims=2)
    names = ["extraversion", "openness"]
    metrics.write_predictions(tmp_path / "a.csv", range(30), t[:30], p[:30], class_names=names)
    metrics.write_predictions(tmp_path / "b.csv", range(30, 60), t[30:], p[30:], class_names=names)
    out = metrics_run_cli(tmp_path / "a.csv", tmp_path / "b.csv")
    assert out.returncode == 0, out.stderr
    c, r, a = metrics.ccc(t, p), metrics.pcc(t, p), metrics.personality_acc(t, p)
    row = re.search(r"^openness\s+(\S+)\s+(\S+)\s+(\S+)$", out.stdout, re.M).groups()
    assert [float(v) for v in row] == [round(c[1], 4), round(r[1], 4), round(a[1], 4)]
    mean = re.search(r"^mean\s+(\S+)\s+(\S+)\s+(\S+)$", out.stdout, re.M).groups()
    assert float(mean[0]) == round(c.mean(), 4)
    assert "ACC = personality accuracy" in out.stdout


def test_format_report_is_what_the_cli_prints(tmp_path):
    y_true, _, scores = metrics_random_classes(3, n=50)
    path = tmp_path / "p.csv"
    metrics.write_predictions(path, range(50), y_true, scores)
    out = metrics_run_cli(path)
    assert out.returncode == 0 and out.stdout == metrics.format_report(metrics.read_predictions(path), str(path)) + "\n"
    absent = 7 - len(set(y_true.tolist()))  # class 6 never occurs in y_true, rare ones may not either
    assert absent >= 1 and f"{absent} without samples, left out of UAR" in out.stdout


@pytest.mark.parametrize("second, reason", [
    ("classes3", "has 3 classes but .*fold1.csv has 2"),
    ("renamed", r"names its classes \['happy', 'neutral'\]"),
    ("regression", "holds regression predictions but .*fold1.csv holds classification"),
])
def test_cli_refuses_files_that_disagree(tmp_path, second, reason):
    first = tmp_path / "fold1.csv"
    metrics.write_predictions(first, ["a", "b"], [0, 1], [[0.9, 0.1], [0.2, 0.8]], class_names=["neutral", "happy"])
    other = tmp_path / "fold2.csv"
    if second == "classes3":
        metrics.write_predictions(other, ["c"], [2], [[0.1, 0.1, 0.8]], class_names=["neutral", "happy", "sad"])
    elif second == "renamed":
        metrics.write_predictions(other, ["c"], [0], [[0.9, 0.1]], class_names=["happy", "neutral"])
    else:
        metrics.write_predictions(other, ["c"], [0.5], [0.4], task="regression")
    out = metrics_run_cli(first, other)
    assert out.returncode != 0 and out.stdout == ""
    assert "fold2.csv" in out.stderr and re.search(reason, out.stderr) and "Traceback" not in out.stderr


def test_cli_reports_a_missing_file_without_a_traceback(tmp_path):
    out = metrics_run_cli(tmp_path / "nope.csv")
    assert out.returncode != 0 and "nope.csv" in out.stderr and "Traceback" not in out.stderr


def test_summary_of_seeds_gives_mean_sample_sd_and_range_of_each_group(tmp_path):
    """--summary: one Markdown row per NAME=GLOB; UAR / WAR of each run from its test_predictions.csv,
    mean and sample sd (n - 1) computed here by hand, wall time from results.json."""
    runs = {"pre": [(10, 0), (8, 2), (6, 4)], "scratch": [(5, 5), (5, 5), (4, 6)]}  # (right, wrong) per run
    for name, counts in runs.items():
        for seed, (right, wrong) in enumerate(counts):
            d = tmp_path / f"{name}_seed{seed}"
            d.mkdir()
            y = [0] * 5 + [1] * 5  # balanced, so UAR = WAR = right / 10
            p = [t if i < right else 1 - t for i, t in enumerate(y)]  # the first `right` predictions are right
            metrics.write_predictions(d / "test_predictions.csv", range(10), y, np.eye(2)[p])
            (d / "results.json").write_text(json.dumps({"wall_time_s": 60.0 * (seed + 1)}))
    pt = tmp_path / "pretrain"
    pt.mkdir()
    (pt / "results.json").write_text(json.dumps({"wall_time_s": 600.0}))
    out = metrics_run_cli("--summary", f"pre-trained={tmp_path}/pre_seed*", f"from scratch={tmp_path}/scratch_seed*",
                          f"pre-training={pt}")
    assert out.returncode == 0, out.stderr
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in out.stdout.splitlines()[2:]}
    # pre: 100, 80, 60 -> mean 80, sd sqrt(((20^2) * 2) / 2) = 20; scratch: 50, 50, 40 -> 46.67, sd 5.77
    assert rows["pre-trained"] == ["3", "80.00 ± 20.00 (60.00..100.00)", "80.00 ± 20.00 (60.00..100.00)",
                                   "100.00 80.00 60.00", "2.0 min (1.0..3.0)"]
    assert rows["from scratch"][1] == "46.67 ± 5.77 (40.00..50.00)"
    assert rows["pre-training"] == ["1", "-", "-", "-", "10.0 min"]
    missing = metrics_run_cli("--summary", f"x={tmp_path}/nothing*")
    assert missing.returncode != 0 and "x: no run directories match" in missing.stderr
    (tmp_path / "pre_seed0" / "results.json").unlink()
    unfinished = metrics_run_cli("--summary", f"pre={tmp_path}/pre_seed*")
    assert unfinished.returncode != 0 and "pre_seed0: no results.json" in unfinished.stderr


def test_summary_splits_at_the_first_equals_sign_and_names_the_run_of_a_bad_results_file(tmp_path):
    """Folder names like lr=1e-3_seed0 are common: NAME=GLOB splits at the first "=", so the glob keeps them."""
    for name, wall in (("lr=1e-3_seed0", 60.0), ("lr=1e-3_seed1", 180.0), ("lr=1e-4_seed0", 6000.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps({"wall_time_s": wall}))
    out = metrics_run_cli("--summary", f"scratch={tmp_path}/lr=1e-3_seed*")
    assert out.returncode == 0 and out.stdout.splitlines()[2] == "| scratch | 2 | - | - | - | 2.0 min (1.0..3.0) |"
    (tmp_path / "lr=1e-3_seed1" / "results.json").write_text(json.dumps({"epochs": 3}))
    out = metrics_run_cli("--summary", f"scratch={tmp_path}/lr=1e-3_seed*")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr
    assert f"{tmp_path}/lr=1e-3_seed1: no results.json with wall_time_s" in lines[0] and "KeyError" in lines[0]



def test_paper_tables_refuse_a_vit_epoch_outside_epochs_leftover_seeds_and_an_epoch_without_a_logged_loss(tmp_path):
    """metrics.py --paper stops with one line, before any table, where the tables would be wrong: the ViT's
    epoch has no TPSBT row to stand beside, a leftover folder of another seed would be averaged in, an epoch
    without a logged loss would be nan."""
    def run(name, epoch=1, loss=True):
        (tmp_path / name).mkdir(exist_ok=True)
        record = {"iter": 1, "epoch": epoch} | ({"loss": 0.5} if loss else {"save_s": 0.1})
        (tmp_path / name / "log.jsonl").write_text(json.dumps(record) + "\n")
    for name in ("pretrain_tpsbt_seed0", "pretrain_vit_seed0", "few_tpsbt_e1_seed0", "few_scratch_seed0",
                 "few_vit_e2_seed0"):
        run(name)
    def error():
        out = metrics_run_cli(f"--paper={tmp_path}", f"--svg={tmp_path}/p.svg")
        assert out.returncode == 1 and len(out.stderr.splitlines()) == 1 and not out.stdout, out.stderr
        return out.stderr
    assert "found the ViT's at [2] (VIT_EPOCH must be one of EPOCHS)" in error()
    os.rename(tmp_path / "few_vit_e2_seed0", tmp_path / "few_vit_e1_seed0")
    run("few_tpsbt_e1_seed3")
    assert "few_tpsbt_e1_seed* holds the seeds ['0', '3'], pretrain_tpsbt_seed* ['0']" in error()
    shutil.rmtree(tmp_path / "few_tpsbt_e1_seed3")
    run("pretrain_tpsbt_seed0", loss=False)
    assert "pretrain_tpsbt_seed0/log.jsonl: no loss logged in epoch 1" in error()


# -----------------------------------------------------------------------------
# video level (AVCAffe) and the dataset configs


def metrics_avcaffe_clips():
    """Seven clips of four videos, interleaved. By hand, per video: A (class 0) mean scores (0.5, 0.35, 0.15)
    -> 0; B (1) (0.25, 0.45, 0.3) -> 1; C (2) one clip -> 2; D (2) (0.15, 0.55, 0.3) -> 1, wrong. Weighted F1:
    class 0 F1 1 (support 1); class 1 precision 1/2, recall 1, F1 2/3 (support 1); class 2 precision 1,
    recall 1/2, F1 2/3 (support 2): (1 + 2/3 + 2 * 2/3) / 4 = 0.75. Per clip it would be 0.452."""
    clips = [("A", 0, [0.7, 0.2, 0.1]), ("B", 1, [0.1, 0.6, 0.3]), ("A", 0, [0.3, 0.5, 0.2]), ("C", 2, [0.2, 0.3, 0.5]),
             ("D", 2, [0.1, 0.6, 0.3]), ("B", 1, [0.4, 0.3, 0.3]), ("D", 2, [0.2, 0.5, 0.3])]
    ids = [f"clips/{video}/{k}.mp4" for k, (video, _, _) in enumerate(clips)]
    return ids, np.array([t for _, t, _ in clips]), np.array([s for _, _, s in clips])


def test_video_level_weighted_f1_averages_the_clip_scores_of_each_video(tmp_path):
    ids, targets, scores = metrics_avcaffe_clips()
    videos, v_scores, v_targets = metrics.group_average(ids, scores, targets, r"(.*)/[^/]+$")
    assert videos == ["clips/A", "clips/B", "clips/C", "clips/D"] and v_targets.tolist() == [0, 1, 2, 2]
    assert np.allclose(v_scores, [[0.5, 0.35, 0.15], [0.25, 0.45, 0.3], [0.2, 0.3, 0.5], [0.15, 0.55, 0.3]])
    assert metrics.weighted_f1(v_targets, v_scores) == pytest.approx(0.75)
    assert metrics.weighted_f1(targets, scores) == pytest.approx((2 * 0.5 + 2 / 3 + 3 * 0.5) / 7)  # per clip
    keys = metrics.group_average(ids, scores, targets, [i.split("/")[1] for i in ids])  # a key per clip instead
    assert keys[0] == ["A", "B", "C", "D"] and np.array_equal(keys[1], v_scores)
    path = tmp_path / "test_predictions.csv"
    metrics.write_predictions(path, ids, targets, scores)
    out = metrics_run_cli("--video_group=(.*)/[^/]+$", path)
    assert out.returncode == 0, out.stderr
    assert "classification: 4 videos" in out.stdout and re.search(r"^weighted F1\s+75\.00$", out.stdout, re.M)


def test_video_grouping_names_the_clip_that_breaks_it():
    ids, targets, scores = metrics_avcaffe_clips()
    with pytest.raises(ValueError, match=r"video_group='\^videos/' does not match the clip 'clips/A/0.mp4'"):
        metrics.group_average(ids, scores, targets, "^videos/")
    targets[2] = 1  # the second clip of video A with another label
    with pytest.raises(ValueError, match="clip 'clips/A/2.mp4' has target 1 but clip 'clips/A/0.mp4' of the same "
                                         "video 'clips/A' has 0"):
        metrics.group_average(ids, scores, targets, r"(.*)/[^/]+$")
    with pytest.raises(ValueError, match="7 clips but 6 scores and 7 targets; they must match"):
        metrics.group_average(ids, scores[:6], targets, r"(.*)/[^/]+$")
    # an optional group that takes no part in a match, or matches nothing: no video, not one named "None" or ""
    for regex in (r"clips/(B)?", r"clips/([B-D]*)"):
        with pytest.raises(ValueError, match=rf"video_group={re.escape(repr(regex))} does not match the clip "
                                             r"'clips/A/0.mp4', or its group is empty"):
            metrics.group_average(ids, scores, targets, regex)


def test_bad_video_group_regex_and_non_finite_scores_end_in_one_line_naming_them(tmp_path):
    ids, targets, scores = metrics_avcaffe_clips()
    path = tmp_path / "test_predictions.csv"
    metrics.write_predictions(path, ids, targets, scores)
    out = metrics_run_cli("--video_group=(.*/[^/]+$", path)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "metrics.py: error: video_group='(.*/[^/]+$' is not a regular expression: missing ), unterminated subpattern "
        "at position 0"]
    path.write_text(path.read_text().replace("0.6", "nan", 1))  # the second row: clip B
    out = metrics_run_cli(path)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        f"metrics.py: error: {path}:3: column 'score_1' must be a finite number, got 'nan'"]


@pytest.mark.parametrize("name", ["cremad", "ravdess", "enterface05", "werewolfxl", "avcaffe", "firstimpressions"])
def test_dataset_configs_load_and_name_existing_keys_only(name):
    """Through finetune.py's own loader: an unknown key or a value of the wrong type would stop it."""
    c = finetune.load_config({k: getattr(finetune, k) for k in finetune.CONFIG_KEYS},
                             [os.path.join(os.path.dirname(METRICS_PY), "config", f"finetune_{name}.py")])
    pretrain.build_model_config(c.model, c.model_args)
    finetune.check_task(c)  # class_names match the outputs, best_metric suits the task
    assert ("{fold}" in c.out_dir) == ("{fold}" in c.train_list) == ("{fold}" in c.test_list)

# =====================================================================================================
# data: Tests for data.py. Every input is generated here with PyAV: small clips in several containers and codecs,
# frame folders, broken files. The reference for "the right frames" is a plain full sequential decode.


# -----------------------------------------------------------------------------------------------------
# helpers: synthetic clips written through PyAV, and the reference decode


def data_frames(n, width, height, seed=0):
    """n distinct RGB frames: drifting gradients, a moving white square and fixed noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    noise = rng.integers(0, 40, (height, width, 3))
    frames = []
    for t in range(n):
        img = np.stack([(xx * 4 + t * 9) % 256, (yy * 5 + t * 3) % 256, (xx + yy + t * 17) % 256], -1)
        x0 = (t * 3) % max(width - 10, 1)
        img[10:20, x0:x0 + 10] = 255
        frames.append(((img + noise) % 256).astype(np.uint8))
    return frames


def data_write_video(path, frames, codec="libx264", fmt=None, gop=6, pix_fmt="yuv420p", audio_first=False,
                     b_frames=None):
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format=fmt) as container:
        audio = container.add_stream("aac", rate=16000) if audio_first else None
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.gop_size = gop
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        for t, img in enumerate(frames):
            if audio is not None and t % 2 == 0:
                samples = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
                samples.sample_rate, samples.pts = 16000, t // 2 * 1024
                for packet in audio.encode(samples):
                    container.mux(packet)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for s in (audio, stream):
            if s is not None:
                for packet in s.encode():
                    container.mux(packet)
    return str(path)


def data_write_image(path, img):
    """One JPEG (mjpeg, yuvj444p: odd sizes allowed) or PNG file."""
    codec, pix_fmt = ("png", "rgb24") if str(path).endswith(".png") else ("mjpeg", "yuvj444p")
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = img.shape[1], img.shape[0], pix_fmt
    ctx.time_base = fractions.Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
    with open(path, "wb") as f:
        f.write(b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None)))


def data_write_folder(folder, frames, ext="jpg"):
    os.makedirs(folder)
    for i, img in enumerate(frames):
        data_write_image(os.path.join(folder, f"{i + 1:05d}.{ext}"), img)
    return str(folder)


def data_reference(path):
    """Full sequential decode with PyAV's defaults, independent of data.py's reader."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        out = []
        for name in names:
            with av.open(os.path.join(path, name)) as c:
                out.append(next(c.decode(video=0)).to_ndarray(format="rgb24"))
        return np.stack(out)
    with av.open(path) as c:
        stream = next(s for s in c.streams if s.type == "video")
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])


def count_frames(path, exact=True):
    """Frames a full sequential decode outputs (a folder: its images); exact=False: the quick count."""
    with D.open_video(path) as video:
        return video.frame_count(exact)


def data_index_sets(n, seed=0):
    """Frame index lists a reader must get right: windows anywhere (past several keyframes with gop 6),
    16x4 windows, scattered, unsorted and repeated indices, single frames, the last frame, everything."""
    rng = np.random.default_rng(seed)
    sets = [list(range(n)), [0], [n - 1], [n - 1, 0, n // 2, n // 2], list(range(n - 1, -1, -7))]
    for start in (0, 1, 5, 6, 7, n // 2, max(n - 16, 0)):
        sets.append(list(range(start, min(start + 12, n))))
    for _ in range(6):
        start = int(rng.integers(0, max(n - 61, 0) + 1))
        sets.append(D.clip_indices(start, 16, 4, n))
        sets.append(sorted(rng.choice(n, size=min(9, n), replace=False).tolist()))
    return sets


# every readable input: (writer, kwargs) -> built once per test session
DATA_READABLE = {
    "mp4_h264_bframes": lambda d: data_write_video(d / "a.mp4", data_frames(80, 64, 48)),
    "mkv_mpeg4_bframes": lambda d: data_write_video(d / "b.mkv", data_frames(70, 64, 48, 1), codec="mpeg4",
                                                    fmt="matroska", gop=8, b_frames=2),
    "webm_vp8_66x50": lambda d: data_write_video(d / "c.webm", data_frames(60, 66, 50, 2), codec="libvpx",
                                                 fmt="webm", gop=8),
    "mp4_audio_stream_first": lambda d: data_write_video(d / "d.mp4", data_frames(50, 64, 48, 3), audio_first=True),
    "mpegts_h264": lambda d: data_write_video(d / "e.ts", data_frames(60, 64, 48, 4), fmt="mpegts"),
    "raw_h264_no_timestamps": lambda d: data_write_video(d / "f.h264", data_frames(40, 64, 48, 5), fmt="h264"),
    "mp4_odd_67x51_yuv444p": lambda d: data_write_video(d / "g.mp4", data_frames(40, 67, 51, 6), pix_fmt="yuv444p"),
    "mkv_odd_67x51_mpeg4": lambda d: data_write_video(d / "h.mkv", data_frames(40, 67, 51, 7), codec="mpeg4",
                                                      fmt="matroska", gop=5),
    "short_20_frames": lambda d: data_write_video(d / "i.mp4", data_frames(20, 64, 48, 8)),
    "jpeg_folder_66x50": lambda d: data_write_folder(d / "jpg", data_frames(24, 66, 50, 9)),
    "jpeg_folder_odd_67x51": lambda d: data_write_folder(d / "jpg_odd", data_frames(12, 67, 51, 10)),
    "png_folder_40x72": lambda d: data_write_folder(d / "png", data_frames(10, 40, 72, 11), ext="png"),
}


@pytest.fixture(scope="module")
def data_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_inputs")
    return {name: make(root) for name, make in DATA_READABLE.items()}


@pytest.fixture(scope="module")
def data_broken(tmp_path_factory):
    """Unreadable inputs: truncated mp4 (its index is at the end), random bytes, empty, missing."""
    root = tmp_path_factory.mktemp("data_broken")
    good = data_write_video(root / "good.mp4", data_frames(40, 64, 48))
    with open(good, "rb") as f:
        content = f.read()
    paths = {"truncated": root / "truncated.mp4", "random": root / "random.mp4", "empty": root / "empty.mkv",
             "missing": root / "missing.mp4"}
    paths["truncated"].write_bytes(content[: len(content) * 6 // 10])
    paths["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    paths["empty"].write_bytes(b"")
    return {k: str(v) for k, v in paths.items()}


# -----------------------------------------------------------------------------------------------------
# reader: exactly the frames of a full sequential decode


@pytest.mark.parametrize("name", list(DATA_READABLE))
def test_reader_frames_equal_full_sequential_decode(data_inputs, name):
    path = data_inputs[name]
    reference = data_reference(path)
    assert count_frames(path, exact=False) == len(reference)
    for indices in data_index_sets(len(reference)):
        clip = D.read_video_clip(path, indices)
        assert clip.dtype == np.uint8 and clip.shape == (len(indices),) + reference.shape[1:]
        assert np.array_equal(clip, reference[indices]), f"{name}: frames differ at {indices}"
    assert count_frames(path) == len(reference)  # exact: decodes everything
    if not os.path.isdir(path):  # containers with timestamps are read from their keyframes, verified, no fallback
        with D.open_video(path) as video:
            assert (video.exact, video.seekable) == (False, name != "raw_h264_no_timestamps")
            for indices in data_index_sets(len(reference), seed=1):
                assert np.array_equal(video.read(indices), reference[indices])
            assert not video.exact or name == "raw_h264_no_timestamps"
            video.frame_count(exact=True)  # the decoded index gives the same frames
            for indices in data_index_sets(len(reference), seed=2):
                assert np.array_equal(video.read(indices), reference[indices])


def test_reader_picks_video_stream_when_stream_0_is_audio(data_inputs):
    with av.open(data_inputs["mp4_audio_stream_first"]) as c:
        assert c.streams[0].type == "audio" and c.streams[1].type == "video"
    assert count_frames(data_inputs["mp4_audio_stream_first"]) == 50


def test_reader_starts_at_the_keyframe_instead_of_decoding_from_the_start(data_inputs, monkeypatch):
    """A window near the end of a gop-6 file decodes about one gop plus the window, not the whole file."""
    path = data_inputs["mp4_h264_bframes"]
    decoded = []
    real = D._Video._frames

    def counting(self, *args):
        for frame in real(self, *args):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(D._Video, "_frames", counting)
    clip = D.read_video_clip(path, range(70, 76))
    assert np.array_equal(clip, data_reference(path)[70:76])
    assert 0 < len(decoded) <= 6 + 6 + 3  # from keyframe 66: at most 4 lead-in frames + the 6 wanted (+ slack)


def test_reader_recovers_when_its_index_is_wrong(data_inputs, monkeypatch):
    """An index that contradicts the decoder (here: timestamps shifted by one frame) is detected and
    replaced by the decoded truth; the frames returned are still those of a sequential decode."""
    path = data_inputs["mkv_mpeg4_bframes"]
    reference = data_reference(path)
    real = D._quick_index
    monkeypatch.setattr(D, "_quick_index", lambda packets: (lambda pts, keys: (pts + pts[1] - pts[0], keys))(*real(packets)))
    with D.open_video(path) as video:
        assert np.array_equal(video.read([30, 34, 38]), reference[[30, 34, 38]])
        assert video.exact  # rebuilt by decoding
        assert np.array_equal(video.read(range(50, 60)), reference[50:60])

    def phantom(packets):  # a phantom frame at position 41 (as if a packet decoded to nothing)
        pts, keys = real(packets)
        return np.insert(pts, 41, (pts[40] + pts[41]) // 2), keys + (keys >= 41)

    monkeypatch.setattr(D, "_quick_index", phantom)
    with D.open_video(path) as video:
        assert np.array_equal(video.read([38, 42, 46]), reference[[38, 42, 46]])
        assert video.exact and video.frame_count() == len(reference)


def test_reader_out_of_range_names_file_and_valid_range(data_inputs):
    path = data_inputs["short_20_frames"]
    with pytest.raises(D.VideoReadError, match=r"i\.mp4.*frame 20 requested.*valid indices 0\.\.19"):
        D.read_video_clip(path, [5, 20])
    folder = data_inputs["jpeg_folder_66x50"]
    with pytest.raises(D.VideoReadError, match=r"jpg.*frame 24 requested"):
        D.read_video_clip(folder, [24])
    with pytest.raises(ValueError, match="frame indices"):
        D.read_video_clip(path, [-1])


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "missing"])
def test_unreadable_file_raises_video_read_error_naming_it(data_broken, kind):
    path = data_broken[kind]
    with pytest.raises(D.VideoReadError, match=os.path.basename(path)) as err:
        D.read_video_clip(path, [0])
    assert isinstance(err.value, RuntimeError)
    with pytest.raises(D.VideoReadError, match=os.path.basename(path)):
        count_frames(path)


def test_frame_folder_in_natural_order_and_unequal_sizes_rejected(tmp_path):
    frames = data_frames(12, 32, 24)
    folder = tmp_path / "unpadded"
    os.makedirs(folder)
    for i, img in enumerate(frames):  # frame_2 must come before frame_10
        data_write_image(folder / f"frame_{i}.png", img)
    assert np.array_equal(D.read_video_clip(str(folder), [2, 10, 11]), np.stack([frames[2], frames[10], frames[11]]))
    data_write_image(folder / "frame_12.png", data_frames(1, 30, 24)[0])
    with pytest.raises(D.VideoReadError, match=r"frame_12\.png.*30x24"):
        D.read_video_clip(str(folder), [0, 12])
    os.makedirs(tmp_path / "no_images")
    with pytest.raises(D.VideoReadError, match="no frame images"):
        D.read_video_clip(str(tmp_path / "no_images"), [0])


# -----------------------------------------------------------------------------------------------------
# annotation files


def test_annotations_resolve_paths_and_name_bad_lines(tmp_path):
    listing = tmp_path / "split.txt"
    listing.write_text("clips/a.mp4 3\n\n/abs/b.mp4 0.5 -1 2e-1\n/data/ycs/AC/Dataset/DFEW/Clip/jpg_256/02522 4\n")
    a = D.AnnotationList(listing)
    assert a.line_numbers.tolist() == [1, 3, 4] and a.path(0) == str(tmp_path / "clips" / "a.mp4")
    assert a.path(1) == "/abs/b.mp4" and a.line_values(1).tolist() == [0.5, -1.0, 0.2] and a.line_values(0) == [3.0]
    a = D.AnnotationList(listing, root="/videos", replace_prefix=("/data/ycs/AC/Dataset/DFEW", "/mnt/dfew"))
    assert a.path(0) == "/videos/clips/a.mp4" and a.path(2) == "/mnt/dfew/Clip/jpg_256/02522"

    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 1\nb.mp4 2\nmy clip.mp4 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 3: 'clip\.mp4' is not a number"):
        D.AnnotationList(bad)
    bad.write_text("a.mp4 1\nb.mp4\n")  # a path alone: fine where labels are unused, an error where they are
    assert D.AnnotationList(bad).line_values(1).tolist() == []
    with pytest.raises(ValueError, match=r"bad\.txt, line 2: no label after the path"):
        D.VideoDataset(bad, "train", num_outputs=3)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        D.AnnotationList(tmp_path / "nowhere.txt")


def data_voxceleb2_list(path, n):
    """n lines of VoxCeleb2's dev layout, "dev/mp4/idNNNNN/<11 characters>/NNNNN.mp4 0", written at once."""
    path.write_text("".join(f"dev/mp4/id{i // 180:05d}/{i * 2654435761 % 10**11:011d}/{i % 180:05d}.mp4 0\n"
                            for i in range(n)))


def test_a_million_line_list_loads_in_seconds_into_a_few_arrays(tmp_path):
    """VoxCeleb2 dev's 1,092,009 lines: no Python object per entry (the gc-tracked objects and the interpreter's
    small blocks do not grow with the list, so DataLoader workers touching entries copy no pages), about 70 MB
    held, and seconds of CPU (the per-entry-object loader took 9.7 s and held 760 MB)."""
    data_voxceleb2_list(tmp_path / "small.txt", 1000)
    data_voxceleb2_list(tmp_path / "vox.txt", 1_092_009)
    counts = []
    for name in ("small.txt", "vox.txt"):
        gc.collect()
        objects, blocks, t = len(gc.get_objects()), sys.getallocatedblocks(), time.process_time()
        ds = D.VideoDataset(tmp_path / name, "pretrain")
        cpu = time.process_time() - t
        gc.collect()
        counts.append((len(gc.get_objects()) - objects, sys.getallocatedblocks() - blocks))
    assert abs(counts[1][0] - counts[0][0]) < 50 and abs(counts[1][1] - counts[0][1]) < 1000, counts
    held = sum(v.nbytes for v in vars(ds).values() if isinstance(v, np.ndarray))
    assert len(ds) == 1_092_009 and held < 150e6 and cpu < 4.0, (held, cpu)
    assert ds.path(1_092_008) == str(tmp_path / "dev/mp4/id06066/65086498088/00128.mp4")
    assert ds.line_number(1_092_008) == 1_092_009 and ds.target(5).shape == (0,)


@pytest.mark.parametrize("text, task, n, message", [
    ("a.mp4 1\nb.mp4 7\nc.mp4 3\n", "classification", 7,
     r"l\.txt, line 2: label 7 is not a class index in 0\.\.6 \(num_classes=7\); every label of the list lies in "
     r"1\.\.7: they look 1-based, and this code counts classes from 0"),
    ("a.mp4 0\nb.mp4 2.5\n", "classification", 7, r"l\.txt, line 2: label 2\.5 is not a class index in 0\.\.6 \(num_classes=7\)$"),
    ("a.mp4 0.1 0.2\nb.mp4 0.3\n", "regression", 2, r"l\.txt, line 2: label 0\.3 has 1 values; regression needs 2 numbers"),
    ("a.mp4 0.1 0.2\n\nb.mp4 0.3 n/a\n", "regression", 2, r"l\.txt, line 3: 'n/a' is not a number"),
    ("a.mp4 0.1 nan\n", "regression", 2, r"l\.txt, line 1: 'nan' is not a number"),
])
def test_every_label_problem_is_one_line_naming_file_line_and_value(tmp_path, text, task, n, message):
    (tmp_path / "l.txt").write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        D.VideoDataset(tmp_path / "l.txt", "train", task=task, num_outputs=n)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="mode="):
        D.VideoDataset(tmp_path / "l.txt", "finetune", num_outputs=n)


# -----------------------------------------------------------------------------------------------------
# sampling and transforms


def test_sampling_rules():
    assert D.clip_indices(10, 4, 4, 100) == [10, 14, 18, 22]
    # shorter than the window: same stride, the last frame repeats
    assert D.clip_indices(0, 16, 4, 20) == [0, 4, 8, 12, 16] + [19] * 11
    assert D.uniform_clip_starts(100, 61, 2) == [0, 39] and D.uniform_clip_starts(100, 61, 1) == [19]
    assert D.uniform_clip_starts(30, 61, 3) == [0, 0, 0]
    g = torch.Generator().manual_seed(0)
    starts = [D.random_clip_start(100, 61, g) for _ in range(400)]
    assert min(starts) == 0 and max(starts) == 39


def data_slow_transform(frames, boxes, size):
    """Per clip, on floats: crop the box, F.interpolate, flip, normalise."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1, 1)
    out = []
    for clip, (top, left, h, w, flip) in zip(frames, boxes.tolist()):
        crop = clip[..., top:top + h, left:left + w].float() / 255  # (T, 3, h, w)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        crop = crop.flip(-1) if flip else crop
        out.append((crop.permute(1, 0, 2, 3) - mean) / std)  # (3, T, size, size)
    return torch.stack(out)


def test_device_transform_equals_slow_per_clip_reference():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (40, 3, 3, 40, 40), dtype=torch.uint8, generator=g)
    boxes = torch.tensor([D.multiscale_crop_box(40, 40, generator=g) + (i % 2,) for i in range(40)])
    assert {h for _, _, h, _, _ in boxes.tolist()} == {int(40 * s) for s in D.MULTISCALE_SCALES}
    out = D.device_transform(frames, boxes, 40)
    assert out.shape == (40, 3, 3, 40, 40) and out.dtype == torch.float32
    assert torch.allclose(out, data_slow_transform(frames, boxes, 40), atol=1e-5, rtol=0)
    up = D.device_transform(frames[:4].unflatten(0, (2, 2)), boxes[:4].view(2, 2, 5), 56)  # (B, k, ...), to 56 px
    assert torch.allclose(up.flatten(0, 1), data_slow_transform(frames[:4], boxes[:4], 56), atol=1e-5, rtol=0)
    plain = D.device_transform(frames[:2], None, 40)  # evaluation: only scale and normalise
    assert torch.allclose(plain, data_slow_transform(frames[:2], torch.tensor([[0, 0, 40, 40, 0]] * 2), 40), atol=1e-5)


def test_eval_views_scale_short_side_and_spread_crops(tmp_path):
    ramp = np.broadcast_to(np.linspace(0, 255, 96).astype(np.uint8)[None, None, :, None], (4, 48, 96, 3)).copy()
    wide = data_write_folder(tmp_path / "wide", list(ramp), ext="png")
    tall = data_write_folder(tmp_path / "tall", list(np.transpose(ramp, (0, 2, 1, 3)).copy()), ext="png")
    listing = data_listing(tmp_path, [(wide, 0), (tall, 1)])
    ds = D.VideoDataset(listing, "eval", img_size=32, num_frames=4, sampling_rate=1, num_clips=1, num_crops=3,
                        num_outputs=2)
    views, _, _ = ds[0]
    assert views.shape == (3, 4, 3, 32, 32) and views.dtype == torch.uint8
    means = [float(v.float().mean()) for v in views]
    assert means[0] < means[1] < means[2]  # left, centre, right of a left-to-right ramp
    assert ds[1][0].shape == (3, 4, 3, 32, 32)


# -----------------------------------------------------------------------------------------------------
# the dataset


def data_listing(tmp_path, lines, name="list.txt"):
    path = tmp_path / name
    path.write_text("".join(f"{p} {v}\n" for p, v in lines))
    return path


def data_mask_cfg(size=32, frames=8):
    return SVFAPConfig(img_size=size, patch_size=8, num_frames=frames, embed_dim=64, num_heads=4, decoder_dim=64,
                       decoder_heads=4)


def test_dataset_items_have_the_agreed_shapes(data_inputs, tmp_path):
    files = [data_inputs[k] for k in ("mp4_h264_bframes", "webm_vp8_66x50", "jpeg_folder_66x50",
                                      "mkv_odd_67x51_mpeg4", "short_20_frames")]
    listing = data_listing(tmp_path, [(f, i % 3) for i, f in enumerate(files)])
    train = D.VideoDataset(listing, "train", img_size=32, num_frames=8, sampling_rate=2, num_outputs=3)
    for i in range(len(train)):
        frames, box, target, broken = train[i]
        assert int(broken) == 0 and frames.shape == (8, 3, 32, 32) and frames.dtype == torch.uint8 and box.shape == (5,)
        assert target.dtype == torch.int64 and target.dim() == 0 and int(target) == i % 3
    ev = D.VideoDataset(listing, "eval", img_size=32, num_frames=8, sampling_rate=2, num_clips=3, num_crops=2,
                        num_outputs=3)
    views, target, index = ev[4]
    assert views.shape == (6, 8, 3, 32, 32) and views.dtype == torch.uint8 and int(target) == 1 and index == 4
    cfg = data_mask_cfg()
    pre = D.VideoDataset(listing, "pretrain", img_size=32, num_frames=8, sampling_rate=2, repeated_sampling=3,
                         mask_cfg=cfg)
    frames, boxes, mask, broken = pre[0]
    assert frames.shape == (3, 8, 3, 32, 32) and boxes.shape == (3, 5) and boxes.dtype == torch.int64
    assert mask.shape == (3, cfg.num_patches) and mask.dtype == torch.bool
    assert (mask.sum(1) == cfg.grid[0] * cfg.num_masked_spatial).all()
    assert sum(t.nbytes for t in pre[0][:3]) / 3 < 1.3e6 * (32 * 32 * 8) / (160 * 160 * 16)  # uint8, not float32
    reg = D.VideoDataset(data_listing(tmp_path, [(files[0], "0.5 -0.25")], "reg.txt"), "train", img_size=32,
                         task="regression", num_outputs=2)
    assert reg[0][2].dtype == torch.float32 and reg[0][2].tolist() == [0.5, -0.25]


def test_crop_scales_places_and_flips_follow_the_paper(tmp_path, monkeypatch):
    """Over 3,000 clips the 10 (height, width) pairs of max_distort 1, the flip and the 13 places are uniform
    (chi-square below the 0.1% critical value), so heights of scales 1, .875, .75, .66 come 2:3:3:2."""
    listing = data_listing(tmp_path, [("x.mp4", 0)] * 300)
    ds = D.VideoDataset(listing, "pretrain", img_size=160, num_frames=8, repeated_sampling=10,
                        mask_cfg=data_mask_cfg(160, 8))
    monkeypatch.setattr(ds, "_read_clips", lambda *args: torch.zeros(10, 8, 3, 160, 160, dtype=torch.uint8))
    boxes = torch.cat([ds[i][1] for i in range(len(ds))]).tolist()
    sides = [int(160 * s) for s in D.MULTISCALE_SCALES]

    def chi2(values, categories):
        counts = np.array([sum(v == c for v in values) for c in categories])
        assert counts.sum() == len(values)  # nothing outside the categories
        return ((counts - len(values) / len(categories)) ** 2 / (len(values) / len(categories))).sum()

    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    assert chi2([(b[2], b[3]) for b in boxes], pairs) < 27.9 and chi2([b[4] for b in boxes], [0, 1]) < 10.8
    small = [b for b in boxes if (b[2], b[3]) == (sides[3], sides[3])]  # the smallest crop: 13 distinct places
    places = sorted({(b[0], b[1]) for b in small})
    assert len(places) == 13 and chi2([(b[0], b[1]) for b in small], places) < 32.9


def test_items_do_not_depend_on_workers_or_fetch_order(data_inputs, tmp_path):
    files = [data_inputs[k] for k in ("mp4_h264_bframes", "mkv_mpeg4_bframes", "jpeg_folder_66x50", "mpegts_h264")]
    ds = D.VideoDataset(data_listing(tmp_path, [(f, 0) for f in files]), "pretrain", img_size=32, num_frames=8,
                        sampling_rate=2, repeated_sampling=2, mask_cfg=data_mask_cfg(), seed=3)
    pairs = [(5, i) for i in range(len(ds))]  # (epoch, index), as pretrain.fit's sampler gives them
    loaded = [list(torch.utils.data.DataLoader(ds, batch_size=2, sampler=pairs, num_workers=w)) for w in (0, 2)]
    backwards = [ds[pair] for pair in reversed(pairs)][::-1]
    for j in range(3):
        in_order = torch.cat([batch[j] for batch in loaded[0]])
        assert torch.equal(in_order, torch.cat([batch[j] for batch in loaded[1]]))
        assert torch.equal(in_order, torch.stack([item[j] for item in backwards]))
    assert not all(torch.equal(ds[(6, i)][1], backwards[i][1]) for i in range(len(ds)))  # a new epoch, new crops


def test_repeated_sampling_draws_k_windows_from_one_range(data_inputs, tmp_path):
    listing = data_listing(tmp_path, [(data_inputs["mp4_h264_bframes"], 0)])
    ds = D.VideoDataset(listing, "pretrain", img_size=32, num_frames=8, sampling_rate=2, repeated_sampling=4,
                        mask_cfg=data_mask_cfg())
    span, g = 15, torch.Generator().manual_seed(0)  # 8 frames, every 2nd
    assert ds.span == span
    for _ in range(50):
        flat = ds._choose_training(80, g)
        clips = [flat[j:j + 8] for j in range(0, 32, 8)]
        assert len(clips) == 4 and max(flat) - min(flat) < 2 * span and max(flat) < 80
        assert all(c == D.clip_indices(c[0], 8, 2, 80) for c in clips)


def test_crop_box_is_cut_first_and_eval_views_are_normalised_on_the_device(tmp_path):
    """A 224x224 frame that is (200, 100, 50) inside VoxCeleb2's box (rows 0-160, columns 32-192) and
    black outside: after the crop box every pixel is that colour, normalised with ImageNet mean/std."""
    img = np.zeros((224, 224, 3), np.uint8)
    img[0:160, 32:192] = (200, 100, 50)
    folder = data_write_folder(tmp_path / "box", [img] * 6, ext="png")
    listing = data_listing(tmp_path, [(folder, 0)])
    ds = D.VideoDataset(listing, "eval", img_size=32, num_frames=4, sampling_rate=1, num_clips=1, num_crops=2,
                        crop_box=D.VOXCELEB2_CROP_BOX, num_outputs=1)
    views = D.device_transform(ds[0][0], None, 32)
    expected = [(c / 255 - m) / s for c, m, s in zip((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD)]
    for ch in range(3):
        assert torch.allclose(views[:, ch], torch.full_like(views[:, ch], expected[ch]), atol=1e-5)
    train = D.VideoDataset(listing, "train", img_size=32, num_frames=4, sampling_rate=1, crop_box=D.VOXCELEB2_CROP_BOX,
                           num_outputs=1)
    assert (train[0][0] == torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1)).all()
    no_box = D.VideoDataset(listing, "eval", img_size=32, num_frames=4, sampling_rate=1, num_clips=1, num_crops=1,
                            num_outputs=1)
    assert int(no_box[0][0].min()) == 0  # black borders are there without the box
    bad_box = D.VideoDataset(listing, "eval", img_size=32, crop_box=(0, 300, 0, 100), num_outputs=1)
    with pytest.raises(D.VideoReadError, match=r"crop_box .* does not fit its 224x224 frames"):
        bad_box[0]
    assert [(n, p, "does not fit its 224x224 frames" in why) for n, p, why in bad_box.unreadable()] == [(1, folder, True)]


def test_eval_clips_spread_in_time_and_short_video_repeats_last_frame(tmp_path):
    frames = [np.full((24, 24, 3), 10 * t, np.uint8) for t in range(20)]  # brightness = time
    folder = data_write_folder(tmp_path / "ramp", frames, ext="png")
    listing = data_listing(tmp_path, [(folder, 0)])
    ds = D.VideoDataset(listing, "eval", img_size=24, num_frames=4, sampling_rate=2, num_clips=3, num_crops=1,
                        num_outputs=1)
    assert ds[0][0][:, 0, 0, 0, 0].tolist() == [0, 60, 130]  # starts 0, 6, 13 (span 7 in 20 frames)
    long = D.VideoDataset(listing, "eval", img_size=24, num_frames=16, sampling_rate=4, num_clips=1, num_crops=1,
                          num_outputs=1)
    assert long[0][0][0, :, 0, 0, 0].tolist() == [0, 40, 80, 120, 160] + [190] * 11  # then the last frame repeats


def test_training_skips_and_counts_broken_files_eval_names_them(data_inputs, data_broken, tmp_path):
    good = data_inputs["mp4_h264_bframes"]
    lines = [(good, 0), (data_broken["truncated"], 1), (good, 2), (data_broken["random"], 1),
             (data_broken["missing"], 2), (good, 0)]
    listing = data_listing(tmp_path, lines)
    ds = D.VideoDataset(listing, "train", img_size=32, num_frames=8, sampling_rate=2, max_fail_fraction=0.5,
                        num_outputs=3)
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable sample: .*truncated\.mp4") as caught:
        frames, _, target, broken = ds[1]
    assert frames.shape == (8, 3, 32, 32) and 1 <= int(broken) <= 3 and len(caught) == int(broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert [int(ds[i][3]) > 0 for i in range(len(ds))] == [False, True, False, True, True, False]

    ev = D.VideoDataset(listing, "eval", img_size=32, num_frames=8, sampling_rate=2, num_outputs=3)
    assert ev[0][0].shape == (4, 8, 3, 32, 32)
    with pytest.raises(D.VideoReadError, match=r"random\.mp4.*line 4 of .*list\.txt; evaluation never skips"):
        ev[3]
    bad = ev.unreadable()
    assert [(n, os.path.basename(p)) for n, p, _ in bad] == [(2, "truncated.mp4"), (4, "random.mp4"), (5, "missing.mp4")]
    assert "no such file" in bad[2][2]

    all_bad = data_listing(tmp_path, [(data_broken[k], 0) for k in ("truncated", "random", "missing")], "bad.txt")
    ds = D.VideoDataset(all_bad, "train", img_size=32, num_frames=8, sampling_rate=2, num_outputs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"1000 unreadable files in a row from .*bad\.txt: check the paths"):
            ds[0]  # bounded


def test_dataset_in_dataloader_workers(data_inputs, data_broken, tmp_path):
    files = [data_inputs[k] for k in ("mp4_h264_bframes", "mkv_mpeg4_bframes", "jpeg_folder_66x50",
                                      "mpegts_h264", "webm_vp8_66x50", "mp4_audio_stream_first")]
    listing = data_listing(tmp_path, [(f, i % 2) for i, f in enumerate(files)] + [(data_broken["random"], 0)])
    ds = D.VideoDataset(listing, "train", img_size=32, num_frames=8, sampling_rate=2, max_fail_fraction=0.5,
                        num_outputs=2)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert [(b[0].shape, b[1].shape) for b in batches] == [((4, 8, 3, 32, 32), (4, 5)), ((3, 8, 3, 32, 32), (3, 5))]
    readable = data_listing(tmp_path, [(f, i % 2) for i, f in enumerate(files)], "readable.txt")
    ev = D.VideoDataset(readable, "eval", img_size=32, num_frames=8, sampling_rate=2, num_outputs=2)
    loader = torch.utils.data.DataLoader(ev, batch_size=3, num_workers=2)
    got = [(v.shape, t.tolist(), i.tolist()) for v, t, i in loader]
    assert got == [((3, 4, 8, 3, 32, 32), [0, 1, 0], [0, 1, 2]), ((3, 4, 8, 3, 32, 32), [1, 0, 1], [3, 4, 5])]


# -----------------------------------------------------------------------------------------------------
# prepare: training-ready copies


def data_prepare_inputs(tmp_path, data_broken):
    """A list of five entries: videos of faces (two named a.mp4, in different folders), a folder of frames
    extracted from a yuv420p video (as DFEW's are), a broken file."""
    os.makedirs(tmp_path / "src" / "sub")
    faces = [list(render_demo_clip(demo_identity(s, s), demo_clip_plan(s, s, s, s % 6, n), 48, n)) for s, n in
             ((3, 44), (4, 30), (6, 20))]
    paths = [data_write_video(tmp_path / "src" / "a.mp4", faces[0], gop=40),
             data_write_video(tmp_path / "src" / "sub" / "a.mp4", faces[1])]
    paths += [data_write_folder(tmp_path / "src" / "frames", list(data_reference(paths[1])[:13]), ext="png"),
              data_broken["random"], data_write_video(tmp_path / "src" / "b.mp4", faces[2])]
    listing = tmp_path / "src" / "train.txt"
    listing.write_text(f"a.mp4 3\nsub/a.mp4 1\nframes 2\n{paths[3]} 0\nb.mp4 0.5 -1\n")
    return listing, paths


def test_prepared_frames_match_their_sources_and_broken_inputs_are_listed(tmp_path, data_broken, capsys):
    listing, paths = data_prepare_inputs(tmp_path, data_broken)
    out = tmp_path / "prepared"
    new_list = D.prepare(listing, out, crop_box=(8, 40, 4, 44), keep_every=2)
    assert "crop_box = ()\nsampling_rate = 2\n" in capsys.readouterr().out
    rows = [line.split(maxsplit=1) for line in open(new_list).read().splitlines()]
    assert rows == [["clips/a.mp4", "3"], ["clips/sub/a.mp4", "1"], ["clips/frames.mp4", "2"], ["clips/b.mp4", "0.5 -1"]]
    failed = (out / "prepare_failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith("line 4: ") and "random.mp4" in failed[0]
    for source, (name, _) in zip([paths[0], paths[1], paths[2], paths[4]], rows):
        kept = data_reference(source)[::2, 8:40, 4:44]
        prepared = data_reference(str(out / name))
        assert prepared.shape == kept.shape and D.psnr(prepared, kept).min() >= 40
    with av.open(str(out / "clips" / "a.mp4")) as c:  # 22 kept frames, a keyframe every 16
        assert [i for i, f in enumerate(c.decode(video=0)) if f.key_frame] == [0, 16]
    D.prepare(listing, tmp_path / "small", keep_every=4, size=24)
    assert data_reference(str(tmp_path / "small" / "clips" / "frames.mp4")).shape == (4, 24, 24, 3)
    y, x, t = np.meshgrid(np.arange(33), np.arange(45), np.arange(3), indexing="ij")  # odd sizes: x264 needs even
    frames = np.stack([4 * y + t, 5 * x, 2 * (x + y)], -1).transpose(2, 0, 1, 3).astype(np.uint8)  # (3, 33, 45, 3)
    data_write_folder(tmp_path / "odd", frames, ext="png")
    (tmp_path / "odd.txt").write_text("odd 0\n")
    D.prepare(tmp_path / "odd.txt", tmp_path / "odd_out", keep_every=1, workers=None)  # the CLI's --workers=0
    prepared = data_reference(str(tmp_path / "odd_out" / "clips" / "odd.mp4"))
    assert prepared.shape == (3, 32, 44, 3) and D.psnr(prepared, frames[:, :32, :44]).min() >= 40


def test_prepare_interrupted_and_rerun_finishes_without_redoing_a_file(tmp_path, data_broken, monkeypatch):
    listing, _ = data_prepare_inputs(tmp_path, data_broken)
    real, done = D._prepare_one, []

    def crash_after_two(job):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(job[1])
        return real(job)

    monkeypatch.setattr(D, "_prepare_one", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        D.prepare(listing, tmp_path / "out", keep_every=4)
    assert not (tmp_path / "out" / "train.txt").exists()
    assert not [f for _, _, files in os.walk(tmp_path / "out") for f in files if f.endswith(".tmp")]
    first, done[:] = list(done), []
    monkeypatch.setattr(D, "_prepare_one", lambda job: (done.append(job[1]), real(job))[1])
    D.prepare(listing, tmp_path / "out", keep_every=4)
    assert len(first) == 2 and not set(first) & set(done) and len(first) + len(done) == 5  # the broken one retried
    assert len((tmp_path / "out" / "train.txt").read_text().splitlines()) == 4


def data_faces(tmp_path, seed, n, size=32):
    """n frames of a demo face, decoded from a yuv420p video as DFEW's frames are: x264 keeps them within 40 dB."""
    face = render_demo_clip(demo_identity(seed, seed), demo_clip_plan(seed, seed, seed, seed % 6, n), size, n)
    return list(data_reference(data_write_video(tmp_path / f"face{seed}.mp4", list(face))))


def data_prepare_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "data.py"), "prepare", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def data_tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def test_prepare_refuses_a_folder_made_with_other_settings_and_continues_one_made_with_the_same(tmp_path, data_broken):
    listing, _ = data_prepare_inputs(tmp_path, data_broken)
    out = tmp_path / "out"
    D.prepare(listing, out, keep_every=1)
    assert json.loads((out / "prepare.json").read_text()) == {
        "list": str(listing), "root": None, "replace_prefix": None, "crop_box": None, "keep_every": 1, "size": None,
        "min_psnr": 40}
    before = data_tree(out)
    done = data_prepare_cli(f"--list={listing}", f"--out={out}", "--keep_every=2", "--crop_box=(0, 32, 0, 32)")
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"data.py: prepare: {out} holds clips made with other settings ({out}/prepare.json): crop_box=None "
        f"there, [0, 32, 0, 32] now, keep_every=1 there, 2 now; give another --out, or the same settings to continue"]
    assert data_tree(out) == before  # not a byte changed
    os.remove(out / "clips" / "b.mp4")
    done = data_prepare_cli(f"--list={listing}", f"--out={out}", "--keep_every=1")
    assert done.returncode == 0 and "4 of 5 entries ready" in done.stdout and "(1 written now)" in done.stdout  # b
    assert data_tree(out) == before
    (out / "prepare.json").unlink()  # a folder of an older prepare: its settings are unknown
    assert "root='unknown' there, None now" in data_prepare_cli(f"--list={listing}", f"--out={out}", "--keep_every=1").stderr
    (tmp_path / "missing.txt").write_text("nowhere/a.mp4 0\nnowhere/b.mp4 1\n")  # a list no file of which is found
    done = data_prepare_cli(f"--list={tmp_path / 'missing.txt'}", f"--out={tmp_path / 'none'}")
    lines = [line for line in done.stderr.splitlines() if line.startswith("data.py")]  # not the progress bar
    assert done.returncode == 1 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "prepare: none of the 2 entries of" in lines[0] and f"line 1: {tmp_path}/nowhere/a.mp4" in lines[0]


def test_release_style_absolute_lists_prepare_with_replace_prefix_and_relative_ones_with_root(tmp_path):
    """DFEW's split files name frame folders on the authors' machine: /data/ycs/AC/Dataset/DFEW/Clip/jpg_256/NNNNN."""
    clips = {n: data_write_folder(tmp_path / "DFEW" / "Clip" / "jpg_256" / n, data_faces(tmp_path, i, 6), ext="png")
             for i, n in enumerate(("00001", "00002"))}
    release = tmp_path / "split01" / "test.csv"
    release.parent.mkdir()
    release.write_text("/data/ycs/AC/Dataset/DFEW/Clip/jpg_256/00001 3\n/data/ycs/AC/Dataset/DFEW/Clip/jpg_256/00002 0\n")
    done = data_prepare_cli(f"--list={release}", f"--out={tmp_path / 'prepared'}", "--keep_every=1",
                            f"--replace_prefix=('/data/ycs/AC/Dataset/DFEW', '{tmp_path / 'DFEW'}')")
    assert done.returncode == 0 and "2 of 2 entries ready" in done.stdout, done.stderr
    rows = (tmp_path / "prepared" / "test.csv").read_text().splitlines()
    assert rows == ["clips/Clip/jpg_256/00001.mp4 3", "clips/Clip/jpg_256/00002.mp4 0"]  # named below the prefix
    for n, source in clips.items():
        prepared = data_reference(str(tmp_path / "prepared" / "clips" / "Clip" / "jpg_256" / f"{n}.mp4"))
        assert D.psnr(prepared, data_reference(source)).min() >= 40
    relative = tmp_path / "lists" / "train.txt"
    relative.parent.mkdir()
    relative.write_text("Clip/jpg_256/00002 5\n")
    done = data_prepare_cli(f"--list={relative}", f"--out={tmp_path / 'rooted'}", f"--root={tmp_path / 'DFEW'}")
    assert done.returncode == 0 and (tmp_path / "rooted" / "train.txt").read_text() == "clips/Clip/jpg_256/00002.mp4 5\n"


@pytest.mark.parametrize("names", [("a/x.avi", "a/x.mp4"), ("x", "./x.mp4"), ("../x.mp4", "x.webm")])
def test_two_entries_that_map_to_one_target_stop_prepare_before_any_file_is_written(tmp_path, names):
    listing = tmp_path / "src" / "list.txt"
    listing.parent.mkdir()
    listing.write_text(f"b.mp4 0\n{names[0]} 1\n\n{names[1]} 2\n")  # a blank line 3: numbers are the file's lines
    with pytest.raises(ValueError, match=rf"^prepare: {re.escape(str(listing))}, lines 2 and 4 both map to "
                                         rf"{re.escape(str(tmp_path / 'out' / 'clips'))}/(a/)?x\.mp4 "):
        D.prepare(listing, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_a_source_that_cannot_reach_40_db_is_kept_and_listed_with_its_psnr(tmp_path, capsys):
    """Full-resolution colour noise loses to yuv420p's halved chroma whatever the CRF: the clip is kept (CRF 0)
    and its worst frame's PSNR, measured here from the files, is in the summary and in prepare_warnings.txt."""
    noise = [np.random.default_rng(t).integers(0, 256, (16, 16, 3), dtype=np.uint8) for t in range(4)]
    source = data_write_folder(tmp_path / "src" / "noise", noise, ext="png")
    fine = data_write_folder(tmp_path / "src" / "fine", data_faces(tmp_path, 0, 4), ext="png")
    listing = tmp_path / "src" / "list.txt"
    listing.write_text("fine 0\nnoise 1\n")
    D.prepare(listing, tmp_path / "out", keep_every=1)
    measured = D.psnr(data_reference(str(tmp_path / "out" / "clips" / "noise.mp4")), np.stack(noise)).min()
    assert measured < 40 and D.psnr(data_reference(str(tmp_path / "out" / "clips" / "fine.mp4")),
                                    data_reference(fine)).min() >= 40
    line = f"line 2: {source}: {measured:.1f} dB"
    assert f"0 unreadable, listed in {tmp_path / 'out' / 'prepare_failed.txt'}; 1 kept below 40 dB PSNR, listed in " \
           f"prepare_warnings.txt: {line}\n" in capsys.readouterr().out
    assert (tmp_path / "out" / "prepare_warnings.txt").read_text() == \
        f"{line} PSNR (its worst frame), kept below the 40 dB target at CRF 0\n"
    assert (tmp_path / "out" / "list.txt").read_text() == "clips/fine.mp4 0\nclips/noise.mp4 1\n"  # kept


# =====================================================================================================
# train: Tests of pretrain.py and finetune.py: the scripts run as users run them (subprocess, torchrun), on a
# model of ~0.1M parameters and 32x32x8 videos made here with PyAV, a few iterations each.


TRAIN_REPO = os.path.dirname(os.path.abspath(__file__))
# a model small enough for seconds-long runs: 8 frames of 32x32, 4x4x4 = 64 tokens, 4 of 16 positions visible
TRAIN_MODEL_ARGS = ["--model=tiny", "--model_args.img_size=32", "--model_args.num_frames=8",
                    "--model_args.embed_dim=32", "--model_args.num_heads=2", "--model_args.stage_depths=(1,1,1)",
                    "--model_args.num_bottleneck_tokens=4", "--model_args.bottleneck_hidden=16",
                    "--model_args.decoder_dim=32", "--model_args.decoder_heads=2", "--model_args.decoder_depth=1",
                    "--model_args.mask_ratio=0.75"]
TRAIN_COMMON = ["--device=cpu", "--sampling_rate=1", "--num_workers=0", "--log_interval=1", "--batch_size=4",
                "--warmup_epochs=1"]


def build_train_cfg():
    """The SVFAPConfig that TRAIN_MODEL_ARGS describe."""
    return pretrain.build_model_config("tiny", {a.split("=")[0][len("--model_args."):]: ast.literal_eval(a.split("=")[1])
                                                for a in TRAIN_MODEL_ARGS if a.startswith("--model_args.")})


def train_write_video(path, label, seed, size=32, frames=8):
    """A smooth colour ramp with a bright square moving right (label 0), down (1) or not at all (2)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([a * x + b * y + c for a, b, c in rng.uniform(-0.5, 0.5, (3, 3)) + [0, 0, 0.5]], -1)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            img = base.copy()
            top, left = 8 + (3 * t if label == 1 else 0), 8 + (3 * t if label == 0 else 0)
            img[top % 24:top % 24 + 8, left % 24:left % 24 + 8] = 1.0
            frame = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """12 videos; lists: pretrain (all), train (all), val (first 6), test (last 5: an odd count, so two
    processes get unequal shards)."""
    root = tmp_path_factory.mktemp("train_data")
    os.makedirs(root / "videos")
    lines = []
    for i in range(12):
        train_write_video(str(root / "videos" / f"v{i:02d}.mp4"), i % 3, seed=i)
        lines.append(f"videos/v{i:02d}.mp4 {i % 3}")
    lists = {"pretrain": [f"{line.split()[0]} 0" for line in lines], "train": lines, "val": lines[:6],
             "test": lines[7:], "empty": []}
    for name, rows in lists.items():
        (root / f"{name}.txt").write_text("".join(row + "\n" for row in rows))
    return root


def train_run(script, *args, env=None, nproc=1, check=True):
    """Run a script as a user does (torchrun for nproc > 1); returns the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(launcher + [script, *map(str, args)], cwd=TRAIN_REPO, env=run_env, capture_output=True,
                          text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def train_run_patched(script, patch, *args, nproc=1, check=False):
    """Run a script as train_run does, after executing `patch` (Python) in the same process: faults are
    injected from the test, through the libraries the script calls, not through hooks in the script."""
    wrapper = os.path.join(TRAIN_REPO, ".pytest_cache", f"patched_{abs(hash(patch))}.py")
    os.makedirs(os.path.dirname(wrapper), exist_ok=True)
    with open(wrapper, "w") as f:
        f.write(f"import runpy, sys\nsys.path.insert(0, {TRAIN_REPO!r})\n{patch}\n"
                f"sys.argv = [{script!r}] + sys.argv[1:]\nrunpy.run_path({script!r}, run_name='__main__')\n")
    return train_run(wrapper, *args, nproc=nproc, check=check)


# a fault at the k-th training forward pass of SVFAP (evaluation passes, such as the reconstruction video's, not counted)
PATCH_LOSS = """import itertools, model, torch
_calls, _orig = itertools.count(1), model.SVFAP.forward_loss
class _InfGrad(torch.autograd.Function):  # identity forward, infinite gradient: an fp16 overflow in backward
    forward = staticmethod(lambda ctx, x: x.view_as(x))
    backward = staticmethod(lambda ctx, g: g * float("inf"))
def _forward_loss(self, *a):
    loss = _orig(self, *a)
    if self.training and next(_calls) == {at}:
        return {fault}
    return loss
model.SVFAP.forward_loss = _forward_loss
"""


def train_pretrain_args(data, out_dir, *extra):
    return [*TRAIN_MODEL_ARGS, *TRAIN_COMMON, f"--train_list={data / 'pretrain.txt'}", f"--out_dir={out_dir}",
            "--base_lr=0.3", "--epochs=3", "--vis_clips=2", f"--vis_list={data / 'val.txt'}", *extra]


def train_finetune_args(data, out_dir, *extra):
    return [*TRAIN_MODEL_ARGS, *TRAIN_COMMON, f"--train_list={data / 'train.txt'}", f"--val_list={data / 'val.txt'}",
            f"--test_list={data / 'test.txt'}", f"--out_dir={out_dir}", "--num_classes=3",
            "--class_names=('right','down','still')", "--base_lr=0.1", "--epochs=2", "--eval_batch_size=2",
            "--num_clips=2", "--num_crops=1", *extra]


def train_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in train_log(out_dir) if "loss" in r}


@pytest.fixture(scope="module")
def train_pretrained(train_data, tmp_path_factory):
    """An uninterrupted pre-training run: 3 epochs x 3 iterations, a checkpoint every 2 iterations."""
    out = tmp_path_factory.mktemp("pretrain_full")
    train_run("pretrain.py", *train_pretrain_args(train_data, out, "--ckpt_every=2"))
    return out


@pytest.fixture(scope="module")
def train_finetuned(train_data, train_pretrained, tmp_path_factory):
    """Fine-tuning from the pre-training checkpoint, single process; val list == test list here."""
    out = tmp_path_factory.mktemp("finetune")
    done = train_run("finetune.py", *train_finetune_args(train_data, out, f"--init_from={train_pretrained / 'ckpt.pt'}",
                                                        f"--test_list={train_data / 'val.txt'}"))
    return out, done.stdout


# --- the scripts' claims ------------------------------------------------------------


def test_short_pretraining_lowers_the_loss(train_pretrained):
    losses = list(train_losses(train_pretrained).values())
    assert len(losses) == 9
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02, losses


def test_resume_reproduces_the_run(train_data, train_pretrained, tmp_path):
    """Stop mid-epoch (iteration 4 of 9), resume with another worker count: the same following losses. A float32
    checkpoint also resumes in float16 (its unused gradient scaler was saved empty)."""
    train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path, "--max_iters=4"))
    os.makedirs(fp16 := tmp_path / "fp16")
    os.link(tmp_path / "ckpt.pt", fp16 / "ckpt.pt")
    train_run("pretrain.py", *train_pretrain_args(train_data, fp16, "--init_from=resume", "--dtype=float16",
                                                  "--max_iters=5"))
    assert list(train_losses(fp16)) == [5]
    train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path, "--init_from=resume", "--num_workers=1"))
    full, resumed = train_losses(train_pretrained), train_losses(tmp_path)
    assert sorted(resumed) == list(range(1, 10))
    for it in range(5, 10):
        assert abs(resumed[it] - full[it]) <= 1e-6, (it, resumed[it], full[it])


def test_finetuning_resume_reproduces_drop_path_mixup_and_erasing(train_data, train_pretrained, train_finetuned,
                                                                   tmp_path):
    """The generators of drop path, mixup / cutmix and random erasing continue where they stopped."""
    args = train_finetune_args(train_data, tmp_path, f"--init_from={train_pretrained / 'ckpt.pt'}",
                               f"--test_list={train_data / 'val.txt'}")  # as the train_finetuned run
    train_run("finetune.py", *args, "--max_iters=2")
    train_run("finetune.py", *args, "--init_from=resume", "--num_workers=1")
    full, resumed = train_losses(train_finetuned[0]), train_losses(tmp_path)
    assert len(full) == 6 and sorted(resumed) == sorted(full)
    assert all(abs(resumed[it] - full[it]) <= 1e-6 for it in range(3, 7)), (full, resumed)
    results, results_full = (json.load(open(d / "results.json")) for d in (tmp_path, train_finetuned[0]))
    assert results.pop("wall_time_s") > 0 and results_full.pop("wall_time_s") > 0
    assert results == results_full


def test_crash_while_writing_a_checkpoint_leaves_the_last_one_loadable(train_data, tmp_path):
    patch = """import io, itertools, os, torch
_saves, _save = itertools.count(1), torch.save
def _dying_save(obj, path):  # the 2nd checkpoint: half the bytes reach the disk, then the process dies
    if next(_saves) != 2:
        return _save(obj, path)
    buffer = io.BytesIO()
    _save(obj, buffer)
    open(path, "wb").write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    os._exit(13)
torch.save = _dying_save
"""
    done = train_run_patched("pretrain.py", patch, *train_pretrain_args(train_data, tmp_path, "--ckpt_every=2",
                                                                        "--vis_clips=0"))
    assert done.returncode == 13
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    torn = [f for f in os.listdir(tmp_path) if f.startswith(".ckpt.pt.") and f.endswith(".tmp")]
    assert len(torn) == 1 and os.path.getsize(tmp_path / torn[0]) < os.path.getsize(tmp_path / "ckpt.pt")


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(train_data, tmp_path):
    args = train_pretrain_args(train_data, tmp_path, "--ckpt_every=2", "--model_args.norm_pix_loss=False")
    done = train_run_patched("pretrain.py", PATCH_LOSS.format(at=3, fault="loss * float('nan')"), *args)
    assert done.returncode == 3
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "non-finite loss (nan) at iteration 3" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert max(train_losses(tmp_path)) == 2
    # the reconstruction video is named for how it was de-normalised
    assert os.path.isfile(tmp_path / "recon_iter0000002_plain.mp4")


def test_a_new_run_starts_an_empty_log_even_after_a_run_killed_mid_line(tmp_path):
    (tmp_path / "log.jsonl").write_text(json.dumps({"iter": 5, "loss": 1.0}) + '\n{"iter": 10, "lo')
    c, d = argparse.Namespace(out_dir=str(tmp_path), seed=0), pretrain.Dist(False, 0, 0, 1, torch.device("cpu"), True,
                                                                             torch.float32)
    assert pretrain.restore(None, None, None, None, c, d, 1) == 0
    assert (tmp_path / "log.jsonl").read_text() == ""


def test_checkpoint_holds_everything_to_rebuild_and_resume(train_pretrained):
    ckpt = torch.load(train_pretrained / "ckpt.pt", weights_only=True)
    assert set(ckpt) == {"model", "optimizer", "scaler", "config", "model_config", "iter_num", "rng",
                         "train_videos"}
    assert ckpt["iter_num"] == 9 and ckpt["model_config"]["embed_dim"] == 32
    assert set(ckpt["rng"][0]) == {"torch", "cuda"}  # the training process's generators: drop path


def test_reconstruction_video_shows_three_panels(train_pretrained):
    path = train_pretrained / "recon_iter0000009_denorm-with-true-patch-stats.mp4"
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8
    h, w, _ = frames[0].shape
    assert w == 3 * h // 2  # 2 clips stacked, 3 panels side by side, square clips
    # the masked-input panel is grey where masked: 12 of 16 positions
    middle = frames[0][: h // 2, w // 3: 2 * w // 3].astype(int)
    assert np.mean(np.abs(middle - 128) < 6) > 0.6


def test_finetuning_from_pretraining_loads_every_encoder_tensor(train_pretrained, train_finetuned):
    state = torch.load(train_pretrained / "ckpt.pt", weights_only=True)["model"]
    n_encoder = sum(k.startswith("encoder.") for k in state)
    out, stdout = train_finetuned
    assert f"loaded {n_encoder}/{n_encoder} encoder tensors" in stdout and "NOT loaded" not in stdout


def test_shared_val_and_test_lists_are_reported_loudly(train_finetuned):
    out, stdout = train_finetuned
    assert "WARNING: val_list and test_list hold the same videos" in stdout
    results = json.load(open(out / "results.json"))
    assert results["val_test_overlap"] and results["test_last"] and results["last_epoch"] == 2
    predictions = {f for f in os.listdir(out) if f.endswith(".csv")}
    assert {"val_predictions.csv", "test_predictions.csv"} <= predictions


def test_predict_prints_probabilities_that_sum_to_one_and_three_processes_print_the_same(train_data, train_finetuned):
    """Two videos on three processes: one rank evaluates nothing, and batch_size (16) is not checked."""
    out, _ = train_finetuned
    videos = [train_data / "videos" / "v00.mp4", train_data / "videos" / "v04.mp4"]
    args = [f"--ckpt={out / 'best.pt'}", "--device=cpu", *[f"--predict={v}" for v in videos]]
    lines = train_run("finetune.py", *args).stdout.strip().splitlines()
    assert len(lines) == 2 and train_run("finetune.py", *args, nproc=3).stdout.strip().splitlines() == lines
    for line, video in zip(lines, videos):
        name, rest = line.split(": ", 1)
        assert name == str(video)
        cells = rest.split("  -> ")[0].split()
        probs = dict(zip(cells[::2], map(float, cells[1::2])))
        assert list(probs) == ["right", "down", "still"]
        assert abs(sum(probs.values()) - 1) < 1e-3 and all(0 <= p <= 1 for p in probs.values())


def test_features_of_every_checkpoint_kind_are_the_embedding_averaged_over_views(train_data, train_pretrained,
                                                                                  train_finetuned, tmp_path):
    """--extract: one float32 row per list line, in list order (a path alone is a line), equal to the encoder's
    embedding averaged over the evaluation views; three processes on two videos give the same rows."""
    paths = [f"{train_data}/videos/v{i:02d}.mp4" for i in (5, 0, 7, 3, 11)]
    (tmp_path / "list.txt").write_text("".join(p + (" 1\n" if i % 2 else "\n") for i, p in enumerate(paths)))
    release = SVFAPClassifier(build_train_cfg(), 3)
    torch.save({"model": release_layout(release, pretraining=False)}, tmp_path / "release.pt")
    kinds = {"pretrain": (train_pretrained / "ckpt.pt", "tokens"), "finetune": (train_finetuned[0] / "best.pt", "fc_norm"),
             "release": (tmp_path / "release.pt", "fc_norm")}
    views = D.VideoDataset(tmp_path / "list.txt", "eval", img_size=32, num_frames=8, sampling_rate=1, num_clips=2,
                           num_crops=1)
    video = D.device_transform(torch.stack([views[i][0] for i in range(5)]), None, 32).flatten(0, 1)  # (10, 3, T, S, S)
    for kind, (ckpt, pooled) in kinds.items():
        args = [*TRAIN_MODEL_ARGS, *TRAIN_COMMON, "--num_clips=2", "--num_crops=1", f"--extract={tmp_path / 'list.txt'}",
                f"--ckpt={ckpt}", f"--out_dir={tmp_path / kind}"]
        train_run("finetune.py", *args)
        features = np.load(tmp_path / kind / "features.npy")
        rows = open(tmp_path / kind / "features.csv").read().splitlines()
        assert features.dtype == np.float32 and features.shape == (5, 32), kind
        assert rows == ["row,path"] + [f"{i},{p}" for i, p in enumerate(paths)]
        model = SVFAPClassifier(build_train_cfg(), 3)
        state = torch.load(ckpt, weights_only=True)["model"]
        if kind == "release":
            M.load_official_state_dict(model, state)
        else:
            model.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
            model.fc_norm.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("fc_norm.")}, strict=False)
        with torch.no_grad():
            after_norm, tokens = model.eval().embed(video)
        want = (after_norm if pooled == "fc_norm" else tokens.mean(1)).view(5, 2, -1).mean(1)
        np.testing.assert_allclose(features, want.numpy(), atol=1e-5, err_msg=kind)
        if kind == "pretrain":  # three processes, two videos: one rank has none
            (tmp_path / "two.txt").write_text("".join(p + "\n" for p in paths[:2]))
            args[-3] = f"--extract={tmp_path / 'two.txt'}"
            train_run("finetune.py", *args, f"--out_dir={tmp_path / 'ddp'}", nproc=3)
            np.testing.assert_allclose(np.load(tmp_path / "ddp" / "features.npy"), features[:2], atol=1e-6)
            assert open(tmp_path / "ddp" / "features.csv").read().splitlines() == rows[:3]


def train_two_nodes(script, *args, cwds):
    """The README's two-node command on this machine: two torchrun agents on 127.0.0.1, one process each, each in
    its own working directory (as two machines would have their own disks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
                                "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                os.path.join(TRAIN_REPO, script), *map(str, args)], cwd=cwd, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
              for node, cwd in enumerate(cwds)]
    for agent in agents:
        out, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, (out[-3000:], err[-3000:])


def test_two_processes_on_one_node_or_two_train_and_evaluate_like_one(train_data, tmp_path):
    """torchrun x 2 (gloo): pre-train, fine-tune; its test scores equal a single-process evaluation of the
    same checkpoint (5 test videos: shards of 3 and 2, nothing padded, nothing dropped). Two nodes of one process
    each pre-train with the same losses, and only global rank 0 writes files."""
    train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path / "pre", "--epochs=1", "--vis_clips=0"), nproc=2)
    assert len(train_losses(tmp_path / "pre")) == 3
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        os.makedirs(node)
    train_two_nodes("pretrain.py", *train_pretrain_args(train_data, "out", "--epochs=1", "--vis_clips=0"), cwds=nodes)
    assert train_losses(nodes[0] / "out") == pytest.approx(train_losses(tmp_path / "pre"), abs=1e-6)
    assert os.path.isfile(nodes[0] / "out" / "ckpt.pt")
    assert [f for _, _, files in os.walk(nodes[1]) for f in files] == []  # node 1 wrote nothing
    done = train_run("finetune.py", *train_finetune_args(train_data, tmp_path / "ft", "--epochs=1",
                                                         f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}"), nproc=2)
    loaded = re.search(r"loaded (\d+)/(\d+) encoder tensors", done.stdout)
    assert loaded and loaded[1] == loaded[2] and "NOT loaded" not in done.stdout
    train_run("finetune.py", *train_finetune_args(train_data, tmp_path / "one", "--eval_only=True",
                                                  f"--ckpt={tmp_path / 'ft' / 'best.pt'}", "--eval_batch_size=3"))
    import metrics
    ddp = metrics.read_predictions(tmp_path / "ft" / "test_predictions.csv")
    one = metrics.read_predictions(tmp_path / "one" / "eval_test_predictions.csv")
    assert len(ddp.ids) == 5 and ddp.ids == one.ids and (ddp.targets == one.targets).all()
    np.testing.assert_allclose(ddp.scores, one.scores, atol=1e-6)
    ddp_metrics = json.load(open(tmp_path / "ft" / "results.json"))["test"]
    one_metrics = json.load(open(tmp_path / "one" / "results_eval.json"))["test"]
    assert ddp_metrics == one_metrics


def test_bad_inputs_each_give_one_clear_line(train_data, tmp_path, capsys, monkeypatch):
    base = [*TRAIN_MODEL_ARGS, *TRAIN_COMMON, f"--out_dir={tmp_path}"]
    good_list = f"--train_list={train_data / 'pretrain.txt'}"
    # one as users meet it: a subprocess, stopped when the data is opened
    done = train_run("pretrain.py", *base, f"--train_list={train_data / 'empty.txt'}", check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("pretrain.py: error: train_list: ") and "holds no" in lines[0]
    cases = {  # name: (arguments, extra environment, words the one line must hold)
        "missing list": ([*base, "--train_list=no/such/list.txt"], {},
                         "train_list=no/such/list.txt: annotation file not found"),
        "unknown preset": ([*base, good_list, "--model=huge"], {}, "model='huge' is not a preset"),
        "batch vs world size": ([*base, good_list, "--batch_size=3"], {"RANK": "0", "WORLD_SIZE": "2"},
                                "batch_size=3 must be a positive multiple of world_size"),
        "unknown key": ([*base, good_list, "--batchsize=4"], {},
                        "unknown config key 'batchsize'; did you mean batch_size?"),
        "wrong type": ([*base, good_list, "--epochs=1.5"], {}, "epochs must be an integer, got 1.5"),
        "unknown model field": ([*base, good_list, "--model_args.depth=2"], {}, "unknown config key 'depth'"),
        "missing resume": ([*base, good_list, "--init_from=resume"], {}, "init_from=resume continues from"),
        "init_from a path": ([*base, good_list, "--init_from=ckpt.pt"], {}, "init_from='ckpt.pt': valid values are"),
        "compile mode": ([*base, good_list, "--compile_mode=fast"], {},
                         "compile_mode='fast': valid values are default, reduce-overhead, max-autotune-no-cudagraphs"),
    }
    # the rest in this process, through the same entry point: they stop before any process group or seed
    for name, (args, env, words) in cases.items():
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            with pytest.raises(SystemExit) as stop:
                pretrain.run(pretrain.main, args, "pretrain.py")
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(lines) == 1, (name, err)
        assert lines[0].startswith("pretrain.py: error: ") and words in lines[0], (name, lines[0])


def test_settings_that_would_fail_late_stop_at_start_up_in_one_line(train_data, train_pretrained, train_finetuned,
                                                                     tmp_path, capsys, monkeypatch):
    """A /dev/shm too small for the loaders' batches, a resume with another batch_size or list length, a video_group
    that does not compile or match, a --fold that no path uses: each stops before the first step, in one line."""
    os.makedirs(tmp_path / "resumed")
    os.makedirs(tmp_path / "my clip")  # a folder of frames, as --explain takes one
    shutil.copy(train_pretrained / "ckpt.pt", tmp_path / "resumed" / "ckpt.pt")
    os.makedirs(tmp_path / "ft_done")  # a finished fine-tuning run, its command given again: it continues, not restarts
    shutil.copy(train_finetuned[0] / "ckpt.pt", tmp_path / "ft_done" / "ckpt.pt")
    pre = [*train_pretrain_args(train_data, tmp_path / "pre"), "--vis_clips=0"]
    fine = train_finetune_args(train_data, tmp_path / "ft")
    tiny_shm = lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5)  # 0.1 MB free
    cases = {  # name: (script, arguments, shared memory, the one line's words)
        "shared memory": (pretrain, [*pre, "--num_workers=2"], tiny_shm,
                          "the data loaders need 1 process(es) x 2 workers x 2 batches x 0.1 MB = 0.4 MB in /dev/shm, "
                          "which has 0.1 MB free: enlarge it (docker run --shm-size=1g) or lower num_workers"),
        "resume batch": (pretrain, [*train_pretrain_args(train_data, tmp_path / "resumed"), "--init_from=resume",
                                    "--batch_size=8"], None,
                         f"init_from=resume: batch_size=8, but {tmp_path / 'resumed'}/ckpt.pt was trained with "
                         f"batch_size=4, which fixes its model, data order and lr schedule: resume with "
                         f"batch_size=4, or start afresh in another out_dir"),
        "resume model": (pretrain, [*train_pretrain_args(train_data, tmp_path / "resumed"), "--init_from=resume",
                                    "--model=small"], None, "init_from=resume: model=small, but"),
        "resume done": (pretrain, [*train_pretrain_args(train_data, tmp_path / "resumed"), "--init_from=resume",
                                   "--max_iters=1"], None, "ckpt.pt is at iteration"),
        "auto finetune": (finetune, [*fine, "--init_from=auto"], None,
                          f"init_from=auto: {tmp_path / 'ft'}/ckpt.pt does not exist yet; start with init_from="),
        "log interval": (pretrain, [*pre, "--log_interval=0"], None, "log_interval=0 must be at least 1"),
        "finetune continues": (finetune, train_finetune_args(train_data, tmp_path / "ft_done", f"--init_from="
                                                             f"{train_pretrained / 'ckpt.pt'}", f"--test_list="
                                                             f"{train_data / 'val.txt'}"), None,
                               f"{tmp_path / 'ft_done'}/ckpt.pt is at iteration"),
        "resume list": (pretrain, [*train_pretrain_args(train_data, tmp_path / "resumed"), "--init_from=resume",
                                   f"--train_list={train_data / 'val.txt'}"], None,
                        "init_from=resume: train_videos=6, but"),
        "bad regex": (finetune, [*fine, "--video_group=(v"], None,
                      f"val_list={train_data / 'val.txt'}: video_group='(v' is not a regular expression: missing ), unterminated "
                          f"subpattern"),
        "no match": (finetune, [*fine, "--video_group=clip_(\\d+)"], None,
                     "video_group='clip_(\\\\d+)' does not match the clip"),
        "useless fold": (finetune, [*fine, "--fold=2"], None,
                         "--fold=2, but no path of the config holds {fold} (out_dir, train_list, val_list, test_list)"),
        "no video": (finetune, [*fine, "--predict=no.mp4", f"--ckpt={train_finetuned[0] / 'ckpt.pt'}"], None,
                     "--predict=no.mp4: file not found"),
        "a space": (finetune, [*fine, f"--explain={tmp_path / 'my clip'}", f"--ckpt={train_finetuned[0] / 'ckpt.pt'}"],
                    None,
                    f"--explain={tmp_path / 'my clip'}: paths with spaces are not supported; rename or link the file"),
    }
    for name, (script, args, disk_usage, words) in cases.items():
        with monkeypatch.context() as m:
            if disk_usage:
                m.setattr(shutil, "disk_usage", disk_usage)
            with pytest.raises(SystemExit) as stop:
                script.run(script.main, args, "x.py")
        lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not progress bars
        assert stop.value.code == 2 and len(lines) == 1, (name, lines)
        assert lines[0].startswith("x.py: error: ") and words in lines[0], (name, lines[0])
    assert not os.path.exists(tmp_path / "pre" / "log.jsonl") and not os.path.exists(tmp_path / "ft" / "log.jsonl")


def test_init_from_auto_starts_then_resumes_a_killed_run_with_its_losses(train_data, train_pretrained, tmp_path):
    """One command for the first start and every restart: killed in iteration 5 (checkpoint at 4) and again in
    the middle of writing a log line, the run resumes and gives the uninterrupted run's losses."""
    args = train_pretrain_args(train_data, tmp_path, "--ckpt_every=2", "--init_from=auto")
    done = train_run_patched("pretrain.py", PATCH_LOSS.format(at=5, fault="__import__('os')._exit(137)"), *args)
    assert done.returncode == 137 and f"init_from=auto: starting afresh, no {tmp_path / 'ckpt.pt'}" in done.stdout
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"iter": 5, "lo')  # a kill while appending
    done = train_run("pretrain.py", *args)
    assert f"init_from=auto: resuming from {tmp_path / 'ckpt.pt'}" in done.stdout
    full, resumed = train_losses(train_pretrained), train_losses(tmp_path)
    assert sorted(resumed) == list(range(1, 10))
    for it in range(5, 10):
        assert abs(resumed[it] - full[it]) <= 1e-6, (it, resumed[it], full[it])


PATCH_OPENS = """import data, sys
_open = data.open_video
def _open_logged(path):  # the files the readability check opens (evaluation's reads are not logged)
    if sys._getframe(1).f_code.co_name == "unreadable":
        with open({log!r}, "a") as f:
            f.write(path + "\\n")
    return _open(path)
data.open_video = _open_logged
"""


def test_two_processes_check_each_evaluation_file_once_and_say_what_is_broken_once(train_data, train_finetuned,
                                                                                   tmp_path):
    broken, test_list = tmp_path / "broken.mp4", tmp_path / "test.txt"
    broken.write_bytes(b"not a video" * 100)
    test_list.write_text(open(train_data / "test.txt").read().replace("videos/", f"{train_data}/videos/")
                         + f"{broken} 1\n")
    args = train_finetune_args(train_data, tmp_path / "eval", "--eval_only=True", f"--test_list={test_list}",
                               f"--ckpt={train_finetuned[0] / 'best.pt'}")
    done = train_run_patched("finetune.py", PATCH_OPENS.format(log=str(tmp_path / "opens.txt")), *args, nproc=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("finetune.py: error")]
    assert done.returncode != 0 and len(errors) == 1, done.stderr[-3000:]
    assert "test_list" in errors[0] and "1 of 6 entries cannot be read" in errors[0]
    assert f"line 6: {broken}" in errors[0]
    lists = [D.AnnotationList(train_data / f"{name}.txt") for name in ("val", "test")]
    listed = [a.path(i) for a in lists for i in range(len(a))]
    assert sorted(open(tmp_path / "opens.txt").read().split()) == sorted(listed + [str(broken)])


PATCH_RANK_1 = """import data, os
_init = data.VideoDataset.__init__
def _init_rank_1(self, *args, **kwargs):
    if os.environ["RANK"] == "1":
        raise ValueError("rank 1 cannot read it")
    _init(self, *args, **kwargs)
data.VideoDataset.__init__ = _init_rank_1
"""


def test_an_error_on_rank_1_alone_is_printed(train_data, tmp_path):
    done = train_run_patched("pretrain.py", PATCH_RANK_1, *train_pretrain_args(train_data, tmp_path), nproc=2)
    errors = [line for line in done.stderr.splitlines() if line.startswith("pretrain.py: error")]
    assert done.returncode != 0 and errors == ["pretrain.py: error: rank 1: train_list: rank 1 cannot read it"], \
        done.stderr[-3000:]


def test_float16_overflow_is_skipped_by_the_scaler_and_training_goes_on(train_data, tmp_path):
    args = train_pretrain_args(train_data, tmp_path, "--dtype=float16", "--vis_clips=0")
    done = train_run_patched("pretrain.py", PATCH_LOSS.format(at=3, fault="_InfGrad.apply(loss)"), *args)
    assert done.returncode == 0, done.stderr[-2000:]
    log = [r for r in train_log(tmp_path) if "loss" in r]
    assert [r["iter"] for r in log] == list(range(1, 10)) and all(math.isfinite(r["loss"]) for r in log)
    assert [r["skipped_steps"] for r in log] == [0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert "1 step(s) skipped by the float16 gradient scaler" in done.stdout + done.stderr
    # a loss that stays non-finite does stop the run, after 5 steps in a row
    done = train_run_patched("pretrain.py", PATCH_LOSS.replace("== {at}", ">= {at}").format(
        at=3, fault="loss * float('nan')"), *train_pretrain_args(train_data, tmp_path / "nan", "--dtype=float16"))
    assert done.returncode == 3 and "non-finite loss (nan) for 5 steps in a row at iteration 7 (epoch 3)" in done.stderr


def test_bfloat16_autocast_on_the_cpu_lowers_the_loss_and_logs_mfu(train_data, tmp_path):
    train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path, "--dtype=bfloat16", "--vis_clips=0",
                                                  "--peak_tflops=1"))
    log = [r for r in train_log(tmp_path) if "loss" in r]
    assert log[-1]["loss"] < log[0]["loss"]
    assert all(0 < r["mfu"] < 1 for r in log)  # MFU against the given peak, from the interval's time
    saves = [r for r in train_log(tmp_path) if "save_s" in r]
    assert [r["iter"] for r in saves] == [3, 6, 9]  # checkpoint time is logged on its own


def test_compiled_training_gives_the_eager_losses_alone_and_under_ddp(train_data, train_pretrained, tmp_path):
    """DDP wraps the model first, then torch.compile; inductor draws drop path's random numbers like eager
    (fallback_random), so the compiled and eager runs see the same randomness."""
    patch = "import torch._inductor.config\ntorch._inductor.config.fallback_random = True"
    eager = train_losses(train_pretrained)
    done = train_run_patched("pretrain.py", patch, *train_pretrain_args(train_data, tmp_path / "one", "--compile=True",
                                                                        "--max_iters=2", "--vis_clips=0"))
    assert done.returncode == 0, done.stderr[-2000:]
    compiled = train_losses(tmp_path / "one")
    assert compiled.keys() == {1, 2} and all(abs(compiled[i] - eager[i]) < 1e-4 for i in compiled), (compiled, eager)
    args = train_finetune_args(train_data, tmp_path / "ft", "--max_iters=2", "--epochs=1",
                               f"--init_from={train_pretrained / 'ckpt.pt'}")
    train_run("finetune.py", *args, nproc=2)
    done = train_run_patched("finetune.py", patch, *args, f"--out_dir={tmp_path / 'ft_compiled'}", "--compile=True",
                             nproc=2)
    assert done.returncode == 0, done.stderr[-2000:]
    eager, compiled = train_losses(tmp_path / "ft"), train_losses(tmp_path / "ft_compiled")
    assert compiled.keys() == {1, 2} and all(abs(compiled[i] - eager[i]) < 1e-4 for i in compiled), (compiled, eager)


@pytest.mark.parametrize("script", ["pretrain", "finetune"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_training_steps_read_nothing_back_from_the_device_between_logging_steps(train_data, tmp_path, monkeypatch,
                                                                                script, dtype):
    """No device-to-host read in a training step (the non-finite check too waits for the logging step): DeviceReads
    between the starts of two iterations. Data loading runs in a worker process, and F.one_hot's own range check
    on the CPU (CUDA's kernel checks on the device) is not counted."""
    at_iteration, reads, lr_at, one_hot = [], DeviceReads(), pretrain.lr_at, F.one_hot
    monkeypatch.setattr(pretrain, "lr_at", lambda it, *a: at_iteration.append(len(reads.reads)) or lr_at(it, *a))

    def one_hot_unread(*args):
        n, out = len(reads.reads), one_hot(*args)
        del reads.reads[n:]
        return out
    monkeypatch.setattr(F, "one_hot", one_hot_unread)
    args = (train_pretrain_args if script == "pretrain" else train_finetune_args)(
        train_data, tmp_path, "--vis_clips=0" if script == "pretrain" else "--init_from=scratch", "--log_interval=5",
        "--num_workers=1", "--batch_size=2", "--max_iters=6", f"--dtype={dtype}")  # 6 iterations per epoch
    with reads:
        (pretrain if script == "pretrain" else finetune).main(args)
    per_iteration = np.diff(at_iteration)  # iterations 1..5 (the 6th ends the run)
    assert list(per_iteration[:4]) == [0] * 4, (per_iteration, reads.reads)  # the old bool() check made it 1 each
    assert [r["iter"] for r in train_log(tmp_path) if "loss" in r] == [5, 6]  # read there (.tolist(): not counted)


def test_a_nan_is_skipped_on_the_device_and_stops_the_run_at_the_next_read_naming_its_iteration(train_data, tmp_path,
                                                                                                monkeypatch):
    """NaN losses from iteration 4 on; a log line every 5 iterations, a checkpoint at each epoch's end (3 iterations).
    The run stops at iteration 5 naming iteration 4; the parameters are those of iteration 3's checkpoint, taken before
    step 4's update (steps 4 and 5 were skipped on the device); nothing was written after iteration 3."""
    calls, forward_loss, models = iter(range(1, 100)), M.SVFAP.forward_loss, []
    monkeypatch.setattr(M.SVFAP, "forward_loss", lambda self, *a: forward_loss(self, *a) * (
        float("nan") if self.training and next(calls) >= 4 else 1.0))
    monkeypatch.setattr(pretrain, "SVFAP", lambda mc: models.append(M.SVFAP(mc)) or models[-1])
    with pytest.raises(pretrain.NonFiniteLoss, match=r"^non-finite loss \(nan\) at iteration 4 \(epoch 2\); stopped "
                                                     r"without saving: the last good checkpoint .*ckpt.pt \(iteration 3\)"):
        pretrain.main(train_pretrain_args(train_data, tmp_path, "--log_interval=5", "--vis_clips=0"))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 3 and next(calls) == 6  # 5 training forwards ran
    for key, value in models[0].state_dict().items():
        assert torch.equal(value, ckpt["model"][key]), key
    assert [r["iter"] for r in train_log(tmp_path)] == [3]  # the checkpoint's line; no loss was logged
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


PATCH_TRAINING_MODE = """import atexit, model, torch
_modes = []
for _cls in (model.SVFAP, model.SVFAPClassifier):
    def _forward(self, *a, _orig=_cls.forward):
        if torch.is_grad_enabled():  # a training step (evaluation, reconstructions and MAC counting run without)
            _modes.append(self.training)
        return _orig(self, *a)
    _cls.forward = _forward
atexit.register(lambda: print(f"training forwards: {_modes.count(True)} in training mode, {_modes.count(False)} not"))
"""


def test_every_training_forward_runs_in_training_mode_whatever_ran_before(train_data, tmp_path):
    """With a known peak, fit counts MACs (in eval mode) before the loop: one process, and two under DDP (gloo)."""
    done = train_run_patched("pretrain.py", PATCH_TRAINING_MODE, *train_pretrain_args(
        train_data, tmp_path / "pre", "--epochs=1", "--peak_tflops=1"))
    assert done.returncode == 0 and "training forwards: 3 in training mode, 0 not" in done.stdout, done.stdout
    done = train_run_patched("finetune.py", PATCH_TRAINING_MODE, *train_finetune_args(
        train_data, tmp_path / "ft", "--epochs=1", "--peak_tflops=1"), nproc=2)
    assert done.returncode == 0 and done.stdout.count("training forwards: 3 in training mode, 0 not") == 2, done.stdout


def test_one_loader_serves_the_run_and_each_epoch_draws_new_crops_and_masks(train_data, tmp_path, monkeypatch):
    """3 epochs with 2 workers: the workers start once, and each batch holds the items of (seed, epoch, index) as
    the dataset gives them in this process, in DistributedSampler's order of (seed, epoch): the epoch reaches the
    workers with each index. Every video draws another crop and mask each epoch."""
    from torch.utils.data import DistributedSampler, dataloader
    starts, seen, datasets = [], [], []
    start, fetch, make_dataset = dataloader._MultiProcessingDataLoaderIter.__init__, pretrain.Interval.fetch, \
        pretrain.make_dataset
    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__",
                        lambda self, loader: starts.append(loader.num_workers) or start(self, loader))
    monkeypatch.setattr(pretrain.Interval, "fetch", lambda self, batches: seen.append(fetch(self, batches)) or seen[-1])
    monkeypatch.setattr(pretrain, "make_dataset", lambda *a, **k: datasets.append(make_dataset(*a, **k)) or datasets[-1])
    pretrain.main(train_pretrain_args(train_data, tmp_path, "--num_workers=2", "--vis_clips=0"))
    assert starts == [2] and len(seen) == 10 and seen[-1] is None  # 9 batches, then the end
    ds = datasets[0]
    for epoch in range(3):
        sampler = DistributedSampler(ds, 1, 0, shuffle=True, seed=0, drop_last=True)
        sampler.set_epoch(epoch)
        order = list(sampler)
        for it in range(3):
            items = [ds[(epoch, i)] for i in order[4 * it: 4 * it + 4]]
            for got, want in zip(seen[3 * epoch + it], zip(*items)):
                assert torch.equal(got, torch.stack(want)), (epoch, it)
    for epoch in (1, 2):  # a box may repeat (scale 1 without a flip is one box), a video's mask does not here
        items, last = ([ds[(e, i)] for i in range(len(ds))] for e in (epoch, epoch - 1))
        assert not any(torch.equal(item[2], before[2]) for item, before in zip(items, last)), epoch
        assert not torch.equal(torch.stack([item[1] for item in items]), torch.stack([item[1] for item in last]))


def test_a_cuda_batch_is_copied_on_a_side_stream_that_the_compute_stream_waits_for_where_it_is_used(monkeypatch):
    """Interval.fetch and ready's CUDA branch with stand-ins for streams, in order: the copies are issued on the side
    stream without blocking; ready() makes the compute stream wait for it and records each tensor's use there."""
    events = []

    class Stream:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            events.append(f"{self.name} waits for {other.name}")
    side, compute = Stream("side"), Stream("compute")
    current = [compute]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        yield
        current.pop()
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.Tensor, "to", lambda self, device, non_blocking=False: events.append(
        f"copy on {current[-1].name}, non_blocking={non_blocking}") or self.clone())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: events.append(f"used on {s.name}"))
    log = pretrain.Interval(pretrain.Dist(False, 0, 0, 1, torch.device("cpu"), True, torch.float32), 4, 0)
    log.stream = side  # what a CUDA device gets
    batch = log.fetch(iter([[torch.zeros(2), torch.ones(3)]]))
    assert events == ["copy on side, non_blocking=True"] * 2 and torch.equal(batch[1], torch.ones(3))
    log.ready()
    assert events[2:] == ["compute waits for side", "used on compute", "used on compute"]


def test_finetuning_evaluates_and_checkpoints_at_its_cadence_and_best_holds_no_optimiser(train_data, tmp_path):
    """3 epochs of 3 iterations, eval_every=2, ckpt_every_epochs=2: val after epochs 2 and 3 (the last), checkpoints
    at iterations 6 and 9 (the end); best.pt holds the weights and the config only."""
    train_run("finetune.py", *train_finetune_args(train_data, tmp_path, "--epochs=3", "--eval_every=2",
                                                  "--ckpt_every_epochs=2", "--log_interval=3"))
    log = train_log(tmp_path)
    assert [r["epoch"] for r in log if "val" in r] == [2, 3]
    assert [r["iter"] for r in log if "save_s" in r] == [6, 9]
    assert sorted(torch.load(tmp_path / "best.pt", weights_only=True)) == ["best", "config", "model", "model_config"]


def test_a_broken_evaluation_video_stops_finetuning_before_the_first_step(train_data, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video" * 100)
    test_list = tmp_path / "test.txt"
    test_list.write_text(open(train_data / "test.txt").read().replace("videos/", f"{train_data}/videos/")
                         + f"{broken} 1\n")
    done = train_run("finetune.py", *train_finetune_args(train_data, tmp_path / "ft", f"--test_list={test_list}"),
                     check=False)
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "test_list" in lines[0] and "1 of 6 entries cannot be read" in lines[0] and f"line 6: {broken}" in lines[0]
    assert not os.path.exists(tmp_path / "ft" / "log.jsonl")  # no step was taken


def test_a_broken_first_training_video_does_not_stop_pretraining(train_data, tmp_path):
    train_list = tmp_path / "pretrain.txt"
    (tmp_path / "broken.mp4").write_bytes(b"")
    train_list.write_text("broken.mp4 0\n" + open(train_data / "pretrain.txt").read().replace(
        "videos/", f"{train_data}/videos/"))
    done = train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path / "out", f"--train_list={train_list}",
                                                         "--vis_list=", "--epochs=1", "--max_fail_fraction=0.5"))
    assert "reconstruction video: skipping an unreadable clip" in done.stdout and "broken.mp4" in done.stdout
    assert os.path.isfile(tmp_path / "out" / "recon_iter0000003_denorm-with-true-patch-stats.mp4")


def test_a_video_the_crop_box_does_not_fit_is_skipped_and_counted_and_one_that_fits_no_file_stops_at_once(train_data,
                                                                                                             tmp_path):
    small = tmp_path / "small.mp4"  # 16x16 among the 32x32 videos
    train_write_video(str(small), 0, seed=99, size=16)
    rows = open(train_data / "train.txt").read().replace("videos/", f"{train_data}/videos/").splitlines()
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{r}\n" for r in rows[:5] + [f"{small} 1"] + rows[6:]))  # 12: every one is drawn
    warning = f"skipping unreadable sample: {small}: crop_box (top, bottom, left, right)=(0, 32, 0, 32) does not fit its 16x16"
    common = [f"--train_list={listing}", "--epochs=1", "--crop_box=(0, 32, 0, 32)"]
    for script, args in (("pretrain.py", train_pretrain_args(train_data, tmp_path / "pre", *common, "--vis_clips=0")),
                         ("finetune.py", train_finetune_args(train_data, tmp_path / "ft", *common))):
        assert warning in train_run(script, *args).stderr  # and the run goes on to its end
        done = train_run(script, *args, "--max_fail_fraction=0.0", "--out_dir=" + str(tmp_path / "strict"), check=False)
        lines = [line for line in done.stderr.splitlines() if "error" in line]
        assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert re.search(rf"1 of the \d+ files tried from {listing} were unreadable, more than max_fail_fraction=0.0",
                         lines[0])
    done = train_run("finetune.py", *train_finetune_args(train_data, tmp_path / "none", *common, "--crop_box=(0, 64, 0, 64)"),
                     check=False)
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"train_list={listing}: none of its first 10 entries can be read, so training would only skip files; " \
           f"line 1: {train_data}/videos/v00.mp4: crop_box (top, bottom, left, right)=(0, 64, 0, 64) does not fit its " \
           f"32x32 frames" in lines[0]
    assert not os.path.exists(tmp_path / "none" / "log.jsonl")  # no step was taken


class BrokenEveryKth(D.VideoDataset):
    """Reads nothing: the entries whose path ends in "broken" raise as an unreadable file does, the rest give a tiny item."""

    def _training_item(self, index, g):
        if self.path(index).endswith("broken"):
            raise D.VideoReadError(f"{self.path(index)}: broken")
        return torch.zeros(1), torch.zeros(5), self.target(index)


@pytest.mark.parametrize("every, stops", [(50, False), (5, True)])
def test_the_broken_file_rule_counts_in_the_main_process_whatever_the_worker_count(tmp_path, every, stops):
    """2% broken files never stop a run at the default max_fail_fraction 5%, 20% stop it within a few hundred items;
    1, 2 and 4 workers count the same files, as the items (and the stand-ins of broken files) depend on no worker."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"clip{i}{'broken' if i % every == 0 else ''} 0\n" for i in range(2000)))
    counts = []
    for workers in (1, 2, 4):
        ds, seen = BrokenEveryKth(listing, "train", num_outputs=1), [0, 0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skips, and torch's advice against 4 workers on 2 cores
            loader = torch.utils.data.DataLoader(ds, batch_size=10, num_workers=workers)
            try:
                batches = list(pretrain.count_broken(loader, seen))
                assert not stops and len(batches) == 200 and [len(b) for b in batches[:1]] == [3]
            except pretrain.ConfigError as e:
                assert stops and str(e) == f"{seen[0]} of the {seen[1]} files tried from {listing} were unreadable, " \
                                           f"more than max_fail_fraction=0.05; check data_root and crop_box"
        counts.append(seen)
    assert counts[0] == counts[1] == counts[2], counts
    broken, tried = counts[0]
    # 20%: past 0.05 x 1000 = 50 broken files (the batch that crosses it) at about 250 tried; 2%: all 2000 items made
    assert (50 < broken and tried < 300) if stops else (0.01 < broken / tried < 0.03 and tried == 2000 + broken)


@pytest.mark.parametrize("task, labels, words", [
    ("classification", [1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3], ["line 3: label 3", "they look 1-based", "counts classes from 0"]),
    ("regression", [None, None, None, "0.5"] + [None] * 8, ["line 4", "0.5"]),
    ("regression", [None, None, "high"] + [None] * 9, ["line 3", "'high'"]),
])
def test_label_problems_end_the_run_with_one_line_naming_the_list_line(train_data, tmp_path, task, labels, words):
    rows = open(train_data / "train.txt").read().split("\n")[:12]
    rows = [f"{train_data}/{r.split()[0]} " + (f"{lab}" if lab is not None else "0.1 0.2") for r, lab in zip(rows, labels)]
    (tmp_path / "list.txt").write_text("\n".join(rows) + "\n")
    extra = ["--num_classes=3"] if task == "classification" else ["--task=regression", "--num_outputs=2"]
    done = train_run("finetune.py", *train_finetune_args(train_data, tmp_path, f"--train_list={tmp_path / 'list.txt'}",
                                                         "--val_list=", "--test_list=", *extra, "--class_names=()"),
                     check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "list.txt" in lines[0] and all(w in lines[0] for w in words), lines[0]


# --- the helpers, in-process -------------------------------------------------------------


def train_defaults(module):
    return {k: getattr(module, k) for k in module.CONFIG_KEYS}


def test_config_file_then_arguments_override_the_defaults(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("batch_size = 32\nepochs = 2 * 5\nmodel_args = dict(mask_ratio=0.75)\nbeta1, beta2 = 0.8, 0.9\n")
    c = pretrain.load_config(train_defaults(pretrain), [str(path), "--epochs=3", "--model_args.decoder_depth=2",
                                                        "--compile=true", "--out_dir=123", "--base_lr=1"])
    assert (c.batch_size, c.epochs, c.beta1, c.compile, c.out_dir) == (32, 3, 0.8, True, "123")
    assert c.model_args == {"mask_ratio": 0.75, "decoder_depth": 2} and c.base_lr == 1.0
    mc = pretrain.build_model_config("tiny", c.model_args)
    assert mc.mask_ratio == 0.75 and mc.decoder_depth == 2
    c = finetune.load_config(train_defaults(finetune), ["--predict=a.mp4", "--predict=b.mp4"])
    assert c.predict == ["a.mp4", "b.mp4"]
    path.write_text("batch_sise = 3\n")
    with pytest.raises(pretrain.ConfigError, match=r"cfg.py: unknown config key 'batch_sise'; did you mean batch_size"):
        pretrain.load_config(train_defaults(pretrain), [str(path)])
    with pytest.raises(pretrain.ConfigError, match="model_args.mask_ratio must be a number"):
        pretrain.build_model_config("tiny", {"mask_ratio": "high"})
    with pytest.raises(pretrain.ConfigError, match="SVFAPConfig.mask_ratio=1.0"):
        pretrain.build_model_config("tiny", {"mask_ratio": 1.0})


def test_every_preset_config_loads():
    for script, names in ((pretrain, ["pretrain_demo", "pretrain_voxceleb2_base", "pretrain_voxceleb2_small"]),
                          (finetune, ["finetune_demo", "finetune_dfew", "finetune_ferv39k", "finetune_mafw"])):
        for name in names:
            c = script.load_config(train_defaults(script), [os.path.join(TRAIN_REPO, "config", f"{name}.py")])
            pretrain.build_model_config(c.model, c.model_args)
    dfew = finetune.load_config(train_defaults(finetune), [os.path.join(TRAIN_REPO, "config", "finetune_dfew.py")])
    assert dfew.class_names == ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
    recipe = (dfew.base_lr, dfew.min_lr, dfew.layer_decay, dfew.model_args["drop_path"], dfew.mixup)
    assert recipe == (1e-3, 1e-6, 0.75, 0.1, 0.8)
    for size in ("base", "small"):  # the fast path: data.py prepare's list, its crop and frame rate already applied
        vox = pretrain.load_config(train_defaults(pretrain), [os.path.join(TRAIN_REPO, "config",
                                                                           f"pretrain_voxceleb2_{size}.py")])
        assert (vox.train_list, vox.crop_box, vox.sampling_rate, vox.init_from) == (
            "data/voxceleb2_prepared/pretrain.txt", (), 1, "auto")


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    lrs = [pretrain.lr_at(it, 1.0, 0.01, 10, 110) for it in range(110)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert lrs[10] == 1.0 and abs(lrs[60] - (0.01 + 0.99 * 0.5)) < 1e-12
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.01


def test_weight_decay_skips_norms_biases_and_the_mask_token_and_layers_decay():
    from model import SVFAP, SVFAPClassifier, CONFIGS
    model = SVFAP(CONFIGS["tiny"])
    groups = pretrain.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "mask_token" in no_decay and "encoder.stages.0.blocks.0.attn.q_bias" in no_decay
    assert all(p.ndim > 1 for g in groups if g["weight_decay"] for p in g["params"])
    clf = SVFAPClassifier(CONFIGS["tiny"], 6)
    groups = pretrain.param_groups(clf, 0.05, layer_decay=0.75)
    scale = {n: g["lr_scale"] for g in groups for n, p in clf.named_parameters() if any(p is q for q in g["params"])}
    top = clf.num_lr_layers - 1
    assert scale["head.weight"] == 1.0 and scale["encoder.patch_embed.proj.weight"] == 0.75 ** top
    assert sum(len(g["params"]) for g in groups) == len(list(clf.parameters()))


def test_mixup_and_cutmix_keep_targets_a_distribution_and_commute_with_label_smoothing():
    """The release (timm) mixes label-smoothed targets; finetune.py mixes one-hot ones and lets cross_entropy smooth
    them: the same loss, since both steps are linear and keep sums of 1."""
    torch.manual_seed(0)
    video, logits, one_hot = torch.randn(4, 3, 8, 32, 32), torch.randn(4, 3), F.one_hot(torch.tensor([0, 1, 2, 1]), 3)
    soft = one_hot.float() * 0.9 + 0.1 / 3  # smoothing 0.1 by hand
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        mixed, target = finetune.mixup_cutmix(video, soft, mixup, cutmix, generator=torch.Generator().manual_seed(1))
        _, mixed_one_hot = finetune.mixup_cutmix(video, one_hot.float(), mixup, cutmix,
                                                 generator=torch.Generator().manual_seed(1))
        assert torch.allclose(F.cross_entropy(logits, target),
                              F.cross_entropy(logits, mixed_one_hot, label_smoothing=0.1), atol=1e-6)
        assert mixed.shape == video.shape and torch.allclose(target.sum(1), torch.ones(4))
        lam = ((target[0, 0] - soft[3, 0]) / (soft[0, 0] - soft[3, 0])).item()  # clip 0's partner is clip 3
        if cutmix:  # the partner's share of the target is the area pasted from it
            assert abs((mixed[0] != video[0]).float().mean().item() - (1 - lam)) < 1e-6
        else:
            assert torch.allclose(mixed[0], lam * video[0] + (1 - lam) * video[3], atol=1e-6)
    erased = finetune.random_erasing(video, 1.0)
    changed = (erased != video).any(1).float().mean(dim=(-1, -2))  # (B, T) fraction of pixels per frame
    assert ((changed >= 0.015) & (changed <= 0.34)).all()


EXPLAIN_CFG = SVFAPConfig(img_size=32, patch_size=8, num_frames=8, embed_dim=32, num_heads=2, stage_depths=(1, 1, 1),
                          num_bottleneck_tokens=3, bottleneck_hidden=16, decoder_dim=32, decoder_heads=2, decoder_depth=1)


def read_png(path):
    with av.open(str(path)) as c:
        return next(c.decode(video=0)).to_ndarray(format="rgb24")


@pytest.mark.parametrize("kind", ["pretrain", "finetune"])
def test_explain_draws_a_row_per_token_and_a_column_per_slice_with_weights_summing_to_one(tmp_path, kind):
    torch.manual_seed(0)
    model = SVFAP(EXPLAIN_CFG) if kind == "pretrain" else SVFAPClassifier(EXPLAIN_CFG, 4)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_config": EXPLAIN_CFG.to_dict(),
                "config": {**train_defaults(finetune), "sampling_rate": 1}}, ckpt)
    video = tmp_path / "v.mp4"
    D.write_mp4(video, np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    frames, weights = finetune.explain_video(finetune.load_config(train_defaults(finetune), [
        f"--explain={video}", f"--ckpt={ckpt}", f"--out={tmp_path / 'b.png'}"]))
    picture = read_png(tmp_path / "b.png")
    K, cell = EXPLAIN_CFG.num_bottleneck_tokens, EXPLAIN_CFG.img_size + 2
    # 8 frames = 4 tubelet slices; stage 2 halves them to 2, stage 3 to 1; 4 x 4 positions per slice
    assert [w.shape for w in weights] == [(2, 16, K), (1, 16, K)]
    assert picture.shape == (2 * (K * cell + 8), 2 * cell, 3)
    for w in weights:
        assert np.allclose(w.sum(1), 1, atol=1e-5)
    # the weights are the checkpoint's model's: recomputed here stage by stage from the same frames
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1)
    x = (torch.from_numpy(frames).permute(3, 0, 1, 2)[None] / 255 - mean) / std  # (1, 3, T, H, W)
    enc = model.encoder.eval()
    with torch.no_grad():
        x = enc.stages[0]((enc.patch_embed(x) + enc.pos_embed).view(1, 4, 16, 32))
        for stage, w in zip(enc.stages[1:], weights):
            assert np.allclose(stage.spatial_attention.weights(stage.temporal_pyramid(x))[0].numpy(), w, atol=1e-5)
            x = stage(x)
    # each cell (row k, column t) is brightest (yellow: G = 0.45 frame + 0.55 * 255) on token k's top patch of
    # slice t, and has no green (G = 0.45 frame) where the weight is under half the maximum
    for s, w in enumerate(weights):
        Ts, top = w.shape[0], s * (K * cell + 8)
        for k in range(K):
            for t in range(Ts):
                h = w[t, :, k] / w[t, :, k].max()
                g = picture[top + k * cell + 1:top + (k + 1) * cell - 1, t * cell + 1:(t + 1) * cell - 1, 1]
                mid = frames[t * (8 // Ts) + 8 // Ts // 2, :, :, 1]
                for i in range(16):
                    r, c = divmod(i, 4)
                    got, frame = g[8 * r:8 * r + 8, 8 * c:8 * c + 8].astype(float), mid[8 * r:8 * r + 8, 8 * c:8 * c + 8]
                    want = 0.45 * frame + 0.55 * 255 * np.clip(2 * h[i] - 1, 0, 1)
                    assert np.abs(got - want).max() <= 1, (s, k, t, i)


# --- batched random erasing, mixup and cutmix against the per-frame loops they replace

# --- the reference: the per-clip loops that finetune.py's batched versions replaced ---------------------------
def mixup_cutmix_ref(video, soft_target, mixup_alpha, cutmix_alpha, switch_prob=0.5):
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or torch.rand(()).item() < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = torch.distributions.Beta(alpha, alpha).sample().item()
    partner = video.flip(0)
    if use_cutmix:
        H, W = video.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = torch.randint(H, ()).item(), torch.randint(W, ()).item()
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        video = video.clone()
        video[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)
    else:
        video = video * lam + partner * (1.0 - lam)
    return video, soft_target * lam + soft_target.flip(0) * (1.0 - lam)


def random_erasing_ref(video, prob, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    B, C, T, H, W = video.shape
    video = video.clone()
    for b in range(B):
        for t in range(T):
            if torch.rand(()).item() >= prob:
                continue
            for _ in range(10):
                area = H * W * (min_area + (max_area - min_area) * torch.rand(()).item())
                aspect = math.exp(math.log(min_aspect) * (1 - 2 * torch.rand(()).item()))
                h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
                if h < H and w < W:
                    top, left = torch.randint(H - h + 1, ()).item(), torch.randint(W - w + 1, ()).item()
                    video[b, :, t, top:top + h, left:left + w] = torch.randn(C, h, w, device=video.device)
                    break
    return video


# --- helpers ------------------------------------------------------------------------------------------
def erased_boxes(video, erased):
    """Per frame: (erased, h, w, top, left) of the changed pixels, asserting they form one box of all channels."""
    changed = erased != video  # (B, C, T, H, W)
    assert torch.equal(changed.all(1), changed.any(1)), "every channel of an erased pixel changes"
    out = []
    for frame in changed.any(1).flatten(0, 1):  # (H, W)
        rows, cols = frame.any(1).nonzero().flatten(), frame.any(0).nonzero().flatten()
        if len(rows) == 0:
            out.append((0, 0, 0, 0, 0))
            continue
        h, w, top, left = len(rows), len(cols), int(rows[0]), int(cols[0])
        assert frame.sum() == h * w and frame[top:top + h, left:left + w].all(), "one rectangle"
        out.append((1, h, w, top, left))
    return torch.tensor(out, dtype=torch.float64)


def erasing_samples(fn, seed, frames, H, W, **kw):
    torch.manual_seed(seed)
    video = torch.full((frames // 16, 3, 16, H, W), 100.0)  # no noise value equals it
    gen = {"generator": torch.Generator().manual_seed(seed)} if fn is finetune.random_erasing else {}
    return erased_boxes(video, fn(video, **kw, **gen))


# --- random erasing -----------------------------------------------------------------------------------
@pytest.mark.parametrize("H,W,kw", [
    (32, 32, dict(prob=0.5)),  # the recipe's setting
    (12, 30, dict(prob=0.8, min_area=0.3, max_area=0.9, min_aspect=0.2)),  # many tries fail to fit
])
def test_random_erasing_keeps_the_reference_distributions(H, W, kw):
    ref = erasing_samples(random_erasing_ref, 0, 3200, H, W, **kw)
    new = erasing_samples(finetune.random_erasing, 1, 3200, H, W, **kw)
    p_ref, p_new = ref[:, 0].mean().item(), new[:, 0].mean().item()
    assert abs(p_ref - p_new) < 4 * math.sqrt(2 * p_ref * (1 - p_ref) / 3200), (p_ref, p_new)
    if kw["prob"] == 0.5:  # every box fits on a square frame: the erased fraction is prob itself
        assert abs(p_new - 0.5) < 4 * math.sqrt(0.25 / 3200)
    r, n = ref[ref[:, 0] == 1], new[new[:, 0] == 1]
    area, aspect = lambda s: s[:, 1] * s[:, 2] / (H * W), lambda s: (s[:, 1] / s[:, 2]).log()
    free = lambda s, i, size: s[:, 3 + i] / (size - s[:, 1 + i])  # place in the free range, uniform in [0, 1]
    for stat in (area, aspect, lambda s: s[:, 1], lambda s: s[:, 2], lambda s: free(s, 0, H), lambda s: free(s, 1, W)):
        a, b = stat(r), stat(n)
        keep = torch.isfinite(a), torch.isfinite(b)  # a box as tall as the frame has no free range
        assert ks_2samp(a[keep[0]].numpy(), b[keep[1]].numpy()).pvalue > 1e-3
    assert (n[:, 1] < H).all() and (n[:, 2] < W).all()


def test_random_erasing_fills_boxes_with_unit_normal_noise_and_leaves_the_rest():
    video = torch.randn(8, 3, 16, 32, 32)
    erased = finetune.random_erasing(video, 0.5, generator=torch.Generator().manual_seed(0))
    changed = erased != video
    noise = erased[changed]
    assert noise.numel() > 10_000 and abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
    assert torch.equal(erased[~changed], video[~changed])
    assert not torch.equal(finetune.random_erasing(video, 0.5), finetune.random_erasing(video, 0.5)), "the global generator moves on"
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(finetune.random_erasing(video, 0.5, generator=g1), finetune.random_erasing(video, 0.5, generator=g2))
    assert torch.equal(finetune.random_erasing(video, 0.0), video)


# --- mixup and cutmix ---------------------------------------------------------------------------------
def mix_samples(fn, seed, calls, mixup, cutmix, H=20, W=28):
    """Per call: (used cutmix, lam from the targets, fraction of pixels from the partner)."""
    torch.manual_seed(seed)
    gen = {"generator": torch.Generator().manual_seed(seed)} if fn is finetune.mixup_cutmix else {}
    video = torch.rand(4, 3, 2, H, W) + 1.0
    soft = torch.eye(4)
    out = []
    for _ in range(calls):
        mixed, target = fn(video, soft, mixup, cutmix, **gen)
        assert torch.allclose(target.sum(1), torch.ones(4)) and (target >= 0).all()
        lam = target[0, 0].item()  # clip 0's partner is clip 3
        from_partner = (mixed[0] == video[3]) & (mixed[0] != video[0])
        cut = bool(((mixed[0] == video[0]) | from_partner).all())
        if cut:  # one box, the same in every frame and channel, of area 1 - lam
            assert torch.equal(from_partner, from_partner[:1, :1].expand_as(from_partner))
            assert abs(from_partner.float().mean().item() - (1 - lam)) < 1e-6
            assert torch.equal(mixed, torch.where(from_partner[0, 0], video.flip(0), video))
        else:
            assert torch.allclose(mixed, lam * video + (1 - lam) * video.flip(0), atol=1e-5)
        out.append((cut, lam, from_partner.float().mean().item()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_cutmix_keeps_the_reference_distributions(mixup, cutmix):
    ref, new = mix_samples(mixup_cutmix_ref, 0, 1500, mixup, cutmix), mix_samples(finetune.mixup_cutmix, 1, 1500, mixup, cutmix)
    p_ref, p_new = ref[:, 0].mean().item(), new[:, 0].mean().item()
    expected = 0.0 if cutmix == 0 else 1.0 if mixup == 0 else 0.5
    assert abs(p_ref - expected) < 0.05 and abs(p_new - expected) < 0.05
    for used_cut in (0, 1):
        r, n = ref[ref[:, 0] == used_cut, 1], new[new[:, 0] == used_cut, 1]
        if len(n):
            assert ks_2samp(r.numpy(), n.numpy()).pvalue > 1e-3, used_cut
    if mixup and not cutmix:  # mixup's lam is Beta(alpha, alpha) itself
        assert kstest(new[:, 1].numpy(), beta_dist(mixup, mixup).cdf).pvalue > 1e-3


def test_batched_augmentations_read_nothing_back_from_the_device():
    video, soft = torch.randn(4, 3, 8, 16, 16), torch.eye(4)
    for fn in (lambda: finetune.random_erasing(video, 0.5), lambda: finetune.mixup_cutmix(video, soft, 0.8, 1.0)):
        with DeviceReads() as counter:
            fn()
        assert counter.reads == []
    with DeviceReads() as counter:  # the reference reads: the counter can fail
        random_erasing_ref(video, 0.5)
        mixup_cutmix_ref(video, soft, 0.8, 1.0)
    assert counter.reads


def test_release_checkpoint_with_its_argparse_namespace_loads_safely(tmp_path, capsys):
    """A checkpoint in the release's layout, holding its argparse.Namespace as the release's do, loads with
    weights_only=True and fills every encoder tensor of the classifier."""
    import argparse
    from types import SimpleNamespace
    from model import SVFAP, official_key_map
    c = SimpleNamespace(model="tiny", model_args={"stage_depths": (1, 1, 1)}, task="classification",
                        num_classes=7, num_outputs=1)
    mc = pretrain.build_model_config(c.model, c.model_args)
    source = SVFAP(mc)
    ours = source.state_dict()
    release = {key: ours[our_key] for key, our_key in official_key_map(source, pretraining_layout=True).items()}
    path = tmp_path / "release.pth"
    torch.save({"model": release, "epoch": 99, "args": argparse.Namespace(model="pretrain_videomae", lr=1.5e-4)}, path)
    c.init_from = str(path)
    model = finetune.build_classifier(c, master=True)
    n = len(model.encoder.state_dict())
    assert f"loaded {n}/{n} encoder tensors" in capsys.readouterr().out
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, ours["encoder." + key])


def test_a_release_checkpoint_of_another_width_builds_its_own_shape(train_data, tmp_path):
    """--init_from=<release file>, the README's one command line, builds the encoder the file holds (768 wide, 12
    heads, depths (1, 2, 1)) whatever the config says (32 wide, 2 heads, depths (1, 1, 1)), and loads all of it."""
    wide = replace(build_train_cfg(), embed_dim=768, num_heads=12, stage_depths=(1, 2, 1))
    path = tmp_path / "release.pth"
    torch.save({"model": release_layout(model_seeded(SVFAP, wide, seed=0), pretraining=True)}, path)
    done = train_run("finetune.py", *train_finetune_args(train_data, tmp_path / "out", f"--init_from={path}",
                                                         "--max_iters=1"))
    n = len(M.TPSBT(wide).state_dict())
    assert (f"(the authors' release layout; built 768 wide, 12 heads, depths (1, 2, 1)): loaded {n}/{n} encoder "
            f"tensors;") in done.stdout
    built = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=False)["model_config"]
    assert (built["embed_dim"], built["num_heads"], tuple(built["stage_depths"])) == (768, 12, (1, 2, 1))

def test_make_compare_runs_every_seed_and_setting_and_skips_finished_runs(train_data, tmp_path):
    """`make compare` (the README's demo comparison) on tiny data and a seconds-long budget: every
    (seed, setting) run happens, the table has one row per group with n = 2, and a second `make` redoes
    nothing."""
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(train_data / "videos", data / "videos")
    for name, source in (("pretrain", "pretrain"), ("train", "train"), ("val", "val"), ("test", "test")):
        (data / f"{name}.txt").write_text((train_data / f"{source}.txt").read_text())
    (data / "train_10pct.txt").write_text("".join((train_data / "train.txt").read_text().splitlines(True)[:4]))
    py = sys.executable
    common = shlex.join([*TRAIN_MODEL_ARGS, *TRAIN_COMMON, "--epochs=1"])  # make hands the commands to sh
    out = tmp_path / "compare"
    make = ["make", "-s", "-j2", "compare", f"OUT={out}", f"DATA={data}", "SEEDS=0 1", f"PYTHON={py}",
            f"PRETRAIN={py} pretrain.py {common} --base_lr=0.3 --vis_clips=0 --train_list={data}/pretrain.txt",
            f"FINETUNE={py} finetune.py {common} --num_classes=3 --eval_batch_size=2 --num_clips=1 --num_crops=1",
            "FEW_ARGS=--batch_size=2"]
    done = subprocess.run(make, cwd=TRAIN_REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (out / "results.md").read_text()
    assert done.stdout.endswith(table)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in table.splitlines()[2:]}
    assert list(rows) == ["pre-training on pretrain.txt", "train.txt (all labels), pre-trained",
                          "train.txt (all labels), from scratch", "train_10pct.txt (10% of the labels), pre-trained",
                          "train_10pct.txt (10% of the labels), from scratch"]
    assert all(r[0] == "2" for r in rows.values()) and rows["pre-training on pretrain.txt"][1] == "-"
    for name in ("full_pretrained_seed1", "10pct_scratch_seed0"):
        assert json.load(open(out / name / "results.json"))["wall_time_s"] > 0
    assert "loaded" in (out / "10pct_pretrained_seed1.log").read_text()  # from pretrain_seed1's checkpoint
    again = subprocess.run(make, cwd=TRAIN_REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "==" not in again.stdout and again.stdout == table


def test_make_paper_keeps_checkpoints_of_one_schedule_and_reports_them_in_tables_and_a_picture(train_data, tmp_path):
    """`make paper` on tiny data: each seed's one pre-training schedule is stopped and resumed at every epoch of
    EPOCHS, its checkpoint kept there; the tables hold each epoch's mean logged loss, the test UAR of every
    fine-tuning and the models' MACs; the SVG has both panels, their legends and the from-scratch level; a second
    `make` redoes nothing."""
    import xml.etree.ElementTree as ET
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(train_data / "videos", data / "videos")
    for name in ("pretrain", "train", "test"):
        (data / f"{name}.txt").write_text((train_data / f"{name}.txt").read_text())
    (data / "train_10pct.txt").write_text("".join((train_data / "train.txt").read_text().splitlines(True)[:6]))
    py, out, svg = sys.executable, tmp_path / "paper", tmp_path / "paper.svg"
    common = shlex.join([*TRAIN_MODEL_ARGS, *TRAIN_COMMON])  # make hands the commands to sh
    make = ["make", "-s", "-j2", "paper", f"PAPER={out}", f"PAPER_SVG={svg}", f"DATA={data}", "SEEDS=0",
            "EPOCHS=1 2", "VIT_EPOCH=1", "BATCH=4", f"PYTHON={py}",
            f"PRETRAIN={py} pretrain.py {common} --base_lr=0.3 --vis_clips=0 --train_list={data}/pretrain.txt",
            f"FINETUNE={py} finetune.py {common} --num_classes=3 --eval_batch_size=2 --num_clips=1 --num_crops=1"]
    done = subprocess.run(make, cwd=TRAIN_REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "results.md").read_text()
    assert done.stdout.endswith(text)
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.split("|")[2:-1]] for r in text.splitlines() if "|" in r}
    kept = [torch.load(out / "pretrain_tpsbt_seed0" / f"ckpt_epoch{e}.pt", weights_only=True) for e in (1, 2)]
    assert [k["iter_num"] for k in kept] == [3, 6] and {k["config"]["epochs"] for k in kept} == {2}
    vit = torch.load(out / "pretrain_vit_seed0" / "ckpt_epoch1.pt", weights_only=True)
    assert (vit["iter_num"], vit["config"]["epochs"], vit["model_config"]["temporal_pyramid"]) == (3, 2, False)
    log = train_log(out / "pretrain_tpsbt_seed0")
    for epoch in (1, 2):
        loss = np.mean([r["loss"] for r in log if r.get("epoch") == epoch and "loss" in r])
        p = metrics.read_predictions(out / f"few_tpsbt_e{epoch}_seed0" / "test_predictions.csv")
        uar = 100 * metrics.uar(p.targets, p.scores)
        assert rows[str(epoch)][:2] == [f"{loss:.4f} ± 0.0000", f"{uar:.2f} ± 0.00 ({uar:.2f}..{uar:.2f})"]
    assert rows["none (from scratch)"][0] == "-"
    vit_cfg = replace(build_train_cfg(), temporal_pyramid=False, spatial_bottleneck=False)
    assert [rows[name][3] for name in ("TPSBT-tiny", "ViT baseline")] == [f"{M.sizes(c, 6)[1]:.3f}"
                                                                          for c in (build_train_cfg(), vit_cfg)]
    words = [t.text for t in ET.parse(svg).getroot().iter("{http://www.w3.org/2000/svg}text")]
    assert words.count("pre-training epochs") == 2 and {"TPSBT-tiny pre-trained", "ViT baseline pre-trained",
                                                         "TPSBT-tiny from scratch", "pre-training loss"} <= set(words)
    assert svg.read_text().count('stroke-dasharray="6 4"') == 2  # the from-scratch level and its legend
    again = subprocess.run(make, cwd=TRAIN_REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "==" not in again.stdout and again.stdout == text


def test_make_gpu_runs_every_step_on_the_cpu_and_writes_one_report(train_data, tmp_path):
    """`make gpu DEVICE=cpu`, small: the bench (a stand-in here), pre-training eager, "compiled" (eager here: inductor
    compiles for minutes on a CPU) and under torchrun, fine-tuning from the first; one report with each step."""
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(train_data / "videos", data / "videos")
    for name in ("pretrain", "train", "val", "test"):
        (data / f"{name}.txt").write_text((train_data / f"{name}.txt").read_text())
    py, out = sys.executable, tmp_path / "gpu"
    model_args = shlex.join([*TRAIN_MODEL_ARGS, "--batch_size=4", "--sampling_rate=1"])  # labels 0..2 of 6 classes
    make = ["make", "-s", "gpu", "DEVICE=cpu", "GPU_DTYPE=float32", "GPU_ITERS=2", "GPU_WORKERS=1", f"DATA={data}",
            f"GPU_OUT={out}", f"PYTHON={py}", f"BENCH={py} -c 'print(\"bench figures\")'", "GPU_COMPILE=",
            f"GPU_ARGS=--device=cpu --dtype=float32 --max_iters=2 --num_workers=1 {model_args}"]
    done = subprocess.run(make, cwd=TRAIN_REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == f"report: {out}/report.md"
    report = (out / "report.md").read_text()
    steps = ["bench", "pretrain_eager", "pretrain_compiled", "pretrain_torchrun", "finetune_eager", "finetune_compiled"]
    assert re.findall(r"^## (\w+)$", report, re.M) == steps and report.count("exit 0 after") == 6, report
    assert "torch " + torch.__version__ in report and "bench figures" in report and '"iter": 2' in report
    assert "finetune.py config/finetune_demo.py" in report and "test, model of the last epoch" in report


# =====================================================================================================
# the project: README and CI agree


def test_ci_runs_exactly_the_readme_test_command():
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    command = next(line.strip() for line in ci.splitlines() if "pytest" in line and not line.startswith("#"))
    assert f"    $ {command}\n" in open(os.path.join(HERE, "README.md")).read()


# =====================================================================================================
# demo dataset: `python data.py demo`, its lists, determinism and the look of its classes


DEMO_LIST_NAMES = ("pretrain.txt", "pretrain_true_labels.txt", "train.txt", "train_10pct.txt", "val.txt", "test.txt",
              "regression_train.txt", "regression_val.txt", "regression_test.txt")


def demo_read_list(path):
    with open(path) as f:
        return [line.split() for line in f.read().splitlines()]


def demo_decode(path):
    with av.open(path) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])


@pytest.fixture(scope="module")
def demo_dirs(tmp_path_factory):
    """The same tiny dataset made three times: twice with two worker processes, once with one."""
    dirs = []
    for run, workers in enumerate((2, 2, 1)):
        out = str(tmp_path_factory.mktemp(f"demo_run{run}_workers{workers}_"))
        make_demo_dataset(out, seed=3, train_per_class=1, eval_per_class=1, pretrain_factor=10, workers=workers,
                          verbose=False)
        dirs.append(out)
    return dirs


def demo_files(out):
    """{path relative to out: bytes} of every file under out."""
    files = {}
    for folder, _, names in os.walk(out):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                files[os.path.relpath(f.name, out)] = f.read()
    return files


def test_demo_is_deterministic_from_its_seed_whatever_the_worker_count(demo_dirs):
    first, *others = (demo_files(d) for d in demo_dirs)
    assert sum(name.startswith("videos" + os.sep) for name in first) == 6 + 6 + 6 + 60
    assert set(DEMO_LIST_NAMES) | {"classes.txt"} < set(first)
    for out, files in zip(demo_dirs[1:], others):  # every byte of every file: videos, lists, picture
        assert files.keys() == first.keys()
        differ = sorted(name for name in first if files[name] != first[name])
        assert not differ, f"{len(differ)} of {len(first)} files of {out} differ from {demo_dirs[0]}: {differ}"
    # a different seed gives different faces
    other = render_demo_clip(demo_identity(4, 0), demo_clip_plan(4, 0, 0, 0))
    same = render_demo_clip(demo_identity(3, 0), demo_clip_plan(3, 0, 0, 0))
    assert np.array_equal(same, render_demo_clip(demo_identity(3, 0), demo_clip_plan(3, 0, 0, 0)))
    assert np.abs(other.astype(int) - same).mean() > 10


def test_demo_files_decode_and_lists_are_well_formed(demo_dirs):
    out = demo_dirs[0]
    assert open(os.path.join(out, "classes.txt")).read().split() == list(DEMO_CLASSES)
    for name in DEMO_LIST_NAMES:
        rows = demo_read_list(os.path.join(out, name))
        assert rows, name
        for row in rows:
            assert not os.path.isabs(row[0]) and os.path.isfile(os.path.join(out, row[0])), (name, row)
            if name.startswith("regression"):
                assert len(row) == 3 and all(-1 <= float(x) <= 1 for x in row[1:]), (name, row)
            else:
                assert len(row) == 2 and row[1].isdigit() and int(row[1]) < len(DEMO_CLASSES), (name, row)
    assert {r[1] for r in demo_read_list(os.path.join(out, "pretrain.txt"))} == {"0"}  # dummy label
    assert len(demo_read_list(os.path.join(out, "pretrain.txt"))) >= 10 * len(demo_read_list(os.path.join(out, "train.txt")))
    for path, _ in demo_read_list(os.path.join(out, "val.txt"))[:3]:
        codec, frames = demo_decode(os.path.join(out, path))
        assert codec == "h264" and frames.shape == (DEMO_FRAMES, DEMO_SIZE, DEMO_SIZE, 3)
        assert 30 < frames.mean() < 225 and frames.std() > 20  # a picture, not a blank


def test_demo_splits_sizes_balance_and_disjoint_identities():
    splits = demo_splits(seed=0, train_per_class=50, eval_per_class=20, pretrain_factor=10)
    n = {k: len(v) for k, v in splits.items()}
    assert n == {"train": 300, "val": 120, "test": 120, "pretrain": 3000}
    ids = {k: {identity for _, identity, _ in v} for k, v in splits.items()}
    assert not ids["val"] & ids["test"]
    assert not (ids["val"] | ids["test"]) & (ids["train"] | ids["pretrain"])
    assert ids["train"] & ids["pretrain"]  # allowed, as for any unlabeled crawl
    clips = [c for v in splits.values() for c, _, _ in v]
    assert len(set(clips)) == len(clips)  # every clip belongs to one list
    for factor, per_identity in ((0, 2), (0, 5), (1, 3)):  # fewer pretrain clips than train clips, too
        ids = {k: {i for _, i, _ in v} for k, v in demo_splits(0, 5, 4, factor, per_identity).items()}
        assert not ids["val"] & ids["test"] and not (ids["val"] | ids["test"]) & (ids["train"] | ids["pretrain"])
    for name in ("train", "val", "test"):
        counts = np.bincount([y for _, _, y in splits[name]], minlength=len(DEMO_CLASSES))
        assert counts.min() == counts.max(), (name, counts)
    few = ten_percent(splits["train"], seed=0)
    assert len(few) == 30 and set(few) <= set(splits["train"])
    assert np.bincount([y for _, _, y in few]).tolist() == [5] * 6


def test_demo_clips_start_neutral_and_classes_differ_at_the_apex():
    ident = demo_identity(0, 7)
    clips = []
    for label in range(len(DEMO_CLASSES)):
        plan = demo_clip_plan(0, 11, 7, label)  # same clip id: same timing, motion and noise
        plan["label"] = label
        clips.append(render_demo_clip(ident, plan).astype(int))
    for clip in clips[1:]:
        assert np.array_equal(clip[0], clips[0][0])  # frame 0 is the neutral face whatever the class
    apex = [c[-1] for c in clips]
    diffs = [np.abs(apex[i] - apex[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    assert min(diffs) > 1.0, diffs  # every pair of classes looks different at the apex
    moves = [np.abs(c[-1] - c[0]) for c in clips]
    assert min((m > 40).sum() for m in moves) > 60  # a clearly visible deformation: many pixels change a lot


def test_demo_valence_arousal_follow_the_class():
    v = {c: np.mean([demo_clip_plan(0, i, 0, k)["valence"] for i in range(50)]) for k, c in enumerate(DEMO_CLASSES)}
    a = {c: np.mean([demo_clip_plan(0, i, 0, k)["arousal"] for i in range(50)]) for k, c in enumerate(DEMO_CLASSES)}
    assert v["happy"] > 0.4 and v["sad"] < -0.4 and a["surprise"] > 0.4 and a["sad"] < -0.2


def test_head_lr_scale_speeds_up_only_fc_norm_and_head():
    model = SVFAPClassifier(TINY, 6)
    groups = pretrain.param_groups(model, 0.05, layer_decay=0.75, head_lr_scale=100.0)
    owner = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        names = [owner[id(p)] for p in g["params"]]
        head = [n.startswith(("head.", "fc_norm.")) for n in names]
        assert all(head) or not any(head), names
        top = 0.75 ** (model.num_lr_layers - 1 - g["layer"])
        assert g["lr_scale"] == pytest.approx(top * (100.0 if head[0] else 1.0))
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
