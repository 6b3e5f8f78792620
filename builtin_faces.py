"""The built-in procedural talking faces (not in the paper): a renderer and its videos, a data set whose ground
truth (identity, head pose, expression) is known for any (cross-)reenactment. Used when train.py / metrics.py
get no --data, and for the checks of metrics.py that need the true parameters.

  renderer  render_face(identity, pose, expression, size): 68 iBUG landmarks in 3D, posed, projected and
            drawn with PIL at 2-4x supersampling. A pure function: every frame's ground truth exists.
  videos    builtin_motion: smooth random pose, a talking mouth, blinks, deterministic from a seed;
            builtin_identity: train and test identities come from disjoint seed ranges.
Images are float [S,S,3] / [T,3,S,S] in [0, 1]; landmarks are pixels (pixel centre i at x = i).
"""
import math
from dataclasses import astuple, dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from keypoints import convex_hull, to_normalized, to_pixels

FPS = 25.0    # the built-in videos' frame rate (VoxCeleb's)

# ----------------------------------------------------------------------------------------------------------
# renderer

@dataclass(frozen=True)
class Identity:
    """Who: shape (model units, face half-width ~ 1), colours (RGB in [0, 1]), hair and background."""
    face_width: float = 1.0
    face_length: float = 1.0
    eye_spacing: float = 0.42       # |x| of the eye centres
    eye_size: float = 1.0
    nose_length: float = 1.0
    mouth_width: float = 1.0
    jaw_shape: float = 0.5          # 0 round .. 1 square
    skin: tuple = (0.85, 0.65, 0.52)
    hair: tuple = (0.25, 0.16, 0.10)
    hair_style: int = 0             # 0 short, 1 long, 2 bald, 3 fringe
    eye_colour: tuple = (0.25, 0.40, 0.65)
    lip: tuple = (0.70, 0.35, 0.35)
    cloth: tuple = (0.2, 0.3, 0.5)
    background: tuple = (0.5, 0.6, 0.7)
    background2: tuple = (0.3, 0.3, 0.4)
    background_kind: int = 0        # 0 plain, 1 gradient, 2 stripes, 3 smooth blobs
    background_seed: int = 0


@dataclass(frozen=True)
class Pose:
    """Head pose: angles in degrees, translation in normalised image units, scale relative to the default."""
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    tx: float = 0.0
    ty: float = 0.0
    scale: float = 1.0

    def vector(self):
        return np.array(astuple(self), np.float64)


@dataclass(frozen=True)
class Expression:
    """mouth_open, blink_l / blink_r in [0, 1] (1 = closed; _l = landmarks 36-41, the eye on the image's left
    in a frontal view), smile in [-0.3, 1], brow_raise in [-1, 1]."""
    mouth_open: float = 0.0
    smile: float = 0.0
    blink_l: float = 0.0
    blink_r: float = 0.0
    brow_raise: float = 0.0

    def vector(self):
        return np.array(astuple(self), np.float64)


POSE_RANGE = dict(yaw=30.0, pitch=20.0, roll=15.0, tx=0.08, ty=0.08, log_scale=0.12)
_SKIN = np.array([[0.98, 0.84, 0.74], [0.88, 0.68, 0.55], [0.70, 0.50, 0.36], [0.48, 0.32, 0.22], [0.32, 0.21, 0.15]])
_HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.18, 0.10], [0.75, 0.60, 0.35], [0.60, 0.25, 0.10], [0.65, 0.65, 0.65]])
_EYES = np.array([[0.30, 0.18, 0.10], [0.25, 0.45, 0.75], [0.30, 0.55, 0.30], [0.45, 0.50, 0.55]])


def _rgb(rng, base, noise=0.04):
    return tuple(float(v) for v in np.clip(base + rng.normal(0, noise, 3), 0, 1))


