"""pix2pix.py: the official networks' parameter counts, the losses and the schedule against closed forms and the
official formula, the aligned data and its jitter, paper-style inference, and the shared CLI contract."""
import signal
import warnings

import pytest
import torch
import torch.nn as nn

import common
import pix2pix
from conftest import (assert_clean_error, check_bad_flags, check_ddp, check_eval_every, check_exact_resume,
                      check_sample, check_signal_resume, check_smoke, digest, load, run_script)

SMALL = ["--dataset", "synthetic-pairs", "--image-size", 16, "--load-size", 18, "--ngf", 4, "--ndf", 4,
         "--n-layers-D", 2, "--batch-size", 16, "--device", "cpu"]
ENDLESS = [*SMALL, "--n-epochs", 10**5]   # a schedule long enough for the --steps 10**6 of the signal tests
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# The paper's settings and the official networks
# ----------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = pix2pix.Config()
    assert (cfg.lr, cfg.beta1, cfg.beta2, cfg.batch_size, cfg.lambda_L1) == (2e-4, 0.5, 0.999, 1, 100.0)
    assert (cfg.image_size, cfg.load_size, cfg.flip, cfg.n_epochs, cfg.n_epochs_decay) == (256, 286, True, 100, 100)
    assert (cfg.ngf, cfg.ndf, cfg.n_layers_D, cfg.dropout, cfg.init_std) == (64, 64, 3, 0.5, 0.02)
    assert cfg.direction == "AtoB"
    demo = pix2pix.Config(dataset="edges2fashion")
    demo.given = set()
    pix2pix.apply_demo_defaults(demo)
    assert (demo.image_size, demo.load_size, demo.ngf, demo.batch_size) == (32, 36, 32, 4)
    assert demo.n_epochs + demo.n_epochs_decay == 15
    typed = pix2pix.Config(dataset="edges2fashion", ngf=8)
    typed.given = {"ngf"}
    pix2pix.apply_demo_defaults(typed)
    assert typed.ngf == 8 and typed.image_size == 32   # a typed flag wins over the demo's default


def test_parameter_counts_and_patch_grid_match_the_official_code():
    """unet_256 and the 70 x 70 PatchGAN on 6-channel pairs, counted on the meta device (not run); the shapes
    from the same layers at one filter wide."""
    with torch.device("meta"):
        G, D = pix2pix.UNet(3, 3, 8, 64, 0.5), pix2pix.PatchGAN(6, 64, 3)
    assert common.count_parameters(G) == 54_413_955 and common.count_parameters(D) == 2_768_705
    with torch.no_grad():
        assert pix2pix.UNet(3, 3, 8, 1, 0.5)(torch.zeros(1, 3, 256, 256)).shape == (1, 3, 256, 256)
        assert pix2pix.PatchGAN(6, 1, 3)(torch.zeros(1, 6, 256, 256)).shape == (1, 1, 30, 30)
        assert pix2pix.PatchGAN(2, 1, 2)(torch.zeros(1, 2, 32, 32)).shape[-1] == pix2pix.patch_grid(32, 2) == 6
    assert pix2pix.patch_grid(256, 3) == 30
    with pytest.raises(common.UserError, match="--n-layers-D 3 leaves no patch at --image-size 16"):
        pix2pix.patch_grid(16, 3)
    with pytest.raises(common.UserError, match="--image-size 48"):
        pix2pix.unet_levels(48)


