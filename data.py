"""Data for FSRT, top to bottom: 1. the augmentations of Sec. 3.2; 2. the training and evaluation datasets
(without a root they render the built-in faces of builtin_faces.py); 3. VoxCeleb in FOMM's layout with its
68-point landmarks, and faces in a person's own photos; 4. image/video I/O (imageio + imageio-ffmpeg);
5. `python data.py export ROOT | landmarks ROOT | preview OUT.png`.
Images are torch [N,3,H,W] in [0, 1] inside, numpy uint8 [..., H, W, 3] at the file boundary; landmarks are
pixels (pixel centre i at x = i); boxes are pixel (x0, y0, x1, y1) with x1, y1 exclusive.
"""
import argparse
import functools
import importlib.util
import itertools
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

import builtin_faces as faces
import cli
from keypoints import to_normalized, to_pixels   # the pixel-centre convention

# ----------------------------------------------------------------------------------------------------------
# conversions used throughout

def to_uint8(x):
    """Image(s) in [0, 1] -> uint8 [..., H, W, 3], clamped and rounded (a tensor [..., 3, H, W] moved channels last)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy()
    return np.round(np.clip(np.asarray(x, dtype=np.float64), 0, 1) * 255).astype(np.uint8)


def resize(x, size, mode="bilinear"):
    """x [N,3,H,W] in [0, 1] -> [N,3,size,size], anti-aliased, clamped (the aspect ratio may change)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True).clamp(0, 1)


# ----------------------------------------------------------------------------------------------------------
# 1. augmentations of Sec. 3.2 (torch, images [N,3,H,W] in [0,1]; landmarks in pixels)

# iBUG 68 re-indexing under a horizontal flip (jaw, brows, nose, eyes, lips mirrored left <-> right).
FLIP_PERM = np.array(list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30, 35, 34, 33, 32, 31]
                     + [45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40]
                     + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55, 64, 63, 62, 61, 60, 67, 66, 65])


def flip_landmarks(lm, size):
    """Horizontal flip of [...,68,2] pixel landmarks: x -> S-1-x, then left/right re-indexed (FLIP_PERM)."""
    out = lm.copy() if isinstance(lm, np.ndarray) else lm.clone()
    out[..., 0] = size - 1 - out[..., 0]
    return out[..., FLIP_PERM, :]


def jitter_params(rng, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1):
    """One colour-jitter draw (factors as torchvision's ColorJitter, random order of the four ops)."""
    return dict(b=rng.uniform(1 - brightness, 1 + brightness), c=rng.uniform(1 - contrast, 1 + contrast),
                s=rng.uniform(1 - saturation, 1 + saturation), h=rng.uniform(-hue, hue), order=rng.permutation(4))


def adjust_hue(x, h):
    """torchvision's adjust_hue: x [N,3,H,W] in [0, 1] -> HSV, hue shifted by h turns (mod 1), -> RGB."""
    v, _ = x.max(1)
    chroma = v - x.min(1)[0]
    s = chroma / torch.where(v > 0, v, torch.ones_like(v))
    r, g, b = ((v[:, None] - x) / torch.where(chroma > 0, chroma, torch.ones_like(chroma))[:, None]).unbind(1)
    hue = torch.where(v == x[:, 0], b - g, torch.where(v == x[:, 1], 2 + r - b, 4 + g - r))   # sextant + offset
    hue = (hue / 6 + h) % 1.0 * 6
    i, f = hue.floor(), hue - hue.floor()
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([v, q, p, p, t, v, t, v, v, q, p, p, p, p, t, v, v, q], 1).unflatten(1, (3, 6))
    return table.gather(2, (i.long() % 6)[:, None, None].expand(-1, 3, 1, -1, -1))[:, :, 0]


def color_jitter(x, p):
    """Apply one jitter draw `p` identically to every image of x [N,3,H,W] (torchvision's functional ops)."""
    gray = lambda y: (0.299 * y[:, 0:1] + 0.587 * y[:, 1:2] + 0.114 * y[:, 2:3])   # (N,1,H,W)
    for op in p["order"]:
        if op == 0:
            x = x * p["b"]
        elif op == 1:
            x = p["c"] * x + (1 - p["c"]) * gray(x).mean((1, 2, 3), keepdim=True)
        elif op == 2:
            x = p["s"] * x + (1 - p["s"]) * gray(x)
        else:
            x = adjust_hue(x, p["h"])
        x = x.clamp(0, 1)
    return x


def _edge_ranges(lo, hi, size):
    """The crop edges [e0, e1) that keep [lo, hi] (clipped to the frame) inside: e0 <= floor(lo), e1 > ceil(hi)."""
    lo, hi = min(max(lo, 0.0), size - 1.0), max(min(hi, size - 1.0), 0.0)
    return np.arange(int(math.floor(lo)) + 1), np.arange(int(math.ceil(hi)) + 1, size + 1)


def _edges(lo, hi, size, rng):
    """Random crop edges (e0, e1), each uniform in its _edge_ranges."""
    r0, r1 = _edge_ranges(lo, hi, size)
    return int(rng.choice(r0)), int(rng.choice(r1))


def omega_box(lm, size, rng):
    """Omega (Sec. 3.2): crop each edge by a random amount, never into the landmark box extended up by 25%
    and down by 5% of the face height. lm [68,2] pixels -> (x0, y0, x1, y1) pixel box, x1/y1 exclusive."""
    (lx0, ly0), (lx1, ly1) = lm.min(0), lm.max(0)
    h = ly1 - ly0
    (x0, x1), (y0, y1) = _edges(lx0, lx1, size, rng), _edges(ly0 - 0.25 * h, ly1 + 0.05 * h, size, rng)
    return x0, y0, x1, y1


def _encodable_edges(lo, hi, size, rng):
    """Crop edges (e0, e1) as _edges, among those that map the uncropped frame [-1, 1] into [-2, 2] (the range
    Eq. 4 encodes uniquely). The release redraws until one passes: a uniform draw among the passing pairs is the
    same distribution without a loop (no crop always passes)."""
    e0, e1 = (r.astype(np.float64) for r in _edge_ranges(lo, hi, size))
    c0, c1 = box_to_crop(e0, size)[:, None], box_to_crop(e1, size)[None, :]      # normalised edges
    centre, half = (c0 + c1) / 2, (c1 - c0) / 2
    ok = (np.abs(-1 - centre) <= 2 * half) & (np.abs(1 - centre) <= 2 * half)
    i, j = np.argwhere(ok)[rng.integers(ok.sum())]
    return int(e0[i]), int(e1[j])


