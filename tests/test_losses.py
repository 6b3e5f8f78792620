"""Tests of losses.py against hand computations of Eq. (11)-(18), the VGG19 layout of torchvision and the
discriminator's shapes.  No network: downloads are monkeypatched to fail."""

import math

import pytest
import torch
import torch.nn.functional as F

import losses as L
import weights


# ---------------------------------------------------------------- Eq. (11), (12)

def test_l_aug_hand_computation():
    e1 = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    e2 = torch.tensor([[0.0, 0.0], [3.0, 1.0]])
    # per vector ||d||^2 / |e|: (1 + 4)/2 = 2.5 and (0 + 4)/2 = 2; batch mean 2.25
    assert L.l_aug(e1, e2).item() == pytest.approx(2.25)
    # [bs, n_src, c] averages over every source vector
    assert L.l_aug(e1[None], e2[None]).item() == pytest.approx(2.25)


def test_l_aug_zero_iff_equal_and_gradients():
    e1 = torch.randn(4, 8, requires_grad=True)
    assert L.l_aug(e1, e1.detach().clone()).item() == 0.0
    e2 = e1.detach() + 1e-3 * torch.randn(4, 8)
    loss = L.l_aug(e1, e2)
    assert loss.item() > 0
    loss.backward()
    assert e1.grad is not None and e1.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        L.l_aug(torch.zeros(2, 3), torch.zeros(2, 4))


# ---------------------------------------------------------------- Eq. (13)

def test_stack_E_paper_order():
    bs, n, c = 2, 3, 4
    e_src = torch.arange(bs * n * c, dtype=torch.float32).view(bs, n, c)
    e_drv = -1 - torch.arange(bs * c, dtype=torch.float32).view(bs, c)
    E = L.stack_E(e_src, e_drv)
    assert E.shape == ((n + 1) * bs, c)
    expected = []
    for b in range(bs):           # per sample: its sources, then its driving vector
        expected += [e_src[b, i] for i in range(n)] + [e_drv[b]]
    assert torch.equal(E, torch.stack(expected))
    # one source given as [bs, c]
    assert torch.equal(L.stack_E(e_src[:, 0], e_drv), torch.stack([e_src[0, 0], e_drv[0], e_src[1, 0], e_drv[1]]))


# ---------------------------------------------------------------- Eq. (14)

def _cov_loss_loop(E):
    N, c = E.shape
    mean = [sum(E[n, i].item() for n in range(N)) / N for i in range(c)]
    total = 0.0
    for i in range(c):
        for j in range(c):
            cov = sum((E[n, i].item() - mean[i]) * (E[n, j].item() - mean[j]) for n in range(N)) / (N - 1)
            total += cov ** 2            # off-diagonal (i != j) and diagonal (i == j) alike
    return total / c


def test_l_cov_matches_double_loop():
    E = torch.randn(6, 5, dtype=torch.float64)
    assert L.l_cov(E).item() == pytest.approx(_cov_loss_loop(E), rel=1e-10)


def test_l_cov_hand_value():
    E = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    # column means 0; Cov_00 = (1 + 1)/(2 - 1) = 2, others 0  ->  2^2 / 2 = 2
    assert L.l_cov(E).item() == pytest.approx(2.0)


def test_l_cov_diagonal_counts():
    # uncorrelated columns: the covariance matrix is diagonal (2/3, 2/3), off-diagonal exactly 0
    E = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    C = L.covariance(E)
    assert C[0, 1].item() == 0.0 and C[1, 0].item() == 0.0
    assert L.l_cov(E).item() == pytest.approx((2 * (2 / 3) ** 2) / 2)
    assert L.l_cov(E).item() > 0


def test_l_cov_without_diagonal_is_vicreg_off_diagonal_term():
    # the example above: uncorrelated columns, so without the diagonal nothing is left to penalise
    E = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert L.l_cov(E, diag=0.0).item() == 0.0
    # correlated columns: Cov = [[1, 1], [1, 1]] (rows (1, 1), (-1, -1)); off-diagonal 1^2 + 1^2 = 2, over c = 2
    E = torch.tensor([[1.0, 1.0], [-1.0, -1.0]]) / 2 ** 0.5
    assert L.l_cov(E, diag=0.0).item() == pytest.approx(1.0)
    assert L.l_cov(E, diag=0.5).item() == pytest.approx((2 + 0.5 * 2) / 2)
    assert L.l_cov(E).item() == pytest.approx(2.0)


