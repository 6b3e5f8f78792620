"""
Evaluation of FSRT: the self-reenactment protocol and metrics of Sec. 4.1 (Table 1), plus the checks that only the
built-in data, whose ground truth is known, makes possible.

    python metrics.py --checkpoint runs/tiny/phase3.pt                # built-in test videos
    python metrics.py --checkpoint CKPT --data VOX --num-src 2 --out results.json
    python metrics.py --checkpoint vox256_2Source.pt --kp-detector kp_detector.pt --data VOX --num-src 2

Protocol (Sec. 4.1), made precise here because the paper states it in one sentence:
  * sources: the first frame; with 2 sources the first and the last frame (n > 2 sources: n frames evenly
    spaced from first to last, rounded -- an extension, the paper evaluates 1 and 2).
  * driving frames: the indices 0, 10, 20, ... (multiples of 10 counted from the first frame) that are at
    least 10 frames away from every source index. A 35-frame video with 1 source -> 10, 20, 30; with 2
    sources (0 and 34) -> 10, 20. A video that leaves no driving frame is skipped and counted.
  * self-reenactment uses absolute motion (the driving keypoints as they are), as in training.
  * every metric is averaged over the frames of a video, then over videos (each video weighs the same).
  * predictions are clamped to [0, 1] before scoring (render output is not clamped, images on disk are).
Metrics: SSIM (scikit-image, RGB in [0, 1], data_range 1, 7x7 window), PSNR (dB, peak 1), mean L1 on
[0, 1], and AKD: mean distance in pixels (at the evaluated image size) between the 68 landmarks of the
generated and the real frame. Both landmark sets come from the same external detector (face-alignment's
FAN, as the paper), also on the built-in data whose true landmarks are known: a detector-vs-truth distance
would add the detector's own error on drawn faces to the score, detector-vs-detector cancels it, as in the
paper. Frames where the detector finds no face in the real or the generated image are counted and reported.
The "copy the source" baseline predicts each driving frame by its nearest source frame (ties: the earlier).

Built-in data only (details in each function's docstring): cross-reenactment against the true frames
(evaluate_cross), the identity leak (evaluate_leak), expression transfer (evaluate_expression), and a
disentanglement probe: ridge maps from e to the expression, identity and pose parameters, fitted on train-split
frames, R^2 on held-out identities (probe_r2; a well-disentangled e: expression high, identity and pose low),
with --readout-ceiling the most it could find at this image size (readout_ceiling).
"""
import argparse
import dataclasses
import json
import math
import os
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity
from tqdm import tqdm

import builtin_faces as faces
import cli
import data
import keypoints
import losses
from keypoints import pixel_grid
from reenact import Render, reenact
from weights import model_from_checkpoint


# ----------------------------------------------------------------------------------------------------------
# image metrics

