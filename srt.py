"""
FSRT's scene representation transformer (Sec. 3, Fig. 2): input and query representation (Eq. 3-7),
patch CNN + transformer encoder (Eq. 1), cross-attention decoder (Eq. 2), the FSRT module that owns the
keypoint detector and the expression network, its config presets, the project's one checkpoint format, and
the authors' released files (vox256.pt + kp_detector.pt: load_release / save_release).

Sizes (paper preset) are the authors' release (config vox256, andrerochow/fsrt; README, "The authors'
release"). Two departures from a literal implementation, both exact (same function, same parameters, fewer
FLOPs):
  * the query MLP's first layer is split: W [gamma_pix(q), gamma_key(k_D), e_D] = W_pix gamma_pix(q)
    (per pixel, shared by all frames) + W_frame [gamma_key(k_D), e_D] (once per frame); see Decoder.
  * the patch CNN's first conv is split the same way over its 483 input channels; see PatchCNN.
`FSRT.decode_naive` and `FSRT.encode_naive` are the literal versions, kept as references for the tests.
"""
import errno
import glob
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import losses
from expression import ExpressionConfig, ExpressionNet, init_layers
from keypoints import KPConfig, KPDetector, load_kp_state, pixel_grid

# -----------------------------------------------------------------------------
# Eq. (3)-(5): positional encodings


def positional_encoding(p, start_octave, octaves):
    """Eq. (3) f(p, s_O, O) = concat_{m=s_O}^{s_O+O-1} [sin(2^m pi p), cos(2^m pi p)], per coordinate.

    p: [..., D] -> [..., D * 2 * octaves]. Feature order (last dim): coordinate-major, then octave
    (ascending m), then (sin, cos):  [sin(2^s pi x), cos(2^s pi x), sin(2^(s+1) pi x), ..., cos(.. y)].
    This is Eq. (3) taken literally; the authors' release orders [all sines, all cosines] instead.
    """
    m = torch.arange(start_octave, start_octave + octaves, device=p.device, dtype=torch.float32)
    scaled = p.float().unsqueeze(-1) * (math.pi * 2.0 ** m)                 # [..., D, O]
    code = torch.stack((torch.sin(scaled), torch.cos(scaled)), dim=-1)      # [..., D, O, 2]
    return code.flatten(-3).to(p.dtype if p.is_floating_point() else torch.float32)


# -----------------------------------------------------------------------------
# config


@dataclass
class FSRTConfig:
    """Paper values as defaults (the release's vox256). `expr_dim` and `num_kp` are the single knobs:
    the nested ExpressionConfig / KPConfig get them (and the detector's feature channels) in __post_init__."""
    image_size: int = 256
    num_kp: int = 10                     # n_K
    expr_dim: int = 256                  # |e|; ablations 128, 64
    use_keypoints: bool = True           # False = n_K = 0 ablation: gamma_key dropped from Eq. (6), (7)
    kp_octaves: int = 4; kp_start_octave: int = -1      # Eq. (4): O_key, s_O_key
    pix_octaves: int = 16; pix_start_octave: int = -1   # Eq. (5): O_pix, s_O_pix
    cnn_channels: tuple = ((96, 192), (192, 384), (384, 768))   # per block: (stride-1 conv, stride-2 conv)
    width: int = 768                     # token width d of the encoder (the 1x1 conv's output)
    enc_blocks: int = 5; enc_heads: int = 12; enc_head_dim: int = 64; enc_mlp: int = 1536
    dec_blocks: int = 2; dec_heads: int = 12; dec_head_dim: int = 64; dec_mlp: int = 1536
    query_mlp_ratio: float = 1.5         # query MLP 480 -> 720 -> 480
    render_hidden: tuple = (1536, 1536, 1536, 1536)
    small_decoder: bool = False          # halves heads and decoder MLP; render MLP (r0, r0 / 2)
    cnn_init: str = "kaiming"            # patch-CNN init: "kaiming" (He, ReLU gain) or "torch" (the release's default)
    expr_init: str = "kaiming"           # expression net init (X_C, X_M), the same two choices
    chunk: int = 8192                    # pixels decoded at once (per frame)
    kp: KPConfig = field(default_factory=KPConfig)
    expression: ExpressionConfig = field(default_factory=ExpressionConfig)

    def __post_init__(self):
        self.cnn_channels = tuple(tuple(c) for c in self.cnn_channels)
        self.render_hidden = tuple(self.render_hidden)
        self.kp = replace(self.kp, num_kp=self.num_kp)
        self.expression = replace(self.expression, expr_dim=self.expr_dim, num_kp=self.num_kp,
                                  in_channels=self.kp.block_expansion + self.kp.num_channels, init=self.expr_init)

    # derived sizes: Eq. (5) 2 coords x O_pix x (sin, cos) = 64; Eq. (4) n_K x 2 x O_key x 2 = 160 (0 if n_K = 0)
    pix_dim = property(lambda self: 2 * 2 * self.pix_octaves)
    key_dim = property(lambda self: self.num_kp * 2 * 2 * self.kp_octaves if self.use_keypoints else 0)
    in_dim = property(lambda self: 3 + self.pix_dim + self.key_dim + self.expr_dim)   # Eq. (6): 483
    query_dim = property(lambda self: self.pix_dim + self.key_dim + self.expr_dim)    # Eq. (7): 480

    def decoder_sizes(self):
        """(heads, mlp, render_hidden) of the decoder, after the small-decoder switch."""
        if self.small_decoder:
            r0 = self.render_hidden[0]
            return self.dec_heads // 2, self.dec_mlp // 2, (r0, r0 // 2)
        return self.dec_heads, self.dec_mlp, self.render_hidden

    @classmethod
    def paper(cls, **overrides):
        return cls(**overrides)

    @classmethod
    def tiny(cls, **overrides):
        """Same architecture (and Eq. 3-7 sizes: query 64 + 160 + 32) for small images on a CPU (64x64, as
        train.py's tiny preset): 1.1 M parameters
        in encoder + decoder, 2.2 M with detector and expression net; a training step (batch 16, 1 source,
        1024 pixels) is ~70 GFLOP forward + backward, 2/3 of it in the decoder."""
        d = dict(image_size=64, expr_dim=32, cnn_channels=((16, 32), (32, 64), (64, 128)), width=128,
                 enc_blocks=2, enc_heads=4, enc_head_dim=32, enc_mlp=256, dec_heads=4, dec_head_dim=32,
                 dec_mlp=128, render_hidden=(128, 128, 128, 128), kp=KPConfig.tiny(),
                 expression=ExpressionConfig.tiny())
        d.update(overrides)
        return cls(**d)

    def to_dict(self):
        return asdict(self)

    # fields that do not shape the weights: how they are initialised and how many pixels are decoded at once
    NOT_WEIGHTS = ("cnn_init", "expr_init", "chunk")

    @classmethod
    def from_dict(cls, d):
        """Inverse of to_dict; unknown keys (e.g. from a newer version) are dropped with a warning."""
        def build(klass, dd):
            known, nested = {f.name for f in fields(klass)}, {"kp": KPConfig, "expression": ExpressionConfig}
            if set(dd) - known:
                warnings.warn(f"{klass.__name__}.from_dict: ignoring unknown keys {sorted(set(dd) - known)}")
            return klass(**{k: build(nested[k], v) if k in nested and klass is cls else
                            tuple(v) if isinstance(v, list) else v for k, v in dd.items() if k in known})
        return build(cls, d)


