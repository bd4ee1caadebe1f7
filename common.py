"""Data and plumbing shared by every model script: no model, no loss, nothing a reader of a paper needs.

What lives here, in the order a training script calls it:

    cfg = common.parse_config(Config)        # dataclass -> argparse, --help shows every field
    run = common.Run(cfg, "dcgan")           # run folder, lock, resume/--sample config merge, signals
    images = common.load_images(cfg.dataset, cfg.data_root, cfg.image_size)   # uint8 N x C x H x W
    batches = common.Batches(images, cfg.batch_size, cfg.seed, run.device)  # seeded epochs, resumable
    start, extra = run.restore(models, optimizers, batches)   # (0, None) on a fresh run
    while step < cfg.steps and not run.stop_requested:
        ...one training step...; step += 1
        run.end_step(step, losses)           # averages, metrics.csv, sample grid, checkpoint
    run.finish(step)

Checkpoint format (one dict, loaded with ``weights_only=True``): ``script``, ``format``, ``step``,
``config`` (the resolved config), ``models`` / ``optimizers`` (name -> state_dict), ``data`` (epoch and
index in that epoch's order), ``rng`` (python, numpy, torch CPU and CUDA states) and ``extra`` (the
script's own tensors, e.g. the fixed sample noise).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import gzip
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

CHECKPOINT_FORMAT = 1
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


class UserError(Exception):
    """A problem the user can fix (bad flag, missing data, foreign checkpoint): printed as one line."""


def run_main(main: Callable[[], None]) -> None:
    """Run ``main`` and turn a UserError into one line on stderr and exit code 2, not a traceback."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------
# Config: one dataclass per script, fields with help text, turned into argparse flags
# ----------------------------------------------------------------------------------------------
def arg(default, help: str, run: bool = False):
    """A config field with its --help line. ``run=True`` marks a field that may change when a run is
    resumed because it does not change what is computed (where to write, how often to log...)."""
    return dataclasses.field(default=default, metadata={"help": help, "run": run})


@dataclasses.dataclass
class RunConfig:
    """Run and plumbing flags shared by every script; each script subclasses it with the paper's values."""
    dataset: str = arg("fashion-mnist", "fashion-mnist | mnist | cifar10 | svhn | folder | synthetic | synthetic-rgb")
    data_root: str = arg("data", "where datasets are read from (and downloaded to, where the network allows)", run=True)
    out: str = arg("", "run folder (default runs/<script>-<dataset>)", run=True)
    resume: str | None = arg(None, "continue from --out's checkpoint if there is one, or from PATH", run=True)
    steps: int = arg(10_000, "optimizer steps of the main model", run=True)
    seed: int = arg(0, "seed of every random number generator")
    device: str = arg("auto", "auto (cuda, else mps, else cpu) | cpu | cuda | cuda:1 | mps", run=True)
    log_every: int = arg(100, "print and append to metrics.csv every N steps", run=True)
    sample_every: int = arg(1000, "write a sample grid from the fixed noise every N steps", run=True)
    ckpt_every: int = arg(1000, "write ckpt.pt every N steps (also at the end and on SIGTERM/SIGUSR1)", run=True)
    sample: int = arg(0, "no training: load the checkpoint and write N generated images to --sample-out", run=True)
    sample_out: str = arg("", "folder of PNGs, or a .npz of uint8 images (default <out>/generated)", run=True)


def run_fields(cfg) -> set[str]:
    """Names of the fields marked run=True: they may differ between a run and its resumption."""
    return {f.name for f in dataclasses.fields(cfg) if f.metadata.get("run")}


def parse_config(cls, argv: list[str] | None = None):
    """Build argparse from the dataclass ``cls``; returns the config with ``cfg.given`` = flags typed."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help = f"{f.metadata.get('help', '')} (default: {default})"
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const="auto", metavar="PATH", help=help)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help)
        elif f.type in ("float", float):
            parser.add_argument(flag, type=float, help=help)
        elif f.type in ("int", int):
            parser.add_argument(flag, type=int, help=help)
        else:
            parser.add_argument(flag, type=str, help=help)
    given = vars(parser.parse_args(argv))
    cfg = cls(**given)
    cfg.given = set(given)
    return cfg


# ----------------------------------------------------------------------------------------------
# Data: whole datasets held in memory as one uint8 tensor, batched by indexing
# ----------------------------------------------------------------------------------------------
_IDX_FILES = {"fashion-mnist": ("FashionMNIST", "train-images-idx3-ubyte"),
              "mnist": ("MNIST", "train-images-idx3-ubyte")}


def _read_idx_images(path: Path) -> torch.Tensor:
    """Read an (optionally gzipped) idx3 file of uint8 images as N x 1 x H x W."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 16 or int.from_bytes(raw[:4], "big") != 0x0803:
        raise UserError(f"{path} is not an idx3 image file; delete it and let the dataset be fetched again")
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    if len(raw) != 16 + n * h * w:
        raise UserError(f"{path} is truncated ({len(raw)} bytes for {n} images of {h}x{w}); fetch it again")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).view(n, 1, h, w)


