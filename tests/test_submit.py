"""submit.sh against a real SLURM: the one-node cluster of tools/slurm/slurm-local-up.sh.

Each SLURM test submits the real submit.sh (its #SBATCH lines untouched) with a tiny gan.py run,
from its own tmp folder (job ids restart at 1 with each cold start of the cluster, so no output path
is ever shared). The jobs find the model scripts through REPO_DIR, as a user submitting from another
folder would. Signals are sent by hand (`scancel --signal=USR1 --batch` is exactly what
`--signal=B:USR1@300` does at the time limit), once the trainer has logged a training step.

Skipped only where `sbatch` is absent. Where it exists the cluster must be up: the session fixture
runs tools/slurm/slurm-local-up.sh (as root), a no-op when the cluster is already up (.ci/run starts and
stops it), and fails with its message otherwise; a cluster it started keeps running after pytest
(stop it with tools/slurm/slurm-local-down.sh). The tests without SLURM (the command line, torchrun and
USR1) always run.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUBMIT = ROOT / "submit.sh"
STEPS = 1000        # a few seconds of the tiny GAN below: long enough to signal it mid-run
TINY = ["--dataset", "synthetic", "--device", "cpu", "--image-size", "8", "--batch-size", "16", "--nz", "8",
        "--g-hidden", "32", "--d-units", "16", "--d-pieces", "2",
        "--log-every", "20", "--sample-every", "100000", "--ckpt-every", "100000"]
# One thread per process: the machine has 2 cores shared by the job, the reference run and pytest,
# and oversubscribed torch threads make a tiny model 20x slower. sbatch passes this environment on.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "REPO_DIR": str(ROOT), "PYTHONUNBUFFERED": "1",
       "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE"}


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def slurm():
    """The local cluster, started if needed; skips only where there is no sbatch."""
    if shutil.which("sbatch") is None:
        pytest.skip("sbatch not found: SLURM is not installed (bash tools/slurm/slurm-local-up.sh installs and "
                    "starts a one-node cluster, as root on Debian)")
    if os.geteuid() == 0:   # idempotent: 0.1 s when the cluster is up already
        up = subprocess.run(["bash", str(ROOT / "tools" / "slurm" / "slurm-local-up.sh")], capture_output=True,
                            text=True, timeout=300)
        if up.returncode != 0:
            pytest.fail(f"sbatch exists but tools/slurm/slurm-local-up.sh could not bring the cluster up:\n{up.stderr}",
                        pytrace=False)
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "is UP" not in ping.stdout:
        pytest.fail(f"sbatch exists but slurmctld does not answer ({ping.stdout.strip()}{ping.stderr.strip()}); "
                    f"start the local cluster with: sudo bash tools/slurm/slurm-local-up.sh", pytrace=False)


class Job:
    """A job submitted with `sbatch submit.sh ...` from ``folder``; cancelled on exit from a `with`."""

    def __init__(self, folder: Path, *args: str, sbatch_opts: tuple = (), wrap: str | None = None):
        (folder / "logs").mkdir(exist_ok=True)   # Slurm cannot create the log folder itself
        what = ["--wrap", wrap] if wrap else [str(SUBMIT), *args]
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_opts, *what], cwd=folder, env=ENV,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]
        self.folder = folder

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(["scancel", self.id], capture_output=True, timeout=30)

    def info(self) -> dict:
        """`scontrol -o show job` as a dict (finished jobs stay visible for MinJobAge, 300 s)."""
        out = subprocess.run(["scontrol", "-o", "show", "job", self.id], capture_output=True, text=True,
                             timeout=30).stdout
        info, key = {}, None
        for token in out.split():
            if "=" in token:
                key, value = token.split("=", 1)
                info[key] = value
            elif key:                       # a value with spaces (Command=..., Reason=...)
                info[key] += " " + token
        return info

    def log(self) -> str:
        """The job's log: logs/<name>-<id>.out, whatever name the job had at submission."""
        logs = list((self.folder / "logs").glob(f"*-{self.id}.out"))
        return logs[0].read_text() if logs else ""

    def wait_for(self, what: str, predicate, timeout: float):
        """Poll ``predicate`` until it returns something true; fail with the job's state and log."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            result = predicate()
            if result:
                return result
            time.sleep(0.05)
        raise AssertionError(f"job {self.id}: timed out after {timeout:.0f}s waiting for {what}\n"
                             f"state: {self.info()}\n--- log ---\n{self.log()}")

    def wait_training(self, timeout: float = 60) -> None:
        """Until the trainer has installed its signal handlers and logged a training step."""
        self.wait_for("a training step in the log",
                      lambda: re.search(r"^training from step.*\n(.*\n)*step\s+\d+", self.log(), re.M), timeout)

    def wait_end(self, timeout: float = 90) -> dict:
        return self.wait_for("the job to end",
                             lambda: (i := self.info()).get("JobState") in FINAL_STATES and i, timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, uninterrupted and without SLURM, started once in the background."""
    folder = tmp_path_factory.mktemp("reference")
    proc = subprocess.Popen([sys.executable, str(ROOT / "gan.py"), *TINY, "--steps", str(STEPS),
                             "--out", str(folder)], cwd=folder, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, folder
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def assert_same_weights(reference, run: Path) -> None:
    proc, folder = reference
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    ref = torch.load(folder / "ckpt.pt", weights_only=True)
    got = torch.load(run / "ckpt.pt", weights_only=True)
    assert got["step"] == ref["step"] == STEPS
    assert got["models"].keys() == ref["models"].keys()
    for name in ref["models"]:
        for key, tensor in ref["models"][name].items():
            assert torch.equal(got["models"][name][key], tensor), f"{name}.{key} differs from the uninterrupted run"


def stamp(log: str, text: str) -> datetime:
    """Time of submit.sh's first `[submit.sh] <date> <time> ...text...` line."""
    m = re.search(r"^\[submit\.sh\] (\S+ \S+) .*" + re.escape(text), log, re.M)
    assert m, f"no submit.sh line with {text!r} in\n{log}"
    return datetime.fromisoformat(m.group(1))


def assert_resumed(log: str) -> int:
    """The first run checkpointed mid-way at step S; the second, SLURM_RESTART_COUNT=1, went on from S."""
    saved = [int(s) for s in re.findall(r"^checkpoint saved at step (\d+)", log, re.M)]
    assert len(saved) == 1 and 0 < saved[0] < STEPS, f"expected one checkpoint mid-run:\n{log}"
    second = log.index("SLURM_RESTART_COUNT=1")
    assert log.index("training from step 0") < log.index(f"checkpoint saved at step {saved[0]}") < second
    assert re.search(rf"^training from step {saved[0]} \(resumed\)", log[second:], re.M), log
    assert f"done at step {STEPS}" in log[second:], log
    assert "SLURM_RESTART_COUNT=2" not in log, log
    return saved[0]


# ----------------------------------------------------------------------------------------------
# SLURM
# ----------------------------------------------------------------------------------------------
def test_usr1_checkpoints_requeues_itself_and_resumes_exactly(slurm, reference, tmp_path):
    """What happens at the time limit: USR1 -> checkpoint -> the script requeues -> resume -> COMPLETED."""
    args = ("gan", "--steps", str(STEPS), "--out", str(tmp_path / "run"), *TINY)
    # No -J: the job is renamed after the model; its log keeps the submission name (submit.sh-<id>.out).
    with Job(tmp_path, *args) as job:
        job.wait_training()
        assert job.info()["JobName"] == "gan"
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)
        info = job.wait_end()
        log = job.log()
        assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), log
        assert (tmp_path / "logs" / f"submit.sh-{job.id}.out").is_file()
        assert "got USR1" in log and f"requeueing job {job.id}" in log, log
        assert_resumed(log)
        delay = stamp(log, "SLURM_RESTART_COUNT=1") - stamp(log, "requeueing job")
        print(f"requeue to restart: {delay.total_seconds():.0f} s")
    assert_same_weights(reference, tmp_path / "run")
    # the same job again, on a finished run: exits 0 at once, is not requeued
    with Job(tmp_path, *args) as job:
        info = job.wait_end(timeout=60)
        log = job.log()
        assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "0", "0:0"), log
        assert f"already done at step {STEPS}" in log and "requeueing" not in log, log


