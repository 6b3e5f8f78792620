"""Training FSRT (paper Sec. 3.2, 3.3): phases 0-III in one script, single process or plain DDP.

    python train.py --phase 1                      # built-in faces, tiny model on CPU (runs phase 0 first)
    python train.py --phase 2 --out runs/tiny      # continues from runs/tiny/phase1.pt
    torchrun --nproc_per_node 4 train.py --phase 1 --data /data/vox --preset paper --out runs/vox

Phases (each starts from the previous phase's checkpoint in --out, or from --init PATH):
  0  trains the hourglass keypoint detector to regress its 10 keypoints onto the 68-point landmarks
     keypoints.KP_LANDMARKS (FOMM's checkpoint links are dead). Skipped with --kp-checkpoint vox-cpk.pth.tar.
  I  MSE on --pixels randomly sampled pixels of the driving frame (Eq. 17) + L_reg (Eq. 16).
  II + perceptual loss on the full image, with gradient only through every second pixel (render_subsampled).
  III + keypoint-aware discriminator, LSGAN and feature matching (Eq. 18), after a discriminator warm-up.
From phase I on the detector is frozen (eval mode, no gradient, not in the optimiser), as in the paper.

Presets (PRESETS): --preset auto (default) is `paper` on CUDA and `tiny`, the CPU recipe, on CPU; every option
overrides the preset. Built-in data only: --motion scales the pose/expression range, --motion-start/--motion-ramp
make a curriculum.
The run folder (--out) holds phase{P}.pt (one checkpoint per phase; rerunning the same command resumes it),
log.jsonl, samples/phase{P}_{step}.png (sources | driving (Omega crop) | prediction | ground truth) and
curves_phase{P}.png (loss and held-out self-reenactment PSNR against copying the source).

Determinism: all randomness of a step (data order, augmentation, pixel choice, the 25% rule) is a function
of (seed, step, global sample index), never of the rank, so a run on W processes follows a 1-process run of
the same global batch, and a resumed run follows an uninterrupted one.
"""
import argparse
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

import cli
import data
import losses
import metrics
import srt
import weights
from keypoints import KP_LANDMARKS, pixel_grid, to_normalized, to_pixels

# training values per preset; a tuple is one value per phase (0, I, II, III); paper = the release's (README).
# tiny (the measurements behind it: RESULTS.md): 64x64, as smaller images leave no expression readable; FSRT's lr
# 3e-4 after a warm-up, as more of the He-initialised patch CNN stays alive than at 1e-3; and three departures
# that make e carry the expression on a CPU's budget: the landmark head start and term (lm_pretrain, lm=1), the
# face-part pixels (focus) and the lr cooldown. paper: the release's recipe, none of them.
PRESETS = {
    "tiny": dict(image_size=64, batch_size=16, pixels=256, lr=(1e-3, 3e-4, 3e-4, 3e-4), warmup=100,
                 steps=(300, 7000, 500, 500), disc_warmup=50, precision="auto", cooldown=(0.0, 0.3, 0.0, 0.0),
                 lm_pretrain="frozen", loss_weights="lm=1", focus=0.75),
    "paper": dict(image_size=256, batch_size=24, pixels=4096, lr=1e-4, warmup=2500,
                  steps=(20000, 200000, 300000, 500000), disc_warmup=500, precision="fp32", cooldown=0.0,
                  lm_pretrain="off", loss_weights="", focus=0.0),
}
MEMORY_HINT = "lower --batch-size, --pixels or --image-size"   # what an out-of-memory line advises
NEVER = sys.maxsize   # --log-every/--sample-every/--ckpt-every 0: never (still at the end and when stopped)


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train FSRT (phases 0-III).")
    p.add_argument("--phase", type=int, default=1, choices=(0, 1, 2, 3))
    p.add_argument("--data", default=None, help="VoxCeleb root (see README); default: built-in faces")
    p.add_argument("--preset", default="auto", choices=("auto", "tiny", "paper"),
                   help="auto = paper on CUDA, tiny on CPU")
    p.add_argument("--out", default=None, help="run folder (default runs/<preset>)")
    p.add_argument("--init", default=None, help="fsrt checkpoint to start this phase from (model weights; in phase "
                   "1 with --lm-pretrain, X from --out's phase0.pt: a fine-tune of a trained model, RESULTS.md)")
    p.add_argument("--kp-checkpoint", default=None, help="FOMM vox-cpk.pth.tar: use its detector, skip phase 0")
    p.add_argument("--vgg-weights", default=None,
                   help="torchvision vgg19-dcbb9e9d.pth for phases II/III; 'random' = untrained VGG (tests only)")
    for name, t in (("image-size", int), ("batch-size", int), ("pixels", int), ("lr", float), ("warmup", int),
                    ("steps", int), ("disc-warmup", int)):
        p.add_argument("--" + name, type=t, default=None, help="default from the preset")
    p.add_argument("--loss-weights", default="", metavar="K=V,...",
                   help="override lambdas of Eq. (16)/(18) and the preset's, e.g. 'cov=0,var=0' (names: "
                        "losses.LossWeights; the tiny preset sets lm=1)")
    p.add_argument("--lm-pretrain", default=None, choices=("off", "frozen", "joint"),
                   help="not in the paper (RESULTS.md): phase 0 also trains the expression network X and a linear head "
                        "e -> the pose-free shape of the brow, eye and mouth landmarks (losses.l_lm) for --lm-steps: "
                        "'frozen' after the detector's own steps, on its fixed output; 'joint' with it, its gradient "
                        "reaching the detector too. Phase I starts X from it; --loss-weights lm=... keeps the term. "
                        "Default from the preset (tiny: frozen, with lm=1)")
    p.add_argument("--lm-steps", type=int, default=1000, help="with --lm-pretrain: phase 0's steps of X + head, "
                   "added to its --steps of the detector (none with --kp-checkpoint)")
    p.add_argument("--focus", type=float, default=None, help="not in the paper (RESULTS.md): the share of phase I's "
                   "--pixels drawn in the driving frame's brow, eye and mouth boxes; 0 = the paper's uniform draw; "
                   "default from the preset (tiny 0.75)")
    p.add_argument("--cooldown", type=float, default=None, help="not in the paper (RESULTS.md): the last share of "
                   "the phase's --steps over which the lr falls linearly to 1/10 of it; 0 = the release's schedule; "
                   "default from the preset (tiny: 0.3 in phase I)")
    p.add_argument("--num-src", type=int, default=1)
    p.add_argument("--expr-dim", type=int, default=None, help="ablation: size of e (paper 256, 128, 64)")
    p.add_argument("--small-decoder", action="store_true", help="ablation: small decoder")
    p.add_argument("--no-keypoints", action="store_true", help="ablation: n_K = 0 (no keypoint conditioning)")
    p.add_argument("--no-jitter", action="store_true", help="ablation: no colour jitter (A1 = A2 = A3, Sec. 3.2)")
    p.add_argument("--no-omega", action="store_true", help="ablation: no Omega crop before the expression net")
    p.add_argument("--kp-scale", type=float, default=None, help="the detector's input scale (paper 0.25 at "
                   "256x256: it sees 64x64; tiny 1: the whole 64x64 image)")
    p.add_argument("--pix-octaves", type=int, default=None, help="octaves of the pixel encoding (Eq. 5)")
    p.add_argument("--cnn-init", default=None, choices=("kaiming", "torch"),
                   help="patch-CNN initialisation (srt.PatchCNN); 'torch' is the release's default init")
    p.add_argument("--expr-init", default=None, choices=("kaiming", "torch"),
                   help="expression-network initialisation (expression.ExpressionNet); 'torch' is the release's")
    p.add_argument("--motion", type=float, default=1.0, help="built-in data: pose/expression range scale")
    p.add_argument("--motion-start", type=float, default=None, help="built-in data: motion range at step 0 "
                   "(curriculum, default --motion)")
    p.add_argument("--motion-ramp", type=int, default=0, help="steps over which the motion range grows to --motion")
    p.add_argument("--identities", type=int, default=None, help="built-in data: number of training identities")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--sample-every", type=int, default=500, help="sample grid + held-out PSNR every N steps")
    p.add_argument("--eval-videos", type=int, default=4, help="held-out test videos for the PSNR check")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--max-minutes", type=float, default=None, help="stop as on Ctrl-C after this wall time")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "auto"),
                   help="bf16: bfloat16 autocast of the forward pass (fp32 weights, Adam and losses); auto: bf16 "
                        "where its matmul is faster here (cli.pick_precision)")
    p.add_argument("--double", action="store_true", help="float64 everywhere (exactness checks in the tests)")
    return p.parse_args(argv)


