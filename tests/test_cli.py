"""Tests of cli.py, the command-line plumbing: one-line errors and warnings, option checks, atomic writes."""
import argparse
import os
import warnings

import pytest

import cli


def test_atomic_path_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(RuntimeError):
        with cli.atomic_path(str(out)) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("stopped while writing")
    assert out.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]        # the old file whole
    with cli.atomic_path(str(out)) as tmp:
        assert tmp.endswith(".txt") and os.path.dirname(os.path.dirname(tmp)) == str(tmp_path)
        open(tmp, "w").write("new")
    assert out.read_text() == "new" and os.listdir(tmp_path) == ["out.txt"]


def test_atomic_path_writes_through_a_symlink(tmp_path):
    target, link = tmp_path / "target.txt", tmp_path / "link.txt"
    target.write_text("old")
    link.symlink_to(target)
    with cli.atomic_path(str(link)) as tmp:
        open(tmp, "w").write("new")
    assert link.is_symlink() and target.read_text() == "new"


def test_check_numbers_names_the_option_and_its_rule():
    args = argparse.Namespace(lr=0.0, warmup=5, steps=None)
    with pytest.raises(ValueError, match=r"^--lr 0.0: must be > 0$"):
        cli.check_numbers(args, {"warmup": ">= 0", "lr": "> 0", "steps": ">= 0"})
    with pytest.raises(ValueError, match="--warmup nan"):
        cli.check_numbers(argparse.Namespace(warmup=float("nan")), {"warmup": ">= 0"})
    cli.check_numbers(args, {"warmup": ">= 0", "steps": ">= 0"})                 # None = not set: accepted


def test_run_command_gives_one_error_line_exit_2_and_one_line_warnings(capsys):
    def run(args):
        warnings.warn("a frame was skipped")
        raise ValueError(f"{args.path}: not an image")
    assert cli.run_command(run, argparse.Namespace(path="x.png")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["warning: a frame was skipped", "error: x.png: not an image"], err
    assert warnings.showwarning is not cli.one_line_warning                      # restored afterwards


def test_run_command_exits_130_after_ctrl_c(capsys):
    def run(args):
        raise KeyboardInterrupt
    assert cli.run_command(run, None) == 130
    assert "interrupted (SIGINT)" in capsys.readouterr().err
