"""Data for FSRT: the augmentations of Sec. 3.2, the training and evaluation datasets, the VoxCeleb loader,
and (last, not in the paper) built-in procedural talking faces whose ground truth is known.

Top to bottom:
  1. augment    flip with iBUG re-indexing, colour jitter A1/A2/A3, the Omega crop, the out-of-frame crop.
  2. datasets   FaceDataset (training samples) and VideoSet (whole videos, evaluation).
  3. VoxCeleb   FOMM's layout ROOT/{train,test}/<video>; identity = name before the first '#'; landmark files
                `<video>.landmarks.npy` ([T,68,2] float32 pixels, NaN rows = no face) made by
                `python data.py landmarks ROOT`.
  4. I/O        read_image, read_video, write_video (imageio + imageio-ffmpeg).
  5. CLI        python data.py export ROOT ... | landmarks ROOT | preview OUT.png
  6. renderer   (not in the paper) render_face(identity, pose, expression, size): 68 iBUG landmarks in 3D,
                posed, projected and drawn with PIL at 2-4x supersampling. Pure function: the ground truth of
                any (cross-)reenactment exists.
  7. videos     (not in the paper) smooth random pose / talking-mouth / blink trajectories, deterministic from
                a seed; train and test identities come from disjoint seed ranges.
Images are torch [N,3,H,W] in [0, 1] inside, numpy uint8 [..., H, W, 3] at the file boundary; landmarks are
pixels (pixel centre i at x = i); boxes are pixel (x0, y0, x1, y1) with x1, y1 exclusive.
"""
import argparse
import math
import os
import re
import sys
import warnings
from dataclasses import astuple, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from keypoints import to_normalized, to_pixels   # the pixel-centre convention

# ----------------------------------------------------------------------------------------------------------
# conversions used throughout

def to_uint8(x):
    """Image(s) in [0, 1] -> uint8, channels last: tensor [..., 3, H, W] -> [..., H, W, 3]; array [..., H, W, 3] kept
    channels last. Clamped and rounded; the one conversion used for video files, sample grids and landmarks."""
    if isinstance(x, torch.Tensor):
        x = x.detach().float().clamp(0, 1).movedim(-3, -1).cpu().numpy()
    return np.round(np.clip(np.asarray(x, dtype=np.float64), 0, 1) * 255).astype(np.uint8)


