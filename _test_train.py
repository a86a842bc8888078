"""Tests of pretrain.py and finetune.py: the scripts run as users run them (subprocess, torchrun), on a
model of ~0.1M parameters and 32x32x8 videos made here with PyAV, a few iterations each."""

import json
import os
import re
import subprocess
import sys

import av
import numpy as np
import pytest
import torch

import finetune
import pretrain

TRAIN_REPO = os.path.dirname(os.path.abspath(__file__))
# a model small enough for seconds-long runs: 8 frames of 32x32, 4x4x4 = 64 tokens, 4 of 16 positions visible
TRAIN_MODEL_ARGS = ["--model=tiny", "--model_args.img_size=32", "--model_args.num_frames=8",
                    "--model_args.embed_dim=32", "--model_args.num_heads=2", "--model_args.stage_depths=(1,1,1)",
                    "--model_args.num_bottleneck_tokens=4", "--model_args.bottleneck_hidden=16",
                    "--model_args.decoder_dim=32", "--model_args.decoder_heads=2", "--model_args.decoder_depth=1",
                    "--model_args.mask_ratio=0.75"]
TRAIN_COMMON = ["--device=cpu", "--sampling_rate=1", "--num_workers=0", "--log_interval=1", "--batch_size=4",
                "--warmup_epochs=1"]


def train_write_video(path, label, seed, size=32, frames=8):
    """A smooth colour ramp with a bright square moving right (label 0), down (1) or not at all (2)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([a * x + b * y + c for a, b, c in rng.uniform(-0.5, 0.5, (3, 3)) + [0, 0, 0.5]], -1)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for t in range(frames):
            img = base.copy()
            top, left = 8 + (3 * t if label == 1 else 0), 8 + (3 * t if label == 0 else 0)
            img[top % 24:top % 24 + 8, left % 24:left % 24 + 8] = 1.0
            frame = (np.clip(img, 0, 1) * 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """12 videos; lists: pretrain (all), train (all), val (first 6), test (last 5: an odd count, so two
    processes get unequal shards)."""
    root = tmp_path_factory.mktemp("train_data")
    os.makedirs(root / "videos")
    lines = []
    for i in range(12):
        train_write_video(str(root / "videos" / f"v{i:02d}.mp4"), i % 3, seed=i)
        lines.append(f"videos/v{i:02d}.mp4 {i % 3}")
    lists = {"pretrain": [f"{line.split()[0]} 0" for line in lines], "train": lines, "val": lines[:6],
             "test": lines[7:], "empty": []}
    for name, rows in lists.items():
        (root / f"{name}.txt").write_text("".join(row + "\n" for row in rows))
    return root


def train_run(script, *args, env=None, nproc=1, check=True):
    """Run a script as a user does (torchrun for nproc > 1); returns the CompletedProcess."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(launcher + [script, *map(str, args)], cwd=TRAIN_REPO, env=run_env, capture_output=True,
                          text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({done.returncode}):\n"
                             f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def train_pretrain_args(data, out_dir, *extra):
    return [*TRAIN_MODEL_ARGS, *TRAIN_COMMON, f"--train_list={data / 'pretrain.txt'}", f"--out_dir={out_dir}",
            "--base_lr=0.3", "--epochs=3", "--vis_clips=2", f"--vis_list={data / 'val.txt'}", *extra]


def train_finetune_args(data, out_dir, *extra):
    return [*TRAIN_MODEL_ARGS, *TRAIN_COMMON, f"--train_list={data / 'train.txt'}", f"--val_list={data / 'val.txt'}",
            f"--test_list={data / 'test.txt'}", f"--out_dir={out_dir}", "--num_classes=3",
            "--class_names=('right','down','still')", "--base_lr=0.1", "--epochs=2", "--eval_batch_size=2",
            "--num_clips=2", "--num_crops=1", *extra]


def train_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    return {r["iter"]: r["loss"] for r in train_log(out_dir) if "loss" in r}


@pytest.fixture(scope="module")
def train_pretrained(train_data, tmp_path_factory):
    """An uninterrupted pre-training run: 3 epochs x 3 iterations, a checkpoint every 2 iterations."""
    out = tmp_path_factory.mktemp("pretrain_full")
    train_run("pretrain.py", *train_pretrain_args(train_data, out, "--ckpt_every=2"))
    return out