def out_of_frame_box(src_lm, size, rng):
    """The out-of-frame crop (Sec. 3.2 "estimating them before cropping", the release's rules): edges outside the
    sources' landmark box extended 0.2 x width sideways, 0.5 x height up, 0.15 x height down, x and y drawn apart
    by _encodable_edges (keypoints of the uncropped frame, in [-1, 1], stay encodable in the crop).
    src_lm [N,68,2] pixels -> pixel box (x0, y0, x1, y1)."""
    (lx0, ly0), (lx1, ly1) = src_lm.reshape(-1, 2).min(0), src_lm.reshape(-1, 2).max(0)
    w, h = lx1 - lx0, ly1 - ly0
    x0, x1 = _encodable_edges(lx0 - 0.2 * w, lx1 + 0.2 * w, size, rng)
    y0, y1 = _encodable_edges(ly0 - 0.5 * h, ly1 + 0.15 * h, size, rng)
    return x0, y0, x1, y1


def box_to_crop(box, size):
    """Pixel box (x0, y0, x1, y1), x1/y1 exclusive -> crop edges in normalised coordinates."""
    return np.asarray(box, np.float64) / (size / 2) - 1


def map_to_crop(kp, crop):
    """Points [..., 2] normalised in the uncropped frame -> normalised in the crop (x0, y0, x1, y1) [..., 4]
    resized to the full frame: (k - centre) / half_size. torch or numpy."""
    centre = (crop[..., :2] + crop[..., 2:]) / 2
    half = (crop[..., 2:] - crop[..., :2]) / 2
    return (kp - centre[..., None, :]) / half[..., None, :]


def crop_resize(x, box, size):
    """x [N,3,H,W], pixel box (x0, y0, x1, y1) -> [N,3,size,size] (aspect ratio may change, as Omega)."""
    x0, y0, x1, y1 = box
    return resize(x[..., y0:y1, x0:x1], size)


# ----------------------------------------------------------------------------------------------------------
# 2. datasets