def resolve(options, phase=None, own_steps=True):
    """A checked copy of the parsed options for `phase` (default --phase), the preset's values (those of that phase)
    filled into those left unset; --steps applies only with own_steps (the phase the command names)."""
    args = argparse.Namespace(**vars(options))
    cli.check_device(args.device)
    args.phase = args.phase if phase is None else phase
    if not own_steps:
        args.steps = None
    cuda = torch.cuda.is_available() and (args.device is None or args.device.startswith("cuda"))
    args.preset = ("paper" if cuda else "tiny") if args.preset == "auto" else args.preset
    if args.double and args.precision is None:
        args.precision = "fp32"   # float64 exactness checks: the preset's bf16 does not apply
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v[args.phase] if isinstance(v, tuple) else v)
    if args.expr_dim == 0 and options.lm_pretrain is None:   # no e: no landmark head start
        args.lm_pretrain = "off"
    preset_lw = PRESETS[args.preset]["loss_weights"] if args.lm_pretrain != "off" else ""   # lm=1 goes with it
    args.loss_weights = ",".join(filter(None, (preset_lw, options.loss_weights)))   # the user's items win
    args.out = args.out or os.path.join("runs", args.preset)
    args.motion_start = args.motion if args.motion_start is None else args.motion_start
    if args.data is not None and not os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r} is not a folder: give a VoxCeleb root prepared as the "
                                f"README says, or leave --data out to train on the built-in faces")
    for f, hint in (("init", "pass a .pt file written by train.py"), ("kp_checkpoint", f"pass {weights.KP_FILES}"),
                    ("vgg_weights", weights.VGG19_HINT)):   # a folder, fifo or missing file: refused now
        if getattr(args, f) not in (None, "random"):
            weights.check_file(getattr(args, f), hint, what=f"--{f.replace('_', '-')} file")
    cli.check_numbers(args, {**{k: ">= 1" for k in ("batch_size", "pixels", "image_size", "num_src", "pix_octaves",
                                                   "identities")},
                            **{k: ">= 0" for k in ("steps", "disc_warmup", "motion", "motion_start", "motion_ramp",
                                                   "seed", "eval_videos", "workers", "lm_steps")},
                            "expr_dim": ">= 0 (0 = no expression vector)", "lr": "> 0", "kp_scale": "> 0 (and at "
                            "most 1)", "warmup": ">= 0 (0 = no warm-up)", "max_minutes": "> 0",
                            **{k: ">= 0 (0 = never)" for k in ("log_every", "sample_every", "ckpt_every")}})
    for k in ("log_every", "sample_every", "ckpt_every"):
        setattr(args, k, getattr(args, k) or NEVER)
    loss_weights(args.loss_weights)                    # checked now; Context holds the instance
    if args.double and args.precision != "fp32":
        raise ValueError("--double and --precision bf16/auto exclude each other")
    if args.kp_scale is not None and args.kp_scale > 1:
        raise ValueError(f"--kp-scale {args.kp_scale}: must be > 0 (and at most 1): the detector sees the image "
                         f"at most at its own size")
    if not 0 <= args.cooldown <= 1:
        raise ValueError(f"--cooldown {args.cooldown}: must be >= 0 and <= 1 (a share of the phase's --steps)")
    if not 0 <= args.focus < 1:
        raise ValueError(f"--focus {args.focus}: must be >= 0 and < 1 (the share of pixels in the face parts)")
    if args.pixels > args.image_size ** 2:
        raise ValueError(f"--pixels {args.pixels} exceeds the {args.image_size}x{args.image_size} image")
    lm_pretrain_schedule(args)
    return args


def loss_weights(text):
    """'cov=0,var=0' -> losses.LossWeights with those lambdas changed (the one instance every loss term uses)."""
    known = losses.LossWeights.__dataclass_fields__
    over = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        try:
            if k.strip() not in known:
                raise ValueError
            over[k.strip()] = float(v)
            if not over[k.strip()] >= 0:        # a negative or NaN lambda would train against its loss
                raise ValueError
        except ValueError:
            raise ValueError(f"--loss-weights {text!r}: each item must be NAME=NUMBER >= 0 with NAME one of "
                             f"{', '.join(known)}") from None
    return losses.LossWeights(**over)


def model_config(args):
    over = dict(image_size=args.image_size, use_keypoints=not args.no_keypoints, small_decoder=args.small_decoder)
    for k in ("expr_dim", "pix_octaves", "cnn_init", "expr_init"):
        if getattr(args, k) is not None:
            over[k] = getattr(args, k)
    make = getattr(srt.FSRTConfig, args.preset)
    if args.kp_scale is not None:   # the detector's input scale (KPConfig.scale_factor)
        over["kp"] = dataclasses.replace(make().kp, scale_factor=args.kp_scale)
    return make(**over)


@dataclass(frozen=True)
class Context:
    """What is fixed while a phase trains: options, rank, world, device, number types (float64 with --double; bf16
    autocast), the one LossWeights instance and the deadline (--max-minutes counts from the command's start)."""
    args: argparse.Namespace
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    bf16: bool = False
    weights: losses.LossWeights = dataclasses.field(default_factory=losses.LossWeights)
    deadline: float = math.inf

    @property
    def gidx(self):
        """Positions of this rank's samples in the global batch."""
        local = self.args.batch_size // self.world
        return list(range(self.rank * local, (self.rank + 1) * local))

    def log(self, *line):
        if self.rank == 0:
            print(*line)


def context(args, rank=0, world=1, device="cpu"):
    """The Context of resolved options on this process; 'auto' precision is decided here (cli.pick_precision)."""
    device = torch.device(device)
    bf16 = cli.pick_precision(args.precision, device)[0] == "bf16"
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else math.inf
    return Context(args, rank, world, device, torch.float64 if args.double else torch.float32, bf16,
                   loss_weights(args.loss_weights), deadline)


# ----------------------------------------------------------------------------------------------------------
# distributed helpers: torchrun's processes (cli.setup_processes) each train a slice of the global batch

class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums the gradient of every rank and returns this rank's slice.
    Every rank computes the same global loss from the gathered tensor; the summed gradient, then divided by
    W in average_gradients, equals the gradient of that one global loss (the batch terms L_Cov, L_Var)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather(x, world):
    return GatherWithGrad.apply(x) if world > 1 else x


def average_gradients(params, world):
    """DDP's gradient averaging as one flat all_reduce (the model runs through detect, encode and decode, not the one
    forward() DistributedDataParallel wraps). Returns whether every gradient is finite (the same on every rank)."""
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if world > 1:
        dist.all_reduce(flat)
        flat /= world
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()
    return bool(torch.isfinite(flat).all())


def all_agree(flag, world, device):
    """True on every rank when it is True on any rank (stop requests, non-finite losses)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


# ----------------------------------------------------------------------------------------------------------
# data: the order and every random choice depend on (seed, step, global sample index) only

def sample_rng(seed, step, index):
    """A torch.Generator for one sample of one step; identical on every rank and after a resume."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, index]).generate_state(1)[0]))


def step_rng(seed, step):
    """The same for the choices made once per global batch (spawn_key keeps it apart from every sample_rng)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step], spawn_key=(1,)).generate_state(1)[0]))


def global_indices(step, batch_size, n, seed):
    """Dataset indices of the global batch of `step`: an endless stream of seeded permutations of range(n), epoch
    e's offset by e * n (FaceDataset draws its augmentation from the index: every epoch gets new draws)."""
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, j = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        out.append(epoch * n + int(perm[j]))
    return out


class StepSampler(torch.utils.data.Sampler):
    """Yields this rank's slice of every global batch from `start` to `stop` (the data position of a resume),
    as (dataset index, motion scale) pairs: the motion curriculum is part of the data position too."""

    def __init__(self, n, batch_size, rank, world, seed, start, stop, motion=lambda step: 1.0):
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.start, self.stop, self.motion = start, stop, motion

    def __iter__(self):
        b = self.bs // self.world
        for step in range(self.start, self.stop):
            idx = global_indices(step, self.bs, self.n, self.seed)[self.rank * b:(self.rank + 1) * b]
            yield [(i, self.motion(step)) for i in idx]

    def __len__(self):
        return self.stop - self.start