def to_hwc(image) -> np.ndarray:
    """Tensor [3,H,W] or array [H,W,3] in [0, 1] -> float64 array [H,W,3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().permute(1, 2, 0).numpy()
    return np.asarray(image, dtype=np.float64)


def psnr(pred, target) -> float:
    """Peak signal-to-noise ratio in dB with peak 1; inf for identical images."""
    return float(losses.psnr(torch.from_numpy(to_hwc(pred)), torch.from_numpy(to_hwc(target))))


def ssim(pred, target) -> float:
    """SSIM [51] of two RGB images in [0, 1] (scikit-image, 7x7 uniform window, per channel, averaged)."""
    return float(structural_similarity(to_hwc(pred), to_hwc(target), channel_axis=-1, data_range=1.0))


def l1(pred, target) -> float:
    """Mean absolute error over pixels and channels, images in [0, 1]."""
    return float(np.mean(np.abs(to_hwc(pred) - to_hwc(target))))


def frame_scores(preds, targets) -> dict:
    """Mean SSIM, PSNR, L1 over a list/tensor of frames ([T,3,H,W]); predictions are clamped to [0, 1]."""
    preds = [p.clamp(0, 1) if isinstance(p, torch.Tensor) else np.clip(p, 0, 1) for p in preds]
    rows = [(ssim(p, t), psnr(p, t), l1(p, t)) for p, t in zip(preds, targets)]
    s, p, a = (float(np.mean(c)) for c in zip(*rows))
    return {"ssim": s, "psnr": p, "l1": a, "frames": len(rows)}


# ----------------------------------------------------------------------------------------------------------
# AKD: average keypoint distance between external 68-point landmarks

def akd_scores(preds, targets, landmark_fn) -> dict:
    """AKD over frame pairs; landmark_fn(uint8 [H,W,3]) -> [68,2] pixels or None (no face). -> {"akd": mean over the
    frames with a face in both images (nan if none), "akd_frames": their count, "akd_missing_real" and
    "akd_missing_generated": frames without a face in that image (one missing in both counts in both)}."""
    dists, miss_real, miss_gen = [], 0, 0
    for p, t in zip(preds, targets):
        lm_real, lm_gen = landmark_fn(data.to_uint8(t)), landmark_fn(data.to_uint8(p))
        miss_real += lm_real is None
        miss_gen += lm_gen is None
        if lm_real is not None and lm_gen is not None:
            d = np.linalg.norm(np.asarray(lm_gen, np.float64) - np.asarray(lm_real, np.float64), axis=-1)
            dists.append(float(d.mean()))                       # mean over the 68 landmarks
    return {"akd": float(np.mean(dists)) if dists else math.nan, "akd_frames": len(dists),
            "akd_missing_real": miss_real, "akd_missing_generated": miss_gen}


def detector_landmark_fn(detector, min_size=256):
    """Wrap data.LandmarkDetector for small frames: FAN's face detector misses 64x64 faces, so frames
    are upsampled (bicubic, integer factor k) to at least min_size and the landmarks mapped back with the
    pixel-centre convention x_small = (x_big + 0.5) / k - 0.5. AKD stays in pixels of the evaluated size."""
    def landmark_fn(image_uint8):
        k = max(1, math.ceil(min_size / image_uint8.shape[0]))
        h, w = image_uint8.shape[:2]
        if k > 1:
            image_uint8 = np.asarray(Image.fromarray(image_uint8).resize((w * k, h * k), Image.BICUBIC))
        lm = detector(image_uint8)
        if lm is None:
            return None
        size = np.array([w, h], np.float64)
        return keypoints.to_pixels(keypoints.to_normalized(np.asarray(lm, np.float64), k * size), size)
    return landmark_fn


def make_landmark_fn(required=False):
    """The AKD landmark function, or (None, reason) when face-alignment or FAN's weights are unavailable
    (offline). With required=True the failure is raised instead."""
    try:
        fn = detector_landmark_fn(data.LandmarkDetector())
        fn(np.zeros((64, 64, 3), np.uint8))                     # weights may load lazily: try once
        return fn, None
    except Exception as err:                                    # offline, missing weights, no package ...
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        if required:
            raise RuntimeError(f"--akd was requested but the landmark detector is unavailable: {reason}") from err
        return None, reason


# ----------------------------------------------------------------------------------------------------------
# protocol of Sec. 4.1

def protocol_frames(num_frames: int, num_src: int = 1, every: int = 10, min_gap: int = 10):
    """(source indices, driving indices) of one video: see the module docstring for the exact rule."""
    if num_frames < 1 or num_src < 1:
        raise ValueError(f"protocol_frames needs num_frames >= 1 and num_src >= 1, got {num_frames}, {num_src}")
    sources = sorted({int(round(x)) for x in np.linspace(0, num_frames - 1, num_src)})
    driving = [i for i in range(0, num_frames, every) if min(abs(i - s) for s in sources) >= min_gap]
    return sources, driving


def nearest_source(sources, index) -> int:
    """The source index closest to a driving index (ties: the earlier source)."""
    return min(sources, key=lambda s: (abs(index - s), s))


def mean_over_videos(rows) -> dict:
    """Average per-video scores over videos (nan entries, e.g. AKD of a video without faces, are left out);
    frame and miss counts are summed."""
    out = {}
    for key in rows[0]:
        vals = [r[key] for r in rows]
        if key in ("frames", "akd_frames", "akd_missing_real", "akd_missing_generated"):
            out[key] = int(sum(vals))
        else:
            vals = [v for v in vals if not math.isnan(v)]
            out[key] = float(np.mean(vals)) if vals else math.nan
    return out


@torch.no_grad()
def evaluate_self(videos, model=None, num_src=1, landmark_fn=None, max_videos=None, render=None,
                  progress=True) -> dict:
    """Self-reenactment on videos (dicts with "frames" [T,3,S,S]) by the protocol of Sec. 4.1 -> {"model": row (None
    with model=None: the baseline only), "baseline": row, "videos", "videos_skipped" (too short), "videos_unreadable"
    (skipped with a warning)}; a row holds ssim, psnr, l1, frames (and the AKD entries with landmark_fn)."""
    n = len(videos) if max_videos is None else min(len(videos), max_videos)
    rows_model, rows_base, skipped, unreadable = [], [], 0, 0
    for i in tqdm(range(n), desc="self-reenactment", disable=not progress):
        try:
            frames = videos[i]["frames"]                                    # (T, 3, S, S)
        except (ValueError, OSError) as err:   # one broken file does not end the evaluation: skipped, counted
            warnings.warn(f"skipping unreadable test video: {err}")
            unreadable += 1
            continue
        src_idx, drv_idx = protocol_frames(len(frames), num_src)
        if not drv_idx:
            skipped += 1
            continue
        targets = frames[drv_idx]
        baseline = frames[[nearest_source(src_idx, j) for j in drv_idx]]  # copy the nearest source
        rows_base.append(_score(baseline, targets, landmark_fn))
        if model is not None:
            pred = reenact(model, frames[src_idx], targets, render=render)
            rows_model.append(_score(pred, targets, landmark_fn))
    if unreadable == n:
        raise ValueError(f"none of the {n} test videos could be read (see the warnings above)")
    if not rows_base:
        raise ValueError(f"no video of {n} has a driving frame under the protocol (videos too short: a video "
                         f"needs more than {10 * num_src} frames)")
    return {"model": mean_over_videos(rows_model) if rows_model else None,
            "baseline": mean_over_videos(rows_base), "videos": len(rows_base), "videos_skipped": skipped,
            "videos_unreadable": unreadable}


def _score(preds, targets, landmark_fn):
    row = frame_scores(preds, targets)
    if landmark_fn is not None:
        row.update(akd_scores(preds.clamp(0, 1), targets, landmark_fn))
    return row


# ----------------------------------------------------------------------------------------------------------
# cross-reenactment against ground truth (built-in data only)

def video_params(item):
    """(identity, [pose per frame], [expression per frame]) of a built-in video, or None for real data."""
    params = item.get("params")
    if params is None:
        return None
    return params["identity"], list(params["poses"]), list(params["expressions"])


def relative_pose(pose_source, pose_driving, pose_driving_initial):
    """The ground truth of relative motion (Sec. 3.4), which k_S + (k_D - k_D,initial) approximates: the source's pose
    moved by the driving head's change since the initial frame (angles and translations add the difference, scale
    multiplies by the ratio); the expression is the driving frame's as-is (Sec. 3.4), not made relative."""
    values = {}
    for f in dataclasses.fields(pose_source):
        a, b, b0 = (np.asarray(getattr(p, f.name), np.float64)
                    for p in (pose_source, pose_driving, pose_driving_initial))
        v = a * b / b0 if f.name == "scale" else a + (b - b0)
        values[f.name] = float(v) if v.ndim == 0 else v
    return type(pose_source)(**values)


@torch.no_grad()
def evaluate_cross(videos, model, num_src=1, max_videos=None, render=None, progress=True):
    """Cross-reenactment of identity A (video i) by B (video i+1, another identity) at B's protocol frames, scored
    (SSIM, PSNR, L1) against faces.render_face(A's identity, pose, B's expression), the pose being B's (absolute
    motion) or A's first-frame pose moved by B's change since B's frame 0 (relative: relative_pose; the model runs
    from B's frame 0, no scale adaption), with the copy-the-source baseline against the absolute ground truth."""
    n = len(videos) if max_videos is None else min(len(videos), max_videos)
    if n < 2:
        raise ValueError("cross-reenactment needs at least 2 videos (--max-videos >= 2)")
    # the n_K = 0 ablation has no keypoints to move: relative motion does not exist for it (reenact refuses)
    modes = ("absolute", "relative") if model.cfg.use_keypoints else ("absolute",)
    rows = {"absolute": [], "relative": [], "baseline": []}
    for i in tqdm(range(n), desc="cross-reenactment", disable=not progress):
        a, b = videos[i], videos[(i + 1) % n]
        if a["identity"] == b["identity"]:
            continue
        (id_a, poses_a, _), (_, poses_b, exprs_b) = video_params(a), video_params(b)
        size = a["frames"].shape[-1]
        src_idx, _ = protocol_frames(len(a["frames"]), num_src)
        _, drv_idx = protocol_frames(len(b["frames"]), 1)
        if not drv_idx:
            continue
        sources = a["frames"][src_idx]
        driving = b["frames"][[0] + drv_idx]                 # B's frame 0 leads: the relative anchor
        gt = {}
        for mode in modes:
            poses = [poses_b[j] if mode == "absolute" else relative_pose(poses_a[0], poses_b[j], poses_b[0])
                     for j in drv_idx]
            gt[mode] = faces.render_frames(id_a, poses, [exprs_b[j] for j in drv_idx], size)[0]
            pred = reenact(model, sources, driving, relative=mode == "relative", render=render)[1:]
            rows[mode].append(frame_scores(pred, gt[mode]))
        copy = a["frames"][[src_idx[0]] * len(drv_idx)]
        rows["baseline"].append(frame_scores(copy, gt["absolute"]))
    if not rows["absolute"]:
        return None
    return {k: mean_over_videos(v) if v else None for k, v in rows.items()} | {"pairs": len(rows["absolute"])}


