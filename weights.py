"""Every weights file of the project (not in the paper), recognised by content, loaded with weights_only=True
(tensors and plain containers only: loading never runs code from the file) and written atomically:
  * this project's checkpoints (train.py): {"format": "fsrt", "config", "model", "step", "phase", ...};
  * the authors' release (andrerochow/fsrt): vox256.pt / vox256_2Source.pt + kp_detector.pt;
  * the keypoint detector of FOMM's vox-cpk.pth.tar, the release's kp_detector.pt or a project checkpoint;
  * torchvision's VGG19 (vgg19-dcbb9e9d.pth) for the perceptual loss.
Every error is one line naming the file, what it is, and what to pass instead.
"""
import dataclasses
import errno
import math
import os
import re
import shutil
import zipfile

import torch

import cli
import losses
from keypoints import KPDetector
from srt import FSRT, FSRTConfig

# -----------------------------------------------------------------------------
# reading and writing


def save(obj, path):
    """torch.save through cli.atomic_path (a unique temporary file beside `path`, then renamed over it); a full
    disk is reported as ENOSPC (torch says "enforce fail ... file write failed")."""
    with cli.atomic_path(path, suffix=".pt") as tmp:
        try:
            with open(tmp, "wb") as f:
                torch.save(obj, f)
        except (RuntimeError, OSError) as err:
            folder = os.path.dirname(os.path.abspath(path))
            free = shutil.disk_usage(folder).free
            if free < 2 ** 20 + sum(t.numel() * t.element_size() for t in _tensors(obj)):
                raise OSError(errno.ENOSPC, f"No space left on device ({free / 2 ** 20:.0f} MB free, "
                              f"{type(err).__name__}: {str(err)[:100]})", path) from None
            raise


def save_checkpoint(path, ckpt):
    """Atomic save of a project checkpoint (adds format='fsrt')."""
    save({"format": "fsrt", **ckpt}, path)


def load_reason(err):
    """Why torch.load failed, in one line ("TypeName: reason"). Never repeats torch's hint to retry with
    weights_only=False: that would run whatever code the file holds."""
    msg = str(err)
    if "Weights only load failed" in msg:
        found = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", msg, re.I)
        return (f"{type(err).__name__}: it holds Python objects besides tensors "
                f"({found.group(1) if found else 'custom classes'}); they were not unpickled, as that could run code")
    return f"{type(err).__name__}: {(msg.splitlines() or [''])[0].split('. ')[0][:160]}"


def _numpy_scalars():
    """Globals a weights_only load may build besides tensors: numpy scalars, as in the release's training
    counters (saved by numpy 1 as numpy.core..., by numpy 2 as numpy._core...)."""
    import numpy as np
    scalar = (np._core if hasattr(np, "_core") else np.core).multiarray.scalar
    return [np.dtype, *{type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)},
            (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar")]


FILE_KINDS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF"),
              (b"RIFF", "a WebP image or AVI video"), (b"\x1aE\xdf\xa3", "a Matroska/WebM video"),
              (b"{", "a JSON or text file"))


def what_file(path):
    """What a file that torch cannot load is, from its first bytes ("a PNG image", ...), or None."""
    with open(path, "rb") as f:
        head = f.read(12)
    if not head:
        return "empty"
    if head[4:8] == b"ftyp":
        return "an MP4/MOV video"
    for magic, kind in FILE_KINDS:
        if head.startswith(magic):
            return kind
    if head[:1] == b"\x80" and not zipfile.is_zipfile(path):
        return "a plain Python pickle, not torch.save's zip archive"
    return None