def sample_identity(rng):
    """A random Identity from a np.random.Generator."""
    t = rng.uniform(0, len(_SKIN) - 1)
    skin = _SKIN[int(t)] + (t - int(t)) * (_SKIN[min(int(t) + 1, len(_SKIN) - 1)] - _SKIN[int(t)])
    skin = np.array(_rgb(rng, skin, 0.03))
    u = rng.uniform(0, 1, 6)
    return Identity(
        face_width=rng.uniform(0.85, 1.15), face_length=rng.uniform(0.85, 1.15),
        eye_spacing=rng.uniform(0.36, 0.48), eye_size=rng.uniform(0.8, 1.2), nose_length=rng.uniform(0.8, 1.25),
        mouth_width=rng.uniform(0.8, 1.2), jaw_shape=rng.uniform(0, 1), skin=tuple(float(v) for v in skin),
        hair=_rgb(rng, _HAIR[rng.integers(len(_HAIR))], 0.05), hair_style=int(rng.choice(4, p=[.35, .3, .1, .25])),
        eye_colour=_rgb(rng, _EYES[rng.integers(len(_EYES))]),
        lip=_rgb(rng, skin * np.array([0.85, 0.55, 0.55]) + np.array([0.12, 0.0, 0.02]), 0.03),
        cloth=tuple(float(v) for v in rng.uniform(0.05, 0.95, 3)),
        background=tuple(float(v) for v in u[:3]), background2=tuple(float(v) for v in u[3:]),
        background_kind=int(rng.integers(4)), background_seed=int(rng.integers(2 ** 31)))


def sample_pose(rng, scale=1.0):
    """A random Pose; `scale` shrinks/grows every range (a curriculum knob)."""
    r = POSE_RANGE
    return Pose(*(float(rng.uniform(-1, 1) * r[k] * scale) for k in ("yaw", "pitch", "roll", "tx", "ty")),
                scale=float(math.exp(rng.uniform(-1, 1) * r["log_scale"] * scale)))


def sample_expression(rng, scale=1.0):
    """A random Expression; `scale` in [0, 1] moves it toward the neutral face."""
    blink = rng.uniform(0, 1, 2) ** 3 * (rng.uniform() < 0.5)
    return Expression(float(rng.uniform(0, 1) * scale), float(rng.uniform(-0.3, 1) * scale),
                      float(blink[0] * scale), float(blink[1] * scale), float(rng.uniform(-1, 1) * scale))


_HAIRLINE = {0: (0.98, 0.45), 1: (0.98, 0.45), 2: (1.6, 1.2), 3: (0.78, 0.35)}   # style -> (front, side) y
_SKULL_C, _SKULL_R = np.array([0.0, 0.45, -0.3]), np.array([1.08, 1.45, 1.25])


def _xyz(xs, ys, zs):
    return np.stack([xs, ys, zs], 1)


