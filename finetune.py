"""
Fine-tunes the TPSBT encoder for facial affect: classification (dynamic facial expressions: DFEW, FERV39k, MAFW, ...)
or regression (dimensional emotion, personality), as sections 5 and 7 of the reference.

    python finetune.py config/finetune_demo.py --init_from=out/pretrain_demo/ckpt.pt
    torchrun --standalone --nproc_per_node=4 finetune.py config/finetune_dfew.py --fold=1 --init_from=CKPT
    for f in 1 2 3 4 5; do python finetune.py config/finetune_dfew.py --fold=$f --init_from=CKPT; done  # 5-fold CV
    python metrics.py out/finetune_dfew/fold*/test_predictions.csv  # one report over the pooled folds
    python finetune.py config/finetune_demo.py --eval_only=True --ckpt=out/finetune_demo/best.pt  # val and test metrics
    python finetune.py --predict=a.mp4 --predict=b.mp4 --ckpt=out/finetune_demo/best.pt  # per-class probabilities
    python finetune.py --extract=LIST --ckpt=CKPT --out_dir=DIR  # clip features (linear probe, retrieval)
    python finetune.py --explain=VIDEO --ckpt=CKPT --out=bottleneck.png  # where each stage's K bottleneck tokens look

Configuration as in pretrain.py; "{fold}" in out_dir and the lists becomes --fold's value. init_from: "scratch",
"resume" (out_dir/ckpt.pt), a pretrain.py checkpoint (its encoder and shape, with model_args such as drop_path on top)
or a release one (width and depths from the file, heads from the preset of that width, printed).

Evaluation averages the softmax probabilities (or regression outputs) of num_clips x num_crops views per video and
skips no video (val_list and test_list are checked at start-up). val runs every eval_every epochs and after the last;
best.pt (weights, config) and val_predictions.csv keep the best epoch by `best_metric`. At the end, test scores that
epoch's model (test_predictions.csv) and, if another, the last (test_predictions_last.csv), into results.json. The
release picked its best epoch on test (DFEW's val lists are its test lists); a val/test overlap gets a loud warning.

--extract writes DIR/features.npy (float32 (N, C), a row per line of LIST, labels optional: the view-averaged clip
embedding, fc_norm's output if the checkpoint has fc_norm, else the last-stage tokens' mean) and DIR/features.csv.
--extract and eval_only take data settings (crop_box, ...) from this run; --predict, --explain from the checkpoint's.
"""
import math
import os
import re
import sys
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import metrics
from data import atomic_path, device_transform, write_png
from model import CONFIGS, TPSBT, SVFAPClassifier, SVFAPConfig, load_official_state_dict
from pretrain import (ConfigError, autocast, build_model_config, check_lists, check_resumed, check_shared_memory, fit,
                      load_checkpoint, load_config, log_json, make_dataset, param_groups, resume_checkpoint, run, setup,
                      write_json)

# -----------------------------------------------------------------------------
# config: defaults are the paper's fine-tuning recipe (section 7); config/finetune_*.py name the data
_names_before_config = set(globals())
# I/O
out_dir = "out/finetune"
init_from = "scratch"  # "scratch" | "resume" | "auto" | path of a pretrain.py or of a release checkpoint
ckpt_every = 0  # also save every N iterations (0: every ckpt_every_epochs epochs and at the end only)
ckpt_every_epochs = 1  # save out_dir/ckpt.pt (for resume) at the end of every N-th epoch and of the run
eval_every = 1  # evaluate val_list every N epochs and after the last one
log_interval = 10  # iterations between lines of out_dir/log.jsonl (the only steps that read values back)
eval_only = False  # evaluate `ckpt` on val_list and test_list, no training
ckpt = ""  # checkpoint for eval_only, predict, extract and explain
predict = []  # videos to score with `ckpt`: --predict=VIDEO, repeatable
extract = ""  # a list of videos to write clip features of (out_dir/features.npy)
explain = ""  # a video to draw the bottleneck tokens' spatial attention of (to `out`)
out = "bottleneck.png"  # the picture of --explain
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
best_metric = ""  # "uar" | "war" | "f1" (classification) | "ccc" | "pcc" (regression, dimensions' mean); "" = uar / ccc
video_group = ""  # AVCAffe: a regex whose first group names a clip's source video: metrics of videos (clips averaged)
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
compile_mode = "default"  # see pretrain.py
seed = 0
peak_tflops = 0.0
CONFIG_KEYS = [k for k in globals() if k not in _names_before_config and not k.startswith("_")]
# -----------------------------------------------------------------------------

