"""
Data for SVFAP: from face videos on disk to normalised clip tensors, in one file.

Reading order:
  1. read_annotations               the split files of section 8: "<path> <label>" or "<path> <v1> ... <vD>"
  2. read_video_clip, count_frames  exact frames of any video PyAV decodes, or of a folder of frame images
  3. sampling                       which frame indices make a clip (train: random window; eval: N uniform)
  4. spatial transforms             crop box, multi-scale crop + flip, resize, ImageNet normalisation
  5. VideoDataset                   pre-training / fine-tuning / evaluation items, broken-file policy
  6. benchmark                      `python data.py --bench`
  7. demo dataset                   `python data.py demo`

What "frame i" means. Frame i of a video is the i-th frame that a full sequential decode of its video
stream outputs (the first video stream that is not cover art, whatever stream 0 is). read_video_clip
returns exactly those frames without decoding from the start:
  - A frame index per file maps positions to presentation timestamps (pts) and marks the keyframes. It
    comes from one demux pass (packet headers only, no decoding) and is cached per process, keyed by
    path, size and mtime. Container frame counts and durations are never used.
  - A read seeks to the last keyframe at or before the first wanted frame (stepping back a keyframe when
    a demuxer lands after it; reopening the file to reach the start), drops any frames decoded before
    that keyframe and decodes forward. Every frame must carry the pts of the index's next position; the
    only gaps accepted are unwanted frames the reader itself asked the decoder to skip (skip_frame=
    "NONREF": frames that no other frame refers to, so skipping them changes no pixel of any other).
    Anything else the index did not predict (a missing, extra or unknown frame, a stream that ends
    early) makes the reader decode the whole file once and keep that decoded truth as the index; if
    seeking still disagrees with it, the file is read sequentially from then on.
  - The demux pass is not trusted at all when packets lack a pts, share one, are flagged corrupt or
    discard, or when the first frame in presentation order is not a keyframe (leading frames of an open
    GOP, which decoders may drop): such files get the decoded index at once.
  - Left open: a packet that decodes to nothing in a part of the file that no read has decoded shifts
    later positions without the quick index noticing. count_frames(path) (exact=True) decodes all.
Any decoding error raises VideoReadError naming the file; nothing waits on a bad file (only regular
files are opened, every loop ends with the stream).
"""

import contextlib
import multiprocessing
import os
import re
import stat
import sys
import tempfile
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, replace

import av
import numpy as np
import torch
import torch.nn.functional as F

from model import IMAGENET_MEAN, IMAGENET_STD, SVFAPConfig, tube_mask

# -----------------------------------------------------------------------------------------------------
# 1. Annotation files


def _parse_annotation_lines(path, root=None, replace_prefix=None):
    """[(line_number, sample_path, values)] of an annotation file; blank lines are skipped."""
    path = os.fspath(path)
    if isinstance(replace_prefix, str):  # "OLD=NEW", the form a command line gives
        if "=" not in replace_prefix:
            raise ValueError(f"replace_prefix={replace_prefix!r}: expected (old, new) or the string 'OLD=NEW'")
        replace_prefix = tuple(replace_prefix.split("=", 1))
    base = os.fspath(root) if root is not None else os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise FileNotFoundError(f"annotation file {path}: cannot read it ({e.strerror})") from e
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise ValueError(f"{path}, line {number}: {line.strip()!r} has no label; expected "
                             f"'<path> <label>' or '<path> <v1> ... <vD>' separated by spaces")
        try:
            values = [float(v) for v in fields[1:]]
        except ValueError:
            bad = next(v for v in fields[1:] if not _is_number(v))
            raise ValueError(f"{path}, line {number}: {bad!r} is not a number; expected '<path> <label>' or "
                             f"'<path> <v1> ... <vD>' separated by spaces (paths cannot contain spaces)") from None
        sample = fields[0]
        if replace_prefix is not None and sample.startswith(replace_prefix[0]):
            sample = replace_prefix[1] + sample[len(replace_prefix[0]):]
        rows.append((number, os.path.join(base, sample), values))  # join keeps absolute paths as they are
    if not rows:
        raise ValueError(f"annotation file {path} holds no samples")
    return rows


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_annotations(path, root=None, replace_prefix=None):
    """[(sample_path, [v1, ...])] from lines "<path> <v1> [<v2> ...]".

    Relative paths resolve against `root`, or the annotation file's folder when root is None.
    replace_prefix=(old, new) (or "old=new") rewrites paths that start with `old`, so the authors' split
    files with their absolute paths (e.g. /data/ycs/AC/Dataset/DFEW/Clip/jpg_256/02522) work unchanged.
    """
    return [(p, v) for _, p, v in _parse_annotation_lines(path, root, replace_prefix)]


# -----------------------------------------------------------------------------------------------------
# 2. Reading frames


class VideoReadError(RuntimeError):
    """A video or frame folder that cannot be read; the message names the file and the reason."""


class _FrameOutOfRange(VideoReadError):
    """A requested frame index is not below the number of frames the file decodes to."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DECODER_THREADS = 1  # DataLoader workers are the parallelism; decoder threads would oversubscribe the cores
INDEX_CACHE_SIZE = 4096  # per-file indices kept per process (a few kB each)
MAX_SEEK_BACKOFF = 3  # keyframes to step back when a demuxer lands after the target (MPEG-TS does)
SKIP_NONREF = True  # seeking reads skip unwanted frames that no other frame refers to (their pixels matter to none)
# FFmpeg's own decoders, which apply skip_frame to the packet being sent; wrappers such as libdav1d queue
# packets and would apply it to the wrong frame (harmless, the check catches it, but then nothing is gained)
SKIP_NONREF_DECODERS = ("h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video", "vp8", "vp9")


@dataclass
class FrameIndex:
    """Where the frames of one video file are. Position i = i-th frame of a full sequential decode."""
    num_frames: int
    pts: np.ndarray | None  # (num_frames,) int64, ascending: pts of frame i; None = no usable timestamps
    key_positions: np.ndarray | None  # ascending positions of keyframes, the places a seek can land
    exact: bool  # True: built by decoding every frame; False: from packet headers only
    seekable: bool  # False: read by decoding from the start

    def position(self, pts):
        """Frame position carrying this pts, or None when the index knows no such frame."""
        if pts is None:
            return None
        j = int(self.pts.searchsorted(pts))
        return j if j < self.num_frames and self.pts[j] == pts else None

    def is_keyframe(self, position):
        j = int(np.searchsorted(self.key_positions, position))
        return j < len(self.key_positions) and self.key_positions[j] == position

    def keyframe_before(self, position):
        """The last keyframe position <= position (the first keyframe if none is)."""
        return int(self.key_positions[max(int(np.searchsorted(self.key_positions, position, "right")) - 1, 0)])


_cache = OrderedDict()  # (path, size, mtime_ns) -> FrameIndex or tuple of image names; per process
_cache_lock = threading.Lock()
_thread_state = threading.local()  # one pixel-format converter per thread (its SwsContext is reused)


def _cache_get(key):
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    return None


def _cache_put(key, value):
    with _cache_lock:
        _cache[key] = value
        _cache.move_to_end(key)
        while len(_cache) > INDEX_CACHE_SIZE:
            _cache.popitem(last=False)


def _stat_key(path):
    """Cache key; also the check that the path exists. Only regular files and folders are opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoReadError(f"{path}: no such file or folder") from None
    except OSError as e:
        raise VideoReadError(f"{path}: cannot access it ({e.strerror})") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise VideoReadError(f"{path}: not a regular file or a folder (a pipe or device could block forever)")
    return (path, st.st_size, st.st_mtime_ns)


def _to_rgb(frame):
    """uint8 (H, W, 3) RGB of a decoded frame (any pixel format), exactly as frame.to_ndarray(format="rgb24")."""
    state = _thread_state
    if not hasattr(state, "reformatter"):
        state.reformatter = av.video.reformatter.VideoReformatter()
        try:  # one swscale thread per reader, as for the decoder (PyAV < 14 has no such option)
            state.reformatter.reformat(av.VideoFrame(16, 16, "yuv420p"), format="rgb24", threads=1)
            state.options = {"threads": 1}
        except TypeError:
            state.options = {}
    return state.reformatter.reformat(frame, format="rgb24", **state.options).to_ndarray()


def _is_cover_art(stream):
    try:
        return bool(stream.disposition & av.stream.Disposition.attached_pic)
    except AttributeError:  # PyAV builds without Stream.disposition
        return False