class Curriculum(torch.utils.data.Dataset):
    """FaceDataset whose built-in motion range (motion_scale) the sampler sets per sample: --motion-start grows to
    --motion over --motion-ramp steps (small motions first, where copying the source is almost right)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        i, motion = item
        if self.ds.root is None:
            self.ds.motion_scale = motion
        return self.ds[i]


# ----------------------------------------------------------------------------------------------------------
# the losses of one step

def render_subsampled(model, set_latents, kp_driving, expr_driving, size, offsets):
    """Phase II's gradient pixel sub-sampling (Sec. 3.3): sample b's pixels (offsets[b][1] + 2i, offsets[b][0] + 2j)
    decoded with gradient, the other 3/4 under no_grad from detached inputs. offsets: B pairs (x, y) in {0, 1} (per
    sample, as the release); H, W even. Returns [B,3,H,W] (unclamped), equal to a full render in value."""
    H, W = size
    if H % 2 or W % 2:
        raise ValueError(f"phase II's pixel sub-sampling needs an even image size, got {H}x{W}")
    off = torch.as_tensor(offsets, device=set_latents.device).view(-1, 2)            # (B, 2)
    grid = pixel_grid(H, W, device=set_latents.device)                           # (H*W, 2)
    ys, xs = torch.arange(H, device=grid.device), torch.arange(W, device=grid.device)
    mask = (ys[None, :, None] % 2 == off[:, 1, None, None]) & (xs[None, None] % 2 == off[:, 0, None, None])
    order = torch.argsort((~mask).flatten(1).byte(), dim=1, stable=True)             # (B, H*W): grad pixels first
    n = H * W // 4
    kv = model.latent_kv(set_latents)                        # keys/values once, shared by both passes
    rgb_grad = model.decode(None, grid[order[:, :n]], kp_driving, expr_driving, kv=kv)   # (B, HW/4, 3)
    with torch.no_grad():
        rgb_rest = model.decode(None, grid[order[:, n:]], kp_driving.detach(), expr_driving.detach(),
                                kv=[(k.detach(), v.detach()) for k, v in kv])        # (B, 3HW/4, 3)
    back = torch.argsort(order, dim=1)[..., None].expand(-1, -1, 3)                  # back to row-major
    rgb = torch.cat([rgb_grad, rgb_rest], dim=1).gather(1, back)                     # (B, H*W, 3)
    return rgb.transpose(1, 2).reshape(-1, 3, H, W)


# Eq. (17)'s pixels: --focus (not in the paper) draws a share of them in the driving frame's brow, eye and mouth
# boxes, ~10 % of a 64x64 face, where a uniform draw gives the expression ~10 % of L_MSE (RESULTS.md)
FACE_PARTS = (range(17, 27), range(36, 48), range(48, 68))       # 68-landmark indices: brows, eyes, mouth


def part_mask(lm, crop, size):
    """Pixels inside the FACE_PARTS boxes of lm [B,68,2] (pixels of the uncropped frames), widened by size/32 pixels
    (brows rise, the jaw drops), in the decoder's crop (crop [B,4] normalised) -> [B, S*S] bool, row-major as
    pixel_grid; all False where the landmarks are NaN."""
    p = to_pixels(data.map_to_crop(to_normalized(lm.float().cpu(), size), crop.float().cpu()), size)  # (B,68,2)
    axis, pad = torch.arange(size, dtype=torch.float32), max(1, size // 32)
    mask = torch.zeros(len(p), size, size, dtype=torch.bool)                           # (B, y, x)
    for part in FACE_PARTS:
        lo, hi = p[:, part].amin(1) - pad, p[:, part].amax(1) + pad                     # (B, 2) as (x, y)
        inside = (axis >= lo[..., None]) & (axis <= hi[..., None])                      # (B, 2, S)
        mask |= inside[:, 1, :, None] & inside[:, 0, None, :]                           # rows x columns
    return mask.flatten(1)


def sample_pixels(n_pixels, n, g, focus=0.0, mask=None):
    """n distinct pixel indices of n_pixels drawn by generator g: uniform (the paper), or with an expected share
    `focus` of them inside mask [n_pixels] (uniform inside and outside it)."""
    m = 0 if mask is None else int(mask.sum())
    if focus <= 0 or m in (0, n_pixels):
        return torch.randperm(n_pixels, generator=g)[:n]
    w = torch.where(mask, focus / m, (1 - focus) / (n_pixels - m))
    return torch.multinomial(w, n, replacement=False, generator=g)


def split_sets(out, sets):
    """A dict of batched outputs over torch.cat(list(sets.values())) -> {set name: dict of its outputs}."""
    parts = {k: v.split([len(x) for x in sets.values()]) for k, v in out.items()}
    return {name: {k: p[i] for k, p in parts.items()} for i, name in enumerate(sets)}


def encode_batch(model, b, rngs, a2=False):
    """Sec. 3.2 wiring (as the release). rngs: one generator per sample (the 25% rule); a2: the driving
    frame's non-Omega expression (Eq. 12) from its A2 colours instead of A1, one choice for the whole batch
    as the release. Returns set_latents, kp_driving, expr_driving and the expression vectors for L_reg."""
    B, N = b["src"].shape[:2]
    flat = lambda x: x.flatten(0, 1)
    use_full = torch.tensor([bool(torch.rand(1, generator=g) < 0.25) for g in rngs], device=b["drv"].device)
    sets = {"src_full": flat(b["src_full"]), "drv_full": b["drv_full"],      # A2, uncropped: keypoints only
            "src_a1": flat(b["src"]), "src_a2": flat(b["src_a2"]),             # cropped: expression vectors
            "drv_a": b["drv_a2"] if a2 else b["drv"], "drv_omega": b["drv_omega"]}
    with torch.no_grad():   # the detector is frozen; one pass over every image of the step
        det = split_sets(model.detect(torch.cat(list(sets.values()))), sets)
    # keypoints of out-of-frame crops are detected on the uncropped frames, then mapped into the crop
    kp_source = data.map_to_crop(det["src_full"]["keypoints"].unflatten(0, (B, N)), b["crop"][:, None])   # (B,N,K,2)
    kp_driving = data.map_to_crop(det["drv_full"]["keypoints"], b["crop"])                              # (B,K,2)
    names = ("src_a1", "src_a2", "drv_a", "drv_omega")                      # one expression pass, with gradient
    e = model.expression_of({k: torch.cat([det[n][k] for n in names]) for k in ("features", "heatmaps")})
    e = dict(zip(names, e.split([len(sets[n]) for n in names])))
    e_src_a1, e_src_a2 = e["src_a1"].unflatten(0, (B, N)), e["src_a2"].unflatten(0, (B, N))
    # decoder expression: Omega(A3) of the driving frame, in 25% of cases (per sample) its uncropped A1/A2 one
    expr_driving = torch.where(use_full[:, None], e["drv_a"], e["drv_omega"])
    # the encoder sees the sources' A1 colours with the expression vectors of their A2 versions
    set_latents = model.encode(b["src"], kp_source, e_src_a2)                          # (B, N*T, D)
    return set_latents, kp_driving, expr_driving, (e_src_a1, e_src_a2, e["drv_a"], e["drv_omega"])


def generator_losses(model, b, ctx, step, gidx, perceptual=None, disc=None, lm=None):
    """Loss of phases I-III, the mean over this rank's batch (gidx: its positions in the global batch); lm: the
    LandmarkHead, for L_lm when lambda_lm > 0. Returns (loss, dict of float terms, prediction (B,P,3) in phase I,
    (B,3,H,W) later, kp_driving)."""
    args, W = ctx.args, ctx.weights
    rngs = [sample_rng(args.seed, step, i) for i in gidx]
    a2 = bool(torch.rand(1, generator=step_rng(args.seed, step)) < 0.5)   # A1/A2 for Eq. (12), per batch
    set_latents, kp_driving, expr_driving, es = encode_batch(model, b, rngs, a2)
    # L_reg (Eq. 16) couples the samples (Cov/Var over E, Eq. 13-15; batch means of L_aug): computed on the
    # global batch, gathered with gradient, identically on every rank
    reg, terms = losses.l_reg(*(gather(e.float(), ctx.world) for e in es), W)   # fp32 under bf16 autocast
    terms = {k: v.item() for k, v in terms.items()}
    if W.lm > 0:   # + lambda_lm L_lm (not in the paper) on Eq. 13's pairs, per sample: no gathering needed
        e_src_a1, e_src_a2, e_drv, e_drv_omega = es
        lm_loss = landmark_loss(lm, b, (e_drv, e_src_a1), (e_drv_omega, e_src_a2))
        reg = reg + W.lm * lm_loss
        terms["lm"] = lm_loss.item()
    target = b["drv"]                                                                  # (B, 3, H, W)
    B, _, H, Wd = target.shape
    if args.phase == 1:   # Eq. (17) on --pixels pixels per driving frame, sampled without replacement
        parts = part_mask(b["drv_lm"], b["crop"], H) if args.focus > 0 else [None] * B    # (B, H*W) or none
        idx = torch.stack([sample_pixels(H * Wd, args.pixels, g, args.focus, m)
                           for g, m in zip(rngs, parts)]).to(target.device)                 # (B, P)
        pixels = pixel_grid(H, Wd, device=target.device)[idx]                        # (B, P, 2)
        pred = model.decode(set_latents, pixels, kp_driving, expr_driving).float()       # (B, P, 3)
        gt = torch.gather(target.flatten(2), 2, idx[:, None].expand(-1, 3, -1)).transpose(1, 2)
        mse = losses.l_mse(pred, gt)
        loss = W.mse * mse + reg                                                          # Eq. (16) + (17)
        terms["mse"] = mse.item()
        return loss, terms, pred, kp_driving
    offsets = [torch.randint(0, 2, (2,), generator=g).tolist() for g in rngs]         # per sample (release)
    pred = render_subsampled(model, set_latents, kp_driving, expr_driving, (H, Wd), offsets).float()
    mse = losses.l_mse(pred, target)                          # Eq. (17) on the assembled full image
    perc = perceptual(pred, target)                           # lambda_P L_P (per-layer weights inside)
    adv = fm = None
    if args.phase == 3 and step >= args.disc_warmup:   # adversarial terms after the discriminator warm-up
        fake_scores, fake_feats = discriminate(disc, pred, kp_driving)
        with torch.no_grad():
            _, real_feats = discriminate(disc, target, kp_driving)
        adv, fm = losses.g_loss(fake_scores), losses.feature_matching(real_feats, fake_feats)
    loss, weighted = losses.objective(reg, mse, perc, adv, fm, W)                       # Eq. (18)
    terms.update({k: v.item() for k, v in weighted.items() if k != "reg"})
    return loss, terms, pred, kp_driving


def discriminate(disc, image, kp):
    """The keypoint-aware discriminator; images below its smallest input (the 4x4 unpadded convs need ~40
    pixels: e.g. 32x32 with --image-size 32) are upsampled bilinearly to that size first (not in the paper)."""
    if min(image.shape[-2:]) < disc.min_size:
        image = torch.nn.functional.interpolate(image, size=(disc.min_size, disc.min_size), mode="bilinear",
                                                align_corners=False)
    return disc(image, kp)


def kp_loss(model, b, args):
    """Phase 0: MSE of the detector's keypoints on the uncropped frames against kp_target."""
    kp = model.kp_detector(torch.cat([b["src_full"].flatten(0, 1), b["drv_full"]]))["keypoints"]
    return torch.nn.functional.mse_loss(kp, kp_target(b, args.image_size))


