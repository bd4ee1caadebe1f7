"""vae.py: the bound's closed forms, the IWAE estimate against an exact log p(x), the likelihoods, the paper's
settings and parameter count, and the shared CLI contract."""
import csv
import math
import signal

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

import common
import vae
from conftest import (check_bad_flags, check_bad_inputs, check_conditional_sample, check_ddp, check_exact_resume,
                      check_sample, check_samples_are_of_their_class, check_signal_resume, check_smoke, load,
                      run_script)

SMALL = ["--dataset", "synthetic", "--image-size", 8, "--hidden", 16, "--nz", 2, "--batch-size", 16, "--device", "cpu"]
CONV = ["--dataset", "synthetic-rgb", "--image-size", 16, "--arch", "conv", "--nf", 4, "--nz", 4,
        "--likelihood", "logistic", "--batch-size", 16, "--device", "cpu"]
DCGAN_SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4,
               "--device", "cpu"]


# ----------------------------------------------------------------------------------------------
# The paper's settings
# ----------------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = vae.Config()
    assert (cfg.arch, cfg.likelihood, cfg.hidden, cfg.nz, cfg.batch_size) == ("mlp", "bernoulli", 500, 20, 100)
    assert (cfg.lr, cfg.prior_precision, cfg.init_std, cfg.k) == (0.02, 1.0, 0.01, 5000)


def test_parameter_counts():
    """The paper's MLP, 784-500-20 (W1..W5 and their biases), and at 400 hidden units pytorch/examples' vae
    (fc1 784-400, fc21/fc22 400-20, fc3 20-400, fc4 400-784)."""
    model = vae.build(vae.Config(), "cpu")
    assert common.count_parameters(model) == 815_824
    assert common.count_parameters(vae.build(vae.Config(hidden=400), "cpu")) == 652_824
    assert [m.weight.shape for m in model.modules() if isinstance(m, torch.nn.Linear)] == \
        [(500, 784), (40, 500), (500, 20), (784, 500)]
    assert isinstance(model.encoder.hidden, torch.nn.Linear) and model.encoder.hidden.in_features == 784
    mu, logvar = model.encode(torch.rand(3, 1, 28, 28))
    assert mu.shape == logvar.shape == (3, 20) and model.decode(mu).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("size", [16, 28, 32, 64])
def test_conv_shapes(size):
    model = vae.build(vae.Config(dataset="synthetic-rgb", arch="conv", nf=4, nz=3, image_size=size,
                                 likelihood="gaussian"), "cpu")
    mu, logvar = model.encode(torch.rand(2, 3, size, size))
    assert mu.shape == (2, 3) and model.decode(mu).shape == (2, 6, size, size)   # mean and log-variance
    with pytest.raises(common.UserError, match="--image-size 24"):
        vae.ladder(24)


def test_initialisation_is_normal_0_01():
    torch.manual_seed(0)
    p = torch.cat([q.detach().flatten() for q in vae.build(vae.Config(), "cpu").parameters()])
    assert abs(p.mean()) < 1e-4 and p.std() == pytest.approx(0.01, rel=0.01)


