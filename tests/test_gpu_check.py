"""tools/gpu_check.py as a machine without CUDA runs it (--device cpu: the tests' tiny networks, each run a fork of
the tool's process): every script listed with its verdicts, --resume after a SIGTERM bit-identical, a failure
reported as FAIL with the exit status 1, the time limit respected, and its reading of the bench tools' tables.

The benchmarks and fid.py against pytorch-fid end to end (two minutes more on 2 cores) run only when asked for:
    GPU_CHECK_ALL=1 python -m pytest -q tests/test_gpu_check.py
"""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import OFFLINE_ENV, ROOT

sys.path.insert(0, str(ROOT / "tools"))
import gpu_check  # noqa: E402


def run_tool(tmp, *args, timeout: float = 900):
    """`python tools/gpu_check.py --device cpu ...` to its end in ``tmp``, its folders given as relative paths (the
    runs start in the work folder): (its process, report.json, report.md)."""
    env = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    out = tmp / "gpu-check"
    cmd = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--out", "gpu-check", "--work",
           "work", *map(str, args)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads((out / "report.json").read_text())
    return proc, report, (out / "report.md").read_text()


def test_every_script_resume_and_a_failure(tmp_path):
    """The CPU sequence without --compile (minutes of C++ compilation on 2 cores), the benchmarks and FID (below):
    each script with no flag, --amp, --amp fp16 and the resume, one of its runs broken on purpose."""
    proc, report, md = run_tool(tmp_path, "--skip", "compile", "bench", "fid", "--inject-failure", "vae:amp")
    checks = {c["id"]: c for c in report["checks"]}
    out = tmp_path / "gpu-check"
    for script in gpu_check.SCRIPTS:
        assert re.search(rf"^\| {script} \|", md, re.M), f"{script} has no row in report.md"
        for key in ("none", "amp", "fp16", "resume"):
            c = checks[f"{script}:{key}"]
            assert c["verdict"] in ("OK", "FAIL") and c["logs"], c
            assert c["verdict"] == "OK" or c["reason"], c
            assert all((out / log).is_file() for log in c["logs"])
            line = f"{c['verdict']:<4} {c['title']}"
            assert line in proc.stdout, f"no progress line {line!r}"
        if script != "vae":   # the no-flag and --amp paths are the suite's own: they pass
            assert checks[f"{script}:amp"]["verdict"] == "OK", checks[f"{script}:amp"]
        resume = checks[f"{script}:resume"]
        assert resume["verdict"] == "OK" and resume["reason"].startswith("exact"), resume
        assert resume["details"]["identical"] and resume["details"]["losses_equal"]
        assert resume["details"]["stopped"] >= 2 and checks[f"{script}:none"]["verdict"] == "OK"
        assert checks[f"{script}:none"]["details"]["steps"] == resume["details"]["stopped"] + 2
    broken = checks["vae:amp"]
    assert broken["verdict"] == "FAIL" and "--no-such-flag" in broken["reason"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout.splitlines()[-1] and "vae:amp" in proc.stdout.splitlines()[-1]
    assert checks["ddp:dcgan"]["verdict"] == "SKIP" and "needs 2" in checks["ddp:dcgan"]["reason"]
    assert "**FAIL**" in md and "exact: stopped at step" in md
    assert (tmp_path / "work" / "dcgan-none" / "ckpt.pt").is_file()   # --work: kept


def test_time_limit(tmp_path):
    """Past --time-limit nothing starts: the checks are "not run", the report is written, the exit status 3."""
    proc, report, md = run_tool(tmp_path, "--time-limit", "0.001", "--scripts", "dcgan", "--bench", "--skip", "fid")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    verdicts = {c["id"]: c["verdict"] for c in report["checks"]}
    assert verdicts["dcgan:none"] == verdicts["dcgan:amp"] == verdicts["dcgan:resume"] == "not run", verdicts
    assert "not run" in md and "incomplete" in proc.stdout


BENCH_OUTPUT = """\
round 1: dcgan.py (no flag): 118.0 images/s
round 1: peer: 99.5 images/s

dcgan.py, 64x64, batch 64, cpu: best of 1 round(s)
  (no flag)                                   118.0 images/s  1.19x the peer
  --amp --channels-last                       207.2 images/s  2.08x the peer
  peer                                         99.5 images/s  1.00x the peer
pix2pix peer: G 41,828,995, D 2,768,705 parameters
pix2pix ours (none): G 41,828,995, D 2,768,705 parameters

pix2pix, 128x128, batch 1, cpu, median of 36 steps each, taking turns:
  official optimize_parameters           0.9550 images/s  1.00x the official
  ours (none)                            0.9510 images/s  1.00x the official
peer: Model params: 1.55 M  (its unit: 2^20 parameters)

ddpm --arch small, 3x32x32, batch 128, cpu: best of 2 round(s)
  (no flag)                                    56.3 images/s
"""


def test_parse_bench():
    """The final tables of tools/bench's tools, with and without a peer, each row under its title."""
    rows = gpu_check.parse_bench(BENCH_OUTPUT)
    assert [(r["name"], r["images_per_s"], r["ratio"], r["peer"]) for r in rows] == [
        ("(no flag)", 118.0, 1.19, False), ("--amp --channels-last", 207.2, 2.08, False), ("peer", 99.5, 1.0, True),
        ("official optimize_parameters", 0.955, 1.0, True), ("ours (none)", 0.951, 1.0, False),
        ("(no flag)", 56.3, None, False)]
    assert [r["table"] for r in rows] == ["dcgan.py, 64x64, batch 64, cpu: best of 1 round(s)"] * 3 + [
        "pix2pix, 128x128, batch 1, cpu, median of 36 steps each, taking turns"] * 2 + [
        "ddpm --arch small, 3x32x32, batch 128, cpu: best of 2 round(s)"]


@pytest.mark.skipif(os.environ.get("GPU_CHECK_ALL") != "1", reason="two minutes on 2 cores: GPU_CHECK_ALL=1")
def test_quick_with_benchmark_and_fid(tmp_path):
    """--quick on the CPU: dcgan and ddpm, the DDPM benchmark without its peer ("not measured", ours alone), and
    fid.py beside pytorch-fid on the same PNGs (equal to ~1e-6 on the CPU)."""
    proc, report, md = run_tool(tmp_path, "--quick", "--skip", "compile", "--fid-n", "8", timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = {c["id"]: c for c in report["checks"]}
    bench = checks["bench:ddpm"]
    assert bench["verdict"] == "OK" and bench["details"]["peer"] == "not measured: no --peers"
    assert [r["name"] for r in bench["details"]["rows"]] == ["(no flag)", "--amp"]
    fid = checks["fid"]["details"]
    assert fid["relative_difference"] < 1e-4 and fid["time_ratio"] > 0, fid
    assert "## Speed beside the peers" in md and "fid.py beside pytorch-fid" in md


def test_resume_verdict_on_cuda(tmp_path):
    """compare_runs and beyond_noise, the CUDA path of the resume check (not bit-identical there): kernel noise
    passes, a jump at the resume that the rows before it do not show fails."""
    import torch

    def run(name, losses, weight):
        d = tmp_path / name
        d.mkdir()
        rows = [f"{step},{step / 10},100.0,{loss},{-loss / 1000}" for step, loss in enumerate(losses, 1)]
        (d / "metrics.csv").write_text("step,time_s,images_per_s,loss,W\n" + "\n".join(rows) + "\n")
        torch.save({"step": len(losses), "data": {"epoch": 0}, "models": {"G": {"w": torch.full((3,), weight)}},
                    "optimizers": {}, "state": {}}, d / "ckpt.pt")
        return d

    straight = run("straight", [1.0, 0.9, 0.8, 0.7], 0.5)
    noise = run("noise", [1.0, 0.9000001, 0.800001, 0.700002], 0.5000001)
    jump = run("jump", [1.0, 0.9000001, 0.81, 0.71], 0.51)
    same = run("same", [1.0, 0.9, 0.8, 0.7], 0.5)
    c = gpu_check.compare_runs(noise, straight, 2)
    assert not c["identical"] and not c["losses_equal"] and not gpu_check.beyond_noise(c)
    assert 0 < c["weights_max_abs_diff"] < 1e-6 and "before the signal" in gpu_check.describe_resume(c)
    c = gpu_check.compare_runs(jump, straight, 2)
    assert "at step 3" in gpu_check.beyond_noise(c) and "1.0e-02 of its scale" in gpu_check.beyond_noise(c), c
    c = gpu_check.compare_runs(same, straight, 2)
    assert c["identical"] and c["losses_equal"] and gpu_check.describe_resume(c).startswith("exact")