def weights_config(d):
    """A config dict (FSRTConfig.to_dict(), or a checkpoint's) without the fields in FSRTConfig.NOT_WEIGHTS (and
    the expression net's init): two configs equal under it give weights of the same names and shapes."""
    d = {k: v for k, v in d.items() if k not in FSRTConfig.NOT_WEIGHTS}
    if isinstance(d.get("expression"), dict):
        d["expression"] = {k: v for k, v in d["expression"].items() if k != "init"}
    return d

# -----------------------------------------------------------------------------
# transformer block (pre-LN, SRT style: q/k/v without bias, output projection with bias, GELU MLP)


class Block(nn.Module):
    """x + Attention(LN(x)), then x + MLP(LN(x)). Self-attention (encoder) when kv_dim is None, otherwise
    cross-attention to the set-latents (decoder; no self-attention there): only the query is normalised and
    keys/values come from the raw kv_dim-wide set-latents, as in the release."""

    def __init__(self, dim, heads, head_dim, mlp, kv_dim=None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.ln_1 = nn.LayerNorm(dim)
        self.c_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.c_kv = nn.Linear(kv_dim or dim, 2 * heads * head_dim, bias=False)
        self.c_proj = nn.Linear(heads * head_dim, dim)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def split_heads(self, t):                                               # (B, T, nh*hs) -> (B, nh, T, hs)
        return t.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def kv(self, z):
        """z: (B, T, kv_dim) -> keys, values, each (B, nh, T, hs)."""
        return tuple(map(self.split_heads, self.c_kv(z).chunk(2, dim=-1)))

    def forward(self, x, kv=None):
        """x: (B, P, dim); kv: this block's (keys, values) for cross-attention, None for self-attention."""
        h = self.ln_1(x)
        k, v = kv if kv is not None else self.kv(h)
        y = F.scaled_dot_product_attention(self.split_heads(self.c_q(h)), k, v)   # (B, nh, P, hs)
        x = x + self.c_proj(y.transpose(1, 2).flatten(2))
        return x + self.mlp(self.ln_2(x))

# -----------------------------------------------------------------------------
# encoder: patch CNN + transformer, Eq. (1)


class PatchCNN(nn.Module):
    """3 blocks of (3x3 conv s1 -> ReLU -> 3x3 conv s2 -> ReLU), no bias, then a 1x1 conv: [B,C,H,W] -> [B,d,H/8,W/8].

    The first conv is linear in its input R_S = [rgb, gamma_pix, const] (Eq. 6; const = [gamma_key, e] is
    the same at every pixel), so with zero padding
        conv(R_S) = conv_rgb(rgb) + conv_pix(gamma_pix map) + sum_{taps a,b} U[:, a, b] * inside_{a,b}(i, j)
    where U[:, a, b] = W_const[:, :, a, b] @ const and inside_{a,b}(i, j) = 1 when tap (a, b) of output pixel
    (i, j) falls inside the image (a separable 0/1 mask: a ones-image convolved with that single tap).
    conv_pix is the same for every image: computed once per call without a batch dimension.

    Initialisation (not in the paper): torch's default conv init (the release's) has 1/6 of the variance that
    keeps a ReLU signal's scale, so after the six convs the tokens differ by ~0.1 % of the 1x1 conv's bias: the
    set-latents start almost identical for every token and image and the decoder's attention has nothing to
    find. He init (std sqrt(2 / fan_in), the 1x1 conv std sqrt(1 / fan_in), bias 0) keeps the scale.
    """

    def __init__(self, in_dim, n_pix, channels, width, init="kaiming"):
        super().__init__()
        self.n_pix = n_pix
        convs, c_in = [], in_dim
        for c_mid, c_out in channels:
            convs += [nn.Conv2d(c_in, c_mid, 3, 1, 1, bias=False), nn.Conv2d(c_mid, c_out, 3, 2, 1, bias=False)]
            c_in = c_out
        self.convs = nn.ModuleList(convs)
        self.proj = nn.Conv2d(c_in, width, 1)
        init_layers(init, self.convs, self.proj, "cnn_init")                # He init (see above) or torch's

    def first_conv(self, rgb, pix_code, const):
        """Decomposed first conv. rgb [B,3,H,W], pix_code [n_pix,H,W] (no batch), const [B,Cc] -> [B,C1,H,W]."""
        w = self.convs[0].weight                                            # [C1, 3 + n_pix + Cc, 3, 3]
        H, W = rgb.shape[-2:]
        out = F.conv2d(rgb, w[:, :3], padding=1)                            # per image
        out = out + F.conv2d(pix_code[None], w[:, 3:3 + self.n_pix], padding=1)  # once, broadcast over B
        if const.shape[1] > 0:
            U = torch.einsum("ocab,nc->noab", w[:, 3 + self.n_pix:], const)  # [B, C1, 3, 3]
            ones = lambda n: F.pad(torch.ones(n, device=rgb.device, dtype=out.dtype), (1, 1))
            rows = ones(H).unfold(0, H, 1)                                  # [3, H]: tap a inside for row i
            cols = ones(W).unfold(0, W, 1)                                  # [3, W]
            out = out + torch.einsum("noab,ai,bj->noij", U.to(out.dtype), rows, cols)
        return out

    def forward(self, x):
        """x: the first conv's output [B,C1,H,W] (before ReLU) -> tokens [B,d,H/8,W/8]."""
        for conv in self.convs[1:]:
            x = conv(F.relu(x))
        return self.proj(F.relu(x))


class Encoder(nn.Module):
    """Eq. (1): set-latents {z} = E(CNN({R_S})); tokens of several sources are concatenated (no source ID)."""

    def __init__(self, cfg):
        super().__init__()
        self.cnn = PatchCNN(cfg.in_dim, cfg.pix_dim, cfg.cnn_channels, cfg.width, cfg.cnn_init)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.enc_heads, cfg.enc_head_dim, cfg.enc_mlp)
                                    for _ in range(cfg.enc_blocks))

    def forward(self, feats, B):
        """feats: [B*N, d, h, w] CNN output -> set_latents [B, N*h*w, d]."""
        x = feats.flatten(2).transpose(1, 2).reshape(B, -1, feats.shape[1])   # (B, N*T, d)
        for block in self.blocks:
            x = block(x)
        return x

