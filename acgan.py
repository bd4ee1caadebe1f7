"""Conditional Image Synthesis With Auxiliary Classifier GANs (AC-GAN).

Augustus Odena, Christopher Olah, Jonathon Shlens. ICML 2017. arXiv:1610.09585. Results and every command:
docs/acgan.md

DCGAN (dcgan.py) made class-conditional. G draws X_fake = G(c, z) for a class c ~ p(c) besides the noise z,
and D outputs both a probability distribution over sources, P(S | X), and one over the classes, P(C | X)
(section 3). The objective has two parts, the log-likelihood of the right source and of the right class:

    L_S = E[log P(S = real | X_real)] + E[log P(S = fake | X_fake)]
    L_C = E[log P(C = c | X_real)] + E[log P(C = c | X_fake)]
D is trained to maximize L_S + L_C, G to maximize L_C - L_S.

Each training step (dcgan's, with the class terms):
    (1) update D: minimize BCE(S | x, real) + BCE(S | G(c, z), fake) + CE(C | x, y) + CE(C | G(c, z), c)
    (2) update G: minimize BCE(S | G(c, z), real) + CE(C | G(c, z), c)   -- non-saturating in S, as dcgan's
with c uniform over the K classes, and CE the cross-entropy of D's class logits (log-softmax taken once).

The networks are dcgan.py's with two changes, as the paper's: G's input is z concatenated with the one-hot c
(110 x 1 x 1 for K = 10), and D's last convolution outputs 1 + K logits: the source logit and the K class
logits. At 64 x 64 x 3 and K = 10 that is 3,658,624 and 2,847,488 parameters (tested). Training is DCGAN's
section 4: Adam 2e-4, beta1 0.5, batch 128, weights N(0, 0.02), z uniform in [-1, 1]^100.

Deviations, each deliberate:
- The paper's ImageNet and CIFAR-10 networks (its appendix) are larger and use a linear layer from (c, z); we
  keep DCGAN's all-convolutional pair so that `diff dcgan.py acgan.py` shows the auxiliary classifier alone.
- G's source term is the non-saturating -log D_S(G(c, z)) instead of maximizing -L_S's log(1 - D_S), as dcgan.
- The class loss is the cross-entropy of D's logits; the popular PyTorch-GAN implementation applies a softmax
  before CrossEntropyLoss (twice) and sets batch norm's eps to 0.8 (its momentum was meant): neither here.
- Sample grids have one row per class, from the same fixed noise all run long; --sample writes N/K images of
  each class (not random labels, which bias FID and CAS), a labels array in its .npz, PNGs under class_<k>/.

Usage (every command, the results and the speed: docs/acgan.md):
    python acgan.py --image-size 28                   # Fashion-MNIST, its 10 classes
    python acgan.py --resume                          # continue runs/acgan-fashion-mnist (a requeued job too)
    python acgan.py --per-class 100 --subset-seed 0   # 100 training images of each class (augment.py's subsets)
    python acgan.py --sample 60000 --sample-out acgan.npz   # 6,000 per class, with labels: fid.py --cas
    python acgan.py --sample 64 --class 3             # one class
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
    class_: int = arg(-1, "with --sample: draw this class only (-1: N/K of each)", sampling=True, min=-1,
                      flag="--class")
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
    """(c, z) -> image through fractional-strided convolutions. At 64 x 64, K = 10:

        [z, one-hot c] 110 x 1 x 1 -> 512 x 4 x 4 -> 256 x 8 x 8 -> 128 x 16 x 16 -> 64 x 32 x 32 -> 3 x 64 x 64
    """

    def __init__(self, nz: int, classes: int, ngf: int, channels: int, image_size: int):
        super().__init__()
        self.nz, self.classes = nz, classes
        base, n = ladder(image_size)
        ch = ngf * 2 ** (n - 1)
        layers = [nn.ConvTranspose2d(nz + classes, ch, base, 1, 0, bias=False),  # ch x base x base
                  nn.BatchNorm2d(ch), nn.ReLU(True)]
        for _ in range(n - 1):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),     # ch/2 x 2H x 2W
                       nn.BatchNorm2d(ch // 2), nn.ReLU(True)]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 4, 2, 1, bias=False),        # channels x size x size
                   nn.Tanh()]                                                   # no BN on G's output
        self.net = nn.Sequential(*layers)

    def forward(self, c, z):
        h = torch.cat([z, F.one_hot(c, self.classes).to(z.dtype)], dim=1)
        return self.net(h.view(*h.shape, 1, 1))


class Discriminator(nn.Module):
    """image -> (source logit, class logits) through strided convolutions. At 64 x 64, K = 10:

        3 x 64 x 64 -> 64 x 32 x 32 -> 128 x 16 x 16 -> 256 x 8 x 8 -> 512 x 4 x 4 -> 11 x 1 x 1
    """

    def __init__(self, ndf: int, classes: int, channels: int, image_size: int, leak: float):
        super().__init__()
        base, n = ladder(image_size)
        layers = [nn.Conv2d(channels, ndf, 4, 2, 1, bias=False),                 # ndf x size/2 x size/2
                  nn.LeakyReLU(leak, True)]                                     # no BN on D's input
        ch = ndf
        for _ in range(n - 1):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False),               # 2ch x H/2 x W/2
                       nn.BatchNorm2d(ch * 2), nn.LeakyReLU(leak, True)]
            ch *= 2
        layers += [nn.Conv2d(ch, 1 + classes, base, 1, 0, bias=False)]          # (1 + K) x 1 x 1 logits
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        out = self.net(x).flatten(1)
        return out[:, 0], out[:, 1:]  # P(S = real | x) = sigmoid(l_S), P(C | x) = softmax(l_C)


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
def train_step(G, D, opt_G, opt_D, x, y, classes: int, cfg: Config, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict[str, torch.Tensor]:
    """One iteration on real images x of classes y. ``amp``: the autocast dtype (None: float32); ``scaler``: the
    GradScaler of fp16 (disabled, it passes the losses and steps through unchanged)."""
    z = sample_z(len(x), cfg.nz, x.device)
    c = torch.randint(classes, (len(x),), device=x.device)                     # c ~ p(c), uniform
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        fake = G(c, z)
        # (1) Update D: maximize L_S + L_C, i.e. minimize the source and class cross-entropies
        (s_real, c_real), (s_fake, c_fake) = D(x), D(fake.detach())
        loss_S = (F.binary_cross_entropy_with_logits(s_real.float(), torch.ones_like(s_real, dtype=torch.float))
                  + F.binary_cross_entropy_with_logits(s_fake.float(), torch.zeros_like(s_fake, dtype=torch.float)))
        loss_C = F.cross_entropy(c_real.float(), y) + F.cross_entropy(c_fake.float(), c)   # -L_C
        loss_D = loss_S + loss_C
    opt_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D).backward()
    scaler.step(opt_D)

    # (2) Update G: maximize L_C - L_S (non-saturating in S: fake labels are real for the G cost).
    # D's own gradients are not needed here: freezing D skips computing them (and DDP's sync of them).
    D.requires_grad_(False)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        s_fake_G, c_fake_G = D(fake)
        loss_G = (F.binary_cross_entropy_with_logits(s_fake_G.float(), torch.ones_like(s_fake_G, dtype=torch.float))
                  + F.cross_entropy(c_fake_G.float(), c))
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(opt_G)
    scaler.update()
    D.requires_grad_(True)

    return {"loss_D": loss_D.detach(), "loss_G": loss_G.detach(), "loss_C": loss_C.detach(),
            "D_x": torch.sigmoid(s_real.float()).mean().detach(),
            "class_accuracy": (c_real.argmax(1) == y).float().mean().detach()}   # D's, on the real batch


def classes_of(cfg: Config) -> int:
    if cfg.dataset not in common.CLASSES:
        raise common.UserError(f"--dataset {cfg.dataset} has no labels: AC-GAN needs a labelled dataset "
                               f"({', '.join(common.CLASSES)})")
    return common.CLASSES[cfg.dataset]


def build(cfg: Config, device):
    channels, classes = common.dataset_channels(cfg.dataset), classes_of(cfg)
    G = Generator(cfg.nz, classes, cfg.ngf, channels, cfg.image_size).to(device)
    D = Discriminator(cfg.ndf, classes, channels, cfg.image_size, cfg.leak).to(device)
    init_weights(G, cfg.init_std)
    init_weights(D, cfg.init_std)
    return G, D


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------
def load(path: str, device="cpu") -> Generator:
    """G of a checkpoint, in eval mode, its config rebuilt from the checkpoint:

        G = acgan.load("runs/acgan-fashion-mnist/ckpt.pt")
        c = torch.arange(10).repeat_interleave(8)        # 8 images of each class
        images = G(c, acgan.sample_z(80, G.nz, "cpu"))   # in [-1, 1], 80 x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "acgan")
    G = Generator(cfg.nz, classes_of(cfg), cfg.ngf, common.dataset_channels(cfg.dataset), cfg.image_size)
    G.load_state_dict(ckpt["models"]["G"])
    return G.to(device).eval()


