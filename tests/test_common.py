"""common.py: data order across resume, atomic checkpoints, safe loading; the run's helpers, driven by a toy script
as dcgan.py's train(cfg) drives them (resume semantics, lock, signals, NaN stop, registered state, metrics.csv);
datasets (splits, labels, folder cache, bad files)."""
import errno
import fcntl
import gzip
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import common
from common import arg
from conftest import OFFLINE_ENV, assert_clean_error, digest, load, run_script, start_script

CPU = torch.device("cpu")


def test_batches_visit_each_image_once_per_epoch():
    images = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    b = common.Batches(images, 8, seed=1, device=CPU, value_range=(0, 255))
    epochs = [torch.cat([b.next() for _ in range(5)]).flatten().long() for _ in range(3)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(40))
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch


def test_batches_resume_the_same_order_across_epochs():
    images = torch.randint(0, 256, (50, 1, 2, 2), dtype=torch.uint8)
    straight = common.Batches(images, 8, seed=3, device=CPU)
    for _ in range(9):  # 6 batches per epoch (2 images dropped): stop inside the second epoch
        straight.next()
    resumed = common.Batches(images, 8, seed=3, device=CPU)
    resumed.load_state_dict(straight.state_dict())
    for _ in range(10):
        assert torch.equal(straight.next(), resumed.next())


def test_batches_value_range():
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    assert sorted(common.Batches(images, 2, 0, CPU).next().flatten().tolist()) == [-1.0, 1.0]
    assert sorted(common.Batches(images, 2, 0, CPU, (0, 1)).next().flatten().tolist()) == [0.0, 1.0]


def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def crash(obj, f):
        real_save(obj, f)
        f.write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        common.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(path, weights_only=True)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_atomic_save_survives_a_crash_before_rename(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint({"step": 1}, path)
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("killed")))
    with pytest.raises(OSError):
        common.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True)["step"] == 1 and os.listdir(tmp_path) == ["ckpt.pt"]


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_is_data_not_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"script": "gan", "models": {}, "x": Payload()}, path)
    with pytest.raises(common.UserError, match="nothing was loaded"):
        common.load_checkpoint(path, "gan")


def test_rng_state_round_trip():
    common.seed_everything(5)
    state = common.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(2)
    common.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


# ----------------------------------------------------------------------------------------------
# A toy script: the run's helpers driven as dcgan.py's train(cfg) drives them
# ----------------------------------------------------------------------------------------------
@dataclass
class Config(common.RunConfig):
    batch_size: int = arg(4, "minibatch size", min=1)
    lr: float = arg(0.1, "SGD learning rate", above=0)
    width: int = arg(3, "inputs of the Linear model", min=1)
    decay: float = arg(0.0, "SGD weight decay: a field added since the first runs, which were trained with 0.5",
                       min=0, predates=0.5)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """common.Stop installs its handlers in this process: give pytest its own back after each test."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def parse(*argv) -> Config:
    """The toy script's command line (without --out, its run folder is relative to the cwd)."""
    return common.parse_config(Config, ["--dataset", "synthetic", "--device", "cpu", *map(str, argv)])


def resolve(*argv, command: str | None = None) -> common.RunFolder:
    """train(cfg)'s first lines (sample_command's with ``command``): which run this is; nothing is written."""
    cfg = parse(*argv)
    return common.resolve_run(cfg, "toy", common.Processes(cfg.device, connect=command is None), command=command)


def build(cfg: Config, **state) -> dict:
    """train(cfg)'s paper block: a Linear model, its SGD and fp16's GradScaler; returns ``saved``, what a
    checkpoint holds (``state``: more registered state)."""
    model = torch.nn.Linear(cfg.width, 1)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, weight_decay=cfg.decay)
    scaler = torch.amp.GradScaler("cpu", enabled=common.amp_dtype(cfg.amp, CPU) == torch.float16)
    return dict(models={"m": model}, optimizers={"opt": opt}, state={"scaler": scaler, **state}, data={})


def train_step(saved: dict, x: torch.Tensor, logged: dict) -> dict[str, torch.Tensor]:
    """One SGD step of the toy model (through the GradScaler, as under fp16); what it logs is ``logged``."""
    model, opt, scaler = saved["models"]["m"], saved["optimizers"]["opt"], saved["state"]["scaler"]
    opt.zero_grad(set_to_none=True)
    scaler.scale(model(x).pow(2).mean()).backward()
    scaler.step(opt)
    scaler.update()
    return {k: torch.tensor(v) for k, v in logged.items()}


@dataclass
class Session:
    """A toy run's process at the top of its loop: what train(cfg) holds there."""
    run: common.RunFolder
    stop: common.Stop
    saved: dict
    log: common.Log
    step: int

    @property
    def model(self) -> torch.nn.Linear:
        return self.saved["models"]["m"]