@contextlib.contextmanager
def _open_video(path):
    """(container, video stream), closed on exit. The stream is the first video stream that is not cover art."""
    try:
        # skip_frame=all applies to the probing decoders only: without it, opening decodes the first frames
        # (a keyframe) just to learn the pixel format, on every read. Our decoder is a separate context.
        container = av.open(path, metadata_errors="ignore", options={"skip_frame": "all"})
    except av.error.FFmpegError as e:
        raise VideoReadError(f"{path}: not a readable video ({e.strerror or e})") from e
    try:
        streams = [s for s in container.streams.video if not _is_cover_art(s)]
        if not streams:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoReadError(f"{path}: no video stream (streams: {kinds})")
        stream = streams[0]
        stream.codec_context.thread_count = DECODER_THREADS
        stream.codec_context.skip_frame = "DEFAULT"
        yield container, stream
    finally:
        container.close()


def _scan_packets(path):
    """Quick FrameIndex from packet headers (no decoding), or None when they cannot be trusted."""
    pts, key_pts = [], []
    with _open_video(path) as (container, stream):
        for packet in container.demux(stream):
            if packet.size == 0:  # the demuxer's closing flush packet: no frame
                continue
            if packet.pts is None or packet.is_corrupt or packet.is_discard:
                return None
            pts.append(packet.pts)
            if packet.is_keyframe:
                key_pts.append(packet.pts)
    pts = np.sort(np.asarray(pts, dtype=np.int64))
    if len(pts) == 0 or np.any(np.diff(pts) <= 0):  # no frames, or two packets share a pts
        return None
    key_positions = np.searchsorted(pts, np.sort(np.asarray(key_pts, dtype=np.int64)))
    if len(key_positions) == 0 or key_positions[0] != 0:  # first frame shown is not a keyframe: open GOP
        return None
    return FrameIndex(len(pts), pts, key_positions, exact=False, seekable=True)


class _Clip:
    """The (T, H, W, 3) result of one read, filled in place as frames decode: converted frames are copied
    once and freed at once, which keeps a read from churning large allocations."""

    def __init__(self, path, indices):
        self.path, self.count, self.array = path, len(indices), None
        self.slots = {}  # frame position -> places in the output (an index may be asked for twice)
        for j, i in enumerate(indices):
            self.slots.setdefault(i, []).append(j)
        self.wanted = sorted(self.slots)
        self.filled = set()

    def put(self, position, frame, source=None):
        rgb = _to_rgb(frame)
        if self.array is None:
            self.array = np.empty((self.count,) + rgb.shape, dtype=np.uint8)
        elif rgb.shape != self.array.shape[1:]:
            raise VideoReadError(f"{source or self.path}: frame {position} is {rgb.shape[1]}x{rgb.shape[0]}, other "
                                 f"frames of the clip are {self.array.shape[2]}x{self.array.shape[1]}")
        for j in self.slots[position]:
            self.array[j] = rgb
        self.filled.add(position)

    def check_complete(self, num_frames):
        missing = [i for i in self.wanted if i not in self.filled]
        if missing:
            raise _FrameOutOfRange(f"{self.path}: frame {missing[0]} requested but the video has {num_frames} "
                                   f"frames (valid indices 0..{num_frames - 1})")
        return self.array


def _scan_frames(path, clip=None, stop_after=None):
    """Decode from the start, filling clip's frames; the exact FrameIndex (None when stopped at stop_after)."""
    pts, key_pts = [], set()
    with _open_video(path) as (container, stream):
        for packet in container.demux(stream):
            if packet.is_keyframe and packet.pts is not None:
                key_pts.add(packet.pts)
            for frame in packet.decode():
                position = len(pts)
                pts.append(frame.pts)
                if clip is not None and position in clip.slots:
                    clip.put(position, frame)
                if stop_after is not None and position >= stop_after:
                    return None
    n = len(pts)
    if n and all(p is not None for p in pts) and all(b > a for a, b in zip(pts, pts[1:])):
        pts = np.asarray(pts, dtype=np.int64)
        key_positions = np.asarray([i for i, p in enumerate(pts.tolist()) if p in key_pts], dtype=np.int64)
        seekable = bool(len(key_positions) > 0 and key_positions[0] == 0)
        return FrameIndex(n, pts, key_positions, exact=True, seekable=seekable)
    return FrameIndex(n, None, None, exact=True, seekable=False)


def _frame_index(path, key, exact=False):
    """The cached FrameIndex of a video file, built on first use (exact=True: the decoded truth)."""
    index = _cache_get(key)
    if index is None:
        index = _scan_packets(path)
    if index is None or (exact and not index.exact) or index.num_frames == 0:
        index = _scan_frames(path)
    _cache_put(key, index)
    if index.num_frames == 0:
        raise VideoReadError(f"{path}: the video stream decodes to no frames")
    return index


def _decode(container, stream, index, wanted, skipped):
    """Frames from the current position. Packets of unwanted frames are decoded with skip_frame="NONREF",
    so a frame that nothing refers to is skipped (about half of the B-frames of typical H.264); their
    positions go into `skipped`, the only gaps the caller will accept in the decoded sequence."""
    context = stream.codec_context
    may_skip = SKIP_NONREF and context.name in SKIP_NONREF_DECODERS
    for packet in container.demux(stream):
        position = index.position(packet.pts)
        skip = may_skip and position is not None and position not in wanted
        if skip:
            skipped.add(position)
        context.skip_frame = "NONREF" if skip else "DEFAULT"
        yield from packet.decode()


def _first_keyframe(decoded, index, target):
    """After a seek: skip leading frames up to the first keyframe. Returns (position, frame); position is
    past the target (or infinite when the stream ended first) if the seek overshot, None if a frame's pts
    is unknown to the index."""
    for frame in decoded:
        position = index.position(frame.pts)
        if position is None:
            return None, None
        if position > target or index.is_keyframe(position):
            return position, frame
    return float("inf"), None


def _read_seeking(path, index, clip):
    """Fill clip by seeking; False when the decoder contradicts the index.

    After the keyframe, each decoded frame must be the next position of the index, except that unwanted
    frames this reader asked the decoder to skip (non-reference, unwanted) may be missing. A frame that the
    index lists but no packet delivered, or a packet that decoded to nothing, is a gap that makes it fail.
    """
    wanted, i, skipped = clip.wanted, 0, set()
    with contextlib.ExitStack() as stack:
        container, stream = stack.enter_context(_open_video(path))
        at_start = True  # nothing demuxed yet: decoding from here is decoding from the start
        while i < len(wanted):
            target = wanted[i]
            k = int(np.searchsorted(index.key_positions, target, "right")) - 1
            for back in range(MAX_SEEK_BACKOFF + 1):
                keyframe = int(index.key_positions[max(k - back, 0)])
                if keyframe == 0:  # the start is reached by (re)opening: some demuxers (MPEG-TS) cannot seek there
                    if not at_start:
                        container, stream = stack.enter_context(_open_video(path))
                else:
                    container.seek(int(index.pts[keyframe]), stream=stream, backward=True, any_frame=False)
                at_start = False
                decoded = _decode(container, stream, index, clip.slots, skipped)
                position, frame = _first_keyframe(decoded, index, target)
                if position is None:
                    return False
                if position <= target:
                    break
            else:
                return False  # the demuxer never landed at or before the target
            while True:  # decode forward, checking that every frame is where the index says
                if position == wanted[i]:
                    clip.put(position, frame)
                    i += 1
                    if i == len(wanted):
                        return True
                    if index.keyframe_before(wanted[i]) > position + 1:
                        break  # a keyframe lies between here and the next wanted frame: seek to it instead
                frame = next(decoded, None)
                nxt = None if frame is None else index.position(frame.pts)
                if nxt is None or nxt <= position or any(p not in skipped for p in range(position + 1, nxt)):
                    return False
                position = nxt
    return True


def _read_video(path, key, clip):
    """Fill clip from a video file (see the module docstring for the rules)."""
    index = _frame_index(path, key)
    if clip.wanted[-1] < index.num_frames:
        if index.seekable:
            if _read_seeking(path, index, clip):
                return clip.array
            clip.filled.clear()
            if index.exact:  # the decoded truth, yet seeking disagrees with it: read this file from the start
                _cache_put(key, replace(index, seekable=False))
        if index.exact:
            _scan_frames(path, clip, stop_after=clip.wanted[-1])
            return clip.check_complete(index.num_frames)
    elif index.exact:
        return clip.check_complete(index.num_frames)
    # the quick index was wrong (or counts too few frames): decode everything once and keep that as the index
    index = _scan_frames(path, clip)
    _cache_put(key, index)
    return clip.check_complete(index.num_frames)


