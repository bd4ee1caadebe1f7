"""Wasserstein GAN.

Martin Arjovsky, Soumith Chintala, Léon Bottou. ICML 2017. arXiv:1701.07875. Results and every command: docs/wgan.md

The generator minimises the Earth-Mover (Wasserstein-1) distance to the data, in its Kantorovich-Rubinstein
dual form (eq. 2, theorem 3):

    W(P_r, P_theta) = sup_{||f||_L <= 1} E_{x ~ P_r}[f(x)] - E_{z ~ p(z)}[f(g_theta(z))],

the supremum approximated by a "critic" f_w, a network whose weights are clipped to a compact set
W = [-c, c]^d so that the f_w are K-Lipschitz for some K (the distance is then known up to the factor K).
The critic has no sigmoid and no log: its loss is the estimate itself, which is logged as W_estimate, the
curve that tracks the quality of the samples (section 4.2, Figure 3).

Algorithm 1 (defaults alpha = 0.00005, c = 0.01, m = 64, n_critic = 5):
    while theta has not converged:
        for t = 1..n_critic:
            (3)  sample {x_i} ~ P_r, a batch of m real images          (each critic iteration its own batch)
            (4)  sample {z_i} ~ p(z), m prior samples
            (5)  g_w <- grad_w [1/m sum f_w(x_i) - 1/m sum f_w(g_theta(z_i))]
            (6)  w <- w + alpha RMSProp(w, g_w)                         (gradient ascent on the estimate)
            (7)  w <- clip(w, -c, c)
        (9)  sample {z_i} ~ p(z)
        (10) g_theta <- -grad_theta 1/m sum f_w(g_theta(z_i))
        (11) theta <- theta - alpha RMSProp(theta, g_theta)

Networks (section 4, DCGAN generator and critic): the authors' models/dcgan.py, which at 64 x 64 are exactly
pytorch/examples' DCGAN networks (3,576,704 and 2,765,568 parameters for 3 channels, ngf = ndf = 64; tested),
batch normalization in both except G's output and the critic's input, the critic's last layer a linear output
without sigmoid. Other --image-size values keep the same blocks as dcgan.py: 4 x 4 -> ... -> size for powers
of two, 7 x 7 -> 14 -> 28 for 28 x 28 MNIST-like images. Weights N(0, 0.02), batch norm scales N(1, 0.02)
(the authors' weights_init); z ~ N(0, I) of dimension 100 (their main.py; DCGAN drew z uniformly).

Deviations and choices, each deliberate:
- --critic-burst (default on): 100 critic iterations at generator iterations 0..24 and every 500th, as the
  authors' main.py does (not in the paper); --no-critic-burst is Algorithm 1 as printed.
- Algorithm 1 prints "for t = 0, ..., n_critic" (n_critic + 1 iterations); we run n_critic, as the authors' code.
- Clipping after each critic update (line 7), of every parameter, batch norm's included; the authors' code
  clamps before each update instead, so that G's update meets the last critic update unclipped.
- The critic's batch norm sees the real and the generated batches in two separate calls, as theirs.
- The critic draws from a continuous stream that crosses epochs (theirs stops early at an epoch's end).
- We keep the paper's sign (their code minimises f(x) - f(g(z))): W_estimate = mean f(x) - mean f(g(z)) of
  the last critic iteration of each generator iteration, their log's -Loss_D.
- Sample grids and --sample use G in eval mode (their main.py draws with G in training mode).
- --steps 20000 generator iterations (about 110 Fashion-MNIST epochs of critic batches) is our default.

Usage (every command, the results and the speed: docs/wgan.md):
    python wgan.py                                    # Fashion-MNIST resized to 64 x 64
    python wgan.py --resume                           # continue runs/wgan-fashion-mnist (a requeued job too)
    sbatch submit.sh wgan                             # on SLURM, requeued until done (GPUS=4: torchrun, DDP)
    python wgan.py --sample 10000 --sample-out wgan.npz   # images for fid.py
    python wgan.py --dataset folder --data-root ~/lsun-bedroom   # any folder of images (the paper: LSUN)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

import common
import fid
from common import arg


@dataclass
class Config(common.ImageConfig):
    steps: int = arg(20_000, "generator iterations (each with n_critic critic iterations)", run=True, min=0)
    # Paper hyper-parameters (Algorithm 1, section 4)
    image_size: int = arg(64, "28, or a power of two >= 16 (64: the paper's LSUN)", min=16)
    batch_size: int = arg(64, "m, the minibatch of every critic and generator iteration", min=1)
    lr: float = arg(5e-5, "alpha, the RMSProp learning rate of both networks", above=0)
    clip: float = arg(0.01, "c: the critic's weights are clipped to [-c, c] after each of its updates", above=0)
    n_critic: int = arg(5, "critic iterations per generator iteration", min=1)
    critic_burst: bool = arg(True, "100 critic iterations at the first 25 and every 500th generator iteration "
                             "(the authors' main.py)")
    nz: int = arg(100, "dimension of z ~ N(0, I)", min=1)
    ngf: int = arg(64, "G's channels at its last hidden layer (doubled at each block towards z)", min=1)
    ndf: int = arg(64, "the critic's channels at its first layer (doubled at each block)", min=1)
    leak: float = arg(0.2, "LeakyReLU slope in the critic", min=0)
    init_std: float = arg(0.02, "standard deviation of the N(0, std) weight initialisation", above=0)
    channels_last: bool = arg(False, "NHWC memory layout for the convolutions (faster with --amp)", run=True)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
def ladder(image_size: int) -> tuple[int, int]:
    """(first feature map size, number of stride-2 blocks) that reach image_size."""
    base = 7 if image_size == 28 else 4
    n = math.log2(image_size / base)
    if n < 2 or n != int(n):
        raise common.UserError(f"--image-size {image_size} is not supported: use 28 or a power of two >= 16")
    return base, int(n)


class Generator(nn.Module):
    """z -> image through fractional-strided convolutions. At 64 x 64 (the WGAN authors' DCGAN_G):

        z 100 x 1 x 1 -> 512 x 4 x 4 -> 256 x 8 x 8 -> 128 x 16 x 16 -> 64 x 32 x 32 -> 3 x 64 x 64
    """

    def __init__(self, nz: int, ngf: int, channels: int, image_size: int):
        super().__init__()
        self.nz = nz
        base, n = ladder(image_size)
        ch = ngf * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(nz, ch, base, 1, 0, bias=False),           # ch x base x base
                  nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),     # ch/2 x 2H x 2W
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False),        # channels x size x size
                   nn.Tanh()]                                                   # no BN on G's output
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z.view(*z.shape, 1, 1))


class Critic(nn.Module):
    """image -> f_w(image), a real number, through strided convolutions. At 64 x 64 (the WGAN authors' DCGAN_D):

        3 x 64 x 64 -> 64 x 32 x 32 -> 128 x 16 x 16 -> 256 x 8 x 8 -> 512 x 4 x 4 -> 1 x 1 x 1
    """

    def __init__(self, ndf: int, channels: int, image_size: int, leak: float):
        super().__init__()
        base, n = ladder(image_size)
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False),                 # ndf x size/2 x size/2
                  nn.LeakyReLU(leak, True)]                                     # no BN on the critic's input
        ch = ndf
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),               # 2ch x H/2 x W/2
                       nn.BatchNorm2d(ch * 2), nn.LeakyReLU(leak, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, base, 1, 0, bias=False)]                    # 1 x 1 x 1: f_w(x), no sigmoid
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


def init_weights(module: nn.Module, std: float) -> None:
    """The WGAN authors' weights_init: weights from N(0, 0.02); batch norm scales N(1, 0.02) and shifts 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def sample_z(n: int, nz: int, device, generator=None):
    """z ~ N(0, I)^nz (the authors' main.py: noise.normal_(0, 1))."""
    return torch.randn(n, nz, device=device, generator=generator)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def critic_iterations(step: int, cfg: Config) -> int:
    """Critic iterations at generator iteration ``step`` (0-based): 100 at 0..24 and at every 500th with
    --critic-burst (the authors' main.py: "if gen_iterations < 25 or gen_iterations % 500 == 0"), else
    n_critic. A function of the step alone, so a resumed run continues the same schedule."""
    if cfg.critic_burst and (step < 25 or step % 500 == 0):
        return 100
    return cfg.n_critic


@torch.no_grad()
def clip_weights(critic: nn.Module, c: float) -> None:
    """Algorithm 1, line 7: w <- clip(w, -c, c), for every parameter of the critic (two calls for them all)."""
    weights = list(critic.parameters())
    torch._foreach_clamp_min_(weights, -c)
    torch._foreach_clamp_max_(weights, c)


def train_step(G, critic, opt_G, opt_critic, batches, n_critic: int, cfg: Config, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict[str, torch.Tensor]:
    """One generator iteration of Algorithm 1, after ``n_critic`` critic iterations, each on its own real
    batch from ``batches``. ``amp``: the autocast dtype (None: float32); ``scaler``: the GradScaler of fp16
    (disabled, it passes the losses and steps through unchanged)."""
    for _ in range(n_critic):
        # (3) a real batch, (4) a prior batch; G is fixed here: no graph through it
        x = batches.next()
        z = sample_z(len(x), cfg.nz, x.device)
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            with torch.no_grad():
                fake = G(z)
            # (5) the estimate of W(P_r, P_theta) and its gradient; (6) ascent on it = descent on its negative
            W_estimate = critic(x).float().mean() - critic(fake).float().mean()
            loss_critic = -W_estimate
        opt_critic.zero_grad(set_to_none=True)
        scaler.scale(loss_critic).backward()
        scaler.step(opt_critic)
        scaler.update()
        # (7) w <- clip(w, -c, c)
        clip_weights(critic, cfg.clip)

    # (9)-(11) Update G: descend -1/m sum f_w(g_theta(z)). The critic's own gradients are not needed here:
    # freezing it skips computing them (and DDP's sync of them).
    critic.requires_grad_(False)
    z = sample_z(len(x), cfg.nz, x.device)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss_G = -critic(G(z)).float().mean()
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(opt_G)
    scaler.update()
    critic.requires_grad_(True)

    return {"W_estimate": W_estimate.detach(), "loss_G": loss_G.detach()}


def build(cfg: Config, device):
    channels = common.dataset_channels(cfg.dataset)
    G = Generator(cfg.nz, cfg.ngf, channels, cfg.image_size).to(device)
    critic = Critic(cfg.ndf, channels, cfg.image_size, cfg.leak).to(device)
    init_weights(G, cfg.init_std)
    init_weights(critic, cfg.init_std)
    return G, critic


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def load(path: str, device="cpu") -> Generator:
    """G of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        G = wgan.load("runs/wgan-fashion-mnist/ckpt.pt")
        images = G(wgan.sample_z(64, G.nz, "cpu"))       # in [-1, 1], 64 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "wgan")
    G = Generator(cfg.nz, cfg.ngf, common.dataset_channels(cfg.dataset), cfg.image_size)
    G.load_state_dict(ckpt["models"]["G"])
    return G.to(device).eval()


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "wgan", ddp)      # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: networks, data, optimizers (Algorithm 1, section 4) ----------------------------------------
    G, critic = build(cfg, device)
    run.say(f"G: {common.count_parameters(G):,} parameters, critic: {common.count_parameters(critic):,} parameters")
    images, _ = common.training_set(cfg)            # --per-class N: the subset augment.py draws
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, rank=ddp.rank, world=ddp.world,
                             memory_format=memory_format)
    G, critic = G.to(memory_format=memory_format), critic.to(memory_format=memory_format)
    G.net[0].to(memory_format=torch.contiguous_format)  # its z is 1 x 1: NCHW (docs/gpu-check.md)
    opt_G = torch.optim.RMSprop(G.parameters(), lr=cfg.lr)
    opt_critic = torch.optim.RMSprop(critic.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    fixed_noise = sample_z(64, cfg.nz, device)      # the same z for every sample grid of the run
    saved = dict(models={"G": G, "critic": critic}, optimizers={"G": opt_G, "critic": opt_critic},
                 data={"train": batches},
                 state={"fixed_noise": fixed_noise, "scaler": scaler})   # what a checkpoint holds
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    G_eval = G                                      # grids and evaluation use the plain module, on rank 0
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        G, critic = (nn.parallel.DistributedDataParallel(m, device_ids=ddp.device_ids) for m in (G, critic))
    if cfg.compile:
        G, critic = torch.compile(G), torch.compile(critic)
    log = common.Log(run, step)
    evaluate = fid.Evaluator(run, images) if cfg.eval_every else None

    def save_samples(step: int) -> None:            # the fixed-noise grid, G in eval mode: drawing changes nothing
        with common.eval_mode(G_eval):
            common.save_grid(G_eval(fixed_noise), run.out / "samples" / f"{step:06d}.png")

    def draw(n: int, generator) -> torch.Tensor:    # --eval-every's samples
        with common.eval_mode(G_eval):
            return G_eval(sample_z(n, cfg.nz, device, generator))

    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        n_critic = critic_iterations(step, cfg)     # n_critic, or 100 during the authors' burst
        losses = train_step(G, critic, opt_G, opt_critic, batches, n_critic, cfg, amp, scaler)
        step += 1
        log.add(losses)
        if step % cfg.log_every == 0:
            log.write(step)
        if step % cfg.sample_every == 0 and ddp.rank == 0:
            save_samples(step)
        best = evaluate is not None and step % cfg.eval_every == 0 and evaluate(step, draw, log, stop)
        if step % cfg.ckpt_every == 0 or best or (cfg.keep_every and step % cfg.keep_every == 0):
            common.save_run(run, step, log, **saved, best=best)
    common.finish(run, step, log, stop, **saved)    # the last checkpoint, then how the run ended
    if ddp.rank == 0 and step > run.start_step and step % cfg.sample_every:
        save_samples(step)                          # and the last step's grid


def sample_command(cfg: Config) -> None:
    """--sample N: N images of the checkpoint's G in --sample-out, split among processes and resumable."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "wgan", ddp, command="--sample")
    stop = common.Stop(ddp)
    G = Generator(cfg.nz, cfg.ngf, common.dataset_channels(cfg.dataset), cfg.image_size).to(ddp.device).eval()
    common.load_models(run, G=G)
    common.write_sharded(run, lambda n, g: G(sample_z(n, cfg.nz, ddp.device, g)), cfg.sample, 500, {}, stop)


def main():
    cfg = common.parse_config(Config)
    sample_command(cfg) if cfg.sample else train(cfg)


if __name__ == "__main__":
    common.run_main(main)