def test_unet_architecture():
    """8 halvings to 1 x 1, batch norm but on the outermost and innermost encoder layers, dropout 0.5 after the
    decoder layers that output 4 x 4, 8 x 8 and 16 x 16 (the official placement), tanh out, no conv bias but
    the last."""
    G = pix2pix.UNet(3, 3, 8, 1, 0.5)
    downs = [next(m for m in d if isinstance(m, nn.Conv2d)) for d in G.down]
    assert [c.out_channels for c in downs] == [1, 2, 4, 8, 8, 8, 8, 8]
    assert all(c.stride == (2, 2) and c.kernel_size == (4, 4) and c.bias is None for c in downs)
    assert [any(isinstance(m, nn.BatchNorm2d) for m in d) for d in G.down] == [False] + [True] * 6 + [False]
    sizes, skips, x = [], [], torch.zeros(1, 3, 256, 256)
    with torch.no_grad():
        for d in G.down:
            x = d(x)
            skips.append(x)
        x = G.up[0](skips.pop())
        sizes.append((x.shape[-1], any(isinstance(m, nn.Dropout) for m in G.up[0])))
        for up in G.up[1:]:
            x = up(torch.cat([skips.pop(), x], 1))
            sizes.append((x.shape[-1], any(isinstance(m, nn.Dropout) for m in up)))
    assert sizes == [(2, False), (4, True), (8, True), (16, True), (32, False), (64, False), (128, False), (256, False)]
    assert all(m.p == 0.5 for m in G.modules() if isinstance(m, nn.Dropout))
    assert isinstance(G.up[-1][-1], nn.Tanh) and G.up[-1][1].bias is not None
    assert all(u[1].bias is None for u in G.up[:-1])


def test_initialisation():
    torch.manual_seed(0)
    G = pix2pix.UNet(3, 3, 6, 32, 0.5)
    pix2pix.init_weights(G, 0.02)
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))])
    gamma = torch.cat([m.weight for m in G.modules() if isinstance(m, nn.BatchNorm2d)])
    assert abs(w.mean()) < 1e-3 and abs(w.std() - 0.02) < 1e-3 and abs(gamma.mean() - 1) < 5e-3
    assert all(torch.all(m.bias == 0) for m in G.modules() if getattr(m, "bias", None) is not None)


# ----------------------------------------------------------------------------------------------
# The objective (eq. 1-4) and the schedule
# ----------------------------------------------------------------------------------------------
def test_gan_loss_is_the_log_loss_of_sigmoid():
    logits = torch.tensor([[-1.5, 0.0], [2.0, 0.3]])
    d = torch.sigmoid(logits)
    assert pix2pix.gan_loss(logits, real=True).item() == pytest.approx(-torch.log(d).mean().item(), rel=1e-6)
    assert pix2pix.gan_loss(logits, real=False).item() == pytest.approx(-torch.log(1 - d).mean().item(), rel=1e-6)


class Affine(nn.Module):
    """A stand-in network: w * input (summed over channels) + b, one channel out."""

    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(torch.tensor(w)), nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return self.w * x.sum(1, keepdim=True) + self.b


def test_each_update_follows_the_gradient_of_its_objective():
    """With SGD at lr 1 the step of each network is minus the gradient of its objective: D's is half
    (BCE(D(x, y), 1) + BCE(D(x, G(x)), 0)), G's BCE(D(x, G(x)), 1) + 100 mean|y - G(x)|; the returned
    losses are those terms."""
    torch.manual_seed(0)
    x, y = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    G, D = Affine(0.7, 0.1), Affine(-0.4, 0.2)
    cfg = pix2pix.Config()
    bce = nn.functional.binary_cross_entropy_with_logits

    def objectives(g_w, g_b, d_w, d_b):
        fake = g_w * x + g_b
        d = lambda a, b: d_w * (a + b) + d_b   # noqa: E731
        loss_D = 0.5 * (bce(d(x, y), torch.ones(3, 1, 4, 4)) + bce(d(x, fake.detach()), torch.zeros(3, 1, 4, 4)))
        loss_G = bce(d(x, fake), torch.ones(3, 1, 4, 4)) + 100 * (fake - y).abs().mean()
        return loss_D, loss_G, (fake - y).abs().mean()

    params = [torch.tensor(v, requires_grad=True) for v in (0.7, 0.1, -0.4, 0.2)]
    loss_D, _, _ = objectives(*params)
    grad_D = torch.autograd.grad(loss_D, params[2:])
    _, loss_G, l1 = objectives(*params[:2], *[p.detach() - g for p, g in zip(params[2:], grad_D)])  # after D's step
    grad_G = torch.autograd.grad(loss_G, params[:2])
    out = pix2pix.train_step(G, D, torch.optim.SGD(G.parameters(), lr=0.0), torch.optim.SGD(D.parameters(), lr=0.0),
                             x, y, lr=1.0, cfg=cfg)
    assert out["G_L1"].item() == pytest.approx(100 * l1.item(), rel=1e-6)   # weighted, as the official logs
    assert 0.5 * (out["D_real"] + out["D_fake"]).item() == pytest.approx(loss_D.item(), rel=1e-6)
    for p, p0, g in zip((D.w, D.b, G.w, G.b), (-0.4, 0.2, 0.7, 0.1), (*grad_D, *grad_G)):
        assert p.item() == pytest.approx(p0 - g.item(), rel=1e-5, abs=1e-7)
    assert all(p.requires_grad for p in D.parameters())   # unfrozen after G's update


