"""Gradient-inversion audit: how much of a training input a reply leaks.

The GAN-free baseline of GIFD (Fang et al., "GIFD: A Generative Gradient
Inversion Method with Feature Domain Optimization", ICCV 2023,
https://arxiv.org/abs/2308.04699; official code
ffhibnese/GIFD_Gradient_Inversion_Attack), i.e. Inverting Gradients (Geiping
et al., NeurIPS 2020): an honest-but-curious server that knows the model it
sent and one client's reply, computed on a batch (one example by default),
optimises a candidate input ``x`` (pixels in ``[0, 1]`` through a sigmoid)
with Adam so that its gradient matches the observed one in cosine distance
(all observed entries as one vector), plus ``tv`` times the total variation.
The label comes from the reply where the classifier's bias gradient is
observed (iDLG: the only negative entry of ``softmax - onehot``; a batch:
:func:`labels_from_bias`); otherwise every label is tried and the best match
kept (a batch: the true labels are given, an upper bound on the attack).
Where the first layer is a linear layer whose weight and bias gradients are
observed, the input also follows in closed form (``grad_W = g x^T``,
``grad_b = g``: :func:`closed_form_input`).

With a generative prior (``--prior``: the DCGAN of
:mod:`simulations.gifd_prior`, trained offline on the other half of digits)
GIFD proper runs too (:func:`gifd`): the latent search (4 restarts in the
paper; ``--restarts`` here), then the layer-wise search over the generator's
intermediate features, each kept in an l1 ball around where its stage
started (:func:`project_l1`), the best reconstruction over all stages kept.
The table reports the latent search alone (GGL-like) and GIFD beside IG.

An audit, not an algorithm to train with (not registered). Two inputs:

- ``--captured <file>``: a round saved by any Bouquet run with
  ``audit-capture`` (:mod:`tasks.capture`): the attacker rebuilds the model,
  reads the reply as the server does and inverts it
  (:func:`audit_captured`);
- otherwise, replies made by the pack's own client code on ``--batch``
  examples of the half of ``load_digits`` the prior never saw (8x8 in
  ``[0, 1]``), from the seeded ``mlp``:

  - ``fedavg``: one local SGD step; the observed gradient is
    ``(x - y) / lr`` (a FedSGD reply);
  - ``fedavg-5-steps``: five local steps on the same batch, read as one
    gradient (the attacker does not model the steps: weaker, as the spec
    says);
  - ``dp-eps-<e>``: the one-step update clipped to norm ``C = 1`` plus
    Gaussian noise ``N(0, (sigma C)^2)``, ``sigma`` calibrated by DIFF2's
    RDP accountant so that this one release spends ``epsilon = e`` at
    ``delta = 1e-5`` (replace-one neighbours);
  - ``topk-0.01``: the one-step update with only its 1% largest entries
    (the attacker matches on the coordinates sent);
  - ``hyperfl``: HyperFL's reply (``strategies/hyperfl.py``): one stage-2
    step on the hypernetwork ``phi`` of a node whose embedding and head are
    its own; the attacker knows ``phi`` and the model it sent, not the
    node's embedding (it uses the server's copy).

Decisions where the spec was open: the l1 radii are relative to the
feature's own l1 norm where its stage starts (0.2 for ``h1``, 0.4 for
``h2``: growing with depth, as the paper's absolute radii do for BigGAN);
each GIFD stage runs ``--steps`` steps, so GIFD spends three times IG's
steps; the ``||x||^2`` regulariser (1e-6 in the paper) is left out (pixels
are bounded by the sigmoid); the generator runs in eval mode.

Scores against the true batch (each reconstruction against its closest true
image): MSE, PSNR (range 1) and a single-window SSIM over the 8x8 image.
``python -m bouquet.simulations.gifd_audit --samples 4 --prior`` prints the
table (mean over samples) and writes JSON with ``--out``. Measured tables
and their reading: ``simulations/results/gifd/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

Gradients = list[torch.Tensor]


def closed_form_input(grad_weight: np.ndarray, grad_bias: np.ndarray) -> np.ndarray:
    """The input of a linear layer from its one-example gradients.

    ``grad_W = g x^T`` and ``grad_b = g``, so ``x = grad_W^T g / ||g||^2``
    (exact for one example; least squares over the rows).
    """
    g = np.asarray(grad_bias, dtype=np.float64)
    return np.asarray(grad_weight, dtype=np.float64).T @ g / float(g @ g)


def label_from_bias(grad_bias: np.ndarray) -> int:
    """iDLG: the label is the entry of ``softmax - onehot`` that is negative."""
    return int(np.argmin(np.asarray(grad_bias)))


def cosine_distance(
    a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``1 - <a, b> / (||a|| ||b||)`` over all entries as one vector."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    na = torch.sqrt(sum(x.pow(2).sum() for x in a))
    nb = torch.sqrt(sum(y.pow(2).sum() for y in b))
    return 1.0 - dot / (na * nb + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (last two dimensions)."""
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    return dx + dy


