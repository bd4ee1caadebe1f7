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
USR1) always run, and so does the launch on more than one node, with a stand-in srun that starts each
"node" on this machine.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import assert_same_state, launch_ddp, load

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

    def __init__(self, folder: Path, *args: str, sbatch_opts: tuple = (), wrap: str | None = None,
                 env: dict | None = None):
        (folder / "logs").mkdir(exist_ok=True)   # Slurm cannot create the log folder itself
        what = ["--wrap", wrap] if wrap else [str(SUBMIT), *args]
        proc = subprocess.run(["sbatch", "--parsable", *sbatch_opts, *what], cwd=folder, env={**ENV, **(env or {})},
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


# ----------------------------------------------------------------------------------------------
# more than one node: srun, one torchrun per node, the c10d rendezvous on the first
# ----------------------------------------------------------------------------------------------
FAKE_SRUN = r"""#!/usr/bin/env bash
# Stand-in for srun --nodes=N --ntasks-per-node=1 --kill-on-bad-exit=1 CMD: N copies of CMD on this machine,
# SLURM_PROCID=0..N-1 (task 0 is on the "first node", where the batch shell runs); the first task to exit
# non-zero ends the others (SIGTERM); exits with the highest status.
echo "srun $*" >> "$FAKE_SLURM_LOG"
n=1
while [[ $1 == -* ]]; do case $1 in --nodes=*) n=${1#--nodes=} ;; esac; shift; done
for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_NODEID=$i SLURM_LOCALID=0 "$@" & done
rc=0
for ((i = 0; i < n; i++)); do
    s=0; wait -n || s=$?
    if [ "$s" != 0 ] && [ "$rc" = 0 ]; then kill -TERM $(jobs -p) 2>/dev/null; fi
    if [ "$s" -gt "$rc" ]; then rc=$s; fi
done
exit "$rc"
"""
FAKE_SCONTROL = r"""#!/usr/bin/env bash
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
case $1 in
    show) printf '%s\n' $FAKE_HOSTS ;;     # scontrol show hostnames LIST
    requeue) ;;
    *) exit 1 ;;
esac
"""


def fake_slurm(tmp_path: Path, hosts: str = "127.0.0.1 127.0.0.1", **env) -> dict:
    """The environment of a batch shell on the first of the job's nodes, with a stand-in srun and scontrol
    (their calls logged to tmp_path/slurm.log) first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
            "FAKE_HOSTS": hosts, "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "n[01-02]",
            "TMPDIR": str(tmp_path), **env}


def test_multinode_command_line(tmp_path):
    """sbatch --nodes=2: srun runs one torchrun per node, the rendezvous on the first node; DRY_RUN prints it."""
    repo = fake_repo(tmp_path)
    env = fake_slurm(tmp_path, hosts="n01 n02", GPUS="4", SLURM_CPUS_PER_TASK="16", REPO_DIR=str(repo), DRY_RUN="1")
    env.pop("OMP_NUM_THREADS")
    proc = subprocess.run(["bash", str(SUBMIT), "ddpm", "--steps", "10"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "nodes: 2 (n[01-02]), 4 process(es) each; rendezvous on n01:24242" in proc.stdout, proc.stdout
    assert "OMP_NUM_THREADS=4" in proc.stdout, proc.stdout    # the node's CPUs shared by its 4 processes
    per_node = """'trap "" USR1; if [ "$SLURM_PROCID" = 0 ]; then echo $$ > "$1.tmp" && mv -f "$1.tmp" "$1"; fi; """ \
               """shift; exec "$@"'"""
    assert (f"run: srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL "
            f"--cpus-per-task=16 bash -c {per_node} submit.sh-node {tmp_path}/submit.sh-4242.pid "
            f"torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=n01:24242 "
            f"--rdzv_id=4242 {repo}/ddpm.py --resume --steps 10\n") in proc.stdout, proc.stdout
    assert "srun" not in (tmp_path / "slurm.log").read_text()      # a dry run runs nothing
    # RDZV_PORT; GPUS=1 is one process per node, still DDP; a script without DDP is refused
    proc = subprocess.run(["bash", str(SUBMIT), "ddpm"], cwd=repo, env={**env, "RDZV_PORT": "29400", "GPUS": "1"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--nproc_per_node=1 --rdzv_backend=c10d --rdzv_endpoint=n01:29400" in proc.stdout
    proc = subprocess.run(["bash", str(SUBMIT), "gan"], cwd=repo, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "gan.py does not support DDP" in proc.stderr, proc.stderr
    # MULTINODE=1 outside a job: refused; on one node it is the same launch (the SLURM test below)
    proc = submit_locally(repo, "ddpm", DRY_RUN="1", MULTINODE="1")
    assert proc.returncode == 2 and "needs a Slurm job" in proc.stderr, proc.stderr


def test_two_nodes_on_localhost_stop_together_and_resume_exactly(tmp_path):
    """submit.sh's own multi-node launch, with a stand-in srun that starts both "nodes" on this machine: two
    torchrun agents (--nnodes=2 --nproc_per_node=1) meet in the c10d rendezvous on 127.0.0.1. USR1 to the
    batch shell, as Slurm sends it, goes to the first node's worker only; the ranks' agreement stops both
    nodes at the same step, rank 0 writes the one checkpoint, everything exits 0 and the job is requeued.
    The resumed two-node run then equals an uninterrupted two-process run, bit for bit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = fake_slurm(tmp_path, RDZV_PORT=str(port))
    small = ["--dataset", "synthetic", "--image-size", "16", "--batch-size", "16", "--ngf", "4", "--ndf", "4",
             "--device", "cpu", "--sample-every", "100000", "--ckpt-every", "100000"]
    out = tmp_path / "run"
    log = tmp_path / "job.out"
    with open(log, "w") as f:
        proc = subprocess.Popen(["bash", str(SUBMIT), "dcgan", *small, "--steps", "1000000", "--log-every", "1",
                                 "--out", str(out)], cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not re.search(r"^step 2/", log.read_text(), re.M):
            assert time.time() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)            # what --signal=B:USR1@300 does
        assert proc.wait(timeout=120) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    saved = re.findall(r"^checkpoint saved at step (\d+)", text, re.M)
    assert len(saved) == 1, text                     # rank 0 alone writes and prints
    stopped = int(saved[0])
    ckpt = load(out / "ckpt.pt")
    # every rank's RNG state, gathered at the step the checkpoint names: both nodes stopped there
    assert ckpt["step"] == stopped and ckpt["world"] == 2 and len(ckpt["rng"]) == 2
    assert "checkpoint saved (status 0); requeueing job 4242" in text, text
    calls = (tmp_path / "slurm.log").read_text()
    assert "--rdzv_endpoint=127.0.0.1:" in calls and "scontrol requeue 4242" in calls, calls
    assert not (tmp_path / "submit.sh-4242.pid").exists()
    # the requeued job: the same two nodes resume
    resumed = subprocess.run(["bash", str(SUBMIT), "dcgan", "--steps", str(stopped + 3), "--out", str(out)],
                             cwd=tmp_path, env={**env, "SLURM_RESTART_COUNT": "1"}, capture_output=True, text=True,
                             timeout=180)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"training from step {stopped} (resumed)" in resumed.stdout, resumed.stdout
    straight = launch_ddp("dcgan", *small, "--steps", stopped + 3, "--out", tmp_path / "straight", cwd=tmp_path)
    text = straight.communicate(timeout=120)[0]
    assert straight.returncode == 0, text
    assert_same_state(load(tmp_path / "straight" / "ckpt.pt"), load(out / "ckpt.pt"))


MULTI_STUB = '''"""Stand-in DDP trainer. Usage: torchrun --nproc_per_node=2 ddpm.py"""
import os, signal, sys, time
got = []
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: got.append(s))
restart = os.environ.get("SLURM_RESTART_COUNT", "0")
print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']} ready in run {restart}", flush=True)
deadline = time.time() + 60
while not got and time.time() < deadline:
    time.sleep(0.02)
time.sleep(0.5)        # a checkpoint takes a while: torchrun and srun must wait for it
print(f"rank {os.environ['RANK']} checkpoint saved on {signal.Signals(got[0]).name if got else 'nothing'} "
      f"in run {restart}", flush=True)
'''


def test_multinode_launch_on_slurm(slurm, tmp_path):
    """The multi-node launch (MULTINODE=1 on the one local node: srun, torchrun with the c10d rendezvous, two
    stand-in workers). USR1 (the time limit) comes as srun starts, before torchrun has started its workers:
    submit.sh finds torchrun through the pid file of srun's task, waits for its workers and their handlers,
    and signals them; they exit 0, and so do torchrun and srun: the job requeues itself. In the second run,
    scancel's SIGTERM (as preemption's) reaches every process from Slurm; the workers save and the job is
    CANCELLED, not requeued."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "ddpm.py").write_text(MULTI_STUB)
    # --gres=none: the cluster's one (fake) GPU could not hold GPUS=2
    with Job(tmp_path, "ddpm", "--steps", "5", sbatch_opts=("--gres=none", "-J", "ddpm"),
             env={"REPO_DIR": str(repo), "MULTINODE": "1", "GPUS": "2"}) as job:
        job.wait_for("srun to start", lambda: "run: srun" in job.log(), 60)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True, timeout=30)
        job.wait_for("the second run's workers", lambda: job.log().count("ready in run 1") == 2, 90)
        log = job.log()
        assert log.index("got USR1") < log.index("ready in run 0"), log    # before torchrun's workers
        for rank in (0, 1):
            assert f"rank {rank} checkpoint saved on SIGUSR1 in run 0" in log, log
        assert f"checkpoint saved (status 0); requeueing job {job.id}" in log, log
        assert re.search(r"run: srun .*--kill-on-bad-exit=1 .* torchrun --nnodes=1 --nproc_per_node=2 "
                         r"--rdzv_backend=c10d --rdzv_endpoint=\S+:\d+ --rdzv_id=" + job.id, log), log
        subprocess.run(["scancel", job.id], check=True, timeout=30)
        info = job.wait_end(timeout=60)
        log = job.log()
        assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "1"), log
        for rank in (0, 1):
            assert f"rank {rank} checkpoint saved on SIGTERM in run 1" in log, log
        assert log.count("requeueing job") == 1 and "got SIGTERM" in log, log
