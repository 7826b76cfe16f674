"""Where a dataset's rows come from: embedded generators, the Hub, local files.

Each builder returns a ``Source``: a ``datasets.Dataset`` pool to partition, the
central test split when the data ships one, and how to turn rows into tensors.
Heavy libraries are imported inside the builders.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from bouquet.tasks.cache import (
    cache_dir,
    cache_key,
    load_cached,
    path_fingerprint,
    save_atomic,
)
from bouquet.tasks.catalog import HUB_DATASETS
from bouquet.tasks.spec import DatasetInfo, DataSpec

if TYPE_CHECKING:
    from datasets import Dataset

# Pixels of local image data are mapped to [-1, 1]: fixed statistics, so nodes
# holding different local files still normalise alike.
_LOCAL_IMAGE_STATS = (0.5, 0.5)
_FEATURE_COLUMNS = ("image", "img", "x", "features", "pixels")


@dataclass
class Source:
    """A dataset ready to be split: rows plus how to read them.

    ``central`` is None when the data has no test split of its own; the
    pipeline then holds out ``test_fraction`` of the pool, stratified by
    ``natural_id`` when there is one (each writer/client keeps its share) and
    by label otherwise.
    """

    pool: Dataset
    central: Dataset | None
    feature: str
    label: str
    input_shape: tuple[int, ...]
    natural_id: str | None = None
    image: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    arrays: dict[str, np.ndarray] | None = None
    """The pool's columns as the arrays it was made from (in-memory sources):
    read directly, they spare a formatted copy of the whole pool."""
    sequence: bool = False
    """Labels are per-token targets (next-token prediction), not classes:
    partitioning and the central hold-out group rows by ``natural_id``."""


def in_memory_dataset(**columns: np.ndarray) -> Dataset:
    """A ``datasets.Dataset`` over in-memory columns, without copying them.

    ``Dataset.from_dict`` converts the arrays and then pickles the whole table
    to fingerprint it: 10,000 synthetic clients (4.5 M rows, 1 GB of inputs)
    peaked at 10.6 GB there. Here each array becomes an Arrow array over the
    same buffer (a row of a 2-D array a fixed-size list) and the fingerprint
    is a hash of the bytes. Values and formatted output are the same.
    """
    import pyarrow as pa
    import xxhash
    from datasets import Dataset
    from datasets.table import InMemoryTable

    digest = xxhash.xxh3_128()
    arrow = {}
    for name, array in columns.items():
        array = np.asarray(array)
        digest.update(f"{name}:{array.dtype.str}:{array.shape}".encode())
        if array.dtype.hasobject:  # e.g. strings: no buffer of their own
            flat = pa.array(array.reshape(-1).tolist())
            digest.update(repr(flat.to_pylist()).encode())
        else:
            array = np.ascontiguousarray(array)
            digest.update(memoryview(array.reshape(-1)).cast("B"))
            flat = pa.array(array.reshape(-1))
        for width in reversed(array.shape[1:]):
            flat = pa.FixedSizeListArray.from_arrays(flat, width)
        arrow[name] = flat
    table = InMemoryTable(pa.table(arrow))
    return Dataset(table, fingerprint=f"bouquet-arrays-{digest.hexdigest()}")


def _digits() -> Source:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    arrays = {"x": (x / 16.0).astype(np.float32), "label": y.astype(np.int64)}
    return Source(
        in_memory_dataset(**arrays), None, "x", "label", (1, 8, 8), arrays=arrays
    )


SHIFT_SEED = 2210_01708
"""Fixes ``digits-shift`` (its halves, angles and noise) for every run seed."""
SHIFT_DEGREES = 20.0
SHIFT_NOISE = 0.1


def _digits_halves() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Digits split in two halves, stratified by label: (source, target)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(SHIFT_SEED)
    source = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == label))
        source[rows[: len(rows) // 2]] = True
    return (
        {"x": x[source], "label": y[source].astype(np.int64)},
        {"x": x[~source], "label": y[~source].astype(np.int64)},
    )


def _digits_shift() -> Source:
    """The target half of digits under FedPEFT's stand-in shift.

    Each image is rotated by U(-20, 20) degrees, plus N(0, 0.1) pixel noise,
    clipped to [0, 1].
    """
    from scipy.ndimage import rotate

    _, target = _digits_halves()
    rng = np.random.default_rng(SHIFT_SEED + 1)
    images = target["x"].reshape(-1, 8, 8)
    angles = rng.uniform(-SHIFT_DEGREES, SHIFT_DEGREES, len(images))
    turned = np.stack(
        [
            rotate(image, angle, reshape=False, order=1)
            for image, angle in zip(images, angles, strict=True)
        ]
    )
    noisy = turned + rng.normal(0.0, SHIFT_NOISE, turned.shape)
    arrays = {
        "x": np.clip(noisy, 0.0, 1.0).reshape(len(images), 64).astype(np.float32),
        "label": target["label"],
    }
    return Source(
        in_memory_dataset(**arrays), None, "x", "label", (1, 8, 8), arrays=arrays
    )


DOMAINS = ("shift", "inverted", "rot90", "faint")
"""``digits-domains``' per-image transformations (:func:`_digits_domains`)."""


