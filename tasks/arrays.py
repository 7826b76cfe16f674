"""Flower's ``Array`` bytes, read without copying and written without ``np.save``.

A message's arrays are ``.npy`` bytes. ``Array.numpy()`` parses and copies
them; the server reads every reply (100 replies of a ResNet-18 are 4.4 GB of
copies) and the client loads the global model on every call, so both read
read-only views of the bytes instead. Writing, ``np.save`` formats the same
header again for every array of every message; :func:`to_array` formats it
once per dtype and shape (the bytes are the same).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from io import BytesIO

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType
from numpy.lib import format as npy_format


def npy_view(data: bytes) -> np.ndarray:
    """The values of ``.npy`` bytes as a read-only view of them (no copy).

    NumPy format versions 1 and 2 only, no pickled objects, and exactly as
    many bytes as the header's shape and dtype need: the header is read
    before any value, so a forged size allocates nothing.

    Raises
    ------
    ValueError
        If ``data`` is not such an array.

    """
    shape, fortran, dtype, start = _header(data)
    size = math.prod(shape)
    if len(data) - start != size * dtype.itemsize:
        raise ValueError(
            f"{len(data) - start} bytes of values for "
            f"{dtype}{list(shape)} ({size * dtype.itemsize} expected)"
        )
    flat = np.frombuffer(data, dtype=dtype, count=size, offset=start)
    return flat.reshape(shape, order="F" if fortran else "C")


_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}
"""Parsed headers by their exact bytes: NumPy's parser evaluates the header's
text (about 0.2 ms), and every message repeats the same few headers."""
MAX_HEADERS = 4096


def _header(data: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """``(shape, fortran_order, dtype, offset of the values)`` of ``.npy`` bytes."""
    length = {1: 2, 2: 4}.get(data[6] if len(data) > 6 else 0, 0)
    end = 8 + length
    if length and data[:6] == b"\x93NUMPY" and len(data) >= end:
        end += int.from_bytes(data[8 : 8 + length], "little")
        if (known := _HEADERS.get(data[:end])) is not None:
            return known
    buffer = BytesIO(data)  # shares the bytes
    try:
        major, _ = npy_format.read_magic(buffer)
        header = {
            1: npy_format.read_array_header_1_0,
            2: npy_format.read_array_header_2_0,
        }.get(major)
        if header is None:
            raise ValueError(f"unsupported .npy version {major}")
        shape, fortran, dtype = header(buffer)
    except ValueError:
        raise
    except Exception as err:  # garbage: EOFError, SyntaxError, ...
        raise ValueError(f"not .npy ({type(err).__name__})") from err
    if dtype.hasobject:
        raise ValueError("holds Python objects")
    parsed = (tuple(shape), bool(fortran), dtype, buffer.tell())
    # Bounded: a client may send many distinct (legal) headers.
    if buffer.tell() == end <= 1024 and len(_HEADERS) < MAX_HEADERS:
        _HEADERS[data[:end]] = parsed
    return parsed


def array_view(array: Array) -> np.ndarray:
    """An Array's values as a read-only view of its serialized bytes.

    The view shares the bytes (:func:`npy_view`); anything else falls back to
    ``numpy()`` (a copy).
    """
    if array.stype == SType.NUMPY and isinstance(array.data, bytes):
        try:
            return npy_view(array.data)
        except ValueError:
            pass
    return array.numpy()


_NPY_PREFIXES: dict[tuple[str, tuple[int, ...]], bytes] = {}
"""``np.save``'s header by (dtype, shape): formatting it is most of the cost
of serialising a small array, and a model repeats the same few."""


def npy_bytes(value: np.ndarray) -> bytes:
    """What ``np.save(value, allow_pickle=False)`` writes, for C-ordered values.

    The header is formatted once per dtype and shape; the values are one
    copy (``tobytes``). Fortran-ordered input is written in C order.
    """
    if not value.flags.c_contiguous:  # (0-d arrays always are)
        value = np.ascontiguousarray(value)
    if value.dtype.hasobject:
        raise ValueError("Object arrays cannot be sent (no pickled values)")
    key = (value.dtype.str, value.shape)
    header = _NPY_PREFIXES.get(key)
    if header is None:
        header = _header_of(value)
        if len(_NPY_PREFIXES) < MAX_HEADERS:
            _NPY_PREFIXES[key] = header
    return header + value.tobytes()


def _header_of(value: np.ndarray) -> bytes:
    """The ``.npy`` header ``np.save`` writes for ``value``."""
    buffer = BytesIO()
    np.save(buffer, value, allow_pickle=False)
    data = buffer.getvalue()
    return data[: len(data) - value.nbytes]


_DTYPE_NAMES: dict[np.dtype, str] = {}
"""``str(dtype)`` by dtype (NumPy builds the name on every call)."""


def to_array(value: np.ndarray | object) -> Array:
    """A Flower ``Array`` of a numpy array or tensor.

    The same bytes as ``Array(value)``, serialised by :func:`npy_bytes`.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()  # type: ignore[union-attr]
    value = np.asarray(value)
    dtype = _DTYPE_NAMES.get(value.dtype)
    if dtype is None:
        dtype = _DTYPE_NAMES.setdefault(value.dtype, str(value.dtype))
    return Array(
        dtype=dtype,
        shape=tuple(int(n) for n in value.shape),
        stype=SType.NUMPY,
        data=npy_bytes(value),
    )


def array_record(arrays: Mapping[str, np.ndarray | object]) -> ArrayRecord:
    """An ``ArrayRecord`` of numpy arrays or tensors (:func:`to_array`).

    Filled item by item: ``ArrayRecord(dict_of_arrays)`` copies every
    ``Array`` it is given.
    """
    record = ArrayRecord()
    for name, value in arrays.items():
        record[name] = to_array(value)
    return record
