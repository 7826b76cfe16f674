"""Local files (data-path) and the Hugging Face path, exercised offline."""

import dataclasses

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Sequence, Value
from PIL import Image as PILImage

from bouquet.tasks import DataSpec, dataset_info, load_central_test, load_client_data
from bouquet.tasks.catalog import HUB_DATASETS


def feature_rows(num_rows, offset=0):
    """Rows whose features are (row id, label, writer): each row is identifiable."""
    ids = np.arange(offset, offset + num_rows)
    labels, writers = ids % 5, ids % 4
    return Dataset.from_dict(
        {
            "x": np.stack([ids, labels, writers], axis=1).astype(np.float32),
            "label": labels,
            "writer": [f"w{w}" for w in writers],
        },
        features=Features(
            {
                "x": Sequence(Value("float32"), length=3),
                "label": ClassLabel(num_classes=5),
                "writer": Value("string"),
            }
        ),
    )


def seen_ids(spec):
    parts = [load_client_data(spec, i) for i in range(spec.num_partitions)]
    ids = [int(v) for d in parts for v in torch.cat([d.train_x, d.test_x])[:, 0]]
    return parts, ids


def test_save_to_disk_folder_uses_its_test_split(tmp_path):
    folder = tmp_path / "saved"
    DatasetDict(
        {"train": feature_rows(100), "test": feature_rows(30, 100)}
    ).save_to_disk(folder)
    before = sorted(p.name for p in folder.rglob("*"))
    spec = DataSpec(data_path=str(folder), partitioner="iid", num_partitions=4)
    _, ids = seen_ids(spec)
    x, y = load_central_test(spec)
    assert sorted(ids) == list(range(100))
    assert sorted(x[:, 0].int().tolist()) == list(range(100, 130))
    assert torch.equal(y, x[:, 1].long())
    assert (
        dataset_info(spec).input_shape == (3,) and dataset_info(spec).num_classes == 5
    )
    assert sorted(p.name for p in folder.rglob("*")) == before  # nothing written there


def test_parquet_file_holds_out_the_central_test(tmp_path):
    path = tmp_path / "rows.parquet"
    feature_rows(200).to_parquet(path)
    spec = DataSpec(data_path=str(path), partitioner="dirichlet", num_partitions=3)
    _, ids = seen_ids(spec)
    central = load_central_test(spec)[0][:, 0].int().tolist()
    assert sorted(ids + central) == list(range(200))
    assert len(central) == 40


def test_natural_id_partitions_by_the_named_column(tmp_path):
    path = tmp_path / "rows.parquet"
    feature_rows(200).to_parquet(path)
    spec = DataSpec(
        data_path=str(path),
        partitioner="natural-id",
        partition_by="writer",
        num_partitions=4,
    )
    parts, _ = seen_ids(spec)
    writers = [set(torch.cat([d.train_x, d.test_x])[:, 2].tolist()) for d in parts]
    assert sorted(len(w) for w in writers) == [1, 1, 1, 1]
    assert set().union(*writers) == {0.0, 1.0, 2.0, 3.0}


def image_rows(num_rows, size, mode, offset=0):
    """Constant images whose pixel value encodes the label (label * 20 + 10)."""
    labels = [(offset + i) % 4 for i in range(num_rows)]
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    images = [
        PILImage.fromarray(np.full(shape, 20 * lab + 10, np.uint8), mode=mode)
        for lab in labels
    ]
    return images, labels


def test_local_image_folder_is_scaled_to_minus_one_one(tmp_path):
    images, labels = image_rows(40, 6, "L")
    ds = Dataset.from_dict(
        {"image": images, "label": labels},
        features=Features({"image": Image(), "label": Value("int64")}),
    )
    ds.save_to_disk(tmp_path / "imgs")
    spec = DataSpec(
        data_path=str(tmp_path / "imgs"), partitioner="iid", num_partitions=2
    )
    data = load_client_data(spec, 0)
    assert dataset_info(spec).input_shape == (1, 6, 6)
    assert dataset_info(spec).num_classes == 4  # largest label + 1
    expected = (20 * data.train_y.float() + 10) / 255 * 2 - 1
    assert torch.allclose(data.train_x[:, 0, 3, 3], expected)


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """Point a Hub entry at local parquet files; FederatedDataset reads them."""

    def install(name, splits, **changes):
        files = {}
        entry = HUB_DATASETS[name]
        for split, (images, labels) in splits.items():
            columns = {
                entry.image: images,
                entry.label: labels,
                **changes.pop(split, {}),
            }
            files[split] = str(tmp_path / f"{split}.parquet")
            Dataset.from_dict(columns).cast_column(entry.image, Image()).to_parquet(
                files[split]
            )
        local = dataclasses.replace(
            entry,
            hub_id="parquet",
            subset=None,
            load_kwargs={"data_files": files, "cache_dir": str(tmp_path / "hf")},
            **changes,
        )
        monkeypatch.setitem(HUB_DATASETS, name, local)
        return local

    return install