def _resize_frames(frames, lms, size):
    """uint8 [n,H,W,3] + pixel landmarks [n,68,2] -> float [n,3,S,S], landmarks rescaled (aspect may change)."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    H, W = x.shape[-2:]
    x = resize(x, size)
    if lms is not None:
        lms = to_pixels(to_normalized(lms, np.array([W, H], np.float32)), size)
    return x, lms


class VideoSet:
    """Whole videos for evaluation. root=None: built-in test (or train) identities, one video each, rendered
    on access; else ROOT/split of FOMM's layout (landmarks from `<video>.landmarks.npy` when present).
    Item: {"frames" [T,3,S,S], "landmarks" [T,68,2] or None, "name", "identity", "params", "fps"}."""

    def __init__(self, root=None, split="test", size=64, num_videos=32, frames=80, motion_scale=1.0):
        self.root, self.split, self.size, self.frames, self.motion_scale = root, split, size, frames, motion_scale
        self.videos = None if root is None else list_videos(root, split)[0]
        self.num_videos = num_videos if root is None else len(self.videos)

    def __len__(self):
        return self.num_videos

    def __getitem__(self, i):
        if i < 0 or i >= len(self):
            raise IndexError(i)
        if self.root is None:
            seed, name, ident = faces.builtin_identity(self.split, i)
            poses, exprs = faces.builtin_motion(seed, 0, self.frames, self.motion_scale)
            frames, landmarks = faces.render_frames(ident, poses, exprs, self.size)
            return dict(frames=frames, landmarks=landmarks, name=f"{name}#builtin#000000#"
                        f"{self.frames:06d}", identity=name, fps=DEFAULT_FPS,
                        params=dict(identity=ident, poses=poses, expressions=exprs))
        v = self.videos[i]
        raw, fps = read_video(v)
        lms = load_landmarks(v) if os.path.exists(landmark_path(v)) else None
        if lms is not None and len(lms) != len(raw):
            warnings.warn(f"{landmark_path(v)}: {len(lms)} landmark rows for {len(raw)} frames; ignored")
            lms = None
        frames, lms = _resize_frames(raw, lms, self.size)
        return dict(frames=frames, landmarks=lms, name=os.path.basename(v.rstrip("/\\")), identity=identity_of(v),
                    fps=fps, params=None)


@dataclass
class Augment:
    """Sec. 3.2's augmentation of a training sample: flip with probability flip_p, the out-of-frame crop with
    probability crop_p; ablations: jitter=False leaves A1 = A2 = A3 = the plain colours, omega=False gives the
    expression network the uncropped A3 frame (the same random draws either way)."""
    flip_p: float = 0.5
    crop_p: float = 0.5
    jitter: bool = True
    omega: bool = True


@dataclass
class BuiltinVideos:
    """The built-in training data: `identities` identities (default 20,000 for train, 32 for test), `videos`
    videos of `frames` frames each per identity, pose and expression amplitude scaled by `motion` (curriculum)."""
    identities: int = None
    videos: int = 4
    frames: int = 100
    motion: float = 1.0


class FaceDataset(torch.utils.data.Dataset):
    """Training samples (Sec. 3.2): n_src source frames and one driving frame of one video of one identity.
    Index i picks identity i % num_identities, then one of its videos at random; all randomness comes from
    (seed, i), so indices >= len(self) give new draws. root=None: built-in identities rendered on the fly
    (`builtin`: BuiltinVideos); else ROOT/split with landmark files.
    The augmentation (`augment`: Augment, or None) follows the authors' release step by step: flip; three
    colour-jitter draws A1, A2, A3 on the uncropped frames; one out-of-frame crop for the A1 and A2 versions of
    all frames; Omega on the uncropped A3 driving frame. Item (sources [N,3,S,S], driving [3,S,S]):
      src, drv            A1 colours, cropped: the encoder's input and the decoder's target
      src_a2, drv_a2      A2 colours, cropped: expression vectors (Eq. 11, 12)
      drv_omega           Omega(A3 driving frame, uncropped): the expression network's usual input (Eq. 12)
      src_full, drv_full  A2 colours, uncropped: keypoints are detected here, then mapped into the crop
      crop [4]            the crop's edges (x0, y0, x1, y1) in normalised coordinates ((-1,-1,1,1): none)
      src_lm, drv_lm      68 landmarks in pixels of the uncropped (flipped) frames
    Without augmentation every image is the plain frame."""

    def __init__(self, root=None, split="train", size=64, num_src=1, augment=True, seed=0, builtin=None, max_tries=10):
        self.root, self.split, self.size, self.num_src, self.seed = root, split, size, num_src, seed
        self.augment = Augment() if augment is True else augment or None
        builtin = builtin or BuiltinVideos()
        self.videos_per_identity, self.frames, self.motion_scale = builtin.videos, builtin.frames, builtin.motion
        self.max_tries, self.skipped, self.bad = max_tries, dict(empty=0, no_landmarks=0, broken=0), set()
        if root is None:
            self.num_identities = builtin.identities or (20000 if split == "train" else 32)
            return
        videos, empty = list_videos(root, split)
        have = [v for v in videos if os.path.exists(landmark_path(v))]
        self.skipped.update(empty=len(empty), no_landmarks=len(videos) - len(have))
        if len(have) < len(videos):
            warnings.warn(f"skipped {len(videos) - len(have)} of {len(videos)} videos in {root}/{split} without a "
                          f"landmark file (<video>{LANDMARK_SUFFIX}); run `python data.py landmarks {root}`")
        if not have:
            raise ValueError(f"no video in {os.path.join(root, split)} has a landmark file <video>{LANDMARK_SUFFIX}; "
                             f"run `python data.py landmarks {root}` first")
        self.by_identity = {}
        for v in have:
            self.by_identity.setdefault(identity_of(v), []).append(v)
        self.identities = sorted(self.by_identity)
        self.num_identities = len(self.identities)

    def __len__(self):
        return self.num_identities

    def rng(self, i):
        return np.random.default_rng([self.seed, i])

    def sample_frames(self, i, rng=None):
        """Un-augmented sample -> {"frames" [n_src+1,3,S,S] (driving last), "landmarks" [n_src+1,68,2] pixels,
        "identity", "video", "frame_idx"}. Broken videos are skipped (one warning each), at most max_tries."""
        rng = self.rng(i) if rng is None else rng
        n = self.num_src + 1
        if self.root is None:
            seed, name, ident = faces.builtin_identity(self.split, i % self.num_identities)
            video = int(rng.integers(self.videos_per_identity))
            idx = rng.choice(self.frames, n, replace=False)
            poses, exprs = faces.builtin_motion(seed, video, self.frames, self.motion_scale, at=idx)
            frames, landmarks = faces.render_frames(ident, poses, exprs, self.size)
            return dict(frames=frames, landmarks=landmarks, identity=name,
                        video=f"{name}#builtin{video:02d}", frame_idx=idx)
        last = None
        for attempt in range(self.max_tries):
            ident = self.identities[i % self.num_identities if attempt == 0 else rng.integers(self.num_identities)]
            ok = [v for v in self.by_identity[ident] if v not in self.bad]
            if not ok:
                continue
            v = ok[rng.integers(len(ok))]
            try:
                lms = load_landmarks(v)
                valid = np.flatnonzero(np.isfinite(lms).all((1, 2)))   # frames without a face are never used
                if len(valid) < n:
                    raise ValueError(f"too short: {len(valid)} frames with a face, {n} needed")
                idx = rng.choice(valid, n, replace=False)
                try:
                    raw = read_frames(v, idx)
                except ValueError as e:         # past the video's end: the landmark file is another video's
                    if getattr(e, "frames", len(lms)) == len(lms):
                        raise
                    raise ValueError(f"{landmark_path(v)}: {len(lms)} landmark rows for {e.frames} frames: it belongs "
                                     f"to another version of the video: delete it and rerun `python data.py "
                                     f"landmarks {self.root}`") from None
                frames, lm = _resize_frames(raw, lms[idx], self.size)
                return dict(frames=frames, landmarks=lm, identity=ident, video=v, frame_idx=idx)
            except (ValueError, OSError) as e:
                self.bad.add(v)
                self.skipped["broken"] += 1
                last = e
                warnings.warn(f"skipping video {v}: {e}")
        raise RuntimeError(f"no valid sample after {self.max_tries} tries in {self.root}/{self.split} "
                           f"({len(self.bad)} broken videos so far; last error: {last})")

    def __getitem__(self, i):
        rng = self.rng(i)
        s = self.sample_frames(i, rng)
        x, lm, S, N = s["frames"], s["landmarks"].astype(np.float32), self.size, self.num_src
        if self.augment and rng.uniform() < self.augment.flip_p:            # flip, landmarks re-indexed
            x, lm = x.flip(-1), flip_landmarks(lm, S)
        x1 = x2 = full = x
        omega, crop = x[N], (-1.0, -1.0, 1.0, 1.0)
        if self.augment:
            a1, a2, a3 = (jitter_params(rng) for _ in range(3))     # three independent draws, each shared
            jit = color_jitter if self.augment.jitter else (lambda img, _: img)   # by all frames of the sample
            x1, x2, x3 = jit(x, a1), jit(x, a2), jit(x[N:], a3)
            box = omega_box(lm[N], S, rng)                          # drawn also when omega is off
            omega = (crop_resize(x3, box, S) if self.augment.omega else x3)[0]
            full = x2                                               # keypoints: A2, before the crop
            if rng.uniform() < self.augment.crop_p:                 # the same crop for all frames
                box = out_of_frame_box(lm[:N], S, rng)
                x1, x2, crop = crop_resize(x1, box, S), crop_resize(x2, box, S), tuple(box_to_crop(box, S))
        return dict(src=x1[:N], src_a2=x2[:N], drv=x1[N], drv_a2=x2[N], drv_omega=omega, src_full=full[:N],
                    drv_full=full[N], crop=torch.tensor(crop, dtype=torch.float32),
                    src_lm=torch.from_numpy(lm[:N]), drv_lm=torch.from_numpy(lm[N]))


# ----------------------------------------------------------------------------------------------------------
# 3. VoxCeleb in FOMM's layout: ROOT/{train,test}/<video>, identity = name before the first '#'

LANDMARK_SUFFIX = ".landmarks.npy"      # id10001#abc#000001#000100.mp4 -> id10001#abc#000001#000100.mp4.landmarks.npy
VOX_LAYOUT = ("expected FOMM's VoxCeleb layout: ROOT/train/ and ROOT/test/ holding videos (.mp4/.gif/.mov files "
            "or folders of image frames) named like id10001#7w0IBEWc9Qw#000993#001143.mp4")


def landmark_path(video):
    return video.rstrip("/\\") + LANDMARK_SUFFIX


def identity_of(video):
    return os.path.basename(video.rstrip("/\\")).split("#")[0]


def list_videos(root, split):
    """-> (sorted video paths of ROOT/split, empty frame folders). ValueError for a missing or empty split."""
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise ValueError(f"dataset folder {d} not found; {VOX_LAYOUT}")
    videos, empty = [], []
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if name.startswith(".") or ".tmp" in name:
            continue
        if os.path.isdir(p):
            (videos if _frame_files(p) else empty).append(p)
        elif name.lower().endswith(VIDEO_EXTS):
            videos.append(p)
    if empty:
        warnings.warn(f"skipped {len(empty)} empty folder(s) without PNG/JPG frames in {d}, e.g. {empty[0]}")
    if not videos:
        raise ValueError(f"no videos in {d}; {VOX_LAYOUT}")
    return videos, empty


def load_landmarks(video):
    """[T,68,2] float32 pixels (NaN rows: no face) stored beside the video; ValueError if missing/malformed."""
    p = landmark_path(video)
    try:
        lm = np.load(p)
    except Exception as e:
        raise ValueError(f"{p}: cannot load landmarks ({e}); run `python data.py landmarks ROOT`") from None
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"{p}: landmarks of shape {lm.shape}, expected [T, 68, 2]")
    return lm.astype(np.float32)


def extract_landmarks(root, detector=None, overwrite=False, progress=True):
    """Run a 68-landmark detector (default LandmarkDetector) over every frame of every video under ROOT/train
    and ROOT/test and store `<video>.landmarks.npy` ([T,68,2] float32 pixels, NaN rows where no face).
    Resumable (videos whose file exists are skipped); files written atomically. -> counts dict."""
    from tqdm import tqdm
    splits = [s for s in ("train", "test") if os.path.isdir(os.path.join(root, s))]
    if not splits:
        raise ValueError(f"{root}: neither train/ nor test/ found; {VOX_LAYOUT}")
    videos = [v for s in splits for v in list_videos(root, s)[0]]
    todo = [v for v in videos if overwrite or not os.path.exists(landmark_path(v))]
    for folder in dict.fromkeys(os.path.dirname(landmark_path(v)) for v in todo):   # before any detection
        cli.check_writable(folder, what="landmarks (written beside the videos) in", folder=True)
    if detector is None and todo:
        detector = LandmarkDetector()
    counts = dict(videos=len(videos), skipped_existing=len(videos) - len(todo), done=0, broken=0, no_face_frames=0)
    for v in tqdm(todo, desc="landmarks", unit="video", disable=not progress):
        try:
            frames = read_frames(v)
        except (ValueError, OSError) as e:
            warnings.warn(f"skipping {v}: {e}")
            counts["broken"] += 1
            continue
        out = np.full((len(frames), 68, 2), np.nan, np.float32)
        for k, fr in enumerate(frames):
            lm = detector(fr)
            if lm is None:
                counts["no_face_frames"] += 1
            else:
                out[k] = lm
        with cli.atomic_path(landmark_path(v)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, out)
        counts["done"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------
# external 68-point landmarks of real faces (iBUG layout, pixels, (x, y))

def largest_face_index(boxes) -> int | None:
    """Index of the box (x0, y0, x1, y1, ...) with the largest area, or None for no boxes."""
    if boxes is None or len(boxes) == 0:
        return None
    areas = [max(float(b[2]) - float(b[0]), 0.0) * max(float(b[3]) - float(b[1]), 0.0) for b in boxes]
    return int(np.argmax(areas))


def select_largest_face(landmarks, boxes=None):
    """landmarks: list of [68,2+] per face (or None); boxes: matching face boxes, or None to use the landmarks'
    bounding boxes. -> np.float32 [68,2] of the largest face, or None."""
    if landmarks is None or len(landmarks) == 0:
        return None
    if boxes is None or len(boxes) != len(landmarks):
        boxes = [(*np.min(lm[:, :2], 0), *np.max(lm[:, :2], 0)) for lm in map(np.asarray, landmarks)]
    return np.asarray(landmarks[largest_face_index(boxes)], dtype=np.float32)[:, :2].copy()


def fan_weight_files():
    """[(filename, url)] of the weights face-alignment downloads: the s3fd face detector and 2D FAN-4."""
    from face_alignment.api import models_urls as fan_urls
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls
    return [(os.path.basename(u), u) for u in (sfd_urls["s3fd"], fan_urls["2DFAN-4"])]


def _hub_checkpoints():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def fan_weights_cached() -> bool:
    try:
        return all(os.path.isfile(os.path.join(_hub_checkpoints(), f)) for f, _ in fan_weight_files())
    except ImportError:
        return False


def dlib_model(name):
    """Path of a model file of the `face-recognition-models` package, or None. Found without importing the
    package: its __init__ needs pkg_resources, which setuptools 81 and newer no longer have."""
    try:
        spec = importlib.util.find_spec("face_recognition_models")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "models", name)
        if os.path.isfile(path):
            return path
    return None


DLIB_LANDMARKS = "shape_predictor_68_face_landmarks.dat"


def dlib_available() -> bool:
    """dlib (`pip install dlib-bin` or `dlib`) and the 68-point model of `face-recognition-models` are there."""
    return importlib.util.find_spec("dlib") is not None and dlib_model(DLIB_LANDMARKS) is not None


def _fan_missing_message(reason: str) -> str:
    try:
        files = " and ".join(f"{f} ({u})" for f, u in fan_weight_files())
    except ImportError:
        files = "face-alignment's s3fd and 2DFAN4 weights (install face-alignment first)"
    return (f"face-alignment landmark detector unavailable ({reason}): it needs {files} in {_hub_checkpoints()} "
            f"(torch hub cache; set TORCH_HOME to move it). Download them there on a machine with internet, or "
            f"`pip install dlib-bin face-recognition-models` and use the dlib backend")


class LandmarkDetector:
    """External 68-point landmark detector, built on the first call: face-alignment's 2D FAN (s3fd face detector),
    or dlib's predictor of `face-recognition-models`. backend "auto": face-alignment if its weights are cached,
    else dlib if installed, else face-alignment (a download attempt). device None: CUDA if available, else CPU."""

    def __init__(self, backend: str = "auto", device=None):
        if backend not in ("auto", "face_alignment", "dlib"):
            raise ValueError(f"unknown landmark backend {backend!r}: use 'auto', 'face_alignment' or 'dlib'")
        self.backend = backend
        self.device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self._impl = None

    def _resolve(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "face_alignment" if fan_weights_cached() or not dlib_available() else "dlib"

    def _load_face_alignment(self):
        try:
            import face_alignment
        except ImportError:
            raise RuntimeError("the face_alignment landmark backend needs `pip install face-alignment`") from None
        try:
            # compile=False: torch.compile would cost minutes on first use and gains little here
            fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=self.device,
                                              flip_input=False, compile=False)
        except Exception as e:
            if fan_weights_cached():
                raise
            raise RuntimeError(_fan_missing_message(f"{type(e).__name__}: {str(e)[:120]}")) from None

        def run(image):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                       # "No faces were detected."
                lms, _, boxes = fa.get_landmarks_from_image(image, return_bboxes=True)
            return select_largest_face(lms, boxes)
        return run

    def _load_dlib(self):
        if not dlib_available():
            raise RuntimeError("the dlib landmark backend needs `pip install dlib-bin face-recognition-models` (dlib "
                               f"and its {DLIB_LANDMARKS}); or use backend 'face_alignment'")
        import dlib
        face_detector = dlib.get_frontal_face_detector()
        predictor = dlib.shape_predictor(dlib_model(DLIB_LANDMARKS))

        def run(image):
            rects = list(face_detector(image, 1))                    # upsample once: finds small faces
            i = largest_face_index([(r.left(), r.top(), r.right(), r.bottom()) for r in rects])
            if i is None:
                return None
            shape = predictor(image, rects[i])
            return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return run

    def __call__(self, image: np.ndarray):
        """image np.uint8 [H,W,3] RGB -> np.float32 [68,2] pixel (x, y) of the largest face, or None."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"LandmarkDetector expects a uint8 [H,W,3] RGB image, got {image.dtype} {image.shape}")
        if self._impl is None:
            self._impl = self._load_dlib() if self._resolve() == "dlib" else self._load_face_alignment()
        return self._impl(np.ascontiguousarray(image))


