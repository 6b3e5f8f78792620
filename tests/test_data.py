"""data.py: the built-in datasets, the augmentations of Sec. 3.2 and the VoxCeleb loader (on exports)."""
import dataclasses
import warnings
from collections import Counter

import numpy as np
import pytest
import torch

import data
from builtin_faces import Expression, Pose, render_face
import builtin_faces as faces
from conftest import IDENT


def test_render_deterministic_shapes_and_range():
    rng = np.random.default_rng(3)
    args = faces.sample_identity(rng), faces.sample_pose(rng), faces.sample_expression(rng)
    (a, la), (b, lb) = render_face(*args, size=64), render_face(*args, size=64)
    assert a.shape == (64, 64, 3) and a.dtype == np.float32 and la.shape == (68, 2) and la.dtype == np.float32
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert 0 <= a.min() and a.max() <= 1
    c, lc = render_face(*args, size=128)                       # the same face at another size
    np.testing.assert_allclose(data.to_normalized(lc, 128), data.to_normalized(la, 64), atol=1e-5)
    v1, v2 = data.VideoSet(num_videos=2, frames=12), data.VideoSet(num_videos=2, frames=12)
    assert torch.equal(v1[1]["frames"], v2[1]["frames"])
    s1, s2 = data.FaceDataset(num_src=2, seed=5), data.FaceDataset(num_src=2, seed=5)
    assert all(torch.equal(s1[7][k], s2[7][k]) for k in s1[7])


def test_flip_permutation_and_mirror_rendering():
    P = data.FLIP_PERM
    assert sorted(P) == list(range(68)) and np.array_equal(P[P], np.arange(68))
    assert set(P[36:42]) == set(range(42, 48)) and P[36] == 45 and P[39] == 42      # left eye -> right eye
    assert P[48] == 54 and P[0] == 16 and P[8] == 8 and P[30] == 30 and P[17] == 26
    S = 64
    ident = dataclasses.replace(IDENT, background_kind=0)
    img, lm = render_face(ident, Pose(yaw=20, pitch=5, roll=10, tx=0.06), Expression(0.3, 0.2, 1.0, 0.0, 0.3), S)
    mir, lm_m = render_face(ident, Pose(yaw=-20, pitch=5, roll=-10, tx=-0.06), Expression(0.3, 0.2, 0.0, 1.0, 0.3), S)
    np.testing.assert_allclose(data.flip_landmarks(lm, S), lm_m, atol=1e-3)  # flip = the mirrored head
    assert np.abs(img[:, ::-1] - mir).mean() < 0.02
    np.testing.assert_allclose(data.flip_landmarks(data.flip_landmarks(lm, S), S), lm, atol=1e-5)
    t = torch.from_numpy(lm)
    assert torch.allclose(data.flip_landmarks(t, S), torch.from_numpy(data.flip_landmarks(lm, S)))


def test_omega_never_cuts_into_the_face_box():
    rng, S = np.random.default_rng(0), 64
    for _ in range(200):
        _, lm = render_face(IDENT, faces.sample_pose(rng, 1.5), faces.sample_expression(rng), S)
        x0, y0, x1, y1 = data.omega_box(lm, S, rng)
        (lx0, ly0), (lx1, ly1) = lm.min(0), lm.max(0)
        h = ly1 - ly0
        assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
        assert x0 <= max(lx0, 0) and x1 - 1 >= min(lx1, S - 1)
        assert y0 <= max(ly0 - 0.25 * h, 0) and y1 - 1 >= min(ly1 + 0.05 * h, S - 1)


