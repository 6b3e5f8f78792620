"""Command-line plumbing shared by train.py, reenact.py, metrics.py and data.py (not in the paper): errors in one
line, option checks made before any long work, stop signals, one run per folder, temporary-file-and-rename
writes, the precision choice and torchrun's processes. Imports only the standard library and torch.
"""
import atexit
import contextlib
import errno
import functools
import glob
import math
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings

import torch
import torch.distributed as dist

# -----------------------------------------------------------------------------
# errors: one line for a person, anything unexpected (a bug) keeps its traceback

EXPECTED = (ValueError, FileNotFoundError, RuntimeError, OSError, MemoryError)   # the exceptions ended in one line

# a data-loader worker's exception as the main process re-raises it (torch's ExceptionWrapper): the
# original message is the part after the traceback's last "ExcType: "
WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.\nOriginal Traceback .*\n(?:[\w.]+\.)?\1: "
                          r"(.*)\Z", re.S)


def error_line(err, memory_hint=None):
    """An exception -> one line saying what went wrong: out of memory (then `memory_hint`: the command's options
    that lower it) and a full disk said plainly; a data-loader worker's error as the same error in the main
    process would read (without the worker's traceback)."""
    msg = str(err)
    worker = WORKER_ERROR.search(msg)
    msg = " ".join((worker.group(2) if worker else msg).split()) or type(err).__name__
    if isinstance(err, MemoryError) or re.search(r"out of memory|can't allocate memory|Cannot allocate memory", msg):
        msg = f"out of memory ({msg[:300]}): {memory_hint or 'use smaller sizes'}, or close other programs"
    elif isinstance(err, OSError) and err.errno == errno.ENOSPC:
        msg = f"the disk is full: cannot write {err.filename or ''} ({err.strerror}); free some space and rerun"
    elif "No space left on device" in msg:                     # e.g. reported by ffmpeg while writing a video
        msg = f"the disk is full ({msg[:300]}); free some space and rerun"
    return msg if len(msg) <= 1000 else msg[:1000] + " ..."


def fail(err, code=2, memory_hint=None):
    """Print `error: ...` (one line, error_line) on stderr and return the exit code."""
    print(f"error: {error_line(err, memory_hint)}", file=sys.stderr)
    return code


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP raised in the main thread as Ctrl-C raises KeyboardInterrupt: the `finally` blocks run
    (atomic_path removes its temporary file), so a command stopped by `kill`, Slurm, `timeout` or a closed
    terminal leaves no half-written output behind."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


@contextlib.contextmanager
def stopped_by_exception():
    """While inside, SIGTERM and SIGHUP raise Stopped (in the main thread; a signal ignored, as under nohup, stays
    ignored). A stop raised where Python cannot propagate it is delivered again instead of lost: a signal landing
    while a subprocess (ffmpeg) starts runs its handler inside an at-fork hook of the logging module, which prints
    "Exception ignored ... KeyboardInterrupt" and carries on."""
    previous, hook = {}, sys.unraisablehook
    if threading.current_thread() is threading.main_thread():
        for s in (getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)):
            if signal.getsignal(s) is signal.SIG_DFL:
                previous[s] = signal.signal(s, _raise_stopped)

    def again(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):       # sent again from a thread, 10 ms later: the
            signum = getattr(unraisable.exc_value, "signum", signal.SIGINT)   # main thread is out of the hook then
            threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
        else:
            hook(unraisable)
    sys.unraisablehook = again
    try:
        yield
    finally:
        sys.unraisablehook = hook
        for s, handler in previous.items():
            signal.signal(s, handler)


def one_line_warning(message, category, filename, lineno, file=None, line=None):
    """warnings.showwarning for the command lines: `warning: <message>` in one line, without Python's source file
    and line (nothing to the user), on a line of its own under a progress bar (tqdm.write)."""
    from tqdm import tqdm
    tqdm.write(f"warning: {message}", file=file or sys.stderr)


def run_command(run, args, memory_hint=None):
    """run(args) as a command line's exit code: 0 when it returns, one `error:` line and 2 for an expected
    failure (out of memory: with `memory_hint`), 128 + the signal's number after Ctrl-C (130), SIGTERM (143) or
    SIGHUP (129), with no temporary output left; a torchrun process group is left in every case."""
    shown = warnings.showwarning
    warnings.showwarning = one_line_warning
    try:
        with stopped_by_exception():
            run(args)
        return 0
    except EXPECTED as e:
        return fail(e, memory_hint=memory_hint)
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"\ninterrupted ({signal.Signals(signum).name}); no temporary file is left behind", file=sys.stderr)
        return 128 + signum
    finally:
        warnings.showwarning = shown
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# option checks: fail early, in one line

