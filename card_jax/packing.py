"""Compact, self-describing files for one CARD: its effective weights, coded near their entropy.

A trained CARD is a sparse network whose surviving weights are either full precision (FT, GMP,
LTH, LRR) or one magnitude per layer (EP with signed constants, BP: `alpha_l * sign(W) * m`).
SPEC §9 counts its memory as 32 (or 1) bits per surviving weight and ignores where the
survivors are. This module writes real files that include the positions, and shows how close
they come to the information content of the network.

File layout (integers little-endian)::

    offset  size  field
    0       8     magic b"CARDPACK"
    8       2     format version (uint16, FORMAT_VERSION)
    10      1     payload compression: 0 none, 1 zlib (chosen only when it makes the file smaller)
    11      1     reserved, 0
    12      4     H, the length of the header (uint32)
    16      H     header: zlib-compressed UTF-8 JSON (below)
    16 + H  ...   payload: every leaf's segments, concatenated in the order of header["leaves"]

Header JSON::

    {"format": "card_jax.packing", "version": 1, "realization": r, "binary": bool,
     "value_dtype": "float32" | "float16", "config": {...}, "dataset": {...},
     "params": SKELETON, "batch_stats": SKELETON, "leaves": [LEAF, ...],
     "payload_bytes": N, "crc32": CRC of the (uncompressed) payload}

SKELETON is the nested dict of the tree with each array replaced by its index into "leaves"
(empty sub-dicts survive). LEAF = {"shape", "dtype", "mask", "values", "seg": [a, b]}: the
leaf's two payload segments are `a` bytes of mask and `b` bytes of values.

* Prunable kernels (ndim >= 2) are stored sparse: "mask" = {"coder", "kept", ...} codes the
  flat C-order positions whose bit pattern is nonzero (so -0.0 is kept and reproduced), with
  the smallest of
    - "all" / "none": nothing to store;
    - "bitmap": np.packbits of the n mask bits;
    - "rice": Golomb-Rice codes of the gaps between kept positions, parameter "k" searched
      around log2(mean gap). Two streams: the k-bit remainders, then the unary quotients
      (a run of zeros ended by a one), so both code and decode are vectorised;
    - "rans": interleaved range-ANS (32-bit states, 16-bit words, 15-bit probabilities) with
      an adaptive model: P(bit = 1) is the Krichevsky-Trofimov estimate of the bits seen so
      far with the same output channel and context, the context being the bit at the previous
      spatial tap of the same (in, out) channel pair (previous input row for dense kernels).
      It wins on structured masks (dead or dense channels), where the i.i.d. coders cannot.
      "lanes" interleaved states (at most one per output channel) are decoded in lock-step.
  "values" codes the kept values in position order:
    - "signs": every kept value is +-alpha (binary layer): alpha in the leaf dtype, then one
      sign bit per kept weight (np.packbits, 1 = negative);
    - "raw": the values as "store" (float32, or float16 when value_dtype='float16');
    - "shuffle-zlib": the same bytes split into byte planes (sign/exponent bytes together),
      then zlib; used when smaller (typical trained weights lose ~10%).
* Every other leaf (biases, BN scale/offset, running statistics) has "mask": null and
  "values" coded as above from all of its elements ("raw" or "shuffle-zlib").

Decoding is exact: float32 leaves come back bit-identical, float16 storage rounds to the
nearest float16 (and leaves whose values would overflow float16 stay float32).
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

MAGIC = b"CARDPACK"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHBBI")  # magic, version, payload compression, reserved, header len
_COMPRESS_NONE, _COMPRESS_ZLIB = 0, 1
VALUE_DTYPES = ("float32", "float16")

# rANS constants: states live in [L, 2^32), words are 16 bits, probabilities have 15 bits.
_PROB_BITS = 15
_PROB_ONE = 1 << _PROB_BITS
_RANS_L = 1 << 16
# Lanes are chosen so a leaf takes about this many lock-step iterations: enough lanes to keep
# numpy busy, few enough that the 4-byte final state per lane stays a small overhead.
_RANS_TARGET_STEPS = 4096


# ------------------------------------------------------------------------ tree <-> leaf list

def _skeleton(tree: Any, leaves: list) -> Any:
    """Nested dict of `tree` with every array replaced by its index in `leaves` (appended to)."""
    if isinstance(tree, dict):
        out = {}
        for key in sorted(tree):  # jax's flattening order, so leaves match tree_leaves
            if not isinstance(key, str):
                raise TypeError(f"packing needs string dict keys, got {key!r}")
            out[key] = _skeleton(tree[key], leaves)
        return out
    if isinstance(tree, (list, tuple)) or tree is None:
        raise TypeError(f"packing handles nested dicts of arrays only, got {type(tree).__name__}")
    leaves.append(np.asarray(tree))
    return len(leaves) - 1


def _rebuild(skeleton: Any, leaves: list) -> Any:
    if isinstance(skeleton, dict):
        return {k: _rebuild(v, leaves) for k, v in skeleton.items()}
    return leaves[skeleton]


def _paths(skeleton: Any, prefix: str) -> dict[int, str]:
    """{leaf index: 'prefix/a/b'} of a skeleton."""
    if isinstance(skeleton, dict):
        out = {}
        for k, v in skeleton.items():
            out.update(_paths(v, f"{prefix}/{k}"))
        return out
    return {skeleton: prefix}


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:  # bfloat16 and friends live in ml_dtypes (a jax dependency)
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


# ------------------------------------------------------------------------ information bound

def binary_entropy(p: float) -> float:
    """H2(p) in bits; 0 at p in {0, 1}."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))


