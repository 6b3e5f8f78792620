"""
Speed and memory of fsrt on the machine at hand, measured in one run, printed as one table.

    python bench.py                 # CPU-sized defaults (a few minutes on 2 cores)
    python bench.py --full          # every row at the paper's 256x256 on whole frames (GPU-sized)

Rows (--skip leaves some out):
  data     frames/s of the built-in procedural dataset at 64^2 and 256^2.
  sizes    reenact.py --size N: the demo checkpoint's time per frame at 64, 128, 256, 512 (any pixel grid).
  train    one training step's time and peak memory with and without gradient pixel sub-sampling.
  decode   per-frame decode time at 256^2 of the paper preset's full and small decoder (random weights, one
           source): fp32 and bf16 of this code's path (per-frame query part and keys/values once, chunked pixels)
           and fp32 of the release's naive path (the full 480-d query per pixel), with the share of the measured
           matmul throughput reached. On CPU a subset of the 65,536 pixels is timed (the table says how many) and
           scaled: every pixel is decoded independently, Eq. (2). Target (checked here, never in timed tests):
           PSNR(bf16, fp32) >= 40 dB; both paths do the same FLOPs per pixel, so no speed-up is targeted.
  plan     FLOPs of a training step (counted) and Table 1's A100-hours at the utilisation measured here.
The header names the CPU, its bf16 support (/proc/cpuinfo flags) and the precision `--precision auto` of
reenact.py / metrics.py picks here.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

import losses
import srt
from cli import pick_precision
from keypoints import pixel_grid

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx_ne_convert")   # native bf16 arithmetic on x86


def cpu_info(cpuinfo=None):
    """(CPU model, its bf16 flags) from /proc/cpuinfo text (read on Linux when None); elsewhere platform's."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return platform.processor() or platform.machine(), []
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = fields.get("flags", "").split()
    return fields.get("model name", platform.processor() or "unknown CPU"), [f for f in BF16_FLAGS if f in flags]


def timeit(fn, device, repeat=3):
    """The least wall time of `repeat` calls of fn after one warm-up call, waiting for the GPU on CUDA."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_flops(device, dtype, n=2048):
    """Measured dense matmul throughput of this machine (FLOP/s)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n ** 3 / timeit(lambda: a @ b, device, repeat=5)


def decoder_flops_per_pixel(model, num_tokens):
    """FLOPs (2 x multiply-adds) of the decoder for one pixel: every linear layer except the set-latents'
    keys/values (once per source set) and the per-frame columns of the query MLP's first layer (once per
    frame), plus q.k and attn.v over the num_tokens set-latents."""
    dec, cfg = model.decoder, model.cfg
    flops = sum(2 * m.in_features * m.out_features for name, m in dec.named_modules()
                if isinstance(m, torch.nn.Linear) and not name.endswith("c_kv"))
    first = dec.query_mlp[0]
    flops -= 2 * (first.in_features - cfg.pix_dim) * first.out_features
    return flops + len(dec.blocks) * 2 * 2 * dec.blocks[0].heads * cfg.dec_head_dim * num_tokens


def encode_pair(model, src, drv):
    """(set-latents of the sources src [B,N,3,S,S], keypoints and e of the driving frames drv [B,3,S,S])."""
    kp_s, e_s = model.keypoints_and_expression(src[:, 0])
    kp_d, e_d = model.keypoints_and_expression(drv)
    return model.encode(src, kp_s[:, None], e_s[:, None]), kp_d, e_d


def bench_decode(args, device, rows):
    px_total = args.size * args.size
    npx = px_total if args.full or device.type == "cuda" else args.cpu_pixels
    pixels = pixel_grid(args.size, args.size, device=device)[:npx]
    for small in (False, True):
        model = srt.FSRT(srt.FSRTConfig.paper(image_size=args.size, small_decoder=small)).to(device).eval()
        with torch.no_grad():
            img = torch.rand(1, 1, 3, args.size, args.size, device=device)
            latents, kp, e = encode_pair(model, img, img[:, 0])
            kv = model.latent_kv(latents)
        name = "small" if small else "full"
        outs, times = {}, {}
        for path, dtype in (("optimised", torch.float32), ("optimised", torch.bfloat16), ("naive", torch.float32)):
            def run():
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=dtype == torch.bfloat16):
                    if path == "naive":
                        return model.decode_naive(latents, pixels, kp, e, chunk=args.chunk)
                    return model.decode(latents, pixels, kp, e, chunk=args.chunk, kv=kv)
            t = times[path, dtype] = timeit(run, device, args.repeat) * px_total / npx
            outs[path, dtype] = run().float()
            peak = matmul_flops(device, dtype)
            achieved = decoder_flops_per_pixel(model, latents.shape[1]) * px_total / t
            label = "naive (as the release)" if path == "naive" else "optimised"
            rows.append((f"decode {name} {label} {str(dtype).split('.')[-1]}", f"{t * 1000:.1f} ms/frame",
                         f"{achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of matmul "
                         f"({peak / 1e9:.0f} GFLOP/s); timed {npx} px"))
        ref = outs["optimised", torch.float32]
        psnr = float(losses.psnr(outs["optimised", torch.bfloat16], ref, peak=(ref.max() - ref.min()).item() or 1.0))
        speedup = times["optimised", torch.float32] / times["optimised", torch.bfloat16]
        rows.append((f"decode {name} bf16 vs fp32", f"{speedup:.2f}x the speed",
                     f"PSNR(bf16, fp32) {psnr:.1f} dB (>= 40 dB: {'OK' if psnr >= 40 else 'MISSED'})"))


