"""
Fine-tunes the TPSBT encoder for facial affect: classification (dynamic facial expressions: DFEW, FERV39k,
MAFW, ...) or regression (dimensional emotion, personality), as section 5 and 7 of the reference.

    python finetune.py config/finetune_demo.py --init_from=out/pretrain_demo/ckpt.pt
    torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_dfew.py --fold=1 --init_from=CKPT
    # cross-validation: one run per fold, then one report over the pooled test predictions
    for f in 1 2 3 4 5; do python finetune.py config/finetune_dfew.py --fold=$f --init_from=CKPT; done
    python metrics.py out/finetune_dfew/fold*/test_predictions.csv
    # evaluate a checkpoint on the config's val and test lists, without training
    python finetune.py config/finetune_demo.py --eval_only=True --ckpt=out/finetune_demo/best.pt
    # per-class probabilities (or regression values) of face videos, averaged over the evaluation views
    python finetune.py --predict=a.mp4 --predict=b.mp4 --ckpt=out/finetune_demo/best.pt

Configuration works as in pretrain.py (a config file, then --key=value; see its docstring). Paths
containing "{fold}" take the value of --fold.

init_from: "scratch"; "resume" (out_dir/ckpt.pt); the path of a pretrain.py checkpoint (its encoder, and
its encoder's shape, with this config's model_args such as drop_path on top); or the path of a checkpoint of
the authors' release (through model.load_official_state_dict; the shape comes from `model` and
`model_args`). It prints how many encoder tensors were loaded and names those that were not.

Evaluation: each video gives num_clips x num_crops views; their softmax probabilities (classification,
as the release's merge step) or outputs (regression) are averaged. val_list is evaluated after every
epoch and out_dir/best.pt keeps the epoch with the best `best_metric`; test_list is evaluated at the end
with the model of the best val epoch (test_predictions.csv) and with the last epoch's (test_predictions_last.csv).
Without val_list the last epoch is the model. Under DDP every process evaluates every world_size-th video
(no padding) and the scores are gathered by video index, so the metrics equal a single-process run's.

The authors' release validated on the test set (DFEW's val lists are copies of its test lists), so its
"best epoch" was chosen on test: when val and test share videos this script says so loudly and reports
the last epoch's test metrics beside the best-on-val ones.

Outputs in out_dir: ckpt.pt (latest, for resume), best.pt, log.jsonl, val_predictions.csv (best epoch),
test_predictions.csv, test_predictions_last.csv, results.json.
"""

import math
import os
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import metrics
from model import SVFAPClassifier, SVFAPConfig, count_macs, load_official_state_dict
from pretrain import (ConfigError, NonFiniteLoss, EpochSeededDataset, autocast, build_model_config, check_batch,
                      check_list_file, gather_rng_states, iters_per_epoch, load_checkpoint, load_config, log_json,
                      lr_at, make_pretrain_dataset, make_train_loader, mfu, param_groups, resolve_dtype, run, save_checkpoint,
                      seed_everything, set_lr, set_rng_state, setup_distributed, train_iteration, trim_log,
                      world_size_from_env, write_json)