def _find_idx(dataset: str, root: Path) -> Path | None:
    folder, stem = _IDX_FILES[dataset]
    places = [root, root / dataset, root / folder / "raw"]
    if dataset == "fashion-mnist":
        places.append(FASHION_MNIST_DEBIAN)
    for place in places:
        for name in (stem, stem + ".gz"):
            if (place / name).is_file():
                return place / name
    return None


def _download_hint(dataset: str, root: Path) -> str:
    hint = {"fashion-mnist": "apt-get install dataset-fashion-mnist, or ",
            "mnist": "", "cifar10": "", "svhn": ""}[dataset]
    return (f"dataset {dataset} not found under {root} and could not be downloaded: {hint}"
            f"put it under --data-root (torchvision's layout), or run once on a machine with network access")


def _torchvision_download(dataset: str, root: Path):
    import torchvision.datasets as tvd
    make = {"fashion-mnist": lambda: tvd.FashionMNIST(root, train=True, download=True),
            "mnist": lambda: tvd.MNIST(root, train=True, download=True),
            "cifar10": lambda: tvd.CIFAR10(root, train=True, download=True),
            "svhn": lambda: tvd.SVHN(root, split="train", download=True)}[dataset]
    try:
        return make()
    except Exception as e:  # urllib, ssl, socket and checksum errors all mean "not here"
        raise UserError(f"{_download_hint(dataset, root)} ({type(e).__name__})") from None


def _load_folder(root: Path, size: int) -> torch.Tensor:
    """Every image below ``root``, resized so the short side is ``size`` and center-cropped, as RGB."""
    from PIL import Image
    if not root.is_dir():
        raise UserError(f"--data-root {root} is not a folder; --dataset folder reads every image below it")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})
    if not paths:
        raise UserError(f"no images (png, jpg, bmp, webp) below {root}")
    out = torch.empty(len(paths), 3, size, size, dtype=torch.uint8)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
            out[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1)
    return out


def synthetic_images(n: int = 256, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Tiny deterministic dataset for tests: one bright disk per image at a random place, radius, tint."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    center = torch.rand(n, 2, 1, 1, generator=g) * size * 0.6 + size * 0.2
    radius = torch.rand(n, 1, 1, generator=g) * size * 0.2 + size * 0.1
    inside = ((yy - center[:, 0]) ** 2 + (xx - center[:, 1]) ** 2 <= radius ** 2).float()
    tint = torch.rand(n, channels, 1, 1, generator=g) * 0.5 + 0.5
    return (inside[:, None] * tint * 255).round().to(torch.uint8)


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


def dataset_channels(dataset: str) -> int:
    """Image channels of a dataset, known without loading it (so --sample can build the model)."""
    return 1 if dataset in ("fashion-mnist", "mnist", "synthetic") else 3


def load_images(dataset: str, data_root: str, image_size: int) -> torch.Tensor:
    """The training split of ``dataset`` as one uint8 tensor N x C x image_size x image_size."""
    root = Path(data_root).expanduser()
    if dataset in ("synthetic", "synthetic-rgb"):
        images = synthetic_images(channels=3 if dataset == "synthetic-rgb" else 1, size=image_size)
    elif dataset in _IDX_FILES:
        path = _find_idx(dataset, root)
        if path is None:
            _torchvision_download(dataset, root)
            path = _find_idx(dataset, root)
        images = _read_idx_images(path)
    elif dataset == "cifar10":
        images = torch.from_numpy(_torchvision_download(dataset, root).data).permute(0, 3, 1, 2).contiguous()
    elif dataset == "svhn":
        images = torch.from_numpy(_torchvision_download(dataset, root).data)
    elif dataset == "folder":
        return _load_folder(root, image_size)
    else:
        raise UserError(f"unknown --dataset {dataset}; choose one of fashion-mnist, mnist, cifar10, svhn, "
                        f"folder, synthetic, synthetic-rgb")
    return resize_uint8(images, image_size)


class Batches:
    """Minibatches drawn without replacement from a uint8 tensor kept on the device.

    Epoch e visits the images in the order ``randperm(N)`` seeded by (seed, e), so the position in the
    data is just (epoch, index): that pair is all a checkpoint needs to continue the same order.
    The last incomplete batch of an epoch is dropped (constant batch size for BatchNorm).
    """

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int, device: torch.device,
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        if len(images) < batch_size:
            raise UserError(f"--batch-size {batch_size} is larger than the dataset ({len(images)} images)")
        self.images = images.to(device)
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.low, self.high = value_range
        self.epoch, self.index = 0, 0
        self.batches_per_epoch = len(images) // batch_size
        self._order = None

    def _epoch_order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.images), generator=g).to(self.device)

    def next(self) -> torch.Tensor:
        """The next batch as floats in ``value_range``, N x C x H x W on the device."""
        if self.index == self.batches_per_epoch:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._epoch_order()
        idx = self._order[self.index * self.batch_size:(self.index + 1) * self.batch_size]
        self.index += 1
        x = self.images[idx].float()
        return x * ((self.high - self.low) / 255.0) + self.low

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None


