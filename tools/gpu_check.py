"""The CUDA path of every script, checked in one command on a GPU machine (issue 23): does each run, resume and
keep its speed on a GPU, and how fast is it beside the peers?

    python tools/gpu_check.py --peers ~/peers                 # on a GPU node: everything, about 14 min (H200)
    python tools/gpu_check.py --quick --peers ~/peers         # the subset, about 4.5 min
    python tools/gpu_check.py --device cpu                    # no GPU: the same sequence at tiny sizes (the tests)
    sbatch --gres=gpu:1 --wrap "python tools/gpu_check.py --peers ~/peers --out gpu-check"   # through SLURM

Through this workplace's device tool (one command of at most 10 minutes, 15 minutes of device time for every try
together, 8 files back), one part per call: the scripts (1. and 2., about 5.5 min), or the benchmarks and FID (4.
and 5., about 9 min; --bench NAME ... for fewer); a lease holds one of each only when the second is trimmed:

    run(command="python3 tools/gpu_check.py --bench --skip fid --peers .peers --out /tmp/gc --time-limit 360; s=$?; "
                "cd /tmp/gc && cp report.md report.json $OUT/ && tar czf $OUT/logs.tgz logs; exit $s",
        carry=[".peers"], timeout_s=420)
    run(command="python3 tools/gpu_check.py --scripts --peers .peers --out /tmp/gc --time-limit 540; s=$?; "
                "cd /tmp/gc && cp report.md report.json $OUT/ && tar czf $OUT/logs.tgz logs; exit $s",
        carry=[".peers"], timeout_s=590)

(docs/gpu-check.md: how to fill .peers, git-ignored and under 64 MiB, and how to read what comes back).

What it checks, each check one line of progress (its time, OK/FAIL and the reason) and a row of the report:
1. Every script at its paper's configuration on synthetic data, a few steps (--steps 10): ddpm --arch cifar10 at
   32 x 32, batch 128; pix2pix and CycleGAN at 256 x 256, batch 1, load size 286, the paper's networks (their
   demos' smaller defaults overridden: ngf = ndf = 64, 70 x 70 PatchGAN, 9 residual blocks); dcgan 64 x 64, batch
   128; gan, wgan, wgan_gp, vae, realnvp at their defaults. Each with no flag, --amp (bf16 where the GPU has it),
   --amp --channels-last --compile (gan has no --channels-last) and --amp fp16 (the GradScaler path of a V100 or
   T4, which an H100 would never take by itself). A run passes when it exits 0, says "done at step N" and its
   metrics.csv ends at step N with finite losses.
2. --resume across a SIGTERM: a run signalled once it logged step 2 must finish its step, save and exit 0; the
   resumed run continues 2 steps; an uninterrupted run of as many steps (which is also the no-flag run of 1.) is
   compared with it: the losses of metrics.csv and every tensor of the checkpoints (models, optimizers, state).
   On the CPU they must be bit-identical; on CUDA cuDNN's kernels may differ in the last digits: the report says
   by how much (and how much the rows before the signal differ, two runs alike: the noise), and fails it only
   when a loss after the resume differs by more than 1e-3 of its scale and 10 times that noise (beyond_noise).
3. With 2 or more GPUs: torchrun with 2 processes, a SIGTERM to rank 1 alone: both stop at the same step with one
   checkpoint, --resume continues, compared with an uninterrupted 2-process run (dcgan; ddpm too without --quick).
4. Speed beside the peers, images/s, by the tools of tools/bench (as the CPU tables of docs/speed.md): DCGAN
   64 x 64 batch 128 (pytorch/examples), DDPM at the paper's configuration (w86763777/pytorch-ddpm), pix2pix and
   CycleGAN 256 x 256 (the official model classes), WGAN and WGAN-GP (eriklindernoren/PyTorch-GAN; Fashion-MNIST
   needed). --peers DIR holds their checkouts: DIR/examples, DIR/pytorch-ddpm, DIR/pytorch-CycleGAN-and-pix2pix,
   DIR/PyTorch-GAN (and DIR/python, added to the PYTHONPATH of the peers: their missing packages, tensorboardX
   for pytorch-ddpm, pytorch-fid for 5.), DIR/fashion-mnist (its four .gz files). A missing peer is "not
   measured" (ours is measured alone); a peer that fails says why and is not a failure of ours.
5. fid.py against pytorch-fid end to end on the same two folders of 10,000 PNGs of CIFAR-10's size (synthetic
   disks, and other disks in negative), with the same randomly initialised Inception weights (the tests'; the
   real ones cannot be downloaded there): both FIDs, their relative difference (fails above 1e-2: TF32
   convolutions on both sides) and the time ratio.
A failing check does not stop the others; the exit status is 1 when any failed (3: none failed, but the time
limit left some not run; 130: stopped by a signal). Everything goes under --out
(default gpu-check-<date>): report.md (the tables: the speed one goes to docs/speed.md's GPU section, with the
date and the GPU's name), report.json, logs/<check>.log (every run's output); the run folders go to a temporary
--work folder (checkpoints of pix2pix at 256 are 0.7 GB), removed at the end unless --work is given.

--quick: dcgan and ddpm (every flag set but --compile, the resume), the DDPM benchmark (no flag, --amp), fid.

The time, measured on an H200 on 2026-12-04 (docs/gpu-check.md; each check's estimate is printed, and kept in
report.md, beside its time: what EST is corrected with):
- A run's fixed cost, 11 to 23 s with 6 runs at a time: a fresh interpreter importing torch, matplotlib and the
  script, CUDA and cuDNN set up, cuDNN's first autotuning, the final checkpoint (0.4 to 0.7 GB for ddpm, pix2pix
  and CycleGAN) and grid. A resume check (two runs, the signal, the comparison) 36 to 95 s.
- torch.compile's cold compilation: 20 to 45 s for the MLPs and DCGAN-sized networks, 52 s for pix2pix, 115 s
  for CycleGAN's four networks, 173 s for DDPM's U-Net and 262 s for RealNVP's 22 couplings.
The runs of 1. and 2. go 6 at a time, longest first: about 5 min (realnvp's compiled run alone is 4.6 min). Then,
alone since they time, the benchmarks (each flag set and the peer in a new process: 110 s for DCGAN, 113 s for
DDPM without --compile, about 290 s with it) and FID (46 s): about 14 min in all, more than one command of the
device tool: split it there (docs/gpu-check.md). --quick: about 4.5 min.
A V100 or T4: count 2 to 4 times as long. --time-limit starts no check past its time (those are "not run") and
cuts any run still going then, so that the report is always written.

On a machine without CUDA (--device cpu, the default there) the same sequence runs at tiny sizes (the tests'
networks, 3 steps, synthetic data) with no peers unless --peers is given; each script's run is then a fork of
this process (as tests/conftest.py does: no 5 s of imports per run). tests/test_gpu_check.py runs it that way.
--inject-failure CHECK (e.g. dcgan:amp) adds a flag that no script has to that check's command: how the tests
see that a failure is reported.
"""
import argparse
import csv
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCRIPTS = ("gan", "dcgan", "wgan", "wgan_gp", "vae", "realnvp", "ddpm", "pix2pix", "cyclegan")
QUICK_SCRIPTS = ("dcgan", "ddpm")
BENCHES = ("dcgan", "ddpm", "translation", "wgan")
QUICK_BENCHES = ("ddpm",)
KINDS = ("amp", "compile", "fp16", "resume", "ddp", "bench", "fid")   # what --skip can leave out
BIG = str(10**9)   # a cadence never reached: no grid nor checkpoint but the final ones

