"""Shared checks that every model script must pass, run as a user runs it: `python <script>.py ...`.

A script under test runs in a process of its own, as `python <script>.py ARGS` would: its own argv, working
folder, environment, stdin/stdout/stderr, signals and exit status. To spare each run the 5 s it takes a
fresh interpreter to import torch (with torch._dynamo, which every optimizer imports) and matplotlib, that
process is a fork of the test process, which has imported them once, and the script runs in it as
``__main__`` (runpy): nothing else differs. ``GEN_TEST_FORK=0`` starts a fresh interpreter for every run
instead (the same tests, about three times slower). The forked copy runs torch with one thread: a forked
OpenMP pool hangs, and the tests' models are tiny.
"""
from __future__ import annotations

import hashlib
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A dead proxy makes any download attempt fail at once, so no test ever reaches the network; one
# thread per process: the tiny test models are far faster without thread contention on 2 cores.
OFFLINE_ENV = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
               "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
FORK = os.environ.get("GEN_TEST_FORK", "1") != "0"
if FORK:   # what every script imports, loaded once here and shared by the forked runs
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (curves.png)
    import PIL.Image  # noqa: F401  (sample grids)
    import torch._dynamo  # noqa: F401  (an optimizer's constructor imports it: 1.2 s)
    import torch.distributed  # noqa: F401
    import common  # noqa: F401
    import fid  # noqa: F401


class Script:
    """`python <script>.py ARGS` started in ``cwd`` with ``env``, as subprocess.Popen(stdout=PIPE,
    stderr=PIPE, text=True) would start it: ``stdout`` is readable line by line while it runs, ``stderr``
    comes with ``communicate``. ``stdout_fd``: write stdout into this descriptor instead (several
    processes sharing one pipe, as torchrun's workers do). ``fresh``: a new interpreter even when forking."""

    def __init__(self, script: str, args, cwd: Path, env: dict, stdout_fd: int | None = None, fresh: bool = False):
        path = str(ROOT / f"{script}.py") if not script.endswith(".py") else script
        args = [str(a) for a in args]
        self.returncode = None
        self._err = tempfile.TemporaryFile()
        if fresh or not FORK:
            self._proc = subprocess.Popen([sys.executable, path, *args], cwd=cwd, env=env, text=True,
                                          stdout=subprocess.PIPE if stdout_fd is None else stdout_fd,
                                          stderr=self._err)
            self.pid, self.stdout = self._proc.pid, self._proc.stdout
            return
        read, write = os.pipe() if stdout_fd is None else (None, stdout_fd)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(path, args, cwd, env, write, self._err.fileno())   # never returns
        self._proc, self.pid = None, pid
        if read is not None:
            os.close(write)
        self.stdout = os.fdopen(read, "r") if read is not None else None

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._proc is not None:
                self.returncode = self._proc.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = time.time() + (timeout if timeout is not None else 1e9)
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                self.wait()
                raise subprocess.TimeoutExpired(self.pid, timeout)
            time.sleep(0.005)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """The rest of stdout and all of stderr, once the process has ended (killed after ``timeout``)."""
        out = _read_to_end(self.stdout, timeout, self) if self.stdout is not None else ""
        self.wait(None if timeout is None else max(1.0, timeout))
        self._err.seek(0)
        err = self._err.read().decode(errors="replace")
        self._err.close()
        return out, err


def _read_to_end(stream, timeout: float | None, proc) -> str:
    """Everything left in ``stream`` until every writer has closed it (what readline() already buffered
    included), read in a thread; ``proc`` is killed after ``timeout``."""
    import threading
    out = []
    reader = threading.Thread(target=lambda: out.append(stream.read()), daemon=True)
    reader.start()
    reader.join(timeout)
    if reader.is_alive():
        proc.kill()
        reader.join()
        raise subprocess.TimeoutExpired(getattr(proc, "pid", None), timeout)
    stream.close()
    return out[0]