def start(*argv, **state) -> Session:
    """`python toy.py ARGV` up to its loop: dcgan.py's train(cfg), block by block."""
    cfg = parse(*argv)
    ddp = common.Processes(cfg.device)
    run = common.resolve_run(cfg, "toy", ddp)
    stop = common.Stop(ddp)
    common.seed_everything(cfg.seed + ddp.rank)
    saved = build(cfg, **state)
    step = common.restore(run, **saved)
    common.open_run_folder(run)
    log = common.Log(run, step)
    stop.begin()
    return Session(run, stop, saved, log, step)


def end(run: common.RunFolder) -> None:
    """What the end of a run's process does to its folder: the lock is released."""
    if run.lock is not None:
        run.lock.close()


def train(*argv, logged) -> int:
    """`python toy.py ARGV` to its end: dcgan.py's loop line for line (without sample grids and evaluation),
    each step logging the next dict of ``logged``; then the process ends. Returns the last step."""
    s = start(*argv)
    run, stop, saved, log, step, cfg = s.run, s.stop, s.saved, s.log, s.step, s.run.cfg
    try:
        logged = iter(logged)
        while step < cfg.steps and not stop.agreed(step):
            losses = train_step(saved, torch.randn(cfg.batch_size, cfg.width), next(logged))
            step += 1
            log.add(losses)
            if step % cfg.log_every == 0:
                log.write(step)
            if step % cfg.ckpt_every == 0 or (cfg.keep_every and step % cfg.keep_every == 0):
                common.save_run(run, step, log, **saved)
        common.finish(run, step, log, stop, **saved)
    finally:
        end(run)
    return step


def trained(*argv, step: int) -> Session:
    """A toy run's process that trained ``step`` steps (whatever its --steps), wrote its checkpoint there and
    ended: its folder is unlocked."""
    s = start(*argv)
    for _ in range(step - s.step):
        train_step(s.saved, torch.randn(s.run.cfg.batch_size, s.run.cfg.width), {})
    common.save_run(s.run, step, s.log, **s.saved)
    end(s.run)
    return s


def test_resume_takes_unspecified_fields_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    trained("--width", 5, "--steps", 2, "--out", out, step=2)
    resumed = resolve("--resume", "--steps", 4, "--lr", 0.1, "--out", out)
    assert resumed.cfg.width == 5 and resumed.cfg.steps == 4
    end(resumed)
    bare = resolve("--resume", "--out", out)  # run fields too: --steps is the checkpoint's, not the default
    assert bare.cfg.steps == 2 and bare.cfg.width == 5
    end(bare)
    with pytest.raises(common.UserError, match=r"width 5 -> 6, .*lr 0.1 -> 0.2|lr 0.1 -> 0.2, width 5 -> 6"):
        resolve("--resume", "--width", 6, "--lr", 0.2, "--out", out)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    path, good = tmp_path / "run" / "ckpt.pt", []

    def logged():
        yield {"loss": 1.0}
        yield {"loss": 1.0}
        good.append(path.read_bytes())   # step 3 begins: step 2's checkpoint (--ckpt-every 2) is written
        yield {"loss": float("nan")}
        yield {"loss": 1.0}
    advice = rf"loss became NaN or inf by step 4.*{path} \(step 2\).*--init {path} --lr"
    with pytest.raises(common.UserError, match=advice):
        train("--steps", 10, "--log-every", 100, "--ckpt-every", 2, "--out", tmp_path / "run", logged=logged())
    assert path.read_bytes() == good[0]
    # the advice works: --init the last good checkpoint with a lower lr in a new folder
    s = start("--init", path, "--lr", 0.01, "--out", tmp_path / "new")
    assert s.step == 0 and torch.equal(s.model.weight, load(path)["models"]["m"]["weight"])
    end(s.run)
    s = start("--resume", "--out", tmp_path / "run")   # a NaN in the weights is caught as well
    assert s.step == 2
    with torch.no_grad():
        s.model.weight.fill_(float("inf"))
    with pytest.raises(common.UserError, match="models/m/weight"):
        common.save_run(s.run, 3, s.log, **s.saved)
    assert path.read_bytes() == good[0]
    end(s.run)


def test_nan_before_any_checkpoint_names_none(tmp_path):
    with pytest.raises(common.UserError, match="no checkpoint was written yet: start again with a lower --lr"):
        train("--steps", 10, "--log-every", 1, "--out", tmp_path / "run", logged=[{"loss": float("inf")}])
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_nan_check_covers_buffers_and_registered_state(tmp_path):
    run = resolve("--steps", 10, "--out", tmp_path / "run")
    bn, ema = torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1)
    saved = dict(models={"bn": bn}, optimizers={}, state={"ema": ema}, data={})
    common.restore(run, **saved)
    common.open_run_folder(run)
    bn.running_var[1] = float("nan")
    with pytest.raises(common.UserError, match="models/bn/running_var"):
        common.save_run(run, 1, None, **saved)
    bn.running_var.fill_(1.0)
    with torch.no_grad():
        ema.bias.fill_(float("-inf"))
    with pytest.raises(common.UserError, match="state/ema/bias"):
        common.save_run(run, 1, None, **saved)
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    end(run)