def resize(x, size):
    """x [N,3,H,W] in [0, 1] -> [N,3,size,size]: bilinear, anti-aliased when shrinking, clamped (the aspect
    ratio may change). The one image resize of the data pipeline (loading, crops)."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)


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
    """The crop edges [e0, e1) in pixels that keep [lo, hi] (clipped to the frame) inside: e0 in 0..floor(lo),
    e1 in ceil(hi)+1..size."""
    lo, hi = min(max(lo, 0.0), size - 1.0), max(min(hi, size - 1.0), 0.0)
    return np.arange(int(math.floor(lo)) + 1), np.arange(int(math.ceil(hi)) + 1, size + 1)


def _edges(lo, hi, size, rng):
    """Random crop edges (e0, e1), each uniform in its _edge_ranges range."""
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
    """Crop edges (e0, e1) as _edges, drawn among those that map the whole uncropped frame [-1, 1] into
    [-2, 2] (the range Eq. 4 encodes uniquely). The release redraws until a crop passes; drawing uniformly
    among the passing pairs is the same distribution, without a loop. No crop always passes."""
    e0, e1 = (r.astype(np.float64) for r in _edge_ranges(lo, hi, size))
    c0, c1 = box_to_crop(e0, size)[:, None], box_to_crop(e1, size)[None, :]      # normalised edges
    centre, half = (c0 + c1) / 2, (c1 - c0) / 2
    ok = (np.abs(-1 - centre) <= 2 * half) & (np.abs(1 - centre) <= 2 * half)
    i, j = np.argwhere(ok)[rng.integers(ok.sum())]
    return int(e0[i]), int(e1[j])


def out_of_frame_box(src_lm, size, rng):
    """The out-of-frame crop (Sec. 3.2 "estimating them before cropping", the release's rules): edges limited
    by the sources' landmark box extended 0.2 x width sideways, 0.5 x height up and 0.15 x height down, and
    accepted only when the whole frame border maps into [-2, 2]: the detector's keypoints of the uncropped
    frames lie in [-1, 1], so theirs in the crop stay encodable. x and y are drawn independently (the
    acceptance test is per axis). src_lm [N,68,2] pixels -> pixel box (x0, y0, x1, y1)."""
    (lx0, ly0), (lx1, ly1) = src_lm.reshape(-1, 2).min(0), src_lm.reshape(-1, 2).max(0)
    w, h = lx1 - lx0, ly1 - ly0
    x0, x1 = _encodable_edges(lx0 - 0.2 * w, lx1 + 0.2 * w, size, rng)
    y0, y1 = _encodable_edges(ly0 - 0.5 * h, ly1 + 0.15 * h, size, rng)
    return x0, y0, x1, y1


def box_to_crop(box, size):
    """Pixel box (x0, y0, x1, y1), x1/y1 exclusive -> crop edges in normalised coordinates."""
    return np.asarray(box, np.float64) / (size / 2) - 1


def map_to_crop(kp, crop):
    """Points [..., 2] normalised in the uncropped frame -> normalised in the crop resized to the full frame:
    (k - centre) / half_size. crop [..., 4] = (x0, y0, x1, y1) broadcasts against kp[..., 0]. torch or numpy."""
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
            seed, name, ident = builtin_identity(self.split, i)
            poses, exprs = builtin_motion(seed, 0, self.frames, self.motion_scale)
            frames, landmarks = render_frames(ident, poses, exprs, self.size)
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


class FaceDataset(torch.utils.data.Dataset):
    """Training samples (Sec. 3.2): n_src source frames and one driving frame of one video of one identity.
    Index i picks identity i % num_identities, then one of its videos at random; all randomness comes from
    (seed, i), so indices >= len(self) are allowed and give new draws (train.py passes epoch * len + j).
    root=None: built-in identities rendered on the fly (`num_identities`, `videos_per_identity` videos of
    `frames` frames each, `motion_scale` for a curriculum); else ROOT/split with landmark files.

    The augmentation follows the authors' release step by step: flip (p = flip_p); three colour-jitter draws
    A1, A2, A3 on the uncropped frames; with p = crop_p one out-of-frame crop for the A1 and A2 versions of
    all frames; Omega on the uncropped A3 driving frame. Item (sources [N,3,S,S], driving [3,S,S]):
      src, drv            A1 colours, cropped: the encoder's input and the decoder's target
      src_a2, drv_a2      A2 colours, cropped: expression vectors (Eq. 11, 12)
      drv_omega           Omega(A3 driving frame, uncropped): the expression network's usual input (Eq. 12)
      src_full, drv_full  A2 colours, uncropped: keypoints are detected here, then mapped into the crop
      crop [4]            the crop's edges (x0, y0, x1, y1) in normalised coordinates ((-1,-1,1,1): none)
      src_lm, drv_lm      68 landmarks in pixels of the uncropped (flipped) frames
    Without augmentation every image is the plain frame. Ablations: jitter=False leaves A1 = A2 = A3 = the
    plain colours, omega=False gives the expression network the uncropped A3 frame."""

    def __init__(self, root=None, split="train", size=64, num_src=1, augment=True, seed=0, num_identities=None,
                 videos_per_identity=4, frames=100, motion_scale=1.0, flip_p=0.5, crop_p=0.5, max_tries=10,
                 jitter=True, omega=True):
        self.root, self.split, self.size, self.num_src, self.augment, self.seed = root, split, size, num_src, \
            augment, seed
        self.jitter, self.omega = jitter, omega      # ablations of Sec. 3.2 (the same random draws either way)
        self.videos_per_identity, self.frames, self.motion_scale = videos_per_identity, frames, motion_scale
        self.flip_p, self.crop_p, self.max_tries = flip_p, crop_p, max_tries
        self.skipped = dict(empty=0, no_landmarks=0, broken=0)
        self.bad = set()
        if root is None:
            self.num_identities = num_identities or (20000 if split == "train" else 32)
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
            seed, name, ident = builtin_identity(self.split, i % self.num_identities)
            video = int(rng.integers(self.videos_per_identity))
            idx = rng.choice(self.frames, n, replace=False)
            poses, exprs = builtin_motion(seed, video, self.frames, self.motion_scale, at=idx)
            frames, landmarks = render_frames(ident, poses, exprs, self.size)
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
                frames, lm = _resize_frames(read_frames(v, idx), lms[idx], self.size)
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
        if self.augment and rng.uniform() < self.flip_p:            # flip, landmarks re-indexed
            x, lm = x.flip(-1), flip_landmarks(lm, S)
        crop = (-1.0, -1.0, 1.0, 1.0)
        if not self.augment:
            return dict(src=x[:N], src_a2=x[:N], drv=x[N], drv_a2=x[N], drv_omega=x[N], src_full=x[:N],
                        drv_full=x[N], crop=torch.tensor(crop), src_lm=torch.from_numpy(lm[:N]),
                        drv_lm=torch.from_numpy(lm[N]))
        a1, a2, a3 = (jitter_params(rng) for _ in range(3))         # three independent draws, each shared
        jit = color_jitter if self.jitter else (lambda img, _: img) # by all frames of the sample
        x1, x2 = jit(x, a1), jit(x, a2)
        box = omega_box(lm[N], S, rng)
        omega = crop_resize(jit(x[N:], a3), box, S)[0] if self.omega else jit(x[N:], a3)[0]
        full = x2                                                   # keypoints: A2, before the crop
        if rng.uniform() < self.crop_p:                             # the same crop for all frames
            box = out_of_frame_box(lm[:N], S, rng)
            x1, x2, crop = crop_resize(x1, box, S), crop_resize(x2, box, S), tuple(box_to_crop(box, S))
        return dict(src=x1[:N], src_a2=x2[:N], drv=x1[N], drv_a2=x2[N], drv_omega=omega, src_full=full[:N],
                    drv_full=full[N], crop=torch.tensor(crop, dtype=torch.float32),
                    src_lm=torch.from_numpy(lm[:N]), drv_lm=torch.from_numpy(lm[N]))


# ----------------------------------------------------------------------------------------------------------
# 3. VoxCeleb in FOMM's layout: ROOT/{train,test}/<video>, identity = name before the first '#'

LANDMARK_SUFFIX = ".landmarks.npy"      # id10001#abc#000001#000100.mp4 -> id10001#abc#000001#000100.mp4.landmarks.npy
EXPECTED = ("expected FOMM's VoxCeleb layout: ROOT/train/ and ROOT/test/ holding videos (.mp4/.gif/.mov files "
            "or folders of PNG/JPG frames) named like id10001#7w0IBEWc9Qw#000993#001143.mp4")


def landmark_path(video):
    return video.rstrip("/\\") + LANDMARK_SUFFIX


def identity_of(video):
    return os.path.basename(video.rstrip("/\\")).split("#")[0]


def list_videos(root, split):
    """-> (sorted video paths of ROOT/split, empty frame folders). ValueError for a missing or empty split."""
    d = os.path.join(root, split)
    if not os.path.isdir(d):
        raise ValueError(f"dataset folder {d} not found; {EXPECTED}")
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
        raise ValueError(f"no videos in {d}; {EXPECTED}")
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
    """Run a 68-landmark detector (default keypoints.LandmarkDetector) over every frame of every video under
    ROOT/train and ROOT/test and store `<video>.landmarks.npy` ([T,68,2] float32 pixels, NaN rows where no
    face). Resumable: videos whose file exists are skipped; files are written atomically. -> counts dict."""
    from tqdm import tqdm
    splits = [s for s in ("train", "test") if os.path.isdir(os.path.join(root, s))]
    if not splits:
        raise ValueError(f"{root}: neither train/ nor test/ found; {EXPECTED}")
    videos = [v for s in splits for v in list_videos(root, s)[0]]
    todo = [v for v in videos if overwrite or not os.path.exists(landmark_path(v))]
    if detector is None and todo:
        from keypoints import LandmarkDetector
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
        tmp = landmark_path(v) + ".tmp"
        with open(tmp, "wb") as fh:
            np.save(fh, out)
        os.replace(tmp, landmark_path(v))
        counts["done"] += 1
    return counts


# ----------------------------------------------------------------------------------------------------------
# 4. image and video I/O (numpy uint8 [.., H, W, 3] at this boundary)

DEFAULT_FPS = 25.0
IMAGE_EXTS, VIDEO_EXTS = (".png", ".jpg", ".jpeg"), (".mp4", ".gif", ".mov")


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
    """-> np.uint8 [H,W,3] (16-bit scaled down, gray repeated, alpha dropped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: image not found")
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I"):         # 16-bit (or 32-bit int holding 16-bit) gray
                a = np.clip(np.asarray(im), 0, 65535).astype(np.uint16)
            else:
                a = np.asarray(im) if im.mode in ("L", "LA", "RGB", "RGBA") else np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ValueError(f"{path}: cannot read image ({e})") from None
    return _rgb8(a)


def _frame_files(folder):
    return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTS))


