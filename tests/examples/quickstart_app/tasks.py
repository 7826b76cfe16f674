"""The user's model and data: a Flower quickstart-pytorch app, made offline.

The module is deliberately called ``tasks`` (and the app has its own
``strategies`` package): a user's names must not shadow Bouquet's. Data are
scikit-learn's digits as a Hugging Face ``datasets.Dataset`` with a
transform, batched by a ``DataLoader`` into ``{"img", "label"}`` dicts, as
the quickstart's CIFAR-10 loader does.
"""

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from datasets import Dataset
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader


class Net(nn.Module):
    """A small CNN for 1 x 8 x 8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _to_tensors(batch: dict) -> dict:
    batch["img"] = [
        torch.tensor(np.asarray(img, dtype=np.float32) / 16.0).reshape(1, 8, 8)
        for img in batch["img"]
    ]
    return batch


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """This node's train and validation loaders (IID shards, 80/20)."""
    digits = load_digits()
    full = Dataset.from_dict(
        {"img": digits.data.tolist(), "label": digits.target.tolist()}
    ).shuffle(seed=0)
    partition = full.shard(num_partitions, partition_id)
    split = partition.train_test_split(test_size=0.2, seed=42)
    split = split.with_transform(_to_tensors)
    train = DataLoader(split["train"], batch_size=batch_size, shuffle=True)
    val = DataLoader(split["test"], batch_size=batch_size)
    return train, val


def train(net: nn.Module, loader: DataLoader, epochs: int, lr: float) -> float:
    """The user's own loop (SGD with momentum 0.9, as the quickstart's)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total = 0.0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(net(batch["img"]), batch["label"])
            loss.backward()
            optimizer.step()
            total += loss.item()
    return total / (epochs * len(loader))


def test(net: nn.Module, loader: DataLoader) -> tuple[float, float]:
    """Loss and accuracy on ``loader``."""
    net.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            out = net(batch["img"])
            loss += F.cross_entropy(out, batch["label"], reduction="sum").item()
            correct += (out.argmax(1) == batch["label"]).sum().item()
    n = len(loader.dataset)
    return loss / n, correct / n
