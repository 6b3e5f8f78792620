"""weights.load_release / save_release against the authors' release (andrerochow/fsrt, commit b895383).

Nothing is downloaded: the release's files are rebuilt in a temporary folder from
tests/fixtures/official_fsrt/manifest.json and its fill formula (see that folder's README), loaded through
this code, and every stage is matched to the release's own outputs in golden.pt: keypoints, heatmaps,
expression vectors, set-latents and decoded rgb (one and two sources, full and small decoder).
"""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reenact
import srt
import cli
import weights

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "official_fsrt")
TOL = dict(rtol=1e-4, atol=1e-4)     # float32: different summation orders over up to 4,347 terms


def formula_state(manifest, module):
    """The state dict of one release module, filled by the fixture's formula, in the release's key order."""
    sd, offset = {}, manifest["offsets"][module]
    for i, (key, shape, dtype) in enumerate(manifest["modules"][module]):
        g = torch.Generator().manual_seed(offset + i)
        if key.endswith("num_batches_tracked"):
            t = torch.zeros(shape, dtype=getattr(torch, dtype))
        elif key.endswith("running_var"):
            t = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        sd[key] = t
    return sd


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(FIX, "golden.pt"), weights_only=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """kp_detector.pt and vox256.pt (with training state, as the release) in a temporary folder; the
    small-decoder checkpoint as the dict torch.load would return."""
    with open(os.path.join(FIX, "manifest.json")) as f:
        manifest = json.load(f)
    d = tmp_path_factory.mktemp("release")
    state = {m: formula_state(manifest, m) for m in manifest["modules"]}
    training = {"optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}, "epoch_it": 3,
                "it": 1_000_000, "t": 12.5, "loss_val_best": np.float64(0.0123), "run_id": None}
    torch.save(state["kp_detector"], d / "kp_detector.pt")
    torch.save({"encoder": state["encoder"], "decoder": state["decoder"],
                "expression_encoder": state["expression_encoder"], **training}, d / "vox256.pt")
    small = {"encoder": state["encoder"], "decoder": state["small_decoder"],     # as loaded, to save time
             "expression_encoder": state["expression_encoder"], **training}
    return {"dir": d, "manifest": manifest, "state": state, "det": str(d / "kp_detector.pt"),
            "full": str(d / "vox256.pt"), "small": small}


def release_inputs(golden):
    """The fixture's inputs, rebuilt exactly: source [2,3,256,256], driving [2,3,256,256], query pixels [512,2]."""
    r = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    x = F.interpolate(r, size=(256, 256), mode="bilinear", align_corners=False)
    source, driving = x[:2], x[2:]                   # bit-exact with 2 threads; 1 ulp apart with 1 thread
    assert math.isclose(source.double().sum().item(), golden["source_sum"].item(), rel_tol=1e-9)
    assert math.isclose(driving.double().sum().item(), golden["driving_sum"].item(), rel_tol=1e-9)
    return source, driving, srt.pixel_grid(256, 256)[golden["query_index"]]


@pytest.fixture(scope="module")
def full(files, golden):
    """The full-decoder model loaded from the rebuilt files, its detector/expression outputs and set-latents."""
    model = weights.load_release(files["full"], files["det"])
    source, driving, pixels = release_inputs(golden)
    with torch.no_grad():
        det = model.detect(torch.cat((source, driving)))
        expr = model.expression_of(det)
        kp = det["keypoints"]
        latents = {"one": model.encode(source[None, :1], kp[None, :1], expr[None, :1]),
                   "two": model.encode(source[None, :2], kp[None, :2], expr[None, :2])}
    return {"model": model, "det": det, "expr": expr, "latents": latents, "pixels": pixels}


def test_detector_and_expression_match_the_release(full, golden):
    det, expr = full["det"], full["expr"]
    torch.testing.assert_close(det["keypoints"][:2], golden["kp_source"], **TOL)
    torch.testing.assert_close(det["keypoints"][2:], golden["kp_driving"], **TOL)
    torch.testing.assert_close(det["heatmaps"][:2, :, None], golden["heatmap_source"], **TOL)
    torch.testing.assert_close(det["heatmaps"][2:, :, None], golden["heatmap_driving"], **TOL)
    torch.testing.assert_close(det["features"][2:].mean((2, 3)), golden["feature_map_driving_mean"], **TOL)
    torch.testing.assert_close(expr[:2], golden["expr_source"], **TOL)
    torch.testing.assert_close(expr[2:], golden["expr_driving"], **TOL)


