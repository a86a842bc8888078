"""
Data for SVFAP: from face videos on disk to clips on the device. Sections: 1. annotation files, 2. reading frames,
3. sampling, 4. transforms, 5. VideoDataset, 6. tools (atomic writes, mp4 files, prepare, bench), 7. the demo dataset.

Frame i is the i-th frame a full sequential decode of the first video stream (not cover art) outputs. Opening reads
packets undecoded; their headers give a quick pts and keyframe index (never container frame counts). A read decodes
from the last keyframe at or before the first wanted frame, checking frame pts against the index (gaps only where
skip_frame="NONREF" skipped unwanted frames); a mismatch or untrusted packet pts makes it decode all packets in order
as the truth. Left open: a packet decoding to nothing where no read decodes shifts later positions.
"""

import contextlib
import gc
import hashlib
import json
import math
import multiprocessing
import os
import re
import stat
import sys
import tempfile
import threading
import time
import warnings

import av
import numpy as np
import torch
from tqdm import tqdm

from model import IMAGENET_MEAN, IMAGENET_STD, SVFAPConfig, tube_mask

# -----------------------------------------------------------------------------------------------------
# 1. Annotation files: the split files, "<path> <label>" or "<path> <v1> ... <vD>"

NUMBER = r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?"  # what float() reads, less nan and inf


class AnnotationList:
    """An annotation file's entries as numpy arrays (paths as written in one bytes buffer, line numbers, values), not
    one Python object each (a DataLoader worker touching those copies their pages). path(i) joins `root` after
    replace_prefix=(old, new) swaps a leading old: the authors' lists (/data/ycs/AC/Dataset/DFEW/...) work."""

    def __init__(self, path, root=None, replace_prefix=None):
        self.replace_prefix = replace_prefix
        self.base = root if root is not None else os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:  # OSError's message names the file and the reason; bytes: paths as on disk
            lines = f.read().splitlines()
        gc.disable()  # a million short-lived lists: the collector would scan them over and over (5x the time)
        fields = [line.split() for line in lines]
        gc.enable()
        per_line = np.fromiter(map(len, fields), np.int64, len(fields))
        self.line_numbers, fields = np.flatnonzero(per_line).astype(np.int32) + 1, [f for f in fields if f]
        if not fields:
            raise ValueError(f"annotation file {path} holds no samples")
        names, texts = [f[0] for f in fields], [v for f in fields for v in f[1:]]
        if bad := {v for v in set(texts) if not re.fullmatch(NUMBER.encode(), v)}:
            number, value = next((n, v) for n, f in zip(self.line_numbers, fields) for v in f[1:] if v in bad)
            raise ValueError(f"{path}, line {number}: {os.fsdecode(value)!r} is not a number; expected '<path> "
                             f"<label>' or '<path> <v1> ... <vD>' separated by spaces (paths cannot contain spaces)")
        self.values = np.fromiter(map(float, texts), np.float64, len(texts))
        self.value_ends = np.concatenate([[0], np.cumsum(per_line[per_line > 0] - 1)])  # line i: ends[i]:ends[i+1]
        self.text = np.frombuffer(b"".join(names), np.uint8)
        self.text_ends = np.concatenate([[0], np.cumsum(np.fromiter(map(len, names), np.int64, len(names)))])

    def __len__(self):
        return len(self.line_numbers)

    def path(self, i):
        sample = os.fsdecode(self.text[self.text_ends[i]:self.text_ends[i + 1]].tobytes())
        if self.replace_prefix is not None and sample.startswith(self.replace_prefix[0]):
            sample = self.replace_prefix[1] + sample[len(self.replace_prefix[0]):]
        return os.path.join(self.base, sample)  # absolute paths stay

    def line_number(self, i):
        return int(self.line_numbers[i])

    def line_values(self, i):
        return self.values[self.value_ends[i]:self.value_ends[i + 1]]


# -----------------------------------------------------------------------------------------------------
# 2. Reading frames: the exact frames of any video PyAV decodes, or of a folder of frame images

class VideoReadError(RuntimeError):
    """A video or frame folder that cannot be read; the message names the file and the reason."""


class _FrameOutOfRange(VideoReadError):
    """A requested frame index is not below the number of frames the file decodes to."""


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
# FFmpeg's own decoders apply skip_frame to the packet sent; queueing wrappers (libdav1d) misapply it: caught, no gain
SKIP_NONREF_DECODERS = ("h264", "hevc", "mpeg4", "mpeg2video", "mpeg1video", "vp8", "vp9")
ATTACHED_PIC = 0x400  # AV_DISPOSITION_ATTACHED_PIC: a video stream that is cover art
_thread_state = threading.local()  # per thread: swscale contexts, reused from frame to frame
_SWSCALE_THREADS = {"threads": 1} if int(av.__version__.split(".")[0]) >= 14 else {}  # PyAV < 14: no option


def _swscale(name, frame, **kw):
    """frame.reformat(**kw).to_ndarray() through this thread's VideoReformatter `name`, with one swscale thread."""
    if not hasattr(_thread_state, name):
        setattr(_thread_state, name, av.video.reformatter.VideoReformatter())
    return getattr(_thread_state, name).reformat(frame, **kw, **_SWSCALE_THREADS).to_ndarray()


def _scaled_size(height, width, size):
    """size (h, w) as it is; an int: the short side scaled to it (evaluation); None: (height, width)."""
    if not isinstance(size, int):
        return tuple(size or (height, width))
    scale = size / min(height, width)
    return (size, max(size, round(width * scale))) if height <= width else (max(size, round(height * scale)), size)