def read_frames(path, indices=None):
    """Frames `indices` (default: all) of a video file or frame folder -> np.uint8 [n,H,W,3]."""
    if os.path.isdir(path):
        files = _frame_files(path)
        indices = range(len(files)) if indices is None else indices
        if not files or max(indices, default=0) >= len(files):
            raise ValueError(f"{path}: {len(files)} frames, frame {max(indices, default=0)} requested")
        frames = [read_image(os.path.join(path, files[i])) for i in indices]
    else:
        import imageio.v2 as imageio
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: video not found")
        want, got = (None if indices is None else set(int(i) for i in indices)), {}
        try:
            with imageio.get_reader(path) as reader:
                for k, fr in enumerate(reader):
                    if want is None or k in want:
                        got[k] = _rgb8(fr)
                    if want is not None and len(got) == len(want):
                        break
        except Exception as e:
            raise video_error(path, e) from None
        missing = [] if want is None else sorted(want - set(got))
        if not got or missing:
            raise ValueError(f"{path}: video too short or empty ({len(got)} frames read, missing {missing[:3]})")
        frames = [got[k] for k in (sorted(got) if indices is None else indices)]
    if len({f.shape for f in frames}) > 1:
        raise ValueError(f"{path}: frames of different sizes")
    return np.stack(frames)


