"""Tests for metrics.py: every metric against an independent plain-Python computation, the prediction
file round trip, and the CLI's pooling of cross-validation folds."""

import os
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr

import metrics

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
    ("id,target,score_0,score_1\na,0,0.1,high\n", r"p.csv:2: column 'score_1' must be a number"),
    ("id,target,score_0,score_1\na,2,0.1,0.9\n", r"p.csv:2: target '2' is not a class index in 0..1"),
])
def test_read_predictions_names_file_and_line_of_a_bad_file(tmp_path, text, reason):
    path = tmp_path / "p.csv"
    path.write_text(text)
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
