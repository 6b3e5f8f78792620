"""
FSRT's scene representation transformer (Sec. 3, Fig. 2): input and query representation (Eq. 3-7),
patch CNN + transformer encoder (Eq. 1), cross-attention decoder (Eq. 2), the FSRT module that owns the
keypoint detector and the expression network, and its config presets. Only the model: its weights files
(this project's checkpoints, the authors' vox256.pt) are read and written by weights.py.

Sizes (paper preset) are the authors' release (config vox256, andrerochow/fsrt; README, "The authors'
release"). Two departures from a literal implementation, both exact (same function, same parameters, fewer
FLOPs):
  * the query MLP's first layer is split: W [gamma_pix(q), gamma_key(k_D), e_D] = W_pix gamma_pix(q)
    (per pixel, shared by all frames) + W_frame [gamma_key(k_D), e_D] (once per frame); see Decoder.
  * the patch CNN's first conv is split the same way over its 483 input channels; see PatchCNN.
`FSRT.decode_naive` and `FSRT.encode_naive` are the literal versions, kept as references for the tests.
"""
import math
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from expression import ExpressionConfig, ExpressionNet, init_layers
from keypoints import KPConfig, KPDetector, pixel_grid

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
