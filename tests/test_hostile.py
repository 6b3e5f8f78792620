"""The hostile-input sweeps on the command lines. Issue 14: never write over an input, one writer per run folder,
bounded memory on long videos, clean stops (exit codes, a second signal), temporary files of killed writers,
unreadable test videos, option checks, early write checks and one-line errors. Issue 25 (its case numbers in
the section titles): concurrent writers, stops of a process group, odd media (EXIF, variable frame rate, huge
images, no video stream), tampered and wrong weights files, run-folder and phase mix-ups, data.py's outputs.
Its second sweep (the sections 2.x at the end): other formats, other signals, other concurrent pairs, paths."""
import copy
import json
import math
import os
import shutil
import signal
import re
import subprocess
import sys
import threading
import time
import types

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
from conftest import PAPER_RECIPE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
FAST = ["--image-size", "32", "--batch-size", "4", "--log-every", "1", "--sample-every", "1000",
        "--eval-videos", "0", "--lr", "1e-3", "--warmup", "1", *PAPER_RECIPE]


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


def _start(args, log, needle, **popen):
    """train.py in a subprocess, returned once `needle` is in its log.jsonl ("": once the file exists)."""
    p = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, **popen)
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
    assert metrics.main(["--checkpoint", ckpt, "--data", str(root), "--no-akd", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["self"]
    assert r["videos"] == 2 and r["videos_unreadable"] == 1
    printed = capsys.readouterr()
    assert "1 unreadable" in printed.out and re.search("warning: skipping unreadable test video.*broken", printed.err)



def test_a_warning_of_a_command_is_one_line(ckpt, tmp_path):
    """Python's warning format (file, line number, the line of code: two lines) becomes `warning: ...`."""
    root = tmp_path / "vox"
    data.export(str(root), videos=0, test_videos=2, frames=12, size=32, progress=False)
    (root / "test" / "id99999#broken00000#000001#000012.mp4").write_bytes(b"not a video" * 50)
    done = subprocess.run([sys.executable, "metrics.py", "--checkpoint", ckpt, "--data", str(root), "--no-akd",
                           "--out", str(tmp_path / "r.json")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = [l for l in done.stderr.splitlines() if "unreadable test video" in l]
    assert len(lines) == 1 and lines[0].startswith("warning: skipping unreadable test video") and "broken" in lines[0]
    assert "UserWarning" not in done.stderr and "warnings.warn" not in done.stderr

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
    args = train.resolve(train.get_args(["--lr", "0.1", "--warmup", "0"]))
    assert train.lr_at(args, 1) == pytest.approx(0.1, rel=1e-6)


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


# ================================================================ issue 25: the second sweep

def last_line(err, needle=""):
    """The `error:` line that ends a command whose progress bar wrote to stderr before (no traceback)."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err[-3000:]
    assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def ffmpeg(*args):
    import imageio_ffmpeg
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", *map(str, args)], check=True, timeout=60)


def render_args(ckpt, source, driving, out, *more):
    return ["--checkpoint", ckpt, "--source", source, "--driving", driving, "--out", str(out), "--no-progress",
            "--crop", "none", *more]


def tampered(ckpt, path, change):
    """A copy of the checkpoint `ckpt` with change(dict) applied, saved (plain torch.save) at `path`."""
    ck = copy.deepcopy(torch.load(ckpt, weights_only=True))
    change(ck)
    torch.save(ck, path)
    return str(path)


# ---------------------------------------------------------------- 1. two writers of one --out

def test_two_writers_of_one_out_each_end_with_a_whole_file_and_no_temporary(tmp_path):
    """Both writers are inside their write at once (a barrier after their first frame): with one shared
    temporary name (same.mp4.tmp.mp4) one renamed the other's half-written file and the other failed."""
    out, barrier, results = tmp_path / "same.mp4", threading.Barrier(2, timeout=60), {}
    clips = {v: np.full((6, 32, 32, 3), v, np.uint8) for v in (30, 220)}

    def frames(clip):
        for k, f in enumerate(clip):
            if k == 1:
                barrier.wait()                           # both have their temporary file open now
            yield f

    def write(v):
        try:
            results[v] = data.write_video(str(out), frames(clips[v]), 10)
        except Exception as e:                           # noqa: BLE001 - reported by the assert below
            results[v] = e

    threads = [threading.Thread(target=write, args=(v,)) for v in clips]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {30: 6, 220: 6}, results
    got = data.read_frames(str(out)).reshape(6, -1).mean(1)
    assert any(np.abs(got - v).max() < 3 for v in clips), got        # one writer's frames, all of them
    assert os.listdir(tmp_path) == ["same.mp4"]


# ---------------------------------------------------------------- 2. SIGTERM to the process group, with workers

def test_sigterm_to_the_process_group_with_workers_writes_the_checkpoint(tmp_path):
    """What Slurm, systemd and `timeout` do: the signal reaches the data-loader workers too; they leave the stop
    to the main process, which finishes its step, writes the checkpoint and exits 143."""
    out = tmp_path / "run"
    p = _start(["--phase", "0", "--steps", "100000", "--workers", "2", "--out", str(out), *FAST], out / "log.jsonl",
               '"step": 1,', start_new_session=True)
    os.killpg(p.pid, signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 143, stderr[-2000:]
    assert "error" not in stderr and "stopped at step" in stdout
    assert torch.load(out / "phase0.pt", weights_only=True)["step"] >= 1


# ---------------------------------------------------------------- 3. metrics --out: never a video or a checkpoint

def test_metrics_out_naming_a_test_video_or_a_checkpoint_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    root = tmp_path / "vox"
    data.export(str(root), videos=0, test_videos=1, frames=12, size=32, progress=False)
    video = next((root / "test").glob("*.mp4"))
    loose = tmp_path / "clip.mp4"
    shutil.copy(video, loose)
    other = tmp_path / "run" / "phase1.pt"                          # another run's checkpoint
    other.parent.mkdir()
    shutil.copy(ckpt, other)
    monkeypatch.setattr(metrics, "evaluate_self", lambda *a, **k: pytest.fail("evaluated before refusing"))
    before = {p: p.read_bytes() for p in (video, loose, other)}
    for out, needle in ((video, "is inside the input --data"), (loose, "is not a JSON file"),
                        (other, "is not a JSON file"), (ckpt, "is the input --checkpoint")):
        assert metrics.main(["--checkpoint", ckpt, "--data", str(root), "--no-akd", "--out", str(out)]) == 2
        one_line(capsys.readouterr().err, needle)
    assert before == {p: p.read_bytes() for p in before}


# ---------------------------------------------------------------- 4. a frame folder after a longer run

def test_a_frame_folder_keeps_no_frames_of_an_earlier_longer_run(ckpt, tmp_path, capsys):
    png, mp4 = inputs(tmp_path, frames=8)
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")                      # not this program's: kept
    for n in (8, 3):
        assert reenact.main(render_args(ckpt, png, mp4, folder, "--max-frames", str(n))) == 0
    assert sorted(os.listdir(folder)) == ["000000.png", "000001.png", "000002.png", "notes.txt"]
    assert "wrote" in capsys.readouterr().out and (folder / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- 5. EXIF orientation

def test_a_jpeg_with_exif_orientation_6_is_read_upright(tmp_path):
    from PIL import Image
    im = Image.new("RGB", (80, 40), (255, 0, 0))
    im.paste((0, 0, 255), (40, 0, 80, 40))                  # stored: red left half, blue right half
    exif = im.getexif()
    exif[0x0112] = 6                                        # "rotate 90 degrees clockwise to display"
    im.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    a = data.read_image(str(tmp_path / "photo.jpg"))
    assert a.shape == (80, 40, 3)                           # upright: 40 wide, 80 high
    assert a[10, 20, 0] > 200 > a[10, 20, 2] and a[70, 20, 2] > 200 > a[70, 20, 0]   # the left edge is on top


# ---------------------------------------------------------------- 6. variable frame rate

@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_a_variable_frame_rate_driving_video_keeps_its_duration(ckpt, tmp_path, capsys, ext):
    """1 s at 4 fps, then 1.25 s at 20 fps, timestamps kept (2.25 s): the output ran 9.0 s (mkv) and 1.66 s."""
    drv, out = tmp_path / f"vfr.{ext}", tmp_path / "out.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x48:rate=4:duration=1", "-f", "lavfi", "-i",
           "testsrc=size=48x48:rate=20:duration=1.25", "-filter_complex", "[0:v][1:v]concat=n=2:v=1[v]",
           "-map", "[v]", "-fps_mode", "passthrough", "-c:v", "libx264", "-pix_fmt", "yuv420p", drv)
    png, _ = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, png, str(drv), out)) == 0
    frames, fps = data.read_video(str(out))
    assert len(frames) / fps == pytest.approx(2.25, abs=0.15), (len(frames), fps)
    notice = [l for l in capsys.readouterr().out.splitlines() if "variable frame rate" in l]
    assert len(notice) == 1 and notice[0].startswith("notice: ") and "constant 20 fps" in notice[0]


# ---------------------------------------------------------------- 7. a huge source

def test_a_huge_source_is_shrunk_while_decoding(ckpt, tmp_path):
    """An 8000x8000 JPEG source is decoded at half size (JPEG draft mode) and never held as 8000x8000 floats: one
    process renders with a small source, then with the huge one; its peak memory grew by 2.1 GB before."""
    import tracemalloc
    from PIL import Image
    big, small = tmp_path / "big.jpg", tmp_path / "small.jpg"
    face = Image.new("RGB", (8000, 8000), (150, 110, 90))
    face.paste((40, 30, 30), (2000, 3000, 6000, 3600))
    face.save(big, quality=80)
    face.resize((400, 400)).save(small)
    tracemalloc.start()
    try:
        assert data.read_image(str(big)).shape == (4000, 4000, 3)
        assert tracemalloc.get_traced_memory()[1] < 100 * 2 ** 20          # 48 MB of uint8, not 192
    finally:
        tracemalloc.stop()
    _, mp4 = inputs(tmp_path)
    code = ("import resource, sys, reenact\n"
            "for i, src in enumerate(sys.argv[1:3]):\n"
            "    assert reenact.main(['--checkpoint', sys.argv[3], '--source', src, '--driving', sys.argv[4], '--out',"
            " sys.argv[5] + str(i) + '.mp4', '--no-progress', '--crop', 'none']) == 0\n"
            "    print('peak MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    r = subprocess.run([sys.executable, "-c", code, str(small), str(big), ckpt, mp4, str(tmp_path / "o")], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = (float(l.split()[-1]) for l in r.stdout.splitlines() if l.startswith("peak MB"))
    assert after - before < 500, (before, after)


def test_a_huge_png_is_read_at_most_max_side(tmp_path, capsys, ckpt):
    from PIL import Image
    Image.new("RGB", (6000, 3000), (90, 120, 150)).save(tmp_path / "wide.png")
    assert data.read_image(str(tmp_path / "wide.png")).shape == (2048, 4096, 3)
    _, mp4 = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, str(tmp_path / "wide.png"), mp4, tmp_path / "o.mp4")) == 0
    assert "wide.png is 6000x3000; read shrunk to at most 4096 pixels a side" in capsys.readouterr().out


# ---------------------------------------------------------------- 8. checkpoints and run folders that disagree

def test_a_checkpoint_whose_image_size_disagrees_with_its_run_or_is_missing_is_refused(ckpt, tmp_path, capsys):
    png, mp4 = inputs(tmp_path)
    cases = [(tampered(ckpt, tmp_path / "48.pt", lambda ck: (ck["config"].update(image_size=48),
                                                             ck.update(args={"image_size": 32}))),
              "config.image_size 48 differs from the image size it was trained at (32"),
             (tampered(ckpt, tmp_path / "nosize.pt", lambda ck: ck["config"].pop("image_size")),
              "config.image_size is missing")]
    for path, needle in cases:
        assert reenact.main(render_args(path, png, mp4, tmp_path / "o.mp4")) == 2
        one_line(capsys.readouterr().err, needle)
        assert metrics.main(["--checkpoint", path, "--no-akd", "--out", str(tmp_path / "r.json")]) == 2
        one_line(capsys.readouterr().err, needle)


def test_resuming_with_another_batch_size_says_what_changes(run0, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run0, run)
    assert train.main(["--phase", "0", "--steps", "3", "--out", str(run), *FAST, "--batch-size", "2",
                       "--num-src", "2", "--focus", "0.3", "--loss-weights", "cov=0.5", "--lr", "2e-3",
                       "--cooldown", "0.5"]) == 0
    notice = [l for l in capsys.readouterr().out.splitlines() if l.startswith("notice: resuming")]
    assert len(notice) == 1 and "--batch-size 2 (the run used 4)" in notice[0] and \
        "--num-src 2 (the run used 1)" in notice[0] and "--focus 0.3 (the run used 0.0)" in notice[0] and \
        "--loss-weights cov=0.5 (the run used none)" in notice[0] and "--lr 0.002 (the run used 0.001)" in notice[0] \
        and "--cooldown 0.5 (the run used 0.0)" in notice[0] and "--steps 3 (the run used 2)" in notice[0]


def test_phase_mixups_are_refused(run0, tmp_path, capsys):
    """--init phase0.pt for phase 2; a phase-2 file named phase1.pt (resumed by --phase 1)."""
    assert train.main(["--phase", "2", "--steps", "1", "--init", str(run0 / "phase0.pt"), "--vgg-weights", "random",
                       "--out", str(tmp_path / "run2"), *FAST]) == 2
    one_line(capsys.readouterr().err, "is a phase-0 checkpoint (only its keypoint detector is trained)")
    run = tmp_path / "run"
    run.mkdir()
    tampered(run0 / "phase0.pt", run / "phase1.pt", lambda ck: ck.update(phase=2))
    assert train.main(["--phase", "1", "--steps", "1", "--out", str(run), *FAST]) == 2
    one_line(capsys.readouterr().err, "holds a phase-2 checkpoint, not phase 1")


def test_phase_2_from_an_unfinished_phase_1_says_so(run0, tmp_path, capsys):
    """A phase-1 file stopped at step 29 of 10,000 (made from the phase-0 one: the model and a fresh Adam of the
    phase-1 parameters); --steps 0 builds phase 2 and stops before training."""
    run = tmp_path / "run"
    run.mkdir()
    ck = torch.load(run0 / "phase0.pt", weights_only=True)
    model = srt.FSRT(srt.FSRTConfig.from_dict(ck["config"]))
    adam = torch.optim.Adam([p for n, p in model.named_parameters() if not n.startswith("kp_detector.")])
    ck.update(phase=1, step=29, iteration=29, optimizer=adam.state_dict(), args={**ck["args"], "steps": 10000})
    weights.save(ck, str(run / "phase1.pt"))
    assert train.main(["--phase", "2", "--steps", "0", "--vgg-weights", "random", "--out", str(run), *FAST]) == 0
    out = capsys.readouterr().out
    assert f"notice: {run / 'phase1.pt'} stopped at step 29 of 10000; phase 2 starts from it" in out


# ---------------------------------------------------------------- 9. --max-minutes is the command's wall time

def test_max_minutes_is_the_wall_time_of_the_whole_command(tmp_path, monkeypatch):
    """`--phase 1` runs phase 0 first; both phases share the deadline set at the start of the command: when phase 0
    has used it up (train.py's clock moved on by --max-minutes), phase 1 stops after its first step (with a
    deadline per phase it ran its 3 steps)."""
    monkeypatch.setitem(train.PRESETS["tiny"], "steps", (2, 10000, 500, 500))     # a short phase 0
    monkeypatch.setattr(train, "draw_curves", lambda *a: None)                    # matplotlib: seconds here
    offset, deadlines, run_phase = [0.0], [], train.run_phase
    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: time.time() + offset[0]))

    def timed(ctx, stop):
        deadlines.append(ctx.deadline)
        stopped = run_phase(ctx, stop)
        offset[0] += 5 * 60                                                       # the phase took 5 minutes
        return stopped
    monkeypatch.setattr(train, "run_phase", timed)
    assert train.main(["--phase", "1", "--steps", "3", "--max-minutes", "5", "--out", str(tmp_path / "run"),
                       *FAST]) == 0
    assert len(deadlines) == 2 and deadlines[0] == deadlines[1]
    assert torch.load(tmp_path / "run" / "phase0.pt", weights_only=True)["step"] == 2
    assert torch.load(tmp_path / "run" / "phase1.pt", weights_only=True)["step"] == 1