def _child(path: str, args: list, cwd, env: dict, stdout_fd: int, stderr_fd: int) -> None:
    """The forked process: become `python path args` and exit with its status."""
    import atexit
    import threading
    code = 1
    try:
        atexit._clear()   # the test process's exit handlers are not the script's
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        for sig in (signal.SIGTERM, signal.SIGUSR1):   # as in a new interpreter
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        torch.set_num_threads(1)
        sys.argv = [path, *args]
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = 130
        except BaseException:
            traceback.print_exc()
        threading._shutdown()       # what the interpreter does at exit: wait for the script's threads,
        atexit._run_exitfuncs()     # then run its exit handlers (e.g. torch.compile's worker pool)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def start_script(script: str, *args, cwd: Path, env: dict | None = None, fresh: bool = False) -> Script:
    """Start ``python <script>.py args`` in ``cwd`` (``env`` added to the offline environment); ``fresh``: in
    a new interpreter, not a fork of this one."""
    return Script(script, args, cwd, {**OFFLINE_ENV, **(env or {})}, fresh=fresh)


def run_script(script: str, *args, cwd: Path, timeout: float = 300, check: bool = True, env: dict | None = None,
               fresh: bool = False):
    """Run ``python <script>.py args`` in ``cwd`` (``env`` added to the offline environment) to its end."""
    proc = start_script(script, *args, cwd=cwd, env=env, fresh=fresh)
    stdout, stderr = proc.communicate(timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script}.py {' '.join(map(str, args))} exited {proc.returncode}\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess([script, *args], proc.returncode, stdout, stderr)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical models and optimizers, and the same step and data position."""
    assert a["step"] == b["step"] and a["data"] == b["data"]
    for group in ("models", "optimizers", "state"):
        fa, fb = flatten(a[group]), flatten(b[group])
        assert fa.keys() == fb.keys()
        for k in fa:
            if isinstance(fa[k], torch.Tensor):
                assert torch.equal(fa[k], fb[k]), f"{group}/{k} differs"
            else:
                assert fa[k] == fb[k], f"{group}/{k} differs"


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}/"))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (dict, torch.Tensor)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}/"))
        return out
    return {prefix: tree}


# ----------------------------------------------------------------------------------------------
# The contract of CONVENTIONS.md, one function per clause, called by each script's test file
# ----------------------------------------------------------------------------------------------
def check_smoke(script: str, small: list, tmp: Path) -> None:
    """A few steps write args.json, metrics.csv, a sample grid and a loadable checkpoint. This run starts a
    new interpreter, exactly as a user does (the other checks fork this process: module docstring)."""
    out = tmp / "smoke"
    proc = run_script(script, *small, "--steps", 4, "--log-every", 2, "--sample-every", 2, "--out", out, cwd=tmp,
                      fresh=True)
    assert "training from step 0" in proc.stdout and "done at step 4" in proc.stdout
    for name in ("args.json", "metrics.csv", "ckpt.pt", "samples/000002.png", "samples/000004.png"):
        assert (out / name).is_file(), name
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and [r.split(",")[0] for r in rows[1:]] == ["2", "4"]
    ckpt = load(out / "ckpt.pt")
    assert ckpt["script"] == script and ckpt["step"] == 4
    proc = run_script(script, "--resume", "--steps", 4, "--out", out, cwd=tmp)
    assert "already done at step 4" in proc.stdout


def check_exact_resume(script: str, small: list, tmp: Path, n: int = 3) -> None:
    """2n steps straight == n steps, stop, resume, n steps: bit-identical weights and optimizers. Batches of
    64 of the 256 synthetic images: the resumed half crosses an epoch boundary; the log, sample and
    checkpoint cadences differ between the three runs (drawing or saving must change nothing)."""
    straight, split = tmp / "straight", tmp / "split"
    small = [*small, "--batch-size", 64]
    run_script(script, *small, "--steps", 2 * n, "--out", straight, "--log-every", 1, "--ckpt-every", 4, cwd=tmp)
    run_script(script, *small, "--steps", n, "--out", split, "--log-every", 2, "--sample-every", 2,
               "--ckpt-every", 2, cwd=tmp)
    assert load(split / "ckpt.pt")["data"]["train"]["epoch"] == 0
    proc = run_script(script, "--resume", "--steps", 2 * n, "--out", split, "--log-every", 3, "--sample-every", 1,
                      "--ckpt-every", 5, cwd=tmp)
    assert f"training from step {n} (resumed)" in proc.stdout
    resumed = load(split / "ckpt.pt")
    assert resumed["data"]["train"]["epoch"] == 1, "the test must cross an epoch boundary"
    assert_same_state(load(straight / "ckpt.pt"), resumed)
    rows = (split / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == sorted({int(r.split(",")[0]) for r in rows})


def check_signal_resume(script: str, small: list, tmp: Path, sig=signal.SIGTERM) -> None:
    """A signal mid-run: finish the step, checkpoint, exit 0; --resume continues exactly from there."""
    out = tmp / "signalled"
    proc = start_script(script, *small, "--steps", 10**6, "--log-every", 1, "--ckpt-every", 10**6,
                        "--sample-every", 10**6, "--out", out, cwd=tmp)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 2:
            break
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    stdout = "".join(lines) + stdout
    assert proc.returncode == 0, stdout + stderr
    assert "checkpoint saved at step" in stdout, stdout
    stopped = load(out / "ckpt.pt")["step"]
    assert stopped >= 2 and f"checkpoint saved at step {stopped}" in stdout
    proc = run_script(script, "--resume", "--steps", stopped + 2, "--out", out, cwd=tmp)
    assert f"training from step {stopped} (resumed)" in proc.stdout
    straight = tmp / "straight-signal"
    run_script(script, *small, "--steps", stopped + 2, "--out", straight, cwd=tmp)
    assert_same_state(load(straight / "ckpt.pt"), load(out / "ckpt.pt"))


def check_amp_change_on_resume(script: str, small: list, tmp: Path) -> None:
    """--amp may change when a run is resumed, as a requeue onto another GPU type does: a checkpoint written
    without AMP, then resumed under fp16 (what --amp is on a V100, a T4 or MPS; forced here on the CPU),
    then bf16, then without AMP again, trains on each time (the fp16 GradScaler starts afresh)."""
    out = tmp / "amp"
    run_script(script, *small, "--steps", 1, "--out", out, cwd=tmp)
    for step, amp in ((2, "fp16"), (3, "bf16"), (4, "off"), (5, "fp16")):
        proc = run_script(script, "--resume", "--steps", step, "--amp", amp, "--out", out, cwd=tmp)
        assert f"done at step {step}" in proc.stdout, proc.stdout
        assert load(out / "ckpt.pt")["config"]["amp"] == amp


def check_sample(script: str, small: list, tmp: Path) -> None:
    """--sample N writes N PNGs (or one .npz of uint8 N x H x W x C), the same for the same --seed and
    others for another; a second --sample replaces the first's images; bad destinations are refused."""
    import numpy as np
    out = tmp / "to-sample"
    run_script(script, *small, "--steps", 2, "--sample-every", 1, "--out", out, cwd=tmp)
    before = digest(out / "ckpt.pt")
    run_script(script, "--out", out, "--sample", 5, cwd=tmp)
    run_script(script, "--out", out, "--sample", 3, cwd=tmp)  # replaces the 5: no stale images for fid.py
    assert sorted(p.name for p in (out / "generated").glob("*.png")) == [f"{i:06d}.png" for i in range(3)]
    for name, seed in (("a.npz", 0), ("b.npz", 0), ("c.npz", 5)):
        run_script(script, "--out", out, "--sample", 7, "--seed", seed, "--sample-out", tmp / name, cwd=tmp)
    a, b, c = (np.load(tmp / f"{n}.npz")["images"] for n in "abc")
    assert a.dtype == np.uint8 and a.shape[0] == 7 and a.ndim == 4 and np.array_equal(a, b)
    assert not np.array_equal(a, c), "--seed picks the samples"
    (tmp / "mixed").mkdir()
    (tmp / "mixed" / "real.png").write_bytes(b"")
    grids = sorted(os.listdir(out / "samples"))
    (tmp / "file").write_text("")
    for dest, words in ((tmp / "x.png", ["x.png", "folder"]), (tmp / "mixed", ["did not write"]),
                        (tmp / "file", ["existing file"]), (tmp / "file" / "sub.npz", ["cannot write"]),
                        (out / "samples", ["did not write"])):
        proc = run_script(script, "--out", out, "--sample", 2, "--sample-out", dest, cwd=tmp, check=False)
        assert_clean_error(proc, *words)
    assert not (tmp / "x.png").exists() and os.listdir(tmp / "mixed") == ["real.png"]
    assert sorted(os.listdir(out / "samples")) == grids and grids, "the training grids are never deleted"
    assert digest(out / "ckpt.pt") == before