# The paper's configuration of each script on the GPU, synthetic data: (arguments, what it is). The translation
# scripts' synthetic datasets take their demos' smaller defaults unless typed: the paper's are typed here.
PAPER_NETS = ["--image-size", "256", "--load-size", "286", "--batch-size", "1", "--ngf", "64", "--ndf", "64",
              "--n-layers-D", "3", "--n-epochs", "100", "--n-epochs-decay", "100"]
PAPER = {
    "gan": (["--dataset", "synthetic"], "28x28, batch 100, the MNIST MLPs (defaults)"),
    "dcgan": (["--dataset", "synthetic-rgb", "--image-size", "64", "--batch-size", "128"], "64x64 RGB, batch 128"),
    "wgan": (["--dataset", "synthetic-rgb"], "64x64 RGB, batch 64, n_critic 5 and the critic burst (defaults)"),
    "wgan_gp": (["--dataset", "synthetic-rgb"], "64x64 RGB, batch 64, n_critic 5 (defaults)"),
    "vae": (["--dataset", "synthetic"], "28x28, the MLP, batch 100 (defaults)"),
    "realnvp": (["--dataset", "synthetic"], "28x28, --arch small, batch 64 (defaults)"),
    "ddpm": (["--dataset", "synthetic-rgb", "--image-size", "32", "--arch", "cifar10", "--batch-size", "128",
              "--hflip", "--sampler", "ddim", "--sample-steps", "10"],
             "--arch cifar10 (35.7M), 32x32 RGB, batch 128, --hflip; final grid by DDIM, 10 steps"),
    "pix2pix": (["--dataset", "synthetic-pairs", *PAPER_NETS], "256x256 (load 286), batch 1, unet_256, 70x70 D"),
    "cyclegan": (["--dataset", "synthetic-unpaired", *PAPER_NETS, "--n-blocks", "9"],
                 "256x256 (load 286), batch 1, resnet_9blocks, 70x70 D"),
}
# --device cpu: the tests' tiny networks (tests/test_<script>.py's SMALL)
TINY_GAN = ["--dataset", "synthetic", "--image-size", "16", "--batch-size", "16", "--ngf", "4", "--ndf", "4"]
TINY_TRANSLATION = ["--image-size", "16", "--load-size", "18", "--ngf", "4", "--ndf", "4", "--n-layers-D", "2",
                    "--batch-size", "16", "--n-epochs", "100", "--n-epochs-decay", "100"]
TINY = {
    "gan": ["--dataset", "synthetic", "--image-size", "12", "--batch-size", "16", "--g-hidden", "32",
            "--d-units", "8"],
    "dcgan": TINY_GAN,
    "wgan": [*TINY_GAN, "--n-critic", "2", "--no-critic-burst"],
    "wgan_gp": [*TINY_GAN, "--n-critic", "2"],
    "vae": ["--dataset", "synthetic", "--image-size", "8", "--hidden", "16", "--nz", "2", "--batch-size", "16"],
    "realnvp": ["--dataset", "synthetic", "--image-size", "8", "--arch", "tiny", "--batch-size", "16"],
    "ddpm": ["--dataset", "synthetic", "--image-size", "8", "--arch", "tiny", "--T", "10", "--batch-size", "16"],
    "pix2pix": ["--dataset", "synthetic-pairs", *TINY_TRANSLATION],
    "cyclegan": ["--dataset", "synthetic-unpaired", *TINY_TRANSLATION, "--n-blocks", "1"],
}
# Seconds measured on an H200 (2026-12-04, 6 runs at a time, docs/gpu-check.md): (a run's fixed cost, a training
# step, torch.compile's cold compilation of the script's networks); the steps are estimated from their arithmetic
EST = {
    "gan": (11, 0.005, 29),      # two MLPs, batch 100: launch-bound
    "dcgan": (13, 0.015, 40),    # G, D 0.21 GFLOP an image forward: 0.3 TFLOP a step of 128
    "wgan": (12, 0.4, 45),       # the burst: 100 critic iterations (4 small passes each) in each of the first 25 steps
    "wgan_gp": (13, 0.06, 30),   # 5 critic iterations with a double backward
    "vae": (11, 0.003, 21),      # one MLP, batch 100: a few dozen kernels
    "realnvp": (16, 0.03, 262),  # 22 couplings of small ResNets at 28x28 (~2,000 kernels a step): long to compile
    "ddpm": (23, 0.06, 173),     # 12.1 GFLOP an image forward: 4.6 TFLOP a step of 128; a 0.4 GB checkpoint
    "pix2pix": (18, 0.02, 52),   # unet_256 (12 GFLOP forward), D 6.4: 0.1 TFLOP a step at batch 1; 0.7 GB checkpoint
    "cyclegan": (19, 0.04, 115), # resnet_9blocks, 99 GFLOP forward, 6 passes a step: ~2 TFLOP; 4 networks to compile
}
EST_BENCH = {"dcgan": 110, "ddpm": 290, "translation": 60, "wgan": 60}   # --quick's ddpm (2 flag sets): 113
EST_FID = 46
# The peers' checkouts under --peers, and the file that shows each is there
PEERS = {"dcgan": "examples/dcgan/main.py", "ddpm": "pytorch-ddpm/main.py",
         "translation": "pytorch-CycleGAN-and-pix2pix/models/__init__.py",
         "wgan": "PyTorch-GAN/implementations/wgan/wgan.py"}


# ----------------------------------------------------------------------------------------------
# Processes: a script's run in a new interpreter, or (CPU) in a fork of this one; output to a log file
# ----------------------------------------------------------------------------------------------
class Proc:
    """``python argv...`` with stdout and stderr in ``log``, in its own process group. ``fork``: argv[0] is a script
    run as __main__ in a fork of this process (tests/conftest.py's way, which spares the imports)."""

    def __init__(self, argv: list, log: Path, env: dict, cwd: Path, fork: bool = False):
        self.log, self.returncode, self.t0 = log, None, time.time()
        argv = [str(x) for x in argv]
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if fork:
                sys.stdout.flush()
                sys.stderr.flush()
                self.pid, self.popen = os.fork(), None
                if self.pid == 0:
                    _child(argv[0], argv[1:], cwd, env, fd)   # never returns
            else:
                self.popen = subprocess.Popen([sys.executable, *argv], stdout=fd, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, cwd=cwd, env=env, start_new_session=True)
                self.pid = self.popen.pid
        finally:
            os.close(fd)
        self._offset, self._text = 0, ""
        LIVE.add(self)

    def poll(self):
        if self.returncode is None:
            if self.popen is not None:
                self.returncode = self.popen.poll()
            else:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            if self.returncode is not None:
                LIVE.discard(self)
        return self.returncode

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None after killing it at ``timeout`` seconds."""
        deadline = time.time() + max(timeout, 0)
        while self.poll() is None:
            if time.time() > deadline:
                self.kill()
                return None
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """The process and its group (torch.compile's workers, torchrun's processes)."""
        if self.poll() is None:
            for kill in (lambda: os.killpg(self.pid, signal.SIGKILL), lambda: os.kill(self.pid, signal.SIGKILL)):
                try:
                    kill()
                except OSError:
                    pass
            while self.poll() is None:
                time.sleep(0.01)

    def text(self) -> str:
        """The log so far."""
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            new = f.read()
        self._offset += len(new)
        self._text += new.decode(errors="replace")
        return self._text


class Live(set):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def add(self, p):
        with self.lock:
            super().add(p)

    def discard(self, p):
        with self.lock:
            super().discard(p)

    def kill_all(self):
        with self.lock:
            procs = list(self)
        for p in procs:
            p.kill()


LIVE = Live()


def _child(script: str, args: list, cwd, env: dict, log_fd: int) -> None:
    """The forked process: become `python script args` (stdout and stderr in the log) and exit with its status."""
    import atexit
    import runpy
    code = 1
    try:
        atexit._clear()
        os.setsid()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        import torch
        torch.set_num_threads(1)   # a forked OpenMP pool hangs; the tiny networks need no threads
        sys.argv = [script, *args]
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        threading._shutdown()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, nearest first (from /proc)."""
    children = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, queue = [], [pid]
    while queue:
        for c in sorted(children.get(queue.pop(0), [])):
            out.append(c)
            queue.append(c)
    return out