def test_optimizer_is_adagrad_and_its_weight_decay_is_the_prior():
    """Adagrad with the paper's step size; the weight matrices decay by 1 / N, which is the gradient of
    -log N(theta; 0, I) / N: one step equals plain Adagrad on loss + |W|^2 / (2 N)."""
    cfg = vae.Config(dataset="synthetic", image_size=8, hidden=16, nz=2)
    torch.manual_seed(0)
    a, b = vae.build(cfg, "cpu"), vae.build(cfg, "cpu")
    b.load_state_dict(a.state_dict())
    opt = vae.make_optimizer(a, cfg, 600, torch.device("cpu"))
    assert type(opt) is torch.optim.Adagrad
    weights, others = opt.param_groups
    assert weights["weight_decay"] == pytest.approx(1 / 600) and others["weight_decay"] == 0
    assert all(p.ndim == 2 for p in weights["params"]) and all(p.ndim == 1 for p in others["params"])
    for g in opt.param_groups:
        assert (g["lr"], g["eps"], g["lr_decay"], g["initial_accumulator_value"]) == (0.02, 1e-10, 0, 0)
    plain = torch.optim.Adagrad(b.parameters(), lr=0.02)
    x = torch.rand(16, 1, 8, 8).bernoulli()
    for model, o, prior in ((a, opt, 0.0), (b, plain, 1.0)):
        torch.manual_seed(1)
        log_px, kl = model(x)
        loss = (kl - log_px).mean() + prior * sum((p ** 2).sum() for p in model.parameters() if p.ndim > 1) / 1200
        o.zero_grad()
        loss.backward()
        o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_train_step_binarizes_afresh_and_descends_the_mean_negative_elbo():
    """One step: the minibatch binarized anew from torch's generator, then the gradient of the minibatch's mean
    -ELBO (eq. 8 with M = 100 in the paper; a sum would make the weight-decay prior M times weaker)."""
    cfg = vae.Config(dataset="synthetic", image_size=8, hidden=16, nz=2)
    torch.manual_seed(0)
    model = vae.build(cfg, "cpu")
    twin = vae.build(cfg, "cpu")
    twin.load_state_dict(model.state_dict())
    x = torch.rand(16, 1, 8, 8)                                     # grey levels in [0, 1]
    torch.manual_seed(1)   # train_step's draws, in its order: the binarization, then eps
    log_px, kl = twin(torch.bernoulli(x))
    grads = torch.autograd.grad((kl - log_px).mean(), list(twin.parameters()))
    torch.manual_seed(1)
    loss = vae.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), x, cfg)["neg_elbo"]
    assert loss.item() == pytest.approx((kl - log_px).mean().item(), rel=1e-6)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)


def test_amp_draws_eps_and_forms_z_in_float32():
    """Under bf16 autocast (--amp on a CPU or an A100) the encoder runs in bf16, but eps ~ N(0, I) and
    z = mu + sigma eps are float32: 8 mantissa bits would round the reparameterization noise."""
    cfg = vae.Config(dataset="synthetic", image_size=8, hidden=16, nz=2)
    model = vae.build(cfg, "cpu")
    seen = []
    model.decoder.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.encode(torch.rand(4, 1, 8, 8))[0].dtype == torch.bfloat16
        model(torch.rand(4, 1, 8, 8))
    assert seen == [torch.float32]


