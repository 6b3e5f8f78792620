"""
Evaluation of FSRT: the self-reenactment protocol and metrics of Sec. 4.1 (Table 1), plus two checks that
only the built-in data makes possible because its ground truth is known: cross-reenactment scores and a
disentanglement probe of the expression vector.

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

Built-in data only (its ground truth is known; details in evaluate_cross and probe_features):
  * cross-reenactment: identity A (test video i) driven by B (video i+1) is scored against render_face(A's
    identity, B's pose, B's expression) for absolute motion, and for relative motion against A's first-frame
    pose moved by B's pose change since B's frame 0 (relative_pose) with B's expression as-is.
  * disentanglement probe: a ridge map from e (model.keypoints_and_expression) to the expression, identity
    and pose parameters, fitted on train-split frames, R^2 on test-split frames (held-out identities). A
    well-disentangled e gives high expression R^2 and low identity and pose R^2; the expression R^2 is the
    mean over its five parameters, each printed too.
  * identity leak (evaluate_leak): A driven by B and by C performing B's exact motion; PSNR between the two.
  * expression transfer (evaluate_expression): a neutral face driven by itself with one expression (mouth
    open, smile, blink, brows up); the share of the true change in the image that the output makes.
  * --readout-ceiling STEPS (readout_ceiling): Eq. (8)-(10) trained supervised on the frozen detector, the
    most the probe could find at this image size.
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
from PIL import Image
from skimage.metrics import structural_similarity
from tqdm import tqdm

import data
import keypoints
import losses
from reenact import (EXPECTED, check_device, check_writable, fail, pick_precision, reenact,
                     refuse_overwriting_inputs)
from srt import model_from_checkpoint


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
    """AKD over frame pairs. landmark_fn(uint8 [H,W,3]) -> [68,2] pixels or None (no face).

    Returns {"akd": mean over frames with a face in both images (nan if none), "akd_frames": that count,
    "akd_missing_real": frames without a face in the real image, "akd_missing_generated": the same for the
    generated image}. A frame missing in both counts in both; missing frames are excluded from the mean.
    """
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
    """Wrap keypoints.LandmarkDetector for small frames: FAN's face detector misses 64x64 faces, so frames
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
        fn = detector_landmark_fn(keypoints.LandmarkDetector())
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
def evaluate_self(videos, model=None, num_src=1, landmark_fn=None, max_videos=None, device="cpu",
                  chunk=None, progress=True, bf16=False) -> dict:
    """Self-reenactment on a sequence of videos (dicts with "frames" [T,3,S,S]), protocol of Sec. 4.1.

    Returns {"model": row or None, "baseline": row, "videos": n, "videos_skipped": n (too short),
    "videos_unreadable": n (broken files, skipped with a warning)}; a row holds ssim,
    psnr, l1, frames (and the AKD entries when landmark_fn is given). model=None scores only the baseline.
    """
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
            pred = reenact(model, frames[src_idx].to(device), targets.to(device), relative=False,
                           chunk=chunk, bf16=bf16).cpu()
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
    """The ground truth of relative motion (Sec. 3.4): the source's pose moved by the driving head's change
    since the initial frame -- angles and translations add the difference, scale multiplies by the ratio.
    This is what relative keypoint transfer k_S + (k_D - k_D,initial) approximates; the expression is the
    driving frame's as-is (Sec. 3.4), so it is not made relative."""
    values = {}
    for f in dataclasses.fields(pose_source):
        a, b, b0 = (np.asarray(getattr(p, f.name), np.float64)
                    for p in (pose_source, pose_driving, pose_driving_initial))
        v = a * b / b0 if f.name == "scale" else a + (b - b0)
        values[f.name] = float(v) if v.ndim == 0 else v
    return type(pose_source)(**values)


@torch.no_grad()
def evaluate_cross(videos, model, num_src=1, max_videos=None, device="cpu", chunk=None, progress=True, bf16=False):
    """Cross-reenactment of identity A (video i) by the motion of B (video i+1, another identity): the
    driving frames are B's protocol frames (every 10th frame, same rule as self-reenactment), the ground
    truth is data.render_face(A's identity, pose, B's expression) with
      absolute: B's pose;   relative: A's first-frame pose moved by B's change since B's frame 0
    (relative_pose; the model runs with relative=True, initial_frame = B's frame 0, no scale adaption).
    Scores: SSIM, PSNR, L1 for both, and the copy-the-source baseline against the absolute ground truth."""
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
        sources = a["frames"][src_idx].to(device)
        driving = b["frames"][[0] + drv_idx].to(device)      # B's frame 0 leads: the relative anchor
        gt = {}
        for mode in modes:
            poses = [poses_b[j] if mode == "absolute" else relative_pose(poses_a[0], poses_b[j], poses_b[0])
                     for j in drv_idx]
            gt[mode] = data.render_frames(id_a, poses, [exprs_b[j] for j in drv_idx], size)[0]
            pred = reenact(model, sources, driving, relative=mode == "relative", initial_frame=0,
                           chunk=chunk, bf16=bf16).cpu()[1:]
            rows[mode].append(frame_scores(pred, gt[mode]))
        copy = a["frames"][[src_idx[0]] * len(drv_idx)]
        rows["baseline"].append(frame_scores(copy, gt["absolute"]))
    if not rows["absolute"]:
        return None
    return {k: mean_over_videos(v) if v else None for k, v in rows.items()} | {"pairs": len(rows["absolute"])}