def find_rank(launcher: int, rank: int) -> int | None:
    """The process of torchrun's worker ``rank`` (the nearest one whose environment has RANK=rank)."""
    want = f"RANK={rank}".encode()
    for pid in descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if want in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return pid
    return None


class TimeUp(Exception):
    """--time-limit reached (or this tool was signalled): no new process starts."""


# ----------------------------------------------------------------------------------------------
# What a check is, and reading a run's results
# ----------------------------------------------------------------------------------------------
@dataclass
class Check:
    id: str                  # dcgan:amp, dcgan:resume, ddp:dcgan, bench:ddpm, fid (--inject-failure names these)
    title: str               # dcgan --amp
    kind: str                # run, resume, ddp, bench, fid
    script: str = ""
    column: str = ""         # the column of the scripts' table
    estimate: float = 0.0    # seconds on an H200 (EST)
    verdict: str = "not run"   # OK, FAIL, SKIP, not run
    reason: str = ""
    seconds: float = 0.0
    logs: list = field(default_factory=list)
    details: dict = field(default_factory=dict)


def read_metrics(path: Path) -> tuple[list, dict]:
    """(loss columns, {step: {column: float}}) of a metrics.csv (empty cells left out)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c for c in reader.fieldnames or [] if c not in ("step", "time_s", "images_per_s")]
        rows = {}
        for r in reader:
            rows[int(r["step"])] = {k: float(v) for k, v in r.items() if k != "step" and v not in ("", None)}
    return columns, rows


def last_words(text: str, rc) -> str:
    """Why a run failed, in one line: its "error:" line, else its exception, else its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    status = "timed out (killed)" if rc is None else f"exit {rc}"
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return f"{status}: {line[:300]}"
    return f"{status}: {lines[-1][:300]}" if lines else status


def run_result(text: str, rc, out: Path, steps: int) -> tuple[bool, str, dict]:
    """Whether a training run did what it should: exit 0, "done at step N", metrics.csv to step N, finite."""
    if rc != 0:
        return False, last_words(text, rc), {}
    if f"done at step {steps}" not in text:
        return False, f"no 'done at step {steps}' in its output", {}
    try:
        columns, rows = read_metrics(out / "metrics.csv")
    except (OSError, KeyError, ValueError) as e:
        return False, f"metrics.csv unreadable: {e}", {}
    if not rows or max(rows) != steps:
        return False, f"metrics.csv ends at step {max(rows) if rows else None}, not {steps}", {}
    last = rows[steps]
    bad = [c for c in columns if c in last and not math.isfinite(last[c])]
    if bad:
        return False, f"non-finite {', '.join(bad)} at step {steps}", {}
    return True, "", {"steps": steps, "images_per_s": last.get("images_per_s"),
                      "losses": {c: last[c] for c in columns if c in last}}


def flatten(tree, prefix=""):
    """A checkpoint's nested dicts and lists as {path: leaf} (tests/conftest.py's flatten)."""
    import torch
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


def compare_runs(resumed: Path, straight: Path, stopped: int) -> dict:
    """How a run resumed at ``stopped`` differs from an uninterrupted one: every tensor of the checkpoints (models,
    optimizers, state: tests/conftest.py's assert_same_state), and the losses of metrics.csv before and after."""
    import torch
    a, b = (torch.load(d / "ckpt.pt", map_location="cpu", weights_only=True) for d in (resumed, straight))
    out = {"stopped": stopped, "step": [a["step"], b["step"]], "identical": a["step"] == b["step"]
           and a.get("data") == b.get("data"), "weights_max_abs_diff": 0.0, "weights_max_abs": 0.0, "differs": []}
    for group in ("models", "optimizers", "state"):
        fa, fb = flatten(a.get(group, {})), flatten(b.get(group, {}))
        if fa.keys() != fb.keys():
            out["identical"] = False
            out["differs"].append(f"{group}: other entries")
            continue
        for k in fa:
            x, y = fa[k], fb[k]
            if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
                same = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                if not same and group == "models" and x.shape == y.shape and x.is_floating_point():
                    d = (x.double() - y.double()).abs().max().item()
                    out["weights_max_abs_diff"] = max(out["weights_max_abs_diff"], d)
                if group == "models" and x.is_floating_point() and x.numel():
                    out["weights_max_abs"] = max(out["weights_max_abs"], x.double().abs().max().item())
            else:
                same = x == y
            if not same:
                out["identical"] = False
                if len(out["differs"]) < 5:
                    out["differs"].append(f"{group}/{k}")
    columns, ra = read_metrics(resumed / "metrics.csv")
    _, rb = read_metrics(straight / "metrics.csv")
    steps = sorted(set(ra) & set(rb))
    # each loss's difference relative to its column's scale (its largest |value|): W estimates near 0 included
    scale = {c: max([abs(r[c]) for rows in (ra, rb) for r in rows.values() if c in r] or [0.0]) or 1.0
             for c in columns}
    worst = {"before": (0.0, 0.0, None), "after": (0.0, 0.0, None)}   # (relative, absolute, where)
    for step in steps:
        for c in columns:
            if c in ra[step] and c in rb[step]:
                d = abs(ra[step][c] - rb[step][c])
                part = "after" if step > stopped else "before"
                if d / scale[c] > worst[part][0]:
                    worst[part] = (d / scale[c], d, f"{c} at step {step}: {ra[step][c]:.6g} vs {rb[step][c]:.6g}")
    missing = [s for s in range(stopped + 1, b["step"] + 1) if s not in ra or s not in rb]
    out.update(losses_equal=worst["before"][1] == 0 and worst["after"][1] == 0 and not missing,
               loss_rel_diff_after=worst["after"][0], loss_max_abs_diff_after=worst["after"][1],
               loss_worst_after=worst["after"][2], loss_rel_diff_before=worst["before"][0],
               loss_max_abs_diff_before=worst["before"][1], rows_missing=missing)
    return out


def beyond_noise(c: dict) -> str:
    """Why a CUDA resume differs more than kernel noise explains, or '': a loss after the resume off by more than
    1e-3 of its scale and by more than 10 times what the two runs differ before the signal (two processes alike:
    cuDNN's autotuner and atomic additions, the noise of every CUDA run). A resume that loses a random generator's
    state or an optimizer's moments moves the losses by a few 1e-3 to 1e-1 at once; kernel noise, by 1e-7 to 1e-4."""
    if c["rows_missing"] or c["step"][0] != c["step"][1]:
        return f"steps {c['step']}, rows {c['rows_missing']} missing"
    if c["loss_rel_diff_after"] > max(1e-3, 10 * c["loss_rel_diff_before"]):
        return (f"{c['loss_worst_after']}, {c['loss_rel_diff_after']:.1e} of its scale after the resume, "
                f"{c['loss_rel_diff_before']:.1e} before")
    return ""


