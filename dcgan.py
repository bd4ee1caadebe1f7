"""Unsupervised Representation Learning with Deep Convolutional Generative Adversarial Networks.

Alec Radford, Luke Metz, Soumith Chintala. ICLR 2016. arXiv:1511.06434. Results and every command: docs/dcgan.md

The GAN game of Goodfellow et al. (2014, see gan.py),

    min_G max_D E_x[log D(x)] + E_z[log(1 - D(G(z)))],

played by convolutional networks built with the paper's "architecture guidelines for stable deep
convolutional GANs" (section 3):
- strided convolutions (D) and fractional-strided convolutions (G) instead of pooling;
- batch normalization in both networks, except G's output layer and D's input layer;
- no fully connected hidden layers;
- ReLU in G, tanh on its output; LeakyReLU (slope 0.2) in D.
Training details (section 4): images scaled to [-1, 1], minibatch 128, weights N(0, 0.02), Adam with
lr 0.0002 and beta1 0.5, z of dimension 100 drawn uniformly in [-1, 1].

Each training step (pytorch/examples dcgan, the same alternation as gan.py's Algorithm 1 with k = 1):
    (1) update D: maximize log D(x) + log(1 - D(G(z)))
    (2) update G: maximize log D(G(z)) -- the non-saturating loss; "fake labels are real for G"

At 64 x 64 (the paper's size) the networks are exactly pytorch/examples' (3,576,704 and 2,765,568
parameters for 3 channels, ngf = ndf = 64). Other --image-size values keep the same blocks and change
the length of the ladder: 4 x 4 -> 8 -> ... -> size for powers of two (32: one block fewer), and
7 x 7 -> 14 -> 28 for 28 x 28 MNIST-like images.

Deviations, each deliberate:
- D outputs a logit and the loss is BCE-with-logits: the same as the paper's sigmoid + log, without
  its overflow.
- BatchNorm scales start at N(1, 0.02) (pytorch/examples, and the authors' Theano code); some course
  notes draw them from N(0, 0.02), which silences most units at the start. (Others say G uses
  LeakyReLU; the paper says ReLU, and ReLU it is.)
- No weight decay: the authors' Theano code (Newmu/dcgan_code) adds an L2 penalty of 1e-5 to both
  Adams; the paper does not mention it and pytorch/examples leaves it out, as we do.
- Sample grids and --sample use G in eval mode (BatchNorm running statistics), so drawing samples
  never changes the model.
- --steps 12000 (about 26 Fashion-MNIST epochs at batch 128) is our default; the paper reports
  1 to 5 epochs on LSUN / ImageNet / faces, which are far larger.

Usage (every command, the results and the speed: docs/dcgan.md):
    python dcgan.py                                   # Fashion-MNIST resized to 64 x 64
    python dcgan.py --resume                          # continue runs/dcgan-fashion-mnist (a requeued job too)
    sbatch submit.sh dcgan                            # on SLURM, requeued until done (GPUS=4: torchrun, DDP)
    python dcgan.py --sample 10000 --sample-out dcgan.npz   # images for fid.py
    python dcgan.py --dataset folder --data-root ~/celeba   # any folder of images
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


@dataclass
class Config(common.ImageConfig):
    steps: int = arg(12_000, "G updates (about 26 epochs of Fashion-MNIST at batch 128)", run=True, min=0)
    score: str = arg("", "no training: anomaly scores of IMAGES (train, test, validation or an .npz), higher = more "
                     "anomalous, to --score-out", command=True, metavar="IMAGES")
    score_out: str = arg("", "the CSV of --score (default: <out>/scores-<IMAGES>.csv)", command=True, metavar="PATH")
    interpolate: int = arg(0, "with --sample: also write <out>/interpolation.png, N rows walking between z "
                           "pairs", sampling=True, min=0)
    # Paper hyper-parameters (section 4)
    image_size: int = arg(64, "28, or a power of two >= 16 (64: the paper)", min=16)
    batch_size: int = arg(128, "minibatch size", min=1)
    lr: float = arg(2e-4, "Adam learning rate (0.001 was too high, section 4)", above=0)
    beta1: float = arg(0.5, "Adam beta1 (0.9 oscillated, section 4)", min=0, max=0.999999)
    beta2: float = arg(0.999, "Adam beta2 (PyTorch's default)", min=0, max=0.999999)
    nz: int = arg(100, "dimension of z ~ U[-1, 1]", min=1)
    ngf: int = arg(64, "G's channels at its last hidden layer (doubled at each block towards z)", min=1)
    ndf: int = arg(64, "D's channels at its first layer (doubled at each block)", min=1)
    leak: float = arg(0.2, "LeakyReLU slope in D", min=0)
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
    """z -> image through fractional-strided convolutions. At 64 x 64 (pytorch/examples dcgan):

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