def kp_target(b, size):
    """Phase 0's target: the KP_LANDMARKS landmarks of the sources' and driving frames' uncropped versions
    (src_full, drv_full), normalised -> [B*N + B, K, 2]."""
    lm = torch.cat([b["src_lm"].flatten(0, 1), b["drv_lm"]])[:, list(KP_LANDMARKS)]       # (B', K, 2) pixels
    return to_normalized(lm, size)


# ----------------------------------------------------------------------------------------------------------
# landmark-shape supervision of e (losses.l_lm): not in the paper (RESULTS.md), on in the tiny preset. --lm-pretrain
# trains X and a linear head in phase 0 (a head start for e); --loss-weights lm=... keeps L_lm in phases I-III

@dataclass
class LandmarkHead:
    """The linear head e -> losses.lm_target (84 numbers) and the target's constants (losses.lm_stats). Training
    state only: saved in the phase's checkpoint (lm_head, lm_stats), never used by reenactment."""
    head: torch.nn.Linear
    stats: dict


def lm_pretrain_schedule(args):
    """Phase 0 with --lm-pretrain: args.detector_steps = the detector's own steps (0 with --kp-checkpoint, trained
    already), and args.steps the phase's total, + --lm-steps of X + head."""
    if args.phase != 0 or args.lm_pretrain == "off":
        return
    if args.expr_dim == 0:
        raise ValueError("--lm-pretrain trains the expression vector e: not with --expr-dim 0")
    args.detector_steps = 0 if args.kp_checkpoint else args.steps
    args.steps = args.detector_steps + args.lm_steps


def landmark_stats(args, n=256):
    """losses.lm_stats of the first n training samples, unaugmented (a function of the data and --seed only)."""
    ds = data.FaceDataset(root=args.data, split="train", size=args.image_size, num_src=args.num_src, augment=None,
                          seed=args.seed, builtin=data.BuiltinVideos(identities=args.identities))
    return losses.lm_stats(np.stack([ds.sample_frames(i)["landmarks"] for i in range(n)]))


def make_landmark_head(ctx, cfg, stats=None):
    """A new LandmarkHead for model config cfg, seeded (--seed; the global random state untouched), with `stats`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.args.seed + 2)
        head = torch.nn.Linear(cfg.expr_dim, 2 * len(losses.LM_EXPRESSIVE)).to(ctx.device)
    return LandmarkHead(head, landmark_stats(ctx.args) if stats is None else stats)


def landmark_training(ctx, model):
    """What L_lm adds to a phase: (the LandmarkHead or None, the parameters it adds to the optimiser). Phase 0
    with --lm-pretrain: X and the head; phases I-III with lambda_lm > 0: the head (X trains there anyway)."""
    args = ctx.args
    wanted = args.lm_pretrain != "off" if args.phase == 0 else ctx.weights.lm > 0
    if not wanted:
        return None, []
    lm = make_landmark_head(ctx, model.cfg)
    return lm, (list(model.expression.parameters()) if args.phase == 0 else []) + list(lm.head.parameters())


def restore_landmark_head(run, ctx, ck, head_start=False):
    """The head and its constants from checkpoint ck, when it holds them (with lambda_lm = 0 the head is kept
    for the log's eval_lm_r2 only); head_start: X's weights too (phase I after a --lm-pretrain phase 0)."""
    if "lm_head" not in ck:
        return
    if run.lm is None:
        run.lm = make_landmark_head(ctx, run.model.cfg, ck["lm_stats"])
    run.lm.head.load_state_dict(ck["lm_head"])
    run.lm.stats = ck["lm_stats"]
    if head_start:
        run.model.expression.load_state_dict({k[len("expression."):]: v for k, v in ck["model"].items()
                                              if k.startswith("expression.")})
        ctx.log("phase 1 starts the expression network X from phase 0's landmark-shape head start (--lm-pretrain)")


def landmark_loss(lm, b, *pairs):
    """losses.l_lm of the head, unweighted, averaged over pairs of (the driving frames' e [B, E], the sources' e
    [B, N, E]) against the batch's landmarks (b["drv_lm"], b["src_lm"]); in fp32 also under bf16 autocast."""
    with torch.autocast(pairs[0][0].device.type, enabled=False):
        t_drv, t_src = (losses.lm_target(b[k], lm.stats) for k in ("drv_lm", "src_lm"))
        return sum(losses.l_lm(lm.head(e_drv.float()), lm.head(e_src.float()), t_drv, t_src)
                   for e_drv, e_src in pairs) / len(pairs)


def lm_pretrain_loss(run, b, ctx):
    """Phase 0 with --lm-pretrain -> (loss, dict of float terms): L_lm of X + head on the uncropped frames and on
    those X sees in phase I (A1 crops of the sources, Omega of the driving frame), + kp_loss while the detector
    trains. 'frozen': the detector alone for args.detector_steps, then frozen as in phase I; 'joint': all from step
    0, L_lm's gradient reaching the detector."""
    args, model = ctx.args, run.model
    frozen = args.lm_pretrain == "frozen"
    if frozen and run.step < args.detector_steps:
        loss = kp_loss(model, b, args)
        return loss, {"kp": loss.item()}
    if frozen:
        model.freeze_detector()
    B, N = b["src"].shape[:2]
    full = torch.cat([b["src_full"].flatten(0, 1), b["drv_full"]])
    det = model.detect(torch.cat([full, b["src"].flatten(0, 1), b["drv_omega"]]))
    e_full_src, e_full_drv, e_src, e_omega = model.expression_of(det).split([B * N, B, B * N, B])
    e_full_src, e_src = e_full_src.unflatten(0, (B, N)), e_src.unflatten(0, (B, N))
    lm_loss = landmark_loss(run.lm, b, (e_full_drv, e_full_src), (e_omega, e_src))
    if frozen:
        return lm_loss, {"lm": lm_loss.item()}
    kp = torch.nn.functional.mse_loss(det["keypoints"][:len(full)], kp_target(b, args.image_size))
    return kp + lm_loss, {"kp": kp.item(), "lm": lm_loss.item()}


@torch.no_grad()
def evaluate_lm(model, lm, videos):
    """The log's eval_lm_r2: held-out R^2 = 1 - sum (t - h)^2 / sum t^2 of the head's output h = head(e) against
    t = lm_target on the evaluation videos, both with each video's mean removed (the head is fit to changes
    within a video), pooled over frames and numbers. None without a head or landmarks."""
    pred, true = [], []
    p, was_training = next(model.parameters()), model.training
    model.eval()
    for v in videos if lm is not None else []:
        if v["landmarks"] is None:
            continue
        h = lm.head(model.keypoints_and_expression(v["frames"].to(p.device, p.dtype))[1].float()).cpu()
        t = losses.lm_target(torch.as_tensor(np.asarray(v["landmarks"])), lm.stats).cpu()
        pred.append(h - h.mean(0))
        true.append(t - t.mean(0))
    model.train(was_training)
    if not pred:
        return None
    pred, true = torch.cat(pred), torch.cat(true)
    return float(1 - (true - pred).pow(2).sum() / true.pow(2).sum())


# ----------------------------------------------------------------------------------------------------------
# checkpoints (one file per phase, weights.save_checkpoint's format; everything loads with weights_only=True)

def rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]], "python": list(random.getstate()[1])}


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((3, tuple(s["python"]), None))