def bench_data(args, device, rows):
    import builtin_faces as faces
    for size, n in ((64, 200), (256, 40)):
        rng = np.random.default_rng(0)
        params = [(faces.sample_identity(rng), faces.sample_pose(rng), faces.sample_expression(rng)) for _ in range(n)]
        t0 = time.perf_counter()
        for ident, pose, expr in params:
            faces.render_face(ident, pose, expr, size=size)
        fps = n / (time.perf_counter() - t0)
        rows.append((f"data render {size}^2", f"{fps:.0f} frames/s", "one process, built-in procedural faces"))


def bench_sizes(args, device, rows):
    """reenact.py --size N: the demo checkpoint (64x64) rendering 8 driving frames at N x N from one source (encoded
    once, as in a video), per frame, fp32 and the precision --precision auto picks; the decoder's cost grows with
    the N^2 pixels it is queried at."""
    import reenact
    import weights
    model = weights.model_from_checkpoint(reenact.BUILTIN_CKPT, device=device)
    S = model.cfg.image_size
    src, drv = torch.rand(1, 3, S, S, device=device), torch.rand(8, 3, S, S, device=device)
    auto = pick_precision("auto", device)[0] == "bf16"
    base = None
    for size in (64, 128, 256, 512):
        times = [timeit(lambda: reenact.reenact(model, src, drv, render=reenact.Render(size=size, bf16=bf16)),
                        device, args.repeat) / len(drv) for bf16 in sorted({False, auto})]
        base = base or times[0]
        rows.append((f"reenact --size {size} (demo model {S}^2)", f"{times[0] * 1000:.0f} ms/frame fp32",
                     (f"{times[-1] * 1000:.0f} ms bf16; " if auto else "") + f"{times[0] / base:.1f}x the 64^2 time "
                     f"({(size / 64) ** 2:.0f}x the pixels)"))


