"""VQ-VAE: turn an image into a grid of discrete codes, and back (van den Oord et al. 2017).

A *native* multimodal model (Chameleon, Emu3, the unified decoder in ``mmkit.native``) reads
and writes images as tokens of its own vocabulary. Something has to turn pixels into a short
sequence of integers and integers back into pixels: this image tokenizer. Fig. 1 of the paper:

    x (N, 3, H, W) in [-1, 1]
      -> encoder E (strided convs + residual blocks)        z_e = E(x)      (N, D, h, w)
      -> nearest codebook vector e_k, k = argmin |z_e - e_k|  ids           (N, h, w)
      -> z_q = e_ids                                                         (N, D, h, w)
      -> decoder G (residual blocks + upsampling convs)     x_hat = G(z_q)   (N, 3, H, W)

with h = H / downsample. One image becomes h * w tokens (8 x 8 = 64 at 64 px, downsample 8).

The loss (paper Eq. 3, with the codebook term replaced by EMA updates, Appendix A.1):

    L = |x - x_hat|^2  +  beta * |z_e - sg[e]|^2                 (beta = 0.25)
        reconstruction    commitment: the encoder keeps close to its codes

* **Straight-through gradient.** argmin has no gradient, so the decoder's gradient w.r.t. z_q
  is copied to z_e unchanged: ``z_q = z_e + sg[e - z_e]`` (forward value e, backward identity).
* **EMA codebook** (Appendix A.1). Instead of a gradient loss on the codebook, each code moves
  to the running mean of the encoder outputs assigned to it:
  ``N_k <- gamma N_k + (1 - gamma) n_k``, ``m_k <- gamma m_k + (1 - gamma) sum_{z -> k} z``,
  ``e_k = m_k / N_k`` with ``gamma = 0.99``. Laplace smoothing keeps ``N_k`` away from 0:
  ``N_k <- (N_k + eps) / (n + K eps) * n``.
* **Dead codes.** A code that no encoder output picks never moves again and wastes vocabulary.
  Codes whose EMA count ``N_k`` falls below ``dead_threshold`` are restarted on random encoder
  outputs of the current batch (Jukebox, Dhariwal et al. 2020, Sec. 2.3). The codebook starts
  with every count at 0, so the first batch restarts (nearly) every code: a data-dependent init.
* **Usage.** ``perplexity = exp(H(p))`` of the code histogram: the number of codes in effective
  use (1 = collapse, K = uniform). It is logged every step to catch dead codes.

    model = load_vqvae("tiny")                   # shipped in assets/tiny/vq (``mmkit zoo build --only vq``)
    ids = model.encode(model.preprocess(images))  # (N, 8, 8) long in [0, 1024)
    images = model.to_images(model.decode(ids))   # list of PIL images

Choosing the grid (measured, not guessed)
-----------------------------------------
A unified decoder pays one token per latent cell, so the grid is a budget. Measured on 200 test
renders (64 px, batch 16, lr 3e-3, one CPU thread shared with other jobs, so seconds are rough);
``recall`` = share of objects whose colour *and* shape the checker finds in the reconstruction
(on the original renders it finds 100%):

    grid   K     hidden  level blocks  steps  params  PSNR dB  recall  usage  perplexity  seconds
    8x8    512   128     0             600    640k    24.6     0.55    1.00   429         207
    8x8    512   128     1             600    691k    25.6     0.68    1.00   431         216
    8x8    512   128     1             900    691k    26.6     0.79    1.00   459         275
    8x8    1024  128     1             900    691k    27.0     0.84    0.95   787         298
    16x16  512   64      0             600    168k    26.9     0.85    1.00   328         197
    16x16  512   64      1             900    178k    28.6     0.89    1.00   409         225

Also tried on 8x8: an L1 term next to the MSE (K 512: 0.79 -> 0.79), dead_threshold 0.2
instead of 1.0 (K 1024: 0.84 -> 0.82), 32 px images with downsample 4 (K 512, 600 steps: 0.48),
lr 5e-3 (K 1024: the encoder collapsed onto one code, perplexity 1.0 from step ~200 on: the
perplexity log is how you see it).
Colour survives everywhere; what an 8x8 grid loses is the outline of *small* objects (a small
star comes back as a blob). The shipped tokenizer is the K 1024 8x8 row (64 tokens per image,
the decoder's budget; its fp16 weights measure the same); 16x16 buys ~5 points of recall for
4x the tokens. Neither reaches 0.9 in this ~5 minute CPU budget; both still improve with steps.

Trained on ShapesWorld train-split renders by :func:`train_vqvae`; :func:`evaluate_vqvae` reports
PSNR, codebook usage and whether the reconstructions still show every object's colour and shape
as judged by :mod:`mmkit.native.checker` (the scene renderer run backwards).
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from mmkit.nn import load_state_dict_strict
from mmkit.paths import assets_dir

__all__ = ["VQConfig", "VectorQuantizer", "VQVAE", "load_vqvae", "train_vqvae", "evaluate_vqvae",
           "build_vq", "VQ_DIR", "CONFIG", "WEIGHTS"]

VQ_DIR = "tiny/vq"
CONFIG, WEIGHTS, REPORT = "config.json", "model.safetensors", "report.json"


@dataclass
class VQConfig:
    image_size: int = 64          # square images, pixels
    downsample: int = 8           # power of 2; the latent grid is image_size / downsample a side
    hidden: int = 128             # channels at the latent grid; halved per level towards the pixels
    res_blocks: int = 2           # residual blocks at the latent grid, in the encoder and in the decoder
    level_blocks: int = 1         # residual blocks on each grid between the pixels and the latents
    codebook_size: int = 1024     # K: the image vocabulary
    code_dim: int = 32            # D: width of a code vector
    beta: float = 0.25            # commitment weight (paper: 0.25)
    decay: float = 0.99           # EMA decay gamma (paper: 0.99)
    eps: float = 1e-5             # Laplace smoothing of the EMA counts
    dead_threshold: float = 1.0   # EMA count (vectors per batch) below which a code is restarted
    l1_weight: float = 0.0        # optional L1 term next to the MSE

    def __post_init__(self):
        d = self.downsample
        if d < 1 or d & (d - 1):
            raise ValueError(f"VQConfig.downsample must be a power of 2 (1, 2, 4, 8, ...), got {d}")
        if self.image_size % d:
            raise ValueError(f"VQConfig.image_size {self.image_size} must be a multiple of downsample {d} "
                             f"(the latent grid is image_size / downsample)")
        if not 0.0 < self.decay < 1.0:
            raise ValueError(f"VQConfig.decay must be in (0, 1), got {self.decay}")

    @property
    def levels(self) -> int:
        return int(math.log2(self.downsample))

    @property
    def grid(self) -> tuple[int, int]:
        g = self.image_size // self.downsample
        return (g, g)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VQConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"VQConfig.from_dict: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------------ the quantizer
class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with an EMA codebook (VQ-VAE, Sec. 3.1 and Appendix A.1).

    forward(z (N, D, h, w)) -> (z_q (N, D, h, w), ids (N, h, w), commit_loss, stats)

    ``z_q`` carries the codes' values forward and the identity gradient backward
    (straight-through); ``commit_loss = beta * mean |z - sg[e]|^2``; ``stats`` holds the batch's
    ``perplexity`` and ``usage`` (share of the codebook that at least one vector picked).
    In training mode the codebook (a buffer: it gets no gradient) moves by EMA and dead codes
    are restarted; in eval mode it is untouched.
    """

    def __init__(self, codebook_size: int, code_dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, dead_threshold: float = 1.0):
        super().__init__()
        self.codebook_size, self.code_dim = codebook_size, code_dim
        self.beta, self.decay, self.eps, self.dead_threshold = beta, decay, eps, dead_threshold
        self.register_buffer("embed", torch.randn(codebook_size, code_dim))         # (K, D): e_k
        self.register_buffer("cluster_size", torch.zeros(codebook_size))            # (K,): N_k
        self.register_buffer("embed_sum", torch.zeros(codebook_size, code_dim))     # (K, D): m_k

    def nearest(self, flat: Tensor) -> Tensor:
        """(M, D) vectors -> (M,) ids of the nearest code (squared Euclidean distance)."""
        d = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t()
             + self.embed.pow(2).sum(1)[None])                                      # (M, K)
        return d.argmin(1)

    def lookup(self, ids: Tensor) -> Tensor:
        """(N, h, w) ids -> (N, D, h, w) code vectors."""
        return self.embed[ids].permute(0, 3, 1, 2).contiguous()

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
        N, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)                                 # (M, D), M = N*h*w
        ids = self.nearest(flat.detach())                                           # (M,)
        onehot = F.one_hot(ids, self.codebook_size).to(flat.dtype)                  # (M, K)
        if self.training:
            self._ema_update(flat.detach(), onehot)
        q = self.embed[ids].view(N, h, w, D).permute(0, 3, 1, 2)                    # (N, D, h, w)
        commit = self.beta * F.mse_loss(z, q.detach())                              # beta |z - sg[e]|^2
        z_q = z + (q - z).detach()                                                  # straight-through
        p = onehot.mean(0)                                                          # (K,) code histogram
        stats = {"perplexity": torch.exp(-(p * torch.log(p + 1e-10)).sum()).detach(),
                 "usage": (p > 0).float().mean()}
        return z_q, ids.view(N, h, w), commit, stats

    @torch.no_grad()
    def _ema_update(self, flat: Tensor, onehot: Tensor) -> None:
        g = self.decay
        self.cluster_size.mul_(g).add_(onehot.sum(0), alpha=1 - g)                  # N_k
        self.embed_sum.mul_(g).add_(onehot.t() @ flat, alpha=1 - g)                 # m_k
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n   # Laplace
        self.embed.copy_(self.embed_sum / smoothed[:, None])                       # e_k = m_k / N_k
        self.restart_dead_codes(flat)

    @torch.no_grad()
    def restart_dead_codes(self, flat: Tensor) -> int:
        """Move codes with ``N_k < dead_threshold`` onto random vectors of ``flat`` (M, D).

        A restarted code starts at the threshold (``N_k = threshold``, ``m_k = N_k e_k``): if no
        vector picks it in the next batch it falls below again and is moved again, until it
        lands somewhere the encoder outputs actually are. Returns how many were restarted.
        """
        dead = (self.cluster_size < self.dead_threshold).nonzero().squeeze(1)      # (n_dead,)
        if len(dead) == 0:
            return 0
        pick = torch.randint(0, len(flat), (len(dead),), device=flat.device)
        self.embed[dead] = flat[pick]
        self.cluster_size[dead] = self.dead_threshold
        self.embed_sum[dead] = flat[pick] * self.dead_threshold
        return len(dead)