def test_hub_images_become_normalised_tensors(local_hub):
    entry = local_hub(
        "cifar10",
        {"train": image_rows(40, 32, "RGB"), "test": image_rows(12, 32, "RGB", 1)},
    )
    spec = DataSpec(
        dataset="cifar10",
        partitioner="pathological",
        classes_per_partition=2,
        num_partitions=2,
    )
    parts = [load_client_data(spec, i) for i in range(2)]
    x, y = load_central_test(spec)
    assert x.shape == (12, 3, 32, 32) and len(y) == 12
    assert sum(len(d.train_y) + len(d.test_y) for d in parts) == 40
    mean = torch.tensor(entry.mean).view(1, 3)
    std = torch.tensor(entry.std).view(1, 3)
    for data in parts:
        labels = torch.cat([data.train_y, data.test_y])
        assert len(labels.unique()) == 2
        pixels = torch.cat([data.train_x, data.test_x])[:, :, 5, 7]
        raw = ((20 * labels.float() + 10) / 255).view(-1, 1)
        assert torch.allclose(pixels, (raw - mean) / std, atol=1e-6)


def test_single_split_hub_data_holds_out_per_writer(local_hub):
    images, labels = image_rows(60, 28, "L")
    writers = [f"w{i % 3}" for i in range(60)]
    local_hub("femnist", {"train": (images, labels)}, train={"writer_id": writers})
    spec = DataSpec(dataset="femnist", partitioner="natural-id", num_partitions=3)
    parts = [load_client_data(spec, i) for i in range(3)]
    central = load_central_test(spec)[0]
    assert central.shape == (12, 1, 28, 28)
    # 20 rows per writer, 4 held out each, then 20% of 16 for the node's test.
    assert [(len(d.train_y), len(d.test_y)) for d in parts] == [(13, 3)] * 3


def test_hub_dataset_offline_says_what_to_do():
    with pytest.raises(RuntimeError, match="data-path"):
        load_client_data(DataSpec(dataset="mnist", num_partitions=2), 0)


def test_in_memory_dataset_reads_back_like_from_dict():
    from bouquet.tasks.sources import in_memory_dataset

    rng = np.random.default_rng(0)
    columns = {
        "x": rng.standard_normal((7, 3, 2)).astype(np.float32),
        "label": np.arange(7, dtype=np.int64),
        "writer": np.array(list("abcabca"), dtype=object),
    }
    ours = in_memory_dataset(**columns)
    theirs = Dataset.from_dict(columns)
    assert len(ours) == 7 and ours.column_names == theirs.column_names
    a = ours.with_format("numpy")[:]
    b = theirs.with_format("numpy")[:]
    for name in columns:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert a["x"].dtype == np.float32 and a["x"].shape == (7, 3, 2)
    rows = ours.select([4, 1])
    np.testing.assert_array_equal(
        rows.with_format("numpy")[:]["x"], columns["x"][[4, 1]]
    )
    # The fingerprint is the data's: same bytes, same; other bytes, other.
    assert ours._fingerprint == in_memory_dataset(**columns)._fingerprint
    changed = {**columns, "label": columns["label"][::-1].copy()}
    assert ours._fingerprint != in_memory_dataset(**changed)._fingerprint


def test_synthetic_generator_matches_the_one_pass_reference():
    """Two passes over the clients' streams give the rows of one pass."""
    from bouquet.tasks.synthetic import DIMENSION, NUM_CLASSES, make_synthetic

    scale = np.sqrt(np.arange(1, DIMENSION + 1, dtype=np.float64) ** -1.2)
    xs, ys = [], []
    for k in range(5):
        rng = np.random.default_rng([3, k])
        size = int(rng.lognormal(4, 2)) + 50
        model_mean = rng.normal(0, 0.5)
        input_mean = rng.normal(rng.normal(0, 0.5), 1, DIMENSION)
        weights = rng.normal(model_mean, 1, (DIMENSION, NUM_CLASSES))
        bias = rng.normal(model_mean, 1, NUM_CLASSES)
        x = input_mean + scale * rng.standard_normal((size, DIMENSION))
        ys.append(np.argmax(x @ weights + bias, axis=1))
        xs.append(x)
    x, y, client = make_synthetic(5, 0.5, 0.5, 3)
    np.testing.assert_array_equal(x, np.concatenate(xs).astype(np.float32))
    np.testing.assert_array_equal(y, np.concatenate(ys))
    np.testing.assert_array_equal(
        client, np.concatenate([np.full(len(b), k) for k, b in enumerate(ys)])
    )
    assert x.dtype == np.float32 and y.dtype == client.dtype == np.int64


def test_prepare_caches_fills_partitions_and_central_test(tmp_path, monkeypatch):
    from bouquet.tasks import data

    monkeypatch.setenv("BOUQUET_CACHE_DIR", str(tmp_path))
    spec = DataSpec(dataset="synthetic", partitioner="natural-id", num_partitions=5)
    data.prepare_caches(spec)
    assert len(list(data.partitions_dir(spec).glob("partition-*.pt"))) == 5
    assert data.central_test_path(spec).is_file()
    opened = []
    monkeypatch.setattr(data.prepare, "open_source_quietly", lambda s: opened.append(s))
    data.prepare_caches(spec)  # all cached: the source is not even opened
    assert opened == []
    x, y = load_central_test(spec)
    assert len(x) == len(y) > 0