def face_points_3d(identity, expression):
    """The 68 landmarks and helper points in model space (x right, y up, z to the camera). -> dict of arrays."""
    I, E = identity, expression
    W, es, ew, eh = 0.98 * I.face_width, I.eye_spacing, 0.19 * I.eye_size, 0.085 * I.eye_size
    p = np.zeros((68, 3))
    a = np.linspace(0, np.pi, 17)                                   # jaw 0..16: superellipse, chin at 8
    k = 2.0 / (2.0 + 1.5 * I.jaw_shape)
    c, s = np.cos(a), np.sin(a)
    p[:17] = np.stack([-W * np.sign(c) * np.abs(c) ** k, 0.3 - 1.55 * np.abs(s) ** k - 0.3 * E.mouth_open * s ** 4,
                       0.75 * s], 1)
    u = np.array([-0.40, -0.22, -0.03, 0.15, 0.30])                  # brows 17..21 outer -> inner
    by = 0.63 + np.array([0.0, 0.07, 0.09, 0.07, 0.03]) + 0.1 * E.brow_raise * np.array([.6, .8, 1, 1, .9])
    p[17:22] = _xyz(-es + u, by, np.linspace(0.72, 0.92, 5))
    t = np.arange(4) / 3.0                                          # nose bridge 27..30, nostrils 31..35
    p[27:31] = _xyz(0 * t, 0.42 - 0.55 * I.nose_length * t, 0.92 + 0.33 * I.nose_length * t)
    p[31:36] = _xyz(np.array([-0.2, -0.1, 0, 0.1, 0.2]), p[30, 1] - 0.1 * np.array([1, 1.2, 1.3, 1.2, 1]),
                     np.array([0.95, 1.03, 1.1, 1.03, 0.95]))
    lids = lambda blink: (eh * (1 - blink) - 0.3 * eh * blink, -0.75 * eh * (1 - blink) - 0.3 * eh * blink)
    up, lo = lids(E.blink_l)                                        # eye 36..41 (image left)
    p[36:42] = _xyz(-es + ew * np.array([-1, -1 / 3, 1 / 3, 1, 1 / 3, -1 / 3]),
                     0.35 + np.array([0, up, up, 0, lo, lo]), np.array([0.8, 0.86, 0.86, 0.82, 0.86, 0.86]))
    ym, mw, o, sm = -0.62, 0.36 * I.mouth_width * (1 + 0.12 * E.smile), E.mouth_open, E.smile
    gap = 0.34 * o                                                  # lips 48..67
    p[48:55] = _xyz(mw * np.array([-1, -0.6, -0.25, 0, 0.25, 0.6, 1]),
                     ym + np.array([0.09 * sm, 0.08 + .04 * sm, 0.11 + .02 * sm, 0.09 + .02 * sm, 0.11 + .02 * sm,
                                    0.08 + .04 * sm, 0.09 * sm]) + 0.02 * o,
                     np.array([0.82, 0.95, 1.0, 1.02, 1.0, 0.95, 0.82]) - 0.06 * max(sm, 0))
    low_in = ym - gap * np.array([0.8, 1, 0.8]) + 0.03 * sm * np.array([1, 0.5, 1])
    p[55:60] = _xyz(mw * np.array([0.6, 0.25, 0, -0.25, -0.6]),
                     np.array([low_in[2] - 0.09, low_in[1] - 0.13, low_in[1] - 0.14, low_in[1] - 0.13,
                               low_in[0] - 0.09]), np.array([0.93, 0.98, 1.0, 0.98, 0.93]) - 0.05 * o)
    p[60:65] = _xyz(mw * np.array([-0.85, -0.35, 0, 0.35, 0.85]),
                     ym + np.array([0.07 * sm, 0.03 * o + .02 * sm, 0.03 * o + .01 * sm, 0.03 * o + .02 * sm,
                                    0.07 * sm]),
                     np.array([0.86, 0.97, 0.99, 0.97, 0.86]))
    p[65:68] = _xyz(mw * np.array([0.35, 0, -0.35]), low_in[::-1], np.array([0.96, 0.98, 0.96]) - 0.05 * o)
    p[22:27] = p[21:16:-1] * [-1, 1, 1]                             # mirror brows and the right eye
    up, lo = lids(E.blink_r)
    p[42:48] = p[[39, 38, 37, 36, 41, 40]] * [-1, 1, 1]
    p[[43, 44], 1], p[[46, 47], 1] = 0.35 + up, 0.35 + lo
    low = p[:, 1] < 0.35                                            # face length stretches below the eyes
    p[low, 1] = 0.35 + (p[low, 1] - 0.35) * I.face_length
    front, side = _HAIRLINE[I.hair_style]                           # forehead arc from the right temple over
    phi = np.linspace(np.pi / 2, -np.pi / 2, 13)                    # to the left one, on the skull surface
    hy = side + (front - side) * np.cos(phi) ** 2
    q = np.clip(1 - ((hy - _SKULL_C[1]) / _SKULL_R[1]) ** 2, 0.05, 1) ** 0.5
    fore = np.stack([W * np.sin(phi) * q / q.max() * 1.02, hy, _SKULL_C[2] + _SKULL_R[2] * q * np.cos(phi)], 1)
    lid_up = np.concatenate([p[36:40], p[42:46]]) + [0, 0.22, 0]
    lid_lo = np.concatenate([p[[39, 40, 41, 36]], p[[45, 46, 47, 42]]]) - [0, 0.16, 0]
    brow = np.concatenate([p[17:27] + [0, 0.045, 0], p[17:27] - [0, 0.045, 0]])
    neck = np.array([[-0.62, -0.5, -0.4], [0.62, -0.5, -0.4], [0.62, -2.6, -0.4], [-0.62, -2.6, -0.4]])
    longhair = np.array([[-1.2, 0.6, -0.6], [1.2, 0.6, -0.6], [1.25, -1.9, -0.6], [-1.25, -1.9, -0.6]])
    return dict(lm=p, fore=fore, lid_up=lid_up, lid_lo=lid_lo, brow=brow, neck=neck, longhair=longhair)