def project_l1(delta: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Each row of ``delta`` projected onto the l1 ball of its ``radius``.

    The sort-based Euclidean projection (Duchi et al., ICML 2008); rows
    already inside stay as they are.
    """
    flat = delta.reshape(len(delta), -1)
    magnitude = flat.abs()
    inside = magnitude.sum(1) <= radius
    ordered = magnitude.sort(dim=1, descending=True).values
    running = ordered.cumsum(1)
    ranks = torch.arange(1, flat.shape[1] + 1, dtype=flat.dtype)
    count = (ordered * ranks > running - radius[:, None]).sum(1).clamp(min=1)
    theta = (running.gather(1, (count - 1)[:, None]).squeeze(1) - radius) / count
    shrunk = flat.sign() * (magnitude - theta[:, None]).clamp(min=0)
    return torch.where(inside[:, None], flat, shrunk).view_as(delta)


def match(
    gradient_of: Callable[[torch.Tensor, torch.Tensor], Gradients],
    target: Gradients,
    variables: list[torch.Tensor],
    make_x: Callable[[], torch.Tensor],
    y: torch.Tensor,
    *,
    steps: int,
    lr: float = 0.1,
    tv: float = 1e-4,
    project: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """Adam on ``variables`` so that ``make_x()``'s gradient matches ``target``.

    The loss is the cosine distance plus ``tv`` times the total variation;
    ``project`` (in place, no gradient) runs after every step. Returns the
    final candidate and its matching loss (cosine distance).
    """
    optimizer = torch.optim.Adam(variables, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        x = make_x()
        loss = cosine_distance(gradient_of(x, y), target)
        (loss + tv * total_variation(x)).backward()
        optimizer.step()
        if project is not None:
            with torch.no_grad():
                project()
    x = make_x().detach()
    return x, float(cosine_distance(gradient_of(x, y), target).detach())


def invert_batch(
    gradient_of: Callable[[torch.Tensor, torch.Tensor], Gradients],
    target: Gradients,
    shape: tuple[int, ...],
    label_sets: Sequence[Sequence[int]],
    *,
    steps: int = 300,
    lr: float = 0.1,
    tv: float = 1e-4,
    restarts: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, list[int], float]:
    """Inverting Gradients on a batch: ``(x_hat, labels, loss)`` of the best try.

    Each entry of ``label_sets`` is a candidate label per example (the batch
    size is its length); pixels are ``sigmoid(z)``.
    """
    generator = torch.Generator().manual_seed(seed)
    best = (torch.zeros(len(label_sets[0]), *shape), list(label_sets[0]), math.inf)
    for labels in label_sets:
        y = torch.tensor(list(labels))
        for _ in range(restarts):
            z = torch.randn((len(y), *shape), generator=generator)
            z.requires_grad_(True)
            x, loss = match(
                gradient_of,
                target,
                [z],
                lambda z=z: torch.sigmoid(z),
                y,
                steps=steps,
                lr=lr,
                tv=tv,
            )
            if loss < best[2]:
                best = (x, list(labels), loss)
    return best


def invert(
    gradient_of: Callable[[torch.Tensor, torch.Tensor], Gradients],
    target: Gradients,
    shape: tuple[int, ...],
    labels: Sequence[int],
    *,
    steps: int = 300,
    lr: float = 0.1,
    tv: float = 1e-4,
    restarts: int = 1,
    seed: int = 0,
) -> tuple[torch.Tensor, int, float]:
    """Inverting Gradients on one example: ``(x_hat, label, matching loss)``.

    ``gradient_of(x, y)`` returns the observed entries' gradients at a batch
    of one, differentiable in ``x`` (``create_graph=True``); every label in
    ``labels`` is tried.
    """
    x, found, loss = invert_batch(
        gradient_of,
        target,
        shape,
        [[label] for label in labels],
        steps=steps,
        lr=lr,
        tv=tv,
        restarts=restarts,
        seed=seed,
    )
    return x[0], found[0], loss


GIFD_RADII = (0.2, 0.4)
"""l1-ball radii of the feature search, per stage, relative to the l1 norm of
the feature where the stage starts (growing with depth, as the paper's)."""


def gifd(
    gradient_of: Callable[[torch.Tensor, torch.Tensor], Gradients],
    target: Gradients,
    generator: Any,
    label_sets: Sequence[Sequence[int]],
    *,
    steps: int = 300,
    lr: float = 0.1,
    tv: float = 1e-4,
    restarts: int = 1,
    radii: Sequence[float] = GIFD_RADII,
    seed: int = 0,
) -> dict[str, tuple[torch.Tensor, list[int], float]]:
    """GIFD: the latent search, then the layer-wise feature search.

    Stage 0 optimises the code ``z`` of ``generator`` (``restarts`` random
    starts, the best kept by matching loss); stage ``k`` takes the feature
    ``h_k`` the previous stage's result produces, optimises it with the
    later layers applied, and after every step projects it back into the l1
    ball of radius ``radii[k-1] * ||h_k^0||_1`` around its start. Returns
    ``{"latent": ..., "gifd": ...}``: the stage-0 result (a GGL-like latent
    search) and the best over all stages, each ``(x_hat, labels, loss)``.
    """
    stages = generator.stages()
    if len(radii) != len(stages) - 1:
        raise ValueError(f"need {len(stages) - 1} radii, got {len(radii)}")
    draws = torch.Generator().manual_seed(seed)
    results: dict[str, tuple[torch.Tensor, list[int], float]] = {}
    for labels in label_sets:
        y = torch.tensor(list(labels))
        code, latent = None, (None, math.inf)
        for _ in range(restarts):
            z = torch.randn(len(y), generator.latent, generator=draws)
            z.requires_grad_(True)
            x, loss = match(
                gradient_of, target, [z], lambda z=z: generator(z), y,
                steps=steps, lr=lr, tv=tv,
            )  # fmt: skip
            if loss < latent[1]:
                code, latent = z.detach(), (x, loss)
        best = latent
        inputs = code
        for k in range(1, len(stages)):
            with torch.no_grad():
                start = stages[k - 1](inputs)
            radius = radii[k - 1] * start.flatten(1).abs().sum(1)
            h = start.clone().requires_grad_(True)

            def render(h: torch.Tensor = h, k: int = k) -> torch.Tensor:
                out = h
                for stage in stages[k:]:
                    out = stage(out)
                return out

            def project(
                h: torch.Tensor = h, start: torch.Tensor = start, r: Any = radius
            ) -> None:
                h.copy_(start + project_l1(h - start, r))

            x, loss = match(
                gradient_of, target, [h], render, y,
                steps=steps, lr=lr, tv=tv, project=project,
            )  # fmt: skip
            if loss < best[1]:
                best = (x, loss)
            inputs = h.detach()
        if latent[1] < results.get("latent", (None, None, math.inf))[2]:
            results["latent"] = (latent[0], list(labels), latent[1])
        if best[1] < results.get("gifd", (None, None, math.inf))[2]:
            results["gifd"] = (best[0], list(labels), best[1])
    return results


def scores(x_hat: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """MSE, PSNR (data range 1) and a single-window SSIM."""
    a, b = np.asarray(x_hat, np.float64).ravel(), np.asarray(x, np.float64).ravel()
    mse = float(np.mean((a - b) ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)
    c1, c2 = 0.01**2, 0.03**2
    cov = float(np.mean((a - a.mean()) * (b - b.mean())))
    ssim = ((2 * a.mean() * b.mean() + c1) * (2 * cov + c2)) / (
        (a.mean() ** 2 + b.mean() ** 2 + c1) * (a.var() + b.var() + c2)
    )
    return {"mse": mse, "psnr": psnr, "ssim": float(ssim)}


def batch_scores(x_hat: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean scores of each reconstruction against its best-matching true image.

    The order of a reconstructed batch is arbitrary (the mean loss does not
    see it), so each ``x_hat[i]`` is scored against the true image it is
    closest to in MSE.
    """
    rows = []
    for candidate in np.asarray(x_hat):
        per_truth = [scores(candidate, t) for t in np.asarray(truth)]
        rows.append(min(per_truth, key=lambda r: r["mse"]))
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def labels_from_bias(grad_bias: np.ndarray, count: int) -> list[int]:
    """``count`` labels from the classifier's bias gradient.

    One example: iDLG's negative entry. More: the entries with negative
    gradient, most negative first, repeated in that order to fill ``count``
    (the batch's repeated labels are not identifiable from the sum).
    """
    order = [int(i) for i in np.argsort(np.asarray(grad_bias))]
    negative = [i for i in order if grad_bias[i] < 0] or order[:1]
    return [negative[j % len(negative)] for j in range(count)]


def _gradient_fn(
    model: nn.Module,
    names: Sequence[str],
    masks: Sequence[torch.Tensor] | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], Gradients]:
    """Gradients of the mean cross-entropy w.r.t. ``names`` (``masks``: kept)."""
    params = dict(model.named_parameters())
    chosen = [params[n] for n in names]

    def gradient_of(x: torch.Tensor, y: torch.Tensor) -> Gradients:
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, chosen, create_graph=True)
        if masks is None:
            return list(grads)
        return [g * m for g, m in zip(grads, masks, strict=True)]

    return gradient_of


def _local_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    lr: float,
    hooks: Sequence[Any],
) -> dict[str, torch.Tensor]:
    """``x_sent - y_local`` over the trainable entries, by the pack's loop."""
    from bouquet.clientapps.loop import TrainSettings, train_local

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_local(
        model,
        (x, y),
        TrainSettings(batch_size=len(y), lr=lr, epochs=steps),
        hooks,
        generator=torch.Generator().manual_seed(0),
        config={},
        state={},
    )
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def _top_k(update: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """The update with all but its ``fraction`` largest-magnitude entries zeroed."""
    flat = torch.cat([v.reshape(-1) for v in update.values()])
    k = max(1, round(fraction * flat.numel()))
    threshold = flat.abs().topk(k).values[-1]
    return {n: torch.where(v.abs() >= threshold, v, 0.0) for n, v in update.items()}


def _attacks(
    gradient_of: Callable[[torch.Tensor, torch.Tensor], Gradients],
    target: Gradients,
    label_sets: Sequence[Sequence[int]],
    truth: np.ndarray,
    prior: Any,
    *,
    steps: int,
    restarts: int,
    seed: int,
) -> dict[str, float]:
    """IG's, the latent search's and GIFD's scores (``<attack>-psnr`` ...)."""
    shape = tuple(truth.shape[1:])
    x_hat, _, _ = invert_batch(
        gradient_of, target, shape, label_sets,
        steps=steps, restarts=restarts, seed=seed,
    )  # fmt: skip
    row = {f"ig-{k}": v for k, v in batch_scores(x_hat.numpy(), truth).items()}
    if prior is not None:
        found = gifd(
            gradient_of, target, prior, label_sets,
            steps=steps, restarts=restarts, seed=seed,
        )  # fmt: skip
        for attack, (x_hat, _, _) in found.items():
            scored = batch_scores(x_hat.numpy(), truth)
            row.update({f"{attack}-{k}": v for k, v in scored.items()})
    return row


DP_EPSILONS = (1000.0, 64.0, 8.0)
"""One release at ``delta = 1e-5``: the multipliers from DIFF2's accountant."""
TOP_K = 0.01
"""Top-k keeps 1% of the update's entries."""


def audit(
    samples: int = 4,
    steps: int = 300,
    restarts: int = 1,
    lr_client: float = 0.1,
    epsilons: Sequence[float] = DP_EPSILONS,
    seed: int = 0,
    batch: int = 1,
    prior: Any = None,
) -> dict[str, dict[str, float]]:
    """Mean scores per reply kind and attack (see the module docstring)."""
    from bouquet.clientapps.recipes.hyperfl import make_hooks as hyperfl_hooks
    from bouquet.strategies.diff2 import calibrate
    from bouquet.tasks.models import build_model
    from bouquet.tasks.sources import _digits_halves
    from bouquet.tasks.spec import DatasetInfo

    _, victims = _digits_halves()  # the GAN prior trains on the other half
    images, labels = victims["x"], victims["label"]
    rng = np.random.default_rng(seed)
    info = DatasetInfo("digits", (1, 8, 8), 10)
    results: dict[str, list[dict[str, float]]] = {}
    sigmas = {eps: calibrate(eps, 1e-5, 1) for eps in epsilons}

    def fresh(wrapper: str = "none") -> nn.Module:
        return build_model("mlp", info, seed=seed, wrapper=wrapper)

    for i in range(samples):
        picks = rng.choice(len(images), size=batch, replace=False)
        x = torch.tensor(images[picks], dtype=torch.float32).view(batch, 1, 8, 8)
        y = torch.tensor(labels[picks].astype(np.int64))
        truth = x.numpy()
        # FedAvg: one step and five steps; DP: the one-step update, noised.
        model = fresh()
        names = [n for n, _ in model.named_parameters()]
        kinds: dict[str, dict[str, torch.Tensor]] = {}
        for steps_local in (1, 5):
            update = _local_update(fresh(), x, y, steps_local, lr_client, [])
            kinds["fedavg" if steps_local == 1 else "fedavg-5-steps"] = update
        one = kinds["fedavg"]
        norm = math.sqrt(sum(float(v.pow(2).sum()) for v in one.values()))
        noise = torch.Generator().manual_seed(seed + 1000 + i)
        for eps, sigma in sigmas.items():
            clipped = {k: v * min(1.0, 1.0 / norm) for k, v in one.items()}
            kinds[f"dp-eps-{eps:g}"] = {
                k: v + sigma * torch.randn(v.shape, generator=noise)
                for k, v in clipped.items()
            }
        kinds[f"topk-{TOP_K:g}"] = _top_k(one, TOP_K)
        for kind, update in kinds.items():
            target = [update[n] / lr_client for n in names]
            masks = None
            if kind.startswith("topk"):  # match on the coordinates sent
                masks = [(t != 0).float() for t in target]
            bias = target[-1].numpy()
            row = _attacks(
                _gradient_fn(model, names, masks),
                target,
                [labels_from_bias(bias, batch)],
                truth,
                prior,
                steps=steps,
                restarts=restarts,
                seed=seed + i,
            )
            if batch == 1:
                analytic = closed_form_input(target[0].numpy(), target[1].numpy())
                closed = scores(np.clip(analytic, 0, 1), truth)
                row["psnr-closed-form"] = closed["psnr"]
            results.setdefault(kind, []).append(row)
        # HyperFL: the node's own embedding and head; one stage-2 step on phi.
        node = fresh("hyper")
        config = {
            "hyperfl.head-epochs": 0,
            "hyperfl.lr-head": 0.1,
            "hyperfl.grad-clip": 50.0,
        }
        with torch.no_grad():  # the node's own head, as after local training
            for p in node.base.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=noise))
        update = _local_update(node, x, y, 1, lr_client, hyperfl_hooks(config))
        attacker = fresh("hyper")  # knows phi; embedding and head: the server's
        phi = [n for n, _ in attacker.named_parameters() if n.startswith("hyper.")]
        target = [update[n] / lr_client for n in phi]
        # The head's gradient is not sent: no label leak. One example: every
        # label is tried; a batch: the true labels (an upper bound).
        label_sets = [[int(v) for v in y]]
        if batch == 1:
            label_sets = [[c] for c in range(10)]
        row = _attacks(
            _gradient_fn(attacker, phi),
            target,
            label_sets,
            truth,
            prior,
            steps=steps,
            restarts=restarts,
            seed=seed + i,
        )
        results.setdefault("hyperfl", []).append(row)
    return {
        kind: {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        for kind, rows in results.items()
    }


def audit_captured(
    path: str | Path,
    *,
    steps: int = 300,
    restarts: int = 1,
    prior: Any = None,
    seed: int = 0,
) -> dict[str, float]:
    """Invert a captured round (``audit-capture``, :mod:`tasks.capture`).

    The attacker rebuilds the run's model from the run config with the sent
    arrays (entries the server does not send, e.g. personal ones: its own
    seeded copy), reads the reply as a model (a compressed uplink's payload
    decoded as the server decodes it; a sparse payload's indices then mask
    the matching), and takes ``sent - reply`` over the shared parameters as one
    gradient of a batch of ``min(batch-size, num-examples)`` (the local steps
    are not modelled: a multi-step update is attacked as one step). Labels
    come from the classifier's bias gradient when it is sent, else every
    label is tried (one example) or the true labels are given (a batch: an
    upper bound). Scores: each reconstruction against the closest image of
    the first batch the node trained on.
    """
    from bouquet.clientapps.uplink import codec
    from bouquet.tasks import compression, dataset_info
    from bouquet.tasks.capture import load_capture
    from bouquet.tasks.finetune import build_task_model
    from bouquet.tasks.spec import DataSpec

    captured = load_capture(path)
    run_config, config = captured["run-config"], captured["config"]
    info = dataset_info(DataSpec.from_run_config(run_config))
    wrapper = str(config.get("model-wrapper", "none"))
    model = build_task_model(run_config, info, wrapper=wrapper)
    sent = captured["sent"]
    state = model.state_dict()
    model.load_state_dict(
        {k: torch.as_tensor(np.array(v)) for k, v in sent.items() if k in state},
        strict=False,
    )
    reply = captured["reply"]["arrays"]
    compressor = codec(config)
    masks_by_name: dict[str, np.ndarray] = {}
    if compressor is None:
        received = reply
    else:
        keys = compression.compressed_keys(sent)
        size = sum(np.asarray(sent[k]).size for k in keys)
        delta = compression.unflatten(compressor.decode(reply, size), sent, keys)
        received = {k: sent[k] + delta[k] for k in keys}
        if "indices" in reply:  # a sparse payload: match on what was sent
            support = np.zeros(size)
            support[np.asarray(reply["indices"], np.int64)] = 1.0
            masks_by_name = compression.unflatten(support, sent, keys)
    params = dict(model.named_parameters())
    names = [n for n in params if n in received and n in sent]
    target = [
        torch.as_tensor(np.asarray(sent[n], np.float64) - received[n]).float()
        for n in names
    ]
    masks = None
    if masks_by_name:
        masks = [torch.as_tensor(masks_by_name[n]).float() for n in names]
    steps_taken = captured["true-steps"]
    truth = captured["true-x"][: int(steps_taken[0])]
    true_y = captured["true-y"][: int(steps_taken[0])]
    count = min(int(config.get("batch-size", len(truth))), len(truth))
    last = names[-1] if names else ""
    if last.endswith("bias") and params[last].numel() == info.num_classes:
        label_sets = [labels_from_bias(target[-1].numpy(), count)]
    elif count == 1:
        label_sets = [[c] for c in range(info.num_classes)]
    else:
        label_sets = [[int(v) for v in true_y[:count]]]
    model.train()
    row = _attacks(
        _gradient_fn(model, names, masks),
        target,
        label_sets,
        truth.reshape(len(truth), *info.input_shape),
        prior,
        steps=steps,
        restarts=restarts,
        seed=seed,
    )
    return {"batch": float(count), **row}


ATTACK_LABELS = {"ig": "IG", "latent": "latent only", "gifd": "GIFD"}


def _table(table: dict[str, dict[str, float]]) -> list[str]:
    attacks = [a for a in ATTACK_LABELS if f"{a}-psnr" in next(iter(table.values()))]
    head = " | ".join(f"{ATTACK_LABELS[a]} PSNR | SSIM" for a in attacks)
    lines = [f"| reply | {head} | PSNR closed form (dB) |"]
    lines.append("|---|" + "---|---|" * len(attacks) + "---|")
    for kind, row in table.items():
        cells = " | ".join(
            f"{row[f'{a}-psnr']:.1f} | {row[f'{a}-ssim']:.3f}" for a in attacks
        )
        closed = row.get("psnr-closed-form")
        closed_text = "n/a" if closed is None else f"{closed:.1f}"
        lines.append(f"| {kind} | {cells} | {closed_text} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    """Print the audit table (and write it as JSON with ``--out``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--prior",
        action="store_true",
        help="also run GIFD with the DCGAN prior (simulations/gifd_prior.py)",
    )
    parser.add_argument(
        "--captured", type=Path, default=None, help="a file saved by audit-capture"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    prior = None
    if args.prior:
        from bouquet.simulations.gifd_prior import pretrained_generator

        prior = pretrained_generator()
    if args.captured is not None:
        table = {
            str(args.captured.name): audit_captured(
                args.captured,
                steps=args.steps,
                restarts=args.restarts,
                prior=prior,
                seed=args.seed,
            )
        }
    else:
        table = audit(
            args.samples,
            args.steps,
            args.restarts,
            seed=args.seed,
            batch=args.batch,
            prior=prior,
        )
    print("\n".join(_table(table)))
    if args.out is not None:
        args.out.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