def test_l_reg_passes_cov_diag_on():
    torch.manual_seed(0)
    e = [torch.randn(4, 2, 3), torch.randn(4, 2, 3), torch.randn(4, 3), torch.randn(4, 3)]
    _, terms = L.l_reg(*e, weights=L.LossWeights(cov_diag=0.0))
    E1, E2 = L.stack_E(e[0], e[2]), L.stack_E(e[1], e[3])
    assert terms["cov"].item() == pytest.approx(L.l_cov(E1, 0.0).item() + L.l_cov(E2, 0.0).item())
    assert terms["cov"].item() < L.l_cov(E1).item() + L.l_cov(E2).item()


def test_l_cov_zero_iff_rows_equal():
    row = torch.randn(1, 7)
    assert L.l_cov(row.repeat(5, 1)).item() == 0.0
    E = row.repeat(5, 1)
    E[2, 3] += 0.1
    assert L.l_cov(E).item() > 0
    with pytest.raises(ValueError):
        L.l_cov(torch.randn(1, 4))


# ---------------------------------------------------------------- Eq. (15)

def _var_loss_loop(E, eps):
    N, c = E.shape
    total = 0.0
    for n in range(N):
        m = sum(E[n, k].item() for k in range(c)) / c
        var = sum((E[n, k].item() - m) ** 2 for k in range(c)) / (c - 1)
        total += max(0.0, 1.0 - math.sqrt(var + eps))
    return total / N


def test_l_var_matches_per_vector_loop():
    E = 0.7 * torch.randn(6, 5, dtype=torch.float64)
    E[1] *= 4  # one vector above the hinge
    assert L.l_var(E, eps=1e-4).item() == pytest.approx(_var_loss_loop(E, 1e-4), rel=1e-10)


def test_l_var_hand_values_and_zero():
    eps = 1e-4
    # [0, 2]: Var = 2 -> std > 1 -> 0;  [0, 0]: 1 - sqrt(eps) = 0.99
    E = torch.tensor([[0.0, 2.0], [0.0, 0.0]])
    assert L.l_var(E, eps).item() == pytest.approx((0 + (1 - math.sqrt(eps))) / 2, rel=1e-6)
    assert L.l_var(E[:1], eps).item() == 0.0      # every vector varies enough -> zero
    assert L.l_var(0.1 * torch.randn(3, 16), eps).item() > 0
    # per vector across its features, NOT across the batch: identical rows with spread features give 0
    assert L.l_var(torch.tensor([[-2.0, 2.0, 0.0]]).repeat(4, 1), eps).item() == 0.0


# ---------------------------------------------------------------- Eq. (16)

def test_l_reg_combination_and_sets():
    torch.manual_seed(1)
    bs, n, c = 3, 2, 6
    s1, s2 = torch.randn(bs, n, c), torch.randn(bs, n, c)
    d, dom = torch.randn(bs, c), torch.randn(bs, c)
    total, t = L.l_reg(s1, s2, d, dom)
    aug = sum(((s1[b, i] - s2[b, i]) ** 2).sum() / c for b in range(bs) for i in range(n)) / (bs * n)
    aug_d = sum(((d[b] - dom[b]) ** 2).sum() / c for b in range(bs)) / bs
    E1 = torch.stack([v for b in range(bs) for v in list(s1[b]) + [d[b]]])     # sources A1, driving uncropped
    E2 = torch.stack([v for b in range(bs) for v in list(s2[b]) + [dom[b]]])   # sources A2, driving Omega
    cov = _cov_loss_loop(E1) + _cov_loss_loop(E2)
    var = _var_loss_loop(E1, 1e-4) + _var_loss_loop(E2, 1e-4)
    assert t["aug"].item() == pytest.approx(aug.item(), rel=1e-5)
    assert t["aug_d"].item() == pytest.approx(aug_d.item(), rel=1e-5)
    assert t["cov"].item() == pytest.approx(cov, rel=1e-5)
    assert t["var"].item() == pytest.approx(var, rel=1e-5)
    expected = 1 / 2 * (aug + aug_d) + 1 * cov + 0.2 * var   # lambda_aug/2, lambda_Cov = 1, lambda_Var = 0.2
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    # swapping which driving vector belongs to E1/E2 changes the result (the sets are not symmetric)
    total_swapped, _ = L.l_reg(s1, s2, dom, d)
    assert total_swapped.item() != pytest.approx(total.item(), rel=1e-6)
    # custom weights are used
    w = L.LossWeights(aug=2.0, cov=0.0, var=0.0)
    assert L.l_reg(s1, s2, d, dom, w)[0].item() == pytest.approx((aug + aug_d).item(), rel=1e-5)