def check_numbers(args, rules):
    """rules {"warmup": ">= 0 (0 = no warm-up)", "lr": "> 0"}: a one-line ValueError for the first option
    (set, not None) outside its range; NaN is always refused."""
    for name, rule in rules.items():
        v = getattr(args, name, None)     # options of another subcommand are absent
        values = v if isinstance(v, (list, tuple)) else [v]
        op, bound = rule.split()[:2]
        for x in values:
            if x is not None and (math.isnan(x) or not (x >= float(bound) if op == ">=" else x > float(bound))):
                raise ValueError(f"--{name.replace('_', '-')} {x}: must be {rule}")


def check_device(name):
    """--device: a device torch knows and this machine has (a one-line ValueError otherwise)."""
    if name is None:
        return
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"--device {name!r} is not a device ({e}); use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ValueError(f"--device {name}: CUDA is not available on this machine ({why}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s) (cuda:0 ...)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine; use --device cpu")


def available_memory(device):
    """Bytes that can still be allocated on `device` (CUDA: free GPU memory; CPU: MemAvailable), or None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(next(l for l in f if l.startswith("MemAvailable:")).split()[1]) * 1024
    except (OSError, StopIteration, ValueError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def check_writable(path, what="--out", folder=False):
    """A ValueError now, before long work, if `path` (a file, or with folder=True a folder; missing parents will be
    created) cannot be written, or its name is longer than the file system allows."""
    p = os.path.abspath(path)
    if os.path.isdir(p) and not folder:
        raise ValueError(f"{what} {path} is a folder; give a file name")
    if os.path.exists(p) and not os.path.isdir(p) and folder:
        raise ValueError(f"{what} {path} is a file; give a folder")
    if os.path.exists(p) and not (os.path.isdir(p) or os.path.isfile(p)):   # the rename would replace the node
        raise ValueError(f"{what} {path} is not a regular file (a device such as /dev/null, a fifo or a socket); "
                         f"give a file name")
    d = p if folder else os.path.dirname(p)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        raise ValueError(f"{what} {path}: {d} is a file, not a folder")
    try:
        limit = os.pathconf(d, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    long = [n for n in p.split(os.sep) if len(n.encode()) > limit]
    if long:
        raise ValueError(f"{what} {path}: the name {long[0][:40]}... has {len(long[0].encode())} bytes, more than "
                         f"the {limit} this file system allows; choose a shorter name")
    try:
        tempfile.TemporaryFile(dir=d).close()
    except OSError as e:
        raise ValueError(f"{what} {path}: cannot write in {d} ({e.strerror or e}); choose another place") from None


def refuse_overwriting_inputs(out, inputs, what="--out", frame_folder=False):
    """Refuse an output path that is one of the inputs or lies inside an input folder (and, for a folder of
    PNG frames, an input that is one of the frame files about to be written). inputs: [(option, path)]."""
    o = os.path.realpath(out)
    for name, path in inputs:
        if path is None or not os.path.exists(path):
            continue
        i = os.path.realpath(path)
        same = o == i or (os.path.exists(o) and os.path.samefile(o, i))
        inside = os.path.isdir(i) and o.startswith(i.rstrip(os.sep) + os.sep)
        clash = frame_folder and os.path.dirname(i) == o and re.fullmatch(r"\d{6}\.png", os.path.basename(i))
        if same or inside or clash:
            where = "is" if same else "is inside" if inside else "would overwrite"
            raise ValueError(f"{what} {out} {where} the input {name} {path}; writing it would destroy the input: "
                             f"choose another output path")


# -----------------------------------------------------------------------------
# files: never half-written, never shared between two runs

TEMP_PREFIX = ".tmp_"


@contextlib.contextmanager
def atomic_path(path, suffix=None):
    """A temporary path beside `path`, unique to this call, in a hidden folder; on a normal exit it replaces `path`
    (os.replace: atomic). After an error or an interruption the folder is removed, so `path` is never
    half-written, and a writer that outlives us (an ffmpeg started just as Ctrl-C came) cannot create the file
    again. suffix: the temporary's extension (default: that of `path`, for writers that choose the format by it).
    A symbolic link at `path` is written through; the file gets umask's permissions, not mkstemp's 0600."""
    path = os.path.realpath(path) if os.path.islink(path) else path
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    # the folder is made inside `try`, so that a signal landing just after still has it removed
    staging = os.path.join(folder, TEMP_PREFIX + secrets.token_hex(6))
    tmp = os.path.join(staging, "file" + (os.path.splitext(path)[1] if suffix is None else suffix))
    try:
        os.mkdir(staging)
        yield tmp
        os.replace(tmp, path)
    finally:
        for _ in range(100):        # a writer that outlived an interruption may add its file while we remove
            shutil.rmtree(staging, ignore_errors=True)
            if not os.path.exists(staging):
                break
            time.sleep(0.01)


def remove_stale_temp(folder, log=print):
    """Remove what killed checkpoint writes left: `.tmp_*/` folders holding only .pt files, and `.tmp_*.pt` files of
    older versions. Call it only while holding the folder's RunLock: then no checkpoint writer is alive."""
    stale = [p for p in glob.glob(os.path.join(glob.escape(folder), TEMP_PREFIX + "*"))
             if p.endswith(".pt") and os.path.isfile(p) or os.path.isdir(p) and all(n.endswith(".pt")
                                                                                    for n in os.listdir(p))]
    size = 0
    for p in stale:
        try:
            files = [os.path.join(p, n) for n in os.listdir(p)] if os.path.isdir(p) else [p]
            size += sum(os.path.getsize(f) for f in files)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        except OSError:
            pass
    if stale:
        log(f"notice: removed {len(stale)} temporary checkpoint file(s) ({size / 2 ** 20:.1f} MB) left in {folder} "
            f"by interrupted writes")
    return len(stale)


