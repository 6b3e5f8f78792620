"""
Face reenactment with a trained FSRT model (paper Sec. 3.4): source image(s) + driving video -> video.

    python reenact.py --checkpoint CKPT --source A.png [B.png ...] --driving D.mp4 --out R.mp4
    python reenact.py --checkpoint CKPT --source S.mp4 --source-frames 0 -1 --driving D.mp4 --out R.gif
    python reenact.py --checkpoint CKPT --source A.png --driving D.mp4 --relative --find-best-frame --out R.mp4
    python reenact.py --checkpoint vox256.pt --kp-detector kp_detector.pt --source A.png --driving D.mp4 --out R.mp4
    python reenact.py                                  # built-in demo (checkpoints/builtin_tiny.pt)
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
extension of --out (.mp4/.mov/.gif, or a folder of PNGs) at the driving video's frame rate. Errors end with
one line `error: ...` on stderr and exit code 2.

Checkpoints are recognised by content: train.py's, or the authors' release (vox256.pt, vox256_2Source.pt)
with --kp-detector kp_detector.pt (srt.load_release; 256x256). --precision auto (default) decodes in
bfloat16 where a short matmul probe shows bf16 faster than fp32 on this machine, in fp32 elsewhere.
"""
import argparse
import contextlib
import functools
import os
import sys
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
BUILTIN_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "builtin_tiny.pt")


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


def _autocast(device, bf16):
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
    device = next(model.parameters()).device
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
        with _autocast(device, bf16):
            # sources: encoded once per source set (Eq. (6)); keys/values of the decoder's cross-attention once
            kp_src, expr_src = model.keypoints_and_expression(sources.to(device))      # (N, K, 2), (N, E)
            set_latents = model.encode(sources.to(device)[None], kp_src[None], expr_src[None])  # (1, N*T', D)
            kv = model.latent_kv(set_latents)
            if relative:
                if not -T <= initial_frame < T:
                    raise ValueError(f"initial frame {initial_frame} is outside the driving video ({T} frames)")
                i0 = initial_frame % T
                kp_init = model.keypoints_and_expression(driving[i0:i0 + 1].to(device))[0].float()  # (1, K, 2)
                kp_source = (kp_src[:1] if kp_source is None else kp_source).float().to(device)

        bar = tqdm(total=len(idx), unit="frame", disable=not progress, dynamic_ncols=True)
        for t0 in range(0, len(idx), max(1, batch)):
            sel = idx[t0:t0 + max(1, batch)]
            drv = driving[torch.as_tensor(sel, device=driving.device)].to(device)     # (b, 3, S, S)
            with _autocast(device, bf16):
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

