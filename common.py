"""Data and small run helpers shared by the model scripts: no model, no loss, no training loop.

Each script's train(cfg) calls these in its own visible loop (dcgan.py shows the whole pattern):
    ddp = common.Processes(cfg.device)           # torchrun's processes, or this one: rank, world, device
    run = common.resolve_run(cfg, "dcgan", ddp)  # --out, --resume/--init, the config; refused before any write
    stop = common.Stop(ddp)                      # SIGTERM/USR1/Ctrl-C: exit 3 during the set-up, then between steps
    saved = dict(models=..., optimizers=..., data=..., state=...)   # the script names what a checkpoint holds
    step = common.restore(run, **saved); common.open_run_folder(run); log = common.Log(run, step)
    ...the loop: train_step, log.add / log.write, common.save_run(run, step, log, **saved)...
    common.finish(run, step, log, stop, **saved)
No helper decides when anything happens. docs/run-contract.md gives the user's rules (resume, run folder, --sample)."""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import csv
import dataclasses
import datetime
import errno
import fcntl
import gzip
import hashlib
import json
import math
import operator
import os
import random
import shutil
import signal
import sys
import time
import uuid
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

CHECKPOINT_FORMAT = 2
EXIT_NO_PROGRESS = 3   # stopped by a signal before any new step: submit.sh does not requeue such a job
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
EVAL_METRICS = ("fid", "kid", "prc")   # what --eval-metrics may name
SAMPLE_MARK = ".written-by-sample"  # in every --sample folder: only such a folder is ever emptied


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, foreign checkpoint): printed as one line."""


class Stopped(BaseException):
    """A stop signal before training started: nothing new to save. A BaseException: no ``except Exception`` eats it."""


def run_main(main: Callable[[], None]) -> None:
    """Run ``main``: a UserError is one line on stderr and exit 2; a stop before the first step is exit 3."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stopped as e:
        print(f"stopped by {e} before the first step: nothing new to save", flush=True)
        sys.exit(EXIT_NO_PROGRESS)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ---- Config: one dataclass per script, fields with help text, turned into argparse flags ---------
def arg(default, help: str, run: bool = False, command: bool = False, min: float | None = None,
        max: float | None = None, above: float | None = None, below: float | None = None, choices: tuple | None = None,
        metavar: str | None = None, sampling: bool = False, const=None, predates=None, flag: str | None = None):
    """A config field with its --help line. run: it may change on resume (it does not change what is computed).
    command: it never comes from a checkpoint. sampling: a command field of --sample. flag, metavar, const: argparse's.
    min, max (included), above, below (excluded), choices: the value's limits. predates: older checkpoints' value."""
    meta = dict(help=help, run=run, command=command or sampling, sampling=sampling, min=min, max=max, above=above,
                below=below, choices=choices, metavar=metavar, const=const, predates=predates, flag=flag)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class RunConfig:
    """Run and plumbing flags shared by every script; each script subclasses it with the paper's values."""
    dataset: str = arg("fashion-mnist", "fashion-mnist | mnist | cifar10 | svhn | folder | synthetic | "
                       "synthetic-rgb", metavar="NAME")
    data_root: str = arg("data", "where datasets are read from (and downloaded to, where the network allows)",
                         run=True, metavar="DIR")
    out: str = arg("", "run folder (default: runs/<script>-<dataset>)", run=True, metavar="DIR")
    resume: str | None = arg(None, "continue --out's checkpoint (a new run if it has none); with PATH: start --out "
                             "from PATH until --out has its own (default: off)", command=True, const="auto",
                             metavar="PATH")
    init: str = arg("", "a new run whose model weights come from the checkpoint PATH (default: none)",
                    command=True, metavar="PATH")
    steps: int = arg(10_000, "optimizer steps of the main model", run=True, min=0)
    seed: int = arg(0, "seed of every random number generator (with --sample: of the samples)", min=0,
                    max=2**32 - 1 - 1024)  # numpy's seeds are 32-bit; each rank adds its rank
    device: str = arg("auto", "auto (cuda, else mps, else cpu) | cpu | cuda | cuda:1 | mps", command=True,
                      metavar="NAME")
    log_every: int = arg(100, "print and append to metrics.csv every N steps", run=True, min=1)
    sample_every: int = arg(1000, "write a sample grid from the fixed noise every N steps", run=True, min=1)
    ckpt_every: int = arg(1000, "write ckpt.pt every N steps (also at the end and on SIGTERM/SIGUSR1)", run=True, min=1)
    sample: int = arg(0, "no training: load the checkpoint and write N generated images to --sample-out",
                      command=True, min=0)
    sample_out: str = arg("", "a folder of PNGs, or a .npz of uint8 images (default: <out>/generated)",
                          sampling=True, metavar="PATH")
    keep_every: int = arg(0, "also keep ckpt-<step>.pt every N steps, to go back to (default: 0, off)", run=True, min=0)
    eval_every: int = arg(0, "every N steps: FID of --eval-n samples against the training data, to metrics.csv; "
                          "best.pt keeps the best (default: 0, off)", run=True, min=0)
    eval_n: int = arg(10_000, "samples per evaluation", run=True, min=2)
    eval_metrics: str = arg("fid", "comma-separated, among fid, kid, prc (precision/recall)", run=True, metavar="LIST")
    eval_features: str = arg("auto", "feature space of --eval-every: auto (the dataset's classifier for fashion-mnist "
                             "and mnist and its translation demos, else inception) | inception | fashion-mnist | mnist",
                             run=True, choices=("auto", "inception", "fashion-mnist", "mnist"))
    # Speed: none changes the mathematics, so each may change when a run is resumed
    amp: str = arg("off", "mixed precision: --amp alone is auto, bf16 autocast where the device has it, else fp16 "
                   "with a GradScaler (V100, T4, MPS); bf16 | fp16 force one", run=True,
                   choices=("off", "auto", "bf16", "fp16"), const="auto")
    compile: bool = arg(False, "torch.compile the networks", run=True)


@dataclasses.dataclass
class ImageConfig(RunConfig):
    """RunConfig and the training images' subset of a labelled dataset (training_set reads it)."""
    per_class: int = arg(0, "train on N images of each class, the subset augment.py draws (0: all)", min=0)
    subset_seed: int = arg(0, "the seed that picks --per-class's images", min=0)
    only_class: tuple = arg((), "train on class C's images alone, the validation hold-out left out (repeatable)",
                            metavar="C")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_config(cls, argv: list[str] | None = None):
    """Build argparse from the dataclass ``cls``; returns the config with ``cfg.given`` = flags typed."""
    parser = Parser(description=sys.modules["__main__"].__doc__, allow_abbrev=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    flags = {f.name: f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        flag, default, help = flags[f.name], f.default, f.metadata.get("help", "")
        if default not in ("", None):  # empty defaults say what they mean in their help text
            help += f" (default: {default})"
        if f.metadata.get("const") is not None:
            parser.add_argument(flag, nargs="?", const=f.metadata["const"], choices=f.metadata.get("choices"),
                                metavar=f.metadata.get("metavar"), help=help)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        elif isinstance(default, tuple):   # a repeatable flag of integers
            parser.add_argument(flag, action="append", type=int, metavar=f.metadata.get("metavar"), help=help)
        else:
            kind = {"float": float, "int": int}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
            metavar = f.metadata.get("metavar") or (kind.__name__.upper() if kind is not str else None)
            parser.add_argument(flag, type=kind, choices=f.metadata.get("choices"), help=help, metavar=metavar,
                                dest=f.name)
    given = vars(parser.parse_args(argv))
    bounds = (("min", "at least", operator.lt), ("max", "at most", operator.gt), ("above", "above", operator.le),
              ("below", "below", operator.ge))
    for f in dataclasses.fields(cls):
        value = given.get(f.name)
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"{flags[f.name]} {value}: must be a finite number")
        for key, words, outside in bounds:
            if f.metadata.get(key) is not None and value is not None and outside(value, f.metadata[key]):
                parser.error(f"{flags[f.name]} {value}: must be {words} {f.metadata[key]}")
    for name in ("out", "resume", "init", "sample_out", "data_root"):
        if given.get(name) == "":  # e.g. an unset shell variable: never "the current folder"
            parser.error(f"{flags[name]} '': give a path" + (", or --resume alone" if name == "resume" else ""))
        if isinstance(given.get(name), str):
            given[name] = os.path.expanduser(given[name])  # --out=~/runs/x: no shell expands it
    for f in dataclasses.fields(cls):
        if f.metadata.get("sampling") and f.name in given and not given.get("sample"):
            parser.error(f"{flags[f.name]} goes with --sample N (no training)")
    cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in given.items()})
    cfg.given = set(given)
    return cfg


