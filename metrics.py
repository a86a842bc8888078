"""
Evaluation metrics for SVFAP, computed the way the paper reports them, and the prediction files that
carry a model's outputs from finetune.py to this report.

Classification (DFEW, FERV39k, MAFW, CREMA-D, RAVDESS, eNTERFACE05, AVCAffe):
  WAR = weighted average recall = accuracy; UAR = unweighted average recall = mean of the per-class
  recalls; weighted F1 (AVCAffe). In cross-validation the predictions of all folds are pooled first and
  the metric is computed once on the pool -- not the mean of the per-fold values.
Regression (Werewolf-XL, First Impressions):
  CCC and PCC per dimension and their mean; personality ACC = 1 - mean |prediction - label|.

Functions return fractions in [0, 1] (or coefficients in [-1, 1]); the report prints WAR/UAR/F1 as
percentages with two decimals and CCC/PCC/ACC with four decimals, as the paper prints them.

Usage:
  python metrics.py out/dfew/fold1/test_predictions.csv ... out/dfew/fold5/test_predictions.csv
  python metrics.py --summary "from scratch=out/compare/scratch_seed*" "pre-trained=out/compare/pre_seed*"
      one row per NAME=GLOB: the runs (finetune.py or pretrain.py out_dirs) that GLOB matches, their test
      UAR and WAR as mean +- sample standard deviation and min..max, and the wall time of a run (the
      "wall_time_s" of each run's results.json); a Markdown table, as the README shows it
"""

import argparse
import csv
import glob
import json
import os
import sys
import tempfile
from collections import namedtuple

import numpy as np

# -----------------------------------------------------------------------------
# input checks shared by the metrics


def _as_array(x, name):
    """Array of floats or ints from a list / numpy array / torch tensor; rejects empty input and NaN."""
    if hasattr(x, "detach"):  # torch tensor: finetune.py may pass them straight in
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 0:
        raise ValueError(f"{name} must be an array of samples, got the single value {a!r}")
    if a.size == 0:
        raise ValueError(f"{name} is empty; a metric needs at least one sample")
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers, got dtype {a.dtype}")
    if a.dtype.kind == "f" and np.isnan(a).any():
        first = int(np.flatnonzero(np.isnan(a.reshape(len(a), -1)).any(axis=1))[0])
        raise ValueError(f"{name} contains NaN (first at sample {first})")
    return a


def _check_same_length(a, b, name_a, name_b):
    if len(a) != len(b):
        raise ValueError(f"{name_a} has {len(a)} samples but {name_b} has {len(b)}; they must match")


def _as_labels(x, name):
    """1-D int64 class labels; integer-valued floats (e.g. read from a file) are accepted."""
    a = _as_array(x, name)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {a.shape}")
    if a.dtype.kind == "f":
        if np.isinf(a).any() or (a != np.round(a)).any():
            raise ValueError(f"{name} must hold whole-number class labels, got non-integer values")
    return a.astype(np.int64)


def _class_inputs(y_true, y_pred, num_classes):
    """Validated (y_true, y_pred, num_classes) with y_pred as labels.

    y_pred is either labels (B,) or a score matrix (B, C); a score matrix is reduced by argmax
    (ties go to the lowest class index, as np.argmax does) and its width C fixes num_classes.
    num_classes=None means: the score width, else 1 + the largest label seen.
    """
    y_true = _as_labels(y_true, "y_true")
    p = _as_array(y_pred, "y_pred")
    _check_same_length(y_true, p, "y_true", "y_pred")
    if p.ndim == 2:
        if num_classes is not None and p.shape[1] != num_classes:
            raise ValueError(f"y_pred has {p.shape[1]} score columns but num_classes={num_classes}")
        num_classes = p.shape[1]
        y_pred = p.argmax(axis=1).astype(np.int64)  # (B, C) scores -> (B,) labels
    else:
        y_pred = _as_labels(p, "y_pred")
    if num_classes is None:
        num_classes = int(max(y_true.max(), y_pred.max())) + 1
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        bad = (y < 0) | (y >= num_classes)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{name}[{i}] = {y[i]} is outside the valid labels 0..{num_classes - 1} "
                             f"(num_classes={num_classes})")
    return y_true, y_pred, num_classes


