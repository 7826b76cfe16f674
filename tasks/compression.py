"""Compressors: a client encodes its update, the server decodes the same bytes.

Shared by both halves (``docs/architecture.md``, "Shape of the repository":
``tasks/`` is what both sides import), so a client encodes with exactly the
code the server decodes with. A compressor maps a flat float vector ``x`` of
length ``d`` to a *payload*: a few NumPy arrays of small dtypes (int32/int64
indices, float32 values, int8 codes, sign bits packed eight to a byte with
``np.packbits``) that go into an ``ArrayRecord`` as they are, so the
serialised Flower message is smaller (issue #22: never a dequantised float32
array that only pretends). ``decode`` turns a payload back into ``C(x)`` in
float64; both halves call it, so a client's error-feedback state equals what
the server added.

Every compressor declares its payload's shapes and dtypes for a given ``d``
(``spec``: the server checks replies against it before reading them), whether
it is unbiased, and one of the two standard constants (checked by Monte Carlo
in ``tests/tasks/test_compression.py``):

- unbiased, variance ``omega``: ``E C(x) = x``, ``E||C(x) - x||^2 <= omega ||x||^2``;
- contractive, ``alpha``: ``E||C(x) - x||^2 <= (1 - alpha) ||x||^2``.

An unbiased ``C`` scaled by ``1 / (omega + 1)`` is contractive with
``alpha = 1 / (omega + 1)`` (:class:`Scaled`, :func:`contractive`); error
feedback (EF21) needs a contractive one.

References: Top-k and Rand-k (Stich, Cordonnier, Jaggi, "Sparsified SGD with
Memory", NeurIPS 2018, https://arxiv.org/abs/1809.07599); scaled sign
(Karimireddy et al., "Error Feedback Fixes SignSGD", ICML 2019,
https://arxiv.org/abs/1901.09847); QSGD (Alistarh et al., "QSGD:
Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS
2017, https://arxiv.org/abs/1610.02132, Lemma 3.1 for omega); the
contractive / unbiased classes as in Richtarik, Sokolov, Fatkhullin, "EF21",
NeurIPS 2021, https://arxiv.org/abs/2106.05203.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import numpy as np

from bouquet.tasks.wire import derive_seed

Payload = dict[str, np.ndarray]
PayloadSpec = dict[str, tuple[tuple[int, ...], str]]
"""Payload array name -> (shape, dtype string), the yardstick of a reply."""

NAMES = ("identity", "topk", "randk", "sign", "qsgd", "quantize", "fedzip")
MAX_LEVELS = 127
"""Most quantisation levels: codes in ``[-s, s]`` fit int8."""


def index_dtype(d: int) -> str:
    """int32 while every index of a length-``d`` vector fits, else int64."""
    return "int32" if d <= np.iinfo(np.int32).max else "int64"


@dataclass(frozen=True)
class Compressor:
    """Base: ``encode(x, rng) -> payload``, ``decode(payload, d) -> C(x)``."""

    unbiased = False

    def spec(self, d: int) -> PayloadSpec:
        """Shapes and dtypes of the payload of a length-``d`` vector."""
        raise NotImplementedError

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        """The payload of the flat vector ``x`` (``rng``: randomised ones)."""
        raise NotImplementedError

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        """``C(x)`` (float64, length ``d``) of a payload that passed :meth:`problem`."""
        raise NotImplementedError

    def problem(self, payload: Mapping[str, np.ndarray], d: int) -> str | None:
        """Why a payload shaped as :meth:`spec` cannot be decoded, or None."""
        return None

    def omega(self, d: int) -> float | None:
        """Variance parameter of an unbiased compressor (None: biased)."""
        return None

    def alpha(self, d: int) -> float | None:
        """Contraction parameter (None: not contractive in general)."""
        return None

    def payload_bytes(self, d: int) -> int:
        """Bytes of the payload's values (what the wire carries, headers aside)."""
        return sum(
            math.prod(shape) * np.dtype(dtype).itemsize
            for shape, dtype in self.spec(d).values()
        )

    def ratio(self, d: int) -> float:
        """Dense float32 bytes over payload bytes: the declared compression."""
        return 4 * d / self.payload_bytes(d)