# ----------------------------------------------------------------------------------------------------------
# faces in a person's own photo and video, framed as VoxCeleb's (reenact.py --crop auto, --paste-back)

CROP_SCALE = 1.8   # crop side / the larger side of the 68 landmarks' box: the built-in faces' (and VoxCeleb's) framing


def face_box(landmarks, scale=CROP_SCALE):
    """The square crop of one face: centred on its 68 landmarks' box, side `scale` x that box's larger side.
    landmarks [68, 2] pixels -> (x0, y0, x1, y1) floats (may reach past the frame: crop_square pads)."""
    lm = np.asarray(landmarks, np.float64)
    return _square(*lm.min(0), *lm.max(0), scale)


def _square(x0, y0, x1, y1, scale=1.0):
    """The square on the centre of box (x0, y0, x1, y1), its side `scale` x the box's larger side."""
    cx, cy, half = (x0 + x1) / 2, (y0 + y1) / 2, scale * max(x1 - x0, y1 - y0) / 2
    return cx - half, cy - half, cx + half, cy + half


def clip_box(landmarks_per_frame, scale=CROP_SCALE):
    """ONE square box (x0, y0, x1, y1) for a whole clip, so the crop does not jitter: the smallest square holding
    the face box of every frame where a face was found (None or NaN: none), or None when no frame has a face."""
    boxes = np.array([face_box(lm, scale) for lm in landmarks_per_frame
                      if lm is not None and np.isfinite(np.asarray(lm, np.float64)).all()])
    return _square(*boxes[:, :2].min(0), *boxes[:, 2:].max(0)) if len(boxes) else None


