"""The datasets Bouquet knows by name, and the facts a model needs about them.

Eight are embedded and work offline: ``digits`` (scikit-learn), ``digits-shift``
(half of digits, rotated and noisy: the target of fine-tuning a model
pretrained on the other half), ``digits-domains`` (that half, each image in
one of four domains: a mixture inside every client), ``mnist1d`` (generated
by the ``mnist1d`` package), ``synthetic`` (FedProx's Synthetic(alpha, beta),
generated here), ``tabular`` (scikit-learn's ``make_classification``: 40,000
rows, 20 features, 2 classes), ``grammar-text`` (character-level causal
language modelling on sentences of a generated grammar, four topics:
:mod:`tasks.text`) and ``sbm-graph`` (an attributed stochastic-block-model
graph, one community per node, rows are nodes with their GCN computation
tree: :mod:`tasks.graph`).
The others come from the Hugging Face Hub through flwr-datasets and need
network access the first time.

Light on purpose: no heavy import, so ``dataset_info`` is cheap in every
ClientApp process.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bouquet.tasks.spec import DatasetInfo, DataSpec


@dataclass(frozen=True)
class HubDataset:
    """How to read one Hugging Face dataset into tensors.

    ``mean``/``std`` normalise each channel after scaling pixels to [0, 1].
    ``natural_id`` is the column ``natural-id`` partitions by (when the run's
    ``partition-by`` is left at ``label``). Without a ``test_split`` the central
    test is held out of "train" (``test-fraction``). ``load_kwargs`` go to
    ``datasets.load_dataset`` (through ``FederatedDataset``).
    """

    hub_id: str
    image: str
    label: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    subset: str | None = None
    test_split: str | None = "test"
    natural_id: str | None = None
    load_kwargs: Mapping[str, Any] = field(default_factory=dict)


EMBEDDED: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", (1, 8, 8), 10),
    # The half of digits the source task leaves, rotated and noisy (sources.py):
    # federated fine-tuning's target under a domain shift.
    "digits-shift": DatasetInfo("digits-shift", (1, 8, 8), 10),
    # The same half, each image in one of four domains (rotated and noisy,
    # inverted, turned a quarter, faint): a mixture inside every client.
    "digits-domains": DatasetInfo("digits-domains", (1, 8, 8), 10),
    "mnist1d": DatasetInfo("mnist1d", (1, 40), 10),
    "synthetic": DatasetInfo("synthetic", (60,), 10),
    # scikit-learn's make_classification, 40,000 rows (sources.py): DIFF2's
    # tabular reproduction target.
    "tabular": DatasetInfo("tabular", (20,), 2),
    # Character-level next-token prediction on a generated grammar (text.py):
    # inputs are 32 character ids, targets the next 32, classes the vocabulary.
    "grammar-text": DatasetInfo("grammar-text", (32,), 28),
    # Node rows: (slots, 1 + features), tasks/graph.py's INPUT_SHAPE (kept
    # literal so this module stays light).
    "sbm-graph": DatasetInfo("sbm-graph", (40, 65), 7),
}

# Channel statistics are the commonly published ones for each training split.
HUB_DATASETS: dict[str, HubDataset] = {
    "mnist": HubDataset(
        "ylecun/mnist", "image", "label", (1, 28, 28), 10, (0.1307,), (0.3081,)
    ),
    "fashion_mnist": HubDataset(
        "zalando-datasets/fashion_mnist",
        "image",
        "label",
        (1, 28, 28),
        10,
        (0.2860,),
        (0.3530,),
    ),
    "cifar10": HubDataset(
        "uoft-cs/cifar10",
        "img",
        "label",
        (3, 32, 32),
        10,
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    ),
    "cifar100": HubDataset(
        "uoft-cs/cifar100",
        "img",
        "fine_label",
        (3, 32, 32),
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    ),
    "svhn": HubDataset(
        "ufldl-stanford/svhn",
        "image",
        "label",
        (3, 32, 32),
        10,
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        subset="cropped_digits",
    ),
    # One "train" split only: the central test is held out (test-fraction).
    "femnist": HubDataset(
        "flwrlabs/femnist",
        "image",
        "character",
        (1, 28, 28),
        62,
        (0.5,),
        (0.5,),
        test_split=None,
        natural_id="writer_id",
    ),
}


def list_datasets() -> list[str]:
    """Names accepted as ``dataset`` (embedded ones first)."""
    return [*EMBEDDED, *HUB_DATASETS]


def dataset_info(spec: DataSpec) -> DatasetInfo:
    """Input shape and number of classes of the spec's dataset.

    For a ``data_path`` the dataset is opened once and the answer cached, so
    every node reading the same files agrees on the model's shape.
    """
    if spec.data_path:
        from bouquet.tasks.sources import local_dataset_info

        return local_dataset_info(spec)
    if spec.dataset in EMBEDDED:
        return EMBEDDED[spec.dataset]
    hub = HUB_DATASETS[spec.dataset]
    return DatasetInfo(spec.dataset, hub.input_shape, hub.num_classes)
