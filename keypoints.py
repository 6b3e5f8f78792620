"""Keypoints: the pixel-centre convention of all coordinates (and the convex hull of a point set), FOMM's
hourglass keypoint detector (paper Sec. 3.1, "Keypoint Detector"), and the 68-point landmarks phase 0 trains
its keypoints on. Its weights files (FOMM's vox-cpk.pth.tar, the release's kp_detector.pt) are read by
weights.load_kp_detector; the external landmark detector is data.LandmarkDetector.

The detector is Siarohin et al.'s (FOMM) network unchanged, with the same parameter names, so FOMM's
`vox-cpk.pth.tar` loads strictly once its `jacobian.*` head (unused by FSRT) is dropped (the FSRT
release's kp_detector.pt holds the same keys). Sizes are FOMM's vox256 configuration (KPConfig; README,
"The authors' release: sizes and training values").
"""
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class KPConfig:
    """FOMM's detector; defaults are the paper's (FOMM vox256) configuration."""
    num_kp: int = 10
    num_channels: int = 3
    block_expansion: int = 32
    num_blocks: int = 5
    max_features: int = 1024
    scale_factor: float = 0.25   # 256 -> 64 before the hourglass
    temperature: float = 0.1     # heatmap softmax temperature

    @classmethod
    def tiny(cls) -> "KPConfig":
        """For 64x64 images on CPU: the detector sees the whole 64x64 image (as the paper's sees 256x256 quartered
        to 64x64; at half that, blinks and brows are not readable: RESULTS.md), 19-channel 64x64 features, 58x58
        heatmaps. `train.py --kp-scale 0.5` halves its input."""
        return cls(block_expansion=16, num_blocks=4, max_features=256, scale_factor=1.0)


# ----------------------------------------------------------------------------------------------------------
# coordinates: the project's one pixel-centre convention (keypoints, landmarks, query pixels of Eq. 5)

def to_normalized(p, size):
    """Pixel coordinates (pixel centre i at x = i) -> normalised (x + 0.5 - S/2) / (S/2), in (-1, 1) inside the
    image. size: S, or an array/tensor (W, H) per axis. numpy or torch. (The release's convention; FOMM's heatmap
    grid below, make_coordinate_grid, spans [-1, 1] inclusive instead.)"""
    return (p + 0.5 - size / 2) / (size / 2)


def to_pixels(p, size):
    """Inverse of to_normalized: normalised -> pixel coordinates at size S (or (W, H))."""
    return p * (size / 2) + size / 2 - 0.5


def pixel_grid(H, W, device=None, dtype=torch.float32):
    """Normalised pixel centres (i + 0.5 - S/2) / (S/2) (to_normalized), as (x, y), row-major
    (y outer): [H*W, 2]."""
    xs = to_normalized(torch.arange(W, device=device, dtype=dtype), W)
    ys = to_normalized(torch.arange(H, device=device, dtype=dtype), H)
    y, x = torch.meshgrid(ys, xs, indexing="ij")                            # [H, W] each
    return torch.stack((x, y), dim=-1).reshape(H * W, 2)


