"""Tests of the demo dataset generator (merged later into test_svfap.py)."""
import os

import av
import numpy as np
import pytest

from _demo_part import (DEMO_CLASSES, DEMO_FRAMES, DEMO_SIZE, demo_clip_plan, demo_identity, demo_splits,
                        make_demo_dataset, render_demo_clip, ten_percent)

LIST_NAMES = ("pretrain.txt", "pretrain_true_labels.txt", "train.txt", "train_10pct.txt", "val.txt", "test.txt",
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
    """The same tiny dataset made twice: once in one process, once with two worker processes."""
    dirs = []
    for workers in (1, 2):
        out = str(tmp_path_factory.mktemp(f"demo{workers}"))
        make_demo_dataset(out, seed=3, train_per_class=1, eval_per_class=1, pretrain_factor=10, workers=workers,
                          verbose=False)
        dirs.append(out)
    return dirs


def test_demo_is_deterministic_from_its_seed_whatever_the_worker_count(demo_dirs):
    a, b = demo_dirs
    for name in LIST_NAMES + ("classes.txt",):
        assert open(os.path.join(a, name)).read() == open(os.path.join(b, name)).read(), name
    videos = sorted(os.listdir(os.path.join(a, "videos")))
    assert len(videos) == 6 + 6 + 6 + 60
    for v in videos[:: 7]:
        fa, fb = (demo_decode(os.path.join(d, "videos", v))[1] for d in (a, b))
        assert np.array_equal(fa, fb), v
    # a different seed gives different faces
    other = render_demo_clip(demo_identity(4, 0), demo_clip_plan(4, 0, 0, 0))
    same = render_demo_clip(demo_identity(3, 0), demo_clip_plan(3, 0, 0, 0))
    assert np.array_equal(same, render_demo_clip(demo_identity(3, 0), demo_clip_plan(3, 0, 0, 0)))
    assert np.abs(other.astype(int) - same).mean() > 10


def test_demo_files_decode_and_lists_are_well_formed(demo_dirs):
    out = demo_dirs[0]
    assert open(os.path.join(out, "classes.txt")).read().split() == list(DEMO_CLASSES)
    for name in LIST_NAMES:
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
    with av.open(os.path.join(out, "classes.png")) as container:  # the README picture is a real PNG
        picture = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert picture.shape[0] >= len(DEMO_CLASSES) * DEMO_SIZE and picture.std() > 20


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
