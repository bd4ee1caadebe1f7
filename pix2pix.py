"""Image-to-Image Translation with Conditional Adversarial Networks (pix2pix).

Phillip Isola, Jun-Yan Zhu, Tinghui Zhou, Alexei A. Efros.
CVPR 2017. arXiv:1611.07004. Results and every command: docs/pix2pix.md

A conditional GAN learns a mapping G: x -> y from aligned pairs (x, y). D judges pairs: the input with the
target, or the input with G's output (eq. 1, 3, 4):

    L_cGAN(G, D) = E_{x,y}[log D(x, y)] + E_x[log(1 - D(x, G(x)))]
    L_L1(G)      = E_{x,y}[ ||y - G(x)||_1 ]
    G* = arg min_G max_D L_cGAN(G, D) + lambda L_L1(G),      lambda = 100

G has no z: its noise is dropout (section 2.1), in training and at test time, on the decoder layers that have it:
3 at 256 x 256, 2 at 128, 1 at 64, none at 32 and below, where G is deterministic (the offline demo's case).

Each training step (section 3.3; the official code's optimize_parameters):
    (1) update D: maximize log D(x, y) + log(1 - D(x, G(x))), the objective divided by 2 ("slows down the rate
        at which D learns relative to G")
    (2) update G: maximize log D(x, G(x)) (the non-saturating loss: fake pairs are labelled real for G's
        cost) and minimize lambda ||y - G(x)||_1
The losses are means over D's output map: each of its N x N outputs judges one patch of the pair.

Networks (section 3.2, appendix 6.1; the official PyTorch code's unet_256 and "basic" D), at 256 x 256:
- G, a U-Net: 8 stride-2 convolutions down to 1 x 1 (C64-C128-C256-C512-C512-C512-C512-C512), 8 transposed ones
  back up, each fed the encoder's output of its size too (skips); batch norm but on the outermost and innermost
  encoder layers, LeakyReLU 0.2 down, ReLU up, tanh out, dropout 0.5 after the decoder's 2nd to 4th layers:
  54,413,955 parameters, the official count. A size 2^n has n levels (5, and no dropout layer, at 32).
- D, the 70 x 70 PatchGAN: C64-C128-C256-C512 (4 x 4, strides 2, 2, 2, 1) and a 1-channel 4 x 4 convolution,
  LeakyReLU 0.2, batch norm but on the first: 30 x 30 outputs, 2,768,705 parameters, the official count.
Training (section 4, appendix 6.2): weights N(0, 0.02), batch-norm scales N(1, 0.02); Adam lr 2e-4, betas (0.5,
0.999); batch 1; pairs resized to 286 x 286 (bicubic), then the same random 256 x 256 crop and flip for x and y;
lr constant for 100 epochs, then linearly to zero over 100 more. Training reads train/ only; val/ (else test/,
else train/ with a warning) gives the sample grids, --sample and --eval-every.

Inference (section 3.3): "we run the generator net in exactly the same manner as during the training phase":
dropout on, batch norm on each image's own statistics (one at a time, as the official test.py). Sample grids,
--sample, --translate and --eval-every do so, the running statistics untouched and the dropout masks seeded.

The offline demo (--dataset edges2fashion, the default): a Fashion-MNIST image's edge map -> the image, at 32 x 32
with smaller DEMO_DEFAULTS. --dataset aligned reads the official datasets (facades, maps, edges2shoes...).

Deviations, each deliberate:
- The lr is a function of the step, the official value epoch by epoch (their LambdaLR stepped at each epoch's
  start: epoch 100 runs at 100/101 of lr, epoch 200 at 0; a --steps past the schedule is refused): exact resume.
- An epoch drops its last incomplete batch (the official one runs it smaller): no difference at batch 1.
- The crops and flips come from a generator seeded by (--seed, epoch, batch), not Python's global one.
- Dropout sits on decoder layers 2-4 as in the official PyTorch code (the paper's appendix: layers 1-3).

Usage (every command, the results and the speed: docs/pix2pix.md):
    python pix2pix.py                                   # the offline demo: Fashion-MNIST edges -> images
    python pix2pix.py --resume                          # continue runs/pix2pix-edges2fashion (a requeued job too)
    python pix2pix.py --dataset aligned --data-root datasets/facades --direction BtoA   # the paper's facades
    python pix2pix.py --translate my_edges/ --translate-out out/   # translate a folder with the checkpoint
    python pix2pix.py --sample 1000 --sample-out fake.npz          # 1000 held-out inputs translated, for fid.py
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import fid
from common import arg

DEMOS = ("edges2fashion", "synthetic-pairs")
DEMO_DEFAULTS = {"image_size": 32, "load_size": 36, "ngf": 32, "ndf": 32, "n_layers_D": 2, "batch_size": 4,
                 "n_epochs": 5, "n_epochs_decay": 10}   # 32 x 32 images; edges2shoes' batch and epochs


@dataclass
class Config(common.RunConfig):
    dataset: str = arg("edges2fashion", "edges2fashion (offline demo: Fashion-MNIST edge maps -> images) | aligned "
                       "(the official A|B format: --data-root with train/, val/, test/) | synthetic-pairs (tests)",
                       metavar="NAME")
    steps: int = arg(0, "G updates (0: the schedule's n_epochs + n_epochs_decay epochs)", run=True, min=0)
    translate: str = arg("", "no training: translate every image in DIR with the checkpoint, to --translate-out",
                         command=True, metavar="DIR")
    translate_out: str = arg("", "where --translate writes <image name>.png (default: <out>/translated)",
                             command=True, metavar="DIR")
    direction: str = arg("AtoB", "AtoB: learn A -> B (the left half -> the right half of an aligned image; edges "
                         "-> image) | BtoA", choices=("AtoB", "BtoA"))
    # Paper hyper-parameters (section 4, appendix 6.2: the official code's defaults; demos: DEMO_DEFAULTS)
    image_size: int = arg(256, "the training crop, a power of two (the U-Net has log2 of it levels; demos: 32)",
                          min=8)
    load_size: int = arg(286, "pairs are resized to this size, then randomly cropped (demos: 36)", min=8)
    flip: bool = arg(True, "random horizontal flips of the pairs")
    batch_size: int = arg(1, "minibatch size (global, shared among processes; demos: 4)", min=1)
    lr: float = arg(2e-4, "Adam learning rate", above=0)
    beta1: float = arg(0.5, "Adam beta1", min=0, max=0.999999)
    beta2: float = arg(0.999, "Adam beta2", min=0, max=0.999999)
    n_epochs: int = arg(100, "epochs at the initial learning rate (demos: 5)", min=1)
    n_epochs_decay: int = arg(100, "then epochs of linear decay to zero (demos: 10)", min=0)
    lambda_L1: float = arg(100.0, "weight of the L1 term (eq. 4)", min=0)
    ngf: int = arg(64, "G's filters in its first layer (doubled down to 8 ngf; demos: 32)", min=1)
    ndf: int = arg(64, "D's filters in its first layer (demos: 32)", min=1)
    n_layers_D: int = arg(3, "D's stride-2 layers: 3 is the 70 x 70 PatchGAN (demos: 2, 34 x 34)", min=1)
    dropout: float = arg(0.5, "dropout on the U-Net's 8 ngf decoder layers, G's noise (from 64 x 64 up: smaller "
                         "U-Nets have no such layer)", min=0, max=0.99)
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
def unet_levels(image_size: int) -> int:
    levels = image_size.bit_length() - 1
    if image_size != 2 ** levels or levels < 3:
        raise common.UserError(f"--image-size {image_size} is not supported: the U-Net halves it down to 1 x 1; use a "
                               f"power of two >= 8 (256: the paper)")
    return levels


class UNet(nn.Module):
    """x -> y through ``levels`` stride-2 convolutions and back, each decoder layer fed with the encoder's output
    of its size (skip connections). unet_256 (levels = 8, ngf = 64), encoder:

        3 x 256 -> 64 x 128 -> 128 x 64 -> 256 x 32 -> 512 x 16 -> 512 x 8 -> 512 x 4 -> 512 x 2 -> 512 x 1
    decoder (input channels: the skip's, then the layer below's output; dropout on the 4, 8, 16 outputs):
        512 x 1 -> 512 x 2 -> (1024) 512 x 4 -> (1024) 512 x 8 -> (1024) 512 x 16 -> (1024) 256 x 32
        -> (512) 128 x 64 -> (256) 64 x 128 -> (128) 3 x 256
    """

    def __init__(self, c_in: int, c_out: int, levels: int, ngf: int, dropout: float):
        super().__init__()
        width = [min(ngf * 2 ** i, ngf * 8) for i in range(levels)]      # encoder outputs: 64 128 256 512 512...
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        for i in range(levels):                                         # down: halves the size
            layers = [] if i == 0 else [nn.LeakyReLU(0.2, True)]
            layers.append(nn.Conv2d(c_in if i == 0 else width[i - 1], width[i], 4, 2, 1, bias=False))
            if 0 < i < levels - 1:                                      # no norm on the outermost and innermost
                layers.append(nn.BatchNorm2d(width[i]))
            self.down.append(nn.Sequential(*layers))                     # width[i] x S/2^(i+1)
        for i in reversed(range(levels)):                               # up: doubles it back
            inner = width[i] if i == levels - 1 else 2 * width[i]       # the innermost has no skip to join
            layers = [nn.ReLU(True), nn.ConvTranspose2d(inner, c_out if i == 0 else width[i - 1], 4, 2, 1,
                                                        bias=i == 0)]
            if i == 0:
                layers.append(nn.Tanh())                                 # c_out x S
            else:
                layers.append(nn.BatchNorm2d(width[i - 1]))              # width[i-1] x S/2^i
                if 4 <= i < levels - 1 and dropout:                      # the 8 ngf levels between 4 and innermost
                    layers.append(nn.Dropout(dropout))
            self.up.append(nn.Sequential(*layers))

    def forward(self, x):
        skips = []
        for down in self.down:
            x = down(x)
            skips.append(x)   # the next down's in-place LeakyReLU reaches it too; the up's ReLU makes that moot
        x = self.up[0](skips.pop())
        for up in self.up[1:]:
            x = up(torch.cat([skips.pop(), x], 1))
        return x


class PatchGAN(nn.Module):
    """(x, y) pair -> a map of logits, one per patch. The 70 x 70 PatchGAN (n_layers = 3) at 256 x 256:

        6 x 256 -> 64 x 128 -> 128 x 64 -> 256 x 32 -> 512 x 31 (stride 1) -> 1 x 30 (stride 1)
    """

    def __init__(self, c_in: int, ndf: int, n_layers: int):
        super().__init__()
        layers = [nn.Conv2d(c_in, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]           # ndf x S/2, no norm
        ch = ndf
        for n in range(1, n_layers + 1):
            out, stride = ndf * min(2 ** n, 8), 2 if n < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False),              # out x S/2^(n+1), last: -1
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))                                   # 1 x (size - 1): logits
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
    """Appendix 6.2 (the official init_type normal): weights N(0, 0.02), biases 0; batch-norm scales N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)


