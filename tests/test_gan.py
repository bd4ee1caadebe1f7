"""gan.py: the paper's (official code's) settings, its losses, and the shared CLI contract."""
import math
import signal

import pytest
import torch

import common
import gan
from conftest import (check_bad_flags, check_bad_inputs, check_exact_resume, check_sample, check_signal_resume,
                      check_smoke, load, run_script, torchrun)

SMALL = ["--dataset", "synthetic", "--image-size", 12, "--batch-size", 16, "--g-hidden", 32,
         "--d-units", 8, "--device", "cpu"]
DCGAN_SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4,
               "--device", "cpu"]


def test_defaults_are_the_official_mnist_experiment():
    cfg = gan.Config()
    assert (cfg.batch_size, cfg.lr, cfg.lr_decay, cfg.min_lr) == (100, 0.1, 1.000004, 1e-6)
    assert (cfg.momentum, cfg.final_momentum, cfg.momentum_saturate) == (0.5, 0.7, 250)
    assert (cfg.nz, cfg.g_hidden, cfg.d_units, cfg.d_pieces, cfg.k) == (100, 1200, 240, 5, 1)
    assert cfg.loss == "non-saturating" and cfg.image_size == 28


def test_parameter_counts_match_mnist_yaml():
    # G: 100-1200-1200-784; D: maxout 240x5, 240x5, then 1 sigmoid unit (goodfeli/adversarial mnist.yaml)
    G, D = gan.Generator(100, 1200, (1, 28, 28)), gan.Discriminator((1, 28, 28), 240, 5)
    assert common.count_parameters(G) == 2_503_984
    assert common.count_parameters(D) == 1_231_441


def test_maxout_is_the_max_over_pieces():
    m = gan.Maxout(6, units=3, pieces=4)
    x = torch.randn(5, 6)
    pre = m.linear(x).view(5, 3, 4)
    assert torch.equal(m(x), pre.max(dim=2).values)


def test_losses_are_the_papers_formulas():
    l_real, l_fake = torch.randn(64), torch.randn(64)
    D_x, D_G_z = torch.sigmoid(l_real), torch.sigmoid(l_fake)
    expected_D = -0.5 * (torch.log(D_x).mean() + torch.log(1 - D_G_z).mean())
    assert torch.allclose(gan.discriminator_loss(l_real, l_fake), expected_D, atol=1e-6)
    assert torch.allclose(gan.generator_loss(l_fake, "minimax"), torch.log(1 - D_G_z).mean(), atol=1e-6)
    assert torch.allclose(gan.generator_loss(l_fake, "non-saturating"), -torch.log(D_G_z).mean(), atol=1e-6)
    # at the game's equilibrium D = 1/2 everywhere: the value of eq. 1 is -log 4 (Theorem 1)
    zero = torch.zeros(8)
    assert math.isclose(-2 * gan.discriminator_loss(zero, zero).item(), -math.log(4), rel_tol=1e-6)


def test_non_saturating_loss_keeps_gradient_where_minimax_saturates():
    # Section 3: early on D rejects samples confidently (D(G(z)) ~ 0) and log(1 - D(G(z))) saturates.
    logit = torch.tensor([-10.0], requires_grad=True)
    g_minimax, = torch.autograd.grad(gan.generator_loss(logit, "minimax"), logit)
    g_ns, = torch.autograd.grad(gan.generator_loss(logit, "non-saturating"), logit)
    assert abs(g_minimax.item()) < 1e-4 and abs(g_ns.item()) > 0.99


def test_schedules():
    cfg = gan.Config()
    assert gan.schedules(cfg, 0, 0) == (0.1, 0.5)
    lr, mom = gan.schedules(cfg, 10_000, 1)
    assert math.isclose(lr, 0.1 / 1.000004 ** 10_000) and mom == 0.5
    assert math.isclose(gan.schedules(cfg, 0, 125.5)[1], 0.6)
    assert gan.schedules(cfg, 10**8, 400) == (1e-6, 0.7)


def test_generator_starts_at_the_mean_image():
    G = gan.Generator(4, 8, (1, 3, 3))
    for m in G.net:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.zeros_(m.weight)
    mean = torch.rand(1, 3, 3)
    G.init_output_bias(mean)
    assert torch.allclose(G(torch.randn(2, 4)), mean.expand(2, 1, 3, 3), atol=1e-5)


def test_k_discriminator_steps_per_generator_step():
    cfg = gan.Config(k=3, batch_size=4, nz=5, g_hidden=8, d_units=4)
    G, D = gan.Generator(5, 8, (1, 4, 4)), gan.Discriminator((1, 4, 4), 4, 5)
    batches = common.Batches(common.synthetic_images(64, size=4), 4, 0, torch.device("cpu"), (0, 1))
    opt_G, opt_D = torch.optim.SGD(G.parameters(), lr=0.1), torch.optim.SGD(D.parameters(), lr=0.1)
    g_before = [p.clone() for p in G.parameters()]
    gan.train_step(G, D, opt_G, opt_D, batches, cfg, torch.device("cpu"))
    assert batches.index == 3
    assert any(not torch.equal(a, b) for a, b in zip(g_before, G.parameters()))  # one G update


def test_smoke(tmp):
    check_smoke("gan", SMALL, tmp)


def test_exact_resume(tmp):
    check_exact_resume("gan", SMALL, tmp)


def test_sigterm_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("gan", SMALL, tmp, signal.SIGTERM)


def test_sample(tmp):
    check_sample("gan", SMALL, tmp)


def test_bad_inputs(tmp):
    check_bad_inputs("gan", SMALL, "dcgan", DCGAN_SMALL, tmp)


def test_bad_flags(tmp):
    check_bad_flags("gan", SMALL, tmp, [(["--image-size", 0], ["--image-size 0"]),
                                        (["--loss", "wasserstein"], ["--loss"]),
                                        (["--momentum", 1], ["--momentum 1", "below 1"])])


def test_load_from_python(tmp):
    """The documented notebook use: the generator from a checkpoint alone, config rebuilt from it."""
    run_script("gan", *SMALL, "--steps", 1, "--out", tmp / "run", cwd=tmp)
    G = gan.load(tmp / "run" / "ckpt.pt")
    saved = torch.load(tmp / "run" / "ckpt.pt", weights_only=True)["models"]["G"]
    assert not G.training and all(torch.equal(v, saved[k]) for k, v in G.state_dict().items())
    assert G(torch.zeros(2, G.nz)).shape[0] == 2


def test_ddp_two_processes(tmp):
    proc = torchrun("gan", *SMALL, "--steps", 4, "--log-every", 2, "--out", tmp / "ddp", cwd=tmp)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "done at step 4" in out, out
    ckpt = load(tmp / "ddp" / "ckpt.pt")
    assert ckpt["world"] == 2 and ckpt["data"]["train"]["index"] == 4
