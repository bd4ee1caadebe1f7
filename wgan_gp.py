"""Improved Training of Wasserstein GANs.

Ishaan Gulrajani, Faruk Ahmed, Martin Arjovsky, Vincent Dumoulin, Aaron Courville. NeurIPS 2017.
arXiv:1704.00028. Results and every command: docs/wgan_gp.md

WGAN (wgan.py) with the critic's Lipschitz constraint enforced by a gradient penalty instead of weight
clipping (section 4, eq. 3). A differentiable function is 1-Lipschitz iff its gradient has norm at most 1
everywhere, and the optimal critic has gradient norm 1 on the lines between coupled points of P_r and P_g
(proposition 1), so the penalty is sampled on those lines:

    L = E_{x~ ~ P_g}[D(x~)] - E_{x ~ P_r}[D(x)] + lambda E_{x^ ~ P_x^}[(||grad_x^ D(x^)||_2 - 1)^2],
    x^ = eps x + (1 - eps) x~,  eps ~ U[0, 1], one per sample.

Algorithm 1 (defaults lambda = 10, n_critic = 5, alpha = 0.0001, beta_1 = 0, beta_2 = 0.9):
    while theta has not converged:
        for t = 1..n_critic:
            for i = 1..m:                                   (one batch: the m samples at once)
                (4) sample x ~ P_r, z ~ p(z), eps ~ U[0, 1]  (each critic iteration its own real batch)
                (5) x~ <- G_theta(z)
                (6) x^ <- eps x + (1 - eps) x~
                (7) L_i <- D_w(x~) - D_w(x) + lambda (||grad_x^ D_w(x^)||_2 - 1)^2
            (9) w <- Adam(grad_w 1/m sum L_i, w, alpha, beta_1, beta_2)
        (11) sample {z_i} ~ p(z)
        (12) theta <- Adam(grad_theta 1/m sum -D_w(G_theta(z_i)), theta, alpha, beta_1, beta_2)
The penalty's gradient with respect to w goes through grad_x^ D_w: a double backward (create_graph=True).
The critic has no batch normalization (section 4, "no critic batch normalization": the penalty is on each
input's gradient, which batch statistics would couple). --critic-norm none (the default) follows the paper's
text and the authors' MNIST and CIFAR-10 scripts; --critic-norm layer puts layer normalization where WGAN's
critic has batch norm, section 4's recommended drop-in and what the authors' 64 x 64 script (gan_64x64.py)
uses. Without batch statistics, D(x) and D(x~) come from one call on cat(x, x~): the same numbers as two calls.

Networks (--arch):
- dcgan (default): the WGAN authors' DCGAN generator and critic (wgan.py; their models/dcgan.py), the
  critic without batch norm (their DCGAN_D_nobn: 2,763,776 parameters at 64 x 64 x 3, ndf = 64; tested),
  weights N(0, 0.02), z ~ N(0, I) of dimension 100. Sizes as wgan.py: 28, or a power of two >= 16.
- resnet: the paper's CIFAR-10 ResNet (Appendix, the authors' gan_cifar_resnet.py, unconditional): 32 x 32,
  128 channels, pre-activation residual blocks of two 3 x 3 convolutions with ReLU, nearest-neighbour
  upsampling before the first convolution (G), mean pooling after the second (critic); batch norm in G,
  none in the critic; z ~ N(0, I) of dimension 128; tflib's uniform initialisation. G: 1,204,483
  parameters, critic: 1,053,825 (3 channels; counted from their code, tested).

Deviations and choices, each deliberate:
- Adam beta_1 = 0 as the paper's Algorithm 1 (and the authors' ResNet code); their gan_mnist.py and
  gan_cifar.py use beta_1 = 0.5.
- --arch resnet keeps Algorithm 1's constant alpha = 1e-4 and generator batch m, where the paper's CIFAR-10 run
  decayed lr 2e-4 linearly to 0 over 100,000 generator iterations with a generator batch of 2m = 128 (--lr 2e-4
  gives its learning rate, without the decay): it does not reproduce that run's Inception score.
- Pixels are 2 x / 255 - 1, as in every script, without gan_cifar_resnet.py's dequantization noise (its pixels
  are 2 (x / 256 - 0.5) plus U[0, 1/128)).
- The default, 64 x 64 with --critic-norm none, is the paper's text; the authors' own 64 x 64 critic has layer
  norm (--critic-norm layer).
- --compile compiles G only: torch.compile (aot_autograd) does not support the penalty's double backward.
- --amp: the critic runs in bf16 (or fp16); grad_x^ D(x^), its norm and the penalty are float32. Under fp16,
  D(x^) and its double backward run in float32: the GradScaler's 2^16 on the inner gradient overflows fp16.
- Sample grids and --sample use G in eval mode (batch norm running statistics); the authors' TF code
  draws with batch statistics.
- --steps 20000 generator iterations is our default; the authors ran 200,000 (MNIST, DCGAN-like CIFAR-10)
  and 100,000 (ResNet).

Usage (every command, the results and the speed: docs/wgan_gp.md):
    python wgan_gp.py                                 # Fashion-MNIST resized to 64 x 64, the DCGAN networks
    python wgan_gp.py --resume                        # continue runs/wgan_gp-fashion-mnist (a requeued job too)
    sbatch submit.sh wgan_gp                          # on SLURM, requeued until done (GPUS=4: torchrun, DDP)
    python wgan_gp.py --sample 10000 --sample-out wgan_gp.npz   # images for fid.py
    python wgan_gp.py --dataset cifar10 --arch resnet --steps 100000 --lr 2e-4   # the paper's CIFAR-10 ResNet
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import fid
from common import arg

# what 0 means for --image-size, --nz, --ngf, --ndf: each architecture's own, from its official code
ARCHS = {"dcgan": {"image_size": 64, "nz": 100, "ngf": 64, "ndf": 64},      # the WGAN authors' DCGAN
         "resnet": {"image_size": 32, "nz": 128, "ngf": 128, "ndf": 128}}   # gan_cifar_resnet.py: DIM_G = DIM_D = 128


@dataclass
class Config(common.ImageConfig):
    steps: int = arg(20_000, "generator iterations (each with n_critic critic iterations)", run=True, min=0)
    score: str = arg("", "no training: anomaly scores of IMAGES (train, test, validation or an .npz), higher = more "
                     "anomalous, to --score-out", command=True, metavar="IMAGES")
    score_out: str = arg("", "the CSV of --score (default: <out>/scores-<IMAGES>.csv)", command=True, metavar="PATH")
    arch: str = arg("dcgan", "dcgan (the WGAN authors' networks, no batch norm in the critic) | resnet (the paper's "
                    "CIFAR-10 ResNet, 32 x 32)", choices=tuple(ARCHS))
    # Paper hyper-parameters (Algorithm 1, section 4)
    image_size: int = arg(0, "0: the architecture's (dcgan 64, resnet 32); dcgan: 28 or a power of two >= 16",
                          min=0)
    batch_size: int = arg(64, "m, the minibatch of every critic and generator iteration", min=1)
    lr: float = arg(1e-4, "alpha, the Adam learning rate of both networks", above=0)
    beta1: float = arg(0.0, "Adam beta_1", min=0, max=0.999999)
    beta2: float = arg(0.9, "Adam beta_2", min=0, max=0.999999)
    lambda_gp: float = arg(10.0, "lambda, the gradient penalty coefficient", min=0)
    n_critic: int = arg(5, "critic iterations per generator iteration", min=1)
    critic_norm: str = arg("none", "normalisation in the critic: none (the paper's text; the authors' MNIST and "
                           "CIFAR-10 scripts) | layer (section 4's drop-in for batch norm; their 64 x 64 script)",
                           choices=("none", "layer"))
    nz: int = arg(0, "dimension of z ~ N(0, I); 0: the architecture's (dcgan 100, resnet 128)", min=0)
    ngf: int = arg(0, "G's width: dcgan, channels at its last hidden layer; resnet, of every block; 0: the "
                   "architecture's (64, 128)", min=0)
    ndf: int = arg(0, "the critic's width: dcgan, channels at its first layer; resnet, of every block; 0: the "
                   "architecture's (64, 128)", min=0)
    leak: float = arg(0.2, "LeakyReLU slope in the critic (dcgan)", min=0)
    init_std: float = arg(0.02, "standard deviation of the N(0, std) weight initialisation (dcgan)", above=0)
    channels_last: bool = arg(False, "NHWC memory layout for the convolutions (faster with --amp)", run=True)


def resolve(cfg: Config) -> Config:
    """Fill the fields left at 0 with the architecture's values (right after the config is known)."""
    for name, value in ARCHS[cfg.arch].items():
        if not getattr(cfg, name):
            setattr(cfg, name, value)
    return cfg