def test_run_folder_lock(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("12345")
        held.flush()
        proc = run_script("gan", "--dataset", "synthetic", "--out", out, "--steps", 1, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is in use by another process (pid 12345)" in proc.stderr
    assert not (out / "ckpt.pt").exists()


def test_a_run_folder_in_use_is_refused_when_the_run_is_resolved(tmp_path):
    s = start("--out", tmp_path / "run")           # its process has not ended: the folder stays locked
    with pytest.raises(common.UserError, match=rf"run folder .*run is in use by another process \(pid {os.getpid()}\)"):
        resolve("--resume", "--out", tmp_path / "run")   # before the data is loaded
    end(s.run)
    end(resolve("--resume", "--out", tmp_path / "run"))  # once it has, the folder is free


def test_synthetic_is_deterministic():
    a, b = common.synthetic_images(8, 3, 16), common.synthetic_images(8, 3, 16)
    assert a.shape == (8, 3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b) and a.max() > 100


def test_resize_keeps_range_and_shape():
    x = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.uint8)
    y = common.resize_uint8(x, 64)
    assert y.shape == (5, 1, 64, 64) and y.dtype == torch.uint8
    assert abs(y.float().mean() - x.float().mean()) < 2


def test_folder_dataset(tmp_path):
    from PIL import Image
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "imgs" / "a.png")
    Image.new("L", (20, 50), 128).save(tmp_path / "imgs" / "sub" / "b.jpg")
    x = common.load_images("folder", str(tmp_path / "imgs"), 16)
    assert x.shape == (2, 3, 16, 16) and x[0, 0].min() == 255 and x[0, 1].max() == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no images"):
        common.load_images("folder", str(tmp_path / "empty"), 16)


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(k, OFFLINE_ENV[k])
    with pytest.raises(common.UserError, match="could not be downloaded.*--data-root"):
        common.load_images("cifar10", str(tmp_path), 32)


