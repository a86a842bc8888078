"""Metrics as the SVFAP paper reports them (WAR / UAR / weighted F1 in %, CCC / PCC / personality ACC) of the
prediction files finetune.py writes. Folds are pooled, then measured once (not the mean of fold values).

  python metrics.py out/dfew/fold1/test_predictions.csv ... out/dfew/fold5/test_predictions.csv
  python metrics.py --video_group='(.*)/[^/]+$' out/finetune_avcaffe_arousal/test_predictions.csv
  python metrics.py --summary "scratch=out/compare/10pct_scratch_seed*" "pre-trained=out/compare/10pct_pretrained_seed*"
      a Markdown table of repeated runs: test UAR and WAR as mean +- sample sd (min..max), wall time
  python metrics.py --paper=out/paper --svg=docs/paper.svg     # `make paper`'s tables and picture
"""

import argparse
import csv
import glob
import json
import os
import re
import sys
from collections import namedtuple

import numpy as np

from data import NUMBER, atomic_path


def _as_array(x, name, labels=False):
    """Finite numbers from a list / numpy array / torch tensor; labels: 1-D int64 (whole-number floats accepted)."""
    a = np.asarray(x.detach().cpu().numpy() if hasattr(x, "detach") else x)
    if a.size == 0:
        raise ValueError(f"{name} is empty; a metric needs at least one sample")
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        what, bad = ("NaN", np.isnan(a)) if np.isnan(a).any() else ("inf", np.isinf(a))
        raise ValueError(f"{name} contains {what} (first at sample {bad.reshape(len(a), -1).any(1).argmax()})")
    if labels and a.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {a.shape}")
    if labels and a.dtype.kind == "f" and (a != np.round(a)).any():
        raise ValueError(f"{name} must hold whole-number class labels, got non-integer values")
    return a.astype(np.int64) if labels else a


def _same_length(y_true, y_pred):
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} samples but y_pred has {len(y_pred)}; they must match")

# -----------------------------------------------------------------------------
# classification: y_pred labels (B,) or scores (B, C) -> argmax (ties: lowest); num_classes=None: C, or 1 + max label


def confusion_matrix(y_true, y_pred, num_classes=None):
    """int64 (C, C) counts; rows = true class, columns = predicted class."""
    y_true, p = _as_array(y_true, "y_true", labels=True), _as_array(y_pred, "y_pred")
    _same_length(y_true, p)
    if p.ndim == 2 and num_classes not in (None, p.shape[1]):
        raise ValueError(f"y_pred has {p.shape[1]} score columns but num_classes={num_classes}")
    y_pred = p.argmax(axis=1) if p.ndim == 2 else _as_array(p, "y_pred", labels=True)  # (B, C) scores -> (B,) labels
    num_classes = num_classes or (p.shape[1] if p.ndim == 2 else int(max(y_true.max(), y_pred.max())) + 1)
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if len(bad := np.flatnonzero((y < 0) | (y >= num_classes))):
            raise ValueError(f"{name}[{bad[0]}] = {y[bad[0]]} is outside the valid labels 0..{num_classes - 1}")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes ** 2).reshape(num_classes, -1)


def war(y_true, y_pred, num_classes=None):
    """Weighted average recall = accuracy: the fraction of samples predicted correctly."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return float(np.trace(cm) / cm.sum())


def per_class_recall(y_true, y_pred, num_classes=None):
    """float64 (C,) recall of each class; NaN for a class with no sample in y_true (recall undefined)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    return np.diag(cm) / np.where(cm.sum(axis=1) > 0, cm.sum(axis=1), np.nan)


def uar(y_true, y_pred, num_classes=None):
    """Unweighted average recall: the mean recall of the classes in y_true (one never predicted counts 0)."""
    return float(np.nanmean(per_class_recall(y_true, y_pred, num_classes)))