@dataclass(frozen=True)
class Identity(Compressor):
    """No compression: the float32 values."""

    unbiased = True

    def spec(self, d: int) -> PayloadSpec:
        return {"values": ((d,), "float32")}

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        return {"values": np.asarray(x, dtype=np.float32).reshape(-1)}

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        return payload["values"].astype(np.float64)

    def omega(self, d: int) -> float:
        return 0.0

    def alpha(self, d: int) -> float:
        return 1.0


def _sparse_problem(payload: Mapping[str, np.ndarray], d: int) -> str | None:
    idx = payload["indices"]
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= d):
        return f"has an index outside [0, {d})"
    if idx.size > 1 and np.any(np.diff(idx) <= 0):
        return "indices are not strictly increasing"
    return None


def _scatter(payload: Mapping[str, np.ndarray], d: int, scale: float) -> np.ndarray:
    out = np.zeros(d, dtype=np.float64)
    out[payload["indices"]] = payload["values"].astype(np.float64) * scale
    return out


@dataclass(frozen=True)
class TopK(Compressor):
    """The ``k`` largest magnitudes (indices, float32 values); ``alpha = k/d``."""

    k: int = 1

    def size(self, d: int) -> int:
        """Coordinates kept: ``k``, at most ``d``."""
        return min(max(1, int(self.k)), d)

    def spec(self, d: int) -> PayloadSpec:
        k = self.size(d)
        return {"indices": ((k,), index_dtype(d)), "values": ((k,), "float32")}

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        x = np.asarray(x).reshape(-1)
        k = self.size(x.size)
        # Ties broken by position (a stable sort): deterministic on every node.
        chosen = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
        return {
            "indices": chosen.astype(index_dtype(x.size)),
            "values": x[chosen].astype(np.float32),
        }

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        return _scatter(payload, d, 1.0)

    def problem(self, payload: Mapping[str, np.ndarray], d: int) -> str | None:
        return _sparse_problem(payload, d)

    def alpha(self, d: int) -> float:
        return self.size(d) / d


def topk_rows(x: np.ndarray, k: int) -> np.ndarray:
    """``TopK(k)``'s ``decode(encode(row))`` of every row of ``x`` at once.

    For simulations of many nodes in one array (the batched runs of
    ``simulations/ef21w_logreg.py`` and ``econtrol_lstsq.py``): the same
    coordinates (ties by position) and float32 values as the payload; float64.
    """
    x = np.asarray(x, np.float64)
    size = TopK(k).size(x.shape[1])
    chosen = np.argsort(-np.abs(x), axis=1, kind="stable")[:, :size]
    out = np.zeros_like(x)
    picked = np.take_along_axis(x, chosen, axis=1).astype(np.float32)
    np.put_along_axis(out, chosen, picked.astype(np.float64), axis=1)
    return out


@dataclass(frozen=True)
class RandK(TopK):
    """``k`` coordinates drawn uniformly, scaled by ``d/k``.

    Unbiased, ``omega = d/k - 1``.
    """

    unbiased = True

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        x = np.asarray(x).reshape(-1)
        chosen = np.sort(rng.choice(x.size, self.size(x.size), replace=False))
        return {
            "indices": chosen.astype(index_dtype(x.size)),
            "values": x[chosen].astype(np.float32),
        }

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        return _scatter(payload, d, d / self.size(d))

    def omega(self, d: int) -> float:
        return d / self.size(d) - 1.0

    def alpha(self, d: int) -> None:
        return None


@dataclass(frozen=True)
class ScaledSign(Compressor):
    """``(||x||_1 / d) sign(x)``: packed sign bits and one float32 scale.

    ``||C(x) - x||^2 = ||x||^2 - ||x||_1^2 / d``, so ``alpha = 1/d`` in the
    worst case (a one-hot ``x``). A zero coordinate travels as ``+``.
    """

    def spec(self, d: int) -> PayloadSpec:
        return {"signs": ((math.ceil(d / 8),), "uint8"), "scale": ((1,), "float32")}

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        scale = np.abs(x).sum() / x.size
        return {
            "signs": np.packbits(x >= 0),
            "scale": np.array([scale], dtype=np.float32),
        }

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        bits = np.unpackbits(payload["signs"], count=d).astype(np.float64)
        return (2.0 * bits - 1.0) * float(payload["scale"][0])

    def problem(self, payload: Mapping[str, np.ndarray], d: int) -> str | None:
        return None if payload["scale"][0] >= 0 else "has a negative scale"

    def alpha(self, d: int) -> float:
        return 1.0 / d


