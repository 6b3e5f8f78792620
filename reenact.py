"""
Face reenactment with a trained FSRT model (paper Sec. 3.4): source image(s) + driving video -> video.

    python reenact.py --checkpoint CKPT --source A.png [B.png ...] --driving D.mp4 --out R.mp4
    python reenact.py --checkpoint CKPT --source S.mp4 --source-frames 0 -1 --driving D.mp4 --out R.gif
    python reenact.py --checkpoint CKPT --source A.png --driving D.mp4 --relative --find-best-frame --out R.mp4
    python reenact.py --checkpoint vox256.pt --kp-detector kp_detector.pt --source A.png --driving D.mp4 --out R.mp4
    python reenact.py                                  # built-in demo (checkpoints/builtin_64.pt)
    torchrun --nproc_per_node 2 reenact.py ...         # frames split across processes, rank 0 writes

Motion transfer (Sec. 3.4, following FOMM [38]):
  absolute (default)  k = k_D                                   driving keypoints as-is
  relative            k = k_S + (k_D - k_D,init) * s            s = 1, or with --adapt-scale
                      s = sqrt(hull area of k_S) / sqrt(hull area of k_D,init)
  The initial driving frame is frame 0, --best-frame N, or with --find-best-frame the frame whose
  face-alignment landmarks (centred, divided by the square root of their hull area) are closest to the
  source's. FOMM animates forward and backward from that frame; FSRT renders every frame independently
  (no recurrent state), so that is the same as using it as k_D,init for all frames. The expression vector
  of each driving frame is always used as-is (Sec. 3.4: expression is encoded absolutely).

The per-frame loop `reenact()` is shared with metrics.py: the sources are encoded once (set-latents and
the decoder's attention keys/values once per source set), then per batch of driving frames: keypoints and
expression, motion transfer, chunked decoding of all pixels. Its output is clamped to [0, 1].

Inputs: PNG/JPG images, mp4/gif/mov videos or folders of frames, any size (centre-cropped to a square and
resized to the model's size, with a notice), gray/RGBA/16-bit converted (data.read_image). Output by the
extension of --out (.mp4/.mov/.gif, or a folder of PNGs) at the driving video's frame rate. The driving
video is streamed: read and resized frame by frame, rendered and written 32 frames at a time, so memory is
bounded by the model, not by the clip (a GIF's output frames are collected before writing). An --out that
is, or lies inside, an input is refused. Errors end with one line `error: ...` on stderr and exit code 2.

Checkpoints are recognised by content: train.py's, or the authors' release (vox256.pt, vox256_2Source.pt)
with --kp-detector kp_detector.pt (srt.load_release; 256x256). --precision auto (default) decodes in
bfloat16 where a short matmul probe shows bf16 faster than fp32 on this machine, in fp32 elsewhere.
"""
import argparse
import contextlib
import errno
import functools
import itertools
import os
import re
import signal
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import data
import srt

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_EXTS = (".mp4", ".gif", ".mov", ".avi", ".mkv", ".webm", ".m4v")
BUILTIN_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "builtin_64.pt")


# -----------------------------------------------------------------------------
# motion functions (pure)

