"""
Pre-trains SVFAP's TPSBT encoder by masked autoencoding of unlabelled face videos (sections 2-4 and 7 of the reference).

    python pretrain.py config/pretrain_demo.py                          # CPU demo, minutes
    python pretrain.py config/pretrain_demo.py --batch_size=8 --model_args.mask_ratio=0.75
    torchrun --standalone --nproc_per_node=4 pretrain.py config/pretrain_voxceleb2_base.py
    # 2 nodes x 4 GPUs (out_dir on a file system both see): the same command on both, NODE = 0 or 1
    torchrun --nnodes=2 --node_rank=NODE --nproc_per_node=4 --master_addr=IP_OF_NODE_0 --master_port=29500 \\
        pretrain.py config/pretrain_voxceleb2_base.py

Configuration, nanoGPT style: config files (config/*.py), --key=value and --model_args.FIELD=value (an SVFAPConfig
field) override the defaults below in order; a list key (finetune's `predict`) may repeat. batch_size: videos per
optimiser step over all processes and micro-steps (one recipe for any GPU count); lr = base_lr * batch_size *
repeated_sampling / 256. out_dir gets ckpt.pt (written atomically), log.jsonl (a line per log step and per save),
results.json and, per checkpoint, recon_iterNNNNNNN_*.mp4: original | masked input | reconstruction
("denorm-with-true-patch-stats": with norm_pix_loss, uses true patch stats the model never saw: flattering).
Resuming, mid-epoch too, on as many processes, gives the uninterrupted run's losses step for step.
"""

import argparse
import ast
import builtins
import contextlib
import datetime
import difflib
import json
import math
import os
import shutil
import sys
import time
import types
from collections import namedtuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

from data import VideoDataset, VideoReadError, atomic_path, device_transform, write_mp4
from model import (CONFIGS, SVFAP, SVFAPConfig, count_macs, no_weight_decay, peak_tflops as device_peak_tflops,
                   tube_mask, unpatchify)

