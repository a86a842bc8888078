"""Demo dataset: procedurally drawn face videos with six dynamic expressions.

This is the project's "shakespeare_char": a small, real video dataset that a newcomer can make on a
laptop CPU in about a minute and that behaves like face-cropped DFEW / VoxCeleb2 clips: the face fills
the frame, each clip starts neutral and moves to an expression apex at a random onset, the head moves,
the eyes blink and there is mild camera noise. Files are real H.264 mp4 written through PyAV, and the
lists follow the annotation format of section 8 ("<path> <label>", "<path> <v> <a>").

    python data.py demo [--out=data/demo] [--seed=0] [--train_per_class=50] [--workers=2]

Every clip is drawn from its own np.random.default_rng([seed, stream, id]), so the output does not
depend on the number of worker processes or on the order in which clips are made.
Dependencies: numpy, av and the standard library only.
"""
import math
import multiprocessing
import os
import sys
import time

import av
import numpy as np

# -----------------------------------------------------------------------------
# what the demo contains

DEMO_CLASSES = ("happy", "sad", "angry", "surprise", "disgust", "fear")
DEMO_SIZE = 64           # frames are written at the tiny preset's img_size: no resize at load time
DEMO_FRAMES = 16         # the model's 16 frames at sampling rate 1: the clip is one window
DEMO_FPS = 25

# expression apex, as offsets from the neutral face, in face units (face half-width ~0.8 = ~26 px).
# Keys: brow_raise (both brow ends up), brow_inner (inner ends up; negative = knitted down),
# eye_open (relative change of the eye opening), smile (mouth corners up; negative = down),
# mouth_open (gap between the lips), mouth_width (relative), upper_lip (upper lip raised),
# nose_wrinkle (0..1), cheek (0..1, raised cheeks with crow's feet), and the marks that real action
# units leave on the skin and in the mouth: forehead (0..1, lines across the forehead, AU1+2),
# brow_center (0..1, short lines above the raised inner brows, AU1), glabella (0..1, vertical furrows
# between knitted brows, AU4), chin (0..1, pouting lower lip and dimpled chin, AU17), press (0..1, thin
# pressed lips, AU24), teeth_upper / teeth_lower (0..1, teeth shown in the open mouth).
# Every class has both a configuration (where brows, lids and lips go) and marks of its own (a texture
# that a bag of patches can see), as real expressions do.
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
DEMO_ACTIONS = ("brow_raise", "brow_inner", "eye_open", "smile", "mouth_open", "mouth_width", "upper_lip",
                "nose_wrinkle", "cheek", "forehead", "brow_center", "glabella", "chin", "press", "teeth_upper",
                "teeth_lower")
# valence and arousal of each class at full intensity (Russell's circumplex, in [-1, 1])
DEMO_VA = {"happy": (0.8, 0.5), "sad": (-0.7, -0.4), "angry": (-0.6, 0.7),
           "surprise": (0.3, 0.8), "disgust": (-0.7, 0.2), "fear": (-0.7, 0.8)}

SKIN_LIGHT = np.array([0.97, 0.82, 0.71])
SKIN_DARK = np.array([0.33, 0.20, 0.13])
HAIR_COLORS = np.array([[0.07, 0.05, 0.04], [0.22, 0.13, 0.07], [0.42, 0.27, 0.13], [0.85, 0.70, 0.42],
                        [0.60, 0.24, 0.09], [0.62, 0.62, 0.62]])
IRIS_COLORS = np.array([[0.25, 0.14, 0.06], [0.12, 0.08, 0.05], [0.20, 0.40, 0.65], [0.25, 0.45, 0.25]])

# -----------------------------------------------------------------------------
# random identities and clips (plans: small dicts of numbers, cheap to make, rendered later)


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
        brow_color=hair * 0.45 + 0.03,
        nose_y=r.uniform(0.16, 0.19), nose_w=r.uniform(0.07, 0.11),
        mouth_y=r.uniform(0.49, 0.51), mouth_w=r.uniform(0.31, 0.36), lip_t=r.uniform(0.035, 0.05),
        light=_unit(np.array([r.uniform(-0.4, 0.4), r.uniform(-0.4, 0.0), 1.0])), ambient=r.uniform(0.55, 0.7),
        background=(r.uniform(0.15, 0.85, 3), r.uniform(0.15, 0.85, 3), r.uniform(0, 2 * np.pi)),
        blobs=[(r.uniform(-1, 1, 2), r.uniform(0.2, 0.5), r.uniform(0.1, 0.9, 3)) for _ in range(2)],
    )