def test_l_reg_gradients_reach_all_expression_vectors():
    xs = [torch.randn(2, 1, 8, requires_grad=True), torch.randn(2, 1, 8, requires_grad=True),
          torch.randn(2, 8, requires_grad=True), torch.randn(2, 8, requires_grad=True)]
    L.l_reg(*xs)[0].backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in xs)


# ---------------------------------------------------------------- Eq. (17), (18)

def test_l_mse_hand_and_layouts():
    pred = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.5]]])   # [B=1, P=2, 3]
    target = torch.zeros(1, 2, 3)
    # the release's mean over pixels AND channels: (1 + 0 + 0 + 3 * 0.25) / 6 = 1.75 / 6
    assert L.l_mse(pred, target).item() == pytest.approx(1.75 / 6)
    # = torch's mse_loss (the release's nn.MSELoss), i.e. 1/3 of Eq. (17)'s squared norm per pixel
    p, t = torch.rand(2, 5, 3), torch.rand(2, 5, 3)
    assert L.l_mse(p, t).item() == pytest.approx(F.mse_loss(p, t).item(), rel=1e-6)
    assert L.l_mse(p, t).item() == pytest.approx((p - t).pow(2).sum(-1).mean().item() / 3, rel=1e-6)
    img_p, img_t = torch.rand(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    as_pixels = lambda x: x.flatten(2).transpose(1, 2)   # [B, H*W, 3]
    assert L.l_mse(img_p, img_t).item() == pytest.approx(L.l_mse(as_pixels(img_p), as_pixels(img_t)).item(), rel=1e-6)
    assert L.l_mse(img_t, img_t).item() == 0.0


def test_objective_weights():
    w = L.LossWeights()
    assert (w.mse, w.perceptual, w.adv, w.fm, w.aug, w.cov, w.var) == (1, 0.01, 0.001, 0.01, 1, 1, 0.2)
    t = {k: torch.tensor(v) for k, v in dict(reg=1.0, mse=2.0, p=3.0, adv=4.0, fm=5.0).items()}
    total, terms = L.objective(t["reg"], t["mse"], perceptual=t["p"], adv=t["adv"], fm=t["fm"])
    assert total.item() == pytest.approx(1 + 1 * 2 + 0.01 * 3 + 0.001 * 4 + 0.01 * 5)
    assert set(terms) == {"reg", "mse", "perceptual", "adv", "fm"}
    total1, terms1 = L.objective(t["reg"], t["mse"])             # phase I
    assert total1.item() == pytest.approx(3.0) and set(terms1) == {"reg", "mse"}
    total2, _ = L.objective(t["reg"], t["mse"], weights=L.LossWeights(mse=0.5))
    assert total2.item() == pytest.approx(2.0)
    # every lambda of a given LossWeights is used (none is read from a default elsewhere)
    w2 = L.LossWeights(mse=2, perceptual=0.1, adv=0.5, fm=0.5)
    total3, _ = L.objective(t["reg"], t["mse"], perceptual=t["p"], adv=t["adv"], fm=t["fm"], weights=w2)
    assert total3.item() == pytest.approx(1 + 2 * 2 + 0.1 * 3 + 0.5 * 4 + 0.5 * 5)


def test_objective_applies_lambda_p_and_fm_once():
    # the release: lambda_P = 0.01 on each VGG layer's L1, lambda_A^F = 0.01 on each block's L1
    pred, target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    perc = L.PerceptualLoss(L.VGG19())
    real, fake = [torch.rand(1, 2, 3, 3) for _ in range(4)], [torch.rand(1, 2, 3, 3) for _ in range(4)]
    zero = torch.tensor(0.0)
    total, _ = L.objective(zero, zero, perceptual=perc(pred, target), fm=L.feature_matching(real, fake))
    with torch.no_grad():
        layers = [0.01 * (a - b).abs().mean() for a, b in zip(perc.vgg(pred), perc.vgg(target))]
    blocks = [0.01 * (r - f).abs().mean() for r, f in zip(real, fake)]
    assert total.item() == pytest.approx(float(sum(layers) + sum(blocks)), rel=1e-5)


def test_l_reg_empty_expression_vector():
    # the |e| = 0 ablation: no regulariser terms, a finite zero (not NaN from a variance over 0 features)
    e = torch.zeros(4, 0, requires_grad=True)
    total, terms = L.l_reg(e[:, None], e[:, None], e, e)
    assert total.item() == 0.0 and all(v.item() == 0.0 for v in terms.values())


# ---------------------------------------------------------------- VGG19 / perceptual loss

# torchvision's vgg19 `features`: the 16 conv layers' indices and weight shapes
VGG19_CONVS = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256),
               (14, 256, 256), (16, 256, 256), (19, 512, 256), (21, 512, 512), (23, 512, 512),
               (25, 512, 512), (28, 512, 512), (30, 512, 512), (32, 512, 512), (34, 512, 512)]


