"""Datasets, partitioners and the cache of ``tasks``: offline, on small data."""

import random
import subprocess
import sys

import mnist1d.data
import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

import bouquet.tasks.prepare
from bouquet.tasks import (
    DataSpec,
    dataset_info,
    list_datasets,
    list_partitioners,
    load_central_test,
    load_client_data,
)
from bouquet.tasks.synthetic import make_synthetic

EMBEDDED = ["digits", "mnist1d", "synthetic", "tabular"]


@pytest.fixture(autouse=True)
def small_mnist1d(monkeypatch):
    """mnist1d's own generator with 400 samples instead of 5000 (seconds saved)."""
    args = mnist1d.data.get_dataset_args()
    args.num_samples = 400
    monkeypatch.setattr(mnist1d.data, "get_dataset_args", lambda: args)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("BOUQUET_CACHE_DIR", str(path))
    return path


def all_partitions(spec):
    return [load_client_data(spec, i) for i in range(spec.num_partitions)]


def row_keys(x):
    return [row.tobytes() for row in x.reshape(len(x), -1).numpy()]


def digits_row_ids():
    # load_digits has no duplicate rows, so a row's bytes identify it.
    x, _ = load_digits(return_X_y=True)
    return {
        k: i
        for i, k in enumerate(row_keys(torch.tensor(x / 16.0, dtype=torch.float32)))
    }


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_dataset_loads_with_the_declared_shape(name):
    spec = DataSpec(dataset=name, partitioner="iid", num_partitions=4)
    info = dataset_info(spec)
    data = load_client_data(spec, 1)
    x, y = load_central_test(spec)
    for inputs, labels in [
        (data.train_x, data.train_y),
        (data.test_x, data.test_y),
        (x, y),
    ]:
        assert inputs.dtype == torch.float32 and labels.dtype == torch.int64
        assert tuple(inputs.shape[1:]) == info.input_shape
        assert len(inputs) == len(labels) > 0
        assert 0 <= int(labels.min()) and int(labels.max()) < info.num_classes
    # The node's evaluation part is 20% of its partition.
    assert len(data.test_y) == round(0.2 * (len(data.train_y) + len(data.test_y)))


@pytest.mark.parametrize("partitioner", list_partitioners())
def test_partitions_are_disjoint_and_cover_everything_but_the_central_test(partitioner):
    num = 10 if partitioner != "exponential" else 4  # e^i sizes starve partition 0
    spec = DataSpec(dataset="digits", partitioner=partitioner, num_partitions=num)
    ids = digits_row_ids()
    central = [ids[k] for k in row_keys(load_central_test(spec)[0])]
    seen = list(central)
    for data in all_partitions(spec):
        seen += [ids[k] for k in row_keys(data.train_x) + row_keys(data.test_x)]
    assert len(set(seen)) == len(seen)
    assert len(central) == round(0.2 * 1797)
    if partitioner == "shard":  # equal shards: the remainder (< 20 rows) is dropped
        assert 1797 - 20 < len(seen) <= 1797
    elif partitioner == "long-tail":  # the tail classes' rows are dropped by design
        assert len(central) + 10 * 2 < len(seen) < 1797 // 2
    else:
        assert sorted(seen) == list(range(1797))


def test_central_test_is_stratified_and_independent_of_the_partitioner():
    x_iid, y_iid = load_central_test(DataSpec(partitioner="iid"))
    x_dir, y_dir = load_central_test(
        DataSpec(partitioner="dirichlet", num_partitions=3)
    )
    assert torch.equal(x_iid, x_dir) and torch.equal(y_iid, y_dir)
    counts = torch.bincount(y_iid, minlength=10)
    assert int(counts.max() - counts.min()) <= 2


def test_same_seed_same_partitions_different_seed_different():
    first = all_partitions(DataSpec(seed=1))
    again = all_partitions(DataSpec(seed=1))
    other = all_partitions(DataSpec(seed=2))
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert any(
        a.train_x.shape != c.train_x.shape or not torch.equal(a.train_x, c.train_x)
        for a, c in zip(first, other, strict=True)
    )


def mean_max_class_share(spec):
    shares = []
    for data in all_partitions(spec):
        labels = torch.cat([data.train_y, data.test_y])
        shares.append(float(torch.bincount(labels).max()) / len(labels))
    return float(np.mean(shares))