# -----------------------------------------------------------------------------
# decoder, Eq. (2)


class Decoder(nn.Module):
    """Query MLP (480 -> 720 -> ReLU -> 480), cross-attention blocks, render MLP (480 -> 1536 x4 -> 3)."""

    def __init__(self, cfg):
        super().__init__()
        dq, (heads, mlp, render) = cfg.query_dim, cfg.decoder_sizes()
        self.pix_dim = cfg.pix_dim
        self.query_mlp = nn.Sequential(nn.Linear(dq, int(dq * cfg.query_mlp_ratio)), nn.ReLU(),
                                       nn.Linear(int(dq * cfg.query_mlp_ratio), dq))
        self.blocks = nn.ModuleList(Block(dq, heads, cfg.dec_head_dim, mlp, kv_dim=cfg.width)
                                    for _ in range(cfg.dec_blocks))
        layers, d = [], dq
        for h in render:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.render_mlp = nn.Sequential(*layers, nn.Linear(d, 3))

    def pixel_part(self, pix_code):      # [..., 64] -> W_pix gamma_pix(q): [..., 720] (no bias)
        return F.linear(pix_code, self.query_mlp[0].weight[:, :self.pix_dim])

    def frame_part(self, frame_code):    # [B, 224] = [gamma_key(k_D), e_D] -> W_frame [...] + b: [B, 1, 720]
        first = self.query_mlp[0]
        return F.linear(frame_code, first.weight[:, self.pix_dim:], first.bias)[:, None]

    def forward(self, h, kv):
        """h: first-layer pre-activation [B,P,720]; kv: per block (k, v) of [B or 1, nh, T, hs] -> rgb [B,P,3].
        With one set of latents and B frames, the frames are folded into the pixel axis (same result)."""
        B, P, _ = h.shape
        if kv[0][0].shape[0] == 1 and B > 1:
            h = h.reshape(1, B * P, -1)
        x = self.query_mlp[2](F.relu(h))                                    # (B, P, 480)
        for block, kv_i in zip(self.blocks, kv):
            x = block(x, kv_i)
        return self.render_mlp(x).reshape(B, P, 3)

# -----------------------------------------------------------------------------
# the whole model