def save(run, ctx):
    """The phase's checkpoint (weights.save_checkpoint: atomic), written by rank 0; the other ranks wait for it."""
    if ctx.rank == 0:
        args = ctx.args
        ckpt = {"config": run.model.cfg.to_dict(), "model": run.model.state_dict(), "step": run.step,
                "iteration": run.iteration, "phase": args.phase, "optimizer": run.opt.state_dict(),
                "rng": rng_state(), "args": vars(args)}
        if run.disc is not None:
            ckpt.update(disc=run.disc.state_dict(), disc_optimizer=run.dopt.state_dict())
        if run.lm is not None:   # training state only (L_lm): reenactment never reads it
            ckpt.update(lm_head=run.lm.head.state_dict(), lm_stats=run.lm.stats)
        weights.save_checkpoint(run.path, ckpt)
    if ctx.world > 1:
        dist.barrier()


RESUME = ("optimizer", "step", "iteration", "rng")     # the training state a resumed phase reads


def load_phase(path, cfg, phase, need=()):
    """A project checkpoint for this model (check_config); phase: the phase it must hold (None: any); need: the
    training-state entries read from it (RESUME). A resumed phase-III file needs the discriminator's state."""
    ck = weights.load_checkpoint(path)
    check_config(ck, cfg, path)
    missing = [k for k in need if k not in ck or k in ("step", "iteration") and type(ck[k]) is not int]
    if missing:
        raise ValueError(f"{path} has no usable {', '.join(missing)}: it holds a model but not the training state "
                         f"train.py continues from; move it away (or pass it as --init to start from its weights)")
    if phase is not None and ck.get("phase", phase) != phase:
        raise ValueError(f"{path} holds a phase-{ck.get('phase')} checkpoint, not phase {phase}: pass the right "
                         f"--out or --phase, or move the file")
    if phase == 3 and not {"disc", "disc_optimizer"} <= set(ck):
        raise ValueError(f"{path} has no discriminator state, so it is not a phase-III checkpoint: move it away "
                         f"and start phase 3 from phase2.pt")
    return ck


def check_config(ckpt, cfg, path):
    old, new = weights.weights_config(ckpt["config"]), weights.weights_config(cfg.to_dict())   # sizes only
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise ValueError(f"{path} was trained with a different model ({', '.join(diff)} differ): pass the same "
                         f"--preset/--image-size/ablation options as that run")


def unfinished(ck):
    """Whether a phase's checkpoint stopped before the steps its run asked for."""
    return ck.get("step", 0) < ck.get("args", {}).get("steps", 0)


def lr_at(args, iteration, step=0):
    """The release's schedule: linear warm-up, then x0.16 every 4M iterations (iteration counts from 1); with
    --cooldown c (not in the paper) times a factor falling linearly from 1 to 0.1 over the phase's last c * --steps
    (step: the updates this phase has done)."""
    start = (1 - args.cooldown) * args.steps
    cool = 1.0 if step <= start else 1.0 - 0.9 * min(1.0, (step - start) / max(args.steps - start, 1))
    return args.lr * min(1.0, iteration / max(args.warmup, 1)) * 0.16 ** ((iteration - args.warmup) / 4e6) * cool


# ----------------------------------------------------------------------------------------------------------
# what a person sees: held-out PSNR, sample grids, curves

def evaluate(model, videos):
    """Self-reenactment PSNR on held-out videos by metrics.py's protocol (metrics.evaluate_self) -> (model, copy the
    source) in dB; nan when no video is long enough for the protocol (training goes on)."""
    videos = [v for v in videos if metrics.protocol_frames(len(v["frames"]))[1]]
    if not videos:
        return math.nan, math.nan
    r = metrics.evaluate_self(videos, model, progress=False)
    return r["model"]["psnr"], r["baseline"]["psnr"]


@torch.no_grad()
def evaluate_kp(model, videos):
    """Phase 0: mean distance in pixels between detected keypoints and the KP_LANDMARKS landmarks."""
    was_training, err, p = model.kp_detector.training, [], next(model.parameters())
    model.kp_detector.eval()
    for v in videos:
        if v["landmarks"] is None:
            continue
        f = v["frames"].to(p.device, p.dtype)
        kp = to_pixels(model.kp_detector(f)["keypoints"], f.shape[-1]).cpu()
        lm = torch.as_tensor(np.asarray(v["landmarks"]))[:, list(KP_LANDMARKS)]
        err.append(float((kp - lm).norm(dim=-1).mean()))
    model.kp_detector.train(was_training)
    return float(np.mean(err)) if err else float("nan")