def rotation(pose):
    """R = Rz(roll) Rx(pitch) Ry(yaw), angles in degrees; acts on column vectors in model space."""
    y, x, z = (math.radians(v) for v in (pose.yaw, pose.pitch, pose.roll))
    Ry = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    Rx = np.array([[1, 0, 0], [0, math.cos(x), -math.sin(x)], [0, math.sin(x), math.cos(x)]])
    Rz = np.array([[math.cos(z), -math.sin(z), 0], [math.sin(z), math.cos(z), 0], [0, 0, 1]])
    return Rz @ Rx @ Ry


FACE_SCALE, FACE_CENTRE_Y = 0.55, -0.25      # model units -> normalised image units; model y at image centre


def _supersample(size):
    return 4 if size <= 96 else 3 if size <= 160 else 2


_CR = {n: 0.5 * np.array([[0, 2, 0, 0], [-1, 0, 1, 0], [2, -5, 4, -1], [-1, 3, -3, 1]]).T
         @ np.power.outer(np.arange(n) / n, np.arange(4)).T for n in (3, 4)}   # Catmull-Rom basis [4, n]


def _catmull(pts, n=4, closed=False):
    """Smooth polyline through pts [M,2] (Catmull-Rom, n samples per segment)."""
    P = np.concatenate([pts[-1:], pts, pts[:2]]) if closed else np.concatenate([pts[:1], pts, pts[-1:]])
    G = P[np.arange(len(P) - 3)[:, None] + np.arange(4)]            # (segments, 4, 2)
    out = np.einsum("kn,skd->snd", _CR[n], G).reshape(-1, 2)
    return out if closed else np.concatenate([out, pts[-1:]])


_BG_CACHE = {}


def _background(identity, size):
    """The background as float32 [S,S,3], cached per identity (it never moves)."""
    key = (identity.background, identity.background2, identity.background_kind, identity.background_seed, size)
    if key not in _BG_CACHE:
        a, b = np.array(identity.background, np.float32), np.array(identity.background2, np.float32)
        kind, n = identity.background_kind, size
        yy, xx = (np.arange(n)[:, None] + 0.5) / n, (np.arange(n)[None, :] + 0.5) / n
        if kind == 0:
            w = np.zeros((n, n))
        elif kind == 1:
            w = yy + 0 * xx
        elif kind == 2:
            ang = identity.background_seed % 180 * np.pi / 180
            w = np.clip(0.5 + 0.1 * n * np.sin(2 * np.pi * 5 * (xx * np.cos(ang) + yy * np.sin(ang))), 0, 1)
        else:
            low = np.random.default_rng(identity.background_seed).uniform(0, 1, (5, 5))
            w = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((n, n), Image.BICUBIC)) / 255.0
        if len(_BG_CACHE) > 256:
            _BG_CACHE.clear()
        _BG_CACHE[key] = (a + (b - a) * w[..., None].astype(np.float32))
    return _BG_CACHE[key]