# ---- The run: small helpers that each script's train(cfg) calls in its visible loop --------------------
class Processes:
    """This process's rank, world and device; small objects travel through a gloo group on the CPU."""

    def __init__(self, device: str, connect: bool = True):
        """``connect=False``: no process group, for processes that work apart (the shards of a --sample)."""
        self.world, self.rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        self.device, self.group, self.connected = pick_device(device), None, False
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            elif self.device.type != "cpu":
                raise UserError(f"--device {device}: several processes need cuda (one GPU each) or cpu")
            if connect:   # a long evaluation on rank 0 keeps the others waiting in their next collective
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(hours=1))
                self.group = dist.new_group(backend="gloo") if self.device.type == "cuda" else None
                self.connected = True
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True   # fixed shapes: cuDNN picks its fastest kernels once

    @property
    def device_ids(self) -> list[int] | None:
        """DistributedDataParallel's device_ids: this process's GPU, or None on the CPU."""
        return [self.device.index] if self.device.type == "cuda" else None

    def agree(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any."""
        t = torch.tensor([int(flag)])
        if self.connected:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def from_main(self, obj):
        """Rank 0's ``obj``, on every rank."""
        box = [obj]
        if self.connected:
            dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.connected:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        """The average of ``x`` over the ranks (on its device: NCCL for CUDA tensors)."""
        if not self.connected:
            return x
        x = x.clone()
        dist.all_reduce(x)   # SUM: gloo has no AVG
        return x / self.world

    def close(self) -> None:
        if self.connected:
            dist.barrier()   # a rank that leaves while another still talks aborts gloo
            dist.destroy_process_group()
            self.connected = False


@dataclasses.dataclass
class RunFolder:
    """Where a run lives, what it continues, and the facts its checkpoints carry from one session to the next."""
    cfg: object
    script: str
    ddp: Processes
    out: Path
    ckpt: dict | None = None          # the checkpoint to continue (or sample from), until restore() has read it
    init: dict | None = None          # --init's checkpoint, whose model weights start a new run
    run_id: str = ""                  # the run's id, kept across resumes and folders
    elapsed: float = 0.0              # training time of the earlier sessions, in seconds
    best_fid: float = math.inf
    start_step: int = 0               # the step this session started from
    saved_step: int | None = None     # the step of the last checkpoint written (None: none yet in --out)
    last_good: tuple | None = None    # (path, step) of the last checkpoint known to be finite
    started: float = 0.0              # time.time() when this session's training began
    seen: tuple | None = None         # (size, mtime) of ckpt.pt when resolved: did another process write it?
    lock: object = None

    @property
    def ckpt_path(self) -> Path:
        return self.out / "ckpt.pt"

    @property
    def is_main(self) -> bool:
        return self.ddp.rank == 0

    def say(self, *args) -> None:
        """print, on rank 0 only."""
        if self.is_main:
            print(*args, flush=True)

    def time_s(self) -> float:
        """Training time of the run so far, across resumes."""
        return self.elapsed + time.time() - self.started


def resolve_run(cfg, script: str, ddp: Processes, command: str | None = None) -> RunFolder:
    """Decide which run this is (--out, the checkpoint it continues, the config) before any data is loaded.
    A typed field that changes what is computed is refused, and so is a folder that another process has locked."""
    if command and cfg.sample and command != "--sample":
        raise UserError(f"--sample and {command} are two commands: give one")
    if command and command != "--sample" and ddp.world > 1:
        raise UserError(f"{command} runs in one process: start it with python, not torchrun")
    if set(cfg.eval_metrics.split(",")) - set(EVAL_METRICS):
        raise UserError(f"--eval-metrics {cfg.eval_metrics}: choose among {', '.join(EVAL_METRICS)}")
    path = cfg.resume if cfg.resume not in (None, "auto") else None
    if cfg.init and (path or command):
        raise UserError(f"--init PATH starts a new run: it goes with neither --resume PATH nor {command or '--resume'}")
    src = load_checkpoint(path, script) if path else None
    init = load_checkpoint(cfg.init, script) if cfg.init else None
    if init is not None:
        _merge(cfg, init["config"], script, command, refuse=False, say=ddp.rank == 0)
    if "out" not in cfg.given:   # PATH's run goes on in PATH's folder
        cfg.out = str(Path(path).parent) if src else f"runs/{script}-{cfg.dataset}"
    run = RunFolder(cfg, script, ddp, Path(cfg.out))
    own = None
    run.seen = _signature(run.ckpt_path)   # open_run_folder checks that no other process wrote it meanwhile
    if run.ckpt_path.is_file():
        same = path and Path(path).resolve() == run.ckpt_path.resolve()
        own = src if same else load_checkpoint(run.ckpt_path, script)
    if command:
        run.ckpt = src or own
        if run.ckpt is None:
            raise UserError(f"{command} needs a checkpoint: none at {run.ckpt_path}; train first, or pass --resume "
                            f"PATH or --out")
    elif own is None:
        run.ckpt, run.init = src, init
        if cfg.resume == "auto":
            run.say(f"no checkpoint in {cfg.out}: starting a new run")
        elif src is not None:
            run.say(f"starting {cfg.out} from {path} (step {src['step']})")
    elif cfg.resume is None:
        raise UserError(f"{run.ckpt_path} exists: pass --resume to continue it, or another --out")
    elif src is not None and own is not src and own["run"] != src["run"]:
        raise UserError(f"{run.ckpt_path} holds another run (step {own['step']}), which is never overwritten: pass "
                        f"--out a new folder to start from {path}")
    else:
        run.ckpt = own
        if src is not None and own is not src:
            run.say(f"continuing {run.ckpt_path} (step {own['step']}), this run's own checkpoint: --resume {path} "
                    f"only starts a folder that has none")
        if init is not None:
            run.say(f"continuing {run.ckpt_path}: --init applies only when a run starts")
    if run.ckpt is not None:
        _merge(cfg, run.ckpt["config"], script, command, refuse=True, say=ddp.rank == 0)
    if not command and run.out.is_dir() and run.is_main:
        _lock_folder(run)   # a busy folder is refused now, not after loading the data
    return run


def _merge(cfg, saved: dict, script: str, command: str | None, refuse: bool, say: bool) -> None:
    """Take every field not typed from ``saved``; with ``refuse``, a typed one that changes the results must match."""
    given = cfg.given
    command_fields = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("command")}
    free = {f.name for f in dataclasses.fields(cfg) if f.metadata.get("run")} | ({"seed"} if command else set())
    clashes, predates = [], []
    for f in dataclasses.fields(cfg):
        name = f.name
        if name in command_fields or name == "out":
            continue
        if name not in saved:
            if name not in given:
                if f.metadata.get("predates") is not None:
                    setattr(cfg, name, f.metadata["predates"])
                predates.append(f"--{name.replace('_', '-')} ({getattr(cfg, name)!r})")
        elif name not in given:
            setattr(cfg, name, saved[name])
        elif refuse and name not in free and getattr(cfg, name) != saved[name]:
            clashes.append(f"{name} {saved[name]!r} -> {getattr(cfg, name)!r}")
    if clashes:
        raise UserError(f"the checkpoint was trained with another config ({', '.join(clashes)}); drop those "
                        f"flags to continue it, or start a new run with --init and another --out")
    gone = sorted(set(saved) - {f.name for f in dataclasses.fields(cfg)})
    if say and predates:
        print(f"the checkpoint predates {', '.join(predates)}: using these values", flush=True)
    if say and gone:
        print(f"ignoring the checkpoint's {', '.join(gone)}: no longer a flag of {script}.py", flush=True)