def test_crop_transform_maps_points_exactly():
    S, box = 64, (9, 4, 57, 40)                               # x0, y0, x1, y1 (exclusive); aspect changes
    img = torch.zeros(1, 3, S, S)
    img[0, :, 20:23, 30:33] = 1.0                             # a blob centred on pixel (31, 21)
    out = data.crop_resize(img, box, S)[0, 0]
    ys, xs = torch.meshgrid(torch.arange(float(S)), torch.arange(float(S)), indexing="ij")
    centroid = torch.stack([(xs * out).sum(), (ys * out).sum()]) / out.sum()
    crop = torch.tensor(data.box_to_crop(box, S), dtype=torch.float32)
    mapped = data.to_pixels(data.map_to_crop(data.to_normalized(torch.tensor([[31.0, 21.0]]), S), crop), S)
    assert torch.allclose(centroid, mapped[0], atol=0.05)
    # batched form used by train.py: kp [B,N,K,2] with crop[:, None], kp [B,K,2] with crop [B,4]
    kp, crops = torch.rand(2, 3, 10, 2) * 2 - 1, torch.tensor([[-1.0, -1, 1, 1], [-0.5, -0.8, 0.7, 0.6]])
    assert torch.allclose(data.map_to_crop(kp, crops[:, None])[0], kp[0])
    assert torch.allclose(data.map_to_crop(kp[:, 0], crops)[1], (kp[1, 0] - torch.tensor([0.1, -0.1])) / torch.tensor([0.6, 0.7]))


def test_out_of_frame_crop_keeps_sources_and_maps_the_frame_into_encodable_range():
    """The release's acceptance rule: the whole uncropped frame maps into [-2, 2] (so every keypoint of the
    uncropped frames does); the sources' faces stay inside the crop."""
    rng, S = np.random.default_rng(1), 64
    corners = np.array([[-1.0, -1.0], [1.0, 1.0]])
    reach = []
    for _ in range(50):
        lms = np.stack([render_face(IDENT, faces.sample_pose(rng, 1.3), Expression(), S)[1] for _ in range(3)])
        x0, y0, x1, y1 = box = data.out_of_frame_box(lms[:2], S, rng)
        assert 0 <= x0 < x1 <= S and 0 <= y0 < y1 <= S
        crop = data.box_to_crop(box, S)
        border = np.abs(data.map_to_crop(corners, crop)).max()
        assert border <= 2 + 1e-9
        assert np.abs(data.map_to_crop(data.to_normalized(lms[:2], S), crop)).max() <= 1.0 + 1e-6
        reach.append(border)
    assert max(reach) > 1.3 and min(reach) < 1.2            # real crops, not only "no crop"


def test_encodable_edges_draw_what_the_release_redraw_loop_draws():
    """Uniform over the passing (e0, e1) pairs == _edges redrawn until the frame border maps into [-2, 2]."""
    S, lo, hi, n = 16, 7.2, 9.5, 20000
    rng = np.random.default_rng(0)
    ours = Counter(data._encodable_edges(lo, hi, S, rng) for _ in range(n))
    loop = Counter()
    while sum(loop.values()) < n:
        e0, e1 = data._edges(lo, hi, S, rng)
        c0, c1 = data.box_to_crop([e0, e1], S)
        if abs((-1 - (c0 + c1) / 2) / ((c1 - c0) / 2)) <= 2 and abs((1 - (c0 + c1) / 2) / ((c1 - c0) / 2)) <= 2:
            loop[(e0, e1)] += 1
    assert set(ours) == set(loop) and len(ours) > 10
    assert max(abs(ours[k] - loop[k]) / n for k in loop) < 0.01
    assert (0, S) in ours and (7, 10) not in ours            # no crop passes; the tightest crop would not