# ----------------------------------------------------------------------------------------------
# Images out: sample grids and --sample folders
# ----------------------------------------------------------------------------------------------
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


def save_images(batches, path: str | Path, value_range: tuple[float, float] = (-1.0, 1.0)) -> int:
    """Write generated images, batch by batch: one PNG each in a folder, or one .npz (key ``images``,
    uint8 N x H x W x C) when ``path`` ends in .npz. Returns how many were written."""
    from PIL import Image
    path = Path(path)
    as_npz = path.suffix == ".npz"
    (path.parent if as_npz else path).mkdir(parents=True, exist_ok=True)
    kept, n = [], 0
    for batch in batches:
        x = to_uint8(batch, value_range).permute(0, 2, 3, 1).numpy()
        if as_npz:
            kept.append(x)
        else:
            for image in x:
                Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(path / f"{n:06d}.png")
                n += 1
    if as_npz:
        images = np.concatenate(kept)
        np.savez(path, images=images)
        n = len(images)
    return n


# ----------------------------------------------------------------------------------------------
# Checkpoints: atomic save, safe load, RNG states
# ----------------------------------------------------------------------------------------------
def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write ``state`` to a temporary file beside ``path``, fsync it, then rename it over ``path``.

    ``os.replace`` is atomic on POSIX: a crash at any moment leaves either the old file or the new one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    if ckpt["script"] != script:
        raise UserError(f"{path} was written by {ckpt['script']}.py, not {script}.py: resume it with "
                        f"{ckpt['script']}.py, or use another --out")
    return ckpt


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "gauss": gauss}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but this machine has no CUDA device; use --device cpu")
    return device


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------
# The run: folder, lock, config merge, signals, logging, sampling and checkpoint cadence
# ----------------------------------------------------------------------------------------------
class Run:
    """Everything around the training step. Creating it:

    - resolves ``--out`` (default ``runs/<script>-<dataset>``), checks it is writable and locks it
      (a second process on the same folder stops at once instead of overwriting the first's checkpoint);
    - with ``--resume`` (or ``--sample``) loads the checkpoint, takes from it every config field not
      given on the command line, and refuses one given with another value (naming the fields);
    - seeds every generator, picks the device, writes ``args.json``, prints the config;
    - for training, makes SIGTERM, SIGUSR1 and SIGINT finish the current step, checkpoint and exit 0.
    """

    def __init__(self, cfg, script: str):
        self.cfg, self.script = cfg, script
        self.sampling = cfg.sample > 0
        cfg.out = cfg.out or f"runs/{script}-{cfg.dataset}"
        self.out = Path(cfg.out)
        self.ckpt_path = self.out / "ckpt.pt"
        self.ckpt = self._find_checkpoint()
        if self.ckpt is not None:
            self._merge_config(self.ckpt["config"])
        if self.sampling and self.ckpt is None:
            raise UserError(f"--sample needs a checkpoint: none at {self.ckpt_path}; train first or pass "
                            f"--resume PATH")
        self.device = pick_device(cfg.device)
        seed_everything(cfg.seed)
        self.stop_requested = False
        self.models, self.optimizers, self.batches, self.extra = {}, {}, None, {}
        self.sample_fn: Callable[[], torch.Tensor] | None = None
        self.sample_range = (-1.0, 1.0)
        if not self.sampling:
            self._open_folder()
            for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    # -- setup ---------------------------------------------------------------------------------
    def _find_checkpoint(self) -> dict | None:
        resume = self.cfg.resume
        if resume not in (None, "auto"):
            return load_checkpoint(resume, self.script)
        if (resume == "auto" or self.sampling) and self.ckpt_path.exists():
            return load_checkpoint(self.ckpt_path, self.script)
        if resume is None and not self.sampling and self.ckpt_path.exists():
            raise UserError(f"{self.ckpt_path} exists: pass --resume to continue it, or another --out")
        return None

    def _merge_config(self, saved: dict) -> None:
        fields, free = {f.name for f in dataclasses.fields(self.cfg)}, run_fields(self.cfg)
        if fields - free != set(saved) - free:
            raise UserError(f"the checkpoint's config has other fields than {self.script}.py's: it comes from "
                            f"another version of the script; use another --out")
        clashes = []
        for name in sorted(fields - free):
            mine = getattr(self.cfg, name)
            if name not in getattr(self.cfg, "given", set()):
                setattr(self.cfg, name, saved[name])
            elif mine != saved[name]:
                clashes.append(f"{name} {saved[name]!r} -> {mine!r}")
        if clashes:
            raise UserError(f"the checkpoint was trained with another config ({', '.join(clashes)}); drop those "
                            f"flags to continue it, or use another --out")

    def _open_folder(self) -> None:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "samples").mkdir(exist_ok=True)
            self._lock = open(self.out / ".lock", "a+")
        except OSError as e:
            raise UserError(f"cannot write to the run folder {self.out} ({e.strerror}); pass --out a "
                            f"writable folder") from None
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.seek(0)
            owner = self._lock.read().strip() or "?"
            raise UserError(f"run folder {self.out} is in use by another process (pid {owner}); wait for it "
                            f"to end or use another --out") from None
        self._lock.seek(0)
        self._lock.truncate()
        self._lock.write(str(os.getpid()))
        self._lock.flush()
        config = dataclasses.asdict(self.cfg)
        (self.out / "args.json").write_text(json.dumps(config, indent=2) + "\n")
        print(f"{self.script}: " + " ".join(f"{k}={v}" for k, v in config.items()), flush=True)

    def _on_signal(self, signum, frame) -> None:
        self.stop_requested = True

    # -- resume ----------------------------------------------------------------------------------
    def track(self, models: dict, optimizers: dict, batches: Batches | None = None,
              extra: dict | None = None, sample: Callable[[], torch.Tensor] | None = None,
              sample_range: tuple[float, float] = (-1.0, 1.0)) -> None:
        """Name what a checkpoint holds and how to draw the fixed-noise sample grid."""
        self.models, self.optimizers, self.batches = models, optimizers, batches
        self.extra = extra or {}
        self.sample_fn, self.sample_range = sample, sample_range

    def restore(self) -> int:
        """Load the checkpoint (if resuming) into what ``track`` named; returns the step to start from.

        Also rewinds metrics.csv to that step, so a resumed run's log has no duplicated rows.
        """
        step = 0
        if self.ckpt is not None:
            ck = self.ckpt
            for name, model in self.models.items():
                model.load_state_dict(ck["models"][name])
            if not self.sampling:
                for name, opt in self.optimizers.items():
                    opt.load_state_dict(ck["optimizers"][name])
                if self.batches is not None:
                    self.batches.load_state_dict(ck["data"])
                set_rng_state(ck["rng"])
            for name, tensor in self.extra.items():
                tensor.copy_(ck["extra"][name])
            step = int(ck["step"])
            self.ckpt = None  # free the CPU copy
        if not self.sampling:
            self._metrics_rewind(step)
            self.t0, self.t_last, self.step_last = time.time(), time.time(), step
            self.sums, self.count = {}, 0
            self.start_step = self.last_good = step
            if step >= self.cfg.steps:
                print(f"already done at step {step} (--steps {self.cfg.steps})", flush=True)
            else:
                print(f"training from step {step}" + (" (resumed)" if step else ""), flush=True)
        return step

    def _metrics_rewind(self, step: int) -> None:
        path = self.out / "metrics.csv"
        if path.exists():
            with open(path, newline="") as f:
                rows = list(csv.reader(f))
            keep = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= step]
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(keep)

    # -- the loop --------------------------------------------------------------------------------
    def end_step(self, step: int, losses: dict[str, torch.Tensor]) -> None:
        """After optimizer step ``step``: accumulate the losses (on the device, no host sync), and on
        schedule log their averages, draw the sample grid and write the checkpoint."""
        for k, v in losses.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1
        cfg = self.cfg
        last = step >= cfg.steps or self.stop_requested
        if step % cfg.log_every == 0 or last:
            self._log(step)
        if self.sample_fn is not None and step % cfg.sample_every == 0:
            self.save_samples(step)
        if step % cfg.ckpt_every == 0 or last:
            self.checkpoint(step)

    def _log(self, step: int) -> None:
        if self.count == 0:
            return
        means = {k: (v / self.count).item() for k, v in self.sums.items()}
        self.sums, self.count = {}, 0
        self._check_finite(means, step)
        now = time.time()
        rate = (step - self.step_last) * self.cfg.batch_size / max(now - self.t_last, 1e-9)
        self.t_last, self.step_last = now, step
        row = {"step": step, "time_s": round(now - self.t0, 2), "images_per_s": round(rate, 1),
               **{k: f"{v:.6g}" for k, v in means.items()}}
        path = self.out / "metrics.csv"
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
        print(f"step {step:>7d} | " + " | ".join(f"{k} {v}" for k, v in list(row.items())[1:]), flush=True)

    def _check_finite(self, values: dict[str, float], step: int) -> None:
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            raise UserError(f"{', '.join(bad)} became {values[bad[0]]} before step {step}: training diverged. "
                            f"The last good checkpoint (step {self.last_good}) is kept in {self.ckpt_path}; "
                            f"lower --lr or change --seed and --resume")

    def save_samples(self, step: int) -> None:
        """The fixed-noise grid, drawn with every model in eval mode and no gradient, so that drawing it
        changes nothing (no BatchNorm statistics, no RNG draw)."""
        modes = {name: m.training for name, m in self.models.items()}
        for m in self.models.values():
            m.eval()
        with torch.no_grad():
            images = self.sample_fn()
        for name, m in self.models.items():
            m.train(modes[name])
        save_grid(images, self.out / "samples" / f"{step:06d}.png", value_range=self.sample_range)

    def write_generated(self, batches, value_range: tuple[float, float] = (-1.0, 1.0)) -> Path:
        """--sample: write the generated batches to --sample-out (default <out>/generated)."""
        out = Path(self.cfg.sample_out or self.out / "generated")
        n = save_images(batches, out, value_range)
        print(f"wrote {n} images to {out}", flush=True)
        return out

    def checkpoint(self, step: int) -> None:
        """Write ckpt.pt atomically, after checking that no loss or weight went NaN/inf since the last
        good checkpoint: a diverged run never overwrites it."""
        pending = {k: (v / self.count).item() for k, v in self.sums.items()} if self.count else {}
        pending.update({f"weights of {k}": torch.stack([p.detach().float().sum() for p in m.parameters()])
                        .sum().item() for k, m in self.models.items()})
        self._check_finite(pending, step)
        state = {
            "script": self.script, "format": CHECKPOINT_FORMAT, "step": step,
            "config": dataclasses.asdict(self.cfg),
            "models": {k: m.state_dict() for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "data": self.batches.state_dict() if self.batches is not None else {},
            "rng": rng_state(),
            "extra": self.extra,
        }
        save_checkpoint(state, self.ckpt_path)
        self.last_good = step

    def finish(self, step: int) -> None:
        """After the loop: make sure the last step is saved (a signal may land after end_step's check)."""
        if step != self.last_good:
            self.checkpoint(step)
        if step < self.cfg.steps:
            print(f"checkpoint saved at step {step} (stop requested); continue with --resume", flush=True)
        elif step > self.start_step:
            print(f"done at step {step}: {self.ckpt_path}", flush=True)
