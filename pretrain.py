"""
Masked facial-video autoencoding: pre-trains SVFAP's TPSBT encoder on unlabelled face videos
(sections 2-4 and 7 of the reference).

    python pretrain.py config/pretrain_demo.py                          # CPU demo, minutes
    python pretrain.py config/pretrain_demo.py --batch_size=8 --model_args.mask_ratio=0.75
    torchrun --standalone --nproc_per_node=4 pretrain.py config/pretrain_voxceleb2_base.py
    # 2 nodes x 4 GPUs: the same command on both nodes, NODE = 0 on the first and 1 on the second
    torchrun --nnodes=2 --node_rank=NODE --nproc_per_node=4 --master_addr=IP_OF_NODE_0 --master_port=29500 \
        pretrain.py config/pretrain_voxceleb2_base.py

Configuration, nanoGPT style: the globals in the "config" block below are the defaults. The arguments
are applied in order: a path is a Python config file of plain assignments (config/*.py), `--key=value`
sets one key (the value is read as a Python literal, or taken as a string for string keys), and
`--model_args.FIELD=value` sets one SVFAPConfig field on top of the preset named by `model`. Unknown keys
and values of the wrong type are errors. A list key such as finetune.py's `predict` grows by one item per
`--predict=...`.

Batch size and learning rate: `batch_size` is the number of videos per optimiser step summed over all
processes and accumulation steps, so a recipe means the same on 1 or 8 GPUs; each process loads
batch_size / (world_size * grad_accum) videos per micro-step. lr = base_lr * clips per step / 256, where
clips per step = batch_size * repeated_sampling.

Outputs in out_dir: ckpt.pt (the latest checkpoint, written atomically), log.jsonl (one JSON object per
logged iteration), results.json at the end (iterations, last loss, wall time), and with each checkpoint
recon_iterNNNNNNN_*.mp4: validation clips as original | masked input | reconstruction. With norm_pix_loss
the reconstruction is de-normalised with the true patches' mean and std (the file name says
"denorm-with-true-patch-stats"): that uses information the model never saw, so the picture flatters the
model.

`--init_from=resume` continues from out_dir/ckpt.pt at the iteration where it stopped, mid-epoch too, and
gives the losses the uninterrupted run would have given: the data order depends only on (seed, epoch),
each clip's random crop / flip / tube mask only on (seed, epoch, index), and the checkpoint holds every
process's random generator states. out_dir must be on a file system every node sees.

This file also holds the helpers finetune.py imports: config parsing, DDP set-up, the lr schedule, AdamW
parameter groups, checkpoints, the data loader, logging and the train step.
"""

import argparse
import ast
import builtins
import contextlib
import difflib
import hashlib
import json
import math
import os
import random
import sys
import time
from collections import namedtuple
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm import tqdm

from data import VideoDataset, write_mp4
from model import CONFIGS, IMAGENET_MEAN, IMAGENET_STD, SVFAP, SVFAPConfig, count_macs, no_weight_decay, tube_mask

