"""cyclegan.py: the official networks' parameter counts, the losses and the schedule against closed forms and the
official formula, the pool of past fakes and its exact restore, the unaligned data, and the shared CLI contract
(two data streams and the pools resumed exactly, signals, DDP, the batch-1 convention)."""
import copy
import signal

import pytest
import torch
import torch.nn as nn

import common
import cyclegan
from conftest import (assert_clean_error, assert_same_state, check_bad_flags, check_ddp, check_eval_every,
                      check_sample, check_signal_resume, check_smoke, digest, launch_ddp, load, run_script)
from test_pix2pix import official_lrs

SMALL = ["--dataset", "synthetic-unpaired", "--image-size", 16, "--load-size", 18, "--ngf", 4, "--ndf", 4,
         "--n-blocks", 1, "--n-layers-D", 2, "--batch-size", 16, "--device", "cpu"]
ENDLESS = [*SMALL, "--n-epochs", 10**5]   # a schedule long enough for the --steps 10**6 of the signal tests


# ----------------------------------------------------------------------------------------------
# The paper's settings and the official networks
# ----------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = cyclegan.Config()
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.batch_size, cfg.pool_size) == (2e-4, 0.5, 0.999, 1, 50)
    assert (cfg.lambda_cyc, cfg.lambda_identity, cfg.n_epochs, cfg.n_epochs_decay) == (10.0, 0.5, 100, 100)
    assert (cfg.image_size, cfg.load_size, cfg.flip, cfg.ngf, cfg.ndf, cfg.n_blocks, cfg.n_layers_D, cfg.init_std) == \
        (256, 286, True, 64, 64, 9, 3, 0.02)
    demo = cyclegan.Config()
    demo.given = set()
    cyclegan.apply_demo_defaults(demo)
    assert (demo.image_size, demo.load_size, demo.ngf, demo.n_blocks, demo.batch_size) == (32, 36, 32, 6, 1)


def test_parameter_counts_and_patch_grid_match_the_official_code():
    """resnet_9blocks and the 70 x 70 PatchGAN, counted on the meta device (not run); shapes at one filter wide."""
    with torch.device("meta"):
        G, D = cyclegan.ResnetGenerator(3, 3, 64, 9), cyclegan.PatchGAN(3, 64, 3)
    assert common.count_parameters(G) == 11_378_179 and common.count_parameters(D) == 2_764_737
    with torch.no_grad():
        assert cyclegan.ResnetGenerator(3, 3, 1, 9)(torch.zeros(1, 3, 256, 256)).shape == (1, 3, 256, 256)
        assert cyclegan.PatchGAN(3, 1, 3)(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert cyclegan.patch_grid(256, 3) == 30


def test_resnet_generator_architecture():
    """Reflection padding, instance norm without learned scale or running statistics, no dropout, 2 stride-2
    convolutions down and 2 transposed ones up around the residual blocks, tanh out."""
    G = cyclegan.ResnetGenerator(3, 3, 8, 6)
    norms = [m for m in G.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert norms and all(not m.affine and not m.track_running_stats for m in norms)
    assert sum(isinstance(m, cyclegan.ResnetBlock) for m in G.modules()) == 6
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm2d, nn.ZeroPad2d)) for m in G.modules())
    assert [m.stride for m in G.net if isinstance(m, nn.Conv2d)] == [(1, 1), (2, 2), (2, 2), (1, 1)]
    assert [m.stride for m in G.net if isinstance(m, nn.ConvTranspose2d)] == [(2, 2), (2, 2)]
    assert isinstance(G.net[-1], nn.Tanh)
    block = G.net[10]
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        assert torch.allclose(block(x), x + block.block(x))


def test_initialisation():
    torch.manual_seed(0)
    G = cyclegan.ResnetGenerator(3, 3, 16, 2)
    cyclegan.init_weights(G, 0.02)
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3
    assert all(torch.all(m.bias == 0) for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))


# ----------------------------------------------------------------------------------------------
# The objective and the schedule
# ----------------------------------------------------------------------------------------------
def test_lsgan_loss_values():
    scores = torch.tensor([[0.5, 2.0], [-1.0, 1.0]])
    assert cyclegan.lsgan_loss(scores, real=True).item() == pytest.approx((0.25 + 1 + 4 + 0) / 4)
    assert cyclegan.lsgan_loss(scores, real=False).item() == pytest.approx((0.25 + 4 + 1 + 1) / 4)