def check_conditional_sample(script: str, small: list, tmp: Path, classes: int = 4) -> None:
    """A conditional model's --sample N writes N/K images of each class (class i mod K: uniform, not random
    labels), PNGs under class_<k>/ and a labels array in the .npz; --class c draws that class only; an N that is
    not a multiple of K, or a class it does not have, is one line."""
    import numpy as np
    out = tmp / "conditional"
    run_script(script, *small, "--steps", 2, "--out", out, cwd=tmp)
    run_script(script, "--out", out, "--sample", 2 * classes, "--sample-out", tmp / "s.npz", cwd=tmp)
    saved = np.load(tmp / "s.npz")
    assert saved["images"].shape[0] == 2 * classes and list(saved["labels"]) == list(range(classes)) * 2
    run_script(script, "--out", out, "--sample", classes, cwd=tmp)
    assert sorted(p.relative_to(out / "generated").as_posix() for p in (out / "generated").rglob("*.png")) == \
        [f"class_{i}/{i:06d}.png" for i in range(classes)]
    run_script(script, "--out", out, "--sample", 3, "--class", 1, "--sample-out", tmp / "one.npz", cwd=tmp)
    assert list(np.load(tmp / "one.npz")["labels"]) == [1, 1, 1]
    for flags, words in ((["--sample", classes + 1], [f"multiple of {classes}"]),
                         (["--sample", 2, "--class", classes], [f"--class {classes}"])):
        assert_clean_error(run_script(script, "--out", out, *flags, cwd=tmp, check=False), *words)