def train(cfg: Config) -> None:
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "acgan", ddp)     # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: networks, data, optimizers (DCGAN's section 4) ---------------------------------------------
    G, D = build(cfg, device)
    run.say(f"G: {common.count_parameters(G):,} parameters, D: {common.count_parameters(D):,} parameters")
    images, labels = common.training_set(cfg)      # --per-class N: the subset augment.py draws
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = common.Batches(images, cfg.batch_size, cfg.seed, device, rank=ddp.rank, world=ddp.world,
                             memory_format=memory_format, labels=labels)
    G, D = G.to(memory_format=memory_format), D.to(memory_format=memory_format)
    G.net[0].to(memory_format=torch.contiguous_format)  # its z is 1 x 1: NCHW (docs/gpu-check.md)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    classes = G.classes
    fixed_c = torch.arange(classes, device=device).repeat_interleave(8)   # the grid: a row of 8 per class
    fixed_noise = sample_z(len(fixed_c), cfg.nz, device)
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
            common.save_grid(G_eval(fixed_c, fixed_noise), run.out / "samples" / f"{step:06d}.png", nrow=8)

    def draw(n: int, generator) -> torch.Tensor:    # --eval-every's samples, classes uniform
        with common.eval_mode(G_eval):
            c = torch.randint(classes, (n,), device=device, generator=generator)
            return G_eval(c, sample_z(n, cfg.nz, device, generator))

    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        x, y = batches.next()
        losses = train_step(G, D, opt_G, opt_D, x, y, classes, cfg, amp, scaler)
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
    """--sample N: N/K images of each class (or N of --class c) in --sample-out, split among processes and
    resumable, with their labels."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "acgan", ddp, command="--sample")
    stop = common.Stop(ddp)
    G = Generator(cfg.nz, classes_of(cfg), cfg.ngf, common.dataset_channels(cfg.dataset), cfg.image_size)
    G = G.to(ddp.device).eval()
    if cfg.class_ >= G.classes:
        raise common.UserError(f"--class {cfg.class_}: the model has classes 0 to {G.classes - 1}")
    common.load_models(run, G=G)
    common.write_sharded(run, lambda n, g, c: G(c, sample_z(n, cfg.nz, ddp.device, g)), cfg.sample, 500, {}, stop,
                         classes=G.classes)


def main():
    cfg = common.parse_config(Config)
    sample_command(cfg) if cfg.sample else train(cfg)


if __name__ == "__main__":
    common.run_main(main)