def centre_box(H, W):
    """The centred square of an H x W frame (the crop without a face): (x0, y0, x1, y1)."""
    s = min(H, W)
    return (W - s) // 2, (H - s) // 2, (W - s) // 2 + s, (H - s) // 2 + s


def crop_square(frames, box, size):
    """uint8 [T, H, W, 3] (or [H, W, 3]) -> float [T, 3, size, size] in [0, 1]: the square box (rounded to whole
    pixels), the frame's edge pixels repeated where the box reaches past the frame, resized (bicubic)."""
    frames = np.asarray(frames)
    frames = frames[None] if frames.ndim == 3 else frames
    H, W = frames.shape[1:3]
    x0, y0 = int(round(box[0])), int(round(box[1]))
    side = max(1, int(round(box[2] - box[0])))
    ys, xs = np.clip(np.arange(y0, y0 + side), 0, H - 1), np.clip(np.arange(x0, x0 + side), 0, W - 1)
    square = frames[:, ys][:, :, xs]                                                  # (T, side, side, 3)
    return resize(torch.from_numpy(np.ascontiguousarray(square)).permute(0, 3, 1, 2).float() / 255.0, size,
                  mode="bicubic")


def paste_back(frame, face, box, feather=0.08):
    """The animated face put back into the full frame: face [3, s, s] in [0, 1] resized to the box, blended into
    uint8 frame [H, W, 3] with a mask that is 1 inside and falls to 0 over the outer `feather` x side of the box
    (no visible seam); pixels outside the box stay the frame's own. -> uint8 [H, W, 3]."""
    H, W = frame.shape[:2]
    x0, y0 = int(round(box[0])), int(round(box[1]))
    side = max(1, int(round(box[2] - box[0])))
    face = resize(face[None].float(), side, mode="bicubic")[0].permute(1, 2, 0).numpy()   # (side, side, 3)
    ramp = np.clip((np.minimum(np.arange(side), np.arange(side)[::-1]) + 0.5) / max(feather * side, 1), 0, 1)
    mask = np.minimum(ramp[:, None], ramp[None, :])[..., None]                         # (side, side, 1)
    out = frame.astype(np.float64) / 255.0
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, H), max(x0, 0), min(x0 + side, W)      # the box inside the frame
    if ya < yb and xa < xb:
        f, m = face[ya - y0:yb - y0, xa - x0:xb - x0], mask[ya - y0:yb - y0, xa - x0:xb - x0]
        out[ya:yb, xa:xb] = m * f + (1 - m) * out[ya:yb, xa:xb]
    return to_uint8(out)


def detect_faces(frames, n, detector, max_frames=16, max_side=640):
    """[landmarks [68, 2] or None] of the largest face in up to `max_frames` evenly spaced frames of a clip of n
    uint8 [H, W, 3] frames (an iterable), each shrunk to at most `max_side` pixels for the detector."""
    step, out = max(1, math.ceil(n / max_frames)), []
    for fr in itertools.islice(frames, 0, n, step):
        k = max(1.0, max(fr.shape[:2]) / max_side)
        small = fr if k == 1 else np.asarray(Image.fromarray(fr).resize((round(fr.shape[1] / k),
                                                                         round(fr.shape[0] / k)), Image.BILINEAR))
        lm = detector(np.ascontiguousarray(small))
        out.append(None if lm is None else (np.asarray(lm, np.float64) + 0.5) * k - 0.5)
    return out


# ----------------------------------------------------------------------------------------------------------
# 4. image and video I/O (numpy uint8 [.., H, W, 3] at this boundary)

DEFAULT_FPS = faces.FPS                  # frame folders and the built-in videos: VoxCeleb's 25 fps
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")   # images and frames of a folder
IMAGE_EXTS += tuple(e for e in (".avif", ".heic") if e in Image.registered_extensions())  # where Pillow reads them
VIDEO_EXTS = (".mp4", ".gif", ".mov", ".avi", ".mkv", ".webm", ".m4v")      # videos read with imageio-ffmpeg
OUTPUT_EXTS = (".mp4", ".mov", ".gif")                                     # videos write_video writes
MAX_SIDE = 4096     # images larger than this a side are shrunk while decoding (bounds the memory)
MAX_RATE = 120      # frames per second a variable-rate video is resampled to at most

# imageio-ffmpeg warns on stderr when a video's frames, read upright as players show them (a phone's rotation
# metadata), are not of its stored size: that is the rotation applied, nothing for a person to act on
logging.getLogger("imageio_ffmpeg").addFilter(lambda r: "different from the source frame size" not in r.getMessage())