def check_file(path, hint, what="checkpoint"):
    """A weights file that exists and is a regular file (not a folder, fifo or device such as /dev/null)
    -> its path; else a one-line error ending with `hint`."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a folder, not a {what} file; {hint}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}; {hint}")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file (a fifo, socket or device), not a {what}; {hint}")
    return path


def read(path, hint, mmap=True, map_location="cpu"):
    """torch.load(weights_only=True); mmap: zip files memory-mapped, copy-on-write (the release's files carry
    optimizer state we never copy). Errors are one line naming the file and what it is, ending with `hint`."""
    path = check_file(path, hint)
    kind = what_file(path)
    if kind and (kind.endswith("image") or kind.endswith("video") or kind in ("empty", "a GIF")):
        raise ValueError(f"{path} is {kind}, not a torch checkpoint; {hint}")
    try:
        with torch.serialization.safe_globals(_numpy_scalars()):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except Exception as err:
        what = f" it is {kind};" if kind else ""
        raise RuntimeError(f"cannot read {path} as a torch checkpoint ({load_reason(err)});{what} the file "
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
    ckpt = read(path, "pass a .pt file written by train.py", mmap=False, map_location=map_location)
    return _check(ckpt, os.fspath(path))


def _check(ckpt, where):
    """A loaded project checkpoint, its config and weights checked (config_problem) -> ckpt; else one line."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != "fsrt":
        raise ValueError(f"{where} is not an fsrt checkpoint: it is {_describe(ckpt)}. Pass a checkpoint "
                         "written by train.py (a dict with format='fsrt', config, model) or the authors' vox256.pt")
    problem = next((f"its {k} is missing" for k in ("config", "model") if k not in ckpt), None) or \
        config_problem(ckpt)
    if problem:
        raise ValueError(f"{where} is a malformed fsrt checkpoint: {problem}; the file was edited or damaged: use "
                         f"the file train.py wrote (or train again)")
    return ckpt


# fields a project checkpoint's config may lack (they do not shape the weights: a default is right for them)
OPTIONAL_FIELDS = (*FSRTConfig.NOT_WEIGHTS, "expression.init")
INIT_CHOICES = ("kaiming", "torch")


def config_problem(ckpt):
    """What is wrong with a project checkpoint's config, phase and weights, in words ("config.image_size '32' is
    not an int"), or None. Every field that shapes the weights must be there: a default would silently build
    another model."""
    model, phase = ckpt["model"], ckpt.get("phase", 1)
    if not isinstance(model, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in model.items()):
        return f"its model is {_describe(model) if isinstance(model, dict) else 'a ' + type(model).__name__}, " \
               f"not a dict of named tensors"
    if type(phase) is not int or not 0 <= phase <= 3:
        return f"its phase {phase!r} is not one of 0, 1, 2, 3"
    problem = _fields_problem(ckpt["config"], FSRTConfig, "config")
    if problem:
        return problem
    size = ckpt["config"]["image_size"]
    if not 8 <= size <= 4096 or size % 8:
        return f"config.image_size {size} is not a multiple of 8 in [8, 4096] (the patch CNN halves it 3 times)"
    trained = ckpt.get("args", {}).get("image_size") if isinstance(ckpt.get("args"), dict) else None
    if trained is not None and trained != size:
        return f"config.image_size {size} differs from the image size it was trained at ({trained}, its args)"
    return None


def _fields_problem(d, klass, where):
    """The first malformed field of config dict `d` for dataclass `klass` (nested ones too), or None."""
    if not isinstance(d, dict):
        return f"{where} is a {type(d).__name__}, not a dict"
    defaults = klass()
    for f in dataclasses.fields(klass):
        name, default = f"{where}.{f.name}", getattr(defaults, f.name)
        if f.name not in d:
            if name.split(".", 1)[1] in OPTIONAL_FIELDS:
                continue
            return f"{name} is missing"
        v = d[f.name]
        if dataclasses.is_dataclass(default):
            nested = _fields_problem(v, type(default), name)
            if nested:
                return nested
            continue
        if isinstance(default, bool):
            problem = None if isinstance(v, bool) else "not true/false"
        elif isinstance(default, int):
            problem = "not an int" if type(v) is not int else None if v >= 1 or "start_octave" in f.name else "< 1"
        elif isinstance(default, float):
            ok = type(v) in (int, float) and math.isfinite(v) and v > 0
            problem = None if ok else "not a number > 0"
        elif isinstance(default, str):
            problem = None if v in INIT_CHOICES else f"not one of {', '.join(INIT_CHOICES)}"
        else:                                    # tuples of sizes, e.g. cnn_channels ((16, 32), ...)
            flat = list(_leaves(v)) if isinstance(v, (list, tuple)) and v else None
            ok = flat and all(type(x) is int and x >= 1 for x in flat) and \
                all(isinstance(x, (list, tuple)) == isinstance(default[0], tuple) for x in v)
            problem = None if ok else "not a list of sizes >= 1 shaped as " + repr(default)
        if problem:
            return f"{name} {v!r} is {problem}"
    return None


