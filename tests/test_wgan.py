"""wgan.py: Algorithm 1 (clipping, n_critic, RMSProp), the authors' critic schedule and networks, the CLI contract."""
import signal

import pytest
import torch
import torch.nn as nn

import common
import wgan
from conftest import (assert_same_state, check_bad_flags, check_bad_inputs, check_ddp, check_exact_resume, check_sample,
                      check_signal_resume, check_smoke, load, run_script)

# burst off and n_critic 2 keep the contract checks fast; the burst has its own tests below
SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4, "--device", "cpu",
         "--n-critic", 2, "--no-critic-burst"]
GP_SMALL = ["--dataset", "synthetic", "--image-size", 16, "--batch-size", 16, "--ngf", 4, "--ndf", 4, "--device", "cpu",
            "--n-critic", 1]


def test_defaults_are_the_papers():
    cfg = wgan.Config()
    assert (cfg.lr, cfg.clip, cfg.batch_size, cfg.n_critic, cfg.critic_burst) == (5e-5, 0.01, 64, 5, True)
    assert (cfg.nz, cfg.ngf, cfg.ndf, cfg.leak, cfg.init_std, cfg.image_size) == (100, 64, 64, 0.2, 0.02, 64)


def test_parameter_counts_match_the_authors_dcgan():
    """models/dcgan.py of martinarjovsky/WassersteinGAN: DCGAN_G and DCGAN_D at 64 x 64 x 3, ngf = ndf = 64."""
    G, critic = wgan.Generator(100, 64, 3, 64), wgan.Critic(64, 3, 64, 0.2)
    assert common.count_parameters(G) == 3_576_704
    assert common.count_parameters(critic) == 2_765_568
    d = list(critic.net)
    assert isinstance(d[0], nn.Conv2d) and isinstance(d[1], nn.LeakyReLU)             # no BN on the input
    assert isinstance(d[-1], nn.Conv2d) and d[-1].out_channels == 1                     # no sigmoid
    assert critic(G(torch.randn(3, 100))).shape == (3,)


def test_z_is_standard_normal():
    z = wgan.sample_z(20_000, 100, "cpu")
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01


def test_critic_iterations_follow_the_authors_schedule():
    cfg = wgan.Config()
    n = {step: wgan.critic_iterations(step, cfg) for step in (0, 1, 24, 25, 26, 499, 500, 501, 999, 1000, 12_500)}
    assert n == {0: 100, 1: 100, 24: 100, 25: 5, 26: 5, 499: 5, 500: 100, 501: 5, 999: 5, 1000: 100, 12_500: 100}
    off = wgan.Config(critic_burst=False, n_critic=3)
    assert {wgan.critic_iterations(s, off) for s in (0, 24, 500, 1000)} == {3}


class Stream:
    """A data stream that counts the batches drawn."""

    def __init__(self, batch, drift=0.01):
        self.batch, self.drift, self.drawn = batch, drift, 0

    def next(self):
        self.drawn += 1
        return self.batch + self.drift * self.drawn


def tiny():
    cfg = wgan.Config(dataset="synthetic", image_size=16, batch_size=8, ngf=4, ndf=4)
    torch.manual_seed(0)
    G, critic = wgan.build(cfg, "cpu")
    return cfg, G, critic, *(torch.optim.RMSprop(m.parameters(), lr=cfg.lr) for m in (G, critic))


def test_each_critic_step_clips_and_n_critic_steps_are_counted():
    """n critic optimizer steps, each on its own real batch, one generator step; every critic that is evaluated
    after a critic step (the next critic iteration's, G's update's) has all its weights in [-c, c]."""
    cfg, G, critic, opt_G, opt_critic = tiny()
    with torch.no_grad():
        for w in critic.parameters():
            w.normal_(0, 1)      # far outside [-0.01, 0.01]: the clipping has work to do
    steps, seen = {"G": 0, "critic": 0}, []
    opt_G.register_step_post_hook(lambda *_: steps.__setitem__("G", steps["G"] + 1))
    opt_critic.register_step_post_hook(lambda *_: steps.__setitem__("critic", steps["critic"] + 1))
    critic.register_forward_pre_hook(lambda m, _: seen.append(max(w.abs().max().item() for w in m.parameters())))
    data = Stream(torch.rand(8, 1, 16, 16) * 2 - 1)
    for n in (7, 1):
        before = dict(steps)
        wgan.train_step(G, critic, opt_G, opt_critic, data, n, cfg)
        assert steps["critic"] - before["critic"] == n and steps["G"] - before["G"] == 1
    assert data.drawn == 8
    assert seen[0] > 0.5 and seen[1] > 0.5, "the first critic iteration sees the unclipped weights (2 calls)"
    assert all(m <= cfg.clip for m in seen[2:]) and len(seen) == 2 * 8 + 2
    assert all(w.abs().max() <= cfg.clip for w in critic.parameters())


