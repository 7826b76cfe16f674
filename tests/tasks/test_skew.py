"""The grouped-label-skew and long-tail partitioners (tasks/skew.py), seeded."""

import numpy as np
import pytest
import torch

from bouquet.tasks import DataSpec
from bouquet.tasks.data import load_client_data
from bouquet.tasks.skew import (
    GroupedLabelPartitioner,
    LongTailPartitioner,
    long_tail_counts,
)
from bouquet.tasks.sources import in_memory_dataset


def _split(partitioner, labels):
    partitioner.dataset = in_memory_dataset(
        label=np.asarray(labels), row=np.arange(len(labels))
    )
    return [
        np.asarray(partitioner.load_partition(i)["row"])
        for i in range(partitioner.num_partitions)
    ]


def test_grouped_partitions_share_their_groups_classes_and_use_every_row():
    labels = np.repeat(np.arange(6), 12)  # 6 classes, 12 rows each
    parts = _split(GroupedLabelPartitioner(6, "label", 3, seed=0), labels)
    # group g = i mod 3 owns the classes k with k mod 3 = g, dealt evenly
    for i, rows in enumerate(parts):
        assert sorted(set(labels[rows])) == [i % 3, i % 3 + 3]
        assert np.bincount(labels[rows], minlength=6).max() == 6
    assert sorted(np.concatenate(parts)) == list(range(len(labels)))


def test_grouped_needs_no_more_groups_than_partitions_or_classes():
    with pytest.raises(ValueError, match="num-groups"):
        GroupedLabelPartitioner(2, "label", 3, seed=0)
    with pytest.raises(ValueError, match="classes"):
        _split(GroupedLabelPartitioner(4, "label", 4, seed=0), np.arange(6) % 3)


def test_long_tail_counts_fall_exponentially_to_the_imbalance_factor():
    counts = long_tail_counts(np.full(5, 100), 0.01)
    # 100 * 0.01 ** (k / 4): 100, 31.6, 10, 3.16, 1
    np.testing.assert_array_equal(counts, [100, 31, 10, 3, 1])
    np.testing.assert_array_equal(long_tail_counts(np.full(3, 7), 1.0), [7, 7, 7])


def test_long_tail_keeps_the_tail_counts_disjointly_and_is_seeded():
    labels = np.repeat(np.arange(4), 50)
    parts = _split(LongTailPartitioner(3, "label", 0.1, 1.0, 2, seed=1), labels)
    used = np.concatenate(parts)
    assert len(set(used)) == len(used)
    np.testing.assert_array_equal(
        np.bincount(labels[used]), long_tail_counts(np.full(4, 50), 0.1)
    )
    again = _split(LongTailPartitioner(3, "label", 0.1, 1.0, 2, seed=1), labels)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_digits_by_name_through_the_run_config():
    spec = DataSpec.from_run_config(
        {"partitioner": "grouped", "num-groups": 2}, num_partitions=4
    )
    labels = [
        set(torch.cat([d.train_y, d.test_y]).tolist())
        for d in (load_client_data(spec, i) for i in range(4))
    ]
    assert labels[0] == labels[2] == {0, 2, 4, 6, 8}
    assert labels[1] == labels[3] == {1, 3, 5, 7, 9}