def load_frames(path):
    """An image, a video or a folder of frames -> (uint8 [T, H, W, 3], fps or None for a still image)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    ext = os.path.splitext(path)[1].lower()
    try:
        if os.path.isdir(path) or ext in VIDEO_EXTS:
            frames, fps = data.read_video(path)
        elif ext in IMAGE_EXTS:
            frames, fps = data.read_image(path)[None], None
        else:
            raise ValueError(f"{path}: unknown file type '{ext}'; use PNG/JPG images, "
                             f"{'/'.join(e[1:] for e in VIDEO_EXTS)} videos or a folder of frames")
    except (ValueError, FileNotFoundError, RuntimeError, OSError):
        raise
    except Exception as e:  # library internals (imageio, PIL, ffmpeg): one clear line, not a traceback
        raise ValueError(f"{path}: cannot read it ({type(e).__name__}: {e})") from e
    frames = np.asarray(frames)
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"{path}: no frames in it")
    return frames, fps


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
    if path is None:
        if not os.path.exists(BUILTIN_CKPT):
            raise FileNotFoundError(f"no --checkpoint given and the built-in checkpoint {BUILTIN_CKPT} is missing: "
                                    "train one with `python train.py --phase 1` or pass --checkpoint PATH")
        path = BUILTIN_CKPT
    return srt.model_from_checkpoint(path, device=device, kp_detector=kp_detector)


def gather_inputs(args, S, log):
    """-> sources [N,3,S,S], driving [T,3,S,S], their uint8 squares (for landmarks / side-by-side), fps,
    and known landmarks (built-in data) or None."""
    if (args.source is None) != (args.driving is None):
        raise ValueError("give both --source and --driving, or neither for the built-in demo")
    if args.source is None:  # built-in demo: a test identity driven by another identity's video
        # the built-in videos are rendered on access: render only the frames needed
        videos = data.VideoSet(split="test", size=S, **({} if args.max_frames is None else
                                                          dict(frames=max(1, args.max_frames))))
        if len(videos) < 2:
            raise RuntimeError("the built-in test set has fewer than 2 videos")
        src = videos[0]
        for i in range(1, len(videos)):
            drv = videos[i]
            if drv["identity"] != src["identity"]:
                break
        log(f"demo: source {src['name']} ({src['identity']}), driving {drv['name']} ({drv['identity']})")
        sel = pick_frames(len(src["frames"]), args.source_frames, src["name"])
        sources, driving = src["frames"][sel].float(), drv["frames"].float()
        src_lm = None if src.get("landmarks") is None else np.asarray(src["landmarks"])[sel[0]]
        drv_lm = None if drv.get("landmarks") is None else list(np.asarray(drv["landmarks"]))
        fps = float(drv.get("fps") or data.DEFAULT_FPS)
        return sources, driving, data.to_uint8(sources), data.to_uint8(driving), fps, (src_lm, drv_lm)

    sources, squares = [], []
    for path in args.source:
        frames, fps = load_frames(path)
        if fps is not None:  # a video or folder: take --source-frames
            frames = frames[pick_frames(len(frames), args.source_frames, path)]
        sq, x = to_model_size(frames, S, path, log)
        sources.append(x)
        squares.extend(sq)
    frames, fps = load_frames(args.driving)
    if args.max_frames is not None:
        frames = frames[:max(1, args.max_frames)]
    drv_sq, driving = to_model_size(frames, S, args.driving, log)
    return torch.cat(sources), driving, squares, drv_sq, float(fps or data.DEFAULT_FPS), None


def run(args):
    rank, world, device = setup_processes(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    model = load_model(args.checkpoint, device, args.kp_detector)
    S = model.cfg.image_size
    precision = [pick_precision(args.precision, device)]
    if world > 1:                                                       # every process as rank 0 chose
        dist.broadcast_object_list(precision, src=0)
    (precision, why), args.bf16 = precision[0], precision[0][0] == "bf16"
    log(f"precision: {precision} ({why})")
    sources, driving, src_sq, drv_sq, fps, landmarks = gather_inputs(args, S, log)
    out = args.out or ("demo.mp4" if args.source is None else None)
    if out is None:
        raise ValueError("--out is required (a .mp4, .gif or a folder for PNG frames)")
    ext = os.path.splitext(out)[1].lower()
    if ext and ext not in (".mp4", ".mov", ".gif"):
        raise ValueError(f"--out {out}: unknown video type '{ext}'; use .mp4, .mov, .gif or a folder name")
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
                landmarks = (detector(src_sq[0]), [detector(f) for f in drv_sq])
            except Exception as e:      # keypoints.py's messages name the files to download and where
                msg = str(e) if isinstance(e, (RuntimeError, ValueError)) else f"{type(e).__name__}: {e}"
                raise RuntimeError(f"--find-best-frame needs face-alignment landmarks: {msg} "
                                   "(or give the initial frame with --best-frame N)") from e
        initial = find_best_frame(*landmarks)
        log(f"best initial frame: {initial}")
    if args.adapt_scale and not relative:
        log("notice: --adapt-scale only matters with --relative")

    # this process's share of the frames (contiguous, in order); rank 0 writes them all
    bounds = np.linspace(0, T, world + 1).round().astype(int)
    mine = slice(int(bounds[rank]), int(bounds[rank + 1]))
    if world > 1:
        log(f"{T} frames split across {world} processes; the progress bar shows rank 0's {mine.stop} frames")
    result = reenact(model, sources, driving, relative=relative, adapt_scale=args.adapt_scale,
                     initial_frame=initial, chunk=args.chunk, bf16=args.bf16, batch=args.batch,
                     progress=rank == 0 and not args.no_progress, frames=mine)
    result = data.to_uint8(result)
    if world > 1:
        parts = [None] * world if rank == 0 else None
        dist.gather_object(result, parts, dst=0)
        if rank == 0:
            result = np.concatenate(parts)
    if rank != 0:
        return
    if side_by_side:
        source = np.broadcast_to(first_source(src_sq, S), result.shape)
        result = np.concatenate([source, data.to_uint8(driving), result], axis=2)   # (T, S, 3S, 3)
    data.write_video(out, result, fps)                                   # creates folders as needed
    log(f"wrote {out}: {len(result)} frames at {fps:g} fps" + (" (source | driving | result)" if side_by_side else ""))


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
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        msg = msg if len(msg) <= 1000 else msg[:1000] + " ..."
        print(f"error: {msg}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
