"""
Losses and regularisers of FSRT (paper Sec. 3.2-3.3, Eq. (11)-(18)).

Read top to bottom:
  1. the expression regularisers: L_aug / L_aug,D (Eq. 11, 12), the stacked matrix E (Eq. 13),
     L_Cov (Eq. 14), L_Var (Eq. 15) and their combination L_reg (Eq. 16);
  1b. a departure from the paper (lambda_lm = 0 here; train.py's tiny preset sets 1): the landmark-shape
      supervision of e, L_lm;
  2. the reconstruction loss L_MSE (Eq. 17) and the full objective (Eq. 18) with the paper's weights;
  3. the perceptual loss L_P: a VGG19 with torchvision's parameter names, L1 on relu1_1..relu5_1
     features of the full-resolution image (the release's `scales: [1]`; FOMM adds an image pyramid);
  4. the keypoint-aware discriminator of phase III with the LSGAN losses and feature matching.

Everything is plain torch (torchvision is not a dependency): VGG19 is written here with the same
parameter names, so torchvision's `vgg19-dcbb9e9d.pth` loads into it (weights.load_vgg19).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from keypoints import KP_LANDMARKS, antialias_downsample, pixel_grid


@dataclass
class LossWeights:
    """The lambdas of Eq. (16) and (18), paper values (Sec. 3.3). The one place they live: `l_reg` and
    `objective` take an instance, and nothing else weighs a loss term.

    perceptual and fm are per layer, as the release lists them (0.01 for each of the 5 VGG layers / 4
    discriminator blocks); every layer has the same weight, so L_P and L_A^F are the plain sums over
    layers and the weight is applied once, in `objective`.
    adv weighs the generator's L_A and, in the release, the discriminator's loss too.
    """
    mse: float = 1.0          # lambda_MSE
    perceptual: float = 0.01  # lambda_P, per VGG layer
    adv: float = 0.001        # lambda_A
    fm: float = 0.01          # lambda_A^F, per discriminator block
    aug: float = 1.0          # lambda_aug
    cov: float = 1.0          # lambda_Cov
    cov_diag: float = 1.0     # weight of Eq. (14)'s diagonal within L_Cov (1 = the paper; 0 = VICReg's term; l_cov)
    var: float = 0.2          # lambda_Var
    lm: float = 0.0           # lambda_lm: landmark-shape supervision of e (not in the paper; 0 = off; l_lm)


# ----------------------------------------------------------------------------------------------
# 1. Expression regularisers, Eq. (11)-(16)

def l_aug(e1, e2):
    """Eq. (11) / (12): ||e1 - e2||_2^2 / |e| per vector, averaged over all vectors (the batch mean
    of Eq. (16)).  e1, e2: [..., c] (e.g. [bs, c] or [bs, n_src, c]) -> scalar."""
    if e1.shape != e2.shape:
        raise ValueError(f"l_aug: shapes differ: {tuple(e1.shape)} vs {tuple(e2.shape)}")
    per_vector = (e1 - e2).pow(2).sum(-1) / e1.shape[-1]  # (...)
    return per_vector.mean()


def stack_E(e_src, e_drv):
    """Eq. (13): E = [e_S1^(1), ..., e_Sn^(1), e_D^(1), ..., e_S1^(bs), ..., e_Sn^(bs), e_D^(bs)].

    e_src: [bs, n_src, c] (or [bs, c] for one source), e_drv: [bs, c] -> E [(n_src+1)*bs, c]."""
    if e_src.dim() == 2:
        e_src = e_src[:, None]
    bs, n, c = e_src.shape
    if e_drv.shape != (bs, c):
        raise ValueError(f"stack_E: e_drv must be [{bs}, {c}], got {tuple(e_drv.shape)}")
    return torch.cat([e_src, e_drv[:, None]], dim=1).reshape(bs * (n + 1), c)  # ((n+1)*bs, c)


def covariance(E):
    """Cov(E) of the c feature dimensions over the N rows, unbiased (divides by N - 1, as VICReg's
    code). E: [N, c] -> [c, c]."""
    N = E.shape[0]
    if N < 2:
        raise ValueError(f"covariance needs at least 2 rows of E, got {N}")
    Ec = E - E.mean(0, keepdim=True)  # (N, c)
    return Ec.t() @ Ec / (N - 1)      # (c, c)


def l_cov(E, diag=1.0):
    """Eq. (14): (sum_{i!=j} Cov_ij^2 + sum_k Cov_kk^2) / c, i.e. the sum of ALL squared entries of
    the covariance matrix divided by c.  Unlike VICReg the diagonal (variances) is penalised too, an
    extra information bottleneck.  diag weighs the diagonal sum: 1 is Eq. (14); 0 leaves VICReg's
    off-diagonal term, which penalises only what e's dimensions share (a departure, LossWeights.cov_diag;
    RESULTS.md measures it).  E: [N, c] -> scalar."""
    C = covariance(E)                 # (c, c)
    diagonal = C.diagonal().pow(2).sum()
    return (C.pow(2).sum() - (1.0 - diag) * diagonal) / E.shape[1]


def l_var(E, eps=1e-4):
    """Eq. (15): mean over the vectors e of E of max(0, 1 - sqrt(Var(e) + eps)), where Var(e) is the
    variance of ONE vector across its own c features (not VICReg's variance across the batch).
    The variance is unbiased (divides by c - 1), like the covariance above; eps = 1e-4 as VICReg.
    E: [N, c] -> scalar."""
    std = torch.sqrt(E.var(dim=1) + eps)  # (N,)
    return F.relu(1.0 - std).mean()


def l_reg(e_src_a1, e_src_a2, e_drv, e_drv_omega, weights=None):
    """Eq. (16): lambda_aug/2 (mean L_aug + mean L_aug,D) + lambda_Cov L_Cov + lambda_Var L_Var.

    e_src_a1, e_src_a2: [bs, n_src, c] (or [bs, c]) expression vectors of the sources in colour
        versions A1 and A2 (Eq. 11);
    e_drv: [bs, c] of the uncropped driving frame I_D^A, e_drv_omega: [bs, c] of Omega(I_D^A3) (Eq. 12).
    L_Cov = L_Cov^E1 + L_Cov^E2 and L_Var likewise, with E1 = {sources A1, driving uncropped} and
    E2 = {sources A2, driving Omega-cropped} (Eq. 13).
    Returns (total, {"aug", "aug_d", "cov", "var"}) with the unweighted terms."""
    w = weights or LossWeights()
    if e_drv.shape[-1] == 0:   # |e| = 0 ablation: no expression vector, nothing to regularise
        zero = e_drv.new_zeros(())
        return zero, {"aug": zero, "aug_d": zero, "cov": zero, "var": zero}
    aug = l_aug(e_src_a1, e_src_a2)                               # Eq. (11), batch mean
    aug_d = l_aug(e_drv, e_drv_omega)                             # Eq. (12), batch mean
    E1, E2 = stack_E(e_src_a1, e_drv), stack_E(e_src_a2, e_drv_omega)  # Eq. (13)
    cov = l_cov(E1, w.cov_diag) + l_cov(E2, w.cov_diag)           # Eq. (14)
    var = l_var(E1) + l_var(E2)                                   # Eq. (15)
    total = w.aug / 2 * (aug + aug_d) + w.cov * cov + w.var * var
    return total, {"aug": aug, "aug_d": aug_d, "cov": cov, "var": var}


# ----------------------------------------------------------------------------------------------
# 1b. Landmark-shape supervision of e, L_lm. NOT IN THE PAPER: a documented departure (RESULTS.md), off unless
# lambda_lm > 0 or train.py --lm-pretrain. The 68 landmarks phase 0 trains the detector on also carry the
# mouth, eyelids and brows; their pose-free shape is a target a linear head on e regresses (the head is
# training state only: reenactment never uses it). It needs only the landmarks (real VoxCeleb has them).

LM_RIGID = KP_LANDMARKS   # the phase-0 keypoints' landmarks: they stay still under expression
LM_EXPRESSIVE = tuple(range(17, 27)) + tuple(range(36, 48)) + tuple(range(48, 68))
# brows 17-26, eyes 36-47, mouth 48-67: 42 points -> 84 numbers (the nose 30-35 is left out: under yaw its
# residual is pose, not expression; of the sets probed, these 10 rigid points align best: RESULTS.md).


def fit_affine(src, dst):
    """Least-squares affine maps A [..., 2, 3] with A [src; 1] ~ dst: argmin_A sum_i ||A [p_i; 1] - q_i||^2.
    src, dst [..., n, 2] (n >= 3 points not on one line). Solved in float64."""
    X = torch.cat([src, torch.ones_like(src[..., :1])], -1)                  # (..., n, 3): [p_i, 1]
    sol = torch.linalg.lstsq(X.double(), dst.double()).solution              # (..., 3, 2) = A^T
    return sol.transpose(-1, -2).to(src.dtype)


def apply_affine(A, p):
    """A [..., 2, 3], points p [..., n, 2] -> A [p; 1] [..., n, 2]."""
    return p @ A[..., :2].transpose(-1, -2) + A[..., None, :, 2]


def lm_shape(lm, canon_rigid, canon_expr):
    """The pose-free shape of the expressive landmarks: s = A_I(l_expr) - c_expr, with A_I the affine map that
    takes the image's rigid landmarks (LM_RIGID) onto the canonical ones c_rigid (fit_affine). An affine motion
    of the whole face cancels in A_I, so s is the same. lm [..., 68, 2] pixels; canon_rigid [10, 2],
    canon_expr [42, 2] -> s [..., 84] (x, y of each LM_EXPRESSIVE point)."""
    A = fit_affine(lm[..., list(LM_RIGID), :], canon_rigid.expand(*lm.shape[:-2], -1, -1))
    return (apply_affine(A, lm[..., list(LM_EXPRESSIVE), :]) - canon_expr).flatten(-2)


def lm_stats(lms, iters=5):
    """The constants of lm_target from training samples' landmarks lms [n, N+1, 68, 2] (the frames of one
    sample come from one video): the canonical configuration c (generalised affine Procrustes of the rigid
    points to their mean, `iters` rounds), the mean mu of the shapes s, and ONE scale sigma for all 84 numbers,
    the within-video spread sigma^2 = mean (s_D - s_S)^2 / 2 (a per-number std would blow the numbers that
    barely move up into unit-variance noise). -> {"canon_rigid", "canon_expr", "mu", "sd"} (float32)."""
    lms = torch.as_tensor(lms, dtype=torch.float64)
    flat = lms.flatten(0, 1)
    canon = flat[0]
    for _ in range(iters):
        A = fit_affine(flat[:, list(LM_RIGID)], canon[list(LM_RIGID)].expand(len(flat), -1, -1))
        canon = apply_affine(A, flat).mean(0)
    canon_rigid, canon_expr = canon[list(LM_RIGID)], canon[list(LM_EXPRESSIVE)]
    s = lm_shape(lms, canon_rigid, canon_expr)                                # (n, N+1, 84)
    sd = ((s[:, -1:] - s[:, :-1]).pow(2).mean() / 2).sqrt()
    return {"canon_rigid": canon_rigid.float(), "canon_expr": canon_expr.float(), "mu": s.mean((0, 1)).float(),
            "sd": sd.float()}


def lm_target(lm, stats):
    """t = (s - mu) / sigma: the scaled lm_shape of landmarks lm [..., 68, 2] (stats: lm_stats) -> [..., 84]."""
    s = {k: v.to(lm.device) for k, v in stats.items()}
    return (lm_shape(lm.float(), s["canon_rigid"], s["canon_expr"]) - s["mu"]) / s["sd"]


def l_lm(pred_drv, pred_src, t_drv, t_src):
    """L_lm = mean over samples, sources and the m numbers of ((h(e_D) - h(e_S)) - (t_D - t_S))^2: the change
    of the head's output h(e) from each source to the driving frame of the same video against the change of
    lm_target. Differences within a video, so the identity's own face shape is not asked of e.
    pred_drv [B, m], pred_src [B, N, m] (or [B, m]); t_drv, t_src likewise -> scalar (unweighted)."""
    if pred_src.dim() == 2:
        pred_src, t_src = pred_src[:, None], t_src[:, None]
    d_pred = pred_drv.float()[:, None] - pred_src.float()                    # (B, N, m)
    d_true = t_drv.float()[:, None] - t_src.float()
    return (d_pred - d_true).pow(2).mean()


# ----------------------------------------------------------------------------------------------
# 2. Reconstruction and the full objective, Eq. (17)-(18)

def l_mse(pred, target):
    """Eq. (17): E_q ||D(q) - I_D(q)||^2 as the release computes it: the mean over pixels, batch AND the
    3 colour channels (1/3 of the squared norm the equation writes; the paper's lambdas were tuned with
    this scale).  pred, target: [B, P, 3] (the decoder's output) or [B, 3, H, W] (image) -> scalar."""
    if pred.shape != target.shape:
        raise ValueError(f"l_mse: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return (pred - target).pow(2).mean()


def psnr(pred, target, peak=1.0):
    """Peak signal-to-noise ratio in dB of each image: 10 log10(peak^2 / MSE), the MSE over its last three
    dimensions ([3,H,W] or [H,W,3]). pred, target [..., 3, H, W] -> [...]; inf for identical images. The one
    PSNR of the project (training logs, metrics, benchmarks); clamp predictions to [0, 1] before, as needed."""
    mse = (pred.double() - target.double()).pow(2).flatten(-3).mean(-1)
    return 10 * torch.log10(peak ** 2 / mse)


def objective(reg, mse, perceptual=None, adv=None, fm=None, weights=None):
    """Eq. (18): L = L_reg + lambda_MSE L_MSE + lambda_P L_P + lambda_A L_A + lambda_A^F L_A^F.

    reg: the total of `l_reg` (weighted inside with the same `weights`, Eq. 16); mse: `l_mse` (Eq. 17);
    perceptual: PerceptualLoss's L_P; adv: g_loss(D(fake)); fm: feature_matching's L_A^F; each is
    multiplied here by its lambda.
    Terms left None are absent (phase I: reg + MSE; phase II: + P; phase III: + A + A^F).
    Returns (total, dict of the weighted terms)."""
    w = weights or LossWeights()
    terms = {"reg": reg, "mse": w.mse * mse}
    if perceptual is not None:
        terms["perceptual"] = w.perceptual * perceptual
    if adv is not None:
        terms["adv"] = w.adv * adv
    if fm is not None:
        terms["fm"] = w.fm * fm
    return sum(terms.values()), terms


# ----------------------------------------------------------------------------------------------
# 3. Perceptual loss: VGG19 (torchvision names), L1 on relu1_1..relu5_1

# torchvision's VGG19 `features` ("E" config): numbers are 3x3 conv widths (each followed by ReLU), M = max pool
_VGG19_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"]
_VGG19_SLICES = [(0, 2), (2, 7), (7, 12), (12, 21), (21, 30)]  # -> relu1_1, relu2_1, relu3_1, relu4_1, relu5_1


class VGG19(nn.Module):
    """torchvision's VGG19 `features` (all 16 convs, so the state dict has exactly torchvision's
    `features.N.weight/bias` names and shapes); no classifier.  Frozen: no parameter needs grad.
    Only features[0:30] (up to relu5_1) are run."""

    def __init__(self):
        super().__init__()
        layers, c_in = [], 3
        for v in _VGG19_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c_in = v
        self.features = nn.Sequential(*layers)
        # ImageNet normalisation; non-persistent so the state dict stays torchvision's
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        for m in self.features:  # torchvision's init, for random_weights=True
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        self.requires_grad_(False)

    def load_torchvision(self, state_dict):
        """Load torchvision's VGG19 state dict: `features.*` strictly, `classifier.*` ignored."""
        feats = {k: v for k, v in state_dict.items() if not k.startswith("classifier.")}
        self.load_state_dict(feats, strict=True)

    def forward(self, x):
        """x: [B, 3, H, W] in [0, 1] -> list of up to 5 maps (relu1_1 [B,64,H,W], relu2_1 [B,128,H/2,W/2],
        ..., relu5_1 [B,512,H/16,W/16]).  Small-image guard: every slice after the first starts a new
        resolution with a 2x2 max pool; when the map is already below 2 pixels the pool would give an
        empty map, so the remaining (deeper) layers are skipped and fewer maps are returned (at 64^2 the
        pyramid's 8x8 level gives relu1_1..relu4_1 only)."""
        h = (x - self.mean) / self.std
        out = []
        for a, b in _VGG19_SLICES:
            if a > 0 and min(h.shape[-2:]) < 2:
                break
            h = self.features[a:b](h)
            out.append(h)
        return out


class PerceptualLoss(nn.Module):
    """L_P (phase II on): sum over the VGG layers relu1_1..relu5_1 of mean |VGG(pred) - VGG(target).detach()|,
    at the full resolution only, as the release (its `scales: [1]`; FOMM sums an image pyramid 1..1/8 too,
    1.85x the value: pass scales=(1, 0.5, 0.25, 0.125) for that). Unweighted: `objective` applies lambda_P."""

    def __init__(self, vgg, scales=(1,)):
        super().__init__()
        self.vgg = vgg                                   # a VGG19 (weights.load_vgg19 reads torchvision's file)
        self.scales = tuple(scales)

    def train(self, mode=True):  # the VGG stays frozen and deterministic
        super().train(mode)
        self.vgg.eval()
        return self

    def forward(self, pred, target):
        """pred, target: [B, 3, H, W] in [0, 1] -> scalar.  Gradient flows to pred only."""
        total = pred.new_zeros(())
        for s in self.scales:
            x_feats = self.vgg(antialias_downsample(pred, s))
            with torch.no_grad():
                y_feats = self.vgg(antialias_downsample(target, s))
            for xf, yf in zip(x_feats, y_feats):
                total = total + (xf - yf.detach()).abs().mean()
        return total


# ----------------------------------------------------------------------------------------------
# 4. Keypoint-aware discriminator (phase III), LSGAN and feature matching

@dataclass
class DiscConfig:
    """Pix2Pix-style one-scale discriminator of FOMM, conditioned on keypoint heatmaps.

    Block i outputs min(max_features, block_expansion * 2^i) channels.  Defaults are the release's
    13 -> 128 -> 256 -> 512 -> 512 (6.85 M parameters; FOMM's `block_expansion * 2**(i+1)` with its
    block_expansion 64, written here as 128 * 2^i)."""
    num_channels: int = 3
    num_kp: int = 10
    block_expansion: int = 128  # channels of the first block
    max_features: int = 512
    num_blocks: int = 4
    kp_variance: float = 0.01

    @classmethod
    def tiny(cls, **kw):
        return cls(**{"block_expansion": 16, "max_features": 128, **kw})


def kp2gaussian(kp, size, variance=0.01):
    """FOMM's kp2gaussian: exp(-||p - k||^2 / (2 variance)) for every pixel p.  kp: [B, K, 2] (x, y) in
    the project's normalised coordinates; size (H, W).  The grid is keypoints.pixel_grid, the project's pixel-centre
    convention (keypoints.to_normalized; FOMM's grid spans [-1, 1] inclusive, < 1 pixel apart).
    -> [B, K, H, W]."""
    grid = pixel_grid(*size, device=kp.device, dtype=kp.dtype).view(*size, 2)     # (H, W, 2)
    d2 = ((grid - kp[:, :, None, None]) ** 2).sum(-1)                               # (B, K, H, W)
    return torch.exp(-0.5 * d2 / variance)


class DownBlock2d(nn.Module):
    """4x4 conv (no padding) -> [instance norm] -> LeakyReLU 0.2 -> [2x2 average pool]  (FOMM)."""

    def __init__(self, c_in, c_out, norm, pool):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=4)
        self.norm = nn.InstanceNorm2d(c_out, affine=True) if norm else None
        self.pool = pool

    def forward(self, x):
        out = self.conv(x)
        if self.norm is not None:
            out = self.norm(out)
        out = F.leaky_relu(out, 0.2)
        if self.pool:
            out = F.avg_pool2d(out, 2)
        return out


class Discriminator(nn.Module):
    """Keypoint-aware discriminator A of phase III (Sec. 3.3, following FOMM)."""

    def __init__(self, cfg=None):
        super().__init__()
        self.cfg = cfg = cfg or DiscConfig()
        blocks, c_in = [], cfg.num_channels + cfg.num_kp
        for i in range(cfg.num_blocks):
            c_out = min(cfg.max_features, cfg.block_expansion * 2 ** i)
            blocks.append(DownBlock2d(c_in, c_out, norm=i != 0, pool=i != cfg.num_blocks - 1))
            c_in = c_out
        self.down_blocks = nn.ModuleList(blocks)
        self.conv = nn.Conv2d(c_in, 1, kernel_size=1)
        self.min_size = self._min_size()

    def _min_size(self):
        """Smallest input side for which every block has >= 2x2 outputs (instance norm needs > 1 value)."""
        s = 1
        while True:
            h = s
            for i in range(self.cfg.num_blocks):
                h = h - 3
                if i != self.cfg.num_blocks - 1:
                    h //= 2
                if h < 2:
                    break
            else:
                return s
            s += 1

    def forward(self, image, kp):
        """image: [B, 3, H, W] in [0, 1] (real or generated, at the model size); kp: [B, K, 2] driving
        keypoints (detached here: the discriminator must not move the keypoints).
        -> (score_map [B, 1, h, w], [block outputs]); at 64^2: features [B,128,30,30], [B,256,13,13],
        [B,512,5,5], [B,512,2,2] and scores [B,1,2,2]; at 256^2: 126, 61, 29, 26 and [B,1,26,26]."""
        H, W = image.shape[-2:]
        if min(H, W) < self.min_size:
            raise ValueError(f"Discriminator: images must be at least {self.min_size}x{self.min_size}, got {H}x{W}")
        heat = kp2gaussian(kp.detach(), (H, W), self.cfg.kp_variance).to(image.dtype)  # (B, K, H, W)
        out = torch.cat([image, heat], dim=1)  # (B, 3+K, H, W)
        feats = []
        for block in self.down_blocks:
            out = block(out)
            feats.append(out)
        return self.conv(out), feats


def d_loss(real_scores, fake_scores):
    """LSGAN discriminator loss: mean (1 - D(real))^2 + mean D(fake)^2 (fake images detached by the caller).
    The release multiplies it by lambda_A (LossWeights.adv)."""
    return (1 - real_scores).pow(2).mean() + fake_scores.pow(2).mean()


def g_loss(fake_scores):
    """LSGAN generator loss L_A: mean (1 - D(fake))^2."""
    return (1 - fake_scores).pow(2).mean()


def feature_matching(real_feats, fake_feats):
    """L_A^F: sum over the discriminator's block outputs of mean |real.detach() - fake| (unweighted:
    `objective` applies lambda_A^F)."""
    if len(real_feats) != len(fake_feats):
        raise ValueError(f"feature_matching: {len(real_feats)} real vs {len(fake_feats)} fake feature maps")
    total = fake_feats[0].new_zeros(())
    for r, f in zip(real_feats, fake_feats):
        total = total + (r.detach() - f).abs().mean()
    return total
