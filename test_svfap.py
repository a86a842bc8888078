"""Tests for svfap. They read like the paper's claims; each asserts numbers or behaviour."""

import math
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
from model import CONFIGS, SVFAP, SVFAPClassifier, SVFAPConfig, tube_mask

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
    cross = M.CrossAttention(dim, heads)
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


def test_config_round_trips_through_a_plain_dict():
    d = TINY.to_dict()
    assert SVFAPConfig.from_dict(d) == TINY
    with pytest.raises(ValueError, match="unknown field"):
        SVFAPConfig.from_dict({**d, "depth": 3})


def test_non_tube_mask_is_refused():
    model = SVFAP(TINY)
    mask = tube_mask(1, TINY)
    mask[0, 0] = ~mask[0, 0]
    with pytest.raises(ValueError, match="tube mask"):
        model(tiny_video(1), mask)


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


def test_base_sizes_match_the_paper():
    params, ft, pt = M.sizes(CONFIGS["base"])
    assert abs(params - 77.6) / 77.6 < 0.02 and abs(ft - 43.6) / 43.6 < 0.02 and abs(pt - 12.9) / 12.9 < 0.02


def test_video_of_the_wrong_shape_is_refused_with_the_expected_shape():
    with pytest.raises(ValueError, match=r"expects video \(B, 3, 16, 64, 64\)"):
        SVFAPClassifier(TINY, 6)(torch.zeros(1, 3, 8, 64, 64))