class Affine(nn.Module):
    """A stand-in network: w * x + b, elementwise."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.tensor(w)), nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return self.w * x + self.b


def test_each_update_follows_the_gradient_of_its_objective():
    """With SGD at lr 1 the step is minus the gradient: G's and F's of LSGAN(G) + LSGAN(F) + 10 (cyc_X + cyc_Y)
    + 5 (idt_X + idt_Y), then the discriminators' of their halved LSGAN objectives, on the fakes made before G's
    and F's update (themselves while the pools fill); the returned terms are those."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    start = {"G": (0.8, 0.1), "F": (1.1, -0.2), "D_X": (0.3, 0.4), "D_Y": (-0.5, 0.2)}
    nets = {k: Affine(*v) for k, v in start.items()}
    cfg = cyclegan.Config()
    p = {k: [torch.tensor(v, requires_grad=True) for v in vals] for k, vals in start.items()}
    f = lambda name, t: p[name][0] * t + p[name][1]   # noqa: E731
    ls = lambda s, target: ((s - target) ** 2).mean()   # noqa: E731
    l1 = lambda a, b: (a - b).abs().mean()   # noqa: E731
    fake_y, fake_x = f("G", x), f("F", y)
    terms = {"G": ls(f("D_Y", fake_y), 1), "F": ls(f("D_X", fake_x), 1), "cyc_X": l1(f("F", fake_y), x),
             "cyc_Y": l1(f("G", fake_x), y), "idt_X": l1(f("F", x), x), "idt_Y": l1(f("G", y), y)}
    total = terms["G"] + terms["F"] + 10 * (terms["cyc_X"] + terms["cyc_Y"]) + 5 * (terms["idt_X"] + terms["idt_Y"])
    grads_G = torch.autograd.grad(total, p["G"] + p["F"])
    fy, fx = fake_y.detach(), fake_x.detach()
    terms["D_Y"] = 0.5 * (ls(f("D_Y", y), 1) + ls(f("D_Y", fy), 0))
    terms["D_X"] = 0.5 * (ls(f("D_X", x), 1) + ls(f("D_X", fx), 0))
    grads_D = torch.autograd.grad(terms["D_X"] + terms["D_Y"], p["D_X"] + p["D_Y"])
    pools = [cyclegan.ImagePool(50, seed=s, device="cpu") for s in (0, 1)]
    sgd = lambda *names: torch.optim.SGD([q for n in names for q in nets[n].parameters()], lr=0.0)   # noqa: E731
    out = cyclegan.train_step(nets["G"], nets["F"], nets["D_X"], nets["D_Y"], sgd("G", "F"), sgd("D_X", "D_Y"),
                              *pools, x, y, lr=1.0, cfg=cfg)
    for name, value in terms.items():
        assert out[name].item() == pytest.approx(value.item(), rel=1e-5), name
    new = [q.item() for n in ("G", "F", "D_X", "D_Y") for q in nets[n].parameters()]
    old = [v for n in ("G", "F", "D_X", "D_Y") for v in start[n]]
    for a, b, g in zip(new, old, (*grads_G, *grads_D)):
        assert a == pytest.approx(b - g.item(), rel=1e-5, abs=1e-7)
    assert pools[0].count == pools[1].count == 2