# -----------------------------------------------------------------------------
# classification metrics


def confusion_matrix(y_true, y_pred, num_classes=None):
    """int64 (C, C) counts; rows = true class, columns = predicted class."""
    y_true, y_pred, num_classes = _class_inputs(y_true, y_pred, num_classes)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def war(y_true, y_pred, num_classes=None):
    """Weighted average recall = accuracy: the fraction of samples predicted correctly."""
    y_true, y_pred, _ = _class_inputs(y_true, y_pred, num_classes)
    return float((y_true == y_pred).mean())


def per_class_recall(y_true, y_pred, num_classes=None):
    """float64 (C,) recall of each class; NaN for a class with no sample in y_true (recall undefined)."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    recall = np.full(len(cm), np.nan)
    present = support > 0
    recall[present] = np.diag(cm)[present] / support[present]
    return recall


def uar(y_true, y_pred, num_classes=None):
    """Unweighted average recall: the mean of the per-class recalls over the classes present in y_true.

    A class absent from y_true has no recall and is left out of the mean; a class that is present but
    never predicted counts with recall 0.
    """
    recall = per_class_recall(y_true, y_pred, num_classes)
    return float(np.nanmean(recall))  # at least one class is present: y_true is not empty


def weighted_f1(y_true, y_pred, num_classes=None):
    """F1 per class, averaged with weights = class support in y_true (sklearn's average="weighted").

    A class whose precision or recall is undefined (never predicted / never true) has F1 = 0, as
    sklearn's zero_division=0; classes absent from y_true have weight 0 anyway.
    """
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)  # true count per class
    predicted = cm.sum(axis=0)
    denom = support + predicted  # F1 = 2 tp / (2 tp + fp + fn) = 2 tp / (support + predicted)
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float((f1 * support).sum() / support.sum())


# -----------------------------------------------------------------------------
# regression metrics: 1-D inputs give a float, (N, D) inputs give a (D,) array, one value per dimension


def _regression_inputs(y_true, y_pred):
    y_true = _as_array(y_true, "y_true").astype(np.float64)
    y_pred = _as_array(y_pred, "y_pred").astype(np.float64)
    _check_same_length(y_true, y_pred, "y_true", "y_pred")
    if y_true.shape != y_pred.shape or y_true.ndim not in (1, 2):
        raise ValueError(f"y_true and y_pred must both be (N,) or (N, D) with equal shapes, "
                         f"got {y_true.shape} and {y_pred.shape}")
    if np.isinf(y_true).any() or np.isinf(y_pred).any():
        raise ValueError("y_true and y_pred must be finite; found inf")
    return y_true, y_pred


def _per_dimension(fn, y_true, y_pred):
    y_true, y_pred = _regression_inputs(y_true, y_pred)
    if y_true.ndim == 1:
        return fn(y_true, y_pred)
    return np.array([fn(y_true[:, d], y_pred[:, d]) for d in range(y_true.shape[1])])


def _is_constant(x):
    # exact test: a mean-centred constant can be 1e-17 instead of 0, which would make PCC noise
    return x.max() == x.min()


def _ccc_1d(x, y):
    if _is_constant(x) and _is_constant(y) and x[0] == y[0]:
        return 1.0  # identical constants: perfect agreement, though the formula is 0 / 0
    if _is_constant(x) or _is_constant(y):
        return 0.0  # cov is 0 in exact arithmetic; rounding would leave ~1e-33 instead
    xc, yc = x - x.mean(), y - y.mean()
    cov = (xc * yc).mean()
    return float(2 * cov / ((xc ** 2).mean() + (yc ** 2).mean() + (x.mean() - y.mean()) ** 2))


def _pcc_1d(x, y):
    if _is_constant(x) or _is_constant(y):
        return 0.0  # correlation is undefined (0 / 0); report "no linear relation" instead of NaN
    xc, yc = x - x.mean(), y - y.mean()
    r = (xc * yc).sum() / np.sqrt((xc ** 2).sum() * (yc ** 2).sum())
    return float(np.clip(r, -1.0, 1.0))  # rounding can push |r| a hair above 1


def ccc(y_true, y_pred):
    """Lin's concordance correlation coefficient 2 cov / (var_t + var_p + (mean_t - mean_p)^2).

    Population moments (divide by N), as in Lin (1989). Degenerate cases: if one side is constant
    the covariance is 0, so CCC = 0.0; if both are the same constant, CCC = 1.0 (perfect agreement).
    1-D inputs give a float; (N, D) inputs give a (D,) array, one CCC per dimension.
    """
    return _per_dimension(_ccc_1d, y_true, y_pred)


def pcc(y_true, y_pred):
    """Pearson correlation coefficient r.

    Degenerate case: PCC = 0.0 when either side is constant (r is 0 / 0 there; scipy would give NaN).
    1-D inputs give a float; (N, D) inputs give a (D,) array, one PCC per dimension.
    """
    return _per_dimension(_pcc_1d, y_true, y_pred)


def personality_acc(y_true, y_pred):
    """First Impressions accuracy: 1 - mean |y_pred - y_true|, for labels in [0, 1].

    Predictions are not clipped. 1-D inputs give a float; (N, D) inputs give a (D,) array.
    """
    y_true, y_pred = _regression_inputs(y_true, y_pred)
    if y_true.min() < 0 or y_true.max() > 1:
        raise ValueError(f"personality ACC needs labels in [0, 1], got labels in "
                         f"[{y_true.min():g}, {y_true.max():g}]")
    acc = 1.0 - np.abs(y_pred - y_true).mean(axis=0)
    return float(acc) if y_true.ndim == 1 else acc


# -----------------------------------------------------------------------------
# prediction files: one CSV per evaluation, one row per video
#   classification header: id,target,score_<class>,...        (target = class index)
#   regression header:     id,target_<dim>,...,pred_<dim>,... (same dims in the same order)
# The header alone tells the task: "target" vs "target_<dim>" columns.

Predictions = namedtuple("Predictions", "task ids targets scores class_names")
Predictions.__doc__ = """Contents of a prediction file.
task: "classification" or "regression"; ids: list[str];
targets: int64 (N,) class indices | float64 (N, D); scores: float64 (N, C) class scores | (N, D) predictions;
class_names: list[str] of class names (classification) or dimension names (regression), or None when
the file uses plain indices."""

TASKS = ("classification", "regression")


def _to_numpy(x):
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def write_predictions(path, ids, targets, scores, class_names=None, task=None):
    """Write one evaluation's predictions to a CSV file at path, atomically (temp file + rename).

    ids: N video ids (paths); targets: (N,) class indices or (N,) / (N, D) regression labels;
    scores: (N, C) class scores (e.g. softmax averaged over views) or (N,) / (N, D) regression outputs.
    class_names: names of the C classes, or of the D dimensions for regression (e.g. arousal, valence);
    None writes indices 0..C-1. task: "classification" | "regression"; None infers it from targets
    (integer dtype -> classification, float -> regression), so pass it explicitly when targets are floats
    that hold class indices. Raises ValueError for empty, mismatched, NaN or out-of-range input.
    """
    ids = [str(i) for i in ids]
    targets, scores = _to_numpy(targets), _to_numpy(scores)
    if task is None:
        task = "classification" if targets.dtype.kind in "biu" else "regression"
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    n = len(ids)
    if n == 0:
        raise ValueError(f"{path}: no predictions to write (ids is empty)")
    for name, a in (("targets", targets), ("scores", scores)):
        if len(a) != n:
            raise ValueError(f"{path}: {n} ids but {len(a)} {name}; they must match")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ValueError(f"{path}: {name} contain NaN or inf")
    for i, s in enumerate(ids):
        if "\n" in s or "\r" in s:
            raise ValueError(f"{path}: id {i} contains a line break: {s!r}")

    if task == "classification":
        targets = _as_labels(targets, "targets")
        if scores.ndim != 2:
            raise ValueError(f"{path}: classification scores must be (N, C), got shape {scores.shape}")
        width = scores.shape[1]
        bad = (targets < 0) | (targets >= width)
        if bad.any():
            raise ValueError(f"{path}: target {targets[bad][0]} is outside 0..{width - 1} "
                             f"({width} score columns)")
        columns = _column_names(class_names, width, "class", path)
        header = ["id", "target"] + ["score_" + c for c in columns]
        rows = ([i, str(int(t))] + [repr(float(v)) for v in s] for i, t, s in zip(ids, targets, scores))
    else:
        targets = targets.reshape(n, -1) if targets.ndim == 1 else targets  # (N,) -> (N, 1)
        scores = scores.reshape(n, -1) if scores.ndim == 1 else scores
        if targets.ndim != 2 or targets.shape != scores.shape:
            raise ValueError(f"{path}: regression targets and scores must both be (N, D), got "
                             f"{targets.shape} and {scores.shape}")
        columns = _column_names(class_names, targets.shape[1], "dimension", path)
        header = ["id"] + ["target_" + c for c in columns] + ["pred_" + c for c in columns]
        rows = ([i] + [repr(float(v)) for v in t] + [repr(float(v)) for v in s]
                for i, t, s in zip(ids, targets, scores))

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # temp file in the same folder so os.replace is an atomic rename: a crash never leaves half a file
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _column_names(names, width, what, path):
    if names is None:
        return [str(i) for i in range(width)]
    names = [str(c) for c in names]
    if len(names) != width:
        raise ValueError(f"{path}: {len(names)} {what} names given for {width} columns")
    if len(set(names)) != len(names) or any(c == "" for c in names):
        raise ValueError(f"{path}: {what} names must be unique and non-empty, got {names}")
    return names


def read_predictions(path):
    """Read a file written by write_predictions; errors name the file, line and column."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    if not lines:
        raise ValueError(f"{path}: empty file; expected a header 'id,target,score_...' or "
                         f"'id,target_<dim>,...,pred_<dim>,...'")
    header = lines[0]
    numbered = [(k + 2, row) for k, row in enumerate(lines[1:]) if row]  # csv gives [] for a blank line
    line_numbers, body = [k for k, _ in numbered], [row for _, row in numbered]
    if not body:
        raise ValueError(f"{path}: header but no prediction rows")
    if header[0] != "id":
        raise ValueError(f"{path}:1: first column must be 'id', got {header[0]!r}")

    if len(header) >= 3 and header[1] == "target" and all(h.startswith("score_") for h in header[2:]):
        task, names = "classification", [h[len("score_"):] for h in header[2:]]
    else:
        d = (len(header) - 1) // 2
        tnames = [h[len("target_"):] for h in header[1:1 + d] if h.startswith("target_")]
        pnames = [h[len("pred_"):] for h in header[1 + d:] if h.startswith("pred_")]
        if d == 0 or len(header) != 1 + 2 * d or len(tnames) != d or tnames != pnames:
            raise ValueError(f"{path}:1: unrecognised header {header}; expected 'id,target,score_<class>,...' "
                             f"(classification) or 'id,target_<dim>,...,pred_<dim>,...' with the same "
                             f"dims in the same order (regression)")
        task, names = "regression", tnames

    values = np.empty((len(body), len(header) - 1))
    for r, row in enumerate(body):
        line = line_numbers[r]
        if len(row) != len(header):
            raise ValueError(f"{path}:{line}: {len(row)} fields but the header has {len(header)}")
        for c, field in enumerate(row[1:], start=1):
            try:
                values[r, c - 1] = float(field)
            except ValueError:
                raise ValueError(f"{path}:{line}: column {header[c]!r} must be a number, got {field!r}") from None
    if np.isnan(values).any():
        r, c = np.argwhere(np.isnan(values))[0]
        raise ValueError(f"{path}:{line_numbers[r]}: column {header[c + 1]!r} is NaN")

    ids = [row[0] for row in body]
    class_names = None if names == [str(i) for i in range(len(names))] else names
    if task == "classification":
        t = values[:, 0]
        bad = (t != np.round(t)) | (t < 0) | (t >= len(names))
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}:{line_numbers[r]}: target {body[r][1]!r} is not a class index in 0..{len(names) - 1}")
        return Predictions(task, ids, t.astype(np.int64), values[:, 1:], class_names)
    d = len(names)
    return Predictions(task, ids, values[:, :d], values[:, d:], class_names)