def information_bound_bytes(mask_density: float, n_weights: int, n_kept: int,
                            bits_per_value: int = 1) -> int:
    """ceil((n H2(density) + bits_per_value n_kept) / 8): the entropy of an i.i.d. mask of
    `n_weights` positions plus `bits_per_value` per kept weight (1 = one sign bit, binary)."""
    return math.ceil((n_weights * binary_entropy(mask_density) + bits_per_value * n_kept) / 8)


def information_bound(effective_params: Any, bits_per_value: int = 1) -> int:
    """Sum of `information_bound_bytes` over the kernels (ndim >= 2) of one realization."""
    leaves: list = []
    _skeleton(effective_params, leaves)
    total = 0
    for x in leaves:
        if x.ndim >= 2:
            kept = int(np.count_nonzero(_nonzero_bits(x)))
            total += information_bound_bytes(kept / x.size, x.size, kept, bits_per_value)
    return total


# ------------------------------------------------------------------------ mask coders

def _nonzero_bits(x: np.ndarray) -> np.ndarray:
    """uint8 [n]: 1 where the element's bit pattern is not +0 (C order). Bit patterns, not
    `x != 0`, so that -0.0 counts as kept and decodes bit-identically."""
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype.kind in "fiuc" and flat.dtype.itemsize in (1, 2, 4, 8):
        return (flat.view(f"u{flat.dtype.itemsize}") != 0).astype(np.uint8)
    return (flat != 0).astype(np.uint8)


