"""Names of everything that crosses the wire, in one place.

Record and config keys are kebab-case. Keys that belong to one algorithm are
namespaced ``"<algorithm>.<key>"`` (see :func:`algorithm_key`), so that two
algorithms composed in one run can never read each other's values.
"""

from __future__ import annotations

# Records of a message's RecordDict.
ARRAYS = "arrays"
"""ArrayRecord: the global model (server -> client) or the local model (back)."""
CONFIG = "config"
"""ConfigRecord: hyperparameters the server sends for this round."""
METRICS = "metrics"
"""MetricRecord: what a client reports (training loss, accuracy, num-examples)."""

# Keys of the CONFIG record (server -> client).
SERVER_ROUND = "server-round"
SEED = "seed"
LOCAL_EPOCHS = "local-epochs"
LOCAL_STEPS = "local-steps"
BATCH_SIZE = "batch-size"
LR = "lr"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"

# Keys of the METRICS record (client -> server).
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
TRAIN_LOSS_FIRST = "train-loss-first"
EVAL_LOSS = "eval-loss"
EVAL_ACCURACY = "eval-accuracy"
LABEL_COUNTS = "label-counts"
"""A node's label histogram (list of counts per class), in its data profile."""
CLIENT_TIME = "client-time"
"""Seconds Bouquet's ClientApp spent in a handler (data, model, work, reply)."""
PARTITION_ID = "partition-id"
"""Reported so the server can order replies deterministically (node ids differ
between the in-process runner, Ray and deployment; partition ids do not)."""

BOOKKEEPING_METRICS = frozenset({NUM_EXAMPLES, PARTITION_ID, CLIENT_TIME})
"""Metric keys that are not averaged into the round's aggregated metrics."""


def algorithm_key(algorithm: str, key: str) -> str:
    """Return the namespaced key ``"<algorithm>.<key>"``."""
    return f"{algorithm}.{key}"