def demo_clip_plan(seed, clip_id, identity, label, num_frames=DEMO_FRAMES):
    """The events of one clip: expression timing and intensity, head motion, blinks, gaze, noise,
    plus its valence and arousal (derived from class + intensity + noise)."""
    r = np.random.default_rng([seed, 1, clip_id])
    T = num_frames
    intensity = r.uniform(0.8, 1.0)
    onset = r.uniform(0.05, 0.25) * T
    rise = r.uniform(0.10, 0.20) * T
    # smooth random head motion: a slow drift plus one oscillation per axis, a few pixels at most
    t = np.arange(T) / T
    def wobble(amplitude):
        return amplitude * (r.uniform(-1, 1) * t + 0.6 * np.sin(2 * np.pi * r.uniform(0.3, 1.2) * t
                                                                 + r.uniform(0, 2 * np.pi)))
    blinks = [r.uniform(0, T) for _ in range(r.poisson(0.8))]
    v0, a0 = DEMO_VA[DEMO_CLASSES[label]]
    valence = float(np.clip(v0 * intensity + r.normal(0, 0.08), -1, 1))
    arousal = float(np.clip(a0 * intensity + r.normal(0, 0.08), -1, 1))
    return dict(
        identity=identity, label=label, intensity=intensity, onset=onset, rise=rise,
        dx=wobble(0.015), dy=wobble(0.012), roll=wobble(0.03), scale=1 + wobble(0.01),
        blinks=blinks, gaze=(r.uniform(-0.4, 0.4), r.uniform(-0.3, 0.3)),
        gain=r.uniform(0.9, 1.05), noise=r.uniform(0.01, 0.025), noise_seed=int(r.integers(2**31)),
        valence=valence, arousal=arousal,
    )


def _unit(v):
    return v / np.linalg.norm(v)


def expression_curve(plan, num_frames):
    """Per-frame expression strength (T,): neutral, then a smooth rise to the apex, which is held."""
    t = np.arange(num_frames, dtype=np.float32)
    u = np.clip((t - plan["onset"]) / plan["rise"], 0, 1)
    return plan["intensity"] * u * u * (3 - 2 * u)  # smoothstep


def blink_curve(plan, num_frames):
    """Per-frame eye openness factor (T,) from blinks: 1 open, ~0 closed, closing over ~3 frames."""
    t = np.arange(num_frames, dtype=np.float32)
    open_ = np.ones(num_frames, np.float32)
    for b in plan["blinks"]:
        open_ = np.minimum(open_, np.clip(np.abs(t - b) / 1.5, 0.05, 1))
    return open_

# -----------------------------------------------------------------------------
# drawing: every shape is a soft mask over (T, S, S) computed in face coordinates


def _soft(d, aa):
    """Coverage of a pixel from a signed distance d (negative inside), antialiased over aa."""
    return np.clip(0.5 - d / aa, 0, 1)


def _ellipse(X, Y, cx, cy, rx, ry, aa):
    # approximate signed distance: normalised radius minus 1, times the smaller radius
    d = (np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2) - 1) * np.minimum(rx, ry)
    return _soft(d, aa)


def _paint(img, mask, color):
    """Alpha-composite a color (3,) over img (3,T,S,S) with coverage mask (T,S,S).
    Channels come first so that every inner loop runs along a row of pixels (fast in numpy)."""
    for c in range(3):
        img[c] += mask * (np.float32(color[c]) - img[c])
    return img


def _band(Y, lo, hi, aa):
    """Coverage of lo < Y < hi (curves given per pixel)."""
    return _soft(np.maximum(lo - Y, Y - hi), aa)