# ---------------------------------------------------------------------- encoder / decoder
class ResBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))): the VQ-VAE paper's residual block (Sec. 4.1)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(ch // 2, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def _widths(cfg: VQConfig) -> list[int]:
    """Channels per level, pixels first: hidden / 2^(levels - i), the latent grid gets ``hidden``."""
    return [max(16, cfg.hidden >> (cfg.levels - i)) for i in range(cfg.levels + 1)]


class Encoder(nn.Module):
    """(N, 3, H, W) -> (N, code_dim, H / downsample, W / downsample)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch = _widths(cfg)
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1),   # halves H and W
                          *[ResBlock(ch[i + 1]) for _ in range(cfg.level_blocks if i < cfg.levels - 1 else 0)])
            for i in range(cfg.levels))
        self.blocks = nn.Sequential(*[ResBlock(ch[-1]) for _ in range(cfg.res_blocks)])
        self.out = nn.Conv2d(ch[-1], cfg.code_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)                                   # (N, c0, H, W)
        for level in self.down:
            x = level(x)
        return self.out(F.silu(self.blocks(x)))            # (N, D, h, w)


class Decoder(nn.Module):
    """(N, code_dim, h, w) -> (N, 3, h * downsample, w * downsample); nearest-neighbour
    upsampling + 3x3 conv per level (no transposed convs: no checkerboard artefacts)."""

    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch = _widths(cfg)[::-1]                            # latent grid first
        self.inp = nn.Conv2d(cfg.code_dim, ch[0], 3, padding=1)
        self.blocks = nn.Sequential(*[ResBlock(ch[0]) for _ in range(cfg.res_blocks)])
        self.up = nn.ModuleList(nn.Conv2d(ch[i], ch[i + 1], 3, padding=1) for i in range(cfg.levels))
        # the shapes are drawn here: a residual block on every finer grid but the full-size one
        self.up_blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(ch[i + 1]) for _ in range(cfg.level_blocks if i < cfg.levels - 1 else 0)])
            for i in range(cfg.levels))
        self.out = nn.Conv2d(ch[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.blocks(self.inp(z))                       # (N, C, h, w)
        for conv, blocks in zip(self.up, self.up_blocks):
            x = blocks(conv(F.interpolate(F.silu(x), scale_factor=2, mode="nearest")))   # doubles h and w
        return self.out(F.silu(x))                         # (N, 3, H, W)


# ------------------------------------------------------------------------------ the model
class VQVAE(nn.Module):
    """Encoder -> VectorQuantizer -> Decoder. See the module docstring for the equations."""

    def __init__(self, config: VQConfig | None = None):
        super().__init__()
        self.config = config or VQConfig()
        c = self.config
        self.encoder = Encoder(c)
        self.quantizer = VectorQuantizer(c.codebook_size, c.code_dim, c.beta, c.decay, c.eps, c.dead_threshold)
        self.decoder = Decoder(c)

    @property
    def grid(self) -> tuple[int, int]:
        return self.config.grid

    @property
    def num_codes(self) -> int:
        return self.config.codebook_size

    def _check_pixels(self, pixels: Tensor) -> None:
        s = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[2:]) != (s, s):
            raise ValueError(f"VQVAE expects pixels (N, 3, {s}, {s}) in [-1, 1], got {tuple(pixels.shape)}; "
                             f"use model.preprocess(images) to resize PIL images")

    def forward(self, pixels: Tensor) -> dict[str, Any]:
        """pixels (N, 3, H, W) in [-1, 1] -> {recon, loss, losses, ids, perplexity, usage}."""
        self._check_pixels(pixels)
        z = self.encoder(pixels)                                     # (N, D, h, w)
        z_q, ids, commit, stats = self.quantizer(z)
        recon = self.decoder(z_q)                                    # (N, 3, H, W)
        rec = F.mse_loss(recon, pixels)
        if self.config.l1_weight:
            rec = rec + self.config.l1_weight * F.l1_loss(recon, pixels)
        return {"recon": recon, "loss": rec + commit, "losses": {"recon": rec, "commit": commit},
                "ids": ids, **stats}

    @torch.no_grad()
    def encode(self, pixels: Tensor) -> Tensor:
        """pixels (N, 3, H, W) in [-1, 1] -> code ids (N, h, w) long. Never updates the codebook."""
        self._check_pixels(pixels)
        z = self.encoder(pixels.to(self.quantizer.embed.device))     # (N, D, h, w)
        N, D, h, w = z.shape
        return self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).view(N, h, w)

    @torch.no_grad()
    def decode(self, ids: Tensor) -> Tensor:
        """code ids (N, h, w) or (N, h * w) -> pixels (N, 3, H, W), clamped to [-1, 1]."""
        h, w = self.grid
        ids = torch.as_tensor(ids, device=self.quantizer.embed.device).long()
        if ids.dim() == 2 and ids.shape[1] == h * w:
            ids = ids.view(-1, h, w)
        if ids.dim() != 3 or tuple(ids.shape[1:]) != (h, w):
            raise ValueError(f"decode expects ids (N, {h}, {w}) or (N, {h * w}), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise ValueError(f"decode: ids must be in [0, {self.num_codes}), got [{int(ids.min())}, {int(ids.max())}]")
        return self.decoder(self.quantizer.lookup(ids)).clamp(-1, 1)

    def preprocess(self, images: Image.Image | Sequence[Image.Image]) -> Tensor:
        """PIL images -> (N, 3, S, S) float in [-1, 1]; resized (bicubic) to image_size, RGB."""
        if isinstance(images, Image.Image):
            images = [images]
        s = self.config.image_size
        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"VQVAE.preprocess expects PIL images, got {type(im).__name__}")
            im = im.convert("RGB")
            if im.size != (s, s):
                im = im.resize((s, s), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1))
        return torch.stack(out) / 127.5 - 1.0

    @staticmethod
    def to_images(pixels: Tensor) -> list[Image.Image]:
        """(N, 3, H, W) in [-1, 1] -> list of RGB PIL images."""
        x = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]

    def save_pretrained(self, path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
        """config.json + model.safetensors (weights and codebook state in ``dtype``). Atomic: written
        to ``<path>.tmp`` and renamed, so an interrupted save never leaves a half-written folder."""
        from safetensors.torch import save_file

        path = Path(path)
        staging = path.with_name(path.name + ".tmp")
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
        (staging / CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, str(staging / WEIGHTS), metadata={"format": "pt", "dtype": str(dtype).split(".")[-1]})
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VQVAE":
        from safetensors.torch import load_file

        path = Path(path)
        for f in (CONFIG, WEIGHTS):
            if not (path / f).is_file():
                raise FileNotFoundError(f"VQVAE.from_pretrained: {path / f} not found; a VQ-VAE folder holds "
                                        f"{CONFIG} and {WEIGHTS} (written by VQVAE.save_pretrained)")
        model = cls(VQConfig.from_dict(json.loads((path / CONFIG).read_text())))
        sd = {k: v.float() for k, v in load_file(str(path / WEIGHTS)).items()}
        load_state_dict_strict(model, sd, str(path / WEIGHTS))
        return model.eval()


def load_vqvae(name_or_path: str | Path = "tiny") -> VQVAE:
    """The shipped tokenizer (``"tiny"`` -> assets/tiny/vq) or a folder from ``save_pretrained``."""
    path = assets_dir() / VQ_DIR if str(name_or_path) == "tiny" else Path(name_or_path)
    if not (path / WEIGHTS).is_file():
        hint = ("build it with `mmkit zoo build --only vq` (a few minutes on a CPU)" if str(name_or_path) == "tiny"
                else "pass a folder written by VQVAE.save_pretrained, or 'tiny'")
        raise FileNotFoundError(f"no VQ-VAE at {path} ({WEIGHTS} missing): {hint}")
    return VQVAE.from_pretrained(path)


# -------------------------------------------------------------------------- train / eval
def _world(world, image_size: int):
    from mmkit.data.shapes import ShapesConfig, ShapesWorld

    return world if world is not None else ShapesWorld(ShapesConfig(image_size=image_size), seed=0)


def _render(world, split: str, start: int, n: int, size: int) -> tuple[list, list[Image.Image]]:
    scenes = [world.scene(split, i) for i in range(start, start + n)]
    return scenes, [world.render(s, size) for s in scenes]


def train_vqvae(config: VQConfig | None = None, *, steps: int, batch_size: int, lr: float, seed: int = 0,
                world=None, progress: bool = True, callback: Callable[[int, dict], None] | None = None,
                warmup: int | None = None) -> tuple[VQVAE, list[dict]]:
    """Train a VQ-VAE on ShapesWorld train-split renders; returns (model in eval mode, history).

    Every step draws a fresh batch of scenes (train indices step * batch_size ...), so no image
    is seen twice. AdamW with a linear warmup and cosine decay (``mmkit.train.warmup_cosine``).
    history: one dict per step {step, loss, recon, commit, perplexity, usage};
    ``callback(step, record)`` is called after each step.
    """
    from tqdm.auto import tqdm

    from mmkit.train import warmup_cosine

    config = config or VQConfig()
    world = _world(world, config.image_size)
    torch.manual_seed(seed)
    model = VQVAE(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(warmup or max(1, steps // 20), steps, 0.1))
    bar = tqdm(range(steps), desc="VQ-VAE", disable=not progress, dynamic_ncols=True)
    history: list[dict] = []
    model.train()
    for step in bar:
        _, images = _render(world, "train", step * batch_size, batch_size, config.image_size)
        out = model(model.preprocess(images))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        rec = {"step": step, "loss": float(out["loss"].detach()), "recon": float(out["losses"]["recon"].detach()),
               "commit": float(out["losses"]["commit"].detach()), "perplexity": float(out["perplexity"]),
               "usage": float(out["usage"])}
        history.append(rec)
        bar.set_postfix(recon=f"{rec['recon']:.4f}", ppl=f"{rec['perplexity']:.0f}")
        if callback is not None:
            callback(step, rec)
    model.eval()
    return model, history


@torch.no_grad()
def evaluate_vqvae(model: VQVAE, *, n: int = 200, split: str = "test", world=None,
                   batch_size: int = 100) -> dict[str, float]:
    """Reconstruct ``n`` rendered scenes of ``split`` and measure:

    psnr / mse             on pixels in [0, 1] (PSNR = 10 log10(1 / mse))
    perplexity / usage     of the code histogram over all n images (usage: share of the K codes used)
    checker_recall         share of objects whose (colour, shape) the checker finds in the reconstruction
    checker_recall_original  the same on the original renders: the checker's own ceiling
    """
    from mmkit.native.checker import score_drawings

    model.eval()
    size = model.config.image_size
    world = _world(world, size)
    scenes, images = _render(world, split, 0, n, size)
    sq_err, counts, recons = 0.0, torch.zeros(model.num_codes), []
    for i in range(0, n, batch_size):
        x = model.preprocess(images[i:i + batch_size])
        ids = model.encode(x)
        y = model.decode(ids).cpu()
        sq_err += float((((y + 1) / 2 - (x + 1) / 2) ** 2).mean((1, 2, 3)).sum())
        counts += torch.bincount(ids.flatten().cpu(), minlength=model.num_codes).float()
        recons += model.to_images(y)
    mse = sq_err / n
    p = counts / counts.sum()
    cfg = world.config
    return {"psnr": 10 * math.log10(1.0 / max(mse, 1e-12)), "mse": mse,
            "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum())),
            "usage": float((counts > 0).float().mean()),
            "checker_recall": score_drawings(recons, scenes, cfg)["recall"],
            "checker_recall_original": score_drawings(images, scenes, cfg)["recall"],
            "n": n, "split": split}


# The shipped tokenizer (see "Choosing the grid" in the module docstring for the measurements).
SHIPPED = dict(config=VQConfig(), steps=900, batch_size=16, lr=3e-3)
SMOKE = dict(config=VQConfig(image_size=32, hidden=32, res_blocks=1, codebook_size=64, code_dim=16),
             steps=3, batch_size=8, lr=2e-3)


def build_vq(out_dir: str | Path | None = None, smoke: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train the shipped tokenizer, evaluate it, save it in fp16 with report.json.

    ``out_dir``: the folder to write (default assets/tiny/vq). Returns the report.
    """
    s = SMOKE if smoke else SHIPPED
    out = Path(out_dir) if out_dir else assets_dir() / VQ_DIR
    t0 = time.perf_counter()
    model, history = train_vqvae(s["config"], steps=s["steps"], batch_size=s["batch_size"], lr=s["lr"],
                                 progress=progress)
    train_s = time.perf_counter() - t0
    model.save_pretrained(out, dtype=torch.float16)
    # evaluate what ships: the fp16-rounded weights, loaded back
    shipped = VQVAE.from_pretrained(out)
    ev = evaluate_vqvae(shipped, n=8 if smoke else 200)
    report = {"smoke": smoke, "config": s["config"].to_dict(), "steps": s["steps"], "batch_size": s["batch_size"],
              "lr": s["lr"], "train_seconds": round(train_s, 1), "torch_threads": torch.get_num_threads(),
              "params": sum(p.numel() for p in shipped.parameters()),
              "bytes": (out / WEIGHTS).stat().st_size, "tokens_per_image": math.prod(shipped.grid),
              "final_train": {k: round(v, 5) for k, v in history[-1].items() if k != "step"},
              **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in ev.items()}}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
