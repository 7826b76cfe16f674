"""The wire protocol both halves share: record and key names, seeds, the routine.

The server (``strategies/``) and the client (``clientapps/``) are deployed
apart and never import each other; what crosses the wire is named here, once,
and this module imports nothing heavier than NumPy (see
``docs/architecture.md``, "The wire").

Record and config keys are kebab-case. Keys that belong to one algorithm are
namespaced ``"<algorithm>.<key>"`` (:func:`algorithm_key`), so that two
algorithms composed in one run never read each other's values; each algorithm
names those in its own strategy module and client recipe, and the conformance
test checks that the two agree.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Records of a message's RecordDict.
ARRAYS = "arrays"
"""ArrayRecord: the global model (server -> client) or the local model (back)."""
CONFIG = "config"
"""ConfigRecord: hyperparameters the server sends for this round."""
METRICS = "metrics"
"""MetricRecord: what a client reports (training loss, accuracy, num-examples)."""
CLIENT_INFO = "client-info"
"""ConfigRecord of a reply: which client routine produced it (:data:`ROUTINE`)."""
RUN_CONFIG = "run-config"
"""ConfigRecord (server -> client), only in a resumed run: the run-config keys
whose saved values differ from the config Flower gives the ClientApps (which is
this submission's, not the interrupted run's); they override
``context.run_config`` (``serverapps/resume.py``)."""

SPLIT_ACTION = "split"
"""Split learning's exchanges inside a train round travel as messages of type
``train.split`` (the ClientApp's ``@app.train("split")``): the routine the
config names answers them (its recipe's ``split_step``); the round's own train
message comes last and gets the usual reply (``strategies/sfprompt.py``)."""
SPLIT_PHASE = "split-phase"
"""Config key of a ``train.split`` message: which exchange of the split it is."""
SPLIT_TENSORS = "split"
"""ArrayRecord of a ``train.split`` message or reply: the activations or
gradients crossing the cut."""
SPLIT_INFO = "split-info"
"""ConfigRecord of a ``train.split`` reply: what the client asks next."""

# Keys of the CONFIG record (server -> client).
SERVER_ROUND = "server-round"
NUM_ROUNDS = "num-server-rounds"
SEED = "seed"
ROUTINE = "client-routine"
"""The client routine the server's algorithm needs (a recipe name); also the
key of :data:`CLIENT_INFO` in the reply, naming the routine that ran."""
PERSONAL = "personal-parameters"
"""Names (glob patterns, or ``"head"``) of parameters that never leave the node."""
MODEL_WRAPPER = "model-wrapper"
"""The wrapper around the run's model the algorithm needs (``tasks.models``:
``gated`` for pFedGate); absent: none. Both halves build the same model."""
LOCAL_EPOCHS = "local-epochs"
LOCAL_STEPS = "local-steps"
FINETUNE_STEPS = "finetune-steps"
"""Evaluate config: local steps a node trains a copy of its model for before
personalised evaluation (0: evaluate the model as received)."""
MAX_LOCAL_STEPS = 10_000_000
"""Most local steps a task may ask for (the client refuses more)."""
BATCH_SIZE = "batch-size"
LR = "lr"
MOMENTUM = "momentum"
WEIGHT_DECAY = "weight-decay"
OPTIMIZER = "optimizer"
LOSS = "loss"

# Keys of the METRICS record (client -> server).
TRAIN_SETTINGS = (
    LOCAL_EPOCHS,
    LOCAL_STEPS,
    BATCH_SIZE,
    LR,
    MOMENTUM,
    WEIGHT_DECAY,
    OPTIMIZER,
    LOSS,
)
"""The local-training settings: sent in every train message's config, read by
the client from it, else the run config, else the user's defaults."""

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

PLAIN_ROUTINE = "plain"
"""The routine of server-only algorithms: local training, the model back."""

DP_CLIPPING_NORM = "dp.clipping-norm"
# DP-SGD on the clients (clientapps/privacy.py).
DP_SGD_NOISE_MULTIPLIER = "dp-sgd.noise-multiplier"
DP_SGD_EPSILON = "dp-sgd.epsilon"
DP_SGD_DELTA = "dp-sgd.delta"
DP_SGD_CLIP = "dp-sgd.clip"
DP_SGD_EPSILON_METRIC = "dp-sgd.epsilon"
DP_SGD_NOISE_METRIC = "dp-sgd.noise-multiplier"
MAX_METRICS = frozenset({DP_SGD_EPSILON_METRIC})
"""Train metrics a round reports as their largest value, not a weighted mean."""
"""Config key: clip the update a reply carries to this L2 norm (client-side DP,
``strategies/privacy.py``); absent or 0: no clipping."""

GOSSIP_WEIGHTS = "gossip.weights"
"""Config key of a decentralized train message (``strategies/gossip.py``): the
node's row of the mixing matrix, its own weight first, then one weight per
relayed neighbour model (:func:`gossip_neighbor`), in order."""
GOSSIP_TRAIN = "gossip.train"
"""Config key of a decentralized train message: False makes it a gossip step
only (mix, no local steps: DFedSAM-MGS's extra steps); absent means True."""
GOSSIP_MODEL = "gossip.model"
"""ArrayRecord of a decentralized train reply: the node's whole model after
local training, which the server relays to the node's neighbours."""
DADAO_MESSAGE = "dadao.message"
"""ArrayRecord of a DADAO train reply (``strategies/dadao.py``): the node's
``y + z`` (float64, over the model's float entries) at its exchange time,
which the server relays to its partner of that exchange."""


def gossip_neighbor(index: int) -> str:
    """ArrayRecord name of the ``index``-th neighbour model relayed to a node."""
    return f"gossip.neighbor-{index}"


UPLINK_COMPRESSOR = "uplink.compressor"
"""Config key: the compressor of a train reply's update ``y - x``
(:mod:`tasks.compression`; ``strategies/uplink.py``); absent or ``"none"``:
the reply is the dense model."""
UPLINK_K = "uplink.k"
"""Config key: coordinates Top-k / Rand-k keep in the compressed uplink."""
UPLINK_LEVELS = "uplink.levels"
"""Config key: quantisation levels of QSGD / deterministic quantisation."""
UPLINK_REPLY = "uplink.reply"
"""Config key: what the compressed uplink replaces, ``"model"`` (the reply's
arrays are the local model ``y``: send ``C(y - x)``) or ``"update"`` (they
are the routine's update ``Delta``, e.g. the asynchronous ``delta``
routine: send ``C(Delta)``)."""
UPLINK_RECORDS = "uplink.records"
"""Config key: the reply's extra records (comma-separated names) the compressed
uplink compresses as well, each as ``C(r)`` (SCAFFOLD's ``momentum.dc``;
``BouquetStrategy.compressed_records``); absent: only ``arrays``."""
UPLINK_ERROR_FEEDBACK = "uplink.error-feedback"
"""Config key: the client adds its last compression error to the next update
(kept in ``Context.state``)."""

DOWNLINK_COMPRESSOR = "downlink.compressor"
"""Config key of a train message with a compressed downlink
(``strategies/downlink.py``): the compressor of ``C(x - x_hat)``."""
DOWNLINK_K = "downlink.k"
"""Config key: coordinates Top-k / Rand-k keep in the compressed downlink."""
DOWNLINK_LEVELS = "downlink.levels"
"""Config key: quantisation levels of the compressed downlink."""
DOWNLINK_VERSION = "downlink.version"
"""Config key: the version of the model ``x_hat`` this train message brings."""
DOWNLINK_BASE = "downlink.base"
"""Config key: the version the payload applies to (0: ``arrays`` is the
dense ``x_hat``; else ``arrays`` holds the non-float entries and
:data:`DOWNLINK_PAYLOAD` the payload of ``x_hat - x_hat_base``)."""
DOWNLINK_PAYLOAD = "downlink.payload"
"""ArrayRecord of a compressed train message: the compressor's payload."""

QUERY = "query"
"""Config key of a query message: what the server asks (:data:`DATA_PROFILE`)."""
DATA_PROFILE = "data-profile"


def algorithm_key(algorithm: str, key: str) -> str:
    """Return the namespaced key ``"<algorithm>.<key>"``."""
    return f"{algorithm}.{key}"


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (e.g. ``seed, round, "train"``).

    Both halves derive every random stream from it (architecture rule 6): the
    server's sampling from ``(seed, round, phase)``, a client's from ``(seed,
    round, partition-id)``.
    """
    words = [
        p if isinstance(p, int) else int.from_bytes(p.encode(), "little") for p in parts
    ]
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> 1)


HEAD = "head"
"""In :data:`PERSONAL`: the classifier, i.e. the entries of the module that owns
the last entry of the state dict (``fc`` of a ResNet, the last ``Linear`` of a
``Sequential``)."""


def resolve_personal(patterns: Sequence[str], names: Sequence[str]) -> list[str]:
    """The entries of ``names`` (state-dict order) that ``patterns`` make personal.

    A pattern is a glob over state-dict names (``"fc.*"``, ``"*.bn*"``) or
    :data:`HEAD`. Both halves resolve it on the names alone, so server and
    client agree on which entries never leave the node.
    """
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern == HEAD and names:
            module = names[-1].rpartition(".")[0]
            chosen.update(n for n in names if n.rpartition(".")[0] == module)
        else:
            chosen.update(fnmatch.filter(names, pattern))
    return [n for n in names if n in chosen]


def config_of(content: Mapping[str, Any], name: str = CONFIG) -> Mapping[str, Any]:
    """The ConfigRecord ``name`` of a message's content, else an empty mapping.

    ``RecordDict.config_records`` builds a filtered copy of the whole content
    on every access (about 20 us, several per message); this reads one entry.
    """
    from flwr.app import ConfigRecord

    record = content.get(name)
    return record if isinstance(record, ConfigRecord) else {}


def metrics_of(content: Mapping[str, Any], name: str = METRICS) -> Any:
    """The MetricRecord ``name`` of a message's content, else None."""
    from flwr.app import MetricRecord

    record = content.get(name)
    return record if isinstance(record, MetricRecord) else None