def render_demo_clip(ident, plan, size=DEMO_SIZE, num_frames=DEMO_FRAMES):
    """Draw one clip: uint8 (T, S, S, 3)."""
    T, S = num_frames, size
    f32 = np.float32
    color = lambda c: np.asarray(c, f32).reshape(3)
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
        _paint(img, 0.5 * _ellipse(PX, PY, bx, by, br, br, 0.3), color(bc))

    # head pose per frame -> face coordinates X, Y (T,S,S): rotate and scale the grid into the head's frame
    cx, cy = ident["center"]
    px, py = cx + col(plan["dx"]), cy + col(plan["dy"])
    cr, sr, sc = np.cos(col(plan["roll"])), np.sin(col(plan["roll"])), col(plan["scale"]) * ident["zoom"]
    ox, oy = PX - px, PY - py
    X = (cr * ox + sr * oy) / sc
    Y = (-sr * ox + cr * oy) / sc
    aa = 2.0 / S / sc  # one pixel, in face units

    def region(x0, x1, y0, y1):
        """Face coordinates and image view of the pixels that the face box [x0,x1]x[y0,y1] can cover in
        any frame: small features are drawn on their own box only, which keeps rendering cheap."""
        corners = np.array([(x0, y0), (x0, y1), (x1, y0), (x1, y1)], f32)
        fx = px + sc * (cr * corners[:, 0] - sr * corners[:, 1])                  # (T,1,4)
        fy = py + sc * (sr * corners[:, 0] + cr * corners[:, 1])
        to_pixel = lambda v, lo: int(np.clip(np.floor((v + 1) / 2 * S - 0.5) + lo, 0, S))
        c = slice(to_pixel(fx.min(), -2), to_pixel(fx.max(), 3))
        r = slice(to_pixel(fy.min(), -2), to_pixel(fy.max(), 3))
        return X[:, r, c], Y[:, r, c], img[:, :, r, c], bare[:, r, c]

    # expression actions per frame: apex offsets times the expression curve
    e = expression_curve(plan, T)
    apex = DEMO_APEX[DEMO_CLASSES[plan["label"]]]
    act = {k: col(apex.get(k, 0.0) * e) for k in DEMO_ACTIONS}

    fw, fh, skin, hair = ident["face_w"], ident["face_h"], color(ident["skin"]), color(ident["hair"])
    # back hair behind the face, neck below it
    if not ident["bald"]:
        back = _ellipse(X, Y, 0, -0.08, fw * 1.14, fh * 1.06, aa) * _soft(Y - ident["hair_side"], aa)
        _paint(img, back, hair)
    _paint(img, _soft(np.maximum(np.abs(X) - fw * 0.55, -Y), aa), skin * 0.8)
    face = _ellipse(X, Y, 0, 0, fw, fh, aa)
    _paint(img, face, skin)
    bare = face  # skin not covered by hair: where wrinkles can show
    # fringe: hair inside the face above a curved hairline
    if not ident["bald"]:
        hairline = ident["hairline"] + ident["fringe_curve"] * X ** 2
        fringe = face * _soft(Y - hairline, aa)
        _paint(img, fringe, hair)
        bare = face - fringe

    ex_, ey, erx, ery = ident["eye_x"], ident["eye_y"], ident["eye_rx"], ident["eye_ry"]
    wrinkle = skin * 0.4
    # forehead lines: long ones across (forehead), short ones in the middle (brow_center); they ride up
    # with the brows. Glabella: two vertical lines between the inner brow ends.
    y_brow = ey - ery - ident["brow_gap"] - act["brow_raise"]
    Xr, Yr, view, bare_r = region(-0.6, 0.6, ey - 0.75, ey - 0.05)
    for k in range(3 if apex.get("forehead") or apex.get("brow_center") else 0):  # skip what stays blank
        y_line = y_brow - 0.08 - 0.05 * k - 0.08 * Xr ** 2
        across = _soft(np.maximum(np.abs(Yr - y_line) - 0.02, np.abs(Xr) - 0.5 + 0.05 * k), aa)
        middle = _soft(np.maximum(np.abs(Yr - y_line + 0.15 * Xr ** 2 - 0.03) - 0.02, np.abs(Xr) - 0.16), aa)
        _paint(view, bare_r * np.maximum(across * act["forehead"], middle * act["brow_center"]), wrinkle)
    for s in (-1, 1) if apex.get("glabella") else ():
        y_top = y_brow - act["brow_inner"] - 0.06
        line = _soft(np.maximum(np.abs(Xr - s * 0.05) - 0.02, np.maximum(y_top - Yr, Yr - y_top - 0.17)), aa)
        _paint(view, bare_r * line * act["glabella"], wrinkle)
    for s in (-1, 1) if apex.get("cheek") else ():
        # cheeks raised (happy): soft rosy bulges under the eyes
        ccx, ccy = s * (ex_ + 0.04), ey + 0.2
        Xr, Yr, view, _ = region(ccx - 0.25, ccx + 0.25, ccy - 0.18, ccy + 0.18)
        cheek = _ellipse(Xr, Yr, ccx, ccy, 0.16, 0.09, 0.08)
        _paint(view, 0.55 * cheek * act["cheek"], skin * color([1.0, 0.72, 0.72]))
        # crow's feet: three short lines fanning out from the outer eye corner
        ox_ = s * (ex_ + erx + 0.04)  # where the lines meet, just outside the eye
        Xr, Yr, view, _ = region(ox_ - 0.14, ox_ + 0.14, ey - 0.15, ey + 0.15)
        for slope in (-0.5, 0.0, 0.5):
            d = np.abs((Yr - ey) - slope * s * (Xr - ox_)) - 0.018
            _paint(view, act["cheek"] * _soft(np.maximum(d, np.abs(Xr - ox_ - s * 0.05) - 0.05), aa), wrinkle)

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
        _paint(view, _soft(np.maximum(np.abs(Yr - y_mid) - thick, ends), aa), color(ident["brow_color"]))

        # eye: sclera whose opening follows the expression and blinks; iris and pupil; dark lid outline
        eye_open = np.maximum(1 + act["eye_open"], 0.15) * col(blink_curve(plan, T))
        ex = s * ex_
        Xr, Yr, view, _ = region(ex - erx - 0.05, ex + erx + 0.05, ey - 2 * ery - 0.05, ey + 2 * ery + 0.05)
        ry = np.maximum(ery * eye_open, 1e-3)
        rad = np.sqrt(((Xr - ex) / erx) ** 2 + ((Yr - ey) / ry) ** 2)
        inside = _soft((rad - 1) * np.minimum(ry, erx), aa)
        _paint(view, inside, color([0.95, 0.95, 0.93]))
        gx, gy = ex + plan["gaze"][0] * erx * 0.45, ey + plan["gaze"][1] * ery * 0.4
        _paint(view, inside * _ellipse(Xr, Yr, gx, gy, ident["iris_r"], ident["iris_r"], aa), color(ident["iris"]))
        _paint(view, inside * _ellipse(Xr, Yr, gx, gy, 0.03, 0.03, aa), color([0.02, 0.02, 0.02]))
        # a ring around the opening, thicker on the upper lid: a closed eye becomes a dark line
        ring = _soft(np.abs(rad - 1) * np.minimum(ry, erx) - 0.013 - 0.013 * (Yr < ey), aa)
        _paint(view, ring * _soft(np.abs(Xr - ex) - erx, aa), skin * 0.25)

    # nose: a soft shadow along one side and nostrils; disgust wrinkles the bridge and lifts the nostrils
    ny = ident["nose_y"] - 0.05 * act["nose_wrinkle"]
    nw = ident["nose_w"] * (1 + 0.25 * act["nose_wrinkle"])
    Xr, Yr, view, _ = region(-0.2, 0.2, ey, ident["nose_y"] + 0.06)
    _paint(view, 0.35 * _soft(np.maximum(np.abs(Xr - 0.05) - 0.018, np.maximum(ey - Yr, Yr - ny)), aa), skin * 0.55)
    for s in (-1, 1):
        _paint(view, _ellipse(Xr, Yr, s * nw * 0.55, ny, 0.035, 0.022, aa), skin * 0.3)
    for k in range(3 if apex.get("nose_wrinkle") else 0):  # wrinkle lines across the bridge
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
    _paint(view, _soft(np.maximum(np.abs(Yr - mid) - gap - lip_t * 0.9, sides), aa), color(ident["lips"]))
    mouth = _soft(np.maximum(np.abs(Yr - mid) - gap, sides), aa)
    _paint(view, mouth, color([0.25, 0.05, 0.06]))
    teeth = np.maximum(act["teeth_upper"] * _soft(np.maximum(top - Yr, Yr - (top + 0.05)), aa),
                       act["teeth_lower"] * _soft(np.maximum(bottom - 0.045 - Yr, Yr - bottom), aa))
    _paint(view, mouth * teeth, color([0.93, 0.92, 0.86]))
    for k in range(5 if apex.get("chin") else 0):  # dimples of a raised chin under the pouting lip
        dx = (k - 2) * 0.06
        dot = _ellipse(Xr, Yr, dx, my + 0.17 + 0.02 * (k - 2) ** 2 / 4, 0.022, 0.022, aa)
        _paint(view, 0.9 * dot * act["chin"], wrinkle)

    # lighting: Lambertian shading of the face as a half ellipsoid, then camera gain and noise
    nx, ny = X / (fw * 1.1), Y / (fh * 1.1)
    nz = np.sqrt(np.clip(1 - nx ** 2 - ny ** 2, 0, 1))
    lx, ly, lz = ident["light"]
    shade = ident["ambient"] + (1 - ident["ambient"]) * np.clip(lx * nx + ly * ny + lz * nz, 0, 1) / lz
    shade = 1 + face * (np.minimum(shade, 1.15) - 1)
    img *= shade * plan["gain"]
    img += plan["noise"] * np.random.default_rng(plan["noise_seed"]).standard_normal(img.shape, dtype=f32)
    img = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(1, 2, 3, 0))  # (3,T,S,S) -> (T,S,S,3)