def _natural_key(name):
    """frame_2.jpg before frame_10.jpg; identical to plain sorting for zero-padded names."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _frame_images(folder, key):
    names = _cache_get(key)
    if names is None:
        names = tuple(sorted((n for n in os.listdir(folder)
                              if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")), key=_natural_key))
        _cache_put(key, names)
    if not names:
        raise VideoReadError(f"{folder}: folder holds no frame images ({', '.join(IMAGE_EXTENSIONS)})")
    return names


def _read_folder(folder, key, clip):
    """Fill clip from a folder of frame images, each decoded with PyAV."""
    names = _frame_images(folder, key)
    for i in clip.wanted:
        if i >= len(names):
            break
        image = os.path.join(folder, names[i])
        try:
            with av.open(image, metadata_errors="ignore") as container:
                frame = next(container.decode(video=0), None)
                if frame is None:
                    raise VideoReadError(f"{image}: the image holds no picture")
                clip.put(i, frame, source=image)
        except av.error.FFmpegError as e:
            raise VideoReadError(f"{image}: cannot decode the image ({e.strerror or e})") from e
    return clip.check_complete(len(names))


def read_video_clip(path, frame_indices):
    """uint8 (T, H, W, 3) RGB: the frames a full sequential decode gives at frame_indices (any order, repeats ok).

    path is a video file or a folder of frame images (.jpg .jpeg .png .bmp, in natural name order).
    Raises VideoReadError (a RuntimeError) naming the file and the reason.
    """
    path = os.fspath(path)
    indices = [int(i) for i in frame_indices]
    if not indices or min(indices) < 0:
        raise ValueError(f"{path}: frame_indices must be a non-empty list of integers >= 0, got {indices}")
    key = _stat_key(path)
    clip = _Clip(path, indices)
    try:
        if os.path.isdir(path):
            return _read_folder(path, key, clip)
        return _read_video(path, key, clip)
    except av.error.FFmpegError as e:
        raise VideoReadError(f"{path}: decoding failed ({type(e).__name__}: {e.strerror or e})") from e


def count_frames(path, exact=True):
    """Number of usable frames: what a full sequential decode outputs (a folder: its number of images).

    exact=False returns the quick count from packet headers (no decoding; what the dataset samples with);
    it becomes the decoded count as soon as any read of this file in this process found them to differ.
    """
    path = os.fspath(path)
    key = _stat_key(path)
    if os.path.isdir(path):
        return len(_frame_images(path, key))
    try:
        return _frame_index(path, key, exact).num_frames
    except av.error.FFmpegError as e:
        raise VideoReadError(f"{path}: decoding failed ({type(e).__name__}: {e.strerror or e})") from e


# -----------------------------------------------------------------------------------------------------
# 3. Sampling: which frames make a clip


def window_span(num_frames, sampling_rate):
    """Frames covered by one clip: 16 frames every 4th span 61 frames."""
    return (num_frames - 1) * sampling_rate + 1


def clip_indices(start, num_frames, sampling_rate, total):
    """start, start + rate, ...; past the last frame the last frame repeats.

    Rule for a video shorter than the window: keep the stride and repeat the last frame, so motion runs at
    the speed of every other clip (VideoMAE's loader, which the release builds on, pads with it too).
    """
    return [min(start + i * sampling_rate, total - 1) for i in range(num_frames)]


def random_clip_start(total, span, generator=None):
    """Training: a uniformly random window that fits (0 when the video is shorter than the window)."""
    return int(torch.randint(max(total - span, 0) + 1, (), generator=generator))


def uniform_clip_starts(total, span, num_clips):
    """Evaluation: num_clips windows spread evenly from the first to the last possible start."""
    last = max(total - span, 0)
    if num_clips == 1:
        return [last // 2]
    return [round(j * last / (num_clips - 1)) for j in range(num_clips)]


# -----------------------------------------------------------------------------------------------------
# 4. Spatial transforms. Clips travel as (T, 3, H, W): frames are the batch of F.interpolate.

MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
VOXCELEB2_CROP_BOX = (0, 160, 32, 192)  # rows 0-160, columns 32-192 of a 224x224 frame: the face


def frames_to_tensor(frames):
    """uint8 numpy (T, H, W, 3) -> uint8 tensor (T, 3, H, W)."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def apply_crop_box(clip, crop_box, path="clip"):
    """clip[..., top:bottom, left:right]; crop_box = (top, bottom, left, right) in pixels."""
    if crop_box is None:
        return clip
    top, bottom, left, right = crop_box
    height, width = clip.shape[-2:]
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(f"{path}: crop_box (top, bottom, left, right)={tuple(crop_box)} does not fit its "
                         f"{width}x{height} frames (needs 0 <= top < bottom <= {height}, 0 <= left < right <= {width})")
    return clip[..., top:bottom, left:right]


def resize(clip, size):
    """(T, 3, H, W) uint8 or float -> float (T, 3, h, w) in [0, 1]; bilinear, antialiased when shrinking.

    uint8 clips are resized as uint8 in channels-last layout, torch's fast path (about 6x faster than
    float32 on the CPU); the rounding to 8 bits that this adds is below the precision of the source.
    """
    if tuple(clip.shape[-2:]) != tuple(size):
        shrinking = size[0] < clip.shape[-2] or size[1] < clip.shape[-1]
        if clip.dtype == torch.uint8:
            clip = clip.contiguous(memory_format=torch.channels_last)
        clip = F.interpolate(clip, size=tuple(size), mode="bilinear", align_corners=False, antialias=shrinking)
    return clip.float() / 255.0 if clip.dtype == torch.uint8 else clip.clamp(0.0, 1.0)


def normalize(clip):
    """float (T, 3, H, W) in [0, 1] -> (3, T, H, W) normalised with the ImageNet mean and std."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((clip - mean) / std).permute(1, 0, 2, 3).contiguous()


# VideoMAE's GroupMultiScaleCrop (more_fix_crop): 13 fixed places, in quarters of the free space (x, y)
_CROP_PLACES = ((0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3))


def multiscale_crop_box(height, width, scales=MULTISCALE_SCALES, generator=None):
    """(top, left, crop_h, crop_w): sides are scales x the short side, at most one scale step apart in
    aspect (VideoMAE's max_distort=1), placed at one of 13 fixed places; the crop is later resized square."""
    sides = [int(min(height, width) * s) for s in scales]
    pairs = [(h, w) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    crop_h, crop_w = pairs[int(torch.randint(len(pairs), (), generator=generator))]
    qx, qy = _CROP_PLACES[int(torch.randint(len(_CROP_PLACES), (), generator=generator))]
    return qy * ((height - crop_h) // 4), qx * ((width - crop_w) // 4), crop_h, crop_w


def train_transform(clip, img_size, generator=None, scales=MULTISCALE_SCALES):
    """Training augmentation: multi-scale crop, resize to img_size x img_size, random horizontal flip,
    normalise. uint8 (T, 3, H, W) -> float (3, T, img_size, img_size). scales=(1.0,): flip only."""
    top, left, crop_h, crop_w = multiscale_crop_box(clip.shape[-2], clip.shape[-1], scales, generator=generator)
    out = resize(clip[..., top:top + crop_h, left:left + crop_w], (img_size, img_size))
    if bool(torch.rand((), generator=generator) < 0.5):
        out = out.flip(-1)
    return normalize(out)


def eval_views(clip, img_size, num_crops):
    """Evaluation: resize the short side to img_size, then num_crops square crops spread evenly along the
    long side (one crop: the centre). uint8 (T, 3, H, W) -> [float (3, T, img_size, img_size)] * num_crops.
    Face clips are square, so their crops coincide, as they do in the release."""
    height, width = clip.shape[-2:]
    scale = img_size / min(height, width)
    long_side = max(img_size, round(max(height, width) * scale))
    size = (img_size, long_side) if height <= width else (long_side, img_size)
    out = resize(clip, size)
    free = max(size) - img_size
    offsets = [free // 2] if num_crops == 1 else [round(j * free / (num_crops - 1)) for j in range(num_crops)]
    if height <= width:
        return [normalize(out[..., :, o:o + img_size]) for o in offsets]
    return [normalize(out[..., o:o + img_size, :]) for o in offsets]


# -----------------------------------------------------------------------------------------------------
# 5. The dataset

MODES = ("pretrain", "train", "eval")
TASKS = ("classification", "regression")
MIN_TRIED_FOR_FAIL = 100  # below this many tried items, max_fail_fraction is measured against 100


class VideoDataset(torch.utils.data.Dataset):
    """Clips of the videos listed in an annotation file.

    mode "pretrain": (video float (k, 3, T, H, W), mask bool (k, N)), k = repeated_sampling clips taken
        from one decoded range of at most two windows, each with its own window, crop and flip; the mask
        is model.tube_mask for mask_cfg (default: SVFAPConfig(img_size, num_frames)). Labels are ignored.
    mode "train": (video (3, T, H, W), target); target is a 0-d int64 tensor (classification) or
        float32 (D,) (regression).
    mode "eval": (views (V, 3, T, H, W), target, index) with V = num_clips * num_crops (clip-major);
        index is the sample's position in the annotation file (its line index when there are no blank lines).
    crop_box = (top, bottom, left, right) is cut from every frame first (VoxCeleb2: VOXCELEB2_CROP_BOX).

    Broken files: in pretrain and train mode an unreadable sample is skipped with a warning and another
    random sample is taken; `skipped` and `tried` count them. When more than max_fail_fraction of the items
    tried fail (measured over at least 100 tries), it raises. The counts live in each DataLoader worker's
    copy of the dataset, so the fraction is per worker. Eval never skips: it raises naming the file.
    """

    def __init__(self, annotation_file, mode, img_size=160, num_frames=16, sampling_rate=4, crop_box=None,
                 root=None, replace_prefix=None, num_clips=2, num_crops=2, repeated_sampling=1, mask_cfg=None,
                 max_fail_fraction=0.05, task="classification", crop_scales=MULTISCALE_SCALES):
        if mode not in MODES:
            raise ValueError(f"VideoDataset: mode={mode!r}; valid modes: {MODES}")
        if task not in TASKS:
            raise ValueError(f"VideoDataset: task={task!r}; valid tasks: {TASKS}")
        for name, value in (("img_size", img_size), ("num_frames", num_frames), ("sampling_rate", sampling_rate),
                            ("num_clips", num_clips), ("num_crops", num_crops),
                            ("repeated_sampling", repeated_sampling)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VideoDataset: {name}={value!r} must be a positive integer")
        if repeated_sampling > 1 and mode != "pretrain":
            raise ValueError(f"VideoDataset: repeated_sampling={repeated_sampling} is for mode='pretrain' only")
        if not 0.0 <= max_fail_fraction < 1.0:
            raise ValueError(f"VideoDataset: max_fail_fraction={max_fail_fraction} must be in [0, 1)")
        if crop_box is not None and len(crop_box) != 4:
            raise ValueError(f"VideoDataset: crop_box={crop_box!r} must be (top, bottom, left, right)")
        if mode == "pretrain":
            mask_cfg = mask_cfg or SVFAPConfig(img_size=img_size, num_frames=num_frames)
            if (mask_cfg.img_size, mask_cfg.num_frames) != (img_size, num_frames):
                raise ValueError(f"VideoDataset: mask_cfg is for {mask_cfg.num_frames} frames of "
                                 f"{mask_cfg.img_size} px but the clips have {num_frames} frames of {img_size} px")
        self.annotation_file = os.fspath(annotation_file)
        self.mode, self.task = mode, task
        self.img_size, self.num_frames, self.sampling_rate = img_size, num_frames, sampling_rate
        self.crop_box = tuple(crop_box) if crop_box is not None else None
        self.num_clips, self.num_crops, self.repeated_sampling = num_clips, num_crops, repeated_sampling
        self.mask_cfg, self.max_fail_fraction = mask_cfg, max_fail_fraction
        self.crop_scales = tuple(crop_scales)
        rows = _parse_annotation_lines(annotation_file, root, replace_prefix)
        self.samples = [(p, v) for _, p, v in rows]
        self.line_numbers = [n for n, _, _ in rows]
        self.targets = None if mode == "pretrain" else self._targets(rows)
        self.skipped = 0  # broken files skipped so far (in this process)
        self.tried = 0  # items attempted in pretrain / train mode (in this process)

    def _targets(self, rows):
        """Checked once at start-up, so a bad label fails before training instead of in a worker."""
        targets = []
        for number, _, values in rows:
            where = f"{self.annotation_file}, line {number}"
            if self.task == "classification":
                if len(values) != 1 or not values[0].is_integer() or values[0] < 0:
                    raise ValueError(f"{where}: classification needs one integer class index >= 0 after the path, "
                                     f"got {values}")
                targets.append(torch.tensor(int(values[0]), dtype=torch.int64))
            else:
                if len(values) != len(rows[0][2]):
                    raise ValueError(f"{where}: {len(values)} regression values, but line {rows[0][0]} has "
                                     f"{len(rows[0][2])}; every line needs the same number")
                targets.append(torch.tensor(values, dtype=torch.float32))
        return targets

    def __len__(self):
        return len(self.samples)

    def _read_clips(self, path, choose):
        """[uint8 (T, 3, H, W)] for the clips that choose(total_frames) lists, read in one pass."""
        for attempt in range(2):
            total = count_frames(path, exact=False)
            clips = choose(total)
            try:
                frames = read_video_clip(path, [i for clip in clips for i in clip])
            except _FrameOutOfRange:
                if attempt:
                    raise
                continue  # the quick count was too high; the reader has replaced it with the decoded count
            frames = apply_crop_box(frames_to_tensor(frames), self.crop_box, path)
            return list(frames.split(self.num_frames))

    def _choose_training(self, total):
        span = window_span(self.num_frames, self.sampling_rate)
        length = min(total, span if self.repeated_sampling == 1 else 2 * span)  # one decoded range for all k
        first = random_clip_start(total, length)
        return [clip_indices(first + random_clip_start(length, span), self.num_frames, self.sampling_rate, total)
                for _ in range(self.repeated_sampling)]

    def _choose_eval(self, total):
        span = window_span(self.num_frames, self.sampling_rate)
        return [clip_indices(s, self.num_frames, self.sampling_rate, total)
                for s in uniform_clip_starts(total, span, self.num_clips)]

    def _training_item(self, index):
        path = self.samples[index][0]
        if self.mode == "pretrain":
            clips = self._read_clips(path, self._choose_training)
            video = torch.stack([train_transform(c, self.img_size, scales=self.crop_scales) for c in clips])  # (k, 3, T, H, W)
            return video, tube_mask(self.repeated_sampling, self.mask_cfg)
        clips = self._read_clips(path, self._choose_training)  # one random window: repeated_sampling is 1 here
        return train_transform(clips[0], self.img_size, scales=self.crop_scales), self.targets[index]

    def __getitem__(self, index):
        if self.mode == "eval":
            path = self.samples[index][0]
            try:
                clips = self._read_clips(path, self._choose_eval)
            except VideoReadError as e:
                raise VideoReadError(f"{e} [line {self.line_numbers[index]} of {self.annotation_file}; evaluation "
                                     f"never skips a sample: fix the file or remove the line]") from e
            views = [v for clip in clips for v in eval_views(clip, self.img_size, self.num_crops)]
            return torch.stack(views), self.targets[index], index  # (V, 3, T, H, W)
        while True:
            self.tried += 1
            try:
                return self._training_item(index)
            except VideoReadError as e:
                self.skipped += 1
                if self.skipped > self.max_fail_fraction * max(self.tried, MIN_TRIED_FOR_FAIL):
                    raise RuntimeError(
                        f"{self.skipped} of {self.tried} samples tried from {self.annotation_file} were unreadable, "
                        f"more than max_fail_fraction={self.max_fail_fraction}; last: {e}. Check the paths (root, "
                        f"replace_prefix) or raise max_fail_fraction") from e
                warnings.warn(f"skipping unreadable sample: {e} [{self.skipped} of {self.tried} tried so far "
                              f"in this process]", RuntimeWarning, stacklevel=2)
                if len(self.samples) > 1:  # another sample, never the one that just failed
                    index = (index + 1 + int(torch.randint(len(self.samples) - 1, ()))) % len(self.samples)


# -----------------------------------------------------------------------------------------------------
def write_mp4(path, frames, fps=25, codec="libx264", gop=None, options=None):
    """Write uint8 frames (H, W, 3), an array (T, H, W, 3) or any iterable, to an mp4 through PyAV: H.264 by
    default ("mpeg4" also works), one encoder thread so the same frames always give the same bytes.
    Written to a temporary file and renamed, so a crash never leaves a half-written video."""
    tmp = f"{path}.{os.getpid()}.part"
    with av.open(tmp, "w", format="mp4") as container:
        stream = None
        for frame in frames:
            if stream is None:  # the first frame gives the size
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = frame.shape[:2]
                stream.pix_fmt = "yuv420p"
                if gop:
                    stream.codec_context.gop_size = gop
                if codec == "libx264":
                    stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", **(options or {})}
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"write_mp4: no frames to write to {path}")
        for packet in stream.encode(None):
            container.mux(packet)
    os.replace(tmp, path)


# 6. Benchmark: `python data.py --bench`


def write_bench_video(path, seconds=20, fps=25, width=640, height=360, gop=50):
    """H.264 mp4 (x264 defaults: CRF 23, B-frames) with a keyframe every gop frames, drawn like web footage:
    a smooth background under a slow camera pan, a moving head-sized ellipse with detail, sensor noise."""
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.uniform(30, 220, (1, 3, 10, 24)).astype(np.float32))
    background = F.interpolate(coarse, size=(height + 40, 2 * width), mode="bicubic", align_corners=False)
    background = background[0].permute(1, 2, 0).numpy()  # (H + 40, 2W, 3), low-frequency "scene"
    detail = rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    noise = rng.normal(0, 2, (8, height, width, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)

    def frames():
        for t in range(seconds * fps):
            pan = int(t * width / (seconds * fps))
            img = background[20 + int(10 * np.sin(t / 30)):][:height, pan:pan + width].copy()
            cx, cy = width * (0.5 + 0.2 * np.sin(t / 23)), height * (0.5 + 0.1 * np.cos(t / 17))
            head = ((xx - cx) / (height / 5)) ** 2 + ((yy - cy) / (height / 3.5)) ** 2 < 1
            img[head] = np.array([190, 140, 120], np.float32) + detail[head]
            yield np.clip(img + noise[t % 8], 0, 255).astype(np.uint8)

    # x264 defaults (CRF 23, B-frames, 2 threads as a web encoder), keyframes on the gop only
    write_mp4(path, frames(), fps, gop=gop, options={"crf": "23", "threads": "2", "sc_threshold": "0"})


def bench(num_windows=64, train_items=20):
    """Print clips/s of the seeking reader vs decoding from the start, and of full training items."""
    torch.set_num_threads(1)  # "per worker": DataLoader workers run torch with one thread
    path = os.path.join(tempfile.gettempdir(), "svfap_bench_640x360_25fps_gop50.mp4")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        write_bench_video(path)
        print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    t0 = time.process_time()
    total = count_frames(path, exact=False)
    t_index = time.process_time() - t0
    keys = _cache_get(_stat_key(path)).key_positions
    print(f"{path}\n  640x360 H.264 (x264 veryfast, CRF 23, B-frames), {os.path.getsize(path) * 8e-6 / 20:.2f} Mbit/s, "
          f"{total} frames, a keyframe every {int(np.diff(keys).mean())} frames")
    print(f"  quick frame index (demux only, once per file and process): {t_index * 1e3:.1f} ms")
    print("one decoder thread per reader; clips per CPU-second of this process (the machine may be shared)")

    span = window_span(16, 4)
    gen = torch.Generator().manual_seed(0)
    windows = [clip_indices(random_clip_start(total, span, gen), 16, 4, total) for _ in range(num_windows)]

    def from_start(idx):  # decode every frame from frame 0 to the window's end; same RGB conversion
        clip = _Clip(path, idx)
        _scan_frames(path, clip, stop_after=max(idx))
        return clip.check_complete(total)

    def every_frame(idx):  # the seeking reader, also decoding the frames that nothing refers to
        global SKIP_NONREF
        SKIP_NONREF = False
        try:
            return read_video_clip(path, idx)
        finally:
            SKIP_NONREF = True

    readers = {"seeking reader": lambda idx: read_video_clip(path, idx),
               "seeking reader, decoding every frame": every_frame, "decoding from the start": from_start}
    cpu = dict.fromkeys(readers, 0.0)
    for idx in windows:  # interleave the readers so that load from other processes hits all alike
        clips = []
        for name, read in readers.items():
            t0 = time.process_time()
            clips.append(read(idx))
            cpu[name] += time.process_time() - t0
        if not all(np.array_equal(clips[0], c) for c in clips[1:]):
            raise AssertionError(f"the readers differ on frames {idx}")
    print(f"{num_windows} random 16x4 windows (frames identical in all readers):")
    for name in readers:
        print(f"  {name:40s} {num_windows / cpu[name]:6.2f} clips/s")
    ratio = cpu["decoding from the start"] / cpu["seeking reader"]
    print(f"  {'seeking / from the start':40s} {ratio:6.2f}x   (target >= 3x)")

    print(f"full items, img_size 160, per worker ({train_items} each):")
    clip = frames_to_tensor(read_video_clip(path, windows[0]))
    t0 = time.process_time()
    for _ in range(train_items):
        train_transform(clip, 160)
    print(f"  {'transform alone (16 x 640x360 -> 160)':40s} {train_items / (time.process_time() - t0):6.2f} clips/s")
    with tempfile.TemporaryDirectory() as tmp:
        listing = os.path.join(tmp, "bench.txt")
        with open(listing, "w") as f:
            f.write(f"{path} 0\n")
        for mode, first_visit in (("train", False), ("train", True), ("pretrain", False)):
            ds = VideoDataset(listing, mode, img_size=160)
            t0 = time.process_time()
            for _ in range(train_items):
                if first_visit:  # as on a dataset too large to revisit a file: the demux scan every time
                    _cache.clear()
                ds[0]
            what = f"{mode} item" + (", file's first visit" if first_visit else "")
            what += " + tube mask" if mode == "pretrain" else ""
            print(f"  {what:40s} {train_items / (time.process_time() - t0):6.2f} clips/s")


# -----------------------------------------------------------------------------------------------------
# 7. Demo dataset: `python data.py demo`. NOT NEEDED TO LEARN THE METHOD: this part only makes the
# synthetic demo data, face videos drawn procedurally with six dynamic expressions; a reader may skip it.
#
# The project's "shakespeare_char": real H.264 videos made on a laptop CPU in about a minute. Like aligned,
# face-cropped DFEW clips, each starts neutral and moves to an expression apex at a random onset; the head
# moves a little, the eyes blink, the camera is noisy. People differ in colour, shape and size of features,
# lighting and hair far more than in where the features sit: the tiny TPSBT trained from scratch learns from
# faces aligned within about a pixel (as after landmark alignment) and stays at chance for hundreds of steps
# when features jitter by several pixels. Every clip has its own np.random.default_rng([seed, stream, id]).

DEMO_CLASSES = ("happy", "sad", "angry", "surprise", "disgust", "fear")
DEMO_SIZE = 64           # frames are written at the tiny preset's img_size: no resize at load time
DEMO_FRAMES = 16         # the model's 16 frames at sampling rate 1: the clip is one window

# The expression apex of each class, as offsets from the neutral face: in face units (1 unit = ~42 px in a
# 64 px frame; eye_open and mouth_width relative) for the actions that move brows, lids and lips, and 0..1
# for the marks that action units leave on the skin and in the mouth (forehead lines AU1+2, brow_center AU1,
# glabella AU4, chin AU17, press AU24; wrinkles, cheeks, teeth). Each class has both, as real ones do.
DEMO_APEX = {
    "happy":    dict(smile=0.22, mouth_open=0.10, mouth_width=0.25, eye_open=-0.45, cheek=1.0, teeth_upper=1.0),
    "sad":      dict(brow_inner=0.18, brow_raise=-0.02, smile=-0.18, eye_open=-0.30, mouth_width=-0.10,
                     brow_center=1.0, chin=1.0),
    "angry":    dict(brow_raise=-0.10, brow_inner=-0.17, eye_open=-0.15, smile=-0.04, mouth_width=-0.25,
                     glabella=1.0, press=1.0),
    "surprise": dict(brow_raise=0.18, eye_open=0.65, mouth_open=0.34, mouth_width=-0.30, forehead=1.0),
    "disgust":  dict(brow_raise=-0.06, brow_inner=-0.07, nose_wrinkle=1.0, upper_lip=0.12, smile=-0.09,
                     eye_open=-0.35, teeth_upper=1.0),
    "fear":     dict(brow_raise=0.10, brow_inner=0.12, eye_open=0.55, mouth_open=0.16, mouth_width=0.30,
                     smile=-0.14, forehead=0.6, teeth_upper=1.0, teeth_lower=1.0),
}
# valence and arousal of each class at full intensity (Russell's circumplex, in [-1, 1])
DEMO_VA = {"happy": (0.8, 0.5), "sad": (-0.7, -0.4), "angry": (-0.6, 0.7),
           "surprise": (0.3, 0.8), "disgust": (-0.7, 0.2), "fear": (-0.7, 0.8)}

SKIN_LIGHT, SKIN_DARK = np.array([0.97, 0.82, 0.71]), np.array([0.33, 0.20, 0.13])
HAIR_COLORS = np.array([[0.07, 0.05, 0.04], [0.22, 0.13, 0.07], [0.42, 0.27, 0.13], [0.85, 0.70, 0.42],
                        [0.60, 0.24, 0.09], [0.62, 0.62, 0.62]])
IRIS_COLORS = np.array([[0.25, 0.14, 0.06], [0.12, 0.08, 0.05], [0.20, 0.40, 0.65], [0.25, 0.45, 0.25]])


# People and clips are plans, small dicts of numbers: cheap to make, rendered later.
def demo_identity(seed, identity):
    """The fixed appearance of one person: face shape, skin, hair, features, lighting, background."""
    r = np.random.default_rng([seed, 0, identity])
    skin = SKIN_LIGHT + (SKIN_DARK - SKIN_LIGHT) * r.uniform() + r.normal(0, 0.02, 3)
    hair = HAIR_COLORS[r.integers(len(HAIR_COLORS))] + r.normal(0, 0.03, 3)
    return dict(
        face_w=r.uniform(0.80, 0.90), face_h=r.uniform(1.02, 1.10),
        # a tight face crop as in DFEW: the face is zoomed so that brows to mouth fill the frame
        zoom=r.uniform(1.28, 1.32), center=(r.uniform(-0.01, 0.01), r.uniform(0.03, 0.05)),
        skin=skin, lips=skin * np.array([0.85, 0.55, 0.55]) + np.array([0.12, 0.0, 0.02]),
        hair=hair, bald=r.uniform() < 0.1, hairline=r.uniform(-1.15, -0.8),
        hair_side=r.uniform(-0.3, 0.5), fringe_curve=r.uniform(0.0, 0.35),
        eye_x=r.uniform(0.34, 0.36), eye_y=r.uniform(-0.19, -0.17),
        eye_rx=r.uniform(0.15, 0.18), eye_ry=r.uniform(0.075, 0.09),
        iris=IRIS_COLORS[r.integers(len(IRIS_COLORS))], iris_r=r.uniform(0.065, 0.08),
        brow_gap=r.uniform(0.135, 0.155), brow_thick=r.uniform(0.045, 0.06),
        brow_inner_x=r.uniform(0.12, 0.14), brow_len=r.uniform(0.29, 0.34), brow_arch=r.uniform(0.0, 0.05),
        brow_color=np.minimum(hair * 0.45 + 0.03, skin * 0.45),  # always darker than the skin
        nose_y=r.uniform(0.16, 0.19), nose_w=r.uniform(0.07, 0.11),
        mouth_y=r.uniform(0.49, 0.51), mouth_w=r.uniform(0.31, 0.36), lip_t=r.uniform(0.035, 0.05),
        light=np.array([r.uniform(-0.4, 0.4), r.uniform(-0.4, 0.0), 1.0]), ambient=r.uniform(0.55, 0.7),
        background=(r.uniform(0.15, 0.85, 3), r.uniform(0.15, 0.85, 3), r.uniform(0, 2 * np.pi)),
        blobs=[(r.uniform(-1, 1, 2), r.uniform(0.2, 0.5), r.uniform(0.1, 0.9, 3)) for _ in range(2)],
    )


def demo_clip_plan(seed, clip_id, identity, label, num_frames=DEMO_FRAMES):
    """The events of one clip: expression timing and intensity, head motion, blinks, gaze, noise; valence, arousal."""
    r = np.random.default_rng([seed, 1, clip_id])
    T = num_frames
    intensity, onset, rise = r.uniform(0.8, 1.0), r.uniform(0.05, 0.25) * T, r.uniform(0.10, 0.20) * T
    # smooth random head motion: a slow drift plus one oscillation per axis, about a pixel
    t = np.arange(T) / T
    def wobble(amplitude):
        return amplitude * (r.uniform(-1, 1) * t + 0.6 * np.sin(2 * np.pi * r.uniform(0.3, 1.2) * t
                                                                 + r.uniform(0, 2 * np.pi)))
    blinks = [r.uniform(0, T) for _ in range(r.poisson(0.8))]
    valence, arousal = (float(np.clip(m * intensity + r.normal(0, 0.08), -1, 1))
                        for m in DEMO_VA[DEMO_CLASSES[label]])
    return dict(
        identity=identity, label=label, intensity=intensity, onset=onset, rise=rise,
        dx=wobble(0.015), dy=wobble(0.012), roll=wobble(0.03), scale=1 + wobble(0.01),
        blinks=blinks, gaze=(r.uniform(-0.4, 0.4), r.uniform(-0.3, 0.3)),
        gain=r.uniform(0.9, 1.05), noise=r.uniform(0.01, 0.025), noise_seed=int(r.integers(2**31)),
        valence=valence, arousal=arousal,
    )


# Drawing: every shape is a mask over (T, S, S) computed in face coordinates: the coverage of each pixel,
# from its signed distance d to the shape's edge (negative inside), antialiased over aa.
def _soft(d, aa):
    return np.clip(0.5 - d / aa, 0, 1)


def _ellipse(X, Y, cx, cy, rx, ry, aa):  # approximate distance: normalised radius - 1, times the smaller radius
    return _soft((np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2) - 1) * np.minimum(rx, ry), aa)


def _paint(img, mask, color):
    """Alpha-composite color (3,) over img (3,T,S,S) with mask (T,S,S); channels first: inner loops run on rows."""
    for c in range(3):
        img[c] += mask * (np.float32(color[c]) - img[c])


def render_demo_clip(ident, plan, size=DEMO_SIZE, num_frames=DEMO_FRAMES):
    """Draw one clip: uint8 (T, S, S, 3)."""
    T, S, f32 = num_frames, size, np.float32
    col = lambda a: np.asarray(a, f32)[:, None, None]  # per-frame values (T,) -> (T,1,1)
    # pixel centres in frame units: [-1, 1] across the frame, y pointing down
    g = (np.arange(S, dtype=f32) + 0.5) / S * 2 - 1
    PX, PY = g[None, None, :], g[None, :, None]
    img = np.empty((3, T, S, S), f32)  # channels first while drawing

    # background: a still gradient plus two soft blobs (the camera does not move with the head)
    c0, c1, angle = ident["background"]
    ramp = (np.cos(angle) * PX + np.sin(angle) * PY) * 0.5 + 0.5                      # (1,S,S)
    img[:] = (c0[:, None, None, None] + (c1 - c0)[:, None, None, None] * ramp[None]).astype(f32)
    for (bx, by), br, bc in ident["blobs"]:
        _paint(img, 0.5 * _ellipse(PX, PY, bx, by, br, br, 0.3), bc)

    # head pose per frame -> face coordinates X, Y (T,S,S): rotate and scale the grid into the head's frame
    cx, cy = ident["center"]
    px, py = cx + col(plan["dx"]), cy + col(plan["dy"])
    cr, sr, sc = np.cos(col(plan["roll"])), np.sin(col(plan["roll"])), col(plan["scale"]) * ident["zoom"]
    X = (cr * (PX - px) + sr * (PY - py)) / sc
    Y = (-sr * (PX - px) + cr * (PY - py)) / sc
    aa = 2.0 / S / sc  # one pixel, in face units

    # back hair behind the face, neck below it, the face, and a fringe above a curved hairline
    fw, fh, skin = ident["face_w"], ident["face_h"], ident["skin"].astype(f32)
    if not ident["bald"]:
        _paint(img, _ellipse(X, Y, 0, -0.08, fw * 1.14, fh * 1.06, aa) * _soft(Y - ident["hair_side"], aa),
               ident["hair"])
    _paint(img, _soft(np.maximum(np.abs(X) - fw * 0.55, -Y), aa), skin * 0.8)
    face = _ellipse(X, Y, 0, 0, fw, fh, aa)
    _paint(img, face, skin)
    bare = face  # skin not covered by hair: where wrinkles can show
    if not ident["bald"]:
        fringe = face * _soft(Y - (ident["hairline"] + ident["fringe_curve"] * X ** 2), aa)
        _paint(img, fringe, ident["hair"])
        bare = face - fringe

    def region(x0, x1, y0, y1):  # X, Y, image, bare skin where the face box [x0,x1]x[y0,y1] is in any frame
        # small features are drawn on their own box only, which keeps rendering cheap
        corners = np.array([(x0, y0), (x0, y1), (x1, y0), (x1, y1)], f32)
        fx = px + sc * (cr * corners[:, 0] - sr * corners[:, 1])                  # (T,1,4)
        fy = py + sc * (sr * corners[:, 0] + cr * corners[:, 1])
        to_pixel = lambda v, lo: int(np.clip(np.floor((v + 1) / 2 * S - 0.5) + lo, 0, S))
        c = slice(to_pixel(fx.min(), -2), to_pixel(fx.max(), 3))
        r = slice(to_pixel(fy.min(), -2), to_pixel(fy.max(), 3))
        return X[:, r, c], Y[:, r, c], img[:, :, r, c], bare[:, r, c]

    # what moves, per frame (T,1,1): the actions rise from neutral at the onset to the apex (a smoothstep)
    # and hold; the eyes' opening follows the expression and closes over ~3 frames at each blink
    t = np.arange(T, dtype=f32)
    u = np.clip((t - plan["onset"]) / plan["rise"], 0, 1)
    e = plan["intensity"] * u * u * (3 - 2 * u)
    apex = DEMO_APEX[DEMO_CLASSES[plan["label"]]]
    act = {k: col(apex.get(k, 0.0) * e) for k in set().union(*DEMO_APEX.values())}
    blink = np.ones(T, f32)
    for b in plan["blinks"]:
        blink = np.minimum(blink, np.clip(np.abs(t - b) / 1.5, 0.05, 1))
    act["eye_opening"] = np.maximum(1 + act["eye_open"], 0.15) * col(blink)
    _upper_face(region, ident, plan, act, aa)
    _lower_face(region, ident, act, aa)

    # lighting: Lambertian shading of the face as a half ellipsoid, then camera gain and noise
    nx, ny = X / (fw * 1.1), Y / (fh * 1.1)
    nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0, 1))
    lx, ly, lz = ident["light"] / np.linalg.norm(ident["light"])
    shade = ident["ambient"] + (1 - ident["ambient"]) * np.clip(lx * nx + ly * ny + lz * nz, 0, 1) / lz
    shade = 1 + face * (np.minimum(shade, 1.15) - 1)
    img *= shade * plan["gain"]
    img += plan["noise"] * np.random.default_rng(plan["noise_seed"]).standard_normal(img.shape, dtype=f32)
    img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(1, 2, 3, 0))  # (3,T,S,S) -> (T,S,S,3)


def _upper_face(region, ident, plan, act, aa):
    """Forehead and glabella lines, raised cheeks with crow's feet, then each brow and eye."""
    ex_, ey, erx, ery = ident["eye_x"], ident["eye_y"], ident["eye_rx"], ident["eye_ry"]
    skin = ident["skin"].astype(np.float32)
    # forehead lines: long ones across (forehead), short ones in the middle (brow_center); they ride up
    # with the brows. Glabella: two vertical lines between the inner brow ends. Blank marks are skipped.
    y_brow = ey - ery - ident["brow_gap"] - act["brow_raise"]
    Xr, Yr, view, bare_r = region(-0.6, 0.6, ey - 0.75, ey - 0.05)
    for k in range(3 if act["forehead"].any() or act["brow_center"].any() else 0):
        y_line = y_brow - 0.08 - 0.05 * k - 0.08 * Xr ** 2
        across = _soft(np.maximum(np.abs(Yr - y_line) - 0.02, np.abs(Xr) - 0.5 + 0.05 * k), aa)
        middle = _soft(np.maximum(np.abs(Yr - y_line + 0.15 * Xr ** 2 - 0.03) - 0.02, np.abs(Xr) - 0.16), aa)
        _paint(view, bare_r * np.maximum(across * act["forehead"], middle * act["brow_center"]), skin * 0.4)
    for s in (-1, 1) if act["glabella"].any() else ():
        y_top = y_brow - act["brow_inner"] - 0.06
        line = _soft(np.maximum(np.abs(Xr - s * 0.05) - 0.02, np.maximum(y_top - Yr, Yr - y_top - 0.17)), aa)
        _paint(view, bare_r * line * act["glabella"], skin * 0.4)
    for s in (-1, 1) if act["cheek"].any() else ():
        # cheeks raised (happy): soft rosy bulges under the eyes
        ccx, ccy = s * (ex_ + 0.04), ey + 0.2
        Xr, Yr, view, _ = region(ccx - 0.25, ccx + 0.25, ccy - 0.18, ccy + 0.18)
        cheek = _ellipse(Xr, Yr, ccx, ccy, 0.16, 0.09, 0.08)
        _paint(view, 0.55 * cheek * act["cheek"], skin * np.array([1.0, 0.72, 0.72], np.float32))
        # crow's feet: three short lines fanning out from the outer eye corner
        ox_ = s * (ex_ + erx + 0.04)  # where the lines meet, just outside the eye
        Xr, Yr, view, _ = region(ox_ - 0.14, ox_ + 0.14, ey - 0.15, ey + 0.15)
        for slope in (-0.5, 0.0, 0.5):
            d = np.abs((Yr - ey) - slope * s * (Xr - ox_)) - 0.018
            _paint(view, act["cheek"] * _soft(np.maximum(d, np.abs(Xr - ox_ - s * 0.05) - 0.05), aa), skin * 0.4)

    for s in (-1, 1):
        # eyebrow: a tapered quadratic stroke from the inner to the outer end
        x_in, length = s * ident["brow_inner_x"], ident["brow_len"]
        x_out = x_in + s * length
        y_base = ey - ery - ident["brow_gap"]
        Xr, Yr, view, _ = region(min(x_in, x_out) - 0.08, max(x_in, x_out) + 0.08, y_base - 0.35, y_base + 0.25)
        y_in = y_base - act["brow_raise"] - act["brow_inner"]
        y_out = y_base - act["brow_raise"] + 0.2 * act["brow_inner"]
        u = (Xr - x_in) / (x_out - x_in)                                     # 0 inner end .. 1 outer end
        y_mid = y_in * (1 - u) + y_out * u - 4 * ident["brow_arch"] * u * (1 - u)
        thick = ident["brow_thick"] * (1.15 - 0.5 * u)
        ends = np.maximum(-u, u - 1) * length                                # distance beyond either end
        _paint(view, _soft(np.maximum(np.abs(Yr - y_mid) - thick, ends), aa), ident["brow_color"])

        # eye: sclera whose opening follows the expression and blinks; iris and pupil; dark lid outline
        ex = s * ex_
        Xr, Yr, view, _ = region(ex - erx - 0.05, ex + erx + 0.05, ey - 2 * ery - 0.05, ey + 2 * ery + 0.05)
        ry = np.maximum(ery * act["eye_opening"], 1e-3)
        d = (np.sqrt(((Xr - ex) / erx) ** 2 + ((Yr - ey) / ry) ** 2) - 1) * np.minimum(ry, erx)  # as _ellipse
        inside = _soft(d, aa)
        _paint(view, inside, (0.95, 0.95, 0.93))
        gx, gy = ex + plan["gaze"][0] * erx * 0.45, ey + plan["gaze"][1] * ery * 0.4
        _paint(view, inside * _ellipse(Xr, Yr, gx, gy, ident["iris_r"], ident["iris_r"], aa), ident["iris"])
        _paint(view, inside * _ellipse(Xr, Yr, gx, gy, 0.03, 0.03, aa), (0.02, 0.02, 0.02))
        # a ring around the opening, thicker on the upper lid: a closed eye becomes a dark line
        ring = _soft(np.abs(d) - 0.013 - 0.013 * (Yr < ey), aa)
        _paint(view, ring * _soft(np.abs(Xr - ex) - erx, aa), skin * 0.25)


def _lower_face(region, ident, act, aa):
    """The nose, then the mouth with its lips, teeth and chin."""
    ey, skin = ident["eye_y"], ident["skin"].astype(np.float32)
    # nose: a soft shadow along one side and nostrils; disgust wrinkles the bridge and lifts the nostrils
    ny = ident["nose_y"] - 0.05 * act["nose_wrinkle"]
    nw = ident["nose_w"] * (1 + 0.25 * act["nose_wrinkle"])
    Xr, Yr, view, _ = region(-0.2, 0.2, ey, ident["nose_y"] + 0.06)
    _paint(view, 0.35 * _soft(np.maximum(np.abs(Xr - 0.05) - 0.018, np.maximum(ey - Yr, Yr - ny)), aa), skin * 0.55)
    for s in (-1, 1):
        _paint(view, _ellipse(Xr, Yr, s * nw * 0.55, ny, 0.035, 0.022, aa), skin * 0.3)
    for k in range(3 if act["nose_wrinkle"].any() else 0):  # wrinkle lines across the bridge
        wy = ey + 0.06 + k * 0.055
        line = _soft(np.maximum(np.abs(Yr - wy - 0.2 * Xr ** 2) - 0.016, np.abs(Xr) - 0.12), aa)
        _paint(view, 0.9 * line * act["nose_wrinkle"], skin * 0.35)

    # mouth: the corners and both lips are curves over r = x / half-width
    my, mw0 = ident["mouth_y"], ident["mouth_w"]
    Xr, Yr, view, _ = region(-1.4 * mw0 - 0.08, 1.4 * mw0 + 0.08, my - 0.35, my + 0.35)
    mw = mw0 * (1 + act["mouth_width"])
    r = Xr / mw
    bowl = np.clip(1 - r ** 2, 0, 1)
    corner = my - act["smile"] * r ** 2                                      # y of the lip contact line
    top = corner - (0.35 * act["mouth_open"] + act["upper_lip"]) * bowl       # inner edge, upper lip
    bottom = corner + 0.65 * act["mouth_open"] * bowl                         # inner edge, lower lip
    sides = (np.abs(r) - 1) * mw                                              # distance beyond a corner
    gap = np.maximum((bottom - top) / 2, 0.012)                               # closed lips: a dark line
    mid = (top + bottom) / 2
    # lip thickness: pressed lips thin out (press), a pouting lower lip thickens (chin)
    lip_t = ident["lip_t"] * np.sqrt(bowl) * (1 - 0.7 * act["press"]) * (1 + 0.8 * act["chin"] * (Yr > mid))
    _paint(view, _soft(np.maximum(np.abs(Yr - mid) - gap - lip_t * 0.9, sides), aa), ident["lips"])
    mouth = _soft(np.maximum(np.abs(Yr - mid) - gap, sides), aa)
    _paint(view, mouth, (0.25, 0.05, 0.06))
    teeth = np.maximum(act["teeth_upper"] * _soft(np.maximum(top - Yr, Yr - (top + 0.05)), aa),
                       act["teeth_lower"] * _soft(np.maximum(bottom - 0.045 - Yr, Yr - bottom), aa))
    _paint(view, mouth * teeth, (0.93, 0.92, 0.86))
    for k in range(5 if act["chin"].any() else 0):  # dimples of a raised chin under the pouting lip
        dot = _ellipse(Xr, Yr, (k - 2) * 0.06, my + 0.17 + 0.02 * (k - 2) ** 2 / 4, 0.022, 0.022, aa)
        _paint(view, 0.9 * dot * act["chin"], skin * 0.4)


def demo_splits(seed=0, train_per_class=50, eval_per_class=20, pretrain_factor=10, clips_per_identity=2):
    """The plan of the whole dataset: {split: [(clip_id, identity, label), ...]}, labels balanced in every
    split. Train and pretrain (distinct clips) draw people from one pool (a person may appear in both, as in
    any unlabeled crawl); val and test each get their own people, disjoint from all others."""
    n_classes = len(DEMO_CLASSES)
    r = np.random.default_rng([seed, 2])
    n_train, n_eval = train_per_class * n_classes, eval_per_class * n_classes
    sizes = {"train": n_train, "val": n_eval, "test": n_eval, "pretrain": pretrain_factor * n_train}
    splits, clip_id, next_identity = {}, 0, 0
    pool_size = (sizes["pretrain"] + n_train) // clips_per_identity // 2
    for name, n in sizes.items():
        labels = r.permutation(np.arange(n) % n_classes)
        if name == "train":
            ids = np.arange(n) // clips_per_identity                       # identities 0 .. n/cpi - 1
        elif name == "pretrain":
            ids = r.integers(0, pool_size, n)                              # shared pool, overlaps train
        else:
            ids = pool_size + next_identity + np.arange(n) // clips_per_identity
            next_identity += n // clips_per_identity + 1
        splits[name] = [(clip_id + i, int(ids[i]), int(labels[i])) for i in range(n)]
        clip_id += n
    return splits


def ten_percent(train, seed=0):
    """A class-balanced 10% of the train split (same number of clips from each class)."""
    r = np.random.default_rng([seed, 3])
    per_class = max(1, len(train) // 10 // len(DEMO_CLASSES))
    chosen = []
    for c in range(len(DEMO_CLASSES)):
        items = [item for item in train if item[2] == c]
        chosen += [items[i] for i in sorted(r.choice(len(items), per_class, replace=False))]
    return sorted(chosen)


def _make_clip(out, seed, clip_id, identity, label, size, num_frames):
    """Worker: render and write one clip; returns its valence and arousal."""
    plan = demo_clip_plan(seed, clip_id, identity, label, num_frames)
    clip = render_demo_clip(demo_identity(seed, identity), plan, size, num_frames)
    # asm=0: x264's SIMD kernels (AVX-512 here) gave other bytes in 1 of ~20 clips when two encoders ran at
    # once (measured; AVX2 and lower, and plain C, never did); its C code gives the same bytes on any CPU.
    write_mp4(os.path.join(out, "videos", f"{clip_id:05d}.mp4"), clip, options={"x264-params": "asm=0"})
    return plan["valence"], plan["arousal"]


def write_class_picture(path, seed=0, size=DEMO_SIZE, num_frames=DEMO_FRAMES, columns=4, people=3, magnify=2):
    """The README's picture, a PNG written with PyAV's encoder (no PIL): one row per class (in label order);
    for each of `people` people (from light to dark skin) `columns` frames from neutral to apex."""
    candidates = [demo_identity(seed + 1000, i) for i in range(30)]
    order = np.argsort([-c["skin"].sum() for c in candidates])
    chosen = [int(order[round(k * (len(order) - 1) / max(people - 1, 1))]) for k in range(people)]
    rows = []
    for label in range(len(DEMO_CLASSES)):
        tiles = []
        for p in chosen:
            plan = demo_clip_plan(seed + 1000, label * 100 + p, p, label, num_frames)
            plan.update(onset=0.1 * num_frames, rise=0.4 * num_frames, intensity=1.0, blinks=[])
            clip = render_demo_clip(candidates[p], plan, size, num_frames)
            frames = np.linspace(0, num_frames - 1, columns).round().astype(int)
            tiles += [np.pad(clip[i], ((1, 1), (1, 1), (0, 0)), constant_values=255) for i in frames]
            tiles.append(np.full((size + 2, 6, 3), 255, np.uint8))
        rows.append(np.concatenate(tiles[:-1], axis=1))
    picture = np.concatenate(rows, axis=0).repeat(magnify, 0).repeat(magnify, 1)
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = picture.shape[1], picture.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")) + codec.encode(None)
    with open(path, "wb") as f:
        f.write(b"".join(bytes(p) for p in packets))


def make_demo_dataset(out="data/demo", seed=0, train_per_class=50, eval_per_class=20, pretrain_factor=10,
                      size=DEMO_SIZE, num_frames=DEMO_FRAMES, workers=min(2, os.cpu_count() or 1), verbose=True):
    """Write the demo dataset to `out` and return {list name: number of lines}."""
    t0 = time.time()
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    splits = demo_splits(seed, train_per_class, eval_per_class, pretrain_factor)
    jobs = [(out, seed, cid, ident, label, size, num_frames) for items in splits.values()
            for cid, ident, label in items]  # clip ids 0, 1, 2, ...: va[clip_id] below
    with multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
        va = pool.starmap(_make_clip, jobs, chunksize=16)

    path = lambda cid: f"videos/{cid:05d}.mp4"
    labelled = lambda items: [f"{path(c)} {y}" for c, _, y in items]
    lists = {"pretrain.txt": [f"{path(c)} 0" for c, _, _ in splits["pretrain"]],
             "pretrain_true_labels.txt": labelled(splits["pretrain"]),
             "train_10pct.txt": labelled(ten_percent(splits["train"], seed))}
    for name in ("train", "val", "test"):
        lists[f"{name}.txt"] = labelled(splits[name])
        lists[f"regression_{name}.txt"] = [f"{path(c)} {va[c][0]:.4f} {va[c][1]:.4f}" for c, _, _ in splits[name]]
    lists["classes.txt"] = list(DEMO_CLASSES)
    for name, lines in lists.items():
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    write_class_picture(os.path.join(out, "classes.png"), seed, size, num_frames)
    sizes = {name: len(lines) for name, lines in lists.items()}
    if verbose:
        print(f"demo: wrote {len(jobs)} clips of {num_frames}x{size}x{size} to {out} in {time.time() - t0:.1f}s")
        print("demo: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return sizes


def demo_main(argv):
    """python data.py demo [--out=data/demo] [--seed=0] [--train_per_class=50] [--eval_per_class=20]
    [--pretrain_factor=10] [--size=64] [--num_frames=16] [--workers=2]: make_demo_dataset's arguments."""
    valid = ("out", "seed", "train_per_class", "eval_per_class", "pretrain_factor", "size", "num_frames", "workers")
    args = {}
    for arg in argv:
        key, sep, value = arg[2:].partition("=")
        if not arg.startswith("--") or not sep or key not in valid:
            raise SystemExit(f"demo: unknown argument {arg!r}; valid: " + " ".join(f"--{k}=" for k in valid))
        args[key] = value if key == "out" else int(value)
    return make_demo_dataset(**args)


# -----------------------------------------------------------------------------------------------------
# command line

if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["demo"]:
        demo_main(args[1:])
    elif args == ["--bench"]:
        bench()
    else:
        print("usage: python data.py --bench | python data.py demo [--out=data/demo] [--seed=0]", file=sys.stderr)
        sys.exit(2)