def _rgb8(a):
    """Image array (gray, gray+alpha, RGB, RGBA; uint8, uint16, or float in [0, 1]) -> uint8 [H,W,3]."""
    a = np.asarray(a)
    if a.dtype.kind == "f":
        a = to_uint8(a)
    elif a.dtype != np.uint8:
        a = np.clip(np.round(a / 257.0 if a.dtype == np.uint16 else a), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = a[..., None]
    if a.shape[-1] in (2, 4):
        a = a[..., :-1]                         # drop alpha
    return np.ascontiguousarray(np.repeat(a, 3, -1) if a.shape[-1] == 1 else a)


def read_image(path):
    """-> np.uint8 [H,W,3] (16-bit scaled down, float gray as [0, 1] or 0-255, gray repeated, alpha dropped),
    upright (EXIF orientation), at most MAX_SIDE pixels a side (larger images are shrunk while decoding)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty (0 bytes); copy or export the image again")
    try:
        with Image.open(path) as raw:
            if max(raw.size) > MAX_SIDE:       # a JPEG decodes at the scale that keeps >= MAX_SIDE / 2 a side
                k = MAX_SIDE / 2 / max(raw.size)
                raw.draft(None, (max(1, int(raw.width * k)), max(1, int(raw.height * k))))
                raw.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS, reducing_gap=None)
            im = ImageOps.exif_transpose(raw)   # upright as photo viewers show it (EXIF orientation)
            if im.mode.startswith("I"):         # 16-bit (or 32-bit int holding 16-bit) gray
                a = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
            elif im.mode == "F":                # 32-bit float gray: in [0, 1], or 0-255 when it goes past 1
                a = np.nan_to_num(np.asarray(im, dtype=np.float32))
                a = a / 255.0 if a.max(initial=0) > 1 else a
            else:
                a = np.asarray(im) if im.mode in ("L", "LA", "RGB", "RGBA") else np.asarray(im.convert("RGB"))
    except Exception as e:
        again = "; copy or export it again" if "truncated" in str(e) else \
            ": not an image file, or one with the wrong extension" if "cannot identify" in str(e) else ""
        raise ValueError(f"{path}: cannot read image ({e}){again}") from None
    return _rgb8(a)


def is_animated(path):
    """Whether an image file (an animated WebP or PNG) holds several frames: it is then read as a video."""
    if os.path.splitext(path)[1].lower() not in (".webp", ".png") or not os.path.isfile(path):
        return False
    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) > 1
    except Exception:                   # not an image: read_image says why
        return False


def _frame_files(folder):
    """The image files of a frame folder in the order of the numbers in their names (frame2 before frame10); hidden
    files (macOS's ._000001.png beside each frame copied from its disks) are not frames."""
    natural = lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n.lower())]
    return sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS) and not n.startswith(".")),
                  key=natural)


def read_frames(path, indices=None):
    """Frames `indices` (default: all) of a video file or frame folder -> np.uint8 [n,H,W,3]."""
    if os.path.isdir(path):
        files = _frame_files(path)
        indices = list(range(len(files)) if indices is None else indices)
        if not files or max(indices, default=0) >= len(files):
            raise too_short(path, len(files), max(indices, default=0))
        frames = [read_image(os.path.join(path, files[i])) for i in indices]
    else:
        want, got, n = (None if indices is None else set(int(i) for i in indices)), {}, 0
        reader = open_video(path)
        try:
            with reader:
                for n, fr in enumerate(reader, 1):
                    if want is None or n - 1 in want:
                        got[n - 1] = _rgb8(fr)
                    if want is not None and len(got) == len(want):
                        break
        except Exception as e:
            raise video_error(path, e) from None
        missing = [] if want is None else sorted(want - set(got))
        if not got or missing:
            raise too_short(path, n, missing[-1] if missing else 0)
        indices = sorted(got) if indices is None else list(indices)
        frames = [got[k] for k in indices]
    for i, f in zip(indices, frames):
        if f.shape != frames[0].shape:
            raise different_sizes(path, i, f.shape, indices[0], frames[0].shape)
    return np.stack(frames)


def different_sizes(path, k, shape, k0, shape0):
    """The ValueError for frame k of a video or folder whose size differs from frame k0's."""
    name = f" ({_frame_files(path)[k]})" if os.path.isdir(path) else ""
    return ValueError(f"{path}: frame {k}{name} is {shape[1]}x{shape[0]} but frame {k0} is {shape0[1]}x{shape0[0]}; "
                      f"the frames of a clip must have one size: resize or remove the odd ones")


def too_short(path, n, frame):
    """The ValueError for frame `frame` of a clip of n frames; its .frames = n (FaceDataset compares it with the
    rows of the landmark file)."""
    err = ValueError(f"{path}: {n} frames, frame {frame} requested" if n else f"{path}: no frames in it")
    err.frames = n
    return err


# ffmpeg's lines that never say why: its banner, progress and the threads' bookkeeping
FFMPEG_NOISE = re.compile(r"ffmpeg version|built with|configuration:|lib\w+ +\d|Error opening input file|frame=|"
                          r"Conversion failed|Task finished|Terminating thread|Nothing was written|Could not open "
                          r"encoder|Press \[q\]")
# ffmpeg's words for a file that ends too early
TRUNCATED = re.compile(r"partial file|moov atom not found|reached eof|error reading header|End of file")


def video_error(path, err):
    """ValueError for an unreadable video giving ffmpeg's reason (its stderr's telling lines), not its banner; an
    empty or cut-short file (an interrupted download, copy or recording) is said to be one."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return ValueError(f"{path}: the file is empty (0 bytes); copy or export the video again")
    head, _, tail = str(err).partition("=== stderr ===")
    lines = [re.sub(r"^(\[[^]]*\]\s*)+", "", l).strip() for l in tail.splitlines()]
    lines = [l for l in lines if l and not FFMPEG_NOISE.match(l)]
    cut = [l for l in lines if TRUNCATED.search(l)][:1]
    reason = "; ".join(dict.fromkeys([" ".join(head.split())] + cut + lines[-2:]))
    hint = ": the file is cut short or damaged (an interrupted download, copy or recording?); copy or export it " \
           "again" if cut else ""
    return ValueError(f"{path}: cannot read video ({type(err).__name__}: {reason[:300]}){hint}")


def iter_frames(path):
    """The frames of an image, a video file or a folder of frames as np.uint8 [H,W,3], one at a time."""
    if os.path.isdir(path):
        for name in _frame_files(path):
            yield read_image(os.path.join(path, name))
    elif os.path.splitext(path)[1].lower() in IMAGE_EXTS and not is_animated(path):
        yield read_image(path)
    else:
        with open_video(path) as reader:
            frames = iter(reader)
            while True:
                try:
                    fr = next(frames)
                except StopIteration:
                    return
                except Exception as e:
                    raise video_error(path, e) from None
                yield _rgb8(fr)


def read_video(path):
    """mp4/gif/mov file or folder of PNG/JPG frames -> (np.uint8 [T,H,W,3], fps)."""
    fps = video_fps(path)
    return read_frames(path), fps


def video_fps(path):
    """The rate the frames of a video file are read at (video_rate); DEFAULT_FPS for a folder of frames."""
    fps = DEFAULT_FPS
    if os.path.isfile(path):
        fps = video_rate(path)[0]
        if fps is None:                   # a GIF (read by Pillow: ms per frame) or no rate in ffmpeg's description
            with open_video(path) as reader:
                meta = reader.get_meta_data()
            gif = path.lower().endswith(".gif") and meta.get("duration")
            fps = float(1000.0 / meta["duration"] if gif else meta.get("fps") or DEFAULT_FPS)
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such video file or frame folder")
    return fps


@functools.lru_cache(maxsize=1 << 16)
def _streams(path, version):
    """media_streams of an absolute path, cached per (size, mtime) version."""
    import subprocess
    import imageio_ffmpeg
    try:
        text = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True,
                              text=True, errors="replace", timeout=60).stderr
    except subprocess.TimeoutExpired:                   # not media ffmpeg can describe: imageio will say why
        return False, (), None
    hms = re.search(r"Duration: (\d+):(\d+):([\d.]+)", text)
    streams = tuple(re.findall(r"Stream #\S+?: ((?:Video|Audio|Subtitle|Data|Attachment): .*)", text))
    return ("Input #0" in text, streams,
            int(hms.group(1)) * 3600 + int(hms.group(2)) * 60 + float(hms.group(3)) if hms else None)


def media_streams(path):
    """ffmpeg's `-i` description of a media file: (opened, the description of each stream ("Video: h264 ..., 25 fps,
    25 tbr, ...", "Audio: ..."), duration in seconds or None); opened is False when it is not media at all."""
    st = os.stat(path)
    return _streams(os.path.abspath(path), (st.st_size, st.st_mtime_ns))