class _Clip:
    """One read: RGB frames, crop_box cut out and scaled to `size` (_scaled_size), stacked to uint8 (T, h, w, 3)."""

    def __init__(self, path, indices, crop_box=None, size=None):
        self.indices = [int(i) for i in indices]
        if not self.indices or min(self.indices) < 0:
            raise ValueError(f"{path}: frame indices must be a non-empty list of integers >= 0, got {self.indices}")
        self.path, self.crop_box, self.size = path, crop_box, size
        self.wanted, self.frames = sorted(set(self.indices)), {}  # frame position -> its RGB array

    def _rgb(self, frame, source):
        top, bottom, left, right = self.crop_box or (0, frame.height, 0, frame.width)
        if not (0 <= top < bottom <= frame.height and 0 <= left < right <= frame.width):
            raise VideoReadError(f"{source}: crop_box (top, bottom, left, right)={tuple(self.crop_box)} does not "
                                 f"fit its {frame.width}x{frame.height} frames (needs 0 <= top < bottom <= "
                                 f"{frame.height}, 0 <= left < right <= {frame.width})")
        h, w = _scaled_size(bottom - top, right - left, self.size)
        if self.crop_box is None:  # scaled while converting
            return _swscale("convert", frame, width=w, height=h, format="rgb24")
        rgb = np.ascontiguousarray(_swscale("convert", frame, format="rgb24")[top:bottom, left:right])
        scaled = (h, w) != rgb.shape[:2]
        return _swscale("scale", av.VideoFrame.from_ndarray(rgb, "rgb24"), width=w, height=h) if scaled else rgb

    def put(self, position, frame, source=None):
        rgb = self._rgb(frame, source or self.path)
        other = next(iter(self.frames.values()), rgb)
        if rgb.shape != other.shape:
            raise VideoReadError(f"{source or self.path}: frame {position} is {rgb.shape[1]}x{rgb.shape[0]}, other "
                                 f"frames of the clip are {other.shape[1]}x{other.shape[0]}")
        self.frames[position] = rgb

    def check_complete(self, num_frames):
        if missing := [i for i in self.wanted if i not in self.frames]:
            raise _FrameOutOfRange(f"{self.path}: frame {missing[0]} requested but the video has {num_frames} "
                                   f"frames (valid indices 0..{num_frames - 1})")
        return np.stack([self.frames[i] for i in self.indices])  # an index asked for twice appears twice


def _quick_index(packets):
    """(pts of frames 0..n-1, keyframe positions) from packet headers, or None when they cannot be trusted."""
    if any(p.pts is None or p.is_corrupt or p.is_discard for p in packets):
        return None
    pts = np.sort(np.array([p.pts for p in packets], dtype=np.int64))
    return pts, np.searchsorted(pts, np.sort(np.array([p.pts for p in packets if p.is_keyframe], dtype=np.int64)))


class _Video:
    """An open video file: its stream's packets in memory (decode order) and the index of its frames."""

    def __init__(self, path, container):
        streams = [s for s in container.streams.video if not getattr(s, "disposition", 0) & ATTACHED_PIC]
        if not streams:
            kinds = ", ".join(s.type for s in container.streams) or "none"
            raise VideoReadError(f"{path}: no video stream (streams: {kinds})")
        self.path, self.context, self.exact = path, streams[0].codec_context, False  # exact: from a full decode
        self.context.thread_count = 1  # DataLoader workers are the parallelism; more would oversubscribe the cores
        self.packets = [p for p in container.demux(streams[0]) if p.size > 0]  # size 0: the closing flush packet
        self._set_index(*(_quick_index(self.packets) or ([], [])))

    def _set_index(self, pts, keys):
        """Frames 0..n-1 carry pts; reads seek if these increase and frame 0 is a keyframe, else decode all in order."""
        self.count = len(pts)
        self.seekable = len(keys) > 0 and keys[0] == 0 and None not in pts and all(b > a for a, b in zip(pts, pts[1:]))
        if self.seekable:
            self.pts, self.keys = np.array(pts, dtype=np.int64), np.array(keys, dtype=np.int64)
            self.position = {int(p): i for i, p in enumerate(pts)}  # pts -> frame position
            self.packet_of = {p.pts: j for j, p in enumerate(self.packets)}  # pts -> packet number

    def frame_count(self, exact=True):
        """Frames of a full sequential decode; exact=False: the quick count from packet headers when trusted."""
        if not (self.seekable or self.exact) or (exact and not self.exact):
            self._decode_in_order()
        return self.count

    def _frames(self, start, wanted=()):
        """Frames decoded from packet `start` on; unwanted ones go with skip_frame="NONREF" into self.skipped (the
        decoder drops those no frame refers to: about half of x264's B-frames)."""
        context, self.skipped = self.context, set()
        context.flush_buffers()
        may_skip = bool(wanted) and context.name in SKIP_NONREF_DECODERS
        for packet in self.packets[start:]:
            position = self.position.get(packet.pts) if may_skip else None
            if position is not None and position not in wanted:
                self.skipped.add(position)
            context.skip_frame = "NONREF" if position in self.skipped else "DEFAULT"
            yield from context.decode(packet)
        context.skip_frame = "DEFAULT"
        yield from context.decode(None)

    def _decode_in_order(self, clip=None):
        """Decode every packet from the first, filling clip; the result becomes the (exact) index."""
        pts = []
        for frame in self._frames(0):
            if clip is not None and len(pts) in clip.wanted:
                clip.put(len(pts), frame)
            pts.append(frame.pts)
        if not pts:
            raise VideoReadError(f"{self.path}: the video stream decodes to no frames")
        key_pts = {p.pts for p in self.packets if p.is_keyframe}
        self._set_index(pts, [i for i, p in enumerate(pts) if p in key_pts])
        self.exact = True

    def _read_seeking(self, clip):
        """Fill clip decoding from keyframes; False when the decoder contradicts the index."""
        position = -math.inf  # nothing decoded yet
        for wanted in clip.wanted:
            key = int(self.keys[np.searchsorted(self.keys, wanted, "right") - 1])
            if key > position + 1:  # a keyframe lies between here and the wanted frame: start from it
                decoded = self._frames(self.packet_of[int(self.pts[key])], clip.wanted)
                # the first frame not before the keyframe must be it (leading frames of an open GOP come before)
                frame = next((f for f in decoded if self.position.get(f.pts, math.inf) >= key), None)
                if frame is None or self.position.get(frame.pts) != key:
                    return False
                position = key
            while position != wanted:  # decode forward, checking that every frame is where the index says
                frame = next(decoded, None)
                nxt = None if frame is None else self.position.get(frame.pts)
                if nxt is None or nxt <= position or any(p not in self.skipped for p in range(position + 1, nxt)):
                    return False
                position = nxt
            clip.put(position, frame)
        return True

    def read(self, indices, crop_box=None, size=None):
        """uint8 (T, h, w, 3): the frames at indices (any order, repeats ok); see _Clip for crop_box and size."""
        clip = _Clip(self.path, indices, crop_box, size)
        seeking = self.seekable and clip.wanted[-1] < self.count and self._read_seeking(clip)
        if not seeking and not (self.exact and clip.wanted[-1] >= self.count):  # else nothing to decode: out of range
            clip.frames.clear()
            self._decode_in_order(clip)  # the quick index was wrong, counts too few frames, or is untrusted
        return clip.check_complete(self.count)


