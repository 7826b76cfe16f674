"""A transfer set shared by every node: public, unlabelled inputs for distillation.

Federated knowledge distillation (KnFu) exchanges predictions on inputs every
node holds in the same order. Here they are a seeded draw of ``size`` inputs of
the run's held-out split (the central test split of ``tasks/``: outside every
client's partition), labels dropped; built offline from the embedded or cached
data, the same on every machine for the same run config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bouquet.tasks import wire


def transfer_inputs(run_config: Mapping[str, Any], size: int) -> np.ndarray:
    """``size`` inputs (float32, in a fixed order) of the run's held-out split.

    The rows are drawn without replacement with the seed
    ``derive_seed(seed, "transfer-set")``; ``size`` larger than the split
    takes all of it.
    """
    from bouquet.tasks import DataSpec, load_central_test

    spec = DataSpec.from_run_config(run_config, num_partitions=1)
    x, _ = load_central_test(spec)
    rng = np.random.default_rng(wire.derive_seed(spec.seed, "transfer-set"))
    rows = np.sort(rng.permutation(len(x))[: min(size, len(x))])
    return np.ascontiguousarray(x.numpy()[rows], dtype=np.float32)