def channels(cfg: Config) -> tuple[int, int]:
    common.check_dataset(cfg.dataset, tuple(common.PAIRED_DATASETS))
    c = common.PAIRED_DATASETS[cfg.dataset]
    return c, c   # (x, y): both sides of a pair have the same channels in every dataset here


def build(cfg: Config, device):
    """G and D, initialised; the sizes and flags they cannot take are refused in one line."""
    c_x, c_y = channels(cfg)
    G = UNet(c_x, c_y, unet_levels(cfg.image_size), cfg.ngf, cfg.dropout).to(device)
    D = PatchGAN(c_x + c_y, cfg.ndf, cfg.n_layers_D).to(device)
    patch_grid(cfg.image_size, cfg.n_layers_D)
    if cfg.load_size < cfg.image_size:
        raise common.UserError(f"--load-size {cfg.load_size} is smaller than the crop, --image-size {cfg.image_size}")
    if "dropout" in cfg.given and not any(isinstance(m, nn.Dropout) for m in G.modules()):
        raise common.UserError(f"--dropout {cfg.dropout}: the U-Net of --image-size {cfg.image_size} has no dropout "
                               f"layer (they sit on its 8 ngf decoder layers, from 64 x 64 up); drop the flag")
    init_weights(G, cfg.init_std)
    init_weights(D, cfg.init_std)
    return G, D