class _Folder:
    """A folder of frame images in natural name order (frame_2 before frame_10), each decoded with PyAV."""

    def __init__(self, path, names):
        natural = lambda name: [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]
        self.path, self.names = path, sorted((n for n in names if not n.startswith(".")
                                              and n.lower().endswith(IMAGE_EXTENSIONS)), key=natural)
        if not self.names:
            raise VideoReadError(f"{path}: folder holds no frame images ({', '.join(IMAGE_EXTENSIONS)})")

    def frame_count(self, exact=True):
        return len(self.names)

    def read(self, indices, crop_box=None, size=None):
        clip = _Clip(self.path, indices, crop_box, size)
        for i in (i for i in clip.wanted if i < len(self.names)):
            image = os.path.join(self.path, self.names[i])
            try:
                with av.open(image, metadata_errors="ignore") as container:
                    frame = next(container.decode(video=0), None)
                    if frame is None:
                        raise VideoReadError(f"{image}: the image holds no picture")
                    clip.put(i, frame, source=image)
            except av.error.FFmpegError as e:
                raise VideoReadError(f"{image}: cannot decode the image ({e.strerror or e})") from e
        return clip.check_complete(len(self.names))


@contextlib.contextmanager
def open_video(path):
    """A video file or a folder of frame images, opened once: .frame_count(exact) and .read(indices, crop_box, size)."""
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
        names = os.listdir(path) if stat.S_ISDIR(mode) else None  # a folder that cannot be listed is unreadable
    except OSError as e:
        reason = "no such file or folder" if isinstance(e, FileNotFoundError) else f"cannot access it ({e.strerror})"
        raise VideoReadError(f"{path}: {reason}") from None
    if stat.S_ISDIR(mode):
        yield _Folder(path, names)
        return
    if not stat.S_ISREG(mode):
        raise VideoReadError(f"{path}: not a regular file or a folder (a pipe or device could block forever)")
    try:
        # skip_frame=all stops the probing decoders (not ours) decoding a keyframe just to learn the pixel format
        container = av.open(path, metadata_errors="ignore", options={"skip_frame": "all"})
    except av.error.FFmpegError as e:
        raise VideoReadError(f"{path}: not a readable video ({e.strerror or e})") from e
    with container:
        try:
            yield _Video(path, container)
        except av.error.FFmpegError as e:
            raise VideoReadError(f"{path}: decoding failed ({type(e).__name__}: {e.strerror or e})") from e


def _read_chosen(path, choose, crop_box=None, size=None):
    """The frames at choose(frame count) of path; chosen again with the decoded count if the quick one was too high."""
    with open_video(path) as video:
        try:
            return video.read(choose(video.frame_count(exact=False)), crop_box, size)
        except _FrameOutOfRange:  # the read has replaced the quick count by the decoded one
            return video.read(choose(video.frame_count()), crop_box, size)


def read_video_clip(path, frame_indices):
    """uint8 (T, H, W, 3) RGB: the frames a full sequential decode gives at frame_indices (any order, repeats
    ok). path is a video file or a folder of frame images (.jpg .jpeg .png .bmp). Raises VideoReadError."""
    with open_video(path) as video:
        return video.read(frame_indices)


# -----------------------------------------------------------------------------------------------------
# 3. Sampling: which frame indices make a clip (train: a random window; eval: N uniform ones)

def clip_indices(start, num_frames, sampling_rate, total):
    """start, start + rate, ...; past the last frame the last frame repeats: a short video keeps the stride, so
    motion runs at the speed of every other clip (VideoMAE's loader, which the release builds on, pads so too)."""
    return [min(start + i * sampling_rate, total - 1) for i in range(num_frames)]


def random_clip_start(total, span, generator=None):
    """Training: a uniformly random window that fits (0 when the video is shorter than the window)."""
    return int(torch.randint(max(total - span, 0) + 1, (), generator=generator))