@pytest.mark.parametrize("how", ["scontrol requeue", "preemption"])
def test_sigterm_checkpoints_and_slurm_requeues(slurm, reference, tmp_path, how):
    """Outside requeue and preemption: SIGTERM to every process -> checkpoint -> SLURM requeues (once)."""
    with Job(tmp_path, "gan.py", "--steps", str(STEPS), "--out", str(tmp_path / "run"), *TINY,
             sbatch_opts=("-J", "gan-sigterm")) as job:
        job.wait_training()
        if how == "scontrol requeue":
            subprocess.run(["scontrol", "requeue", job.id], check=True, timeout=30)
            info = job.wait_end()
        else:
            # partition "high" preempts (requeues) "debug" jobs; both want the cluster's only GPU
            with Job(tmp_path, wrap="sleep 1", sbatch_opts=("-p", "high", "--gres=gpu:1", "-J", "preemptor",
                                                            "--output=logs/%x-%j.out")) as high:
                info = job.wait_end()
                assert high.info()["JobState"] == "COMPLETED"
        log = job.log()
        assert (info["JobState"], info["Restarts"], info["ExitCode"]) == ("COMPLETED", "1", "0:0"), log
        assert "got SIGTERM" in log and "requeueing job" not in log, log   # SLURM requeued it, not the script
        assert ("DUE TO PREEMPTION" if how == "preemption" else "DUE TO JOB REQUEUE") in log, log
        assert_resumed(log)
    assert_same_weights(reference, tmp_path / "run")