# -----------------------------------------------------------------------------
# config: defaults for VoxCeleb2 pre-training of the base model (section 7); config files override them
_names_before_config = set(globals())
# I/O
out_dir = "out/pretrain"
init_from = "scratch"  # "scratch" | "resume" (continue from out_dir/ckpt.pt) | "auto" (resume if it exists)
ckpt_every = 0  # also save every N iterations (0: every ckpt_every_epochs epochs and at the end only)
ckpt_every_epochs = 1  # save at the end of every N-th epoch (and of the run)
log_interval = 10  # iterations between lines of out_dir/log.jsonl (the steps that read values back, with saves)
vis_clips = 4  # clips in the reconstruction video written with each checkpoint (0: none)
# data
train_list = "data/voxceleb2/pretrain.txt"  # "<path> 0" per line (section 8)
vis_list = ""  # clips shown in the reconstruction video; "" = the first readable lines of train_list
data_root = ""  # relative paths in the lists resolve against this ("" = the list file's folder)
replace_prefix = ()  # (old, new) rewrites absolute path prefixes: --replace_prefix="('/their/dir', '/my/dir')"
crop_box = ()  # (top, bottom, left, right) of the face in the stored frames; () = the whole frame
sampling_rate = 4  # take every 4th frame: 16 frames span a 64-frame window (1 for `data.py prepare` copies)
crop_scales = (1.0, 0.875, 0.75, 0.66)  # multi-scale crop of training clips; (1.0,) = flip only
repeated_sampling = 1  # clips drawn from each decoded video (each one is a sample of the batch)
num_workers = 8
max_fail_fraction = 0.05  # stop if more than this fraction of the videos cannot be decoded
# model
model = "base"  # a preset of model.CONFIGS: base | small | tiny
model_args = {}  # SVFAPConfig fields overriding the preset, e.g. dict(mask_ratio=0.75)
# optimisation
batch_size = 256  # videos per optimiser step, all processes and accumulation steps together
grad_accum = 1  # micro-steps per optimiser step
epochs = 100
max_iters = 0  # stop after this many iterations (0: run all epochs); the lr schedule still spans `epochs`
warmup_epochs = 5.0  # may be a fraction: warm-up is counted in iterations
base_lr = 3e-4  # lr = base_lr * clips per step / 256
min_lr = 1e-5  # the paper gives none for pre-training; 1e-5 is the release's default (VideoMAE's)
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.95
grad_clip = 0.0  # max gradient norm (0: no clipping; the norm is logged either way)
# system
device = "auto"  # "auto" (cuda if available) | "cpu" | "cuda"
dtype = "auto"  # "auto" (bfloat16 on CUDA, float32 on the CPU) | "float32" | "bfloat16" | "float16"
compile = False  # torch.compile the model (after wrapping it in DDP, so gradient all-reduce overlaps backward)
compile_mode = "default"  # torch.compile's: "default" | "reduce-overhead" (CUDA graphs) | "max-autotune-no-cudagraphs"
seed = 0
peak_tflops = 0.0  # the accelerator's dense bf16 peak for MFU; 0 = from the GPU's name (model.peak_tflops)
CONFIG_KEYS = [k for k in globals() if k not in _names_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------


def main(argv):
    t_start = time.time()
    c = load_config({k: globals()[k] for k in CONFIG_KEYS}, argv)
    check_lists(c, "train_list", "vis_list")
    checkpoint = resume_checkpoint(c)
    mc = (SVFAPConfig.from_dict(checkpoint["model_config"]) if checkpoint  # the shape it was trained with
          else build_model_config(c.model, c.model_args))
    d = setup(c)

    # data: items are (frames uint8 (k, T, 3, S, S), crop boxes (k, 5), tube masks (k, N)), k = repeated_sampling
    dataset = make_dataset(c, "train_list", "pretrain", mc, mask_cfg=mc, repeated_sampling=c.repeated_sampling)
    check_resumed(c, checkpoint, len(dataset))
    check_shared_memory(c, d, c.repeated_sampling * mc.num_frames * 3 * mc.img_size ** 2)
    vis = reconstruction_clips(c, mc, d) if d.master and c.vis_clips > 0 else None

    model = SVFAP(mc).to(d.device)
    clips_per_iter = c.batch_size * c.repeated_sampling
    lr = c.base_lr * clips_per_iter / 256
    # fused AdamW: one kernel for all parameters, on CUDA and (torch >= 2.4) on the CPU
    optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=lr, betas=(c.beta1, c.beta2), fused=True)
    if d.master:
        print(f"pre-training {c.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params) on "
              f"{len(dataset)} videos from {c.train_list}; {clips_per_iter} clips/step, lr {lr:.3g} = "
              f"{c.base_lr:g} x {clips_per_iter}/256")

    def loss_fn(net, batch):
        frames, boxes, mask = batch  # (b, k, T, 3, S, S) uint8, (b, k, 5), (b, k, N)
        video = device_transform(frames, boxes, mc.img_size).flatten(0, 1)  # (b*k, 3, T, S, S)
        return net(video, mask.flatten(0, 1))[0]

    def after_save(iter_num):
        if vis is not None:
            name = f"recon_iter{iter_num:07d}_{'denorm-with-true-patch-stats' if mc.norm_pix_loss else 'plain'}.mp4"
            write_mp4(os.path.join(c.out_dir, name), reconstruction_frames(model, *vis), fps=6)  # slow enough to watch

    epochs_done, loss = fit(c, d, model, optimizer, lr, dataset, loss_fn, checkpoint, clips_per_iter,
                            after_save=after_save, extra_state=lambda: {"train_videos": len(dataset)})
    if d.master:  # wall time of this process (start-up and training); metrics.py --summary reads it
        write_json(os.path.join(c.out_dir, "results.json"),
                   {"epochs": epochs_done, "last_loss": loss, "wall_time_s": time.time() - t_start})
        print(f"done: {epochs_done:g} epochs; checkpoint {c.out_dir}/ckpt.pt, log {c.out_dir}/log.jsonl")


def reconstruction_clips(c, mc, d):
    """The first vis_clips readable clips of vis_list (or train_list), broken files skipped, and a fixed tube mask."""
    ds = make_dataset(c, "vis_list" if c.vis_list else "train_list", "eval", mc, num_clips=1, num_crops=1)
    clips = []
    for i in range(min(len(ds), 20 * c.vis_clips)):  # bounded: the other ranks wait in DDP's set-up meanwhile
        if len(clips) == c.vis_clips:
            break
        try:
            clips.append(ds[i][0][0])  # (T, 3, H, W) uint8
        except VideoReadError as e:
            print(f"note: reconstruction video: skipping an unreadable clip: {e}", flush=True)
    if not clips:
        return None
    video = device_transform(torch.stack(clips).to(d.device), None, mc.img_size)  # (n, 3, T, H, W)
    return video, tube_mask(len(clips), mc, generator=torch.Generator().manual_seed(c.seed)).to(d.device)