def save_grid(path, rows, points=None):
    """rows: list of lists of [3,S,S] images -> one PNG. points: optional per-cell lists of ([K,2] pixels,
    colour) drawn as dots (phase 0: landmarks green, keypoints red)."""
    S = rows[0][0].shape[-1]
    grid = Image.new("RGB", (S * max(len(r) for r in rows), S * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            grid.paste(Image.fromarray(data.to_uint8(img)), (j * S, i * S))
            for pts, colour in (points or {}).get((i, j), []):
                for x, y in pts.tolist():
                    draw.ellipse([j * S + x - 1, i * S + y - 1, j * S + x + 1, i * S + y + 1], fill=colour)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path)


def plot_curves(path, recs, phase):
    """log.jsonl records of one phase -> PNG and the figure: the loss on a log scale, below it the held-out PSNR with
    the copy-the-source PSNR as a dashed line (phase 0: the keypoint error in pixels)."""
    series = lambda key: ([r["step"] for r in recs if r.get(key) is not None and math.isfinite(r[key])],
                          [r[key] for r in recs if r.get(key) is not None and math.isfinite(r[key])])
    fig = Figure(figsize=(7, 6), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_eval = fig.subplots(2, 1, sharex=True)
    steps, loss = series("loss")
    ax_loss.plot([s for s, v in zip(steps, loss) if v > 0], [v for v in loss if v > 0], lw=1, label="loss")
    ax_loss.set(yscale="log", ylabel="training loss (log scale)", title=f"phase {phase}")
    if phase == 0:
        ax_eval.plot(*series("eval_kp_err_px"), marker="o", label="held-out keypoint error")
        ax_eval.set_ylabel("keypoint error (pixels)")
    else:
        ax_eval.plot(*series("eval_psnr"), marker="o", label="model: held-out self-reenactment")
        _, copy = series("eval_copy_psnr")
        if copy:
            level = float(np.mean(copy))
            ax_eval.axhline(level, ls="--", color="gray", label=f"copy the source ({level:.2f} dB)")
        ax_eval.set_ylabel("PSNR (dB)")
    ax_eval.set_xlabel("step")
    for ax in (ax_loss, ax_eval):
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return fig


def draw_curves(out, phase):
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    plot_curves(os.path.join(out, f"curves_phase{phase}.png"), [r for r in recs if r.get("phase") == phase], phase)


def sample_grid(path, model, b, args, rows=4):
    """Phase 0: frames with landmarks (green) and keypoints (red); later: sources | driving (the Omega crop the
    expression net saw) | prediction | ground truth, one sample per row."""
    S, n = args.image_size, min(rows, len(b["drv"]))
    if args.phase == 0:
        lm = b["drv_lm"][:n, list(KP_LANDMARKS)]
        kp = to_pixels(model.kp_detector.eval()(b["drv_full"][:n])["keypoints"], S)
        model.kp_detector.train()
        save_grid(path, [[b["drv_full"][i]] for i in range(n)],
                  {(i, 0): [(lm[i], "lime"), (kp[i], "red")] for i in range(n)})
        return
    model.eval()
    sub = {k: v[:n] for k, v in b.items()}
    rngs = [sample_rng(args.seed, 2 ** 31, i) for i in range(n)]
    set_latents, kp_driving, expr_driving, _ = encode_batch(model, sub, rngs)
    pred = model.render(set_latents, kp_driving, expr_driving, size=(S, S))
    model.train()
    save_grid(path, [[*sub["src"][i], sub["drv_omega"][i], pred[i], sub["drv"][i]] for i in range(n)])


class Monitor:
    """What a person sees of a phase (rank 0; the other ranks only join the averages): the progress bar, the
    log (log.jsonl: losses and speed every --log-every steps, held-out figures every --sample-every), sample
    grids and curves. A long run of skipped steps (non-finite loss or gradient) ends the phase with one line."""
    MAX_SKIPPED = 20

    def __init__(self, ctx, run):
        from tqdm import tqdm
        self.ctx, self.args = ctx, ctx.args
        self.acc, self.n_acc, self.skipped_in_a_row, self.videos, self.file = {}, 0, 0, [], None
        if ctx.rank == 0:
            args = self.args
            test = data.VideoSet(root=args.data, split="test", size=args.image_size) if args.eval_videos else []
            self.videos = [test[i] for i in range(min(args.eval_videos, len(test)))]
            os.makedirs(args.out, exist_ok=True)
            self.file = open(os.path.join(args.out, "log.jsonl"), "a")
            ctx.log(f"phase {args.phase}: {'resuming at' if run.step else 'starting'} step {run.step} of "
                    f"{args.steps}, {sum(p.numel() for p in run.params) / 1e6:.2f} M trained parameters, "
                    f"{ctx.world} process(es) on {ctx.device}, run folder {args.out}")
        self.bar = tqdm(total=self.args.steps, initial=run.step, disable=ctx.rank != 0, dynamic_ncols=True,
                        desc=f"phase {self.args.phase}")
        self.t_start = self.t_log = time.time()

    def write(self, step, rec):
        """One line of log.jsonl; NaN and infinity become null (strict JSON)."""
        self.file.write(json.dumps(metrics.jsonable({"phase": self.args.phase, "step": step, **rec})) + "\n")
        self.file.flush()

    def record(self, step, terms, skipped):
        self.bar.update(1)
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
        if skipped:   # never written into the weights (Adam's moments untouched too)
            if self.ctx.rank == 0:
                self.write(step, {"skipped": "non-finite loss or gradient", **terms})
                self.bar.write(f"step {step}: non-finite loss or gradient, step skipped")
            if self.skipped_in_a_row >= self.MAX_SKIPPED:
                raise RuntimeError(f"{self.skipped_in_a_row} steps in a row had a non-finite loss or gradient "
                                   f"(last at step {step}): the data holds non-finite values (images or landmark "
                                   f"files) or --lr is too high; the last checkpoint is kept")
            return
        for k, v in terms.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.n_acc += 1

    def log(self, run):
        """The mean of each loss term since the last log line, over every rank."""
        acc, world = self.acc, self.ctx.world
        vals = torch.tensor([acc.get(k, 0.0) for k in sorted(acc)] + [self.n_acc], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(vals)
        if self.ctx.rank == 0 and vals[-1] > 0:
            rec = {k: float(v / vals[-1]) for k, v in zip(sorted(acc), vals[:-1])}
            rate = min(self.args.log_every, run.step) / max(time.time() - self.t_log, 1e-9)
            self.write(run.step, {**rec, "lr": lr_at(self.args, run.iteration, run.step), "steps_per_s": rate,
                                  "iteration": run.iteration})
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items()})
        self.acc, self.n_acc, self.t_log = {}, 0, time.time()

    def evaluate_and_sample(self, run, b=None):
        """Held-out figures (log.jsonl and one line), then a sample grid of batch b and the curves (rank 0)."""
        if self.ctx.rank != 0:
            return
        model, args, step = run.model, self.args, run.step
        minutes = (time.time() - self.t_start) / 60
        lm_r2 = {} if run.lm is None else {"eval_lm_r2": evaluate_lm(model, run.lm, self.videos)}   # L_lm's head
        if self.videos and args.phase == 0:
            self.write(step, {"eval_kp_err_px": evaluate_kp(model, self.videos), "minutes": minutes, **lm_r2})
        elif self.videos:
            ours, copy = evaluate(model, self.videos)
            first_frames = torch.stack([v["frames"][0] for v in self.videos]).to(self.ctx.device, self.ctx.dtype)
            h = metrics.health(model, first_frames)
            ex = metrics.evaluate_expression(model, 8) if args.data is None else None   # built-in data only
            ex_e = metrics.evaluate_expression_paths(model, 8)["e"] if ex is not None else None   # e alone
            self.write(step, {"eval_psnr": ours, "eval_copy_psnr": copy, "minutes": minutes,
                              **{"health_" + k: v for k, v in h.items()}, "encoder_collapsed": metrics.collapsed(h),
                              "expression_collapsed": metrics.expression_collapsed(h), "eval_expression": ex,
                              "eval_expression_e": ex_e, **lm_r2})
            self.bar.write(eval_line(step, ours, copy, h, ex, ex_e))
        model.train()
        if b is not None:
            sample_grid(os.path.join(args.out, "samples", f"phase{args.phase}_{step:07d}.png"), model, b, args)
            draw_curves(args.out, args.phase)

    def close(self):
        self.bar.close()
        if self.file is not None:
            self.file.close()
            draw_curves(self.args.out, self.args.phase)


def eval_line(step, ours, copy, h, ex, ex_e=None):
    """The held-out evaluation in words, with a warning line when the encoder or e has collapsed."""
    mean = lambda r: metrics.format_number(r and r["mean"], 2, lead_zero=True)
    line = (f"step {step}: held-out PSNR {ours:.2f} dB (copying the source: {copy:.2f} dB); encoder: active channels "
            f"{min(h['active']):.0%} (least of the convs), token spread {h['spread']:.3f}, attention on the own patch "
            f"{h['attn_own']:.3f} (uniform {math.exp(-h['attn_uniform']):.3f}), spread of e across faces "
            f"{h['expr_spread']:.3f}, active units of X_M {min(h['expr_active'], default=math.nan):.0%} (least of its "
            f"layers); expression transfer {mean(ex)} (1 = follows the driver's expression), through e alone "
            f"{mean(ex_e)}")
    if metrics.collapsed(h):
        line += (f"\nstep {step}: WARNING the encoder has collapsed (a patch-CNN conv with no active channel, or "
                 f"set-latents equal across tokens/images): the decoder renders from the driving frame alone. Lower "
                 f"--lr, keep --cnn-init kaiming, or restart from an earlier checkpoint")
    if metrics.expression_collapsed(h):
        line += (f"\nstep {step}: WARNING the expression vector has collapsed (e the same for every face, or an X_M "
                 f"layer with no active unit): the decoder can take no expression from the driving frame "
                 f"(RESULTS.md, 'Why e was a constant vector')")
    return line


# ----------------------------------------------------------------------------------------------------------
# one update of each network

def set_lr(opt, lr):
    for group in opt.param_groups:
        group["lr"] = lr


def apply_gradients(loss, opt, params, ctx):
    """backward + gradient all-reduce + Adam step, unless the loss or a gradient is non-finite on any rank
    (then nothing is written: weights and Adam's moments stay as they were). Returns whether it skipped."""
    opt.zero_grad(set_to_none=True)
    skipped = all_agree(not bool(torch.isfinite(loss)), ctx.world, ctx.device)
    if not skipped:
        loss.backward()
        skipped = not average_gradients(params, ctx.world)
    if not skipped:
        opt.step()
    return skipped


def train_step(run, b, ctx, perceptual=None):
    """One update of the detector (phase 0) or of FSRT (phases I-III) on this rank's batch b -> (dict of float loss
    terms incl. "loss", prediction, kp_driving, skipped)."""
    set_lr(run.opt, lr_at(ctx.args, run.iteration, run.step))
    if run.disc is not None:
        run.disc.requires_grad_(False)   # the generator's adversarial terms do not train the discriminator
    pred = kp = None
    with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=ctx.bf16):
        if ctx.args.phase == 0 and run.lm is not None:   # --lm-pretrain: X + head too (not in the paper)
            loss, terms = lm_pretrain_loss(run, b, ctx)
        elif ctx.args.phase == 0:
            loss, terms = kp_loss(run.model, b, ctx.args), {}
        else:
            loss, terms, pred, kp = generator_losses(run.model, b, ctx, run.step, ctx.gidx, perceptual, run.disc,
                                                     run.lm)
    terms["loss"] = loss.item()
    return terms, pred, kp, apply_gradients(loss, run.opt, run.params, ctx)