def weighted_f1(y_true, y_pred, num_classes=None):
    """F1 per class weighted by its support in y_true: sklearn's average="weighted", zero_division=0."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp, support = np.diag(cm).astype(np.float64), cm.sum(axis=1)
    denom = support + cm.sum(axis=0)  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted)
    return float(np.average(np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0), weights=support))

# -----------------------------------------------------------------------------
# regression metrics: 1-D inputs give a float, (N, D) inputs give a (D,) array, one value per dimension


def _per_dimension(fn):  # fn: (N, D) columns -> (D,) values
    def metric(y_true, y_pred):
        t, p = _as_array(y_true, "y_true").astype(np.float64), _as_array(y_pred, "y_pred").astype(np.float64)
        _same_length(t, p)
        if t.shape != p.shape or t.ndim not in (1, 2):
            raise ValueError(f"y_true and y_pred must be (N,) or (N, D) with equal shapes, got {t.shape} and {p.shape}")
        v = fn(t.reshape(len(t), -1), p.reshape(len(p), -1))  # (N, D) -> (D,)
        return float(v[0]) if t.ndim == 1 else v
    metric.__name__, metric.__doc__ = fn.__name__, fn.__doc__
    return metric


@_per_dimension
def ccc(t, p):
    """Lin's concordance correlation coefficient 2 cov / (var_t + var_p + (mean_t - mean_p)^2), population
    moments as in Lin (1989). One side constant: 0.0; both the same constant: 1.0 (perfect agreement)."""
    tc, pc = t - t.mean(0), p - p.mean(0)
    const_t, const_p = t.max(0) == t.min(0), p.max(0) == p.min(0)  # exact: a centred constant can be 1e-17
    with np.errstate(invalid="ignore", divide="ignore"):  # 0 / 0 for constants, replaced below
        v = 2 * (tc * pc).mean(0) / ((tc ** 2).mean(0) + (pc ** 2).mean(0) + (t.mean(0) - p.mean(0)) ** 2)
    return np.where(const_t | const_p, 1.0 * (const_t & const_p & (t[0] == p[0])), v)


@_per_dimension
def pcc(t, p):
    """Pearson correlation coefficient r; 0.0 when either side is constant (scipy would give NaN)."""
    tc, pc = t - t.mean(0), p - p.mean(0)
    const_t, const_p = t.max(0) == t.min(0), p.max(0) == p.min(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (tc * pc).sum(0) / np.sqrt((tc ** 2).sum(0) * (pc ** 2).sum(0))
    return np.where(const_t | const_p, 0.0, np.clip(r, -1, 1))  # rounding can push |r| a hair above 1


@_per_dimension
def personality_acc(t, p):
    """First Impressions accuracy: 1 - mean |y_pred - y_true|, for labels in [0, 1]; no clipping."""
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"personality ACC needs labels in [0, 1], got labels in [{t.min():g}, {t.max():g}]")
    return 1.0 - np.abs(p - t).mean(0)

# -----------------------------------------------------------------------------
# prediction files: one CSV per evaluation, one row per video; the header tells the task
#   classification: id,target,score_<class>,...        (target = class index)
#   regression:     id,target_<dim>,...,pred_<dim>,... (same dims in the same order)
Predictions = namedtuple("Predictions", "task ids targets scores class_names")


def write_predictions(path, ids, targets, scores, class_names=None, task=None):
    """ids: N video ids (paths); targets (N,) class indices or (N,) / (N, D) labels; scores (N, C) or (N,) / (N, D);
    class_names of the C classes or D dimensions (None: indices); task=None: integer targets mean classification."""
    targets, scores = _as_array(targets, f"{path}: targets"), _as_array(scores, f"{path}: scores")
    task = task or ("classification" if targets.dtype.kind in "biu" else "regression")
    if len(targets) != len(ids) or len(scores) != len(ids):
        raise ValueError(f"{path}: {len(ids)} ids but {len(targets)} targets and {len(scores)} scores; they must match")
    if task == "classification":
        targets, width = _as_array(targets, "targets", labels=True), scores.shape[1]
        if len(bad := targets[(targets < 0) | (targets >= width)]):
            raise ValueError(f"{path}: target {bad[0]} is outside 0..{width - 1}, the {width} score columns")
        targets, what, prefixes = targets[:, None], "class", ["score_"]  # (N,) -> (N, 1): one target column
    else:
        targets, scores = (a.reshape(len(a), 1) if a.ndim == 1 else a for a in (targets, scores))  # (N,) -> (N, 1)
        if targets.ndim != 2 or targets.shape != scores.shape:
            raise ValueError(f"{path}: targets {targets.shape} and scores {scores.shape} must both be (N, D)")
        width, what, prefixes = targets.shape[1], "dimension", ["target_", "pred_"]
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(width)]
    if len(names) != width or len(set(names)) != width or "" in names:
        raise ValueError(f"{path}: expected {width} unique, non-empty {what} names, got {names}")
    header = ["id"] + (["target"] if task == "classification" else []) + [pre + c for pre in prefixes for c in names]
    rows = [header] + [[i] + [repr(v) for v in t + s] for i, t, s in zip(ids, targets.tolist(), scores.tolist())]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:  # a crash never leaves half a file
        csv.writer(f).writerows(rows)


def read_predictions(path):
    """Predictions (task, ids (N,), targets int64 (N,) | float64 (N, D), scores float64 (N, C) | (N, D),
    class_names (None: indices)) of a file written by write_predictions; errors name the file, line, column."""
    with open(path, newline="", encoding="utf-8") as f:
        try:
            lines = list(reader := csv.reader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise ValueError(f"{path}:{max(reader.line_num, 1)}: not a CSV file of predictions ({e})") from None
    numbered = [(k + 2, row) for k, row in enumerate(lines[1:]) if row]  # csv gives [] for a blank line
    if not numbered:
        raise ValueError(f"{path}: no prediction rows (an empty file, or a header alone)")
    header, d = lines[0], (len(lines[0]) - 1) // 2  # d: the target columns (of a regression file)
    if header[:1] != ["id"]:
        raise ValueError(f"{path}:1: the header's first column must be 'id', got {','.join(header)!r}")
    dims = [h[len("target_"):] for h in header[1:1 + d]]
    if len(header) >= 3 and header[1] == "target" and all(h.startswith("score_") for h in header[2:]):
        task, names, d = "classification", [h[len("score_"):] for h in header[2:]], 1
    elif d and header[1:] == ["target_" + n for n in dims] + ["pred_" + n for n in dims]:
        task, names = "regression", dims
    else:
        raise ValueError(f"{path}:1: unrecognised header {header}; expected 'id,target,score_<class>,...' "
                         f"(classification) or 'id,target_<dim>,...,pred_<dim>,...' (regression, same dim order)")
    values = np.empty((len(numbered), len(header) - 1))
    for r, (line, row) in enumerate(numbered):
        if len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} fields but the header has {len(header)}")
        for c, field in enumerate(row[1:]):
            if not re.fullmatch(NUMBER, field):  # float() would take nan and inf too
                raise ValueError(f"{path}:{line}: column {header[c + 1]!r} must be a finite number, got {field!r}")
            values[r, c] = float(field)
        if task == "classification" and not (0 <= values[r, 0] < len(names) and values[r, 0] % 1 == 0):
            raise ValueError(f"{path}:{line}: target {row[1]!r} is not a class index in 0..{len(names) - 1}")
    targets = values[:, 0].astype(np.int64) if task == "classification" else values[:, :d]
    return Predictions(task, [row[0] for _, row in numbered], targets, values[:, d:],
                       None if names == [str(i) for i in range(len(names))] else names)

# -----------------------------------------------------------------------------
# the report: files pooled, video level (AVCAffe) averaging; the summary of repeated runs (seeds); the CLI


def group_average(ids, scores, targets, groups):
    """(video ids, mean clip scores, targets) of the videos, sorted by id. groups: the video of each clip, or a
    regex whose first capture group (or whole match) in a clip's id names its video."""
    if isinstance(groups, str):
        try:
            regex, groups = groups, [(m := re.search(groups, str(i))) and m.group(1 if m.re.groups else 0) for i in ids]
        except re.error as e:
            raise ValueError(f"video_group={groups!r} is not a regular expression: {e}") from None
        if bad := [str(i) for i, name in zip(ids, groups) if not name]:  # None: no match or an unused group
            raise ValueError(f"video_group={regex!r} does not match the clip {bad[0]!r}, or its group is empty; it "
                             f"must name every clip's video, e.g. '(.*)/[^/]+$' takes a clip's folder as its video")
    keys = [str(k) for k in groups]
    scores, targets = _as_array(scores, "scores").astype(np.float64), _as_array(targets, "targets")
    if not len(keys) == len(scores) == len(targets):
        raise ValueError(f"{len(keys)} clips but {len(scores)} scores and {len(targets)} targets; they must match")
    videos, head, video = np.unique(keys, return_index=True, return_inverse=True)  # (V,), (V,) first clips, (N,)
    if len(bad := np.flatnonzero((targets != targets[head][video]).reshape(len(keys), -1).any(axis=1))):
        b, f = bad[0], head[video[bad[0]]]
        raise ValueError(f"clip {ids[b]!r} has target {targets[b]} but clip {ids[f]!r} of the same video "
                         f"{keys[b]!r} has {targets[f]}; the clips of a video must share its label")
    return videos.tolist(), np.stack([scores[video == v].mean(axis=0) for v in range(len(videos))]), targets[head]