def test_keypoint_frames_are_a2_before_the_crop_and_omega_crops_the_uncropped_a3_frame(monkeypatch):
    """As the release: keypoints come from the A2-jittered uncropped frames (src_full, drv_full); Omega cuts
    the uncropped A3 driving frame, bounded by the uncropped frame's landmarks."""
    S = 64
    ds = data.FaceDataset(num_src=2, size=S, seed=4, augment=data.Augment(flip_p=0.0, crop_p=1.0))
    for i in range(3):
        s = ds[i]
        box = tuple(int(round(v)) for v in (s["crop"].numpy() + 1) * S / 2)
        assert box != (0, 0, S, S)
        assert torch.allclose(data.crop_resize(s["drv_full"][None], box, S)[0], s["drv_a2"], atol=1e-6)
        assert torch.allclose(data.crop_resize(s["src_full"], box, S), s["src_a2"], atol=1e-6)
        assert not torch.allclose(s["src_full"], s["src"])  # A2 colours, not A1
    plain = data.FaceDataset(num_src=1, size=S, seed=4, augment=data.Augment(flip_p=0.0, crop_p=0.0))[0]
    assert torch.equal(plain["src_full"], plain["src_a2"]) and torch.equal(plain["drv_full"], plain["drv_a2"])
    seen = []
    monkeypatch.setattr(data, "jitter_params", lambda rng: dict(b=1.0, c=1.0, s=1.0, h=0.0, order=[0, 1, 2, 3]))
    monkeypatch.setattr(data, "omega_box", lambda lm, size, rng: seen.append(lm) or (0, 0, size, size))
    s = ds[0]
    assert torch.equal(s["drv_omega"], s["drv_full"]) and not torch.allclose(s["drv_omega"], s["drv"], atol=0.05)
    np.testing.assert_array_equal(seen[0], s["drv_lm"].numpy())   # the uncropped frame's landmarks



def test_jitter_and_omega_ablations_switch_off_only_their_own_step():
    """--no-jitter: A1 = A2 = A3 = the plain colours; --no-omega: the expression net sees the whole A3 frame.
    The crop and every other draw stay those of the full recipe (same seed, same index)."""
    kw = dict(num_src=2, size=64, seed=5)
    plain = data.FaceDataset(augment=False, **kw)
    full = data.FaceDataset(**kw, augment=data.Augment(flip_p=0.0, crop_p=0.5))
    nojit = data.FaceDataset(**kw, augment=data.Augment(flip_p=0.0, crop_p=0.5, jitter=False))
    noom, neither = data.FaceDataset(**kw, augment=data.Augment(flip_p=0.0, crop_p=0.5, omega=False)), \
        data.FaceDataset(**kw, augment=data.Augment(flip_p=0.0, crop_p=0.5, jitter=False, omega=False))
    for i in range(4):
        a, b, c, d, p = full[i], nojit[i], noom[i], neither[i], plain[i]
        assert torch.equal(a["crop"], b["crop"]) and torch.equal(a["crop"], c["crop"])
        assert not torch.allclose(a["src"], a["src_a2"])                  # jitter on: A1 != A2
        assert torch.equal(b["src"], b["src_a2"]) and torch.equal(b["drv"], b["drv_a2"])
        assert torch.equal(b["src_full"], p["src"]) and torch.equal(b["drv_full"], p["drv"])
        for k in ("src", "drv", "src_a2", "drv_a2", "src_full", "drv_full"):
            assert torch.equal(a[k], c[k])                                 # Omega's switch touches nothing else
        assert torch.equal(d["drv_omega"], p["drv"])                       # neither: the plain whole frame
        assert not torch.equal(a["drv_omega"], c["drv_omega"])


def test_color_jitter_shared_and_sane():
    rng = np.random.default_rng(0)
    x = torch.rand(3, 3, 8, 8)
    p = data.jitter_params(rng)
    both = data.color_jitter(torch.cat([x, x]), p)
    assert torch.allclose(both[:3], both[3:])                 # one draw, identical on every frame
    gray = torch.full((1, 3, 4, 4), 0.5)
    hue = dict(b=1.0, c=1.0, s=1.0, h=0.1, order=[3])
    assert torch.allclose(data.color_jitter(gray, hue), gray, atol=1e-5)   # hue leaves grey alone
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 0.8
    assert not torch.allclose(data.color_jitter(red, hue), red, atol=0.05)
    bright = dict(b=1.1, c=1.0, s=1.0, h=0.0, order=[0])
    assert torch.allclose(data.color_jitter(gray, bright), gray * 1.1)


