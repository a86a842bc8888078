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


def train_transform(clip, img_size, generator=None):
    """Training augmentation: multi-scale crop, resize to img_size x img_size, random horizontal flip,
    normalise. uint8 (T, 3, H, W) -> float (3, T, img_size, img_size)."""
    top, left, crop_h, crop_w = multiscale_crop_box(clip.shape[-2], clip.shape[-1], generator=generator)
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
                 max_fail_fraction=0.05, task="classification"):
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
            video = torch.stack([train_transform(c, self.img_size) for c in clips])  # (k, 3, T, H, W)
            return video, tube_mask(self.repeated_sampling, self.mask_cfg)
        clips = self._read_clips(path, self._choose_training)  # one random window: repeated_sampling is 1 here
        return train_transform(clips[0], self.img_size), self.targets[index]

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
    tmp = path + ".part"
    with av.open(tmp, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.codec_context.options = {"preset": "veryfast", "sc_threshold": "0"}  # keyframes on the gop only
        for t in range(seconds * fps):
            pan = int(t * width / (seconds * fps))
            img = background[20 + int(10 * np.sin(t / 30)):][:height, pan:pan + width].copy()
            cx, cy = width * (0.5 + 0.2 * np.sin(t / 23)), height * (0.5 + 0.1 * np.cos(t / 17))
            head = ((xx - cx) / (height / 5)) ** 2 + ((yy - cy) / (height / 3.5)) ** 2 < 1
            img[head] = np.array([190, 140, 120], np.float32) + detail[head]
            img = np.clip(img + noise[t % 8], 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


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


# ---- demo dataset ----
# `python data.py demo [--out=data/demo] [--seed=0]`. The generator is written in _demo_part.py for now;
# merging it means pasting that file's body here and deleting this stub.


def demo_main(argv):
    try:
        from _demo_part import demo_main as _demo_main
    except ModuleNotFoundError as e:
        if e.name != "_demo_part":
            raise
        raise SystemExit("data.py demo: the demo generator (_demo_part.py) is not in this folder") from None
    return _demo_main(argv)


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