def video_error(path, err):
    """ValueError for an unreadable video giving ffmpeg's reason (the last lines of its stderr), not its banner."""
    head, _, tail = str(err).partition("=== stderr ===")
    lines = [re.sub(r"^\[[^]]*\]\s*", "", l).strip() for l in tail.splitlines()]
    lines = [l for l in lines if l and not re.match(r"ffmpeg version|built with|configuration:|lib\w+ +\d|"
                                                    r"Error opening input file", l)]
    reason = "; ".join(dict.fromkeys([" ".join(head.split())] + lines[-2:]))
    return ValueError(f"{path}: cannot read video ({type(err).__name__}: {reason[:300]})")


def iter_frames(path):
    """The frames of an image, a video file or a folder of frames as np.uint8 [H,W,3], one at a time: a long
    video is never held in memory."""
    if os.path.isdir(path):
        for name in _frame_files(path):
            yield read_image(os.path.join(path, name))
    elif os.path.splitext(path)[1].lower() in IMAGE_EXTS:
        yield read_image(path)
    else:
        import imageio.v2 as imageio
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: video not found")
        try:
            reader = imageio.get_reader(path)
        except Exception as e:
            raise video_error(path, e) from None
        with reader:
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
    """Frame rate of a video file from its metadata; DEFAULT_FPS for a folder of frames."""
    fps = DEFAULT_FPS
    if os.path.isfile(path):
        import imageio.v2 as imageio
        try:
            with imageio.get_reader(path) as reader:
                meta = reader.get_meta_data()
            fps = float(meta.get("fps") or (1000.0 / meta["duration"] if meta.get("duration") else DEFAULT_FPS))
        except Exception as e:
            raise video_error(path, e) from None
    elif not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such video file or frame folder")
    return fps


def write_video(path, frames, fps=DEFAULT_FPS):
    """frames [T,H,W,3] or any iterable of [H,W,3] frames (uint8, or float in [0, 1]) -> .mp4/.mov (H.264),
    .gif, or (any other name) a folder of PNG frames. An iterable is written as it comes (streaming), except
    for a GIF, whose frames are collected first."""
    frames = (_rgb8(np.asarray(fr)) for fr in frames)
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_EXTS:
        os.makedirs(path, exist_ok=True)
        for k, fr in enumerate(frames):
            Image.fromarray(fr).save(os.path.join(path, f"{k:06d}.png"))
        return
    import imageio.v2 as imageio
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{ext}"                 # written aside, then moved: never a half-written video
    try:
        if ext == ".gif":
            import imageio.v3 as iio
            iio.imwrite(tmp, np.stack(list(frames)), duration=1000.0 / fps, loop=0)
        else:
            with imageio.get_writer(tmp, fps=fps, codec="libx264", quality=9, macro_block_size=2,
                                    ffmpeg_log_level="error") as w:
                for fr in frames:
                    w.append_data(fr)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):              # only after a failure or an interruption
            os.remove(tmp)


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
        seed, name, ident = builtin_identity(split, j)
        poses, exprs = builtin_motion(seed, v, frames, motion_scale)
        out = [render_face(ident, p, e, size) for p, e in zip(poses, exprs)]
        start = 100 * v + 1
        yt = "".join(np.random.default_rng([13, seed, v]).choice(letters, 11))
        path = os.path.join(root, split, f"{name}#{yt}#{start:06d}#{start + frames - 1:06d}" + (".mp4" if fmt == "mp4" else ""))
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
    Image.fromarray(to_uint8(torch.cat(rows, 1))).save(path)