def test_unknown_script_fails_at_once_with_the_list(slurm, tmp_path):
    with Job(tmp_path, "nosuch", "--steps", "1") as job:
        info = job.wait_end(timeout=30)
        log = job.log()
        assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), log
        assert "unknown script 'nosuch'" in log and " gan" in log, log


def test_second_job_on_the_same_run_folder_fails_and_leaves_the_first_intact(slurm, tmp_path):
    run = tmp_path / "run"
    with Job(tmp_path, "gan", "--steps", "1000000", "--out", str(run), *TINY, sbatch_opts=("-J", "first")) as first:
        first.wait_training()
        # --gres=none: the local cluster has one (fake) GPU, held by the first job
        with Job(tmp_path, "gan", "--steps", "1000000", "--out", str(run), *TINY,
                 sbatch_opts=("-J", "second", "--gres=none")) as second:
            info = second.wait_end(timeout=60)
            log = second.log()
            assert (info["JobState"], info["Restarts"]) == ("FAILED", "0"), log
            assert info["ExitCode"] != "0:0" and "is in use by" in log and "Traceback" not in log, log
            assert "training from step" not in log, log
        assert first.info()["JobState"] == "RUNNING"
        # scancel: SIGTERM -> checkpoint -> CANCELLED, not requeued
        subprocess.run(["scancel", first.id], check=True, timeout=30)
        info = first.wait_end(timeout=60)
        log = first.log()
        assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), log
        saved = re.findall(r"^checkpoint saved at step (\d+)", log, re.M)
        assert len(saved) == 1, log
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    assert ckpt["step"] == int(saved[0]) > 0


# ----------------------------------------------------------------------------------------------
# without SLURM: the command line, torchrun
# ----------------------------------------------------------------------------------------------
STUB = '''"""Stand-in DDP trainer for submit.sh's tests. Usage: torchrun --standalone --nproc_per_node=2 ddpm.py"""
import os, signal, sys, time
got = []
signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
print(f"rank {os.environ['RANK']} ready, args {sys.argv[1:]}", flush=True)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.02)
print(f"rank {os.environ['RANK']} checkpoint saved on {signal.Signals(got[0]).name if got else 'nothing'}", flush=True)
'''


def fake_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "gan.py").write_text('"""no DDP here"""\n')
    (repo / "ddpm.py").write_text(STUB)
    return repo


