"""The hostile-input sweep (issue 14) on the three command lines: never write over an input, one writer per
run folder, bounded memory on long videos, clean stops (exit codes, a second signal), temporary files of
killed writers, unreadable test videos, option checks, early write checks and one-line errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import data
import metrics
import reenact
import srt
import train
import cli
import weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
FAST = ["--image-size", "32", "--batch-size", "4", "--log-every", "1", "--sample-every", "1000",
        "--eval-videos", "0", "--lr", "1e-3", "--warmup", "1"]


def one_line(err, needle=""):
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def run0(tmp_path_factory):
    """A run folder whose phase 0 is trained to its 2 steps: rerunning the command only checks and exits."""
    out = tmp_path_factory.mktemp("run0")
    assert train.main(["--phase", "0", "--steps", "2", "--out", str(out), *FAST]) == 0
    return out


def inputs(tmp_path, frames=3):
    rng = np.random.default_rng(0)
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data.write_video(str(tmp_path / "d.mp4"), rng.integers(0, 256, (frames, 40, 40, 3), dtype=np.uint8), 10)
    return str(tmp_path / "a.png"), str(tmp_path / "d.mp4")


# ---------------------------------------------------------------- 1. never write over an input

def test_reenact_refuses_an_output_that_is_or_is_inside_an_input(ckpt, tmp_path, capsys, monkeypatch):
    png, mp4 = inputs(tmp_path)
    folder = tmp_path / "frames"
    data.write_video(str(folder), data.read_video(mp4)[0])             # 000000.png ...
    os.symlink(mp4, tmp_path / "link.mp4")
    model = tmp_path / "model"                           # a checkpoint without extension = a frame-folder name
    model.write_bytes(open(ckpt, "rb").read())
    before = {p: open(p, "rb").read() for p in (png, mp4, str(folder / "000000.png"), str(model))}
    monkeypatch.setattr(reenact, "reenact", lambda *a, **k: pytest.fail("rendered before refusing"))
    cases = [(["--source", png, "--driving", mp4, "--out", mp4], "is the input --driving"),
             (["--source", mp4, "--driving", str(folder), "--out", mp4], "is the input --source"),
             (["--source", png, "--driving", mp4, "--out", str(tmp_path / "link.mp4")], "is the input --driving"),
             (["--source", png, "--driving", str(folder), "--out", str(folder)], "is the input --driving"),
             (["--source", png, "--driving", str(folder), "--out", str(folder / "sub")], "is inside the input"),
             (["--source", str(folder / "000000.png"), "--driving", mp4, "--out", str(folder)], "would overwrite"),
             (["--source", png, "--driving", mp4, "--out", str(model), "--checkpoint", str(model)], "--checkpoint")]
    for args, needle in cases:
        assert reenact.main(["--checkpoint", ckpt, "--no-progress", *args]) == 2, args
        one_line(capsys.readouterr().err, needle)
    assert before == {p: open(p, "rb").read() for p in before}


# ---------------------------------------------------------------- 2. impossible batch, second signal, exit codes

def test_an_impossible_batch_is_refused_at_once(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--phase", "1", "--batch-size", "1000000", "--eval-videos", "0",
                        "--out", str(tmp_path / "run")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    one_line(r.stderr, "--batch-size 1000000 cannot fit")


def test_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "run_phase", lambda *a: torch.empty(2 ** 62, dtype=torch.uint8))  # the real error
    assert train.main(["--phase", "0", "--out", str(tmp_path / "run"), *FAST]) == 2
    one_line(capsys.readouterr().err, "error: out of memory")


def _start(args, log, needle):
    """train.py in a subprocess, returned once `needle` is in its log.jsonl ("": once the file exists)."""
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < 120 and not (log.exists() and needle in log.read_text()) and p.poll() is None:
        time.sleep(0.05)
    return p


def test_first_sigterm_stops_cleanly_with_143_and_a_second_signal_quits_at_once(tmp_path):
    out = str(tmp_path / "run")
    p = _start(["--phase", "0", "--steps", "100000", "--out", out, *FAST], tmp_path / "run" / "log.jsonl",
               '"step": 1,')
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr[-2000:]                       # stopped, not finished
    assert "stopping after the step in flight" in stderr and "stopped at step" in stdout
    # a slow step (a large batch at 128x128): the second signal ends it without waiting for the step
    slow = ["--phase", "0", "--steps", "100000", "--out", str(tmp_path / "slow"), *FAST, "--batch-size", "1024",
            "--image-size", "128"]
    p = _start(slow, tmp_path / "slow" / "log.jsonl", "")              # in its first step (~10 s)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    time.sleep(1.0)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGINT and time.time() - t0 < 5       # killed by the signal: shell says 130


# ---------------------------------------------------------------- 3. one writer per run folder; 5. stale temp files

def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(run0, capsys):
    lock = cli.RunLock(str(run0))                        # another "process" holds the folder
    try:
        assert train.main(["--phase", "0", "--steps", "2", "--out", str(run0), *FAST]) == 2
        line = one_line(capsys.readouterr().err, "is in use by process")
        assert str(os.getpid()) in line
    finally:
        lock.release()
    (run0 / ".lock").write_text("process 999999999 on elsewhere (train.py ...)\n")     # killed with -9
    assert train.main(["--phase", "0", "--steps", "2", "--out", str(run0), *FAST]) == 0
    assert "took over the lock" in capsys.readouterr().out and (run0 / ".lock").read_text() == ""


def test_temporary_checkpoints_of_killed_writers_are_removed_at_start(run0, capsys):
    (run0 / ".tmp_abc123.pt").write_bytes(b"x" * 1000)
    assert train.main(["--phase", "0", "--steps", "2", "--out", str(run0), *FAST]) == 0
    assert not (run0 / ".tmp_abc123.pt").exists() and (run0 / "phase0.pt").exists()
    assert "removed 1 temporary checkpoint file" in capsys.readouterr().out


# ---------------------------------------------------------------- 4. reenact streams the driving video

def test_reenact_decodes_only_max_frames_and_renders_in_chunks(ckpt, tmp_path, monkeypatch):
    png, mp4 = inputs(tmp_path, frames=40)
    decoded, calls, render = [0], [], reenact.reenact
    iter_frames, read_frames = data.iter_frames, data.read_frames

    def counting(path, *a):
        for f in iter_frames(path, *a):
            decoded[0] += 1
            yield f

    def counting_read(path, indices=None):
        frames = read_frames(path, indices)
        decoded[0] += len(frames)
        return frames
    monkeypatch.setattr(data, "iter_frames", counting)
    monkeypatch.setattr(data, "read_frames", counting_read)
    assert reenact.main(["--checkpoint", ckpt, "--source", png, "--driving", mp4, "--max-frames", "5",
                         "--out", str(tmp_path / "five.mp4"), "--no-progress", "--crop", "none"]) == 0
    assert decoded[0] <= 10                              # counted, then rendered: 5 + 5, not the 40
    decoded[0] = 0
    assert reenact.main(["--checkpoint", ckpt, "--source", png, "--driving", mp4, "--max-frames", "5",
                         "--out", str(tmp_path / "five.mp4"), "--no-progress"]) == 0
    assert decoded[0] <= 15                              # --crop auto looks for the face too: 5 + 5 + 5
    assert len(data.read_video(str(tmp_path / "five.mp4"))[0]) == 5
    monkeypatch.setattr(reenact, "reenact", lambda m, s, d, **k: calls.append(len(d)) or render(m, s, d, **k))
    monkeypatch.setattr(reenact.Driving, "CHUNK", 8)
    assert reenact.main(["--checkpoint", ckpt, "--source", png, "--driving", mp4, "--relative",
                         "--out", str(tmp_path / "all.mp4"), "--no-progress"]) == 0
    assert len(data.read_video(str(tmp_path / "all.mp4"))[0]) == 40
    assert calls == [9] * 5                              # 8 frames at a time, led by the initial frame


def _peak_rss_mb(ckpt, source, video, out):
    code = ("import resource, sys, reenact; rc = reenact.main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "--checkpoint", ckpt, "--source", source, "--driving", video,
                        "--out", out, "--no-progress", "--batch", "8"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split()[-1])


def test_reenact_memory_does_not_grow_with_the_clip(ckpt, tmp_path):
    """Peak RSS for a 40-frame and a 160-frame 256x256 clip: the whole clip in memory took ~180 MB more for
    the long one (1.5 MB per frame); streamed, the two differ by allocator noise (~20 MB)."""
    png, _ = inputs(tmp_path)
    clip = data.to_uint8(torch.rand(1, 3, 256, 256)).repeat(160, 0)
    data.write_video(str(tmp_path / "short.mp4"), clip[:40])
    data.write_video(str(tmp_path / "long.mp4"), clip)
    short = _peak_rss_mb(ckpt, png, str(tmp_path / "short.mp4"), str(tmp_path / "o1.mp4"))
    long = _peak_rss_mb(ckpt, png, str(tmp_path / "long.mp4"), str(tmp_path / "o2.mp4"))
    assert long - short < 60, (short, long)


# ---------------------------------------------------------------- 6. an unreadable test video is skipped

def test_metrics_skips_an_unreadable_test_video_and_counts_it(ckpt, tmp_path, capsys):
    root = tmp_path / "vox"
    data.export(str(root), videos=0, test_videos=2, frames=12, size=32, progress=False)
    (root / "test" / "id99999#broken00000#000001#000012.mp4").write_bytes(b"not a video" * 50)
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning, match="unreadable test video.*broken"):
        assert metrics.main(["--checkpoint", ckpt, "--data", str(root), "--no-akd", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["self"]
    assert r["videos"] == 2 and r["videos_unreadable"] == 1
    assert "1 unreadable" in capsys.readouterr().out


# ---------------------------------------------------------------- 7. every numeric option checked

@pytest.mark.parametrize("option,value", [("--warmup", "-10"), ("--lr", "0"), ("--lr", "nan"), ("--steps", "-1"),
                                          ("--ckpt-every", "-5"), ("--log-every", "-1"), ("--identities", "0"),
                                          ("--batch-size", "0"), ("--pixels", "0"), ("--seed", "-3"),
                                          ("--motion", "-1"), ("--max-minutes", "0"), ("--eval-videos", "-1"),
                                          ("--workers", "-2"), ("--num-src", "0"), ("--disc-warmup", "-1"),
                                          ("--expr-dim", "-1"), ("--kp-scale", "0"), ("--kp-scale", "2")])
def test_train_refuses_out_of_range_numbers(tmp_path, capsys, option, value):
    assert train.main(["--phase", "0", "--steps", "1", "--out", str(tmp_path / "run"), *FAST, option, value]) == 2
    line = one_line(capsys.readouterr().err, "must be")
    assert line.startswith(f"error: {option} ") and float(line.split()[2][:-1]) == pytest.approx(float(value),
                                                                                                   nan_ok=True)
    assert not (tmp_path / "run").exists()


def test_zero_means_never_for_the_periodic_options(tmp_path):
    out = tmp_path / "run"
    assert train.main(["--phase", "0", "--steps", "2", "--out", str(out), *FAST, "--log-every", "0",
                       "--sample-every", "0", "--ckpt-every", "0", "--warmup", "0"]) == 0
    assert torch.load(out / "phase0.pt", weights_only=True)["step"] == 2          # still at the end
    assert train.lr_at(train.get_args(["--lr", "0.1", "--warmup", "0"]), 1) == pytest.approx(0.1, rel=1e-6)


@pytest.mark.parametrize("args,needle", [(["--max-frames", "0"], "--max-frames 0"), (["--batch", "0"], "--batch 0"),
                                         (["--chunk", "-1"], "--chunk -1")])
def test_reenact_refuses_out_of_range_numbers(ckpt, tmp_path, capsys, args, needle):
    png, mp4 = inputs(tmp_path)
    assert reenact.main(["--checkpoint", ckpt, "--source", png, "--driving", mp4, "--out", str(tmp_path / "o.mp4"),
                         *args]) == 2
    one_line(capsys.readouterr().err, needle)


@pytest.mark.parametrize("args", [["--num-src", "0"], ["--max-videos", "0"], ["--probe-stride", "0"],
                                  ["--probe-alpha", "-1.0"], ["--chunk", "0"]])
def test_metrics_refuses_out_of_range_numbers(ckpt, tmp_path, capsys, args):
    assert metrics.main(["--checkpoint", ckpt, "--no-akd", "--out", str(tmp_path / "r.json"), *args]) == 2
    one_line(capsys.readouterr().err, f"{args[0]} {args[1]}")


def test_data_cli_refuses_out_of_range_numbers(tmp_path, capsys):
    for args in (["export", str(tmp_path / "vox"), "--frames", "0"], ["preview", str(tmp_path / "p.png"), "--n", "-1"]):
        assert data.main(args) == 2
        one_line(capsys.readouterr().err, f"{args[2]} {args[3]}: must be")
    assert not (tmp_path / "vox").exists()


# ---------------------------------------------------------------- 8. unwritable outputs refused before the work

def test_unwritable_outputs_are_refused_before_any_work(ckpt, tmp_path, capsys, monkeypatch):
    read_only = "/sys/fsrt_test/out"                     # not writable, even by root
    monkeypatch.setattr(metrics, "evaluate_self", lambda *a, **k: pytest.fail("evaluated before checking --out"))
    assert metrics.main(["--checkpoint", ckpt, "--no-akd", "--out", read_only + ".json"]) == 2
    one_line(capsys.readouterr().err, "cannot write in /sys")
    assert metrics.main(["--checkpoint", ckpt, "--no-akd", "--out", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, "is a folder")
    png, mp4 = inputs(tmp_path)
    monkeypatch.setattr(reenact, "reenact", lambda *a, **k: pytest.fail("rendered before checking --out"))
    for out in (read_only + ".mp4", read_only):
        assert reenact.main(["--checkpoint", ckpt, "--source", png, "--driving", mp4, "--out", out]) == 2
        one_line(capsys.readouterr().err, "cannot write in /sys")
    assert train.main(["--phase", "0", "--out", read_only, *FAST]) == 2
    one_line(capsys.readouterr().err, "cannot write in /sys")


def test_metrics_creates_a_missing_output_folder(ckpt, tmp_path, monkeypatch):
    video_set = data.VideoSet
    monkeypatch.setattr(data, "VideoSet", lambda **kw: video_set(frames=12, **kw))
    out = tmp_path / "new" / "sub" / "r.json"
    assert metrics.main(["--checkpoint", ckpt, "--no-akd", "--no-cross", "--no-probe", "--max-videos", "1",
                         "--out", str(out)]) == 0
    assert json.loads(out.read_text())["self"]["videos"] == 1


# ---------------------------------------------------------------- 9. one line instead of a traceback

def test_vgg_weights_text_file_and_out_file_are_one_line(run0, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, these are not weights\n")
    assert train.main(["--phase", "2", "--steps", "1", "--init", str(run0 / "phase0.pt"), "--vgg-weights", str(notes),
                       "--out", str(tmp_path / "run2"), *FAST]) == 2
    one_line(capsys.readouterr().err, "notes.txt")
    assert train.main(["--phase", "0", "--out", str(notes), *FAST]) == 2
    one_line(capsys.readouterr().err, "is a file")


def test_device_cuda_without_cuda_is_one_line_in_all_three(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    png, mp4 = inputs(tmp_path)
    for main, args in ((train.main, ["--out", str(tmp_path / "run"), *FAST]),
                       (reenact.main, ["--checkpoint", ckpt, "--source", png, "--driving", mp4,
                                       "--out", str(tmp_path / "o.mp4")]),
                       (metrics.main, ["--checkpoint", ckpt, "--no-akd", "--out", str(tmp_path / "r.json")])):
        for device in ("cuda", "cuda:1", "tpu9"):
            assert main([*args, "--device", device]) == 2
            one_line(capsys.readouterr().err, f"--device {device}" if device != "tpu9" else "'tpu9'")


# ---------------------------------------------------------------- 10. smaller ones

def test_ffmpeg_reason_is_kept_and_its_banner_dropped(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError) as e:
        data.read_video(str(bad))
    msg = str(e.value)
    assert "bad.mp4: cannot read video" in msg and "Invalid data found" in msg
    assert "ffmpeg version" not in msg and "configuration" not in msg and "\n" not in msg


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loaders_never_suggest_weights_only_false(ckpt, tmp_path, capsys):
    import keypoints
    import losses
    evil = tmp_path / "evil.pt"
    torch.save({"format": "fsrt", "config": {}, "model": {}, "x": _Evil()}, evil)
    errors = []
    for load in (weights.load_checkpoint, lambda p: weights.load_kp_detector(p, keypoints.KPDetector()),
                 lambda p: weights.load_vgg19(p)):
        with pytest.raises((ValueError, RuntimeError)) as e:
            load(str(evil))
        errors.append(str(e.value))
    assert reenact.main(["--checkpoint", str(evil), "--out", str(tmp_path / "o.mp4")]) == 2
    errors.append(one_line(capsys.readouterr().err, "evil.pt"))
    for msg in errors:
        assert "weights_only" not in msg and "could run code" in msg and "posix.system" in msg, msg


def test_a_full_disk_says_so(tmp_path, monkeypatch):
    def full(obj, f):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
    monkeypatch.setattr(srt.torch, "save", full)
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    with pytest.raises(OSError) as e:
        weights.save_checkpoint(str(tmp_path / "c.pt"), {"model": {"w": torch.zeros(10)}})
    line = cli.error_line(e.value)
    assert line.startswith("the disk is full: cannot write") and "c.pt" in line
    assert os.listdir(tmp_path) == []                                # no temporary file left


def test_source_frames_on_a_still_image_and_a_phase0_checkpoint_are_refused(ckpt, tmp_path, capsys):
    png, mp4 = inputs(tmp_path)
    out = str(tmp_path / "o.mp4")
    assert reenact.main(["--checkpoint", ckpt, "--source", png, "--source-frames", "99", "--driving", mp4,
                         "--out", out]) == 2
    one_line(capsys.readouterr().err, "still image")
    phase0 = os.path.join(os.path.dirname(ckpt), "phase0.pt")
    assert reenact.main(["--checkpoint", phase0, "--source", png, "--driving", mp4, "--out", out]) == 2
    one_line(capsys.readouterr().err, "phase-0 checkpoint")
    assert metrics.main(["--checkpoint", phase0, "--no-akd", "--out", str(tmp_path / "r.json")]) == 2
    one_line(capsys.readouterr().err, "phase-0 checkpoint")


def test_no_test_split_needed_without_evaluation(tmp_path):
    root = tmp_path / "vox"
    data.export(str(root), videos=2, test_videos=0, frames=8, size=32, progress=False)
    assert not (root / "test").exists()
    assert train.main(["--phase", "0", "--steps", "1", "--data", str(root), "--out", str(tmp_path / "run"), *FAST]) == 0