def disc_step(run, b, pred, kp, ctx):
    """One update of the phase-III discriminator on the real driving frames and the detached prediction -> (its loss
    lambda_A * LSGAN, as the release, skipped)."""
    set_lr(run.dopt, lr_at(ctx.args, run.iteration, run.step))
    run.disc.requires_grad_(True)
    real_scores, _ = discriminate(run.disc, b["drv"], kp)
    fake_scores, _ = discriminate(run.disc, pred.detach(), kp)
    d_loss = ctx.weights.adv * losses.d_loss(real_scores, fake_scores)
    return d_loss.item(), apply_gradients(d_loss, run.dopt, list(run.disc.parameters()), ctx)


# ----------------------------------------------------------------------------------------------------------
# one phase: its state, where it starts, the loop

@dataclass
class Run:
    """What one phase trains and where it is: the model (and phase III's discriminator), their optimisers, the
    trained parameters, the step (updates done) and iteration (the schedule's count, continued across phases
    I-III), the phase's checkpoint file, and the landmark-shape head of L_lm (None: off, the paper's training)."""
    model: srt.FSRT
    opt: torch.optim.Optimizer
    params: list
    path: str
    disc: losses.Discriminator = None
    dopt: torch.optim.Optimizer = None
    step: int = 0
    iteration: int = 0
    lm: LandmarkHead = None


def build(ctx):
    """Model, optimiser(s) and start position of this phase: resume its own checkpoint, or start from --init /
    the previous phase's checkpoint / --kp-checkpoint."""
    args, device = ctx.args, ctx.device
    cfg = model_config(args)
    torch.manual_seed(args.seed)
    model = srt.FSRT(cfg).to(device, ctx.dtype)
    dcfg = (losses.DiscConfig.tiny if args.preset == "tiny" else losses.DiscConfig)(num_kp=cfg.num_kp)
    disc = losses.Discriminator(dcfg).to(device, ctx.dtype) if args.phase == 3 else None
    if args.phase == 0:
        params = list(model.kp_detector.parameters())
    else:
        model.freeze_detector()   # eval mode (kept across train()), no gradient, not in the optimiser
        params = [p for n, p in model.named_parameters() if not n.startswith("kp_detector.")]
    lm, lm_params = landmark_training(ctx, model)   # L_lm (not in the paper): None and [] unless asked for
    params = params + lm_params
    run = Run(model, torch.optim.Adam(params, lr=args.lr), params, os.path.join(args.out, f"phase{args.phase}.pt"),
              disc, torch.optim.Adam(disc.parameters(), lr=args.lr) if disc is not None else None, lm=lm)
    restore(run, ctx)
    if dist.is_initialized():   # identical start on every rank (already true by seeding; cheap insurance)
        for t in list(model.state_dict().values()) + (list(disc.state_dict().values()) if disc else []):
            dist.broadcast(t, 0)
    return run


def restore(run, ctx):
    """Load the state this phase starts from (see build); refuse a checkpoint of another phase or model."""
    args, cfg = ctx.args, run.model.cfg
    if os.path.exists(run.path):                                        # resume this phase
        ck = load_phase(run.path, cfg, args.phase, need=RESUME)
        run.model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
        if run.disc is not None:
            run.disc.load_state_dict(ck["disc"])
            run.dopt.load_state_dict(ck["disc_optimizer"])
        run.step, run.iteration = ck["step"], ck["iteration"]
        set_rng_state(ck["rng"])
        restore_landmark_head(run, ctx, ck)
        old = {"focus": 0.0, "cooldown": 0.0, **ck.get("args", {})}       # not in older runs' args
        show = lambda v: "none" if v == "" else v                          # --loss-weights left out
        changed = [f"--{k.replace('_', '-')} {show(getattr(args, k))} (the run used {show(old[k])})"
                   for k in ("batch_size", "num_src", "pixels", "focus", "loss_weights", "seed", "lr", "warmup",
                             "cooldown") + ("steps",) * (args.cooldown > 0)     # --steps places the cooldown
                   if k in old and old[k] != getattr(args, k)]
        if changed:
            ctx.log(f"notice: resuming {run.path} with {', '.join(changed)}: the run differs from step {run.step} "
                    f"on")
    elif args.init:
        ck = load_phase(args.init, cfg, None)
        if args.phase >= 2 and ck.get("phase") == 0:
            raise ValueError(f"--init {args.init} is a phase-0 checkpoint (only its keypoint detector is trained): "
                             f"start phase {args.phase} from a phase-1 (or later) checkpoint")
        run.model.load_state_dict(ck["model"])
        restore_landmark_head(run, ctx, ck)
        head_start = os.path.join(args.out, "phase0.pt")    # --lm-pretrain's X, trained on this --init's detector
        if args.phase == 1 and args.lm_pretrain != "off" and os.path.exists(head_start):
            restore_landmark_head(run, ctx, weights.load_checkpoint(head_start), head_start=True)
    elif args.phase >= 1:
        prev = os.path.join(args.out, f"phase{args.phase - 1}.pt")
        if os.path.exists(prev) and args.phase == 1:   # phase 0 trained the detector alone: take just it
            weights.load_kp_detector(prev, run.model.kp_detector)
            restore_landmark_head(run, ctx, weights.load_checkpoint(prev), head_start=True)   # --lm-pretrain's X
        elif os.path.exists(prev):
            ck = load_phase(prev, cfg, args.phase - 1, need=RESUME[:3])
            if unfinished(ck):
                ctx.log(f"notice: {prev} stopped at step {ck['step']} of {ck['args']['steps']}; phase {args.phase} "
                        f"starts from it (rerun `--phase {args.phase - 1}` first to finish it)")
            run.model.load_state_dict(ck["model"])
            restore_landmark_head(run, ctx, ck)
            if args.phase >= 2:   # phases I-III are one run of the release: optimiser and schedule continue
                run.opt.load_state_dict(ck["optimizer"])
                run.iteration = ck["iteration"]
        elif not (args.phase == 1 and args.kp_checkpoint):
            raise FileNotFoundError(
                f"{prev} not found: run `python train.py --phase {args.phase - 1} --out {args.out}` first "
                f"(with the same model options), or pass --init PATH")
    if args.kp_checkpoint and (args.phase >= 1 or args.lm_pretrain != "off") and not os.path.exists(run.path):
        weights.load_kp_detector(args.kp_checkpoint, run.model.kp_detector)