def _fake_torchvision_sd():
    sd = {}
    for i, co, ci in VGG19_CONVS:
        sd[f"features.{i}.weight"] = torch.randn(co, ci, 3, 3) * 0.01
        sd[f"features.{i}.bias"] = torch.randn(co) * 0.01
    sd["classifier.0.weight"] = torch.randn(8, 4)   # real file: [4096, 25088]; only the name matters
    sd["classifier.0.bias"] = torch.randn(8)
    sd["classifier.6.weight"] = torch.randn(2, 8)
    return sd


def test_vgg19_state_dict_is_torchvision():
    vgg = L.VGG19()
    expected = {}
    for i, co, ci in VGG19_CONVS:
        expected[f"features.{i}.weight"] = (co, ci, 3, 3)
        expected[f"features.{i}.bias"] = (co,)
    got = {k: tuple(v.shape) for k, v in vgg.state_dict().items()}
    assert got == expected
    assert not any(p.requires_grad for p in vgg.parameters())


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub dir and a download that fails (never touches the network)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    calls = []

    def no_download(url, *a, **k):
        calls.append(url)
        raise OSError("network disabled in tests")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    return tmp_path / "torch" / "hub" / "checkpoints", calls


def test_vgg19_loads_fake_file_from_hub_dir(offline_hub):
    ckpt_dir, calls = offline_hub
    assert weights.vgg19_weights_path() == str(ckpt_dir / "vgg19-dcbb9e9d.pth")
    ckpt_dir.mkdir(parents=True)
    sd = _fake_torchvision_sd()
    torch.save(sd, ckpt_dir / "vgg19-dcbb9e9d.pth")
    vgg = weights.load_vgg19()
    assert calls == []                                    # found in the cache, no download tried
    assert torch.equal(vgg.features[34].weight, sd["features.34.weight"])
    assert torch.equal(vgg.features[0].bias, sd["features.0.bias"])
    # an explicit path works too
    vgg2 = weights.load_vgg19(str(ckpt_dir / "vgg19-dcbb9e9d.pth"))
    assert torch.equal(vgg2.features[5].weight, sd["features.5.weight"])


def test_vgg19_missing_file_is_a_clear_error(offline_hub, tmp_path):
    ckpt_dir, calls = offline_hub
    with pytest.raises(FileNotFoundError) as err:
        weights.load_vgg19()
    msg = str(err.value)
    assert "vgg19-dcbb9e9d.pth" in msg and str(ckpt_dir) in msg and "random_weights=True" in msg
    assert calls == [weights.VGG19_URL]                         # it did try the (failing) download
    with pytest.raises(FileNotFoundError, match="vgg19"):
        weights.load_vgg19(str(tmp_path / "nope" / "vgg19.pth"))
    # a wrong state dict is refused
    bad = _fake_torchvision_sd()
    del bad["features.34.bias"]
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError, match="torchvision"):
        weights.load_vgg19(str(tmp_path / "bad.pth"))
    # explicit random weights: no file needed, no download tried
    calls.clear()
    weights.load_vgg19(random_weights=True)
    assert calls == []