# ---------------------------------------------------------------- 10. landmarks of 1e30

def test_landmarks_of_1e30_stop_the_run_after_a_run_of_skipped_steps(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train.Monitor, "MAX_SKIPPED", 5)                # 20 in a real run
    root = tmp_path / "vox"
    data.export(str(root), videos=2, test_videos=0, frames=8, size=32, progress=False)
    for f in (root / "train").glob("*.landmarks.npy"):
        np.save(f, np.full((8, 68, 2), 1e30, np.float32))
    assert train.main(["--phase", "0", "--steps", "200", "--data", str(root), "--out", str(tmp_path / "run"),
                       *FAST]) == 2
    captured = capsys.readouterr()
    last_line(captured.err, "error: 5 steps in a row had a non-finite loss or gradient (last at step 5)")
    assert "landmark files" in captured.err and "phase 0 done" not in captured.out


# ---------------------------------------------------------------- 11. strict JSON (no NaN, no Infinity)

def strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_metrics_json_and_the_training_log_are_strict_json(run0, tmp_path, monkeypatch):
    """A --no-keypoints model's leak figure via_k is inf (swapping the keypoints changes nothing); one held-out
    video gives a NaN spread in the log. Both are written as null."""
    torch.manual_seed(0)
    cfg = srt.FSRTConfig.from_dict({**torch.load(run0 / "phase0.pt", weights_only=True)["config"],
                                    "use_keypoints": False})
    ck = tmp_path / "nokp.pt"
    weights.save_checkpoint(str(ck), {"config": cfg.to_dict(), "model": srt.FSRT(cfg).state_dict(), "phase": 1})
    video_set = data.VideoSet
    monkeypatch.setattr(data, "VideoSet", lambda **kw: video_set(frames=12, **kw))
    for slow in ("report_identity", "report_builtin_expression"):        # dlib's CSIM, expression transfer
        monkeypatch.setattr(metrics, slow, lambda *a: None)
    monkeypatch.setattr(metrics, "evaluate_expression", lambda *a, **k: None)  # train's held-out check too
    monkeypatch.setattr(metrics, "evaluate_cross", lambda *a, **k: None)
    monkeypatch.setattr(metrics, "evaluate_leak", lambda *a, **k: {"absolute": 64.7, "drivers": 9.5, "via_e": 64.7,
                                                                  "via_k": math.inf, "triples": 3})
    assert metrics.main(["--checkpoint", str(ck), "--no-akd", "--no-probe", "--max-videos", "3",
                         "--out", str(tmp_path / "r.json")]) == 0
    assert strict_json((tmp_path / "r.json").read_text())["leak"]["via_k"] is None
    run = tmp_path / "run"
    assert train.main(["--phase", "1", "--steps", "1", "--no-keypoints", "--kp-checkpoint", str(run0 / "phase0.pt"),
                       "--out", str(run), *FAST, "--eval-videos", "1", "--sample-every", "1"]) == 0
    recs = [strict_json(l) for l in (run / "log.jsonl").read_text().splitlines()]
    assert any(r.get("health_expr_spread", 0) is None for r in recs)