METRICS = {"classification": ("uar", "war", "f1"), "regression": ("ccc", "pcc")}


def main(argv):
    t_start = time.time()
    c = load_config({k: globals()[k] for k in CONFIG_KEYS}, argv)
    if (c.predict or c.extract or c.explain or c.eval_only) and not c.ckpt:
        raise ConfigError("--predict, --extract, --explain and eval_only=True need --ckpt=CHECKPOINT")
    apply_fold(c)
    if c.predict or c.extract or c.explain or c.eval_only:
        return (predict_videos if c.predict else extract_features if c.extract else explain_video if c.explain
                else evaluate_checkpoint)(c)
    check_task(c)
    check_lists(c, "train_list", "val_list", "test_list")
    checkpoint = resume_checkpoint(c, init_paths="a pretrain.py or authors' release checkpoint")
    d = setup(c)
    n_out = num_model_outputs(c)
    # model first: a pretrain.py checkpoint decides the encoder's shape, and with it the clip size
    model = (SVFAPClassifier(SVFAPConfig.from_dict(checkpoint["model_config"]), n_out) if checkpoint
             else build_classifier(c, d.master)).to(d.device)
    train_set = make_dataset(c, "train_list", "train", model.cfg, task=c.task, num_outputs=n_out)
    eval_sets = {s: eval_dataset(c, f"{s}_list", model.cfg, d) for s in ("val", "test") if getattr(c, f"{s}_list")}
    check_resumed(c, checkpoint, len(train_set))
    clip_bytes = model.cfg.num_frames * 3 * model.cfg.img_size ** 2  # uint8 (T, 3, S, S)
    check_shared_memory(c, d, clip_bytes, c.eval_batch_size * c.num_clips * c.num_crops * clip_bytes)
    warning = overlap_warning(eval_sets["val"], eval_sets["test"]) if len(eval_sets) == 2 else ""
    if warning and d.master:
        print("!" * 100 + "\n" + warning + "\n" + "!" * 100)
    lr = c.base_lr * c.batch_size / 256
    groups = param_groups(model, c.weight_decay, c.layer_decay, c.head_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(c.beta1, c.beta2), fused=True)  # CPU: torch >= 2.4
    best = checkpoint["best"] if checkpoint else {"value": -math.inf, "epoch": None, "metrics": None}
    if d.master:
        print(f"fine-tuning ({c.task}, {n_out} outputs, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
              f"params) on {len(train_set)} videos from {c.train_list}; lr {lr:.3g} = {c.base_lr:g} x "
              f"{c.batch_size}/256, layer decay {c.layer_decay}")

    def loss_fn(net, batch):
        frames, boxes, target = batch  # (b, T, 3, S, S) uint8, (b, 5), (b,) class indices or (b, D) values
        video = device_transform(frames, boxes, model.cfg.img_size)  # (b, 3, T, S, S)
        if c.random_erase > 0:  # an input augmentation of the release's data pipeline, so before mixup
            video = random_erasing(video, c.random_erase)
        if c.task == "regression":
            return F.mse_loss(net(video).float(), target.float())
        soft = F.one_hot(target, n_out).float()  # (b, C) probabilities
        if c.mixup > 0 or c.cutmix > 0:
            video, soft = mixup_cutmix(video, soft, c.mixup, c.cutmix)
        # smoothing the mixed targets = mixing smoothed ones (timm's order): both are linear and keep sums of 1
        return F.cross_entropy(net(video).float(), soft, label_smoothing=c.label_smoothing)

    def validate(epoch, iter_num, last):  # best.pt and val_predictions.csv follow the best best_metric
        if epoch % c.eval_every and not last:
            return
        model.eval()
        idx, scores = evaluate(model, eval_sets["val"], d, c)
        model.train()
        m = compute_metrics(eval_sets["val"], idx, scores, c)
        if improved := m[c.best_metric] > best["value"]:
            best.update(value=m[c.best_metric], epoch=epoch, metrics=m)
        if d.master:
            if improved:
                with atomic_path(os.path.join(c.out_dir, "best.pt")) as tmp:  # a crash while saving keeps the last
                    torch.save({"model": model.state_dict(), "config": vars(c), "model_config": model.cfg.to_dict(),
                                "best": best}, tmp)
                write_predictions(os.path.join(c.out_dir, "val_predictions.csv"), eval_sets["val"], idx, scores, c)
            log_json(os.path.join(c.out_dir, "log.jsonl"), {"iter": iter_num, "epoch": epoch, "val": m})
            tqdm.write(f"epoch {epoch}: val {format_metrics(m)}" + ("  (best so far)" if improved else ""))

    epochs_done, _ = fit(c, d, model, optimizer, lr, train_set, loss_fn, checkpoint, c.batch_size,
                         after_epoch=validate if "val" in eval_sets else None,
                         extra_state=lambda: {"best": best, "train_videos": len(train_set)})
    results = {"best_metric": c.best_metric, "best_epoch": best["epoch"], "val": best["metrics"],
               "last_epoch": math.ceil(epochs_done), "val_test_overlap": bool(warning)}
    if "test" in eval_sets:
        results.update(test_results(c, d, model, eval_sets["test"], best, results["last_epoch"]))
    results["wall_time_s"] = time.time() - t_start  # this process: start-up, training, evaluation
    if d.master:
        write_json(os.path.join(c.out_dir, "results.json"), results)
        print(summary(c, results, warning))


