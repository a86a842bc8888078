"""SVFAP: masked facial-video autoencoding with the TPSBT encoder; one copyable file, torch and the standard library.
Sections in the paper's order (Sun et al., "SVFAP: Self-supervised Video Facial Affect Perceiver", IEEE TAC 2024):
  1. SVFAPConfig, CONFIGS               sizes and switches of every model in the paper
  2. patchify / tube_mask              input tubelets and the tube masking of pre-training
  3. Attention, Block, SBTBlock         the Transformer pieces (self- and cross-attention through SDPA)
  4. TemporalPyramid, SpatialAttention  the two ideas of TPSBT
  5. TPSBTStage, TPSBT                  the encoder
  6. SVFAP                              pre-training: multi-scale fusion, decoder, reconstruction loss
  7. SVFAPClassifier                    fine-tuning: mean pooling and a linear head
  8. load_official_state_dict           import the authors' released checkpoints
  9. count_macs, sizing table, bench   `python model.py [--bench [--device=cuda]]`
"""

import contextlib
import math
import re
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# 1. Configuration --------------------------------------------------------------------------------------

@dataclass
class SVFAPConfig:
    # defaults are the paper's flagship model, SVFAP with TPSBT-B
    img_size: int = 160
    patch_size: int = 16
    num_frames: int = 16
    tubelet_size: int = 2
    in_chans: int = 3
    embed_dim: int = 512
    num_heads: int = 8
    stage_depths: tuple = (12, 6, 3)  # (N1, N2, N3): standard blocks, then two TPSBT stages
    num_bottleneck_tokens: int = 8  # K bottleneck tokens per temporal slice
    bottleneck_hidden: int = 128  # hidden width of the spatial-attention MLP
    temporal_pyramid: bool = True  # halve the temporal length at the start of stages 2, 3, ...
    spatial_bottleneck: bool = True  # stages 2, 3, ... use SBT blocks (off: plain Transformer blocks)
    temporal_downsample: str = "conv"  # "conv" | "avg" | "max"
    mlp_ratio: float = 4.0
    drop_path: float = 0.0  # stochastic depth at the last block, rising linearly from 0
    decoder_dim: int = 384
    decoder_depth: int = 4
    decoder_heads: int = 6
    mask_ratio: float = 0.9
    norm_pix_loss: bool = True  # reconstruct per-patch normalised pixels
    multiscale_fusion: bool = True  # decoder sees the sum of all stage outputs (else the last one)

    def __post_init__(self):
        self.stage_depths = tuple(self.stage_depths)
        self.validate()

    @property
    def grid(self):  # (T', H', W'): the token grid of the patch embedding
        return (self.num_frames // self.tubelet_size,) + (self.img_size // self.patch_size,) * 2
    @property
    def num_spatial(self):  # S, spatial positions per temporal slice
        return self.grid[1] * self.grid[2]
    @property
    def num_patches(self):  # N = T' * S
        return self.grid[0] * self.num_spatial
    @property
    def num_masked_spatial(self):  # floor(rho * S); the epsilon keeps 0.29 * 100 from becoming 28
        return math.floor(self.mask_ratio * self.num_spatial + 1e-6)
    @property
    def patch_dim(self):  # pixels per tubelet: tubelet x patch x patch x channels
        return self.tubelet_size * self.patch_size ** 2 * self.in_chans

    def validate(self):
        def bad(field, rule):
            raise ValueError(f"SVFAPConfig.{field}={getattr(self, field)!r}: {rule}")

        for f in ("img_size", "patch_size", "num_frames", "tubelet_size", "in_chans", "embed_dim", "num_heads",
                  "num_bottleneck_tokens", "bottleneck_hidden", "decoder_dim", "decoder_depth", "decoder_heads"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be a positive integer")
        if not self.stage_depths or any(not isinstance(d, int) or d < 1 for d in self.stage_depths):
            bad("stage_depths", "must be a non-empty tuple of positive integers, e.g. (12, 6, 3)")
        if self.img_size % self.patch_size:
            bad("img_size", f"must be divisible by patch_size={self.patch_size}")
        n_down = len(self.stage_depths) - 1 if self.temporal_pyramid else 0
        if self.num_frames % (self.tubelet_size * 2 ** n_down):
            bad("num_frames", f"must be divisible by tubelet_size x 2^(downsampling stages) = "
                              f"{self.tubelet_size * 2 ** n_down}")
        for dim, heads in (("embed_dim", "num_heads"), ("decoder_dim", "decoder_heads")):
            if getattr(self, dim) % getattr(self, heads):
                bad(dim, f"must be divisible by {heads}={getattr(self, heads)}")
        if self.temporal_downsample not in ("conv", "avg", "max"):
            bad("temporal_downsample", 'must be "conv", "avg" or "max"')
        if self.spatial_bottleneck and self.num_bottleneck_tokens > self.num_spatial:
            bad("num_bottleneck_tokens", f"must not exceed the {self.num_spatial} spatial tokens per slice")
        if not 0.0 <= self.mask_ratio < 1.0 or not 1 <= self.num_masked_spatial < self.num_spatial:
            bad("mask_ratio", f"must mask at least one of the {self.num_spatial} spatial positions and leave one "
                              f"visible")
        if not 0.0 <= self.drop_path < 1.0:
            bad("drop_path", "must be in [0, 1)")
        if self.mlp_ratio <= 0:
            bad("mlp_ratio", "must be positive")

    to_dict = asdict  # cfg.to_dict(): a plain dict of the fields, for checkpoints

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        if set(d) - known:
            raise ValueError(f"SVFAPConfig: unknown field(s) {sorted(set(d) - known)}; valid fields: {sorted(known)}")
        return cls(**d)

CONFIGS = {
    # TPSBT-B, the paper's model: 77.6M params, 43.6 GMACs fine-tuning, 12.9 GMACs pre-training
    "base": SVFAPConfig(),
    # TPSBT-S (our reading of the paper's 30M / 18 GMACs; measures 29.7M / 18.0)
    "small": SVFAPConfig(embed_dim=384, num_heads=6, stage_depths=(8, 4, 2)),
    # CPU-sized model for tests and the demo: 64x64 faces, 8x8 patches, 512 tokens
    "tiny": SVFAPConfig(img_size=64, patch_size=8, embed_dim=128, num_heads=4, stage_depths=(2, 2, 2),
                        bottleneck_hidden=64, decoder_dim=128, decoder_depth=2, decoder_heads=4),
}

# 2. Tubelets and tube masking --------------------------------------------------------------------------

def patchify(video, tubelet_size, patch_size):
    """(B, c, T, H, W) -> (B, N, tubelet*patch*patch*c), tokens time-major, pixels in (t, row, col, c) order."""
    B, c, T, H, W = video.shape
    kt, p = tubelet_size, patch_size
    x = video.reshape(B, c, T // kt, kt, H // p, p, W // p, p)
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # (B, T', H', W', kt, p, p, c)
    return x.reshape(B, (T // kt) * (H // p) * (W // p), kt * p * p * c)

def unpatchify(patches, cfg):
    """Inverse of patchify: (B, N, tubelet*patch*patch*c) -> (B, c, T, H, W)."""
    Tg, Hg, Wg = cfg.grid
    kt, p, c = cfg.tubelet_size, cfg.patch_size, cfg.in_chans
    x = patches.reshape(-1, Tg, Hg, Wg, kt, p, p, c)  # (B, T', H', W', kt, p, p, c)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, c, T', kt, H', p, W', p)
    return x.reshape(-1, c, Tg * kt, Hg * p, Wg * p)

def tube_mask(batch_size, cfg, generator=None, device=None):
    """Bool (B, N), True = masked: the same floor(rho*S) random spatial positions in every temporal slice."""
    T, S, n_masked = cfg.grid[0], cfg.num_spatial, cfg.num_masked_spatial
    noise = torch.rand(batch_size, S, generator=generator, device=device)
    spatial = noise.argsort(dim=1).argsort(dim=1) < n_masked  # (B, S): ranks are a random permutation per clip
    return spatial.unsqueeze(1).expand(batch_size, T, S).reshape(batch_size, T * S)

def sinusoid_table(num_positions, dim):
    """Fixed 1-D table (num_positions, dim): angle = pos / 10000^(2*(j//2)/dim); sin on even j, cos on odd."""
    pos = torch.arange(num_positions, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    return torch.where(j.long() % 2 == 0, torch.sin(angle), torch.cos(angle)).float()

# 3. Transformer pieces ---------------------------------------------------------------------------------

def attend(q, k, v, num_heads):
    """Multi-head SDPA: q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C); heads are contiguous slices of the channels."""
    q, k, v = (t.unflatten(-1, (num_heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, C/h)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)  # (B, Nq, C)

class Attention(nn.Module):
    """Multi-head self-attention (MHSA), or with cross=True cross-attention (MHCA: keys and values from the context).
    Bias on q and v only: a bias on k shifts every logit of a query by the same constant, which softmax ignores."""
    def __init__(self, dim, num_heads, cross=False):
        super().__init__()
        self.num_heads = num_heads
        if cross:  # the release's separate q and kv weights
            self.q = nn.Linear(dim, dim, bias=False)
            self.kv = nn.Linear(dim, 2 * dim, bias=False)
        else:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)  # a constant: no zeros_like per call
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        if context is None:
            q, k, v = F.linear(x, self.qkv.weight, torch.cat([self.q_bias, self.k_bias, self.v_bias])).chunk(3, -1)
        else:
            q = F.linear(x, self.q.weight, self.q_bias)  # (B, Nq, C)
            k, v = F.linear(context, self.kv.weight, torch.cat([self.k_bias, self.v_bias])).chunk(2, -1)  # (B, Nk, C)
        return self.proj(attend(q, k, v, self.num_heads))

class MLP(nn.Module):
    def __init__(self, dim, hidden, out=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

def drop_path(x, branch, p, training):
    """x + branch, the branch dropped per sample with probability p (stochastic depth), kept ones rescaled."""
    if p == 0.0 or not training:
        return x + branch
    keep = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device, dtype=x.dtype).ge_(p)  # x's dtype: a bf16 model
    return torch.addcmul(x, branch, keep.div_(1.0 - p))

LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # the release's epsilon

class Block(nn.Module):
    """Standard pre-norm Transformer block: x += MHSA(LN(x)); x += FFN(LN(x))."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))
        self.drop_rate = drop_path

    def forward(self, x):
        x = drop_path(x, self.attn(self.norm1(x)), self.drop_rate, self.training)
        return drop_path(x, self.mlp(self.norm2(x)), self.drop_rate, self.training)

class SBTBlock(Block):
    """Spatial bottleneck Transformer block: z += MHCA(LN_q(z), LN_c(context)), then a Block. With z = the bottleneck
    tokens and context = all tokens it is an SBT block; with the roles swapped it is the reverse block."""
    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__(dim, num_heads, mlp_ratio, drop_path)
        self.cross_norm1 = LayerNorm(dim)  # LN_q, query side
        self.cross_norm2 = LayerNorm(dim)  # LN_c, context side
        self.cross_attn = Attention(dim, num_heads, cross=True)

    def forward(self, x, context):
        attended = self.cross_attn(self.cross_norm1(x), self.cross_norm2(context))
        return super().forward(drop_path(x, attended, self.drop_rate, self.training))

# 4. The two ideas of TPSBT -----------------------------------------------------------------------------

class TemporalPyramid(nn.Module):
    """Halve the temporal length at each spatial position: a strided Conv1d, or avg / max pooling (paper's ablation)."""
    def __init__(self, dim, mode="conv"):
        super().__init__()
        self.mode = mode
        self.conv = nn.Conv1d(dim, dim, kernel_size=2, stride=2) if mode == "conv" else None

    def forward(self, x):
        B, T, S, C = x.shape
        x = x.permute(0, 2, 3, 1).reshape(B * S, C, T)  # (B*S, C, T): each spatial position on its own
        x = self.conv(x) if self.conv is not None else (F.avg_pool1d if self.mode == "avg" else F.max_pool1d)(x, 2)
        return x.reshape(B, S, C, T // 2).permute(0, 3, 1, 2)  # (B, T/2, S, C)

class SpatialAttention(nn.Module):
    """Compress each temporal slice into K bottleneck tokens: K softmax-over-space weightings of its tokens."""
    def __init__(self, dim, num_tokens, hidden):
        super().__init__()
        self.norm = LayerNorm(dim)
        self.mlp = MLP(dim, hidden, num_tokens)

    def weights(self, x):
        """(B, T, S, C) -> (B, T, S, K), summing to 1 over the S spatial tokens of each slice."""
        return self.mlp(self.norm(x)).softmax(dim=2)

    def forward(self, x):
        return torch.einsum("btsk,btsc->btkc", self.weights(x), x).flatten(1, 2)  # (B, T*K, C): the bottleneck tokens

# 5. The encoder ----------------------------------------------------------------------------------------

class TPSBTStage(nn.Module):
    """One stage on tokens (B, T, S, C). Stage 1 is plain blocks; later stages first apply the temporal
    pyramid, then either SBT (spatial attention, N-1 SBT blocks, one reverse block) or plain blocks."""
    def __init__(self, cfg, first, drop_paths):
        super().__init__()
        dim, heads, ratio = cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio
        tp, sbt = not first and cfg.temporal_pyramid, not first and cfg.spatial_bottleneck
        self.temporal_pyramid = TemporalPyramid(dim, cfg.temporal_downsample) if tp else None
        self.spatial_attention = SpatialAttention(dim, cfg.num_bottleneck_tokens, cfg.bottleneck_hidden) \
            if sbt else None
        self.blocks = nn.ModuleList((SBTBlock if sbt else Block)(dim, heads, ratio, dp)
                                    for dp in (drop_paths[:-1] if sbt else drop_paths))
        self.reverse_block = SBTBlock(dim, heads, ratio, drop_paths[-1]) if sbt else None

    def forward(self, x):
        if self.temporal_pyramid is not None:
            x = self.temporal_pyramid(x)  # (B, T/2, S, C)
        tokens = x.flatten(1, 2)  # (B, T*S, C)
        if self.spatial_attention is None:
            for blk in self.blocks:
                tokens = blk(tokens)
            return tokens.view_as(x)
        z = self.spatial_attention(x)  # (B, T*K, C) bottleneck tokens
        for blk in self.blocks:
            z = blk(z, context=tokens)  # the full token set stays fixed as context
        # all tokens from z; in pre-training the visible ones only (the release passed masked ones too, leaking pixels)
        return self.reverse_block(tokens, context=z).view_as(x)

class PatchEmbed(nn.Module):
    """Tubelet embedding: a Conv3d's weight (C, c, kt, p, p), so release checkpoints load, applied as a Linear over
    patchified tubelets: the same function, faster on the CPU, and pre-training embeds only the visible tubelets."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        k = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)

    def forward(self, video, visible_idx=None):
        patches = patchify(video, self.cfg.tubelet_size, self.cfg.patch_size)  # (B, N, kt*p*p*c)
        weight = self.proj.weight.permute(0, 2, 3, 4, 1).flatten(1)  # (C, kt*p*p*c), patchify's pixel order
        return F.linear(gather_tokens(patches, visible_idx), weight, self.proj.bias)  # (B, N or N_vis, C)

def token_order(mask):
    """(B, N) bool -> (B, N) indices, visible then masked, ascending: gathers know shapes without reading the mask."""
    return torch.argsort(mask.to(torch.int8), dim=1, stable=True)

def gather_tokens(x, idx):
    """x (B, N, D), idx (B, M) -> (B, M, D); idx None: x, all tokens."""
    return x if idx is None else x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))

class TPSBT(nn.Module):
    """Temporal Pyramid and Spatial Bottleneck Transformer: patch embedding + fixed sinusoidal positions,
    then the stages. With a tube mask only the visible tokens are embedded and processed."""
    def __init__(self, cfg):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.register_buffer("pos_embed", sinusoid_table(cfg.num_patches, cfg.embed_dim), persistent=False)
        total = sum(cfg.stage_depths)
        dpr = iter([cfg.drop_path * i / max(total - 1, 1) for i in range(total)])  # linear rise from 0
        self.stages = nn.ModuleList(TPSBTStage(cfg, first=(s == 0), drop_paths=[next(dpr) for _ in range(d)])
                                    for s, d in enumerate(cfg.stage_depths))
        self.apply(init_weights)

    def block_names(self):
        """Block names in the release's order (blocks.0 .. blocks.N1+N2+N3-1): per stage, blocks, then reverse block."""
        return [name for name, m in self.named_modules() if isinstance(m, Block)]

    def forward(self, video, mask=None, return_all_stages=False):
        """video (B, c, T, H, W) normalised; mask (B, N) bool tube mask (asserted on the device: a GPU reports a wrong
        one at its next sync) or None. Returns the last stage's tokens (B, T_last, S or S_vis, C), or every stage's."""
        cfg = self.cfg
        expected = (cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
        if video.dim() != 5 or tuple(video.shape[1:]) != expected:
            raise ValueError(f"TPSBT expects video (B, {', '.join(map(str, expected))}) = (B, channels, frames, "
                             f"height, width) for this config, got {tuple(video.shape)}")
        B, T, S, C = video.shape[0], cfg.grid[0], cfg.num_spatial, cfg.embed_dim
        pos = self.pos_embed.to(video.dtype).expand(B, -1, -1)  # (B, N, C)
        idx = None  # all tokens
        if mask is not None:
            if mask.dtype != torch.bool or tuple(mask.shape) != (B, cfg.num_patches):
                raise ValueError(f"mask must be a bool tube mask ({B}, {cfg.num_patches}), got {mask.dtype} "
                                 f"{tuple(mask.shape)}")
            spatial = mask.view(B, T, S)  # (B, T', S)
            tube = (spatial == spatial[:, :1]).all() & (spatial[:, 0].sum(1) == cfg.num_masked_spatial).all()
            torch._assert_async(tube, f"mask must be a tube mask, {cfg.num_masked_spatial} of {S} masked per slice")
            idx = token_order(mask)[:, :T * (S - cfg.num_masked_spatial)]  # the visible ones
        x = self.patch_embed(video, idx) + gather_tokens(pos, idx)  # (B, N or N_vis, C)
        x = x.view(B, T, -1, C)  # (B, T', S_vis, C): a tube mask keeps the same S_vis positions per slice
        outputs = [x := stage(x) for stage in self.stages]  # x ends as the last stage's
        return outputs if return_all_stages else x

def init_weights(m):
    """Xavier-uniform Linears (as release pre-training) and flattened patch embedding (as MAE); zero bias, unit LNs."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, PatchEmbed):
        nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
        nn.init.zeros_(m.proj.bias)

def no_weight_decay(name, param):
    """AdamW decays matrices only: not norms, biases, q/v biases or the mask token."""
    return param.ndim <= 1 or name.endswith("mask_token")

# 6. Pre-training: SVFAP --------------------------------------------------------------------------------

class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg.decoder_dim, cfg.decoder_heads, cfg.mlp_ratio)
                                    for _ in range(cfg.decoder_depth))
        self.norm = LayerNorm(cfg.decoder_dim)
        self.head = nn.Linear(cfg.decoder_dim, cfg.patch_dim)

    def forward(self, x, num_masked):
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, -num_masked:]))  # predictions for the masked tokens only

class SVFAP(nn.Module):
    """Masked facial-video autoencoder: TPSBT on visible tubes, multi-scale fusion, light decoder of masked tubelets."""
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = TPSBT(cfg)
        self.fusion_norm = LayerNorm(cfg.embed_dim)  # the release's "encoder.norm"
        self.encoder_to_decoder = nn.Linear(cfg.embed_dim, cfg.decoder_dim, bias=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder = Decoder(cfg)
        self.register_buffer("decoder_pos_embed", sinusoid_table(cfg.num_patches, cfg.decoder_dim), persistent=False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1, 1), persistent=False)
        for m in (self.fusion_norm, self.encoder_to_decoder, self.decoder):
            m.apply(init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)

    def multiscale_fusion(self, stage_outputs):
        """Sum of the stage outputs (B, T_s, S_vis, C), each slice repeated T_1/T_s times (nearest in time) so tokens
        keep their spatial positions; the release regrouped with the wrong temporal length, moving tokens elsewhere."""
        T1 = stage_outputs[0].shape[1]
        parts = stage_outputs if self.cfg.multiscale_fusion else stage_outputs[-1:]
        return sum(x.repeat_interleave(T1 // x.shape[1], dim=1) for x in parts)  # (B, T1, S_vis, C)

    def forward_encoder(self, video, mask):
        x = self.multiscale_fusion(self.encoder(video, mask, return_all_stages=True))
        return self.fusion_norm(x.flatten(1, 2))  # (B, N_vis, C), tokens in increasing index order

    def forward_decoder(self, x, mask):
        B, N_vis, _ = x.shape
        N_masked = self.cfg.num_patches - N_vis
        x = self.encoder_to_decoder(x)  # (B, N_vis, C_d)
        pos = gather_tokens(self.decoder_pos_embed.to(x.dtype).expand(B, -1, -1), token_order(mask))  # (B, N, C_d)
        x = torch.cat([x, self.mask_token.to(x.dtype).expand(B, N_masked, -1)], dim=1) + pos
        return self.decoder(x, N_masked)  # (B, N_masked, kt*p*p*c)

    def target_patches(self, video):
        """Tubelets of the [0, 1] video, (B, N, kt*p*p*c); per-token per-channel normalised if norm_pix_loss."""
        cfg = self.cfg
        pixels = patchify(video * self.std + self.mean, cfg.tubelet_size, cfg.patch_size)
        if not cfg.norm_pix_loss:
            return pixels
        p = pixels.unflatten(-1, (-1, cfg.in_chans))  # (B, N, kt*p*p, c)
        p = (p - p.mean(dim=2, keepdim=True)) / (p.var(dim=2, unbiased=True, keepdim=True).sqrt() + 1e-6)
        return p.flatten(2)

    def forward_loss(self, video, pred, mask):
        masked_idx = token_order(mask)[:, -pred.shape[1]:]
        target = gather_tokens(self.target_patches(video.float()), masked_idx)  # (B, N_masked, D) like pred
        return F.mse_loss(pred.float(), target)

    def forward(self, video, mask):
        """video (B, c, T, H, W) normalised; mask (B, N) tube mask. Returns (loss, pred (B, N_masked, D))."""
        pred = self.forward_decoder(self.forward_encoder(video, mask), mask)
        return self.forward_loss(video, pred, mask), pred

    @torch.no_grad()
    def reconstruct(self, video, pred, mask):
        """Pixels in [0, 1], (B, c, T, H, W): visible tubelets from the input, masked ones from pred. norm_pix_loss
        de-normalises pred with the true patch's mean and std, unseen by the model: the picture flatters it."""
        cfg = self.cfg
        pixels = patchify(video.float() * self.std + self.mean, cfg.tubelet_size, cfg.patch_size)
        masked = pixels[mask].unflatten(-1, (-1, cfg.in_chans))  # (B*N_masked, kt*p*p, c)
        rec = pred.float().reshape(masked.shape)
        if cfg.norm_pix_loss:
            rec = rec * (masked.var(dim=1, unbiased=True, keepdim=True).sqrt() + 1e-6) + masked.mean(1, keepdim=True)
        pixels[mask] = rec.flatten(1)
        return unpatchify(pixels, cfg).clamp(0, 1)

# 7. Fine-tuning: SVFAPClassifier -----------------------------------------------------------------------

class SVFAPClassifier(nn.Module):
    """TPSBT on all tokens, mean pooling over the last stage, LayerNorm, linear head (classes or regression)."""
    def __init__(self, cfg, num_outputs):
        super().__init__()
        self.cfg = cfg
        self.encoder = TPSBT(cfg)
        self.fc_norm = LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        with torch.no_grad():  # a small head keeps early fine-tuning from wrecking pre-trained features
            self.head.weight.mul_(0.001)
            self.head.bias.zero_()
        self._block_ids = {name: i + 1 for i, name in enumerate(self.encoder.block_names())}
        self.num_lr_layers = len(self._block_ids) + 2  # patch embedding, blocks, top

    def embed(self, video):
        """Clip features: pooled (B, C) after fc_norm, and the last stage's tokens (B, T_last*S, C)."""
        tokens = self.encoder(video).flatten(1, 2)
        return self.fc_norm(tokens.mean(dim=1)), tokens

    def forward(self, video):
        return self.head(self.embed(video)[0])  # (B, num_outputs)

    def lr_layer_id(self, name):
        """Layer for layer-wise lr decay: patch embedding 0, block i (release order) i+1, the rest on top."""
        m = re.match(r"encoder\.(stages\.\d+\.(?:blocks\.\d+|reverse_block))\.", name)
        return 0 if name.startswith("encoder.patch_embed") else self._block_ids[m[1]] if m else self.num_lr_layers - 1

# 8. Importing the authors' released checkpoints --------------------------------------------------------

def official_key_map(model, pretraining_layout):
    """{release key: our key} for each tensor of `model` a release checkpoint can hold. The release numbers blocks
    across stages (blocks.i), names stage s's downsamples.{s-1}; encoder keys start "encoder." in pre-training only."""
    pre, block_ids = "encoder." if pretraining_layout else "", {n: i for i, n in enumerate(model.encoder.block_names())}
    key_map = {}
    for k in model.state_dict():
        if m := re.match(r"encoder\.(stages\.\d+\.(?:blocks\.\d+|reverse_block))\.(.*)", k):
            key_map[f"{pre}blocks.{block_ids[m[1]]}.{m[2]}"] = k
        elif m := re.match(r"encoder\.stages\.(\d+)\.(temporal_pyramid\.conv|spatial_attention)\.(.*)", k):
            key_map[f"{pre}{m[2].split('_')[0]}_downsamples.{int(m[1]) - 1}.{m[3]}"] = k
        else:  # the patch embedding; fusion_norm is the release's "encoder.norm"; decoder and head keep their names
            key_map[re.sub(r"^encoder\.", pre, k).replace("fusion_norm.", "encoder.norm.")] = k
    return key_map

def load_official_state_dict(model, state_dict):
    """Load a release checkpoint (pre-training or fine-tuned; bare or in "model" / "module") into SVFAP/SVFAPClassifier.
    Returns (missing: our keys left initial, unused: release keys with no place); a shape mismatch raises ValueError."""
    state_dict = next((state_dict[k] for k in ("model", "module") if isinstance(state_dict.get(k), dict)), state_dict)
    src = {k.removeprefix("module."): v for k, v in state_dict.items()}  # saved from a DDP wrapper
    key_map = official_key_map(model, pretraining_layout=any(k.startswith("encoder.") for k in src))
    ours, pairs = model.state_dict(), [(k, dst) for k, dst in key_map.items() if k in src]
    for k, dst in pairs:
        if tuple(src[k].shape) != tuple(ours[dst].shape):
            raise ValueError(f"load_official_state_dict: {k} has shape {tuple(src[k].shape)} but {dst} in this model "
                             f"has {tuple(ours[dst].shape)}; does the checkpoint's preset match the model's config?")
    model.load_state_dict({dst: src[k] for k, dst in pairs}, strict=False)
    return sorted(set(ours) - {dst for _, dst in pairs}), sorted(set(src) - set(key_map))

# 9. Counting and benchmarking --------------------------------------------------------------------------

def count_macs(model, *inputs):
    """Multiply-accumulates of one forward (torch's flop counter total / 2, as fvcore counts). Attention runs on
    the math backend so that the counter sees its matrix products; the fused CPU kernel would count as zero."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(*inputs)
    return counter.get_total_flops() // 2

def sizes(cfg, num_outputs=7):
    """(params in M of the fine-tuning model, fine-tune GMACs, pre-train GMACs counted as the paper does)."""
    with torch.device("meta"):
        clf, pre = SVFAPClassifier(cfg, num_outputs), SVFAP(cfg)
        video = torch.empty(1, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size)
        mask = torch.zeros(1, cfg.num_patches, dtype=torch.bool)
    # the paper embeds all tubelets, masked ones too; we embed only the visible ones
    masked_embed = cfg.grid[0] * cfg.num_masked_spatial * cfg.patch_dim * cfg.embed_dim
    return (sum(p.numel() for p in clf.parameters()) / 1e6, count_macs(clf, video) / 1e9,
            (count_macs(pre, video, mask) + masked_embed) / 1e9)

VIT_BASELINE = dict(stage_depths=(12, 8, 4), temporal_pyramid=False, spatial_bottleneck=False)
# (label, preset or overrides of base, the paper's params M, fine-tune GMACs, pre-train GMACs)
PAPER_TABLE = [
    ("TPSBT-B (base)", {}, 77.6, 43.6, 12.9),
    ("TPSBT-S (small)", "small", 30.0, 18.0, None),
    ("ViT baseline (12,8,4)", VIT_BASELINE, 76.4, 76.9, 14.9),
    ("TP only (12,8,4)", dict(stage_depths=(12, 8, 4), spatial_bottleneck=False), 77.5, 53.1, 13.1),
    ("SBT only", dict(temporal_pyramid=False), 76.6, 49.9, 13.5),
    ("K = 4", dict(num_bottleneck_tokens=4), 77.6, 43.2, 12.6),
    ("K = 16", dict(num_bottleneck_tokens=16), 77.6, 44.4, 13.7),
    ("downsample avg", dict(temporal_downsample="avg"), 76.6, 43.3, 12.9),
    ("downsample max", dict(temporal_downsample="max"), 76.6, 43.3, 12.9),
    ("mask ratio 75%", dict(mask_ratio=0.75), 77.6, 43.6, 18.4),
    ("mask ratio 85%", dict(mask_ratio=0.85), 77.6, 43.6, 14.7),
    ("mask ratio 95%", dict(mask_ratio=0.95), 77.6, 43.6, 11.2),
]

def paper_gaps(label):
    """Our (params, fine-tune GMACs, pre-train GMACs) of a PAPER_TABLE row, the paper's, and the gaps in %."""
    over, *paper = next(row[1:] for row in PAPER_TABLE if row[0] == label)
    ours = sizes(CONFIGS[over] if isinstance(over, str) else replace(CONFIGS["base"], **over))
    return ours, paper, [100 * (o - p) / p if p else 0.0 for o, p in zip(ours, paper)]

def sizing_table():
    rows = [f"{'variant':24s} {'params M':>16s} {'fine-tune GMACs':>18s} {'pre-train GMACs':>18s}  worst gap"]
    for label, *_ in PAPER_TABLE:
        ours, paper, gaps = paper_gaps(label)
        cells = [f"{o:7.2f} ({p:5.1f})" if p else f"{o:7.2f} (   -  )" for o, p in zip(ours, paper)]
        rows.append(f"{label:24s} {cells[0]:>16s} {cells[1]:>18s} {cells[2]:>18s}  {max(gaps, key=abs):+.2f}%")
    return "\n".join(rows) + """
Ours (the paper's). MACs: torch.utils.flop_counter total / 2 (as fvcore counts), attention on the math SDPA
  backend so its products are counted; batch 1, 16x160x160; params of the fine-tuning model, 7 classes.
Pre-train GMACs include embedding the masked tubelets, as the paper counts (this code embeds only the
  visible ones: 0.57 GMACs less for base at 90%). 'SBT only': no faithful build gives the paper's GMACs
  (stages 2-3 run at full temporal length); we report the gap rather than bend the model."""

PEAK_TFLOPS = {"H100 PCIe": 756, "A100": 312, "H100": 989, "H200": 989, "L40S": 362, "RTX 4090": 165, "RTX 3090": 71}

def peak_tflops(device):
    """Dense bf16 peak TFLOP/s of a device (torch.device, "cuda:1", or a GPU's name) for MFU: the first key of
    PEAK_TFLOPS in its name (PCIe H100s clock lower). None for the CPU and unlisted GPUs (set peak_tflops then)."""
    name = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else str(device)
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)

class OpCount(TorchDispatchMode):
    """Counts the aten operator calls made under it: `calls`, and `work`, the calls that are not views."""
    calls = work = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls, self.work = self.calls + 1, self.work + (not func.is_view)
        return func(*args, **(kwargs or {}))

def bench_steps(cfg, device, batch, stage, steps=10, compile=False, dtype=torch.bfloat16, rounds=3):
    """Time training steps of SVFAP ("pretrain") or SVFAPClassifier ("finetune", drop path 0.1 as the recipes) on a
    synthetic batch: autocast to dtype (off for float32), fused AdamW, compiled if `compile` (True or backend). Returns
    {ms (per step, best round), clips_s, gmacs (forward/clip), mfu (None: no peak), peak_mb, ops (eager OpCount)}."""
    device = torch.device(device)
    cuda, pretrain = device.type == "cuda", stage == "pretrain"
    sync = torch.cuda.synchronize if cuda else lambda device: None  # timings wait for the queued GPU work
    video = torch.randn(batch, cfg.in_chans, cfg.num_frames, cfg.img_size, cfg.img_size, device=device)
    mask, labels = tube_mask(batch, cfg, device=device), torch.randint(7, (batch,), device=device)
    model = (SVFAP(cfg) if pretrain else SVFAPClassifier(replace(cfg, drop_path=0.1), 7)).to(device)
    macs = count_macs(model, video[:1], mask[:1]) if pretrain else count_macs(model, video[:1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # CPU and CUDA kernels since torch 2.4
    run = torch.compile(model, backend=compile if isinstance(compile, str) else "inductor") if compile else model
    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = run(video, mask)[0] if pretrain else F.cross_entropy(run(video), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    def seconds_per_step(n=steps):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        sync(device)
        return (time.perf_counter() - t0) / n
    seconds_per_step(3 if compile else 1)  # warm-up (and compilation)
    with (ops := None if compile else OpCount()) or contextlib.nullcontext():  # width and batch leave it unchanged
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    dt, peak = min(seconds_per_step() for _ in range(rounds)), peak_tflops(device)
    return dict(ms=1000 * dt, clips_s=batch / dt, gmacs=macs / 1e9,
                mfu=6 * macs * batch / dt / (peak * 1e12) if peak else None,  # training = 3 forwards
                peak_mb=torch.cuda.max_memory_allocated(device) / 2 ** 20 if cuda else None, ops=ops)

HOST = replace(CONFIGS["base"], img_size=64, embed_dim=64, bottleneck_hidden=16, decoder_dim=64, decoder_heads=8)

def bench(device="cpu", presets=(("tiny", 8, 8), ("small", 2, 2)), compiles=(False,), dtype=torch.float32,
          steps=2, rounds=2):
    """Print the time and (eager) operator calls of training steps for each (preset, pre-training batch, fine-tuning
    batch), and of fine-tuning against a ViT baseline of the same width: the paper's (12, 8, 4) for base, else the same
    blocks, no TP or SBT. Preset "host" is HOST: TPSBT-B at width 64, whose tiny steps take what the host spends."""
    where = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where} (peak {peak_tflops(device) or '-'} TFLOP/s), {dtype}, best of "
          f"{rounds} rounds of {steps} steps\n{'':46s} {'ms/step':>8s} {'clips/s':>8s} {'MFU':>6s} {'peak GB':>8s}"
          f"  operator calls (not views)")
    for name, pre_batch, ft_batch in presets:
        cfg = HOST if name == "host" else CONFIGS[name]
        vit = replace(cfg, **VIT_BASELINE if name == "base" else dict(temporal_pyramid=False, spatial_bottleneck=False))
        for compile in compiles:
            rows = [(f"{label}, batch {batch}, {'compiled' if compile else 'eager'}",
                     bench_steps(c, device, batch, stage, steps, compile, dtype, rounds))
                    for label, c, batch, stage in ((f"{name} pre-training", cfg, pre_batch, "pretrain"),
                                                   (f"{name} fine-tuning", cfg, ft_batch, "finetune"),
                                                   ("ViT baseline fine-tuning", vit, ft_batch, "finetune"))]
            for label, r in rows:
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "-"
                gb = f"{r['peak_mb'] / 1024:.2f}" if r["peak_mb"] else "-"
                ops = f"{r['ops'].calls} ({r['ops'].work})" if r["ops"] else "-"
                print(f"{label:46s} {r['ms']:8.1f} {r['clips_s']:8.1f} {mfu:>6s} {gb:>8s}  {ops}")
            (_, b), (_, v) = rows[1:]
            print(f"{name}: fine-tuning takes {b['ms'] / v['ms']:.2f}x the ViT baseline's time; MACs ratio "
                  f"{b['gmacs'] / v['gmacs']:.2f}" + (" (the paper's 43.6 / 76.9 = 0.57)" if name == "base" else ""))

if __name__ == "__main__":
    args = dict(a.lstrip("-").partition("=")[::2] for a in sys.argv[1:])  # --bench [--device=cuda]
    if "bench" not in args:
        print(sizing_table())
    elif args.get("device", "cpu") == "cpu":  # the host's share, eager and compiled; CPU step times
        bench(presets=(("host", 1, 1),), compiles=(False, True), dtype=torch.bfloat16, steps=10, rounds=5)
        bench()
    else:  # the host's share; TPSBT-B at the per-GPU batches of the 4-GPU recipes (256 / 4 pre-training, 96 / 4 ft)
        bench(args["device"], (("host", 1, 1), ("base", 64, 24)), (False, True), torch.bfloat16, steps=10, rounds=3)