@pytest.fixture(scope="module")
def perc():
    torch.manual_seed(0)
    return L.PerceptualLoss(L.VGG19())


def test_perceptual_single_layer_by_hand(perc):
    pred, target = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conv = perc.vgg.features[0]
    relu1_1 = lambda x: F.relu(conv((x - mean) / std))
    expected = (relu1_1(pred) - relu1_1(target)).abs().mean()
    got = (perc.vgg(pred)[0] - perc.vgg(target)[0]).abs().mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # the release's L_P: the full-resolution image only (scales [1]), the plain sum over the 5 layers
    assert perc.scales == (1,)
    by_hand = sum((a - b).abs().mean() for a, b in zip(perc.vgg(pred), perc.vgg(target)))
    assert perc(pred, target).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # FOMM's pyramid (the earlier default) is an explicit option and adds the smaller scales on top
    pyramid = L.PerceptualLoss(L.VGG19(), scales=(1, 0.5, 0.25, 0.125))
    pyramid.vgg.load_state_dict(perc.vgg.state_dict())
    assert pyramid(pred, target).item() > perc(pred, target).item()


def test_perceptual_zero_positive_weights_and_gradients(perc):
    target = torch.rand(2, 3, 64, 64)
    assert perc(target, target).item() == 0.0
    pred = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    target = target.clone().requires_grad_(True)
    loss = perc(pred, target)
    assert loss.item() > 0
    loss.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None                            # the target side gets no gradient
    assert all(p.grad is None for p in perc.vgg.parameters())


def test_perceptual_pyramid_small_sizes(perc):
    # at 64^2 the 1/8 level is 8x8: relu5_1 would need a 2x2 pool of a 1x1 map -> skipped, no crash
    feats = perc.vgg(torch.rand(1, 3, 8, 8))
    assert [tuple(f.shape[1:]) for f in feats] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert len(perc.vgg(torch.rand(1, 3, 16, 16))) == 5
    x = torch.rand(1, 3, 64, 64)
    assert [tuple(L.antialias_downsample(x, s).shape[-2:]) for s in (1, 0.5, 0.25, 0.125)] == [(64, 64), (32, 32), (16, 16), (8, 8)]
    # the anti-aliasing blur keeps a constant image constant away from the (zero-padded) border
    down = L.antialias_downsample(torch.full((1, 3, 64, 64), 0.5), 0.25)
    assert torch.allclose(down[..., 4:-4, 4:-4], torch.tensor(0.5), atol=1e-5)
    # and averages away the highest frequency: a checkerboard becomes grey (plain subsampling gives all 0)
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float().expand(1, 3, 64, 64)
    down = L.antialias_downsample(checker, 0.25)          # sigma 1.5
    assert torch.allclose(down[..., 4:-4, 4:-4], torch.tensor(0.5), atol=0.01)
    down = L.antialias_downsample(checker, 0.5)           # sigma 0.5 (FOMM): a partial blur only
    assert (down[..., 4:-4, 4:-4] > 0.3).all()


# ---------------------------------------------------------------- discriminator, LSGAN, feature matching

def test_kp2gaussian_peak_and_width():
    S = 16
    i, j = 5, 9                                          # column (x) 5, row (y) 9
    kp = torch.tensor([[[(i + 0.5 - S / 2) / (S / 2), (j + 0.5 - S / 2) / (S / 2)]]])
    heat = L.kp2gaussian(kp, (S, S), 0.01)
    assert heat.shape == (1, 1, S, S)
    assert heat[0, 0, j, i].item() == pytest.approx(1.0)
    assert heat[0, 0].argmax().item() == j * S + i
    # one pixel away: exp(-0.5 * (2/S)^2 / 0.01)
    assert heat[0, 0, j, i + 1].item() == pytest.approx(math.exp(-0.5 * (2 / S) ** 2 / 0.01), rel=1e-5)