_SYNTHETIC_CLASSIFIERS = {}


def synthetic_classifier(size: int = 16):
    """fid.py's classifier recipe trained on the synthetic training images (4 classes: the quadrant of the disk),
    at size x size; once per test process and size."""
    if size not in _SYNTHETIC_CLASSIFIERS:
        import common
        import fid
        train = common.load_images("synthetic", "data", size, labels=True)
        test = common.load_images("synthetic", "data", size, split="test", labels=True)
        _SYNTHETIC_CLASSIFIERS[size] = fid.train_classifier(*train, *test, seed=0, log=lambda *_: None)[0]
    return _SYNTHETIC_CLASSIFIERS[size]


def check_samples_are_of_their_class(script: str, small: list, tmp: Path, steps: int, at_least: float = 0.7,
                                     size: int = 16, sample_flags: tuple = ()) -> float:
    """Label plumbing, end to end: after ``steps`` steps on the synthetic data (4 classes, size x size), the samples
    --sample draws for class c are classified c by an independent classifier (fid.py's recipe) at least
    ``at_least`` of the time (chance: 0.25; a model that ignores its labels stays near it). Returns the accuracy."""
    import numpy as np
    import fid
    out = tmp / "fidelity"
    run_script(script, *small, "--image-size", size, "--steps", steps, "--log-every", steps, "--out", out, cwd=tmp)
    run_script(script, "--out", out, "--sample", 200, "--sample-out", tmp / "fidelity.npz", *sample_flags, cwd=tmp)
    saved = np.load(tmp / "fidelity.npz")
    accuracy = fid.accuracy(synthetic_classifier(size), torch.from_numpy(saved["images"]).permute(0, 3, 1, 2),
                            torch.from_numpy(saved["labels"]))
    assert accuracy >= at_least, accuracy
    return accuracy


def assert_clean_error(proc, *words) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr
    for w in words:
        assert w in last, (w, last)