def _leaves(v):
    for x in v:
        yield from (_leaves(x) if isinstance(x, (list, tuple)) else [x])


def model_from_checkpoint(path_or_dict, device="cpu", kp_detector=None):
    """Build FSRT from a checkpoint recognised by content -> model in eval mode: a train.py checkpoint (path
    or loaded dict), or the authors' vox256.pt / vox256_2Source.pt with kp_detector = their kp_detector.pt."""
    where = "the given dict" if isinstance(path_or_dict, dict) else os.fspath(path_or_dict)
    ckpt = path_or_dict if isinstance(path_or_dict, dict) else read(path_or_dict, "pass a .pt file written by "
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
    own = model.state_dict()
    wrong = next((k for k, v in ckpt["model"].items() if k in own and v.shape != own[k].shape), None)
    if wrong:   # one key, not torch's list of every mismatch
        raise ValueError(f"{where} is a malformed fsrt checkpoint: its weight {wrong} has shape "
                         f"{tuple(ckpt['model'][wrong].shape)}, its config makes {tuple(own[wrong].shape)}; the "
                         f"config does not describe these weights (the file was edited or damaged): use the file "
                         f"train.py wrote")
    missing, unexpected = model.load_state_dict(ckpt["model"], strict=False)
    if missing or unexpected:   # a short message instead of torch's list of every key
        raise ValueError(f"{where} does not match this srt.py ({len(missing)} missing keys, e.g. {missing[:2]}; "
                         f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}): it was written by another "
                         "version of the code; retrain or use the matching version")
    return model.freeze_detector().to(device).eval()          # phase >= 1: the detector stays as phase 0 left it


def weights_config(d):
    """A config dict (FSRTConfig.to_dict(), or a checkpoint's) without the fields in FSRTConfig.NOT_WEIGHTS (and
    the expression net's init): two configs equal under it give weights of the same names and shapes."""
    d = {k: v for k, v in d.items() if k not in FSRTConfig.NOT_WEIGHTS}
    if isinstance(d.get("expression"), dict):
        d["expression"] = {k: v for k, v in d["expression"].items() if k != "init"}
    return d


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
    """The authors' vox256.pt / vox256_2Source.pt + kp_detector.pt (paths or loaded dicts) -> FSRT of the paper
    preset in eval mode with a frozen detector; the small decoder is recognised by its keys."""
    name = name or (os.fspath(checkpoint) if not isinstance(checkpoint, dict) else "the release checkpoint")
    ck = checkpoint if isinstance(checkpoint, dict) else read(checkpoint, "pass the authors' vox256.pt")
    if _kind(ck) != "release":
        raise ValueError(f"{name} is not the authors' release checkpoint (vox256.pt: a dict of encoder, decoder "
                         f"and expression_encoder state dicts): it is {_describe(ck)}")
    if kp_detector is None:
        raise ValueError(f"{name} is the authors' release checkpoint, which holds no keypoint detector: also "
                         "pass their kp_detector.pt (reenact.py / metrics.py: --kp-detector kp_detector.pt)")
    det_name = os.fspath(kp_detector) if not isinstance(kp_detector, dict) else "the detector dict"
    det = kp_detector if isinstance(kp_detector, dict) else read(kp_detector, "pass the authors' kp_detector.pt")
    if _kind(det) in ("fsrt", "release"):
        raise ValueError(f"{det_name} is not a keypoint-detector file: it is {_describe(det)}; pass the "
                         "authors' kp_detector.pt as the detector")
    model = FSRT(FSRTConfig.paper(small_decoder="render_mlp.6.weight" not in ck["decoder"]))
    load_kp_state(det, model.kp_detector, det_name, expected="the authors' kp_detector.pt or FOMM's vox-cpk.pth.tar")
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
    """Write a paper-preset model in the release's format (the authors' demo.py loads it): the exact inverse of
    load_release, keys in the release's order."""
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
    save({m: out[m] for m in RELEASE}, checkpoint)
    save(out["kp_detector"], kp_detector)