@pytest.fixture(scope="module")
def train_finetuned(train_data, train_pretrained, tmp_path_factory):
    """Fine-tuning from the pre-training checkpoint, single process; val list == test list here."""
    out = tmp_path_factory.mktemp("finetune")
    done = train_run("finetune.py", *train_finetune_args(train_data, out, f"--init_from={train_pretrained / 'ckpt.pt'}",
                                                        f"--test_list={train_data / 'val.txt'}"))
    return out, done.stdout


# --- the scripts' claims ------------------------------------------------------------


def test_short_pretraining_lowers_the_loss(train_pretrained):
    losses = list(train_losses(train_pretrained).values())
    assert len(losses) == 9
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.02, losses


def test_resume_reproduces_the_run(train_data, train_pretrained, tmp_path):
    """Stop mid-epoch (iteration 4 of 9), resume with another worker count: the same following losses."""
    train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path, "--max_iters=4"))
    train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path, "--init_from=resume", "--num_workers=1"))
    full, resumed = train_losses(train_pretrained), train_losses(tmp_path)
    assert sorted(resumed) == list(range(1, 10))
    for it in range(5, 10):
        assert abs(resumed[it] - full[it]) <= 1e-6, (it, resumed[it], full[it])


def test_finetuning_resume_reproduces_drop_path_mixup_and_erasing(train_data, train_pretrained, train_finetuned,
                                                                   tmp_path):
    """The generators of drop path, mixup / cutmix and random erasing continue where they stopped."""
    args = train_finetune_args(train_data, tmp_path, f"--init_from={train_pretrained / 'ckpt.pt'}",
                               f"--test_list={train_data / 'val.txt'}")  # as the train_finetuned run
    train_run("finetune.py", *args, "--max_iters=2")
    train_run("finetune.py", *args, "--init_from=resume", "--num_workers=1")
    full, resumed = train_losses(train_finetuned[0]), train_losses(tmp_path)
    assert len(full) == 6 and sorted(resumed) == sorted(full)
    assert all(abs(resumed[it] - full[it]) <= 1e-6 for it in range(3, 7)), (full, resumed)
    assert json.load(open(tmp_path / "results.json")) == json.load(open(train_finetuned[0] / "results.json"))


def test_crash_while_writing_a_checkpoint_leaves_the_last_one_loadable(train_data, tmp_path):
    done = train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path, "--ckpt_every=2", "--vis_clips=0"),
                     env={"SVFAP_DEBUG_CRASH_IN_SAVE": "2"}, check=False)  # dies half-way through the 2nd save
    assert done.returncode == 13
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert os.path.getsize(tmp_path / "ckpt.pt.tmp") < os.path.getsize(tmp_path / "ckpt.pt")  # the torn write


def test_nan_loss_stops_cleanly_and_keeps_the_last_good_checkpoint(train_data, tmp_path):
    args = train_pretrain_args(train_data, tmp_path, "--ckpt_every=2", "--model_args.norm_pix_loss=False")
    done = train_run("pretrain.py", *args, env={"SVFAP_DEBUG_NAN_AT_ITER": "3"}, check=False)
    assert done.returncode == 3
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "non-finite loss (nan) at iteration 3" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert max(train_losses(tmp_path)) == 2
    # the reconstruction video is named for how it was de-normalised
    assert os.path.isfile(tmp_path / "recon_iter0000002_plain.mp4")