def bench_train_step(args, device, rows):
    """Each variant runs in a fresh process so that its peak memory is its own."""
    for subsample, bf16 in ((False, False), (True, False), (True, True)):
        name = ("gradient pixel sub-sampling" if subsample else "gradient on every pixel") + (", bf16" if bf16 else "")
        cmd = [sys.executable, __file__, "--_train-step", "1" if subsample else "0", "--preset", args.preset,
               "--train-size", str(args.train_size), "--batch", str(args.batch)] + (["--_bf16"] if bf16 else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            rows.append((f"train step ({name})", "FAILED", out.stderr.strip().splitlines()[-1:]))
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((f"train step phase II {args.preset} {args.train_size}^2 bs {args.batch} ({name})",
                     f"{r['time'] * 1000:.0f} ms/step", f"peak memory {r['peak_mb']:.0f} MB ({r['mem_kind']})"))


def _train_step_child(args):
    """The child process of bench_train_step: times 3 phase-II steps, prints its one JSON line."""
    import train
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = (srt.FSRTConfig.paper if args.preset == "paper" else srt.FSRTConfig.tiny)(image_size=args.train_size)
    model = srt.FSRT(cfg).to(device)
    model.freeze_detector()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    perc = losses.PerceptualLoss(losses.VGG19()).to(device)
    S, B = args.train_size, args.batch
    src, drv = torch.rand(B, 1, 3, S, S, device=device), torch.rand(B, 3, S, S, device=device)

    def step():   # the forward under bf16 autocast with --_bf16, as train.py --precision bf16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args._bf16):
            latents, kp_d, e_d = encode_pair(model, src, drv)
            if args._train_step == 1:
                pred = train.render_subsampled(model, latents, kp_d, e_d, (S, S), (0, 1)).float()
            else:
                pred = model.render(latents, kp_d, e_d, (S, S)).float()
            loss = (pred - drv).pow(2).mean() + perc(pred, drv)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = timeit(step, device, repeat=3)
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated() / 2 ** 20, "CUDA allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"
    print(json.dumps({"time": t, "peak_mb": peak, "mem_kind": kind}))


PAPER_STEPS = {1: 200_000, 2: 300_000, 3: 500_000}   # Sec. 3.3; batch 24
A100_BF16 = 312e12                                    # dense bf16 tensor-core peak, FLOP/s


def step_flops(phase, S=256, pixels=4096):
    """FLOPs of one training sample (forward + backward) of the paper preset, counted on the meta device
    (no memory, no time): detector + expression net on source and driving frames, encoder, decoder
    (phase I: `pixels` sampled pixels; phase II/III: 1/4 of the image with gradient, 3/4 without),
    VGG19 at full resolution (phase II/III) and discriminator on real and fake images (phase III)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = srt.FSRT(srt.FSRTConfig.paper(image_size=S))
        vgg = losses.VGG19() if phase >= 2 else None
        disc = losses.Discriminator() if phase >= 3 else None
    model.freeze_detector()
    src, drv = torch.rand(1, 1, 3, S, S, device="meta"), torch.rand(1, 3, S, S, device="meta")
    counter = FlopCounterMode(display=False)
    with counter:
        z, kp_d, e_d = encode_pair(model, src, drv)
        grid = pixel_grid(S, S, device="meta")
        n_grad = pixels if phase == 1 else S * S // 4
        loss = model.decode(z, grid[:n_grad], kp_d, e_d).pow(2).mean()
        if phase >= 2:
            with torch.no_grad():
                model.decode(z.detach(), grid[n_grad:], kp_d, e_d)
            img = torch.rand(1, 3, S, S, device="meta", requires_grad=True)
            loss = loss + sum(f.mean() for f in vgg(img))   # one scale, as the release: prediction with
            with torch.no_grad():                             # gradient, target without
                vgg(img)
            if phase >= 3:
                scores, feats = disc(img, kp_d)
                loss = loss + scores.mean() + disc(img.detach(), kp_d)[0].mean()
        loss.backward()
    return counter.get_total_flops()


def bench_plan(args, device, rows):
    """Costed plan for Table 1: FLOPs per step (counted) and a measured step time on this machine give the
    fraction of matmul peak a training step reaches; GPU-hours assume an A100 reaching the same fraction."""
    fl = {p: step_flops(p) for p in (1, 2, 3)}
    model = srt.FSRT(srt.FSRTConfig.paper()).to(device)   # measured: one phase-I sample of the paper preset, 256^2
    model.freeze_detector()
    S = 256
    src, drv = torch.rand(1, 1, 3, S, S, device=device), torch.rand(1, 3, S, S, device=device)
    pix = pixel_grid(S, S, device=device)[torch.randperm(S * S, device=device)[:4096]]

    def step():
        z, kp_d, e_d = encode_pair(model, src, drv)
        model.decode(z, pix, kp_d, e_d).pow(2).mean().backward()
    t = timeit(step, device, repeat=1)
    util = fl[1] / t / matmul_flops(device, torch.float32)
    rows.append(("plan: measured paper phase-I sample (fwd+bwd)", f"{t:.2f} s",
                 f"{fl[1] / 1e12:.2f} TFLOP -> {100 * util:.0f}% of this machine's fp32 matmul peak"))
    total = 0
    for p in (1, 2, 3):
        step_s = 24 * fl[p] / (A100_BF16 * util)
        hours = PAPER_STEPS[p] * step_s / 3600
        total += hours
        rows.append((f"plan: phase {'I' * p} ({PAPER_STEPS[p]:,} steps x batch 24)",
                     f"{hours:,.0f} A100-hours", f"{fl[p] / 1e12:.2f} TFLOP/sample, {step_s:.2f} s/step on one A100"
                     f" at {100 * util:.0f}% of bf16 peak"))
    rows.append(("plan: Table 1 (one model, phases I-III)", f"{total:,.0f} A100-hours",
                 f"= {total / 3:,.0f} h on the paper's 3 A100s; each ablation row costs the same again"))


BENCHES = {"data": bench_data, "sizes": bench_sizes, "train": bench_train_step, "decode": bench_decode,
           "plan": bench_plan}   # the rows, in this order


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="decode image size (paper: 256)")
    p.add_argument("--cpu-pixels", type=int, default=2048, help="pixels timed per decode on CPU (scaled to a frame)")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--full", action="store_true", help="whole frames, paper preset at 256^2 for the train rows")
    p.add_argument("--preset", default=None, help="train-step preset (default: paper on CUDA/--full, tiny on CPU)")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=list(BENCHES))
    p.add_argument("--_train-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--_bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    big = args.full or torch.cuda.is_available()
    args.preset = args.preset or ("paper" if big else "tiny")
    args.train_size = args.train_size or (256 if args.preset == "paper" else 64)
    args.batch = args.batch or (4 if args.preset == "paper" else 8)
    if args._train_step is not None:
        return _train_step_child(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name, bench in BENCHES.items():
        if name not in args.skip:
            bench(args, device, rows)
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    model, flags = cpu_info()
    precision, why = pick_precision("auto", device)
    print(f"\nfsrt bench on {dev}, torch {torch.__version__}")
    print(f"CPU: {model}; bf16 support: {', '.join(flags) or 'no native bf16 (no avx512_bf16 / amx_bf16 flag)'}")
    print(f"--precision auto picks {precision} here ({why})")
    if hasattr(os, "getloadavg"):
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes slow every row)")
    w0, w1 = max(len(r[0]) for r in rows), max(len(str(r[1])) for r in rows)
    for r in rows:
        print(f"{r[0]:<{w0}}  {str(r[1]):<{w1}}  {r[2]}")


if __name__ == "__main__":
    main()