# -----------------------------------------------------------------------------
# keypoint detectors: FOMM's vox-cpk.pth.tar, the release's kp_detector.pt, a project checkpoint

def _short(keys, n=4):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


KP_FILES = "FOMM's vox-cpk.pth.tar, a kp_detector state dict, or an fsrt checkpoint"


def load_kp_detector(path, detector: KPDetector) -> KPDetector:
    """Load detector weights strictly from FOMM's `vox-cpk.pth.tar` (its `kp_detector` entry, `jacobian.*`
    dropped), a plain detector state dict (e.g. the FSRT release's kp_detector.pt), or an fsrt checkpoint
    ({"format": "fsrt", "model": {...}} with keys prefixed `kp_detector.`). Returns the detector."""
    path = check_file(path, "download FOMM's vox-cpk.pth.tar (from the first-order-model repository) and pass "
                            "its path, or train phase 0 with `python train.py --phase 0`",
                      what="keypoint detector checkpoint")
    return load_kp_state(read(path, f"expected {KP_FILES}", mmap=False), detector, repr(path))


def load_kp_state(obj, detector: KPDetector, where: str, expected: str = KP_FILES) -> KPDetector:
    """load_kp_detector on a loaded object; `where` names it in errors, `expected` says what fits."""
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


# -----------------------------------------------------------------------------
# VGG19 (torchvision's file) for the perceptual loss L_P

VGG19_FILE = "vgg19-dcbb9e9d.pth"
VGG19_URL = "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"
VGG19_HINT = f"expected torchvision's {VGG19_FILE} ({VGG19_URL})"


def vgg19_weights_path():
    """Where torchvision (and this file) keep the VGG19 weights: <torch hub dir>/checkpoints/."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG19_FILE)


def load_vgg19(weights_path=None, random_weights=False):
    """A frozen VGG19 with torchvision's ImageNet weights from `weights_path`, else the torch hub cache (downloaded
    there when missing and online); random_weights=True: no file (tests only: the loss is then not perceptual)."""
    vgg = losses.VGG19()
    if random_weights:
        return vgg
    if weights_path is not None:
        check_file(weights_path, f"download {VGG19_URL} and pass its path, or leave the path out to use "
                                 f"{vgg19_weights_path()}", what="VGG19 weights")
        sd = read(weights_path, VGG19_HINT, mmap=False)
    elif os.path.isfile(vgg19_weights_path()):
        sd = read(vgg19_weights_path(), VGG19_HINT, mmap=False)
    else:
        try:
            sd = torch.hub.load_state_dict_from_url(VGG19_URL, map_location="cpu", progress=False)
        except Exception as err:  # offline, proxy, ...
            raise FileNotFoundError(
                f"VGG19 weights {VGG19_FILE} are missing and could not be downloaded ({type(err).__name__}: "
                f"{err}). Download {VGG19_URL} and put it at {vgg19_weights_path()} (or pass its path), "
                f"or ask explicitly for random VGG weights (random_weights=True) for tests") from None
    try:
        vgg.load_torchvision(sd)
    except RuntimeError as err:
        raise RuntimeError(f"{weights_path or vgg19_weights_path()} is not torchvision's VGG19 state dict: "
                           f"{err}") from None
    return vgg