# ---------------------------------------------------------------- 12. tampered checkpoint configs

TAMPERED = [("image_size", "32", "config.image_size '32' is not an int"),
            ("image_size", 32.5, "config.image_size 32.5 is not an int"),
            ("image_size", -32, "config.image_size -32 is < 1"), ("image_size", 0, "config.image_size 0 is < 1"),
            ("image_size", 100000, "config.image_size 100000 is not a multiple of 8 in [8, 4096]"),
            ("image_size", 36, "config.image_size 36 is not a multiple of 8"),
            ("chunk", -5, "config.chunk -5 is < 1"), ("chunk", 0, "config.chunk 0 is < 1"),
            ("num_kp", 0, "config.num_kp 0 is < 1"), ("kp", "hello", "config.kp is a str, not a dict"),
            ("cnn_channels", None, "config.cnn_channels is missing"),
            ("width", 64, "its weight encoder.cnn.proj.weight has shape (32, 32, 1, 1), its config makes "
                          "(64, 32, 1, 1)")]


@pytest.mark.parametrize("field,value,needle", TAMPERED)
def test_a_tampered_config_is_one_line_naming_the_field(ckpt, tmp_path, capsys, field, value, needle):
    path = tampered(ckpt, tmp_path / "t.pt", lambda ck: ck["config"].pop(field) if value is None else
                    ck["config"].update({field: value}))
    png, mp4 = inputs(tmp_path)
    assert reenact.main(render_args(path, png, mp4, tmp_path / "o.mp4")) == 2
    line = one_line(capsys.readouterr().err, f"t.pt is a malformed fsrt checkpoint: {needle}")
    assert len(line) < 400 and "--batch-size" not in line and "--pixels" not in line
    assert metrics.main(["--checkpoint", path, "--no-akd", "--out", str(tmp_path / "r.json")]) == 2
    one_line(capsys.readouterr().err, needle)