@torch.no_grad()
def evaluate_leak(videos, model, max_videos=None, render=None, progress=True):
    """The identity leak: source A (video i's first frame) driven by B (video i+1) and by C (video i+2's identity,
    rendered) performing B's exact motion at B's protocol frames. A model that takes only motion from the driver
    gives the same output for both: PSNR(driven by B, driven by C) in dB (inf = identical), absolute and relative,
    with the PSNR between the two driving videos for scale. Where it leaks (absolute motion): 'via_e' swaps only e
    (B's k with C's e against B's e), 'via_k' only the keypoints; the lower figure is the wider path."""
    n = len(videos) if max_videos is None else min(len(videos), max_videos)
    if n < 3:
        raise ValueError("the identity-leak figure needs at least 3 videos (--max-videos >= 3)")
    modes = ("absolute", "relative") if model.cfg.use_keypoints else ("absolute",)
    rows = {k: [] for k in (*modes, "drivers", "via_e", "via_k")}   # PSNR per triple
    mean_psnr = lambda xs, ys: float(np.mean([psnr(x, y) for x, y in zip(xs, ys)]))
    model.eval()
    for i in tqdm(range(n), desc="identity leak", disable=not progress):
        a, b, c = videos[i], videos[(i + 1) % n], videos[(i + 2) % n]
        if len({a["identity"], b["identity"], c["identity"]}) < 3:
            continue
        (_, poses_b, exprs_b), (id_c, _, _) = video_params(b), video_params(c)
        _, drv_idx = protocol_frames(len(b["frames"]), 1)
        if not drv_idx:
            continue
        idx = [0] + drv_idx                                                    # frame 0: the relative anchor
        drv_b = b["frames"][idx]
        drv_c = faces.render_frames(id_c, [poses_b[j] for j in idx], [exprs_b[j] for j in idx], drv_b.shape[-1])[0]
        source = a["frames"][:1]
        for mode in modes:
            out = [reenact(model, source, d, relative=mode == "relative", render=render)[1:] for d in (drv_b, drv_c)]
            rows[mode].append(mean_psnr(*out))
        rows["drivers"].append(mean_psnr(drv_b[1:], drv_c[1:]))
        # swap one conditioning input at a time (absolute motion)
        device = model_device(model)
        kp_s, e_s = model.keypoints_and_expression(source.to(device))
        z = model.encode(source.to(device)[None], kp_s[None], e_s[None])
        (k_b, e_b), (k_c, e_c) = (model.keypoints_and_expression(d[1:].to(device)) for d in (drv_b, drv_c))
        draw = lambda k, e: model.render(z, k, e, chunk=render and render.chunk).clamp(0, 1).cpu()
        ref = draw(k_b, e_b)
        rows["via_e"].append(mean_psnr(ref, draw(k_b, e_c)))
        rows["via_k"].append(mean_psnr(ref, draw(k_c, e_b)))
    if not rows["absolute"]:
        return None
    return {k: float(np.mean(v)) if v else None for k, v in rows.items()} | {"triples": len(rows["absolute"])}


# ----------------------------------------------------------------------------------------------------------
# expression transfer: does the output change with the driver's expression as the real face does?

EXPRESSION_TESTS = {"mouth_open": faces.Expression(mouth_open=0.9), "smile": faces.Expression(smile=1.0),
                    "blink": faces.Expression(blink_l=1.0, blink_r=1.0), "brow_raise": faces.Expression(brow_raise=1.0)}


def expression_response(out, out_neutral, truth, truth_neutral) -> float:
    """The share of the true change that the output makes: <o - o0, g - g0> / ||g - g0||^2, the projection of
    the output's change onto the ground truth's (1 = the whole change, 0 = none; a change elsewhere in the
    image does not count). Tensors of one shape; nan when the ground truth does not change."""
    g, o = (truth - truth_neutral).double().flatten(), (out - out_neutral).double().flatten()
    gg = float(g @ g)
    return float(o @ g) / gg if gg > 0 else math.nan


def expression_faces(identities, seed, size):
    """Per built-in test identity, at a near-frontal pose (yaw within 10, pitch within 5 degrees): its frames
    [1 + tests, 3, S, S], neutral first, then one per EXPRESSION_TESTS entry."""
    rng = np.random.default_rng(seed)
    exprs = [faces.Expression(), *EXPRESSION_TESTS.values()]
    for j in range(identities):
        identity = faces.builtin_identity("test", j)[2]
        pose = faces.Pose(yaw=float(rng.uniform(-10, 10)), pitch=float(rng.uniform(-5, 5)))
        yield faces.render_frames(identity, [pose] * len(exprs), exprs, size)[0]


def add_responses(scores, out, truth):
    """Append to scores {test: list} each test's expression_response of out against truth (expression_faces layout)."""
    for i, k in enumerate(EXPRESSION_TESTS, 1):
        scores[k].append(expression_response(out[i], out[0], truth[i], truth[0]))


def mean_responses(scores, identities) -> dict:
    res = {k: float(np.mean(v)) for k, v in scores.items()}
    return res | {"mean": float(np.mean(list(res.values()))), "identities": identities}