class FSRT(nn.Module):
    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or FSRTConfig()
        self.kp_detector = KPDetector(cfg.kp)
        self.expression = ExpressionNet(cfg.expression)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.detector_frozen = False

    # --- keypoints and expression (Sec. 3.1) ---
    def freeze_detector(self):
        """Phase I on: the detector is not trained further (eval mode, no gradients, kept across train())."""
        self.detector_frozen = True
        self.kp_detector.eval().requires_grad_(False)
        return self

    def train(self, mode=True):
        super().train(mode)
        if self.detector_frozen:
            self.kp_detector.eval()
        return self

    def detect(self, images):
        """images [B,3,H,W] in [0,1] -> dict(keypoints [B,K,2], heatmaps [B,K,h,w], features [B,C,h+6,w+6])."""
        if self.detector_frozen:
            with torch.no_grad():
                return self.kp_detector(images)
        return self.kp_detector(images)

    def expression_of(self, det):
        """Eq. (8)-(10) on a detector output -> e [B,E]."""
        return self.expression(det["features"], det["heatmaps"])

    def keypoints_and_expression(self, images):
        det = self.detect(images)
        return det["keypoints"], self.expression_of(det)

    def gamma_key(self, kp):
        """Eq. (4): kp [..., K, 2] -> [..., K*2*2*O_key] (keypoint-major, then x/y, octave, sin/cos)."""
        return positional_encoding(kp, self.cfg.kp_start_octave, self.cfg.kp_octaves).flatten(-2)

    def gamma_pix(self, p):
        """Eq. (5): p [..., 2] -> [..., 2*2*O_pix] (x then y, octave, sin/cos)."""
        return positional_encoding(p, self.cfg.pix_start_octave, self.cfg.pix_octaves)

    def frame_code(self, kp, e):
        """[gamma_key(k), e]: the per-image constant part of Eq. (6) / per-frame part of Eq. (7) -> [B, 160+E]."""
        if not self.cfg.use_keypoints:
            return e
        return torch.cat((self.gamma_key(kp).to(e.dtype), e), dim=-1)

    # --- encoder ---
    @staticmethod
    def _sources(images, kp, e):
        if images.dim() == 4:                                               # one source: [B,3,H,W]
            images = images[:, None]
            kp = kp[:, None] if kp is not None else None
            e = e[:, None]
        B, N = images.shape[:2]
        kp = kp.flatten(0, 1) if kp is not None else None
        return images.flatten(0, 1), kp, e.flatten(0, 1), B               # [B*N,3,H,W], [B*N,K,2], [B*N,E]

    def encode(self, images, kp_source, expr_source):
        """images [B,N,3,H,W], kp_source [B,N,K,2], expr_source [B,N,E] -> set_latents [B, N*H*W/64, d]."""
        images, kp, e, B = self._sources(images, kp_source, expr_source)
        H, W = images.shape[-2:]
        pix = self.gamma_pix(pixel_grid(H, W, images.device)).to(images.dtype)        # [H*W, 64]
        pix = pix.t().reshape(-1, H, W)                                               # [64, H, W]
        x = self.encoder.cnn.first_conv(images, pix, self.frame_code(kp, e))          # Eq. (6), decomposed
        return self.encoder(self.encoder.cnn(x), B)

    def encode_naive(self, images, kp_source, expr_source):
        """Reference for encode: builds R_S(p) of Eq. (6) at every pixel (483 channels) and runs the plain conv."""
        images, kp, e, B = self._sources(images, kp_source, expr_source)
        BN, _, H, W = images.shape
        pix = self.gamma_pix(pixel_grid(H, W, images.device)).t().reshape(1, -1, H, W).expand(BN, -1, -1, -1)
        const = self.frame_code(kp, e)[:, :, None, None].expand(-1, -1, H, W)
        R = torch.cat((images, pix, const), dim=1)                                    # [B*N, 483, H, W]
        return self.encoder(self.encoder.cnn(self.encoder.cnn.convs[0](R)), B)

    # --- decoder ---
    def latent_kv(self, set_latents):
        """Keys/values of every decoder block, computed once per source set: list of (k, v) [B,nh,T,hs]."""
        return [block.kv(set_latents) for block in self.decoder.blocks]

    def decode(self, set_latents, pixels, kp_driving, expr_driving, chunk=None, kv=None):
        """Eq. (2), (7). set_latents [B or 1, T, d] (unused if kv is given), pixels [P,2] or [B,P,2] normalised
        (x, y), kp_driving [B,K,2], expr_driving [B,E] -> rgb [B,P,3] (not clamped)."""
        kv = kv if kv is not None else self.latent_kv(set_latents)
        chunk = chunk or self.cfg.chunk
        frame = self.decoder.frame_part(self.frame_code(kp_driving, expr_driving))   # [B, 1, 720], once per frame
        pix = self.decoder.pixel_part(self.gamma_pix(pixels).to(frame.dtype))        # [(B,) P, 720], once
        P = pixels.shape[-2]
        out = [self.decoder(pix[..., s:s + chunk, :] + frame, kv) for s in range(0, P, chunk)]
        return torch.cat(out, dim=1)

    def decode_naive(self, set_latents, pixels, kp_driving, expr_driving, chunk=None, kv=None):
        """Reference for decode (as the authors' release): the full 480-d query Q(q) of Eq. (7) at every
        pixel, plain modules, keys/values recomputed, no chunks. chunk and kv are ignored."""
        B = kp_driving.shape[0]
        P = pixels.shape[-2]
        pix = self.gamma_pix(pixels.expand(B, P, 2))                                  # [B, P, 64]
        frame = self.frame_code(kp_driving, expr_driving)[:, None].expand(B, P, -1)  # [B, P, 416]
        x = self.decoder.query_mlp(torch.cat((pix, frame), dim=-1))                   # Eq. (7) -> [B, P, 480]
        z = set_latents.expand(B, -1, -1)
        for block in self.decoder.blocks:
            x = block(x, block.kv(z))
        return self.decoder.render_mlp(x)

    def render(self, set_latents, kp_driving, expr_driving, size=None, chunk=None, kv=None):
        """Decode every pixel of an (H, W) image (default cfg.image_size) -> [B,3,H,W] (not clamped)."""
        size = size or self.cfg.image_size
        H, W = (size, size) if isinstance(size, int) else size
        grid = pixel_grid(H, W, kp_driving.device)
        rgb = self.decode(set_latents, grid, kp_driving, expr_driving, chunk=chunk, kv=kv)  # [B, H*W, 3]
        return rgb.transpose(1, 2).reshape(-1, 3, H, W)

    def forward(self, sources, driving, pixels=None, chunk=None):
        """Plain self-reenactment: sources [B,N,3,H,W], driving [B,3,H,W], pixels [P,2] / [B,P,2] (default all)
        -> rgb [B,P,3]. Training code with augmentations calls the pieces above instead."""
        B, N = sources.shape[:2]
        kp_all, e_all = self.keypoints_and_expression(torch.cat((sources.flatten(0, 1), driving)))
        kp_s, e_s = kp_all[:B * N].unflatten(0, (B, N)), e_all[:B * N].unflatten(0, (B, N))
        z = self.encode(sources, kp_s, e_s)
        if pixels is None:
            pixels = pixel_grid(*driving.shape[-2:], driving.device)
        return self.decode(z, pixels, kp_all[B * N:], e_all[B * N:], chunk=chunk)