@pytest.mark.parametrize("change,needle", [(lambda ck: ck.update(config=list(ck["config"].items())),
                                            "config is a list, not a dict"),
                                           (lambda ck: ck.update(model=torch.zeros(3)),
                                            "its model is a Tensor, not a dict of named tensors"),
                                           (lambda ck: ck.update(phase="1"), "its phase '1' is not one of 0, 1, 2, 3"),
                                           (lambda ck: ck.pop("config"), "its config is missing")])
def test_a_tampered_checkpoint_is_one_line(ckpt, tmp_path, capsys, change, needle):
    path = tampered(ckpt, tmp_path / "t.pt", change)
    png, mp4 = inputs(tmp_path)
    assert reenact.main(render_args(path, png, mp4, tmp_path / "o.mp4")) == 2
    one_line(capsys.readouterr().err, needle)
    assert metrics.main(["--checkpoint", path, "--no-akd", "--out", str(tmp_path / "r.json")]) == 2
    one_line(capsys.readouterr().err, needle)


def test_out_of_memory_advice_names_the_commands_own_options(ckpt, tmp_path, capsys, monkeypatch):
    png, mp4 = inputs(tmp_path)
    monkeypatch.setattr(reenact, "render_stream", lambda *a, **k: torch.empty(2 ** 62, dtype=torch.uint8))
    assert reenact.main(render_args(ckpt, png, mp4, tmp_path / "o.mp4")) == 2
    line = one_line(capsys.readouterr().err, "error: out of memory")
    assert "--batch, --chunk or --size" in line and "--batch-size" not in line and "--pixels" not in line


# ---------------------------------------------------------------- 13. files that are not weights

@pytest.fixture
def not_weights(ckpt, tmp_path):
    """Files that are not this project's checkpoints, with what the error line must say of each."""
    from PIL import Image
    import pickle
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    data.write_video(str(tmp_path / "clip.mp4"), np.zeros((2, 16, 16, 3), np.uint8))
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=2))
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo.pt")
    return [(str(tmp_path / "image.png"), "is a PNG image, not a torch checkpoint"),
            (str(tmp_path / "clip.mp4"), "is an MP4/MOV video, not a torch checkpoint"),
            (str(tmp_path / "plain.pkl"), "a plain Python pickle, not torch.save's zip archive"),
            (str(tmp_path / "folder"), "is a folder, not a"), (str(tmp_path / "fifo.pt"), "is not a regular file"),
            ("/dev/null", "/dev/null is not a regular file")]


def test_files_that_are_not_checkpoints_say_what_they_are(ckpt, not_weights, tmp_path, capsys, monkeypatch):
    png, mp4 = inputs(tmp_path)
    cases = not_weights + [(tampered(ckpt, tmp_path / "noconfig.pt", lambda ck: ck.pop("config")),
                            "its config is missing")]
    for path, needle in cases:
        assert reenact.main(render_args(path, png, mp4, tmp_path / "o.mp4")) == 2, path
        one_line(capsys.readouterr().err, needle)
        assert metrics.main(["--checkpoint", path, "--no-akd", "--out", str(tmp_path / "r.json")]) == 2, path
        one_line(capsys.readouterr().err, needle)
    import keypoints
    for path, needle in not_weights:
        with pytest.raises((ValueError, RuntimeError, FileNotFoundError), match=re_escape(needle)):
            weights.load_kp_detector(path, keypoints.KPDetector())


def re_escape(text):
    import re
    return re.escape(text)


def test_train_kp_checkpoint_goes_through_the_same_reader(not_weights, tmp_path, capsys):
    for path, needle in not_weights:
        assert train.main(["--phase", "1", "--steps", "1", "--kp-checkpoint", path, "--out", str(tmp_path / "run"),
                           *FAST]) == 2, path
        one_line(capsys.readouterr().err, needle)


# ---------------------------------------------------------------- 14. a driving file without pictures

def test_a_driving_file_without_a_video_stream_says_so(ckpt, tmp_path, capsys):
    png, _ = inputs(tmp_path)
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac", tmp_path / "audio.mp4")
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=10", "-frames:v", "0", "-c:v", "libx264",
           tmp_path / "empty.mp4")
    for name, streams in (("audio.mp4", "audio"), ("empty.mp4", "none")):
        assert reenact.main(render_args(ckpt, png, str(tmp_path / name), tmp_path / "o.mp4")) == 2
        line = one_line(capsys.readouterr().err, f"{name}: no video stream in it (its streams: {streams})")
        assert "output file" not in line and "Invalid argument" not in line


# ---------------------------------------------------------------- 15. one list of image extensions

def test_webp_frames_in_a_folder_are_read(ckpt, tmp_path):
    from PIL import Image
    folder = tmp_path / "webp"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 40), (80 * i, 50, 50)).save(folder / f"{i:04d}.webp", lossless=True)
    assert len(data.read_frames(str(folder))) == 3
    png, _ = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, png, str(folder), tmp_path / "o.mp4")) == 0
    assert len(data.read_frames(str(tmp_path / "o.mp4"))) == 3


# ---------------------------------------------------------------- 16. output names

def test_a_folder_name_with_a_dot_and_a_long_name_are_written_and_a_too_long_one_refused_first(ckpt, tmp_path,
                                                                                               capsys, monkeypatch):
    png, mp4 = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, png, mp4, tmp_path / "results.v2")) == 0
    assert sorted(os.listdir(tmp_path / "results.v2")) == ["000000.png", "000001.png", "000002.png"]
    long = tmp_path / ("x" * 248 + ".mp4")                        # 252 bytes: the temporary name is short
    assert reenact.main(render_args(ckpt, png, mp4, long)) == 0
    assert len(data.read_frames(str(long))) == 3 and not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    monkeypatch.setattr(reenact, "reenact", lambda *a, **k: pytest.fail("rendered before refusing"))
    assert reenact.main(render_args(ckpt, png, mp4, tmp_path / ("y" * 300 + ".mp4"))) == 2
    one_line(capsys.readouterr().err, "has 304 bytes, more than the 255 this file system allows")