@torch.no_grad()
def evaluate_expression(model, identities=16, seed=0, render=None, cross=False) -> dict:
    """Expression transfer (not in the paper): a neutral face (expression_faces) driven by a face with one expression
    per test -> {test: mean expression_response, "mean": over the tests, "identities": n}; near 1 when the output
    takes the driver's expression, near 0 for the source's (or a blur). Self: driven by itself, absolute motion.
    cross: by the next identity, relative motion from its neutral frame, against the source with that expression."""
    if cross and identities < 2:
        raise ValueError("the cross-reenactment expression figure needs at least 2 identities")
    truths = list(expression_faces(identities, seed, model.cfg.image_size))
    scores = {k: [] for k in EXPRESSION_TESTS}
    for j, truth in enumerate(truths):
        driver = truths[(j + 1) % identities] if cross else truth
        add_responses(scores, reenact(model, truth[:1], driver, relative=cross, render=render), truth)
    return mean_responses(scores, identities)


@torch.no_grad()
def render_paths(model, truth, chunk=None):
    """truth [n, 3, S, S] (neutral first) rendered from the neutral frame's set-latents with each frame's e and
    the NEUTRAL frame's keypoints ("e"), and with each frame's keypoints and the neutral e ("keypoints")
    -> {way: [n, 3, S, S] float32 in [0, 1], on the CPU} (absolute motion, the model's dtype)."""
    x = truth.to(model_device(model), next(model.parameters()).dtype)          # [n, 3, S, S], neutral first
    kp, e = model.keypoints_and_expression(x)                                 # [n, K, 2], [n, E]
    set_latents = model.encode(x[:1][None], kp[:1][None], e[:1][None])       # the neutral source
    kv = model.latent_kv(set_latents)
    n = len(x)
    ways = {"e": (kp[:1].expand(n, -1, -1), e), "keypoints": (kp, e[:1].expand(n, -1))}
    return {way: model.render(set_latents, k, ex, chunk=chunk, kv=kv).float().clamp(0, 1).cpu()
            for way, (k, ex) in ways.items()}


@torch.no_grad()
def evaluate_expression_paths(model, identities=16, seed=0, chunk=None) -> dict:
    """Through which input self-reenactment's expression transfer goes (FSRT factorises it into e, Sec. 3.1):
    {"e": evaluate_expression with only e from the driver (render_paths), "keypoints": with only its keypoints}."""
    scores = {w: {k: [] for k in EXPRESSION_TESTS} for w in ("e", "keypoints")}
    model.eval()
    for truth in expression_faces(identities, seed, model.cfg.image_size):
        for way, out in render_paths(model, truth, chunk).items():
            add_responses(scores[way], out, truth)
    return {way: mean_responses(sc, identities) for way, sc in scores.items()}


@torch.no_grad()
def expression_picture(model, path, identities=4, test="mouth_open", seed=0, scale=3):
    """A PNG of evaluate_expression's faces, a row per identity: the neutral source | the driver, same face with
    the `test` expression | the output (reenact) | the output with only e from the driver (render_paths), each
    enlarged `scale` times (nearest pixel)."""
    i = list(EXPRESSION_TESTS).index(test) + 1
    model.eval()
    rows = []
    for truth in expression_faces(identities, seed, model.cfg.image_size):
        full, e_only = reenact(model, truth[:1], truth)[i], render_paths(model, truth)["e"][i]
        rows.append(np.concatenate([data.to_uint8(f) for f in (truth[0], truth[i], full, e_only)], axis=1))
    grid = np.concatenate(rows, axis=0)
    with cli.atomic_path(path) as tmp:
        Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(tmp)


# ----------------------------------------------------------------------------------------------------------
# disentanglement probe: what a linear map can read out of the expression vector e