def test_results(c, d, model, test_set, best, last_epoch):
    """Test metrics of the last epoch's model and, if it differs, the best val epoch's (best.pt), the one reported."""
    model.eval()
    results, names = {}, ["last"] + (["best"] if best["epoch"] not in (None, last_epoch) else [])
    for name in names:
        if name == "best":  # rank 0 wrote best.pt before it joined the last model's evaluation (a gather)
            model.load_state_dict(load_checkpoint(os.path.join(c.out_dir, "best.pt"))["model"])
        idx, scores = evaluate(model, test_set, d, c)
        results[f"test_{name}"] = compute_metrics(test_set, idx, scores, c)
        if d.master:
            csv = "test_predictions.csv" if name == names[-1] else "test_predictions_last.csv"
            write_predictions(os.path.join(c.out_dir, csv), test_set, idx, scores, c)
    results["test"] = results[f"test_{names[-1]}"]
    return results


# --- augmentations: random erasing, mixup and cutmix --------------------------------------------------
def mixup_cutmix(video, soft_target, mixup_alpha, cutmix_alpha, switch_prob=0.5, generator=None):
    """Mix each clip with the reversed batch's (timm's Mixup, mode "batch"), lam ~ Beta(alpha, alpha): mixup blends
    pixels lam : 1 - lam, cutmix pastes one box of the partner's frames (the same in every frame), lam = the area kept;
    targets mix by lam. With both on, cutmix has probability switch_prob. video (B, 3, T, H, W), soft_target (B, C)."""
    H, W, dev = video.shape[-2], video.shape[-1], video.device
    rand = lambda: torch.rand((), generator=generator, device=dev)
    use_cutmix = torch.full((), cutmix_alpha > 0, device=dev) & ((mixup_alpha <= 0) | (rand() < switch_prob))
    alpha = torch.where(use_cutmix, cutmix_alpha, mixup_alpha).float()
    # Beta(alpha, alpha) drawn as torch.distributions.Beta does, with a generator and no host-syncing argument checks
    lam = torch._sample_dirichlet(alpha.expand(2).contiguous(), generator=generator)[0]
    cut_h, cut_w = (H * (1 - lam).sqrt()).floor(), (W * (1 - lam).sqrt()).floor()
    cy, cx = (rand() * H).floor(), (rand() * W).floor()  # the box centre, clipped at the border below
    rows, cols = torch.arange(H, device=dev), torch.arange(W, device=dev)
    box = (((rows >= cy - cut_h // 2) & (rows < cy + cut_h // 2))[:, None]
           & ((cols >= cx - cut_w // 2) & (cols < cx + cut_w // 2)) & use_cutmix)  # (H, W)
    lam = torch.where(use_cutmix, 1 - box.float().mean(), lam)  # cutmix: the area kept
    keep = torch.where(use_cutmix, (~box).to(video.dtype), lam.to(video.dtype))  # (H, W): 1 / 0 or lam
    mixed = torch.lerp(video.flip(0), video, keep)  # exact at keep 0 and 1: cutmix copies pixels
    return mixed, soft_target * lam + soft_target.flip(0) * (1 - lam)


def random_erasing(video, prob, min_area=0.02, max_area=1 / 3, min_aspect=0.3, generator=None):
    """timm's RandomErasing (mode "pixel", one box) as the release applies it: each frame on its own, with probability
    prob, gets a box of normal noise (first fit of 10 tries), matching the normalised video (B, 3, T, H, W) in scale."""
    B, C, T, H, W = video.shape
    rand = lambda *shape: torch.rand(shape, generator=generator, device=video.device)
    area = H * W * (min_area + (max_area - min_area) * rand(B, T, 10))
    aspect = torch.exp(math.log(min_aspect) * (1 - 2 * rand(B, T, 10)))
    h, w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()  # (B, T, 10 tries)
    fits = (h < H) & (w < W)
    first = fits.int().argmax(-1, keepdim=True)  # the first try that fits
    h, w = h.gather(-1, first), w.gather(-1, first)  # (B, T, 1)
    erase = (rand(B, T, 1) < prob) & fits.any(-1, keepdim=True)
    top, left = (rand(B, T, 1) * (H - h + 1)).floor(), (rand(B, T, 1) * (W - w + 1)).floor()
    rows, cols = torch.arange(H, device=video.device), torch.arange(W, device=video.device)
    box = (erase & (rows >= top) & (rows < top + h))[..., None] & ((cols >= left) & (cols < left + w))[..., None, :]
    noise = torch.randn(video.shape, generator=generator, device=video.device, dtype=video.dtype)
    return torch.where(box[:, None], noise, video)  # box (B, 1, T, H, W)


# --- evaluation ------------------------------------------------------------------------------------
def eval_dataset(c, key, mc, d):
    """An "eval" dataset of config key `key`'s list, every file checked now by one rank (evaluation never skips one)."""
    ds = make_dataset(c, key, "eval", mc, num_clips=c.num_clips, num_crops=c.num_crops, task=c.task,
                      num_outputs=num_model_outputs(c) if "_list" in key else None)  # no labels: --predict, --extract
    parts = [ds.unreadable(range(d.rank, len(ds), d.world_size))] * d.world_size
    if d.ddp:
        dist.all_gather_object(parts, parts[0])
    if bad := sorted(b for part in parts for b in part):
        shown = "; ".join(f"line {n}: {path} ({reason})" for n, path, reason in bad[:20])
        raise ConfigError(f"{key}={getattr(c, key)}: {len(bad)} of {len(ds)} entries cannot be read (evaluation "
                          f"never skips a video; fix or remove them): {shown}" + ("; ..." if len(bad) > 20 else ""))
    if c.video_group and "_list" in key:  # found now, not after an epoch
        try:
            metrics.group_average(list(map(ds.path, range(len(ds)))), np.zeros((len(ds), 1)), ds.targets, c.video_group)
        except ValueError as e:  # a regex that does not compile, or leaves a path out
            raise ConfigError(f"{key}={getattr(c, key)}: {e}") from None
    return ds


@torch.no_grad()
def evaluate(score_fn, dataset, d, c):
    """(indices (N,), scores (N, C)) of all videos, on every rank: score_fn per view (softmax for classification, as the
    release merges) averaged. Ranks take every world_size-th video, unpadded: as one process, no video counted twice."""
    loader = DataLoader(Subset(dataset, range(d.rank, len(dataset), d.world_size)), c.eval_batch_size,
                        num_workers=c.num_workers, pin_memory=d.device.type == "cuda", generator=torch.Generator())
    indices, scores = [], []
    for views, _, index in tqdm(loader, disable=not d.master, desc="evaluate", leave=False, dynamic_ncols=True):
        B, V = views.shape[:2]  # views uint8 (B, V, T, 3, S, S)
        video = device_transform(views.to(d.device, non_blocking=True), None, dataset.img_size).flatten(0, 1)
        with autocast(d):
            out = score_fn(video).float()  # (B*V, C)
            scores.append((out.softmax(-1) if c.task == "classification" else out).view(B, V, -1).mean(1).cpu())
        indices.append(index)
    parts = [(torch.cat(indices), torch.cat(scores)) if indices else None] * d.world_size  # None: an empty shard
    if d.ddp:
        dist.all_gather_object(parts, parts[0])  # tensors: a million features fit
    idx, scores = (torch.cat(x) for x in zip(*filter(None, parts)))
    order = idx.argsort()
    return idx[order].numpy(), scores[order].double().numpy()


def compute_metrics(dataset, idx, scores, c):
    """The metrics of the evaluated videos; with video_group, of their source videos (clip scores averaged)."""
    ids, targets = [dataset.path(i) for i in idx], dataset.targets[idx]  # the labels as written in the list
    if c.video_group:  # eval_dataset checked it against every path and label
        _, scores, targets = metrics.group_average(ids, scores, targets, c.video_group)
    if c.task == "classification":
        return {"uar": metrics.uar(targets, scores), "war": metrics.war(targets, scores),
                "f1": metrics.weighted_f1(targets, scores)}
    return {"ccc": float(np.mean(metrics.ccc(targets, scores))), "pcc": float(np.mean(metrics.pcc(targets, scores)))}


def format_metrics(m):
    return f"UAR {100 * m['uar']:.2f}  WAR {100 * m['war']:.2f}  F1 {100 * m['f1']:.2f}" if "uar" in m else \
        f"CCC {m['ccc']:.4f}  PCC {m['pcc']:.4f}"


def write_predictions(path, dataset, idx, scores, c):
    metrics.write_predictions(path, [dataset.path(i) for i in idx], dataset.targets[idx], scores,
                              class_names=list(c.class_names) or None, task=c.task)


# --- the model ---------------------------------------------------------------------------------------
def num_model_outputs(c):
    return c.num_classes if c.task == "classification" else c.num_outputs


def build_classifier(c, master):
    """SVFAPClassifier as init_from says (scratch and resume start from the config's preset)."""
    ckpt = {} if c.init_from in ("scratch", "resume") else load_checkpoint(c.init_from)
    # a pretrain.py (or finetune.py) checkpoint decides the encoder's shape; a release checkpoint: its tensors' shapes
    mc = build_model_config(c.model, c.model_args, base=ckpt.get("model_config"))
    state = next((ckpt[k] for k in ("model", "module") if isinstance(ckpt.get(k), dict)), ckpt)
    if ckpt and "model_config" not in ckpt:
        mc = build_model_config(c.model, {**c.model_args, **release_shape(state, mc)})
    model = SVFAPClassifier(mc, num_model_outputs(c))
    if not ckpt:
        return model
    target = model.encoder.state_dict()
    if "model_config" in ckpt:
        source = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
        loaded = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
        model.encoder.load_state_dict(loaded, strict=False)
        not_loaded, unused = sorted(set(target) - set(loaded)), sorted(set(source) - set(loaded))
        layout = f"pretrain.py checkpoint, preset {ckpt['config'].get('model')!r}"
    else:  # the authors' release
        own = model.state_dict()  # a fine-tuned release head with another class count stays out
        state = {k: v for k, v in state.items() if not (k in ("head.weight", "head.bias") and v.shape != own[k].shape)}
        try:
            missing, unused = load_official_state_dict(model, state)
        except ValueError as e:
            raise ConfigError(f"init_from={c.init_from}: {e}") from None
        not_loaded = [k.removeprefix("encoder.") for k in missing if k.startswith("encoder.")]
        layout = (f"the authors' release layout; built {mc.embed_dim} wide, {mc.num_heads} heads, depths "
                  f"{mc.stage_depths}")
        model.has_fc_norm = "fc_norm.weight" not in missing
    if master:
        print(f"init_from={c.init_from} ({layout}): loaded {len(target) - len(not_loaded)}/{len(target)} encoder "
              f"tensors" + (f"; NOT loaded: {', '.join(not_loaded)}" if not_loaded else "")
              + (f"; unused in the checkpoint: {', '.join(unused)}" if unused else ""))
    return model


def release_shape(state, mc):
    """A release state dict's encoder shape as SVFAPConfig fields: the width of its patch embedding, the heads of the
    preset of that width (else 64 channels a head, as base, small and the release's 768 / 12), N1 its plain blocks.
    Its SBT and reverse blocks are numbered over stages 2 and 3 alike: mc's N2, N3 if they add up, else 2:1 as base."""
    keys = {k.removeprefix("module.").removeprefix("encoder.") for k in state}  # decoder keys keep "decoder."
    blocks = len({m[1] for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))})
    sbt = len({m[1] for k in keys if (m := re.match(r"blocks\.(\d+)\.cross_norm1\.", k))})  # SBT and reverse
    later = mc.stage_depths[1:] if sum(mc.stage_depths[1:]) == sbt else (sbt - sbt // 3, sbt // 3)  # 9: (6, 3)
    width = next((v.shape[0] for k, v in state.items() if k.endswith("patch_embed.proj.weight")), mc.embed_dim)
    heads = mc.num_heads if width == mc.embed_dim else next(
        (p.num_heads for p in CONFIGS.values() if p.embed_dim == width), max(1, width // 64))
    return dict(embed_dim=width, num_heads=heads, stage_depths=(blocks - sbt, *later))


def checkpoint_model(c, encoder_ok=False):
    """(eval-mode model, its run's config, setup(c)) of a finetune.py --ckpt, or any with encoder_ok (config None)."""
    ckpt = load_checkpoint(c.ckpt)
    finetuned = "model_config" in ckpt and ckpt.get("config", {}).get("task") is not None
    if not finetuned and not encoder_ok:
        raise ConfigError(f"ckpt={c.ckpt} is not a finetune.py checkpoint (e.g. out/finetune_demo/best.pt)")
    d = setup(c, training=False)
    if finetuned:
        cc = SimpleNamespace(**ckpt["config"])
        model = SVFAPClassifier(SVFAPConfig.from_dict(ckpt["model_config"]), num_model_outputs(cc))
        model.load_state_dict(ckpt["model"])
    else:
        c.init_from, cc = c.ckpt, None
        model = build_classifier(c, d.master)
    return model.to(d.device).eval(), cc, d


# --- modes without training ----------------------------------------------------------------------
def video_list(folder, key, videos):
    """folder/<key>.txt listing the videos' absolute paths, so that the checkpoint run's replace_prefix cannot apply."""
    for path in videos:
        if not os.path.exists(path):  # a video file or a folder of frames
            raise ConfigError(f"--{key}={path}: file not found")
        if any(ch.isspace() for ch in os.path.abspath(path)):  # list lines split at whitespace
            raise ConfigError(f"--{key}={path}: paths with spaces are not supported; rename or link the file")
    with open(listing := os.path.join(folder, f"{key}.txt"), "w") as f:
        f.writelines(os.path.abspath(p) + "\n" for p in videos)
    return listing


def predict_videos(c):
    """Print per-class probabilities (or regression outputs) of each --predict video, averaged over views."""
    model, cc, d = checkpoint_model(c)
    with tempfile.TemporaryDirectory() as tmp:
        cc.predict, cc.replace_prefix = video_list(tmp, "predict", c.predict), ()
        cc.num_workers, cc.eval_batch_size = 0, 1  # a few videos: no worker processes
        _, scores = evaluate(model, eval_dataset(cc, "predict", model.cfg, d), d, cc)
    names = list(cc.class_names) or [str(i) for i in range(num_model_outputs(cc))]
    for path, s in zip(c.predict, scores if d.master else []):
        top = f"  -> {names[int(s.argmax())]}" if cc.task == "classification" else ""
        print(f"{path}: " + "  ".join(f"{n} {v:.4f}" for n, v in zip(names, s)) + top)


def evaluate_checkpoint(c):
    """eval_only: `ckpt`'s metrics (its task and classes) on val_list and test_list; eval_<split>_predictions.csv."""
    model, cc, d = checkpoint_model(c)
    c.task, c.num_classes, c.num_outputs, c.class_names = cc.task, cc.num_classes, cc.num_outputs, cc.class_names
    results = {}
    for split in [s for s in ("val", "test") if getattr(c, f"{s}_list")]:
        ds = eval_dataset(c, f"{split}_list", model.cfg, d)
        idx, scores = evaluate(model, ds, d, c)
        results[split] = compute_metrics(ds, idx, scores, c)
        if d.master:
            path = os.path.join(c.out_dir, f"eval_{split}_predictions.csv")
            write_predictions(path, ds, idx, scores, c)
            print(f"{split} ({ds.annotation_file}, {len(idx)} videos): {format_metrics(results[split])}  -> {path}")
    if d.master:
        write_json(os.path.join(c.out_dir, "results_eval.json"), {"ckpt": c.ckpt, **results})


def extract_features(c):
    """--extract=LIST --ckpt=CKPT: out_dir/features.npy (N, C) in list order and out_dir/features.csv."""
    check_lists(c, "extract")
    model, cc, d = checkpoint_model(c, encoder_ok=True)
    pooled = cc is not None or getattr(model, "has_fc_norm", False)  # fc_norm's output (finetune.py: the head's input)
    c.task = "regression"  # the features as they are (no softmax); labels are optional and unused
    ds = eval_dataset(c, "extract", model.cfg, d)
    _, features = evaluate(lambda v: model.embed(v)[0] if pooled else model.embed(v)[1].mean(1), ds, d, c)
    if d.master:
        with atomic_path(os.path.join(c.out_dir, "features.npy")) as tmp, open(tmp, "wb") as f:
            np.save(f, features.astype(np.float32))
        with atomic_path(os.path.join(c.out_dir, "features.csv")) as tmp, open(tmp, "w") as f:
            f.write("row,path\n" + "".join(f"{i},{ds.path(i)}\n" for i in range(len(ds))))
        print(f"features of {len(ds)} videos, {features.shape[1]} each: {c.out_dir}/features.npy, features.csv")


@torch.no_grad()
def explain_video(c):
    """Per stage a row per bottleneck token, a column per time slice of the middle clip: its middle frame under the
    token's spatial softmax (dark 0, red max/2, yellow max). Returns frames uint8 (T, S, S, 3), weights (T_s, P, K)."""
    ckpt = load_checkpoint(c.ckpt)
    if "model_config" not in ckpt:
        raise ConfigError(f"ckpt={c.ckpt}: --explain draws pretrain.py and finetune.py checkpoints")
    cfg, cc = SVFAPConfig.from_dict(ckpt["model_config"]), SimpleNamespace(**ckpt["config"])
    encoder = TPSBT(cfg).eval()  # pre-training and fine-tuning keep the encoder under "encoder."
    encoder.load_state_dict({k.removeprefix("encoder."): v for k, v in ckpt["model"].items()
                             if k.startswith("encoder.")})
    with tempfile.TemporaryDirectory() as tmp:
        cc.explain, cc.replace_prefix = video_list(tmp, "explain", [c.explain]), ()
        views = make_dataset(cc, "explain", "eval", cfg, num_clips=1, num_crops=1)[0][0]  # (1, T, 3, S, S) uint8
    maps = []  # the spatial attention of each bottleneck stage, (T_s, P, K)
    for stage in encoder.stages:  # hooks on this function's own encoder
        if stage.spatial_attention is not None:
            stage.spatial_attention.register_forward_hook(lambda m, args, out: maps.append(m.weights(args[0])[0]))
    encoder(device_transform(views, None, cfg.img_size))
    if not maps:
        raise ConfigError(f"ckpt={c.ckpt}: the model has no spatial bottleneck (spatial_bottleneck=False)")
    frames = views[0].permute(0, 2, 3, 1).float()  # (T, S, S, 3)
    T, (_, gh, gw), p = cfg.num_frames, cfg.grid, cfg.patch_size
    blocks, width = [], maps[0].shape[0] * (cfg.img_size + 2)  # the first bottleneck stage has the most slices
    for w in maps:
        Ts, P, K = w.shape
        heat = (w / w.amax(1, keepdim=True)).permute(2, 0, 1).reshape(K, Ts, gh, gw)  # 1 at each map's maximum
        heat = heat.repeat_interleave(p, 2).repeat_interleave(p, 3)  # (K, T_s, S, S): one value per patch
        color = torch.stack([(2 * heat).clamp(max=1), (2 * heat - 1).clamp(min=0), torch.zeros_like(heat)], -1)
        middle = frames[[t * (T // Ts) + T // Ts // 2 for t in range(Ts)]]  # (T_s, S, S, 3)
        cells = F.pad(0.45 * middle + 0.55 * 255 * color, (0, 0, 1, 1, 1, 1), value=255)  # (K, T_s, S+2, S+2, 3)
        block = cells.permute(0, 2, 1, 3, 4).reshape(K * cells.shape[2], Ts * cells.shape[3], 3)  # a row per token
        blocks.append(F.pad(block, (0, 0, 0, width - block.shape[1], 0, 8), value=255))
    write_png(c.out, torch.cat(blocks).round().to(torch.uint8).numpy())
    print(f"{c.out}: the spatial attention of {len(maps)} stages' bottleneck tokens over {c.explain}")
    return views[0].permute(0, 2, 3, 1).numpy(), [w.numpy() for w in maps]


# --- the recipe's checks and report ----------------------------------------------------------------
def apply_fold(c):
    keys = [k for k in ("out_dir", "train_list", "val_list", "test_list") if "{fold}" in getattr(c, k)]
    if keys and c.fold < 1:
        raise ConfigError(f"{keys[0]}={getattr(c, keys[0])} holds {{fold}}: give --fold=N (DFEW: 1..5)")
    if c.fold and not keys:  # else every fold would train the same lists into the same out_dir
        raise ConfigError(f"--fold={c.fold}, but no path of the config holds {{fold}} (out_dir, train_list, val_list, "
                          f"test_list): write the fold's lists there, or leave fold out")
    for k in keys:
        setattr(c, k, getattr(c, k).replace("{fold}", str(c.fold)))


def check_task(c):
    if c.task not in METRICS:
        raise ConfigError(f"task={c.task!r}: valid values are classification and regression")
    if (n_out := num_model_outputs(c)) < 1:
        raise ConfigError(f"{'num_classes' if c.task == 'classification' else 'num_outputs'} must be at least 1")
    if c.class_names and len(c.class_names) != n_out:
        raise ConfigError(f"class_names has {len(c.class_names)} names but the model has {n_out} outputs")
    c.best_metric = c.best_metric or METRICS[c.task][0]
    if c.best_metric not in METRICS[c.task]:
        raise ConfigError(f"best_metric={c.best_metric!r}: valid for {c.task} are {', '.join(METRICS[c.task])}")


def overlap_warning(val, test):
    """The release's val lists are its test lists: selecting the best epoch on them is selecting on test."""
    shared = set(map(val.path, range(len(val)))) & set(map(test.path, range(len(test))))
    what = "the same videos" if len(shared) == len(val) == len(test) else f"{len(shared)} videos"
    return (f"WARNING: val_list and test_list hold {what}: the best-on-val epoch is chosen on the test set and its "
            f"test metrics are optimistic; the last epoch's test metrics are reported beside them") if shared else ""


def summary(c, r, warning):
    lines = [f"done: {c.out_dir}"]
    if r["val"]:
        lines.append(f"val, best epoch {r['best_epoch']} by {c.best_metric}: {format_metrics(r['val'])}")
    if "test_best" in r:
        lines.append(f"test, model of the best val epoch ({r['best_epoch']}): {format_metrics(r['test_best'])}"
                     f"   [test_predictions.csv]")
    if "test" in r:
        csv = "test_predictions_last.csv" if "test_best" in r else "test_predictions.csv"
        lines += [f"test, model of the last epoch ({r['last_epoch']}): {format_metrics(r['test_last'])}   [{csv}]",
                  f"full report: python metrics.py {os.path.join(c.out_dir, 'test_predictions.csv')}"]
    return "\n".join(lines + ([warning] if warning else []))


if __name__ == "__main__":
    run(main, sys.argv[1:], "finetune.py", __doc__, {k: globals()[k] for k in CONFIG_KEYS})
