"""Tests of srt.py: Eq. (3)-(7) by hand, the paper's parameter counts, and the properties of the decoder."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from srt import FSRT, Decoder, Encoder, FSRTConfig, pixel_grid, positional_encoding
from weights import load_checkpoint, model_from_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FSRT(FSRTConfig.tiny()).eval()


def inputs(m, B=2, N=1, S=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = m.cfg
    src = torch.rand(B, N, 3, S, S, generator=g)
    kp_s = torch.rand(B, N, cfg.num_kp, 2, generator=g) * 2 - 1
    e_s = torch.randn(B, N, cfg.expr_dim, generator=g)
    kp_d = torch.rand(B, cfg.num_kp, 2, generator=g) * 2 - 1
    e_d = torch.randn(B, cfg.expr_dim, generator=g)
    return src, kp_s, e_s, kp_d, e_d


# ----------------------------------------------------------------------------- Eq. (3)-(5)

def test_positional_encoding_by_hand():
    p = torch.tensor([[0.5, -0.25]])
    got = positional_encoding(p, -1, 2)[0]
    want = []
    for x in (0.5, -0.25):                                  # coordinate-major, then octave m = -1, 0, then sin/cos
        for m in (-1, 0):
            want += [math.sin(2 ** m * math.pi * x), math.cos(2 ** m * math.pi * x)]
    assert got.shape == (8,)
    torch.testing.assert_close(got, torch.tensor(want), atol=1e-6, rtol=0)
    assert abs(got[0].item() - math.sin(math.pi * 0.5 / 2)) < 1e-6    # the negative octave sin(2^-1 pi p)


def test_gamma_key_and_pix_layout(model):
    kp = torch.rand(1, 10, 2) * 4 - 2
    code = model.gamma_key(kp)
    assert code.shape == (1, 160)                           # Eq. (4): 10 kp x 2 coords x 4 octaves x 2
    for j, c, m, s in [(0, 0, -1, 0), (3, 1, 2, 1), (9, 1, 0, 0), (7, 0, 1, 1)]:
        idx = j * 16 + c * 8 + (m + 1) * 2 + s
        fn = math.sin if s == 0 else math.cos
        assert abs(code[0, idx].item() - fn(2 ** m * math.pi * kp[0, j, c].item())) < 1e-5
    pix = model.gamma_pix(torch.tensor([[0.3, -0.7]]))
    assert pix.shape == (1, 64)                             # Eq. (5): 2 coords x 16 octaves x 2
    assert abs(pix[0, 32 + 2 * 15 + 1].item() - math.cos(2 ** 14 * math.pi * -0.7)) < 1e-3


def test_pixel_grid_centres_row_major():
    g = pixel_grid(2, 4)
    want = torch.tensor([[x, y] for y in (-0.5, 0.5) for x in (-0.75, -0.25, 0.25, 0.75)])
    torch.testing.assert_close(g, want)


def test_keypoint_code_unique_on_minus2_2():
    p = torch.linspace(-1.995, 1.995, 799)[:, None]
    d = torch.cdist(positional_encoding(p, -1, 4), positional_encoding(p, -1, 4))
    d.fill_diagonal_(float("inf"))
    assert d.min() > 1e-3                                   # distinct values -> distinct codes in (-2, 2)
    # without the negative octave, p and p - 2 collide: why the paper starts at -1
    a, b = positional_encoding(torch.tensor([[0.5]]), 0, 4), positional_encoding(torch.tensor([[-1.5]]), 0, 4)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- sizes

def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("small, dec_m", [(False, 15.31e6), (True, 6.01e6)])
def test_paper_parameter_counts(small, dec_m):
    cfg = FSRTConfig.paper(small_decoder=small)
    assert (cfg.in_dim, cfg.query_dim) == (483, 480)        # Eq. (6), (7)
    with torch.device("meta"):
        enc, dec = Encoder(cfg), Decoder(cfg)
    assert abs(count(enc) - 29.77e6) / 29.77e6 < 0.01
    assert abs(count(dec) - dec_m) / dec_m < 0.01
    assert cfg.expression.expr_dim == 256 and cfg.expression.in_channels == 35


def test_ablation_sizes():
    assert (FSRTConfig.paper(use_keypoints=False).in_dim, FSRTConfig.paper(use_keypoints=False).query_dim) == (323, 320)
    assert FSRTConfig.paper(num_kp=5).kp.num_kp == 5 and FSRTConfig.paper(num_kp=5).key_dim == 80
    cfg = FSRTConfig.paper(expr_dim=64)
    assert (cfg.in_dim, cfg.query_dim, cfg.expression.expr_dim) == (291, 288, 64)


# ----------------------------------------------------------------------------- exact decompositions

def test_first_conv_decomposition_equals_plain_conv():
    torch.manual_seed(0)
    cfg = FSRTConfig.tiny()
    cnn = Encoder(cfg).cnn
    H, W = 12, 20                                           # non-square catches x/y mix-ups at the border
    rgb, pix = torch.rand(3, 3, H, W), torch.randn(cfg.pix_dim, H, W)
    const = torch.randn(3, cfg.key_dim + cfg.expr_dim)
    R = torch.cat((rgb, pix.expand(3, -1, -1, -1), const[:, :, None, None].expand(-1, -1, H, W)), 1)
    assert R.shape[1] == cnn.convs[0].weight.shape[1] == cfg.in_dim
    torch.testing.assert_close(cnn.first_conv(rgb, pix, const), cnn.convs[0](R), atol=1e-5, rtol=0)


def test_encode_equals_encode_naive(model):
    src, kp_s, e_s, _, _ = inputs(model, N=2)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(src, kp_s, e_s), model.encode_naive(src, kp_s, e_s),
                                   atol=1e-5, rtol=1e-5)


def test_decode_equals_naive(model):
    src, kp_s, e_s, kp_d, e_d = inputs(model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        z = model.encode(src, kp_s, e_s)
        kv = model.latent_kv(z)
        grid = pixel_grid(64, 64)
        naive = model.decode_naive(z, grid, kp_d, e_d)
        torch.testing.assert_close(model.decode(z, grid, kp_d, e_d, chunk=1000, kv=kv), naive, atol=1e-5, rtol=0)
        per_sample = torch.rand(2, 300, 2, generator=g) * 2 - 1          # [B,P,2] pixels (training)
        torch.testing.assert_close(model.decode(z, per_sample, kp_d, e_d, chunk=128),
                                   model.decode_naive(z, per_sample, kp_d, e_d), atol=1e-5, rtol=0)
        # one source set, several driving frames: frames folded into the pixel axis
        torch.testing.assert_close(model.decode(z[:1], grid, kp_d, e_d, chunk=999),
                                   model.decode_naive(z[:1], grid, kp_d, e_d), atol=1e-5, rtol=0)
        img = model.render(z, kp_d, e_d, kv=kv)
        torch.testing.assert_close(img, naive.transpose(1, 2).reshape(2, 3, 64, 64), atol=1e-5, rtol=0)


def test_decode_gradients_equal_naive():
    """The split first layer, reused keys/values and chunks train the same parameters by the same gradients."""
    torch.manual_seed(0)
    m = FSRT(FSRTConfig.tiny())
    src, kp_s, e_s, kp_d, e_d = inputs(m)
    pixels = torch.rand(2, 200, 2) * 2 - 1
    target = torch.rand(2, 200, 3)
    grads = []
    for decode in (lambda z: m.decode(z, pixels, kp_d, e_d, chunk=64), lambda z: m.decode_naive(z, pixels, kp_d, e_d)):
        m.zero_grad()
        F.mse_loss(decode(m.encode(src, kp_s, e_s)), target).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("decoder.query_mlp.0") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4, msg=n)


def test_pixel_alone_equals_pixel_in_batch(model):
    src, kp_s, e_s, kp_d, e_d = inputs(model)
    with torch.no_grad():
        z = model.encode(src, kp_s, e_s)
        grid = pixel_grid(64, 64)
        full = model.decode(z, grid, kp_d, e_d, chunk=4096)
        for i in (0, 777, 4095):
            alone = model.decode(z, grid[i:i + 1], kp_d, e_d)
            torch.testing.assert_close(alone, full[:, i:i + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode(z, grid, kp_d, e_d, chunk=1000), full, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.decode(z, grid[:370], kp_d, e_d, chunk=37), full[:, :370], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- sources

def test_output_independent_of_source_order(model):
    src, kp_s, e_s, kp_d, e_d = inputs(model, N=3)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        a = model.render(model.encode(src, kp_s, e_s), kp_d, e_d)
        b = model.render(model.encode(src[:, perm], kp_s[:, perm], e_s[:, perm]), kp_d, e_d)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert a.std() > 0


def test_one_source_model_runs_with_two(model):
    src, kp_s, e_s, kp_d, e_d = inputs(model, N=1)
    with torch.no_grad():
        z1 = model.encode(src, kp_s, e_s)
        assert z1.shape == (2, 64, model.cfg.width)         # H/8 x W/8 tokens per source
        z2 = model.encode(src.repeat(1, 2, 1, 1, 1), kp_s.repeat(1, 2, 1, 1), e_s.repeat(1, 2, 1))
        assert z2.shape == (2, 128, model.cfg.width)
        # the same image twice duplicates every token; attention weights are unchanged -> same image
        r1 = model.render(z1, kp_d, e_d, size=32)
        torch.testing.assert_close(model.render(z2, kp_d, e_d, size=32), r1, atol=1e-5, rtol=0)
        other, kp_o, e_o, _, _ = inputs(model, N=1, seed=7)
        z3 = model.encode(torch.cat((src, other), 1), torch.cat((kp_s, kp_o), 1), torch.cat((e_s, e_o), 1))
        assert (model.render(z3, kp_d, e_d, size=32) - r1).abs().max() > 1e-4


# ----------------------------------------------------------------------------- training behaviour

def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    m = FSRT(FSRTConfig.tiny()).freeze_detector().train()
    assert not m.kp_detector.training and m.encoder.training   # train() keeps the frozen detector in eval
    src, drv = torch.rand(2, 1, 3, 64, 64), torch.rand(2, 3, 64, 64)
    pixels = torch.rand(2, 256, 2) * 2 - 1
    loss = F.mse_loss(m(src, drv, pixels), torch.rand(2, 256, 3))
    loss.backward()
    assert not m.detect(drv)["keypoints"].requires_grad
    for name, p in m.named_parameters():
        if name.startswith("kp_detector."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_unfrozen_detector_gets_gradients():
    torch.manual_seed(0)
    m = FSRT(FSRTConfig.tiny()).train()
    m.detect(torch.rand(1, 3, 64, 64))["keypoints"].sum().backward()
    assert any(p.grad is not None for p in m.kp_detector.parameters())


@pytest.mark.parametrize("overrides", [dict(use_keypoints=False), dict(small_decoder=True), dict(expr_dim=64)])
def test_ablations_build_and_run(overrides):
    torch.manual_seed(0)
    m = FSRT(FSRTConfig.tiny(**overrides)).eval()
    src = torch.rand(1, 2, 3, 64, 64)
    with torch.no_grad():
        kp, e = m.keypoints_and_expression(src.flatten(0, 1))
        assert e.shape == (2, m.cfg.expr_dim)
        z = m.encode(src, kp.unflatten(0, (1, 2)), e.unflatten(0, (1, 2)))
        out = m.render(z, kp[:1], e[:1], size=(16, 24))
        naive = m.decode_naive(z, pixel_grid(16, 24), kp[:1], e[:1])
    assert out.shape == (1, 3, 16, 24) and torch.isfinite(out).all()
    torch.testing.assert_close(out, naive.transpose(1, 2).reshape(1, 3, 16, 24), atol=1e-5, rtol=0)
    if "use_keypoints" in overrides:                        # n_K = 0: the keypoints have no effect at all
        with torch.no_grad():
            torch.testing.assert_close(m.render(z, torch.rand_like(kp[:1]), e[:1], size=(8, 8)),
                                       m.render(z, kp[:1], e[:1], size=(8, 8)))


# ----------------------------------------------------------------------------- config and checkpoints

def test_config_round_trip():
    cfg = FSRTConfig.tiny(expr_dim=64, small_decoder=True)
    assert FSRTConfig.from_dict(cfg.to_dict()) == cfg
    assert FSRTConfig.from_dict(FSRTConfig.paper().to_dict()) == FSRTConfig()


def test_checkpoint_round_trip(model, tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    save_checkpoint(path, {"config": model.cfg.to_dict(), "model": model.state_dict(), "step": 5, "phase": 1})
    assert os.listdir(path.parent) == ["ckpt.pt"]           # atomic: no temporary file left behind
    ckpt = load_checkpoint(path)
    assert ckpt["format"] == "fsrt" and ckpt["step"] == 5
    m2 = model_from_checkpoint(str(path))
    assert m2.detector_frozen and not m2.training
    src, kp_s, e_s, kp_d, e_d = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(m2.render(m2.encode(src, kp_s, e_s), kp_d, e_d),
                                   model.render(model.encode(src, kp_s, e_s), kp_d, e_d))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    fomm = tmp_path / "vox-cpk.pth.tar"
    torch.save({"generator": {}, "kp_detector": {}, "discriminator": {}, "epoch": 1}, fomm)
    with pytest.raises(ValueError, match="not an fsrt checkpoint.*FOMM"):
        load_checkpoint(fomm)
    bare = tmp_path / "bare.pt"
    torch.save({"w": torch.zeros(2)}, bare)
    with pytest.raises(ValueError, match="bare state dict"):
        load_checkpoint(bare)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="junk.pt"):
        load_checkpoint(junk)


def test_checkpoint_of_another_version_gives_a_short_error(model, tmp_path):
    sd = dict(model.state_dict())
    sd["decoder.old_name.weight"] = sd.pop("decoder.render_mlp.0.weight")
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"config": model.cfg.to_dict(), "model": sd, "step": 0, "phase": 1})
    with pytest.raises(ValueError, match=r"old.pt does not match.*1 missing.*1 unexpected") as err:
        model_from_checkpoint(str(path))
    assert len(str(err.value)) < 500


# ----------------------------------------------------------------------------- health diagnostics

def test_health_sees_a_live_encoder_and_a_collapsed_one():
    from metrics import collapsed, health
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    live = FSRT(FSRTConfig.tiny(image_size=32)).eval()
    h = health(live, images)
    assert len(h["active"]) == 6 and min(h["active"]) > 0.5 and h["spread"] > 0.1 and not collapsed(h), h
    assert h["attn_uniform"] == pytest.approx(math.log(16))                     # 4x4 tokens
    # torch's default conv init (the release's) starts the set-latents almost equal for every token
    torch.manual_seed(0)
    h_torch = health(FSRT(FSRTConfig.tiny(image_size=32, cnn_init="torch")).eval(), images)
    assert h_torch["spread"] < 0.01 < h["spread"] / 10
    # a first conv pushed below zero everywhere (the dead-encoder failure): no channel is active, all tokens
    # equal (the 1x1 conv's bias), and the verdict says so
    with torch.no_grad():
        live.encoder.cnn.convs[0].weight.copy_(-live.encoder.cnn.convs[0].weight.abs())
    dead = health(live, images.clamp(0.5, 1))
    assert dead["active"][0] == 0 and dead["spread"] < 1e-6 and collapsed(dead), dead


def test_health_attention_figures_by_hand():
    """With a zero query projection the first decoder block attends uniformly: entropy log T, and the weight on
    the pixel's own patch token is 1/T."""
    from metrics import health
    torch.manual_seed(0)
    m = FSRT(FSRTConfig.tiny(image_size=32)).eval()
    with torch.no_grad():
        m.decoder.blocks[0].c_q.weight.zero_()
    h = health(m, torch.rand(3, 3, 32, 32))
    assert h["attn_entropy"] == pytest.approx(math.log(16), abs=1e-5)
    assert h["attn_own"] == pytest.approx(1 / 16, abs=1e-6)
    assert m.training is False