def fit_ridge(X, Y, alpha=10.0):
    """Ridge regression Y ~ X on standardised X, closed form. Returns predict(X_new) -> Y_hat."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    mu, sd = X.mean(0), X.std(0)
    sd[sd <= 1e-6 * max(float(sd.max()), 1e-12)] = np.inf     # constant features (dead units) -> 0, not noise x 1e8
    Xs, y_mu = (X - mu) / sd, Y.mean(0)
    W = np.linalg.solve(Xs.T @ Xs + alpha * np.eye(X.shape[1]), Xs.T @ (Y - y_mu))
    return lambda X_new: ((np.asarray(X_new, np.float64) - mu) / sd) @ W + y_mu


def r2_score(Y, Y_hat) -> float:
    """Coefficient of determination, per output dimension, averaged over the dimensions that vary
    (dimensions constant in Y are left out). 1 = perfect, 0 = no better than the mean, < 0 = worse."""
    Y, Y_hat = np.asarray(Y, np.float64), np.asarray(Y_hat, np.float64)
    ss_tot = ((Y - Y.mean(0)) ** 2).sum(0)
    ss_res = ((Y - Y_hat) ** 2).sum(0)
    keep = ss_tot > 1e-12 * max(1.0, float(ss_tot.max()))
    return float(np.mean(1.0 - ss_res[keep] / ss_tot[keep])) if keep.any() else math.nan


ALPHAS = tuple(10.0 ** k for k in range(-2, 6))


def choose_alpha(X, Y, groups, alphas=ALPHAS, folds=4) -> float:
    """Ridge penalty by grouped cross-validation on the training frames: each fold holds out whole
    identities, so the choice rewards what transfers to unseen identities, as the held-out test does."""
    X, Y, groups = np.asarray(X, np.float64), np.asarray(Y, np.float64), np.asarray(groups)
    ids = np.unique(groups)
    if len(ids) < 2:
        return float(np.median(alphas))
    fold = np.searchsorted(ids, groups) % min(folds, len(ids))       # identity k -> fold k mod folds
    scores = []
    for a in alphas:
        s = [r2_score(Y[fold == k], fit_ridge(X[fold != k], Y[fold != k], a)(X[fold == k]))
             for k in range(fold.max() + 1)]
        s = [v for v in s if not math.isnan(v)]
        scores.append(np.mean(s) if s else -np.inf)
    return float(alphas[int(np.argmax(scores))])


def probe_r2(X_train, targets_train: dict, X_test, targets_test: dict, alpha=None, groups=None):
    """Held-out R^2 of a ridge map from features X to each named target ([n, m] arrays).
    alpha=None: chosen per target by choose_alpha over `groups` (identity per training frame; None: every
    frame its own group). Returns ({name: R^2}, {name: alpha}, {name: [R^2 of each dimension]})."""
    r2, alphas, r2_dims = {}, {}, {}
    for name, Y in targets_train.items():
        g = np.arange(len(Y)) if groups is None else groups
        alphas[name] = choose_alpha(X_train, Y, g) if alpha is None else float(alpha)
        Y_hat, Y_te = fit_ridge(X_train, Y, alphas[name])(X_test), targets_test[name]
        r2[name] = r2_score(Y_te, Y_hat)
        r2_dims[name] = [r2_score(Y_te[:, [j]], Y_hat[:, [j]]) for j in range(Y_te.shape[1])]
    return r2, alphas, r2_dims


def continuous_vector(params) -> np.ndarray:
    """The float-valued fields of a parameter dataclass as one vector. Integer fields (hair style, background
    kind, background seed) are categories or seeds, not quantities a linear map could or should predict:
    keeping them would pull the identity R^2 down and flatter the disentanglement."""
    vals = [np.atleast_1d(np.asarray(getattr(params, f.name), np.float64)) for f in dataclasses.fields(params)
            if not isinstance(getattr(params, f.name), (int, np.integer))]
    return np.concatenate(vals)


@torch.no_grad()
def probe_features(model, videos, max_videos=None, stride=5, batch=32, progress=True):
    """Expression vectors e (model.keypoints_and_expression) of every stride-th frame of built-in videos,
    with the true parameter vectors of the same frames and the video index of each frame (one identity per
    built-in video): (e [n,E], {"expression", "identity", "pose"} -> [n, m], groups [n])."""
    n = len(videos) if max_videos is None else min(len(videos), max_videos)
    feats, targets, groups = [], {"expression": [], "identity": [], "pose": []}, []
    for i in tqdm(range(n), desc="probe features", disable=not progress):
        item = videos[i]
        identity, poses, exprs = video_params(item)
        idx = list(range(0, len(item["frames"]), stride))
        for k in range(0, len(idx), batch):
            frames = item["frames"][idx[k:k + batch]].to(model_device(model))
            feats.append(model.keypoints_and_expression(frames)[1].float().cpu().numpy())
        targets["expression"] += [exprs[j].vector() for j in idx]
        targets["pose"] += [poses[j].vector() for j in idx]
        targets["identity"] += [continuous_vector(identity)] * len(idx)
        groups += [i] * len(idx)
    return np.concatenate(feats), {k: np.stack(v).astype(np.float64) for k, v in targets.items()}, np.array(groups)


EXPRESSION_PARAMS = [f.name for f in dataclasses.fields(faces.Expression)]   # mouth_open, smile, blink_l/_r, brow


def readout_ceiling(model, frames=10000, steps=1500, batch=64, seed=0, test_frames=1000, progress=True):
    """What Eq. (8)-(10) CAN read from this detector -> {parameter: held-out R^2}: a fresh expression network and a
    linear head trained, supervised, on the frozen detector's output for rendered random faces at the model's size.
    An upper bound for the probe of e: where it is low, the detector cannot show that part at this resolution."""
    from expression import ExpressionNet
    if model.expression.cfg.expr_dim == 0:
        return {k: math.nan for k in EXPRESSION_PARAMS}
    torch.manual_seed(seed)
    size, names = model.cfg.image_size, EXPRESSION_PARAMS

    def detect(n, rng):                     # frozen detector on n rendered frames -> (features, heatmaps, E)
        feats, heats, E = [], [], []
        for k in tqdm(range(0, n, 100), desc="readout frames", disable=not progress):
            params = [(faces.sample_identity(rng), faces.sample_pose(rng), faces.sample_expression(rng))
                      for _ in range(min(100, n - k))]
            x = torch.stack([faces.render_frames(i, [p], [e], size)[0][0] for i, p, e in params])
            with torch.no_grad():
                d = model.kp_detector(x.to(model_device(model)))
            feats.append(d["features"].float().cpu()), heats.append(d["heatmaps"].float().cpu())
            E += [e.vector() for _, _, e in params]
        return torch.cat(feats), torch.cat(heats), torch.tensor(np.array(E), dtype=torch.float32)
    F, H, E = detect(frames, np.random.default_rng([seed, 1]))
    F_te, H_te, E_te = detect(test_frames, np.random.default_rng([seed, 2]))
    mu, sd = E.mean(0), E.std(0).clamp_min(1e-6)
    net = ExpressionNet(model.expression.cfg)
    head = torch.nn.Linear(net.cfg.expr_dim, len(names))
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="readout training", disable=not progress):
        i = torch.randint(0, len(F), (batch,), generator=gen)
        loss = ((head(net(F[i], H[i])) - (E[i] - mu) / sd) ** 2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        pred = (head(net(F_te, H_te)) * sd + mu).numpy()
    return {k: r2_score(E_te[:, [j]].numpy(), pred[:, [j]]) for j, k in enumerate(names)}


# ----------------------------------------------------------------------------------------------------------
# identity similarity (CSIM): does the output keep the source's identity? (real data too)

FACE_NET = "dlib_face_recognition_resnet_model_v1.dat"


class FaceEmbedding:
    """dlib's face-recognition ResNet (a 128-d descriptor per face; 99.38 % on LFW by dlib's account), from the
    `face-recognition-models` package, its weights inside the wheel. Papers disagree on CSIM's network (ArcFace
    mostly): `network` names this one. Call: uint8 [H, W, 3] -> descriptor [128] of the largest face, or None."""
    network = "dlib's face-recognition ResNet (128-d, dlib_face_recognition_resnet_model_v1)"

    def __init__(self, min_size=256):
        if not data.dlib_available() or data.dlib_model(FACE_NET) is None:
            raise RuntimeError(f"the identity figure (CSIM) needs dlib and {FACE_NET}: `pip install dlib-bin "
                               "face-recognition-models`")
        import dlib
        self.detector = dlib.get_frontal_face_detector()
        self.shape = dlib.shape_predictor(data.dlib_model(data.DLIB_LANDMARKS))
        self.net = dlib.face_recognition_model_v1(data.dlib_model(FACE_NET))
        self.min_size = min_size

    def __call__(self, image):
        k = max(1, math.ceil(self.min_size / min(image.shape[:2])))     # small faces: upsampled (bicubic) first
        if k > 1:
            image = np.asarray(Image.fromarray(image).resize((image.shape[1] * k, image.shape[0] * k), Image.BICUBIC))
        rects = list(self.detector(image, 1))
        i = data.largest_face_index([(r.left(), r.top(), r.right(), r.bottom()) for r in rects])
        if i is None:
            return None
        return np.array(self.net.compute_face_descriptor(image, self.shape(image, rects[i])))


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@torch.no_grad()
def evaluate_csim(videos, model, embed, max_videos=None, render=None):
    """CSIM of cross-reenactment: the mean cosine between the embeddings of source A (video i's first frame) and of
    each output frame driven by B (video i+1, another person; relative motion, B's protocol frames), and for scale
    between A and B's own frames. Output frames without a face are counted, not scored. -> dict (pairs 0 when no
    source frame shows a face: no_source_face of them), or None without a pair."""
    n = len(videos) if max_videos is None else min(len(videos), max_videos)
    ours, driver, missing, pairs, faceless = [], [], 0, 0, 0
    for i in range(n if n >= 2 else 0):
        try:
            a, b = videos[i], videos[(i + 1) % n]
        except (ValueError, OSError):   # an unreadable video: evaluate_self warned and counted it
            continue
        _, drv_idx = protocol_frames(len(b["frames"]), 1)
        if a["identity"] == b["identity"] or not drv_idx:
            continue
        source_id = embed(data.to_uint8(a["frames"][0]))
        faceless += source_id is None
        if source_id is None:
            continue
        pairs += 1
        out = reenact(model, a["frames"][:1], b["frames"][[0] + drv_idx], relative=model.cfg.use_keypoints,
                      render=render)[1:]
        for frame, real in zip(data.to_uint8(out), data.to_uint8(b["frames"][drv_idx])):
            e, d = embed(frame), embed(real)
            missing += e is None
            ours += [cosine(source_id, e)] if e is not None else []
            driver += [cosine(source_id, d)] if d is not None else []
    if not pairs and not faceless:
        return None
    mean = lambda v: float(np.mean(v)) if v else math.nan
    return {"csim": mean(ours), "csim_driver": mean(driver), "frames": len(ours) + missing, "no_face": missing,
            "pairs": pairs, "no_source_face": faceless, "network": embed.network}


# ----------------------------------------------------------------------------------------------------------
# training health: is the encoder alive and does the decoder read it? (not in the paper; a diagnostic)


@torch.no_grad()
def health(model, images):
    """Diagnostics on self-reconstruction (one source, driving = source) of images [B,3,H,W], B >= 2 -> dict of:
      active      per patch-CNN conv, the share of channels (ReLU input) positive somewhere in the batch: a
                  channel at 0 never passes gradient again (the "dead encoder" failure);
      spread      std of the set-latents across an image's tokens / their rms (0: every token the same);
      latent_cos  mean cosine between two images' set-latents (1: the encoder ignores its input);
      attn_entropy, attn_uniform  mean entropy (nats) of the first decoder block's attention, and log T (uniform);
      attn_own    mean attention on the token whose 8x8 patch holds the pixel (1/T when uniform);
      self_psnr   PSNR (dB) of the reconstruction;
      expr_spread std of e across the images / their rms (~0: e one vector for every face; NaN for |e| = 0);
      expr_active per hidden layer of X_M, the share of ReLU units positive for some image
                  (ExpressionNet.active_units; [] for |e| = 0): the same dying-ReLU failure in X."""
    was_training = model.training
    model.eval()
    B, _, H, W = images.shape
    det = model.detect(images)
    kp, e = det["keypoints"], model.expression_of(det)
    expr_active = model.expression.active_units(det["features"], det["heatmaps"]) if e.shape[1] else []
    grid = pixel_grid(H, W, images.device)                                        # (HW, 2)
    code = model.gamma_pix(grid).to(images.dtype)                                 # (HW, 64), Eq. (5)
    frame_code = model.frame_code(kp, e)                                          # (B, 160 + E)
    cnn = model.encoder.cnn
    x = cnn.first_conv(images, code.t().reshape(-1, H, W), frame_code)            # (B, C1, H, W) pre-ReLU
    active = [float((x > 0).flatten(2).any(-1).any(0).float().mean())]
    for conv in cnn.convs[1:]:
        x = conv(F.relu(x))
        active.append(float((x > 0).flatten(2).any(-1).any(0).float().mean()))
    z = model.encoder(cnn.proj(F.relu(x)), B)                                     # (B, T, d)
    T = z.shape[1]
    spread = float((z.std(dim=1).pow(2).mean() / z.pow(2).mean().clamp_min(1e-12)).sqrt())
    flat = F.normalize(z.flatten(1), dim=1)
    cos = flat @ flat.t()                                                         # (B, B)
    latent_cos = float((cos.sum() - cos.diagonal().sum()) / (B * (B - 1))) if B > 1 else float("nan")
    # first decoder block's attention weights, recomputed (SDPA does not return them)
    frame = model.decoder.frame_part(frame_code)                                  # (B, 1, 720)
    q_in = model.decoder.query_mlp[2](F.relu(model.decoder.pixel_part(code) + frame))   # (B, HW, dq), Eq. (7)
    block = model.decoder.blocks[0]
    k, _ = block.kv(z)                                                            # (B, nh, T, hs)
    q = block.split_heads(block.c_q(block.ln_1(q_in)))                            # (B, nh, HW, hs)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(block.head_dim), dim=-1)   # (B, nh, HW, T)
    entropy = float(-(att * att.clamp_min(1e-12).log()).sum(-1).mean())
    h, w = H // 8, W // 8                                                         # token grid of the patch CNN
    rows = torch.arange(H, device=images.device) * h // H
    cols = torch.arange(W, device=images.device) * w // W
    own = (rows[:, None] * w + cols[None, :]).flatten()                           # (HW,) token of each pixel
    attn_own = float(att.gather(-1, own.view(1, 1, -1, 1).expand(B, att.shape[1], -1, 1)).mean())
    rgb = model.render(z, kp, e, size=(H, W)).clamp(0, 1)
    self_psnr = float(losses.psnr(rgb, images).mean())
    expr_spread = float((e.std(0).pow(2).mean() / e.pow(2).mean().clamp_min(1e-12)).sqrt()) if e.shape[1] \
        and e.shape[0] > 1 else float("nan")   # one face (or |e| = 0) has no spread
    model.train(was_training)
    return dict(active=active, spread=spread, latent_cos=latent_cos, attn_entropy=entropy,
                attn_uniform=math.log(T), attn_own=attn_own, self_psnr=self_psnr, expr_spread=expr_spread,
                expr_active=expr_active)


def collapsed(h):
    """The dead-encoder verdict on a `health` dict: a patch-CNN conv without any active channel, or set-latents
    that no longer vary across tokens or images (the decoder then renders from the driving conditioning alone)."""
    return min(h["active"]) == 0 or h["spread"] < 1e-3 or h["latent_cos"] > 0.999


EXPR_SPREAD_MIN = 0.01   # health's expr_spread below this: e counts as one vector (figures: RESULTS.md)


def expression_collapsed(h):
    """The same verdict for the expression network on a `health` dict: e (nearly) one constant vector for every
    face, or a hidden layer of X_M without any active unit; False for |e| = 0."""
    return bool(h["expr_active"]) and (min(h["expr_active"]) == 0 or h["expr_spread"] < EXPR_SPREAD_MIN)


def model_device(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------------
# command line

def format_number(v, digits, lead_zero=False):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    s = f"{round(v, digits) + 0.0:.{digits}f}"                       # + 0.0: no "-0.00"
    return s if lead_zero or not s.startswith("0.") else s[1:]      # Table 1 writes .7576


def format_row(name, num_src, row):
    akd = row.get("akd") if row else None
    return (f"{name:<26}{num_src:>5}  {format_number(row['ssim'], 4):>6}  {format_number(row['psnr'], 2):>6}  "
            f"{format_number(row['l1'], 4):>6}  {format_number(akd, 2):>5}")


def jsonable(x):
    """x with every NaN and infinity replaced by None (json writes NaN / Infinity, which strict parsers refuse)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run(args) -> dict:
    """The whole evaluation of one checkpoint: each figure printed as it is computed, all of them in --out."""
    check_options(args)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(args.checkpoint, device=device, kp_detector=args.kp_detector).eval()
    precision, why = cli.pick_precision(args.precision, device)
    print(f"precision: {precision} ({why})")
    render = Render(chunk=args.chunk, bf16=precision == "bf16")
    videos = data.VideoSet(root=args.data, split="test", size=model.cfg.image_size)
    out = {"checkpoint": str(args.checkpoint), "data": args.data or "built-in", "num_src": args.num_src,
           "image_size": model.cfg.image_size, "seed": args.seed, "precision": precision}
    report_self(out, args, model, videos, render)
    report_identity(out, args, model, videos, render)
    builtin = args.data is None                       # ground-truth parameters exist only there
    out["cross"] = out["leak"] = out["probe"] = out["expression"] = None
    if not builtin:
        out["cross_reason"] = out["probe_reason"] = "needs ground-truth parameters: built-in data only"
    elif min(len(videos), args.max_videos or len(videos)) < 2:
        out["cross_reason"] = "needs at least 2 test videos"
    if builtin and not args.no_cross and out.get("cross_reason") is None:
        report_cross(out, args, model, videos, render)
    if builtin:
        report_builtin_expression(out, args, model, videos, render)
    with cli.atomic_path(args.out) as tmp, open(tmp, "w") as f:
        json.dump(jsonable(out), f, indent=2)
    print(f"\nwrote {args.out}")
    return out


def check_options(args):
    """Numbers, device and --out before any work: --out is never an input (checkpoint, test data) and never
    replaces a file that is not this program's JSON."""
    cli.check_numbers(args, {"readout_ceiling": ">= 0", "num_src": ">= 1", "max_videos": ">= 1",
                             "probe_videos": ">= 1", "probe_stride": ">= 1",
                             "probe_alpha": "> 0", "chunk": ">= 1", "seed": ">= 0"})
    cli.check_device(args.device)
    cli.refuse_overwriting_inputs(args.out, [("--checkpoint", args.checkpoint), ("--kp-detector", args.kp_detector),
                                             ("--data", args.data)])
    if os.path.isfile(args.out):
        try:
            with open(args.out, encoding="utf-8") as f:
                json.load(f)
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"--out {args.out} exists and is not a JSON file of results (it would be replaced): "
                             f"choose another --out") from None
    ext = os.path.splitext(args.out)[1].lower()
    if ext in data.VIDEO_EXTS + data.IMAGE_EXTS + (".pt", ".pth", ".npy"):   # e.g. reenact.py's --out, pasted
        raise ValueError(f"--out {args.out}: metrics.py writes JSON, not a '{ext}' file; give a .json name "
                         f"(default results.json)")
    cli.check_writable(args.out)          # now, not after the whole evaluation
    if args.expression_png:
        if args.data is not None:
            raise ValueError("--expression-png draws the built-in faces (their ground truth): leave out --data")
        if not args.expression_png.lower().endswith(".png"):
            raise ValueError(f"--expression-png {args.expression_png}: give a .png file name")
        cli.check_writable(args.expression_png)