# -----------------------------------------------------------------------------
# config: defaults are the paper's fine-tuning recipe (section 7); config/finetune_*.py name the data
_names_before_config = set(globals())
# I/O
out_dir = "out/finetune"
init_from = "scratch"  # "scratch" | "resume" | path of a pretrain.py checkpoint | path of a release checkpoint
ckpt_every = 0  # also save every N iterations (0: at the end of every epoch and of the run only)
log_interval = 10  # iterations between lines of out_dir/log.jsonl
eval_only = False  # evaluate `ckpt` on val_list and test_list, no training
ckpt = ""  # checkpoint for eval_only and predict
predict = []  # videos to score with `ckpt`: --predict=VIDEO, repeatable
# data
train_list = ""  # "<path> <label>" per line, or "<path> <v1> <v2> ..." for regression (section 8)
val_list = ""  # "" = no validation: the last epoch is the model
test_list = ""
fold = 0  # cross-validation: "{fold}" in out_dir and the lists becomes this number
data_root = ""  # relative paths in the lists resolve against this ("" = the list file's folder)
replace_prefix = ()  # (old, new) rewrites absolute path prefixes: --replace_prefix="('/their/dir', '/my/dir')"
crop_box = ()  # (top, bottom, left, right) of the face in the stored frames; () = the whole frame
sampling_rate = 4
crop_scales = (1.0, 0.875, 0.75, 0.66)  # multi-scale crop of training clips; (1.0,) = flip only
num_clips = 2  # evaluation: clips spread uniformly in time ...
num_crops = 2  # ... x spatial crops per video, scores averaged
num_workers = 8
max_fail_fraction = 0.05
# task
task = "classification"  # "classification" | "regression"
num_classes = 7
num_outputs = 1  # regression dimensions
class_names = ()  # names of the classes in label order (or of the regression dimensions), for reports
label_smoothing = 0.1
random_erase = 0.25  # probability that a frame gets a box of random noise
mixup = 0.8  # Beta(alpha, alpha) of mixup; 0 = off
cutmix = 1.0  # Beta(alpha, alpha) of cutmix; 0 = off (with both on, each batch picks one at random)
best_metric = ""  # "uar" | "war" (classification) | "ccc" | "pcc" (regression, mean over dimensions); "" = uar / ccc
# model
model = "base"
model_args = dict(drop_path=0.1)
# optimisation
batch_size = 96  # videos per optimiser step, all processes together (the paper does not give it)
grad_accum = 1
eval_batch_size = 8  # videos per evaluation batch per process (each gives num_clips x num_crops clips)
epochs = 100
max_iters = 0  # stop after this many iterations (0: run all epochs); the lr schedule still spans `epochs`
warmup_epochs = 5.0  # may be a fraction: warm-up is counted in iterations
base_lr = 1e-3  # lr = base_lr * batch_size / 256
min_lr = 1e-6
layer_decay = 0.75  # layer-wise lr decay: the patch embedding's lr is lr * 0.75^(num_lr_layers - 1)
head_lr_scale = 1.0  # lr multiplier of fc_norm and head (100 lets a model trained from scratch learn)
weight_decay = 0.05
beta1 = 0.9
beta2 = 0.999
grad_clip = 0.0
# system
device = "auto"
dtype = "auto"
compile = False
seed = 0
peak_tflops = 312.0
CONFIG_KEYS = [k for k in globals() if k not in _names_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------

METRICS = {"classification": ("uar", "war"), "regression": ("ccc", "pcc")}


# --- losses: label smoothing, mixup and cutmix -------------------------------------


def smooth_one_hot(target, num_classes, smoothing):
    """(B,) class indices -> (B, C) targets: 1 - smoothing + smoothing/C on the class, smoothing/C elsewhere."""
    return F.one_hot(target, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def mixup_cutmix(video, soft_target, mixup_alpha, cutmix_alpha, switch_prob=0.5):
    """Mix every clip with the batch in reverse order (timm's Mixup, mode "batch"), lam ~ Beta(alpha, alpha).
    Mixup blends the pixels lam : 1 - lam; cutmix pastes one box of the partner's frames (the same box in
    every frame) and sets lam to the area kept. Targets mix with the same lam. With both on, a batch uses
    cutmix with probability switch_prob. video (B, 3, T, H, W), soft_target (B, C)."""
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
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (H * W)  # the box was clipped at the border: use the real area
    else:
        video = video * lam + partner * (1.0 - lam)
    return video, soft_target * lam + soft_target.flip(0) * (1.0 - lam)


def random_erasing(video, prob, min_area=0.02, max_area=1 / 3, min_aspect=0.3):
    """timm's RandomErasing (mode "pixel", one box) as the release applies it: each frame on its own, with
    probability prob, gets a box of normal noise covering 2-33% of its area, aspect ratio 0.3-3.3 (up to 10
    tries to fit). video (B, 3, T, H, W), normalised, so the noise has the data's scale."""
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


def soft_cross_entropy(logits, soft_target):
    return torch.sum(-soft_target * F.log_softmax(logits, dim=-1), dim=-1).mean()


# --- data -----------------------------------------------------------------------------


def make_dataset(c, key, mode, mc, **kw):
    """data.VideoDataset of the list in config key `key`, its labels checked against the task."""
    ds = make_pretrain_dataset(c, key, mode, mc, task=c.task, **kw)
    for i, (path, values) in enumerate(ds.samples):
        if c.task == "classification":
            ok = len(values) >= 1 and values[0] == int(values[0]) and 0 <= values[0] < c.num_classes
            rule = f"a class index in 0..{c.num_classes - 1} (num_classes={c.num_classes})"
        else:
            ok = len(values) == c.num_outputs
            rule = f"{c.num_outputs} numbers (num_outputs={c.num_outputs})"
        if not ok:
            raise ConfigError(f"{key}={list_file}: entry {i + 1} ({path}) has label(s) {values}; expected {rule}")
    return ds


@torch.no_grad()
def evaluate(model, dataset, d, c, amp):
    """Scores of every video of an "eval" dataset, on every rank: (indices (N,), scores (N, C or D), targets).

    Each process takes every world_size-th video, without the padding DistributedSampler would add (that
    would count some videos twice), then (index, scores) rows are gathered and sorted by index."""
    was_training = model.training
    model.eval()
    indices = list(range(d.rank, len(dataset), d.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=c.eval_batch_size, shuffle=False,
                        num_workers=c.num_workers, pin_memory=d.device.type == "cuda",
                        generator=torch.Generator())  # without it, starting the loader draws from the global generator
    rows = []
    for views, _, index in loader:
        B, V = views.shape[:2]
        with amp:
            out = model(views.flatten(0, 1).to(d.device, non_blocking=True))  # (B*V, C)
        out = out.float().view(B, V, -1)
        # the release's merge step averages softmax probabilities over the views
        scores = out.softmax(-1).mean(1) if c.task == "classification" else out.mean(1)  # (B, C)
        rows += zip(index.tolist(), scores.cpu().tolist())
    if d.ddp:
        parts = [None] * d.world_size
        dist.all_gather_object(parts, rows)
        rows = [row for part in parts for row in part]
    rows = sorted({row[0]: row for row in rows}.values())  # dedupe by index, then index order
    model.train(was_training)
    idx = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows], dtype=np.float64)
    labels = [dataset.samples[i][1] for i in idx]  # as written in the list (the batch's targets are float32)
    targets = np.array([int(v[0]) for v in labels]) if c.task == "classification" else np.array(labels)
    return idx, scores, targets


def compute_metrics(task, targets, scores):
    if task == "classification":
        return {"uar": metrics.uar(targets, scores), "war": metrics.war(targets, scores)}
    return {"ccc": float(np.mean(metrics.ccc(targets, scores))), "pcc": float(np.mean(metrics.pcc(targets, scores)))}


def format_metrics(m):
    if "uar" in m:
        return f"UAR {100 * m['uar']:.2f}  WAR {100 * m['war']:.2f}"
    return f"CCC {m['ccc']:.4f}  PCC {m['pcc']:.4f}"


def write_predictions(path, dataset, idx, scores, targets, c):
    metrics.write_predictions(path, [dataset.samples[i][0] for i in idx], targets, scores,
                              class_names=list(c.class_names) or None, task=c.task)


# --- model ----------------------------------------------------------------------------


def num_model_outputs(c):
    return c.num_classes if c.task == "classification" else c.num_outputs


def build_classifier(c, master):
    """SVFAPClassifier as init_from says (scratch and resume start from the config's preset)."""
    n_out = num_model_outputs(c)
    if c.init_from in ("scratch", "resume"):
        return SVFAPClassifier(build_model_config(c.model, c.model_args), n_out)
    ckpt = load_checkpoint(c.init_from)
    if "model_config" in ckpt:  # a pretrain.py (or finetune.py) checkpoint: reuse its encoder's shape
        mc = build_model_config(None, c.model_args, base=ckpt["model_config"])
        model = SVFAPClassifier(mc, n_out)
        source = {k[len("encoder."):]: v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
        target = model.encoder.state_dict()
        loaded = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
        model.encoder.load_state_dict(loaded, strict=False)
        not_loaded = sorted(set(target) - set(loaded))
        unused = sorted(set(source) - set(loaded))
        layout = f"pretrain.py checkpoint, preset {ckpt['config'].get('model')!r}"
    else:  # the authors' release
        mc = build_model_config(c.model, c.model_args)
        model = SVFAPClassifier(mc, n_out)
        state = next((ckpt[k] for k in ("model", "module") if isinstance(ckpt.get(k), dict)), ckpt)
        head = model.head.state_dict()  # a fine-tuned release head with another class count stays out
        state = {k: v for k, v in state.items() if not (k in ("head.weight", "head.bias") and
                                                       v.shape != head[k.split(".")[1]].shape)}
        try:
            missing, unused = load_official_state_dict(model, state)
        except ValueError as e:
            raise ConfigError(f"init_from={c.init_from}: {e}") from None
        target = model.encoder.state_dict()
        not_loaded = [k[len("encoder."):] for k in missing if k.startswith("encoder.")]
        loaded = [k for k in target if k not in not_loaded]
        layout = "the authors' release layout"
    if master:
        print(f"init_from={c.init_from} ({layout}): loaded {len(loaded)}/{len(target)} encoder tensors"
              + (f"; NOT loaded: {', '.join(not_loaded)}" if not_loaded else "")
              + (f"; unused in the checkpoint: {', '.join(unused)}" if unused else ""))
    return model


def classifier_from_checkpoint(path):
    """(model, the run's config) of a finetune.py checkpoint."""
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt or ckpt.get("config", {}).get("task") is None:
        raise ConfigError(f"ckpt={path} is not a finetune.py checkpoint (e.g. out/finetune_demo/best.pt)")
    cc = SimpleNamespace(**ckpt["config"])
    model = SVFAPClassifier(SVFAPConfig.from_dict(ckpt["model_config"]), num_model_outputs(cc))
    model.load_state_dict(ckpt["model"])
    return model, cc


# --- modes without training -----------------------------------------------------------------


def predict_videos(c):
    """Print per-class probabilities (or regression outputs) of each --predict video, averaged over views."""
    if not c.ckpt:
        raise ConfigError("--predict needs --ckpt=CHECKPOINT, a finetune.py checkpoint such as "
                          "out/finetune_demo/best.pt")
    for path in c.predict:
        if not os.path.exists(path):
            raise ConfigError(f"--predict={path}: file not found")
        if any(ch.isspace() for ch in os.path.abspath(path)):  # annotation lines are split at whitespace
            raise ConfigError(f"--predict={path}: paths with spaces are not supported; rename or link the file")
    model, cc = classifier_from_checkpoint(c.ckpt)
    d = setup_distributed(c.device)
    model.to(d.device).eval()
    labels = " ".join(["0"] * (1 if cc.task == "classification" else cc.num_outputs))
    with tempfile.TemporaryDirectory() as tmp:
        list_file = os.path.join(tmp, "predict.txt")
        with open(list_file, "w") as f:
            f.writelines(f"{os.path.abspath(p)} {labels}\n" for p in c.predict)
        cc.data_root, cc.replace_prefix, cc.num_workers, cc.predict = "", (), 0, list_file
        ds = make_dataset(cc, "predict", "eval", model.cfg, num_clips=cc.num_clips, num_crops=cc.num_crops)
        names = list(cc.class_names) or [str(i) for i in range(num_model_outputs(cc))]
        with torch.no_grad():
            for i, path in enumerate(c.predict):
                views = ds[i][0].to(d.device)  # (V, 3, T, H, W)
                out = model(views).float()  # (V, C)
                scores = out.softmax(-1).mean(0) if cc.task == "classification" else out.mean(0)
                cells = "  ".join(f"{n} {s:.4f}" for n, s in zip(names, scores.tolist()))
                top = f"  -> {names[int(scores.argmax())]}" if cc.task == "classification" else ""
                print(f"{path}: {cells}{top}")


def evaluate_checkpoint(c):
    """eval_only: the metrics of `ckpt` on val_list and test_list; predictions as eval_<split>_predictions.csv.
    The task, outputs and class names come from the checkpoint; the lists and view counts from the config."""
    if not c.ckpt:
        raise ConfigError("eval_only=True needs --ckpt=CHECKPOINT (a finetune.py checkpoint)")
    model, cc = classifier_from_checkpoint(c.ckpt)
    c.task, c.num_classes, c.num_outputs, c.class_names = cc.task, cc.num_classes, cc.num_outputs, cc.class_names
    d = setup_distributed(c.device)
    amp = autocast(d.device, resolve_dtype(c.dtype, d.device))
    if d.master:
        os.makedirs(c.out_dir, exist_ok=True)
    model.to(d.device)
    results = {}
    for split, list_file in (("val", c.val_list), ("test", c.test_list)):
        if not list_file:
            continue
        ds = make_dataset(c, f"{split}_list", "eval", model.cfg, num_clips=c.num_clips, num_crops=c.num_crops)
        idx, scores, targets = evaluate(model, ds, d, c, amp)
        results[split] = compute_metrics(c.task, targets, scores)
        if d.master:
            path = os.path.join(c.out_dir, f"eval_{split}_predictions.csv")
            write_predictions(path, ds, idx, scores, targets, c)
            print(f"{split} ({list_file}, {len(idx)} videos): {format_metrics(results[split])}  -> {path}")
    if d.master:
        write_json(os.path.join(c.out_dir, "results_eval.json"), {"ckpt": c.ckpt, **results})


# -----------------------------------------------------------------------------
# the training script


def apply_fold(c):
    keys = [k for k in ("out_dir", "train_list", "val_list", "test_list") if "{fold}" in getattr(c, k)]
    if keys and c.fold < 1:
        raise ConfigError(f"{keys[0]}={getattr(c, keys[0])} holds {{fold}}: give --fold=N (DFEW: 1..5)")
    for k in keys:
        setattr(c, k, getattr(c, k).replace("{fold}", str(c.fold)))


def check_task(c):
    if c.task not in METRICS:
        raise ConfigError(f"task={c.task!r}: valid values are classification and regression")
    n_out = num_model_outputs(c)
    if n_out < 1:
        raise ConfigError(f"{'num_classes' if c.task == 'classification' else 'num_outputs'} must be at least 1")
    if c.class_names and len(c.class_names) != n_out:
        raise ConfigError(f"class_names has {len(c.class_names)} names but the model has {n_out} outputs")
    c.best_metric = c.best_metric or METRICS[c.task][0]
    if c.best_metric not in METRICS[c.task]:
        raise ConfigError(f"best_metric={c.best_metric!r}: valid for {c.task} are {', '.join(METRICS[c.task])}")


def overlap_warning(val, test):
    """The release's val lists are its test lists: selecting the best epoch on them is selecting on test."""
    shared = {p for p, _ in val.samples} & {p for p, _ in test.samples}
    if not shared:
        return ""
    what = "the same videos" if len(shared) == len(val.samples) == len(test.samples) else f"{len(shared)} videos"
    return (f"WARNING: val_list and test_list hold {what}: the best-on-val epoch is chosen on the test set and its "
            f"test metrics are optimistic; the last epoch's test metrics are reported beside them")


def main(argv):
    t_start = time.time()
    c = SimpleNamespace(**load_config({k: globals()[k] for k in CONFIG_KEYS}, argv))
    if c.predict:
        return predict_videos(c)
    apply_fold(c)
    if c.eval_only:
        return evaluate_checkpoint(c)
    check_task(c)
    micro_batch = check_batch(c.batch_size, world_size_from_env(), c.grad_accum)
    for key in ("train_list", "val_list", "test_list"):
        if key == "train_list" or getattr(c, key):
            check_list_file(key, getattr(c, key))
    is_path = c.init_from not in ("scratch", "resume")
    if is_path and not os.path.isfile(c.init_from):
        raise ConfigError(f"init_from={c.init_from}: no such checkpoint file (valid: scratch, resume or the path "
                          f"of a pretrain.py or authors' release checkpoint)")
    ckpt_path, best_path = os.path.join(c.out_dir, "ckpt.pt"), os.path.join(c.out_dir, "best.pt")
    if c.init_from == "resume" and not os.path.isfile(ckpt_path):
        raise ConfigError(f"init_from=resume continues from out_dir/ckpt.pt, but {ckpt_path} does not exist")
    checkpoint = load_checkpoint(ckpt_path) if c.init_from == "resume" else None

    d = setup_distributed(c.device)
    dtype = resolve_dtype(c.dtype, d.device)
    amp = autocast(d.device, dtype)
    if d.master:
        os.makedirs(c.out_dir, exist_ok=True)
    torch.manual_seed(c.seed)  # the same initial head on every rank

    # model first: a pretrain.py checkpoint decides the encoder's shape, and with it the clip size
    if checkpoint:
        model = SVFAPClassifier(SVFAPConfig.from_dict(checkpoint["model_config"]), num_model_outputs(c))
    else:
        model = build_classifier(c, d.master)
    mc = model.cfg
    train_set = EpochSeededDataset(make_dataset(c, "train_list", "train", mc), c.seed)
    eval_sets = {split: make_dataset(c, f"{split}_list", "eval", mc, num_clips=c.num_clips,
                                     num_crops=c.num_crops)
                 for split in ("val", "test") if getattr(c, f"{split}_list")}
    warning = overlap_warning(eval_sets["val"], eval_sets["test"]) if len(eval_sets) == 2 else ""
    if warning and d.master:
        print("!" * 100 + "\n" + warning + "\n" + "!" * 100)
    n_iter_epoch = iters_per_epoch(train_set, micro_batch, c.grad_accum, d, "train_list")
    total_iters = c.epochs * n_iter_epoch
    stop_iter = min(total_iters, c.max_iters) if c.max_iters > 0 else total_iters
    warmup_iters = round(c.warmup_epochs * n_iter_epoch)
    lr = c.base_lr * c.batch_size / 256

    model.to(d.device)
    optimizer = torch.optim.AdamW(param_groups(model, c.weight_decay, c.layer_decay, c.head_lr_scale), lr=lr,
                                  betas=(c.beta1, c.beta2), fused=d.device.type == "cuda")
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)
    iter_num, best = 0, {"value": -math.inf, "epoch": None, "metrics": None}
    if checkpoint:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        iter_num, best = checkpoint["iter_num"], checkpoint["best"]
    macs_per_clip = 0
    if d.device.type == "cuda":  # for MFU; eval mode, so no training randomness is drawn
        model.eval()
        macs_per_clip = count_macs(model, torch.zeros(1, mc.in_chans, mc.num_frames, mc.img_size, mc.img_size,
                                                      device=d.device))
        model.train()
    raw_model = model
    if c.compile:
        model = torch.compile(model)
    if d.ddp:
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    # drop path and mixup differ per rank; a resumed run continues every rank's generators
    if checkpoint and len(checkpoint["rng"]) == d.world_size:
        set_rng_state(checkpoint["rng"][d.rank])
    else:
        seed_everything(c.seed + d.rank + 1000 * iter_num)
    checkpoint = None

    log_path = os.path.join(c.out_dir, "log.jsonl")
    if d.master:
        if iter_num:
            trim_log(log_path, iter_num)
        elif os.path.exists(log_path):
            os.remove(log_path)
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"fine-tuning ({c.task}, {num_model_outputs(c)} outputs, {n_params / 1e6:.2f}M params) on "
              f"{len(train_set)} videos from {c.train_list}; {d.world_size} process(es) on {d.device.type}, "
              f"{str(dtype).replace('torch.', '')}")
        print(f"batch {c.batch_size} = {d.world_size} x {c.grad_accum} x {micro_batch}; lr {lr:.3g} = "
              f"{c.base_lr:g} x {c.batch_size}/256, layer decay {c.layer_decay}; {n_iter_epoch} iterations/epoch, "
              f"{total_iters} in {c.epochs} epochs" + (f", stopping at {stop_iter}" if stop_iter < total_iters else "")
              + (f"; resuming at iteration {iter_num}" if iter_num else ""))
    n_out = num_model_outputs(c)

    def loss_fn(batch):
        video, target = batch  # (b, 3, T, H, W), (b,) class indices or (b, D) values
        video, target = video.to(d.device, non_blocking=True), target.to(d.device, non_blocking=True)
        if c.random_erase > 0:  # an input augmentation of the release's data pipeline, so before mixup
            video = random_erasing(video, c.random_erase)
        if c.task == "regression":
            return F.mse_loss(model(video).float(), target.float())
        soft = smooth_one_hot(target, n_out, c.label_smoothing)
        if c.mixup > 0 or c.cutmix > 0:
            video, soft = mixup_cutmix(video, soft, c.mixup, c.cutmix)
        return soft_cross_entropy(model(video).float(), soft)

    def save(path, full=True):
        rng = gather_rng_states(d) if full else None  # a collective: every rank takes part
        if not d.master:
            return
        state = {"model": raw_model.state_dict(), "config": vars(c), "model_config": mc.to_dict(),
                 "epoch": iter_num // n_iter_epoch, "iter_num": iter_num, "best": best}
        if full:
            state.update(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rng)
        save_checkpoint(path, state)

    def validate(epoch):
        """Evaluate val; keep best.pt and val_predictions.csv when best_metric improves."""
        idx, scores, targets = evaluate(raw_model, eval_sets["val"], d, c, amp)
        m = compute_metrics(c.task, targets, scores)
        improved = m[c.best_metric] > best["value"]
        if improved:
            best.update(value=m[c.best_metric], epoch=epoch, metrics=m)
            save(best_path, full=False)
            if d.master:
                write_predictions(os.path.join(c.out_dir, "val_predictions.csv"), eval_sets["val"], idx, scores,
                                  targets, c)
        if d.master:
            log_json(log_path, {"iter": iter_num, "epoch": epoch, "val": m})
            tqdm.write(f"epoch {epoch}: val {format_metrics(m)}" + ("  (best so far)" if improved else ""))

    last_good = (f"the last good checkpoint {ckpt_path} (iteration {iter_num}) is untouched" if iter_num
                 else "no checkpoint had been written yet")
    bar = tqdm(total=stop_iter, initial=iter_num, disable=not d.master, desc="finetune", dynamic_ncols=True)
    try:
        while iter_num < stop_iter:
            epoch, start = divmod(iter_num, n_iter_epoch)
            batches = iter(make_train_loader(train_set, micro_batch, d, c.seed, epoch, start * c.grad_accum,
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
                clips_per_s = c.batch_size / dt
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{it_lr:.2e}", clips_s=f"{clips_per_s:.1f}")
                if d.master and (iter_num % c.log_interval == 0 or iter_num == stop_iter):
                    record = {"iter": iter_num, "epoch": epoch + 1, "loss": loss, "lr": it_lr, "grad_norm": grad_norm,
                              "clips_per_s": clips_per_s, "data_wait": wait / dt}
                    if macs_per_clip:
                        record["mfu"] = mfu(macs_per_clip, clips_per_s, d.world_size, c.peak_tflops)
                    log_json(log_path, record)
                epoch_done = iter_num % n_iter_epoch == 0
                if epoch_done and "val" in eval_sets:
                    validate(epoch + 1)  # epochs count from 1 in reports
                if epoch_done or iter_num == stop_iter or (c.ckpt_every and iter_num % c.ckpt_every == 0):
                    save(ckpt_path)
                    last_good = f"the last good checkpoint {ckpt_path} (iteration {iter_num}) is untouched"
            del batches
    finally:
        bar.close()

    # test: the model of the best val epoch, and the last epoch's when that differs
    last_epoch = math.ceil(iter_num / n_iter_epoch)
    results = {"best_metric": c.best_metric, "best_epoch": best["epoch"], "val": best["metrics"],
               "last_epoch": last_epoch, "val_test_overlap": bool(warning)}
    if "test" in eval_sets:
        test = eval_sets["test"]
        runs = [("last", None)]
        if best["epoch"] is not None and best["epoch"] != last_epoch:
            runs.append(("best", best_path))
        for name, path in runs:
            if path:
                if d.ddp:
                    dist.barrier()  # rank 0 wrote best.pt
                raw_model.load_state_dict(load_checkpoint(path)["model"])
            idx, scores, targets = evaluate(raw_model, test, d, c, amp)
            results[f"test_{name}"] = compute_metrics(c.task, targets, scores)
            if d.master:
                write_predictions(os.path.join(c.out_dir, f"test_predictions_{name}.csv"), test, idx, scores,
                                  targets, c)
        results["test"] = results.get("test_best", results["test_last"])
        if d.master:
            chosen = "test_predictions_best.csv" if "test_best" in results else "test_predictions_last.csv"
            os.replace(os.path.join(c.out_dir, chosen), os.path.join(c.out_dir, "test_predictions.csv"))
    results["wall_time_s"] = time.time() - t_start  # this process: start-up, training, evaluation
    if d.master:
        write_json(os.path.join(c.out_dir, "results.json"), results)
        print(summary(c, results, warning))


def summary(c, r, warning):
    lines = [f"done: {c.out_dir}"]
    if r["val"]:
        lines.append(f"val, best epoch {r['best_epoch']} by {c.best_metric}: {format_metrics(r['val'])}")
    if "test" in r:
        if "test_best" in r:
            lines.append(f"test, model of the best val epoch ({r['best_epoch']}): {format_metrics(r['test_best'])}"
                         f"   [test_predictions.csv]")
            lines.append(f"test, model of the last epoch ({r['last_epoch']}):      {format_metrics(r['test_last'])}"
                         f"   [test_predictions_last.csv]")
        else:
            lines.append(f"test, model of epoch {r['last_epoch']}: {format_metrics(r['test_last'])}"
                         f"   [test_predictions.csv]")
        lines.append(f"full report: python metrics.py {os.path.join(c.out_dir, 'test_predictions.csv')}")
    if warning:
        lines.append(warning)
    return "\n".join(lines)


if __name__ == "__main__":
    run(main, sys.argv[1:], "finetune.py", __doc__, {k: globals()[k] for k in CONFIG_KEYS})