def official_lrs(n_epochs: int, n_epochs_decay: int, lr: float = 2e-4) -> list[float]:
    """The learning rate of each epoch as the official train.py makes it: networks.get_scheduler's lambda_rule
    (epoch_count 1) in a LambdaLR, stepped by update_learning_rate() at the start of every epoch."""
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=lr)
    rule = lambda epoch: 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1)   # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=rule)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # "scheduler.step() before optimizer.step()": as the official loop does
        for _ in range(1, n_epochs + n_epochs_decay + 1):
            scheduler.step()
            lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_lr_schedule_is_the_official_one_step_by_step():
    cfg = pix2pix.Config()
    reference = official_lrs(cfg.n_epochs, cfg.n_epochs_decay)
    per_epoch = 7
    for epoch in (1, 2, 99, 100, 101, 150, 199, 200):
        for step in ((epoch - 1) * per_epoch, epoch * per_epoch - 1):   # the first and the last step of the epoch
            assert pix2pix.lr_at(step, per_epoch, cfg) == pytest.approx(reference[epoch - 1], rel=1e-12, abs=1e-15)
    assert pix2pix.lr_at(98 * 7, 7, cfg) == 2e-4 and pix2pix.lr_at(99 * 7, 7, cfg) == pytest.approx(2e-4 * 100 / 101)
    assert pix2pix.lr_at(199 * 7, 7, cfg) == 0.0   # the official last epoch runs at 0
    short = pix2pix.Config(n_epochs=5, n_epochs_decay=10)
    assert [pix2pix.lr_at(e * 3, 3, short) for e in range(15)] == pytest.approx(official_lrs(5, 10))