def convex_hull(points):
    """Vertices of the convex hull of 2-d points [N, 2] in counter-clockwise order (Andrew's monotone chain);
    fewer than 3 for degenerate sets (all collinear or coincident). numpy or torch in, numpy out."""
    if torch.is_tensor(points):
        points = points.detach().float().cpu().numpy()
    p = np.unique(np.asarray(points, dtype=np.float64).reshape(-1, 2), axis=0)  # sorted by x, then y
    if len(p) < 3:
        return p

    def half(pts):
        chain = []
        for q in pts:   # pop while the last two points and q do not turn counter-clockwise
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (q[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (q[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(q)
        return chain[:-1]  # the last point starts the other half
    return np.array(half(p) + half(p[::-1]))

# ----------------------------------------------------------------------------------------------------------
# building blocks (FOMM modules/util.py; names kept so state dicts match)

class AntiAliasInterpolation2d(nn.Module):
    """Gaussian blur (sigma = (1/scale - 1)/2, kernel 2 round(4 sigma) + 1, zero padding) then every
    (1/scale)-th pixel. Buffer `weight` [C,1,k,k]."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        sigma = (1 / scale - 1) / 2
        size = 2 * round(sigma * 4) + 1                           # 13 for scale 0.25
        self.ka = size // 2
        self.kb = self.ka - 1 if size % 2 == 0 else self.ka
        t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        g = torch.exp(-t ** 2 / (2 * sigma ** 2))
        kernel = g[:, None] * g[None, :]                            # separable 2-D Gaussian
        kernel = kernel / kernel.sum()
        self.register_buffer("weight", kernel.expand(channels, 1, size, size).clone())
        self.groups = channels
        self.step = int(round(1 / scale))

    def forward(self, x):
        """x [B,C,H,W] -> [B,C,H*scale,W*scale]"""
        out = F.pad(x, (self.ka, self.kb, self.ka, self.kb))
        out = F.conv2d(out, weight=self.weight, groups=self.groups)
        return out[:, :, ::self.step, ::self.step]


def antialias_downsample(x, scale):
    """FOMM's anti-aliased downsampling (AntiAliasInterpolation2d) as a function: x [B,C,H,W] ->
    [B,C,H*scale,W*scale]; scale 1 returns x. The one Gaussian downsampling (detector input, image pyramids)."""
    return x if scale == 1 else AntiAliasInterpolation2d(x.shape[1], scale).to(x.device, x.dtype)(x)


class DownBlock2d(nn.Module):
    """3x3 conv -> BatchNorm -> ReLU -> 2x2 average pool."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(cout, affine=True)

    def forward(self, x):
        return F.avg_pool2d(F.relu(self.norm(self.conv(x))), 2)


def upsample2x(x):
    """Nearest-neighbour x2 upsampling [B,C,H,W] -> [B,C,2H,2W]: F.interpolate(x, scale_factor=2), exactly,
    as a broadcast view and one copy (several times faster than F.interpolate on the CPU: RESULTS.md)."""
    B, C, H, W = x.shape
    return x[:, :, :, None, :, None].expand(B, C, H, 2, W, 2).reshape(B, C, 2 * H, 2 * W)


class UpBlock2d(nn.Module):
    """nearest x2 upsample -> 3x3 conv -> BatchNorm -> ReLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, padding=1)
        self.norm = nn.BatchNorm2d(cout, affine=True)

    def forward(self, x):
        return F.relu(self.norm(self.conv(upsample2x(x))))


class HourglassDown(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        ch = lambda i: min(max_features, block_expansion * 2 ** i)
        self.down_blocks = nn.ModuleList(
            DownBlock2d(in_features if i == 0 else ch(i), ch(i + 1)) for i in range(num_blocks))

    def forward(self, x):
        outs = [x]                                                  # the input is the last skip
        for block in self.down_blocks:
            outs.append(block(outs[-1]))
        return outs


class HourglassUp(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        ch = lambda i: min(max_features, block_expansion * 2 ** i)
        self.up_blocks = nn.ModuleList(
            UpBlock2d((1 if i == num_blocks - 1 else 2) * ch(i + 1), ch(i)) for i in reversed(range(num_blocks)))
        self.out_filters = block_expansion + in_features

    def forward(self, outs):
        outs = list(outs)
        out = outs.pop()
        for block in self.up_blocks:
            out = torch.cat([block(out), outs.pop()], dim=1)       # concatenate the same-resolution skip
        return out


class Hourglass(nn.Module):
    def __init__(self, block_expansion, in_features, num_blocks, max_features):
        super().__init__()
        self.encoder = HourglassDown(block_expansion, in_features, num_blocks, max_features)
        self.decoder = HourglassUp(block_expansion, in_features, num_blocks, max_features)
        self.out_filters = self.decoder.out_filters

    def forward(self, x):
        return self.decoder(self.encoder(x))


def make_coordinate_grid(h: int, w: int, device=None, dtype=torch.float32):
    """FOMM's grid: [h,w,2] of (x, y), each spanning [-1, 1] INCLUSIVE (first/last cell centre at -1/+1)."""
    x = torch.linspace(-1, 1, w, device=device, dtype=dtype)
    y = torch.linspace(-1, 1, h, device=device, dtype=dtype)
    return torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)


def heatmap_to_keypoints(heatmaps):
    """Expected coordinates under each heatmap. heatmaps [B,K,h,w] (each sums to 1) -> keypoints [B,K,2] (x, y)."""
    grid = make_coordinate_grid(*heatmaps.shape[2:], device=heatmaps.device, dtype=heatmaps.dtype)
    return torch.einsum("bkhw,hwc->bkc", heatmaps, grid)


class KPDetector(nn.Module):
    """FOMM's keypoint detector without the Jacobian head: downsample, hourglass, 7x7 conv -> heatmaps."""

    def __init__(self, cfg: KPConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or KPConfig()
        self.predictor = Hourglass(cfg.block_expansion, cfg.num_channels, cfg.num_blocks, cfg.max_features)
        self.feature_channels = self.predictor.out_filters         # 32 + 3 = 35 for the paper config
        self.kp = nn.Conv2d(self.feature_channels, cfg.num_kp, kernel_size=7, padding=0)
        if cfg.scale_factor != 1:
            self.down = AntiAliasInterpolation2d(cfg.num_channels, cfg.scale_factor)

    def forward(self, image):
        """image [B,3,H,W] in [0,1] -> dict(keypoints [B,K,2] in [-1,1] (x,y), heatmaps [B,K,h,w] (softmax,
        each sums to 1), features [B,C,h+6,w+6]). Paper config at 256²: features [B,35,64,64], heatmaps 58x58."""
        x = self.down(image) if self.cfg.scale_factor != 1 else image   # (B, 3, 64, 64)
        features = self.predictor(x)                                     # (B, 35, 64, 64)
        logits = self.kp(features)                                       # (B, K, 58, 58)
        B, K, h, w = logits.shape
        heatmaps = F.softmax(logits.view(B, K, h * w) / self.cfg.temperature, dim=2).view(B, K, h, w)
        return {"keypoints": heatmap_to_keypoints(heatmaps), "heatmaps": heatmaps, "features": features}


# ----------------------------------------------------------------------------------------------------------
# the 68-point landmarks of phase 0 (iBUG layout, pixels, (x, y))

# Phase 0 regresses the 10 detector keypoints onto these 68-point landmarks: the two ends of the jaw line at the
# temples (0, 16), nose bridge top and tip (27, 30), nostril wings (31, 35), outer and inner eye corners (36, 39,
# 42, 45). None of them moves with expression (the chin does, with the mouth), so together they capture head
# pose (position, scale, yaw/pitch/roll) and leave the expression to the expression network.
KP_LANDMARKS = (0, 16, 27, 30, 31, 35, 36, 39, 42, 45)