def describe_resume(c: dict) -> str:
    if c["identical"] and c["losses_equal"]:
        return f"exact: stopped at step {c['stopped']}, bit-identical weights, optimizers and losses"
    text = (f"stopped at step {c['stopped']}; after the resume the losses differ by at most "
            f"{c['loss_rel_diff_after']:.1e} of their scale")
    if c["loss_worst_after"]:
        text += f" ({c['loss_worst_after']})"
    text += (f", the weights by at most {c['weights_max_abs_diff']:.3g} (largest weight {c['weights_max_abs']:.3g}); "
             f"before the signal, two runs alike: {c['loss_rel_diff_before']:.1e}")
    return text


# ----------------------------------------------------------------------------------------------
# The checks
# ----------------------------------------------------------------------------------------------
class Suite:
    def __init__(self, a, device: str, info: dict):
        self.a, self.device, self.info = a, device, info
        self.cuda = device == "cuda"
        self.fork = not self.cuda and a.workers == 1
        self.out, self.logs = Path(a.out), Path(a.out) / "logs"
        self.work = Path(a.work) if a.work else None   # prepare()
        self.steps = 10 if self.cuda else 3
        self.t0 = time.time()
        self.deadline = self.t0 + a.time_limit if a.time_limit else math.inf
        self.checks: list[Check] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        if a.workers > 1 and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:   # compilations side by side
            self.env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(2, (os.cpu_count() or 2) // a.workers))
        self.peer_env = dict(self.env)
        if a.peers and (Path(a.peers) / "python").is_dir():
            path = [str((Path(a.peers) / "python").resolve()), self.env.get("PYTHONPATH", "")]
            self.peer_env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)

    # --- bookkeeping ---
    def prepare(self) -> None:
        """The folders: --out with its logs/, and the runs' (--work, or a temporary one)."""
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = self.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))
        self.work.mkdir(parents=True, exist_ok=True)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        return check

    def left(self) -> float:
        return self.deadline - time.time()

    def timeout(self, estimate: float) -> float:
        own = 120 + 4 * estimate if self.cuda else 900
        return min(own, self.left())

    def finish(self, check: Check, verdict: str, reason: str = "", t0: float | None = None) -> None:
        check.verdict, check.reason = verdict, reason
        if t0 is not None:
            check.seconds = round(time.time() - t0, 1)
        with self.lock:
            est = f"(est {check.estimate:.0f} s)" if self.cuda and check.estimate else ""
            note = f": {reason}" if reason else ""
            print(f"[{time.time() - self.t0:6.0f} s] {verdict:<4} {check.title:<45} {check.seconds:6.1f} s {est}{note}",
                  flush=True)
            write_report(self)

    def extra(self, check: Check) -> list:
        return ["--no-such-flag"] if check.id in self.a.inject_failure else []

    def start(self, argv: list, log_name: str, check: Check, gpu: str | None = None, peer: bool = False) -> Proc:
        if self.left() <= 1:
            raise TimeUp
        log = self.logs / f"{log_name}.log"
        check.logs.append(str(log.relative_to(self.out)))
        env = dict(self.peer_env if peer else self.env)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        fork = self.fork and str(argv[0]).endswith(".py") and not peer
        return Proc(argv, log, env, self.work, fork=fork)

    def run(self, argv: list, log_name: str, check: Check, timeout: float, **kw) -> tuple[int | None, str]:
        p = self.start(argv, log_name, check, **kw)
        rc = p.wait(timeout)
        return rc, p.text()

    def config(self, script: str) -> list:
        return [*(PAPER[script][0] if self.cuda else TINY[script]), "--device", self.device]

    def est_run(self, script: str, steps: int, compiled: bool = False) -> float:
        start, step, compile_s = EST[script]
        return start + steps * step + (compile_s if compiled else 0)

    # --- 1. a script with a set of flags ---
    def flag_sets(self, script: str) -> list:
        compiled = ["--amp", *([] if script == "gan" else ["--channels-last"]), "--compile"]
        sets = [("amp", ["--amp"]), ("compile", compiled), ("fp16", ["--amp", "fp16"])]
        return [(key, flags) for key, flags in sets if key not in self.a.skip]

    def flag_run(self, check: Check, script: str, flags: list, gpu: str | None) -> None:
        t0 = time.time()
        out = self.work / f"{script}-{check.id.split(':')[1]}"
        argv = [ROOT / f"{script}.py", *self.config(script), *flags, "--steps", self.steps, "--log-every", 1,
                "--sample-every", BIG, "--ckpt-every", BIG, "--out", out, *self.extra(check)]
        rc, text = self.run(argv, check.id.replace(":", "-"), check, self.timeout(check.estimate), gpu=gpu)
        ok, reason, details = run_result(text, rc, out, self.steps)
        check.details.update(details)
        self.finish(check, "OK" if ok else "FAIL", reason, t0)

    # --- 2. the no-flag run, and --resume across a SIGTERM ---
    def wait_for_step(self, p: Proc, step: int, timeout: float) -> bool:
        deadline = time.time() + timeout
        pattern = re.compile(r"^step (\d+)/", re.M)
        while time.time() < deadline and p.poll() is None:
            steps = [int(s) for s in pattern.findall(p.text())]
            if steps and max(steps) >= step:
                return True
            time.sleep(0.01)
        return False

    def resume_chain(self, plain: Check, resume: Check | None, script: str, gpu: str | None) -> None:
        """Signalled at step >= 2, resumed for 2 more steps, then the uninterrupted run of as many steps (the
        no-flag check), compared."""
        signalled, t0 = self.work / f"{script}-signalled", time.time()
        stopped = self.signal_and_resume(resume, script, signalled, gpu) if resume is not None else None
        steps = stopped + 2 if stopped is not None else self.steps
        t1 = time.time()
        straight = self.work / f"{script}-none"
        argv = [ROOT / f"{script}.py", *self.config(script), "--steps", steps, "--log-every", 1,
                "--sample-every", BIG, "--ckpt-every", BIG, "--out", straight, *self.extra(plain)]
        rc, text = self.run(argv, f"{script}-none", plain, self.timeout(plain.estimate), gpu=gpu)
        ok, reason, details = run_result(text, rc, straight, steps)
        plain.details.update(details)
        self.finish(plain, "OK" if ok else "FAIL", reason, t1)
        if stopped is None:
            return
        resume.seconds = round(time.time() - t0, 1)
        if not ok:
            self.finish(resume, "FAIL", "the uninterrupted run to compare with failed", t0)
            return
        try:
            c = compare_runs(signalled, straight, stopped)
        except Exception as e:   # noqa: BLE001 (a report, whatever broke)
            self.finish(resume, "FAIL", f"comparison: {type(e).__name__}: {e}", t0)
            return
        resume.details.update(c)
        exact = c["identical"] and c["losses_equal"]
        if exact:
            self.finish(resume, "OK", describe_resume(c), t0)
        elif not self.cuda:
            self.finish(resume, "FAIL", "not bit-identical on the CPU: " + describe_resume(c)
                        + (f"; differs: {', '.join(c['differs'])}" if c["differs"] else ""), t0)
        elif beyond_noise(c):
            self.finish(resume, "FAIL", "beyond kernel noise: " + beyond_noise(c), t0)
        else:
            self.finish(resume, "OK", describe_resume(c), t0)

    def signal_and_resume(self, resume: Check, script: str, out: Path, gpu: str | None) -> int | None:
        """A run signalled once it logged step 2, then resumed for 2 more steps: the step it stopped at, or None
        (``resume`` then failed, with the reason)."""
        t0 = time.time()
        endless = 3000 if script in ("pix2pix", "cyclegan") else 10**6   # within the translation schedules
        argv = [ROOT / f"{script}.py", *self.config(script), "--steps", endless, "--log-every", 1,
                "--sample-every", BIG, "--ckpt-every", BIG, "--out", out]
        p = self.start(argv, f"{script}-resume-1-signalled", resume, gpu=gpu)
        reached = self.wait_for_step(p, 2, self.timeout(resume.estimate / 3))
        p.send_signal(signal.SIGTERM)
        rc = p.wait(self.timeout(resume.estimate / 3))
        text = p.text()
        saved = re.findall(r"^checkpoint saved at step (\d+)", text, re.M)
        if not reached:
            return self.finish(resume, "FAIL", "never logged step 2: " + last_words(text, rc), t0)
        if rc != 0 or len(saved) != 1:
            why = last_words(text, rc) if rc != 0 else "no 'checkpoint saved at step N' line"
            return self.finish(resume, "FAIL", f"after the SIGTERM: {why}", t0)
        stopped = int(saved[0])
        argv = [ROOT / f"{script}.py", "--resume", "--steps", stopped + 2, "--log-every", 1, "--device", self.device,
                "--out", out, *self.extra(resume)]
        rc, text = self.run(argv, f"{script}-resume-2-resumed", resume, self.timeout(resume.estimate / 3), gpu=gpu)
        expected = (f"training from step {stopped} (resumed)", f"done at step {stopped + 2}")
        if rc != 0 or not all(e in text for e in expected):
            why = last_words(text, rc) if rc != 0 else f"no '{expected[0]}' and '{expected[1]}'"
            return self.finish(resume, "FAIL", f"the resumed run: {why}", t0)
        return stopped

    # --- 3. torchrun, 2 processes ---
    def ddp(self, check: Check, script: str) -> None:
        t0 = time.time()
        launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / f"{script}.py"]
        cfg = self.config(script)
        out, straight = self.work / f"ddp-{script}", self.work / f"ddp-{script}-straight"
        p = self.start([*launch, *cfg, "--steps", 10**6, "--log-every", 1, "--sample-every", BIG, "--ckpt-every", BIG,
                        "--out", out], f"ddp-{script}-1-signalled", check)
        reached = self.wait_for_step(p, 3, self.timeout(check.estimate / 3))
        worker = find_rank(p.pid, 1) if reached else None
        if worker is None:
            p.kill()
            text = p.text()
            return self.finish(check, "FAIL", "rank 1 not found" if reached else "never logged step 3: "
                               + last_words(text, p.returncode), t0)
        os.kill(worker, signal.SIGTERM)   # one rank only: a signal reaches the processes at different moments
        rc = p.wait(self.timeout(check.estimate / 3))
        text = p.text()
        saved = re.findall(r"^checkpoint saved at step (\d+)", text, re.M)
        if rc != 0 or len(saved) != 1:
            return self.finish(check, "FAIL", f"SIGTERM to rank 1: {len(saved)} 'checkpoint saved' lines, "
                               + last_words(text, rc), t0)
        stopped = int(saved[0])
        import torch
        ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)
        if ckpt["step"] != stopped or ckpt.get("world") != 2:
            return self.finish(check, "FAIL", f"checkpoint of step {ckpt['step']}, world {ckpt.get('world')}", t0)
        rc, text = self.run([*launch, "--resume", "--steps", stopped + 3, "--log-every", 1, "--device", self.device,
                             "--out", out, *self.extra(check)], f"ddp-{script}-2-resumed", check,
                            self.timeout(check.estimate / 3))
        if rc != 0 or f"training from step {stopped} (resumed)" not in text:
            return self.finish(check, "FAIL", "the resumed run: " + last_words(text, rc), t0)
        rc, text = self.run([*launch, *cfg, "--steps", stopped + 3, "--log-every", 1, "--sample-every", BIG,
                             "--ckpt-every", BIG, "--out", straight], f"ddp-{script}-3-straight", check,
                            self.timeout(check.estimate / 3))
        if rc != 0:
            return self.finish(check, "FAIL", "the uninterrupted 2-process run: " + last_words(text, rc), t0)
        c = compare_runs(out, straight, stopped)
        check.details.update(c)
        exact = c["identical"] and c["losses_equal"]
        bad = (not self.cuda and not exact) or (self.cuda and beyond_noise(c))
        self.finish(check, "FAIL" if bad else "OK", "both ranks stopped at step "
                    f"{stopped}, one checkpoint; resumed: " + describe_resume(c), t0)

    # --- 4. speed beside the peers ---
    def bench_command(self, name: str, peer: Path | None) -> list:
        b = ROOT / "tools" / "bench"
        dev = ["--device", self.device]
        if name == "dcgan":
            configs = ["none", "amp+channels-last", "amp+channels-last+compile"]
            size = ["--image-size", "64", "--batch-size", "128", "--steps", "60", "--log-every", "10"] if self.cuda \
                else ["--image-size", "64", "--batch-size", "16", "--steps", "4", "--log-every", "1"]   # 64: the peer
            cmd = [b / "bench.py", "dcgan", *dev, *size, "--rounds", "1"]
            peer_args = ["--peer", peer / PEERS["dcgan"]] if peer else []
        elif name == "ddpm":
            configs = ["none", "amp"] if self.a.quick else ["none", "amp", "amp+channels-last+compile"]
            size = ["--arch", "cifar10", "--batch-size", "128", "--steps", "12", "--log-every", "2", "--warmup", "2"] \
                if self.cuda else ["--arch", "tiny", "--batch-size", "16", "--steps", "4", "--log-every", "1",
                                   "--warmup", "1"]
            cmd = [b / "bench_ddpm.py", *dev, *size, "--rounds", "1"]
            peer_args = ["--peer", peer / "pytorch-ddpm"] if peer else []
        elif name == "translation":
            configs = ["none", "amp+channels-last"]
            size = ["--image-size", "256", "--steps", "20", "--warmup", "3"] if self.cuda else \
                ["--image-size", "128", "--steps", "3", "--warmup", "1"]
            cmd = [b / "bench_translation.py", *dev, *size, "--batch-size", "1",
                   "--checkpoints", self.work / "bench-translation"]
            peer_args = ["--peer", peer / "pytorch-CycleGAN-and-pix2pix"] if peer else []
        else:
            configs = ["none", "amp+channels-last"]
            size = ["--steps", "40", "--log-every", "5"] if self.cuda else ["--steps", "4", "--log-every", "1",
                                                                             "--warmup", "1"]
            cmd = [b / "bench_wgan.py", *dev, *size, "--rounds", "1", "--data-root", self.fashion_mnist()]
            peer_args = ["--peer", peer / "PyTorch-GAN" / "implementations"] if peer else []
        if "compile" in self.a.skip:
            configs = [c for c in configs if "compile" not in c]
        return [*cmd, "--configs", *configs, *peer_args]

    def fashion_mnist(self) -> str:
        if self.a.data_root:
            return self.a.data_root
        mine = Path(self.a.peers or "") / "fashion-mnist"
        return str(mine) if self.a.peers and mine.is_dir() else "data"

    def has_fashion_mnist(self) -> bool:
        import common
        root = Path(self.fashion_mnist()).expanduser()
        return all(common._find_idx("fashion-mnist", root, s) is not None
                   for s in (*common._IDX_STEMS["train"], *common._IDX_STEMS["test"]))

    def bench(self, check: Check, name: str) -> None:
        t0 = time.time()
        if name == "wgan" and not self.has_fashion_mnist():
            return self.finish(check, "SKIP", f"not measured: no Fashion-MNIST in {self.fashion_mnist()} nor in "
                               "/usr/share/datasets/fashion-mnist (put its four .gz files in PEERS/fashion-mnist)", t0)
        peers = Path(self.a.peers) if self.a.peers else None
        peer = peers if peers and (peers / PEERS[name]).is_file() else None
        check.details["peer"] = "measured" if peer else \
            f"not measured: no {PEERS[name].split('/')[0]} in --peers" if peers else "not measured: no --peers"
        cmd = [*self.bench_command(name, peer), *self.extra(check)]
        check.details["command"] = shown(cmd)
        rc, text = self.run(cmd, f"bench-{name}", check, self.timeout(check.estimate), peer=True)
        if rc != 0 and peer is not None and self.peer_failed(text):
            check.details["peer"] = "failed: " + self.peer_failed(text)
            cmd = self.bench_command(name, None)
            check.details["command"] = shown(cmd)
            rc, text = self.run(cmd, f"bench-{name}-ours-alone", check, self.timeout(check.estimate), peer=True)
        rows = parse_bench(text)
        check.details["rows"] = rows
        if rc != 0 or not rows:
            return self.finish(check, "FAIL", last_words(text, rc) if rc != 0 else "no images/s in its output", t0)
        self.finish(check, "OK", "; ".join(f"{r['name']} {r['images_per_s']:g}" for r in rows)
                    + ("" if peer and check.details["peer"] == "measured" else f" (peer {check.details['peer']})"), t0)

    @staticmethod
    def peer_failed(text: str) -> str:
        """Why the peer failed, when the output says it did (the bench tools' "the peer failed", or an exception
        raised in the peer's files), else ''."""
        if "the peer failed" not in text and not re.search(r"File \"[^\"]*(examples|pytorch-ddpm|CycleGAN|PyTorch-GAN)",
                                                            text):
            return ""
        missing = re.findall(r"No module named '([^']+)'", text)
        if missing:
            return f"it needs the package {missing[-1]} (put it in PEERS/python: docs/gpu-check.md)"
        return last_words(text, 1).removeprefix("exit 1: ")

    # --- 5. fid.py beside pytorch-fid ---
    def fid(self, check: Check) -> None:
        t0 = time.time()
        n = self.a.fid_n or (10_000 if self.cuda else 32)
        try:
            folders, weights = self.fid_inputs(n)
        except Exception as e:   # noqa: BLE001
            return self.finish(check, "FAIL", f"preparing the images: {type(e).__name__}: {e}", t0)
        sys.path.insert(0, str(ROOT / "tools" / "bench"))
        from bench_fid import PYTORCH_FID
        batch = ["--batch-size", str(self.a.fid_batch_size)]
        commands = {"fid.py": [ROOT / "fid.py", *folders, "--weights", weights, "--device", self.device, *batch,
                               *self.extra(check)],
                    "pytorch-fid": ["-c", PYTORCH_FID, weights, *folders, "--device", self.device, "--dims", "2048",
                                    *batch]}
        results = {}
        check.details["commands"] = {name: shown(argv) for name, argv in commands.items()}
        for name, argv in commands.items():
            t = time.time()
            rc, text = self.run(argv, f"fid-{name.replace('.', '-')}", check, self.timeout(check.estimate / 2),
                                peer=True)
            found = re.search(r"(?:FID|fid):\s+(\S+)", text)
            if rc == 0 and found:
                results[name] = {"fid": float(found.group(1)), "seconds": round(time.time() - t, 2)}
            elif name == "pytorch-fid" and "No module named 'pytorch_fid'" in text:
                results[name] = {"not measured": "pytorch-fid is not installed (put it in PEERS/python)"}
            else:
                results[name] = {"failed": last_words(text, rc)}
        check.details.update(n=n, results=results)
        ours, peer = results["fid.py"], results["pytorch-fid"]
        if "fid" not in ours:
            return self.finish(check, "FAIL", f"fid.py: {ours['failed']}", t0)
        if "fid" not in peer:
            why = peer.get("not measured") or f"failed: {peer.get('failed')}"
            return self.finish(check, "OK" if "not measured" in peer else "FAIL",
                               f"fid.py {ours['fid']:.6g} in {ours['seconds']:.1f} s; pytorch-fid {why}", t0)
        diff = abs(ours["fid"] - peer["fid"]) / abs(peer["fid"])
        ratio = peer["seconds"] / ours["seconds"]
        check.details.update(relative_difference=diff, time_ratio=ratio)
        summary = (f"2 x {n:,} images: fid.py {ours['fid']:.6g} in {ours['seconds']:.1f} s, pytorch-fid "
                   f"{peer['fid']:.6g} in {peer['seconds']:.1f} s; |dFID|/FID {diff:.1e}; fid.py {ratio:.2f}x as fast")
        self.finish(check, "OK" if diff <= 1e-2 else "FAIL", summary, t0)

    def fid_inputs(self, n: int) -> tuple[list, Path]:
        """Two folders of n PNGs of CIFAR-10's size (synthetic disks; other disks in negative: two distributions,
        as generated and real images are) and the tests' random Inception weights."""
        import torch
        from PIL import Image
        import common
        root = self.work / "fid"
        folders = []
        for side, images in (("a", common.synthetic_images(n, 3, 32, seed=0)),
                             ("b", 255 - common.synthetic_images(n, 3, 32, seed=1))):
            folder = root / side
            folder.mkdir(parents=True, exist_ok=True)
            arrays = images.permute(0, 2, 3, 1).numpy()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: Image.fromarray(arrays[i]).save(folder / f"{i:06d}.png"), range(n)))
            folders.append(folder)
        sys.path[:0] = [str(ROOT / "tests")]
        from test_fid import random_inception_state
        weights = root / "random-inception.pth"
        torch.save(random_inception_state(), weights)
        return folders, weights