class Linear(nn.Module):
    """f_w(x) = w mean(x): one weight, a known estimate."""

    def __init__(self, w=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return self.w * x.flatten(1).mean(1)


class Constant(nn.Module):
    """g_theta(z) = b everywhere."""

    def __init__(self, b, nz=3):
        super().__init__()
        self.b, self.nz = nn.Parameter(torch.tensor(b)), nz

    def forward(self, z):
        return self.b * torch.ones(len(z), 1, 4, 4)


def test_critic_ascends_the_estimate_up_to_the_clip_and_g_descends_minus_f():
    """Real images 1, generated -1, f_w(x) = w mean(x): the estimate is 2w; the critic's first step (w = 0,
    a large lr) overshoots c and is clipped, so the second iteration's estimate is exactly 2c, and G's loss
    -f(G(z)) = c before its step, which raises b."""
    cfg = wgan.Config(nz=3, lr=0.1, batch_size=4)
    G, critic = Constant(-1.0), Linear()
    opt_G, opt_critic = torch.optim.RMSprop(G.parameters(), lr=0.1), torch.optim.RMSprop(critic.parameters(), lr=0.1)
    losses = wgan.train_step(G, critic, opt_G, opt_critic, Stream(torch.ones(4, 1, 4, 4), drift=0), 2, cfg)
    assert critic.w.item() == pytest.approx(cfg.clip)
    assert losses["W_estimate"].item() == pytest.approx(2 * cfg.clip, abs=1e-6)
    assert losses["loss_G"].item() == pytest.approx(cfg.clip, abs=1e-6)
    assert G.b.item() > -1.0


def test_critic_burst_counted_across_a_resume(tmp):
    """The default schedule (burst on, n_critic 5) through the CLI: 1 step, resume to 2, bit-identical to 2 steps
    straight, 2 x 100 batches drawn; then resumed from step 24 (the burst's last) and from step 499 (before
    the 500th): 100 + 5 and 5 + 100 batches, counted by the data position."""
    cli = SMALL[:-3]
    split, straight = tmp / "split", tmp / "straight"
    run_script("wgan", *cli, "--steps", 1, "--out", split, cwd=tmp)
    run_script("wgan", "--resume", "--steps", 2, "--out", split, cwd=tmp)
    run_script("wgan", *cli, "--steps", 2, "--out", straight, cwd=tmp)
    ckpt = load(split / "ckpt.pt")
    assert_same_state(load(straight / "ckpt.pt"), ckpt)
    per_epoch = 256 // 16
    drawn = lambda c: c["data"]["train"]["epoch"] * per_epoch + c["data"]["train"]["index"]  # noqa: E731
    assert drawn(ckpt) == 200
    for start, expected in ((24, 100 + 5), (499, 5 + 100)):
        out = tmp / f"from{start}"
        out.mkdir()
        torch.save({**ckpt, "step": start}, out / "ckpt.pt")   # the same state, at generator iteration `start`
        proc = run_script("wgan", "--resume", "--steps", start + 2, "--out", out, cwd=tmp)
        assert f"training from step {start} (resumed)" in proc.stdout
        assert drawn(load(out / "ckpt.pt")) - drawn(ckpt) == expected


def test_smoke_and_the_optimizer_is_the_papers(tmp):
    check_smoke("wgan", SMALL, tmp)
    ckpt = load(tmp / "smoke" / "ckpt.pt")
    for name in ("G", "critic"):
        opt = ckpt["optimizers"][name]
        assert {k: opt["param_groups"][0][k] for k in ("lr", "alpha", "eps", "momentum", "centered", "weight_decay")} \
            == {"lr": 5e-5, "alpha": 0.99, "eps": 1e-8, "momentum": 0, "centered": False, "weight_decay": 0}
        assert set(opt["state"][0]) == {"step", "square_avg"}, "RMSProp, not Adam"
    critic = wgan.Critic(4, 1, 16, 0.2)
    critic.load_state_dict(ckpt["models"]["critic"])
    assert all(w.abs().max() <= 0.01 for w in critic.parameters())
    with open(tmp / "smoke" / "metrics.csv") as f:
        assert f.readline().strip() == "step,time_s,images_per_s,W_estimate,loss_G"
    G = wgan.load(tmp / "smoke" / "ckpt.pt")
    assert not G.training and G(wgan.sample_z(2, G.nz, "cpu")).shape == (2, 1, 16, 16)


def test_exact_resume(tmp):
    check_exact_resume("wgan", [*SMALL, "--n-critic", 1], tmp)   # 1 batch a step: the check's epoch arithmetic


def test_sigterm_checkpoints_and_resumes_exactly(tmp):
    check_signal_resume("wgan", SMALL, tmp, signal.SIGTERM)


def test_sample(tmp):
    check_sample("wgan", SMALL, tmp)


def test_bad_inputs(tmp):
    check_bad_inputs("wgan", SMALL, "wgan_gp", GP_SMALL, tmp)


def test_bad_flags(tmp):
    check_bad_flags("wgan", SMALL, tmp, [(["--image-size", 48], ["--image-size 48"]),
                                         (["--n-critic", 0], ["--n-critic 0"]), (["--clip", -0.01], ["--clip -0.01"]),
                                         (["--clip", 0], ["--clip 0", "above 0"]),
                                         (["--lr", 0], ["--lr 0", "above 0"])])


def test_ddp_two_processes_stop_together_and_resume_exactly(tmp):
    check_ddp("wgan", SMALL, tmp)