def _lock_folder(run: RunFolder) -> None:
    """Hold an exclusive flock on <out>/.lock for this process's life: two jobs never write one folder."""
    try:
        run.lock = open(run.out / ".lock", "a+")
    except OSError as e:
        raise UserError(f"cannot write to the run folder {run.out} ({e.strerror}); pass --out a writable "
                        f"folder") from None
    try:
        fcntl.flock(run.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        run.lock.seek(0)
        owner = run.lock.read().strip() or "?"
        raise UserError(f"run folder {run.out} is in use by another process (pid {owner}); wait for it to end or "
                        f"use another --out") from None
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise UserError(f"cannot lock the run folder {run.out}: its file system does not support flock "
                            f"({e.strerror}; e.g. Lustre mounted without -o flock); put --out on a file system "
                            f"that does (local disk, NFS, Lustre with flock)") from None
        raise UserError(f"cannot lock the run folder {run.out} ({e.strerror})") from None
    run.lock.seek(0)
    run.lock.truncate()
    run.lock.write(str(os.getpid()))
    run.lock.flush()


def open_run_folder(run: RunFolder) -> None:
    """Create and lock --out, remove what a killed save left, write args.json (rank 0) and say where training starts."""
    if run.is_main:
        try:
            (run.out / "samples").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to the run folder {run.out} ({e.strerror}); pass --out a writable "
                            f"folder") from None
        if run.lock is None:
            _lock_folder(run)
        if _signature(run.ckpt_path) != run.seen:
            raise UserError(f"{run.ckpt_path} was written by another process while this one was starting; nothing "
                            f"was written: run the command again (with --resume to continue it)")
        for partial in run.out.glob(".*.tmp[0-9]*"):   # what a SIGKILL mid-save left behind
            partial.unlink()
            run.say(f"removed {partial.name}, a partial file left by a killed process")
        config = dataclasses.asdict(run.cfg)
        (run.out / "args.json").write_text(json.dumps(config, indent=2) + "\n")
        run.say(f"{run.script}: " + " ".join(f"{k}={v}" for k, v in config.items()))
    run.say(f"already done at step {run.start_step} (--steps {run.cfg.steps})" if run.start_step >= run.cfg.steps
            else f"training from step {run.start_step}" + (" (resumed)" if run.start_step else ""))


class Stop:
    """SIGTERM, SIGUSR1 and SIGINT raise Stopped before ``begin``, then set ``requested``; a second Ctrl-C kills."""
    SYNC = 10   # steps between two agreements of the ranks on a stop

    def __init__(self, ddp: Processes):
        self.ddp, self.requested, self.signal, self.started = ddp, False, "", False
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        if not self.started:
            raise Stopped(self.signal)   # loading data or state: nothing to save, stop at once
        self.requested = True
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)   # a second Ctrl-C kills, even inside a long C call

    def begin(self) -> None:
        """From here a signal stops the loop between steps; one from the set-up stops now, even if Python lost it."""
        self.started = True
        if self.signal and not self.requested:
            raise Stopped(self.signal)

    def agreed(self, step: int) -> bool:
        """Whether the loop stops before this step. Under torchrun all ranks give the same answer, every SYNC steps."""
        return self.requested if self.ddp.world == 1 else step % self.SYNC == 0 and self.ddp.agree(self.requested)


def restore(run: RunFolder, models: dict, optimizers: dict, state: dict, data: dict) -> int:
    """Load resolve_run's checkpoint (or --init's weights) into what ``saved`` names; return the step to start from."""
    run.run_id, run.started = uuid.uuid4().hex, time.time()
    ck, step = run.ckpt, 0
    if ck is not None:
        label = str(run.cfg.resume if run.cfg.resume not in (None, "auto") else run.ckpt_path)
        load_models(run, **models)
        try:
            for name, opt in optimizers.items():
                opt.load_state_dict(ck["optimizers"][name])
            for name, stream in data.items():
                stream.load_state_dict(ck["data"][name])
        except (KeyError, ValueError) as e:
            raise UserError(f"{label} does not match {run.script}.py's optimizers or data streams "
                            f"({type(e).__name__}: {e}); nothing was written") from None
        for name, obj in state.items():
            if name not in ck["state"]:
                warn(f"the checkpoint has no {name} (an older version of {run.script}.py): it starts afresh")
            elif isinstance(obj, torch.Tensor):
                obj.copy_(ck["state"][name])
            elif isinstance(obj, torch.amp.GradScaler) and obj.is_enabled() and not ck["state"][name]:
                run.say(f"the checkpoint ran without fp16 (its GradScaler was off): the loss scale starts at "
                        f"{obj.get_scale():g}")   # --amp may change on resume: bf16 or none -> fp16
            else:
                try:
                    obj.load_state_dict(ck["state"][name])
                except (RuntimeError, KeyError, ValueError, TypeError) as e:
                    raise UserError(f"{label}: its {name} does not fit {run.script}.py's ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0]}); nothing was written") from None
        world = int(ck.get("world", 1))
        if world != run.ddp.world:
            run.say(f"the checkpoint was written by {world} process(es), this run has {run.ddp.world}: the global "
                    f"batch and the data order are the same, the per-process noise and batch statistics are not, so "
                    f"training goes on but not bit-identically to an uninterrupted run")
        rng = ck["rng"]
        set_rng_state(rng[min(run.ddp.rank, len(rng) - 1)] if isinstance(rng, list) else rng, run.ddp.device)
        step, run.run_id = int(ck["step"]), ck["run"]
        run.elapsed, run.best_fid = float(ck.get("time_s", 0.0)), float(ck.get("best_fid", math.inf))
        run.last_good = (Path(label), step)
    elif run.init is not None:
        load_models(run, **models)
        run.say(f"model weights from {run.cfg.init} (step {run.init['step']}), a new run")
    run.saved_step = None if step > 0 and not run.ckpt_path.is_file() else step   # --resume PATH: finish() writes it
    run.start_step, run.ckpt, run.init = step, None, None   # the CPU copies are freed
    return step


def load_models(run: RunFolder, **models: torch.nn.Module) -> None:
    """The checkpoint's (or --init's) weights into ``models``; a misfit names the config fields that differ."""
    ck = run.ckpt if run.ckpt is not None else run.init
    label = f"--init {run.cfg.init}" if ck is run.init else str(
        run.cfg.resume if run.cfg.resume not in (None, "auto") else run.ckpt_path)
    for name, model in models.items():
        if name not in ck["models"]:
            raise UserError(f"{label} has no model {name}; nothing was loaded")
        try:
            unwrap(model).load_state_dict(ck["models"][name])
        except RuntimeError as e:
            detail = str(e).strip().splitlines()[-1].strip()
            command = {f.name for f in dataclasses.fields(run.cfg) if f.metadata.get("command")}
            diff = [f"{k}={v!r} (now {getattr(run.cfg, k)!r})" for k, v in ck["config"].items()
                    if k not in command and hasattr(run.cfg, k) and getattr(run.cfg, k) != v]
            raise UserError(f"{label}: its {name} does not fit this config ({detail}); it was trained with "
                            f"{', '.join(diff[:4]) or 'another version of the network'}") from None