def test_dirichlet_with_small_alpha_is_skewed():
    skewed = mean_max_class_share(
        DataSpec(partitioner="dirichlet", dirichlet_alpha=0.1)
    )
    iid = mean_max_class_share(DataSpec(partitioner="iid"))
    assert iid < 0.2 < 0.4 < skewed


@pytest.mark.parametrize("classes", [1, 2, 3])
def test_pathological_gives_exactly_k_classes_per_partition(classes):
    spec = DataSpec(partitioner="pathological", classes_per_partition=classes)
    for data in all_partitions(spec):
        assert len(torch.cat([data.train_y, data.test_y]).unique()) == classes


def test_natural_id_partition_i_is_synthetic_client_i():
    spec = DataSpec(dataset="synthetic", partitioner="natural-id", num_partitions=5)
    x, _, client = make_synthetic(5, 1.0, 1.0, spec.seed)
    clients = {row.tobytes(): c for row, c in zip(x, client, strict=True)}
    total = len(load_central_test(spec)[1])
    for partition_id, data in enumerate(all_partitions(spec)):
        rows = torch.cat([data.train_x, data.test_x]).numpy()
        assert {clients[row.tobytes()] for row in rows} == {partition_id}
        total += len(rows)
    assert total == len(x)


def test_natural_id_with_the_wrong_count_fails_clearly():
    spec = DataSpec(dataset="synthetic", partitioner="natural-id", num_partitions=3)
    spec_digits = DataSpec(partitioner="natural-id", num_partitions=4)
    load_client_data(spec, 0)  # synthetic makes as many clients as partitions
    with pytest.raises(
        ValueError, match="gives 10 partitions, but num-partitions is 4"
    ):
        load_client_data(spec_digits, 0)


def test_synthetic_client_data_does_not_depend_on_the_client_count():
    x3, y3, _ = make_synthetic(3, 0.5, 0.5, seed=7)
    x5, y5, c5 = make_synthetic(5, 0.5, 0.5, seed=7)
    assert np.array_equal(x3, x5[: len(x3)]) and np.array_equal(y3, y5[: len(y3)])
    assert x5.shape[1] == 60 and set(np.unique(c5)) == set(range(5))
    assert (np.bincount(c5) >= 50).all()  # lognormal(4, 2) + 50 samples each


@pytest.mark.parametrize(
    ("kind", "known"),
    [("dataset", list_datasets()), ("partitioner", list_partitioners())],
)
def test_unknown_names_fail_at_once_listing_the_known_ones(kind, known):
    with pytest.raises(ValueError, match=f"Unknown {kind} 'nope'") as info:
        DataSpec(**{kind: "nope"})
    assert all(name in str(info.value) for name in known)


def test_unknown_name_suggests_the_closest_one():
    with pytest.raises(ValueError, match="Did you mean 'cifar10'"):
        DataSpec(dataset="cifar1O")


def test_partition_id_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="outside"):
        load_client_data(DataSpec(num_partitions=2), 2)


def test_from_run_config_reads_kebab_keys_and_falls_back():
    spec = DataSpec.from_run_config(
        {"dataset": "mnist1d", "dirichlet-alpha": 1, "num-partitions": 0, "seed": 3},
        num_partitions=7,
    )
    assert (spec.dataset, spec.dirichlet_alpha, spec.num_partitions, spec.seed) == (
        "mnist1d",
        1.0,
        7,
        3,
    )
    assert DataSpec.from_run_config({"num-partitions": 4}, 7).num_partitions == 4
    assert DataSpec.from_run_config({}) == DataSpec()


def test_second_load_reads_the_cache(fresh_cache, monkeypatch):
    spec = DataSpec(num_partitions=3)
    first, central = load_client_data(spec, 2), load_central_test(spec)

    def no_rebuild(*args):
        raise AssertionError("rebuilt instead of reading the cache")

    monkeypatch.setattr(bouquet.tasks.prepare, "build_partitions", no_rebuild)
    monkeypatch.setattr(bouquet.tasks.prepare, "build_central_test", no_rebuild)
    again = load_client_data(spec, 0), load_client_data(spec, 2)
    assert torch.equal(again[1].train_x, first.train_x)
    assert torch.equal(load_central_test(spec)[1], central[1])
    files = sorted(p.name for p in fresh_cache.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith(".tmp")]
    assert len([f for f in files if f.startswith("partition-")]) == 3