def hull_area(points):
    """Area of the convex hull of 2-d points [N, 2] (Andrew's monotone chain + shoelace formula).
    Degenerate sets (fewer than 3 distinct points, or all collinear) have area 0."""
    if torch.is_tensor(points):
        points = points.detach().float().cpu().numpy()
    p = np.unique(np.asarray(points, dtype=np.float64).reshape(-1, 2), axis=0)  # sorted by x, then y
    if len(p) < 3:
        return 0.0

    def cross(o, a, b):  # z of (a - o) x (b - o); > 0 for a counter-clockwise turn
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(pts):
        chain = []
        for q in pts:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], q) <= 0:
                chain.pop()
            chain.append(q)
        return chain[:-1]  # the last point starts the other half

    hull = np.array(half(p) + half(p[::-1]))
    if len(hull) < 3:
        return 0.0
    x, y = hull[:, 0], hull[:, 1]
    return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def relative_keypoints(kp_source, kp_driving, kp_driving_initial, adapt_scale=False):
    """Relative motion transfer (Sec. 3.4, FOMM's `normalize_kp`):
        k = k_S + (k_D - k_D,init) * s,   s = sqrt(area(hull(k_S))) / sqrt(area(hull(k_D,init)))
    with s = 1 unless adapt_scale. Shapes broadcast: kp_source [B|1, K, 2], kp_driving [B, K, 2],
    kp_driving_initial [B|1, K, 2] -> [B, K, 2]."""
    scale = 1.0
    if adapt_scale:
        ks, kd = torch.broadcast_tensors(kp_source, kp_driving_initial)
        ks, kd = ks.reshape(-1, *ks.shape[-2:]), kd.reshape(-1, *kd.shape[-2:])
        s = []
        for a, b in zip(ks, kd):
            area_s, area_d = hull_area(a), hull_area(b)
            if area_d <= 0:
                raise ValueError("the initial driving frame's keypoints are degenerate (zero hull area), so "
                                 "the motion scale cannot be adapted; run without --adapt-scale")
            s.append(np.sqrt(area_s) / np.sqrt(area_d))
        scale = torch.tensor(s, dtype=kp_driving.dtype, device=kp_driving.device)
        scale = scale.reshape(*torch.broadcast_shapes(kp_source.shape, kp_driving_initial.shape)[:-2], 1, 1)
    return kp_source + (kp_driving - kp_driving_initial) * scale


def normalize_landmarks(lm):
    """Landmarks [68, 2] -> centred and divided by sqrt of their hull area (scale- and shift-free)."""
    lm = np.asarray(lm, dtype=np.float64)
    area = hull_area(lm)
    if not area > 0:
        raise ValueError("landmarks are degenerate (zero hull area)")
    return (lm - lm.mean(axis=0)) / np.sqrt(area)


def find_best_frame(source_lm, driving_lms):
    """Index of the driving frame whose normalised landmarks are closest (sum of squared differences) to
    the source's. Frames without a face (None, or any NaN) or with degenerate landmarks are skipped."""
    def usable(lm):
        return lm is not None and np.isfinite(np.asarray(lm, dtype=np.float64)).all() and hull_area(lm) > 0

    if not usable(source_lm):
        raise ValueError("no face landmarks found in the source image, so the best driving frame cannot be "
                         "found; use --best-frame N instead")
    src = normalize_landmarks(source_lm)
    best, best_err = None, np.inf
    for i, lm in enumerate(driving_lms):
        if not usable(lm):
            continue
        err = float(((src - normalize_landmarks(lm)) ** 2).sum())
        if err < best_err:
            best, best_err = i, err
    if best is None:
        raise ValueError("no face landmarks found in any driving frame; use --best-frame N instead")
    return best


# -----------------------------------------------------------------------------
# the per-frame loop (shared with metrics.py)

