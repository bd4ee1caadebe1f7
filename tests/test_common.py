"""common.py: data order across resume, atomic checkpoints, safe loading, config merge, lock, NaN stop."""
import fcntl
import os
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import common
from common import arg
from conftest import OFFLINE_ENV, run_script

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


@dataclass
class Toy(common.RunConfig):
    batch_size: int = arg(4, "")
    lr: float = arg(0.1, "")
    width: int = arg(3, "")


def toy_run(tmp_path, argv):
    cfg = common.parse_config(Toy, ["--dataset", "synthetic", "--out", str(tmp_path / "run"), *argv])
    return common.Run(cfg, "toy")


def test_resume_takes_unspecified_fields_from_the_checkpoint(tmp_path):
    run = toy_run(tmp_path, ["--width", "5", "--steps", "2"])
    model = torch.nn.Linear(run.cfg.width, 1)
    run.track({"m": model}, {})
    run.restore()
    run.checkpoint(2)
    run._lock.close()
    resumed = toy_run(tmp_path, ["--resume", "--steps", "4", "--lr", "0.1"])
    assert resumed.cfg.width == 5 and resumed.cfg.steps == 4
    resumed._lock.close()
    with pytest.raises(common.UserError, match=r"width 5 -> 6, .*lr 0.1 -> 0.2|lr 0.1 -> 0.2, width 5 -> 6"):
        toy_run(tmp_path, ["--resume", "--width", "6", "--lr", "0.2"])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    run = toy_run(tmp_path, ["--steps", "10", "--log-every", "100", "--ckpt-every", "2"])
    model = torch.nn.Linear(3, 1)
    run.track({"m": model}, {})
    run.restore()
    run.end_step(1, {"loss": torch.tensor(1.0)})
    run.end_step(2, {"loss": torch.tensor(1.0)})
    good = (tmp_path / "run" / "ckpt.pt").read_bytes()
    run.end_step(3, {"loss": torch.tensor(float("nan"))})
    with pytest.raises(common.UserError, match=r"loss became nan .*step 2"):
        run.end_step(4, {"loss": torch.tensor(1.0)})
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    with pytest.raises(common.UserError, match="weights of m"):
        run.checkpoint(5)
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == good


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