@pytest.mark.skipif(not common.FASHION_MNIST_DEBIAN.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_from_debian(tmp_path):
    x = common.load_images("fashion-mnist", str(tmp_path), 28)
    assert x.shape == (60_000, 1, 28, 28) and x.dtype == torch.uint8
    assert 70 < x.float().mean() < 75  # Fashion-MNIST's mean pixel is 72.94


def test_save_grid_is_square(tmp_path):
    from PIL import Image
    common.save_grid(torch.zeros(16, 3, 8, 8), tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").size == (4 * 10 + 2, 4 * 10 + 2)


# ----------------------------------------------------------------------------------------------
# Resume semantics: which checkpoint, which folder, which config
# ----------------------------------------------------------------------------------------------
def test_resume_path_without_out_never_writes_another_runs_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained("--steps", 5, step=5)                                   # runs/toy-synthetic: an unrelated run
    unrelated = digest(tmp_path / "runs/toy-synthetic/ckpt.pt")
    trained("--out", "other", "--width", 4, step=3)
    s = start("--resume", "other/ckpt.pt", "--steps", 8)            # continues PATH's run where it was trained
    assert s.run.out == common.Path("other")
    assert s.run.cfg.width == 4 and s.step == 3
    common.save_run(s.run, 8, s.log, **s.saved)
    end(s.run)
    assert load(tmp_path / "other/ckpt.pt")["step"] == 8
    (tmp_path / "copy.pt").write_bytes((tmp_path / "other/ckpt.pt").read_bytes())
    with pytest.raises(common.UserError, match="holds another run .*never overwritten.*--out a new folder"):
        resolve("--resume", "copy.pt", "--out", "runs/toy-synthetic")
    assert digest(tmp_path / "runs/toy-synthetic/ckpt.pt") == unrelated


def test_resume_path_starts_a_folder_once_then_its_own_checkpoint_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trained("--out", "a", step=5)
    argv = ["--resume", "a/ckpt.pt", "--out", "b", "--steps", 9]   # what every requeue of submit.sh runs
    s = start(*argv)
    assert s.step == 5
    common.save_run(s.run, 7, s.log, **s.saved)
    end(s.run)
    s = start(*argv)
    assert s.step == 7, "a requeue must continue b's progress, not restart from a"
    assert "continuing b/ckpt.pt (step 7)" in capsys.readouterr().out
    assert load(tmp_path / "a/ckpt.pt")["step"] == 5
    end(s.run)


def test_bare_resume_without_a_checkpoint_says_so_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    s = start("--resume", "--out", "new")
    assert capsys.readouterr().out.splitlines()[0] == "no checkpoint in new: starting a new run"
    assert s.step == 0
    end(s.run)


def test_resume_of_a_folder_run_needs_no_data_root(tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.new("RGB", (20, 20), (30 * i, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    small = ["--dataset", "folder", "--data-root", "imgs", "--image-size", 16, "--batch-size", 4, "--ngf", 4,
             "--ndf", 4, "--device", "cpu", "--out", "run"]
    run_script("dcgan", *small, "--steps", 2, cwd=tmp_path)
    proc = run_script("dcgan", "--resume", "--out", "run", "--steps", 3, cwd=tmp_path)
    assert "training from step 2 (resumed)" in proc.stdout and "done at step 3" in proc.stdout


def test_init_starts_a_new_run_from_trained_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trained_weight = trained("--out", "a", "--width", 5, "--lr", 0.3, step=4).model.weight
    parent = load(tmp_path / "a/ckpt.pt")
    argv = ["--init", "a/ckpt.pt", "--lr", 0.01, "--out", "b"]
    s = start(*argv)
    assert (s.run.cfg.width, s.run.cfg.lr, s.run.cfg.steps) == (5, 0.01, 10_000)  # the rest from a; a new length
    assert s.step == 0 and torch.equal(s.model.weight, trained_weight)
    common.seed_everything(0)          # what b would start from without --init differs: not equal by chance
    assert not torch.equal(build(s.run.cfg)["models"]["m"].weight, trained_weight)
    common.save_run(s.run, 1, s.log, **s.saved)
    end(s.run)
    assert load(tmp_path / "b/ckpt.pt")["run"] != parent["run"]
    s = start("--resume", *argv)                     # requeued by submit.sh: b continues
    assert s.step == 1 and "--init applies only when a run starts" in capsys.readouterr().out
    end(s.run)
    with pytest.raises(common.UserError, match="its m does not fit this config"):
        start("--init", "a/ckpt.pt", "--width", 6, "--out", "c")
    with pytest.raises(common.UserError, match="--init PATH starts a new run"):
        resolve("--init", "a/ckpt.pt", "--resume", "a/ckpt.pt", "--out", "d")


def test_a_checkpoint_from_an_older_script_still_resumes(tmp_path, capsys):
    trained("--decay", 0.5, "--out", tmp_path / "run", step=2)
    ckpt = load(tmp_path / "run/ckpt.pt")
    del ckpt["config"]["width"], ckpt["config"]["decay"]     # fields added to the script since
    ckpt["config"]["gone"] = 1                              # a field removed since
    common.save_checkpoint(ckpt, tmp_path / "run/ckpt.pt")
    capsys.readouterr()
    s = start("--resume", "--out", tmp_path / "run")
    out = capsys.readouterr().out
    assert s.step == 2 and s.run.cfg.width == 3 and "ignoring the checkpoint's gone" in out
    assert s.run.cfg.decay == 0.5 and "predates --width (3), --decay (0.5)" in out   # decay's `predates`, not 0.0
    end(s.run)
    with pytest.raises(common.UserError, match="lr 0.1 -> 0.5"):   # a real change is still refused
        resolve("--resume", "--lr", 0.5, "--out", tmp_path / "run")


def test_sampling_takes_its_own_seed(tmp_path):
    trained("--out", tmp_path / "run", step=2)
    run = resolve("--out", tmp_path / "run", "--sample", 3, "--seed", 9, command="--sample")
    assert run.cfg.seed == 9
    common.load_models(run, m=torch.nn.Linear(run.cfg.width, 1))   # sample_command's next line


# ----------------------------------------------------------------------------------------------
# Signals, partial files, metrics.csv, cumulative time
# ----------------------------------------------------------------------------------------------
def test_a_signal_during_set_up_stops_at_once_and_saves_nothing(tmp_path):
    run = resolve("--steps", 10, "--out", tmp_path / "run")
    stop = common.Stop(run.ddp)
    with pytest.raises(common.Stopped, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)   # the handler raises in this thread as soon as the signal lands
    saved = build(run.cfg)
    common.restore(run, **saved)
    common.open_run_folder(run)
    with pytest.raises(common.Stopped, match="SIGTERM"):
        stop.begin()                           # the stop is not forgotten
    end(run)
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_a_set_up_signal_whose_exception_python_dropped_still_stops_at_begin(tmp_path, monkeypatch):
    """Python prints and drops an exception raised in a __del__ (or an import's weakref callback, where a
    USR1 landed in CI): training must not then run to its end as if no stop had been asked for."""
    run = resolve("--steps", 10, "--out", tmp_path / "run")
    stop = common.Stop(run.ddp)

    class SignalWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.5)   # the handler runs here, inside __del__

    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)   # where Python sends what it drops
    SignalWhenCollected()
    assert [type(u.exc_value) for u in dropped] == [common.Stopped] and stop.signal == "SIGUSR1"
    saved = build(run.cfg)
    common.restore(run, **saved)
    common.open_run_folder(run)
    with pytest.raises(common.Stopped, match="SIGUSR1"):
        stop.begin()
    end(run)
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_a_signal_in_the_loop_finishes_the_step_and_a_second_ctrl_c_kills(tmp_path):
    s = start("--steps", 10, "--out", tmp_path / "run")
    assert s.step == 0
    os.kill(os.getpid(), signal.SIGINT)       # in the loop: finish the step...
    assert s.stop.requested and signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # ...a second one kills
    assert s.stop.agreed(0)                   # the loop ends
    with pytest.raises(common.Stopped, match="SIGINT"):
        common.finish(s.run, 0, s.log, s.stop, **s.saved)   # no step done: nothing to save, no "checkpoint saved"
    end(s.run)
    assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_a_signal_in_the_loop_ends_the_run_after_that_step_with_its_checkpoint(tmp_path, capsys):
    def logged():
        yield {"loss": 1.0}
        os.kill(os.getpid(), signal.SIGTERM)  # during step 2
        yield {"loss": 1.0}
        pytest.fail("a third step began after the signal")
    assert train("--steps", 10, "--out", tmp_path / "run", logged=logged()) == 2
    assert load(tmp_path / "run" / "ckpt.pt")["step"] == 2
    assert "checkpoint saved at step 2 (SIGTERM); continue with --resume" in capsys.readouterr().out


def test_sigterm_while_decoding_a_folder_exits_at_once(tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    noise = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    for i in range(3000):
        Image.fromarray(np.roll(noise, i, axis=0)).save(tmp_path / "imgs" / f"{i:04d}.png")
    proc = start_script("dcgan", "--dataset", "folder", "--data-root", "imgs", "--image-size", 16, "--device", "cpu",
                        "--out", "run", cwd=tmp_path)
    lines = []
    while not lines or not lines[-1].startswith("decoding"):
        lines.append(proc.stdout.readline())
        assert lines[-1], "".join(lines) + proc.communicate()[1]
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert time.time() - t0 < 5, "a stop during loading must not wait for the whole folder"
    assert proc.returncode == common.EXIT_NO_PROGRESS, out + err
    assert "stopped by SIGTERM before the first step: nothing new to save" in out, out + err
    assert "Traceback" not in err and not (tmp_path / "run" / "ckpt.pt").exists()


def test_partial_files_of_a_killed_save_are_removed(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".ckpt.pt.tmp4242").write_bytes(b"half a checkpoint")
    s = start("--out", tmp_path / "run")
    assert not (tmp_path / "run" / ".ckpt.pt.tmp4242").exists()
    assert "removed .ckpt.pt.tmp4242" in capsys.readouterr().out
    end(s.run)


def test_metrics_columns_are_stable_and_time_is_cumulative(tmp_path):
    import csv
    s = start("--out", tmp_path / "run")
    s.log.add({"loss": torch.tensor(1.0)})
    s.log.write(1)
    s.log.scores(2, {"fid": 50.0}, seconds=0.0)     # FID every N steps: a new column
    s.log.add({"loss": torch.tensor(3.0)})
    s.log.write(3)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["loss"], r["fid"]) for r in rows] == [("1", "1", ""), ("2", "", "50"), ("3", "3", "")]
    time.sleep(0.2)
    common.save_run(s.run, 3, s.log, **s.saved)
    end(s.run)
    resumed = start("--resume", "--out", tmp_path / "run")
    assert resumed.run.time_s() >= 0.2, "time_s goes on from the checkpoint's, it does not restart at 0"
    resumed.log.add({"loss": torch.tensor(4.0)})
    resumed.log.write(4)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        assert float(list(csv.DictReader(f))[-1]["time_s"]) >= 0.2
    end(resumed.run)


def test_rng_state_from_another_device_warns(capsys):
    state = common.rng_state(torch.device("cpu"))
    state["cuda"] = torch.zeros(16, dtype=torch.uint8)
    common.set_rng_state(state, torch.device("cpu"))
    assert "warning: the checkpoint was written on cuda and this run is on cpu" in capsys.readouterr().err


def test_a_file_system_without_flock_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(common.UserError, match="does not support flock .*Lustre"):
        resolve("--out", tmp_path / "run")


# ----------------------------------------------------------------------------------------------
# Registered state, data streams, plain keys
# ----------------------------------------------------------------------------------------------
class Pool:
    """Stands for CycleGAN's pool of past fakes: grows from empty, state as a dict of tensors."""

    def __init__(self):
        self.images = torch.empty(0, 2)

    def add(self, x):
        self.images = torch.cat([self.images, x])[-3:]

    def state_dict(self):
        return {"images": self.images}

    def load_state_dict(self, state):
        self.images = state["images"].clone()


def stateful(*argv) -> tuple[common.RunFolder, dict]:
    """A run resolved, and the ``saved`` of a script with every kind of registered state and two data streams."""
    run = resolve(*argv)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    objects = {"sched": torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5),
               "scaler": torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1),
               "ema": torch.nn.Linear(3, 1),
               "pool": Pool(), "noise": torch.zeros(4)}
    data = {"A": common.Batches(common.synthetic_images(40, size=4), 8, 0, CPU),
            "B": common.Batches(common.synthetic_images(24, size=4, seed=1), 8, 1, CPU)}
    return run, dict(models={"m": model}, optimizers={"opt": opt}, state=objects, data=data)