@pytest.mark.parametrize("n", ["one", "two"])
def test_set_latents_match_the_release(full, golden, n):
    z = full["latents"][n]
    assert z.shape == (1, 1024 * (1 if n == "one" else 2), 768)
    torch.testing.assert_close(z[:, :8], golden[f"latents_{n}_first8"], **TOL)
    torch.testing.assert_close(z.mean(1), golden[f"latents_{n}_mean"], **TOL)


@pytest.mark.parametrize("decoder", ["full", "small"])
def test_rgb_matches_the_release(files, full, golden, decoder):
    """Decoder output at the 512 query pixels, driven by driving frame 0, for one and two sources; the
    small-decoder file shares the full one's encoder, so its set-latents are the full model's."""
    model = full["model"] if decoder == "full" else weights.load_release(files["small"], files["det"])
    assert model.cfg.small_decoder == (decoder == "small") and not model.training and model.detector_frozen
    kp_d, e_d = full["det"]["keypoints"][2:3], full["expr"][2:3]
    for n, z in full["latents"].items():
        with torch.no_grad():
            rgb = model.decode(z, full["pixels"], kp_d, e_d)
            naive = model.decode_naive(z, full["pixels"], kp_d, e_d)
        torch.testing.assert_close(rgb, golden[f"rgb_{n}_{decoder}"], **TOL)
        torch.testing.assert_close(naive, golden[f"rgb_{n}_{decoder}"], **TOL)


