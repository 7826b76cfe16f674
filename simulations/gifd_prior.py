"""GIFD's generative prior at this pack's scale: a DCGAN for 8x8 digits.

GIFD (Fang et al., ICCV 2023) searches a pretrained GAN: first its latent
code, then, layer by layer, its intermediate features inside an l1 ball
around where the previous stage ended. The paper's BigGAN / StyleGAN2 weights
come from a hub, so the prior here is trained in code, offline: a small
DCGAN-style generator (Radford et al., 2016: transposed convolutions,
BatchNorm, ReLU; the discriminator strided convolutions with LeakyReLU)
trained on the *source* half of ``load_digits`` (``tasks.sources``, the half
``digits-shift`` pretrains on; the audit's victims come from the other
half), seeded, on one thread, and cached under the cache dir like the
pretrained source models (``tasks/finetune.py``).

Generator: ``z`` (32) -> Linear -> 64 x 2 x 2 (``h1``) -> ConvT -> 32 x 4 x 4
(``h2``) -> ConvT -> 1 x 8 x 8, sigmoid. :meth:`Generator.stages` splits it at
``z``, ``h1`` and ``h2``: the three search spaces of GIFD here.

Decisions where the spec was open: the non-saturating GAN loss, Adam
(lr 2e-4, betas 0.5 / 0.999), batch 64, 3000 steps (about half a minute on
one CPU thread); the generator is used in eval mode (BatchNorm's running
statistics), so its output for one code does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

LATENT = 32
STEPS = 3000
BATCH = 64
SEED = 0


class Generator(nn.Module):
    """DCGAN-style generator for 1 x 8 x 8 images in ``[0, 1]``."""

    def __init__(self, latent: int = LATENT) -> None:
        super().__init__()
        self.latent = latent
        self.fc = nn.Sequential(nn.Linear(latent, 64 * 2 * 2), nn.ReLU())
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.BatchNorm2d(32), nn.ReLU()
        )
        self.up2 = nn.ConvTranspose2d(32, 1, 4, 2, 1)

    def stages(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """``[G_1, G_2, G_3]``: ``z -> h1 -> h2 -> image``."""
        return [
            lambda z: self.fc(z).view(-1, 64, 2, 2),
            self.up1,
            lambda h: torch.sigmoid(self.up2(h)),
        ]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The image of code ``z``."""
        out = z
        for stage in self.stages():
            out = stage(out)
        return out


class Discriminator(nn.Module):
    """Two strided convolutions and a linear score (a logit)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(32, 64, 4, 2, 1),
            nn.LeakyReLU(0.2),
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One logit per image."""
        return self.body(x).squeeze(1)


def train_generator(steps: int = STEPS, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Train the DCGAN on the source half of digits; the generator's state dict."""
    from bouquet.tasks.sources import source_task

    x, _ = source_task("digits-shift")
    data = torch.as_tensor(x, dtype=torch.float32).view(-1, 1, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same weights on every machine
    try:
        generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            g, d = Generator(), Discriminator()
        opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
        ones, zeros = torch.ones(BATCH), torch.zeros(BATCH)
        for _ in range(steps):
            rows = torch.randint(len(data), (BATCH,), generator=generator)
            fake = g(torch.randn(BATCH, LATENT, generator=generator))
            opt_d.zero_grad()
            loss_d = F.binary_cross_entropy_with_logits(
                d(data[rows]), ones
            ) + F.binary_cross_entropy_with_logits(d(fake.detach()), zeros)
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            F.binary_cross_entropy_with_logits(d(fake), ones).backward()
            opt_g.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.detach().clone() for k, v in g.state_dict().items()}


def pretrained_generator(steps: int = STEPS, seed: int = SEED) -> Generator:
    """The trained generator (eval mode), from the cache or trained now."""
    from bouquet.tasks.cache import cache_dir, cache_key, load_cached, save_atomic

    key = {
        "gifd-dcgan": 1,
        "steps": steps,
        "seed": seed,
        "latent": LATENT,
        "torch": torch.__version__.split("+")[0],
    }
    path = cache_dir() / f"gifd-dcgan-{cache_key(key)}.pt"
    state = load_cached(path)
    if state is None:
        state = train_generator(steps, seed)
        save_atomic(state, path)
    generator = Generator()
    generator.load_state_dict(state)
    generator.eval()
    for p in generator.parameters():
        p.requires_grad_(False)
    return generator