@pytest.mark.parametrize("size, feat_shapes, score_hw", [
    (64, [(128, 30, 30), (256, 13, 13), (512, 5, 5), (512, 2, 2)], (2, 2)),
    (256, [(128, 126, 126), (256, 61, 61), (512, 29, 29), (512, 26, 26)], (26, 26)),
])
def test_discriminator_shapes(size, feat_shapes, score_hw):
    D = L.Discriminator()
    assert D.down_blocks[0].conv.in_channels == 13 and D.down_blocks[0].norm is None
    assert all(b.norm is not None for b in D.down_blocks[1:])
    scores, feats = D(torch.rand(2, 3, size, size), torch.rand(2, 10, 2) * 2 - 1)
    assert scores.shape == (2, 1) + score_hw
    assert [tuple(f.shape) for f in feats] == [(2,) + s for s in feat_shapes]


def test_discriminator_sizes_and_keypoints():
    n_params = lambda m: sum(p.numel() for p in m.parameters())
    D = L.Discriminator()                                              # the release's 128-256-512-512
    assert [b.conv.out_channels for b in D.down_blocks] == [128, 256, 512, 512]
    assert round(n_params(D) / 1e6, 2) == 6.85                        # release's count
    D = L.Discriminator(L.DiscConfig.tiny())
    img = torch.rand(2, 3, 64, 64, requires_grad=True)
    kp = (torch.rand(2, 10, 2) * 2 - 1).requires_grad_(True)
    scores, feats = D(img, kp)
    (scores.sum() + sum(f.sum() for f in feats)).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert kp.grad is None                                # keypoints are detached
    with torch.no_grad():                                 # the heatmaps are really an input
        assert not torch.allclose(D(img, kp)[0], D(img, -kp)[0])
    with pytest.raises(ValueError, match="at least"):
        D(torch.rand(1, 3, 60, 60), torch.zeros(1, 10, 2))


def test_lsgan_losses_hand_values():
    real, fake = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.5])
    # d: mean((1-real)^2) = (0 + 0.25)/2, mean(fake^2) = (0 + 0.25)/2 -> 0.25 ; g: mean((1-fake)^2) = (1 + 0.25)/2
    assert L.d_loss(real, fake).item() == pytest.approx(0.25)
    assert L.g_loss(fake).item() == pytest.approx(0.625)
    assert L.d_loss(torch.ones(3), torch.zeros(3)).item() == 0.0
    assert L.g_loss(torch.ones(3)).item() == 0.0
    assert L.d_loss(torch.ones(3), torch.full((3,), 0.1)).item() > 0


def test_feature_matching_hand_and_gradients():
    real = [torch.zeros(1, 2, 2, 2), torch.ones(1, 1, 3, 3)]
    fake = [torch.full((1, 2, 2, 2), 0.5, requires_grad=True), torch.ones(1, 1, 3, 3, requires_grad=True)]
    fm = L.feature_matching(real, fake)
    assert fm.item() == pytest.approx(0.5 + 0.0)
    assert L.feature_matching(real, [r.clone() for r in real]).item() == 0.0
    real_g = [r.clone().requires_grad_(True) for r in real]
    L.feature_matching(real_g, fake).backward()
    assert fake[0].grad is not None and fake[0].grad.abs().sum() > 0
    assert all(r.grad is None for r in real_g)            # real features are detached


def test_psnr_is_per_image_with_a_peak():
    target = torch.zeros(2, 3, 4, 4)
    pred = target.clone()
    pred[0] += 0.1                                       # MSE 0.01 -> 20 dB; image 1 identical -> inf
    p = L.psnr(pred, target)
    assert p.shape == (2,) and p[0].item() == pytest.approx(20.0) and p[1].item() == math.inf
    assert L.psnr(pred[0] * 2, target[0], peak=2.0).item() == pytest.approx(20.0)   # scale-free with the peak
    assert L.psnr(pred[0].permute(1, 2, 0), target[0].permute(1, 2, 0)).item() == pytest.approx(20.0)   # HWC


# ---------------------------------------------------------------- L_lm (not in the paper: issue 23, lambda_lm = 0)