def test_once_full_the_pools_feed_the_discriminators():
    """With full pools, D_X and D_Y are trained on what the pools return (here one stored fake and one new one
    each), not on the new fakes: their SGD step at lr 1 is minus the gradient of that objective."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3)
    start = {"G": (0.8, 0.1), "F": (1.1, -0.2), "D_X": (0.3, 0.4), "D_Y": (-0.5, 0.2)}
    nets = {k: Affine(*v) for k, v in start.items()}
    pools = [cyclegan.ImagePool(2, seed=s, device="cpu") for s in (0, 1)]   # seeds that swap one of two
    for pool in pools:
        pool.query(torch.full((2, 1, 3, 3), 3.0))                             # full of old fakes
    with torch.no_grad():
        fake_x, fake_y = nets["F"](y), nets["G"](x)                         # before G's and F's update
    seen_x, seen_y = copy.deepcopy(pools[0]).query(fake_x), copy.deepcopy(pools[1]).query(fake_y)
    assert [int((seen[:, 0, 0, 0] == 3).sum()) for seen in (seen_x, seen_y)] == [1, 1]
    p = {k: [torch.tensor(v, requires_grad=True) for v in start[k]] for k in ("D_X", "D_Y")}
    ls = lambda s, target: ((s - target) ** 2).mean()   # noqa: E731
    D_X, D_Y = (lambda t: p["D_X"][0] * t + p["D_X"][1]), (lambda t: p["D_Y"][0] * t + p["D_Y"][1])
    loss_D = 0.5 * (ls(D_Y(y), 1) + ls(D_Y(seen_y), 0)) + 0.5 * (ls(D_X(x), 1) + ls(D_X(seen_x), 0))
    grads = torch.autograd.grad(loss_D, p["D_X"] + p["D_Y"])
    sgd = lambda *names: torch.optim.SGD([q for n in names for q in nets[n].parameters()], lr=0.0)   # noqa: E731
    cyclegan.train_step(nets["G"], nets["F"], nets["D_X"], nets["D_Y"], sgd("G", "F"), sgd("D_X", "D_Y"), *pools,
                        x, y, lr=1.0, cfg=cyclegan.Config())
    new = [q.item() for n in ("D_X", "D_Y") for q in nets[n].parameters()]
    for a, b, g in zip(new, [*start["D_X"], *start["D_Y"]], grads):
        assert a == pytest.approx(b - g.item(), rel=1e-5, abs=1e-7)


def test_lr_schedule_is_the_official_one_step_by_step():
    cfg = cyclegan.Config()
    reference = official_lrs(cfg.n_epochs, cfg.n_epochs_decay)
    for epoch in (1, 99, 100, 101, 150, 200):
        for step in ((epoch - 1) * 5, epoch * 5 - 1):
            assert cyclegan.lr_at(step, 5, cfg) == pytest.approx(reference[epoch - 1], rel=1e-12, abs=1e-15)
    demo = cyclegan.Config(n_epochs=20, n_epochs_decay=20)
    assert [cyclegan.lr_at(e * 2, 2, demo) for e in range(40)] == pytest.approx(official_lrs(20, 20))


# ----------------------------------------------------------------------------------------------
# The pool of past fakes
# ----------------------------------------------------------------------------------------------
def test_pool_fills_first_then_returns_an_old_fake_half_the_time():
    pool = cyclegan.ImagePool(50, seed=0, device="cpu")
    for i in range(50):   # filling: every fake comes back as it is, and is stored
        assert pool.query(torch.full((1, 1, 2, 2), float(i))).flatten()[0] == i
    assert pool.count == 50 and sorted(pool.images[:, 0, 0, 0].tolist()) == list(range(50))
    old = 0
    for i in range(50, 2050):
        stored = set(pool.images[:, 0, 0, 0].tolist())
        value = pool.query(torch.full((1, 1, 2, 2), float(i))).flatten()[0].item()
        if value != i:   # an old one: it was in the pool, and the new fake took its place
            old += 1
            assert value in stored and value not in pool.images[:, 0, 0, 0].tolist() and i in pool.images[:, 0, 0, 0]
        else:
            assert set(pool.images[:, 0, 0, 0].tolist()) == stored
    assert 900 < old < 1100   # a binomial(2000, 1/2): within 4.5 standard deviations
    batch = pool.query(torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2))   # batches: each image in turn
    assert batch.shape == (8, 1, 2, 2) and pool.count == 50
    assert torch.equal(cyclegan.ImagePool(0, 0, "cpu").query(batch), batch)   # size 0: the fakes themselves


def test_pool_restores_exactly():
    a = cyclegan.ImagePool(5, seed=3, device="cpu")
    for i in range(9):
        a.query(torch.randn(2, 1, 2, 2))
    b = cyclegan.ImagePool(5, seed=99, device="cpu")
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        fakes = torch.randn(3, 1, 2, 2)
        assert torch.equal(a.query(fakes), b.query(fakes))
    assert torch.equal(a.images, b.images)
    empty = cyclegan.ImagePool(5, seed=3, device="cpu")
    empty.load_state_dict(cyclegan.ImagePool(5, seed=3, device="cpu").state_dict())
    assert empty.count == 0 and empty.images is None


# ----------------------------------------------------------------------------------------------
# Data: the unaligned format, the demo's domains
# ----------------------------------------------------------------------------------------------
def write_images(folder, values, size=(10, 6)):
    from PIL import Image
    folder.mkdir(parents=True)
    for i, v in enumerate(values):
        Image.new("RGB", size, (v, v, v)).save(folder / f"{i:03d}.png")


def test_unaligned_loader_and_a_missing_folder(tmp_path):
    write_images(tmp_path / "trainA", [10, 20, 30])
    write_images(tmp_path / "trainB", [200, 210])
    a, b = common.load_domains("unaligned", str(tmp_path), 8)
    assert a.shape == (3, 3, 8, 8) and b.shape == (2, 3, 8, 8)
    assert [int(t[0, 0, 0]) for t in a] == [10, 20, 30] and [int(t[0, 0, 0]) for t in b] == [200, 210]
    assert not common.has_split("unaligned", str(tmp_path), "test")
    write_images(tmp_path / "testA", [40])
    assert not common.has_split("unaligned", str(tmp_path), "test")   # testB missing
    (tmp_path / "other").mkdir()
    write_images(tmp_path / "other" / "trainA", [1])
    with pytest.raises(common.UserError, match=r"has no trainB/ folder: the unaligned format is two folders"):
        common.load_domains("unaligned", str(tmp_path / "other"), 8)


def test_a_folder_without_trainB_is_one_line_before_the_run_folder(tmp):
    write_images(tmp / "data" / "trainA", [1, 2])
    proc = run_script("cyclegan", *SMALL, "--dataset", "unaligned", "--data-root", tmp / "data", "--out", tmp / "run",
                      cwd=tmp, check=False)
    assert_clean_error(proc, "has no trainB/ folder", "trainA/ and trainB/")
    assert not (tmp / "run").exists()


@pytest.mark.skipif(not common.FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_sneaker2boot_domains(tmp_path):
    a, b = common.load_domains("sneaker2boot", str(tmp_path), 32, "test")
    images, labels = common._demo_images(str(tmp_path), "test")
    assert a.shape == (1000, 1, 32, 32) and b.shape == (1000, 1, 32, 32)
    assert torch.equal(a, images[labels == common.SNEAKER]) and torch.equal(b, images[labels == common.ANKLE_BOOT])


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def test_smoke(tmp):
    check_smoke("cyclegan", SMALL, tmp)
    ckpt = load(tmp / "smoke" / "ckpt.pt")
    assert set(ckpt["models"]) == {"G", "F", "D_X", "D_Y"} and set(ckpt["data"]) == {"A", "B"}
    assert [len(ckpt["state"][k]["processes"]) for k in ("pool_X", "pool_Y")] == [1, 1]


def test_exact_resume_with_pools_and_both_streams(tmp):
    """2n steps straight == n steps, stop, resume, n steps: bit-identical weights, optimizers, pools (images,
    count, generator) and both data positions, across an epoch boundary of each stream (64 of 256 images a
    step); the log, sample and checkpoint cadences differ between the runs."""
    straight, split = tmp / "straight", tmp / "split"
    small = [*SMALL, "--batch-size", 64]
    run_script("cyclegan", *small, "--steps", 6, "--out", straight, "--log-every", 1, "--ckpt-every", 4, cwd=tmp)
    run_script("cyclegan", *small, "--steps", 3, "--out", split, "--log-every", 2, "--sample-every", 2,
               "--ckpt-every", 2, cwd=tmp)
    half = load(split / "ckpt.pt")
    assert half["data"]["A"]["epoch"] == half["data"]["B"]["epoch"] == 0
    assert half["state"]["pool_Y"]["processes"][0]["count"] == 50   # full: the rest of the run draws from it
    proc = run_script("cyclegan", "--resume", "--steps", 6, "--out", split, "--log-every", 3, "--sample-every", 1,
                      "--ckpt-every", 5, cwd=tmp)
    assert "training from step 3 (resumed)" in proc.stdout
    resumed = load(split / "ckpt.pt")
    assert resumed["data"]["A"]["epoch"] == resumed["data"]["B"]["epoch"] == 1
    assert_same_state(load(straight / "ckpt.pt"), resumed)


def test_sigusr1_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("cyclegan", ENDLESS, tmp, signal.SIGUSR1)


def test_sample(tmp):
    check_sample("cyclegan", SMALL, tmp)


def test_translate_both_ways(tmp):
    from PIL import Image
    run_script("cyclegan", *SMALL, "--steps", 1, "--out", tmp / "run", cwd=tmp)
    (tmp / "in").mkdir()
    for name, value in (("x.png", 30), ("y.jpg", 220)):
        Image.new("L", (20, 20), value).save(tmp / "in" / name)
    run_script("cyclegan", "--out", tmp / "run", "--translate", tmp / "in", "--translate-out", tmp / "ab", cwd=tmp)
    run_script("cyclegan", "--out", tmp / "run", "--translate", tmp / "in", "--translate-out", tmp / "ba",
               "--direction", "BtoA", cwd=tmp)
    import numpy as np
    ab, ba = ([np.array(Image.open(tmp / d / n)) for n in ("x.png", "y.png")] for d in ("ab", "ba"))
    assert ab[0].shape == (16, 16) and not np.array_equal(ab[0], ba[0])   # G and F differ
    G, F = cyclegan.load(tmp / "run" / "ckpt.pt")
    x = torch.full((1, 1, 16, 16), 30 / 127.5 - 1)
    with torch.no_grad():
        assert np.abs(common.to_uint8(G(x))[0, 0].numpy().astype(int) - ab[0].astype(int)).max() <= 1
    proc = run_script("cyclegan", *SMALL, "--steps", 1, "--direction", "BtoA", "--out", tmp / "x", cwd=tmp, check=False)
    assert_clean_error(proc, "--direction picks the mapping of --translate or --sample")


def test_bad_inputs(tmp):
    out = tmp / "good"
    run_script("cyclegan", *SMALL, "--steps", 2, "--out", out, cwd=tmp)
    before = digest(out / "ckpt.pt")
    run_script("pix2pix", "--dataset", "synthetic-pairs", "--image-size", 16, "--load-size", 18, "--ngf", 4, "--ndf", 4,
               "--n-layers-D", 2, "--batch-size", 16, "--steps", 1, "--out", tmp / "p2p", "--device", "cpu", cwd=tmp)
    for args, words in ((["--resume", "--seed", 7, "--batch-size", 3, "--out", out], ["seed 0 -> 7", "batch_size"]),
                        (["--resume", tmp / "p2p" / "ckpt.pt", "--out", out], ["pix2pix.py"]),
                        ([*SMALL, "--steps", 4, "--out", out], ["--resume"]),
                        (["--resume", "--steps", 10**9, "--out", out], ["--steps 1000000000 runs past the end of the "
                                                                         "learning-rate schedule"])):
        assert_clean_error(run_script("cyclegan", *args, cwd=tmp, check=False), *words)
    assert digest(out / "ckpt.pt") == before


def test_bad_flags(tmp):
    check_bad_flags("cyclegan", SMALL, tmp, [
        (["--image-size", 18, "--load-size", 20], ["--image-size 18", "multiple of 4"]),
        (["--n-layers-D", 3], ["leaves no patch"]), (["--load-size", 12], ["--load-size 12 is smaller"]),
        (["--dataset", "edges2fashion"], ["--dataset edges2fashion"]), (["--pool-size", -1], ["--pool-size -1"]),
        (["--translate-out", "x"], ["goes with --translate"])])


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    """Two processes, each with its own pools (both saved, each restored by its own process)."""
    check_ddp("cyclegan", ENDLESS, tmp)
    pools = load(tmp / "ddp" / "ckpt.pt")["state"]["pool_X"]["processes"]
    assert len(pools) == 2 and not torch.equal(pools[0]["images"], pools[1]["images"])


def test_batch_of_one_is_refused_under_torchrun(tmp):
    """The global batch is shared among processes: a batch of 1 cannot be, and each process says what to do
    (two processes with torchrun's environment)."""
    proc = launch_ddp("cyclegan", *SMALL, "--batch-size", 1, "--steps", 2, "--out", tmp / "one", cwd=tmp)
    text = proc.communicate(timeout=120)[0]
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0 and errors, text
    assert all("--batch-size 1 is the global batch" in e and "2 processes (e.g. --batch-size 2)" in e for e in errors)
    assert not (tmp / "one").exists()


def test_eval_every_logs_fid_of_translated_held_out_inputs(tmp):
    check_eval_every("cyclegan", SMALL, tmp)


def test_eval_draws_independent_held_out_inputs():
    """--eval-every's images translate inputs drawn anew at each call (not the first ones again and again)."""
    g = torch.Generator().manual_seed(0)
    images = torch.arange(10).view(10, 1, 1, 1)
    first, second = cyclegan.draw(images, 50, g), cyclegan.draw(images, 50, g)
    assert first.shape == (50, 1, 1, 1) and set(first.flatten().tolist()) == set(range(10))
    assert not torch.equal(first, second)
