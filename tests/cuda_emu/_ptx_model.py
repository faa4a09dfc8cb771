"""NumPy models of the warp instructions, written from the PTX ISA text (not from the emulator).

Notation of the ISA: lane l, g = l >> 2 (groupID), t = l & 3 (threadID_in_group). A 32-bit register
holding two 16-bit elements keeps the lower-indexed element in bits 0-15.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

LANES = np.arange(32)
G, T = LANES >> 2, LANES & 3

# Valid 4-bit codes of one 2:4 chunk under ordered_metadata: (first position, second position).
ORDERED_PAIRS = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]


def bits16(x, dtype) -> np.ndarray:
    """The 16-bit patterns of x rounded to bf16 or f16."""
    if dtype == "float16":
        return np.asarray(x, np.float16).view(np.uint16)
    return np.asarray(x, np.float32).astype(jnp.bfloat16).view(np.uint16)


def values16(bits, dtype) -> np.ndarray:
    """16-bit patterns -> float64."""
    bits = np.asarray(bits, np.uint16)
    if dtype == "float16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def pack2(lo, hi) -> np.ndarray:
    return np.asarray(lo, np.uint32) | (np.asarray(hi, np.uint32) << 16)


def a_fragments_m16n8k16(a_bits) -> np.ndarray:
    """[16, 16] 16-bit A -> [32, 4] registers, per the ISA's m16n8k16 A figure.

    Elements a0..a7 of a lane: row g for a0, a1, a4, a5, else g + 8; column 2t + (i & 1), + 8 for
    i >= 4. Register j holds (a_2j, a_2j+1).
    """
    regs = np.zeros((32, 4), np.uint32)
    for j in range(4):
        elems = []
        for i in (2 * j, 2 * j + 1):
            row = G if i in (0, 1, 4, 5) else G + 8
            col = 2 * T + (i & 1) + (8 if i >= 4 else 0)
            elems.append(a_bits[row, col])
        regs[:, j] = pack2(*elems)
    return regs


def b_fragments(b_bits, k) -> np.ndarray:
    """[k, 8] 16-bit B -> [32, k / 8] registers: b_i at row 2t + (i & 1) + 8 (i >> 1), column g."""
    nregs = k // 8
    regs = np.zeros((32, nregs), np.uint32)
    for j in range(nregs):
        rows = [2 * T + 8 * j, 2 * T + 8 * j + 1]
        regs[:, j] = pack2(b_bits[rows[0], G], b_bits[rows[1], G])
    return regs


def c_fragments(c) -> np.ndarray:
    """[16, 8] f32 C/D -> [32, 4]: c_i at row g + 8 (i >> 1), column 2t + (i & 1)."""
    out = np.zeros((32, 4), np.float32)
    for i in range(4):
        out[:, i] = c[G + 8 * (i >> 1), 2 * T + (i & 1)]
    return out


def d_matrix(frags) -> np.ndarray:
    """[32, 4] D fragments -> [16, 8]."""
    d = np.zeros((16, 8), np.float32)
    frags = np.asarray(frags, np.float32).reshape(32, 4)
    for i in range(4):
        d[G + 8 * (i >> 1), 2 * T + (i & 1)] = frags[:, i]
    return d


def sparse_a(rng, dtype):
    """A random 2:4 A: (dense [16, 32] float64, packed [16, 16] bits, positions [16, 8, 2])."""
    choice = rng.integers(0, 6, size=(16, 8))
    positions = np.array(ORDERED_PAIRS)[choice]
    packed_bits = bits16(rng.standard_normal((16, 16)), dtype)
    packed = values16(packed_bits, dtype)
    dense = np.zeros((16, 32))
    for r in range(16):
        for c in range(8):
            for s in range(2):
                dense[r, 4 * c + positions[r, c, s]] = packed[r, 2 * c + s]
    return dense, packed_bits, positions


def metadata_registers(positions, selector, filler=0) -> np.ndarray:
    """Per-lane metadata for m16n8k32: lane 4g + 2 * selector + h holds rows g (bits 0-15) and
    g + 8 (bits 16-31), K columns 16h..16h+15; chunk c of that half at bits 4c..4c+3 (first position
    in bits 0-1, second in bits 2-3). Other lanes get `filler`."""
    regs = np.full(32, filler, np.uint32)
    for g in range(8):
        for h in range(2):
            word = 0
            for r, shift in ((g, 0), (g + 8, 16)):
                for c in range(4):
                    p0, p1 = positions[r, 4 * h + c]
                    word |= (int(p0) | (int(p1) << 2)) << (shift + 4 * c)
            regs[4 * g + 2 * selector + h] = word
    return regs


def ldmatrix(rows, row_of_lane, num, trans) -> np.ndarray:
    """ldmatrix .m8n8 .x{num} (.trans) .b16: lanes 8i..8i+7 address the rows of matrix i; lane l
    receives row l // 4, columns 2 (l % 4) and + 1 of every matrix (.trans: column l // 4 of rows
    2 (l % 4) and + 1)."""
    rows = np.asarray(rows, np.uint16).reshape(-1, 8)
    out = np.zeros((32, num), np.uint32)
    for i in range(num):
        mat = rows[np.asarray(row_of_lane)[8 * i:8 * i + 8]]  # [8, 8]
        if trans:
            mat = mat.T
        out[:, i] = pack2(mat[LANES // 4, 2 * (LANES % 4)], mat[LANES // 4, 2 * (LANES % 4) + 1])
    return out


# ---------------------------------------------------------------------- per-thread instructions
def lop3(a, b, c, imm) -> np.ndarray:
    """lop3.b32 (PTX ISA): the result's bit i is bit `(a_i << 2) | (b_i << 1) | c_i` of the 8-bit
    truth table `imm` (the ISA's example: the table of a is 0xF0, of b 0xCC, of c 0xAA)."""
    a, b, c = (np.asarray(v, np.uint64) for v in (a, b, c))
    out = np.zeros(a.shape, np.uint64)
    for i in range(32):
        index = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
        out |= ((np.uint64(imm) >> index) & 1) << i
    return out.astype(np.uint32)


# (stored mantissa bits, exponent bias) of the two 16-bit formats.
FORMATS16 = {"float16": (10, 15), "bfloat16": (7, 127)}


def _value16_exact(bits, dtype):
    """One 16-bit pattern -> a Fraction (finite) or a float (inf / nan)."""
    from fractions import Fraction

    with np.errstate(invalid="ignore"):  # NaN patterns cast with a warning.
        v = float(values16(np.array([bits], np.uint16), dtype)[0])
    return Fraction(v) if np.isfinite(v) else v


def _encode16(value, negative, dtype) -> int:
    """A representable magnitude (Fraction, or inf) and a sign -> the 16-bit pattern."""
    if value == np.inf:
        mag = np.uint16(0x7C00 if dtype == "float16" else 0x7F80)
    else:
        mag = bits16(float(value), dtype)  # Exact: the value is representable.
    return int(mag) | (0x8000 if negative else 0)


def round16(exact, dtype) -> int:
    """Round a nonzero exact rational to the 16-bit format, to nearest even, IEEE 754: the
    significand's quantum is 2^(e - mantissa) for |x| in [2^e, 2^(e+1)) and never below the
    subnormals' 2^(1 - bias - mantissa); a result past the largest finite value is infinite."""
    from fractions import Fraction

    mantissa, bias = FORMATS16[dtype]
    negative, mag = exact < 0, abs(exact)
    e = mag.numerator.bit_length() - mag.denominator.bit_length()
    if Fraction(2) ** e > mag:
        e -= 1
    quantum = Fraction(2) ** max(e - mantissa, 1 - bias - mantissa)
    n, rest = divmod(mag, quantum)
    if rest > quantum / 2 or (rest == quantum / 2 and n % 2 == 1):
        n += 1
    largest = (2 - Fraction(2) ** -mantissa) * Fraction(2) ** bias
    result = n * quantum
    return _encode16(np.inf if result > largest else result, negative, dtype)


def _arith16(op, a, b, c, dtype) -> int:
    """One element of {sub, mul, fma}.rn (no .ftz): exact, rounded once. Signed zeros per IEEE 754:
    an exact product's sign is the xor of its factors'; an exact sum of zero is +0 unless both
    addends are -0. Any NaN result is canonical 0x7FFF (only NaN-ness is compared)."""
    va, vb, vc = (_value16_exact(x, dtype) for x in (a, b, c))
    sign = lambda bits: bool(bits & 0x8000)  # noqa: E731
    if op == "sub":  # a - b: the sum a + (-b).
        terms = [(va, sign(a)), (-vb, not sign(b))]
    elif op == "mul":
        terms = [(va * vb if not (isinstance(va, float) or isinstance(vb, float))
                  else float(va) * float(vb), sign(a) != sign(b))]
    else:
        prod = (va * vb if not (isinstance(va, float) or isinstance(vb, float))
                else float(va) * float(vb))
        terms = [(prod, sign(a) != sign(b)), (vc, sign(c))]
    if any(isinstance(t, float) for t, _ in terms):  # inf or nan somewhere
        total = sum(float(t) for t, _ in terms)
        if np.isnan(total):
            return 0x7FFF
        return _encode16(np.inf, total < 0, dtype)
    total = sum(t for t, _ in terms)
    if total == 0:
        return 0x8000 if all(s for _, s in terms) else 0
    return round16(total, dtype)


def packed16(op, a, b, c, dtype) -> np.ndarray:
    """{sub, mul, fma}.rn.{f16x2, bf16x2} on registers of two elements (element 0 in bits 0-15),
    each element independently."""
    out = []
    for ra, rb, rc in zip(*(np.asarray(v, np.uint32).tolist() for v in (a, b, c))):
        lo = _arith16(op, ra & 0xFFFF, rb & 0xFFFF, rc & 0xFFFF, dtype)
        hi = _arith16(op, ra >> 16, rb >> 16, rc >> 16, dtype)
        out.append(lo | (hi << 16))
    return np.array(out, np.uint32)