def shown(argv: list) -> str:
    """A command as a user types it, from the repository's root."""
    words = ["python", *(str(x).replace(str(ROOT) + os.sep, "") for x in argv)]
    return " ".join(w if w and not re.search(r"[\s'\"|;&()$]", w) else "'" + w.replace("'", "'\\''") + "'"
                    for w in words)


def parse_bench(text: str) -> list[dict]:
    """The rows of a bench tool's final table(s): "  name   123.4 images/s  1.23x the peer", under its title."""
    rows, title = [], ""
    for line in text.splitlines():
        found = re.match(r"^  (\S.*?)\s+([0-9][0-9.]*) images/s(?:\s+([0-9.]+)x the (?:peer|official))?", line)
        if found:
            name = found.group(1)
            rows.append({"table": title, "name": name, "images_per_s": float(found.group(2)),
                         "ratio": float(found.group(3)) if found.group(3) else None,
                         "peer": name == "peer" or name.startswith("peer ") or name.startswith("official")})
        elif line.strip() and not line.startswith((" ", "round ")) and line.rstrip().endswith((":", ")")):
            title = line.strip().rstrip(":")
    return rows


# ----------------------------------------------------------------------------------------------
# The plan, its schedule and the report
# ----------------------------------------------------------------------------------------------
def plan(s: Suite) -> tuple[list, list]:
    """(parallel jobs, serial jobs), each job (estimate, its checks, the function that runs them)."""
    a, parallel, serial = s.a, [], []
    gpus = s.info.get("gpu_count", 0)

    def gpu():   # several GPUs: the runs of 1. and 2. spread over them, job by job
        return str(len(parallel) % gpus) if gpus > 1 else None
    for script in a.scripts:
        col = {"amp": "--amp", "fp16": "--amp fp16",
               "compile": "--amp --compile" if script == "gan" else "--amp --channels-last --compile"}
        plain = s.add(Check(f"{script}:none", f"{script} (no flag)", "run", script, "no flag",
                            s.est_run(script, s.steps)))
        resume = None
        if "resume" not in a.skip:
            resume = s.add(Check(f"{script}:resume", f"{script} --resume after SIGTERM", "resume", script,
                                 "resume after SIGTERM", 2 * s.est_run(script, 4)))
        checks = [c for c in (resume, plain) if c]
        parallel.append((sum(c.estimate for c in checks), checks,
                         lambda p=plain, r=resume, sc=script, g=gpu(): s.resume_chain(p, r, sc, g)))
        for key, flags in s.flag_sets(script):
            c = s.add(Check(f"{script}:{key}", f"{script} {' '.join(flags)}", "run", script, col[key],
                            s.est_run(script, s.steps, compiled=key == "compile")))
            parallel.append((c.estimate, [c], lambda c=c, sc=script, f=flags, g=gpu(): s.flag_run(c, sc, f, g)))
    if "ddp" not in a.skip:
        for script in [x for x in (("dcgan",) if a.quick else ("dcgan", "ddpm")) if x in a.scripts]:
            c = s.add(Check(f"ddp:{script}", f"torchrun 2 processes: {script}, SIGTERM to rank 1", "ddp", script,
                            estimate=3 * s.est_run(script, 8) + 10))
            if a.ddp == "off" or (a.ddp == "auto" and gpus < 2):
                c.verdict, c.estimate = "SKIP", 0
                c.reason = f"{gpus} GPU{'' if gpus == 1 else 's'}: needs 2" if a.ddp == "auto" else "--ddp off"
            else:
                serial.append((c.estimate, [c], lambda c=c, sc=script: s.ddp(c, sc)))
    if "bench" not in a.skip:
        for name in a.bench:
            est = 113 if (name == "ddpm" and a.quick) else EST_BENCH[name]
            c = s.add(Check(f"bench:{name}", f"speed: {name} beside its peer", "bench", estimate=est))
            serial.append((est, [c], lambda c=c, n=name: s.bench(c, n)))
    if "fid" not in a.skip:
        c = s.add(Check("fid", "fid.py beside pytorch-fid", "fid", estimate=EST_FID))
        serial.append((EST_FID, [c], lambda c=c: s.fid(c)))
    return parallel, serial