def test_a1_a2_jitter_shared_by_sources_and_driving_frame():
    """The decoder target drv (A1) has the sources' A1 colours: where the raw source and driving frames agree
    (the static background), src and drv agree too (up to the per-image contrast mean), and so do src_a2 and
    drv_a2."""
    ds = data.FaceDataset(num_src=1, seed=2, augment=data.Augment(crop_p=0.0, flip_p=0.0))
    for i in range(6):
        s, raw = ds[i], ds.sample_frames(i)["frames"]
        same = (raw[0] == raw[1]).all(0)
        assert same.float().mean() > 0.3
        assert (s["src"][0] - s["drv"])[:, same].abs().mean() < 0.003
        assert (s["src_a2"][0] - s["drv_a2"])[:, same].abs().mean() < 0.003
        assert (s["src"][0] - s["src_a2"][0]).abs().mean() > 0.005     # A1 and A2 are different draws


def test_facedataset_builtin_keys_and_augmentation():
    ds = data.FaceDataset(num_src=2, size=64, seed=0)
    N, S = 2, 64
    crops = 0
    for i in range(8):
        s = ds[i]
        shapes = dict(src=(N, 3, S, S), src_a2=(N, 3, S, S), drv=(3, S, S), drv_a2=(3, S, S), drv_omega=(3, S, S),
                      src_full=(N, 3, S, S), drv_full=(3, S, S), crop=(4,), src_lm=(N, 68, 2), drv_lm=(68, 2))
        assert {k: tuple(v.shape) for k, v in s.items()} == shapes
        assert all(v.dtype == torch.float32 for v in s.values())
        assert all(0 <= s[k].min() and s[k].max() <= 1 for k in shapes if k not in ("crop", "src_lm", "drv_lm"))
        assert not torch.equal(s["src"], s["src_a2"])         # A1 != A2
        crops += bool((s["crop"] != torch.tensor([-1.0, -1, 1, 1])).any())
        src_in = data.map_to_crop(data.to_normalized(s["src_lm"], S), s["crop"])
        assert src_in.abs().max() <= 1.0 + 1e-5
    assert 0 < crops < 8
    plain = data.FaceDataset(num_src=2, augment=False)
    s = plain[3]
    assert torch.equal(s["src"], s["src_a2"]) and torch.equal(s["drv"], s["drv_omega"]) and torch.equal(s["drv"], s["drv_full"])
    assert s["crop"].tolist() == [-1, -1, 1, 1]
    raw = plain.sample_frames(3)                              # landmarks are those of the rendered frames
    seed, _, ident = faces.builtin_identity("train", 3)
    poses, exprs = faces.builtin_motion(seed, int(raw["video"][-2:]), plain.frames, at=raw["frame_idx"])
    np.testing.assert_allclose(s["drv_lm"].numpy(), render_face(ident, poses[-1], exprs[-1], 64)[1])
    flipped = data.FaceDataset(num_src=2, augment=data.Augment(flip_p=1.0, crop_p=0.0))
    s, raw = flipped[5], flipped.sample_frames(5)           # same rng stream: same frames, then the flip
    mirror = (s["drv_full"] - raw["frames"][N].flip(-1)).abs().mean()
    assert mirror < 0.5 * (s["drv_full"] - raw["frames"][N]).abs().mean()   # mirrored (and A2-jittered)
    np.testing.assert_allclose(s["drv_lm"].numpy(), data.flip_landmarks(raw["landmarks"][N], S))
    assert s["drv_lm"][36:42, 0].mean() < s["drv_lm"][42:48, 0].mean()   # 36-41 stays the image-left eye
    tr, te = data.VideoSet(split="train", num_videos=3, frames=4), data.VideoSet(split="test", num_videos=3, frames=4)
    assert not {tr[i]["identity"] for i in range(3)} & {te[i]["identity"] for i in range(3)}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vox")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.export(str(root / "mp4"), videos=6, test_videos=2, frames=8, size=64, fmt="mp4", progress=False)
        data.export(str(root / "png"), videos=6, test_videos=2, frames=8, size=64, fmt="png", progress=False)
    return root