@dataclass(frozen=True)
class _Levels(Compressor):
    """Codes in ``[-s, s]`` (int8) and one float32 scale: ``C(x) = scale code / s``."""

    levels: int = 16

    def spec(self, d: int) -> PayloadSpec:
        return {"codes": ((d,), "int8"), "scale": ((1,), "float32")}

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        scale = float(payload["scale"][0])
        return payload["codes"].astype(np.float64) * (scale / self.levels)

    def problem(self, payload: Mapping[str, np.ndarray], d: int) -> str | None:
        codes = payload["codes"]
        if codes.size and int(np.abs(codes.astype(np.int16)).max()) > self.levels:
            return f"has a code outside [-{self.levels}, {self.levels}]"
        return None if payload["scale"][0] >= 0 else "has a negative scale"

    def _codes(self, x: np.ndarray, scale: np.float32, draw: np.ndarray) -> Payload:
        s = self.levels
        ratio = np.abs(x) * (s / float(scale)) if scale > 0 else np.zeros_like(x)
        level = np.minimum(np.floor(ratio + draw), s)
        return {
            "codes": (np.sign(x) * level).astype(np.int8),
            "scale": np.array([scale], dtype=np.float32),
        }


@dataclass(frozen=True)
class QSGD(_Levels):
    """Stochastic rounding of ``s |x_i| / ||x||_2`` to ``{0..s}``, signs kept.

    Unbiased, ``omega = min(d / s^2, sqrt(d) / s)`` (Alistarh et al. 2017,
    Lemma 3.1).
    """

    unbiased = True

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        norm = np.float32(np.linalg.norm(x))
        return self._codes(x, norm, rng.random(x.size))

    def omega(self, d: int) -> float:
        s = self.levels
        return min(d / s**2, math.sqrt(d) / s)


@dataclass(frozen=True)
class Quantize(_Levels):
    """Deterministic rounding of ``s x_i / ||x||_inf`` to the nearest integer.

    Each error is at most ``min(|x_i|, ||x||_inf / 2s)`` and the largest
    coordinate is exact, so ``alpha = max(1/d, 1 - (d - 1) / 4s^2)``.
    """

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        top = np.float32(np.abs(x).max()) if x.size else np.float32(0)
        return self._codes(x, top, np.full(x.size, 0.5))

    def alpha(self, d: int) -> float:
        return max(1.0 / d, 1.0 - (d - 1) / (4.0 * self.levels**2))


@dataclass(frozen=True)
class Scaled(Compressor):
    """``C(x) / (omega + 1)`` of an unbiased ``C``: contractive.

    ``alpha = 1 / (omega + 1)``.

    The payload is the inner compressor's; only decoding scales.
    """

    inner: Compressor = Identity()

    def spec(self, d: int) -> PayloadSpec:
        return self.inner.spec(d)

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        return self.inner.encode(x, rng)

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        return self.inner.decode(payload, d) / (self.inner.omega(d) + 1.0)

    def problem(self, payload: Mapping[str, np.ndarray], d: int) -> str | None:
        return self.inner.problem(payload, d)

    def alpha(self, d: int) -> float:
        return 1.0 / (self.inner.omega(d) + 1.0)