@functools.lru_cache(maxsize=None)
def bf16_speedup(device="cpu", n=512, repeat=3):
    """fp32 time / bf16 time of an [n, 2n] @ [2n, 2n] matmul on this device (best of `repeat`, ~0.1 s)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, 2 * n, device=device).to(dtype)
        b = torch.randn(2 * n, 2 * n, device=device).to(dtype)
        times = []
        for _ in range(repeat + 1):                                   # the first call warms up
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        best[dtype] = min(times[1:])
    return best[torch.float32] / best[torch.bfloat16]


def pick_precision(precision, device):
    """'fp32' / 'bf16' as given; 'auto' -> 'bf16' where the probe shows bf16 matmul >= 1.1x faster than fp32
    (CPUs with avx512_bf16/AMX, GPUs with bf16 tensor cores), else 'fp32'. -> (precision, reason)."""
    if precision != "auto":
        return precision, "as asked"
    speedup = bf16_speedup(str(device))
    return ("bf16" if speedup >= 1.1 else "fp32"), f"auto: bf16 matmul {speedup:.2f}x the speed of fp32 here"


def bf16_autocast(device, bf16):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.no_grad()
def reenact(model, sources, driving, relative=False, adapt_scale=False, initial_frame=0, chunk=None,
            bf16=False, batch=4, progress=False, kp_source=None, frames=None):
    """Animate the source image(s) with the driving frames.

    sources [N, 3, S, S] (or [3, S, S]) and driving [T, 3, S, S], float in [0, 1], S = model.cfg.image_size.
    relative: k = k_S + (k_D - k_D,init)*s with k_D,init from driving[initial_frame] (else absolute k = k_D).
    kp_source [1, K, 2]: the source keypoints for relative motion (default: those of the first source).
    frames: optional slice or index list of driving frames to render (k_D,init is still driving[initial_frame];
            used to split a video across processes). chunk: pixels decoded at once. bf16: autocast.
    Returns [T', 3, S, S] float32 on driving's device, CLAMPED to [0, 1] (render itself is not clamped;
    every user of this function wants displayable frames).
    """
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype   # inputs follow the model
    S = model.cfg.image_size
    if sources.dim() == 3:
        sources = sources[None]
    if sources.dim() != 4 or sources.shape[1:] != (3, S, S) or driving.dim() != 4 or driving.shape[1:] != (3, S, S):
        raise ValueError(f"reenact expects sources [N,3,{S},{S}] and driving [T,3,{S},{S}], "
                         f"got {tuple(sources.shape)} and {tuple(driving.shape)}")
    if relative and not model.cfg.use_keypoints:
        raise ValueError("this model has no keypoint input (the n_K = 0 ablation), so relative motion transfer "
                         "is impossible (Sec. 4.2); use absolute motion")
    T = driving.shape[0]
    idx = np.arange(T)[frames] if frames is not None else np.arange(T)
    out = torch.empty(len(idx), 3, S, S, dtype=torch.float32, device=driving.device)
    was_training = model.training
    model.eval()
    try:
        with bf16_autocast(device, bf16):
            # sources: encoded once per source set (Eq. (6)); keys/values of the decoder's cross-attention once
            kp_src, expr_src = model.keypoints_and_expression(sources.to(device, dtype))      # (N, K, 2), (N, E)
            set_latents = model.encode(sources.to(device, dtype)[None], kp_src[None], expr_src[None])  # (1, N*T', D)
            kv = model.latent_kv(set_latents)
            if relative:
                if not -T <= initial_frame < T:
                    raise ValueError(f"initial frame {initial_frame} is outside the driving video ({T} frames)")
                i0 = initial_frame % T
                kp_init = model.keypoints_and_expression(driving[i0:i0 + 1].to(device, dtype))[0].float()  # (1, K, 2)
                kp_source = (kp_src[:1] if kp_source is None else kp_source).float().to(device)

        bar = tqdm(total=len(idx), unit="frame", disable=not progress, dynamic_ncols=True)
        for t0 in range(0, len(idx), max(1, batch)):
            sel = idx[t0:t0 + max(1, batch)]
            drv = driving[torch.as_tensor(sel, device=driving.device)].to(device, dtype)    # (b, 3, S, S)
            with bf16_autocast(device, bf16):
                kp_drv, expr_drv = model.keypoints_and_expression(drv)                 # (b, K, 2), (b, E)
                kp_drv = kp_drv.float()
                if relative:  # expression stays the driving frame's own (Sec. 3.4)
                    kp_drv = relative_keypoints(kp_source, kp_drv, kp_init, adapt_scale)
                # one source set for b frames: the decoder folds the frames into the pixel axis
                rgb = model.render(set_latents, kp_drv, expr_drv, size=(S, S), chunk=chunk, kv=kv)  # (b, 3, S, S)
            out[t0:t0 + len(sel)] = rgb.float().clamp(0, 1).to(out.device)
            bar.update(len(sel))
        bar.close()
    finally:
        model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# command line: inputs, outputs, processes

def check_input(path):
    """An image, a video or a folder of frames that exists -> 'image' or 'frames' (a ValueError otherwise)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) or ext in VIDEO_EXTS:
        return "frames"
    if ext in IMAGE_EXTS:
        return "image"
    raise ValueError(f"{path}: unknown file type '{ext}'; use PNG/JPG images, "
                     f"{'/'.join(e[1:] for e in VIDEO_EXTS)} videos or a folder of frames")


def count_frames(path, limit=None):
    """Frames in a video or folder (at most `limit`), decoded one at a time and never kept."""
    n = sum(1 for _ in itertools.islice(data.iter_frames(path), limit))
    if n == 0:
        raise ValueError(f"{path}: no frames in it")
    return n