def test_release_columns_is_the_feature_permutation():
    """The release's query features, computed its way (per encoding: all sines, then all cosines; keypoints
    before pixels), permuted by release_columns, are this code's gamma_pix, gamma_key, e."""
    model = srt.FSRT(srt.FSRTConfig.paper())
    kp, px, e = torch.rand(1, 10, 2) * 2 - 1, torch.rand(1, 2) * 2 - 1, torch.randn(1, 256)

    def release_pe(p, octaves):                  # [1, D] -> [1, 2 * D * octaves]: sines then cosines
        x = p[..., None] * (math.pi * 2.0 ** torch.arange(-1, octaves - 1)).float()
        return torch.cat((torch.sin(x).flatten(1), torch.cos(x).flatten(1)), 1)
    theirs = torch.cat((release_pe(kp.flatten(1), 4), release_pe(px, 16), e), 1)
    ours = torch.cat((model.gamma_pix(px), model.frame_code(kp, e)), 1)
    cols = weights.release_columns(model.cfg)
    assert sorted(cols.tolist()) == list(range(480))
    torch.testing.assert_close(theirs[:, cols], ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("decoder", ["full", "small"])
def test_save_release_round_trip_is_exact(files, full, tmp_path, decoder):
    model = full["model"] if decoder == "full" else weights.load_release(files["small"], files["det"])
    weights.save_release(model, tmp_path / "out.pt", tmp_path / "kp.pt")
    ck = torch.load(tmp_path / "out.pt", weights_only=True)
    det = torch.load(tmp_path / "kp.pt", weights_only=True)
    assert list(ck) == ["encoder", "decoder", "expression_encoder"]
    want = {"encoder": "encoder", "decoder": "decoder" if decoder == "full" else "small_decoder",
            "expression_encoder": "expression_encoder"}
    for mod, fixture_mod in list(want.items()) + [(None, "kp_detector")]:
        got, ref = (ck[mod] if mod else det), files["state"][fixture_mod]
        assert list(got) == list(ref)                                    # the release's keys, in its order
        for k in ref:
            assert got[k].dtype == ref[k].dtype and torch.equal(got[k], ref[k]), (mod, k)


def test_save_release_refuses_other_sizes(tmp_path):
    with pytest.raises(ValueError, match="paper preset"):
        weights.save_release(srt.FSRT(srt.FSRTConfig.tiny()), tmp_path / "a.pt", tmp_path / "b.pt")


# ---------------------------------------------------------------- wrong files: one clear line each

def _one_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_wrong_files_give_one_clear_error_line(files, tmp_path, capsys):
    import keypoints
    d = tmp_path
    fomm = d / "vox-cpk.pth.tar"
    torch.save({"generator": {}, "discriminator": {}, "kp_detector": files["state"]["kp_detector"], "epoch": 1},
               fomm)
    project = d / "phase1.pt"
    weights.save_checkpoint(project, {"config": srt.FSRTConfig.tiny().to_dict(),
                                  "model": srt.FSRT(srt.FSRTConfig.tiny()).state_dict(), "step": 0, "phase": 1})
    truncated = d / "vox256_cut.pt"
    with open(files["full"], "rb") as f:
        truncated.write_bytes(f.read(1 << 20))
    other = d / "kp_tiny.pt"
    torch.save(keypoints.KPDetector(keypoints.KPConfig.tiny()).state_dict(), other)
    cases = [([fomm], ("vox-cpk.pth.tar is not an fsrt checkpoint", "FOMM's checkpoint")),
             ([files["full"], project], ("phase1.pt is not a keypoint-detector file", "this project")),
             ([truncated, files["det"]], ("cannot read", "vox256_cut.pt", "truncated")),
             ([files["full"], other], ("kp_tiny.pt is a keypoint detector of another size", "kp.weight (10, 19, 7, 7) vs (10, 35, 7, 7)")),
             ([files["full"]], ("holds no keypoint detector", "--kp-detector kp_detector.pt")),
             ([files["det"], files["full"]], ("keypoint-detector state dict", "pass it as --kp-detector")),
             ([project, files["det"]], ("goes only with the authors' release checkpoints",))]
    for paths, needles in cases:
        args = ["--checkpoint", str(paths[0])] + (["--kp-detector", str(paths[1])] if len(paths) > 1 else [])
        code = reenact.main(args + ["--source", "a.png", "--driving", "d.mp4", "--out", str(d / "o.mp4")])
        line = _one_line(capsys)
        assert code == 2 and all(n in line for n in needles), (paths, line)
        assert "weights_only" not in line


def test_loading_stays_weights_only(tmp_path):
    """A file that would run arbitrary code when unpickled (any non-tensor object) is refused, not loaded."""
    import argparse
    path = tmp_path / "vox256.pt"
    torch.save({"encoder": {}, "decoder": {}, "expression_encoder": {}, "args": argparse.Namespace(a=1)}, path)
    with pytest.raises(RuntimeError, match=r"cannot read .*vox256.pt as a torch checkpoint \(UnpicklingError"):
        weights.load_release(path, path)


def test_metrics_takes_the_release_files_too(files, capsys):
    import metrics
    assert metrics.main(["--checkpoint", files["full"], "--no-akd"]) == 2
    line = _one_line(capsys)
    assert "vox256.pt is the authors' release checkpoint" in line and "--kp-detector" in line


# ---------------------------------------------------------------- command line and precision

def test_precision_auto_follows_the_probe(monkeypatch):
    monkeypatch.setattr(cli, "bf16_speedup", lambda device: 2.9)
    assert cli.pick_precision("auto", "cpu")[0] == "bf16"
    assert cli.pick_precision("fp32", "cpu")[0] == "fp32"
    monkeypatch.setattr(cli, "bf16_speedup", lambda device: 0.25)      # a CPU without native bf16
    assert cli.pick_precision("auto", "cpu") == ("fp32", "auto: bf16 matmul 0.25x the speed of fp32 here")
    assert cli.pick_precision("bf16", "cpu")[0] == "bf16"


@pytest.mark.parametrize("real", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_reenact_cli_with_release_files(files, tmp_path, capsys, monkeypatch, real):
    """Two sources (a 96x80 photo and a frame of a video), relative motion, bf16: inputs of any size
    are resized to the release's 256x256 and the result is a 256x256 video. The default run stubs the
    full-frame decode (~40 s on one core; its numbers are checked against golden.pt above)."""
    import data
    if not real:
        monkeypatch.setattr(srt.FSRT, "render", lambda self, z, kp, e, size=None, **kw: torch.rand(len(kp), 3, *size))
    rng = np.random.default_rng(0)
    from PIL import Image
    Image.fromarray(rng.integers(0, 256, size=(80, 96, 3), dtype=np.uint8)).save(tmp_path / "photo.png")
    data.write_video(str(tmp_path / "d.gif"), rng.integers(0, 256, size=(2, 64, 64, 3), dtype=np.uint8), 10)
    out = tmp_path / "out"
    assert reenact.main(["--checkpoint", files["full"], "--kp-detector", files["det"], "--source",
                         str(tmp_path / "photo.png"), str(tmp_path / "d.gif"), "--driving", str(tmp_path / "d.gif"),
                         "--max-frames", "1", "--relative", "--precision", "bf16", "--out", str(out),
                         "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resized to 256x256" in printed and "precision: bf16 (as asked)" in printed
    frames, _ = data.read_video(str(out))
    assert frames.shape == (1, 256, 256, 3) and frames.std() > 0


def test_save_release_takes_any_paper_model(tmp_path):
    """Fields that do not change the function (decode chunk, patch-CNN init) do not block the export."""
    model = srt.FSRT(srt.FSRTConfig.paper(small_decoder=True, chunk=1024, cnn_init="torch"))
    weights.save_release(model, tmp_path / "a.pt", tmp_path / "b.pt")
    back = weights.load_release(tmp_path / "a.pt", tmp_path / "b.pt")
    assert back.cfg.small_decoder and all(torch.equal(a, b) for a, b in zip(back.state_dict().values(),
                                                                            model.state_dict().values()))
