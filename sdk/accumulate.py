"""Exact, order-independent Σ w_k·x_k over float tensors, for federated aggregation.

A float64 running sum depends on the order of its additions in the last bits. `ExactSum`
keeps the exact sum instead, as integer fixed-point digits ("limbs") held in float64, and
rounds once in `result()`, so the outcome is bit-identical for any order of `add` calls and
any split of them across workers joined with `merge`.

Representation: limb k of the window holds integers (|limb| < 2^53, exact in float64) in
units of 2^(LIMB_BITS·(lo + k)); the window [lo, lo + n) grows when a value is tinier or
larger than anything seen, so memory is n·8 bytes per element, independent of the number
of additions (n is 2-4 for typical float32 updates). Each `add` splits w into chunks q·2^e
small enough that x·q is exact in float64, scales x·q to every limb with one outer product,
truncates, and takes differences of neighbouring rows to get the digits.

Fast path (the aggregator's hot loop): a float32 x is mant·2^(exp−150) with an integer
mant < 2^24, so w·x for an integer weight w is an integer in units of 2^(16·bin − 150),
bin = exp // 16. Such adds go to int64 "bins" (one row per bin, one column per element:
a vectorised scatter per add, no float rounding anywhere); every |bin| < 2^39·Σw stays
below 2^62 by flushing the bins into the limbs (`_flush`) before Σw reaches 2^23, and
before anything reads the sum.

Large tensors are binned, flushed and rounded in chunks of `_CHUNK` values, so that each
vectorised pass works in cache; the result does not depend on the chunking.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

LIMB_BITS = 48  # bits per digit; 2^(53-48) = 32 digits fit in a limb before a carry pass
_RADIX = float(2**LIMB_BITS)
_HEADROOM = 2 ** (53 - LIMB_BITS)  # |limb| < pending·2^B must stay ≤ 2^53 (exact in float64)
_BAND_BITS = 512  # widest exponent spread of float64 input deposited in one pass
_TOP_BITS = 62  # result(): leading bits kept (round-to-odd) before rounding to 53
_STATE_VERSION = 1
_BIN_SHIFT = 4  # fast path: float32 exponents grouped in bins of 2^4 = 16 binades
_FAST_MAX_WEIGHT = 2**20  # integer weights up to this take the fast path
_FAST_LOAD = 2**23  # Σ weights between flushes: |bin| < 2^(24+15)·2^23 = 2^62
# Elements per vectorised pass: the temporaries of a pass stay in cache, which makes large
# tensors (Llama r=200: 7.8M values per update) several times faster than whole-array passes.
_CHUNK = 2**16

# dtype → (bits dtype, |x| mask, Inf bits, mantissa bits, lowest-bit offset, bound offset)
_FORMATS = {
    torch.float32: (torch.int32, 0x7FFF_FFFF, 0x7F80_0000, 23, 150, 126),
    torch.float64: (torch.int64, 0x7FFF_FFFF_FFFF_FFFF, 0x7FF0_0000_0000_0000, 52, 1075, 1022),
}

# A term contributes piece·q·2^exp, every bit of it inside [lowbit, highbit).
_Term = tuple[torch.Tensor, int, int, int, int]


class ExactSum:
    """Exact Σ w_k·x_k over float tensors: integer fixed-point limbs, rounded once at the end."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.count = 0  # number of add/add_block calls, merged accumulators included
        self._numel = math.prod(self.shape)
        self._lo = 0  # absolute index of limb row 0
        self._limbs = torch.zeros((0, self._numel), dtype=torch.float64)  # (n, numel)
        self._pending = 0  # every |limb| < pending·2^LIMB_BITS
        self._bins: np.ndarray | None = None  # fast path: (rows, numel) int64, row 0 = bin_lo
        self._bin_lo = 0
        self._bin_load = 0  # Σ weights added to the bins since the last flush

    @property
    def n_limbs(self) -> int:
        """Rows of the limb window (memory is n_limbs·8 bytes per element)."""
        self._flush()
        return self._rows

    @property
    def _rows(self) -> int:
        return int(self._limbs.shape[0])

    def add(self, value: torch.Tensor, weight: float = 1.0) -> None:
        """Add weight·value exactly; value float32/float64 of the accumulator's shape."""
        if tuple(value.shape) != self.shape:
            raise ValueError(f"value shape {tuple(value.shape)} != accumulator {self.shape}")
        self._add(value, weight, ())

    def add_block(self, value: torch.Tensor, weight: float = 1.0) -> None:
        """Add weight·value into the leading corner (top-left for 2-D), e.g. a rank-r block."""
        block = tuple(value.shape)
        if len(block) != len(self.shape) or any(
            b > s for b, s in zip(block, self.shape, strict=True)
        ):
            raise ValueError(f"block shape {block} does not fit in accumulator {self.shape}")
        self._add(value, weight, block)

    def merge(self, other: ExactSum) -> None:
        """Add another accumulator's exact sum into this one (windows are aligned exactly)."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge shape {other.shape} into {self.shape}")
        self._flush()
        other._flush()
        if other._rows:
            src = other._copy()
            if self._pending + src._pending > _HEADROOM:
                self._normalize()
                src._normalize()
            self._cover(src._lo, src._lo + src._rows - 1)
            start = src._lo - self._lo
            self._limbs[start : start + src._rows].add_(src._limbs)
            self._pending += src._pending
        self.count += other.count

    def result(self) -> torch.Tensor:
        """The exact sum rounded once to float64 (round to nearest, ties to even)."""
        self._flush()
        if not self._rows:
            return torch.zeros(self.shape, dtype=torch.float64)
        out = torch.empty(self._numel, dtype=torch.float64)
        for start in range(0, self._numel, _CHUNK):  # elements are independent
            columns = slice(start, start + _CHUNK)
            out[columns] = _rounded(self._limbs[:, columns], self._lo)
        return out.view(self.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Checkpointable state: the limbs plus (version, limb bits, lo, pending, count)."""
        self._flush()
        meta = [_STATE_VERSION, LIMB_BITS, self._lo, self._pending, self.count]
        return {
            "limbs": self._limbs.reshape(self._rows, *self.shape).clone(),
            "meta": torch.tensor(meta, dtype=torch.int64),
            "shape": torch.tensor(self.shape, dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> ExactSum:
        """Rebuild an accumulator from `state_dict()`; rejects foreign or corrupt states."""
        meta = [int(v) for v in state["meta"].tolist()]
        if len(meta) != 5 or meta[0] != _STATE_VERSION or meta[1] != LIMB_BITS:
            raise ValueError(f"unsupported ExactSum state meta {meta}")
        acc = cls(tuple(int(s) for s in state["shape"].tolist()))
        limbs = state["limbs"]
        if limbs.dtype != torch.float64 or tuple(limbs.shape[1:]) != acc.shape:
            raise ValueError("ExactSum state limbs have the wrong dtype or shape")
        acc._lo, acc._pending, acc.count = meta[2], meta[3], meta[4]
        acc._limbs = limbs.detach().to("cpu", copy=True).reshape(limbs.shape[0], acc._numel)
        bound = acc._pending * _RADIX
        if not 0 <= acc._pending <= _HEADROOM or not _is_integral(acc._limbs, bound):
            raise ValueError("ExactSum state limbs are not integers within their bound")
        return acc

    # -- internals ----------------------------------------------------------------------

    def _add(self, value: torch.Tensor, weight: float, block: tuple[int, ...]) -> None:
        """Validate, then deposit weight·value into the whole window or its leading block."""
        w = float(weight)
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
        x = _as_float(value)
        if x.dtype == torch.float32 and w.is_integer() and w <= _FAST_MAX_WEIGHT:
            self._add_f32_integer(x, int(w), block)
            return
        bounds = _bit_range(x)  # raises on NaN/Inf, so bad values fail even with w == 0
        self.count += 1
        if bounds is None or w == 0.0 or x.numel() == 0:
            return
        if x.dtype == torch.float32:
            self._deposit(_terms(x.double(), 24, *bounds, 0, w), block)
            return
        for band in _bands(x, *bounds):
            self._deposit_f64(band, w, block)

    def _add_f32_integer(self, x: torch.Tensor, w: int, block: tuple[int, ...]) -> None:
        """Fast path: w·x into the int64 bins, exactly (x float32, 0 ≤ w ≤ 2^20 an integer)."""
        bits = x.numpy().view(np.int32)
        exps = [(bits[s : s + _CHUNK] >> 23) & 0xFF for s in range(0, bits.size, _CHUNK)]
        rows = _bin_rows(exps)  # raises on NaN/Inf before anything changes
        self.count += 1
        if w == 0 or rows is None:
            return
        if self._bin_load + w > _FAST_LOAD:
            self._flush()
        self._cover_bins(*rows)
        assert self._bins is not None
        flat_bins = self._bins.reshape(-1)
        positions = _positions(self.shape, block)
        for start, exp in zip(range(0, bits.size, _CHUNK), exps, strict=True):
            row = exp >> _BIN_SHIFT  # subnormals (exp 0) share row 0 with exp 1..15
            # w·x in units of 2^(16·row − 150): x·2^(150 − 16·row) = ±mant·2^(exp mod 16)
            # (exp ≥ 1; a subnormal gives ±2·mant) is an integer below 2^39, exact in float64
            # and in int64.
            part = bits[start : start + _CHUNK].view(np.float32).astype(np.float64)
            value = np.ldexp(part, 150 - (row << _BIN_SHIFT)).astype(np.int64)
            if w != 1:
                value *= w
            flat = (row - self._bin_lo).astype(np.int64) * self._numel
            flat += positions[start : start + _CHUNK]
            np.add.at(flat_bins, flat, value)
        self._bin_load += w

    def _cover_bins(self, lo: int, hi: int) -> None:
        """Grow the bin window with zero rows so that it spans bins lo..hi."""
        if self._bins is None:
            self._bins, self._bin_lo = np.zeros((hi - lo + 1, self._numel), np.int64), lo
            return
        top = self._bin_lo + len(self._bins) - 1
        below, above = max(self._bin_lo - lo, 0), max(hi - top, 0)
        if below or above:
            grown = np.zeros((len(self._bins) + below + above, self._numel), np.int64)
            grown[below : below + len(self._bins)] = self._bins
            self._bins, self._bin_lo = grown, self._bin_lo - below

    def _flush(self) -> None:
        """Move the bins into the limbs: each int64 row as two exact ≤ 32-bit halves."""
        bins, self._bins, self._bin_load = self._bins, None, 0
        if bins is None:
            return
        for r in np.flatnonzero(bins.any(axis=1)).tolist():
            unit = (self._bin_lo + r) * (1 << _BIN_SHIFT) - 150  # exponent of one bin unit
            limbs, k0 = self._make_room(unit, unit + 63, 2)
            for start in range(0, self._numel, _CHUNK):
                columns = slice(start, start + _CHUNK)
                high = bins[r, columns] >> 31  # floor: bin = high·2^31 + low, 0 ≤ low < 2^31
                low = bins[r, columns] & ((1 << 31) - 1)
                terms: list[_Term] = [
                    (torch.from_numpy(low.astype(np.float64)), 1, unit, unit, unit + 31),
                    (torch.from_numpy(high.astype(np.float64)), 1, unit + 31, unit + 31, unit + 63),
                ]
                _add_digits(limbs[:, columns], k0, terms)

    def _deposit_f64(self, x: torch.Tensor, w: float, block: tuple[int, ...]) -> None:
        """float64 values within one exponent band: split into two 26-bit halves, deposit."""
        bounds = _bit_range(x)
        if bounds is None:
            return
        lowbit, highbit = bounds
        scaled = x * math.ldexp(1.0, -highbit)  # exact: |scaled| < 1, lowest bits stay normal
        bits = scaled.view(torch.int64)
        hi = ((bits + (1 << 26)) & ~((1 << 27) - 1)).view(torch.float64)  # rounded to 26 bits
        lo = scaled - hi  # exact (Sterbenz), |lo| ≤ 2^-27, ≤ 26 significant bits
        low = lowbit - highbit
        terms = _terms(hi, 26, low, 1, highbit, w) + _terms(lo, 26, low, -26, highbit, w)
        self._deposit(terms, block)

    def _deposit(self, terms: list[_Term], block: tuple[int, ...]) -> None:
        """Add each term's digits to the limbs its bits can reach."""
        lowbit = min(t[3] for t in terms)
        highbit = max(t[4] for t in terms)
        rows, k0 = self._make_room(lowbit, highbit, len(terms))
        if block:
            rows = rows.view(-1, *self.shape)[(slice(None), *(slice(0, b) for b in block))]
        _add_digits(rows, k0, terms)

    def _make_room(self, lowbit: int, highbit: int, n_terms: int) -> tuple[torch.Tensor, int]:
        """The limbs k0..k1 that bits [lowbit, highbit) reach (a view) and k0.

        Grows the window and normalises first, so each element can take `n_terms` more digits.
        """
        k0, k1 = lowbit // LIMB_BITS, (highbit - 1) // LIMB_BITS
        if self._pending + n_terms > _HEADROOM:
            self._normalize()
        self._cover(k0, k1)
        self._pending += n_terms
        return self._limbs[k0 - self._lo : k1 - self._lo + 1], k0

    def _cover(self, k0: int, k1: int) -> None:
        """Grow the window with zero rows so that it spans absolute limbs k0..k1."""
        if not self._rows:
            self._lo = k0
            self._limbs = torch.zeros((k1 - k0 + 1, self._numel), dtype=torch.float64)
            return
        below = max(self._lo - k0, 0)
        above = max(k1 - (self._lo + self._rows - 1), 0)
        if below or above:
            grown = torch.zeros((self._rows + below + above, self._numel), dtype=torch.float64)
            grown[below : below + self._rows] = self._limbs
            self._limbs, self._lo = grown, self._lo - below

    def _normalize(self) -> None:
        """One carry pass: every limb back below 2·2^B, so more digits can be added exactly."""
        if self._rows:
            carry = torch.trunc(self._limbs / _RADIX)  # exact: power-of-two scaling
            self._limbs.sub_(carry, alpha=_RADIX)
            self._limbs[1:].add_(carry[:-1])
            if bool(carry[-1].any()):
                self._limbs = torch.cat([self._limbs, carry[-1:]])
        self._pending = min(self._pending, 2)

    def _copy(self) -> ExactSum:
        """An independent accumulator with the same state."""
        self._flush()
        twin = ExactSum(self.shape)
        twin._lo, twin._pending, twin.count = self._lo, self._pending, self.count
        twin._limbs = self._limbs.clone()
        return twin


def exact_weighted_mean(values: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w·x / Σ w in float64: both sums exact and rounded once, then one float64 division.

    Deterministic whatever the order of the inputs; all zeros when Σ w = 0.
    """
    if not values or len(values) != len(weights):
        raise ValueError("need at least one value and exactly one weight per value")
    acc = ExactSum(tuple(values[0].shape))
    for value, weight in zip(values, weights, strict=True):
        acc.add(value, weight)
    total = math.fsum(float(w) for w in weights)  # exact sum, correctly rounded
    if total == 0.0:
        return torch.zeros(acc.shape, dtype=torch.float64)
    return acc.result() / total


@functools.lru_cache(maxsize=4096)
def _weight_parts(weight: float, chunk: int) -> tuple[tuple[int, int, int], ...]:
    """w = Σ q·2^e with odd q of ≤ chunk bits, as (q, e, bit length of q)."""
    num, den = weight.as_integer_ratio()
    exp = 1 - den.bit_length()  # den is a power of two
    parts = []
    while num:
        zeros = (num & -num).bit_length() - 1
        num, exp = num >> zeros, exp + zeros
        q = num & ((1 << chunk) - 1)
        parts.append((q, exp, q.bit_length()))
        num, exp = num >> chunk, exp + chunk
    return tuple(parts)


def _terms(
    piece: torch.Tensor, bits: int, low: int, high: int, shift: int, w: float
) -> list[_Term]:
    """Terms piece·q·2^(e+shift) for the chunks q·2^e of w; piece has ≤ bits-bit values.

    Every nonzero piece value is a multiple of 2^low and below 2^high in magnitude.
    """
    parts = _weight_parts(w, 53 - bits)  # bits + chunk ≤ 53: piece·q is exact in float64
    return [(piece, q, e + shift, low + e + shift, high + n + e + shift) for q, e, n in parts]


@functools.lru_cache(maxsize=64)
def _positions(shape: tuple[int, ...], block: tuple[int, ...]) -> np.ndarray:
    """Flat indices, in a tensor of `shape`, of its leading `block` (all of it for `()`)."""
    index = np.arange(math.prod(shape), dtype=np.int64).reshape(shape)
    if block:
        index = index[tuple(slice(0, b) for b in block)]
    return np.ascontiguousarray(index).reshape(-1)


def _bin_rows(exps: list[np.ndarray]) -> tuple[int, int] | None:
    """Lowest and highest fast-path bin of float32 values given by their biased exponents.

    None when there are no values; ValueError on NaN or Inf (exponent 255), so a bad update
    fails before it changes anything.
    """
    if not exps or not exps[0].size:
        return None
    lo, hi = min(int(e.min()) for e in exps), max(int(e.max()) for e in exps)
    if hi == 0xFF:
        raise ValueError("values must be finite (got NaN or Inf)")
    return lo >> _BIN_SHIFT, hi >> _BIN_SHIFT


def _add_digits(rows: torch.Tensor, k0: int, terms: list[_Term]) -> None:
    """Add each term's digits to `rows`, the limbs k0, k0+1, … of the term's elements."""
    shape = rows.shape
    for piece, q, exp, _, _ in terms:
        scales = [math.ldexp(q, exp - LIMB_BITS * k) for k in range(k0, k0 + shape[0])] + [0.0]
        # (m+1, numel): T_r = value / 2^(B·(k0+r)) truncated; the extra row is zero.
        trunc = torch.outer(torch.tensor(scales, dtype=torch.float64), piece).trunc_()
        digits = torch.sub(trunc[:-1], trunc[1:], alpha=_RADIX)  # T_r − 2^B·T_{r+1}
        rows.add_(digits.view(shape))


def _rounded(limbs: torch.Tensor, lo: int) -> torch.Tensor:
    """Limbs (n, numel) whose row 0 is absolute limb `lo` → their sums, float64, rounded once."""
    digits = torch.zeros((limbs.shape[0] + 1, limbs.shape[1]), dtype=torch.int64)  # +1: carry
    digits[:-1] = limbs  # exact: |limb| < 2^53
    _propagate(digits)
    negative = digits[-1] < 0  # lower digits are in [0, 2^B): the top one has the sign
    digits.mul_(1 - 2 * negative.long())  # |sum|, then normalise again
    _propagate(digits)
    magnitude = _round_magnitude(digits, lo)
    return torch.where(negative, -magnitude, magnitude)


def _as_float(value: torch.Tensor) -> torch.Tensor:
    """Flat, contiguous CPU float32/float64 copy-or-view of value (half types widen exactly)."""
    x = value.detach().to("cpu")
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if x.dtype not in _FORMATS:
        raise TypeError(f"ExactSum takes float32 or float64 tensors, got {x.dtype}")
    return x.contiguous().view(-1)


def _bit_range(x: torch.Tensor) -> tuple[int, int] | None:
    """(low, high): nonzero |x| are multiples of 2^low and < 2^high; None if all zero."""
    if x.numel() == 0:
        return None
    int_dtype, abs_mask, inf_bits, mant_bits, low_off, high_off = _FORMATS[x.dtype]
    bits = x.view(int_dtype).bitwise_and(abs_mask)
    smallest, largest = (int(v) for v in torch.aminmax(bits))
    if largest >= inf_bits:
        raise ValueError("values must be finite (got NaN or Inf)")
    if largest == 0:
        return None
    if smallest == 0:  # zeros present: the smallest nonzero wraps past them
        smallest = int(bits.sub_(1).bitwise_and_(abs_mask).min()) + 1
    low = max(smallest >> mant_bits, 1) - low_off
    return low, max(largest >> mant_bits, 1) - high_off


def _bands(x: torch.Tensor, low: int, high: int) -> list[torch.Tensor]:
    """Split float64 x into tensors whose exponents span < _BAND_BITS (so scaling is exact)."""
    if high - low <= _BAND_BITS + 53:
        return [x]
    exponent = ((x.view(torch.int64) >> 52) & 0x7FF).clamp_(min=1)
    band = (exponent - (low + 1075)) // _BAND_BITS
    return [torch.where(band == j, x, 0.0) for j in range(int(band.max()) + 1)]


def _is_integral(limbs: torch.Tensor, bound: float) -> bool:
    """Whether every limb is a finite integer of magnitude ≤ bound."""
    if not limbs.numel():
        return True
    return (
        bool(torch.isfinite(limbs).all())
        and bool((limbs == limbs.trunc()).all())
        and (float(limbs.abs().max()) <= bound)
    )


def _propagate(digits: torch.Tensor) -> None:
    """In place: carries so that rows 0..n-2 are in [0, 2^B); the last row keeps the sign."""
    for k in range(digits.shape[0] - 1):
        carry = digits[k] >> LIMB_BITS  # floor division by 2^B
        digits[k] -= carry << LIMB_BITS
        digits[k + 1] += carry


def _round_magnitude(digits: torch.Tensor, lo: int) -> torch.Tensor:
    """Nonnegative normalised digits (n, numel) → float64, correctly rounded.

    Takes the leading 62 bits with the rest folded into a sticky bit (round to odd), converts
    that int64 to float64 (round to nearest even; exact overall since 62 ≥ 53 + 2) and scales
    by a power of two. Results below 2^-1022 are rounded in Python ints instead.
    """
    n = digits.shape[0]
    rows = torch.arange(n).view(n, 1)
    nonzero = digits != 0
    top = torch.where(nonzero, rows, -1).amax(0)  # (numel,) highest nonzero row
    zero = top < 0
    top.clamp_(min=0)
    lead = digits.gather(0, top.view(1, -1)).view(-1)
    nbits = torch.frexp(lead.double()).exponent.long()  # bit length of the leading digit
    reach = -(-(_TOP_BITS - 1) // LIMB_BITS)  # rows below `top` that hold the 62 bits
    sticky = torch.zeros_like(zero)
    for k in range(n - reach - 1):  # rows wholly below the 62 bits only set the sticky bit
        sticky |= nonzero[k] & (top - reach > k)
    mantissa = torch.zeros_like(lead)
    for j in range(reach + 1):
        row = top - j
        digit = digits.gather(0, row.clamp(min=0).view(1, -1)).view(-1) * (row >= 0)
        shift = _TOP_BITS - nbits - LIMB_BITS * j
        right = (-shift).clamp(0, _TOP_BITS)
        mantissa |= (digit << shift.clamp(min=0)) >> right
        sticky |= (digit & ((1 << right) - 1)) != 0
    mantissa |= sticky.long()
    leading = LIMB_BITS * (lo + top) + nbits - 1  # exponent of the leading bit
    power = ((leading.clamp(-1022, 1023) + 1023) << 52).view(torch.float64)  # 2^leading
    magnitude = mantissa.double() * 2.0 ** (1 - _TOP_BITS) * power  # exact scaling
    magnitude = torch.where(leading > 1023, math.inf, magnitude)
    magnitude = torch.where(zero, 0.0, magnitude)
    tiny = ((leading < -1022) & ~zero).nonzero().view(-1).tolist()
    for i in tiny:  # subnormal range: a second rounding would be wrong, so round exactly
        exact = sum(int(d) << (LIMB_BITS * k) for k, d in enumerate(digits[:, i].tolist()))
        magnitude[i] = exact / (1 << -(LIMB_BITS * lo))
    return magnitude