def pool_predictions(preds, sources=None):
    """Concatenate the rows of several Predictions (e.g. the test folds of a cross-validation).

    Raises ValueError naming the first file that disagrees with the first one in task, class count,
    class names, or dimension count. sources: names (file paths) for the messages.
    """
    if not preds:
        raise ValueError("no prediction files to pool")
    sources = sources or [f"predictions #{i}" for i in range(len(preds))]
    ref, ref_src = preds[0], sources[0]
    what = "classes" if ref.task == "classification" else "dimensions"
    for p, src in zip(preds[1:], sources[1:]):
        if p.task != ref.task:
            raise ValueError(f"{src} holds {p.task} predictions but {ref_src} holds {ref.task}; "
                             f"pool only files of one task")
        if p.scores.shape[1] != ref.scores.shape[1]:
            raise ValueError(f"{src} has {p.scores.shape[1]} {what} but {ref_src} has {ref.scores.shape[1]}; "
                             f"pool only files of one dataset")
        if p.class_names != ref.class_names:
            raise ValueError(f"{src} names its {what} {p.class_names} but {ref_src} names them "
                             f"{ref.class_names}; pool only files with the same {what} in the same order")
    return Predictions(ref.task, [i for p in preds for i in p.ids],
                       np.concatenate([p.targets for p in preds]),
                       np.concatenate([p.scores for p in preds]), ref.class_names)