def pack_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Non-negative integers below ``2^width``, ``width`` bits each, packed (uint8)."""
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    bits = (np.asarray(values, np.uint64)[:, None] >> shifts) & np.uint64(1)
    return np.packbits(bits.astype(np.uint8).reshape(-1))


def unpack_bits(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """The ``count`` integers :func:`pack_bits` packed (int64)."""
    bits = np.unpackbits(packed, count=count * width).reshape(count, width)
    return bits.astype(np.int64) @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def bit_width(n: int) -> int:
    """Bits of a fixed-width code for ``n`` symbols: ``ceil(log2 n)``, at least 1."""
    return max(1, math.ceil(math.log2(max(n, 2))))


@dataclass(frozen=True)
class FedZip(Compressor):
    """Top-z, then k-means with an exact-zero centroid, then position encoding.

    Malekijoo et al., "FEDZIP: A Compression Framework for Communication-
    Efficient Federated Learning", 2021, https://arxiv.org/abs/2102.01593.
    Keeps the ``K = ceil(z d)`` largest magnitudes; clusters them by Lloyd's
    k-means (``iterations`` rounds, an empty cluster keeping its centroid)
    with 0 as a fixed extra centroid, as the paper's k-means of the
    sparsified tensor, where the zeros form one cluster. The ``clusters - 1``
    free centroids start at evenly spaced quantiles of the kept values (one
    moved to the largest entry if none shares its sign), not evenly between
    their minimum and maximum as in the official code: on a heavy-tailed
    update that start sends almost every kept entry to the zero cluster
    (measured: FedAvg with it stayed at chance on the digits workload,
    ``docs/compression.md``); sends the ``K`` positions (``ceil(log2 d)`` bits each, the
    paper's position encoding at the spec's width), each position's cluster
    (``ceil(log2 clusters)`` bits) and the free centroids (float32).

    Biased. Every kept entry's cluster shares its sign and its centroid is
    the mean of its members (a centroid never changes sign, and one starts
    with the largest entry's sign), so the largest entry alone removes at least
    ``x_max^2 / K >= ||x||^2 / (K d)`` of the error:
    ``alpha = 1 / (K d)`` (a worst case; far better in practice).
    """

    z: float = 0.2
    clusters: int = 3
    iterations: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.z <= 1.0:
            raise ValueError(f"FedZip's z must be in (0, 1]; got {self.z}")
        if not 3 <= self.clusters <= 256:
            raise ValueError(f"FedZip needs 3 to 256 clusters; got {self.clusters}")

    def size(self, d: int) -> int:
        """Entries kept by top-z: ``ceil(z d)``, at least 1, at most ``d``."""
        return min(d, max(1, math.ceil(self.z * d)))

    def spec(self, d: int) -> PayloadSpec:
        k = self.size(d)
        return {
            "positions": ((math.ceil(k * bit_width(d) / 8),), "uint8"),
            "codes": ((math.ceil(k * bit_width(self.clusters) / 8),), "uint8"),
            "centroids": ((self.clusters - 1,), "float32"),
        }

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        d, k = x.size, self.size(x.size)
        chosen = np.sort(np.argsort(-np.abs(x), kind="stable")[:k])
        kept = x[chosen]
        free = np.quantile(
            kept, (np.arange(self.clusters - 1) + 0.5) / (self.clusters - 1)
        )
        top = kept[np.argmax(np.abs(kept))]
        if not np.any(np.sign(free) == np.sign(top)):  # keep alpha's argument
            free[np.argmin(np.abs(free - top))] = top
        codes = np.zeros(k, dtype=np.int64)
        for _ in range(max(1, self.iterations)):
            centroids = np.concatenate([[0.0], free])
            codes = np.argmin(np.abs(kept[:, None] - centroids[None, :]), axis=1)
            for j in range(self.clusters - 1):
                members = kept[codes == j + 1]
                if members.size:
                    free[j] = members.mean()
        return {
            "positions": pack_bits(chosen, bit_width(d)),
            "codes": pack_bits(codes, bit_width(self.clusters)),
            "centroids": free.astype(np.float32),
        }

    def _unpacked(
        self, payload: Mapping[str, np.ndarray], d: int
    ) -> tuple[np.ndarray, np.ndarray]:
        k = self.size(d)
        positions = unpack_bits(payload["positions"], k, bit_width(d))
        return positions, unpack_bits(payload["codes"], k, bit_width(self.clusters))

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        positions, codes = self._unpacked(payload, d)
        centroids = np.concatenate([[0.0], payload["centroids"].astype(np.float64)])
        out = np.zeros(d, dtype=np.float64)
        out[positions] = centroids[codes]
        return out

    def problem(self, payload: Mapping[str, np.ndarray], d: int) -> str | None:
        positions, codes = self._unpacked(payload, d)
        if positions.size and int(positions.max()) >= d:
            return f"has a position outside [0, {d})"
        if positions.size > 1 and np.any(np.diff(positions) <= 0):
            return "positions are not strictly increasing"
        if codes.size and int(codes.max()) >= self.clusters:
            return f"has a cluster code outside [0, {self.clusters})"
        return None

    def alpha(self, d: int) -> float:
        return 1.0 / (self.size(d) * d)

    def huffman_bytes(self, payload: Mapping[str, np.ndarray], d: int) -> int:
        """Bytes the paper's Huffman encoder (a) would send for this payload.

        A Huffman code of every entry's cluster (the implicit zeros of the
        dropped entries included, as the paper codes the whole sparsified
        tensor) plus the float32 centroids: what a variable-length reply
        could carry, reported for comparison (the wire carries the fixed
        position encoding, see the class docstring).
        """
        _, codes = self._unpacked(payload, d)
        counts = np.bincount(codes, minlength=self.clusters)
        counts[0] += d - codes.size
        lengths = huffman_lengths(counts)
        bits = int(sum(c * n for c, n in zip(counts, lengths, strict=True)))
        return math.ceil(bits / 8) + 4 * (self.clusters - 1)


def huffman_lengths(counts: np.ndarray) -> list[int]:
    """Code lengths of a Huffman code for symbols of these counts (unused: 0).

    The shortest code goes to the most frequent symbol (the official FedZip
    code's size estimate does the reverse, the spec notes).
    """
    used = [(int(c), i) for i, c in enumerate(counts) if c > 0]
    lengths = [0] * len(counts)
    if len(used) == 1:
        lengths[used[0][1]] = 1
        return lengths
    heap = [(c, n, [i]) for n, (c, i) in enumerate(used)]
    heapq.heapify(heap)
    serial = len(heap)
    while len(heap) > 1:
        c1, _, a = heapq.heappop(heap)
        c2, _, b = heapq.heappop(heap)
        for i in a + b:
            lengths[i] += 1
        heapq.heappush(heap, (c1 + c2, serial, a + b))
        serial += 1
    return lengths


@dataclass(frozen=True)
class LogByte(Compressor):
    """One byte per entry: a sign bit and a 7-bit code of ``ln |x_i|`` (step 1/16).

    The log-scale byte of Zelikman et al., "Just One Byte (per gradient)",
    2023, https://arxiv.org/abs/2306.10015 (its code rounds ``16 ln |g|``).
    Byte ``b``: bit 7 is the sign (1: negative), ``m = b & 127``; ``m = 0`` is
    exactly 0, else the value is ``exp(top + (m - 127) / 16)``. Magnitudes
    above ``e^top`` are clamped to it, those below half a step under the
    smallest code (``e^(top - 126/16 - 1/32)``) become 0. Inside that range
    the relative error of each entry is at most ``e^(1/32) - 1``
    (:meth:`relative_error`); biased, and not contractive in general (a
    vector of tiny entries decodes to 0).
    """

    top: float = 4.0
    """``ln`` of the largest magnitude (``e^4 ~ 54.6``; smallest ``~0.021``)."""

    STEP = 1.0 / 16.0

    def spec(self, d: int) -> PayloadSpec:
        return {"codes": ((d,), "uint8")}

    def encode(self, x: np.ndarray, rng: np.random.Generator) -> Payload:
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        with np.errstate(divide="ignore"):
            level = np.round((np.log(np.abs(x)) - self.top) / self.STEP) + 127
        m = np.clip(np.nan_to_num(level, nan=0.0, neginf=0.0), 0, 127)
        return {
            "codes": (m.astype(np.uint8) | np.where(x < 0, 128, 0).astype(np.uint8))
        }

    def decode(self, payload: Mapping[str, np.ndarray], d: int) -> np.ndarray:
        codes = payload["codes"]
        m = (codes & 127).astype(np.float64)
        value = np.where(m > 0, np.exp(self.top + (m - 127) * self.STEP), 0.0)
        return np.where(codes >= 128, -value, value)

    def alpha(self, d: int) -> float:
        """0: only ``||C(x) - x|| <= ||x||`` holds in general.

        Entries keep their sign and are zeroed or moved toward the range, so
        no error exceeds its entry; see :meth:`relative_error` inside the range.
        """
        return 0.0

    def smallest(self) -> float:
        """The smallest magnitude that does not decode to 0."""
        return math.exp(self.top - 126.5 * self.STEP)

    def relative_error(self) -> float:
        """Largest ``|C(x)_i - x_i| / |x_i|`` for ``smallest() <= |x_i| <= e^top``."""
        return math.exp(self.STEP / 2) - 1.0


def make_compressor(name: str, k: int = 1, levels: int = 16) -> Compressor:
    """The compressor ``name`` (one of :data:`NAMES`) with its parameter."""
    if name not in NAMES:
        raise ValueError(f"compressor {name!r} is not one of {', '.join(NAMES)}")
    if not 1 <= int(levels) <= MAX_LEVELS:
        raise ValueError(f"levels must be in [1, {MAX_LEVELS}]; got {levels}")
    return {
        "identity": lambda: Identity(),
        "topk": lambda: TopK(int(k)),
        "randk": lambda: RandK(int(k)),
        "sign": lambda: ScaledSign(),
        "qsgd": lambda: QSGD(int(levels)),
        "quantize": lambda: Quantize(int(levels)),
        "fedzip": lambda: FedZip(),  # the paper's z = 0.2, 3 clusters
    }[name]()


def contractive(compressor: Compressor) -> Compressor:
    """``compressor`` if contractive, else scaled by ``1/(omega+1)`` (unbiased ones)."""
    return compressor if compressor.alpha(2) is not None else Scaled(compressor)


def seeded_direction(seed: int, j: int, d: int) -> np.ndarray:
    """``z_j ~ N(0, I_d)`` from ``(seed, j)``: a shared-seed direction.

    One-Byte SPSA (``strategies/onebyte.py``): a client perturbs along it, the
    server replays the step along it; both call this function.
    """
    return np.random.default_rng(derive_seed(seed, j)).standard_normal(d)


# ----------------------------------------------- flat views of model entries --
def compressed_keys(
    arrays: Mapping[str, np.ndarray], skip: Collection[str] = ()
) -> list[str]:
    """The entries a compressed update covers: float ones not in ``skip``, in order.

    Both halves call it on the model's entries in state-dict order (the
    order of the ``arrays`` record), so they agree on the flat layout.
    """
    return [
        k for k, a in arrays.items() if k not in skip and np.dtype(a.dtype).kind == "f"
    ]


def flatten(arrays: Mapping[str, np.ndarray], keys: list[str]) -> np.ndarray:
    """The entries ``keys`` of ``arrays`` as one float64 vector."""
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(arrays[k], np.float64).reshape(-1) for k in keys])


def unflatten(
    flat: np.ndarray, like: Mapping[str, np.ndarray], keys: list[str]
) -> dict[str, np.ndarray]:
    """Split ``flat`` back into arrays shaped as ``like[key]`` (float64)."""
    out, start = {}, 0
    for key in keys:
        shape = tuple(np.shape(like[key]))
        size = math.prod(shape)
        out[key] = flat[start : start + size].reshape(shape)
        start += size
    return out


def advance(
    x_hat: Mapping[str, np.ndarray], keys: list[str], step: np.ndarray
) -> dict[str, np.ndarray]:
    """``x_hat + step`` (``step`` flat over ``keys``), in each entry's dtype.

    The compressed downlink's update of the model nodes hold
    (``strategies/downlink.py``, ``clientapps/downlink.py``): both halves
    call it, so their ``x_hat`` stay equal bit for bit.
    """
    flat = flatten(x_hat, keys) + step
    return {
        k: v.astype(np.dtype(x_hat[k].dtype))
        for k, v in unflatten(flat, x_hat, keys).items()
    }