@pytest.mark.parametrize("fmt", ["mp4", "png"])
def test_loader_reads_exports_and_samples_by_identity(exports, fmt):
    root = str(exports / fmt)
    ds = data.FaceDataset(root=root, split="train", size=48, num_src=2, augment=False)
    assert len(ds) == 3 and ds.identities == ["id10001", "id10002", "id10003"]
    seen = set()
    for i in range(6):
        raw = ds.sample_frames(i)
        assert raw["identity"] == ds.identities[i % 3] and data.identity_of(raw["video"]) == raw["identity"]
        seen.add(raw["video"])
        seed, _, ident = faces.builtin_identity("train", int(raw["identity"][2:]) - 10001)
        v = 0 if "#000001#" in raw["video"] else 1
        poses, exprs = faces.builtin_motion(seed, v, 8, at=raw["frame_idx"])
        truth = [render_face(ident, p, e, 64) for p, e in zip(poses, exprs)]
        gt = torch.from_numpy(np.stack([np.round(t[0] * 255) / 255 for t in truth])).permute(0, 3, 1, 2)
        gt48 = torch.nn.functional.interpolate(gt, size=(48, 48), mode="bilinear", antialias=True)
        err = (raw["frames"] - gt48).abs().mean()
        assert err < (1e-6 if fmt == "png" else 0.03), err
        want = (np.stack([t[1] for t in truth]) + 0.5) * 48 / 64 - 0.5
        np.testing.assert_allclose(raw["landmarks"], want, atol=1e-4)
    assert len(seen) > 3                                      # more than one video per identity is used
    s = data.FaceDataset(root=root, split="train", size=48, num_src=2)[0]
    assert s["src"].shape == (2, 3, 48, 48) and s["drv_lm"].shape == (68, 2)
    vs = data.VideoSet(root=root, split="test", size=32)
    item = vs[0]
    assert len(vs) == 2 and item["frames"].shape == (8, 3, 32, 32) and item["landmarks"].shape == (8, 68, 2)