def report_self(out, args, model, videos, render):
    """Self-reenactment, Sec. 4.1's protocol, with AKD where a landmark detector is available."""
    landmark_fn, akd_reason = (None, "disabled with --no-akd") if args.no_akd else make_landmark_fn(args.akd)
    res = out["self"] = evaluate_self(videos, model, args.num_src, landmark_fn, args.max_videos, render)
    size = model.cfg.image_size
    out["akd"] = {"available": landmark_fn is not None, "reason": akd_reason, "units": f"pixels at {size}x{size}"}
    print(f"\nself-reenactment (Sec. 4.1), {res['videos']} videos "
          f"({res['videos_skipped']} too short, {res['videos_unreadable']} unreadable), "
          f"{res['baseline']['frames']} driving frames")
    print(f"{'method':<26}{'#src':>5}  {'SSIM':>6}  {'PSNR':>6}  {'L1':>6}  {'AKD':>5}")
    print(format_row("FSRT (this checkpoint)", args.num_src, res["model"]))
    print(format_row("copy nearest source", args.num_src, res["baseline"]))
    if landmark_fn is None:
        print(f"AKD: n/a -- {akd_reason}")
    else:
        m = res["model"]
        print(f"AKD over {m['akd_frames']} frames; no face found in {m['akd_missing_real']} real and "
              f"{m['akd_missing_generated']} generated frames")