# ----------------------------------------------------------------------------------------------
# Loss, schedule, training step
# ----------------------------------------------------------------------------------------------
def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """-log D (real) or -log(1 - D) (fake), D = sigmoid(logits), averaged over every patch and pair (the official
    'vanilla' GANLoss, BCE with logits)."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits) if real else torch.zeros_like(logits))


def lr_at(step: int, steps_per_epoch: int, cfg: Config) -> float:
    """The learning rate of update ``step`` (from 0): the official 'linear' policy, constant for n_epochs, then
    linearly to zero over n_epochs_decay. Epoch e = step // steps_per_epoch + 1 runs at
    lr * (1 - max(0, e + 1 - n_epochs) / (n_epochs_decay + 1))  (their lambda_rule with epoch_count 1, after
    the LambdaLR step at the start of epoch e)."""
    epoch = step // steps_per_epoch + 1
    return cfg.lr * (1.0 - max(0, epoch + 1 - cfg.n_epochs) / (cfg.n_epochs_decay + 1))


def train_step(G, D, opt_G, opt_D, x, y, lr: float, cfg: Config, amp: torch.dtype | None = None,
               scaler=torch.amp.GradScaler("cpu", enabled=False)) -> dict[str, torch.Tensor]:
    """One iteration on pairs (x, y) at learning rate ``lr``. ``amp``: the autocast dtype (None: float32);
    ``scaler``: the GradScaler of fp16 (disabled, it passes the losses and steps through unchanged)."""
    for opt in (opt_G, opt_D):
        for group in opt.param_groups:
            group["lr"] = lr
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        fake = G(x)
        # (1) Update D: maximize log D(x, y) + log(1 - D(x, G(x))), divided by 2 (section 3.3)
        loss_D_fake = gan_loss(D(torch.cat([x, fake.detach()], 1)), real=False)
        loss_D_real = gan_loss(D(torch.cat([x, y], 1)), real=True)
        loss_D = 0.5 * (loss_D_fake + loss_D_real)
    opt_D.zero_grad(set_to_none=True)
    scaler.scale(loss_D).backward()
    scaler.step(opt_D)

    # (2) Update G: maximize log D(x, G(x)) (non-saturating: the fake pair labelled real), minimize lambda L1.
    # D's own gradients are not needed here: freezing D skips computing them (and DDP's sync of them).
    D.requires_grad_(False)
    with torch.autocast(x.device.type, dtype=amp, enabled=amp is not None):
        loss_G_GAN = gan_loss(D(torch.cat([x, fake], 1)), real=True)
        loss_G_L1 = cfg.lambda_L1 * F.l1_loss(fake.float(), y)                       # lambda L_L1 (eq. 3)
        loss_G = loss_G_GAN + loss_G_L1                                              # eq. 4
    opt_G.zero_grad(set_to_none=True)
    scaler.scale(loss_G).backward()
    scaler.step(opt_G)
    scaler.update()
    D.requires_grad_(True)
    return {"G_GAN": loss_G_GAN.detach(), "G_L1": loss_G_L1.detach(), "D_real": loss_D_real.detach(),
            "D_fake": loss_D_fake.detach()}


# ----------------------------------------------------------------------------------------------
# Inference (section 3.3): G as in training, one image at a time
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def translate(G: nn.Module, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """G(x) as the paper and the official test.py run it: dropout on, batch norm on the statistics of the
    image itself (batch 1), for each image of x in turn. The running statistics are not updated and the
    dropout masks come from a generator seeded by ``seed``: the training's random streams are untouched."""
    norms = [m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    training = G.training
    G.train()
    for m in norms:
        m.track_running_stats = False    # batch statistics, running ones neither used nor updated
    try:
        # x's device's generator alone is seeded (torch.manual_seed would reseed every device's), then restored
        with torch.random.fork_rng(devices=[] if x.device.type == "cpu" else [x.device], device_type=x.device.type):
            (torch.default_generator if x.device.type == "cpu" else torch.get_device_module(x.device)).manual_seed(seed)
            return torch.cat([G(image) for image in x.split(1)])
    finally:
        for m in norms:
            m.track_running_stats = True
        G.train(training)


def held_out(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The pairs (x, y) of the first held-out split there is (val, test; else train, said in a warning), resized
    to image_size without jitter: for the sample grids, --sample and --eval-every."""
    split = next((s for s in ("val", "test") if common.has_split(cfg.dataset, cfg.data_root, s)), "train")
    if split == "train":
        common.warn(f"{cfg.data_root} has no val/ or test/: the sample grids, --sample and --eval-every use the "
                    f"training pairs")
    return split_pairs(common.load_pairs(cfg.dataset, cfg.data_root, cfg.image_size, split), cfg)


def split_pairs(pairs: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of pairs stored as A's channels then B's, in --direction."""
    c_a = common.PAIRED_DATASETS[cfg.dataset]
    a, b = pairs[:, :c_a], pairs[:, c_a:]
    return (a, b) if cfg.direction == "AtoB" else (b, a)


def draw(images: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n of ``images``, each drawn uniformly and independently with ``generator``: --eval-every's inputs."""
    return images[torch.randint(len(images), (n,), generator=generator, device=generator.device).cpu()]


def scaled(images: torch.Tensor, device) -> torch.Tensor:
    """uint8 -> floats in [-1, 1] on ``device``."""
    return images.to(device).float() / 127.5 - 1


def load(path: str, device="cpu") -> UNet:
    """G of a checkpoint, its config rebuilt from the checkpoint:

        G = pix2pix.load("runs/pix2pix-edges2fashion/ckpt.pt")
        y = pix2pix.translate(G, x)         # x, y in [-1, 1], N x C x H x W
    """
    cfg, ckpt = common.load_config(Config, path, "pix2pix")
    c_x, c_y = channels(cfg)
    G = UNet(c_x, c_y, unet_levels(cfg.image_size), cfg.ngf, cfg.dropout)
    G.load_state_dict(ckpt["models"]["G"])
    return G.to(device).eval()


def train(cfg: Config) -> None:
    if cfg.translate_out:
        raise common.UserError("--translate-out goes with --translate DIR")
    # ---- run plumbing, the same in every script ----------------------------------------------------------------
    ddp = common.Processes(cfg.device)              # torchrun's processes (or this one alone): rank, world, device
    run = common.resolve_run(cfg, "pix2pix", ddp)   # --out, --resume / --init and the config; nothing is written
    stop = common.Stop(ddp)                         # SIGTERM, SIGUSR1, Ctrl-C: at once during the set-up (exit 3)
    common.seed_everything(cfg.seed + ddp.rank)     # each process its own noise; DDP copies rank 0's weights
    device, amp = ddp.device, common.amp_dtype(cfg.amp, ddp.device)
    # ---- the paper: networks, data, schedule, optimizers (section 4, appendix 6.2) ------------------------------
    G, D = build(cfg, device)
    side = patch_grid(cfg.image_size, cfg.n_layers_D)
    run.say(f"G (U-Net, {unet_levels(cfg.image_size)} levels): {common.count_parameters(G):,} parameters, D (PatchGAN, "
            f"{side} x {side} patches): {common.count_parameters(D):,} parameters")
    pairs = common.load_pairs(cfg.dataset, cfg.data_root, cfg.load_size)
    held_x, held_y = held_out(cfg)
    fixed_x, fixed_y = scaled(held_x[:12], device), scaled(held_y[:12], device)   # a 6 x 6 grid of triplets
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batches = common.Batches(pairs, cfg.batch_size, cfg.seed, device, rank=ddp.rank, world=ddp.world,
                             memory_format=memory_format, crop=cfg.image_size, hflip=cfg.flip)
    steps_per_epoch = batches.batches_per_epoch
    schedule = (cfg.n_epochs + cfg.n_epochs_decay) * steps_per_epoch
    if cfg.steps > schedule:   # past the last epoch, lr_at turns negative: gradient ascent
        raise common.UserError(f"--steps {cfg.steps} runs past the end of the learning-rate schedule, step {schedule} "
                               f"({cfg.n_epochs} + {cfg.n_epochs_decay} epochs of {steps_per_epoch} steps, the last at "
                               f"lr 0); give at most that, or start a new run with more --n-epochs or --n-epochs-decay")
    cfg.steps = cfg.steps or schedule
    G, D = G.to(memory_format=memory_format), D.to(memory_format=memory_format)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    saved = dict(models={"G": G, "D": D}, optimizers={"G": opt_G, "D": opt_D}, data={"train": batches},
                 state={"scaler": scaler})          # what a checkpoint holds
    # ---- run plumbing: restore, folder, processes, log ---------------------------------------------------------
    step = common.restore(run, **saved)             # the checkpoint, or --init's weights; 0 for a new run
    common.open_run_folder(run)                     # create and lock it, write args.json (rank 0)
    G_eval = G                                      # grids and evaluation use the plain module, on rank 0
    if ddp.world > 1:                               # torchrun: one process per GPU, gradients averaged
        G, D = (nn.parallel.DistributedDataParallel(m, device_ids=ddp.device_ids) for m in (G, D))
    if cfg.compile:
        G, D = torch.compile(G), torch.compile(D)
    log = common.Log(run, step)
    evaluate = fid.Evaluator(run, held_y) if cfg.eval_every else None   # G(held-out x) against held-out y

    def save_samples(step: int) -> None:            # input | output | target, two triplets a row; translate()
        fake = translate(G_eval, fixed_x, cfg.seed)  # runs G as in training and changes nothing of it
        common.save_grid(torch.stack([fixed_x, fake, fixed_y], 1).flatten(0, 1),
                         run.out / "samples" / f"{step:06d}.png")

    def translations(n: int, generator) -> torch.Tensor:   # --eval-every's: n held-out inputs drawn anew, translated
        x = scaled(draw(held_x, n, generator), device)
        return translate(G_eval, x, int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device)))

    stop.begin()
    # ---- the loop ------------------------------------------------------------------------------------------------
    while step < cfg.steps and not stop.agreed(step):
        x, y = split_pairs(batches.next(), cfg)
        losses = train_step(G, D, opt_G, opt_D, x, y, lr_at(step, steps_per_epoch, cfg), cfg, amp, scaler)
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
    """--translate DIR: every image of DIR through the checkpoint's G, to --translate-out (one process)."""
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "pix2pix", ddp, command="--translate")
    G = build(cfg, ddp.device)[0]
    inputs, paths = common.read_images(cfg.translate, cfg.image_size, channels(cfg)[0])
    out = common.prepare_folder(cfg.translate_out or run.out / "translated", cfg.translate, "--translate-out")
    common.load_models(run, G=G)
    for i in range(0, len(inputs), 64):
        common.write_named(translate(G, scaled(inputs[i:i + 64], ddp.device), cfg.seed + i), paths[i:i + 64], out)
    print(f"translated {len(inputs)} images of {cfg.translate} to {out}")


def sample_command(cfg: Config) -> None:
    """--sample N: N held-out inputs picked by --seed (without replacement), translated, in one process."""
    if cfg.translate_out:
        raise common.UserError("--translate-out goes with --translate DIR")
    ddp = common.Processes(cfg.device, connect=False)
    run = common.resolve_run(cfg, "pix2pix", ddp, command="--sample")
    G = build(cfg, ddp.device)[0]
    x = held_out(cfg)[0]
    if cfg.sample > len(x):
        raise common.UserError(f"--sample {cfg.sample}: the held-out split has {len(x)} inputs")
    x = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.sample]]
    common.load_models(run, G=G)
    common.write_images(run, (translate(G, scaled(x[i:i + 100], ddp.device), cfg.seed + i)
                              for i in range(0, len(x), 100)))


def main():
    cfg = common.parse_config(Config)
    apply_demo_defaults(cfg)                        # before resolve_run: a checkpoint's config still wins
    translate_command(cfg) if cfg.translate else sample_command(cfg) if cfg.sample else train(cfg)


if __name__ == "__main__":
    common.run_main(main)