@torch.no_grad()
def evaluate_leak(videos, model, max_videos=None, device="cpu", chunk=None, progress=True):
    """The identity leak, measured directly: source A (video i's first frame) is driven by two different people
    B (video i+1) and C (video i+2's identity) who perform the SAME pose and expression sequence (B's, at B's
    protocol frames; C's frames are rendered with data.render_frames). A model that takes only motion from the
    driver gives the same output for both: the figure is PSNR(output driven by B, output driven by C) in dB
    (inf = identical), for absolute and relative motion, with the PSNR between the two driving videos for scale.
    Where the leak goes (absolute motion): 'via_e' swaps only the expression vector (k from B, e from C vs e
    from B), 'via_k' only the keypoints; the lower figure is the wider path."""
    n = len(videos) if max_videos is None else min(len(videos), max_videos)
    if n < 3:
        raise ValueError("the identity-leak figure needs at least 3 videos (--max-videos >= 3)")
    modes = ("absolute", "relative") if model.cfg.use_keypoints else ("absolute",)
    rows = {k: [] for k in (*modes, "drivers", "via_e", "via_k")}
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
        drv_c = data.render_frames(id_c, [poses_b[j] for j in idx], [exprs_b[j] for j in idx], drv_b.shape[-1])[0]
        source = a["frames"][:1].to(device)
        for mode in modes:
            out = [reenact(model, source, d.to(device), relative=mode == "relative", initial_frame=0,
                           chunk=chunk).cpu()[1:] for d in (drv_b, drv_c)]
            rows[mode].append({"psnr": float(np.mean([psnr(x, y) for x, y in zip(*out)]))})
        rows["drivers"].append({"psnr": float(np.mean([psnr(x, y) for x, y in zip(drv_b[1:], drv_c[1:])]))})
        # swap one conditioning input at a time (absolute motion)
        kp_s, e_s = model.keypoints_and_expression(source)
        z = model.encode(source[None], kp_s[None], e_s[None])
        (k_b, e_b), (k_c, e_c) = (model.keypoints_and_expression(d[1:].to(device)) for d in (drv_b, drv_c))
        size = source.shape[-1]
        render = lambda k, e: model.render(z, k, e, size=size, chunk=chunk).clamp(0, 1).cpu()
        ref = render(k_b, e_b)
        for key, other in (("via_e", render(k_b, e_c)), ("via_k", render(k_c, e_b))):
            rows[key].append({"psnr": float(np.mean([psnr(x, y) for x, y in zip(ref, other)]))})
    if not rows["absolute"]:
        return None
    mean = lambda r: float(np.mean([x["psnr"] for x in r])) if r else None
    return {k: mean(v) for k, v in rows.items()} | {"triples": len(rows["absolute"])}


# ----------------------------------------------------------------------------------------------------------
# expression transfer: does the output change with the driver's expression as the real face does?

EXPRESSION_TESTS = {"mouth_open": data.Expression(mouth_open=0.9), "smile": data.Expression(smile=1.0),
                    "blink": data.Expression(blink_l=1.0, blink_r=1.0), "brow_raise": data.Expression(brow_raise=1.0)}


def expression_response(out, out_neutral, truth, truth_neutral) -> float:
    """The share of the true change that the output makes: <o - o0, g - g0> / ||g - g0||^2, the projection of
    the output's change onto the ground truth's (1 = the whole change, 0 = none; a change elsewhere in the
    image does not count). Tensors of one shape; nan when the ground truth does not change."""
    g, o = (truth - truth_neutral).double().flatten(), (out - out_neutral).double().flatten()
    gg = float(g @ g)
    return float(o @ g) / gg if gg > 0 else math.nan