def save_run(run: RunFolder, step: int, log: Log | None, models: dict, optimizers: dict, state: dict, data: dict,
             best: bool = False) -> None:
    """Write ckpt.pt atomically (rank 0), and best.pt, ckpt-<step>.pt, curves.png; a NaN/inf stops the run instead."""
    rng = run.ddp.gather(rng_state(run.ddp.device))
    ckpt = {"script": run.script, "format": CHECKPOINT_FORMAT, "run": run.run_id, "step": step, "time_s": run.time_s(),
            "world": run.ddp.world, "best_fid": run.best_fid, "config": dataclasses.asdict(run.cfg),
            "models": {k: unwrap(m).state_dict() for k, m in models.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "state": {k: v if isinstance(v, torch.Tensor) else v.state_dict() for k, v in state.items()},
            "data": {k: d.state_dict() for k, d in data.items()}, "rng": rng if run.ddp.world > 1 else rng[0]}
    bad = nonfinite({"loss": log.pending() if log else {}, "models": ckpt["models"],
                     "optimizers": ckpt["optimizers"], "state": ckpt["state"]}) if run.is_main else []
    bad = run.ddp.from_main(bad)
    if bad:
        diverged(run, bad, step)
    if run.is_main:
        try:
            save_checkpoint(ckpt, run.ckpt_path)
        except OSError as e:
            kept = f"the previous one (step {run.saved_step}) is intact" if run.saved_step is not None else "none was"
            raise UserError(f"cannot write {run.ckpt_path} ({e.strerror}); {kept}: free space, then --resume") from None
        if best:
            _link_or_copy(run.ckpt_path, run.out / "best.pt")
        if run.cfg.keep_every and step % run.cfg.keep_every == 0:
            _link_or_copy(run.ckpt_path, run.out / f"ckpt-{step}.pt")
        log.plot() if log else None
    run.saved_step, run.last_good = step, (run.ckpt_path, step)


def diverged(run: RunFolder, names: list[str], step: int) -> None:
    """Stop a run whose losses or state became NaN/inf, with advice that works (the last good checkpoint is kept)."""
    if run.last_good is not None:
        path, good = run.last_good
        advice = (f"the last good checkpoint, {path} (step {good}), is kept: continue from it with a lower learning "
                  f"rate in a new run, e.g. --init {path} --lr <lower> --out <new folder>")
    else:
        advice = "no checkpoint was written yet: start again with a lower --lr or another --seed"
    raise UserError(f"{', '.join(names[:3])} became NaN or inf by step {step}: training diverged; {advice}")


def finish(run: RunFolder, step: int, log: Log, stop: Stop, models: dict, optimizers: dict, state: dict,
           data: dict) -> None:
    """After the loop: save the last step if needed and say how the run ended; a stop before any new step is Stopped."""
    log.write(step)   # the losses since the last row (nothing when there are none)
    if step != run.saved_step:
        save_run(run, step, log, models, optimizers, state, data)
    run.ddp.close()
    if step >= run.cfg.steps:
        if step > run.start_step:
            run.say(f"done at step {step}: {run.ckpt_path}")
    elif step > run.start_step:
        run.say(f"checkpoint saved at step {step} ({stop.signal}); continue with --resume")
    else:
        raise Stopped(stop.signal)


class Log:
    """The losses since the last write, summed on the device; ``write`` logs their means, or stops a NaN/inf run."""

    def __init__(self, run: RunFolder, step: int):
        self.run, self.sums, self.counts = run, {}, {}
        self.metrics = MetricsFile(run.out / "metrics.csv")
        if run.is_main:
            self.metrics.rewind(step)
        self.t_last, self.step_last = time.time(), step

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        for k, v in losses.items():   # a key may come at some steps only: each has its own count
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
            self.counts[k] = self.counts.get(k, 0) + 1

    def pending(self) -> dict[str, torch.Tensor]:
        """The averages not yet written (the checkpoint's NaN check covers them)."""
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def write(self, step: int) -> None:
        if not self.sums:
            return
        pending = self.pending()
        means = dict(zip(pending, self.run.ddp.mean(torch.stack(list(pending.values()))).tolist()))
        self.sums, self.counts = {}, {}
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            diverged(self.run, bad, step)
        cfg, now = self.run.cfg, time.time()
        rate = (step - self.step_last) * cfg.batch_size / max(now - self.t_last, 1e-9)
        eta = (cfg.steps - step) * (now - self.t_last) / max(step - self.step_last, 1)
        self.t_last, self.step_last = now, step
        row = {"step": step, "time_s": round(self.run.time_s(), 2), "images_per_s": round(rate, 1),
               **{k: f"{v:.6g}" for k, v in means.items()}}
        if self.run.is_main:
            self.metrics.write(row)
        self.run.say(f"step {step}/{cfg.steps} | {duration(self.run.time_s())} | ETA {duration(eta)} | "
                     + " | ".join(f"{k} {v}" for k, v in list(row.items())[2:]))

    def scores(self, step: int, scores: dict[str, float], seconds: float) -> None:
        """An evaluation's scores: a row of metrics.csv (rank 0) and a printed line; its time is not training's."""
        self.t_last += seconds   # left out of images/s
        if scores:
            if self.run.is_main:
                self.metrics.write({"step": step, "time_s": round(self.run.time_s(), 2),
                                    **{k: f"{v:.6g}" for k, v in scores.items()}})
            self.run.say(f"step {step}/{self.run.cfg.steps} | evaluation in {duration(seconds)} | "
                         + " | ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def plot(self) -> None:
        try:
            self.metrics.plot(self.run.out / "curves.png")
        except ImportError:
            if not getattr(self, "_told", False):
                warn("no curves.png: pip install matplotlib")
                self._told = True


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module):
    """``models`` in eval mode without gradients, then back to their modes: a sample grid changes no statistics."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


# ---- metrics.csv and curves.png ------------------------------------------------------------------
class MetricsFile:
    """metrics.csv with stable columns, in order of first appearance; a row without a key leaves its cell empty."""

    def __init__(self, path: Path):
        self.path, self.columns = path, []

    def _read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            self.columns = list(reader.fieldnames or [])
        return rows

    def _rewrite(self, rows: list[dict]) -> None:
        with _replacing(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def rewind(self, step: int) -> None:
        rows = self._read()
        kept = [r for r in rows if r.get("step", "").isdigit() and int(r["step"]) <= step]
        if len(kept) != len(rows):
            self._rewrite(kept)

    def write(self, row: dict) -> None:
        if any(k not in self.columns for k in row) or not self.path.is_file():
            rows = self._read()
            self.columns += [k for k in row if k not in self.columns]
            self._rewrite(rows + [row])
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, restval="").writerow(row)

    def plot(self, path: Path) -> None:
        """curves.png: one panel per logged quantity against the step (matplotlib, drawn off-screen)."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        rows = self._read()
        names = [c for c in self.columns if c not in ("step", "time_s")]
        if not rows or not names:
            return
        cols = min(3, len(names))
        rows_n = math.ceil(len(names) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 2.6 * rows_n), squeeze=False)
        for ax, name in zip(axes.flat, names):
            points = [(int(r["step"]), float(r[name])) for r in rows if r.get(name) not in ("", None)]
            if points:
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
        for ax in axes.flat[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        with _replacing(path) as tmp:
            fig.savefig(tmp, dpi=80, format="png")
        plt.close(fig)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ---- Checkpoints: atomic save, safe load, plain model keys, RNG states ---------------------------
@contextlib.contextmanager
def _replacing(path: Path):
    """A temporary name beside ``path``, renamed over it if the block succeeds: a crash leaves the old or new file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state, path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically, fsynced before the rename."""
    with _replacing(Path(path)) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | Path, script: str) -> dict:
    """Load a checkpoint as data (``weights_only=True``), refusing corrupt files and other scripts' ones."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is corrupt or truncated, or not a checkpoint ({type(e).__name__}); "
                        f"nothing was loaded") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt or "models" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project; nothing was loaded")
    if ckpt.get("format", 1) < CHECKPOINT_FORMAT:
        raise UserError(f"{path} was written by an older version of this project (checkpoint format "
                        f"{ckpt.get('format', 1)}, this one reads {CHECKPOINT_FORMAT}): continue it with that version")
    missing = [k for k in ("step", "config", "optimizers", "data", "rng", "run") if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise UserError(f"{path} is incomplete (no {', '.join(missing) or 'config'}); nothing was loaded")
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py: use it with "
                        f"{ckpt['script']}.py, or use another --out")
    return ckpt


def load_config(cls, path: str | Path, script: str):
    """(config, checkpoint) of a checkpoint, for using a trained model from Python (each script's ``load``)."""
    ckpt = load_checkpoint(path, script)
    fields = {f.name: f.metadata.get("predates") for f in dataclasses.fields(cls)}
    config = {k: v for k, v in fields.items() if v is not None} | ckpt["config"]
    return cls(**{k: v for k, v in config.items() if k in fields}), ckpt


def _signature(path: Path):
    """(size, mtime) of a file, None if it does not exist: tells whether it changed in between."""
    with contextlib.suppress(OSError):
        st = path.stat()
        return st.st_size, st.st_mtime_ns
    return None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP, DataParallel and torch.compile wrappers, whose state_dict keys are prefixed."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def _floating_tensors(tree, name: str = ""):
    if isinstance(tree, torch.Tensor):
        if tree.is_floating_point() or tree.is_complex():
            yield name, tree
    elif isinstance(tree, (dict, list, tuple)):
        for k, v in tree.items() if isinstance(tree, dict) else enumerate(tree):
            yield from _floating_tensors(v, f"{name}/{k}" if name else str(k))


def nonfinite(tree) -> list[str]:
    """Names of the floating tensors in a nested dict/list that hold a NaN or an inf (one host sync per device)."""
    by_device: dict = {}
    for name, t in _floating_tensors(tree):
        names, flags = by_device.setdefault(t.device, ([], []))
        names.append(name)
        flags.append(torch.isfinite(t.detach()).all())
    bad = []
    for names, flags in by_device.values():
        bad += [n for n, good in zip(names, torch.stack(flags).cpu().tolist()) if not good]
    return bad


def rng_state(device: torch.device | None = None) -> dict:
    """Python, numpy and torch CPU generators, and the run device's (CUDA or MPS) generator."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = dict(keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss, gauss=gauss)
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device is not None and device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    kind = device.type if device is not None else "cpu"
    saved = "cuda" if "cuda" in state else "mps" if "mps" in state else "cpu"
    if saved != kind:
        warn(f"the checkpoint was written on {saved} and this run is on {kind}: its {kind if kind != 'cpu' else saved} "
             f"random generator is not restored, so the noise differs from an uninterrupted run")
    elif kind == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    elif kind == "mps":
        torch.mps.set_rng_state(state["mps"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this machine has no CUDA device; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not mps:
        raise UserError(f"--device {name} asked for, but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def amp_dtype(amp, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --amp: None, bf16, or fp16 (with a GradScaler); older checkpoints hold True or False."""
    amp = {True: "auto", False: "off"}.get(amp, amp)
    bf16 = device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported())
    if amp == "bf16" and not bf16:
        raise UserError(f"--amp bf16: {device.type} has no bf16 here; use --amp fp16 (or --amp alone)")
    if amp == "auto":
        amp = "bf16" if bf16 else "fp16"
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes a copy of ``src``, atomically: a hard link where the file system allows (no extra space)."""
    with _replacing(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


# ---- Images out: sample grids and --sample output ------------------------------------------------
def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` -> uint8 N x C x H x W on the CPU."""
    low, high = value_range
    x = (images.detach().float().cpu() - low) * (255.0 / (high - low))
    return x.round().clamp(0, 255).to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None,
              value_range: tuple[float, float] = (-1.0, 1.0), padding: int = 2) -> None:
    """Write a batch as one PNG grid (``nrow`` images a row, square by default)."""
    from PIL import Image
    x = to_uint8(images, value_range)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    array = grid.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if c == 1 else array).save(path)