# -----------------------------------------------------------------------------
# report


def _table(rows):
    """Left-aligned first column, right-aligned others."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def format_report(pred, title=None):
    """The evaluation report of a Predictions (one file or a pool) as text, as the CLI prints it."""
    n = len(pred.ids)
    lines = [title] if title else []
    if pred.task == "classification":
        num_classes = pred.scores.shape[1]
        names = pred.class_names or [str(i) for i in range(num_classes)]
        y, s = pred.targets, pred.scores
        recall = per_class_recall(y, s)
        cm = confusion_matrix(y, s)
        absent = int(np.isnan(recall).sum())
        lines += [f"classification: {n} videos, {num_classes} classes"
                  + (f" ({absent} without samples, left out of UAR)" if absent else ""),
                  f"WAR {100 * war(y, s):6.2f}",
                  f"UAR {100 * uar(y, s):6.2f}",
                  f"weighted F1 {100 * weighted_f1(y, s):6.2f}",
                  "",
                  "per-class recall (%):"]
        rows = [["class", "support", "recall"]]
        rows += [[names[c], str(cm[c].sum()), "-" if np.isnan(recall[c]) else f"{100 * recall[c]:.2f}"]
                 for c in range(num_classes)]
        lines += [_table(rows), "", "confusion matrix (rows = true class, columns = predicted):"]
        rows = [["true \\ pred"] + names] + [[names[c]] + [str(v) for v in cm[c]] for c in range(num_classes)]
        lines.append(_table(rows))
    else:
        dims = pred.scores.shape[1]
        names = pred.class_names or [str(i) for i in range(dims)]
        t, p = pred.targets, pred.scores
        c, r = ccc(t, p), pcc(t, p)
        with_acc = t.min() >= 0 and t.max() <= 1  # personality labels (First Impressions) lie in [0, 1]
        header = ["dimension", "CCC", "PCC"] + (["ACC"] if with_acc else [])
        a = personality_acc(t, p) if with_acc else None
        rows = [header]
        for d in range(dims):
            rows.append([names[d], f"{c[d]:.4f}", f"{r[d]:.4f}"] + ([f"{a[d]:.4f}"] if with_acc else []))
        rows.append(["mean", f"{c.mean():.4f}", f"{r.mean():.4f}"] + ([f"{a.mean():.4f}"] if with_acc else []))
        lines += [f"regression: {n} videos, {dims} dimensions", _table(rows)]
        if with_acc:
            lines.append("ACC = personality accuracy, 1 - mean |prediction - label| (labels lie in [0, 1])")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# summary of repeated runs (seeds)


def _spread(values):
    """'mean +- sd (min..max)' of percentages; sd is the sample standard deviation (n - 1)."""
    v = np.asarray(values, dtype=np.float64)
    sd = v.std(ddof=1) if len(v) > 1 else 0.0
    return f"{v.mean():.2f} ± {sd:.2f} ({v.min():.2f}..{v.max():.2f})"


def summarize_runs(groups):
    """Markdown table of repeated runs. groups: [(name, [run_dir, ...])]. A run_dir with a
    test_predictions.csv (finetune.py) adds its UAR / WAR; its results.json gives wall_time_s."""
    rows = [["runs", "n", "test UAR % mean ± sd (min..max)", "test WAR % mean ± sd (min..max)",
             "UAR % of each run", "wall time per run"]]
    for name, dirs in groups:
        if not dirs:
            raise ValueError(f"{name}: no run directories match")
        uars, wars, times = [], [], []
        for d in dirs:
            pred_path = os.path.join(d, "test_predictions.csv")
            if os.path.exists(pred_path):
                p = read_predictions(pred_path)
                if p.task != "classification":
                    raise ValueError(f"{pred_path}: --summary reports UAR and WAR, but this file holds regression")
                uars.append(100 * uar(p.targets, p.scores))
                wars.append(100 * war(p.targets, p.scores))
            results_path = os.path.join(d, "results.json")
            if not os.path.exists(results_path):
                raise ValueError(f"{d}: no results.json; did the run finish?")
            with open(results_path) as f:
                t = json.load(f).get("wall_time_s")
            if t is None:
                raise ValueError(f"{results_path}: no wall_time_s")
            times.append(t / 60)
        if uars and len(uars) != len(dirs):
            raise ValueError(f"{name}: {len(dirs) - len(uars)} of {len(dirs)} runs have no test_predictions.csv")
        t = np.asarray(times)
        time_cell = f"{t.mean():.1f} min" + (f" ({t.min():.1f}..{t.max():.1f})" if len(t) > 1 else "")
        rows.append([name, str(len(dirs)), _spread(uars) if uars else "-", _spread(wars) if wars else "-",
                     " ".join(f"{u:.2f}" for u in uars) or "-", time_cell])
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("---" if c == 0 else "---:" for c in range(len(rows[0]))) + "|")
    return "\n".join(lines)


def _summary_groups(specs):
    groups = []
    for spec in specs:
        name, sep, pattern = spec.rpartition("=")
        if not sep or not name or not pattern:
            raise ValueError(f"--summary {spec!r}: expected NAME=GLOB, e.g. \"scratch=out/compare/scratch_seed*\"")
        groups.append((name, sorted(d for d in glob.glob(pattern) if os.path.isdir(d))))
    return groups


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Report metrics of prediction files written by finetune.py. Several files (e.g. "
                    "cross-validation folds) are pooled first, then the metrics are computed once.")
    parser.add_argument("files", nargs="*", metavar="FILE", help="prediction CSV files")
    parser.add_argument("--summary", nargs="+", metavar="NAME=GLOB",
                        help="table rows of repeated runs: each row is the run directories GLOB matches")
    args = parser.parse_args(argv)
    if bool(args.files) == bool(args.summary):
        parser.error("give prediction files, or --summary NAME=GLOB ..., not both")
    if args.summary:
        try:
            print(summarize_runs(_summary_groups(args.summary)))
        except (OSError, ValueError) as e:
            print(f"metrics.py: error: {e}", file=sys.stderr)
            return 1
        return 0
    try:
        preds = [read_predictions(f) for f in args.files]
        pooled = pool_predictions(preds, args.files)
    except (OSError, ValueError) as e:
        print(f"metrics.py: error: {e}", file=sys.stderr)
        return 1
    if len(set(pooled.ids)) < len(pooled.ids):
        # a video in two test folds (or one file given twice) would be counted twice
        print(f"metrics.py: warning: {len(pooled.ids) - len(set(pooled.ids))} rows repeat an id "
              f"already seen; is a file listed twice?", file=sys.stderr)
    title = (f"pooled over {len(args.files)} files ({', '.join(str(len(p.ids)) for p in preds)} rows)"
             if len(args.files) > 1 else args.files[0])
    print(format_report(pooled, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
