"""reenact.py: motion arithmetic against hand values, best-frame choice, the per-frame loop on a tiny
random FSRT, the command line end to end (built-in data, 1 vs 2 sources, bad inputs, 2 processes)."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import losses
import reenact
from reenact import find_best_frame, hull_area, normalize_landmarks, relative_keypoints
import weights

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
    last = [m for m in model.decoder.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 3][-1]
    with torch.no_grad():
        last.weight.mul_(8.0)
        last.bias.fill_(0.5)
    return model


@pytest.fixture(scope="module")
def tiny():
    return _tiny_model()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    model = _tiny_model()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    weights.save_checkpoint(str(path), {"config": model.cfg.to_dict(), "model": model.state_dict(), "step": 0,
                                    "phase": 1})
    return str(path)


def _psnr(a, b):
    return float(losses.psnr(a, b).mean())


def _frames(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 64, 64, generator=g)


@torch.no_grad()
def test_reenact_matches_model_pieces(tiny):
    """Absolute motion: every frame = render(encode(sources), k_D, e_D), whatever the batching."""
    src, drv = _frames(2, 1), _frames(3, 2)
    kp_s, e_s = tiny.keypoints_and_expression(src)
    z = tiny.encode(src[None], kp_s[None], e_s[None])
    kp_d, e_d = tiny.keypoints_and_expression(drv)
    want = tiny.render(z.expand(3, -1, -1), kp_d, e_d).clamp(0, 1)
    got = reenact.reenact(tiny, src, drv, render=reenact.Render(batch=2, chunk=1000))
    assert got.shape == (3, 3, 64, 64) and got.dtype == torch.float32
    assert 0.05 < float(got.std()) and got.min() >= 0 and got.max() <= 1
    assert torch.allclose(got, want, atol=1e-5)
    part = reenact.reenact(tiny, src, drv, frames=slice(1, 3), render=reenact.Render(batch=1))
    assert torch.allclose(part, got[1:3], atol=1e-5)


@torch.no_grad()
def test_reenact_relative_motion(tiny):
    """Relative motion: k = k_S + (k_D - k_D,init)[*s]; the expression stays each driving frame's own."""
    src, drv = _frames(1, 3), _frames(3, 4)
    kp_s, e_s = tiny.keypoints_and_expression(src)
    z = tiny.encode(src[None], kp_s[None], e_s[None])
    kp_d, e_d = tiny.keypoints_and_expression(drv)
    for adapt, initial in ((False, 1), (True, -2)):                 # -2 counts from the end: frame 1 too
        k = relative_keypoints(kp_s, kp_d, kp_d[1:2], adapt_scale=adapt)
        want = tiny.render(z.expand(3, -1, -1), k, e_d).clamp(0, 1)
        got = reenact.reenact(tiny, src, drv, relative=True, adapt_scale=adapt, initial_frame=initial,
                                  render=reenact.Render(batch=2))
        assert torch.allclose(got, want, atol=1e-5)
    # at the initial frame the keypoints are the source's, not the driving frame's (absolute motion)
    absolute = tiny.render(z, kp_d[1:2], e_d[1:2]).clamp(0, 1)
    assert (got[1] - absolute[0]).abs().max() > 1e-4
    with pytest.raises(ValueError, match="outside"):
        reenact.reenact(tiny, src, drv, relative=True, initial_frame=3)
    import srt
    no_kp = srt.FSRT(srt.FSRTConfig.tiny(use_keypoints=False))
    with pytest.raises(ValueError, match="n_K = 0"):
        reenact.reenact(no_kp, src, drv, relative=True)