def _rice_sizes(gaps: np.ndarray, k: int) -> int:
    kept = len(gaps)
    return -(-kept * k // 8) + -(-(int(np.sum(gaps >> k)) + kept) // 8)


def _rice_encode(positions: np.ndarray, k: int) -> bytes:
    """Gaps g_j = p_j - p_{j-1} - 1 (p_{-1} = -1): k-bit remainders, then unary quotients."""
    gaps = np.diff(positions, prepend=-1) - 1
    quotients = gaps >> k
    remainder_bytes = b""
    if k:
        shifts = np.arange(k - 1, -1, -1, dtype=np.int64)
        bits = ((gaps[:, None] >> shifts) & 1).astype(np.uint8)
        remainder_bytes = np.packbits(bits.reshape(-1)).tobytes()
    unary = np.zeros(int(quotients.sum()) + len(gaps), np.uint8)
    unary[np.cumsum(quotients + 1) - 1] = 1
    return remainder_bytes + np.packbits(unary).tobytes()


def _rice_decode(data: bytes, n: int, kept: int, k: int) -> np.ndarray:
    """Kept positions int64 [kept] from `_rice_encode`'s bytes."""
    split = -(-kept * k // 8)
    remainders = np.zeros(kept, np.int64)
    if k:
        bits = np.unpackbits(np.frombuffer(data[:split], np.uint8))[:kept * k]
        if bits.size != kept * k:
            raise ValueError("corrupt rice mask: remainder stream too short")
        remainders = bits.reshape(kept, k).astype(np.int64) @ (1 << np.arange(k - 1, -1, -1))
    ends = np.flatnonzero(np.unpackbits(np.frombuffer(data[split:], np.uint8)))[:kept]
    if ends.size != kept:
        raise ValueError("corrupt rice mask: unary stream too short")
    quotients = np.diff(ends, prepend=-1) - 1
    positions = np.cumsum(((quotients << k) | remainders) + 1) - 1
    if kept and positions[-1] >= n:
        raise ValueError("corrupt rice mask: position past the end of the leaf")
    return positions


def _rans_geometry(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(out channels, context stride, lanes) of a kernel: context = the bit `stride` positions
    back (previous spatial tap of the same (in, out) pair; previous row of a dense kernel).
    lanes <= out channels, so the bits of one lock-step iteration have distinct channels and
    everything the model conditions on was decoded in an earlier iteration."""
    n = math.prod(shape)
    cout = shape[-1]
    stride = cout * shape[-2] if len(shape) >= 3 else cout
    lanes = max(1, min(cout, n // _RANS_TARGET_STEPS))
    return cout, stride, lanes


def _kt_frequency(ones: np.ndarray, seen: np.ndarray) -> np.ndarray:
    """Quantised KT estimate (ones + 1/2) / (seen + 1) of P(1), uint64 in [1, 2^15 - 1]."""
    ones, seen = ones.astype(np.int64), seen.astype(np.int64)
    f1 = ((2 * ones + 1) << _PROB_BITS) // (2 * seen + 2)
    return np.clip(f1, 1, _PROB_ONE - 1).astype(np.uint64)


def _rans_model(bits: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Frequency of symbol 1 for every bit, uint64 [n], exactly as the decoder will see it.

    Vectorised: within a column (output channel) of the [rows, cout] view, the bits seen
    before row i are rows < i, all of them decoded in earlier lock-step iterations.
    """
    n = bits.size
    cout, stride, _ = _rans_geometry(shape)
    ctx = np.full(n, 2, np.uint8)
    if stride < n:
        ctx[stride:] = bits[:n - stride]
    ctx = ctx.reshape(-1, cout)
    b = bits.reshape(-1, cout).astype(np.int32)
    # int32 counts (at most rows per column) keep the memory at a few bytes per weight.
    seen = np.zeros(ctx.shape, np.int32)
    ones = np.zeros(ctx.shape, np.int32)
    for c in range(3):
        hit = (ctx == c).astype(np.int32)
        hit1 = hit * b
        seen += hit * (np.cumsum(hit, axis=0, dtype=np.int32) - hit)
        ones += hit * (np.cumsum(hit1, axis=0, dtype=np.int32) - hit1)
    return _kt_frequency(ones.reshape(-1), seen.reshape(-1))


def _rans_estimate(bits: np.ndarray, f1: np.ndarray, lanes: int) -> int:
    """Predicted size in bytes (ideal code length + final states + rounding)."""
    f = np.where(bits.astype(bool), f1, _PROB_ONE - f1).astype(np.float64)
    cost = float(np.sum(_PROB_BITS - np.log2(f)))
    return math.ceil(cost / 8) + 4 * lanes + 4


def _rans_encode(bits: np.ndarray, f1: np.ndarray, lanes: int) -> bytes:
    """Encodes bits [n] with P(1) = f1 / 2^15; lane j codes positions j, j + lanes, ...

    Bytes: lanes final states (uint32), then the 16-bit words in decoding order. The encoder
    runs backwards; within an iteration lanes emit in ascending order, so reversing the word
    list gives the decoder each iteration's words in descending lane order.
    """
    n = bits.size
    one = bits.astype(bool)
    freq = np.where(one, f1, _PROB_ONE - f1).astype(np.uint64)
    start = np.where(one, 0, f1).astype(np.uint64)
    x = np.full(lanes, _RANS_L, np.uint64)
    chunks = []
    for t in range(-(-n // lanes) - 1, -1, -1):
        lo, hi = t * lanes, min(t * lanes + lanes, n)
        xs = x[:hi - lo]
        f = freq[lo:hi]
        emit = xs >= (f << (32 - _PROB_BITS))
        if emit.any():
            chunks.append(xs[emit].astype(np.uint16))  # the low 16 bits
            xs = np.where(emit, xs >> 16, xs)
        x[:hi - lo] = ((xs // f) << _PROB_BITS) + (xs % f) + start[lo:hi]
    words = np.concatenate(chunks)[::-1] if chunks else np.zeros(0, np.uint16)
    return x.astype("<u4").tobytes() + words.astype("<u2").tobytes()


def _rans_decode(data: bytes, shape: tuple[int, ...], lanes: int) -> np.ndarray:
    """uint8 bits [n] from `_rans_encode`'s bytes, re-running the adaptive model."""
    n = math.prod(shape)
    cout, stride, expected_lanes = _rans_geometry(shape)
    if lanes != expected_lanes:
        raise ValueError(f"corrupt rans mask: {lanes} lanes, expected {expected_lanes}")
    x = np.frombuffer(data[:4 * lanes], "<u4").astype(np.uint64)
    words = np.frombuffer(data[4 * lanes:], "<u2").astype(np.uint64)
    out = np.zeros(n, np.uint8)
    seen = np.zeros((cout, 3), np.int64)
    ones = np.zeros((cout, 3), np.int64)
    lane = np.arange(lanes)
    pos = 0
    for lo in range(0, n, lanes):
        hi = min(lo + lanes, n)
        idx = lo + lane[:hi - lo]
        col = idx % cout
        if lo >= stride:
            ctx = out[lo - stride:hi - stride].astype(np.int64)
        else:
            ctx = np.where(idx >= stride, out[np.maximum(idx - stride, 0)], 2).astype(np.int64)
        f1 = _kt_frequency(ones[col, ctx], seen[col, ctx])
        xs = x[:hi - lo]
        slot = xs & (_PROB_ONE - 1)
        sym = slot < f1
        xs = np.where(sym, f1, _PROB_ONE - f1) * (xs >> _PROB_BITS) + slot - np.where(sym, 0, f1)
        need = xs < _RANS_L
        k = int(np.count_nonzero(need))
        if k:
            if pos + k > words.size:
                raise ValueError("corrupt rans mask: word stream too short")
            xs[need] = (xs[need] << 16) | words[pos:pos + k][::-1]
            pos += k
        x[:hi - lo] = xs
        out[lo:hi] = sym
        seen[col, ctx] += 1
        ones[col, ctx] += sym
    if pos != words.size or np.any(x != _RANS_L):
        raise ValueError("corrupt rans mask: final states do not match")
    return out


def _encode_mask(bits: np.ndarray, shape: tuple[int, ...]) -> tuple[dict, bytes]:
    """The smallest coding of a kernel's mask bits (uint8 [n]): (spec, segment)."""
    n = bits.size
    positions = np.flatnonzero(bits)
    kept = positions.size
    if kept == 0:
        return {"coder": "none", "kept": 0}, b""
    if kept == n:
        return {"coder": "all", "kept": n}, b""
    best = ({"coder": "bitmap", "kept": kept}, np.packbits(bits).tobytes())
    gaps = np.diff(positions, prepend=-1) - 1
    centre = int(math.log2(max((n - kept) / kept, 1.0)))
    k = min(range(max(0, centre - 2), centre + 3), key=lambda k: _rice_sizes(gaps, k))
    if _rice_sizes(gaps, k) < len(best[1]):
        best = ({"coder": "rice", "kept": kept, "k": k}, _rice_encode(positions, k))
    # The adaptive coder costs a Python-level loop; run it only when its ideal code length
    # (computed vectorised) says it can win.
    _, _, lanes = _rans_geometry(shape)
    f1 = _rans_model(bits, shape)
    if _rans_estimate(bits, f1, lanes) < len(best[1]):
        data = _rans_encode(bits, f1, lanes)
        if len(data) < len(best[1]):
            best = ({"coder": "rans", "kept": kept, "lanes": lanes}, data)
    return best


def _decode_mask(spec: dict, data: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """Bool mask [n] (flat C order)."""
    n = math.prod(shape)
    coder, kept = spec["coder"], spec["kept"]
    if coder == "none":
        mask = np.zeros(n, bool)
    elif coder == "all":
        mask = np.ones(n, bool)
    elif coder == "bitmap":
        mask = np.unpackbits(np.frombuffer(data, np.uint8), count=n).astype(bool)
    elif coder == "rice":
        mask = np.zeros(n, bool)
        mask[_rice_decode(data, n, kept, spec["k"])] = True
    elif coder == "rans":
        mask = _rans_decode(data, shape, spec["lanes"]).astype(bool)
    else:
        raise ValueError(f"unknown mask coder {coder!r}")
    if int(np.count_nonzero(mask)) != kept:
        raise ValueError(f"corrupt {coder} mask: {np.count_nonzero(mask)} kept, header says {kept}")
    return mask


# ------------------------------------------------------------------------ value coders

def _store_dtype(dtype: np.dtype, values: np.ndarray, value_dtype: str) -> np.dtype:
    """float16 storage for float32 leaves when asked for, unless a value would overflow."""
    if value_dtype == "float16" and dtype == np.float32:
        finite = values[np.isfinite(values)]
        if finite.size == 0 or np.max(np.abs(finite)) <= np.finfo(np.float16).max:
            return np.dtype(np.float16)
    return dtype


def _shuffle_zlib(raw: bytes, itemsize: int) -> bytes:
    planes = np.frombuffer(raw, np.uint8).reshape(-1, itemsize).T
    # Level 6: within 0.5% of level 9 on weight planes at a third of the time.
    return zlib.compress(np.ascontiguousarray(planes).tobytes(), 6)


def _unshuffle_zlib(data: bytes, itemsize: int) -> bytes:
    planes = np.frombuffer(zlib.decompress(data), np.uint8).reshape(itemsize, -1)
    return np.ascontiguousarray(planes.T).tobytes()


def _encode_values(values: np.ndarray, dtype: np.dtype, value_dtype: str,
                   allow_signs: bool) -> tuple[dict, bytes]:
    """Codes a 1-D array of (kept) values: signs, raw, or byte-shuffled zlib."""
    if allow_signs and values.size and dtype.kind == "f":
        alpha = np.abs(values[:1])
        if alpha[0] > 0 and np.isfinite(alpha[0]) and np.all(np.abs(values) == alpha[0]):
            # `values == -alpha` is exact, and -alpha decodes bit-identically.
            signs = np.packbits(values < 0).tobytes()
            return {"coder": "signs"}, alpha.astype(dtype).tobytes() + signs
    store = _store_dtype(dtype, values, value_dtype)
    raw = values.astype(store).tobytes()
    spec = {"coder": "raw", "store": store.name}
    if store.itemsize > 1 and values.size >= 16:
        packed = _shuffle_zlib(raw, store.itemsize)
        if len(packed) < len(raw):
            return {"coder": "shuffle-zlib", "store": store.name}, packed
    return spec, raw


def _decode_values(spec: dict, data: bytes, count: int, dtype: np.dtype) -> np.ndarray:
    coder = spec["coder"]
    if coder == "signs":
        alpha = np.frombuffer(data[:dtype.itemsize], dtype)[0]
        negative = np.unpackbits(np.frombuffer(data[dtype.itemsize:], np.uint8),
                                 count=count).astype(bool)
        return np.where(negative, -alpha, alpha).astype(dtype)
    store = _dtype(spec["store"])
    if coder == "shuffle-zlib":
        data = _unshuffle_zlib(data, store.itemsize)
    elif coder != "raw":
        raise ValueError(f"unknown value coder {coder!r}")
    values = np.frombuffer(data, store)
    if values.size != count:
        raise ValueError(f"corrupt values: {values.size} stored, expected {count}")
    return values.astype(dtype)


# ------------------------------------------------------------------------ pack / unpack

def _encode_leaf(x: np.ndarray, value_dtype: str) -> tuple[dict, bytes, bytes]:
    entry = {"shape": list(x.shape), "dtype": x.dtype.name}
    flat = np.ascontiguousarray(x).reshape(-1)
    if x.ndim >= 2:
        bits = _nonzero_bits(x)
        mask_spec, mask_data = _encode_mask(bits, x.shape)
        values = flat[bits.astype(bool)]
        value_spec, value_data = _encode_values(values, x.dtype, value_dtype, allow_signs=True)
    else:
        mask_spec, mask_data = None, b""
        value_spec, value_data = _encode_values(flat, x.dtype, value_dtype, allow_signs=False)
    entry.update(mask=mask_spec, values=value_spec, seg=[len(mask_data), len(value_data)])
    return entry, mask_data, value_data


def pack(effective_params: Any, batch_stats: Any, *, binary: bool,
         value_dtype: str = "float32", config: dict, dataset_info: dict,
         realization: int) -> bytes:
    """One realization's CARD as bytes (format: module docstring).

    Args:
      effective_params: nested dict of arrays as the forward pass sees them
        (`method.apply(params, method_state)` of ONE realization, no [R] axis).
      batch_stats: nested dict of BatchNorm statistics (may be empty).
      binary: the method's claim (`Method.binary`), recorded in the metadata. Sign coding is
        chosen per kernel from the values (all kept values +-alpha), so it is exact either way.
      value_dtype: storage of full-precision values, 'float32' (bit-exact) or 'float16'.
      config: the run's config as a plain dict (`config_util.to_dict`).
      dataset_info: `train.dataset_info(...)` (rebuilds the model without the data).
      realization: index of this realization in its run.
    """
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype!r}")
    leaves: list = []
    skeletons = {"params": _skeleton(effective_params, leaves),
                 "batch_stats": _skeleton(batch_stats if batch_stats is not None else {}, leaves)}
    entries, segments = [], []
    for x in leaves:
        entry, mask_data, value_data = _encode_leaf(x, value_dtype)
        entries.append(entry)
        segments += [mask_data, value_data]
    payload = b"".join(segments)
    header = {"format": "card_jax.packing", "version": FORMAT_VERSION,
              "realization": int(realization), "binary": bool(binary),
              "value_dtype": value_dtype, "config": config, "dataset": dataset_info,
              **skeletons, "leaves": entries, "payload_bytes": len(payload),
              "crc32": zlib.crc32(payload)}
    header_bytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    compression = _COMPRESS_NONE
    # The segments are already entropy coded: whole-payload zlib measured +0.03% on a binary
    # Conv8 CARD. It is tried (when cheap) for odd inputs such as repetitive raw leaves.
    squeezed = zlib.compress(payload, 6) if len(payload) <= (16 << 20) else payload
    if len(squeezed) < len(payload):
        payload, compression = squeezed, _COMPRESS_ZLIB
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, compression, 0, len(header_bytes))
    return prefix + header_bytes + payload


def _split(data: bytes) -> tuple[dict, bytes, int]:
    """(header, uncompressed payload, header length on disk); checks magic, version, CRC."""
    if len(data) < _PREFIX.size:
        raise ValueError("not a packed CARD: too short")
    magic, version, compression, _, header_len = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"not a packed CARD (magic {magic!r})")
    if version != FORMAT_VERSION:
        raise ValueError(f"packed CARD format version {version}; this reader knows "
                         f"{FORMAT_VERSION}")
    start = _PREFIX.size + header_len
    header = json.loads(zlib.decompress(data[_PREFIX.size:start]))
    payload = data[start:]
    if compression == _COMPRESS_ZLIB:
        payload = zlib.decompress(payload)
    elif compression != _COMPRESS_NONE:
        raise ValueError(f"unknown payload compression {compression}")
    if len(payload) != header["payload_bytes"] or zlib.crc32(payload) != header["crc32"]:
        raise ValueError("packed CARD payload is corrupt (length or CRC mismatch)")
    return header, payload, header_len


def unpack(data: bytes) -> tuple[dict, dict, dict]:
    """(effective_params, batch_stats, meta) of `pack`'s bytes; arrays are numpy.

    meta is the JSON header (config, dataset, realization, binary, value_dtype, leaves, ...).
    """
    header, payload, _ = _split(data)
    arrays, offset = [], 0
    for entry in header["leaves"]:
        shape, dtype = tuple(entry["shape"]), _dtype(entry["dtype"])
        mask_len, value_len = entry["seg"]
        mask_data = payload[offset:offset + mask_len]
        value_data = payload[offset + mask_len:offset + mask_len + value_len]
        offset += mask_len + value_len
        n = math.prod(shape)
        if entry["mask"] is None:
            x = _decode_values(entry["values"], value_data, n, dtype)
        else:
            mask = _decode_mask(entry["mask"], mask_data, shape)
            x = np.zeros(n, dtype)
            x[mask] = _decode_values(entry["values"], value_data, entry["mask"]["kept"], dtype)
        arrays.append(x.reshape(shape))
    if offset != len(payload):
        raise ValueError("packed CARD payload has trailing bytes")
    return (_rebuild(header["params"], arrays), _rebuild(header["batch_stats"], arrays),
            header)


def write_packed(path: str | pathlib.Path, effective_params: Any, batch_stats: Any,
                 **kwargs: Any) -> int:
    """Writes `pack(effective_params, batch_stats, **kwargs)` to `path`; returns its size."""
    data = pack(effective_params, batch_stats, **kwargs)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def read_packed(path: str | pathlib.Path) -> tuple[dict, dict, dict]:
    """`unpack` of a file written by `write_packed`."""
    return unpack(pathlib.Path(path).read_bytes())


def describe(data: bytes) -> dict:
    """Where the bytes of a packed CARD go, and how they compare with the information bound.

    Returns a dict with total/header bytes, kernel mask and value bytes, other-leaf bytes,
    `bound_bytes` (sum over kernels of `information_bound_bytes`, 1 bit per kept value of a
    sign-coded kernel and the storage bits otherwise), `kernel_ratio` = kernel payload / bound,
    and per-leaf rows (path, shape, kept, mask coder, bytes).
    """
    header, _, header_len = _split(data)
    paths = {**_paths(header["params"], "params"), **_paths(header["batch_stats"], "batch_stats")}
    rows, mask_bytes, value_bytes, other_bytes, bound = [], 0, 0, 0, 0
    for i, entry in enumerate(header["leaves"]):
        n = math.prod(entry["shape"])
        mask, values = entry["mask"], entry["values"]
        row = {"path": paths[i], "shape": entry["shape"], "mask_bytes": entry["seg"][0],
               "value_bytes": entry["seg"][1], "values": values["coder"]}
        if mask is None:
            other_bytes += sum(entry["seg"])
        else:
            kept = mask["kept"]
            bits = 1 if values["coder"] == "signs" else 8 * _dtype(
                values.get("store", entry["dtype"])).itemsize
            leaf_bound = information_bound_bytes(kept / n, n, kept, bits)
            mask_bytes += entry["seg"][0]
            value_bytes += entry["seg"][1]
            bound += leaf_bound
            row.update(kept=kept, mask=mask["coder"], bound_bytes=leaf_bound)
        rows.append(row)
    kernel = mask_bytes + value_bytes
    return {"total_bytes": len(data), "header_bytes": _PREFIX.size + header_len,
            "kernel_mask_bytes": mask_bytes, "kernel_value_bytes": value_bytes,
            "other_bytes": other_bytes, "bound_bytes": bound,
            "kernel_ratio": kernel / bound if bound else float("nan"), "leaves": rows}


# ------------------------------------------------------------------------ experiments

def pack_state(exp, host_state, *, value_dtype: str = "float32",
               dataset_info: dict | None = None,
               realizations: Sequence[int] | None = None) -> list[bytes]:
    """Packed bytes of the realizations of an `[R]`-stacked host state.

    Args:
      exp: the `train.Experiment` (config, method, dataset).
      host_state: `TrainState` with a leading [R] axis (host or device arrays).
      dataset_info: recorded in each file; defaults to `train.dataset_info(exp.dataset)`.
      realizations: which ones, in this order (default: all R).
    """
    import jax

    from card_jax import config_util, train
    from card_jax import state as state_lib

    config = config_util.to_dict(exp.config)
    info = dataset_info if dataset_info is not None else train.dataset_info(exp.dataset)
    apply = jax.jit(exp.method.apply)
    out = []
    chosen = range(exp.config.train.realizations) if realizations is None else realizations
    for r in chosen:
        effective = jax.device_get(apply(state_lib.index(host_state.params, r),
                                         state_lib.index(host_state.method_state, r)))
        batch_stats = jax.device_get(state_lib.index(host_state.batch_stats, r))
        out.append(pack(effective, batch_stats, binary=exp.method.binary,
                        value_dtype=value_dtype, config=config, dataset_info=info,
                        realization=r))
    return out


def packed_sizes(exp, host_state) -> list[int]:
    """Size in bytes of each realization's packed file (float32 values): for results.json."""
    return [len(b) for b in pack_state(exp, host_state)]