# -----------------------------------------------------------------------------
# health: is the encoder alive and does the decoder read it? (not in the paper; a training diagnostic)


@torch.no_grad()
def health(model, images):
    """Diagnostics on single-source self-reconstruction (driving = source) of images [B,3,H,W], B >= 2:
      active      fraction of channels of each patch-CNN conv (ReLU input) that are positive somewhere in the
                  batch: a channel at 0 never passes gradient again (the "dead encoder" failure);
      spread      std of the set-latents across the tokens of an image / their rms (0: every token the same);
      latent_cos  mean cosine between the set-latents of two different images (1: the encoder ignores its input);
      attn_entropy, attn_uniform  mean entropy (nats) of the first decoder block's attention, and log T (uniform);
      attn_own    mean attention weight on the token whose 8x8 patch holds the pixel (1/T when uniform);
      self_psnr   PSNR (dB) of the reconstruction with driving = source;
      expr_spread std of the expression vectors e across the images / their rms (~0: e is one constant vector
                  for every face, so the decoder can take no expression from it; NaN for |e| = 0);
      expr_active fraction of each hidden layer's ReLU units of the expression MLP X_M that are positive for
                  some image (ExpressionNet.active_units; [] for |e| = 0): the same dying-ReLU failure in X.
    Returns a dict of floats (active as a list, one per conv)."""
    was_training = model.training
    model.eval()
    B, _, H, W = images.shape
    det = model.detect(images)
    kp, e = det["keypoints"], model.expression_of(det)
    expr_active = model.expression.active_units(det["features"], det["heatmaps"]) if e.shape[1] else []
    grid = pixel_grid(H, W, images.device)                                        # (HW, 2)
    code = model.gamma_pix(grid).to(images.dtype)                                 # (HW, 64), Eq. (5)
    frame_code = model.frame_code(kp, e)                                          # (B, 160 + E)
    cnn = model.encoder.cnn
    x = cnn.first_conv(images, code.t().reshape(-1, H, W), frame_code)            # (B, C1, H, W) pre-ReLU
    active = [float((x > 0).flatten(2).any(-1).any(0).float().mean())]
    for conv in cnn.convs[1:]:
        x = conv(F.relu(x))
        active.append(float((x > 0).flatten(2).any(-1).any(0).float().mean()))
    z = model.encoder(cnn.proj(F.relu(x)), B)                                     # (B, T, d)
    T = z.shape[1]
    spread = float((z.std(dim=1).pow(2).mean() / z.pow(2).mean().clamp_min(1e-12)).sqrt())
    flat = F.normalize(z.flatten(1), dim=1)
    cos = flat @ flat.t()                                                         # (B, B)
    latent_cos = float((cos.sum() - cos.diagonal().sum()) / (B * (B - 1))) if B > 1 else float("nan")
    # first decoder block's attention weights, recomputed (SDPA does not return them)
    frame = model.decoder.frame_part(frame_code)                                  # (B, 1, 720)
    q_in = model.decoder.query_mlp[2](F.relu(model.decoder.pixel_part(code) + frame))   # (B, HW, dq), Eq. (7)
    block = model.decoder.blocks[0]
    k, _ = block.kv(z)                                                            # (B, nh, T, hs)
    q = block.split_heads(block.c_q(block.ln_1(q_in)))                            # (B, nh, HW, hs)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(block.head_dim), dim=-1)   # (B, nh, HW, T)
    entropy = float(-(att * att.clamp_min(1e-12).log()).sum(-1).mean())
    h, w = H // 8, W // 8                                                         # token grid of the patch CNN
    rows = torch.arange(H, device=images.device) * h // H
    cols = torch.arange(W, device=images.device) * w // W
    own = (rows[:, None] * w + cols[None, :]).flatten()                           # (HW,) token of each pixel
    attn_own = float(att.gather(-1, own.view(1, 1, -1, 1).expand(B, att.shape[1], -1, 1)).mean())
    rgb = model.render(z, kp, e, size=(H, W)).clamp(0, 1)
    self_psnr = float(losses.psnr(rgb, images).mean())
    expr_spread = float((e.std(0).pow(2).mean() / e.pow(2).mean().clamp_min(1e-12)).sqrt()) if e.shape[1] \
        and e.shape[0] > 1 else float("nan")   # one face (or |e| = 0) has no spread
    model.train(was_training)
    return dict(active=active, spread=spread, latent_cos=latent_cos, attn_entropy=entropy,
                attn_uniform=math.log(T), attn_own=attn_own, self_psnr=self_psnr, expr_spread=expr_spread,
                expr_active=expr_active)


def collapsed(h):
    """The dead-encoder verdict on a `health` dict: a patch-CNN conv without any active channel, or set-latents
    that no longer vary across tokens or images (the decoder then renders from the driving conditioning alone)."""
    return min(h["active"]) == 0 or h["spread"] < 1e-3 or h["latent_cos"] > 0.999


EXPR_SPREAD_MIN = 0.01   # health's expr_spread below this: e counts as one vector (issue 11's 60-minute run: 0.32
                         # at init, 0.0096 at step 9,000; its 17,580-step demo, X_M's first layer 96 % dead: 0.002)


def expression_collapsed(h):
    """The same verdict for the expression network on a `health` dict: e (nearly) one constant vector for every
    face, or a hidden layer of X_M without any active unit; False for |e| = 0."""
    return bool(h["expr_active"]) and (min(h["expr_active"]) == 0 or h["expr_spread"] < EXPR_SPREAD_MIN)