@torch.no_grad()
def test_one_vs_two_sources(tiny):
    src, drv = _frames(2, 5), _frames(2, 6)
    one = reenact.reenact(tiny, src[:1], drv)
    two = reenact.reenact(tiny, src, drv)
    other = reenact.reenact(tiny, src[1:], drv)
    assert one.shape == two.shape == (2, 3, 64, 64)
    # a random model depends only weakly on its sources (~1e-4 here), but far above float noise (~1e-7;
    # the same call twice is bit-identical): the set-latents of both sources are attended
    assert torch.equal(reenact.reenact(tiny, src[:1], drv), one)
    assert (one - two).abs().max() > 1e-6 and (other - two).abs().max() > 1e-6
    assert torch.allclose(reenact.reenact(tiny, src[0], drv), one)         # [3,S,S] is one source


@torch.no_grad()
def test_bf16_close_to_fp32(tiny):
    src, drv = _frames(1, 7), _frames(2, 8)
    fp32 = reenact.reenact(tiny, src, drv)
    bf16 = reenact.reenact(tiny, src, drv, render=reenact.Render(bf16=True))
    assert bf16.dtype == torch.float32
    assert _psnr(bf16, fp32) > 30
    assert not torch.equal(bf16, fp32)          # autocast was really on
    assert tiny.training is False


# ---------------------------------------------------------------- command line

def _write_inputs(tmp_path):
    """A 96x80 RGB png, a 3-frame gif at 10 fps (64x64) and a 4-frame mp4 source video."""
    import data
    from PIL import Image
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    drv = rng.integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
    data.write_video(str(tmp_path / "d.gif"), drv, 10)
    vid = rng.integers(0, 256, size=(4, 64, 64, 3), dtype=np.uint8)
    data.write_video(str(tmp_path / "s.mp4"), vid, 25)
    return str(tmp_path / "a.png"), str(tmp_path / "d.gif"), str(tmp_path / "s.mp4")


def test_cli_demo_builtin_data(tiny_ckpt, tmp_path, capsys):
    """No --source/--driving: a test identity driven by another's video, side by side, driving fps."""
    import data
    out = tmp_path / "demo.mp4"
    assert reenact.main(["--checkpoint", tiny_ckpt, "--max-frames", "2", "--out", str(out), "--no-progress",
                         "--find-best-frame"]) == 0         # best frame from the built-in data's landmarks
    frames, fps = data.read_video(str(out))
    assert frames.shape[0] == 2 and frames.shape[1:] == (64, 3 * 64, 3)       # source | driving | result
    assert fps == pytest.approx(data.DEFAULT_FPS, rel=1e-3)
    printed = capsys.readouterr().out
    assert "demo: source" in printed and "best initial frame:" in printed


