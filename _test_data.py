"""Tests for data.py. Every input is generated here with PyAV: small clips in several containers and codecs,
frame folders, broken files. The reference for "the right frames" is a plain full sequential decode."""

import fractions
import os
import warnings

import av
import numpy as np
import pytest
import torch

import data as D
from model import IMAGENET_MEAN, IMAGENET_STD, SVFAPConfig

# -----------------------------------------------------------------------------------------------------
# helpers: synthetic clips written through PyAV, and the reference decode


def data_frames(n, width, height, seed=0):
    """n distinct RGB frames: drifting gradients, a moving white square and fixed noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    noise = rng.integers(0, 40, (height, width, 3))
    frames = []
    for t in range(n):
        img = np.stack([(xx * 4 + t * 9) % 256, (yy * 5 + t * 3) % 256, (xx + yy + t * 17) % 256], -1)
        x0 = (t * 3) % max(width - 10, 1)
        img[10:20, x0:x0 + 10] = 255
        frames.append(((img + noise) % 256).astype(np.uint8))
    return frames


def data_write_video(path, frames, codec="libx264", fmt=None, gop=6, pix_fmt="yuv420p", audio_first=False,
                     b_frames=None):
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w", format=fmt) as container:
        audio = container.add_stream("aac", rate=16000) if audio_first else None
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.codec_context.gop_size = gop
        if b_frames is not None:
            stream.codec_context.max_b_frames = b_frames
        for t, img in enumerate(frames):
            if audio is not None and t % 2 == 0:
                samples = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
                samples.sample_rate, samples.pts = 16000, t // 2 * 1024
                for packet in audio.encode(samples):
                    container.mux(packet)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for s in (audio, stream):
            if s is not None:
                for packet in s.encode():
                    container.mux(packet)
    return str(path)


def data_write_image(path, img):
    """One JPEG (mjpeg, yuvj444p: odd sizes allowed) or PNG file."""
    codec, pix_fmt = ("png", "rgb24") if str(path).endswith(".png") else ("mjpeg", "yuvj444p")
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt = img.shape[1], img.shape[0], pix_fmt
    ctx.time_base = fractions.Fraction(1, 25)
    frame = av.VideoFrame.from_ndarray(img, format="rgb24").reformat(format=pix_fmt)
    with open(path, "wb") as f:
        f.write(b"".join(bytes(p) for p in ctx.encode(frame) + ctx.encode(None)))


def data_write_folder(folder, frames, ext="jpg"):
    os.makedirs(folder)
    for i, img in enumerate(frames):
        data_write_image(os.path.join(folder, f"{i + 1:05d}.{ext}"), img)
    return str(folder)


def data_reference(path):
    """Full sequential decode with PyAV's defaults, independent of data.py's reader."""
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        out = []
        for name in names:
            with av.open(os.path.join(path, name)) as c:
                out.append(next(c.decode(video=0)).to_ndarray(format="rgb24"))
        return np.stack(out)
    with av.open(path) as c:
        stream = next(s for s in c.streams if s.type == "video")
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])


def data_index_sets(n, seed=0):
    """Frame index lists a reader must get right: windows anywhere (past several keyframes with gop 6),
    16x4 windows, scattered, unsorted and repeated indices, single frames, the last frame, everything."""
    rng = np.random.default_rng(seed)
    sets = [list(range(n)), [0], [n - 1], [n - 1, 0, n // 2, n // 2], list(range(n - 1, -1, -7))]
    for start in (0, 1, 5, 6, 7, n // 2, max(n - 16, 0)):
        sets.append(list(range(start, min(start + 12, n))))
    for _ in range(6):
        start = int(rng.integers(0, max(n - 61, 0) + 1))
        sets.append(D.clip_indices(start, 16, 4, n))
        sets.append(sorted(rng.choice(n, size=min(9, n), replace=False).tolist()))
    return sets


# every readable input: (writer, kwargs) -> built once per test session
DATA_READABLE = {
    "mp4_h264_bframes": lambda d: data_write_video(d / "a.mp4", data_frames(80, 64, 48)),
    "mkv_mpeg4_bframes": lambda d: data_write_video(d / "b.mkv", data_frames(70, 64, 48, 1), codec="mpeg4",
                                                    fmt="matroska", gop=8, b_frames=2),
    "webm_vp8_66x50": lambda d: data_write_video(d / "c.webm", data_frames(60, 66, 50, 2), codec="libvpx",
                                                 fmt="webm", gop=8),
    "mp4_audio_stream_first": lambda d: data_write_video(d / "d.mp4", data_frames(50, 64, 48, 3), audio_first=True),
    "mpegts_h264": lambda d: data_write_video(d / "e.ts", data_frames(60, 64, 48, 4), fmt="mpegts"),
    "raw_h264_no_timestamps": lambda d: data_write_video(d / "f.h264", data_frames(40, 64, 48, 5), fmt="h264"),
    "mp4_odd_67x51_yuv444p": lambda d: data_write_video(d / "g.mp4", data_frames(40, 67, 51, 6), pix_fmt="yuv444p"),
    "mkv_odd_67x51_mpeg4": lambda d: data_write_video(d / "h.mkv", data_frames(40, 67, 51, 7), codec="mpeg4",
                                                      fmt="matroska", gop=5),
    "short_20_frames": lambda d: data_write_video(d / "i.mp4", data_frames(20, 64, 48, 8)),
    "jpeg_folder_66x50": lambda d: data_write_folder(d / "jpg", data_frames(24, 66, 50, 9)),
    "jpeg_folder_odd_67x51": lambda d: data_write_folder(d / "jpg_odd", data_frames(12, 67, 51, 10)),
    "png_folder_40x72": lambda d: data_write_folder(d / "png", data_frames(10, 40, 72, 11), ext="png"),
}


@pytest.fixture(scope="module")
def data_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_inputs")
    return {name: make(root) for name, make in DATA_READABLE.items()}


@pytest.fixture(scope="module")
def data_broken(tmp_path_factory):
    """Unreadable inputs: truncated mp4 (its index is at the end), random bytes, empty, missing."""
    root = tmp_path_factory.mktemp("data_broken")
    good = data_write_video(root / "good.mp4", data_frames(40, 64, 48))
    with open(good, "rb") as f:
        content = f.read()
    paths = {"truncated": root / "truncated.mp4", "random": root / "random.mp4", "empty": root / "empty.mkv",
             "missing": root / "missing.mp4"}
    paths["truncated"].write_bytes(content[: len(content) * 6 // 10])
    paths["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    paths["empty"].write_bytes(b"")
    return {k: str(v) for k, v in paths.items()}


# -----------------------------------------------------------------------------------------------------
# reader: exactly the frames of a full sequential decode


@pytest.mark.parametrize("name", list(DATA_READABLE))
def test_reader_frames_equal_full_sequential_decode(data_inputs, name):
    path = data_inputs[name]
    D._cache.clear()
    reference = data_reference(path)
    assert D.count_frames(path, exact=False) == len(reference)
    for indices in data_index_sets(len(reference)):
        clip = D.read_video_clip(path, indices)
        assert clip.dtype == np.uint8 and clip.shape == (len(indices),) + reference.shape[1:]
        assert np.array_equal(clip, reference[indices]), f"{name}: frames differ at {indices}"
    if not os.path.isdir(path):  # containers with timestamps were read by seeking, verified, with no fallback
        index = D._cache_get(D._stat_key(path))
        assert (index.exact, index.seekable) == ((True, False) if name == "raw_h264_no_timestamps" else (False, True))
    assert D.count_frames(path) == len(reference)  # exact: decodes everything
    if not os.path.isdir(path):  # the decoded index seeks as well, and gives the same frames
        assert D._cache_get(D._stat_key(path)).exact
        for indices in data_index_sets(len(reference), seed=1):
            assert np.array_equal(D.read_video_clip(path, indices), reference[indices])


def test_reader_picks_video_stream_when_stream_0_is_audio(data_inputs):
    with av.open(data_inputs["mp4_audio_stream_first"]) as c:
        assert c.streams[0].type == "audio" and c.streams[1].type == "video"
    assert D.count_frames(data_inputs["mp4_audio_stream_first"]) == 50


def test_reader_seeks_instead_of_decoding_from_the_start(data_inputs, monkeypatch):
    """A window near the end of a gop-6 file decodes about one gop plus the window, not the whole file."""
    path = data_inputs["mp4_h264_bframes"]
    D._cache.clear()
    D.count_frames(path, exact=False)
    decoded = []
    real = D._decode

    def counting(*args):
        for frame in real(*args):
            decoded.append(frame.pts)
            yield frame

    monkeypatch.setattr(D, "_decode", counting)
    clip = D.read_video_clip(path, range(70, 76))
    assert np.array_equal(clip, data_reference(path)[70:76])
    assert 0 < len(decoded) <= 6 + 6 + 3  # from keyframe 66: at most 4 lead-in frames + the 6 wanted (+ slack)


def test_reader_recovers_when_its_index_is_wrong(data_inputs):
    """An index that contradicts the decoder (here: timestamps shifted by one frame) is detected and
    replaced by the decoded truth; the frames returned are still those of a sequential decode."""
    path = data_inputs["mkv_mpeg4_bframes"]
    reference = data_reference(path)
    D._cache.clear()
    key = D._stat_key(path)
    good = D._frame_index(path, key)
    assert not good.exact and good.seekable
    D._cache_put(key, D.FrameIndex(good.num_frames, good.pts + (good.pts[1] - good.pts[0]), good.key_positions,
                                   exact=False, seekable=True))
    assert np.array_equal(D.read_video_clip(path, [30, 34, 38]), reference[[30, 34, 38]])
    assert D._cache_get(key).exact  # rebuilt by decoding
    assert np.array_equal(D.read_video_clip(path, range(50, 60)), reference[50:60])

    # a phantom frame at position 41 (as if a packet decoded to nothing): the gap is seen while decoding
    pts = np.insert(good.pts, 41, (good.pts[40] + good.pts[41]) // 2)
    keys = good.key_positions + (good.key_positions >= 41)
    D._cache_put(key, D.FrameIndex(good.num_frames + 1, pts, keys, exact=False, seekable=True))
    assert np.array_equal(D.read_video_clip(path, [38, 42, 46]), reference[[38, 42, 46]])
    assert D._cache_get(key).exact and D._cache_get(key).num_frames == len(reference)


def test_reader_out_of_range_names_file_and_valid_range(data_inputs):
    path = data_inputs["short_20_frames"]
    with pytest.raises(D.VideoReadError, match=r"i\.mp4.*frame 20 requested.*valid indices 0\.\.19"):
        D.read_video_clip(path, [5, 20])
    folder = data_inputs["jpeg_folder_66x50"]
    with pytest.raises(D.VideoReadError, match=r"jpg.*frame 24 requested"):
        D.read_video_clip(folder, [24])
    with pytest.raises(ValueError, match="frame_indices"):
        D.read_video_clip(path, [-1])


@pytest.mark.parametrize("kind", ["truncated", "random", "empty", "missing"])
def test_unreadable_file_raises_video_read_error_naming_it(data_broken, kind):
    path = data_broken[kind]
    with pytest.raises(D.VideoReadError, match=os.path.basename(path)) as err:
        D.read_video_clip(path, [0])
    assert isinstance(err.value, RuntimeError)
    with pytest.raises(D.VideoReadError, match=os.path.basename(path)):
        D.count_frames(path)


def test_frame_folder_in_natural_order_and_unequal_sizes_rejected(tmp_path):
    frames = data_frames(12, 32, 24)
    folder = tmp_path / "unpadded"
    os.makedirs(folder)
    for i, img in enumerate(frames):  # frame_2 must come before frame_10
        data_write_image(folder / f"frame_{i}.png", img)
    assert np.array_equal(D.read_video_clip(str(folder), [2, 10, 11]), np.stack([frames[2], frames[10], frames[11]]))
    data_write_image(folder / "frame_12.png", data_frames(1, 30, 24)[0])
    with pytest.raises(D.VideoReadError, match=r"frame_12\.png.*30x24"):
        D.read_video_clip(str(folder), [0, 12])
    os.makedirs(tmp_path / "no_images")
    with pytest.raises(D.VideoReadError, match="no frame images"):
        D.read_video_clip(str(tmp_path / "no_images"), [0])


# -----------------------------------------------------------------------------------------------------
# annotation files


def test_annotations_resolve_paths_and_name_bad_lines(tmp_path):
    listing = tmp_path / "split.txt"
    listing.write_text("clips/a.mp4 3\n\n/abs/b.mp4 0.5 -1 2e-1\n/data/ycs/AC/Dataset/DFEW/Clip/jpg_256/02522 4\n")
    rows = D.read_annotations(listing)
    assert rows[0] == (str(tmp_path / "clips" / "a.mp4"), [3.0])
    assert rows[1] == ("/abs/b.mp4", [0.5, -1.0, 0.2])
    rows = D.read_annotations(listing, root="/videos", replace_prefix=("/data/ycs/AC/Dataset/DFEW", "/mnt/dfew"))
    assert rows[0][0] == "/videos/clips/a.mp4" and rows[2][0] == "/mnt/dfew/Clip/jpg_256/02522"
    assert D.read_annotations(listing, replace_prefix="/abs=/x")[1][0] == "/x/b.mp4"

    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 1\nb.mp4 2\nmy clip.mp4 3\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 3: 'clip\.mp4' is not a number"):
        D.read_annotations(bad)
    bad.write_text("a.mp4 1\nb.mp4\n")
    with pytest.raises(ValueError, match=r"bad\.txt, line 2: .* has no label"):
        D.read_annotations(bad)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        D.read_annotations(tmp_path / "nowhere.txt")


def test_dataset_checks_labels_per_task(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_text("a.mp4 0\nb.mp4 2.5\n")
    with pytest.raises(ValueError, match=r"l\.txt, line 2: classification needs one integer"):
        D.VideoDataset(listing, "train")
    listing.write_text("a.mp4 0.1 0.2\nb.mp4 0.3\n")
    with pytest.raises(ValueError, match=r"line 2: 1 regression values, but line 1 has 2"):
        D.VideoDataset(listing, "train", task="regression")
    with pytest.raises(ValueError, match="mode="):
        D.VideoDataset(listing, "finetune")


# -----------------------------------------------------------------------------------------------------
# sampling and spatial transforms


def test_sampling_rules():
    assert D.window_span(16, 4) == 61
    assert D.clip_indices(10, 4, 4, 100) == [10, 14, 18, 22]
    # shorter than the window: same stride, the last frame repeats
    assert D.clip_indices(0, 16, 4, 20) == [0, 4, 8, 12, 16] + [19] * 11
    assert D.uniform_clip_starts(100, 61, 2) == [0, 39] and D.uniform_clip_starts(100, 61, 1) == [19]
    assert D.uniform_clip_starts(30, 61, 3) == [0, 0, 0]
    g = torch.Generator().manual_seed(0)
    starts = [D.random_clip_start(100, 61, g) for _ in range(400)]
    assert min(starts) == 0 and max(starts) == 39


def test_multiscale_crop_uses_the_paper_scales():
    g = torch.Generator().manual_seed(0)
    sides = {int(360 * s) for s in D.MULTISCALE_SCALES}
    boxes = [D.multiscale_crop_box(360, 640, generator=g) for _ in range(300)]
    for top, left, h, w in boxes:
        assert h in sides and w in sides and 0 <= top and top + h <= 360 and 0 <= left and left + w <= 640
    assert {h for _, _, h, _ in boxes} == sides and len({(t, l) for t, l, _, _ in boxes}) > 10


def test_train_transform_shape_flip_and_normalisation():
    ramp = np.broadcast_to(np.linspace(0, 255, 48).astype(np.uint8)[None, None, :, None], (8, 40, 48, 3)).copy()
    clip = D.frames_to_tensor(ramp)
    g = torch.Generator().manual_seed(0)
    outs = [D.train_transform(clip, 32, generator=g) for _ in range(30)]
    assert all(o.shape == (3, 8, 32, 32) and o.dtype == torch.float32 for o in outs)
    slopes = [float(o[0, 0, 0, -1] - o[0, 0, 0, 0]) for o in outs]
    assert any(s > 0 for s in slopes) and any(s < 0 for s in slopes)  # flipped and not flipped
    up = D.train_transform(clip, 96, generator=g)  # upscaling path
    assert up.shape == (3, 8, 96, 96) and abs(float(up[0, 0, 0, 1:].diff().abs().max())) < 0.2
    lo = (0 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    hi = (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert all(lo - 1e-4 <= float(o[0].min()) and float(o[0].max()) <= hi + 1e-4 for o in outs)


def test_eval_views_resize_short_side_and_spread_crops():
    ramp = np.broadcast_to(np.linspace(0, 255, 96).astype(np.uint8)[None, None, :, None], (4, 48, 96, 3)).copy()
    views = D.eval_views(D.frames_to_tensor(ramp), 32, 3)
    assert [tuple(v.shape) for v in views] == [(3, 4, 32, 32)] * 3
    means = [float(v.mean()) for v in views]
    assert means[0] < means[1] < means[2]  # left, centre, right of a left-to-right ramp
    tall = D.frames_to_tensor(np.transpose(ramp, (0, 2, 1, 3)).copy())
    assert [tuple(v.shape) for v in D.eval_views(tall, 32, 1)] == [(3, 4, 32, 32)]


# -----------------------------------------------------------------------------------------------------
# the dataset


def data_listing(tmp_path, lines, name="list.txt"):
    path = tmp_path / name
    path.write_text("".join(f"{p} {v}\n" for p, v in lines))
    return path


def test_dataset_items_have_the_agreed_shapes(data_inputs, tmp_path):
    files = [data_inputs[k] for k in ("mp4_h264_bframes", "webm_vp8_66x50", "jpeg_folder_66x50",
                                      "mkv_odd_67x51_mpeg4", "short_20_frames")]
    listing = data_listing(tmp_path, [(f, i % 3) for i, f in enumerate(files)])
    train = D.VideoDataset(listing, "train", img_size=32, num_frames=8, sampling_rate=2)
    for i in range(len(train)):
        video, target = train[i]
        assert video.shape == (3, 8, 32, 32) and video.dtype == torch.float32 and torch.isfinite(video).all()
        assert target.dtype == torch.int64 and target.dim() == 0 and int(target) == i % 3
    ev = D.VideoDataset(listing, "eval", img_size=32, num_frames=8, sampling_rate=2, num_clips=3, num_crops=2)
    views, target, index = ev[4]
    assert views.shape == (6, 3, 8, 32, 32) and int(target) == 1 and index == 4
    cfg = SVFAPConfig(img_size=32, patch_size=8, num_frames=8, embed_dim=64, num_heads=4, decoder_dim=64,
                      decoder_heads=4)
    pre = D.VideoDataset(listing, "pretrain", img_size=32, num_frames=8, sampling_rate=2, repeated_sampling=3,
                         mask_cfg=cfg)
    video, mask = pre[0]
    assert video.shape == (3, 3, 8, 32, 32) and mask.shape == (3, cfg.num_patches) and mask.dtype == torch.bool
    assert (mask.sum(1) == cfg.grid[0] * cfg.num_masked_spatial).all()
    with pytest.raises(ValueError, match="mask_cfg"):
        D.VideoDataset(listing, "pretrain", img_size=64, mask_cfg=cfg)
    reg = D.VideoDataset(data_listing(tmp_path, [(files[0], "0.5 -0.25")], "reg.txt"), "train", img_size=32,
                         task="regression")
    assert reg[0][1].dtype == torch.float32 and reg[0][1].tolist() == [0.5, -0.25]


def test_repeated_sampling_draws_k_windows_from_one_range(data_inputs, tmp_path):
    listing = data_listing(tmp_path, [(data_inputs["mp4_h264_bframes"], 0)])
    ds = D.VideoDataset(listing, "pretrain", img_size=32, num_frames=8, sampling_rate=2, repeated_sampling=4,
                        mask_cfg=SVFAPConfig(img_size=32, patch_size=8, num_frames=8))
    span = D.window_span(8, 2)
    torch.manual_seed(0)
    for _ in range(50):
        clips = ds._choose_training(80)
        flat = [i for c in clips for i in c]
        assert len(clips) == 4 and max(flat) - min(flat) < 2 * span and max(flat) < 80
        assert all(c == D.clip_indices(c[0], 8, 2, 80) for c in clips)


def test_eval_normalisation_and_crop_box(tmp_path):
    """A 224x224 frame that is (200, 100, 50) inside VoxCeleb2's box (rows 0-160, columns 32-192) and
    black outside: after the crop box every pixel is that colour, normalised with ImageNet mean/std."""
    img = np.zeros((224, 224, 3), np.uint8)
    img[0:160, 32:192] = (200, 100, 50)
    folder = data_write_folder(tmp_path / "box", [img] * 6, ext="png")
    listing = data_listing(tmp_path, [(folder, 0)])
    ds = D.VideoDataset(listing, "eval", img_size=32, num_frames=4, sampling_rate=1, num_clips=1, num_crops=2,
                        crop_box=D.VOXCELEB2_CROP_BOX)
    views, _, _ = ds[0]
    expected = [(c / 255 - m) / s for c, m, s in zip((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD)]
    for ch in range(3):
        assert torch.allclose(views[:, ch], torch.full_like(views[:, ch], expected[ch]), atol=1e-5)
    no_box = D.VideoDataset(listing, "eval", img_size=32, num_frames=4, sampling_rate=1, num_clips=1, num_crops=1)
    assert float(no_box[0][0].min()) < expected[0] - 1  # black borders are there without the box
    bad_box = D.VideoDataset(listing, "eval", img_size=32, crop_box=(0, 300, 0, 100))
    with pytest.raises(ValueError, match=r"crop_box .* does not fit its 224x224 frames"):
        bad_box[0]


def test_eval_clips_spread_in_time_and_short_video_repeats_last_frame(tmp_path):
    frames = [np.full((24, 24, 3), 10 * t, np.uint8) for t in range(20)]  # brightness = time
    folder = data_write_folder(tmp_path / "ramp", frames, ext="png")
    listing = data_listing(tmp_path, [(folder, 0)])
    ds = D.VideoDataset(listing, "eval", img_size=24, num_frames=4, sampling_rate=2, num_clips=3, num_crops=1)
    views, _, _ = ds[0]  # starts 0, 6, 13 (span 7 in 20 frames)
    first_frames = views[:, 0, 0, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.allclose(first_frames * 255, torch.tensor([0.0, 60.0, 130.0]), atol=1e-3)
    long = D.VideoDataset(listing, "eval", img_size=24, num_frames=16, sampling_rate=4, num_clips=1, num_crops=1)
    clip = long[0][0][0, 0, :, 0, 0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]  # frames 0, 4, ..., 16, then 19 x 11
    assert torch.allclose(clip * 255, torch.tensor([0.0, 40, 80, 120, 160] + [190.0] * 11), atol=1e-3)


def test_training_skips_and_counts_broken_files_eval_names_them(data_inputs, data_broken, tmp_path):
    good = data_inputs["mp4_h264_bframes"]
    lines = [(good, 0), (data_broken["truncated"], 1), (good, 2), (data_broken["random"], 1),
             (data_broken["missing"], 2), (good, 0)]
    listing = data_listing(tmp_path, lines)
    ds = D.VideoDataset(listing, "train", img_size=32, num_frames=8, sampling_rate=2, max_fail_fraction=0.5)
    torch.manual_seed(0)
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable sample: .*truncated\.mp4"):
        video, target = ds[1]
    assert video.shape == (3, 8, 32, 32) and 1 <= ds.skipped <= 3 and ds.tried == ds.skipped + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(len(ds)):
            ds[i]
    assert ds.skipped >= 3 and ds.tried == ds.skipped + len(ds) + 1

    ev = D.VideoDataset(listing, "eval", img_size=32, num_frames=8, sampling_rate=2)
    assert ev[0][0].shape == (4, 3, 8, 32, 32)
    with pytest.raises(D.VideoReadError, match=r"random\.mp4.*line 4 of .*list\.txt; evaluation never skips"):
        ev[3]

    all_bad = data_listing(tmp_path, [(data_broken[k], 0) for k in ("truncated", "random", "missing")], "bad.txt")
    ds = D.VideoDataset(all_bad, "train", img_size=32, num_frames=8, sampling_rate=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"6 of 6 samples tried .* max_fail_fraction=0\.05"):
            ds[0]


def test_dataset_in_dataloader_workers(data_inputs, data_broken, tmp_path):
    files = [data_inputs[k] for k in ("mp4_h264_bframes", "mkv_mpeg4_bframes", "jpeg_folder_66x50",
                                      "mpegts_h264", "webm_vp8_66x50", "mp4_audio_stream_first")]
    listing = data_listing(tmp_path, [(f, i % 2) for i, f in enumerate(files)] + [(data_broken["random"], 0)])
    ds = D.VideoDataset(listing, "train", img_size=32, num_frames=8, sampling_rate=2, max_fail_fraction=0.5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batches = list(loader)
    assert [b[0].shape for b in batches] == [(4, 3, 8, 32, 32), (3, 3, 8, 32, 32)]
    assert all(torch.isfinite(b[0]).all() for b in batches)
    readable = data_listing(tmp_path, [(f, i % 2) for i, f in enumerate(files)], "readable.txt")
    ev = D.VideoDataset(readable, "eval", img_size=32, num_frames=8, sampling_rate=2)
    loader = torch.utils.data.DataLoader(ev, batch_size=3, num_workers=2)
    got = [(v.shape, t.tolist(), i.tolist()) for v, t, i in loader]
    assert got == [((3, 4, 3, 8, 32, 32), [0, 1, 0], [0, 1, 2]), ((3, 4, 3, 8, 32, 32), [1, 0, 1], [3, 4, 5])]