# -----------------------------------------------------------------------------
# checkpoints: {"format": "fsrt", "config": cfg.to_dict(), "model": state_dict, "step", "phase", ...}


def _atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then os.replace it over `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pt", dir=folder)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(obj, f)
        except (RuntimeError, OSError) as err:   # torch says "enforce fail ... file write failed" on a full disk
            free = shutil.disk_usage(folder).free
            if free < 2 ** 20 + sum(t.numel() * t.element_size() for t in _tensors(obj)):
                raise OSError(errno.ENOSPC, f"No space left on device ({free / 2 ** 20:.0f} MB free, "
                              f"{type(err).__name__}: {str(err)[:100]})", path) from None
            raise
        os.replace(tmp, path)                                               # atomic on POSIX and Windows
    finally:
        if os.path.exists(tmp):                                             # only after a failure
            os.remove(tmp)


def save_checkpoint(path, ckpt):
    """Atomic save of a project checkpoint (adds format='fsrt')."""
    _atomic_save({"format": "fsrt", **ckpt}, path)


def load_reason(err):
    """Why torch.load failed, in one line ("TypeName: reason"). Never repeats torch's hint to retry with
    weights_only=False: that would run whatever code the file holds."""
    msg = str(err)
    if "Weights only load failed" in msg:
        found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", msg, re.I)
        return (f"{type(err).__name__}: it holds Python objects besides tensors "
                f"({found.group(1) if found else 'custom classes'}); they were not unpickled, as that could run code")
    return f"{type(err).__name__}: {(msg.splitlines() or [''])[0].split('. ')[0][:160]}"


class RunLock:
    """FOLDER/.lock, locked with flock and holding the owner's pid. The OS drops the lock when its process
    dies (even by kill -9), so a lock file left behind by a dead run is taken over, with a notice; while the
    owner runs, another process refuses with one line naming it. No-op where fcntl is missing (Windows)."""

    def __init__(self, folder, log=print):
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise ValueError(f"--out {folder} is a file; give a folder for the run (checkpoints, log, samples)")
        os.makedirs(folder, exist_ok=True)
        self.path, self.fd = os.path.join(folder, ".lock"), None
        try:
            import fcntl
        except ImportError:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RuntimeError(f"the run folder {folder} is in use by {owner}: two runs in one folder would "
                               f"overwrite each other's checkpoints; wait for it, stop it, or pass another --out")
        old = os.pread(fd, 1000, 0).decode(errors="replace").strip()
        if old:
            log(f"notice: took over the lock of {folder} from {old}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n".encode(), 0)
        self.fd = fd

    def release(self):
        """Empty the lock file and unlock (the file stays: removing it could race with a process opening it)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def remove_stale_temp(folder, log=print):
    """Remove the `.tmp_*.pt` files of checkpoint writes that were killed (srt.save_checkpoint writes beside
    the checkpoint, then renames). Call it only while holding the folder's RunLock: then no writer is alive."""
    stale = glob.glob(os.path.join(glob.escape(folder), ".tmp_*.pt"))
    size = 0
    for p in stale:
        try:
            size += os.path.getsize(p)
            os.remove(p)
        except OSError:
            pass
    if stale:
        log(f"notice: removed {len(stale)} temporary checkpoint file(s) ({size / 2 ** 20:.1f} MB) left in {folder} "
            f"by interrupted writes")
    return len(stale)


def _numpy_scalars():
    """Globals a weights_only load may build besides tensors: numpy scalars, as in the release's training
    counters (saved by numpy 1 as numpy.core..., by numpy 2 as numpy._core...)."""
    import numpy as np
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    return [np.dtype, *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)},
            (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]


def _read(path, hint, mmap=True, map_location="cpu"):
    """torch.load(weights_only=True); mmap: zip files memory-mapped, copy-on-write (the release's files
    carry optimizer state we never copy); errors are one line naming the file, ending with `hint`."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}; {hint}")
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:
        raise RuntimeError(f"cannot read {path} as a torch checkpoint ({load_reason(err)}); the file "
                           f"may be truncated (download it again) or not a checkpoint: {hint}") from None


RELEASE = ("encoder", "decoder", "expression_encoder")   # the modules of the release's vox256.pt


def _kind(obj):
    """What a loaded file is, by content: 'fsrt', 'release', 'fomm', 'detector' (a bare detector state
    dict, e.g. the release's kp_detector.pt) or None."""
    if not isinstance(obj, dict):
        return None
    if obj.get("format") == "fsrt":
        return "fsrt"
    if {"kp_detector", "generator"} <= obj.keys():
        return "fomm"
    if all(isinstance(obj.get(k), dict) for k in RELEASE):
        return "release"
    if "kp.weight" in obj and any(str(k).startswith("predictor.") for k in obj):
        return "detector"
    return None


def _tensors(obj):
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in (obj.values() if isinstance(obj, dict) else obj):
            yield from _tensors(v)


def _describe(obj):
    kind = _kind(obj)
    if kind == "fsrt":
        return "a checkpoint of this project (train.py), which holds its own keypoint detector"
    if kind == "fomm":
        return "FOMM's checkpoint (vox-cpk.pth.tar); it holds only a keypoint detector for FSRT: pass it " \
               "where a keypoint-detector file is asked for (keypoints.load_kp_detector)"
    if kind == "release":
        return "the authors' release checkpoint (vox256.pt format): load it with its kp_detector.pt " \
               "(reenact.py/metrics.py --checkpoint vox256.pt --kp-detector kp_detector.pt, srt.load_release)"
    if kind == "detector":
        return "a keypoint-detector state dict (as the release's kp_detector.pt): pass it as --kp-detector " \
               "beside the model file (vox256.pt) as --checkpoint"
    if not isinstance(obj, dict):
        return f"a {type(obj).__name__}, not a dict"
    keys = list(obj)
    if keys and all(torch.is_tensor(v) for v in obj.values()):
        return f"a bare state dict of {len(keys)} tensors (first keys {keys[:3]})"
    return f"a dict with keys {keys[:8]}"


def load_checkpoint(path, map_location="cpu"):
    """torch.load(weights_only=True) of an fsrt checkpoint written by save_checkpoint (train.py)."""
    ckpt = _read(path, "pass a .pt file written by train.py", mmap=False, map_location=map_location)
    return _check(ckpt, os.fspath(path))


def _check(ckpt, where):
    if not isinstance(ckpt, dict) or ckpt.get("format") != "fsrt" or not {"config", "model"} <= set(ckpt):
        raise ValueError(f"{where} is not an fsrt checkpoint: it is {_describe(ckpt)}. Pass a checkpoint "
                         "written by train.py (a dict with format='fsrt', config, model) or the authors' vox256.pt")
    return ckpt


def model_from_checkpoint(path_or_dict, device="cpu", kp_detector=None):
    """Build FSRT from a checkpoint recognised by content -> model in eval mode: a train.py checkpoint (path
    or loaded dict), or the authors' vox256.pt / vox256_2Source.pt with kp_detector = their kp_detector.pt."""
    where = "the given dict" if isinstance(path_or_dict, dict) else os.fspath(path_or_dict)
    ckpt = path_or_dict if isinstance(path_or_dict, dict) else _read(path_or_dict, "pass a .pt file written by "
                                                                     "train.py or the authors' vox256.pt")
    if _kind(ckpt) == "release":
        return load_release(ckpt, kp_detector, name=where).to(device)
    if kp_detector is not None:
        raise ValueError(f"a keypoint-detector file ({kp_detector}) goes only with the authors' release "
                         f"checkpoints (vox256.pt), but {where} is {_describe(ckpt)}: leave the detector out")
    ckpt = _check(ckpt, where)
    if ckpt.get("phase") == 0:   # train.py's phase 0 trains the detector alone: nothing to render with
        raise ValueError(f"{where} is a phase-0 checkpoint: only its keypoint detector is trained, the encoder and "
                         f"decoder are untrained; pass the phase1.pt (or later) of that run, after `python "
                         f"train.py --phase 1 --out {os.path.dirname(where) or '.'}`")
    model = FSRT(FSRTConfig.from_dict(ckpt["config"]))
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:   # a short message instead of torch's list of every key
        raise ValueError(f"{where} does not match this srt.py ({len(missing)} missing keys, e.g. {missing[:2]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}): it was written by another "
                         "version of the code; retrain or use the matching version")
    if ckpt.get("phase", 1) >= 1:
        model.freeze_detector()
    return model.to(device).eval()