def _table(rows):  # the first column left-aligned, the others right-aligned
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def format_report(pred, title):
    """The evaluation report of a Predictions (one file or a pool) as text, as the CLI prints it."""
    n, width, y, s = len(pred.ids), pred.scores.shape[1], pred.targets, pred.scores
    names = pred.class_names or [str(i) for i in range(width)]
    if pred.task == "classification":
        recall, cm = per_class_recall(y, s), confusion_matrix(y, s)
        absent = f" ({np.isnan(recall).sum()} without samples, left out of UAR)" if np.isnan(recall).any() else ""
        recalls = [[k, str(m.sum()), "-" if np.isnan(r) else f"{100 * r:.2f}"] for k, m, r in zip(names, cm, recall)]
        return "\n".join([title, f"classification: {n} videos, {width} classes{absent}",
                          f"WAR {100 * war(y, s):6.2f}", f"UAR {100 * uar(y, s):6.2f}",
                          f"weighted F1 {100 * weighted_f1(y, s):6.2f}", "", "per-class recall (%):",
                          _table([["class", "support", "recall"]] + recalls), "",
                          "confusion matrix (rows = true class, columns = predicted):",
                          _table([["true \\ pred"] + names] + [[k] + [str(v) for v in m] for k, m in zip(names, cm)])])
    with_acc = y.min() >= 0 and y.max() <= 1  # personality labels (First Impressions) lie in [0, 1]
    columns = {"CCC": ccc(y, s), "PCC": pcc(y, s)} | ({"ACC": personality_acc(y, s)} if with_acc else {})
    rows = [["dimension", *columns]] + [[names[d]] + [f"{v[d]:.4f}" for v in columns.values()] for d in range(width)]
    rows.append(["mean"] + [f"{v.mean():.4f}" for v in columns.values()])
    note = ["ACC = personality accuracy, 1 - mean |prediction - label| (labels lie in [0, 1])"] if with_acc else []
    return "\n".join([title, f"regression: {n} videos, {width} dimensions", _table(rows)] + note)