def cut_short(path, frames, fps):
    """A warning line when a video file decodes to clearly fewer frames than its header's duration holds, else
    None. Only for files without audio: ffmpeg's duration is the longest stream's, and sound may outlast picture."""
    described = media_streams(path) if os.path.isfile(path) and path.lower().endswith(VIDEO_EXTS) else (0, (), None)
    duration = None if any(d.startswith("Audio:") for d in described[1]) else described[2]
    if duration and fps and frames < 0.9 * duration * fps - 1:
        return (f"warning: {path}: its header says {duration:g} s ({round(duration * fps)} frames at {fps:g} fps) but "
                f"only {frames} frames could be decoded: the file is probably cut short; the result has {frames}")
    return None


def video_rate(path):
    """(fps, average) of a video file: the constant rate its frames are read at, and for a stream of variable
    frame rate (no average rate in its header, or one unlike its base rate "tbr") that average, or 0 when unknown
    (else None): such a stream is resampled to its base rate (at most MAX_RATE), frames repeated where it is
    slower, keeping its duration. fps is None when ffmpeg names no rate, and for a GIF (Pillow reads it at its
    own delays). A file with streams but no video stream is refused."""
    if path.lower().endswith(".gif"):
        return None, None
    opened, streams, _ = media_streams(path)
    video = [d for d in streams if d.startswith("Video:") and "attached pic" not in d]   # cover art is not video
    if opened and not video:
        kinds = ", ".join(d.split(":")[0].lower() for d in streams) or "none"
        raise ValueError(f"{path}: no video stream in it (its streams: {kinds}); give a video with picture frames")

    def rate(unit):                                     # "10.94 fps", "20 tbr", "1k tbr" -> float, or None
        found = re.search(rf"([\d.]+)(k?) {unit}\b", video[0]) if video else None
        return float(found.group(1)) * (1000 if found.group(2) else 1) if found else None
    fps, base = rate("fps"), rate("tbr")
    if base and base <= MAX_RATE and (not fps or abs(fps - base) > 0.01 * base):
        return base, fps or 0.0
    return fps or base, None


def open_video(path):
    """imageio's reader of a video file, at the constant rate video_rate gives; one-line errors (video_error)."""
    import imageio.v2 as imageio
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: video not found")
    fps, average = video_rate(path)
    try:
        return imageio.get_reader(path, **({} if average is None else dict(fps=fps)))
    except Exception as e:
        raise video_error(path, e) from None


def input_notices(path):
    """Lines for a person on how an input is read when not as stored (an image larger than MAX_SIDE shrunk, a
    variable-rate video resampled); [] for the rest, and for what cannot be read (the reader says why)."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if os.path.isfile(path) and ext in IMAGE_EXTS:
            with Image.open(path) as im:
                W, H = im.size
            if max(W, H) > MAX_SIDE:
                return [f"notice: {path} is {W}x{H}; read shrunk to at most {MAX_SIDE} pixels a side while "
                        f"decoding, which bounds the memory"]
        elif os.path.isfile(path):
            fps, average = video_rate(path)
            if average is not None:
                mean = f"{average:g} fps on average" if average else "no average rate in its header"
                return [f"notice: {path} has a variable frame rate ({mean}): read at a constant {fps:g} fps, frames "
                        f"repeated where it is slower, so the result keeps its duration"]
    except (OSError, ValueError):
        pass
    return []


# names of files, not folders: a frame folder called results.json or phase1.pt is a mistaken --out
NOT_FRAME_FOLDERS = (".json", ".jsonl", ".pt", ".pth", ".tar", ".npy", ".npz", ".txt", ".csv", ".wav", ".mp3", ".m4a")
FRAME_NAME = re.compile(r"\d{6}\.png")    # the files of a frame-folder output: 000000.png, 000001.png, ...


def is_frame_folder(out):
    """Whether write_video writes `out` as a folder of PNG frames: any name without an OUTPUT_EXTS extension,
    dots included (results.v2); a video or image type it cannot write, or NOT_FRAME_FOLDERS, is refused."""
    ext = os.path.splitext(out.rstrip("/" + os.sep))[1].lower()
    if ext in OUTPUT_EXTS:
        return False
    if ext in VIDEO_EXTS or ext in IMAGE_EXTS or ext in NOT_FRAME_FOLDERS:
        raise ValueError(f"--out {out}: cannot write '{ext}'; use .mp4, .mov, .gif or a folder name (PNG frames)")
    return True


def write_video(path, frames, fps=DEFAULT_FPS, audio=None):
    """frames [T,H,W,3] or any iterable of [H,W,3] frames (uint8, or float in [0, 1]) -> .mp4/.mov (H.264), .gif
    or a folder of PNG frames (is_frame_folder), streamed (a GIF's frames are collected first). A video goes
    through cli.atomic_path; a folder's frames into a hidden staging folder inside it, moved into place (replacing
    the earlier output's frames) once the last is written, one writer at a time. audio: a media file whose first
    audio track an .mp4/.mov gets, cut to the video's length. -> the number of frames."""
    frames = (_rgb8(np.asarray(fr)) for fr in frames)
    ext = os.path.splitext(path)[1].lower()
    n = 0
    if is_frame_folder(path):
        os.makedirs(path, exist_ok=True)
        with cli.only_writer(path):
            for name in os.listdir(path):                   # staging folders of killed writers (none is alive)
                if name.startswith(cli.TEMP_PREFIX) and os.path.isdir(os.path.join(path, name)):
                    shutil.rmtree(os.path.join(path, name), ignore_errors=True)
            staging = tempfile.mkdtemp(prefix=cli.TEMP_PREFIX, dir=path)
            try:
                for n, fr in enumerate(frames, 1):
                    Image.fromarray(fr).save(os.path.join(staging, f"{n - 1:06d}.png"))
                for name in os.listdir(path):               # the earlier output, all of its frames
                    if FRAME_NAME.fullmatch(name):
                        os.remove(os.path.join(path, name))
                for name in os.listdir(staging):
                    os.replace(os.path.join(staging, name), os.path.join(path, name))
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        return n
    import imageio.v2 as imageio
    with cli.atomic_path(path) as tmp:
        if ext == ".gif":   # delays are whole 1/100 s, >= 2 (players show shorter ones at 1/10 s): the frames
            import imageio.v3 as iio                        # shown at that pace, so the clip keeps its duration
            stack = np.stack(list(frames))
            cs = max(2, round(100 / fps))
            shown = np.floor(np.arange(0, len(stack) / fps - 1e-9, cs / 100) * fps + 1e-6).astype(int)
            iio.imwrite(tmp, stack[np.minimum(shown, len(stack) - 1)], duration=cs * 10, loop=0)
            n = len(stack)
        else:
            with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=9, macro_block_size=2,
                                    ffmpeg_log_level="error") as w:
                for n, fr in enumerate(frames, 1):
                    w.append_data(_even(fr))
            if audio is not None and n:
                add_audio(tmp, audio, n / fps)
    return n