# ----------------------------------------------------------------------------------------------
# Data: the aligned format, the demo's edges, the jitter
# ----------------------------------------------------------------------------------------------
def write_pairs(folder, n, width=12, height=6):
    """n A|B images: A (left half) all value 10 * i, B (right half) all 200 - 10 * i."""
    from PIL import Image
    folder.mkdir(parents=True)
    for i in range(n):
        array = torch.zeros(height, width, 3, dtype=torch.uint8)
        array[:, :width // 2], array[:, width // 2:] = 10 * i, 200 - 10 * i
        Image.fromarray(array.numpy()).save(folder / f"{i:03d}.png")


def test_aligned_loader_splits_resizes_and_caches(tmp_path):
    write_pairs(tmp_path / "train", 3)
    write_pairs(tmp_path / "val", 2)
    pairs = common.load_pairs("aligned", str(tmp_path), 8)
    assert pairs.shape == (3, 6, 8, 8) and pairs.dtype == torch.uint8
    for i in range(3):
        assert torch.all(pairs[i, :3] == 10 * i) and torch.all(pairs[i, 3:] == 200 - 10 * i)
    assert len(list((tmp_path / "train").glob(".cache-pairs-8px-*.pt"))) == 1
    assert common.load_pairs("aligned", str(tmp_path), 8, "val").shape == (2, 6, 8, 8)
    assert common.has_split("aligned", str(tmp_path), "val") and not common.has_split("aligned", str(tmp_path), "test")
    cfg = pix2pix.Config(dataset="aligned", data_root=str(tmp_path), image_size=8, direction="BtoA")
    x, y = pix2pix.held_out(cfg)   # the val split, B -> A
    assert x.shape == (2, 3, 8, 8) and torch.all(x[1] == 190) and torch.all(y[1] == 10)
    with pytest.raises(common.UserError, match=r"has no train/ folder: the aligned format"):
        common.load_pairs("aligned", str(tmp_path / "nothing"), 8)


def test_edge_map_draws_black_lines_on_white():
    image = torch.zeros(1, 1, 12, 12, dtype=torch.uint8)
    image[..., 3:9, 3:9] = 255
    edges = common.edge_map(image)[0, 0]
    assert set(edges.unique().tolist()) == {0, 255}
    assert torch.all(edges[0] == 255) and edges[5, 5] == 255          # flat regions: white
    assert edges[5, 2] == 0 and edges[5, 3] == 0 and edges[2, 5] == 0  # both sides of the step: black


@pytest.mark.skipif(not common.FASHION_MNIST_DEBIAN.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_edges2fashion_pairs_are_edges_and_images(tmp_path):
    pairs = common.load_pairs("edges2fashion", str(tmp_path), 32, "test")
    images = common._demo_images(str(tmp_path), "test")[0]
    assert pairs.shape == (10_000, 2, 32, 32) and torch.all(images[..., :2, :] == 0)   # 28 x 28 padded
    assert torch.equal(pairs[:, 1:], images) and torch.equal(pairs[:, :1], common.edge_map(images))


def test_jitter_crops_pairs_alike_resumes_and_ignores_the_number_of_processes():
    """Each image a random crop (inside the image, every place reachable) and flipped half the time; the channels
    of a pair moved together; the same crops after a resume and whatever the split among processes."""
    n, load, crop = 40, 10, 6
    base = torch.arange(load * load, dtype=torch.uint8).view(1, 1, load, load).expand(n, 1, load, load)
    pairs = torch.cat([base, 255 - base], 1).contiguous()
    b = common.Batches(pairs, 8, seed=2, device=CPU, value_range=(0, 255), crop=crop, hflip=True)
    corners, flips = set(), 0
    for _ in range(25):
        batch = b.next().round().to(torch.uint8)
        assert batch.shape == (8, 2, crop, crop) and torch.equal(batch[:, 1], 255 - batch[:, 0])
        for image in batch[:, 0]:
            flipped = image[0, 0] > image[0, -1]
            flips += int(flipped)
            row, col = divmod(int(image[0, -1 if flipped else 0]), load)
            corners.add((row, col))
            expected = base[0, 0, row:row + crop, col:col + crop]
            assert torch.equal(image, expected.flip(-1) if flipped else expected)
    assert corners == {(r, c) for r in range(load - crop + 1) for c in range(load - crop + 1)}
    assert 70 < flips < 130   # of 200
    again = common.Batches(pairs, 8, seed=2, device=CPU, value_range=(0, 255), crop=crop, hflip=True)
    again.load_state_dict(b.state_dict())
    ranks = [common.Batches(pairs, 8, seed=2, device=CPU, value_range=(0, 255), crop=crop, hflip=True, rank=r, world=2)
             for r in range(2)]
    for r in ranks:
        r.load_state_dict(b.state_dict())
    for _ in range(8):   # across an epoch boundary
        expected = b.next()
        assert torch.equal(again.next(), expected) and torch.equal(torch.cat([r.next() for r in ranks]), expected)


# ----------------------------------------------------------------------------------------------
# Inference (section 3.3)
# ----------------------------------------------------------------------------------------------
def test_translate_runs_g_as_in_training_without_touching_it():
    """Dropout on and batch norm on each image's own statistics (batch 1), seeded masks; the running
    statistics, the mode and the global random stream are left as they were."""
    torch.manual_seed(0)
    G = pix2pix.UNet(1, 1, 6, 4, 0.5).eval()   # 64 x 64: one dropout level
    x = torch.randn(3, 1, 64, 64)
    buffers = {k: v.clone() for k, v in G.state_dict().items()}
    state = torch.get_rng_state()
    out = pix2pix.translate(G, x, seed=5)
    assert not G.training and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, buffers[k]) for k, v in G.state_dict().items())
    assert torch.equal(out, pix2pix.translate(G, x, seed=5)) and not torch.equal(out, pix2pix.translate(G, x, seed=6))
    G.train()
    torch.manual_seed(5)
    with torch.no_grad():
        alone = G(x[:1])   # the first image alone, in training mode, with the same seed
    G.load_state_dict(buffers)
    assert torch.allclose(out[:1], alone, atol=1e-6)
    assert not torch.allclose(out[1:2], pix2pix.translate(G, x[1:2], seed=5), atol=1e-3)   # masks differ per image