def _canonical_face():
    """68 points in general position (no three rigid points on a line), pixels."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(68, 2, generator=g, dtype=torch.float64) * 40 + 10


def test_lm_target_is_invariant_to_an_affine_motion_of_the_whole_face():
    canon = _canonical_face()
    stats = {"canon_rigid": canon[list(L.LM_RIGID)].float(), "canon_expr": canon[list(L.LM_EXPRESSIVE)].float(),
             "mu": torch.zeros(84), "sd": torch.tensor(2.0)}
    face = canon.clone()
    face[57, 1] += 4.0                          # the lower lip's centre 4 px down, the rest as the canonical face
    # by hand: (s - mu) / sd is zero except that point's y: 4 / 2 = 2
    expected = torch.zeros(42, 2)
    expected[L.LM_EXPRESSIVE.index(57), 1] = 2.0
    torch.testing.assert_close(L.lm_target(face, stats), expected.flatten(), atol=1e-4, rtol=0)
    # the same face rotated by 30 degrees, scaled 1.5x, sheared and shifted: the same target
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    A = torch.tensor([[c, -s], [s, c]], dtype=torch.float64) @ torch.tensor([[1.5, 0.2], [0.0, 1.5]],
                                                                          dtype=torch.float64)
    moved = face @ A.T + torch.tensor([7.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(L.lm_target(moved, stats), expected.flatten(), atol=1e-4, rtol=0)
    assert L.lm_target(torch.stack([face, moved])[None], stats).shape == (1, 2, 84)   # [..., 68, 2] -> [..., 84]


def test_lm_stats_by_hand():
    # 3 samples of two frames each: the canonical face and the same with the lower lip 4 px down, each sample
    # under its own affine motion (the first: none). Procrustes aligns every frame's rigid points exactly, so
    # the canonical rigid points are the face's, the expressive ones the mean (lip 2 px down), mu = 0 and the
    # within-video spread sigma = sqrt(mean over the 84 numbers of (4 or 0)^2 / 2) = sqrt(16 / 84 / 2)
    canon = _canonical_face()
    open_ = canon.clone()
    open_[57, 1] += 4.0
    motions = [(torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)),
               (torch.tensor([[0.9, -0.3], [0.3, 0.9]], dtype=torch.float64), torch.tensor([5.0, 1.0])),
               (torch.tensor([[1.2, 0.0], [0.1, 0.8]], dtype=torch.float64), torch.tensor([-2.0, 3.0]))]
    lms = torch.stack([torch.stack([canon @ A.T + t, open_ @ A.T + t]) for A, t in motions])    # (3, 2, 68, 2)
    st = L.lm_stats(lms)
    torch.testing.assert_close(st["canon_rigid"], canon[list(L.LM_RIGID)].float(), atol=1e-4, rtol=0)
    half = (canon + open_)[list(L.LM_EXPRESSIVE)] / 2
    torch.testing.assert_close(st["canon_expr"], half.float(), atol=1e-4, rtol=0)
    torch.testing.assert_close(st["mu"], torch.zeros(84), atol=1e-4, rtol=0)
    assert st["sd"].item() == pytest.approx(math.sqrt(16 / 84 / 2), rel=1e-4)


def test_l_lm_by_hand_on_within_video_changes():
    pred_drv = torch.tensor([[1.0, 2.0]])                    # B = 1, m = 2
    pred_src = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])      # N = 2 sources
    t_drv, t_src = torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2, 2)
    # changes: predicted (1, 2) and (0, 1), true (0, 1) twice -> errors (1, 1), (0, 0) -> mean of squares 2 / 4
    assert L.l_lm(pred_drv, pred_src, t_drv, t_src).item() == pytest.approx(0.5)
    # only changes count: a common offset of the head's output is free; one source may be [B, m]
    assert L.l_lm(pred_drv + 3, pred_src + 3, t_drv, t_src).item() == pytest.approx(0.5)
    assert L.l_lm(pred_drv, pred_src[:, 0], t_drv, t_src[:, 0]).item() == pytest.approx(1.0)   # (1^2 + 1^2) / 2
    assert L.LossWeights().lm == 0.0           # off unless asked for: the default is the paper's objective