def _skull_outline(R, to_canvas, n=28):
    """Silhouette of the skull ellipsoid under orthographic projection: the Schur complement of its quadric."""
    A = R @ np.diag(1.0 / _SKULL_R ** 2) @ R.T
    M = A[:2, :2] - np.outer(A[:2, 2], A[2, :2]) / A[2, 2]
    tr, det = M[0, 0] + M[1, 1], M[0, 0] * M[1, 1] - M[0, 1] ** 2      # closed-form 2x2 eigen-decomposition
    disc = math.sqrt(max(tr * tr / 4 - det, 0.0))
    lam = np.array([tr / 2 - disc, tr / 2 + disc])
    th = 0.5 * math.atan2(2 * M[0, 1], M[0, 0] - M[1, 1])            # angle of the larger eigenvalue's axis
    V = np.array([[-math.sin(th), math.cos(th)], [math.cos(th), math.sin(th)]])
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    e = (V @ (np.stack([np.cos(t), np.sin(t)]) / np.sqrt(lam)[:, None])).T
    return to_canvas(e + (R @ _SKULL_C)[:2])


def _col(rgb, f=1.0):
    return tuple(int(min(255, max(0, round(255 * v * f)))) for v in rgb)


class _Canvas:
    """A supersampled PIL canvas: the foreground over black and its coverage mask (the silhouette that hides
    the background), drawn in the painter's order."""

    def __init__(self, C):
        self.img, self.mask = Image.new("RGB", (C, C)), Image.new("L", (C, C))
        self.d, self.dm = ImageDraw.Draw(self.img), ImageDraw.Draw(self.mask)

    def poly(self, pts, col, silhouette=False):
        pts = np.asarray(pts).ravel().tolist()
        self.d.polygon(pts, fill=col)
        if silhouette:
            self.dm.polygon(pts, fill=255)


def _draw_head(cv, identity, P, R, to_canvas, unit):
    """Shoulders, neck, long hair, the skull's silhouette (hair or bald) and the face's skin."""
    lm, skin, hair = P["lm"], _col(identity.skin), _col(identity.hair)
    neck_top = P["neck"][:2].mean(0)
    down = (P["neck"][2:].mean(0) - neck_top) / np.linalg.norm(P["neck"][2:].mean(0) - neck_top)
    side = np.array([-down[1], down[0]])
    sh = neck_top + down * 1.35 * unit
    cv.poly([sh - side * 0.9 * unit, sh + side * 0.9 * unit, sh + side * 3 * unit + down * 2 * unit,
             sh - side * 3 * unit + down * 2 * unit], _col(identity.cloth), True)
    cv.poly(P["neck"], _col(identity.skin, 0.85), True)
    if identity.hair_style == 1:
        cv.poly(convex_hull(P["longhair"]), hair, True)
    cv.poly(_skull_outline(R, to_canvas), skin if identity.hair_style == 2 else hair, True)
    face = convex_hull(np.concatenate([lm[:17], P["fore"], P["brow"][10:], lm[36:48]]))   # far-side brow and eye
    cv.poly(_catmull(face, 3, closed=True), skin, True)                 # stay on the skin when yawed


