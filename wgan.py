"""Wasserstein GAN.

Martin Arjovsky, Soumith Chintala, Léon Bottou. ICML 2017. arXiv:1701.07875

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

Networks (section 4, DCGAN generator and critic): the authors' models/dcgan.py, which at
64 x 64 are exactly pytorch/examples' DCGAN networks (3,576,704 and 2,765,568 parameters for 3 channels,
ngf = ndf = 64; tested), batch normalization in both except G's output and the critic's input, the
critic's last layer a linear output without sigmoid. Other --image-size values keep the same blocks as
dcgan.py: 4 x 4 -> ... -> size for powers of two, 7 x 7 -> 14 -> 28 for 28 x 28 MNIST-like images.
Weights N(0, 0.02), batch norm scales N(1, 0.02) (the authors' weights_init); z ~ N(0, I) of dimension 100
(their main.py; DCGAN drew z uniformly).

Deviations and choices, each deliberate:
- --critic-burst (default on): 100 critic iterations instead of n_critic at the first 25 generator
  iterations and at every 500th one (generator iterations 0..24, 500, 1000, ...), as the authors'
  main.py does (lines 163-166; their README: "this helps to start with the critic at optimum", an
  addition the paper forgot). The count is a pure function of the generator iteration, so a resumed run
  keeps it exactly. --no-critic-burst is Algorithm 1 as printed.
- Algorithm 1 prints "for t = 0, ..., n_critic" (n_critic + 1 iterations); the authors' code runs
  n_critic (Diters), and so do we.
- Clipping after each critic update (Algorithm 1, line 7). The authors' code clamps before each critic
  update instead, so that G's update there meets the last critic update unclipped; here every critic
  that G or the estimate sees has its weights in [-c, c]. As theirs, every parameter of the critic is
  clipped, batch norm scales and shifts included.
- The critic's batch norm sees the real and the generated batches in two separate calls (theirs too):
  f_w is then a function of its batch, which is one reason WGAN-GP (wgan_gp.py) removes it.
- The authors' critic loop stops early at the end of an epoch (their DataLoader); ours draws from a
  continuous stream that crosses epochs, so every generator iteration has its full n_critic.
- Their code minimises f(x) - f(g(z)) (a critic of the opposite sign, f -> -f); we follow the paper's
  sign: W_estimate = mean f(x) - mean f(g(z)) of the last critic iteration of each generator iteration,
  what their log prints as -Loss_D (the paper's Figure 3 is its median-filtered curve).
- Sample grids and --sample use G in eval mode (batch norm's running statistics); the authors' main.py
  draws its samples with G in training mode (each batch's own statistics).
- --steps 20000 generator iterations (about 110 Fashion-MNIST epochs of real batches for the critic, at
  m = 64 and n_critic = 5) is our default; the authors' LSUN run is 25 epochs of 3M images.

Usage:
    python wgan.py                                    # Fashion-MNIST resized to 64 x 64
    python wgan.py --image-size 28 --eval-every 250 --eval-n 2000   # README.md's CPU run (SIGTERM after 51 min)
    python wgan.py --resume                           # continue the run in runs/wgan-fashion-mnist
    python wgan.py --dataset folder --data-root ~/lsun-bedroom   # any folder of images (the paper: LSUN)
    python wgan.py --sample 10000 --sample-out wgan.npz   # images for fid.py
    sbatch submit.sh wgan --image-size 32
    python wgan.py --eval-every 1000 --keep-every 5000   # FID during training, best.pt, snapshots
    python wgan.py --amp --channels-last --compile    # speed flags
    torchrun --standalone --nproc_per_node=4 wgan.py  # 4 GPUs (DDP); or GPUS=4 sbatch submit.sh wgan
--batch-size is the global batch, shared among the processes (each its own slice and its own noise).
images/s in the log counts generator iterations x batch; the critic sees n_critic (or 100) real batches
for each.

From Python: G = wgan.load("runs/wgan-fashion-mnist/ckpt.pt"); images = G(wgan.sample_z(64, G.nz, "cpu")).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

import common
from common import arg


@dataclass
class Config(common.RunConfig):
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
@torch.no_grad()
def generate(G, n: int, cfg: Config, device, batch: int = 500):
    """n images from a seeded noise stream (the same n images for the same checkpoint and --seed)."""
    g = torch.Generator(device).manual_seed(cfg.seed)
    G.eval()
    for i in range(0, n, batch):
        yield G(sample_z(min(batch, n - i), cfg.nz, device, g))


def load(path: str, device="cpu") -> Generator:
    """G of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        G = wgan.load("runs/wgan-fashion-mnist/ckpt.pt")
        images = G(wgan.sample_z(64, G.nz, "cpu"))       # in [-1, 1], 64 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "wgan")
    G = Generator(cfg.nz, cfg.ngf, common.dataset_channels(cfg.dataset), cfg.image_size)
    G.load_state_dict(ckpt["models"]["G"])
    return G.to(device).eval()


def main():
    cfg = common.parse_config(Config)
    run = common.Run(cfg, "wgan")
    device = run.device
    G, critic = build(cfg, device)
    run.say(f"G: {common.count_parameters(G):,} parameters, critic: {common.count_parameters(critic):,} parameters")

    if run.sampling:
        run.track(models={"G": G})
        run.start()
        run.write_generated(generate(G, cfg.sample, cfg, device))
        return

    images = common.load_images(cfg.dataset, cfg.data_root, cfg.image_size)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, rank=run.rank, world=run.world,
                             memory_format=memory_format)
    G, critic = G.to(memory_format=memory_format), critic.to(memory_format=memory_format)
    opt_G = torch.optim.RMSprop(G.parameters(), lr=cfg.lr)
    opt_critic = torch.optim.RMSprop(critic.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=run.amp == torch.float16)
    fixed_noise = sample_z(64, cfg.nz, device)
    G_eval = G  # samples and evaluation use the plain module, on rank 0 alone
    if run.world > 1:  # torchrun: one process per GPU, gradients averaged across processes
        ids = [device.index] if device.type == "cuda" else None
        G = nn.parallel.DistributedDataParallel(G, device_ids=ids)
        critic = nn.parallel.DistributedDataParallel(critic, device_ids=ids)
    if cfg.compile:
        G, critic = torch.compile(G), torch.compile(critic)

    run.track(models={"G": G, "critic": critic}, optimizers={"G": opt_G, "critic": opt_critic},
              data={"train": batches}, state={"fixed_noise": fixed_noise, "scaler": scaler},
              sample=lambda: G_eval(fixed_noise), generate=lambda n, g: G_eval(sample_z(n, cfg.nz, device, g)),
              real=images)
    step = run.start()
    while step < cfg.steps and not run.stop_requested:
        losses = train_step(G, critic, opt_G, opt_critic, batches, critic_iterations(step, cfg), cfg, run.amp, scaler)
        step += 1
        run.end_step(step, losses)
    run.finish(step)


if __name__ == "__main__":
    common.run_main(main)