@torch.no_grad()
def evaluate_expression(model, identities=16, seed=0, device="cpu", chunk=None, bf16=False) -> dict:
    """Self-reenactment of a neutral face by the same face, same pose, with one expression (EXPRESSION_TESTS),
    for `identities` built-in test identities, each at a near-frontal pose (yaw within 10, pitch within 5
    degrees): -> {test: mean expression_response, "mean": over the tests, "identities": n}. A model that takes
    the expression from the driver scores near 1; one that renders the source's expression (or a blur of all
    expressions) near 0. Not in the paper: the built-in data's ground truth makes it measurable."""
    rng, size = np.random.default_rng(seed), model.cfg.image_size
    scores = {k: [] for k in EXPRESSION_TESTS}
    for j in range(identities):
        identity = data.builtin_identity("test", j)[2]
        pose = data.Pose(yaw=float(rng.uniform(-10, 10)), pitch=float(rng.uniform(-5, 5)))
        exprs = [data.Expression(), *EXPRESSION_TESTS.values()]
        truth = data.render_frames(identity, [pose] * len(exprs), exprs, size)[0]   # [1 + tests, 3, S, S]
        out = reenact(model, truth[:1].to(device), truth.to(device), chunk=chunk, bf16=bf16).float().cpu()
        for i, k in enumerate(EXPRESSION_TESTS, 1):
            scores[k].append(expression_response(out[i], out[0], truth[i], truth[0]))
    res = {k: float(np.mean(v)) for k, v in scores.items()}
    return res | {"mean": float(np.mean(list(res.values()))), "identities": identities}


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
def probe_features(model, videos, max_videos=None, stride=5, device="cpu", batch=32, progress=True):
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
            frames = item["frames"][idx[k:k + batch]].to(device)
            feats.append(model.keypoints_and_expression(frames)[1].float().cpu().numpy())
        targets["expression"] += [exprs[j].vector() for j in idx]
        targets["pose"] += [poses[j].vector() for j in idx]
        targets["identity"] += [continuous_vector(identity)] * len(idx)
        groups += [i] * len(idx)
    return np.concatenate(feats), {k: np.stack(v).astype(np.float64) for k, v in targets.items()}, np.array(groups)


EXPRESSION_PARAMS = [f.name for f in dataclasses.fields(data.Expression)]   # mouth_open, smile, blink_l/_r, brow


def readout_ceiling(model, frames=10000, steps=1500, batch=64, seed=0, test_frames=1000, progress=True):
    """What Eq. (8)-(10) CAN read from this detector: a fresh expression network (the model's configuration)
    and a linear head trained, supervised, to regress the true expression parameters from the frozen
    detector's output on rendered frames of random identities, poses and expressions at the model's size.
    -> {parameter: held-out R^2}. An upper bound for the probe of e: where it is low, the detector's features
    (and so e) cannot show that part of the expression at this resolution, however FSRT is trained."""
    from expression import ExpressionNet
    if model.expression.cfg.expr_dim == 0:
        return {k: math.nan for k in EXPRESSION_PARAMS}
    torch.manual_seed(seed)
    size, names = model.cfg.image_size, EXPRESSION_PARAMS

    def detect(n, rng):                     # frozen detector on n rendered frames -> (features, heatmaps, E)
        feats, heats, E = [], [], []
        for k in tqdm(range(0, n, 100), desc="readout frames", disable=not progress):
            params = [(data.sample_identity(rng), data.sample_pose(rng), data.sample_expression(rng))
                      for _ in range(min(100, n - k))]
            x = torch.stack([data.render_frames(i, [p], [e], size)[0][0] for i, p, e in params])
            with torch.no_grad():
                d = model.kp_detector(x.to(next(model.parameters()).device))
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


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