def test_registered_state_and_every_data_stream_resume_exactly(tmp_path):
    run, saved = stateful("--out", tmp_path / "run")
    model, opt, objects, data = saved["models"]["m"], saved["optimizers"]["opt"], saved["state"], saved["data"]
    assert common.restore(run, **saved) == 0
    common.open_run_folder(run)
    for i in range(5):
        opt.zero_grad()
        objects["scaler"].scale(model(data["A"].next().flatten(1)[:, :3]).mean()).backward()
        objects["scaler"].step(opt)
        objects["scaler"].update()
        objects["sched"].step()
        objects["pool"].add(torch.full((1, 2), float(i)))
        data["B"].next(), data["B"].next()
    objects["noise"].normal_()
    with torch.no_grad():
        objects["ema"].weight.fill_(0.5)
    common.save_run(run, 5, None, **saved)
    end(run)
    again, resumed = stateful("--resume", "--out", tmp_path / "run")
    assert common.restore(again, **resumed) == 5
    restored, streams = resumed["state"], resumed["data"]
    assert restored["sched"].state_dict() == objects["sched"].state_dict()
    assert restored["scaler"].get_scale() == objects["scaler"].get_scale() == 1024.0 * 2 ** 5
    assert torch.equal(restored["pool"].images, objects["pool"].images) and len(restored["pool"].images) == 3
    assert torch.equal(restored["noise"], objects["noise"])
    assert torch.equal(restored["ema"].weight, objects["ema"].weight)
    for name in "AB":
        assert streams[name].state_dict() == data[name].state_dict()
        assert torch.equal(streams[name].next(), data[name].next())
    end(again)