def test_cli_files_sources_and_formats(tiny_ckpt, tmp_path, capsys):
    import data
    png, gif, mp4 = _write_inputs(tmp_path)
    one, two = tmp_path / "one", tmp_path / "two"
    assert reenact.main(["--checkpoint", tiny_ckpt, "--source", png, "--driving", gif, "--out", str(one),
                         "--no-progress", "--batch", "2", "--chunk", "512"]) == 0
    assert "centre-cropped to 80x80 and resized to 64x64" in capsys.readouterr().out
    assert reenact.main(["--checkpoint", tiny_ckpt, "--source", png, mp4, "--source-frames", "0", "-1",
                         "--driving", gif, "--out", str(two), "--no-progress"]) == 0
    a, fps_a = data.read_video(str(one))
    b, _ = data.read_video(str(two))
    assert a.shape == b.shape == (3, 64, 64, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0                   # 1 vs 3 sources differ
    rel = tmp_path / "rel.gif"
    assert reenact.main(["--checkpoint", tiny_ckpt, "--source", png, "--driving", gif, "--out", str(rel),
                         "--best-frame", "-1", "--adapt-scale", "--no-progress"]) == 0
    r, fps_r = data.read_video(str(rel))
    assert len(r) == 3 and fps_r == pytest.approx(10, rel=1e-3)


def test_cli_16bit_and_rgba_sources_are_converted(tiny_ckpt, tmp_path):
    import data
    from PIL import Image
    _, gif, _ = _write_inputs(tmp_path)
    folder = str(tmp_path / "frames")                                    # driving as a folder of PNGs
    data.write_video(folder, data.read_video(gif)[0], 10)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 65536, size=(64, 64), dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(rng.integers(0, 256, size=(64, 64, 4), dtype=np.uint8), "RGBA").save(tmp_path / "rgba.png")
    for name in ("g16.png", "rgba.png"):
        out = tmp_path / f"{name}.mp4"
        assert reenact.main(["--checkpoint", tiny_ckpt, "--source", str(tmp_path / name), "--driving", folder,
                             "--out", str(out), "--no-progress", "--max-frames", "1"]) == 0
        assert len(data.read_video(str(out))[0]) == 1


def _one_error_line(err):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_bad_inputs_one_error_line(tiny_ckpt, tmp_path, capsys, monkeypatch):
    png, gif, _ = _write_inputs(tmp_path)
    (tmp_path / "bad.mp4").write_bytes(b"this is not a video" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    cases = [(["--source", str(tmp_path / "missing.png"), "--driving", gif], "missing.png"),
             (["--source", png, "--driving", str(tmp_path / "bad.mp4")], "bad.mp4"),
             (["--source", png, "--driving", str(tmp_path / "empty")], "empty"),
             (["--source", str(tmp_path / "notes.txt"), "--driving", gif], "notes.txt"),
             (["--source", png, "--driving", gif, "--best-frame", "7"], "frame 7"),
             (["--source", png], "--driving"),
             (["--source", png, "--driving", gif, "--out", str(tmp_path / "o.avi")], ".avi")]
    for args, needle in cases:
        code = reenact.main(["--checkpoint", tiny_ckpt, "--out", str(tmp_path / "o.mp4"), "--no-progress"] + args)
        line = _one_error_line(capsys.readouterr().err)
        assert code == 2 and needle in line, (args, line)
    monkeypatch.setattr(reenact, "BUILTIN_CKPT", str(tmp_path / "nothing.pt"))
    assert reenact.main(["--source", png, "--driving", gif, "--out", str(tmp_path / "o.mp4")]) == 2
    assert "train.py --phase 1" in _one_error_line(capsys.readouterr().err)


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    args = ["--checkpoint", str(tmp_path / "none.pt"), "--source", str(tmp_path / "a.png"),
            "--driving", str(tmp_path / "d.mp4"), "--out", str(tmp_path / "o.mp4")]
    r = subprocess.run([sys.executable, "reenact.py"] + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "none.pt" in _one_error_line(r.stderr)


def test_cli_two_processes_match_one(tiny_ckpt, tmp_path):
    """torchrun with 2 gloo processes: frames split, gathered in order, written by rank 0 == 1 process."""
    import data
    png, gif, _ = _write_inputs(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    common = ["reenact.py", "--checkpoint", tiny_ckpt, "--source", png, "--driving", gif, "--no-progress",
              "--batch", "1", "--device", "cpu"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                       + common + ["--out", str(tmp_path / "two")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert reenact.main(common[1:] + ["--out", str(tmp_path / "one")]) == 0
    two, _ = data.read_video(str(tmp_path / "two"))
    one, _ = data.read_video(str(tmp_path / "one"))
    assert two.shape == one.shape == (3, 64, 64, 3)
    assert np.abs(two.astype(int) - one.astype(int)).max() <= 1


def test_reenact_casts_inputs_to_the_model_dtype():
    """A float64 model (train.py --double) takes float32 frames: reenact casts them to the model's dtype."""
    model = _tiny_model().double()
    S = model.cfg.image_size
    g = torch.Generator().manual_seed(0)
    src, drv = torch.rand(1, 3, S, S, generator=g), torch.rand(2, 3, S, S, generator=g)
    out = reenact.reenact(model, src, drv)
    ref = reenact.reenact(model, src.double(), drv.double())
    assert out.dtype == torch.float32 and torch.equal(out, ref)