def test_translate_seeds_and_restores_only_its_own_devices_generator(monkeypatch):
    """On the CPU, translate must leave every other device's generator alone: torch.manual_seed would reseed
    them all (CUDA, MPS...), and a training on MPS would then repeat its dropout masks after every grid."""
    other = []
    monkeypatch.setattr(torch.mps, "manual_seed", lambda seed: other.append(("mps", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: other.append(("cuda", seed)))
    pix2pix.translate(pix2pix.UNet(1, 1, 6, 4, 0.5), torch.randn(2, 1, 64, 64), seed=5)
    assert other == []


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------
def test_smoke(tmp):
    check_smoke("pix2pix", SMALL, tmp)
    ckpt = load(tmp / "smoke" / "ckpt.pt")
    assert ckpt["config"]["n_epochs"] == 5 and set(ckpt["models"]) == {"G", "D"}


def test_exact_resume_with_dropout(tmp):
    """64 x 64 has a dropout level: its masks come from the saved random state."""
    check_exact_resume("pix2pix", [*SMALL, "--image-size", 64, "--load-size", 70], tmp)


def test_sigterm_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("pix2pix", ENDLESS, tmp, signal.SIGTERM)


def test_sample(tmp):
    check_sample("pix2pix", SMALL, tmp)


def test_translate_a_folder(tmp):
    from PIL import Image
    run_script("pix2pix", *SMALL, "--steps", 1, "--out", tmp / "run", cwd=tmp)
    inputs = tmp / "inputs"
    inputs.mkdir()
    Image.new("RGB", (30, 20), (200, 10, 10)).save(inputs / "a.jpg")
    Image.new("L", (16, 16), 40).save(inputs / "b.png")
    (inputs / "notes.txt").write_text("not an image")
    before = digest(tmp / "run" / "ckpt.pt")
    proc = run_script("pix2pix", "--out", tmp / "run", "--translate", inputs, cwd=tmp)
    assert "translated 2 images" in proc.stdout
    outputs = sorted((tmp / "run" / "translated").iterdir())
    assert [p.name for p in outputs] == ["a.png", "b.png"]
    assert all(Image.open(p).size == (16, 16) and Image.open(p).mode == "L" for p in outputs)
    run_script("pix2pix", "--out", tmp / "run", "--translate", inputs, "--translate-out", tmp / "mine", cwd=tmp)
    assert sorted(p.name for p in (tmp / "mine").iterdir()) == ["a.png", "b.png"]
    (tmp / "empty").mkdir()
    for args, words in (([tmp / "nowhere"], ["--translate", "not a folder"]), ([tmp / "empty"], ["holds no images"]),
                        ([inputs, "--translate-out", inputs], ["is the input folder"])):
        proc = run_script("pix2pix", "--out", tmp / "run", "--translate", *args, cwd=tmp, check=False)
        assert_clean_error(proc, *words)
    (tmp / "twins").mkdir()
    for name in ("a.jpg", "a.png"):   # both would be written as a.png
        Image.new("L", (16, 16), 40).save(tmp / "twins" / name)
    proc = run_script("pix2pix", "--out", tmp / "run", "--translate", tmp / "twins", cwd=tmp, check=False)
    assert_clean_error(proc, "a.jpg and a.png", "rename")
    assert digest(tmp / "run" / "ckpt.pt") == before and sorted(p.name for p in inputs.iterdir()) == \
        ["a.jpg", "b.png", "notes.txt"]


def test_bad_inputs(tmp):
    """Each bad input is one line, and no existing checkpoint is touched."""
    out = tmp / "good"
    run_script("pix2pix", *SMALL, "--steps", 2, "--out", out, cwd=tmp)
    before = digest(out / "ckpt.pt")
    cases = [([*SMALL, "--dataset", "aligned", "--data-root", tmp / "nothing", "--out", tmp / "x"],
              ["--data-root", "train/", "aligned format"]),
             ([*SMALL, "--steps", 4, "--out", out], ["--resume"]),
             (["--resume", "--seed", 7, "--batch-size", 3, "--out", out], ["seed 0 -> 7", "batch_size"]),
             (["--resume", tmp / "broken.pt", "--out", out], ["corrupt"]),
             (["--resume", "--steps", 10**9, "--out", out],   # the lr would turn negative
              ["--steps 1000000000 runs past the end of the learning-rate schedule"])]
    (tmp / "broken.pt").write_bytes((out / "ckpt.pt").read_bytes()[:1000])
    for args, words in cases:
        assert_clean_error(run_script("pix2pix", *args, cwd=tmp, check=False), *words)
    assert digest(out / "ckpt.pt") == before and not (tmp / "x").exists()


def test_bad_flags(tmp):
    check_bad_flags("pix2pix", SMALL, tmp, [
        (["--image-size", 48], ["--image-size 48"]), (["--beta1", 1], ["--beta1"]),
        (["--n-layers-D", 3], ["leaves no patch"]), (["--load-size", 12], ["--load-size 12 is smaller"]),
        (["--direction", "up"], ["--direction"]), (["--dataset", "sneaker2boot"], ["--dataset sneaker2boot"]),
        (["--translate-out", "x"], ["goes with --translate"]),
        (["--dropout", 0.3], ["--dropout 0.3", "no dropout layer"])])


def test_load_from_python(tmp):
    run_script("pix2pix", *SMALL, "--steps", 1, "--out", tmp / "run", cwd=tmp)
    G = pix2pix.load(tmp / "run" / "ckpt.pt")
    saved = torch.load(tmp / "run" / "ckpt.pt", weights_only=True)["models"]["G"]
    assert all(torch.equal(v, saved[k]) for k, v in G.state_dict().items())
    assert pix2pix.translate(G, torch.zeros(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    check_ddp("pix2pix", ENDLESS, tmp)


def test_eval_every_logs_fid_of_translated_held_out_inputs(tmp):
    check_eval_every("pix2pix", SMALL, tmp)


def test_eval_draws_independent_held_out_inputs():
    """--eval-every's images translate inputs drawn anew at each call (not the first ones again and again)."""
    g = torch.Generator().manual_seed(0)
    images = torch.arange(10).view(10, 1, 1, 1)
    first, second = pix2pix.draw(images, 50, g), pix2pix.draw(images, 50, g)
    assert first.shape == (50, 1, 1, 1) and set(first.flatten().tolist()) == set(range(10))
    assert not torch.equal(first, second)