def uniform_clip_starts(total, span, num_clips):
    """Evaluation: num_clips windows spread evenly from the first to the last possible start."""
    last = max(total - span, 0)
    return [last // 2] if num_clips == 1 else [round(j * last / (num_clips - 1)) for j in range(num_clips)]


# -----------------------------------------------------------------------------------------------------
# 4. Transforms: workers cut and scale (_Clip) and draw multi-scale crops and flips, which device_transform applies

MULTISCALE_SCALES = (1.0, 0.875, 0.75, 0.66)
VOXCELEB2_CROP_BOX = (0, 160, 32, 192)  # rows 0-160, columns 32-192 of a 224x224 frame: the face
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


def eval_crops(clip, img_size, num_crops):
    """uint8 (T, 3, h, w) whose short side is img_size -> [(T, 3, img_size, img_size)] * num_crops, spread along
    the long side as clips are along a video. Face clips are square: crops coincide, as in the release."""
    long = -1 if clip.shape[-2] <= clip.shape[-1] else -2
    return [clip.narrow(long, o, img_size) for o in uniform_clip_starts(clip.shape[long], img_size, num_crops)]


def _bilinear_taps(start, length, size):
    """F.interpolate's bilinear sampling (align_corners=False) of `size` outputs from [start, start + length)
    of each clip: the two source rows (or columns) of every output, (B, size) each, and the second's weight."""
    src = ((torch.arange(size, device=start.device) + 0.5) * (length.float() / size).unsqueeze(1) - 0.5).clamp(min=0)
    lo = src.long()  # floor: src >= 0
    hi = torch.minimum(lo + 1, length.unsqueeze(1) - 1)
    return start.unsqueeze(1) + lo, start.unsqueeze(1) + hi, src - lo


def device_transform(frames, boxes, img_size):
    """uint8 frames (..., T, 3, H, W) -> float32 (..., 3, T, img_size, img_size): each clip's box (..., 5) = (top, left,
    height, width, flip) cut out, resized like F.interpolate (bilinear, align_corners=False), mirrored if flip, scaled
    to [0, 1], ImageNet-normalised; boxes=None (eval views): only the last two. Batched: no per-clip loop or host sync.
    The release does this in workers, sending float32 (docs/release.md, difference 6): equal up to 8-bit rounding, but
    it scales a source over img_size (DFEW's 256 px) first: a 0.66 crop is upsampled from 105 px, not cut from 168."""
    lead, (T, C, H, W), S = frames.shape[:-4], frames.shape[-4:], img_size
    x = frames.reshape(-1, T, C, H, W).transpose(1, 2)  # (B, 3, T, H, W), a view
    if boxes is not None:
        B = x.shape[0]
        top, left, height, width, flip = boxes.reshape(B, 5).unbind(1)
        y0, y1, wy = _bilinear_taps(top, height, S)
        x0, x1, wx = (torch.where(flip.bool().unsqueeze(1), t.flip(1), t) for t in _bilinear_taps(left, width, S))
        rows = lambda i: x.gather(3, i.view(B, 1, 1, S, 1).expand(B, C, T, S, W)).float()  # (B, 3, T, S, W)
        x = rows(y0) * (1 - wy).view(B, 1, 1, S, 1) + rows(y1) * wy.view(B, 1, 1, S, 1)
        cols = lambda i: x.gather(4, i.view(B, 1, 1, 1, S).expand(B, C, T, S, S))  # (B, 3, T, S, S)
        x = cols(x0) * (1 - wx).view(B, 1, 1, 1, S) + cols(x1) * wx.view(B, 1, 1, 1, S)
    # per channel with Python numbers: a mean tensor would be a host-to-device copy, which waits for the device
    x = torch.cat([(x[:, c:c + 1].float() - 255 * m) / (255 * s)
                   for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))], 1)
    return x.reshape(*lead, C, T, x.shape[-2], x.shape[-1])


# -----------------------------------------------------------------------------------------------------
# 5. The dataset: uint8 items with their augmentation parameters, labels, broken files