def load_source(path, indices):
    """A source image (indices must address its one frame) or frames `indices` of a video or folder ->
    uint8 [n, H, W, 3]. Only the wanted frames are kept in memory."""
    if check_input(path) == "image":
        pick_frames(1, indices, f"--source-frames for the still image {path}")
        return data.read_image(path)[None]
    return data.read_frames(path, pick_frames(count_frames(path), indices, path))


class Driving:
    """The driving frames: a file or folder is streamed from disk, each frame resized to the model's size as
    soon as it is read (a long or large video is never held in memory; with max_frames only that many frames
    are decoded); the built-in demo's frames are in memory already (float [T, 3, S, S])."""
    CHUNK = 32      # frames rendered per call of reenact()

    def __init__(self, path=None, frames=None, max_frames=None):
        self.path, self.frames = path, frames
        if frames is not None:
            self.n, self.fps = len(frames), None
        elif check_input(path) == "image":
            self.n, self.fps = 1, None
        else:
            self.n, self.fps = count_frames(path, max_frames), data.video_fps(path)

    def __len__(self):
        return self.n

    def raw(self, start=0):
        """The frames from `start` as they are, uint8 [H, W, 3], one at a time."""
        if self.frames is not None:
            yield from data.to_uint8(self.frames[start:])
            return
        image = check_input(self.path) == "image"
        yield from itertools.islice(iter([data.read_image(self.path)]) if image else data.iter_frames(self.path),
                                    start, self.n)

    def chunks(self, S, log=print, start=0):
        """float [n, 3, S, S] in [0, 1], CHUNK frames at a time (n < CHUNK for the last)."""
        if self.frames is not None:
            yield from (self.frames[t:t + self.CHUNK] for t in range(start, self.n, self.CHUNK))
            return
        block, shape = [], None
        for f in self.raw(start):
            if shape is not None and f.shape != shape:
                raise ValueError(f"{self.path}: frames of different sizes")
            block.append(to_model_size(f[None], S, self.path, log if shape is None else lambda *a: None)[1])
            shape = f.shape
            if len(block) == self.CHUNK:
                yield torch.cat(block)
                block = []
        if block:
            yield torch.cat(block)


def to_model_size(frames, size, name, log=print):
    """uint8 [T, H, W, 3] of any size -> centre-cropped square uint8 [T, s, s, 3] (kept for landmark
    detection) and float [T, 3, size, size] in [0, 1]."""
    T, H, W, _ = frames.shape
    s = min(H, W)
    y0, x0 = (H - s) // 2, (W - s) // 2
    square = frames[:, y0:y0 + s, x0:x0 + s].copy()                          # (T, s, s, 3)
    x = torch.from_numpy(square).permute(0, 3, 1, 2).float() / 255.0
    if (H, W) != (size, size):
        log(f"notice: {name} is {W}x{H}; centre-cropped to {s}x{s} and resized to {size}x{size}")
        if s != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=s > size).clamp(0, 1)
    return square, x


def pick_frames(n, indices, name):
    out = []
    for i in indices:
        if not -n <= i < n:
            raise ValueError(f"{name}: frame {i} requested but it has {n} frames")
        out.append(i % n)
    return out


# -----------------------------------------------------------------------------
# command-line checks shared with train.py and metrics.py: fail early, in one line

def error_line(err):
    """An exception -> one line saying what went wrong (out of memory and a full disk said plainly)."""
    msg = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, MemoryError) or re.search(r"out of memory|can't allocate memory|Cannot allocate memory", msg):
        msg = (f"out of memory ({msg[:300]}): lower --batch-size, --pixels, --chunk or the image size, "
               f"or close other programs")
    elif isinstance(err, OSError) and err.errno == errno.ENOSPC:
        msg = f"the disk is full: cannot write {err.filename or ''} ({err.strerror}); free some space and rerun"
    elif "No space left on device" in msg:                     # e.g. reported by ffmpeg while writing a video
        msg = f"the disk is full ({msg[:300]}); free some space and rerun"
    return msg if len(msg) <= 1000 else msg[:1000] + " ..."