def test_compiled_and_ddp_models_save_plain_keys(tmp_path):
    import torch.distributed as dist
    plain = torch.nn.Linear(3, 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped = {"compiled": torch.compile(torch.nn.Linear(3, 1)),
                   "ddp": torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))}
        run = resolve("--out", tmp_path / "run")
        saved = dict(models=wrapped, optimizers={}, state={}, data={})
        common.restore(run, **saved)
        common.open_run_folder(run)
        common.save_run(run, 1, None, **saved)
        end(run)
    finally:
        dist.destroy_process_group()
    saved = load(tmp_path / "run" / "ckpt.pt")["models"]
    for name, model in wrapped.items():
        assert set(saved[name]) == {"weight", "bias"}, saved[name].keys()
        plain.load_state_dict(saved[name])   # a plain --sample run loads it
        assert torch.equal(plain.weight, common.unwrap(model).weight)


# ----------------------------------------------------------------------------------------------
# Data: splits, labels, folder cache, bad files
# ----------------------------------------------------------------------------------------------
def test_synthetic_splits_and_labels():
    train, y = common.load_images("synthetic", "", labels=True)
    test, y_test = common.load_images("synthetic", "", split="test", labels=True)
    assert train.shape == (256, 1, 28, 28) and test.shape == (64, 1, 28, 28) and y.shape == (256,)
    assert y.dtype == torch.int64 and set(y.tolist()) == {0, 1, 2, 3} and not torch.equal(train[:64], test)
    with pytest.raises(common.UserError, match="no test split"):
        common.load_images("folder", "", 16, split="test")


@pytest.mark.skipif(not common.FASHION_MNIST_DEBIAN.is_dir(),
                    reason="needs Debian's dataset-fashion-mnist (.ci/run installs it)")
def test_fashion_mnist_test_split_and_labels(tmp_path):
    x, y = common.load_images("fashion-mnist", str(tmp_path), split="test", labels=True)
    assert x.shape == (10_000, 1, 28, 28) and y.shape == (10_000,)
    assert torch.bincount(y).tolist() == [1000] * 10   # ten balanced classes


def test_folder_is_decoded_once_and_cached_by_content(tmp_path, monkeypatch):
    from PIL import Image
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(5):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(root / f"{i}.png")
    first = common.load_images("folder", str(root), 8)
    monkeypatch.setattr(common, "_decode", lambda *a: pytest.fail("decoded again although nothing changed"))
    assert torch.equal(common.load_images("folder", str(root), 8), first)
    monkeypatch.undo()
    Image.new("RGB", (20, 20), (0, 255, 0)).save(root / "0.png")   # a changed file is decoded again
    changed = common.load_images("folder", str(root), 8)
    assert changed[0, 1].min() == 255 and torch.equal(changed[1:], first[1:])
    assert len(list(root.glob(".cache-8px-*.pt"))) == 1   # the stale cache is gone