def submit_locally(repo: Path, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=repo, capture_output=True, text=True, timeout=60,
                          env={**ENV, "REPO_DIR": str(repo), **env})


def test_command_lines(tmp_path):
    repo = fake_repo(tmp_path)
    proc = submit_locally(repo, "ddpm.py", "--steps", "10", "--out", "a b", DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert f"run: python -u {repo}/ddpm.py --resume --steps 10 --out a\\ b" in proc.stdout
    proc = submit_locally(repo, "ddpm", "--steps", "10", DRY_RUN="1", GPUS="4")
    assert proc.returncode == 0, proc.stderr
    assert f"run: torchrun --standalone --nproc_per_node=4 {repo}/ddpm.py --resume --steps 10" in proc.stdout
    proc = submit_locally(repo, "ddpm", DRY_RUN="1", GPUS="4", CUDA_VISIBLE_DEVICES="0")
    assert proc.returncode == 2 and "--gres=gpu:4" in proc.stderr, proc.stderr
    proc = submit_locally(repo, "gan", DRY_RUN="1", GPUS="2")
    assert proc.returncode == 2 and "gan.py does not support DDP" in proc.stderr, proc.stderr
    proc = submit_locally(repo, "fid")
    assert proc.returncode == 2, proc.stdout
    assert f"unknown script 'fid'; the scripts in {repo} are: gan ddpm" in proc.stderr, proc.stderr
    proc = submit_locally(repo)
    assert proc.returncode == 2 and "usage: sbatch submit.sh <script>" in proc.stderr, proc.stderr


def test_usr1_reaches_every_torchrun_worker(tmp_path):
    """torchrun dies on USR1 (no handler), so submit.sh signals its workers; they checkpoint, it exits 0."""
    repo = fake_repo(tmp_path)
    log = tmp_path / "log"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(SUBMIT), "ddpm", "--steps", "10"], cwd=repo, stdout=f,
                                stderr=subprocess.STDOUT, env={**ENV, "REPO_DIR": str(repo), "GPUS": "2"})
    try:
        deadline = time.time() + 60
        while log.read_text().count(" ready, args ['--resume', '--steps', '10']") < 2:
            assert time.time() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    for rank in (0, 1):
        assert f"rank {rank} checkpoint saved on SIGUSR1" in text, text
    assert "not under SLURM, nothing to requeue" in text, text


def test_usr1_during_python_start_is_held_until_its_handler_is_installed(tmp_path):
    """A USR1 before python catches it (while torch imports) would kill it: submit.sh waits, then sends it.
    Python then either stops during its set-up (nothing to save: exit 3, and no requeue, since a job that
    made no progress would requeue forever) or, if its first steps won the race, checkpoints them."""
    proc = subprocess.Popen(["bash", str(SUBMIT), "gan", "--steps", str(STEPS), "--out", str(tmp_path / "run"),
                             *TINY], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    time.sleep(0.3)                     # bash has set its traps; python is not running yet
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    if "before the first step" in out:
        assert proc.returncode == 3, out
        assert "stopped by SIGUSR1 before the first step: nothing new to save" in out, out
        assert "made no progress in this job" in out and not (tmp_path / "run" / "ckpt.pt").exists(), out
    else:
        assert proc.returncode == 0, out
        assert "checkpoint saved at step" in out and "not under SLURM, nothing to requeue" in out, out


def test_usr1_before_any_progress_is_not_requeued(tmp_path):
    """A trainer that stops before its first step exits 3 (common.EXIT_NO_PROGRESS): no requeue, or a job
    that never gets past its set-up would requeue forever."""
    repo = fake_repo(tmp_path)
    (repo / "gan.py").write_text('import signal, sys, time\n'
                                 'signal.signal(signal.SIGUSR1, lambda s, f: sys.exit(3))\n'
                                 'print("ready", flush=True)\ntime.sleep(60)\n')
    proc = subprocess.Popen(["bash", str(SUBMIT), "gan"], cwd=repo, env={**ENV, "REPO_DIR": str(repo)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    while "ready" not in proc.stdout.readline():
        assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "made no progress in this job" in out and "requeueing job" not in out, out