def fail(err, code=2):
    """Print `error: ...` (one line) on stderr and return the exit code."""
    print(f"error: {error_line(err)}", file=sys.stderr)
    return code


# exceptions that end a command line with one line (anything else is a bug and keeps its traceback)
EXPECTED = (ValueError, FileNotFoundError, RuntimeError, OSError, MemoryError)


def check_device(name):
    """--device: a device torch knows and this machine has (a one-line ValueError otherwise)."""
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {name!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available on this machine ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")


def available_memory(device):
    """Bytes that can still be allocated on `device` (CUDA: free GPU memory; CPU: MemAvailable), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(next(l for l in f if l.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def check_writable(path, what="--out", folder=False):
    """Fail now, before long work, if `path` (a file, or with folder=True a folder of files; missing parent
    folders will be created) cannot be written. -> ValueError with the reason."""
    p = os.path.abspath(path)
    if os.path.isdir(p) and not folder:
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if os.path.exists(p) and not os.path.isdir(p) and folder:
        raise ValueError(f"{what} {path} is a file; give a folder")
    d = p if folder else os.path.dirname(p)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise ValueError(f"{what} {path}: {d} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {d} ({e.strerror or e}); choose another place") from None


def refuse_overwriting_inputs(out, inputs, what="--out", frame_folder=False):
    """Refuse an output path that is one of the inputs or lies inside an input folder (and, for a folder of
    PNG frames, an input that is one of the frame files about to be written). inputs: [(option, path)]."""
    o = os.path.realpath(out)
    for name, path in inputs:
        if path is None or not os.path.exists(path):
            continue
        i = os.path.realpath(path)
        same = o == i or (os.path.exists(o) and os.path.samefile(o, i))
        inside = os.path.isdir(i) and o.startswith(i.rstrip(os.sep) + os.sep)
        clash = frame_folder and os.path.dirname(i) == o and re.fullmatch(r"\d{6}\.png", os.path.basename(i))
        if same or inside or clash:
            where = "is" if same else "is inside" if inside else "would overwrite"
            raise ValueError(f"{what} {out} {where} the input {name} {path}; writing it would destroy the input: "
                             f"choose another output path")


STOP = 0      # the signal number of the first SIGINT/SIGTERM received, 0 before


def on_stop_signals(message):
    """First SIGINT/SIGTERM: set STOP and print `message`; the default action is restored for both signals,
    so a second one ends the process at once (exit 130 / 143, even inside a long computation)."""
    def handler(signum, frame):
        global STOP
        STOP = signum
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        print(f"\n{message}", file=sys.stderr, flush=True)
    global STOP
    STOP = 0
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def exit_code_of(signum):
    """The shell's code for a run stopped by a signal: 128 + signal number (SIGINT 130, SIGTERM 143)."""
    return 128 + int(signum)


def build_parser():
    p = argparse.ArgumentParser(description="FSRT face reenactment (Sec. 3.4). With no --source/--driving: "
                                            "a built-in demo on the procedural test data.")
    p.add_argument("--checkpoint", help=f"train.py checkpoint, or the authors' vox256.pt / vox256_2Source.pt "
                                        f"(default: {os.path.relpath(BUILTIN_CKPT)})")
    p.add_argument("--kp-detector", help="the authors' kp_detector.pt, with their --checkpoint vox256.pt")
    p.add_argument("--source", nargs="+", help="source image(s), video(s) or folder(s) of frames")
    p.add_argument("--source-frames", nargs="+", type=int, default=[0],
                   help="frames taken from each source video (negative counts from the end), e.g. 0 -1")
    p.add_argument("--driving", help="driving video (mp4/gif/mov), folder of frames, or image")
    p.add_argument("--out", help="output: .mp4, .gif or a folder (PNG frames); demo default: demo.mp4")
    p.add_argument("--relative", action="store_true", help="relative motion transfer (default: absolute)")
    p.add_argument("--adapt-scale", action="store_true", help="scale relative motion by the hull-size ratio")
    p.add_argument("--find-best-frame", action="store_true",
                   help="initial driving frame = best landmark match to the source (implies --relative)")
    p.add_argument("--best-frame", type=int, default=None, help="initial driving frame (implies --relative)")
    p.add_argument("--side-by-side", action="store_true", help="write source | driving | result")
    p.add_argument("--max-frames", type=int, default=None, help="use only the first N driving frames")
    p.add_argument("--chunk", type=int, default=None, help="pixels decoded at once (less memory)")
    p.add_argument("--batch", type=int, default=4, help="driving frames decoded at once")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 = bfloat16 autocast; auto (default): bf16 where it is faster than fp32 here")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def setup_processes(device_arg):
    """(rank, world, device); joins the process group when started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and (device_arg is None or device_arg.startswith("cuda"))
    if world <= 1:
        return 0, 1, torch.device(device_arg or ("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return rank, world, device


def load_model(path, device, kp_detector=None):
    """The model of a checkpoint (default: the built-in one); srt refuses phase-0 (detector only) ones."""
    if path is None:
        if not os.path.exists(BUILTIN_CKPT):
            raise FileNotFoundError(f"no --checkpoint given and the built-in checkpoint {BUILTIN_CKPT} is missing: "
                                    "train one with `python train.py --phase 1` or pass --checkpoint PATH")
        path = BUILTIN_CKPT
    return srt.model_from_checkpoint(path, device=device, kp_detector=kp_detector)


def gather_inputs(args, S, log):
    """-> sources [N,3,S,S], their uint8 squares (for landmarks / side-by-side), the Driving frames (read
    chunk by chunk later), fps, and known landmarks (built-in data) or None."""
    if args.source is None:  # built-in demo: a test identity driven by another identity's video
        # the built-in videos are rendered on access: render only the frames needed
        videos = data.VideoSet(split="test", size=S, **({} if args.max_frames is None else
                                                          dict(frames=args.max_frames)))
        if len(videos) < 2:
            raise RuntimeError("the built-in test set has fewer than 2 videos")
        src = videos[0]
        for i in range(1, len(videos)):
            drv = videos[i]
            if drv["identity"] != src["identity"]:
                break
        log(f"demo: source {src['name']} ({src['identity']}), driving {drv['name']} ({drv['identity']})")
        sel = pick_frames(len(src["frames"]), args.source_frames, src["name"])
        sources = src["frames"][sel].float()
        src_lm = None if src.get("landmarks") is None else np.asarray(src["landmarks"])[sel[0]]
        drv_lm = None if drv.get("landmarks") is None else list(np.asarray(drv["landmarks"]))
        fps = float(drv.get("fps") or data.DEFAULT_FPS)
        return sources, data.to_uint8(sources), Driving(frames=drv["frames"].float()), fps, (src_lm, drv_lm)

    sources, squares = [], []
    for path in args.source:
        sq, x = to_model_size(load_source(path, args.source_frames), S, path, log)
        sources.append(x)
        squares.extend(sq)
    driving = Driving(args.driving, max_frames=args.max_frames)
    return torch.cat(sources), squares, driving, float(driving.fps or data.DEFAULT_FPS), None


def run(args):
    data.check_numbers(args, {"max_frames": ">= 1", "batch": ">= 1", "chunk": ">= 1"})
    check_device(args.device)
    if (args.source is None) != (args.driving is None):
        raise ValueError("give both --source and --driving, or neither for the built-in demo")
    out = args.out or ("demo.mp4" if args.source is None else None)
    if out is None:
        raise ValueError("--out is required (a .mp4, .gif or a folder for PNG frames)")
    ext = os.path.splitext(out)[1].lower()
    if ext and ext not in (".mp4", ".mov", ".gif"):
        raise ValueError(f"--out {out}: unknown video type '{ext}'; use .mp4, .mov, .gif or a folder name")
    # before any work: never write over an input, and fail now if the output cannot be written
    inputs = [("--source", p) for p in args.source or []] + [("--driving", args.driving),
                                                            ("--checkpoint", args.checkpoint),
                                                            ("--kp-detector", args.kp_detector)]
    refuse_overwriting_inputs(out, inputs, frame_folder=not ext)
    check_writable(out, folder=not ext)
    rank, world, device = setup_processes(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    model = load_model(args.checkpoint, device, args.kp_detector)
    S = model.cfg.image_size
    precision = [pick_precision(args.precision, device)]
    if world > 1:                                                       # every process as rank 0 chose
        dist.broadcast_object_list(precision, src=0)
    (precision, why), args.bf16 = precision[0], precision[0][0] == "bf16"
    log(f"precision: {precision} ({why})")
    sources, src_sq, driving, fps, landmarks = gather_inputs(args, S, log)
    side_by_side = args.side_by_side or args.source is None
    T = len(driving)

    relative, initial = args.relative, 0
    if args.find_best_frame or args.best_frame is not None:
        if not relative:
            log("notice: --find-best-frame/--best-frame imply --relative")
        relative = True
    if args.best_frame is not None:
        initial = pick_frames(T, [args.best_frame], "--best-frame")[0]
    elif args.find_best_frame:
        if landmarks is None:  # face-alignment on the centre-cropped frames at their own resolution
            try:
                from keypoints import LandmarkDetector
                detector = LandmarkDetector(device=str(device))      # models are built on the first call
                quiet = lambda *a: None                              # one centre-cropped frame at a time
                landmarks = (detector(src_sq[0]), [detector(to_model_size(f[None], S, "", quiet)[0][0])
                                                   for f in driving.raw()])
            except Exception as e:      # keypoints.py's messages name the files to download and where
                msg = str(e) if isinstance(e, (RuntimeError, ValueError)) else f"{type(e).__name__}: {e}"
                raise RuntimeError(f"--find-best-frame needs face-alignment landmarks: {msg} "
                                   "(or give the initial frame with --best-frame N)") from e
        initial = find_best_frame(*landmarks)
        log(f"best initial frame: {initial}")
    if args.adapt_scale and not relative:
        log("notice: --adapt-scale only matters with --relative")

    frames = render_stream(model, sources, driving, S, relative, initial, args, rank, world,
                           first_source(src_sq, S) if side_by_side else None)
    if rank != 0:
        for _ in frames:   # the other processes render their share of every chunk; rank 0 writes
            pass
        return
    data.write_video(out, frames, fps)                                   # creates folders as needed
    log(f"wrote {out}: {T} frames at {fps:g} fps" + (" (source | driving | result)" if side_by_side else ""))


def render_stream(model, sources, driving, S, relative, initial, args, rank, world, source_view=None):
    """Yields the output frames (uint8 [S, S or 3S, 3]) on rank 0, Driving.CHUNK driving frames at a time:
    memory is bounded by the model and the chunk, not by the clip's length. Each chunk is split across the
    processes (contiguous, in order) and gathered on rank 0. The initial driving frame of relative motion
    leads every chunk (k_D,init) and is not rendered."""
    lead = None
    if relative:
        first = driving.chunks(S, log=lambda *a: None, start=initial)
        lead = next(first)[:1]
        first.close()
    bar = tqdm(total=len(driving), unit="frame", disable=rank != 0 or args.no_progress, dynamic_ncols=True)
    for x in driving.chunks(S, log=print if rank == 0 else lambda *a: None):
        n, k = len(x), int(relative)
        bounds = np.linspace(0, n, world + 1).round().astype(int)
        mine = slice(k + int(bounds[rank]), k + int(bounds[rank + 1]))
        result = data.to_uint8(reenact(model, sources, x if lead is None else torch.cat([lead, x]),
                                       relative=relative, adapt_scale=args.adapt_scale, initial_frame=0,
                                       chunk=args.chunk, bf16=args.bf16, batch=args.batch, frames=mine))
        if world > 1:
            parts = [None] * world if rank == 0 else None
            dist.gather_object(result, parts, dst=0)
            result = np.concatenate(parts) if rank == 0 else None
        bar.update(n)
        if rank != 0:
            continue
        if source_view is not None:   # source | driving | result
            result = np.concatenate([np.broadcast_to(source_view, result.shape), data.to_uint8(x), result], axis=2)
        yield from result
    bar.close()


def first_source(src_sq, S):
    """The first source as uint8 [S, S, 3] for the side-by-side view."""
    x = torch.from_numpy(np.ascontiguousarray(src_sq[0])).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-1] != S:
        x = F.interpolate(x, size=(S, S), mode="bicubic", align_corners=False, antialias=x.shape[-1] > S)
    return data.to_uint8(x)[0]


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except EXPECTED as e:
        return fail(e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