# ----------------------------------------------------------------------------------------------
# The bound
# ----------------------------------------------------------------------------------------------
def test_kl_closed_form_against_monte_carlo():
    """Appendix B's KL(q || N(0, I)) against E_q[log q(z) - log p(z)] from 400,000 samples (within 5 standard
    errors) and against torch.distributions."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(4, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(4, 3, generator=g, dtype=torch.float64)
    closed = vae.kl_divergence(mu, logvar)
    q, p = Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(closed, kl_divergence(q, p).sum(-1))
    z = q.sample((400_000,))
    terms = (q.log_prob(z) - p.log_prob(z)).sum(-1)                     # 400000 x 4
    se = terms.std(0) / math.sqrt(len(terms))
    assert ((terms.mean(0) - closed).abs() < 5 * se).all(), (terms.mean(0), closed, se)
    assert (closed > 0).all() and vae.kl_divergence(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0


def test_likelihoods():
    """Bernoulli: x l - softplus(l) is BCE on sigmoid(l). Gaussian: the normal density of the dequantized pixels,
    less the log 256 width of each pixel's bin. Logistic: the 256 probabilities of a pixel sum to 1, and each
    is a difference of logistic CDFs (float64 reference)."""
    torch.manual_seed(0)
    x = torch.rand(3, 2, 4, 4).bernoulli()
    logits = torch.randn(3, 2, 4, 4) * 3
    b = vae.VAE(torch.nn.Identity(), torch.nn.Identity(), 2, "bernoulli")
    want = -F.binary_cross_entropy(torch.sigmoid(logits.double()), x.double(), reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(b.log_px(x, logits).double(), want, rtol=1e-5, atol=1e-4)
    out = torch.randn(3, 4, 4, 4)
    x = torch.rand(3, 2, 4, 4)
    g = vae.VAE(torch.nn.Identity(), torch.nn.Identity(), 2, "gaussian")
    want = Normal(torch.sigmoid(out[:, :2]), torch.exp(0.5 * out[:, 2:])).log_prob(x).sum((1, 2, 3))
    want = want - 32 * math.log(256)
    torch.testing.assert_close(g.log_px(x, out), want)
    assert g.mean(out).shape == x.shape
    k = torch.arange(256, dtype=torch.float32).view(256, 1, 1, 1) / 255
    for mean, log_scale in ((0.3, -3.0), (0.0, -6.0), (1.2, 0.5), (128 / 255, -9.0)):
        lp = vae.discretized_logistic_log_prob(k, torch.tensor(mean), torch.tensor(log_scale)).double()
        assert torch.isfinite(lp).all() and lp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
        kk = k.double().flatten()[1:-1]
        a, b = (kk + 1 / 510 - mean) / math.exp(log_scale), (kk - 1 / 510 - mean) / math.exp(log_scale)
        # a difference of CDFs below the mean, of survival functions above it: no cancellation near 1
        direct = torch.where(kk < mean, torch.sigmoid(a) - torch.sigmoid(b),
                             torch.sigmoid(-b) - torch.sigmoid(-a)).log()
        ok = direct > -50   # where float64 still resolves the difference
        torch.testing.assert_close(lp.flatten()[1:-1][ok], direct[ok], rtol=1e-4, atol=1e-4)


def test_observe_binarizes_afresh_and_the_test_set_once():
    x = torch.full((20_000, 1, 2, 2), 0.3)
    a, b = vae.observe(x, "bernoulli"), vae.observe(x, "bernoulli")
    assert set(a.unique().tolist()) == {0.0, 1.0} and not torch.equal(a, b)
    assert a.mean().item() == pytest.approx(0.3, abs=0.005)
    d = vae.observe(torch.tensor([0.0, 1.0, 128 / 255]), "gaussian")
    assert (d >= torch.tensor([0, 255, 128]) / 256).all() and (d < torch.tensor([1, 256, 129]) / 256).all()
    u = vae.observe(torch.full((20_000,), 128 / 255), "gaussian") * 256 - 128   # u ~ U[0, 1), fresh each time
    assert u.mean().item() == pytest.approx(0.5, abs=0.01) and u.var().item() == pytest.approx(1 / 12, rel=0.05)
    t1 = vae.test_images(vae.Config(dataset="synthetic", seed=0), 10)[0]
    t2 = vae.test_images(vae.Config(dataset="synthetic", seed=7), 10)[0]
    assert torch.equal(t1, t2) and set(t1.unique().tolist()) <= {0.0, 1.0}


@pytest.fixture(scope="module")
def trained():
    """A 1-D latent VAE trained 30 steps on the synthetic disks, and 24 binarized test images."""
    cfg = vae.Config(dataset="synthetic", image_size=8, hidden=32, nz=1, batch_size=32)
    torch.manual_seed(0)
    model = vae.build(cfg, "cpu")
    opt = vae.make_optimizer(model, cfg, 256, torch.device("cpu"))
    batches = common.Batches(common.load_images("synthetic", "data", 8), 32, 0, torch.device("cpu"), (0.0, 1.0))
    for _ in range(30):
        vae.train_step(model, opt, batches.next(), cfg)
    return model.eval(), vae.test_images(cfg, 24)[0]


def exact_log_px(model, x, n=8001, width=8.0):
    """log p(x) = log integral p(x | z) N(z; 0, 1) dz on a grid of n points over [-width, width] (z is 1-D), and
    the exact ELBO = integral q(z | x) [log p(x | z) + log p(z) - log q(z | x)] dz on the same grid, in float64."""
    z = torch.linspace(-width, width, n, dtype=torch.float64)
    with torch.no_grad():
        log_px_z = model.log_px(x, model.decode(z.float().view(n, 1)).unsqueeze(1)).double()   # n x B
        mu, logvar = (t.double().view(1, -1) for t in model.encode(x))
    log_pz = Normal(0.0, 1.0).log_prob(z).view(n, 1)
    dz = z[1] - z[0]
    log_p = torch.logsumexp(log_px_z + log_pz, 0) + dz.log()
    log_q = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z.view(n, 1))
    elbo = (log_q.exp() * (log_px_z + log_pz - log_q)).sum(0) * dz
    return log_p, elbo


def test_iwae_and_elbo_against_the_exact_likelihood(trained):
    """With z in 1-D, log p(x) and the ELBO are integrals, computed exactly on a grid. The estimates of ``bounds``
    agree with them: -ELBO (k = 5000 samples of log p(x | z)) matches, and is above -L_5000 (IWAE), which is close
    above -log p(x). -L_k is non-increasing in k (Burda et al., Theorem 1): its mean over the images and over
    5000 / k repetitions drops by more than 0.15 nats at each step k = 1, 5, 50, 500 (fixed seeds)."""
    model, x = trained
    log_p, elbo = exact_log_px(model, x)
    assert (elbo < log_p).all()                                   # the gap is KL(q(z | x) || p(z | x)) > 0
    assert (log_p - elbo).mean() > 1, "the test needs a posterior that q does not match"
    neg_elbo, nll = vae.bounds(model, x, 5000, torch.Generator().manual_seed(0))
    torch.testing.assert_close(neg_elbo.double(), -elbo, rtol=0, atol=0.15)
    assert (neg_elbo > nll).all()
    assert 0 < (nll.double() + log_p).mean() < 0.1                  # a lower bound on log p(x), nearly tight
    means = []
    for k in (1, 5, 50, 500):
        reps = 5000 // k
        nll_k = vae.bounds(model, x.repeat(reps, 1, 1, 1), k, torch.Generator().manual_seed(k))[1]
        means.append(nll_k.mean().item())
    assert all(a > b + 0.15 for a, b in zip(means, means[1:])), means
    assert means[0] == pytest.approx(-elbo.mean().item(), abs=0.03)   # L_1 is the ELBO (in expectation)


def test_test_nll_is_the_mean_of_the_bounds(trained):
    model, x = trained
    scores = vae.test_nll(model, x, 50, batch=10, seed=3)
    g = torch.Generator().manual_seed(3)
    parts = [vae.bounds(model, x[i:i + 10], 50, g) for i in range(0, 24, 10)]
    assert scores["test_neg_elbo"] == pytest.approx(torch.cat([p[0] for p in parts]).mean().item(), rel=1e-6)
    assert scores["test_nll"] == pytest.approx(torch.cat([p[1] for p in parts]).mean().item(), rel=1e-6)
    assert vae.test_nll(model, x, 50, should_stop=lambda: True) is None


def test_figures(trained):
    """Reconstructions pair inputs and decoded posterior means; each interpolation row goes from x_a through the
    decodes of mu_a ... mu_b to x_b; the manifold's centre (odd n) decodes z = 0, its corners +-Phi^-1 of 1/(2n)."""
    model, x = trained
    dec = lambda z: model.mean(model.decode(z))                                    # noqa: E731
    with torch.no_grad():
        mu = model.encode(x)[0]
        r = vae.reconstructions(model, x, rows=2, per_row=5)
        torch.testing.assert_close(r[:5], x[:5])
        torch.testing.assert_close(r[5:10], dec(mu[:5]))
        w = vae.interpolation(model, x, rows=3, steps=4).view(3, 6, *x.shape[1:])
        torch.testing.assert_close(w[:, 0], x[:3])
        torch.testing.assert_close(w[:, 1], dec(mu[:3]))
        torch.testing.assert_close(w[:, 4], dec(mu[3:6]))
        torch.testing.assert_close(w[:, 5], x[3:6])
    model2 = vae.build(vae.Config(dataset="synthetic", image_size=8, hidden=8, nz=2), "cpu")
    c = Normal(0.0, 1.0).icdf(torch.tensor(0.1)).item()                         # Phi^-1(1 / (2 n)), n = 5
    with torch.no_grad():
        m = vae.manifold(model2, n=5)
        corners = model2.mean(model2.decode(torch.tensor([[0.0, 0.0], [-c, c], [c, -c]])))
    assert m.shape == (25, 1, 8, 8)
    torch.testing.assert_close(m[[12, 0, 24]], corners)