def _draw_features(cv, identity, expression, P, unit):
    """Eyes (sclera, iris, pupil; the lids clip them), brows, nose and nostrils, lips and the open mouth."""
    lm, skin, d = P["lm"], _col(identity.skin), cv.d
    for i in (36, 42):                                   # eyes
        e = lm[i:i + 6]
        cv.poly(_catmull(e, 3, closed=True), (240, 240, 235))
        c, r = e.mean(0), 0.085 * identity.eye_size * unit
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=_col(identity.eye_colour))
        d.ellipse([c[0] - r / 2.2, c[1] - r / 2.2, c[0] + r / 2.2, c[1] + r / 2.2], fill=(15, 12, 12))
    for j in (0, 4):
        upper, lower = P["lid_up"][j:j + 4], P["lid_lo"][j:j + 4]
        lid = _catmull(lm[[36, 37, 38, 39]] if j == 0 else lm[[42, 43, 44, 45]], 3)
        low = _catmull(lm[[39, 40, 41, 36]] if j == 0 else lm[[45, 46, 47, 42]], 3)
        cv.poly(np.concatenate([lid, upper[::-1]]), skin)
        cv.poly(np.concatenate([low, lower[::-1]]), skin)
        d.line(lid.ravel().tolist(), fill=(40, 25, 20), width=max(1, round(0.025 * unit)))
    for a, b in ((0, 5), (5, 10)):
        cv.poly(np.concatenate([P["brow"][a:b], P["brow"][10 + a:10 + b][::-1]]), _col(identity.hair, 0.7), True)
    cv.poly(convex_hull(lm[27:36]), _col(identity.skin, 0.88))
    for i in (32, 34):
        q, r = 0.75 * lm[i] + 0.25 * lm[33], 0.035 * unit
        d.ellipse([q[0] - r, q[1] - r * 0.7, q[0] + r, q[1] + r * 0.7], fill=_col(identity.skin, 0.35))
    cv.poly(_catmull(lm[48:60], 3, closed=True), _col(identity.lip))
    if expression.mouth_open > 0.02:
        cv.poly(_catmull(lm[60:68], 3, closed=True), (60, 15, 20))
        teeth = np.concatenate([_catmull(lm[60:65], 3), (_catmull(lm[60:65], 3) + (lm[66] - lm[62]) * 0.3)[::-1]])
        cv.poly(teeth, (235, 232, 220))
    d.line(_catmull(lm[60:65], 3).ravel().tolist(), fill=_col(identity.lip, 0.45), width=max(1, round(0.02 * unit)))


def render_face(identity, pose, expression, size=64):
    """-> (image np.float32 [S,S,3] in [0,1], landmarks np.float32 [68,2] in pixels, pixel centre i at x=i).
    Painter's order: background, the head, the face's features; drawn at `_supersample(size)` x the size and
    box-downsampled (anti-aliasing)."""
    f = _supersample(size)
    C = size * f
    R = rotation(pose)
    s = FACE_SCALE * pose.scale

    def to_canvas(xy):          # rotated model xy -> canvas pixel coordinates (PIL: integer = pixel centre)
        u = s * xy[:, 0] + pose.tx
        v = -s * (xy[:, 1] - FACE_CENTRE_Y) + pose.ty
        return to_pixels(np.stack([u, v], 1), C)

    pts = face_points_3d(identity, expression)
    flat = to_canvas(np.concatenate(list(pts.values())) @ R.T)       # rotate and project all at once
    ends = np.cumsum([len(v) for v in pts.values()])
    P = dict(zip(pts, np.split(flat, ends[:-1])))
    unit = s * C / 2                                                 # canvas pixels per model unit
    cv = _Canvas(C)
    _draw_head(cv, identity, P, R, to_canvas, unit)
    _draw_features(cv, identity, expression, P, unit)
    fg = np.asarray(cv.img.reduce(f), dtype=np.float32) / 255.0      # box filter = coverage anti-aliasing
    cover = np.asarray(cv.mask.reduce(f), dtype=np.float32)[..., None] / 255.0
    image = np.clip(fg + (1 - cover) * _background(identity, size), 0, 1)   # pre-multiplied "over"
    landmarks = to_pixels(to_normalized(P["lm"], C), size).astype(np.float32)   # canvas -> output pixels
    return image, landmarks


