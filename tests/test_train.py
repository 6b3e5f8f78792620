"""Tests of train.py: gradient pixel sub-sampling, DDP = one process, resume = uninterrupted, skipped
non-finite steps, clear errors, and a tiny model that really learns."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import srt
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def tiny_model(image_size=32):
    torch.manual_seed(0)
    return srt.FSRT(srt.FSRTConfig.tiny(image_size=image_size))


def decoder_inputs(model, B=1):
    """Random set-latents and driving conditioning as leaves, so gradients can be inspected."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(1)
    set_latents = torch.randn(B, 4, cfg.width, generator=g).requires_grad_(True)
    kp = torch.rand(B, cfg.num_kp, 2, generator=g) * 2 - 1
    expr = torch.randn(B, cfg.expr_dim, generator=g).requires_grad_(True)
    return set_latents, kp, expr


def test_subsampled_render_equals_full_no_grad_render():
    model = tiny_model().eval()
    set_latents, kp, expr = decoder_inputs(model, B=2)
    with torch.no_grad():
        full = model.render(set_latents, kp, expr, size=(12, 10))
    for offset in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        img = train.render_subsampled(model, set_latents, kp, expr, (12, 10), offset)
        assert img.shape == (2, 3, 12, 10) and img.requires_grad
        torch.testing.assert_close(img.detach(), full, atol=1e-5, rtol=0)


def test_only_subsampled_pixels_receive_gradient_and_the_offsets_cover_all(monkeypatch):
    """The pixel coordinates are made a leaf tensor: a pixel receives gradient iff it was decoded with grad."""
    model = tiny_model().eval()
    set_latents, kp, expr = decoder_inputs(model)
    H, W = 6, 8
    grid = srt.pixel_grid(H, W).requires_grad_(True)                   # (H*W, 2)
    monkeypatch.setattr(srt, "pixel_grid", lambda *a, **k: grid)
    covered = torch.zeros(H, W, dtype=torch.bool)
    for ox, oy in [(0, 0), (1, 0), (0, 1), (1, 1)]:
        grid.grad = None
        img = train.render_subsampled(model, set_latents, kp, expr, (H, W), (ox, oy))
        (img * torch.rand_like(img)).sum().backward()
        has_grad = (grid.grad.abs().sum(1) > 0).view(H, W)
        expected = torch.zeros(H, W, dtype=torch.bool)
        expected[oy::2, ox::2] = True            # every second pixel in x and y from the offset
        assert torch.equal(has_grad, expected), (ox, oy)
        assert set_latents.grad.abs().sum() > 0 and expr.grad.abs().sum() > 0
        covered |= has_grad
    assert covered.all()


def test_lr_schedule_is_the_release_one():
    class A:
        lr, warmup = 1e-4, 2500
    assert train.lr_at(A, 1250) == pytest.approx(0.5e-4 * 0.16 ** (-1250 / 4e6))
    assert train.lr_at(A, 2500) == pytest.approx(1e-4)
    assert train.lr_at(A, 2500 + 4_000_000) == pytest.approx(0.16e-4)


def test_global_batches_split_over_ranks_without_overlap():
    n, bs = 10, 4
    first = [i for s in range(5) for i in train.global_indices(s, bs, n, seed=3)]
    assert sorted(first[:10]) == list(range(10)) and sorted(first[10:20]) == list(range(10))   # epochs
    per_rank = [list(train.StepSampler(n, bs, r, 2, 3, 1, 3)) for r in range(2)]
    for step in range(2):   # the two ranks' halves make up the global batch of that step
        assert per_rank[0][step] + per_rank[1][step] == train.global_indices(step + 1, bs, n, 3)