def reconstruction_frames(model, video, mask):
    """uint8 (T, rows, cols, 3): one row per clip, original | masked input | reconstruction."""
    cfg, was_training = model.cfg, model.training
    model.eval()  # no drop path: the picture shows the model, and the training generators stay untouched
    with torch.no_grad():
        recon = model.reconstruct(video, model(video, mask)[1], mask).float()  # (B, 3, T, H, W) in [0, 1]
    model.train(was_training)
    original = (video.float() * model.std + model.mean).clamp(0, 1)
    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, cfg.patch_dim), cfg)  # (B, 3, T, H, W): each token's pixels
    masked = torch.where(pixel_mask, 0.5, original)  # grey where masked
    frames = torch.cat(list(torch.cat([original, masked, recon], dim=-1)), dim=-2)  # (3, T, B*H, 3W)
    scale = max(1, 128 // cfg.img_size)  # tiny demo clips get bigger pixels
    frames = frames.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    frames = frames[..., : frames.shape[-2] // 2 * 2, : frames.shape[-1] // 2 * 2]  # H.264 wants even sizes
    return (frames.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()


# ====== shared with finetune.py: configuration, processes and precision, data, the training loop, checkpoints ======


class ConfigError(ValueError):
    """A bad setting or input found before (or while setting up) training: printed as one line, exit code 2."""


class NonFiniteLoss(RuntimeError):
    """A non-finite loss or gradient norm: its step was skipped on the device; the run stops at the next read, exit 3"""


def typed(key, value, default, source):
    """value as the type of the key's default, or ConfigError (no silent conversions: 1 is not a bool)."""
    kind = {float: (int, float), tuple: (tuple, list), list: (tuple, list)}.get(type(default), (type(default),))
    if not isinstance(value, kind) or (isinstance(value, bool) and not isinstance(default, bool)):
        names = {bool: "True or False", int: "an integer", float: "a number", str: "a string",
                 tuple: "a tuple, e.g. (1, 2)", list: "a list", dict: "a dict"}
        hint = f"; on the command line write --{key}.FIELD=VALUE" if isinstance(default, dict) else ""
        raise ConfigError(f"{source}: {key} must be {names.get(type(default), type(default).__name__)}, got "
                          f"{value!r} ({type(value).__name__}){hint}")
    return type(default)(value) if isinstance(default, (float, tuple, list)) else value


def literal(text):
    """A command-line value as Python reads it, true / false as booleans; else the text, which typed() reports."""
    with contextlib.suppress(ValueError, SyntaxError):
        return ast.literal_eval(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def unknown_key(key, valid, source):
    close = difflib.get_close_matches(key, valid, n=1)
    return ConfigError(f"{source}: unknown config key {key!r}" +
                       (f"; did you mean {close[0]}?" if close else "; see the config block at the top of the script"))


def load_config(defaults, argv):
    """The defaults overridden, in order, by config files and --key=value arguments (see the docstring)."""
    c = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):  # a config file: plain assignments, which may read earlier values
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg} not found (arguments without -- are config files)")
            namespace = dict(c)
            with open(arg) as f:  # builtins.compile: `compile` is a config key here
                exec(builtins.compile(f.read(), arg, "exec"), namespace)
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and not isinstance(value, types.ModuleType):
                    if key not in c:
                        raise unknown_key(key, list(c), arg)
                    c[key] = typed(key, value, defaults[key], arg)
            continue
        key, sep, text = arg[2:].partition("=")
        key, dot, field = key.partition(".")
        if not sep:
            raise ConfigError(f"argument {arg!r}: write --{key}=VALUE")
        if key not in defaults:
            raise unknown_key(key, list(defaults), f"argument {arg!r}")
        if dot and not isinstance(defaults[key], dict):
            raise ConfigError(f"argument {arg!r}: {key} is not a dict, so {key}.{field} means nothing")
        value = text if isinstance(defaults[key], (str, list)) else literal(text)
        if dot:  # --model_args.mask_ratio=0.75: one entry of a dict key, checked when the model is built
            value = {**c[key], field: value}
        elif isinstance(defaults[key], list):  # repeatable: --predict=a.mp4 --predict=b.mp4
            value = c[key] + [text]
        c[key] = typed(key, value, defaults[key], f"argument {arg!r}")
    return types.SimpleNamespace(**c)


def build_model_config(preset, model_args, base=None):
    """SVFAPConfig of a CONFIGS preset (or of the dict `base`, e.g. a checkpoint's) with model_args on top."""
    if base is None and preset not in CONFIGS:
        raise ConfigError(f"model={preset!r} is not a preset of model.CONFIGS; valid: {', '.join(CONFIGS)}")
    fields = dict(base or CONFIGS[preset].to_dict())
    for field, value in model_args.items():
        if field not in fields:
            raise unknown_key(field, list(fields), "model_args (SVFAPConfig fields)")
        fields[field] = typed(f"model_args.{field}", value, fields[field], "model_args")
    try:
        return SVFAPConfig.from_dict(fields)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_lists(c, required, *optional):
    """The annotation lists must exist before anything starts (a typo should not cost a DDP start-up)."""
    if not getattr(c, required):
        raise ConfigError(f"{required} is empty; give the path of an annotation list (\"<video> <label>\" per line)")
    for key in (required, *optional):
        if getattr(c, key) and not os.path.isfile(getattr(c, key)):
            raise ConfigError(f"{key}={getattr(c, key)}: annotation file not found")


def resume_checkpoint(c, init_paths=""):
    """out_dir/ckpt.pt for init_from=resume (auto: if it exists), else None; init_paths: what else init_from may be."""
    if c.init_from not in ("scratch", "resume", "auto") and not (init_paths and os.path.isfile(c.init_from)):
        raise ConfigError(f"init_from={c.init_from!r}: valid values are scratch, resume, auto" +
                          (f" or the path of {init_paths} (no such file)" if init_paths else ""))
    path = os.path.join(c.out_dir, "ckpt.pt")
    if c.init_from == "auto" and init_paths and not os.path.isfile(path):  # random weights are rarely meant here
        raise ConfigError(f"init_from=auto: {path} does not exist yet; start with init_from=<{init_paths}> (a run "
                          f"whose out_dir/ckpt.pt exists then continues by itself) or init_from=scratch")
    # one command for the first start, torchrun --max-restarts and a requeued job; a fine-tuning run continues too
    if c.init_from == "auto" or (init_paths and c.init_from != "scratch" and os.path.isfile(path)):
        if os.environ.get("RANK", "0") == "0" and c.init_from != "resume":
            print(f"init_from={c.init_from}: {'resuming from' if os.path.isfile(path) else 'starting afresh, no'} "
                  f"{path}")
        c.init_from = "resume" if os.path.isfile(path) else "scratch"
    if c.init_from == "resume" and not os.path.isfile(path):
        raise ConfigError(f"init_from=resume continues from out_dir/ckpt.pt, but {path} does not exist")
    return load_checkpoint(path) if c.init_from == "resume" else None


def check_resumed(c, checkpoint, train_videos):
    """A resumed run keeps what fixes its model, data order and lr schedule's steps, or stops with one line."""
    keys = ("batch_size", "epochs", "warmup_epochs", "repeated_sampling", "seed", "model", "model_args")
    now = {k: getattr(c, k) for k in keys if hasattr(c, k)} | dict(train_videos=train_videos)
    saved = {**checkpoint["config"], "train_videos": checkpoint.get("train_videos", train_videos)} if checkpoint else {}
    for key, value in now.items():
        if (was := saved.get(key, value)) != value:
            raise ConfigError(f"init_from=resume: {key}={value}, but {c.out_dir}/ckpt.pt was trained with {key}={was}, "
                              f"which fixes its model, data order and lr schedule: resume with {key}={was}, or "
                              f"start afresh in another out_dir")


def make_dataset(c, key, mode, mc, **kw):
    """data.VideoDataset of config key `key`'s list; a bad list, or 10 unreadable first training files: ConfigError."""
    try:
        ds = VideoDataset(getattr(c, key), mode, img_size=mc.img_size, num_frames=mc.num_frames,
                          sampling_rate=c.sampling_rate, crop_box=tuple(c.crop_box) or None, seed=c.seed,
                          root=c.data_root or None, replace_prefix=tuple(c.replace_prefix) or None,
                          max_fail_fraction=c.max_fail_fraction, crop_scales=tuple(c.crop_scales), **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if mode != "eval" and len(bad := ds.unreadable(range(min(10, len(ds))))) == min(10, len(ds)):
        raise ConfigError(f"{key}={getattr(c, key)}: none of its first {len(bad)} entries can be read, so training "
                          f"would only skip files; line {bad[0][0]}: {bad[0][2]}")
    return ds


def count_broken(loader, seen):
    """The loader's batches less their last field, each item's broken files, added up in seen = [broken, tried]."""
    ds = loader.dataset
    for *batch, broken in loader:
        broken = int(broken.numpy().sum())  # a CPU tensor from the workers: no device read, no torch op
        seen[0], seen[1] = seen[0] + broken, seen[1] + len(batch[0]) + broken
        if seen[0] > ds.max_fail_fraction * max(seen[1], ds.fail_floor):  # over all workers: the same for any count
            raise ConfigError(f"{seen[0]} of the {seen[1]} files tried from {ds.annotation_file} were unreadable, "
                              f"more than max_fail_fraction={ds.max_fail_fraction}; check data_root and crop_box")
        yield batch


# --- processes, devices, precision ----------------------------------------------
Dist = namedtuple("Dist", "ddp rank local_rank world_size device master dtype")


def setup(c, training=True):
    """Device, dtype, torchrun process group (NCCL on CUDA, else gloo), out_dir; training=False: no batch_size check."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available; use device=cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device={name!r}: valid values are auto, cpu, cuda, cuda:N")
    cuda_bf16 = c.dtype == "auto" and name.startswith("cuda") and torch.cuda.is_bf16_supported()  # asked: auto only
    auto = torch.bfloat16 if cuda_bf16 else torch.float32
    dtype = {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(c.dtype)
    if dtype is None:
        raise ConfigError(f"dtype={c.dtype!r}: valid values are auto, float32, bfloat16, float16")
    if c.compile_mode not in (modes := ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")):
        raise ConfigError(f"compile_mode={c.compile_mode!r}: valid values are {', '.join(modes)}")
    at_least_1 = ("log_interval", "ckpt_every_epochs", "eval_every", "repeated_sampling")  # (the keys a script has)
    if bad := [k for k in at_least_1 if getattr(c, k, 1) < 1]:
        raise ConfigError(f"{bad[0]}={getattr(c, bad[0])} must be at least 1")
    ddp = "RANK" in os.environ
    rank, local_rank, world = (int(os.environ.get(k, 0)) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp \
        else (0, 0, 1)
    if training and (c.batch_size < 1 or c.grad_accum < 1 or c.batch_size % (world * c.grad_accum)):
        raise ConfigError(f"batch_size={c.batch_size} must be a positive multiple of world_size x grad_accum = "
                          f"{world} x {c.grad_accum} = {world * c.grad_accum}")
    device = torch.device("cuda", local_rank if ddp else torch.device(name).index or 0) if name.startswith("cuda") \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if ddp:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    os.makedirs(c.out_dir, exist_ok=True)
    torch.manual_seed(c.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    return Dist(ddp, rank, local_rank, world, device, rank == 0, dtype)


def check_shared_memory(c, d, train_item_bytes, eval_batch_bytes=0):
    """Stop if the batches this node's DataLoader workers prefetch (2 each) overflow /dev/shm; warn below twice that."""
    batch = c.batch_size // (d.world_size * c.grad_accum) * train_item_bytes + eval_batch_bytes
    need = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * c.num_workers * 2 * batch
    free = shutil.disk_usage("/dev/shm").free if need and os.path.isdir("/dev/shm") else math.inf
    what = (f"{os.environ.get('LOCAL_WORLD_SIZE', 1)} process(es) x {c.num_workers} workers x 2 batches x "
            f"{batch / 1e6:.1f} MB = {need / 1e6:.1f} MB in /dev/shm, which has {free / 1e6:.1f} MB free")
    if need > free:
        raise ConfigError(f"the data loaders need {what}: enlarge it (docker run --shm-size="
                          f"{math.ceil(2 * need / 1e9)}g) or lower num_workers")
    if 2 * need > free and d.local_rank == 0:
        print(f"warning: the data loaders need {what}: less than twice that, so a larger /dev/shm is safer", flush=True)


def autocast(d):
    return contextlib.nullcontext() if d.dtype == torch.float32 else torch.autocast(d.device.type, dtype=d.dtype)


# --- optimisation -----------------------------------------------------------------
def lr_at(it, lr, min_lr, warmup_iters, total_iters):
    """Linear warm-up to lr over warmup_iters, then cosine decay to min_lr at total_iters (per iteration)."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay, layer_decay=1.0, head_lr_scale=1.0):
    """AdamW groups: weight decay only on weight matrices and kernels (model.no_weight_decay); layer_decay < 1 (fine-
    tuning): a group per model.lr_layer_id, lr_scale decaying from the top, times head_lr_scale on fc_norm and head."""
    groups = {}
    for name, p in model.named_parameters():
        decay = not no_weight_decay(name, p)
        layer = model.lr_layer_id(name) if layer_decay != 1.0 else 0
        head = name.startswith(("head.", "fc_norm."))
        scale = (layer_decay ** (model.num_lr_layers - 1 - layer) if layer_decay != 1.0 else 1.0) * \
            (head_lr_scale if head else 1.0)
        groups.setdefault((layer, decay, head), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                 "lr_scale": scale, "layer": layer})["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# --- the training loop -------------------------------------------------------------------
def fit(c, d, model, optimizer, lr, dataset, loss_fn, checkpoint, clips_per_iter,
        after_save=lambda iter_num: None, after_epoch=None, extra_state=dict):
    """Train from `checkpoint` (or anew) to c.epochs or c.max_iters; after_epoch(epoch, iter_num, last) runs per epoch,
    after_save(iter_num) per save (rank 0); extra_state() adds to checkpoints. Returns (epochs, last logged loss)."""
    micro_batch = c.batch_size // (d.world_size * c.grad_accum)
    n_iter_epoch = len(dataset) // (d.world_size * micro_batch * c.grad_accum)
    if n_iter_epoch == 0:
        raise ConfigError(f"{len(dataset)} training videos make less than one batch: batch_size must be at most "
                          f"{len(dataset) // (d.world_size * c.grad_accum) * d.world_size * c.grad_accum} here")
    total_iters = c.epochs * n_iter_epoch
    stop_iter = min(total_iters, c.max_iters or total_iters)
    scaler = torch.amp.GradScaler(d.device.type, enabled=d.dtype == torch.float16)  # on the CPU too: torch >= 2.3
    ckpt_path, log_path = os.path.join(c.out_dir, "ckpt.pt"), os.path.join(c.out_dir, "log.jsonl")
    iter_num = restore(checkpoint, model, optimizer, scaler, c, d, stop_iter)
    peak = c.peak_tflops or device_peak_tflops(d.device)
    clip = torch.zeros(1, model.cfg.in_chans, model.cfg.num_frames, model.cfg.img_size, model.cfg.img_size)
    example = (clip, tube_mask(1, model.cfg, generator=torch.Generator())) if hasattr(model, "decoder") else (clip,)
    macs_per_clip = count_macs(model.eval(), *(x.to(d.device) for x in example)) if peak else 0  # eval: no randomness
    model.train()  # every training step in training mode, whatever ran before
    ddp = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None,
                                  broadcast_buffers=False) if d.ddp else None  # the buffers are fixed tables
    net = torch.compile(ddp or model, mode=c.compile_mode) if c.compile else ddp or model  # DDP first: see compile
    if d.master:
        print(f"{d.world_size} process(es) on {d.device.type}, {str(d.dtype)[6:]}; batch {c.batch_size} = "
              f"{d.world_size} processes x {c.grad_accum} micro-steps x {micro_batch}; {n_iter_epoch} iterations/"
              f"epoch, {total_iters} in {c.epochs} epochs, stopping at {stop_iter}; starting at {iter_num}")

    def save():
        mine = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None}
        rngs = [mine] * d.world_size
        if d.ddp:  # a collective: every rank takes part
            dist.all_gather_object(rngs, mine)
        if d.master:
            with atomic_path(ckpt_path) as tmp:  # renamed when written: a crash while saving keeps the last one
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": iter_num,
                            "scaler": scaler.state_dict(), "config": vars(c), "model_config": model.cfg.to_dict(),
                            "rng": rngs, **extra_state()}, tmp)
            after_save(iter_num)

    seen, saved = [0, 0], iter_num  # [broken, tried] training files over the run (count_broken); last checkpoint's iter
    bar = tqdm(total=stop_iter, initial=iter_num, disable=not d.master, desc="train", dynamic_ncols=True)
    # MFU = 6 x MACs per clip (training ~ 3 forwards, 2 FLOPs per MAC) x clips/s per device / peak FLOP/s
    log = Interval(d, clips_per_iter, 6 * macs_per_clip / d.world_size / (peak * 1e12) if peak else 0)
    indices = epoch_indices(dataset, d, c, n_iter_epoch, c.grad_accum * micro_batch, iter_num)  # with their epochs
    loader = DataLoader(dataset, micro_batch, sampler=indices, num_workers=c.num_workers, generator=torch.Generator(),
                        pin_memory=d.device.type == "cuda", drop_last=True)  # generator: else it draws torch's seed
    batches = count_broken(loader, seen)  # one loader, one set of workers, for the run
    batch = log.fetch(batches)
    while iter_num < stop_iter:
        epoch = iter_num // n_iter_epoch
        it_lr = lr_at(iter_num, lr, c.min_lr, round(c.warmup_epochs * n_iter_epoch), total_iters)
        for group in optimizer.param_groups:
            group["lr"] = it_lr * group["lr_scale"]
        batch, loss, grad_norm = train_step(net, ddp, optimizer, scaler, loss_fn, batch, batches, c, d, log)
        log.pending.append((iter_num := iter_num + 1, loss, grad_norm))  # read by log.check()
        bar.update(1)
        logs, saves = iter_num % c.log_interval == 0 or iter_num == stop_iter, iter_num == stop_iter or \
            iter_num % (n_iter_epoch * c.ckpt_every_epochs) == 0 or (c.ckpt_every and iter_num % c.ckpt_every == 0)
        if (logs or saves or iter_num % n_iter_epoch == 0) and (bad := log.check()):  # nothing written after it
            raise NonFiniteLoss(f"{bad[1]} at iteration {bad[0]} (epoch {(bad[0] - 1) // n_iter_epoch + 1}); stopped "
                                f"without saving: " + (f"the last good checkpoint {ckpt_path} (iteration {saved}) is "
                                                       f"untouched" if saved else "no checkpoint had been written yet"))
        if logs:
            record = log.read(iter_num, epoch, it_lr, scaler)
            if d.master:
                log_json(log_path, record)
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{it_lr:.2e}", clips_s=f"{record['clips_per_s']:.1f}")
        t = time.perf_counter()  # evaluation and checkpoints are timed apart from the steps
        if iter_num % n_iter_epoch == 0 and after_epoch:
            after_epoch(epoch + 1, iter_num, iter_num == stop_iter)  # epochs count from 1 in reports
        t_eval = time.perf_counter()
        if saves:
            save()
            saved = iter_num
            if d.master:
                log_json(log_path, {"iter": iter_num, "eval_s": t_eval - t, "save_s": time.perf_counter() - t_eval})
        log.pause += time.perf_counter() - t
    bar.close()
    return iter_num / n_iter_epoch, log.last_loss


def epoch_indices(dataset, d, c, n_iter_epoch, per_iter, iter_num):
    """(epoch, index) pairs of this rank from iteration iter_num on, per_iter an iteration, each epoch in the order of
    DistributedSampler for (seed, epoch): items draw from (seed, epoch, index), so one loader serves every epoch."""
    for epoch in range(iter_num // n_iter_epoch, c.epochs):
        sampler = DistributedSampler(dataset, d.world_size, d.rank, shuffle=True, seed=c.seed, drop_last=True)
        sampler.set_epoch(epoch)
        first = max(0, iter_num - epoch * n_iter_epoch) * per_iter  # a resumed run skips what was done
        yield from ((epoch, i) for i in list(sampler)[first:n_iter_epoch * per_iter])


def restore(checkpoint, model, optimizer, scaler, c, d, stop_iter):
    """A resumed run's state, each rank's generator included, and its log cut at its iteration; returns that."""
    iter_num, log_path = checkpoint["iter_num"] if checkpoint else 0, os.path.join(c.out_dir, "log.jsonl")
    if checkpoint and iter_num >= stop_iter:  # a finished run started again: its log and results stay as they are
        raise ConfigError(f"{c.out_dir}/ckpt.pt is at iteration {iter_num}, where this run stops ({stop_iter}): "
                          f"nothing to train (a run stopped early by max_iters goes on with a larger max_iters)")
    if d.master and os.path.isfile(log_path):  # a new run empties it unread; a killed run's half-written line goes
        with open(log_path) as f:
            lines = [ln for ln in f if checkpoint and ln.endswith("\n") and json.loads(ln).get("iter", 0) <= iter_num]
        with open(log_path, "w") as f:
            f.writelines(lines)
    for part, obj in (("model", model), ("optimizer", optimizer), ("scaler", scaler)) if checkpoint else ():
        obj.load_state_dict(checkpoint[part] or obj.state_dict())  # {}: a scaler saved unused (not float16)
    rngs = checkpoint["rng"] if checkpoint else []
    if len(rngs) == d.world_size:
        torch.set_rng_state(rngs[d.rank]["torch"])
        if d.device.type == "cuda" and rngs[d.rank]["cuda"] is not None:  # None: saved on the CPU
            torch.cuda.set_rng_state(rngs[d.rank]["cuda"])
    else:  # a new run (iteration 0), or a resumed one on another number of processes
        torch.manual_seed(c.seed + d.rank + 1000 * iter_num)
        if checkpoint and d.master:
            print(f"note: the checkpoint holds generator states of {len(checkpoint['rng'])} processes, this run "
                  f"has {d.world_size}: reseeding, so the run will not repeat the original exactly")
    return iter_num


def train_step(net, ddp, optimizer, scaler, loss_fn, batch, batches, c, d, log):
    """One optimiser step over grad_accum micro-batches; returns (the next batch, the loss, the gradient norm), unread
    on the device. A non-finite loss or norm skips the step there (found_inf; float16: the scaler's); check() tells."""
    loss_sum = torch.zeros((), device=d.device)
    for micro_step in range(c.grad_accum):
        if d.ddp:  # all-reduce the gradients on the last micro-step only
            ddp.require_backward_grad_sync = micro_step == c.grad_accum - 1
        log.ready()  # the compute stream waits for this batch's copies here, not before
        with autocast(d):
            loss = loss_fn(net, batch)
        batch = log.fetch(batches)  # its copies overlap this backward
        scaler.scale(loss / c.grad_accum).backward()
        loss_sum += loss.detach().float()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])  # torch >= 2.6
    if c.grad_clip > 0:  # clip_grad_norm_ with no limit would multiply every gradient by 1
        torch.nn.utils.clip_grads_with_norm_(net.parameters(), c.grad_clip, grad_norm)
    loss = loss_sum / c.grad_accum
    if d.ddp:
        dist.all_reduce(loss)  # gloo has no AVG
        loss /= d.world_size
    if not scaler.is_enabled():  # the same on every rank: the gradients and the loss are all-reduced
        optimizer.found_inf = (~(torch.isfinite(loss) & torch.isfinite(grad_norm))).float()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return batch, loss, grad_norm


class Interval:
    """The log's mean loss, clips/s, data wait and MFU (mfu_per_clip_s: that of 1 clip/s; 0: none) since the last log
    line, evaluation and checkpoints excluded; the steps' losses and gradient norms wait on the device for check()."""

    def __init__(self, d, clips_per_iter, mfu_per_clip_s):
        self.d, self.clips_per_iter, self.mfu_per_clip_s = d, clips_per_iter, mfu_per_clip_s
        self.fp16, self.bad, self.last_loss, self.pending, self.batch = d.dtype == torch.float16, 0, None, [], None
        self.stream = torch.cuda.Stream(d.device) if d.device.type == "cuda" else None  # for the batches' copies
        self.reset()

    def reset(self):
        self.losses, self.iters, self.skipped, self.grad_norm = [], 0, 0, math.nan
        self.wait, self.pause, self.t0 = 0.0, 0.0, time.perf_counter()

    def fetch(self, batches):
        """The next batch (None after the last), its copies to the device issued; the time taken is data wait. On CUDA
        they run on a side stream: on the compute stream they would hold up the backward queued after them."""
        t, batch = time.perf_counter(), next(batches, None)
        with torch.cuda.stream(self.stream):  # None (the CPU): a no-op
            self.batch = None if batch is None else [x.to(self.d.device, non_blocking=True) for x in batch]
        self.wait += time.perf_counter() - t
        return self.batch

    def ready(self):
        """Where the fetched batch is first used: CUDA's compute stream waits for its copies, keeping their memory."""
        if self.stream is not None and self.batch is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            for x in self.batch:
                x.record_stream(torch.cuda.current_stream())

    def check(self):
        """Reads the pending steps' losses and gradient norms at once; (iteration, why) of the first that stops the run:
        any non-finite one, in float16 the 5th non-finite loss in a row (the scaler skipped and counted the others)."""
        steps, self.pending = self.pending, []
        values = torch.stack([torch.stack(step[1:]) for step in steps]).tolist() if steps else []  # (steps, 2)
        for (it, _, _), (loss, norm) in zip(steps, values):
            self.iters += 1
            self.bad = 0 if math.isfinite(loss) and (self.fp16 or math.isfinite(norm)) else self.bad + 1
            if self.bad and (not self.fp16 or self.bad == 5):
                what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
                return it, f"non-finite {what} ({value})" + (" for 5 steps in a row" if self.fp16 else "")
            self.losses += [loss] if math.isfinite(loss) else []
            self.skipped, self.grad_norm = self.skipped + (not math.isfinite(norm)), norm

    def read(self, iter_num, epoch, lr, scaler):
        dt = time.perf_counter() - self.t0 - self.pause
        self.last_loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
        clips_per_s = self.iters * self.clips_per_iter / dt
        record = {"iter": iter_num, "epoch": epoch + 1, "loss": self.last_loss, "lr": lr, "grad_norm": self.grad_norm,
                  "clips_per_s": clips_per_s, "data_wait": self.wait / dt, "skipped_steps": self.skipped}
        if self.mfu_per_clip_s:
            record["mfu"] = clips_per_s * self.mfu_per_clip_s
        if self.skipped and self.d.master:
            tqdm.write(f"iteration {iter_num}: {self.skipped} step(s) skipped by the float16 gradient scaler "
                       f"(the gradients overflowed; scale now {scaler.get_scale():g})")
        self.reset()
        return record


# --- checkpoints, logs, the command line -----------------------------------------------------------
def load_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint from elsewhere cannot run code when loaded."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # the release's arguments only; torch >= 2.5
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file or pickled objects beyond tensors and plain values
        raise ConfigError(f"checkpoint {path} cannot be loaded safely: {str(e).splitlines()[0]}") from None


def log_json(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path, obj):
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)


def run(main, argv, script, doc="", defaults=None):
    """Run main(argv); a ConfigError, VideoReadError or NonFiniteLoss ends it with one line (torchrun: "rank N: ", each
    reason once) and exit code 2 or 3. -h / --help prints the docstring and the config keys with their defaults."""
    if "-h" in argv or "--help" in argv:
        print(doc.strip() + "\n\nconfig keys (defaults):\n" + "\n".join(f"  {k} = {v!r}" for k, v in defaults.items()))
        return
    try:
        main(argv)
        if dist.is_initialized():
            dist.barrier()  # every rank is done before any tears its connections down
    except (ConfigError, NonFiniteLoss, VideoReadError) as e:  # a data error from a worker ends in the original's line
        message, rank = str(e).strip().splitlines()[-1], os.environ.get("RANK", "0")
        if not said_by_rank_0(message, rank):  # under torchrun every rank stops; one line per different reason
            print(f"{script}: error: " + (f"rank {rank}: " if os.environ.get("WORLD_SIZE", "1") != "1" else "")
                  + message, file=sys.stderr, flush=True)
        sys.exit(3 if isinstance(e, NonFiniteLoss) else 2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def said_by_rank_0(message, rank):
    """Whether rank 0 stopped with this message (then only it prints), posted in torchrun's store; others wait 5 s."""
    with contextlib.suppress(Exception):  # no store (not torchrun), or rank 0 did not stop: say it here
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              timeout=datetime.timedelta(seconds=5))
        key = f"svfap_error_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # each restart afresh
        if rank != "0":
            return store.get(key).decode() == message  # waits for the key
        store.set(key, message)
    return False


if __name__ == "__main__":
    run(main, sys.argv[1:], "pretrain.py", __doc__, {k: globals()[k] for k in CONFIG_KEYS})