def _digits_domains() -> Source:
    """The target half of digits, each image in one of four domains.

    A mixture of domains inside every client (FedIns' setting, where the
    instance decides which scaling and shift fits): each image draws its
    domain uniformly (seeded, the same for every run): ``shift``
    (``digits-shift``'s rotation and noise), ``inverted`` (``1 - x``),
    ``rot90`` (turned a quarter), ``faint`` (``0.4 x`` plus N(0, 0.15)
    noise), clipped to [0, 1]. The source task is ``digits-shift``'s (the
    clean other half), so ``pretrained='source'`` applies.
    """
    shifted = _digits_shift().arrays
    assert shifted is not None
    _, target = _digits_halves()
    rng = np.random.default_rng(SHIFT_SEED + 2)
    clean = target["x"].reshape(-1, 8, 8)
    domain = rng.integers(0, len(DOMAINS), len(clean))
    faint = 0.4 * clean + rng.normal(0.0, 0.15, clean.shape)
    images = np.where(
        (domain == 0)[:, None, None],
        shifted["x"].reshape(-1, 8, 8),
        np.where(
            (domain == 1)[:, None, None],
            1.0 - clean,
            np.where((domain == 2)[:, None, None], np.rot90(clean, axes=(1, 2)), faint),
        ),
    )
    arrays = {
        "x": np.clip(images, 0.0, 1.0).reshape(len(clean), 64).astype(np.float32),
        "label": target["label"],
    }
    return Source(
        in_memory_dataset(**arrays), None, "x", "label", (1, 8, 8), arrays=arrays
    )


def _grammar_text() -> Source:
    """Character-level next-token prediction on a generated grammar (text.py)."""
    from bouquet.tasks.text import CONTEXT, grammar_corpus

    arrays = grammar_corpus()
    return Source(
        in_memory_dataset(**arrays),
        None,
        "x",
        "label",
        (CONTEXT,),
        natural_id="topic",
        arrays=arrays,
        sequence=True,
    )