def _sd(values):  # sample standard deviation (n - 1), 0 for one value
    return np.std(values, ddof=1) if len(values) > 1 else 0.0


def _spread(values):  # "mean ± sd (min..max)" of percentages
    v = np.asarray(values, dtype=np.float64)
    return f"{v.mean():.2f} ± {_sd(v):.2f} ({v.min():.2f}..{v.max():.2f})"


def summarize_runs(specs):
    """A Markdown row per "NAME=GLOB" of run dirs: UAR / WAR of any test_predictions.csv, results.json's wall_time_s."""
    rows = [["runs", "n", "test UAR % mean ± sd (min..max)", "test WAR % mean ± sd (min..max)",
             "UAR % of each run", "wall time per run"], ["---"] + ["---:"] * 5]
    for spec in specs:
        name, _, pattern = spec.partition("=")  # a glob may hold "=" (out/lr=1e-3_seed*), a name may not
        if not (name and pattern):
            raise ValueError(f"--summary {spec!r}: expected NAME=GLOB, e.g. \"scratch=out/compare/scratch_seed*\"")
        dirs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
        if not dirs:
            raise ValueError(f"{name}: no run directories match")
        uars, wars, minutes = [], [], []
        for d in dirs:
            if os.path.exists(pred_path := os.path.join(d, "test_predictions.csv")):
                p = read_predictions(pred_path)
                if p.task != "classification":
                    raise ValueError(f"{pred_path}: --summary reports UAR and WAR, but this file holds regression")
                uars.append(100 * uar(p.targets, p.scores))
                wars.append(100 * war(p.targets, p.scores))
            try:
                with open(os.path.join(d, "results.json")) as f:
                    minutes.append(float(json.load(f)["wall_time_s"]) / 60)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{d}: no results.json with wall_time_s, did the run finish? ({e!r})") from None
        if uars and len(uars) != len(dirs):
            raise ValueError(f"{name}: {len(dirs) - len(uars)} of {len(dirs)} runs have no test_predictions.csv")
        rows.append([name, str(len(dirs)), _spread(uars) if uars else "-", _spread(wars) if wars else "-",
                     " ".join(f"{u:.2f}" for u in uars) or "-", f"{np.mean(minutes):.1f} min"
                     + (f" ({min(minutes):.1f}..{max(minutes):.1f})" if len(dirs) > 1 else "")])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