def test_health_expression_spread_sees_a_constant_e():
    """expr_spread: 0 when X_M's last layer emits its bias alone (e the same vector for every face: the
    collapse issue 11 measured); at init, He init (expr_init="kaiming") lets the images move e ~10x more
    than torch's default init (measured 0.032 vs 0.0027), where the biases outweigh the input."""
    from metrics import health
    images = torch.rand(4, 3, 32, 32)
    spread = {}
    for init in ("torch", "kaiming"):
        torch.manual_seed(0)
        m = FSRT(FSRTConfig.tiny(image_size=32, expr_init=init)).eval()
        spread[init] = health(m, images)["expr_spread"]
    assert spread["kaiming"] > 0.01 and spread["kaiming"] > 5 * spread["torch"], spread
    with torch.no_grad():
        m.expression.mlp[-1].weight.zero_()
        m.expression.mlp[-1].bias.fill_(0.3)
    assert health(m, images)["expr_spread"] == pytest.approx(0.0, abs=1e-6)


def test_health_sees_a_dead_expression_net():
    """expr_active (ExpressionNet.active_units) and the expression_collapsed verdict: a first X_M layer pushed
    below zero for every input (the dying-ReLU failure issue 11 found in the trained demo: 4 % of its units left)
    leaves e the last layers' bias alone; a fresh net is alive."""
    from metrics import expression_collapsed, health
    torch.manual_seed(0)
    images = torch.rand(4, 3, 32, 32)
    m = FSRT(FSRTConfig.tiny(image_size=32)).eval()
    h = health(m, images)
    assert len(h["expr_active"]) == 3 and min(h["expr_active"]) > 0.3 and not expression_collapsed(h), h
    with torch.no_grad():
        m.expression.mlp[0].bias.fill_(-1e4)
    dead = health(m, images)
    assert dead["expr_active"][0] == 0 and dead["expr_spread"] < 1e-6 and expression_collapsed(dead), dead
    no_e = health(FSRT(FSRTConfig.tiny(image_size=32, expr_dim=0)).eval(), images)
    assert no_e["expr_active"] == [] and not expression_collapsed(no_e)