def _even(fr):
    """H.264 needs even sides: an odd-sided frame gets its last row / column repeated (imageio would stretch it)."""
    H, W = fr.shape[:2]
    return np.pad(fr, ((0, H % 2), (0, W % 2), (0, 0)), mode="edge") if H % 2 or W % 2 else fr


def add_audio(video, media, seconds):
    """Give the video file `video` the first audio track of `media` (if any), cut to `seconds` (frames copied,
    sound encoded as AAC)."""
    import subprocess
    import imageio_ffmpeg
    with cli.atomic_path(video) as tmp:
        done = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", video, "-i", media,
                               "-map", "0:v:0", "-map", "1:a:0?", "-c:v", "copy", "-c:a", "aac", "-t", f"{seconds:.6f}",
                               tmp], capture_output=True, text=True)
        if done.returncode:
            raise ValueError(f"{media}: cannot add its audio track ({' '.join(done.stderr.split())[-300:]})")


def has_audio(path):
    """Whether a media file has an audio track (ffmpeg's description of its streams says 'Audio:')."""
    return os.path.isfile(path) and any(d.startswith("Audio:") for d in media_streams(path)[1])


# ----------------------------------------------------------------------------------------------------------
# 5. command line: export the built-in data to the VoxCeleb layout, extract landmarks, preview samples

def export(root, videos=8, test_videos=4, frames=64, size=64, fmt="mp4", motion_scale=1.0, progress=True):
    """Write built-in videos as ROOT/{train,test}/id1xxxx#<11 chars>#<start>#<end>.mp4 (or PNG folders) with
    their true landmarks `<video>.landmarks.npy`. Train identities get 2 videos each, test identities 1."""
    from tqdm import tqdm
    if fmt not in ("mp4", "png"):
        raise ValueError(f"--format must be mp4 or png, not {fmt!r}")
    letters = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"))
    jobs = [("train", k // 2, k % 2) for k in range(videos)] + [("test", k, 0) for k in range(test_videos)]
    for split, j, v in tqdm(jobs, desc=f"export {root}", unit="video", disable=not progress):
        seed, name, ident = faces.builtin_identity(split, j)
        poses, exprs = faces.builtin_motion(seed, v, frames, motion_scale)
        out = [faces.render_face(ident, p, e, size) for p, e in zip(poses, exprs)]
        start, ext = 100 * v + 1, ".mp4" if fmt == "mp4" else ""
        yt = "".join(np.random.default_rng([13, seed, v]).choice(letters, 11))
        path = os.path.join(root, split, f"{name}#{yt}#{start:06d}#{start + frames - 1:06d}{ext}")
        write_video(path, to_uint8(np.stack([o[0] for o in out])))
        np.save(landmark_path(path), np.stack([o[1] for o in out]))


def preview(path, root=None, size=64, n=6, num_src=1, seed=0):
    """A picture of n training samples: src, src_a2, drv, drv_a2, drv_omega, src_full, drv_full per row."""
    ds = FaceDataset(root=root, size=size, num_src=num_src, seed=seed)
    rows = []
    for i in range(n):
        s = ds[i]
        rows.append(torch.cat([s["src"][0], s["src_a2"][0], s["drv"], s["drv_a2"], s["drv_omega"], s["src_full"][0],
                               s["drv_full"]], 2))
    with cli.atomic_path(path) as tmp:
        Image.fromarray(to_uint8(torch.cat(rows, 1))).save(tmp)


def main(argv=None):
    p = argparse.ArgumentParser(description="FSRT data: built-in faces, VoxCeleb landmarks, previews.")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="write the built-in data in FOMM's VoxCeleb layout (with true landmarks)")
    e.add_argument("root")
    e.add_argument("--videos", type=int, default=8, help="train videos (2 per identity)")
    e.add_argument("--test-videos", type=int, default=4, help="test videos (1 per identity)")
    e.add_argument("--frames", type=int, default=64)
    e.add_argument("--size", type=int, default=64)
    e.add_argument("--format", choices=("mp4", "png"), default="mp4")
    e.add_argument("--motion", type=float, default=1.0, help="pose/expression range scale")
    lm = sub.add_parser("landmarks", help="68 landmarks of every frame -> <video>.landmarks.npy (resumable)")
    lm.add_argument("root")
    lm.add_argument("--overwrite", action="store_true")
    pv = sub.add_parser("preview", help="a PNG of augmented training samples")
    pv.add_argument("out")
    pv.add_argument("--root", default=None, help="VoxCeleb root (default: built-in faces)")
    pv.add_argument("--size", type=int, default=64)
    pv.add_argument("--n", type=int, default=6)
    return cli.run_command(run, p.parse_args(argv), memory_hint="lower --size or --n")


def run(args):
    cli.check_numbers(args, {"videos": ">= 0", "test_videos": ">= 0", "frames": ">= 1", "size": ">= 1",
                             "motion": ">= 0", "n": ">= 1"})
    if args.cmd == "export":                                   # the output checked before any work
        cli.check_writable(args.root, what="export ROOT", folder=True)
        export(args.root, args.videos, args.test_videos, args.frames, args.size, args.format, args.motion)
    elif args.cmd == "landmarks":
        c = extract_landmarks(args.root, overwrite=args.overwrite)
        print(f"{c['done']} videos done, {c['skipped_existing']} already had landmarks, {c['broken']} unreadable, "
              f"{c['no_face_frames']} frames without a face (stored as NaN)")
    else:
        ext = os.path.splitext(args.out.rstrip("/" + os.sep))[1].lower()
        if os.path.isdir(args.out) or args.out.endswith(("/", os.sep)) or ext not in IMAGE_EXTS:
            raise ValueError(f"preview {args.out}: give an image file name ending in "
                             f"{', '.join(IMAGE_EXTS)} (e.g. preview.png)")
        cli.check_writable(args.out, what="preview")
        preview(args.out, args.root, args.size, args.n)


if __name__ == "__main__":
    sys.exit(main())