class Discriminator(nn.Module):
    """image -> logit through strided convolutions. At 64 x 64 (pytorch/examples dcgan):

        3 x 64 x 64 -> 64 x 32 x 32 -> 128 x 16 x 16 -> 256 x 8 x 8 -> 512 x 4 x 4 -> 1 x 1 x 1
    """

    def __init__(self, ndf: int, channels: int, image_size: int, leak: float):
        super().__init__()
        base, n = ladder(image_size)
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False),                 # ndf x size/2 x size/2
                  nn.LeakyReLU(leak, True)]                                     # no BN on D's input
        ch = ndf
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),               # 2ch x H/2 x W/2
                       nn.BatchNorm2d(ch * 2), nn.LeakyReLU(leak, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1, base, 1, 0, bias=False)]                    # 1 x 1 x 1 logit
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).flatten()  # logit l; D(x) = sigmoid(l)


def init_weights(module: nn.Module, std: float) -> None:
    """Section 4: weights from N(0, 0.02); BatchNorm scales N(1, 0.02) and shifts 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def sample_z(n: int, nz: int, device, generator=None):
    """z ~ U[-1, 1]^nz (section 3: "a uniform noise distribution Z")."""
    return torch.rand(n, nz, device=device, generator=generator) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_step(G, D, opt_G, opt_D, x, cfg: Config, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict[str, torch.Tensor]:
    """One iteration. ``amp``: the autocast dtype (None: float32); ``scaler``: the GradScaler of fp16
    (disabled, it passes the losses and steps through unchanged)."""
    z = sample_z(len(x), cfg.nz, x.device)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        fake = G(z)
        # (1) Update D: maximize log D(x) + log(1 - D(G(z)))
        logit_real, logit_fake = D(x), D(fake.detach())
        loss_D = (F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
                  + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake)))
    opt_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D).backward()
    scaler.step(opt_D)

    # (2) Update G: maximize log D(G(z)) (non-saturating: fake labels are real for the G cost).
    # D's own gradients are not needed here: freezing D skips computing them (and DDP's sync of them).
    D.requires_grad_(False)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        logit_fake_G = D(fake)
        loss_G = F.binary_cross_entropy_with_logits(logit_fake_G, torch.ones_like(logit_fake_G))
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(opt_G)
    scaler.update()
    D.requires_grad_(True)

    return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(),
            "D_x": torch.sigmoid(logit_real.float()).mean().detach(),
            "D_G_z": torch.sigmoid(logit_fake.float()).mean().detach()}


def build(cfg: Config, device):
    channels = common.dataset_channels(cfg.dataset)
    G = Generator(cfg.nz, cfg.ngf, channels, cfg.image_size).to(device)
    D = Discriminator(cfg.ndf, channels, cfg.image_size, cfg.leak).to(device)
    init_weights(G, cfg.init_std)
    init_weights(D, cfg.init_std)
    return G, D


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def interpolation_grid(G, rows: int, cfg: Config, device, steps: int = 10):
    """Section 6.1, "walking in the latent space": each row decodes z_a + t (z_b - z_a), t in [0, 1]."""
    g = torch.Generator(device).manual_seed(cfg.seed + 1)
    z_a, z_b = sample_z(rows, cfg.nz, device, g), sample_z(rows, cfg.nz, device, g)
    t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
    z = (z_a[:, None] + t * (z_b - z_a)[:, None]).reshape(rows * steps, cfg.nz)
    G.eval()
    return G(z)


def load(path: str, device="cpu") -> Generator:
    """G of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        G = dcgan.load("runs/dcgan-fashion-mnist/ckpt.pt")
        images = G(dcgan.sample_z(64, G.nz, "cpu"))      # in [-1, 1], 64 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "dcgan")
    G = Generator(cfg.nz, cfg.ngf, common.dataset_channels(cfg.dataset), cfg.image_size)
    G.load_state_dict(ckpt["models"]["G"])
    return G.to(device).eval()


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "dcgan", ddp)     # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: networks, data, optimizers (section 4) -----------------------------------------------------
    G, D = build(cfg, device)
    run.say(f"G: {common.count_parameters(G):,} parameters, D: {common.count_parameters(D):,} parameters")
    images, _ = common.training_set(cfg)            # --per-class N: the subset augment.py draws
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, rank=ddp.rank, world=ddp.world,
                             memory_format=memory_format)
    G, D = G.to(memory_format=memory_format), D.to(memory_format=memory_format)
    G.net[0].to(memory_format=torch.contiguous_format)  # its z is 1 x 1: NCHW (docs/gpu-check.md)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    fixed_noise = sample_z(64, cfg.nz, device)      # the same z for every sample grid of the run
    saved = dict(models={"G": G, "D": D}, optimizers={"G": opt_G, "D": opt_D}, data={"train": batches},
                 state={"fixed_noise": fixed_noise, "scaler": scaler})   # what a checkpoint holds
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    G_eval = G                                      # grids and evaluation use the plain module, on rank 0
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        G, D = (nn.parallel.DistributedDataParallel(m, device_ids=ddp.device_ids) for m in (G, D))
    if cfg.compile:
        G, D = torch.compile(G), torch.compile(D)
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
        losses = train_step(G, D, opt_G, opt_D, batches.next(), cfg, amp, scaler)
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
    run = common.resolve_run(cfg, "dcgan", ddp, command="--sample")
    stop = common.Stop(ddp)
    G = Generator(cfg.nz, cfg.ngf, common.dataset_channels(cfg.dataset), cfg.image_size).to(ddp.device).eval()
    common.load_models(run, G=G)
    done = common.write_sharded(run, lambda n, g: G(sample_z(n, cfg.nz, ddp.device, g)), cfg.sample, 500, {}, stop)
    if done and cfg.interpolate and ddp.rank == 0:
        common.save_grid(interpolation_grid(G, cfg.interpolate, cfg, ddp.device), run.out / "interpolation.png",
                         nrow=10)
        print(f"wrote {run.out / 'interpolation.png'}")


def score_command(cfg: Config) -> None:
    """--score IMAGES: each image's -logit D(x) in a CSV (higher = less real to D), D in eval mode: per image."""
    run = common.resolve_run(cfg, "dcgan", common.Processes(cfg.device, connect=False), command="--score")
    D = Discriminator(cfg.ndf, common.dataset_channels(cfg.dataset), cfg.image_size, cfg.leak).to(run.ddp.device).eval()
    common.load_models(run, D=D)
    images, labels = common.score_images(cfg, cfg.score)
    with torch.no_grad():
        scores = torch.cat([-D(x.to(run.ddp.device).float() / 127.5 - 1).cpu() for x in images.split(500)])
    common.write_scores(run, {"neg_D": scores}, labels)


def main():
    cfg = common.parse_config(Config)
    score_command(cfg) if cfg.score else sample_command(cfg) if cfg.sample else train(cfg)


if __name__ == "__main__":
    common.run_main(main)