# --- make paper: the paper's Fig. 5 and Table V in miniature, as tables and a picture --------------------------
def paper_results(out, svg_path):
    """Markdown tables of Fig. 5 and Table V over the seeds of `make paper`'s runs in `out`; the picture to svg_path."""
    import torch  # here only: prediction files need no torch

    from model import SVFAPConfig, bench_steps
    runs = lambda pattern: sorted(d for d in glob.glob(os.path.join(out, pattern)) if os.path.isdir(d))
    test = lambda pattern, key="uar": [100 * json.load(open(f"{d}/results.json"))["test"][key] for d in runs(pattern)]
    groups = {}  # run name less "_seed<N>" -> its seeds
    for d in runs("*_seed*"):
        groups.setdefault(os.path.basename(d).rsplit("_seed", 1)[0], set()).add(d.rsplit("_seed", 1)[1])
    at = lambda prefix: sorted(int(g.removeprefix(prefix)) for g in groups if g.startswith(prefix))  # their epochs
    seeds, epochs, vit_epochs = groups.get("pretrain_tpsbt"), at("few_tpsbt_e"), at("few_vit_e")
    if not epochs or "few_scratch" not in groups or len(vit_epochs) != 1 or vit_epochs[0] not in epochs:
        raise ValueError(f"--paper={out}: expected runs few_tpsbt_e<E>_seed<N>, few_scratch_seed<N> and the ViT's "
                         f"at one of the epochs {epochs}, found the ViT's at {vit_epochs} (VIT_EPOCH must be one of "
                         f"EPOCHS)")
    if bad := [g for g, s in groups.items() if s != seeds]:  # averaging them would mix schedules or seeds
        raise ValueError(f"--paper={out}: {bad[0]}_seed* holds the seeds {sorted(groups[bad[0]])}, "
                         f"pretrain_tpsbt_seed* {sorted(seeds or [])}: finish the runs, or move an earlier `make "
                         f"paper`'s folders away")
    vit_epoch = vit_epochs[0]

    def epoch_loss(d, e):  # the mean of an epoch's logged losses
        if not (losses := [r["loss"] for r in map(json.loads, open(f"{d}/log.jsonl")) if r.get("epoch") == e
                           and "loss" in r]):
            raise ValueError(f"{d}/log.jsonl: no loss logged in epoch {e}; log_interval must be at most an epoch")
        return np.mean(losses)
    logs = runs("pretrain_tpsbt_seed*")
    loss = [[epoch_loss(d, e) for d in logs] for e in epochs]
    pre, scratch = [test(f"few_tpsbt_e{e}_seed*") for e in epochs], test("few_scratch_seed*")
    fig5 = [["pre-training epochs", "pre-training loss (the epoch's mean)", "test UAR % mean ± sd (min..max)"]]
    fig5 += [["---:"] * 3] + [[str(e), f"{np.mean(ls):.4f} ± {_sd(ls):.4f}", _spread(u)]
                              for e, ls, u in zip(epochs, loss, pre)] + [["none (from scratch)", "-", _spread(scratch)]]
    ms = f"fine-tuning ms/step (CPU, {torch.get_num_threads()} threads)"  # make runs it with one (OMP_NUM_THREADS)
    table5 = [["encoder", "test UAR %", "test WAR %", ms, "fine-tuning GMACs"], ["---"] + ["---:"] * 4]
    for name, model in (("TPSBT-tiny", "tpsbt"), ("ViT baseline", "vit")):
        pattern = f"few_{model}_e{vit_epoch}_seed*"
        ckpt = torch.load(os.path.join(runs(pattern)[0], "ckpt.pt"), weights_only=True)
        # timed here, one model after the other: the runs shared the cores with other runs
        bench = bench_steps(SVFAPConfig.from_dict(ckpt["model_config"]), "cpu", ckpt["config"]["batch_size"],
                            "finetune", dtype=torch.float32)
        table5.append([name, _spread(test(pattern)), _spread(test(pattern, "war")), f"{bench['ms']:.1f}",
                       f"{bench['gmacs']:.3f}"])
    vit = [test(f"few_vit_e{e}_seed*") if e == vit_epoch else [] for e in epochs]
    write_svg_plot(svg_path, epochs, [
        ("test UAR % (2 labels per class)", [("TPSBT-tiny pre-trained", "#1f77b4", pre),
                                             ("ViT baseline pre-trained", "#d62728", vit),
                                             ("TPSBT-tiny from scratch", "#7f7f7f", np.mean(scratch))]),
        ("pre-training loss", [("TPSBT-tiny", "#1f77b4", loss)])])
    md = lambda rows: "\n".join("| " + " | ".join(r) + " |" for r in rows)
    return (f"Fig. 5: {len(logs)} seeds; each kept checkpoint fine-tuned on 2 labelled clips per class\n\n"
            f"{md(fig5)}\n\nTable V: both encoders pre-trained {vit_epoch} epochs of the same schedule, fine-tuned "
            f"alike\n\n{md(table5)}")