def check_bad_inputs(script: str, small: list, other_script: str, other_small: list, tmp: Path) -> None:
    """Each bad input is one clear line, and no existing checkpoint is touched."""
    out = tmp / "good"
    run_script(script, *small, "--steps", 2, "--out", out, cwd=tmp)
    ckpt = out / "ckpt.pt"
    before = digest(ckpt)

    # a missing dataset (and no network) says how to get it
    proc = run_script(script, *small, "--dataset", "mnist", "--data-root", tmp / "empty", "--out", tmp / "x",
                      cwd=tmp, check=False)
    assert_clean_error(proc, "mnist", "--data-root")
    # a fresh run over an existing checkpoint
    proc = run_script(script, *small, "--steps", 4, "--out", out, cwd=tmp, check=False)
    assert_clean_error(proc, "--resume")
    # an incompatible config, named field by field
    proc = run_script(script, "--resume", "--seed", 7, "--batch-size", 3, "--out", out, cwd=tmp, check=False)
    assert_clean_error(proc, "seed 0 -> 7", "batch_size")
    # another script's checkpoint
    other = tmp / "other"
    run_script(other_script, *other_small, "--steps", 1, "--out", other, cwd=tmp)
    proc = run_script(script, "--resume", other / "ckpt.pt", "--out", out, cwd=tmp, check=False)
    assert_clean_error(proc, f"{other_script}.py")
    # a corrupt (truncated) checkpoint
    broken = tmp / "broken.pt"
    broken.write_bytes(ckpt.read_bytes()[:1000])
    proc = run_script(script, "--resume", broken, "--out", out, cwd=tmp, check=False)
    assert_clean_error(proc, "corrupt")
    # an unwritable run folder
    blocker = tmp / "file"
    blocker.write_text("")
    proc = run_script(script, *small, "--out", blocker / "run", cwd=tmp, check=False)
    assert_clean_error(proc, "--out")
    assert digest(ckpt) == before


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


BAD_FLAGS = [(["--sample-every", 0], ["--sample-every 0", "at least 1"]), (["--log-every", 0], ["--log-every 0"]),
             (["--ckpt-every", -1], ["--ckpt-every -1"]), (["--batch-size", 0], ["--batch-size 0"]),
             (["--steps", -5], ["--steps -5"]), (["--device", "mps"], ["--device mps"]),
             (["--dataset", "nosuch"], ["--dataset nosuch"]), (["--seed", -1], ["--seed -1"]),
             (["--lr", "nan"], ["--lr nan", "finite"]), (["--sample-out", "x.npz"], ["goes with --sample"]),
             (["--step", 3], ["unrecognized arguments: --step"]), (["--amp", "fp8"], ["--amp", "fp8"])]