# ----------------------------------------------------------------------------------------------
# The shared contract
# ----------------------------------------------------------------------------------------------
def test_smoke(tmp):
    check_smoke("vae", SMALL, tmp)
    ckpt = load(tmp / "smoke" / "ckpt.pt")
    groups = ckpt["optimizers"]["vae"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [pytest.approx(1 / 256), 0.0]   # 256 synthetic training images
    assert all("sum" in s for s in ckpt["optimizers"]["vae"]["state"].values())   # Adagrad's accumulators


def test_exact_resume(tmp):
    """The MLP with dynamic binarization: the binary images drawn at each step continue exactly too."""
    check_exact_resume("vae", SMALL, tmp)


def test_sigterm_conv_logistic_resumes_exactly(tmp):
    check_signal_resume("vae", CONV, tmp, signal.SIGTERM)


def test_sample_and_figures(tmp):
    check_sample("vae", SMALL, tmp)
    run_script("vae", "--out", tmp / "to-sample", "--sample", 2, "--figures", cwd=tmp)
    from PIL import Image
    out = tmp / "to-sample"
    assert Image.open(out / "reconstructions.png").size == (10 * 10 + 2, 8 * 10 + 2)
    assert Image.open(out / "interpolation.png").size == (12 * 10 + 2, 8 * 10 + 2)
    assert Image.open(out / "manifold.png").size == (20 * 10 + 2, 20 * 10 + 2)   # --nz 2


def test_bad_inputs(tmp):
    check_bad_inputs("vae", SMALL, "dcgan", DCGAN_SMALL, tmp)


def test_bad_flags(tmp):
    from PIL import Image
    (tmp / "imgs").mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(tmp / "imgs" / f"{i}.png")
    check_bad_flags("vae", SMALL, tmp, [
        (["--arch", "conv", "--image-size", 24], ["--image-size 24"]), (["--likelihood", "normal"], ["--likelihood"]),
        (["--figures"], ["--figures goes with --sample"]), (["--nll", 3, "--sample", 2], ["two commands"]),
        (["--k", 0], ["--k 0"]), (["--lr", 0], ["--lr 0", "above 0"]),
        (["--dataset", "folder", "--data-root", "nowhere"], ["--data-root nowhere"]),
        (["--dataset", "folder", "--data-root", tmp / "imgs", "--eval-every", 2], ["no test split", "--eval-nll 0"])])


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    """Gaussian likelihood: each process dequantizes its own slice with its own generator."""
    check_ddp("vae", [*SMALL, "--likelihood", "gaussian"], tmp)


def test_nll_command_and_eval_every(tmp):
    """--eval-every logs the test bounds (FID off: no Inception weights here); --nll N prints the same numbers
    for the same weights; -ELBO >= the IWAE estimate."""
    out = tmp / "bound"
    run_script("vae", *SMALL, "--steps", 4, "--eval-every", 2, "--eval-nll", 5, "--k", 64, "--eval-features",
               "inception", "--out", out, cwd=tmp, env={"TORCH_HOME": str(tmp / "no-weights")})
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("test_nll")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(float(r["test_neg_elbo"]) > float(r["test_nll"]) > 0 for r in rows)
    proc = run_script("vae", "--out", out, "--nll", 5, "--k", 64, cwd=tmp)
    words = proc.stdout.split("test_neg_elbo: ")[1].split()
    assert float(words[0]) == pytest.approx(float(rows[-1]["test_neg_elbo"]), rel=1e-5)
    assert float(words[2]) == pytest.approx(float(rows[-1]["test_nll"]), rel=1e-5)


def test_load_from_python(tmp):
    run_script("vae", *SMALL, "--steps", 1, "--out", tmp / "run", cwd=tmp)
    model = vae.load(tmp / "run" / "ckpt.pt")
    saved = load(tmp / "run" / "ckpt.pt")["models"]["vae"]
    assert not model.training and all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    images = vae.sample(model, 3)
    assert images.shape == (3, 1, 8, 8) and 0 <= images.min() and images.max() <= 1


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


# ----------------------------------------------------------------------------------------------
# --conditional: the generative model M2 of Kingma, Rezende, Mohamed & Welling 2014
# ----------------------------------------------------------------------------------------------
M2 = ["--dataset", "synthetic", "--image-size", 16, "--hidden", 64, "--nz", 4, "--batch-size", 32, "--device", "cpu",
      "--conditional"]


def test_m2_gives_the_class_one_hot_to_the_encoder_and_the_decoder():
    """q(z | x, y) and p(x | y, z): the paper's MLPs with K more inputs each, so 2 K hidden more weights."""
    plain = vae.build(vae.Config(), "cpu")
    m2 = vae.build(vae.Config(conditional=True), "cpu")
    assert common.count_parameters(m2) - common.count_parameters(plain) == 2 * 10 * 500
    x, z = torch.rand(2, 1, 28, 28), torch.randn(2, 20)
    a, b = m2.decode(z, torch.tensor([0, 0])), m2.decode(z, torch.tensor([3, 3]))
    assert not torch.allclose(a, b) and not torch.allclose(m2.encode(x, torch.tensor([0, 0]))[0],
                                                           m2.encode(x, torch.tensor([5, 5]))[0])


def test_m2_used_as_a_classifier_is_far_above_chance(tmp):
    """After a short training on the synthetic data (4 classes: the quadrant of the disk), argmax_y p(x | y) (IWAE
    bounds, a uniform p(y)) classifies held-out images far above chance (a model that ignores y scores 1/4),
    and -log p(x | y_true) is below -log p(x | y_wrong) for most images."""
    run_script("vae", *M2, "--steps", 1500, "--log-every", 1500, "--out", tmp / "m2", cwd=tmp)
    model = vae.load(tmp / "m2" / "ckpt.pt")
    x, y = vae.test_images(vae.Config(dataset="synthetic", image_size=16), 64)
    nll = vae.class_nll(model, x, k=50)
    assert (nll.argmin(1) == y).float().mean() > 0.7
    wrong = (y + 1 + torch.randint(3, y.shape)) % 4
    assert (nll.gather(1, y[:, None]) < nll.gather(1, wrong[:, None])).float().mean() > 0.7
    proc = run_script("vae", "--out", tmp / "m2", "--nll", 64, "--k", 50, cwd=tmp)
    assert float(proc.stdout.split("test_accuracy: ")[1].split()[0]) > 0.7


def test_m2_sample_writes_each_class_alike_with_its_labels(tmp):
    check_conditional_sample("vae", [*SMALL, "--conditional"], tmp)


def test_m2_samples_of_class_c_are_classified_c(tmp):
    """VAE samples are the blurred means of p(x | y, z): 0.66 after 1,500 steps (chance 0.25)."""
    check_samples_are_of_their_class("vae", M2, tmp, steps=1500, at_least=0.5)


def test_m2_resumes_exactly(tmp):
    check_exact_resume("vae", [*SMALL, "--conditional"], tmp)
