"""Writing Flower Arrays without np.save (tasks/arrays.py): the same bytes."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from bouquet.tasks.arrays import array_record, npy_view, to_array

VALUES = [
    np.zeros((3, 4), np.float32),
    np.arange(5),
    np.array(3.0),
    np.array([True, False]),
    np.zeros((0, 3), np.float16),
    np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float64),
    np.arange(12, dtype=np.int8).reshape(3, 4)[:, ::2],  # not contiguous
    np.asfortranarray(np.random.default_rng(1).normal(size=(3, 2))),
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_to_array_writes_what_flower_writes(value: np.ndarray) -> None:
    mine = to_array(value)
    flowers = Array(np.ascontiguousarray(value) if value.ndim else value)
    assert (mine.dtype, mine.shape, mine.stype) == (
        flowers.dtype,
        flowers.shape,
        flowers.stype,
    )
    assert mine.data == flowers.data
    np.testing.assert_array_equal(mine.numpy(), value)
    # Twice: the second write uses the remembered header.
    assert to_array(value).data == flowers.data


def test_tensors_and_records() -> None:
    state = torch.nn.Linear(3, 2).state_dict()
    mine, flowers = array_record(state), ArrayRecord(state)
    assert list(mine) == list(flowers)
    for key in mine:
        assert mine[key].data == flowers[key].data
        np.testing.assert_array_equal(npy_view(mine[key].data), state[key].numpy())


def test_same_shape_other_dtype_gets_its_own_header() -> None:
    a, b = to_array(np.ones(4, np.float32)), to_array(np.ones(4, np.float64))
    assert a.numpy().dtype == np.float32 and b.numpy().dtype == np.float64


def test_object_arrays_are_refused() -> None:
    with pytest.raises(ValueError, match="Object arrays"):
        to_array(np.array([{"a": 1}], dtype=object))