def check_bad_flags(script: str, small: list, tmp: Path, cases: list) -> None:
    """Each bad flag is one line and exit 2, before anything is written: no run folder is left behind.
    Run in this process (``main()`` under ``run_main``, as ``python <script>.py`` runs it), to spare a
    torch import per case."""
    import contextlib
    import importlib
    import io
    module = importlib.import_module(script)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        for i, (flags, words) in enumerate(BAD_FLAGS + cases):
            out = tmp / f"bad{i}"
            argv = [f"{script}.py", *map(str, small), "--steps", "2", *map(str, flags), "--out", str(out)]
            stderr = io.StringIO()
            with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stderr), \
                    contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit) as exit:
                mp.setattr(sys, "argv", argv)
                import common
                common.run_main(module.main)
            assert exit.value.code == 2, (flags, stderr.getvalue())
            lines = stderr.getvalue().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("error: "), (flags, stderr.getvalue())
            for w in words:
                assert w in lines[0], (w, lines[0])
            assert not out.exists(), f"{flags} left {out} behind"
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def torchrun(script: str, *args, cwd: Path, nproc: int = 2) -> subprocess.Popen:
    """The real launcher: `python -m torch.distributed.run --standalone --nproc_per_node=N <script>.py args`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / f"{script}.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=cwd, env=OFFLINE_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


class Launch:
    """What `torchrun --standalone --nproc_per_node=N <script>.py args` starts, without torchrun's own
    process: N processes of the script with torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR/PORT: rank 0 hosts the rendezvous store, as in any env:// launch), their stdout in one
    pipe (``stdout``); ``communicate`` returns it followed by their stderr. ``workers``: the N processes."""

    def __init__(self, script: str, args, cwd: Path, nproc: int = 2):
        with socket.socket() as sock:   # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        read, write = os.pipe()
        self.workers = []
        for rank in range(nproc):
            env = {**OFFLINE_ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                   "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port)}
            self.workers.append(Script(script, args, cwd, env, stdout_fd=write))
        os.close(write)
        self.stdout = os.fdopen(read, "r")
        self.returncode = None

    def communicate(self, timeout: float = 120) -> tuple[str, str]:
        out = _read_to_end(self.stdout, timeout, self)   # the shared pipe ends when every worker has
        errs = [w.communicate(timeout)[1] for w in self.workers]
        self.returncode = next((w.returncode for w in self.workers if w.returncode), 0)
        return out + "".join(errs), ""

    def kill(self):
        for w in self.workers:
            w.kill()


def launch_ddp(script: str, *args, cwd: Path, nproc: int = 2) -> Launch:
    return Launch(script, args, cwd, nproc)


def check_ddp(script: str, small: list, tmp: Path) -> None:
    """Two processes with torchrun's environment (gloo on the CPU): a SIGTERM that reaches one rank stops
    both at the same step with one checkpoint and exit 0; --resume then continues bit-identically to an
    uninterrupted 2-process run. (Equality with one process does not hold for a model with batch norm and
    per-process noise: what does hold, the same images at every step, is tested on Batches.)"""
    import re
    out = tmp / "ddp"
    proc = launch_ddp(script, *small, "--steps", 10**6, "--log-every", 1, "--out", out, cwd=tmp)
    lines, deadline = [], time.time() + 120
    while time.time() < deadline:
        lines.append(proc.stdout.readline())
        if lines[-1].startswith("step 3/") or not lines[-1]:
            break
    proc.workers[1].send_signal(signal.SIGTERM)  # one rank only, as a signal that reaches them at different moments
    stdout = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, stdout
    saved = re.findall(r"^checkpoint saved at step (\d+)", stdout, re.M)
    assert len(saved) == 1, stdout   # rank 0 alone writes and prints
    stopped = int(saved[0])
    ckpt = load(out / "ckpt.pt")
    assert ckpt["step"] == stopped and ckpt["world"] == 2 and len(ckpt["rng"]) == 2
    resumed = launch_ddp(script, "--resume", "--steps", stopped + 3, "--out", out, cwd=tmp)
    text = resumed.communicate(timeout=120)[0]
    assert resumed.returncode == 0 and f"training from step {stopped} (resumed)" in text, text
    straight = launch_ddp(script, *small, "--steps", stopped + 3, "--out", tmp / "ddp-straight", cwd=tmp)
    text = straight.communicate(timeout=120)[0]
    assert straight.returncode == 0, text
    assert_same_state(load(tmp / "ddp-straight" / "ckpt.pt"), load(out / "ckpt.pt"))


def random_inception_env(tmp: Path) -> dict:
    """The environment of a run whose fid.py finds random-weight Inception weights (offline: no real ones here)
    and keeps its cache under ``tmp``."""
    from test_fid import random_inception_state
    hub = tmp / "torch" / "hub" / "checkpoints"   # where fid.py looks without --weights: $TORCH_HOME/hub/...
    hub.mkdir(parents=True, exist_ok=True)
    torch.save(random_inception_state(), hub / "pt_inception-2015-12-05-6726825d.pth")
    return {"TORCH_HOME": str(tmp / "torch"), "XDG_CACHE_HOME": str(tmp / "cache")}


def check_eval_every(script: str, small: list, tmp: Path) -> dict:
    """--eval-every with a random-weight Inception: FID in metrics.csv at each evaluated step and best.pt at the
    best one. Returns {step: FID}."""
    import csv
    run_script(script, *small, "--eval-every", 2, "--eval-n", 8, "--eval-features", "inception", "--steps", 4,
               "--out", tmp / "eval", cwd=tmp, env=random_inception_env(tmp))
    with open(tmp / "eval" / "metrics.csv", newline="") as f:
        fids = {int(r["step"]): float(r["fid"]) for r in csv.DictReader(f) if r["fid"]}
    assert sorted(fids) == [2, 4] and all(v > 0 for v in fids.values()), fids
    assert load(tmp / "eval" / "best.pt")["step"] == min(fids, key=fids.get)
    return fids


def check_compile(script: str, small: list, tmp: Path, model: str) -> None:
    """--compile (with --amp) trains; its checkpoint keeps plain keys and loads in an uncompiled --sample."""
    out = tmp / "compiled"
    proc = run_script(script, *small, "--compile", "--amp", "--steps", 2, "--log-every", 1, "--out", out, cwd=tmp,
                      timeout=600)
    assert "done at step 2" in proc.stdout
    assert not any(k.startswith("_orig_mod") for k in load(out / "ckpt.pt")["models"][model])
    run_script(script, "--out", out, "--sample", 3, cwd=tmp)   # a plain (uncompiled) run loads it
    assert len(list((out / "generated").glob("*.png"))) == 3
