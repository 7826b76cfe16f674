"""Krum's block-wise distances and FedMedian's sort-based median agree with Flower."""

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

from bouquet.strategies.aggregation import pairwise_sq_distances, to_numpy, to_record
from bouquet.strategies.pieces import krum_select
from tests.conftest import answer


def _records(m: int, seed: int = 0) -> list[ArrayRecord]:
    rng = np.random.default_rng(seed)
    return [
        to_record(
            {
                "w": rng.standard_normal((7, 5)).astype(np.float32),
                "b": rng.standard_normal(11).astype(np.float32) + i,
                "n": np.array(i, dtype=np.int64),
            }
        )
        for i in range(m)
    ]


def test_distances_match_flower_on_small_blocks():
    records = _records(6)
    arrays = [to_numpy(r) for r in records]
    ours = pairwise_sq_distances(arrays, block=4)  # blocks split every layer
    np.testing.assert_allclose(ours, compute_distances(records), rtol=1e-9, atol=1e-6)
    assert np.all(np.diag(ours) == 0.0) and np.all(ours >= 0.0)


def test_hand_computed_distances_and_krum_choice():
    points = [0.0, 1.0, 1.5, 10.0]  # one coordinate each
    arrays = [{"x": np.array([p], dtype=np.float32)} for p in points]
    distances = pairwise_sq_distances(arrays)
    np.testing.assert_allclose(distances[0], [0.0, 1.0, 2.25, 100.0])
    # n - f - 2 = 2 nearest with f = 0: scores 3.25, 1.25, 2.5, 154.25.
    assert krum_select(distances, 0, 1) == [1]
    assert krum_select(distances, 0, 2) == [1, 2]


def test_selection_matches_flower():
    records = _records(9, seed=3)
    contents = [
        RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": 1})})
        for r in records
    ]
    for f in (0, 2):
        theirs = select_multikrum(
            contents, num_malicious_nodes=f, num_nodes_to_select=3
        )
        ours = krum_select(pairwise_sq_distances([to_numpy(r) for r in records]), f, 3)
        assert [contents[i] for i in ours] == theirs


def _train_replies(strategy, records, grid, reference):
    """Replies of the sampled nodes, ``records[i]`` from the i-th node by id."""
    sent = sorted(
        strategy.configure_train(1, to_record(reference), ConfigRecord(), grid),
        key=lambda msg: msg.metadata.dst_node_id,
    )
    return [
        Message(
            RecordDict(
                {
                    "arrays": to_record(to_numpy(r)),
                    "metrics": MetricRecord({"num-examples": 1 + i, "partition-id": i}),
                }
            ),
            reply_to=msg,
        )
        for i, (r, msg) in enumerate(zip(records, sent, strict=True))
    ]


def _same_round_as_flower(ours, theirs, records):
    from bouquet.simulations.inprocess import InProcessGrid

    reference = {k: np.zeros_like(v) for k, v in to_numpy(records[0]).items()}
    n = len(records)
    grid = InProcessGrid(lambda msg, ctx: msg, n, {"min-available-nodes": n})
    got, _ = ours.aggregate_train(
        1, answer(ours, _train_replies(ours, records, grid, reference))
    )
    want, _ = theirs.aggregate_train(
        1, _train_replies(theirs, records, grid, reference)
    )
    assert got is not None and want is not None
    assert list(to_numpy(got)) == list(to_numpy(want))
    for key, value in to_numpy(want).items():
        # ours keeps each entry's dtype (Flower's turns int64 into float64)
        assert to_numpy(got)[key].dtype == reference[key].dtype
        np.testing.assert_allclose(to_numpy(got)[key], value, rtol=0, atol=0)


def test_coordinate_median_equals_numpy_and_flower():
    from flwr.serverapp.strategy import FedMedian as FlowerMedian

    from bouquet.strategies.aggregation import coordinate_median
    from bouquet.strategies.fedmedian import FedMedian

    rng = np.random.default_rng(1)
    for m in (1, 4, 7):
        layers = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(m)]
        np.testing.assert_array_equal(
            coordinate_median(layers), np.median(np.stack(layers), axis=0)
        )
    ints = [np.array(v, dtype=np.int64) for v in (3, 8)]
    assert coordinate_median(ints) == np.median(ints) == 5.5

    _same_round_as_flower(
        FedMedian(fraction_train=1.0, min_available_nodes=5),
        FlowerMedian(fraction_train=1.0, min_available_nodes=5),
        _records(5, seed=2),
    )


def test_krum_strategy_equals_flower():
    from flwr.serverapp.strategy import Krum as FlowerKrum

    from bouquet.strategies.krum import Krum

    for f in (0, 2):
        _same_round_as_flower(
            Krum(fraction_train=1.0, min_available_nodes=7, num_malicious_nodes=f),
            FlowerKrum(
                fraction_train=1.0, min_available_nodes=7, num_malicious_nodes=f
            ),
            _records(7, seed=4),
        )