def prepare_output(path: str | Path, key: str | None = None) -> Path:
    """Check that ``path`` (a .npz or a folder of PNGs) can be written: a folder must be new, empty or --sample's.
    An earlier --sample's folder is emptied, unless its SAMPLE_MARK holds the same ``key``: then it is continued."""
    path = Path(path)
    flag = f"--sample-out {path}"
    npz = path.suffix.lower() == ".npz"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"{flag}: give a folder (one PNG per image) or a .npz file, not an image name")
    if npz and path.is_dir():
        raise UserError(f"{flag} is a folder; give a .npz file name or a folder without the .npz suffix")
    if not npz and path.exists() and not path.is_dir():
        raise UserError(f"{flag} is an existing file; give a folder or a .npz file")
    make_writable(path.parent if npz else path, flag)
    if npz:
        return path
    lock = os.open(path, os.O_RDONLY)   # flock on the folder itself: no file of ours in a foreign folder
    try:
        with contextlib.suppress(OSError):   # no flock on this file system: shards started at once may race
            fcntl.flock(lock, fcntl.LOCK_EX)
        entries = list(path.iterdir())
        numbered = lambda e: e.suffix in (".png", ".part") and e.name.split(".")[0].isdigit()   # noqa: E731
        ours = (path / SAMPLE_MARK).is_file() and all(
            e.name == SAMPLE_MARK or numbered(e) or (e.is_dir() and e.name.startswith("class_")
                                                     and all(numbered(f) for f in e.iterdir())) for e in entries)
        if entries and not ours:
            names = sorted(e.name for e in entries)
            raise UserError(f"{flag} holds files that an earlier --sample did not write ({', '.join(names[:3])}); "
                            f"fid.py would mix them with the samples: choose a new or empty folder")
        mark = f"written by --sample: the next --sample into this folder replaces it\n{key or ''}\n"
        if key is None or not ours or (path / SAMPLE_MARK).read_text() != mark:
            for e in entries:
                shutil.rmtree(e) if e.is_dir() else e.unlink()
            (path / SAMPLE_MARK).write_text(mark)
    finally:
        os.close(lock)
    return path


def save_images(batches, path: str | Path, value_range: tuple[float, float] = (-1.0, 1.0)) -> int:
    """Write generated images as PNGs in a folder, or as one .npz; returns how many. ``path`` is checked first."""
    from PIL import Image
    path = prepare_output(path)
    npz = path.suffix.lower() == ".npz"
    kept, n = [], 0
    for batch in batches:
        x = to_uint8(batch, value_range).permute(0, 2, 3, 1).numpy()
        if npz:
            kept.append(x)
            continue
        for image in x:
            Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path / f"{n:06d}.png")
            n += 1
    return save_npz(np.concatenate(kept), path) if npz else n


def save_npz(images: np.ndarray, path: Path, **arrays) -> int:
    """uint8 N x H x W x C ``images`` (and ``arrays``, e.g. labels) as the .npz ``path``, atomically; returns N."""
    with _replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, images=images, **arrays)
    return len(images)


def write_images(run: RunFolder, batches, value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
    """--sample in one process: the batches to --sample-out (default <out>/generated), checked first."""
    if run.ddp.world > 1:
        raise UserError(f"--sample of {run.script}.py runs in one process: start it with python, not torchrun")
    out = Path(run.cfg.sample_out or run.out / "generated")
    run.say(f"wrote {save_images(batches, out, value_range)} images to {out}")
    return out


def write_sharded(run: RunFolder, draw: Callable, n: int, batch: int, key: dict, stop: Stop,
                  value_range: tuple[float, float] = (-1.0, 1.0), classes: int = 0) -> bool:
    """--sample N in fixed batches, split among processes and resumable; returns False if a signal stopped it.
    Batch j is ``draw(size, generator[, labels])`` seeded by (--seed, j); label i is i mod ``classes``, or --class.
    Shard s of k draws j = s mod k. The folder's mark holds ``key``, N and --seed; one drawn otherwise is replaced."""
    cfg, ddp = run.cfg, run.ddp
    one = getattr(cfg, "class_", -1) if getattr(cfg, "class_", -1) >= 0 else None
    if classes and one is None and n % classes:
        raise UserError(f"--sample {n}: a conditional model writes N/K images of each of its {classes} classes; "
                        f"give a multiple of {classes} (or --class c)")
    label = lambda i: one if one is not None else i % max(classes, 1)   # noqa: E731
    out = Path(cfg.sample_out or run.out / "generated")
    array = os.environ.get("SLURM_ARRAY_TASK_ID")
    task = (int(array) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))) // int(
        os.environ.get("SLURM_ARRAY_TASK_STEP", 1)) if array else 0
    shard, shards = task * ddp.world + ddp.rank, int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)) * ddp.world
    npz = out.suffix.lower() == ".npz"
    if npz and shards > 1:
        raise UserError(f"--sample-out {out}: a .npz is written by one process; give a folder to split --sample "
                        f"among {shards} processes or array tasks")
    key = {"checkpoint": f"{run.ckpt['run']}@{run.ckpt['step']}", "n": n, "batch": batch, "seed": cfg.seed,
           "class": one, **key}
    prepare_output(out, key=None if npz else json.dumps(key, sort_keys=True))
    indices = lambda j: range(j * batch, min(n, (j + 1) * batch))   # noqa: E731
    names = lambda j: [out / (f"class_{label(i)}" if classes else "") / f"{i:06d}.png" for i in indices(j)]  # noqa
    mine = range(shard, math.ceil(n / batch), shards)
    todo = [j for j in mine if npz or not all(p.is_file() for p in names(j))]
    total = sum(len(names(j)) for j in todo)
    where = f" (shard {shard + 1} of {shards})" if shards > 1 else ""
    stop.begin()
    done, kept, t0 = 0, [], time.time()
    print(f"--sample {n}{where}: {total} images to draw" + (f", {sum(len(names(j)) for j in mine) - total} "
          f"already in {out}" if len(todo) < len(mine) else ""), flush=True)
    with torch.no_grad():
        for j in todo:
            seed = int(np.random.SeedSequence([cfg.seed, j]).generate_state(1)[0])
            g = torch.Generator(ddp.device).manual_seed(seed)
            y = torch.tensor([label(i) for i in indices(j)], device=ddp.device)
            images = draw(len(y), g, y) if classes else draw(len(y), g)
            images = to_uint8(images, value_range).permute(0, 2, 3, 1).numpy()
            if npz:
                kept.append(images)
            for path, image in zip([] if npz else names(j), images):
                path.parent.mkdir(exist_ok=True)
                write_png(image, path, path.with_name(path.name + ".part"))   # prepare_output knows .part
            done += len(images)
            elapsed = time.time() - t0
            print(f"--sample{where}: {done}/{total} | {duration(elapsed)} | "
                  f"ETA {duration(elapsed * (total - done) / done)}", flush=True)
            if stop.requested:   # checked after the batch: one that has begun is always written
                break
    if stop.requested and done < total:
        if npz:
            raise Stopped(stop.signal)   # nothing written: a .npz is all or nothing
        print(f"stopped by {stop.signal} after {done} images: the same command continues", flush=True)
        return False
    if npz:
        subset = {k: getattr(cfg, k) for k in ("per_class", "subset_seed")} if getattr(cfg, "per_class", 0) else {}
        save_npz(np.concatenate(kept), out, **({"labels": np.array([label(i) for i in range(n)])} if classes else {}),
                 **subset)
        print(f"wrote {n} images to {out}", flush=True)
        return True
    present = sum(p.is_file() for j in range(math.ceil(n / batch)) for p in names(j))
    print(f"wrote {done} images to {out}" + ("" if present == n else
          f"; {present}/{n} are there: the other shards write the rest"), flush=True)
    return True


# ---- Data: whole datasets held in memory as one uint8 tensor, batched by indexing ----------------
# name -> (channels, native size); "folder" is any folder of images, RGB at the size asked for
DATASETS = {"fashion-mnist": (1, 28), "mnist": (1, 28), "cifar10": (3, 32), "svhn": (3, 32),
            "synthetic": (1, 28), "synthetic-rgb": (3, 28)}
