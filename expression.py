"""Expression network X of the paper (Sec. 3.1, "Expression Network", Eq. (8)-(10)).

It recycles the keypoint detector's last feature map F_{I,K} and its heatmaps H_I: a learned 7x7 convolution
X_C gives n_f features per keypoint, each keypoint's features are pooled under its heatmap (Eq. 8),
concatenated (Eq. 9) and mapped by a 4-layer MLP X_M to the latent expression vector e_I (Eq. 10).
One departure from a literal implementation, exact (same function, same parameters, fewer FLOPs): X_C is
linear, so Eq. (8) pools the k x k input patches under each heatmap first and applies X_C's weights once per
keypoint afterwards (`pooled_patches`), instead of convolving n_K n_f channels at every position of which
Eq. (8) keeps a weighted sum (about 12x faster at the tiny preset's sizes: RESULTS.md); `forward_naive` is the
literal version (the release's), kept as the reference for the tests.
Sizes (the release's; README, "The authors' release"): 35-channel 64x64 features -> 10 x 32 channels at
58x58 -> 320 -> 640 -> 1280 -> 640 -> 256; 2.56 M parameters.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_layers(init, relu_layers, last, what="init"):
    """init "kaiming": He init (not in the paper) of a stack of layers each followed by a ReLU (std
    sqrt(2 / fan_in)) and its final linear layer (std sqrt(1 / fan_in)), biases 0, so the input's share of the
    output keeps its scale through the stack; "torch": torch's default init (the release's) is left as it is.
    Used by the expression net (X_C, X_M) and srt.PatchCNN."""
    if init not in ("kaiming", "torch"):
        raise ValueError(f"{what} must be 'kaiming' or 'torch', got {init!r}")
    if init == "torch":
        return
    for m, gain in [(m, "relu") for m in relu_layers] + [(last, "linear")]:
        nn.init.kaiming_normal_(m.weight, nonlinearity=gain)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


@dataclass
class ExpressionConfig:
    in_channels: int = 35              # KPDetector.feature_channels
    num_kp: int = 10
    n_f: int = 32                      # features per keypoint (Eq. 8 writes 64; the release uses 32)
    expr_dim: int = 256                # |e|; ablations 128, 64
    kernel: int = 7                    # X_C, no padding: same size as the detector's heatmaps
    hidden: tuple = (640, 1280, 640)   # X_M hidden widths
    init: str = "torch"                # "torch" (the release's default init) or "kaiming" (He; see FSRTConfig)

    @classmethod
    def tiny(cls) -> "ExpressionConfig":
        """Matches KPConfig.tiny(): 19-channel features (64x64 at 64x64 images), heatmaps 6 pixels smaller."""
        return cls(in_channels=19, n_f=16, expr_dim=32, hidden=(128, 256, 128))


class ExpressionNet(nn.Module):
    def __init__(self, cfg: ExpressionConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or ExpressionConfig()
        # X_C: one conv producing n_f channels for each of the K keypoints
        self.conv = nn.Conv2d(cfg.in_channels, cfg.num_kp * cfg.n_f, kernel_size=cfg.kernel, padding=0)
        # X_M: 4 linear layers, ReLU between, none at the end (Eq. 10)
        widths = (cfg.num_kp * cfg.n_f, *cfg.hidden, cfg.expr_dim)
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
        self.mlp = nn.Sequential(*layers)
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        init_layers(cfg.init, [self.conv, *linears[:-1]], linears[-1], "the expression net's init")

    def _check(self, features, heatmaps):
        k, K = self.cfg.kernel, self.cfg.num_kp
        conv_out = tuple(n - k + 1 for n in features.shape[2:])
        if conv_out != tuple(heatmaps.shape[2:]) or heatmaps.shape[1] != K:
            raise ValueError(f"expression net: conv output {conv_out} and heatmaps {tuple(heatmaps.shape[1:])} do "
                             f"not match (expected {K} heatmaps of the conv's size)")

    def forward(self, features, heatmaps):
        """features [B,C,h+k-1,w+k-1] (detector feature map), heatmaps [B,K,h,w] -> e [B, expr_dim]."""
        return self.mlp(self.keypoint_features(features, heatmaps))           # Eq. (10): e = X_M(f)

    def keypoint_features(self, features, heatmaps):
        """Eq. (8)-(9): the concatenated per-keypoint features f [B, K*n_f] that X_M maps to e."""
        self._check(features, heatmaps)
        B, K, n_f, k = features.shape[0], self.cfg.num_kp, self.cfg.n_f, self.cfg.kernel
        P = pooled_patches(features, heatmaps)                                 # (B, K, C, k, k)
        W = self.conv.weight.view(K, n_f, -1, k, k).to(P.dtype)                # X_C's filters of keypoint k
        f_kp = torch.einsum("bkcij,kfcij->bkf", P, W)                          # Eq. (8): sum_p H(p) (W * F)(p)
        f_kp = f_kp + self.conv.bias.view(K, n_f) * heatmaps.sum((2, 3))[..., None]   # + b sum_p H(p)
        return f_kp.reshape(B, K * n_f)                                        # Eq. (9): concatenate over keypoints

    @torch.no_grad()
    def active_units(self, features, heatmaps):
        """Per hidden layer of X_M, the fraction of its ReLU units that are positive for at least one image of
        the batch. A unit at 0 for every input passes no gradient again: when the first layer's units are all
        dead, e is one constant vector (a training diagnostic, not in the paper). -> list of floats."""
        x, active = self.keypoint_features(features, heatmaps), []
        for layer in self.mlp:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                active.append(float((x > 0).any(0).float().mean()))
        return active

    def forward_naive(self, features, heatmaps):
        """Reference for forward (as the release): X_C at every position, then Eq. (8)-(10)."""
        self._check(features, heatmaps)
        B, K, n_f = features.shape[0], self.cfg.num_kp, self.cfg.n_f
        f = self.conv(features).view(B, K, n_f, *heatmaps.shape[2:])           # (B, K, n_f, h, w)
        f_kp = torch.einsum("bkhw,bkfhw->bkf", heatmaps, f)                    # Eq. (8)
        return self.mlp(f_kp.reshape(B, K * n_f))                              # Eq. (9), (10)


def pooled_patches(features, heatmaps):
    """P[b, k, c, i, j] = sum_{y,x} H[b,k,y,x] F[b,c,y+i,x+j]: the k x k input patches of F summed with each
    heatmap as weights (a weighted mean, as heatmaps sum to 1), for every image b.
    features [B,C,h+k-1,w+k-1], heatmaps [B,K,h,w] -> [B,K,C,k,k].
    One grouped convolution: the channels of F are its batch, the images its groups, the heatmaps its filters."""
    B, C = features.shape[:2]
    K, h, w = heatmaps.shape[1:]
    P = F.conv2d(features.transpose(0, 1), heatmaps.reshape(B * K, 1, h, w).to(features.dtype), groups=B)
    return P.view(C, B, K, *P.shape[2:]).permute(1, 2, 0, 3, 4)                # (C, B*K, k, k) -> (B, K, C, k, k)