def write_svg_plot(path, epochs, panels, w=300, h=220):
    """An SVG of panels side by side over pre-training epochs (log scale). A panel is (y label, series); a series is
    (legend, colour, values): per epoch a list of the seeds' values (drawn as mean ± sd), or one number (a level)."""
    xs, svg, top = np.log(epochs), [], 20 + 16 * max(len(series) for _, series in panels)  # legends above the plots
    for i, (ylabel, series) in enumerate(panels):
        x0, values = 70 + (w + 90) * i, [y for _, _, s in series for y in ([s] if np.isscalar(s) else
                                         [np.mean(v) + k * _sd(v) for v in s if len(v) for k in (-1, 1)])]
        lo, hi = min(values), max(values)  # the error bars' ends, so that they stay inside the panel
        step = 10 ** np.floor(np.log10((hi - lo) / 2 or 1))  # ticks 1, 2 or 5 x a power of ten apart, 4 to 8 of them
        step *= next(m for m in (1, 2, 5) if (hi - lo) / (step * m) <= 6)
        lo, hi = np.floor(lo / step) * step, np.ceil(hi / step) * step
        X = lambda x: x0 + w * (x - xs[0]) / ((xs[-1] - xs[0]) or 1)
        Y = lambda y: top + h * (hi - y) / ((hi - lo) or 1)
        svg += [f'<rect x="{x0}" y="{top}" width="{w}" height="{h}" fill="none" stroke="black"/>',
                f'<text x="{x0 + w / 2}" y="{top + h + 38}" text-anchor="middle">pre-training epochs</text>',
                f'<text transform="translate({x0 - 50},{top + h / 2}) rotate(-90)" text-anchor="middle">'
                f'{ylabel}</text>']
        svg += [f'<text x="{X(x)}" y="{top + h + 18}" text-anchor="middle">{e}</text>' for e, x in zip(epochs, xs)]
        svg += [f'<text x="{x0 - 6}" y="{Y(t) + 4}" text-anchor="end">{t:g}</text>'
                f'<line x1="{x0 - 4}" x2="{x0}" y1="{Y(t)}" y2="{Y(t)}" stroke="black"/>'
                for t in np.arange(lo, hi + step / 2, step).round(10)]
        for k, (legend, colour, s) in enumerate(series):
            level = np.isscalar(s)
            style = f'stroke="{colour}" fill="none" stroke-width="2"' + (' stroke-dasharray="6 4"' if level else "")
            pts = ([(x0, s, 0), (x0 + w, s, 0)] if level  # a level: dashed across the panel, no spread
                   else [(X(x), np.mean(v), _sd(v)) for x, v in zip(xs, s) if len(v)])
            svg += [f'<line x1="{x0}" x2="{x0 + 24}" y1="{12 + 16 * k}" y2="{12 + 16 * k}" {style}/>'
                    f'<text x="{x0 + 30}" y="{16 + 16 * k}">{legend}</text>',
                    f'<polyline points="{" ".join(f"{x},{Y(m)}" for x, m, _ in pts)}" {style}/>']
            svg += [f'<line x1="{x}" x2="{x}" y1="{Y(m - sd)}" y2="{Y(m + sd)}" {style}/>'
                    f'<circle cx="{x}" cy="{Y(m)}" r="3" fill="{colour}"/>' for x, m, sd in pts if not level]
    width, height = (w + 90) * len(panels) + 20, top + h + 50
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
                f'font-size="12"><rect width="100%" height="100%" fill="white"/>{"".join(svg)}</svg>\n')