# -----------------------------------------------------------------------------
# the authors' release (andrerochow/fsrt): vox256.pt / vox256_2Source.pt = {"encoder", "decoder",
# "expression_encoder": state dicts, + training state}; kp_detector.pt = the detector's bare state dict.
# Same functions, other names and two layout differences: the encoder's q, k, v are one matrix, and the
# layers that read Eq. (6)/(7) see their features in another order (release_columns).


def release_columns(cfg):
    """Index tensor perm: feature j of this code's query [gamma_pix, gamma_key, e] (Eq. 7; Eq. 3 per
    coordinate c, octave m, (sin, cos) s: c*2O + 2m + s) is feature perm[j] of the release's
    [gamma_key, gamma_pix, e], where each encoding lists all sines, then all cosines: s*D*O + c*O + m."""
    def pe(D, O, at):
        return [at + s * D * O + c * O + m for c in range(D) for m in range(O) for s in range(2)]
    key, pix = cfg.key_dim, cfg.pix_dim
    return torch.tensor(pe(2, cfg.pix_octaves, key) + pe(2 * cfg.num_kp, cfg.kp_octaves, 0)
                        + list(range(key + pix, key + pix + cfg.expr_dim)))


def _release_names(model):
    """{this code's state-dict key: (release module, release key, rows)}; rows slices the encoder's [q; k; v]."""
    cfg, names = model.cfg, {}
    for k in model.kp_detector.state_dict():
        names[f"kp_detector.{k}"] = ("kp_detector", k, None)
    for k in model.expression.state_dict():                  # conv.* / mlp.* -> expression.* / expression_mlp.*
        names[f"expression.{k}"] = ("expression_encoder", ("expression_" if k.startswith("mlp") else "")
                                    + k.replace("conv.", "expression."), None)
    for i in range(len(model.encoder.cnn.convs)):
        names[f"encoder.cnn.convs.{i}.weight"] = ("encoder", f"conv_blocks.{i // 2}.layers.{2 * (i % 2)}.weight", None)
    d = cfg.enc_heads * cfg.enc_head_dim
    for p in ("weight", "bias"):
        names[f"encoder.cnn.proj.{p}"] = ("encoder", f"per_patch_linear.{p}", None)
        for i in (0, 2):
            names[f"decoder.query_mlp.{i}.{p}"] = ("decoder", f"allocation_transformer.input_mlp.{i}.{p}", None)
        for i in range(0, len(model.decoder.render_mlp), 2):
            names[f"decoder.render_mlp.{i}.{p}"] = ("decoder", f"render_mlp.{i}.{p}", None)
    for mod, theirs, n in (("encoder", "transformer.layers", cfg.enc_blocks),
                           ("decoder", "allocation_transformer.transformer.layers", cfg.dec_blocks)):
        for i in range(n):
            a, b = f"{mod}.blocks.{i}", f"{theirs}.{i}"
            for p in ("weight", "bias"):
                names.update({f"{a}.ln_1.{p}": (mod, f"{b}.0.norm.{p}", None),
                              f"{a}.c_proj.{p}": (mod, f"{b}.0.fn.to_out.0.{p}", None),
                              f"{a}.ln_2.{p}": (mod, f"{b}.1.norm.{p}", None),
                              f"{a}.mlp.0.{p}": (mod, f"{b}.1.fn.net.0.{p}", None),
                              f"{a}.mlp.2.{p}": (mod, f"{b}.1.fn.net.3.{p}", None)})
            if mod == "encoder":
                names[f"{a}.c_q.weight"] = (mod, f"{b}.0.fn.to_qkv.weight", slice(0, d))
                names[f"{a}.c_kv.weight"] = (mod, f"{b}.0.fn.to_qkv.weight", slice(d, 3 * d))
            else:
                names[f"{a}.c_q.weight"] = (mod, f"{b}.0.fn.to_q.weight", None)
                names[f"{a}.c_kv.weight"] = (mod, f"{b}.0.fn.to_kv.weight", None)
    return names