# -----------------------------------------------------------------------------
# config: defaults for VoxCeleb2 pre-training of the base model (section 7); config files override them
_names_before_config = set(globals())
# I/O
out_dir = "out/pretrain"
init_from = "scratch"  # "scratch" | "resume" (continue from out_dir/ckpt.pt)
ckpt_every = 0  # also save every N iterations (0: at the end of every epoch and of the run only)
log_interval = 10  # iterations between lines of out_dir/log.jsonl
vis_clips = 4  # clips in the reconstruction video written with each checkpoint (0: none)
# data
train_list = "data/voxceleb2/pretrain.txt"  # "<path> 0" per line (section 8)
vis_list = ""  # clips shown in the reconstruction video; "" = the first lines of train_list
data_root = ""  # relative paths in the lists resolve against this ("" = the list file's folder)
replace_prefix = ()  # (old, new) rewrites absolute path prefixes: --replace_prefix="('/their/dir', '/my/dir')"
crop_box = ()  # (top, bottom, left, right) of the face in the stored frames; () = the whole frame
sampling_rate = 4  # take every 4th frame: 16 frames span a 64-frame window
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
compile = False  # torch.compile the model
seed = 0
peak_tflops = 312.0  # the accelerator's dense bf16 peak, for MFU (A100: 312)
CONFIG_KEYS = [k for k in globals() if k not in _names_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad setting or input found before (or while setting up) training: printed as one line."""


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient became NaN or infinite: the run stops before the optimiser step."""


# --- configuration ------------------------------------------------------------


def _type_name(default):
    return {bool: "True or False", int: "an integer", float: "a number", str: "a string",
            tuple: "a tuple, e.g. (1, 2)", list: "a list", dict: "a dict"}.get(type(default), type(default).__name__)


def check_type(key, value, default, source):
    """value converted to the type of the key's default; ConfigError naming the key and the type if it
    cannot be (no silent conversions: 1 is not a bool, "3" is not an int)."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
        value = type(default)(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        hint = (f"; on the command line write --{key}.FIELD=VALUE or --{key}=\"{{'field': value}}\""
                if isinstance(default, dict) else "")
        raise ConfigError(f"{source}: {key} must be {_type_name(default)}, got {value!r} "
                          f"({type(value).__name__}){hint}")
    return value


def _unknown_key(key, valid, source):
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean {close[0]}?" if close else "; see the config block at the top of the script"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _parse_value(text, default):
    """A command-line value: strings stay as typed; anything else is read as a Python literal."""
    if isinstance(default, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # check_type reports it with the key's expected type


def _apply_config_file(config, path):
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} not found (arguments without -- are config files)")
    with open(path) as f:
        source = f.read()
    namespace = dict(config)  # a config file can read earlier values, e.g. batch_size
    exec(builtins.compile(source, path, "exec"), namespace)  # `compile` is a config key here
    for key, value in namespace.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        if key not in config:
            raise _unknown_key(key, list(config), path)
        config[key] = check_type(key, value, config[key], path)


def load_config(defaults, argv):
    """The config: `defaults` overridden, in order, by config files and --key=value arguments."""
    config = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            _apply_config_file(config, arg)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"argument {arg!r}: write --{key}=VALUE")
        key, dot, field = key.partition(".")
        if key not in defaults:
            raise _unknown_key(key, list(defaults), f"argument {arg!r}")
        if dot:  # --model_args.mask_ratio=0.75: one entry of a dict key, checked when the model is built
            if not isinstance(defaults[key], dict):
                raise ConfigError(f"argument {arg!r}: {key} is not a dict, so {key}.{field} means nothing")
            config[key] = {**config[key], field: _parse_value(text, None)}
        elif isinstance(defaults[key], list):  # repeatable: --predict=a.mp4 --predict=b.mp4
            config[key] = config[key] + [text]
        else:
            config[key] = check_type(key, _parse_value(text, defaults[key]), defaults[key], f"argument {arg!r}")
    return config


def build_model_config(preset, model_args, base=None):
    """SVFAPConfig of a CONFIGS preset (or of the dict `base`, e.g. a checkpoint's) with model_args on top."""
    if base is None:
        if preset not in CONFIGS:
            raise ConfigError(f"model={preset!r} is not a preset of model.CONFIGS; valid: {', '.join(CONFIGS)}")
        base = CONFIGS[preset].to_dict()
    fields = dict(base)
    for field, value in model_args.items():
        if field not in fields:
            raise _unknown_key(field, list(fields), "model_args (SVFAPConfig fields)")
        fields[field] = check_type(f"model_args.{field}", value, fields[field], "model_args")
    try:
        return SVFAPConfig.from_dict(fields)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_list_file(key, path):
    """An annotation list must exist before anything starts (a typo should not cost a DDP start-up)."""
    if not path:
        raise ConfigError(f"{key} is empty; give the path of an annotation list (\"<video> <label>\" per line)")
    if not os.path.isfile(path):
        raise ConfigError(f"{key}={path}: annotation file not found")


def check_batch(batch_size, world_size, grad_accum):
    """Micro-batch per process; ConfigError unless batch_size splits evenly over processes and micro-steps."""
    parts = world_size * grad_accum
    if batch_size < 1 or grad_accum < 1 or batch_size % parts:
        raise ConfigError(f"batch_size={batch_size} must be a positive multiple of world_size x grad_accum = "
                          f"{world_size} x {grad_accum} = {parts}")
    return batch_size // parts


# --- processes, devices, precision ----------------------------------------------

Dist = namedtuple("Dist", "ddp rank local_rank world_size device master")


def world_size_from_env():
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is a single process."""
    return int(os.environ.get("WORLD_SIZE", 1)) if "RANK" in os.environ else 1


def setup_distributed(device_name):
    """Process group (NCCL on CUDA, gloo on the CPU) when started by torchrun; the device of this process."""
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device_name} but CUDA is not available; use device=cpu")
    if device_name not in ("cpu", "cuda") and not device_name.startswith("cuda:"):
        raise ConfigError(f"device={device_name!r}: valid values are auto, cpu, cuda, cuda:N")
    if device_name.startswith("cuda"):  # float32 matmuls may use TF32 (bf16 autocast covers most of them anyway)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "RANK" not in os.environ:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device.index or 0)
        return Dist(False, 0, 0, 1, device, True)
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device_name.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group(backend="gloo")
    return Dist(True, rank, local_rank, world, device, rank == 0)


def resolve_dtype(name, device):
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"dtype={name!r}: valid values are auto, float32, bfloat16, float16")
    if device.type != "cuda" and name != "float32":
        raise ConfigError(f"dtype={name} needs a CUDA device; on the CPU training runs in float32")
    return dtypes[name]


def autocast(device, dtype):
    """bf16/fp16 autocast on CUDA; float32 (no autocast) otherwise."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# --- randomness -------------------------------------------------------------------


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state():
    """This process's generator states as tensors and lists, so a checkpoint loads with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,  # this process's device
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states(d):
    """Every rank's generator states, in rank order (rank 0 saves them all)."""
    if not d.ddp:
        return [rng_state()]
    states = [None] * d.world_size
    dist.all_gather_object(states, rng_state())
    return states


def item_seed(seed, epoch, index):
    """A 63-bit seed that depends only on (seed, epoch, index)."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpochSeededDataset(Dataset):
    """Sample `index` of epoch `epoch` draws its random numbers (crop, flip, erasing, tube mask, the choice
    of a stand-in for a broken file) from the global generators seeded with (seed, epoch, index), whatever
    process or DataLoader worker loads it. So the data of a run does not depend on num_workers, and a
    resumed run sees exactly the clips the uninterrupted run saw. The loading process's own generator
    states are restored afterwards (with num_workers=0 that is the training process)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch):  # called before each epoch's DataLoader starts its workers
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        s = item_seed(self.seed, self.epoch, index)
        saved = torch.random.default_generator.get_state(), np.random.get_state(), random.getstate()
        torch.random.default_generator.manual_seed(s)  # the CPU generator only: CUDA's stays untouched
        np.random.seed(s % 2 ** 32)
        random.seed(s)
        try:
            return self.dataset[index]
        finally:
            torch.random.default_generator.set_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class SkipSampler(Sampler):
    """`sampler`'s indices from position `skip` on: a resumed epoch starts where the stopped one was."""

    def __init__(self, sampler, skip):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        for i, index in enumerate(self.sampler):
            if i >= self.skip:
                yield index

    def __len__(self):
        return max(len(self.sampler) - self.skip, 0)


def make_train_loader(dataset, micro_batch, d, seed, epoch, skip_batches, num_workers):
    """This rank's micro-batches of `epoch`, from the `skip_batches`-th on. The order depends only on
    (seed, epoch); DistributedSampler drops the tail so every rank gets the same number of videos."""
    sampler = DistributedSampler(dataset, num_replicas=d.world_size, rank=d.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    sampler.set_epoch(epoch)
    dataset.set_epoch(epoch)
    # an explicit generator, so that starting the loader does not draw from the global torch generator
    # (that would make a resumed run's model randomness differ from the uninterrupted run's)
    generator = torch.Generator().manual_seed(item_seed(seed, epoch, -1 - d.rank))
    return DataLoader(dataset, batch_size=micro_batch, sampler=SkipSampler(sampler, skip_batches * micro_batch),
                      num_workers=num_workers, pin_memory=d.device.type == "cuda", drop_last=True,
                      generator=generator, persistent_workers=False)


def iters_per_epoch(dataset, micro_batch, grad_accum, d, key):
    per_rank = len(dataset) // d.world_size
    n = per_rank // micro_batch // grad_accum
    if n == 0:
        raise ConfigError(f"{key} has {len(dataset)} videos, fewer than one batch: batch_size must be at most "
                          f"{per_rank // grad_accum * d.world_size * grad_accum} here")
    return n


# --- optimisation -----------------------------------------------------------------


def lr_at(it, lr, min_lr, warmup_iters, total_iters):
    """Linear warm-up to lr over warmup_iters, then cosine decay to min_lr at total_iters (per iteration)."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    progress = (it - warmup_iters) / max(1, total_iters - warmup_iters)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def param_groups(model, weight_decay, layer_decay=1.0, head_lr_scale=1.0):
    """AdamW groups. Weight decay only on weight matrices and kernels: not on norms, biases, the mask
    token (model.no_weight_decay; the position tables are fixed buffers, not parameters). With
    layer_decay < 1 (fine-tuning), one group per layer of model.lr_layer_id with
    lr_scale = layer_decay ** (num_lr_layers - 1 - layer): the patch embedding learns slowest.
    head_lr_scale multiplies the lr of the classifier's fc_norm and head: the head starts at 0.001 x its
    initial scale, and a model trained from scratch learns nothing until the head has grown."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not no_weight_decay(name, p)
        layer, scale = 0, 1.0
        if layer_decay != 1.0:
            layer = model.lr_layer_id(name)
            scale = layer_decay ** (model.num_lr_layers - 1 - layer)
        head = name.startswith(("head.", "fc_norm."))
        scale *= head_lr_scale if head else 1.0
        group = groups.setdefault((layer, decay, head), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                         "lr_scale": scale, "layer": layer})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def _debug_iter(name):
    """Test hooks (tests only): SVFAP_DEBUG_NAN_AT_ITER=k, SVFAP_DEBUG_CRASH_IN_SAVE=k."""
    return int(os.environ.get(name, "0") or 0)


def train_iteration(model, optimizer, scaler, batches, loss_fn, grad_accum, grad_clip, d, autocast_ctx, iteration):
    """One optimiser step over grad_accum micro-batches drawn from the iterator `batches`.

    Returns (loss averaged over micro-batches and processes, gradient norm before clipping, seconds spent
    waiting for data). Raises NonFiniteLoss before the step if the loss (or, without fp16 loss scaling,
    the gradient) is not finite, so the weights stay as they were; every rank sees the same reduced
    values, so all of them stop together.
    """
    data_wait = 0.0
    loss_sum = torch.zeros((), device=d.device)
    for micro_step in range(grad_accum):
        t = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - t
        if d.ddp:  # all-reduce the gradients on the last micro-step only
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with autocast_ctx:
            loss = loss_fn(batch)
        if iteration == _debug_iter("SVFAP_DEBUG_NAN_AT_ITER"):
            loss = loss * float("nan")
        loss_sum += loss.detach().float()
        scaler.scale(loss / grad_accum).backward()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    loss_mean = loss_sum / grad_accum
    if d.ddp:
        dist.all_reduce(loss_mean)  # gloo has no AVG
        loss_mean /= d.world_size
    loss_value, grad_value = torch.stack([loss_mean, grad_norm.float()]).tolist()  # one device sync
    if not math.isfinite(loss_value) or (not scaler.is_enabled() and not math.isfinite(grad_value)):
        optimizer.zero_grad(set_to_none=True)
        what = "loss" if not math.isfinite(loss_value) else "gradient norm"
        raise NonFiniteLoss(f"non-finite {what} ({loss_value if what == 'loss' else grad_value}) "
                            f"at iteration {iteration}")
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_value, data_wait


# --- checkpoints and logs -----------------------------------------------------------

_saves = 0


def save_checkpoint(path, checkpoint):
    """Write to path + ".tmp", flush it to disk, then os.replace: a crash while writing leaves the previous
    checkpoint as it was (a rename within one folder is atomic)."""
    global _saves
    _saves += 1
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(checkpoint, f)
        f.flush()
        if _saves == _debug_iter("SVFAP_DEBUG_CRASH_IN_SAVE"):  # test hook: die half-way through the write
            f.truncate(f.tell() // 2)
            os._exit(13)
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint from elsewhere cannot run code when loaded."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint {path} not found")
    try:
        # the authors' release also stores its argparse.Namespace of arguments: allow that class, nothing else
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file or pickled objects beyond tensors and plain values
        raise ConfigError(f"checkpoint {path} cannot be loaded safely: {str(e).splitlines()[0]}") from None


def log_json(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def trim_log(path, iter_num):
    """On resume, drop log lines of iterations after the checkpoint: they are about to be run again."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("iter", 0) <= iter_num]
    with open(path, "w") as f:
        f.writelines(lines)


def mfu(macs_per_clip, clips_per_s, world_size, peak_tflops):
    """Model FLOPs utilisation: training ~ 3 forwards (forward + backward), 2 FLOPs per multiply-accumulate."""
    return 6 * macs_per_clip * clips_per_s / world_size / (peak_tflops * 1e12)


def run(main, argv, script, doc="", defaults=None):
    """Run main(argv); a ConfigError or NonFiniteLoss ends the run with one line and exit code 2 or 3.
    -h / --help prints the script's docstring and its config keys with their defaults."""
    if "-h" in argv or "--help" in argv:
        print(doc.strip() + "\n\nconfig keys (defaults):")
        for key, value in (defaults or {}).items():
            print(f"  {key} = {value!r}")
        return
    try:
        main(argv)
    except (ConfigError, NonFiniteLoss) as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank stops; one says why
            print(f"{script}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(e, ConfigError) else 3)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- the reconstruction video ---------------------------------------------------------


def reconstruction_frames(model, video, mask):
    """uint8 (T, rows, cols, 3): one row per clip, original | masked input | reconstruction."""
    cfg = model.cfg
    was_training = model.training
    model.eval()  # no drop path: the picture shows the model, and the training generators stay untouched
    with torch.no_grad():
        _, pred = model(video, mask)
        recon = model.reconstruct(video, pred, mask).float()  # (B, 3, T, H, W) in [0, 1]
    model.train(was_training)
    mean = torch.tensor(IMAGENET_MEAN, device=video.device).view(1, 3, 1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=video.device).view(1, 3, 1, 1, 1)
    original = (video.float() * std + mean).clamp(0, 1)
    B = video.shape[0]
    T, Hg, Wg = cfg.grid
    pixel_mask = (mask.view(B, T, Hg, Wg).repeat_interleave(cfg.tubelet_size, 1)
                  .repeat_interleave(cfg.patch_size, 2).repeat_interleave(cfg.patch_size, 3))  # (B, T, H, W)
    masked = torch.where(pixel_mask[:, None], torch.full_like(original, 0.5), original)  # grey where masked
    panels = torch.cat([original, masked, recon], dim=-1)  # (B, 3, T, H, 3W)
    frames = torch.cat(list(panels), dim=-2)  # (3, T, B*H, 3W)
    scale = max(1, 128 // cfg.img_size)  # tiny demo clips get bigger pixels
    frames = frames.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    frames = frames[..., : frames.shape[-2] // 2 * 2, : frames.shape[-1] // 2 * 2]  # H.264 wants even sizes
    return (frames.permute(1, 2, 3, 0) * 255).round().to(torch.uint8).cpu().numpy()


def reconstruction_video_name(iter_num, cfg):
    kind = "denorm-with-true-patch-stats" if cfg.norm_pix_loss else "plain"
    return f"recon_iter{iter_num:07d}_{kind}.mp4"


# -----------------------------------------------------------------------------
# the training script


def make_pretrain_dataset(c, key, mode, mc, **kw):
    """data.VideoDataset of the list in config key `key`; load errors become one ConfigError line."""
    list_file = getattr(c, key)
    try:
        ds = VideoDataset(list_file, mode, img_size=mc.img_size, num_frames=mc.num_frames,
                          sampling_rate=c.sampling_rate, crop_box=tuple(c.crop_box) or None,
                          root=c.data_root or None, replace_prefix=tuple(c.replace_prefix) or None,
                          max_fail_fraction=c.max_fail_fraction, crop_scales=tuple(c.crop_scales), **kw)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None
    if len(ds) == 0:
        raise ConfigError(f"{key}={list_file}: the list holds no videos")
    return ds


def main(argv):
    t_start = time.time()
    c = SimpleNamespace(**load_config({k: globals()[k] for k in CONFIG_KEYS}, argv))
    # checks that need no process group come first, so a bad setting costs no start-up
    if c.init_from not in ("scratch", "resume"):
        raise ConfigError(f"init_from={c.init_from!r}: valid values are scratch and resume")
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    if c.init_from == "resume" and not os.path.isfile(ckpt_path):
        raise ConfigError(f"init_from=resume continues from out_dir/ckpt.pt, but {ckpt_path} does not exist")
    checkpoint = load_checkpoint(ckpt_path) if c.init_from == "resume" else None
    mc = (build_model_config(None, {}, base=checkpoint["model_config"]) if checkpoint  # the shape it was trained with
          else build_model_config(c.model, c.model_args))
    micro_batch = check_batch(c.batch_size, world_size_from_env(), c.grad_accum)
    check_list_file("train_list", c.train_list)
    if c.vis_list:
        check_list_file("vis_list", c.vis_list)
    if c.repeated_sampling < 1:
        raise ConfigError(f"repeated_sampling={c.repeated_sampling} must be at least 1")

    d = setup_distributed(c.device)
    dtype = resolve_dtype(c.dtype, d.device)
    amp = autocast(d.device, dtype)
    if d.master:
        os.makedirs(c.out_dir, exist_ok=True)
    torch.manual_seed(c.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)

    # data: items are (video (k, 3, T, H, W), tube mask (k, N)) with k = repeated_sampling
    dataset = EpochSeededDataset(make_pretrain_dataset(c, "train_list", "pretrain", mc, mask_cfg=mc,
                                                       repeated_sampling=c.repeated_sampling), c.seed)
    n_iter_epoch = iters_per_epoch(dataset, micro_batch, c.grad_accum, d, "train_list")
    total_iters = c.epochs * n_iter_epoch
    stop_iter = min(total_iters, c.max_iters) if c.max_iters > 0 else total_iters
    clips_per_iter = c.batch_size * c.repeated_sampling
    lr = c.base_lr * clips_per_iter / 256

    # model and optimiser
    model = SVFAP(mc).to(d.device)
    optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay), lr=lr, betas=(c.beta1, c.beta2),
                                  fused=d.device.type == "cuda")
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    iter_num = 0
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        iter_num = checkpoint["iter_num"]
    vis = None
    if d.master and c.vis_clips > 0:
        vis_key = "vis_list" if c.vis_list else "train_list"
        vis_data = make_pretrain_dataset(c, vis_key, "eval", mc, num_clips=1, num_crops=1)
        n = min(c.vis_clips, len(vis_data))
        video = torch.stack([vis_data[i][0][0] for i in range(n)]).to(d.device)  # (n, 3, T, H, W)
        vis = (video, tube_mask(n, mc, generator=torch.Generator().manual_seed(c.seed)).to(d.device))
    macs_per_clip = 0
    if d.device.type == "cuda":  # for MFU; eval mode, so no training randomness is drawn
        model.eval()
        x = torch.zeros(1, mc.in_chans, mc.num_frames, mc.img_size, mc.img_size, device=d.device)
        macs_per_clip = count_macs(model, x, tube_mask(1, mc, generator=torch.Generator()).to(d.device))
        model.train()
    raw_model = model
    if c.compile:
        model = torch.compile(model)
    if d.ddp:
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    # training randomness (drop path) differs per rank; a resumed run continues every rank's generators
    if checkpoint and len(checkpoint["rng"]) == d.world_size:
        set_rng_state(checkpoint["rng"][d.rank])
    else:
        if checkpoint and d.master:
            print(f"note: the checkpoint holds generator states of {len(checkpoint['rng'])} processes, this run "
                  f"has {d.world_size}: reseeding, so the run will not repeat the original exactly")
        seed_everything(c.seed + d.rank + 1000 * iter_num)
    checkpoint = None  # free the memory

    log_path = os.path.join(c.out_dir, "log.jsonl")
    if d.master:
        if iter_num:
            trim_log(log_path, iter_num)
        elif os.path.exists(log_path):
            os.remove(log_path)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"pre-training {c.model} ({n_params / 1e6:.2f}M params) on {len(dataset)} videos from {c.train_list}; "
              f"{d.world_size} process(es) on {d.device.type}, {str(dtype).replace('torch.', '')}")
        print(f"batch {c.batch_size} videos = {d.world_size} processes x {c.grad_accum} micro-steps x {micro_batch}, "
              f"{clips_per_iter} clips/step; lr {lr:.3g} = {c.base_lr:g} x {clips_per_iter}/256; "
              f"{n_iter_epoch} iterations/epoch, {total_iters} in {c.epochs} epochs"
              + (f", stopping at {stop_iter}" if stop_iter < total_iters else "")
              + (f"; resuming at iteration {iter_num}" if iter_num else ""))

    def loss_fn(batch):
        video, mask = batch  # (b, k, 3, T, H, W), (b, k, N)
        video = video.flatten(0, 1).to(d.device, non_blocking=True)  # (b*k, 3, T, H, W)
        mask = mask.flatten(0, 1).to(d.device, non_blocking=True)  # (b*k, N)
        return model(video, mask)[0]

    def save():
        rng = gather_rng_states(d)  # a collective: every rank takes part
        if not d.master:
            return
        save_checkpoint(ckpt_path, {
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            "config": vars(c), "model_config": mc.to_dict(), "epoch": iter_num // n_iter_epoch, "iter_num": iter_num,
            "rng": rng})
        if vis is not None:
            path = os.path.join(c.out_dir, reconstruction_video_name(iter_num, mc))
            write_mp4(path, reconstruction_frames(raw_model, *vis), fps=6)  # slow enough to watch 16 frames

    warmup_iters = round(c.warmup_epochs * n_iter_epoch)
    last_good = (f"the last good checkpoint {ckpt_path} (iteration {iter_num}) is untouched" if iter_num
                 else "no checkpoint had been written yet")
    bar = tqdm(total=stop_iter, initial=iter_num, disable=not d.master, desc="pretrain", dynamic_ncols=True)
    loss = None
    try:
        while iter_num < stop_iter:
            epoch, start = divmod(iter_num, n_iter_epoch)
            batches = iter(make_train_loader(dataset, micro_batch, d, c.seed, epoch, start * c.grad_accum,
                                             c.num_workers))
            for _ in range(start, min(n_iter_epoch, start + stop_iter - iter_num)):
                t0 = time.perf_counter()
                it_lr = lr_at(iter_num, lr, c.min_lr, warmup_iters, total_iters)
                set_lr(optimizer, it_lr)
                try:
                    loss, grad_norm, wait = train_iteration(model, optimizer, scaler, batches, loss_fn, c.grad_accum,
                                                            c.grad_clip, d, amp, iter_num + 1)
                except NonFiniteLoss as e:
                    raise NonFiniteLoss(f"{e} (epoch {epoch + 1}); stopped without saving: {last_good}") from None
                iter_num += 1
                dt = time.perf_counter() - t0
                clips_per_s = clips_per_iter / dt
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{it_lr:.2e}",
                                clips_s=f"{clips_per_s:.1f}")
                if d.master and (iter_num % c.log_interval == 0 or iter_num == stop_iter):
                    record = {"iter": iter_num, "epoch": epoch + 1, "loss": loss, "lr": it_lr, "grad_norm": grad_norm,
                              "clips_per_s": clips_per_s, "data_wait": wait / dt}
                    if macs_per_clip:
                        record["mfu"] = mfu(macs_per_clip, clips_per_s, d.world_size, c.peak_tflops)
                    log_json(log_path, record)
                epoch_done = iter_num % n_iter_epoch == 0
                if epoch_done or iter_num == stop_iter or (c.ckpt_every and iter_num % c.ckpt_every == 0):
                    save()
                    last_good = f"the last good checkpoint {ckpt_path} (iteration {iter_num}) is untouched"
            del batches  # ends this epoch's workers
    finally:
        bar.close()
    if d.master:
        # wall time of this process (start-up and training); metrics.py --summary reads it
        write_json(os.path.join(c.out_dir, "results.json"), {"iterations": iter_num, "last_loss": loss,
                                                             "wall_time_s": time.time() - t_start})
        print(f"done: {iter_num} iterations; checkpoint {ckpt_path}, log {log_path}")


if __name__ == "__main__":
    run(main, sys.argv[1:], "pretrain.py", __doc__, {k: globals()[k] for k in CONFIG_KEYS})
