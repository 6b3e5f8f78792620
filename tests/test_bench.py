"""bench.py's arithmetic: the FLOP counts behind its utilisation figures and the Table-1 plan."""
import torch

import bench
import srt


def test_decoder_flops_per_pixel_by_hand():
    """Paper decoder, 1,024 set-latents: query MLP (pixel columns 64x720 + 720x480), 2 blocks of
    (q 480x768, out 768x480, MLP 480x1536x480, q.k and a.v over 1,024 tokens), render MLP."""
    with torch.device("meta"):
        model = srt.FSRT(srt.FSRTConfig.paper())
    macs = 64 * 720 + 720 * 480
    macs += 2 * (480 * 768 + 768 * 480 + 2 * 480 * 1536 + 2 * 768 * 1024)
    macs += 480 * 1536 + 3 * 1536 * 1536 + 1536 * 3
    assert bench.decoder_flops_per_pixel(model, 1024) == 2 * macs


def test_step_flops_grow_with_the_phases():
    """Phase I decodes 4,096 pixels; phase II decodes the whole frame (here 128^2) (1/4 with gradient) plus VGG;
    phase III adds the discriminator. The decoder's share alone fixes a lower bound for each."""
    f1, f2 = bench.step_flops(1, S=128, pixels=1024), bench.step_flops(2, S=128)
    f3 = bench.step_flops(3, S=128)
    with torch.device("meta"):
        model = srt.FSRT(srt.FSRTConfig.paper(image_size=128))
    per_px = bench.decoder_flops_per_pixel(model, 256)
    assert f1 > 3 * 1024 * per_px * 0.9          # forward + backward of the sampled pixels
    assert f2 > f1 and f3 > f2
    assert f2 > (3 * 4096 + 3 * 4096) * per_px * 0.9   # 4,096 pixels with gradient, 12,288 without


def test_cpu_info_reads_model_and_bf16_flags():
    text = ("processor\t: 0\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC 9B14\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert bench.cpu_info(text) == ("AMD EPYC 9B14", ["avx512_bf16"])
    assert bench.cpu_info("model name : Old CPU\nflags : fpu sse2 avx2\n") == ("Old CPU", [])