_IDX = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}  # torchvision's folder names
_IDX_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
CLASSES = {"fashion-mnist": 10, "mnist": 10, "cifar10": 10, "svhn": 10, "synthetic": 4, "synthetic-rgb": 4}
VALIDATION_FRACTION, VALIDATION_SEED = 1 / 12, 0   # of each class: 500 of Fashion-MNIST's 6,000


def cache_dir() -> Path:
    """Where computed files are kept between runs: $XDG_CACHE_HOME/gen-models, or ~/.cache/gen-models."""
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "gen-models"


def check_dataset(name: str, names: tuple = (*DATASETS, "folder", "mvtec")) -> None:
    if name not in names:
        raise UserError(f"unknown --dataset {name}; choose one of {', '.join(names)}")


def dataset_channels(dataset: str) -> int:
    """Image channels of a dataset, known without loading it (so --sample can build the model)."""
    return DATASETS[dataset][0] if dataset in DATASETS else 3


def _read_idx(path: Path) -> torch.Tensor:
    """An (optionally gzipped) idx file: images (idx3) as N x 1 x H x W, labels (idx1) as N, uint8."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path} is unreadable or truncated ({type(e).__name__}: {e}); delete it and fetch "
                        f"it again") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else 0
    if magic not in (0x0801, 0x0803):
        raise UserError(f"{path} is not an idx file; delete it and let the dataset be fetched again")
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(magic & 0xFF)]
    start = 4 + 4 * len(dims)
    if len(raw) != start + math.prod(dims):
        raise UserError(f"{path} is truncated ({len(raw)} bytes for shape {dims}); fetch it again")
    data = torch.frombuffer(bytearray(raw[start:]), dtype=torch.uint8)
    return data.view(dims[0], 1, *dims[1:]) if len(dims) == 3 else data.view(dims[0])


def _find_idx(dataset: str, root: Path, stem: str) -> Path | None:
    debian = [FASHION_MNIST_DEBIAN] if dataset == "fashion-mnist" else []
    places = [root, root / dataset, root / _IDX[dataset] / "raw", *debian]
    return next((place / name for place in places for name in (stem, stem + ".gz") if (place / name).is_file()), None)


def _download_hint(dataset: str, root: Path) -> str:
    hint = "apt-get install dataset-fashion-mnist, or " if dataset == "fashion-mnist" else ""
    return (f"dataset {dataset} not found under {root} and could not be downloaded: {hint}"
            f"put it under --data-root (torchvision's layout), or run once on a machine with network access")


def _torchvision(dataset: str, root: Path, train: bool):
    import torchvision.datasets as tvd
    make = {"fashion-mnist": tvd.FashionMNIST, "mnist": tvd.MNIST, "cifar10": tvd.CIFAR10, "svhn": tvd.SVHN}[dataset]
    split = {"split": "train" if train else "test"} if dataset == "svhn" else {"train": train}
    try:
        return make(root, download=True, **split)
    except Exception as e:  # urllib, ssl, socket and checksum errors all mean "not here"
        raise UserError(f"{_download_hint(dataset, root)} ({type(e).__name__})") from None


@contextlib.contextmanager
def _opened(path: Path, mode: str = "RGB"):
    """The PIL image at ``path`` in ``mode``; a file PIL cannot read (or decode) is a UserError that names it."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            yield im.convert(mode)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError... on a bad file
        raise UserError(f"cannot read the image {path} ({type(e).__name__}: {e}); fix or remove it") from None


def _decode(path: Path, size: int) -> torch.Tensor:
    """One image as RGB, resized so its short side is ``size``, then center-cropped: 3 x size x size."""
    from PIL import Image
    with _opened(path) as im:
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        return torch.from_numpy(np.array(im.crop((left, top, left + size, top + size)))).permute(2, 0, 1)