def test_embedded_generation_leaves_the_global_rng_alone(fresh_cache):
    # mnist1d's generator seeds numpy's and Python's global RNGs.
    np.random.seed(0)
    random.seed(0)
    expected = np.random.rand(), random.random()
    np.random.seed(0)
    random.seed(0)
    load_client_data(
        DataSpec(dataset="mnist1d", partitioner="iid", num_partitions=2), 0
    )
    assert (np.random.rand(), random.random()) == expected


def test_importing_tasks_is_light():
    code = (
        "import sys, tasks; from tasks import DataSpec, dataset_info; "
        "dataset_info(DataSpec()); "
        "print(sorted(m for m in ('torch', 'datasets', 'sklearn', 'flwr_datasets') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr


def _holdout_by_scanning(groups, fraction, seed):
    """The per-group scan ``stratified_holdout`` replaced (O(rows x groups))."""
    rng = np.random.default_rng(seed)
    held = []
    for group in np.unique(groups):
        members = rng.permutation(np.flatnonzero(groups == group))
        count = min(round(fraction * len(members)), len(members) - 1)
        held.append(members[:count])
    held_out = np.sort(np.concatenate(held))
    return np.setdiff1d(np.arange(len(groups)), held_out), held_out


@pytest.mark.parametrize("groups", [[3, 1, 1, 2, 3, 3, 1, 2, 2, 2], list("bacabcaab")])
def test_stratified_holdout_draws_what_a_per_group_scan_draws(groups):
    rng = np.random.default_rng(1)
    groups = np.array(groups)[rng.permutation(len(groups))]
    for fraction, seed in [(0.2, 0), (0.5, 7), (0.34, 3)]:
        got = bouquet.tasks.prepare.stratified_holdout(groups, fraction, seed)
        want = _holdout_by_scanning(groups, fraction, seed)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("ids", [[5, 2, 2, 9, 5, 2], ["w2", "w1", "w2", "w0", "w1"]])
def test_natural_id_partitions_equal_flwr_datasets(ids):
    from datasets import Dataset
    from flwr_datasets.partitioner import NaturalIdPartitioner

    ids = np.array(ids)
    order = np.argsort(ids, kind="stable")
    rows = np.arange(100, 100 + len(ids))[order]
    partitioner = NaturalIdPartitioner(partition_by="id")
    partitioner.dataset = Dataset.from_dict({"id": ids[order], "row": rows})
    want = [
        partitioner.load_partition(i)["row"] for i in range(partitioner.num_partitions)
    ]
    got = bouquet.tasks.prepare.natural_id_partitions(rows, ids[order])
    assert [list(g) for g in got] == want


@pytest.mark.parametrize(
    "config",
    [
        {"dataset": "digits", "partitioner": "dirichlet", "num_partitions": 4},
        {"dataset": "synthetic", "partitioner": "natural-id", "num_partitions": 6},
    ],
)
def test_partitions_cut_from_the_whole_pool_equal_per_partition_ones(
    config, monkeypatch
):
    import dataclasses

    spec = DataSpec(**config)
    source = bouquet.tasks.prepare.open_source_quietly(spec)
    assert source.arrays is not None  # embedded data: the pool's own arrays
    from_arrays = dict(bouquet.tasks.prepare.build_partitions(spec, source))
    formatted = dataclasses.replace(source, arrays=None)
    whole = dict(bouquet.tasks.prepare.build_partitions(spec, formatted))
    monkeypatch.setattr(bouquet.tasks.prepare, "POOL_IN_MEMORY_BYTES", 0)
    apart = dict(bouquet.tasks.prepare.build_partitions(spec, formatted))
    assert sorted(whole) == sorted(apart) == list(range(spec.num_partitions))
    assert sorted(from_arrays) == sorted(whole)
    for pid, tensors in whole.items():
        for name, value in tensors.items():
            assert torch.equal(value, apart[pid][name]), (pid, name)
            assert torch.equal(value, from_arrays[pid][name]), (pid, name)


def test_all_but_is_setdiff_of_the_range():
    from bouquet.tasks.prepare import all_but

    rng = np.random.default_rng(1)
    excluded = rng.choice(1000, 137, replace=False)
    np.testing.assert_array_equal(
        all_but(1000, excluded), np.setdiff1d(np.arange(1000), excluded)
    )
    assert all_but(3, np.zeros(0, np.int64)).tolist() == [0, 1, 2]