# ---------------------------------------------------------------- 17. --phase 3 with a phase-2 file

def test_phase_3_resuming_a_phase_2_file_is_refused(run0, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    tampered(run0 / "phase0.pt", run / "phase3.pt", lambda ck: ck.update(phase=2))
    assert train.main(["--phase", "3", "--steps", "1", "--vgg-weights", "random", "--out", str(run), *FAST]) == 2
    one_line(capsys.readouterr().err, "holds a phase-2 checkpoint, not phase 3")


# ---------------------------------------------------------------- 18. a worker's error is the main process's line

def test_a_broken_dataset_gives_the_same_line_with_and_without_workers(tmp_path, capsys):
    """The worker's error reaches the main process wrapped in its traceback: the line is the error itself. The
    command then ends: its worker (kept alive by the re-raised error's reference cycle) ignores SIGTERM, so
    multiprocessing's exit function, which terminates and joins daemon children, waited for it forever;
    cli.end_workers kills it first."""
    root = tmp_path / "vox"
    data.export(str(root), videos=2, test_videos=0, frames=8, size=32, progress=False)
    for f in (root / "train").glob("*.landmarks.npy"):
        f.write_bytes(b"not a numpy file")
    args = ["--phase", "0", "--steps", "2", "--data", str(root), *FAST]
    assert train.main([*args, "--out", str(tmp_path / "r0"), "--workers", "0"]) == 2
    line = last_line(capsys.readouterr().err, "no valid sample after 10 tries")
    r = subprocess.run([sys.executable, "train.py", *args, "--out", str(tmp_path / "r1"), "--workers", "1"], cwd=ROOT,
                       env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and last_line(r.stderr) == line.replace(str(tmp_path / "r0"), str(tmp_path / "r1"))
    assert "DataLoader worker" not in r.stderr


# ---------------------------------------------------------------- 19. landmark files of another video

def test_a_landmark_file_longer_than_its_video_says_so(tmp_path):
    root = tmp_path / "vox"
    data.export(str(root), videos=2, test_videos=0, frames=6, size=32, progress=False)
    for f in (root / "train").glob("*.landmarks.npy"):
        lm = np.full((100, 68, 2), np.nan, np.float32)
        lm[6:] = np.load(f)[0]                                   # faces only past the video's 6 frames
        np.save(f, lm)
    ds = data.FaceDataset(root=str(root), size=32)
    with pytest.warns(UserWarning, match="100 landmark rows for 6 frames"):
        with pytest.raises(RuntimeError, match="100 landmark rows for 6 frames"):
            ds.sample_frames(0)


# ---------------------------------------------------------------- 20. data.py's outputs checked first

def test_data_cli_outputs_are_checked_before_the_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(data, "export", lambda *a, **k: pytest.fail("exported before checking"))
    monkeypatch.setattr(data, "preview", lambda *a, **k: pytest.fail("previewed before checking"))
    file = tmp_path / "file.txt"
    file.write_text("x")
    (tmp_path / "out").mkdir()
    cases = [(["export", str(file / "vox")], "is a file, not a folder"),
             (["export", "/sys/fsrt_test/vox"], "cannot write in /sys"),     # not writable, even by root
             (["preview", str(file / "p.png")], "is a file, not a folder"),
             (["preview", "/sys/fsrt_test/p.png"], "cannot write in /sys"),
             (["preview", str(tmp_path / "out") + "/"], "give an image file name ending in .png"),
             (["preview", str(tmp_path / "out")], "give an image file name ending in .png"),
             (["preview", str(tmp_path / "noext")], "give an image file name ending in .png")]
    for args, needle in cases:
        assert data.main(args) == 2, args
        one_line(capsys.readouterr().err, needle)


def test_data_preview_writes_the_picture(tmp_path):
    assert data.main(["preview", str(tmp_path / "p.png"), "--size", "32", "--n", "1"]) == 0
    assert data.read_image(str(tmp_path / "p.png")).shape == (32, 7 * 32, 3) and os.listdir(tmp_path) == ["p.png"]


# ---------------------------------------------------------------- 21. torchrun: the line once

def test_under_torchrun_only_rank_0_prints_the_line(tmp_path, capsys, monkeypatch):
    args = ["--phase", "0", "--steps", "1", "--out", str(tmp_path / "run"), *FAST, "--batch-size", "3"]
    for rank, printed in (("1", ""), ("0", "--batch-size 3 (global) must be divisible by the 2 processes")):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert train.main(args) == 2
        err = capsys.readouterr().err
        assert one_line(err, printed) if printed else err == ""
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- the repeat sweep on what issue 25 touched

def test_stop_signal_handlers_are_restored_when_train_returns(run0):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert train.main(["--phase", "0", "--steps", "2", "--out", str(run0), *FAST]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_two_writers_of_one_frame_folder_never_mix_their_frames(tmp_path):
    """A second write into a frame folder while the first is in progress (started from inside the first's frame
    stream) is refused at once, before it writes any frame; the first ends with all of its own frames."""
    folder, refused = tmp_path / "frames", []

    def first():
        for k in range(4):
            if k == 1:
                with pytest.raises(RuntimeError) as e:
                    data.write_video(str(folder), np.full((4, 16, 16, 3), 220, np.uint8))
                refused.append(cli.error_line(e.value))
            yield np.full((16, 16, 3), 30, np.uint8)

    assert data.write_video(str(folder), first()) == 4
    assert "is being written by another process right now" in refused[0]
    got = data.read_frames(str(folder))
    assert len(got) == 4 and (got == 30).all()


def test_resuming_a_checkpoint_without_training_state_is_one_line(run0, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    tampered(run0 / "phase0.pt", run / "phase0.pt", lambda ck: (ck.pop("optimizer"), ck.update(step="1")))
    assert train.main(["--phase", "0", "--steps", "3", "--out", str(run), *FAST]) == 2
    one_line(capsys.readouterr().err, "has no usable optimizer, step: it holds a model but not the training state")


def test_an_out_that_is_a_device_or_a_fifo_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    """The write's rename would put a file where the node was (as root even over /dev/null)."""
    with pytest.raises(ValueError, match="/dev/null is not a regular file"):
        cli.check_writable("/dev/null")
    os.mkfifo(tmp_path / "fifo")
    monkeypatch.setattr(metrics, "evaluate_self", lambda *a, **k: pytest.fail("evaluated before refusing"))
    assert metrics.main(["--checkpoint", ckpt, "--no-akd", "--out", str(tmp_path / "fifo")]) == 2
    one_line(capsys.readouterr().err, "is not a regular file")
    assert not os.path.isfile(tmp_path / "fifo")


# ================================================================ issue 25, second sweep: what the fixes touched

# ---------------------------------------------------------------- 2.1 SIGHUP, SIGTERM while rendering

def test_sighup_stops_training_with_a_checkpoint_and_129(tmp_path):
    """A closed terminal or ssh session (SIGHUP) killed the run before: the steps since the last checkpoint lost."""
    out = tmp_path / "run"
    p = _start(["--phase", "0", "--steps", "100000", "--out", str(out), *FAST], out / "log.jsonl", '"step": 1,')
    p.send_signal(signal.SIGHUP)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 129, (p.returncode, stderr[-2000:])
    assert "stopped at step" in stdout and torch.load(out / "phase0.pt", weights_only=True)["step"] >= 1


def test_sigterm_while_reenact_renders_leaves_no_temporary_file(ckpt, tmp_path):
    """SIGTERM killed reenact.py mid-render: its .tmp_*.mp4 (and ffmpeg's partial video in it) stayed in --out's
    folder. Now the signal unwinds as Ctrl-C does: exit 143, one line, nothing left."""
    png, mp4 = inputs(tmp_path, frames=200)
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.Popen([sys.executable, "reenact.py", *render_args(ckpt, png, mp4, out / "r.mp4", "--size", "128",
                                                                     "--precision", "fp32")],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.listdir(out) and p.poll() is None and time.time() - t0 < 60:     # its temporary file exists
        time.sleep(0.05)
    time.sleep(1)
    p.send_signal(signal.SIGTERM)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 143, (p.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and "interrupted (SIGTERM)" in stderr
    assert os.listdir(out) == []


# ---------------------------------------------------------------- 2.2 odd media: formats, damage, frame order

def test_a_float_tiff_source_is_read_with_its_values_not_black(tmp_path):
    """A 32-bit float gray TIFF (mode F, values in [0, 1]) was converted by Pillow to 0 / 1 of 255: black."""
    from PIL import Image
    gray = np.random.default_rng(0).random((20, 30), dtype=np.float32)
    Image.fromarray(gray).save(tmp_path / "f.tif")
    Image.fromarray(gray * 255).save(tmp_path / "f255.tif")                   # the other convention: 0-255
    for name in ("f.tif", "f255.tif"):
        a = data.read_image(str(tmp_path / name))
        assert a.shape == (20, 30, 3) and np.abs(a[..., 1].astype(int) - np.round(gray * 255)).max() <= 1, name


@pytest.mark.parametrize("ext", ["webp", "png"])
def test_an_animated_webp_or_png_is_read_as_a_clip(ckpt, tmp_path, ext):
    """An animated WebP / PNG driving file was read as one still frame at 25 fps (3 frames at 10 fps here)."""
    from PIL import Image
    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (20, 120, 220)]
    anim = tmp_path / f"anim.{ext}"
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    got = data.read_frames(str(anim))
    assert got.shape == (3, 32, 32, 3) and np.abs(got.reshape(3, -1).mean(1) - [20, 120, 220]).max() < 3
    png, _ = inputs(tmp_path)
    out = tmp_path / "o.mp4"
    assert reenact.main(render_args(ckpt, png, str(anim), out)) == 0
    frames, fps = data.read_video(str(out))
    assert len(frames) == 3 and fps == pytest.approx(10)
    assert reenact.main(render_args(ckpt, str(anim), png, out, "--source-frames", "0", "-1")) == 0   # a video source


def test_empty_and_cut_short_files_say_so(ckpt, tmp_path, capsys):
    """A 0-byte video said "moov atom not found", a 0-byte image "cannot identify image file"; a cut-short mp4
    (index first, the frames cut) gave ffmpeg's progress line "frame= 0 fps=0.0 ... Conversion failed!"."""
    png, _ = inputs(tmp_path)
    whole = tmp_path / "whole.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x48:rate=10:duration=2", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-movflags", "+faststart", whole)
    blob = whole.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(blob[:len(blob) * 2 // 3])
    for name in ("empty.mp4", "empty.png"):
        (tmp_path / name).write_bytes(b"")
    cases = [(png, "empty.mp4", "empty.mp4: the file is empty (0 bytes)"),
             ("empty.png", str(whole), "empty.png: the file is empty (0 bytes)"),
             (png, "cut.mp4", "partial file")]
    for source, driving, needle in cases:
        args = render_args(ckpt, str(tmp_path / source), str(tmp_path / driving), tmp_path / "o.mp4")
        assert reenact.main(args) == 2
        line = one_line(capsys.readouterr().err, needle)
        assert "frame=" not in line and "Conversion failed" not in line
        assert "empty" in line or "cut short or damaged" in line
    assert not (tmp_path / "o.mp4").exists()


def test_a_frame_folder_is_read_in_the_order_of_its_numbers_and_names_an_odd_sized_frame(ckpt, tmp_path, capsys):
    """frame1.png ... frame12.png were read as frame1, frame10, frame11, frame12, frame2, ...: scrambled motion;
    a frame of another size said only "frames of different sizes", not which."""
    from PIL import Image
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(12):
        im = Image.fromarray(np.full((16, 16, 3), i * 20, np.uint8))
        im.save(folder / f"frame{i + 1}.{'jpg' if i == 3 else 'png'}", quality=100)       # mixed extensions
    got = data.read_frames(str(folder))[:, 0, 0, 0].astype(int)
    assert np.abs(got - np.arange(12) * 20).max() <= 2, got
    Image.new("RGB", (12, 16)).save(folder / "frame13.png")
    png, _ = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, png, str(folder), tmp_path / "o.mp4")) == 2
    one_line(capsys.readouterr().err, "frame 12 (frame13.png) is 12x16 but frame 0 is 16x16")


def test_a_rotated_phone_video_is_read_upright_without_imageio_warnings(ckpt, tmp_path):
    """A 64x32 clip with a 90-degree display rotation: read upright (32 wide, 64 high), but imageio-ffmpeg
    printed "The frame size for reading (32, 64) is different from the source frame size (64, 32)." twice."""
    wide, rot = tmp_path / "wide.mp4", tmp_path / "rot.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x32:rate=10:duration=0.5", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           wide)
    ffmpeg("-display_rotation", "90", "-i", wide, "-c", "copy", rot)
    png, _ = inputs(tmp_path)
    r = subprocess.run([sys.executable, "reenact.py", *render_args(ckpt, png, str(rot), tmp_path / "o.mp4")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "rot.mp4 is 32x64" in r.stdout and data.read_frames(str(rot)).shape[1:3] == (64, 32)


# ---------------------------------------------------------------- 2.3 output names and sizes

def test_odd_output_sides_are_refused_or_padded_never_stretched(ckpt, tmp_path, capsys):
    """--size 33 into an .mp4 was stretched to 34x34 with an imageio warning on stderr; --paste-back into a 39x33
    photo as well (to 40x34). Now an odd --size is refused for .mp4/.mov and odd frames get an edge row/column."""
    png, mp4 = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, png, mp4, tmp_path / "o.mp4", "--size", "33")) == 2
    one_line(capsys.readouterr().err, "--size 33: a .mp4 / .mov (H.264) needs even sides; use --size 32 or 34")
    assert reenact.main(render_args(ckpt, png, mp4, tmp_path / "o.gif", "--size", "33")) == 0
    assert data.read_frames(str(tmp_path / "o.gif")).shape[1:3] == (33, 33)
    frame = np.zeros((33, 39, 3), np.uint8)
    frame[:, 20:] = 200                                     # an edge at column 20: stretching would move it
    capsys.readouterr()
    assert data.write_video(str(tmp_path / "odd.mp4"), [frame] * 2, 10) == 2
    got = data.read_frames(str(tmp_path / "odd.mp4"))[0].astype(int)
    assert got.shape == (34, 40, 3) and capsys.readouterr().err == ""
    assert got[:33, 18].mean() < 40 and got[:33, 22].mean() > 160      # not moved


def test_an_out_with_the_extension_of_another_kind_of_file_is_refused(ckpt, tmp_path, capsys, monkeypatch):
    """reenact.py --out results.json made a folder of PNG frames called results.json; metrics.py --out X.mp4 wrote
    its JSON as X.mp4 (with reenact.py writing X.mp4 at the same time, one replaced the other)."""
    png, mp4 = inputs(tmp_path)
    monkeypatch.setattr(reenact, "reenact", lambda *a, **k: pytest.fail("rendered before refusing"))
    monkeypatch.setattr(metrics, "evaluate_self", lambda *a, **k: pytest.fail("evaluated before refusing"))
    for name in ("results.json", "phase1.pt"):
        assert reenact.main(render_args(ckpt, png, mp4, tmp_path / name)) == 2
        one_line(capsys.readouterr().err, f"cannot write '{os.path.splitext(name)[1]}'")
    assert metrics.main(["--checkpoint", ckpt, "--no-akd", "--out", str(tmp_path / "X.mp4")]) == 2
    one_line(capsys.readouterr().err, "metrics.py writes JSON, not a '.mp4' file")
    assert sorted(os.listdir(tmp_path)) == ["a.png", "d.mp4"]


# ---------------------------------------------------------------- 2.4 paths: links, permissions, hidden files

def test_an_out_that_is_a_symlink_is_written_through_with_ordinary_permissions(ckpt, tmp_path):
    """--out latest.mp4 -> runs/a.mp4: the link was replaced by a file (runs/a.mp4 kept its old frames), and every
    output (videos, checkpoints, JSON) was created 0600 by mkstemp, unreadable to the group and others."""
    png, mp4 = inputs(tmp_path, frames=2)
    target = tmp_path / "runs" / "a.mp4"
    target.parent.mkdir()
    data.write_video(str(target), np.zeros((5, 32, 32, 3), np.uint8), 10)
    os.symlink(target, tmp_path / "latest.mp4")
    old = os.umask(0o022)
    try:
        assert reenact.main(render_args(ckpt, png, mp4, tmp_path / "latest.mp4")) == 0
    finally:
        os.umask(old)
    assert os.path.islink(tmp_path / "latest.mp4") and len(data.read_frames(str(target))) == 2
    assert os.stat(target).st_mode & 0o777 == 0o644
    assert sorted(os.listdir(target.parent)) == ["a.mp4"]


def test_hidden_files_in_a_frame_folder_are_not_frames(ckpt, tmp_path):
    """A frame folder copied from a macOS disk has ._000000.png (AppleDouble) beside each frame and .DS_Store:
    the run failed on "cannot identify image file '._000000.png'"."""
    folder = tmp_path / "clip"
    data.write_video(str(folder), np.full((3, 32, 32, 3), 90, np.uint8))
    for name in ("._000000.png", "._000001.png"):
        (folder / name).write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    assert data.read_frames(str(folder)).shape == (3, 32, 32, 3)
    png, _ = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, png, str(folder), tmp_path / "o.mp4")) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_data_cli_stopped_by_a_signal_exits_without_traceback_or_temporary_file(tmp_path, sig):
    """`python data.py export|landmarks ROOT` (minutes on a real dataset) printed a KeyboardInterrupt traceback on
    Ctrl-C, and SIGTERM left the .tmp_*.mp4 / .tmp_*.npy being written among the data."""
    root = tmp_path / "vox"
    code = ("import sys, numpy as np, data\n"      # faces drawn as flat frames: the time goes to the video files
            "data.faces.render_face = lambda identity, pose, expr, size: np.full((size, size, 3), 90, np.uint8)\n"
            "sys.exit(data.main(sys.argv[1:]))")
    p = subprocess.Popen([sys.executable, "-c", code, "export", str(root), "--videos", "400", "--test-videos", "0",
                          "--size", "32"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not list(root.glob("train/*.mp4")) and p.poll() is None and time.time() - t0 < 60:
        time.sleep(0.05)
    p.send_signal(sig)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, (p.returncode, stderr[-2000:])
    assert "Traceback" not in stderr and f"interrupted ({signal.Signals(sig).name})" in stderr
    assert not [n for n in os.listdir(root / "train") if n.startswith(cli.TEMP_PREFIX)]


def test_ctrl_c_while_train_loads_is_130_without_traceback(tmp_path, capsys, monkeypatch):
    """Ctrl-C before the stop handlers are set (listing a large dataset, loading the model or checkpoint) ended
    train.py with a KeyboardInterrupt traceback."""
    def loading(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "context", loading)
    assert train.main(["--phase", "0", "--out", str(tmp_path / "run"), *FAST]) == 130
    assert "interrupted before training started" in capsys.readouterr().err


def test_a_video_cut_short_mid_stream_is_rendered_with_a_warning(ckpt, tmp_path, capsys):
    """The header (at the front) says 10 s, the frames stop after about a third: 33 frames were rendered with no
    word; and a whole clip whose sound outlasts its picture is not taken for one."""
    whole, sound = tmp_path / "whole.mp4", tmp_path / "sound.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x48:rate=10:duration=10", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-movflags", "+faststart", whole)
    blob = whole.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(blob[:len(blob) * 6 // 10])
    png, _ = inputs(tmp_path)
    assert reenact.main(render_args(ckpt, png, str(tmp_path / "cut.mp4"), tmp_path / "o.mp4")) == 0
    n = len(data.read_frames(str(tmp_path / "o.mp4")))
    warning = [l for l in capsys.readouterr().out.splitlines() if "cut short" in l]
    assert 0 < n < 90 and len(warning) == 1 and warning[0].startswith("warning: ")
    assert f"the result has {n}" in warning[0]
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x48:rate=10:duration=1", "-f", "lavfi", "-i", "sine=duration=3",
           "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", sound)
    assert reenact.main(render_args(ckpt, png, str(sound), tmp_path / "o.mp4")) == 0
    assert "cut short" not in capsys.readouterr().out


def test_csim_says_no_face_was_found_rather_than_too_few_people(ckpt, tmp_path, capsys, monkeypatch):
    """Test videos of 3 people with no face the embedding finds in their first frames: CSIM was "n/a -- needs 2
    test videos of different people", which sends one looking for missing videos."""
    class NoFace:
        network = "the stub embedding"

        def __call__(self, image):
            return None
    monkeypatch.setattr(metrics, "FaceEmbedding", NoFace)
    root = tmp_path / "vox"
    data.export(str(root), videos=0, test_videos=3, frames=12, size=32, progress=False)
    assert metrics.main(["--checkpoint", ckpt, "--data", str(root), "--no-akd", "--out", str(tmp_path / "r.json")]) == 0
    line = [l for l in capsys.readouterr().out.splitlines() if "(CSIM)" in l]
    assert line == ["identity similarity (CSIM): n/a -- the stub embedding found no face in the first frame of the 3 "
                    "source video(s) of the pairs of different people"], line
    assert json.loads((tmp_path / "r.json").read_text())["csim"]["pairs"] == 0


def test_an_avif_photo_is_read_where_pillow_can_and_a_misnamed_file_says_so(ckpt, tmp_path, capsys):
    """An .avif photo (phones, the web) was refused as "unknown file type" though Pillow reads it; an mp4 saved
    as .png said only "cannot identify image file"."""
    from PIL import Image
    png, mp4 = inputs(tmp_path)
    shutil.copy(mp4, tmp_path / "clip.png")
    assert reenact.main(render_args(ckpt, str(tmp_path / "clip.png"), mp4, tmp_path / "o.mp4")) == 2
    one_line(capsys.readouterr().err, "not an image file, or one with the wrong extension")
    if ".avif" not in Image.registered_extensions():
        pytest.skip("this Pillow has no AVIF codec")
    Image.open(png).save(tmp_path / "photo.avif", quality=90)
    assert data.read_image(str(tmp_path / "photo.avif")).shape == (40, 40, 3)
    assert reenact.main(render_args(ckpt, str(tmp_path / "photo.avif"), mp4, tmp_path / "o.mp4")) == 0


def test_a_stopped_write_into_a_frame_folder_leaves_the_earlier_output_whole(tmp_path):
    """Ctrl-C / SIGTERM in the middle of rendering into a frame folder left the first frames new and the rest
    of the earlier output: a clip of two runs. Now the earlier frames stay until the last new one is written."""
    folder = tmp_path / "frames"
    data.write_video(str(folder), np.full((5, 16, 16, 3), 30, np.uint8))
    (folder / ".tmp_killed").mkdir()                      # the staging folder of a writer killed with -9

    def stopped():
        yield from np.full((2, 16, 16, 3), 220, np.uint8)
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.write_video(str(folder), stopped())
    got = data.read_frames(str(folder))
    assert len(got) == 5 and (got == 30).all()
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(5)]
    assert data.write_video(str(folder), np.full((3, 16, 16, 3), 220, np.uint8)) == 3
    assert sorted(os.listdir(folder)) == [f"{i:06d}.png" for i in range(3)]


@pytest.mark.parametrize("fps,frames", [(30000 / 1001, 30), (240, 24), (10, 7)])
def test_a_gif_output_keeps_the_clips_duration(tmp_path, fps, frames):
    """GIF delays are whole hundredths of a second: 29.97 fps became 30 ms a frame (the GIF 10 % short), 240 fps
    0-ms frames (players show those at 100 ms: 10x long)."""
    from PIL import Image
    clip = np.stack([np.full((16, 16, 3), 8 * k % 256, np.uint8) for k in range(frames)])
    assert data.write_video(str(tmp_path / "o.gif"), clip, fps) == frames
    with Image.open(tmp_path / "o.gif") as im:
        delays = [(im.seek(k), im.info["duration"])[1] for k in range(im.n_frames)]
    assert min(delays) >= 20 and sum(delays) / 1000 == pytest.approx(frames / fps, abs=0.021), delays


def test_landmarks_of_a_read_only_dataset_are_refused_before_any_detection(tmp_path, capsys, monkeypatch):
    """Datasets are often mounted read-only: `data.py landmarks ROOT` ran the detector over the first video, then
    failed on "[Errno 30] Read-only file system: '.../.tmp_lpzahkt5.npy'". (The mount is simulated here.)"""
    import errno
    import tempfile
    root = tmp_path / "vox"
    data.export(str(root), videos=2, test_videos=0, frames=4, size=32, progress=False)
    for f in root.glob("train/*.landmarks.npy"):
        f.unlink()
    real = tempfile.TemporaryFile

    def read_only(*a, dir=None, **k):
        if dir and str(dir).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)
    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(data, "LandmarkDetector", lambda *a, **k: pytest.fail("detector built before refusing"))
    assert data.main(["landmarks", str(root)]) == 2
    one_line(capsys.readouterr().err, f"landmarks (written beside the videos) in {root / 'train'}: cannot write")


def test_a_stop_signal_landing_while_ffmpeg_starts_is_not_lost(tmp_path):
    """A SIGINT whose handler runs inside an at-fork hook (the logging module's, while imageio starts ffmpeg for
    each video) was printed as "Exception ignored ... KeyboardInterrupt" and lost: the command ran on to the end
    and exited 0. The hook's KeyboardInterrupt stands in for the signal here."""
    code = ("import os, subprocess, sys, time, cli\n"
            "armed = [True]\n"
            "def hook():\n"
            "    if armed.pop() if armed else False:\n"
            "        raise KeyboardInterrupt\n"
            "os.register_at_fork(after_in_parent=hook)\n"
            "def run(args):\n"
            "    subprocess.run(['true'], preexec_fn=lambda: None)\n"
            "    time.sleep(5)\n"
            "    print('finished')\n"
            "sys.exit(cli.run_command(run, None))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 130 and "finished" not in r.stdout, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip() == "interrupted (SIGINT); no temporary file is left behind", r.stderr


def test_the_temporary_folder_of_a_killed_checkpoint_write_is_removed_at_start(run0, capsys):
    """atomic_path writes in a hidden folder now: a kill -9 during a checkpoint write leaves .tmp_*/file.pt."""
    (run0 / ".tmp_killed01").mkdir()
    (run0 / ".tmp_killed01" / "file.pt").write_bytes(b"x" * 1000)
    assert train.main(["--phase", "0", "--steps", "2", "--out", str(run0), *FAST]) == 0
    assert not (run0 / ".tmp_killed01").exists()
    assert "removed 1 temporary checkpoint file" in capsys.readouterr().out
