import pytest
import torch
import torch.nn as nn

from expression import ExpressionConfig, ExpressionNet
from keypoints import KPConfig, KPDetector


def test_eq8_eq9_against_explicit_loop():
    cfg = ExpressionConfig(in_channels=2, num_kp=2, n_f=3, expr_dim=4, kernel=3, hidden=(5, 6, 7))
    net = ExpressionNet(cfg)
    net.mlp = nn.Identity()                          # expose f_{I,X} of Eq. (9)
    B, C, S = 2, 2, 5
    feat = torch.randn(B, C, S, S)
    hm = torch.rand(B, 2, 3, 3)
    hm = hm / hm.sum((2, 3), keepdim=True)
    got = net(feat, hm)
    W, bias = net.conv.weight, net.conv.bias
    expected = torch.zeros(B, 2 * 3)
    for b in range(B):
        for i in range(2):                           # keypoint
            for c in range(3):                       # feature channel of keypoint i
                ch = i * 3 + c
                total = 0.0
                for y in range(3):
                    for x in range(3):
                        conv = bias[ch] + sum(W[ch, ci, dy, dx] * feat[b, ci, y + dy, x + dx]
                                              for ci in range(C) for dy in range(3) for dx in range(3))
                        total = total + hm[b, i, y, x] * conv            # Eq. (8)
                expected[b, i * 3 + c] = total                           # Eq. (9): keypoint-major concat
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_mlp_is_four_layers_relu_between():
    net = ExpressionNet()
    lin = [m for m in net.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(320, 640), (640, 1280), (1280, 640), (640, 256)]
    assert sum(isinstance(m, nn.ReLU) for m in net.mlp) == 3 and isinstance(net.mlp[-1], nn.Linear)
    assert net.conv.kernel_size == (7, 7) and net.conv.padding == (0, 0) and net.conv.out_channels == 320


def test_paper_parameter_count():
    n = sum(p.numel() for p in ExpressionNet().parameters())
    assert abs(n / 2.56e6 - 1) < 0.01


@pytest.mark.parametrize("kp_cfg,ex_cfg,size", [(KPConfig(), ExpressionConfig(), 256),
                                                (KPConfig.tiny(), ExpressionConfig.tiny(), 64)])
def test_shapes_on_detector_output(kp_cfg, ex_cfg, size):
    det = KPDetector(kp_cfg).eval()
    assert ex_cfg.in_channels == det.feature_channels
    with torch.no_grad():
        out = det(torch.rand(2, 3, size, size))
    e = ExpressionNet(ex_cfg)(out["features"], out["heatmaps"])
    assert e.shape == (2, ex_cfg.expr_dim)


def test_expression_sizes_of_ablations():
    for d in (128, 64):
        e = ExpressionNet(ExpressionConfig(expr_dim=d))(torch.rand(1, 35, 64, 64), torch.rand(1, 10, 58, 58))
        assert e.shape == (1, d)


def test_gradient_reaches_all_parameters():
    net = ExpressionNet(ExpressionConfig.tiny())
    feat = torch.randn(2, 19, 32, 32)
    hm = torch.softmax(torch.randn(2, 10, 26 * 26), -1).view(2, 10, 26, 26)
    net(feat, hm).pow(2).sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_mismatched_heatmaps_raise():
    net = ExpressionNet(ExpressionConfig.tiny())
    with pytest.raises(ValueError, match="heatmaps"):
        net(torch.randn(1, 19, 32, 32), torch.rand(1, 10, 32, 32))


def test_pooled_patches_equal_the_literal_conv_then_eq8_with_gradients():
    """forward (heatmap-pooled patches, X_C applied once per keypoint) is forward_naive (the release's conv at
    every position, then Eq. 8): same e and same gradients for the weights, features and heatmaps."""
    torch.manual_seed(0)
    net = ExpressionNet(ExpressionConfig(in_channels=5, num_kp=3, n_f=4, expr_dim=6, hidden=(8, 8, 8))).double()
    feat = torch.randn(2, 5, 13, 11, dtype=torch.float64, requires_grad=True)
    hm = torch.rand(2, 3, 7, 5, dtype=torch.float64, requires_grad=True)     # not normalised: the bias term counts
    grads = []
    for fn in (net.forward, net.forward_naive):
        net.zero_grad()
        feat.grad = hm.grad = None
        e = fn(feat, hm)
        (e * torch.arange(12, dtype=torch.float64).view(2, 6)).sum().backward()
        grads.append([e.detach(), feat.grad, hm.grad] + [p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_active_units_counts_units_positive_for_some_image():
    """ExpressionNet.active_units by hand: X_M's first layer set so that unit 0 is positive for image 0 only,
    unit 1 for no image, unit 2 for both; the later layers' fractions come from the same pass as forward."""
    cfg = ExpressionConfig(in_channels=2, num_kp=1, n_f=1, expr_dim=2, kernel=3, hidden=(3, 4, 5))
    net = ExpressionNet(cfg)
    feat = torch.stack([torch.ones(2, 5, 5), -torch.ones(2, 5, 5)])        # image 0: +1, image 1: -1
    hm = torch.full((2, 1, 3, 3), 1 / 9)
    with torch.no_grad():
        net.conv.weight.fill_(1 / 18), net.conv.bias.zero_()                 # f = +1 / -1 per image
        net.mlp[0].weight.copy_(torch.tensor([[1.0], [1.0], [0.0]])), net.mlp[0].bias.copy_(torch.tensor([0, -2, 1]))
    f = net.keypoint_features(feat, hm)
    assert torch.allclose(f.flatten(), torch.tensor([1.0, -1.0]))
    active = net.active_units(feat, hm)
    assert len(active) == 3 and active[0] == pytest.approx(2 / 3)
    h = torch.relu(net.mlp[0](f))
    h2 = torch.relu(net.mlp[2](h))
    assert active[1] == pytest.approx(float((h2 > 0).any(0).float().mean()))
    assert torch.equal(net(feat, hm), net.mlp(f))