# ----------------------------------------------------------------------------------------------
# Networks: --arch dcgan
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


def layer_norm(ch: int) -> nn.Module:
    """Layer normalization of a C x H x W feature map, a scale and shift per channel: the authors' tflib
    Layernorm over axes [1, 2, 3], i.e. GroupNorm with one group."""
    return nn.GroupNorm(1, ch)


class Critic(nn.Module):
    """image -> D(image), a real number, through strided convolutions. At 64 x 64 (the WGAN authors'
    DCGAN_D_nobn; --critic-norm layer: layer norm where DCGAN_D has batch norm):

        3 x 64 x 64 -> 64 x 32 x 32 -> 128 x 16 x 16 -> 256 x 8 x 8 -> 512 x 4 x 4 -> 1 x 1 x 1
    """

    def __init__(self, ndf: int, channels: int, image_size: int, leak: float, norm: str = "none"):
        super().__init__()
        base, n = ladder(image_size)
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False),                 # ndf x size/2 x size/2
                  nn.LeakyReLU(leak, True)]                                     # no norm on the critic's input
        ch = ndf
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),               # 2ch x H/2 x W/2
                       *([layer_norm(ch * 2)] if norm == "layer" else []), nn.LeakyReLU(leak, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, base, 1, 0, bias=False)]                    # 1 x 1 x 1: D(x), no sigmoid
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()


