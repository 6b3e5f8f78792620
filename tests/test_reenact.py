"""reenact.py: motion arithmetic against hand values, best-frame choice, the per-frame loop on a tiny
random FSRT, the command line end to end (built-in data, 1 vs 2 sources, bad inputs, 2 processes)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import reenact
from reenact import find_best_frame, hull_area, normalize_landmarks, relative_keypoints

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SQUARE = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=np.float32)


# ---------------------------------------------------------------- motion functions (hand values)

def test_hull_area_hand_values():
    inner = np.array([[0.5, 0.5], [0.2, 0.7], [0.9, 0.1]])
    assert hull_area(np.concatenate([SQUARE, inner])) == pytest.approx(1.0)     # interior points ignored
    assert hull_area(SQUARE[[2, 0, 3, 1]]) == pytest.approx(1.0)                 # order does not matter
    assert hull_area(3 * SQUARE + 7) == pytest.approx(9.0)                        # area scales with s^2
    assert hull_area([[0, 0], [4, 0], [0, 3]]) == pytest.approx(6.0)             # right triangle 4 x 3 / 2
    assert hull_area([[0, 0], [1, 1], [2, 2], [3, 3]]) == 0.0                    # collinear
    assert hull_area([[1, 1], [1, 1]]) == 0.0
    # regular hexagon of radius 1: 3*sqrt(3)/2; as a torch tensor
    a = torch.arange(6) * math.pi / 3
    assert hull_area(torch.stack([a.cos(), a.sin()], 1)) == pytest.approx(3 * math.sqrt(3) / 2, rel=1e-6)


def test_relative_keypoints_hand_values():
    kp_s = torch.tensor([[[0.1, 0.2], [0.3, -0.4], [-0.5, 0.0]]])                 # (1, 3, 2)
    kp_init = torch.tensor([[[0.0, 0.0], [0.1, 0.1], [0.2, -0.2]]])
    kp_d = torch.tensor([[[0.0, 0.0], [0.1, 0.1], [0.2, -0.2]],                   # = initial -> k_S
                         [[0.1, 0.0], [0.2, 0.1], [0.3, -0.2]]])                  # shifted by (0.1, 0)
    k = relative_keypoints(kp_s, kp_d, kp_init)
    assert k.shape == (2, 3, 2)
    assert torch.allclose(k[0], kp_s[0])
    assert torch.allclose(k[1], torch.tensor([[0.2, 0.2], [0.4, -0.4], [-0.4, 0.0]]))


def test_relative_keypoints_adapt_scale():
    kp_s = torch.from_numpy(2 * SQUARE)[None]           # hull area 4
    kp_init = torch.from_numpy(SQUARE)[None]            # hull area 1 -> s = sqrt(4)/sqrt(1) = 2
    kp_d = kp_init + torch.tensor([0.1, -0.05])
    k = relative_keypoints(kp_s, kp_d, kp_init, adapt_scale=True)
    assert torch.allclose(k, kp_s + torch.tensor([0.2, -0.1]))
    k1 = relative_keypoints(kp_s, kp_d, kp_init, adapt_scale=False)
    assert torch.allclose(k1, kp_s + torch.tensor([0.1, -0.05]))
    # per-element scale in a batch: source areas 4 and 9 against the same initial frame
    kp_s2 = torch.stack([2 * torch.from_numpy(SQUARE), 3 * torch.from_numpy(SQUARE)])
    k2 = relative_keypoints(kp_s2, kp_d.expand(2, -1, -1), kp_init, adapt_scale=True)
    assert torch.allclose(k2 - kp_s2, torch.tensor([[0.2, -0.1]]).mul(torch.tensor([[1.0], [1.5]]))[:, None])
    with pytest.raises(ValueError, match="degenerate"):
        relative_keypoints(kp_s, kp_d, torch.zeros(1, 4, 2), adapt_scale=True)


def _face(rng, n=68):
    return rng.normal(size=(n, 2)) * 10 + 30


def test_normalize_landmarks_invariances():
    rng = np.random.default_rng(0)
    lm = _face(rng)
    n = normalize_landmarks(lm)
    assert np.allclose(n.mean(0), 0, atol=1e-12)
    assert hull_area(n) == pytest.approx(1.0)
    assert np.allclose(normalize_landmarks(3.5 * lm + [12, -4]), n)


def test_find_best_frame_known_answer():
    rng = np.random.default_rng(1)
    src = _face(rng)
    others = [_face(rng) for _ in range(4)]
    nan = src.copy(); nan[3] = np.nan
    # frame 3 is the source scaled and shifted (distance 0 after normalisation); frame 1 has no face,
    # frame 4 has NaNs (and would otherwise be the exact source), frame 5 is a slightly perturbed source
    driving = [others[0], None, others[1], 0.5 * src + 100, nan, src + rng.normal(size=src.shape) * 0.5]
    assert find_best_frame(src, driving) == 3
    assert find_best_frame(src, [others[0], None, src + rng.normal(size=src.shape) * 0.5, others[1]]) == 2
    with pytest.raises(ValueError, match="any driving frame"):
        find_best_frame(src, [None, nan])
    with pytest.raises(ValueError, match="source"):
        find_best_frame(None, [src])
