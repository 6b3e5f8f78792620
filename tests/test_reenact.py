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


# ---------------------------------------------------------------- the per-frame loop on a tiny random model

def _tiny_model():
    """A tiny random FSRT whose raw output lies well inside [0, 1] (last render layer rescaled, bias 0.5),
    so that clamping does not hide differences between outputs."""
    import srt
    torch.manual_seed(0)
    model = srt.FSRT(srt.FSRTConfig.tiny()).eval()
    last = model.decoder.render_mlp[-1]
    with torch.no_grad():
        last.weight.mul_(8.0)
        last.bias.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    import srt
    model = _tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    srt.save_checkpoint(str(path), {"config": model.cfg.to_dict(), "model": model.state_dict(), "step": 0,
                                    "phase": 1})
    return str(path)


def _psnr(a, b):
    return float(-10 * torch.log10(((a - b) ** 2).mean()))


def _frames(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g)


@torch.no_grad()
def test_reenact_matches_model_pieces(tiny):
    """Absolute motion: every frame = render(encode(sources), k_D, e_D), whatever the batching."""
    src, drv = _frames(2, 1), _frames(5, 2)
    kp_s, e_s = tiny.keypoints_and_expression(src)
    z = tiny.encode(src[None], kp_s[None], e_s[None])
    kp_d, e_d = tiny.keypoints_and_expression(drv)
    want = tiny.render(z.expand(5, -1, -1), kp_d, e_d).clamp(0, 1)
    got = reenact.reenact(tiny, src, drv, batch=2, chunk=1000)
    assert got.shape == (5, 3, 64, 64) and got.dtype == torch.float32
    assert 0.05 < float(got.std()) and got.min() >= 0 and got.max() <= 1
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(reenact.reenact(tiny, src, drv, batch=5), got, atol=1e-5)
    part = reenact.reenact(tiny, src, drv, frames=slice(1, 4))
    assert torch.allclose(part, got[1:4], atol=1e-5)


@torch.no_grad()
def test_reenact_relative_motion(tiny):
    """Relative motion: k = k_S + (k_D - k_D,init)[*s]; the expression stays each driving frame's own."""
    src, drv = _frames(1, 3), _frames(4, 4)
    kp_s, e_s = tiny.keypoints_and_expression(src)
    z = tiny.encode(src[None], kp_s[None], e_s[None])
    kp_d, e_d = tiny.keypoints_and_expression(drv)
    for adapt in (False, True):
        k = relative_keypoints(kp_s, kp_d, kp_d[2:3], adapt_scale=adapt)
        want = tiny.render(z.expand(4, -1, -1), k, e_d).clamp(0, 1)
        got = reenact.reenact(tiny, src, drv, relative=True, adapt_scale=adapt, initial_frame=2, batch=3)
        assert torch.allclose(got, want, atol=1e-5)
    # at the initial frame, the keypoints are the source's: differs from absolute motion there
    absolute = reenact.reenact(tiny, src, drv)
    assert not torch.allclose(got[2], absolute[2], atol=1e-5)
    assert torch.allclose(reenact.reenact(tiny, src, drv, relative=True, initial_frame=-2), 
                          reenact.reenact(tiny, src, drv, relative=True, initial_frame=2))
    with pytest.raises(ValueError, match="outside"):
        reenact.reenact(tiny, src, drv, relative=True, initial_frame=4)


@torch.no_grad()
def test_one_vs_two_sources(tiny):
    src, drv = _frames(2, 5), _frames(3, 6)
    one = reenact.reenact(tiny, src[:1], drv)
    two = reenact.reenact(tiny, src, drv)
    assert one.shape == two.shape == (3, 3, 64, 64)
    assert (one - two).abs().max() > 1e-4
    assert torch.allclose(reenact.reenact(tiny, src[0], drv), one)         # [3,S,S] is one source


@torch.no_grad()
def test_bf16_close_to_fp32(tiny):
    src, drv = _frames(1, 7), _frames(2, 8)
    fp32 = reenact.reenact(tiny, src, drv)
    bf16 = reenact.reenact(tiny, src, drv, bf16=True)
    assert bf16.dtype == torch.float32
    assert _psnr(bf16, fp32) > 30
    assert not torch.equal(bf16, fp32)          # autocast was really on
    assert tiny.training is False