def item_seed(seed, epoch, index):
    """A 63-bit seed that depends only on (seed, epoch, index): the random stream of one item."""
    digest = hashlib.blake2b(f"{seed},{epoch},{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class VideoDataset(AnnotationList, torch.utils.data.Dataset):
    """Clips of the videos an annotation file lists, as uint8 frames plus what device_transform needs.

    mode "pretrain": (frames uint8 (k, T, 3, S, S), boxes int64 (k, 5), mask bool (k, N), broken), S = img_size;
        k = repeated_sampling clips, each with its own window, crop and flip, from one decoded range of at most
        two windows; mask = model.tube_mask for mask_cfg (default SVFAPConfig(img_size, num_frames)).
    mode "train": (frames uint8 (T, 3, S, S), boxes int64 (5,), target int64 () or float32 (D,), broken).
    mode "eval": (views uint8 (V, T, 3, S, S), target, index), V = num_clips * num_crops clip-major (eval_crops).
    crop_box (top, bottom, left, right) is cut out, then scaled to S x S (non-square frames squash: give a crop_box);
    boxes: the paper's multi-scale crop and flip. All randomness (a broken file's stand-in too) comes from
    item_seed(seed, epoch, index) for ds[(epoch, index)] (ds[index]: epoch 0): same clips for any worker count, fetch
    order or resume. Labels are checked against num_outputs (classes or D values; None: empty target, for
    reconstructions, --extract). Pretrain and train warn and skip broken files (or a misfitting crop box), counted in
    `broken` (int64 ()) for pretrain.count_broken; eval raises naming the file (check with unreadable())."""
    fail_floor = 1000  # also the most files one item tries

    def __init__(self, annotation_file, mode, img_size=160, num_frames=16, sampling_rate=4, crop_box=None,
                 root=None, replace_prefix=None, num_clips=2, num_crops=2, repeated_sampling=1, mask_cfg=None,
                 max_fail_fraction=0.05, task="classification", crop_scales=MULTISCALE_SCALES, num_outputs=None,
                 seed=0):
        if mode not in ("pretrain", "train", "eval") or task not in ("classification", "regression"):
            raise ValueError(f"VideoDataset: mode={mode!r}, task={task!r}; valid modes: pretrain, train, eval; "
                             f"tasks: classification, regression")
        self.annotation_file = os.fspath(annotation_file)
        self.mode, self.task, self.seed = mode, task, seed
        self.img_size, self.num_frames, self.sampling_rate = img_size, num_frames, sampling_rate
        self.span = (num_frames - 1) * sampling_rate + 1  # frames one clip covers: 16 every 4th span 61
        self.crop_box = tuple(crop_box) if crop_box is not None else None  # (top, bottom, left, right)
        self.num_clips, self.num_crops, self.repeated_sampling = num_clips, num_crops, repeated_sampling
        if mode == "pretrain":
            mask_cfg = mask_cfg or SVFAPConfig(img_size=img_size, num_frames=num_frames)
        self.mask_cfg, self.max_fail_fraction, self.crop_scales = mask_cfg, max_fail_fraction, tuple(crop_scales)
        super().__init__(annotation_file, root, replace_prefix)
        self.targets = None if mode == "pretrain" or num_outputs is None else self._targets(num_outputs)

    def _targets(self, n):
        """int64 (N,) or float64 (N, D), checked at start-up: a bad label fails before training, not in a worker."""
        counts = np.diff(self.value_ends)
        where = lambda i: (f"{self.annotation_file}, line {self.line_number(i)}: label "
                           f"{' '.join(f'{v:g}' for v in self.line_values(i))}")
        # a path alone is enough where labels are not used (pretraining, --extract)
        if len(empty := np.flatnonzero(counts == 0)):
            raise ValueError(f"{self.annotation_file}, line {self.line_number(empty[0])}: no label after the path; "
                             f"expected '<path> <label>' or '<path> <v1> ... <vD>' separated by spaces")
        if self.task == "regression":
            if len(wrong := np.flatnonzero(counts != n)):
                raise ValueError(f"{where(wrong[0])} has {counts[wrong[0]]} values; regression needs {n} "
                                 f"numbers after the path (num_outputs={n})")
            return self.values.reshape(len(self), n)
        labels = np.where(counts == 1, self.values[self.value_ends[:-1]], math.nan)
        one_based = (labels == labels.round()).all() and labels.min() >= 1 and labels.max() == n
        if len(bad := np.flatnonzero(~((labels == labels.round()) & (labels >= 0) & (labels < n)))):
            raise ValueError(f"{where(bad[0])} is not a class index in 0..{n - 1} (num_classes={n})"
                             + (f"; every label of the list lies in 1..{n}: they look 1-based, and this code "
                                f"counts classes from 0 (subtract 1 from each)" if one_based else ""))
        return labels.astype(np.int64)

    def target(self, index):
        if self.targets is None:
            return torch.zeros(0)
        return torch.tensor(self.targets[index], dtype=torch.float32 if self.task == "regression" else torch.int64)

    def unreadable(self, indices=None):
        """[(line_number, path, reason)] of entries (`indices`, default all) that fail to open or misfit crop_box."""
        bad = []
        listed = tqdm(range(len(self)) if indices is None else indices, unit="file", leave=False,
                      desc=f"checking {os.path.basename(self.annotation_file)}")
        for number, path in ((self.line_number(i), self.path(i)) for i in listed):
            try:
                with open_video(path) as video:
                    video.read([0], self.crop_box) if self.crop_box else video.frame_count(exact=False)
            except VideoReadError as e:
                bad.append((number, path, str(e)))
        return bad

    def _read_clips(self, path, choose, size):
        """uint8 (k, T, 3, h, w): the k clips of the indices choose(total_frames) gives, from one opening."""
        frames = torch.from_numpy(_read_chosen(path, choose, self.crop_box, size))
        return frames.permute(0, 3, 1, 2).unflatten(0, (-1, self.num_frames))  # (k*T, h, w, 3) -> (k, T, 3, h, w)

    def _choose_training(self, total, g):
        length = min(total, self.span if self.repeated_sampling == 1 else 2 * self.span)  # one range for all k
        first = random_clip_start(total, length, g)
        starts = [first + random_clip_start(length, self.span, g) for _ in range(self.repeated_sampling)]
        return [i for s in starts for i in clip_indices(s, self.num_frames, self.sampling_rate, total)]

    def _choose_eval(self, total):
        return [i for s in uniform_clip_starts(total, self.span, self.num_clips)
                for i in clip_indices(s, self.num_frames, self.sampling_rate, total)]

    def _training_item(self, index, g):
        S = self.img_size
        frames = self._read_clips(self.path(index), lambda total: self._choose_training(total, g), (S, S))
        boxes = torch.tensor([multiscale_crop_box(S, S, self.crop_scales, g) + (int(torch.rand((), generator=g) < 0.5),)
                              for _ in range(self.repeated_sampling)])  # (k, 5): top, left, height, width, flip
        if self.mode == "pretrain":
            return frames, boxes, tube_mask(self.repeated_sampling, self.mask_cfg, generator=g)
        return frames[0], boxes[0], self.target(index)

    def __getitem__(self, index):
        epoch, index = index if isinstance(index, tuple) else (0, index)  # pretrain.fit gives (epoch, index)
        if self.mode == "eval":
            try:
                clips = self._read_clips(self.path(index), self._choose_eval, self.img_size)
            except VideoReadError as e:
                raise VideoReadError(f"{e} [line {self.line_number(index)} of {self.annotation_file}; evaluation "
                                     f"never skips a sample: fix the file or remove the line]") from e
            views = [v for clip in clips for v in eval_crops(clip, self.img_size, self.num_crops)]
            return torch.stack(views), self.target(index), index  # (V, T, 3, S, S)
        g = torch.Generator().manual_seed(item_seed(self.seed, epoch, index))
        for broken in range(self.fail_floor):  # bounded: a list of broken files cannot loop forever
            try:
                return *self._training_item(index, g), torch.tensor(broken)
            except VideoReadError as e:
                warnings.warn(f"skipping unreadable sample: {e}", RuntimeWarning, stacklevel=2)
                if len(self) > 1:  # another sample, never the one that just failed
                    index = (index + 1 + int(torch.randint(len(self) - 1, (), generator=g))) % len(self)
        raise RuntimeError(f"{self.fail_floor} unreadable files in a row from {self.annotation_file}: check the paths "
                           f"(root, replace_prefix) and the crop box")


# -----------------------------------------------------------------------------------------------------
# 6. Tools: atomic writes, mp4 files, `python data.py prepare`, `python data.py --bench`

@contextlib.contextmanager
def atomic_path(path):
    """A temporary path beside path, fsynced and renamed to it on success, removed on error: never half-written."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_mp4(path, frames, fps=25, options=None):
    """uint8 frames (T, H, W, 3), or any iterable, atomically to H.264 mp4; one encoder thread: reproducible bytes."""
    with atomic_path(path) as tmp, av.open(tmp, "w", format="mp4") as container:
        stream = None
        for frame in frames:
            if stream is None:  # the first frame gives the size
                stream = container.add_stream("libx264", rate=fps)
                stream.height, stream.width, stream.pix_fmt = *frame.shape[:2], "yuv420p"
                stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", **(options or {})}
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode(None))


def write_png(path, image):
    """Write a uint8 image (H, W, 3) as a PNG with PyAV's encoder (no PIL), atomically."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")) + codec.encode(None)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(b"".join(bytes(p) for p in packets))


PREPARE_CRFS = (16, 12, 8, 4, 0)  # x264 quality, tried in turn until every kept frame has a PSNR of 40 dB or more
PREPARE_PSNR = 40  # dB, the target; a clip that misses it at CRF 0 is kept and listed in prepare_warnings.txt
# tune=fastdecode: CAVLC instead of CABAC, no deblocking; measured 1.7x faster to decode for 10% more bytes.
# g=16: a keyframe at least every 16 kept frames, so a clip decodes at most 15 frames it does not use.
PREPARE_X264 = {"preset": "veryfast", "tune": "fastdecode", "threads": "1", "g": "16"}


def psnr(a, b):
    """PSNR in dB of each frame of uint8 (T, H, W, 3) a against b."""
    mse = ((a.astype(np.float32) - b.astype(np.float32)) ** 2).reshape(len(a), -1).mean(1)
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def _prepare_one(job):
    """One entry of prepare: (number, source, target, crop_box, keep_every, size) -> (number, error, PSNR if low)."""
    number, source, target, crop_box, keep_every, size = job
    try:
        frames = _read_chosen(source, lambda total: range(0, total, keep_every), crop_box, size)
        frames = frames[:, :frames.shape[1] // 2 * 2, :frames.shape[2] // 2 * 2]  # x264's 4:2:0 needs even sizes
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with atomic_path(target) as tmp:  # the target appears only once its quality is checked
            for crf in PREPARE_CRFS:  # (sources with full-resolution colour noise cannot reach 40 dB in yuv420p)
                write_mp4(tmp, frames, options={**PREPARE_X264, "crf": str(crf)})
                if (quality := float(psnr(read_video_clip(tmp, range(len(frames))), frames).min())) >= PREPARE_PSNR:
                    break
        return number, None, quality if quality < PREPARE_PSNR else None
    except (VideoReadError, ValueError, av.error.FFmpegError) as e:  # the entry goes to prepare_failed.txt
        return number, str(e), None


def prepare(list_file, out, crop_box=None, keep_every=4, size=None, workers=1, root=None, replace_prefix=None):
    """Training-ready mp4s of list_file's videos in out/clips (docs/data.md); returns their list, out/<list name>."""
    if keep_every not in (1, 2, 4):
        raise ValueError(f"prepare: keep_every={keep_every} must be 1, 2 or 4 (it divides the sampling rate 4)")
    if os.path.abspath(out) == os.path.dirname(os.path.abspath(list_file)):
        raise ValueError(f"prepare: out={out} must not be the folder of {list_file} (its list would be overwritten)")
    if (size and size % 2) or (crop_box and ((crop_box[1] - crop_box[0]) % 2 or (crop_box[3] - crop_box[2]) % 2)):
        raise ValueError(f"prepare: H.264 needs even frame sizes; crop_box={crop_box} and size={size} give odd ones")
    lines = open(list_file, "rb").read().splitlines()  # as AnnotationList splits it, so that line numbers agree
    entries, jobs, line_of, listed = {}, [], {}, AnnotationList(list_file, root, replace_prefix)
    for number, source in zip(listed.line_numbers.tolist(), map(listed.path, range(len(listed)))):
        name, *labels = map(os.fsdecode, lines[number - 1].split(maxsplit=1))  # a path alone has no labels
        name = name.removeprefix(replace_prefix[0]) if replace_prefix else name  # the part below it names the target
        parts = [p for p in os.path.normpath(name).split(os.sep) if p not in ("", ".", "..")]  # stays under out
        target = os.path.join(out, "clips", *parts[:-1], os.path.splitext(parts[-1])[0] + ".mp4")
        if (first := line_of.setdefault(target, number)) != number:
            raise ValueError(f"prepare: {list_file}, lines {first} and {number} both map to {target} (the extension "
                             f"and . / .. parts are dropped); rename one of them")
        entries[number] = (source, target, labels)
        if not os.path.exists(target):
            jobs.append((number, source, target, crop_box, keep_every, (size, size) if size else None))
    settings = json.loads(json.dumps(dict(list=os.path.abspath(list_file), root=root, replace_prefix=replace_prefix,
                      crop_box=crop_box, keep_every=keep_every, size=size, min_psnr=PREPARE_PSNR)))  # tuples as lists
    old = {} if os.path.isdir(os.path.join(out, "clips")) else settings  # {}: an older prepare's clips, unknown
    with contextlib.suppress(FileNotFoundError), open(path := os.path.join(out, "prepare.json")) as f:
        old = json.load(f)
    differ = [f"{k}={old.get(k, 'unknown')!r} there, {v!r} now" for k, v in settings.items() if old.get(k, ...) != v]
    if differ:
        raise ValueError(f"prepare: {out} holds clips made with other settings ({path}): {', '.join(differ)}; give "
                         f"another --out, or the same settings to continue")
    os.makedirs(out, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    context = multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork")
    with context.Pool(workers) if (workers or 1) > 1 else contextlib.nullcontext() as pool:
        results = pool.imap_unordered(_prepare_one, jobs) if pool else map(_prepare_one, jobs)
        results = sorted(tqdm(results, total=len(jobs), desc=f"prepare {os.path.basename(list_file)}", unit="file"))
    failed = {number: error for number, error, _ in results if error is not None}
    low = [f"line {number}: {entries[number][0]}: {quality:.1f} dB" for number, _, quality in results if quality]
    new_list, failed_list = os.path.join(out, os.path.basename(list_file)), os.path.join(out, "prepare_failed.txt")
    with atomic_path(new_list) as tmp, open(tmp, "w") as f:
        f.writelines(" ".join([os.path.relpath(t, out), *labels]) + "\n" for n, (_, t, labels) in entries.items()
                     if n not in failed)
    with atomic_path(failed_list) as tmp, open(tmp, "w") as f:
        f.writelines(f"line {n}: {entries[n][0]}: {error}\n" for n, error in failed.items())  # in list order
    if len(failed) == len(entries):  # a wrong root or prefix: not a list to train on
        raise ValueError(f"prepare: none of the {len(entries)} entries of {list_file} can be read ({failed_list}); "
                         f"line {next(iter(failed))}: {next(iter(failed.values()))}")
    with open(os.path.join(out, "prepare_warnings.txt"), "a") as f:  # appended: clips kept earlier are not redone
        f.writelines(f"{w} PSNR (its worst frame), kept below the {PREPARE_PSNR} dB target at CRF 0\n" for w in low)
    print(f"prepare: {len(entries) - len(failed)} of {len(entries)} entries ready in {out} "
          f"({len(jobs) - len(failed)} written now); {len(failed)} unreadable, listed in {failed_list}"
          + (f"; {len(low)} kept below {PREPARE_PSNR} dB PSNR, listed in prepare_warnings.txt: " + "; ".join(low[:5])
             if low else "") + f"\nread them with these lines "
          f"(train_list, or the key {os.path.basename(list_file)} was for):\ntrain_list = {os.path.abspath(new_list)!r}"
          f"\ndata_root = ''\nreplace_prefix = ()\ncrop_box = ()\nsampling_rate = {4 // keep_every}")
    return new_list


BENCH_DIR = os.path.join(tempfile.gettempdir(), "svfap_bench")


def bench(num_clips=8, rounds=3):
    """A worker's CPU time per pre-training clip (16 x 160 px) from raw and prepared files, and device_transform's."""
    torch.set_num_threads(1)  # "per worker": DataLoader workers run torch with one thread
    os.makedirs(BENCH_DIR, exist_ok=True)
    raw_list, prepared = os.path.join(BENCH_DIR, "raw.txt"), os.path.join(BENCH_DIR, "prepared")
    with open(raw_list, "w") as f:
        for i in range(num_clips):
            path = os.path.join(BENCH_DIR, f"raw_{i:02d}.mp4")
            if not os.path.exists(path):  # like VoxCeleb2: a demo face at 224 px with camera noise, 8 s at 25 fps,
                # x264's defaults (preset medium, CRF 23, B-frames, one keyframe every 250 frames): ~290 kbit/s
                clip = render_demo_clip(demo_identity(i, i), demo_clip_plan(i, i, i, i % 6, 200), 224, 200)
                noisy = clip + np.random.default_rng(i).normal(0, 7.0, clip.shape).astype(np.float32) + 0.5
                write_mp4(path, np.clip(noisy, 0, 255).astype(np.uint8), options={"crf": "23", "preset": "medium"})
            f.write(f"{path} 0\n")
    prepared_list = prepare(raw_list, prepared, VOXCELEB2_CROP_BOX, keep_every=4)
    kbit = sum(os.path.getsize(os.path.join(BENCH_DIR, f"raw_{i:02d}.mp4")) for i in range(num_clips)) / num_clips / 1e3
    print(f"{num_clips} VoxCeleb2-like clips, {kbit:.0f} kbit/s; one process, torch threads 1, CPU time, best of "
          f"{rounds}")
    for name, listing, box, rate in (("raw", raw_list, VOXCELEB2_CROP_BOX, 4), ("prepared", prepared_list, None, 1)):
        for rs in (1, 2):
            ds = VideoDataset(listing, "pretrain", sampling_rate=rate, crop_box=box, repeated_sampling=rs)
            best = math.inf
            for r in range(rounds):
                t0 = time.process_time()
                items = [ds[(r, i)] for i in range(len(ds))]  # each round other windows and crops
                best = min(best, (time.process_time() - t0) / (len(ds) * rs))
            print(f"  {name:8s} repeated_sampling={rs}: {best * 1e3:5.1f} ms per clip, {1 / best:6.1f} clips per "
                  f"CPU-second, {sum(t.nbytes for t in items[-1]) / rs / 1e6:.2f} MB sent per clip")
    frames, boxes, best = torch.cat([it[0] for it in items]), torch.cat([it[1] for it in items]), math.inf
    for _ in range(rounds):
        t0 = time.process_time()
        device_transform(frames, boxes, 160)
        best = min(best, (time.process_time() - t0) / len(frames))
    print(f"  device_transform on this CPU (batch of {len(frames)}): {best * 1e3:.1f} ms per clip")


# -----------------------------------------------------------------------------------------------------
# 7. Demo dataset: `python data.py demo` (docs/demo.md), NOT NEEDED TO LEARN THE METHOD. The project's
# "shakespeare_char": faces going from neutral to an expression apex, like aligned DFEW crops. People vary in colour,
# feature size, lighting and hair, barely in feature position: the tiny TPSBT learns from scratch on faces aligned
# within a pixel (as after landmark alignment) but stays at chance for hundreds of steps if they jitter by several.

DEMO_CLASSES = ("happy", "sad", "angry", "surprise", "disgust", "fear")
DEMO_SIZE = 64           # frames are written at the tiny preset's img_size: no resize at load time
DEMO_FRAMES = 16         # the model's 16 frames at sampling rate 1: the clip is one window

# Class apexes as offsets from neutral: face units for moves (1 = ~42 px at 64 px; eye_open, mouth_width relative), 0..1
# for marks (AU1+2 forehead, AU1 brow_center, AU4 glabella, AU17 chin, AU24 press; wrinkles, cheeks, teeth).
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
    return dict(  # zoom: a tight face crop as in DFEW, brows to mouth fill the frame
        face_w=r.uniform(0.80, 0.90), face_h=r.uniform(1.02, 1.10),
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
        blobs=[(r.uniform(-1, 1, 2), r.uniform(0.2, 0.5), r.uniform(0.1, 0.9, 3)) for _ in range(2)])


def demo_clip_plan(seed, clip_id, identity, label, num_frames=DEMO_FRAMES):
    """The events of one clip: expression timing and intensity, head motion, blinks, gaze, noise; valence, arousal."""
    r = np.random.default_rng([seed, 1, clip_id])
    T = num_frames
    intensity, onset, rise = r.uniform(0.8, 1.0), r.uniform(0.05, 0.25) * T, r.uniform(0.10, 0.20) * T
    # smooth random head motion: a slow drift plus one oscillation per axis, about a pixel
    t = np.arange(T) / T
    wobble = lambda amplitude: amplitude * (r.uniform(-1, 1) * t + 0.6 * np.sin(2 * np.pi * r.uniform(0.3, 1.2) * t
                                                                            + r.uniform(0, 2 * np.pi)))
    blinks = [r.uniform(0, T) for _ in range(r.poisson(0.8))]
    valence, arousal = (float(np.clip(m * intensity + r.normal(0, 0.08), -1, 1)) for m in DEMO_VA[DEMO_CLASSES[label]])
    return dict(identity=identity, label=label, intensity=intensity, onset=onset, rise=rise,
                dx=wobble(0.015), dy=wobble(0.012), roll=wobble(0.03), scale=1 + wobble(0.01),
                blinks=blinks, gaze=(r.uniform(-0.4, 0.4), r.uniform(-0.3, 0.3)),
                gain=r.uniform(0.9, 1.05), noise=r.uniform(0.01, 0.025), noise_seed=int(r.integers(2**31)),
                valence=valence, arousal=arousal)


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

    # background: a still gradient plus two soft blobs (the camera does not move with the head)
    c0, c1, angle = ident["background"]
    ramp = (np.cos(angle) * PX + np.sin(angle) * PY) * 0.5 + 0.5                      # (1,S,S)
    img = np.repeat((c0[:, None, None, None] + (c1 - c0)[:, None, None, None] * ramp).astype(f32), T, 1)  # (3,T,S,S)
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

    # per frame (T,1,1): actions rise (smoothstep) from neutral at the onset to the apex and hold; blinks take ~3 frames
    t = np.arange(T, dtype=f32)
    u = np.clip((t - plan["onset"]) / plan["rise"], 0, 1)
    e = plan["intensity"] * u * u * (3 - 2 * u)
    apex = DEMO_APEX[DEMO_CLASSES[plan["label"]]]
    act = {k: col(apex.get(k, 0.0) * e) for k in set().union(*DEMO_APEX.values())}
    blink = np.clip(np.abs(t[:, None] - np.array(plan["blinks"], f32)) / 1.5, 0.05, 1).min(1, initial=1)  # (T,)
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
    for s in (-1, 1) if act["cheek"].any() else ():  # cheeks raised (happy): soft rosy bulges under the eyes
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
        _paint(view, _soft(np.abs(d) - 0.013 - 0.013 * (Yr < ey), aa) * _soft(np.abs(Xr - ex) - erx, aa), skin * 0.25)


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
    """The dataset's plan: {split: [(clip_id, identity, label), ...]}, labels balanced in every split. Train and
    pretrain (distinct clips) share a pool of people (as in any unlabeled crawl); val and test each have their own."""
    r = np.random.default_rng([seed, 2])
    n_train, n_eval = train_per_class * len(DEMO_CLASSES), eval_per_class * len(DEMO_CLASSES)
    sizes = {"train": n_train, "val": n_eval, "test": n_eval, "pretrain": pretrain_factor * n_train}
    splits, clip_id = {}, 0
    pool_size = max((sizes["pretrain"] + n_train) // clips_per_identity // 2, -(-n_train // clips_per_identity))
    first = {"train": 0, "val": pool_size, "test": pool_size + n_eval // clips_per_identity + 1}  # first identity
    for name, n in sizes.items():
        labels = r.permutation(np.arange(n) % len(DEMO_CLASSES))
        # pretrain: the shared pool, overlapping train; train: identities 0 .. n/cpi - 1; val, test: their own
        ids = r.integers(0, pool_size, n) if name == "pretrain" else first[name] + np.arange(n) // clips_per_identity
        splits[name] = [(clip_id + i, int(ids[i]), int(labels[i])) for i in range(n)]
        clip_id += n
    return splits


def ten_percent(train, seed=0):
    """A class-balanced 10% of the train split (same number of clips from each class)."""
    r = np.random.default_rng([seed, 3])
    per_class = max(1, len(train) // 10 // len(DEMO_CLASSES))
    by_class = [[item for item in train if item[2] == c] for c in range(len(DEMO_CLASSES))]
    return sorted(items[i] for items in by_class for i in r.choice(len(items), per_class, replace=False))


def _make_clip(out, seed, clip_id, identity, label, size, num_frames):
    """Worker: render and write one clip; returns its valence and arousal."""
    plan = demo_clip_plan(seed, clip_id, identity, label, num_frames)
    clip = render_demo_clip(demo_identity(seed, identity), plan, size, num_frames)
    # asm=0: x264's SIMD kernels (AVX-512 here) gave other bytes in 1 of ~20 clips when two encoders ran at
    # once (measured; AVX2 and lower, and plain C, never did); its C code gives the same bytes on any CPU.
    write_mp4(os.path.join(out, "videos", f"{clip_id:05d}.mp4"), clip, options={"x264-params": "asm=0"})
    return plan["valence"], plan["arousal"]


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
    sizes = {name: len(lines) for name, lines in lists.items()}
    if verbose:
        print(f"demo: wrote {len(jobs)} clips of {num_frames}x{size}x{size} to {out} in {time.time() - t0:.1f}s")
        print("demo: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return sizes


# -----------------------------------------------------------------------------------------------------
# command line

def main(argv):
    """usage: python data.py prepare --list=IN.txt --out=DIR [--crop_box="(0, 160, 32, 192)"] [--keep_every=4]
               [--size=S] [--workers=N] [--root=DIR] [--replace_prefix="('/their/dir', '/my/dir')"]
       python data.py demo [--out=data/demo] [--seed=0] [--train_per_class=50] [--eval_per_class=20]
               [--pretrain_factor=10] [--size=64] [--num_frames=16] [--workers=2]
       python data.py --bench"""
    command, *argv = argv or [""]
    if [command, *argv] == ["--bench"]:
        return bench()
    defaults = {"prepare": dict(list="", out="", crop_box=(), keep_every=4, size=0, workers=os.cpu_count() or 1,
                                root="", replace_prefix=()),
                "demo": dict(out="data/demo", seed=0, train_per_class=50, eval_per_class=20, pretrain_factor=10,
                             size=DEMO_SIZE, num_frames=DEMO_FRAMES, workers=min(2, os.cpu_count() or 1))}.get(command)
    if defaults is None or not all(a.startswith("--") for a in argv):  # (pretrain's load_config runs config files)
        raise SystemExit(main.__doc__)
    from pretrain import load_config  # the training scripts' --key=value: values typed, unknown keys named
    try:
        args = vars(load_config(defaults, argv))
        if command == "demo":
            return make_demo_dataset(**args)
        if not (args["list"] and args["out"]):
            raise SystemExit(f"prepare: --list and --out are needed\n{main.__doc__}")
        return prepare(args.pop("list"), args.pop("out"), **{k: v or None for k, v in args.items()})  # (), "", 0: none
    except (OSError, ValueError) as e:  # pretrain.ConfigError is a ValueError
        raise SystemExit(f"data.py: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