def check_numbers(args, rules):
    """rules {"warmup": ">= 0 (0 = no warm-up)", "lr": "> 0"}: a one-line ValueError for the first option
    (set, not None) outside its range; NaN is always refused."""
    for name, rule in rules.items():
        v = getattr(args, name, None)     # options of another subcommand are absent
        values = v if isinstance(v, (list, tuple)) else [v]
        op, bound = rule.split()[:2]
        for x in values:
            if x is not None and (math.isnan(x) or not (x >= float(bound) if op == ">=" else x > float(bound))):
                raise ValueError(f"--{name.replace('_', '-')} {x}: must be {rule}")


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
    args = p.parse_args(argv)
    try:
        check_numbers(args, {"videos": ">= 0", "test_videos": ">= 0", "frames": ">= 1", "size": ">= 1",
                             "motion": ">= 0", "n": ">= 1"})
        if args.cmd == "export":
            export(args.root, args.videos, args.test_videos, args.frames, args.size, args.format, args.motion)
        elif args.cmd == "landmarks":
            c = extract_landmarks(args.root, overwrite=args.overwrite)
            print(f"{c['done']} videos done, {c['skipped_existing']} already had landmarks, {c['broken']} unreadable, "
                  f"{c['no_face_frames']} frames without a face (stored as NaN)")
        else:
            preview(args.out, args.root, args.size, args.n)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ==========================================================================================================
# NOT IN THE PAPER: built-in procedural talking faces (the renderer and its videos), a data set whose
# ground truth is known for any (cross-)reenactment; used when --data is not given.
# ==========================================================================================================

# ----------------------------------------------------------------------------------------------------------
# 6. renderer

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

    def vector(self):               # numeric features for probes (background_seed left out)
        return np.array([v for x in astuple(self)[:-1] for v in np.atleast_1d(x)], np.float64)


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
    up = eh * (1 - E.blink_l) - 0.3 * eh * E.blink_l               # eye 36..41 (image left)
    lo = -0.75 * eh * (1 - E.blink_l) - 0.3 * eh * E.blink_l
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
                     ym + np.array([0.07 * sm, 0.03 * o + .02 * sm, 0.03 * o + .01 * sm, 0.03 * o + .02 * sm, 0.07 * sm]),
                     np.array([0.86, 0.97, 0.99, 0.97, 0.86]))
    p[65:68] = _xyz(mw * np.array([0.35, 0, -0.35]), low_in[::-1], np.array([0.96, 0.98, 0.96]) - 0.05 * o)
    p[22:27] = p[21:16:-1] * [-1, 1, 1]                             # mirror brows and the right eye
    up = eh * (1 - E.blink_r) - 0.3 * eh * E.blink_r
    lo = -0.75 * eh * (1 - E.blink_r) - 0.3 * eh * E.blink_r
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


_DIRS = np.stack([np.cos(np.linspace(0, 2 * np.pi, 64, endpoint=False)),
                  np.sin(np.linspace(0, 2 * np.pi, 64, endpoint=False))], 1)


def _hull(pts):
    """Convex hull of [M,2] points, vertices in angular order: the extreme point in each of 64 directions
    (vectorised; may skip a vertex between two sampled directions, which a smooth outline never misses)."""
    idx = np.argmax(pts @ _DIRS.T, 0)
    return pts[idx[idx != np.roll(idx, 1)]]


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