def report(files, video_group=""):
    """The CLI's report of prediction files (e.g. cross-validation folds): pooled, then averaged per video."""
    ref, *rest = preds = [read_predictions(f) for f in files]
    what = "classes" if ref.task == "classification" else "dimensions"
    for p, f in zip(rest, files[1:]):
        if p.task != ref.task:
            raise ValueError(f"{f} holds {p.task} predictions but {files[0]} holds {ref.task}; pool one task")
        if p.scores.shape[1] != ref.scores.shape[1]:
            raise ValueError(f"{f} has {p.scores.shape[1]} {what} but {files[0]} has {ref.scores.shape[1]}")
        if p.class_names != ref.class_names:
            raise ValueError(f"{f} names its {what} {p.class_names} but {files[0]} names them {ref.class_names}")
    pooled = ref._replace(ids=[i for p in preds for i in p.ids], targets=np.concatenate([p.targets for p in preds]),
                          scores=np.concatenate([p.scores for p in preds]))
    if repeats := len(pooled.ids) - len(set(pooled.ids)):  # a clip in two test folds counts twice
        print(f"metrics.py: warning: {repeats} rows repeat an earlier id; is a file listed twice?", file=sys.stderr)
    title = (f"pooled over {len(files)} files ({', '.join(str(len(p.ids)) for p in preds)} rows)"
             if len(files) > 1 else str(files[0]))
    if video_group:
        ids, scores, targets = group_average(pooled.ids, pooled.scores, pooled.targets, video_group)
        pooled = pooled._replace(ids=ids, scores=scores, targets=targets)
        title += f"\nvideo level: clip scores averaged per video (video_group={video_group!r})"
    return format_report(pooled, title)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", metavar="FILE", help="prediction CSV files")
    parser.add_argument("--summary", nargs="+", metavar="NAME=GLOB", help="a table row per group of runs (out_dirs)")
    parser.add_argument("--paper", metavar="DIR", help="make paper's tables of its runs in DIR, its picture to --svg")
    parser.add_argument("--svg", default="docs/paper.svg", help="where --paper writes its picture")
    parser.add_argument("--video_group", metavar="REGEX", default="", help="average each video's clip scores first "
                        "(AVCAffe): REGEX's first group (or match) in a clip's id names its video, e.g. '(.*)/[^/]+$'")
    args = parser.parse_args()
    if bool(args.files) + bool(args.summary) + bool(args.paper) != 1:
        parser.error("give prediction files, --summary NAME=GLOB ... or --paper DIR, one of them")
    try:
        print(paper_results(args.paper, args.svg) if args.paper else summarize_runs(args.summary) if args.summary
              else report(args.files, args.video_group))
    except (OSError, ValueError) as e:
        sys.exit(f"metrics.py: error: {e}")  # exit status 1