def _columns(model, key):
    """The input-column permutation (release -> this code) of a layer that reads Eq. (6)/(7), else None."""
    perm = release_columns(model.cfg)
    if key == "decoder.query_mlp.0.weight":
        return perm
    if key == "encoder.cnn.convs.0.weight":                  # [rgb, Eq. (6) features]
        return torch.cat((torch.arange(3), 3 + perm))
    return None


def load_release(checkpoint, kp_detector, name=None):
    """The authors' vox256.pt / vox256_2Source.pt (path or loaded dict) + kp_detector.pt (path or dict) ->
    FSRT of the paper preset in eval mode with a frozen detector; the small decoder is recognised by its keys.
    Loading stays weights_only; wrong files raise one-line errors saying what they are."""
    name = name or (os.fspath(checkpoint) if not isinstance(checkpoint, dict) else "the release checkpoint")
    ck = checkpoint if isinstance(checkpoint, dict) else _read(checkpoint, "pass the authors' vox256.pt")
    if _kind(ck) != "release":
        raise ValueError(f"{name} is not the authors' release checkpoint (vox256.pt: a dict of encoder, decoder "
                         f"and expression_encoder state dicts): it is {_describe(ck)}")
    if kp_detector is None:
        raise ValueError(f"{name} is the authors' release checkpoint, which holds no keypoint detector: also "
                         "pass their kp_detector.pt (reenact.py / metrics.py: --kp-detector kp_detector.pt)")
    det_name = os.fspath(kp_detector) if not isinstance(kp_detector, dict) else "the detector dict"
    det = kp_detector if isinstance(kp_detector, dict) else _read(kp_detector, "pass the authors' kp_detector.pt")
    if _kind(det) in ("fsrt", "release"):
        raise ValueError(f"{det_name} is not a keypoint-detector file: it is {_describe(det)}; pass the "
                         "authors' kp_detector.pt as the detector")
    model = FSRT(FSRTConfig.paper(small_decoder="render_mlp.6.weight" not in ck["decoder"]))
    load_kp_state(det, model.kp_detector, det_name,
                            expected="the authors' kp_detector.pt or FOMM's vox-cpk.pth.tar")
    own, sd, used = model.state_dict(), {}, set()
    for ours, (mod, key, rows) in _release_names(model).items():
        if mod == "kp_detector":
            sd[ours] = own[ours]
            continue
        if key not in ck[mod]:
            raise ValueError(f"{name} lacks {mod}.{key}: it is not a vox256 release checkpoint of the paper's sizes")
        t, cols = ck[mod][key], _columns(model, ours)
        t = t[rows] if rows is not None else t
        sd[ours] = t[:, cols] if cols is not None else t
        used.add((mod, key))
        if sd[ours].shape != own[ours].shape:
            raise ValueError(f"{name}: {mod}.{key} has shape {tuple(ck[mod][key].shape)}, the paper preset "
                             f"needs {tuple(own[ours].shape)}: not a vox256 release checkpoint")
    extra = [f"{m}.{k}" for m in RELEASE for k in ck[m] if (m, k) not in used]
    if extra:
        raise ValueError(f"{name} has {len(extra)} tensors the paper preset does not use (e.g. {extra[:2]}): "
                         "not a vox256 release checkpoint")
    model.load_state_dict(sd, strict=True)
    return model.freeze_detector().eval()


def save_release(model, checkpoint, kp_detector):
    """Write a paper-preset model in the release's format: checkpoint = {"encoder", "decoder",
    "expression_encoder": state dicts} (the authors' demo.py loads it), kp_detector = the detector's state
    dict. Exact inverse of load_release (keys in the release's order)."""
    cfg = model.cfg
    paper = FSRTConfig.paper(small_decoder=cfg.small_decoder)
    if weights_config(cfg.to_dict()) != weights_config(paper.to_dict()):   # init and chunk do not matter
        raise ValueError("save_release writes the release's vox256 layout, which has the paper preset's sizes "
                         f"(FSRTConfig.paper()); this model has image_size {cfg.image_size}, width {cfg.width}, "
                         f"expr_dim {cfg.expr_dim}, ...: it cannot be stored in that format")
    own = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out, names = {m: {} for m in ("kp_detector",) + RELEASE}, _release_names(model)
    for ours, t in own.items():                              # this code's order is the release's
        (mod, key, rows), cols = names[ours], _columns(model, ours)
        t = t[:, torch.argsort(cols)] if cols is not None else t
        out[mod][key] = torch.cat((out[mod][key], t)) if rows is not None and rows.start > 0 else t
    _atomic_save({m: out[m] for m in RELEASE}, checkpoint)
    _atomic_save(out["kp_detector"], kp_detector)