def _load_folder(root: Path, size: int, decode: Callable = None, channels: int = 3, kind: str = "") -> torch.Tensor:
    """Every image below ``root`` as ``decode(path, size)``, decoded once and cached until the files change."""
    decode = decode or _decode
    if not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder; --dataset folder reads every image below it")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise UserError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) below {root}")
    listing = "\n".join(f"{p.relative_to(root)}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}" for p in paths)
    key = hashlib.sha256(f"{size}\n{listing}".encode()).hexdigest()[:16]
    name = f".cache-{kind}{size}px-{key}.pt"
    # beside the images, or in the user's cache folder where the data folder is read-only
    folders = (root, cache_dir() / "folders" / hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16])
    for folder in folders:
        with contextlib.suppress(Exception):   # a missing or damaged cache is decoded again below
            images = torch.load(folder / name, weights_only=True)
            if images.shape == (len(paths), channels, size, size):
                return images
    out = torch.empty(len(paths), channels, size, size, dtype=torch.uint8)
    t0 = t_print = time.time()
    print(f"decoding {len(paths)} images below {root} (once: they are cached)", flush=True)
    pool = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # PIL decodes without the GIL
    try:
        chunk = 256  # a stop signal waits for one chunk at most
        for i in range(0, len(paths), chunk):
            out[i:i + chunk] = torch.stack(list(pool.map(decode, paths[i:i + chunk], [size] * chunk)))
            if time.time() - t_print > 5:
                t_print = time.time()
                done = min(i + chunk, len(paths))
                eta = (t_print - t0) / done * (len(paths) - done)
                print(f"  {done}/{len(paths)} images ({100 * done / len(paths):.0f}%), ETA {eta:.0f} s", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.glob(f".cache-{kind}{size}px-*.pt*"):  # stale caches
                old.unlink()
            save_checkpoint(out, folder / name)
            return out
        except OSError as e:
            warn(f"cannot cache the decoded images in {folder} ({e.strerror})")
    return out


def synthetic_images(n: int = 256, channels: int = 1, size: int = 28, seed: int = 0, labels: bool = False):
    """Tiny deterministic dataset for tests: a bright disk per image; its label is the disk's quadrant, 0 to 3."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    center = torch.rand(n, 2, 1, 1, generator=g) * size * 0.6 + size * 0.2
    radius = torch.rand(n, 1, 1, generator=g) * size * 0.2 + size * 0.1
    inside = ((yy - center[:, 0]) ** 2 + (xx - center[:, 1]) ** 2 <= radius ** 2).float()
    tint = torch.rand(n, channels, 1, 1, generator=g) * 0.5 + 0.5
    images = (inside[:, None] * tint * 255).round().to(torch.uint8)
    if not labels:
        return images
    quadrant = (center[:, 0, 0, 0] >= size / 2).long() * 2 + (center[:, 1, 0, 0] >= size / 2).long()
    return images, quadrant


def resize_uint8(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Bilinear (antialiased) resize of a uint8 N x C x H x W tensor, done once at load time."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = torch.empty(*images.shape[:2], size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        x = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out[i:i + chunk] = x.round().clamp(0, 255).to(torch.uint8)
    return out


def load_images(dataset: str, data_root: str, image_size: int | None = None, split: str = "train",
                labels: bool = False):
    """A split (train or test) as uint8 N x C x S x S, S = ``image_size`` or native; ``labels``: (images, labels)."""
    check_dataset(dataset)
    if split not in ("train", "test"):
        raise UserError(f"split {split!r}: use train or test")
    root, train = Path(data_root).expanduser(), split == "train"
    if dataset == "folder":
        if not train or labels:
            raise UserError("--dataset folder has no test split and no labels: use a built-in dataset")
        return _load_folder(root, image_size or 64)
    if dataset == "mvtec":   # one category of MVTec AD as it is: train/good, test/good and test/<defect type>
        folders = [root / "train" / "good"] if train else sorted(p for p in (root / "test").glob("*") if p.is_dir())
        if not folders or not all(f.is_dir() for f in folders) or not train and "good" not in [f.name for f in folders]:
            raise UserError(f"--data-root {root} is not an MVTec AD category: it needs train/good/ and test/good/, "
                            f"test/<defect type>/ (the layout of the mvtec_anomaly_detection archive)")
        folders.sort(key=lambda f: f.name != "good")   # label 0: good; 1, 2...: the defect types by name
        parts = [_load_folder(f, image_size or 256) for f in folders]
        images, y = torch.cat(parts), torch.cat([torch.full((len(p),), k) for k, p in enumerate(parts)])
        return (images, y) if labels else images
    if dataset.startswith("synthetic"):
        channels, size = DATASETS[dataset]
        images, y = synthetic_images(256 if train else 64, channels, image_size or size, seed=0 if train else 1,
                                     labels=True)
    elif dataset in _IDX:
        stems = _IDX_STEMS[split][:2 if labels else 1]
        found = _find_idx(dataset, root, stems[0])
        images = _read_idx(found) if found else None            # a corrupt file is named before any download
        if any(_find_idx(dataset, root, s) is None for s in stems):
            _torchvision(dataset, root, train)
        paths = [_find_idx(dataset, root, s) for s in stems]
        if None in paths:
            raise UserError(_download_hint(dataset, root))
        if paths[0].parent == FASHION_MNIST_DEBIAN and os.environ.get("RANK", "0") == "0":
            print(f"{dataset} {split}: read from {FASHION_MNIST_DEBIAN} (Debian's dataset-fashion-mnist); --data-root "
                  f"{data_root} has none", flush=True)
        images = images if found == paths[0] else _read_idx(paths[0])
        y = _read_idx(paths[1]) if labels else None
    else:
        ds = _torchvision(dataset, root, train)
        if dataset == "cifar10":
            images, y = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
        else:
            images, y = torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
    images = resize_uint8(images, image_size or DATASETS[dataset][1])
    return (images, y.long()) if labels else images


def validation_mask(labels: torch.Tensor) -> torch.Tensor:
    """The training images held out for validation: VALIDATION_FRACTION of each class, drawn with a fixed seed."""
    g, held = torch.Generator().manual_seed(VALIDATION_SEED), torch.zeros(len(labels), dtype=torch.bool)
    for c in range(int(labels.max()) + 1):
        members = (labels == c).nonzero().flatten()
        held[members[torch.randperm(len(members), generator=g)[:round(len(members) * VALIDATION_FRACTION)]]] = True
    return held


def class_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """An N-per-class subset: per class, the first N of a permutation seeded by (seed, class) of its images outside
    the validation hold-out. The same (N, seed) gives the same images; a larger N contains them."""
    pool, chosen = ~validation_mask(labels), []
    for c in range(int(labels.max()) + 1):
        members = (pool & (labels == c)).nonzero().flatten()
        if len(members) < per_class:
            raise UserError(f"--per-class {per_class}: class {c} has {len(members)} training images outside the "
                            f"validation hold-out")
        g = torch.Generator().manual_seed(seed * 1_000_003 + c)
        chosen.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    return torch.cat(chosen).sort().values


def training_set(cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) a run trains on: --dataset's train split at --image-size, or its --per-class subset,
    or its --only-class classes; with --only-class and on MVTec AD, without the validation hold-out (anomaly.py
    sets its thresholds on it)."""
    size, only = getattr(cfg, "image_size", 0) or None, tuple(getattr(cfg, "only_class", ()))
    if cfg.dataset in ("folder", "mvtec") and (getattr(cfg, "per_class", 0) or only):
        raise UserError(f"--per-class, --only-class: --dataset {cfg.dataset}'s training images have no classes")
    if cfg.dataset == "folder":
        return load_images(cfg.dataset, cfg.data_root, size), None
    images, labels = load_images(cfg.dataset, cfg.data_root, size, labels=True)
    if only and not set(only) <= set(range(int(labels.max()) + 1)):
        raise UserError(f"--only-class {' '.join(map(str, only))}: {cfg.dataset} has classes 0 to {int(labels.max())}")
    keep = torch.ones(len(labels), dtype=torch.bool)
    if getattr(cfg, "per_class", 0):
        keep = torch.zeros_like(keep).index_fill_(0, class_subset(labels, cfg.per_class, cfg.subset_seed), True)
    if only or cfg.dataset == "mvtec":
        keep &= torch.isin(labels, torch.tensor(only or (0,))) & ~validation_mask(labels)
    return images[keep], labels[keep]


def score_images(cfg, images: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """--score's uint8 images and their labels (None where unknown): a split of the run's dataset (train, test, or
    validation: the hold-out no --per-class or --only-class run trains on) or an .npz (key images; labels if any)."""
    size = getattr(cfg, "image_size", 0) or None
    if images in ("train", "test", "validation"):
        x, y = load_images(cfg.dataset, cfg.data_root, size, split="test" if images == "test" else "train",
                           labels=True)
        return (x[validation_mask(y)], y[validation_mask(y)]) if images == "validation" else (x, y)
    try:
        with np.load(images) as npz:
            x, y = torch.from_numpy(npz["images"]), npz["labels"] if "labels" in npz.files else None
    except (OSError, KeyError, ValueError) as e:
        raise UserError(f"--score {images}: give train, test, validation or an .npz of images ({e})") from None
    x = x.permute(0, 3, 1, 2) if x.shape[-1] in (1, 3) else x
    return resize_uint8(x.contiguous(), size or x.shape[-1]), None if y is None else torch.as_tensor(y).long()


def write_scores(run: RunFolder, scores: dict[str, torch.Tensor], labels: torch.Tensor | None) -> Path:
    """--score's CSV (--score-out, default <out>/scores-<IMAGES>.csv): index, label where known, one column per score
    (higher = more anomalous), written atomically."""
    path = Path(run.cfg.score_out or run.out / f"scores-{Path(run.cfg.score).stem}.csv")
    n = len(next(iter(scores.values())))
    rows = zip(range(n), *(v.tolist() for v in scores.values()))
    with _replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", *(["label"] if labels is not None else []), *scores])
        for i, *values in rows:
            writer.writerow([i, *([int(labels[i])] if labels is not None else []), *(f"{v:.6g}" for v in values)])
    print(f"wrote {n} images' scores ({', '.join(scores)}) to {path}", flush=True)
    return path


# ---- Image-to-image translation: aligned pairs (pix2pix) and two unaligned domains (CycleGAN) ----
# name -> channels of each side: the official formats under --data-root, offline demos, and tests' synthetic data
PAIRED_DATASETS = {"edges2fashion": 1, "aligned": 3, "synthetic-pairs": 1}
UNPAIRED_DATASETS = {"sneaker2boot": 1, "unaligned": 3, "synthetic-unpaired": 1}
DEMO_SIZE = 32               # the demos' images: Fashion-MNIST's 28 x 28 with 2 background pixels on each side
SNEAKER, ANKLE_BOOT = 7, 9   # Fashion-MNIST's labels of sneaker2boot's domains A and B
EDGE_THRESHOLD = 1.0         # edges2fashion: Sobel gradient magnitude (pixels in [0, 1]) that makes an edge
ALIGNED_HINT = ("the aligned format is one image per pair, A and B side by side, in train/ (and val/, test/), as "
                "in the official pix2pix datasets (their datasets/download_pix2pix_dataset.sh)")
UNALIGNED_HINT = ("the unaligned format is two folders of images, trainA/ and trainB/ (and testA/, testB/), as in the "
                  "official CycleGAN datasets (their datasets/download_cyclegan_dataset.sh)")


def edge_map(images: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """edges2fashion's input, black lines on white: edges where the Sobel gradient magnitude exceeds ``threshold``."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([kx, kx.t()])[:, None]                                    # 2 x 1 x 3 x 3
    out = torch.empty_like(images)
    for i in range(0, len(images), 4096):
        x = images[i:i + 4096].float().div(255).flatten(0, 1)[:, None]             # one channel at a time
        g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels)
        edge = g.pow(2).sum(1).sqrt() > threshold
        out[i:i + 4096] = torch.where(edge, 0, 255).to(torch.uint8).view(-1, *images.shape[1:])
    return out


def _demo_images(data_root: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (offline from Debian's dataset-fashion-mnist) at DEMO_SIZE: padded, not resized."""
    images, labels = load_images("fashion-mnist", data_root, split=split, labels=True)
    pad = (DEMO_SIZE - images.shape[-1]) // 2
    return F.pad(images, (pad, pad, pad, pad)), labels


def _split_folder(data_root: str, name: str, hint: str) -> Path:
    folder = Path(data_root).expanduser() / name
    if not folder.is_dir():
        raise UserError(f"--data-root {data_root} has no {name}/ folder: {hint}")
    return folder


def _decode_pair(path: Path, size: int) -> torch.Tensor:
    """An aligned A|B image (pix2pix's format) as 6 x size x size: halves A and B, each resized (bicubic)."""
    from PIL import Image
    with _opened(path) as im:
        half = im.width // 2
        halves = [im.crop(box).resize((size, size), Image.BICUBIC)
                  for box in ((0, 0, half, im.height), (half, 0, im.width, im.height))]
        return torch.from_numpy(np.concatenate([np.array(h) for h in halves], axis=2)).permute(2, 0, 1)


def _decode_resized(path: Path, size: int, mode: str = "RGB") -> torch.Tensor:
    """One image resized to size x size, aspect ratio not kept (bicubic, as the official Resize)."""
    from PIL import Image
    with _opened(path, mode) as im:
        array = np.array(im.resize((size, size), Image.BICUBIC))
        return torch.from_numpy(array).view(size, size, -1).permute(2, 0, 1)


def load_pairs(dataset: str, data_root: str, size: int, split: str = "train") -> torch.Tensor:
    """pix2pix's pairs as uint8 N x 2C x size x size, A's C channels then B's: "aligned" reads <data_root>/<split>/,
    the other datasets pair edge maps (A) with their images (B)."""
    check_dataset(dataset, tuple(PAIRED_DATASETS))
    if dataset == "aligned":
        folder = _split_folder(data_root, split, ALIGNED_HINT)
        return _load_folder(folder, size, decode=_decode_pair, channels=6, kind="pairs-")
    if split not in ("train", "test"):
        raise UserError(f"--dataset {dataset} has the splits train and test, not {split}")
    images = (_demo_images(data_root, split)[0] if dataset == "edges2fashion"
              else load_images("synthetic", data_root, DEMO_SIZE, split=split))
    return resize_uint8(torch.cat([edge_map(images), images], 1), size)


def load_domains(dataset: str, data_root: str, size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """CycleGAN's unpaired domains (A, B) as uint8 N x C x size x size: "unaligned" reads <data_root>/<split>A/ and
    <split>B/, sneaker2boot takes Fashion-MNIST's sneakers and ankle boots, the synthetic ones disks and negatives."""
    check_dataset(dataset, tuple(UNPAIRED_DATASETS))
    if split not in ("train", "test"):
        raise UserError(f"--dataset {dataset} has the splits train and test, not {split}")
    if dataset == "unaligned":
        folders = [_split_folder(data_root, split + side, UNALIGNED_HINT) for side in "AB"]
        return tuple(_load_folder(f, size, decode=_decode_resized, kind="resized-") for f in folders)
    if dataset == "sneaker2boot":
        images, labels = _demo_images(data_root, split)
        a, b = images[labels == SNEAKER], images[labels == ANKLE_BOOT]
    else:
        a = load_images("synthetic", data_root, DEMO_SIZE, split=split)
        b = 255 - synthetic_images(len(a), 1, DEMO_SIZE, seed=2 if split == "train" else 3)
    return resize_uint8(a, size), resize_uint8(b, size)


def has_split(dataset: str, data_root: str, split: str) -> bool:
    """Whether a translation dataset has this split (the official folders may lack val/ or testA/)."""
    if dataset == "aligned":
        return (Path(data_root).expanduser() / split).is_dir()
    if dataset == "unaligned":
        return all((Path(data_root).expanduser() / (split + side)).is_dir() for side in "AB")
    return split in ("train", "test")


def read_images(folder: str, size: int, channels: int, flag: str = "--translate") -> tuple[torch.Tensor, list[Path]]:
    """--translate's inputs: every image directly in ``folder``, by name, resized to size x size, and their paths."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{flag} {folder} is not a folder; give a folder of images")
    paths = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not paths:
        raise UserError(f"{flag} {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    for before, path in zip(paths, paths[1:]):   # sorted: a name's variants are neighbours
        if before.stem == path.stem:
            raise UserError(f"{flag} {folder} holds {before.name} and {path.name}, which would both be written as "
                            f"{path.stem}.png: rename one")
    mode = "L" if channels == 1 else "RGB"
    with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        images = list(pool.map(lambda p: _decode_resized(p, size, mode), paths))
    return torch.stack(images), paths


def write_named(images: torch.Tensor, paths: list[Path], folder: Path,
                value_range: tuple[float, float] = (-1.0, 1.0)) -> None:
    """Write image i as <folder>/<stem of paths[i]>.png (replacing a file of that name, never another)."""
    for image, path in zip(to_uint8(images, value_range).permute(0, 2, 3, 1).numpy(), paths):
        target = folder / f"{path.stem}.png"
        write_png(image, target, target.with_name(f".{target.name}.part"))


def write_png(image: np.ndarray, path: Path, part: Path) -> None:
    """An H x W x C uint8 image as the PNG ``path``, written to ``part`` first: never half an image at ``path``."""
    from PIL import Image
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(part, format="PNG")
    os.replace(part, path)


def prepare_folder(path: str | Path, inputs: str | Path, flag: str) -> Path:
    """An output folder, created if needed and checked writable before any work; never the input folder."""
    path = Path(path).expanduser()
    if path.resolve() == Path(inputs).expanduser().resolve():
        raise UserError(f"{flag} {path} is the input folder: give another folder (its images would be replaced)")
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is an existing file; give a folder")
    make_writable(path, flag)
    return path


def make_writable(folder: Path, flag: str) -> None:
    """Create ``folder`` if needed and check, by writing a probe file, that it is writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag}: cannot write to {folder} ({e.strerror}); choose a writable place") from None


class Batches:
    """Minibatches drawn without replacement from a uint8 tensor on the device; epoch e's order is seeded by (seed, e).
    ``batch_size`` is the global batch, of which each rank takes its slice; an epoch's incomplete last batch is dropped.
    The jitter ``crop`` and ``hflip`` (pix2pix, CycleGAN) is seeded by (seed, epoch, index), alike on all channels."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, device: torch.device,
                 value_range: tuple[float, float] = (-1.0, 1.0), rank: int = 0, world: int = 1,
                 memory_format=torch.contiguous_format, crop: int = 0, hflip: bool = False,
                 labels: torch.Tensor | None = None):
        if len(images) < batch_size:
            raise UserError(f"--batch-size {batch_size} is larger than the dataset ({len(images)} images)")
        if batch_size % world:
            raise UserError(f"--batch-size {batch_size} is the global batch: it must divide among the {world} "
                            f"processes (e.g. --batch-size {world * -(-batch_size // world)})")
        if crop > min(images.shape[-2:]):
            raise UserError(f"a crop of {crop} pixels does not fit in images of {tuple(images.shape[-2:])}")
        if device.type == "cuda":   # one line, not an out-of-memory error (edges2shoes at 286 x 286: 24.5 GB)
            free = torch.cuda.mem_get_info(device)[0]
            if images.nbytes > free // 2:
                raise UserError(f"the training images take {images.nbytes / 2**30:.1f} GiB, kept on the GPU: more "
                                f"than half of its {free / 2**30:.1f} GiB free; use a GPU with more memory, a smaller "
                                f"--load-size or --image-size, or fewer images")
        self.images = images.to(device)
        self.labels = labels.to(device) if labels is not None else None
        self.global_batch, self.seed, self.device, self.rank = batch_size, seed, device, rank
        self.batch_size = batch_size // world  # this process's share of every global batch
        self.low, self.high, self.memory_format = *value_range, memory_format
        self.crop, self.hflip, self.batches_per_epoch = crop, hflip, len(images) // batch_size
        self.epoch, self.index, self._order = 0, 0, None

    def next(self):
        """The next batch as floats in ``value_range``, N x C x H x W on the device (and its labels)."""
        if self.index == self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._order = torch.randperm(len(self.images), generator=g).to(self.device)
        start = self.index * self.global_batch + self.rank * self.batch_size
        idx = self._order[start:start + self.batch_size]
        x = self._jittered(idx) if self.crop or self.hflip else self.images[idx]
        self.index += 1
        x = (x.float() * ((self.high - self.low) / 255.0) + self.low).contiguous(memory_format=self.memory_format)
        return x if self.labels is None else (x, self.labels[idx])

    def _jittered(self, idx: torch.Tensor) -> torch.Tensor:
        """images[idx], each cropped at its random place and maybe mirrored: one gather, uint8."""
        _, c, h, w = self.images.shape
        size_h, size_w = (self.crop, self.crop) if self.crop else (h, w)
        seed = int(np.random.SeedSequence([self.seed, self.epoch, self.index]).generate_state(1)[0])
        g = torch.Generator().manual_seed(seed)
        top = torch.randint(0, h - size_h + 1, (self.global_batch,), generator=g)
        left = torch.randint(0, w - size_w + 1, (self.global_batch,), generator=g)
        flip = torch.rand(self.global_batch, generator=g) < 0.5 if self.hflip else torch.zeros(self.global_batch) > 0
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        rows = top[mine, None] + torch.arange(size_h)                                  # b x size_h
        cols = left[mine, None] + torch.where(flip[mine, None], torch.arange(size_w - 1, -1, -1), torch.arange(size_w))
        rows, cols = rows.to(self.device, non_blocking=True), cols.to(self.device, non_blocking=True)
        channels = torch.arange(c, device=self.device)
        return self.images[idx[:, None, None, None], channels[None, :, None, None], rows[:, None, :, None],
                           cols[:, None, None, :]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None