def render_frames(identity, poses, expressions, size=64):
    """render_face for each (pose, expression) -> (frames [T, 3, size, size] float in [0, 1], landmarks
    [T, 68, 2] pixels)."""
    out = [render_face(identity, p, e, size) for p, e in zip(poses, expressions)]
    frames = torch.from_numpy(np.stack([o[0] for o in out])).permute(0, 3, 1, 2).float().contiguous()
    return frames, np.stack([o[1] for o in out])


# ----------------------------------------------------------------------------------------------------------
# built-in videos: one identity each, smooth random motion, talking mouth and blinks

TEST_SEED0 = 1_000_000        # identity seeds: train j -> j, test j -> TEST_SEED0 + j (disjoint ranges)


def builtin_identity(split, j):
    """The j-th built-in identity of a split -> (seed, name, Identity)."""
    seed = j if split == "train" else TEST_SEED0 + j
    return seed, f"id{10001 + seed}", sample_identity(np.random.default_rng([7, seed]))


def builtin_motion(seed, video, frames, motion_scale=1.0, at=None, fps=FPS):
    """Pose and expression trajectories of video `video` of identity `seed` -> ([Pose] * T, [Expression] * T)
    (only at frame indices `at` if given: the same values, computed for those frames only).
    Sums of random sinusoids (0.03-0.5 Hz) for pose, brows and smile; a syllable-rate (2.5-4.5 Hz) mouth
    under a slow speaking envelope; blinks every ~2.5 s (sometimes one eye). `motion_scale` scales every
    pose and expression amplitude (curriculum); everything is a function of (seed, video) only."""
    rng, m = np.random.default_rng([11, seed, video]), motion_scale
    t = np.asarray(range(frames) if at is None else at, np.float64) / fps

    def smooth(amp, fmin=0.03, fmax=0.5, k=3):
        f, ph, a = rng.uniform(fmin, fmax, k), rng.uniform(0, 2 * np.pi, k), rng.normal(0, 1, k)
        return amp * (a[:, None] * np.sin(2 * np.pi * f[:, None] * t + ph[:, None])).sum(0) / math.sqrt(k)

    r, base = POSE_RANGE, sample_pose(rng, 0.6 * m).vector()
    base[5] = math.log(base[5])
    lim = np.array([r["yaw"], r["pitch"], r["roll"], r["tx"], r["ty"], r["log_scale"]]) * m
    pose = np.clip(base[:, None] + np.stack([smooth(0.5 * v) for v in lim]), -lim[:, None], lim[:, None])
    pose[5] = np.exp(pose[5])
    phase = 2 * np.pi * rng.uniform(2.5, 4.5) * t + 1.5 * np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6.3))
    speaking = np.clip(0.65 + smooth(0.8, 0.05, 0.3), 0.15, 1)        # mostly talking, some pauses
    mouth = np.clip(speaking * (0.5 - 0.5 * np.cos(phase)) ** 1.5 * rng.uniform(0.6, 1.0), 0, 1) * m
    smile = np.clip(rng.uniform(-0.2, 0.6) + smooth(0.4, 0.02, 0.2), -0.3, 1) * m
    brow = np.clip(smooth(0.7, 0.05, 0.4), -1, 1) * m
    events = np.cumsum(rng.exponential(2.5, int(frames / fps) + 3)) - rng.uniform(0, 2.5)
    wink = rng.uniform(0, 1, (len(events), 2)) < [0.1, 0.1]          # this eye stays open
    bump = np.clip(1 - np.abs(t[:, None] - events[None]) / 0.1, 0, 1)  # (T, events), 0.2 s per blink
    blink = np.stack([(bump * ~wink[:, e]).max(1) for e in (0, 1)]) * min(1.0, m)
    poses = [Pose(*map(float, p)) for p in pose.T]
    exprs = [Expression(*map(float, e)) for e in np.stack([mouth, smile, blink[0], blink[1], brow], 1)]
    return poses, exprs