def test_loader_survives_corrupt_file_and_empty_folder(exports, tmp_path):
    import shutil
    root = tmp_path / "vox"
    shutil.copytree(exports / "png", root)
    bad = root / "train" / "id20000#corrupt#000001#000008.mp4"
    bad.write_bytes(b"not a video" * 100)
    np.save(str(bad) + data.LANDMARK_SUFFIX, np.zeros((8, 68, 2), np.float32))
    (root / "train" / "id20001#empty#000001#000008").mkdir()
    (root / "train" / "id20002#nolm#000001#000008.gif").write_bytes(b"GIF89a")
    with pytest.warns(UserWarning):
        ds = data.FaceDataset(root=str(root), split="train", size=32, num_src=1)
    assert ds.skipped["empty"] == 1 and ds.skipped["no_landmarks"] == 1 and len(ds) == 4
    with pytest.warns(UserWarning, match="corrupt"):
        samples = [ds[i] for i in range(len(ds))]             # id20000 is index 3: its video is skipped
    assert len(samples) == 4 and ds.skipped["broken"] == 1 and all(s["src"].shape == (1, 3, 32, 32) for s in samples)
    only_bad = tmp_path / "bad"
    (only_bad / "train").mkdir(parents=True)
    shutil.copy(bad, only_bad / "train" / bad.name)
    shutil.copy(str(bad) + data.LANDMARK_SUFFIX, only_bad / "train")
    ds = data.FaceDataset(root=str(only_bad), split="train", size=32, max_tries=5)
    with pytest.raises(RuntimeError, match="no valid sample after 5 tries"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds[0]


def test_empty_or_wrong_root_is_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="expected FOMM's VoxCeleb layout"):
        data.FaceDataset(root=str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no videos in"):
        data.FaceDataset(root=str(tmp_path))
    with pytest.raises(ValueError, match="expected FOMM's VoxCeleb layout"):
        data.VideoSet(root=str(tmp_path / "nope"))
    assert data.main(["landmarks", str(tmp_path / "nope")]) == 2


def test_landmark_extraction_is_resumable_and_marks_missing_faces(exports, tmp_path):
    import shutil
    root = tmp_path / "vox"
    shutil.copytree(exports / "png", root)
    for f in (root / "test").glob("*" + data.LANDMARK_SUFFIX):
        f.unlink()
    calls = []

    def detector(frame):
        calls.append(frame.shape)
        return None if len(calls) % 4 == 0 else np.full((68, 2), 7.0, np.float32)

    c = data.extract_landmarks(str(root), detector=detector, progress=False)
    assert c["done"] == 2 and c["skipped_existing"] == 6 and len(calls) == 16 and calls[0] == (64, 64, 3)
    lm = np.load(next((root / "test").glob("*" + data.LANDMARK_SUFFIX)))
    assert lm.shape == (8, 68, 2) and lm.dtype == np.float32 and np.isnan(lm[3]).all() and lm[0, 0, 0] == 7
    c = data.extract_landmarks(str(root), detector=detector, progress=False)
    assert c["done"] == 0 and len(calls) == 16                # resumed: nothing recomputed
    assert not list(root.rglob("*.tmp"))


def test_image_io_conversions(tmp_path):
    from PIL import Image
    g16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 250)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    a, b = data.read_image(str(tmp_path / "g16.png")), data.read_image(str(tmp_path / "rgba.png"))
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8 and a[-1, -1, 0] == round(255 * 250 / 257)
    assert b.shape == (8, 8, 3) and b[0, 0].tolist() == [200, 0, 0]
    (tmp_path / "broken.png").write_bytes(b"xx")
    with pytest.raises(ValueError, match="cannot read image"):
        data.read_image(str(tmp_path / "broken.png"))
    with pytest.raises(FileNotFoundError):
        data.read_video(str(tmp_path / "missing.mp4"))
    frames = (np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3))).astype(np.uint8)
    data.write_video(str(tmp_path / "v.gif"), frames, fps=10)
    back, fps = data.read_video(str(tmp_path / "v.gif"))
    assert back.shape == (3, 16, 16, 3) and abs(fps - 10) < 0.5


def test_to_uint8_rounds_clamps_and_puts_channels_last():
    x = torch.tensor([[[0.0, 0.5], [1.2, -0.1]]]).expand(3, 2, 2)           # [3, 2, 2]
    out = data.to_uint8(x)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[..., 0].tolist() == [[0, 128], [255, 0]]
    assert data.to_uint8(x[None]).shape == (1, 2, 2, 3)                        # batches keep their axis
    assert data.to_uint8(out / 255.0).tolist() == out.tolist()                 # numpy, channels last


def test_hue_jitter_is_the_hsv_hue_shift():
    """As torchvision's adjust_hue (the release's ColorJitter): RGB -> HSV, h + shift mod 1, -> RGB."""
    import colorsys
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    x[0, :, 0, 0], x[0, :, 0, 1], x[0, :, 0, 2] = 0.4, 0.0, torch.tensor([0.85, 0.65, 0.52])   # grey, black, skin
    for h in (0.1, -0.1, 0.03):
        out = data.color_jitter(x, dict(b=1.0, c=1.0, s=1.0, h=h, order=[3]))
        want = torch.tensor([[colorsys.hsv_to_rgb((hh + h) % 1, s, v) for hh, s, v in
                              (colorsys.rgb_to_hsv(*x[n, :, i, j].tolist()) for i in range(4) for j in range(5))]
                             for n in range(2)], dtype=torch.float64)                     # (2, 20, 3)
        torch.testing.assert_close(out.flatten(2).transpose(1, 2), want, atol=1e-12, rtol=0)