def report_identity(out, args, model, videos, render):
    """CSIM of cross-reenactment (real data too), or the one line saying why it is skipped."""
    try:
        embed = FaceEmbedding()
    except RuntimeError as err:
        out["csim"], out["csim_reason"] = None, str(err)
        print(f"\nidentity similarity (CSIM): skipped -- {err}")
        return
    res = out["csim"] = evaluate_csim(videos, model, embed, args.max_videos, render)
    if res is None:
        print("\nidentity similarity (CSIM): n/a -- needs 2 test videos of different people")
        return
    if not res["pairs"]:
        print(f"\nidentity similarity (CSIM): n/a -- {res['network']} found no face in the first frame of the "
              f"{res['no_source_face']} source video(s) of the pairs of different people")
        return
    print(f"\nidentity similarity (CSIM) of cross-reenactment, relative motion, {res['pairs']} pairs: cosine of "
          f"{res['network']} between the source and each output frame: {format_number(res['csim'], 3)} "
          f"(the driver's own frames: {format_number(res['csim_driver'], 3)}; higher = the source's identity kept; "
          f"{res['frames']} frames, no face found in {res['no_face']})")


def report_cross(out, args, model, videos, render):
    """Cross-reenactment against the true frames, and the identity leak (built-in data)."""
    cross = out["cross"] = evaluate_cross(videos, model, args.num_src, args.max_videos, render)
    if cross is not None:
        print(f"\ncross-reenactment vs ground truth (identity A with B's motion), {cross['pairs']} pairs")
        print(f"{'':<26}{'#src':>5}  {'SSIM':>6}  {'PSNR':>6}  {'L1':>6}")
        for key, name in (("absolute", "FSRT, absolute motion"), ("relative", "FSRT, relative motion"),
                          ("baseline", "copy source (vs absolute)")):
            if cross[key] is not None:
                print(format_row(name, args.num_src, cross[key])[:-7])
    if min(len(videos), args.max_videos or len(videos)) >= 3:
        leak = out["leak"] = evaluate_leak(videos, model, args.max_videos, Render(chunk=args.chunk))
        if leak is not None:
            fmt = lambda v: "n/a" if v is None else f"{v:.2f} dB"
            print(f"identity leak: A driven by B and by C making the same motion, PSNR between the two "
                  f"outputs ({leak['triples']} triples; higher = less leak, >= 30 dB wanted): absolute "
                  f"{fmt(leak['absolute'])}, relative {fmt(leak.get('relative'))}; swapping only e "
                  f"{fmt(leak['via_e'])}, only k {fmt(leak['via_k'])}; the two driving videos differ by "
                  f"{fmt(leak['drivers'])}")