def wall_estimate(parallel: list, serial: list, workers: int) -> float:
    """Longest first on ``workers`` slots, then the serial jobs."""
    slots = [0.0] * max(1, workers)
    for est, _, _ in sorted(parallel, key=lambda j: -j[0]):
        slots[slots.index(min(slots))] += est
    return max(slots) + sum(est for est, _, _ in serial)


def run_jobs(s: Suite, parallel: list, serial: list) -> None:
    def guarded(job):
        _, checks, fn = job
        try:
            fn()
        except TimeUp:
            for c in checks:
                if c.verdict == "not run":
                    s.finish(c, "not run", "--time-limit reached" if not s.stopped else "this tool was stopped")
        except Exception as e:   # noqa: BLE001 (a check's own bug must not stop the others)
            traceback.print_exc()
            for c in checks:
                if c.verdict == "not run":
                    s.finish(c, "FAIL", f"the check itself broke: {type(e).__name__}: {e}")
    if s.a.workers > 1:
        with ThreadPoolExecutor(s.a.workers) as pool:
            for f in as_completed([pool.submit(guarded, job) for job in sorted(parallel, key=lambda j: -j[0])]):
                f.result()
    else:
        for job in parallel:
            guarded(job)
    for job in serial:
        guarded(job)


def machine_info(device: str) -> dict:
    import torch
    info = {"date": datetime.date.today().isoformat(), "host": platform.node(), "python": platform.python_version(),
            "torch": torch.__version__, "device": device, "cpus": os.cpu_count(), "gpu_count": 0}
    if device == "cuda":
        n = torch.cuda.device_count()
        caps = [torch.cuda.get_device_capability(i) for i in range(n)]
        info.update(gpu_count=n, gpus=[torch.cuda.get_device_name(i) for i in range(n)],
                    capability=[f"{c[0]}.{c[1]}" for c in caps], cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), bf16=all(c[0] >= 8 for c in caps))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def machine_line(info: dict) -> str:
    if info["device"] == "cuda":
        gpus = info["gpus"]
        name = gpus[0] + (f" x {len(gpus)}" if len(gpus) > 1 else "")
        return (f"{name} (compute capability {info['capability'][0]}, bf16: {'yes' if info['bf16'] else 'no'}), "
                f"torch {info['torch']}, CUDA {info['cuda']}, cuDNN {info['cudnn']}, {info['cpus']} CPUs")
    return f"CPU only ({info['cpus']} CPUs), torch {info['torch']}: tiny networks, a test of this tool, no speed figure"


