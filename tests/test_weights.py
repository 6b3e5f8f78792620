"""Tests of weights.py: checkpoints written atomically and read back weights_only, files recognised by content."""
import pytest
import torch
from PIL import Image

import srt
import weights


def test_a_checkpoint_round_trips_and_builds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = srt.FSRT(srt.FSRTConfig.tiny(image_size=32))
    path = tmp_path / "m.pt"
    weights.save_checkpoint(str(path), {"config": model.cfg.to_dict(), "model": model.state_dict(), "step": 3,
                                        "phase": 1})
    ck = weights.load_checkpoint(str(path))
    assert ck["format"] == "fsrt" and ck["step"] == 3
    again = weights.model_from_checkpoint(str(path))
    assert again.cfg == model.cfg
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_files_that_are_not_checkpoints_are_named_by_their_first_bytes(tmp_path):
    png, mp4, empty = tmp_path / "a.pt", tmp_path / "b.pt", tmp_path / "c.pt"
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    mp4.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(20))
    empty.write_bytes(b"")
    assert "PNG" in weights.what_file(str(png)) and "MP4" in weights.what_file(str(mp4))
    assert weights.what_file(str(empty)) == "empty"
    with pytest.raises(ValueError, match="PNG"):
        weights.load_checkpoint(str(png))