def render_face(identity, pose, expression, size=64):
    """-> (image np.float32 [S,S,3] in [0,1], landmarks np.float32 [68,2] in pixels, pixel centre i at x=i).

    Painter's order: background, shoulders, neck, long hair, hair volume (the skull silhouette), face, eyes
    (sclera, iris, pupil, lids clip them), brows, nose, lips and mouth interior. Anti-aliased by drawing at
    `_supersample(size)` x the size and box-downsampling."""
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
    lm = P["lm"]
    unit = s * C / 2                                    # canvas pixels per model unit
    skin, hair = _col(identity.skin), _col(identity.hair)
    img, mask = Image.new("RGB", (C, C)), Image.new("L", (C, C))   # foreground over black + its coverage
    d, dm = ImageDraw.Draw(img), ImageDraw.Draw(mask)

    def poly(pts, col, silhouette=False):
        pts = np.asarray(pts).ravel().tolist()
        d.polygon(pts, fill=col)
        if silhouette:
            dm.polygon(pts, fill=255)

    neck_top = P["neck"][:2].mean(0)
    down = (P["neck"][2:].mean(0) - neck_top) / np.linalg.norm(P["neck"][2:].mean(0) - neck_top)
    side = np.array([-down[1], down[0]])
    sh = neck_top + down * 1.35 * unit
    poly([sh - side * 0.9 * unit, sh + side * 0.9 * unit, sh + side * 3 * unit + down * 2 * unit,
          sh - side * 3 * unit + down * 2 * unit], _col(identity.cloth), True)
    poly(P["neck"], _col(identity.skin, 0.85), True)
    if identity.hair_style == 1:
        poly(_hull(P["longhair"]), hair, True)
    poly(_skull_outline(R, to_canvas), skin if identity.hair_style == 2 else hair, True)
    face = _hull(np.concatenate([lm[:17], P["fore"], P["brow"][10:], lm[36:48]]))   # far-side brow and eye
    poly(_catmull(face, 3, closed=True), skin, True)                    # stay on the skin when yawed
    for i in (36, 42):                                   # eyes
        e = lm[i:i + 6]
        poly(_catmull(e, 3, closed=True), (240, 240, 235))
        c, r = e.mean(0), 0.085 * identity.eye_size * unit
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=_col(identity.eye_colour))
        d.ellipse([c[0] - r / 2.2, c[1] - r / 2.2, c[0] + r / 2.2, c[1] + r / 2.2], fill=(15, 12, 12))
    for j in (0, 4):
        upper, lower = P["lid_up"][j:j + 4], P["lid_lo"][j:j + 4]
        lid = _catmull(lm[[36, 37, 38, 39]] if j == 0 else lm[[42, 43, 44, 45]], 3)
        low = _catmull(lm[[39, 40, 41, 36]] if j == 0 else lm[[45, 46, 47, 42]], 3)
        poly(np.concatenate([lid, upper[::-1]]), skin)
        poly(np.concatenate([low, lower[::-1]]), skin)
        d.line(lid.ravel().tolist(), fill=(40, 25, 20), width=max(1, round(0.025 * unit)))
    brow_col = _col(identity.hair, 0.7)
    for a, b in ((0, 5), (5, 10)):
        poly(np.concatenate([P["brow"][a:b], P["brow"][10 + a:10 + b][::-1]]), brow_col, True)
    poly(_hull(lm[27:36]), _col(identity.skin, 0.88))
    for i in (32, 34):
        q, r = 0.75 * lm[i] + 0.25 * lm[33], 0.035 * unit
        d.ellipse([q[0] - r, q[1] - r * 0.7, q[0] + r, q[1] + r * 0.7], fill=_col(identity.skin, 0.35))
    poly(_catmull(lm[48:60], 3, closed=True), _col(identity.lip))
    inner = _catmull(lm[60:68], 3, closed=True)
    if expression.mouth_open > 0.02:
        poly(inner, (60, 15, 20))
        teeth = np.concatenate([_catmull(lm[60:65], 3), (_catmull(lm[60:65], 3) + (lm[66] - lm[62]) * 0.3)[::-1]])
        poly(teeth, (235, 232, 220))
    d.line(_catmull(lm[60:65], 3).ravel().tolist(), fill=_col(identity.lip, 0.45), width=max(1, round(0.02 * unit)))
    fg = np.asarray(img.reduce(f), dtype=np.float32) / 255.0           # box filter = coverage anti-aliasing
    cover = np.asarray(mask.reduce(f), dtype=np.float32)[..., None] / 255.0
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
# 7. built-in videos: one identity each, smooth random motion, talking mouth and blinks

TEST_SEED0 = 1_000_000        # identity seeds: train j -> j, test j -> TEST_SEED0 + j (disjoint ranges)


def builtin_identity(split, j):
    """The j-th built-in identity of a split -> (seed, name, Identity)."""
    seed = j if split == "train" else TEST_SEED0 + j
    return seed, f"id{10001 + seed}", sample_identity(np.random.default_rng([7, seed]))


def builtin_motion(seed, video, frames, motion_scale=1.0, at=None, fps=DEFAULT_FPS):
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


if __name__ == "__main__":
    sys.exit(main())