def test_checkpoint_holds_everything_to_rebuild_and_resume(train_pretrained):
    ckpt = torch.load(train_pretrained / "ckpt.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "config", "model_config", "epoch", "iter_num", "rng"} <= set(ckpt)
    assert ckpt["iter_num"] == 9 and ckpt["epoch"] == 3 and ckpt["model_config"]["embed_dim"] == 32
    assert {"torch", "numpy", "python", "cuda"} <= set(ckpt["rng"][0])


def test_reconstruction_video_shows_three_panels(train_pretrained):
    path = train_pretrained / "recon_iter0000009_denorm-with-true-patch-stats.mp4"
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8
    h, w, _ = frames[0].shape
    assert w == 3 * h // 2  # 2 clips stacked, 3 panels side by side, square clips
    # the masked-input panel is grey where masked: 12 of 16 positions
    middle = frames[0][: h // 2, w // 3: 2 * w // 3].astype(int)
    assert np.mean(np.abs(middle - 128) < 6) > 0.6


def test_finetuning_from_pretraining_loads_every_encoder_tensor(train_pretrained, train_finetuned):
    state = torch.load(train_pretrained / "ckpt.pt", weights_only=True)["model"]
    n_encoder = sum(k.startswith("encoder.") for k in state)
    out, stdout = train_finetuned
    assert f"loaded {n_encoder}/{n_encoder} encoder tensors" in stdout and "NOT loaded" not in stdout


def test_shared_val_and_test_lists_are_reported_loudly(train_finetuned):
    out, stdout = train_finetuned
    assert "WARNING: val_list and test_list hold the same videos" in stdout
    results = json.load(open(out / "results.json"))
    assert results["val_test_overlap"] and results["test_last"] and results["last_epoch"] == 2
    predictions = {f for f in os.listdir(out) if f.endswith(".csv")}
    assert {"val_predictions.csv", "test_predictions.csv"} <= predictions


def test_predict_prints_probabilities_that_sum_to_one(train_data, train_finetuned):
    out, _ = train_finetuned
    videos = [train_data / "videos" / "v00.mp4", train_data / "videos" / "v04.mp4"]
    done = train_run("finetune.py", f"--ckpt={out / 'best.pt'}", "--device=cpu", *[f"--predict={v}" for v in videos])
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2
    for line, video in zip(lines, videos):
        name, rest = line.split(": ", 1)
        assert name == str(video)
        cells = rest.split("  -> ")[0].split()
        probs = dict(zip(cells[::2], map(float, cells[1::2])))
        assert list(probs) == ["right", "down", "still"]
        assert abs(sum(probs.values()) - 1) < 1e-3 and all(0 <= p <= 1 for p in probs.values())


def test_two_processes_train_and_evaluate_like_one(train_data, tmp_path):
    """torchrun x 2 (gloo): pre-train, fine-tune; its test scores equal a single-process evaluation of the
    same checkpoint (5 test videos: shards of 3 and 2, nothing padded, nothing dropped)."""
    train_run("pretrain.py", *train_pretrain_args(train_data, tmp_path / "pre", "--epochs=1", "--vis_clips=0"), nproc=2)
    assert len(train_losses(tmp_path / "pre")) == 3
    done = train_run("finetune.py", *train_finetune_args(train_data, tmp_path / "ft", "--epochs=1",
                                                         f"--init_from={tmp_path / 'pre' / 'ckpt.pt'}"), nproc=2)
    loaded = re.search(r"loaded (\d+)/(\d+) encoder tensors", done.stdout)
    assert loaded and loaded[1] == loaded[2] and "NOT loaded" not in done.stdout
    train_run("finetune.py", *train_finetune_args(train_data, tmp_path / "one", "--eval_only=True",
                                                  f"--ckpt={tmp_path / 'ft' / 'best.pt'}", "--eval_batch_size=3"))
    import metrics
    ddp = metrics.read_predictions(tmp_path / "ft" / "test_predictions.csv")
    one = metrics.read_predictions(tmp_path / "one" / "eval_test_predictions.csv")
    assert len(ddp.ids) == 5 and ddp.ids == one.ids and (ddp.targets == one.targets).all()
    np.testing.assert_allclose(ddp.scores, one.scores, atol=1e-6)
    ddp_metrics = json.load(open(tmp_path / "ft" / "results.json"))["test"]
    one_metrics = json.load(open(tmp_path / "one" / "results_eval.json"))["test"]
    assert ddp_metrics == one_metrics


def test_bad_inputs_each_give_one_clear_line(train_data, tmp_path, capsys, monkeypatch):
    base = [*TRAIN_MODEL_ARGS, *TRAIN_COMMON, f"--out_dir={tmp_path}"]
    good_list = f"--train_list={train_data / 'pretrain.txt'}"
    # one as users meet it: a subprocess, stopped when the data is opened
    done = train_run("pretrain.py", *base, f"--train_list={train_data / 'empty.txt'}", check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("pretrain.py: error: train_list: ") and "holds no" in lines[0]
    cases = {  # name: (arguments, extra environment, words the one line must hold)
        "missing list": ([*base, "--train_list=no/such/list.txt"], {},
                         "train_list=no/such/list.txt: annotation file not found"),
        "unknown preset": ([*base, good_list, "--model=huge"], {}, "model='huge' is not a preset"),
        "batch vs world size": ([*base, good_list, "--batch_size=3"], {"RANK": "0", "WORLD_SIZE": "2"},
                                "batch_size=3 must be a positive multiple of world_size"),
        "unknown key": ([*base, good_list, "--batchsize=4"], {},
                        "unknown config key 'batchsize'; did you mean batch_size?"),
        "wrong type": ([*base, good_list, "--epochs=1.5"], {}, "epochs must be an integer, got 1.5"),
        "unknown model field": ([*base, good_list, "--model_args.depth=2"], {}, "unknown config key 'depth'"),
        "missing resume": ([*base, good_list, "--init_from=resume"], {}, "init_from=resume continues from"),
    }
    # the rest in this process, through the same entry point: they stop before any process group or seed
    for name, (args, env, words) in cases.items():
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            with pytest.raises(SystemExit) as stop:
                pretrain.run(pretrain.main, args, "pretrain.py")
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert stop.value.code == 2 and len(lines) == 1, (name, err)
        assert lines[0].startswith("pretrain.py: error: ") and words in lines[0], (name, lines[0])


# --- the helpers, in-process -------------------------------------------------------------


def train_defaults(module):
    return {k: getattr(module, k) for k in module.CONFIG_KEYS}


def test_config_file_then_arguments_override_the_defaults(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text("batch_size = 32\nepochs = 2 * 5\nmodel_args = dict(mask_ratio=0.75)\nbeta1, beta2 = 0.8, 0.9\n")
    c = pretrain.load_config(train_defaults(pretrain), [str(path), "--epochs=3", "--model_args.decoder_depth=2",
                                                        "--compile=true", "--out_dir=123", "--base_lr=1"])
    assert (c["batch_size"], c["epochs"], c["beta1"], c["compile"], c["out_dir"]) == (32, 3, 0.8, True, "123")
    assert c["model_args"] == {"mask_ratio": 0.75, "decoder_depth": 2} and c["base_lr"] == 1.0
    mc = pretrain.build_model_config("tiny", c["model_args"])
    assert mc.mask_ratio == 0.75 and mc.decoder_depth == 2
    c = finetune.load_config(train_defaults(finetune), ["--predict=a.mp4", "--predict=b.mp4"])
    assert c["predict"] == ["a.mp4", "b.mp4"]
    path.write_text("batch_sise = 3\n")
    with pytest.raises(pretrain.ConfigError, match=r"cfg.py: unknown config key 'batch_sise'; did you mean batch_size"):
        pretrain.load_config(train_defaults(pretrain), [str(path)])
    with pytest.raises(pretrain.ConfigError, match="model_args.mask_ratio must be a number"):
        pretrain.build_model_config("tiny", {"mask_ratio": "high"})
    with pytest.raises(pretrain.ConfigError, match="SVFAPConfig.mask_ratio=1.0"):
        pretrain.build_model_config("tiny", {"mask_ratio": 1.0})


def test_every_preset_config_loads():
    for script, names in ((pretrain, ["pretrain_demo", "pretrain_voxceleb2_base", "pretrain_voxceleb2_small"]),
                          (finetune, ["finetune_demo", "finetune_dfew", "finetune_ferv39k", "finetune_mafw"])):
        for name in names:
            c = script.load_config(train_defaults(script), [os.path.join(TRAIN_REPO, "config", f"{name}.py")])
            pretrain.build_model_config(c["model"], c["model_args"])
    dfew = finetune.load_config(train_defaults(finetune), [os.path.join(TRAIN_REPO, "config", "finetune_dfew.py")])
    assert dfew["class_names"] == ("happy", "sad", "neutral", "angry", "surprise", "disgust", "fear")
    recipe = (dfew["base_lr"], dfew["min_lr"], dfew["layer_decay"], dfew["model_args"]["drop_path"], dfew["mixup"])
    assert recipe == (1e-3, 1e-6, 0.75, 0.1, 0.8)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    lrs = [pretrain.lr_at(it, 1.0, 0.01, 10, 110) for it in range(110)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert lrs[10] == 1.0 and abs(lrs[60] - (0.01 + 0.99 * 0.5)) < 1e-12
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.01


def test_weight_decay_skips_norms_biases_and_the_mask_token_and_layers_decay():
    from model import SVFAP, SVFAPClassifier, CONFIGS
    model = SVFAP(CONFIGS["tiny"])
    groups = pretrain.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert "mask_token" in no_decay and "encoder.stages.0.blocks.0.attn.q_bias" in no_decay
    assert all(p.ndim > 1 for g in groups if g["weight_decay"] for p in g["params"])
    clf = SVFAPClassifier(CONFIGS["tiny"], 6)
    groups = pretrain.param_groups(clf, 0.05, layer_decay=0.75)
    scale = {n: g["lr_scale"] for g in groups for n, p in clf.named_parameters() if any(p is q for q in g["params"])}
    top = clf.num_lr_layers - 1
    assert scale["head.weight"] == 1.0 and scale["encoder.patch_embed.proj.weight"] == 0.75 ** top
    assert sum(len(g["params"]) for g in groups) == len(list(clf.parameters()))


def test_mixup_and_cutmix_keep_targets_a_distribution():
    torch.manual_seed(0)
    video = torch.randn(4, 3, 8, 32, 32)
    soft = finetune.smooth_one_hot(torch.tensor([0, 1, 2, 1]), 3, 0.1)
    assert torch.allclose(soft.sum(1), torch.ones(4)) and abs(soft[0, 0].item() - (0.9 + 0.1 / 3)) < 1e-6
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0)):
        mixed, target = finetune.mixup_cutmix(video, soft, mixup, cutmix)
        assert mixed.shape == video.shape and torch.allclose(target.sum(1), torch.ones(4))
        lam = ((target[0, 0] - soft[3, 0]) / (soft[0, 0] - soft[3, 0])).item()  # clip 0's partner is clip 3
        if cutmix:  # the partner's share of the target is the area pasted from it
            assert abs((mixed[0] != video[0]).float().mean().item() - (1 - lam)) < 1e-6
        else:
            assert torch.allclose(mixed[0], lam * video[0] + (1 - lam) * video[3], atol=1e-6)
    erased = finetune.random_erasing(video, 1.0)
    changed = (erased != video).any(1).float().mean(dim=(-1, -2))  # (B, T) fraction of pixels per frame
    assert ((changed >= 0.015) & (changed <= 0.34)).all()


def test_release_checkpoint_with_its_argparse_namespace_loads_safely(tmp_path, capsys):
    """A checkpoint in the release's layout, holding its argparse.Namespace as the release's do, loads with
    weights_only=True and fills every encoder tensor of the classifier."""
    import argparse
    from types import SimpleNamespace
    from model import SVFAP, official_key_map
    c = SimpleNamespace(model="tiny", model_args={"stage_depths": (1, 1, 1)}, task="classification",
                        num_classes=7, num_outputs=1)
    mc = pretrain.build_model_config(c.model, c.model_args)
    source = SVFAP(mc)
    ours = source.state_dict()
    release = {key: ours[our_key] for key, our_key in official_key_map(source, pretraining_layout=True).items()}
    path = tmp_path / "release.pth"
    torch.save({"model": release, "epoch": 99, "args": argparse.Namespace(model="pretrain_videomae", lr=1.5e-4)}, path)
    c.init_from = str(path)
    model = finetune.build_classifier(c, master=True)
    n = len(model.encoder.state_dict())
    assert f"loaded {n}/{n} encoder tensors" in capsys.readouterr().out
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(value, ours["encoder." + key])
