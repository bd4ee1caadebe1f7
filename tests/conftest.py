"""Shared checks that every model script must pass, run as a user runs it: `python <script>.py ...`."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
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


def run_script(script: str, *args, cwd: Path, timeout: float = 300, check: bool = True):
    """Run ``python <script>.py args`` in ``cwd``; returns the CompletedProcess."""
    cmd = [sys.executable, str(ROOT / f"{script}.py"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=OFFLINE_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_state(a: dict, b: dict) -> None:
    """Bit-identical models and optimizers, and the same step and data position."""
    assert a["step"] == b["step"] and a["data"] == b["data"]
    for group in ("models", "optimizers"):
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
    """A few steps write args.json, metrics.csv, a sample grid and a loadable checkpoint."""
    out = tmp / "smoke"
    proc = run_script(script, *small, "--steps", 4, "--log-every", 2, "--sample-every", 2, "--out", out, cwd=tmp)
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
    """2n steps straight == n steps, stop, resume, n steps: bit-identical weights and optimizers."""
    straight, split = tmp / "straight", tmp / "split"
    run_script(script, *small, "--steps", 2 * n, "--out", straight, cwd=tmp)
    run_script(script, *small, "--steps", n, "--out", split, cwd=tmp)
    proc = run_script(script, "--resume", "--steps", 2 * n, "--out", split, cwd=tmp)
    assert f"training from step {n} (resumed)" in proc.stdout
    assert_same_state(load(straight / "ckpt.pt"), load(split / "ckpt.pt"))
    rows = (split / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == sorted({int(r.split(",")[0]) for r in rows})


def check_signal_resume(script: str, small: list, tmp: Path, sig=signal.SIGTERM) -> None:
    """A signal mid-run: finish the step, checkpoint, exit 0; --resume continues exactly from there."""
    out = tmp / "signalled"
    cmd = [sys.executable, str(ROOT / f"{script}.py"), *map(str, small), "--steps", 10**6,
           "--log-every", 1, "--ckpt-every", 10**6, "--sample-every", 10**6, "--out", out]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=tmp, env=OFFLINE_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if line.startswith("step") and int(line.split()[1]) >= 2:
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


def check_sample(script: str, small: list, tmp: Path) -> None:
    """--sample N writes N PNGs (or one .npz of uint8 N x H x W x C), the same for the same seed."""
    import numpy as np
    out = tmp / "to-sample"
    run_script(script, *small, "--steps", 2, "--out", out, cwd=tmp)
    run_script(script, "--out", out, "--sample", 5, cwd=tmp)
    assert sorted(p.name for p in (out / "generated").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    for name in ("a.npz", "b.npz"):
        run_script(script, "--out", out, "--sample", 7, "--sample-out", tmp / name, cwd=tmp)
    a, b = np.load(tmp / "a.npz")["images"], np.load(tmp / "b.npz")["images"]
    assert a.dtype == np.uint8 and a.shape[0] == 7 and a.ndim == 4 and np.array_equal(a, b)


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