def report_builtin_expression(out, args, model, videos, render):
    """Expression transfer, the probe of e and (with --readout-ceiling) what e could carry (built-in data)."""
    line = lambda r, digits=3: "   ".join(f"{k} {format_number(v, digits, lead_zero=True)}" for k, v in r.items())
    row = lambda r: line({k: r[k] for k in (*EXPRESSION_TESTS, "mean")}, 2)
    ex = out["expression"] = evaluate_expression(model, render=render)
    print(f"\nexpression transfer: a neutral face driven by a face with one expression, share of the true change "
          f"the output makes (1 = all, 0 = none; {ex['identities']} identities)\n  self (itself):               "
          + row(ex))
    if model.cfg.use_keypoints:
        cross = out["expression_cross"] = evaluate_expression(model, render=render, cross=True)
        print("  cross (another, relative):   " + row(cross))
    paths = out["expression_paths"] = evaluate_expression_paths(model, chunk=render.chunk)
    print("  self, only e from the driver: " + row(paths["e"]) + "\n  self, only its keypoints:     "
          + row(paths["keypoints"]))
    if args.expression_png:
        expression_picture(model, args.expression_png)
        print(f"  wrote {args.expression_png}: neutral source | driver with its mouth open | output | output with "
              f"only e from the driver")
    size = model.cfg.image_size
    if not args.no_probe:
        train = data.VideoSet(root=None, split="train", size=size)
        X_tr, Y_tr, g_tr = probe_features(model, train, args.probe_videos, args.probe_stride)
        X_te, Y_te, g_te = probe_features(model, videos, args.max_videos, args.probe_stride)
        r2, alphas, r2_dims = probe_r2(X_tr, Y_tr, X_te, Y_te, args.probe_alpha, g_tr)
        expr_r2 = dict(zip(EXPRESSION_PARAMS, r2_dims["expression"]))
        out["probe"] = {"r2": r2, "alpha": alphas, "expression_r2": expr_r2,
                        "train_frames": len(X_tr), "test_frames": len(X_te),
                        "train_identities": len(set(g_tr.tolist())), "test_identities": len(set(g_te.tolist()))}
        print(f"\ndisentanglement probe: ridge map from e to the true parameters, R^2 on held-out identities "
              f"({len(X_tr)} train / {len(X_te)} test frames; want expression high, identity and pose low)")
        print("  " + line(r2))
        print("  expression, per parameter: " + line(expr_r2))
    if args.readout_ceiling:
        out["readout_ceiling"] = ceil = readout_ceiling(model, steps=args.readout_ceiling)
        print(f"\nreadout ceiling: Eq. (8)-(10) trained supervised on this detector ({args.readout_ceiling} steps), "
              f"R^2 per expression parameter (what e could carry at {size}x{size})")
        print("  " + line(ceil))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Evaluate an FSRT checkpoint: Table 1 protocol of Sec. 4.1, "
                                "plus cross-reenactment and a disentanglement probe on the built-in data.")
    p.add_argument("--checkpoint", required=True, help="train.py checkpoint, or the authors' vox256.pt / "
                                                       "vox256_2Source.pt (recognised by content)")
    p.add_argument("--kp-detector", default=None, help="the authors' kp_detector.pt, with their vox256.pt")
    p.add_argument("--data", default=None, help="VoxCeleb root with test/ (default: built-in videos)")
    p.add_argument("--num-src", type=int, default=1, help="source frames: 1 = first, 2 = first and last")
    p.add_argument("--max-videos", type=int, default=None, help="evaluate only the first N test videos")
    p.add_argument("--out", default="results.json", help="JSON file for the numbers")
    akd = p.add_mutually_exclusive_group()
    akd.add_argument("--no-akd", action="store_true", help="skip AKD (no landmark detector)")
    akd.add_argument("--akd", action="store_true", help="fail if AKD cannot be computed")
    p.add_argument("--no-cross", action="store_true", help="skip cross-reenactment (built-in data)")
    p.add_argument("--no-probe", action="store_true", help="skip the disentanglement probe (built-in data)")
    p.add_argument("--probe-videos", type=int, default=64, help="train videos the probe is fitted on")
    p.add_argument("--probe-stride", type=int, default=5, help="probe uses every N-th frame")
    p.add_argument("--readout-ceiling", type=int, default=0, metavar="STEPS",
                   help="also train Eq. (8)-(10) supervised on the frozen detector for STEPS steps: the most the "
                        "probe of e could read at this image size (built-in data; renders 11,000 faces first)")
    p.add_argument("--probe-alpha", type=float, default=None,
                   help="ridge penalty (default: chosen by cross-validation over training identities)")
    p.add_argument("--expression-png", default=None, metavar="FILE.png",
                   help="built-in data: a picture of the expression transfer (metrics.expression_picture)")
    p.add_argument("--chunk", type=int, default=None, help="pixels decoded per chunk")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 = bfloat16 autocast; auto (default): bf16 where it is faster than fp32 here")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    return cli.run_command(run, p.parse_args(argv), memory_hint="lower --chunk")


if __name__ == "__main__":
    sys.exit(main())