def init_weights(module: nn.Module, std: float) -> None:
    """The WGAN authors' weights_init: weights from N(0, 0.02); batch norm scales N(1, 0.02) and shifts 0
    (layer norm: scales 1, shifts 0, tflib's)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def sample_z(n: int, nz: int, device, generator=None):
    """z ~ N(0, I)^nz (the authors' code: tf.random_normal; the WGAN code: normal_(0, 1))."""
    return torch.randn(n, nz, device=device, generator=generator)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def interpolate(x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, lines 4 and 6: x^ = eps x + (1 - eps) x~, with one eps ~ U[0, 1] per sample."""
    eps = torch.rand(len(x), *[1] * (x.dim() - 1), device=x.device)
    return eps * x + (1 - eps) * fake


def gradient_penalty(d_hat: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """(||grad_x^ D(x^)||_2 - 1)^2 for each sample (Algorithm 1, line 7), differentiable in the critic's
    weights (create_graph=True: the loss's backward differentiates the gradient itself).

    d_hat = D(x^) of the m samples; the gradient of their sum is each sample's own gradient because the
    critic has no batch statistics."""
    grad, = torch.autograd.grad(d_hat.sum(), x_hat, create_graph=True)
    grad_norm = grad.float().flatten(1).norm(dim=1)   # float32, whatever the autocast dtype
    return (grad_norm - 1) ** 2


def train_step(G, critic, opt_G, opt_critic, batches, n_critic: int, cfg: Config, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict[str, torch.Tensor]:
    """One generator iteration of Algorithm 1, after ``n_critic`` critic iterations, each on its own real
    batch from ``batches``. ``amp``: the autocast dtype (None: float32); ``scaler``: the GradScaler of fp16
    (disabled, it passes the losses and steps through unchanged)."""
    for _ in range(n_critic):
        # (4) a real batch, a prior batch and eps; (5) x~ = G(z), G fixed here: no graph through it; (6) x^
        x = batches.next()
        z = sample_z(len(x), cfg.nz, x.device)
        with torch.no_grad(), torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            fake = G(z).float()
        x_hat = interpolate(x, fake).requires_grad_(True)
        # (7) L = D(x~) - D(x) + lambda (||grad D(x^)||_2 - 1)^2, averaged over the batch. D(x) and D(x~) come
        # from one call; D(x^) from its own, so that the penalty's double backward runs over m rows, not 3m.
        with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
            d_real, d_fake = critic(torch.cat([x, fake])).float().split(len(x))
        with torch.autocast(x.device.type, dtype=amp, enabled=amp == torch.bfloat16):   # fp16: float32 here
            d_hat = critic(x_hat).float()
        penalty = gradient_penalty(d_hat, x_hat)
        W_estimate = d_real.mean() - d_fake.mean()
        loss_critic = -W_estimate + cfg.lambda_gp * penalty.mean()
        # (9) w <- Adam(grad_w L)
        opt_critic.zero_grad(set_to_none=True)
        scaler.scale(loss_critic).backward()
        scaler.step(opt_critic)
        scaler.update()

    # (11)-(12) Update G: descend -1/m sum D(G(z)). The critic's own gradients are not needed here:
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

    return {"W_estimate": W_estimate.detach(), "gradient_penalty": penalty.mean().detach(), "loss_G": loss_G.detach()}


def build_generator(cfg: Config) -> nn.Module:
    channels = common.dataset_channels(cfg.dataset)
    if cfg.arch == "resnet":
        if cfg.image_size != 32:
            raise common.UserError(f"--arch resnet is the paper's CIFAR-10 network, 32 x 32: --image-size "
                                   f"{cfg.image_size} is not supported (use 32, or --arch dcgan)")
        return ResNetGenerator(cfg.nz, cfg.ngf, channels)
    return Generator(cfg.nz, cfg.ngf, channels, cfg.image_size)


def build(cfg: Config, device):
    G = build_generator(cfg).to(device)
    channels = common.dataset_channels(cfg.dataset)
    if cfg.arch == "resnet":
        critic = ResNetCritic(cfg.ndf, channels, cfg.critic_norm).to(device)
    else:
        critic = Critic(cfg.ndf, channels, cfg.image_size, cfg.leak, cfg.critic_norm).to(device)
        init_weights(G, cfg.init_std)
        init_weights(critic, cfg.init_std)
    return G, critic


# ----------------------------------------------------------------------------------------------
# The paper's CIFAR-10 network: --arch resnet (Appendix; the authors' gan_cifar_resnet.py)
# ----------------------------------------------------------------------------------------------
def tf_conv(c_in: int, c_out: int, k: int, he: bool = True) -> nn.Conv2d:
    """A k x k convolution (stride 1, 'same' padding, bias) initialised as tflib's Conv2D: uniform with
    standard deviation sqrt(4 / (fan_in + fan_out)) (he_init) or sqrt(2 / (fan_in + fan_out)), bias 0."""
    conv = nn.Conv2d(c_in, c_out, k, 1, k // 2)
    std = math.sqrt((4 if he else 2) / ((c_in + c_out) * k * k))
    nn.init.uniform_(conv.weight, -std * math.sqrt(3), std * math.sqrt(3))
    nn.init.zeros_(conv.bias)
    return conv


def up(x):
    """Nearest-neighbour 2x upsampling (tflib's UpsampleConv: the input tiled 4 times, depth_to_space)."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def down(x):
    """2 x 2 mean pooling (tflib's ConvMeanPool / MeanPoolConv)."""
    return F.avg_pool2d(x, 2)


class ResBlock(nn.Module):
    """Pre-activation residual block, ch -> ch: norm, ReLU, 3 x 3 conv, norm, ReLU, 3 x 3 conv, plus the
    shortcut. resample "up" upsamples before the first conv, "down" mean-pools after the second; the
    shortcut is then a 1 x 1 conv, resampled the same way; without resampling, the identity."""

    def __init__(self, ch: int, resample: str | None, norm):
        super().__init__()
        self.up = up if resample == "up" else nn.Identity()
        self.down = down if resample == "down" else nn.Identity()
        self.norm1, self.conv1 = norm(ch), tf_conv(ch, ch, 3)
        self.norm2, self.conv2 = norm(ch), tf_conv(ch, ch, 3)
        self.shortcut = tf_conv(ch, ch, 1, he=False) if resample else nn.Identity()

    def forward(self, x):
        h = self.conv1(self.up(F.relu(self.norm1(x))))
        h = self.down(self.conv2(F.relu(self.norm2(h))))
        return self.down(self.shortcut(self.up(x))) + h


class ResNetGenerator(nn.Module):
    """z -> 32 x 32 image (gan_cifar_resnet.py's Generator, DIM_G = ngf = 128):

        z 128 -> 128 x 4 x 4 -> up 128 x 8 x 8 -> up 128 x 16 x 16 -> up 128 x 32 x 32 -> 3 x 32 x 32
    """

    def __init__(self, nz: int, ngf: int, channels: int):
        super().__init__()
        self.nz, self.ngf = nz, ngf
        self.input = nn.Linear(nz, 4 * 4 * ngf)                                 # ngf x 4 x 4
        bound = math.sqrt(3) * math.sqrt(2 / (nz + 4 * 4 * ngf))                # tflib's Linear: Glorot uniform
        nn.init.uniform_(self.input.weight, -bound, bound)
        nn.init.zeros_(self.input.bias)
        self.blocks = nn.Sequential(*[ResBlock(ngf, "up", nn.BatchNorm2d) for _ in range(3)])   # ngf x 32 x 32
        self.norm, self.output = nn.BatchNorm2d(ngf), tf_conv(ngf, channels, 3, he=False)       # channels x 32 x 32

    def forward(self, z):
        h = self.blocks(self.input(z).view(-1, self.ngf, 4, 4))
        return torch.tanh(self.output(F.relu(self.norm(h))))


class ResNetCritic(nn.Module):
    """32 x 32 image -> D(image) (gan_cifar_resnet.py's Discriminator, DIM_D = ndf = 128, no ACGAN head):

        3 x 32 x 32 -> 128 x 16 x 16 -> down 128 x 8 x 8 -> 128 x 8 x 8 -> 128 x 8 x 8 -> mean -> 128 -> 1
    """

    def __init__(self, ndf: int, channels: int, norm: str = "none"):
        super().__init__()
        make_norm = layer_norm if norm == "layer" else (lambda ch: nn.Identity())
        # the first block (OptimizedResBlockDisc1): no activation on the image, pooled shortcut then 1 x 1 conv
        self.conv1, self.conv2 = tf_conv(channels, ndf, 3), tf_conv(ndf, ndf, 3)         # ndf x 16 x 16
        self.shortcut = tf_conv(channels, ndf, 1, he=False)
        self.blocks = nn.Sequential(ResBlock(ndf, "down", make_norm),                   # ndf x 8 x 8
                                    ResBlock(ndf, None, make_norm), ResBlock(ndf, None, make_norm))
        self.output = nn.Linear(ndf, 1)
        bound = math.sqrt(3) * math.sqrt(2 / (ndf + 1))
        nn.init.uniform_(self.output.weight, -bound, bound)
        nn.init.zeros_(self.output.bias)

    def forward(self, x):
        h = down(self.conv2(F.relu(self.conv1(x)))) + self.shortcut(down(x))
        h = F.relu(self.blocks(h)).mean(dim=(2, 3))                                    # ndf: spatial mean
        return self.output(h).flatten()


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def load(path: str, device="cpu") -> nn.Module:
    """G of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        G = wgan_gp.load("runs/wgan_gp-fashion-mnist/ckpt.pt")
        images = G(wgan_gp.sample_z(64, G.nz, "cpu"))    # in [-1, 1], 64 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "wgan_gp")
    G = build_generator(resolve(cfg))
    G.load_state_dict(ckpt["models"]["G"])
    return G.to(device).eval()


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "wgan_gp", ddp)   # --out, --resume / --init and the config; nothing is written
    resolve(cfg)                                    # the fields left at 0: --arch's values
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: networks, data, optimizers (Algorithm 1) ---------------------------------------------------
    G, critic = build(cfg, device)
    run.say(f"G: {common.count_parameters(G):,} parameters, critic: {common.count_parameters(critic):,} parameters")
    images, _ = common.training_set(cfg)            # --per-class N: the subset augment.py draws
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, rank=ddp.rank, world=ddp.world,
                             memory_format=memory_format)
    G, critic = G.to(memory_format=memory_format), critic.to(memory_format=memory_format)
    if cfg.arch == "dcgan":
        G.net[0].to(memory_format=torch.contiguous_format)  # its z is 1 x 1: NCHW (docs/gpu-check.md)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_critic = torch.optim.Adam(critic.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
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
    if cfg.compile:                                 # G only: torch.compile has no double backward (the penalty)
        G = torch.compile(G)
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
        losses = train_step(G, critic, opt_G, opt_critic, batches, cfg.n_critic, cfg, amp, scaler)
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
    run = common.resolve_run(cfg, "wgan_gp", ddp, command="--sample")
    resolve(cfg)
    stop = common.Stop(ddp)
    G = build_generator(cfg).to(ddp.device).eval()
    common.load_models(run, G=G)
    common.write_sharded(run, lambda n, g: G(sample_z(n, cfg.nz, ddp.device, g)), cfg.sample, 500, {}, stop)


def score_command(cfg: Config) -> None:
    """--score IMAGES: each image's -D(x) in a CSV (higher = less real to the critic, which has no batch statistics)."""
    run = common.resolve_run(cfg, "wgan_gp", common.Processes(cfg.device, connect=False), command="--score")
    resolve(cfg)
    critic = build(cfg, run.ddp.device)[1].eval()
    common.load_models(run, critic=critic)
    images, labels = common.score_images(cfg, cfg.score)
    with torch.no_grad():
        scores = torch.cat([-critic(x.to(run.ddp.device).float() / 127.5 - 1).cpu() for x in images.split(500)])
    common.write_scores(run, {"neg_critic": scores}, labels)


def main():
    cfg = common.parse_config(Config)
    score_command(cfg) if cfg.score else sample_command(cfg) if cfg.sample else train(cfg)


if __name__ == "__main__":
    common.run_main(main)