# -----------------------------------------------------------------------------
# writing files through PyAV


def write_mp4(path, frames, fps=DEMO_FPS, codec="libx264"):
    """Write uint8 frames (T, H, W, 3) to an mp4 file (H.264 by default; 'mpeg4' also works)."""
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # one thread and fixed options: the same frames always give the same bytes
            stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def write_png(path, image):
    """Write a uint8 image (H, W, 3) as PNG with PyAV's png encoder (no PIL)."""
    codec = av.CodecContext.create("png", "w")
    codec.width, codec.height, codec.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
    data = b"".join(bytes(p) for p in codec.encode(frame) + codec.encode(None))
    with open(path, "wb") as f:
        f.write(data)

# -----------------------------------------------------------------------------
# splits: which identity and class each clip gets


def demo_splits(seed=0, train_per_class=50, eval_per_class=20, pretrain_factor=10, clips_per_identity=2):
    """The plan of the whole dataset: {split: [(clip_id, identity, label), ...]}.

    Identities: train and pretrain draw from one pool (a person may appear in both, as in any
    unlabeled crawl); val and test each get their own fresh identities, disjoint from all others.
    Labels are balanced within every split. Pretrain clips are distinct clips from train's.
    """
    n_classes = len(DEMO_CLASSES)
    r = np.random.default_rng([seed, 2])
    sizes = {"train": train_per_class * n_classes, "val": eval_per_class * n_classes,
             "test": eval_per_class * n_classes}
    sizes["pretrain"] = pretrain_factor * sizes["train"]
    splits, clip_id, next_identity = {}, 0, 0
    pool_size = (sizes["pretrain"] + sizes["train"]) // clips_per_identity // 2
    for name in ("train", "val", "test", "pretrain"):
        n = sizes[name]
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
    n_classes = len(DEMO_CLASSES)
    per_class = max(1, len(train) // 10 // n_classes)
    chosen = []
    for c in range(n_classes):
        items = [item for item in train if item[2] == c]
        chosen += [items[i] for i in sorted(r.choice(len(items), per_class, replace=False))]
    return sorted(chosen)


def _make_clip(job):
    """Worker: render and write one clip; returns its valence and arousal."""
    out, seed, clip_id, identity, label, size, num_frames = job
    ident = demo_identity(seed, identity)
    plan = demo_clip_plan(seed, clip_id, identity, label, num_frames)
    write_mp4(os.path.join(out, "videos", f"{clip_id:05d}.mp4"), render_demo_clip(ident, plan, size, num_frames))
    return plan["valence"], plan["arousal"]


def class_picture(seed=0, size=DEMO_SIZE, num_frames=DEMO_FRAMES, columns=5, people=2, magnify=2):
    """uint8 image: one row per class (in label order), `people` people x `columns` frames from
    neutral to apex, with a gap between people."""
    rows = []
    for label in range(len(DEMO_CLASSES)):
        tiles = []
        for p in range(people):
            ident = demo_identity(seed + 1000, p)
            plan = demo_clip_plan(seed + 1000, label * people + p, p, label, num_frames)
            plan.update(onset=0.1 * num_frames, rise=0.4 * num_frames, intensity=1.0, blinks=[])
            clip = render_demo_clip(ident, plan, size, num_frames)
            frames = np.linspace(0, num_frames - 1, columns).round().astype(int)
            tiles += [np.pad(clip[i], ((1, 1), (1, 1), (0, 0)), constant_values=255) for i in frames]
            tiles.append(np.full((size + 2, 6, 3), 255, np.uint8))
        rows.append(np.concatenate(tiles[:-1], axis=1))
    picture = np.concatenate(rows, axis=0)
    return picture.repeat(magnify, 0).repeat(magnify, 1)


def make_demo_dataset(out="data/demo", seed=0, train_per_class=50, eval_per_class=20, pretrain_factor=10,
                      size=DEMO_SIZE, num_frames=DEMO_FRAMES, workers=2, verbose=True):
    """Write the demo dataset to `out` and return {list name: number of lines}."""
    t0 = time.time()
    os.makedirs(os.path.join(out, "videos"), exist_ok=True)
    splits = demo_splits(seed, train_per_class, eval_per_class, pretrain_factor)
    jobs = [(out, seed, cid, ident, label, size, num_frames) for items in splits.values()
            for cid, ident, label in items]
    if workers > 1:
        with multiprocessing.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(workers) as pool:
            va = pool.map(_make_clip, jobs, chunksize=16)
    else:
        va = [_make_clip(job) for job in jobs]
    va = {job[2]: v for job, v in zip(jobs, va)}

    path = lambda cid: f"videos/{cid:05d}.mp4"
    lists = {
        "pretrain.txt": [f"{path(c)} 0" for c, _, _ in splits["pretrain"]],
        "pretrain_true_labels.txt": [f"{path(c)} {y}" for c, _, y in splits["pretrain"]],
        "train_10pct.txt": [f"{path(c)} {y}" for c, _, y in ten_percent(splits["train"], seed)],
    }
    for name in ("train", "val", "test"):
        lists[f"{name}.txt"] = [f"{path(c)} {y}" for c, _, y in splits[name]]
        lists[f"regression_{name}.txt"] = [f"{path(c)} {va[c][0]:.4f} {va[c][1]:.4f}" for c, _, _ in splits[name]]
    lists["classes.txt"] = list(DEMO_CLASSES)
    for name, lines in lists.items():
        with open(os.path.join(out, name), "w") as f:
            f.write("\n".join(lines) + "\n")
    write_png(os.path.join(out, "classes.png"), class_picture(seed, size, num_frames))
    sizes = {name: len(lines) for name, lines in lists.items()}
    if verbose:
        print(f"demo: wrote {len(jobs)} clips of {num_frames}x{size}x{size} to {out} in {time.time() - t0:.1f}s")
        print("demo: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
    return sizes


def demo_main(argv):
    """python data.py demo [--out=data/demo] [--seed=0] [--train_per_class=50] [--eval_per_class=20]
    [--pretrain_factor=10] [--size=64] [--frames=32] [--workers=2]"""
    args = dict(out="data/demo", seed=0, train_per_class=50, eval_per_class=20, pretrain_factor=10,
                size=DEMO_SIZE, frames=DEMO_FRAMES, workers=min(2, os.cpu_count() or 1))
    for arg in argv:
        key, sep, value = arg.lstrip("-").partition("=")
        if not arg.startswith("--") or not sep or key not in args:
            raise SystemExit(f"demo: unknown argument {arg!r}; valid: " + " ".join(f"--{k}=" for k in args))
        args[key] = value if key == "out" else int(value)
    return make_demo_dataset(args["out"], args["seed"], args["train_per_class"], args["eval_per_class"],
                             args["pretrain_factor"], args["size"], args["frames"], args["workers"])


if __name__ == "__main__":
    demo_main(sys.argv[2:] if sys.argv[1:2] == ["demo"] else sys.argv[1:])
