"""HyperFL: share a hypernetwork, never the weights that touch the data.

Guo, Zeng, Chen, Zhang, Ren, Zhou, Qu, "A New Federated Learning Framework
Against Gradient Inversion Attacks", AAAI 2025, https://arxiv.org/abs/2412.07187
(official code: github.com/Pengxin-Guo/HyperFL, ``cnn/methods/hyperfl.py``).

- **Model** (wrapper ``hyper``, :mod:`tasks.hypernet`): node ``i``'s feature
  extractor is ``theta_i = h(v_i; phi)``, its classifier ``psi_i``;
  ``v_i`` (``embedding``) and ``psi_i`` (with the normalisation statistics,
  ``base.*``) are personal, ``phi`` (``hyper.*``) is shared.
- **Client** (recipe ``hyperfl``): on its first round the node draws its own
  ``v_i ~ N(0, I)``; each round, the first ``head-epochs`` epochs train
  ``psi_i`` alone with ``lr-head`` (``theta_i`` fixed), the following
  ``hyper-epochs`` train ``phi`` and ``v_i`` with ``lr`` (``psi_i`` fixed;
  autograd chains ``dL/dtheta`` to both), their gradients clipped apart at
  ``grad-clip``. The reply is ``phi_i``.
- **Server**: FedAvg over ``phi`` (weighted by examples).

Wire protocol: FedAvg's on the ``hyper.*`` entries, plus
``config["local-epochs"] = head-epochs + hyper-epochs``,
``hyperfl.head-epochs``, ``hyperfl.lr-head``, ``hyperfl.grad-clip`` and
``config["model-wrapper"] = "hyper"``. Client state: ``v_i``, ``psi_i`` and
the BatchNorm statistics (personal parameters in ``Context.state``). The
central evaluation is the server's copy (its ``v`` and ``psi`` untrained):
the algorithm's accuracy is ``node-accuracy-mean`` / ``-worst10``.

Decisions where the spec was open:

- A chunked hypernetwork (1024 values per chunk, learned chunk embeddings)
  instead of one linear head per target tensor: ``phi`` stays ~140k values
  whatever the model, where the paper's heads exceed the model (spec pitfall).
  Embedding 64, hidden 128 as the paper. ``theta_i`` is all generated: a first
  version added ``h`` to the public seeded initial weights, and the gradient
  inversion audit (``simulations/gifd_audit.py``) then reconstructed inputs
  nearly as well as from FedAvg, the attacker's ``theta`` being close to the
  node's. Even so, the audit's table shows that at this scale the ``phi``
  reply still leaks a recognisable input (batch 1: PSNR 17.8 dB, SSIM 0.83,
  vs FedAvg's 33.1 dB; GIFD's prior does not do better on it:
  ``simulations/results/gifd``).
- The two stages run in the one loop: a hook counts epochs and, per step,
  drops the gradients of the part that does not train (SGD then skips it:
  no momentum, no weight decay for it) and scales the head's by
  ``lr-head / lr`` (exact for SGD without weight decay). Momentum and weight
  decay are the shared keys (the paper: 0.5, 5e-4).
- ``hyper-epochs`` defaults to 1 (the paper: 5; its config sets it) to keep
  runs short; ``head-epochs`` = 1 as the paper.
- Measured (``simulations/results/hyperfl``, digits, 20 nodes with 3 classes,
  50 rounds, 3 seeds): node accuracy 0.878 ± 0.036 vs FedAvg 0.864,
  FedAvg + fine-tuning 0.942, local-only 0.979; 8x FedAvg's traffic.
- Every node gets the new ``phi`` only when sampled (Flower's message API);
  the official code pushes it to all clients, which matters only with
  partial participation.
"""

from __future__ import annotations

from typing import Any

from bouquet.strategies.base import BouquetStrategy
from bouquet.strategies.context import RoundContext
from bouquet.strategies.registry import register
from bouquet.tasks import wire
from bouquet.tasks.params import Param

PERSONAL = ("embedding", "base.*")
"""The node's embedding, classifier and normalisation statistics."""


@register
class HyperFL(BouquetStrategy):
    """HyperFL (see the module docstring)."""

    name = "hyperfl"
    routine = "hyperfl"
    paper = "Guo et al., AAAI 2025, https://arxiv.org/abs/2412.07187"
    tagline = "Shared hypernetwork generates private feature extractors (vs inversion)"
    family = "robustness"
    model_wrapper = "hyper"
    params = (
        Param("head-epochs", 1, ">= 0", "stage 1: epochs on the head", send=True),
        Param("hyper-epochs", 1, ">= 1", "stage 2: epochs on phi and v (paper: 5)"),
        Param("lr-head", 0.1, "> 0", "head learning rate lr_g", send=True),
        Param("grad-clip", 50.0, ">= 0", "max norm of phi's and v's grads", send=True),
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.personal = tuple(dict.fromkeys((*self.personal, *PERSONAL)))

    def round_config(self, ctx: RoundContext) -> dict[str, Any]:
        """Both stages in the loop's epochs."""
        return {wire.LOCAL_EPOCHS: self.head_epochs + self.hyper_epochs}