def run_phase(ctx, stop):
    """Train one phase to --steps: the loop of named steps. Returns True when stopped by a signal or the clock."""
    args = ctx.args
    perceptual = make_perceptual(ctx) if args.phase >= 2 else None   # its weights file first: fail before work
    run = build(ctx)
    if run.step >= args.steps:
        ctx.log(f"phase {args.phase} already trained to step {run.step} ({run.path}); raise --steps to continue")
        return False
    loader = make_loader(ctx, run.step)
    monitor = Monitor(ctx, run)
    if run.step == 0:
        monitor.evaluate_and_sample(run)
    run.model.train()
    try:
        for b in loader:
            b = {k: v.to(ctx.device, ctx.dtype if v.is_floating_point() else v.dtype) for k, v in b.items()}
            run.iteration += 1
            terms, pred, kp, skipped = train_step(run, b, ctx, perceptual)              # the model's update
            if run.disc is not None:                                                      # phase III's discriminator
                terms["disc"], d_skipped = disc_step(run, b, pred, kp, ctx)
                skipped = skipped or d_skipped
            run.step += 1
            monitor.record(run.step, terms, skipped)                                      # log: losses and speed
            if due(run.step, args.log_every, args.steps):
                monitor.log(run)
            if due(run.step, args.sample_every, args.steps):                              # held-out figures, pictures
                monitor.evaluate_and_sample(run, b)
            stopping = all_agree(bool(stop) or time.time() > ctx.deadline, ctx.world, ctx.device)
            if due(run.step, args.ckpt_every, args.steps) or stopping:                    # checkpoint
                save(run, ctx)
            if stopping:                                                                # Ctrl-C, SIGTERM, --max-minutes
                monitor.close()
                ctx.log(f"stopped at step {run.step}; checkpoint {run.path} written: rerun the same command to resume")
                return True
    except BaseException:
        monitor.bar.close()            # the error line that follows starts a line of its own
        raise
    monitor.close()
    ctx.log(f"phase {args.phase} done: {run.path}")
    return False


def due(step, every, last):
    """Whether something done every `every` steps (and at the last step) is due after `step`."""
    return step % every == 0 or step == last


def make_loader(ctx, start):
    """The phase's data from step `start` on: FaceDataset samples in the order of StepSampler (this rank's slice of
    every global batch), with the motion curriculum; workers leave SIGINT/SIGTERM to the main process."""
    args = ctx.args
    ds = data.FaceDataset(root=args.data, split="train", size=args.image_size, num_src=args.num_src,
                          augment=data.Augment(jitter=not args.no_jitter, omega=not args.no_omega), seed=args.seed,
                          builtin=data.BuiltinVideos(identities=args.identities))
    motion = lambda t: args.motion_start + (args.motion - args.motion_start) * min(1.0, t / max(args.motion_ramp, 1))
    sampler = StepSampler(len(ds), args.batch_size, ctx.rank, ctx.world, args.seed, start, args.steps, motion)
    return torch.utils.data.DataLoader(Curriculum(ds), num_workers=args.workers, batch_sampler=sampler,
                                       worker_init_fn=cli.StopSignals.ignore)


def make_perceptual(ctx):
    """L_P's VGG19 (phases II, III): torchvision's weights (--vgg-weights or the torch hub cache), or 'random'."""
    args = ctx.args
    torch.manual_seed(args.seed + 1)   # an untrained VGG ('random', tests only) is the same after a resume
    vgg = weights.load_vgg19(None if args.vgg_weights == "random" else args.vgg_weights,
                             random_weights=args.vgg_weights == "random")
    return losses.PerceptualLoss(vgg).to(ctx.device, ctx.dtype)


# ----------------------------------------------------------------------------------------------------------
# the command

def memory_floor(args, world=1):
    """A lower bound of one step's memory per process in bytes, to refuse a batch that cannot fit before it swells
    memory: the batch's images (3 n_src + 4 per sample) and, from phase I on, the decoder's query features and
    render-MLP units of every decoded pixel, kept for the backward pass."""
    cfg, B = model_config(args), args.batch_size // world
    size = torch.empty((), dtype=torch.float64 if args.double else torch.float32).element_size()
    floor = B * (3 * args.num_src + 4) * 3 * args.image_size ** 2 * size
    if args.phase >= 1:
        pixels = args.pixels if args.phase == 1 else args.image_size ** 2
        floor += B * pixels * (cfg.query_dim + sum(cfg.decoder_sizes()[2])) * size
    return floor


def phases_to_run(args, log):
    """[--phase], or [0, 1] for `--phase 1` alone when no trained keypoint detector exists yet."""
    p0 = os.path.join(args.out, "phase0.pt")
    if (args.phase == 1 and not args.kp_checkpoint and not args.init
            and not os.path.exists(os.path.join(args.out, "phase1.pt"))
            and (not os.path.exists(p0) or unfinished(weights.load_checkpoint(p0)))):
        log(f"no trained keypoint detector yet ({p0}, --kp-checkpoint): running phase 0 first")
        return [0, 1]
    return [args.phase]


def start(argv):
    """Options, processes and the run folder -> (the parsed options, Context, RunLock or None)."""
    options = get_args(argv)
    args = resolve(options)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.batch_size % world:
        raise ValueError(f"--batch-size {args.batch_size} (global) must be divisible by the {world} processes")
    rank, world, device = cli.setup_processes(args.device)
    ctx = context(args, rank, world, device)
    if rank == 0 and args.precision != "fp32":
        print(f"precision: {'bf16' if ctx.bf16 else 'fp32'} ({cli.pick_precision(args.precision, device)[1]})")
    need, free = memory_floor(args, world), cli.available_memory(device)
    if free is not None and need > free:
        raise ValueError(f"--batch-size {args.batch_size} cannot fit: one step needs at least {need / 2 ** 30:.1f} "
                         f"GB on {device} (the batch's images and decoder activations), {free / 2 ** 30:.1f} GB "
                         f"are free; use a smaller --batch-size or --pixels")
    lock = None
    if rank == 0:   # one writer per run folder; then no other writer's temporary file can be alive
        if not os.path.isfile(args.out):
            cli.check_writable(args.out, folder=True)
        lock = cli.RunLock(args.out)
        cli.remove_stale_temp(args.out)
    return options, ctx, lock


def main(argv=None):
    lock = None
    try:
        options, ctx, lock = start(argv)
    except cli.EXPECTED as e:
        if int(os.environ.get("RANK", "0")) != 0:   # torchrun: the first process says it once
            return 2
        return cli.fail(e, memory_hint=MEMORY_HINT)
    except KeyboardInterrupt:                       # Ctrl-C while the data, model or checkpoint is loading
        print("\ninterrupted before training started; nothing was written", file=sys.stderr)
        return 130
    stop = cli.StopSignals("stopping after the step in flight and writing a checkpoint (exit code 130; 143 for "
                           "SIGTERM, 129 for SIGHUP); rerun the same command to resume. Ctrl-C again quits at once, "
                           "keeping the last checkpoint written")
    stopped = False
    try:
        phases = phases_to_run(ctx.args, ctx.log)
        for ph in phases:   # --steps and --lr as given apply to --phase; an earlier phase runs its preset's
            ctx = dataclasses.replace(ctx, args=resolve(options, ph, own_steps=ph == phases[-1]))
            stopped = run_phase(ctx, stop)
            if stopped:
                break
    except cli.EXPECTED as e:
        if os.environ.get("FSRT_DEBUG"):   # FSRT_DEBUG=1 shows the traceback
            raise
        return cli.fail(e, memory_hint=MEMORY_HINT) if ctx.rank == 0 else 2
    finally:
        stop.restore()
        if dist.is_initialized():
            dist.destroy_process_group()
        if lock is not None:
            lock.release()
    # stopped by a signal: 130 (SIGINT) / 143 (SIGTERM), so scripts can tell it from a finished run
    return stop.exit_code() if stopped and stop else 0


if __name__ == "__main__":
    sys.exit(main())
