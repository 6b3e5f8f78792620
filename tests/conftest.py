import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from builtin_faces import Identity   # noqa: E402 (the repository root on the path first)

torch.set_num_threads(min(2, os.cpu_count() or 1))

# a built-in test face with distinct lip and eye colours, on a plain background (the renderer's and data's tests)
GREEN, BLUE = (0.0, 0.9, 0.1), (0.1, 0.2, 0.95)
IDENT = Identity(skin=(0.85, 0.65, 0.5), lip=GREEN, eye_colour=BLUE, hair=(0.1, 0.05, 0.02),
                 background=(0.3, 0.8, 0.9), background_kind=0)


# the paper's recipe at the tiny preset's sizes: its departures for the expression (train.PRESETS) turned off
PAPER_RECIPE = ["--lm-pretrain", "off", "--focus", "0", "--cooldown", "0"]


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same seeds."""
    import random
    import numpy as np
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A random small model at 32x32 saved as a phase-I checkpoint, and a phase-0 one of the same model (the
    command-line tests' model: what it renders does not matter, only that it runs)."""
    import srt
    import weights
    torch.manual_seed(0)
    cfg = srt.FSRTConfig.tiny(image_size=32, width=32, enc_blocks=1, enc_heads=2, enc_head_dim=16, enc_mlp=64,
                              dec_heads=2, dec_head_dim=16, dec_mlp=32, render_hidden=(32, 32),
                              cnn_channels=((8, 16), (16, 32), (32, 32)))
    d = tmp_path_factory.mktemp("ckpt")
    for phase in (0, 1):
        weights.save_checkpoint(str(d / f"phase{phase}.pt"), {"config": cfg.to_dict(), "model": srt.FSRT(cfg).state_dict(),
                                                             "step": 0, "phase": phase})
    return str(d / "phase1.pt")