def write_report(s: Suite) -> None:
    """report.json and report.md, rewritten after every check (a cut-off run still leaves its report)."""
    checks = s.checks
    failed = [c for c in checks if c.verdict == "FAIL"]
    data = {"machine": s.info, "command": " ".join(sys.argv), "quick": s.a.quick,
            "elapsed_s": round(time.time() - s.t0, 1), "failed": len(failed),
            "checks": [asdict(c) for c in checks]}
    tmp = s.out / "report.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(s.out / "report.json")
    tmp = s.out / "report.md.tmp"
    tmp.write_text(markdown(s, checks, failed))
    tmp.replace(s.out / "report.md")


def cell(c: Check | None, cuda: bool) -> str:
    if c is None:
        return "–"
    if c.verdict != "OK":
        return f"**{c.verdict}**" if c.verdict == "FAIL" else c.verdict
    rate = c.details.get("images_per_s")
    return f"OK, {c.seconds:.{0 if c.seconds >= 10 else 1}f} s" + (f", {rate:,.0f} img/s" if rate and cuda else "")


def rate(row: dict) -> str:
    name = row["name"] if row["name"].startswith("(") else f"({row['name']})"
    return f"{row['images_per_s']:,.4g} {name}"


def markdown(s: Suite, checks: list, failed: list) -> str:
    info, by_id = s.info, {c.id: c for c in checks}
    done = [c for c in checks if c.verdict in ("OK", "FAIL")]
    lines = [f"# GPU check, {info['date']}: {machine_line(info)}", "",
             f"`{' '.join(sys.argv)}`{' (--quick)' if s.a.quick else ''}: {len(done)} checks run, "
             f"**{len(failed)} failed**, {sum(c.verdict == 'SKIP' for c in checks)} skipped, "
             f"{sum(c.verdict == 'not run' for c in checks)} not run, in {time.time() - s.t0:.0f} s.", ""]
    scripts = [sc for sc in s.a.scripts if f"{sc}:none" in by_id]
    if scripts:
        cols = [("none", "no flag"), ("amp", "`--amp`"), ("compile", "`--amp --channels-last --compile`"),
                ("fp16", "`--amp fp16`"), ("resume", "resume after SIGTERM")]
        lines += ["## Every script at its paper's configuration, synthetic data" if s.cuda else
                  "## Every script, tiny networks (--device cpu)", "",
                  f"{s.steps} steps each (the resume: until the signal, then 2 more); img/s: the last step's, "
                  "warm-up included (not a benchmark).", "",
                  "| script | configuration | " + " | ".join(t for _, t in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        for sc in scripts:
            conf = PAPER[sc][1] if s.cuda else " ".join(TINY[sc])
            cells = [cell(by_id.get(f"{sc}:{k}"), s.cuda) if k not in s.a.skip else "skipped" for k, _ in cols]
            lines.append(f"| {sc} | {conf} | " + " | ".join(cells) + " |")
        if "gan" in scripts and "compile" not in s.a.skip:
            lines += ["", "gan has no --channels-last: its third column is `--amp --compile`."]
        resumes = [by_id[f"{sc}:resume"] for sc in scripts if f"{sc}:resume" in by_id]
        if resumes:
            lines += ["", "## --resume across a SIGTERM: the resumed run against an uninterrupted one", "",
                      "| script | verdict | how they compare |", "|---|---|---|"]
            lines += [f"| {c.script} | {c.verdict} | {c.reason or '–'} |" for c in resumes]
    ddp = [c for c in checks if c.kind == "ddp"]
    if ddp:
        lines += ["", "## torchrun, 2 processes", "", "| check | verdict | detail |", "|---|---|---|"]
        lines += [f"| {c.title} | {c.verdict} | {c.reason or '–'} |" for c in ddp]
    benches = [c for c in checks if c.kind == "bench"]
    if benches:
        lines += ["", f"## Speed beside the peers, images/s ({machine_line(info).split(' (')[0]}, {info['date']})", "",
                  "For docs/speed.md's GPU section. Each table as its tool prints it: ours with each flag set, the "
                  "peer, and ours / the peer.", "",
                  "| benchmark | ours | the peer | ratio | command |", "|---|---|---|---|---|"]
        for c in benches:
            rows = c.details.get("rows") or []
            tables = list(dict.fromkeys(r["table"] for r in rows))
            command = f"`{c.details['command']}`" if c.details.get("command") else "–"
            if not tables:
                lines.append(f"| {c.title} | {c.verdict}: {c.reason} | – | – | {command} |")
            for t in tables:
                ours = [r for r in rows if r["table"] == t and not r["peer"]]
                peer = [r for r in rows if r["table"] == t and r["peer"]]
                peer_cell = ", ".join(rate(r) for r in peer) or c.details.get("peer")
                ratios = ", ".join(f"{r['ratio']:.2f}×" for r in ours if r["ratio"]) or "–"
                lines.append(f"| {t} | {', '.join(rate(r) for r in ours)} | {peer_cell} | {ratios} | {command} |")
    fid = by_id.get("fid")
    if fid:
        lines += ["", "## fid.py beside pytorch-fid (random Inception weights, the same PNGs)", "",
                  f"{fid.verdict}: {fid.reason or '–'}"]
    lines += ["", "## Every check", "", "| check | verdict | time, s | estimate, s (H200, measured) | reason | log |",
              "|---|---|---|---|---|---|"]
    for c in checks:
        reason = c.reason.replace("|", "\\|") if c.verdict != "OK" or c.kind in ("bench", "fid") else ""
        lines.append(f"| {c.title} | {c.verdict} | {c.seconds:.1f} | {c.estimate:.0f} | {reason} | "
                     f"{', '.join(c.logs)} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="dcgan and ddpm without --compile, the DDPM benchmark and FID: about 4.5 min")
    p.add_argument("--out", metavar="DIR", help="report.md, report.json, logs/ (default: gpu-check-<date>)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="auto: cuda if there is one")
    p.add_argument("--peers", metavar="DIR", help="a folder of the peers' checkouts (module docstring)")
    p.add_argument("--data-root", metavar="DIR", help="Fashion-MNIST's files for the WGAN benchmark (default: "
                   "PEERS/fashion-mnist, else data/, else Debian's /usr/share/datasets/fashion-mnist)")
    p.add_argument("--scripts", nargs="*", choices=SCRIPTS, help="these scripts only (none: no script)")
    p.add_argument("--bench", nargs="*", choices=BENCHES, help="these benchmarks only (none: no benchmark)")
    p.add_argument("--skip", nargs="+", default=[], choices=KINDS, help="leave out these checks")
    p.add_argument("--ddp", default="auto", choices=("auto", "on", "off"),
                   help="torchrun's check: auto (with 2 GPUs or more) | on (also on the CPU, gloo) | off")
    p.add_argument("--workers", type=int, metavar="N", help="runs at a time (default: 6 on CUDA, 1 on the CPU: forks)")
    p.add_argument("--time-limit", type=float, default=0, metavar="SECONDS",
                   help="start nothing after SECONDS, and cut what still runs then (default: 0, none)")
    p.add_argument("--fid-n", type=int, default=0, metavar="N", help="images per folder (default: 10,000; CPU: 32)")
    p.add_argument("--fid-batch-size", type=int, default=50, metavar="N",
                   help="of both FIDs (default: pytorch-fid's, 50)")
    p.add_argument("--work", metavar="DIR",
                   help="the run folders (checkpoints), kept (default: a temporary folder, removed at the end)")
    p.add_argument("--inject-failure", nargs="+", default=[], metavar="CHECK",
                   help="add a flag no script has to these checks' commands (dcgan:amp, dcgan:resume, bench:ddpm, "
                        "fid...): to test this tool")
    a = p.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import torch
    device = a.device if a.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    a.scripts = a.scripts if a.scripts is not None else list(QUICK_SCRIPTS if a.quick else SCRIPTS)
    a.bench = a.bench if a.bench is not None else list(QUICK_BENCHES if a.quick else BENCHES)
    if a.quick and "compile" not in a.skip:   # the costliest runs (3 min for ddpm's), proven on an H200 2026-12-04
        a.skip.append("compile")
    a.workers = a.workers or (6 if device == "cuda" else 1)
    a.out = a.out or f"gpu-check-{datetime.date.today().isoformat()}"
    for name in ("out", "work", "peers", "data_root"):   # the runs start in the work folder: absolute paths
        if getattr(a, name):
            setattr(a, name, str(Path(getattr(a, name)).expanduser().resolve()))
    if device == "cpu" and a.workers == 1:   # what every script imports, loaded once for the forked runs
        import matplotlib.pyplot  # noqa: F401
        import PIL.Image  # noqa: F401
        import torch._dynamo  # noqa: F401
        import torch.distributed  # noqa: F401
        import common  # noqa: F401
        import fid  # noqa: F401
    info = machine_info(device)
    s = Suite(a, device, info)
    parallel, serial = plan(s)
    unknown = set(a.inject_failure) - {c.id for c in s.checks}
    if unknown:
        p.error(f"--inject-failure {' '.join(sorted(unknown))}: no such check in this plan")
    s.prepare()
    work = sum(j[0] for j in parallel + serial)
    print(f"gpu_check: {machine_line(info)}", flush=True)
    print(f"{len(s.checks)} checks; estimated from an H200's times: {work:.0f} s of work, about "
          f"{wall_estimate(parallel, serial, a.workers) / 60:.1f} min with {a.workers} run(s) at a time"
          + ("" if device == "cuda" else " (not a CPU estimate)") + f"; logs in {s.logs}", flush=True)
    write_report(s)

    def stop(signum, frame):   # SIGTERM, Ctrl-C: start nothing more, end the runs, write the report
        s.stopped, s.deadline = True, time.time()
        LIVE.kill_all()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        run_jobs(s, parallel, serial)
    finally:
        LIVE.kill_all()
        write_report(s)
        if not a.work:
            shutil.rmtree(s.work, ignore_errors=True)
    failed = [c for c in s.checks if c.verdict == "FAIL"]
    not_run = [c for c in s.checks if c.verdict == "not run"]
    print(f"{'FAILED' if failed else 'incomplete' if not_run else 'passed'}: {len(failed)} of {len(s.checks)} checks "
          "failed" + (f" ({', '.join(c.id for c in failed)})" if failed else "")
          + (f", {len(not_run)} not run" if not_run else "") + f", in {time.time() - s.t0:.0f} s; "
          f"report: {s.out / 'report.md'}", flush=True)
    sys.exit(130 if s.stopped else 1 if failed else 3 if not_run else 0)


if __name__ == "__main__":
    main()