def source_task(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and labels of ``dataset``'s source task (for ``pretrained=source``).

    ``digits-shift`` and ``digits-domains``: the other half of digits, clean.
    ``grammar-text``: other sentences of its grammar, two of its four topics
    (``text.SOURCE_TOPICS``). Only datasets built as a shift of a source task have one.
    """
    if dataset == "grammar-text":
        from bouquet.tasks.text import SOURCE_TOPICS, TEXT_SEED, grammar_corpus

        corpus = grammar_corpus(SOURCE_TOPICS, seed=TEXT_SEED + 1)
        return corpus["x"], corpus["label"]
    if dataset not in ("digits-shift", "digits-domains"):
        raise ValueError(
            f"dataset {dataset!r} has no source task to pretrain on; "
            "pretrained='source' works with dataset='digits-shift', "
            "'digits-domains' or 'grammar-text' "
            "(or give pretrained=<path> to a checkpoint)"
        )
    source, _ = _digits_halves()
    return source["x"].reshape(-1, 1, 8, 8), source["label"]


def _mnist1d_arrays() -> dict:
    """The package's standard MNIST-1D (4000 train, 1000 test), generated here.

    Generation takes seconds, so the arrays are cached. The generator seeds
    numpy's and Python's global RNGs; their states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    path = cache_dir() / f"mnist1d-raw-{cache_key(vars(args))}.pt"
    cached = load_cached(path)
    if cached is not None:
        return {k: v.numpy() for k, v in cached.items()}
    import torch

    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        data = make_dataset(args)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
    save_atomic({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    return arrays


def _mnist1d() -> Source:
    a = _mnist1d_arrays()
    arrays = {"x": a["x"].astype(np.float32), "label": a["y"].astype(np.int64)}
    central = in_memory_dataset(
        x=a["x_test"].astype(np.float32), label=a["y_test"].astype(np.int64)
    )
    return Source(
        in_memory_dataset(**arrays), central, "x", "label", (1, 40), arrays=arrays
    )


TABULAR_SEED = 2302_03884
"""Fixes ``tabular`` (one dataset for every run seed, like a real table)."""
TABULAR_ROWS = 40_000
TABULAR_FEATURES = 20


def _tabular() -> Source:
    """DIFF2's reproduction table: scikit-learn's ``make_classification``.

    40,000 rows of 20 standardised features (10 informative, 5 redundant),
    2 classes of 3 Gaussian clusters each (not linearly separable), 1% of
    labels flipped; generated offline from a fixed seed. The central test is
    held out of the pool (``test-fraction``).
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=TABULAR_ROWS,
        n_features=TABULAR_FEATURES,
        n_informative=10,
        n_redundant=5,
        n_classes=2,
        n_clusters_per_class=3,
        flip_y=0.01,
        random_state=TABULAR_SEED % 2**32,
    )
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    arrays = {"x": x.astype(np.float32), "label": y.astype(np.int64)}
    return Source(
        in_memory_dataset(**arrays),
        None,
        "x",
        "label",
        (TABULAR_FEATURES,),
        arrays=arrays,
    )


def _synthetic(spec: DataSpec) -> Source:
    from bouquet.tasks.synthetic import make_synthetic

    x, y, client = make_synthetic(
        spec.num_partitions, spec.synthetic_alpha, spec.synthetic_beta, spec.seed
    )
    arrays = {"x": x, "label": y, "client": client}
    pool = in_memory_dataset(**arrays)
    return Source(pool, None, "x", "label", (60,), natural_id="client", arrays=arrays)


def _sbm_graph(spec: DataSpec) -> Source:
    from bouquet.tasks.graph import INPUT_SHAPE, sbm_rows

    x, y, community = sbm_rows(spec.num_partitions, spec.dirichlet_alpha, spec.seed)
    arrays = {"x": x, "label": y, "community": community}
    pool = in_memory_dataset(**arrays)
    return Source(
        pool, None, "x", "label", INPUT_SHAPE, natural_id="community", arrays=arrays
    )


def _hub(name: str) -> Source:
    from flwr_datasets import FederatedDataset

    entry = HUB_DATASETS[name]
    # FederatedDataset only downloads and caches the splits here; the common
    # pipeline shuffles and partitions them like any other source.
    hub = FederatedDataset(
        dataset=entry.hub_id,
        subset=entry.subset,
        partitioners={},
        shuffle=False,
        **entry.load_kwargs,
    )
    try:
        pool = hub.load_split("train")
        central = hub.load_split(entry.test_split) if entry.test_split else None
    except Exception as exc:
        raise RuntimeError(
            f"Could not load dataset {name!r} ({entry.hub_id}) from the Hugging "
            f"Face Hub: {exc}. It needs network access the first time (later runs "
            "read the Hugging Face cache); offline, set data-path to a local copy "
            "(a parquet file or a datasets.save_to_disk folder)."
        ) from exc
    return Source(
        pool,
        central,
        entry.image,
        entry.label,
        entry.input_shape,
        natural_id=entry.natural_id,
        image=True,
        mean=entry.mean,
        std=entry.std,
    )


def _read_local(path: str) -> tuple[Dataset, Dataset | None]:
    import datasets

    root = Path(path).expanduser()
    if root.is_file():
        if root.suffix != ".parquet":
            raise ValueError(f"data-path {path!r}: expected a .parquet file")
        import pyarrow.parquet as pq

        # In memory, restoring the features stored in the schema; nothing is
        # written next to the user's file or into the Hugging Face cache.
        return datasets.Dataset(pq.read_table(root)), None
    if (
        not (root / "dataset_dict.json").exists()
        and not (root / "dataset_info.json").exists()
    ):
        raise ValueError(
            f"data-path {path!r}: expected a folder written by save_to_disk"
        )
    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.Dataset):
        return loaded, None
    pool_split = "train" if "train" in loaded else next(iter(loaded))
    return loaded[pool_split], loaded["test"] if "test" in loaded else None


def _local(path: str) -> Source:
    from datasets import Image

    pool, central = _read_local(path)
    if "label" not in pool.column_names:
        raise ValueError(f"data-path {path!r}: no 'label' column ({pool.column_names})")
    candidates = [c for c in _FEATURE_COLUMNS if c in pool.column_names]
    if not candidates:
        raise ValueError(
            f"data-path {path!r}: no feature column; expected one of "
            f"{_FEATURE_COLUMNS}, found {pool.column_names}"
        )
    feature = candidates[0]
    image = isinstance(pool.features[feature], Image)
    source = Source(pool, central, feature, "label", (), image=image)
    first = np.asarray(pool.with_format("numpy", columns=[feature])[0][feature])
    if image:
        channels = 1 if first.ndim == 2 else first.shape[2]
        source.input_shape = (channels, *first.shape[:2])
        source.mean = (_LOCAL_IMAGE_STATS[0],) * channels
        source.std = (_LOCAL_IMAGE_STATS[1],) * channels
    else:
        source.input_shape = tuple(int(d) for d in first.shape)
    return source


def open_source(spec: DataSpec) -> Source:
    """The ``Source`` for ``spec`` (``data_path`` first, then the named dataset)."""
    if spec.data_path:
        return _local(spec.data_path)
    match spec.dataset:
        case "digits":
            return _digits()
        case "digits-shift":
            return _digits_shift()
        case "digits-domains":
            return _digits_domains()
        case "mnist1d":
            return _mnist1d()
        case "synthetic":
            return _synthetic(spec)
        case "tabular":
            return _tabular()
        case "grammar-text":
            return _grammar_text()
        case "sbm-graph":
            return _sbm_graph(spec)
    return _hub(spec.dataset)


def local_dataset_info(spec: DataSpec) -> DatasetInfo:
    """Shape and class count of a ``data_path`` dataset, cached on disk.

    The class count is the label feature's when it is a ``ClassLabel`` (use one
    so that every node agrees on the model), else the largest label + 1.
    """
    fingerprint = path_fingerprint(spec.data_path)
    key = cache_key({"info": spec.data_path, "files": fingerprint})
    path = cache_dir() / f"local-info-{key}.pt"
    cached = load_cached(path)
    if cached is None:
        from datasets import ClassLabel

        source = _local(spec.data_path)
        label = source.pool.features["label"]
        if isinstance(label, ClassLabel):
            num_classes = label.num_classes
        else:
            splits = [s for s in (source.pool, source.central) if s is not None]
            num_classes = 1 + max(
                int(np.max(s.with_format("numpy", columns=["label"])[:]["label"]))
                for s in splits
            )
        cached = {"input_shape": list(source.input_shape), "num_classes": num_classes}
        save_atomic(cached, path)
    name = Path(spec.data_path).name
    return DatasetInfo(name, tuple(cached["input_shape"]), cached["num_classes"])
