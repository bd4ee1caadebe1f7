"""Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks (CycleGAN).

Jun-Yan Zhu, Taesung Park, Phillip Isola, Alexei A. Efros.
ICCV 2017. arXiv:1703.10593. Results and every command: docs/cyclegan.md

Two mappings learned from unpaired images of two domains X and Y, G: X -> Y and F: Y -> X, each with its
discriminator (D_Y tells real y from G(x), D_X real x from F(y)), and a cycle-consistency loss (eq. 1-3):

    L_GAN(G, D_Y, X, Y) = E_y[log D_Y(y)] + E_x[log(1 - D_Y(G(x)))]        (and L_GAN(F, D_X, Y, X))
    L_cyc(G, F)         = E_x[ ||F(G(x)) - x||_1 ] + E_y[ ||G(F(y)) - y||_1 ]
    L = L_GAN(G, D_Y, X, Y) + L_GAN(F, D_X, Y, X) + lambda L_cyc,     lambda = 10                  (eq. 3)
    G*, F* = arg min_{G,F} max_{D_X,D_Y} L
and, as the official code by default (a deviation from eq. 3), section 5.2's identity term (--lambda-identity 0: off):
    L_identity(G, F)    = E_y[ ||G(y) - y||_1 ] + E_x[ ||F(x) - x||_1 ],   weighted 0.5 lambda

Training details (section 4, appendix 7.1): the GAN terms are least squares (LSGAN, Mao et al. 2017):
G minimizes E_x[(D_Y(G(x)) - 1)^2], D_Y minimizes E_y[(D_Y(y) - 1)^2] + E_x[D_Y(G(x))^2], halved ("we divide
the objective by 2 while optimizing D, which slows down the rate at which D learns, relative to G"), on a
pool of 50 past fakes (Shrivastava et al. 2017: ImagePool). Adam lr 2e-4 (beta1 0.5), batch 1, 100 epochs
then 100 of linear decay to zero; weights N(0, 0.02). Data (--dataset unaligned): trainA/ and trainB/, each image
resized to 286 x 286 (bicubic), randomly cropped to 256 and flipped; an epoch is max(|A|, |B|) steps.

Each training step (the official code's optimize_parameters: G and F first, then the discriminators):
    (1) update G and F: minimize the LSGAN terms of G(x), F(y) (labelled real), lambda L_cyc, 0.5 lambda L_identity
    (2) update D_X and D_Y: minimize their halved LSGAN objectives on real images and on fakes from the pools

Networks (appendix 7.2; the official resnet_9blocks and "basic" D, with the official parameter counts):
- G and F (11,378,179 parameters each): c7s1-64, d128, d256, R256 x 9, u128, u64, c7s1-3, with reflection
  padding, instance norm, ReLU and tanh out; the paper uses 6 blocks for 128 x 128 images (--n-blocks 6).
- D_X and D_Y (2,764,737 each): the 70 x 70 PatchGAN, C64-C128-C256-C512, instance norm, LeakyReLU 0.2.
The offline demo (--dataset sneaker2boot, the default): Fashion-MNIST's sneakers (A) and ankle boots (B), 32 x 32.

Deviations, each deliberate (and the identity term above):
- The domains are two data streams, each visiting its images in a fresh seeded order every pass; the official
  loader draws B uniformly with replacement: the same distribution of pairs, each B image once per pass here.
- The lr is a function of the step, the official value epoch by epoch (their LambdaLR stepped at each epoch's
  start: epoch 100 runs at 100/101 of lr, epoch 200 at 0; a --steps past the schedule is refused).
- Resume is exact, the pools and the schedule position included (the official --continue_train restarts both).
- The pools draw from their own seeded generator, the crops and flips from one seeded by (--seed, epoch, batch).
- Under torchrun each process has its own pools, saved together.

Usage (every command, the results and the speed: docs/cyclegan.md):
    python cyclegan.py                                   # the offline demo: sneakers <-> ankle boots
    python cyclegan.py --resume                          # continue runs/cyclegan-sneaker2boot (a requeued job too)
    python cyclegan.py --dataset unaligned --data-root datasets/horse2zebra
    python cyclegan.py --translate photos/ --translate-out zebras/   # G: A -> B on a folder (--direction BtoA: F)
    python cyclegan.py --sample 1000 --sample-out fake_B.npz         # G(1000 test A images), for fid.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.functional import l1_loss, mse_loss

import common
import fid
from common import arg

DEMOS = ("sneaker2boot", "synthetic-unpaired")
DEMO_DEFAULTS = {"image_size": 32, "load_size": 36, "ngf": 32, "ndf": 32, "n_blocks": 6, "n_layers_D": 2,
                 "n_epochs": 20, "n_epochs_decay": 20}   # 32 x 32 images; about the paper's number of steps


@dataclass
class Config(common.RunConfig):
    dataset: str = arg("sneaker2boot", "sneaker2boot (offline demo: Fashion-MNIST sneakers <-> ankle boots) | "
                       "unaligned (the official format: --data-root with trainA/, trainB/, testA/, testB/) | "
                       "synthetic-unpaired (tests)", metavar="NAME")
    steps: int = arg(0, "updates of G and F (0: the schedule's n_epochs + n_epochs_decay epochs)", run=True, min=0)
    translate: str = arg("", "no training: translate every image in DIR with the checkpoint, to --translate-out",
                         command=True, metavar="DIR")
    translate_out: str = arg("", "where --translate writes <image name>.png (default: <out>/translated)",
                             command=True, metavar="DIR")
    direction: str = arg("AtoB", "which mapping --translate and --sample use: AtoB (G: A -> B) | BtoA (F: B -> A)",
                         command=True, choices=("AtoB", "BtoA"))
    # Paper hyper-parameters (section 4, appendix 7: the official code's defaults; demos: DEMO_DEFAULTS)
    image_size: int = arg(256, "the training crop, a multiple of 4 (demos: 32)", min=8)
    load_size: int = arg(286, "images are resized to this size, then randomly cropped (demos: 36)", min=8)
    flip: bool = arg(True, "random horizontal flips")
    batch_size: int = arg(1, "minibatch size (global, shared among processes)", min=1)
    lr: float = arg(2e-4, "Adam learning rate", above=0)
    beta1: float = arg(0.5, "Adam beta1", min=0, max=0.999999)
    beta2: float = arg(0.999, "Adam beta2", min=0, max=0.999999)
    n_epochs: int = arg(100, "epochs at the initial learning rate (demos: 20)", min=1)
    n_epochs_decay: int = arg(100, "then epochs of linear decay to zero (demos: 20)", min=0)
    lambda_cyc: float = arg(10.0, "lambda: weight of the cycle-consistency loss, both directions (eq. 3)", min=0)
    lambda_identity: float = arg(0.5, "weight of section 5.2's identity loss, relative to lambda (0.5: the official "
                                 "code's default; 0: eq. 3 alone)",
                                 min=0)
    pool_size: int = arg(50, "past fakes kept for each discriminator's updates (0: the latest fakes only)", min=0)
    ngf: int = arg(64, "G's and F's filters in their first layer (demos: 32)", min=1)
    ndf: int = arg(64, "D's filters in its first layer (demos: 32)", min=1)
    n_blocks: int = arg(9, "residual blocks of G and F (the paper: 9 at 256 x 256, 6 at 128 x 128; demos: 6)", min=0)
    n_layers_D: int = arg(3, "D's stride-2 layers: 3 is the 70 x 70 PatchGAN (demos: 2, 34 x 34)", min=1)
    init_std: float = arg(0.02, "standard deviation of the N(0, std) weight initialisation", above=0)
    channels_last: bool = arg(False, "NHWC memory layout for the convolutions (faster with --amp)", run=True)


def apply_demo_defaults(cfg: Config) -> None:
    """The demos' defaults for the fields not typed (before resolve_run: a checkpoint's config still wins)."""
    if cfg.dataset in DEMOS:
        for name, value in DEMO_DEFAULTS.items():
            if name not in cfg.given:
                setattr(cfg, name, value)


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------
class ResnetBlock(nn.Module):
    """R256: x + (reflection pad, 3 x 3 conv, instance norm, ReLU, reflection pad, 3 x 3 conv, instance norm)(x)."""

    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(True),
                                   nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim))

    def forward(self, x):
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """G or F (Johnson et al. 2016's network). resnet_9blocks at 256 x 256:

        3 x 256 -> c7s1-64: 64 x 256 -> d128: 128 x 128 -> d256: 256 x 64 -> R256 x 9: 256 x 64
        -> u128: 128 x 128 -> u64: 64 x 256 -> c7s1-3: 3 x 256, tanh
    """

    def __init__(self, c_in: int, c_out: int, ngf: int, n_blocks: int):
        super().__init__()
        layers = [nn.ReflectionPad2d(3), nn.Conv2d(c_in, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]  # ngf x S
        for mult in (1, 2):                                                   # d128, d256: halve the size
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, 2, 1), nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [ResnetBlock(ngf * 4) for _ in range(n_blocks)]             # 4 ngf x S/4
        for mult in (4, 2):                                                   # u128, u64: double it
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, 2, 1, output_padding=1),
                       nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, c_out, 7), nn.Tanh()]  # c_out x S
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class PatchGAN(nn.Module):
    """image -> a map of scores, one per patch. The 70 x 70 PatchGAN (n_layers = 3) at 256 x 256:

        3 x 256 -> 64 x 128 -> 128 x 64 -> 256 x 32 -> 512 x 31 (stride 1) -> 1 x 30 (stride 1)
    """

    def __init__(self, c_in: int, ndf: int, n_layers: int):
        super().__init__()
        layers = [nn.Conv2d(c_in, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]           # ndf x S/2, no norm
        ch = ndf
        for n in range(1, n_layers + 1):
            out, stride = ndf * min(2 ** n, 8), 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1),                           # out x S/2^(n+1), last: -1
                       nn.InstanceNorm2d(out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))                                   # 1 x (size - 1): scores
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


def patch_grid(image_size: int, n_layers: int) -> int:
    """Side of D's output map (30 at 256 x 256 with 3 layers); refused where no patch is left."""
    size = image_size
    for _ in range(n_layers):
        size = size // 2
    side = size - 2
    if side < 1:
        raise common.UserError(f"--n-layers-D {n_layers} leaves no patch at --image-size {image_size}: use fewer "
                               f"layers or larger images")
    return side


def init_weights(module: nn.Module, std: float) -> None:
    """Appendix 7.1 (the official init_type normal): weights N(0, 0.02), biases 0 (instance norm has no weights)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            nn.init.zeros_(m.bias)


def build(cfg: Config, device):
    """G: X -> Y, F: Y -> X, D_X, D_Y; the sizes they cannot take are refused in one line."""
    common.check_dataset(cfg.dataset, tuple(common.UNPAIRED_DATASETS))
    if cfg.image_size % 4:
        raise common.UserError(f"--image-size {cfg.image_size}: G halves it twice and doubles it back; use a "
                               f"multiple of 4")
    patch_grid(cfg.image_size, cfg.n_layers_D)
    if cfg.load_size < cfg.image_size:
        raise common.UserError(f"--load-size {cfg.load_size} is smaller than the crop, --image-size {cfg.image_size}")
    c = common.UNPAIRED_DATASETS[cfg.dataset]
    G, F = (ResnetGenerator(c, c, cfg.ngf, cfg.n_blocks).to(device) for _ in range(2))
    D_X, D_Y = (PatchGAN(c, cfg.ndf, cfg.n_layers_D).to(device) for _ in range(2))
    for net in (G, F, D_X, D_Y):
        init_weights(net, cfg.init_std)
    return G, F, D_X, D_Y


# ----------------------------------------------------------------------------------------------
# The pool of past fakes, losses, schedule, training step
# ----------------------------------------------------------------------------------------------
class ImagePool:
    """A history of up to ``size`` generated images (section 4; Shrivastava et al. 2017), for D's updates.
    ``query(fakes)`` returns, for each new fake: while the pool is not full, the fake itself (and stores it);
    once full, with probability 1/2 a stored fake drawn uniformly (the new one takes its place), else the new
    fake. The draws come from the pool's own generator (on the CPU: no device synchronisation), which is
    part of its state: a resumed run makes the same draws."""

    def __init__(self, size: int, seed: int, device):
        self.size, self.device = size, device
        self.images: torch.Tensor | None = None    # size x C x H x W, allocated at the first query
        self.count = 0
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def query(self, fakes: torch.Tensor) -> torch.Tensor:
        fakes = fakes.detach()
        if self.size == 0:
            return fakes
        if self.images is None:
            self.images = torch.empty(self.size, *fakes.shape[1:], device=fakes.device)
        out = fakes.clone()
        for i in range(len(fakes)):
            if self.count < self.size:                                  # filling: store, return the new fake
                self.images[self.count] = fakes[i]
                self.count += 1
            elif torch.rand((), generator=self.generator) > 0.5:      # full: half the time, an old fake
                j = int(torch.randint(self.size, (), generator=self.generator))
                out[i] = self.images[j]
                self.images[j] = fakes[i]
        return out

    def state_dict(self) -> dict:
        images = self.images[:self.count].clone() if self.images is not None else torch.empty(0)
        return {"images": images, "count": self.count, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.images = None
        if self.count:
            self.images = torch.empty(self.size, *state["images"].shape[1:], device=self.device)
            self.images[:self.count] = state["images"]
        self.generator.set_state(state["generator"])


class GatheredPool:
    """An ImagePool in a checkpoint under torchrun, where each process fills its own: every process's state, in rank
    order, tensors on the CPU (``ddp.gather``); process r restores entry r mod the number saved."""

    def __init__(self, pool: ImagePool, ddp: common.Processes):
        self.pool, self.ddp = pool, ddp

    def state_dict(self) -> dict:
        state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.pool.state_dict().items()}
        return {"processes": self.ddp.gather(state)}

    def load_state_dict(self, state: dict) -> None:
        saved = state["processes"]
        self.pool.load_state_dict(saved[self.ddp.rank % len(saved)])


def lsgan_loss(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """(D - 1)^2 for a target 'real', D^2 for 'fake', averaged over every patch and image (the official
    'lsgan' GANLoss: MSE against 1 or 0)."""
    scores = scores.float()
    return mse_loss(scores, torch.ones_like(scores) if real else torch.zeros_like(scores))


def lr_at(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """The learning rate of update ``step`` (from 0): the official 'linear' policy, constant for n_epochs, then
    linearly to zero over n_epochs_decay. Epoch e = step // steps_per_epoch + 1 runs at
    lr * (1 - max(0, e + 1 - n_epochs) / (n_epochs_decay + 1))  (their lambda_rule with epoch_count 1, after
    the LambdaLR step at the start of epoch e)."""
    epoch = step // steps_per_epoch + 1
    return cfg.lr * (1.0 - max(0, epoch + 1 - cfg.n_epochs) / (cfg.n_epochs_decay + 1))


def train_step(G, F, D_X, D_Y, opt_G, opt_D, pool_X: ImagePool, pool_Y: ImagePool, x, y, lr: float, cfg: Config,
               amp: torch.dtype | None = None, scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict:
    """One iteration on x from X and y from Y at learning rate ``lr``. ``amp``: the autocast dtype (None:
    float32); ``scaler``: the GradScaler of fp16 (disabled, it passes the losses and steps through unchanged)."""
    for opt in (opt_G, opt_D):
        for group in opt.param_groups:
            group["lr"] = lr
    lambda_idt = cfg.lambda_identity * cfg.lambda_cyc                               # 0.5 lambda (section 5.2)
    # (1) Update G and F. The discriminators' own gradients are not needed: freezing them skips computing them.
    D_X.requires_grad_(False)
    D_Y.requires_grad_(False)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        fake_y, fake_x = G(x), F(y)                                               # G(x), F(y)
        loss_G = lsgan_loss(D_Y(fake_y), real=True)                                # (D_Y(G(x)) - 1)^2
        loss_F = lsgan_loss(D_X(fake_x), real=True)                                # (D_X(F(y)) - 1)^2
        loss_cyc_X = l1_loss(F(fake_y).float(), x)                              # ||F(G(x)) - x||_1
        loss_cyc_Y = l1_loss(G(fake_x).float(), y)                               # ||G(F(y)) - y||_1
        loss = loss_G + loss_F + cfg.lambda_cyc * (loss_cyc_X + loss_cyc_Y)        # eq. 3
        if lambda_idt > 0:
            loss_idt_X = l1_loss(F(x).float(), x)                               # ||F(x) - x||_1
            loss_idt_Y = l1_loss(G(y).float(), y)                                # ||G(y) - y||_1
            loss = loss + lambda_idt * (loss_idt_X + loss_idt_Y)
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt_G)
    D_X.requires_grad_(True)
    D_Y.requires_grad_(True)

    # (2) Update D_Y and D_X on real images and on fakes from the pools, each objective halved
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss_D_Y = 0.5 * (lsgan_loss(D_Y(y), real=True) + lsgan_loss(D_Y(pool_Y.query(fake_y)), real=False))
        loss_D_X = 0.5 * (lsgan_loss(D_X(x), real=True) + lsgan_loss(D_X(pool_X.query(fake_x)), real=False))
    opt_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D_X + loss_D_Y).backward()
    scaler.step(opt_D)
    scaler.update()
    losses = {"G": loss_G.detach(), "F": loss_F.detach(), "cyc_X": loss_cyc_X.detach(), "cyc_Y": loss_cyc_Y.detach(),
              "D_X": loss_D_X.detach(), "D_Y": loss_D_Y.detach()}
    if lambda_idt > 0:
        losses.update(idt_X=loss_idt_X.detach(), idt_Y=loss_idt_Y.detach())
    return losses


# ----------------------------------------------------------------------------------------------
# Translating
# ----------------------------------------------------------------------------------------------
def held_out(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images of A and B (the training ones, said in a warning, where there is no test split), resized
    to image_size without jitter: for the sample grids, --sample and --eval-every."""
    split = "test" if common.has_split(cfg.dataset, cfg.data_root, "test") else "train"
    if split == "train":
        common.warn(f"{cfg.data_root} has no testA/ and testB/: the sample grids, --sample and --eval-every use "
                    f"the training images")
    return common.load_domains(cfg.dataset, cfg.data_root, cfg.image_size, split)


def draw(images: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n of ``images``, each drawn uniformly and independently with ``generator``: --eval-every's inputs."""
    return images[torch.randint(len(images), (n,), generator=generator, device=generator.device).cpu()]


def scaled(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 -> floats in [-1, 1] on ``device``."""
    return images.to(device).float() / 127.5 - 1


@torch.no_grad()
def in_batches(net: nn.Module, images: torch.Tensor, device, batch: int = 64):
    """net(images), uint8 in, floats in [-1, 1] out, batch by batch."""
    for i in range(0, len(images), batch):
        yield net(scaled(images[i:i + batch], device))


def load(path: str, device="cpu") -> tuple[ResnetGenerator, ResnetGenerator]:
    """(G: A -> B, F: B -> A) of a checkpoint, in eval mode, their config rebuilt from the checkpoint:

        G, F = cyclegan.load("runs/cyclegan-sneaker2boot/ckpt.pt")
        y = G(x)                            # x, y in [-1, 1], N x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "cyclegan")
    c = common.UNPAIRED_DATASETS[cfg.dataset]
    nets = []
    for name in ("G", "F"):
        net = ResnetGenerator(c, c, cfg.ngf, cfg.n_blocks)
        net.load_state_dict(ckpt["models"][name])
        nets.append(net.to(device).eval())
    return nets[0], nets[1]


def train(cfg: Config) -> None:
    if cfg.translate_out:
        raise common.UserError("--translate-out goes with --translate DIR")
    if "direction" in cfg.given:
        raise common.UserError("--direction picks the mapping of --translate or --sample (training learns both)")
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "cyclegan", ddp)  # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: networks, data, schedule, optimizers, pools (section 4, appendix 7) ------------------------
    G, F, D_X, D_Y = build(cfg, device)
    side = patch_grid(cfg.image_size, cfg.n_layers_D)
    run.say(f"G, F (ResNet, {cfg.n_blocks} blocks): {common.count_parameters(G):,} parameters each, D_X, D_Y "
            f"(PatchGAN, {side} x {side} patches): {common.count_parameters(D_X):,} parameters each")
    domain_A, domain_B = common.load_domains(cfg.dataset, cfg.data_root, cfg.load_size)
    test_A, test_B = held_out(cfg)
    fixed_A, fixed_B = scaled(test_A[:6], device), scaled(test_B[:6], device)    # a 6 x 6 grid of triplets
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches_A, batches_B = (common.Batches(images, cfg.batch_size, cfg.seed + k, device, rank=ddp.rank, world=ddp.world,
                                           memory_format=memory_format, crop=cfg.image_size, hflip=cfg.flip)
                            for k, images in enumerate((domain_A, domain_B)))
    steps_per_epoch = max(len(domain_A), len(domain_B)) // cfg.batch_size   # the official epoch: max(|A|, |B|)
    schedule = (cfg.n_epochs + cfg.n_epochs_decay) * steps_per_epoch
    if cfg.steps > schedule:   # past the last epoch, lr_at turns negative: gradient ascent
        raise common.UserError(f"--steps {cfg.steps} runs past the end of the learning-rate schedule, step {schedule} "
                               f"({cfg.n_epochs} + {cfg.n_epochs_decay} epochs of {steps_per_epoch} steps, the last at "
                               f"lr 0); give at most that, or start a new run with more --n-epochs or --n-epochs-decay")
    cfg.steps = cfg.steps or schedule
    G, F, D_X, D_Y = (net.to(memory_format=memory_format) for net in (G, F, D_X, D_Y))
    opt_G = torch.optim.Adam([*G.parameters(), *F.parameters()], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam([*D_X.parameters(), *D_Y.parameters()], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    pool_X = ImagePool(cfg.pool_size, seed=cfg.seed * 1000 + 2 * ddp.rank, device=device)       # fakes F(y), for D_X
    pool_Y = ImagePool(cfg.pool_size, seed=cfg.seed * 1000 + 2 * ddp.rank + 1, device=device)   # G(x), for D_Y
    saved = dict(models={"G": G, "F": F, "D_X": D_X, "D_Y": D_Y}, optimizers={"G": opt_G, "D": opt_D},
                 data={"A": batches_A, "B": batches_B},
                 state={"scaler": scaler, "pool_X": GatheredPool(pool_X, ddp), "pool_Y": GatheredPool(pool_Y, ddp)})
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    G_eval, F_eval = G, F                           # grids and evaluation use the plain modules, on rank 0
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        G, F, D_X, D_Y = (nn.parallel.DistributedDataParallel(m, device_ids=ddp.device_ids) for m in (G, F, D_X, D_Y))
    if cfg.compile:
        G, F, D_X, D_Y = (torch.compile(m) for m in (G, F, D_X, D_Y))
    log = common.Log(run, step)
    evaluate = fid.Evaluator(run, test_B) if cfg.eval_every else None   # G(test A) against test B

    def save_samples(step: int) -> None:            # x | G(x) | F(G(x)) (3 rows), then y | F(y) | G(F(y)) (3 rows)
        with common.eval_mode(G_eval, F_eval):
            fake_B, fake_A = G_eval(fixed_A), F_eval(fixed_B)
            grid = torch.cat([torch.stack([fixed_A, fake_B, F_eval(fake_B)], 1).flatten(0, 1),
                              torch.stack([fixed_B, fake_A, G_eval(fake_A)], 1).flatten(0, 1)])
        common.save_grid(grid, run.out / "samples" / f"{step:06d}.png")

    def translations(n: int, generator) -> torch.Tensor:   # --eval-every's: G(n test A images drawn anew)
        with common.eval_mode(G_eval):
            return G_eval(scaled(draw(test_A, n, generator), device))

    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        losses = train_step(G, F, D_X, D_Y, opt_G, opt_D, pool_X, pool_Y, batches_A.next(), batches_B.next(),
                            lr_at(step, steps_per_epoch, cfg), cfg, amp, scaler)
        step += 1
        log.add(losses)
        if step % cfg.log_every == 0:
            log.write(step)
        if step % cfg.sample_every == 0 and ddp.rank == 0:
            save_samples(step)
        best = evaluate is not None and step % cfg.eval_every == 0 and evaluate(step, translations, log, stop)
        if step % cfg.ckpt_every == 0 or best or (cfg.keep_every and step % cfg.keep_every == 0):
            common.save_run(run, step, log, **saved, best=best)
    common.finish(run, step, log, stop, **saved)    # the last checkpoint, then how the run ended
    if ddp.rank == 0 and step > run.start_step and step % cfg.sample_every:
        save_samples(step)                          # and the last step's grid


def translate_command(cfg: Config) -> None:
    """--translate DIR: every image of DIR through the checkpoint's G (AtoB) or F (BtoA), to --translate-out."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "cyclegan", ddp, command="--translate")
    G, F = build(cfg, ddp.device)[:2]
    inputs, paths = common.read_images(cfg.translate, cfg.image_size, common.UNPAIRED_DATASETS[cfg.dataset])
    out = common.prepare_folder(cfg.translate_out or run.out / "translated", cfg.translate, "--translate-out")
    common.load_models(run, G=G, F=F)
    net = (G if cfg.direction == "AtoB" else F).eval()
    for i, fake in zip(range(0, len(inputs), 64), in_batches(net, inputs, ddp.device)):
        common.write_named(fake, paths[i:i + 64], out)
    print(f"translated {len(inputs)} images of {cfg.translate} to {out} ({cfg.direction})")


def sample_command(cfg: Config) -> None:
    """--sample N: N held-out images picked by --seed (no replacement) through G (AtoB) or F (BtoA), one process."""
    if cfg.translate_out:
        raise common.UserError("--translate-out goes with --translate DIR")
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "cyclegan", ddp, command="--sample")
    G, F = build(cfg, ddp.device)[:2]
    source = held_out(cfg)[0 if cfg.direction == "AtoB" else 1]
    if cfg.sample > len(source):
        raise common.UserError(f"--sample {cfg.sample}: the held-out split has {len(source)} images of that domain")
    source = source[torch.randperm(len(source), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.sample]]
    common.load_models(run, G=G, F=F)
    common.write_images(run, in_batches((G if cfg.direction == "AtoB" else F).eval(), source, ddp.device))


def main():
    cfg = common.parse_config(Config)
    apply_demo_defaults(cfg)                        # before resolve_run: a checkpoint's config still wins
    translate_command(cfg) if cfg.translate else sample_command(cfg) if cfg.sample else train(cfg)


if __name__ == "__main__":
    common.run_main(main)