def run(args) -> dict:
    data.check_numbers(args, {"readout_ceiling": ">= 0", "num_src": ">= 1", "max_videos": ">= 1",
                              "probe_videos": ">= 1", "probe_stride": ">= 1",
                             "probe_alpha": "> 0", "chunk": ">= 1", "seed": ">= 0"})
    check_device(args.device)
    refuse_overwriting_inputs(args.out, [("--checkpoint", args.checkpoint), ("--kp-detector", args.kp_detector)])
    check_writable(args.out)          # now, not after the whole evaluation
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = model_from_checkpoint(args.checkpoint, device=device, kp_detector=args.kp_detector).eval()
    size = model.cfg.image_size
    precision, why = pick_precision(args.precision, device)
    print(f"precision: {precision} ({why})")
    bf16 = precision == "bf16"
    videos = data.VideoSet(root=args.data, split="test", size=size)

    landmark_fn, akd_reason = (None, "disabled with --no-akd") if args.no_akd else make_landmark_fn(args.akd)
    res = evaluate_self(videos, model, args.num_src, landmark_fn, args.max_videos, device, args.chunk, bf16=bf16)
    out = {"checkpoint": str(args.checkpoint), "data": args.data or "built-in", "num_src": args.num_src,
           "image_size": size, "seed": args.seed, "precision": precision, "self": res,
           "akd": {"available": landmark_fn is not None, "reason": akd_reason,
                   "units": f"pixels at {size}x{size}"}}
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

    builtin = args.data is None                       # ground-truth parameters exist only there
    out["cross"] = out["leak"] = out["probe"] = out["expression"] = None
    if not builtin:
        out["cross_reason"] = out["probe_reason"] = "needs ground-truth parameters: built-in data only"
    elif min(len(videos), args.max_videos or len(videos)) < 2:
        out["cross_reason"] = "needs at least 2 test videos"
    if builtin and not args.no_cross and out.get("cross_reason") is None:
        out["cross"] = cross = evaluate_cross(videos, model, args.num_src, args.max_videos, device, args.chunk,
                                              bf16=bf16)
        if cross is not None:
            print(f"\ncross-reenactment vs ground truth (identity A with B's motion), {cross['pairs']} pairs")
            print(f"{'':<26}{'#src':>5}  {'SSIM':>6}  {'PSNR':>6}  {'L1':>6}")
            for key, name in (("absolute", "FSRT, absolute motion"), ("relative", "FSRT, relative motion"),
                              ("baseline", "copy source (vs absolute)")):
                if cross[key] is not None:
                    print(format_row(name, args.num_src, cross[key])[:-7])
        if min(len(videos), args.max_videos or len(videos)) >= 3:
            out["leak"] = leak = evaluate_leak(videos, model, args.max_videos, device, args.chunk)
            if leak is not None:
                fmt = lambda v: "n/a" if v is None else f"{v:.2f} dB"
                print(f"identity leak: A driven by B and by C making the same motion, PSNR between the two "
                      f"outputs ({leak['triples']} triples; higher = less leak, >= 30 dB wanted): absolute "
                      f"{fmt(leak['absolute'])}, relative {fmt(leak.get('relative'))}; swapping only e "
                      f"{fmt(leak['via_e'])}, only k {fmt(leak['via_k'])}; the two driving videos differ by "
                      f"{fmt(leak['drivers'])}")
    if builtin:
        out["expression"] = ex = evaluate_expression(model, device=device, chunk=args.chunk, bf16=bf16)
        print(f"\nexpression transfer: a neutral face driven by itself with one expression, share of the true "
              f"change the output makes (1 = all, 0 = none; {ex['identities']} identities): "
              + "   ".join(f"{k} {format_number(ex[k], 2, lead_zero=True)}" for k in (*EXPRESSION_TESTS, "mean")))
    if builtin and not args.no_probe:
        train = data.VideoSet(root=None, split="train", size=size)
        X_tr, Y_tr, g_tr = probe_features(model, train, args.probe_videos, args.probe_stride, device)
        X_te, Y_te, g_te = probe_features(model, videos, args.max_videos, args.probe_stride, device)
        r2, alphas, r2_dims = probe_r2(X_tr, Y_tr, X_te, Y_te, args.probe_alpha, g_tr)
        expr_r2 = dict(zip(EXPRESSION_PARAMS, r2_dims["expression"]))
        out["probe"] = {"r2": r2, "alpha": alphas, "expression_r2": expr_r2,
                        "train_frames": len(X_tr), "test_frames": len(X_te),
                        "train_identities": len(set(g_tr.tolist())), "test_identities": len(set(g_te.tolist()))}
        print(f"\ndisentanglement probe: ridge map from e to the true parameters, R^2 on held-out identities "
              f"({len(X_tr)} train / {len(X_te)} test frames; want expression high, identity and pose low)")
        print("  " + "   ".join(f"{k} {format_number(v, 3, lead_zero=True)}" for k, v in r2.items()))
        print("  expression, per parameter: " + "   ".join(f"{k} {format_number(v, 3, lead_zero=True)}" for k, v in
                                                         expr_r2.items()))
    if builtin and args.readout_ceiling:
        out["readout_ceiling"] = ceil = readout_ceiling(model, steps=args.readout_ceiling)
        print(f"\nreadout ceiling: Eq. (8)-(10) trained supervised on this detector ({args.readout_ceiling} steps), "
              f"R^2 per expression parameter (what e could carry at {model.cfg.image_size}x{model.cfg.image_size})")
        print("  " + "   ".join(f"{k} {format_number(v, 3, lead_zero=True)}" for k, v in ceil.items()))

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(_jsonable(out), f, indent=2)
    print(f"\nwrote {args.out}")
    return out


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
    p.add_argument("--chunk", type=int, default=None, help="pixels decoded per chunk")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="bf16 = bfloat16 autocast; auto (default): bf16 where it is faster than fp32 here")
    p.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        run(args)
    except EXPECTED as err:
        return fail(err)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
