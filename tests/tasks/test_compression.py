"""Compressors: payloads as declared, declarations checked by Monte Carlo, real bytes.

Each compressor declares ``unbiased`` and ``omega`` (``E||C(x) - x||^2 <=
omega ||x||^2``) or ``alpha`` (``E||C(x) - x||^2 <= (1 - alpha) ||x||^2``);
these tests estimate the expectations over many seeds on random vectors and
check the declaration, where it is attained, that it is tight. The wire test
serialises payloads with Flower's own protobuf serde and checks that the
message shrinks by the declared ratio.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.serde import array_record_to_proto, message_to_proto

from bouquet.simulations.inprocess import ensure_task_identity
from bouquet.tasks import compression as cz

D = 40
DRAWS = 4000
COMPRESSORS = {
    "identity": cz.Identity(),
    "topk": cz.TopK(5),
    "randk": cz.RandK(5),
    "sign": cz.ScaledSign(),
    "qsgd": cz.QSGD(4),
    "quantize": cz.Quantize(4),
    "randk-scaled": cz.Scaled(cz.RandK(5)),
    "qsgd-scaled": cz.Scaled(cz.QSGD(4)),
    "logbyte": cz.LogByte(),
    "fedzip": cz.FedZip(0.2),
}
DETERMINISTIC = ("identity", "topk", "sign", "quantize", "logbyte", "fedzip")


def _vectors(d: int = D) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.standard_normal(d),
        rng.standard_t(2, d),  # heavy tails: a few large coordinates
        np.r_[10.0, np.zeros(d - 1)],  # one-hot
        np.ones(d),
    ]


def _samples(c: cz.Compressor, x: np.ndarray, draws: int) -> np.ndarray:
    return np.stack(
        [c.decode(c.encode(x, np.random.default_rng(s)), x.size) for s in range(draws)]
    )


@pytest.mark.parametrize("name", COMPRESSORS)
def test_payload_has_the_declared_shapes_and_small_dtypes(name):
    c = COMPRESSORS[name]
    x = _vectors()[0]
    payload = c.encode(x, np.random.default_rng(1))
    spec = c.spec(D)
    assert list(payload) == list(spec)
    for key, (shape, dtype) in spec.items():
        assert payload[key].shape == shape and str(payload[key].dtype) == dtype
        assert payload[key].dtype != np.float64
    assert c.problem(payload, D) is None
    decoded = c.decode(payload, D)
    assert decoded.shape == (D,) and decoded.dtype == np.float64


@pytest.mark.parametrize("name", COMPRESSORS)
def test_declared_constants_hold_by_monte_carlo(name):
    c = COMPRESSORS[name]
    omega, alpha = c.omega(D), c.alpha(D)
    assert (omega is not None) == c.unbiased
    assert omega is not None or alpha is not None
    for x in _vectors():
        samples = _samples(c, x, 50 if name in DETERMINISTIC else DRAWS)
        errors = ((samples - x) ** 2).sum(axis=1)
        norm2 = float(x @ x)
        if c.unbiased:
            # The mean is within 5 standard errors of x, coordinate-wise.
            se = samples.std(axis=0) / np.sqrt(len(samples)) + 1e-9
            assert np.all(np.abs(samples.mean(axis=0) - x) <= 5 * se + 1e-6)
            assert errors.mean() <= omega * norm2 * 1.05 + 1e-9
        if alpha is not None:
            assert errors.mean() <= (1 - alpha) * norm2 * 1.05 + 1e-9
            if name in DETERMINISTIC:
                # Deterministic: the bound holds for every draw, not only on average.
                assert errors.max() <= (1 - alpha) * norm2 * (1 + 1e-6) + 1e-9


@pytest.mark.parametrize(
    ("c", "x", "expected"),
    [
        (cz.TopK(5), np.ones(D), 1 - 5 / D),  # equal magnitudes: alpha is tight
        (cz.Scaled(cz.RandK(5)), np.ones(D), 1 - 5 / D),  # E = (1 - k/d) ||x||^2
        (cz.RandK(5), np.ones(D), D / 5 - 1),  # omega = d/k - 1, attained
        (cz.ScaledSign(), np.r_[1.0, np.zeros(D - 1)], 1 - 1 / D),  # one-hot
    ],
)
def test_declarations_are_tight_where_attained(c, x, expected):
    errors = ((_samples(c, x, DRAWS) - x) ** 2).sum(axis=1)
    np.testing.assert_allclose(errors.mean() / (x @ x), expected, rtol=0.05)


def test_topk_keeps_the_largest_magnitudes_in_index_order():
    x = np.array([0.1, -3.0, 0.2, 2.0, -0.5])
    payload = cz.TopK(2).encode(x, np.random.default_rng(0))
    np.testing.assert_array_equal(payload["indices"], [1, 3])
    np.testing.assert_array_equal(payload["values"], np.float32([-3.0, 2.0]))
    np.testing.assert_array_equal(
        cz.TopK(2).decode(payload, 5), [0.0, -3.0, 0.0, 2.0, 0.0]
    )


def test_sign_and_quantize_on_hand_made_vectors():
    x = np.array([1.0, -3.0, 0.0, 4.0])
    sign = cz.ScaledSign()
    np.testing.assert_allclose(
        sign.decode(sign.encode(x, None), 4), [2.0, -2.0, 2.0, 2.0]
    )
    q = cz.Quantize(2)  # levels of 4 / 2 = 2: round(x / 2)
    payload = q.encode(x, None)
    np.testing.assert_array_equal(payload["codes"], np.int8([1, -2, 0, 2]))
    np.testing.assert_allclose(q.decode(payload, 4), [2.0, -4.0, 0.0, 4.0])


@pytest.mark.parametrize(
    ("c", "change", "reason"),
    [
        (cz.TopK(3), {"indices": np.int32([0, 5, 40])}, "outside"),
        (cz.TopK(3), {"indices": np.int32([-1, 5, 7])}, "outside"),
        (cz.TopK(3), {"indices": np.int32([5, 5, 7])}, "increasing"),
        (cz.RandK(3), {"indices": np.int32([7, 5, 9])}, "increasing"),
        (cz.QSGD(4), {"codes": np.full(D, 5, np.int8)}, "code outside"),
        (cz.Quantize(4), {"codes": np.full(D, -128, np.int8)}, "code outside"),
        (cz.QSGD(4), {"scale": np.float32([-1.0])}, "negative"),
        (cz.ScaledSign(), {"scale": np.float32([-1.0])}, "negative"),
    ],
)
def test_payloads_that_cannot_be_decoded_are_named(c, change, reason):
    payload = {**c.encode(np.arange(D, dtype=float), np.random.default_rng(0))}
    payload.update(change)
    assert reason in c.problem(payload, D)


def _record_bytes(arrays: dict[str, np.ndarray]) -> int:
    return array_record_to_proto(
        ArrayRecord({k: Array(v) for k, v in arrays.items()})
    ).ByteSize()


def _message_bytes(arrays: dict[str, np.ndarray]) -> int:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord({"client-routine": "ef21"}),
        }
    )
    ensure_task_identity()  # a Message needs a run id outside Flower's apps
    msg = Message(content, dst_node_id=1, message_type="train")
    return message_to_proto(msg).ByteSize()


@pytest.mark.parametrize(
    ("c", "ratio"),
    [
        (cz.TopK(1000), 50.0),  # 4d / (k (4 + 4))
        (cz.RandK(1000), 50.0),
        (cz.ScaledSign(), 32.0),  # 32 bits -> 1 bit
        (cz.QSGD(16), 4.0),  # float32 -> int8
        (cz.Quantize(16), 4.0),
        (cz.LogByte(), 4.0),
        # K = 20,000 positions of 17 bits and 2-bit codes, two float32 centroids
        (cz.FedZip(0.2), 32 * 100_000 / (20_000 * 19 + 64)),
        (cz.Identity(), 1.0),
    ],
)
def test_serialised_message_shrinks_by_the_declared_ratio(c, ratio):
    d = 100_000
    x = np.random.default_rng(0).standard_normal(d)
    dense = {"w": x.astype(np.float32)}
    payload = c.encode(x, np.random.default_rng(1))
    assert c.ratio(d) == pytest.approx(ratio, rel=1e-3)
    for size in (_record_bytes, _message_bytes):
        measured = size(dense) / size(payload)
        assert measured == pytest.approx(c.ratio(d), rel=0.10), size.__name__


def test_indices_widen_to_int64_only_past_int32():
    assert cz.index_dtype(2**31 - 1) == "int32"
    assert cz.index_dtype(2**31) == "int64"


def test_flatten_and_unflatten_follow_the_float_entries_in_order():
    arrays = {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3),
        "count": np.array(3, dtype=np.int64),
        "b": np.array([7.0], dtype=np.float32),
        "own": np.zeros(2, np.float32),
    }
    keys = cz.compressed_keys(arrays, skip=("own",))
    assert keys == ["a", "b"]
    flat = cz.flatten(arrays, keys)
    np.testing.assert_array_equal(flat, [0, 1, 2, 3, 4, 5, 7])
    back = cz.unflatten(flat, arrays, keys)
    np.testing.assert_array_equal(back["a"], arrays["a"])
    np.testing.assert_array_equal(back["b"], arrays["b"])


def test_make_compressor_and_contractive():
    assert cz.make_compressor("topk", k=3) == cz.TopK(3)
    assert cz.contractive(cz.TopK(3)) == cz.TopK(3)
    assert cz.contractive(cz.RandK(3)) == cz.Scaled(cz.RandK(3))
    with pytest.raises(ValueError, match="not one of"):
        cz.make_compressor("gzip")
    with pytest.raises(ValueError, match="levels"):
        cz.make_compressor("qsgd", levels=128)


def test_log_byte_on_hand_made_values():
    c = cz.LogByte()
    x = np.array([0.0, 1.0, -1.0, np.e**4, 1e6, -1e-6, np.exp(-2.0)])
    payload = c.encode(x, np.random.default_rng(0))
    # 1.0: m = round(16 (0 - 4)) + 127 = 63; the sign is bit 7; e^4 is code 127.
    np.testing.assert_array_equal(
        payload["codes"], [0, 63, 63 | 128, 127, 127, 128, 127 - 96]
    )
    np.testing.assert_allclose(
        c.decode(payload, x.size), [0, 1, -1, np.e**4, np.e**4, 0, np.exp(-2.0)]
    )


def test_log_byte_relative_error_inside_its_range():
    c = cz.LogByte()
    rng = np.random.default_rng(3)
    magnitudes = np.exp(rng.uniform(np.log(c.smallest()), c.top, 20_000))
    x = magnitudes * rng.choice([-1.0, 1.0], magnitudes.size)
    decoded = c.decode(c.encode(x, rng), x.size)
    relative = np.abs(decoded - x) / np.abs(x)
    assert relative.max() <= c.relative_error() * (1 + 1e-9)
    assert relative.max() >= 0.9 * c.relative_error()  # the bound is attained
    assert np.all(np.sign(decoded) == np.sign(x))


def test_fedzip_on_a_hand_made_vector():
    x = np.array([0.0, 5.0, -0.1, 4.0, -3.0, 0.2, 6.0, -2.0, 0.05, 0.0])
    c = cz.FedZip(z=0.5, clusters=3, iterations=4)  # K = 5 of d = 10
    payload = c.encode(x, np.random.default_rng(0))
    # 4-bit positions 1, 3, 4, 6, 7; clusters: {-3, -2} -> -2.5, {5, 4, 6} -> 5.
    np.testing.assert_array_equal(
        cz.unpack_bits(payload["positions"], 5, 4), [1, 3, 4, 6, 7]
    )
    np.testing.assert_allclose(payload["centroids"], [-2.5, 5.0])
    np.testing.assert_allclose(
        c.decode(payload, 10), [0, 5, 0, 5, -2.5, 0, 5, -2.5, 0, 0]
    )
    assert c.spec(10) == {
        "positions": ((3,), "uint8"),  # 5 x 4 bits
        "codes": ((2,), "uint8"),  # 5 x 2 bits
        "centroids": ((2,), "float32"),
    }
    bad = dict(payload, positions=cz.pack_bits(np.array([1, 3, 3, 6, 7]), 4))
    assert "increasing" in c.problem(bad, 10)
    bad = dict(payload, codes=cz.pack_bits(np.array([3, 1, 1, 1, 1]), 2))
    assert "cluster code" in c.problem(bad, 10)


def test_fedzip_keeps_a_small_entry_as_zero_when_zero_is_nearest():
    x = np.array([10.0, 9.0, 0.5, -8.0, 0.0, 0.0, 0.0, 0.0])
    c = cz.FedZip(z=0.5, clusters=3)  # keeps 10, 9, -8 and 0.5
    decoded = c.decode(c.encode(x, np.random.default_rng(0)), 8)
    np.testing.assert_allclose(decoded, [9.5, 9.5, 0, -8, 0, 0, 0, 0])


def test_pack_bits_round_trips():
    values = np.random.default_rng(0).integers(0, 2**17, 1000)
    packed = cz.pack_bits(values, 17)
    assert packed.dtype == np.uint8 and packed.size == (1000 * 17 + 7) // 8
    np.testing.assert_array_equal(cz.unpack_bits(packed, 1000, 17), values)


def test_huffman_gives_the_shortest_code_to_the_most_frequent_symbol():
    assert cz.huffman_lengths(np.array([80, 10, 10])) == [1, 2, 2]
    assert cz.huffman_lengths(np.array([5, 0, 0])) == [1, 0, 0]
    assert cz.huffman_lengths(np.array([1, 1, 2, 4])) == [3, 3, 2, 1]
    c = cz.FedZip(0.2)
    x = np.random.default_rng(0).standard_normal(10_000)
    payload = c.encode(x, np.random.default_rng(0))
    # 8,000 zeros at 1 bit, 2,000 kept entries at 1 or 2 bits, two centroids.
    assert 8000 / 8 + 2000 / 8 + 8 < c.huffman_bytes(payload, 10_000) <= 12000 / 8 + 8


def test_topk_rows_is_the_payload_round_trip_of_every_row():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 9))
    x[0, :3] = [2.0, -2.0, 2.0]  # a tie: broken by position as the payload does
    codec = cz.TopK(2)
    expected = [codec.decode(codec.encode(row, rng), 9) for row in x]
    np.testing.assert_array_equal(cz.topk_rows(x, 2), expected)