def test_bad_data_files_are_one_line_before_the_run_folder(tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (20, 20)).save(tmp_path / "imgs" / "good.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"not a png")
    (tmp_path / "mnist").mkdir()
    raw = (0x0803).to_bytes(4, "big") + (100).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(1000)
    with gzip.open(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(raw)
    (tmp_path / "cut").mkdir()
    full = gzip.compress(raw + bytes(100 * 784 - 1000))
    (tmp_path / "cut" / "train-images-idx3-ubyte.gz").write_bytes(full[:len(full) // 2])
    small = ["--image-size", 16, "--ngf", 4, "--ndf", 4, "--device", "cpu", "--steps", 1]
    for data, words in ((["--dataset", "folder", "--data-root", "imgs"], ["bad.png"]),
                        (["--dataset", "mnist", "--data-root", "mnist"], ["truncated"]),
                        (["--dataset", "mnist", "--data-root", "cut"], ["train-images-idx3-ubyte.gz", "truncated"])):
        proc = run_script("dcgan", *small, *data, "--out", "run", cwd=tmp_path, check=False)
        assert_clean_error(proc, *words)
        assert not (tmp_path / "run").exists()


def test_ddp_shards_make_the_same_global_batches():
    """Under torchrun every rank takes its slice of the same global batch: whatever the number of
    processes, a step sees the same images (what makes DDP's averaged gradient the full-batch one)."""
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    single = common.Batches(images, 8, seed=3, device=CPU, value_range=(0, 255))
    ranks = [common.Batches(images, 8, seed=3, device=CPU, value_range=(0, 255), rank=r, world=4) for r in range(4)]
    for _ in range(14):  # across two epoch boundaries (6 batches an epoch)
        assert torch.equal(single.next(), torch.cat([b.next() for b in ranks]))
    with pytest.raises(common.UserError, match="global batch: it must divide among the 3 processes"):
        common.Batches(images, 8, 0, CPU, world=3)


def test_keep_every_keeps_a_checkpoint_of_each_such_step_and_curves_png_is_drawn(tmp_path):
    from PIL import Image
    train("--keep-every", 2, "--steps", 4, "--log-every", 1, "--out", tmp_path / "run",
          logged=[{"loss": float(step)} for step in range(1, 5)])
    out = tmp_path / "run"
    assert sorted(p.name for p in out.glob("ckpt*.pt")) == ["ckpt-2.pt", "ckpt-4.pt", "ckpt.pt"]
    assert load(out / "ckpt-2.pt")["step"] == 2 and load(out / "ckpt-4.pt")["step"] == 4
    assert Image.open(out / "curves.png").size[0] > 100


# ----------------------------------------------------------------------------------------------
# Review of run plumbing v2: races, partial state, per-key averages
# ----------------------------------------------------------------------------------------------
def test_a_checkpoint_written_by_another_process_meanwhile_is_never_overwritten(tmp_path):
    run = resolve("--steps", 4, "--out", tmp_path / "run")   # the folder does not exist yet: open_run_folder locks it
    saved = build(run.cfg)
    trained("--out", tmp_path / "run", step=6)               # another process, faster, same --out
    theirs = digest(tmp_path / "run" / "ckpt.pt")
    assert common.restore(run, **saved) == 0
    with pytest.raises(common.UserError, match="was written by another process while this one was starting"):
        common.open_run_folder(run)
    end(run)
    assert digest(tmp_path / "run" / "ckpt.pt") == theirs


def test_stop_is_not_an_exception_that_a_handler_could_swallow():
    assert issubclass(common.Stopped, BaseException) and not issubclass(common.Stopped, Exception)


def test_init_that_does_not_fit_names_the_difference_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trained("--out", "a", "--width", 5, step=2)
    with pytest.raises(common.UserError, match=r"does not fit this config .*width=5 \(now 4\)"):
        start("--init", "a/ckpt.pt", "--width", 4, "--out", "b")
    assert not (tmp_path / "b").exists()


def test_an_incomplete_checkpoint_is_one_line(tmp_path):
    trained("--out", tmp_path / "run", step=2)
    ckpt = load(tmp_path / "run/ckpt.pt")
    del ckpt["optimizers"]
    common.save_checkpoint(ckpt, tmp_path / "cut.pt")
    with pytest.raises(common.UserError, match=r"cut.pt is incomplete \(no optimizers\)"):
        resolve("--resume", tmp_path / "cut.pt", "--out", tmp_path / "x")


def test_a_key_logged_at_some_steps_only_is_averaged_over_those(tmp_path):
    import csv
    train("--log-every", 4, "--steps", 4, "--out", tmp_path / "run",
          logged=[{"loss": 1.0, **({"fid": 12.5} if step == 2 else {})} for step in range(1, 5)])
    with open(tmp_path / "run/metrics.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert (row["loss"], row["fid"]) == ("1", "12.5")


def test_the_last_steps_losses_are_logged_even_when_a_checkpoint_fell_on_the_last_step(tmp_path):
    """The loop's own checkpoint at the last step must not swallow the losses since the last row."""
    import csv
    train("--log-every", 3, "--ckpt-every", 4, "--steps", 4, "--out", tmp_path / "run",
          logged=[{"loss": float(step)} for step in range(1, 5)])
    with open(tmp_path / "run/metrics.csv", newline="") as f:
        assert [(r["step"], r["loss"]) for r in csv.DictReader(f)] == [("3", "2"), ("4", "4")]


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    s = start("--steps", 4, "--out", tmp_path / "run")
    common.save_run(s.run, 1, s.log, **s.saved)

    def full(state, path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(common, "save_checkpoint", full)
    with pytest.raises(common.UserError, match=r"No space left on device\); the previous one \(step 1\) is intact"):
        common.save_run(s.run, 2, s.log, **s.saved)
    assert load(tmp_path / "run/ckpt.pt")["step"] == 1
    end(s.run)


def test_resume_path_already_done_still_gives_the_folder_its_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    trained("--out", "a", step=6)
    assert train("--resume", "a/ckpt.pt", "--out", "b", "--steps", 4, logged=[]) == 6
    assert "already done at step 6 (--steps 4)" in capsys.readouterr().out
    assert load(tmp_path / "b/ckpt.pt")["step"] == 6   # a later bare --resume in b continues, not restarts


def test_a_resume_under_fp16_starts_afresh_the_gradscaler_that_the_checkpoint_ran_without(tmp_path, capsys):
    """--amp may change when a run is resumed (a requeue onto another GPU type): a checkpoint written without fp16
    holds its disabled GradScaler's empty state, which an enabled one cannot load; it starts at its initial scale,
    and from then on its state is saved and restored."""
    out = tmp_path / "run"
    trained("--out", out, step=2)
    assert load(out / "ckpt.pt")["state"]["scaler"] == {}
    assert train("--resume", "--amp", "fp16", "--steps", 4, "--out", out, logged=[{}, {}]) == 4
    assert ("the checkpoint ran without fp16 (its GradScaler was off): the loss scale starts at 65536"
            in capsys.readouterr().out)
    scaler = load(out / "ckpt.pt")["state"]["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 2   # two steps trained under fp16
    s = start("--resume", "--out", out)             # --amp fp16 now comes from the checkpoint
    assert s.saved["state"]["scaler"].is_enabled() and s.saved["state"]["scaler"].state_dict() == scaler
    end(s.run)


def test_sample_out_never_empties_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "grids").mkdir()
    (tmp_path / "grids" / "000003.png").write_bytes(b"a training grid")
    with pytest.raises(common.UserError, match="that an earlier --sample did not write"):
        common.prepare_output(tmp_path / "grids")
    assert (tmp_path / "grids" / "000003.png").exists()
    common.save_images([torch.zeros(2, 1, 4, 4)], tmp_path / "gen")
    common.save_images([torch.zeros(1, 1, 4, 4)], tmp_path / "gen")      # its own: replaced
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == [common.SAMPLE_MARK, "000000.png"]
    common.save_images([torch.zeros(1, 1, 4, 4)], tmp_path / "UPPER.NPZ")
    assert (tmp_path / "UPPER.NPZ").is_file()


def test_an_unreadable_image_of_a_translation_folder_is_one_line_naming_it(tmp_path):
    for folder in ("train", "trainA", "trainB", "mine"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "bad.png").write_bytes(b"not a png")
    for load in (lambda: common.load_pairs("aligned", str(tmp_path), 8),
                 lambda: common.load_domains("unaligned", str(tmp_path), 8),
                 lambda: common.read_images(str(tmp_path / "mine"), 8, 1)):
        with pytest.raises(common.UserError, match="cannot read the image .*bad.png .*fix or remove it"):
            load()


def test_a_dataset_too_large_for_the_gpu_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))   # 2 GiB free
    images = torch.zeros(1, dtype=torch.uint8).expand(2**30 + 1)   # 1 GiB + 1 byte, without allocating it
    with pytest.raises(common.UserError, match="take 1.0 GiB, kept on the GPU: more than half of its 2.0 GiB free"):
        common.Batches(images.view(-1, 1, 1, 1), 4, 0, torch.device("cuda"))


def test_an_output_folder_that_cannot_be_made_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(common.UserError, match="--sample-out .*: cannot write to .*file/sub"):
        common.prepare_output(tmp_path / "file" / "sub" / "s.npz")
    with pytest.raises(common.UserError, match="--translate-out: cannot write to .*file/sub"):
        common.prepare_folder(tmp_path / "file" / "sub", tmp_path, "--translate-out")
    with pytest.raises(common.UserError, match="--translate-out .* is the input folder"):
        common.prepare_folder(tmp_path, tmp_path, "--translate-out")


def test_empty_paths_are_refused_not_the_current_folder(tmp_path):
    proc = run_script("gan", "--dataset", "synthetic", "--out", "", "--steps", 1, cwd=tmp_path, check=False)
    assert_clean_error(proc, "--out ''")
    assert os.listdir(tmp_path) == []