@contextlib.contextmanager
def only_writer(folder, what="--out"):
    """While writing into `folder` (e.g. PNG frames): an exclusive flock on the folder itself (the OS drops it when
    the process dies); a second writer gets one line instead of mixing its files with ours. No-op without fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RuntimeError(f"{what} {folder} is being written by another process right now: two runs into one "
                               f"folder would mix their files; wait for it or choose another {what}") from None
        yield
    finally:
        os.close(fd)


class RunLock:
    """FOLDER/.lock, locked with flock and holding the owner's pid. The OS drops the lock when its process
    dies (even by kill -9), so a lock file left behind by a dead run is taken over, with a notice; while the
    owner runs, another process refuses with one line naming it. No-op without fcntl (Windows)."""

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


# -----------------------------------------------------------------------------
# stop signals: finish the work in flight, keep what is done

def end_workers():
    """At exit: kill the data-loader workers still alive (kept by a traceback's reference cycle, or past their
    loader's join timeout). They ignore SIGTERM (StopSignals.ignore), so multiprocessing's own exit function,
    which terminates daemon children with SIGTERM and then joins them, would wait for them forever."""
    import multiprocessing
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers and hasattr(signal, "SIGCHLD"):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)     # torch's handler would report the kill as a worker failure
    for p in workers:
        p.kill()
        p.join(5)


# the signals that stop a run: Ctrl-C; kill, Slurm, systemd, `timeout`; a closed terminal or ssh session
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


class StopSignals:
    """From construction on, the first SIGINT/SIGTERM/SIGHUP sets `signum` and prints `message`; the default
    action is restored for them, so a second one ends the process at once (exit 130 / 143 / 129, even inside a
    long computation). A signal ignored before (SIGHUP under nohup) stays ignored. Data-loader workers call
    `ignore()`: the main process decides when to stop."""

    def __init__(self, message):
        self.signum, self.message = 0, message
        self.previous = {s: signal.signal(s, self._handler) for s in STOP_SIGNALS
                         if signal.getsignal(s) is not signal.SIG_IGN}
        atexit.unregister(end_workers)
        atexit.register(end_workers)         # after multiprocessing's exit function, so it runs before it

    def restore(self):
        """The handlers from before (a command run inside another program, e.g. a test, leaves them as it found)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handler(self, signum, frame):
        self.signum = signum
        for s in self.previous:
            signal.signal(s, signal.SIG_DFL)
        print(f"\n{self.message}", file=sys.stderr, flush=True)

    def __bool__(self):
        return self.signum != 0

    @staticmethod
    def ignore(*_):
        """For data-loader workers (worker_init_fn): leave the stop signals sent to the whole process group to the
        main process, which finishes its step and writes a checkpoint (end_workers kills the workers left at exit)."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def exit_code(self):
        """The shell's code for a run stopped by a signal: 128 + its number."""
        return 128 + int(self.signum)


# -----------------------------------------------------------------------------
# precision and processes

@functools.lru_cache(maxsize=None)
def bf16_speedup(device="cpu", n=512, repeat=3):
    """fp32 time / bf16 time of an [n, 2n] @ [2n, 2n] matmul on this device (best of `repeat`, ~0.1 s)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(n, 2 * n, device=device).to(dtype)
        b = torch.randn(2 * n, 2 * n, device=device).to(dtype)
        times = []
        for _ in range(repeat + 1):                                   # the first call warms up
            sync()
            t0 = time.perf_counter()
            a @ b
            sync()
            times.append(time.perf_counter() - t0)
        best[dtype] = min(times[1:])
    return best[torch.float32] / best[torch.bfloat16]


def pick_precision(precision, device):
    """'fp32' / 'bf16' as given; 'auto' -> 'bf16' where the probe shows bf16 matmul >= 1.1x faster than fp32
    (CPUs with avx512_bf16/AMX, GPUs with bf16 tensor cores), else 'fp32'. -> (precision, reason)."""
    if precision != "auto":
        return precision, "as asked"
    speedup = bf16_speedup(str(device))
    return ("bf16" if speedup >= 1.1 else "fp32"), f"auto: bf16 matmul {speedup:.2f}x the speed of fp32 here"


def setup_processes(device_arg=None):
    """-> (rank, world, device) from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK; one process without
    them), joining the process group (NCCL on CUDA, gloo on CPU) when there are several. device: device_arg
    (--device; a bare "cuda" means cuda:LOCAL_RANK), else cuda:LOCAL_RANK where CUDA is available, else cpu."""
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device
