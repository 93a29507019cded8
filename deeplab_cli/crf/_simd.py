"""Eight float32 lanes as one value inside numba kernels: explicit SIMD for the CRF's label vectors.

Why: LLVM's loop vectoriser unrolls a loop over labels four vectors deep (32 floats), so a label row of
24 floats (21 classes, padded) never enters the vector body and runs four lanes at a time in the
remainder loop. These intrinsics emit ``<8 x float>`` operations directly: one AVX register per 8 labels
on x86, two SSE/NEON registers elsewhere (LLVM legalises the width). The arithmetic is plain IEEE
``fmul``/``fadd`` without fast-math flags, so every lane rounds exactly as the scalar code would (no
contraction into fused multiply-adds), and the kernels keep their bit-exact agreement with densecrf.

Rows are 1-D float32 arrays (usually ``values[v]`` of a C-contiguous 2-D array); ``j`` must leave 8
floats in the row (rows are padded to a multiple of 8; nothing is bounds-checked here).

numba's disk cache of the kernels is keyed on :mod:`._numba_kernels`' own file: after changing this one,
change (or touch) that one too, or processes keep loading the old machine code.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, errors
from numba.extending import intrinsic, models, register_model

LANES = 8
_VECTOR = ir.VectorType(ir.FloatType(), LANES)


class Float32x8(types.Type):
    """The numba type of eight float32 lanes."""

    def __init__(self) -> None:
        super().__init__(name="float32x8")


float32x8 = Float32x8()


@register_model(Float32x8)
class _Float32x8Model(models.PrimitiveModel):
    def __init__(self, dmm: models.DataModelManager, fe_type: Float32x8) -> None:
        super().__init__(dmm, fe_type, _VECTOR)


def _is_float32_row(row: types.Type) -> bool:
    return isinstance(row, types.Array) and row.dtype == types.float32 and row.ndim == 1 and row.layout == "C"


def _lane_pointer(context, builder, sig, args) -> ir.Value:  # noqa: ANN001
    """``&row[j]`` as a pointer to eight floats, for an intrinsic called as ``f(row, j, ...)``."""
    data = context.make_array(sig.args[0])(context, builder, args[0]).data
    at = context.cast(builder, args[1], sig.args[1], types.intp)
    return builder.bitcast(builder.gep(data, [at]), _VECTOR.as_pointer())


@intrinsic
def load8(typingctx, row, j):  # noqa: ANN001, ANN201 - numba's intrinsic protocol
    """``row[j:j+8]`` as one value."""
    if not (_is_float32_row(row) and isinstance(j, types.Integer)):
        raise errors.TypingError(f"load8 needs a contiguous 1-D float32 row and an index, got {row}, {j}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return builder.load(_lane_pointer(context, builder, sig, args), align=4)

    return float32x8(row, j), codegen


@intrinsic
def store8(typingctx, row, j, value):  # noqa: ANN001, ANN201
    """``row[j:j+8] = value``."""
    if not (_is_float32_row(row) and isinstance(j, types.Integer) and value == float32x8):
        raise errors.TypingError(f"store8 needs a float32 row, an index and lanes, got {row}, {j}, {value}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        builder.store(args[2], _lane_pointer(context, builder, sig, args), align=4)
        return context.get_dummy_value()

    return types.none(row, j, value), codegen


@intrinsic
def splat8(typingctx, x):  # noqa: ANN001, ANN201
    """Eight copies of the float32 ``x``."""
    if x != types.float32:
        raise errors.TypingError(f"splat8 needs a float32, got {x}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        undefined = ir.Constant(_VECTOR, ir.Undefined)
        one = builder.insert_element(undefined, args[0], ir.Constant(ir.IntType(32), 0))
        every_lane_from_0 = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES)
        return builder.shuffle_vector(one, undefined, every_lane_from_0)

    return float32x8(x), codegen


def _binary(name: str):  # noqa: ANN202
    def typer(typingctx, a, b):  # noqa: ANN001, ANN202
        if a != float32x8 or b != float32x8:
            raise errors.TypingError(f"{name} needs two float32x8, got {a}, {b}")

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            return getattr(builder, name)(args[0], args[1])

        return float32x8(a, b), codegen

    typer.__name__ = f"v{name[1:]}"
    return intrinsic(typer)


vadd = _binary("fadd")  # lane-wise a + b
vsub = _binary("fsub")  # lane-wise a - b
vmul = _binary("fmul")  # lane-wise a * b
vdiv = _binary("fdiv")  # lane-wise a / b


def _splat_constant(value: float) -> ir.Constant:
    return ir.Constant(_VECTOR, [float(np.float32(value))] * LANES)


def _larger(builder: ir.IRBuilder, a: ir.Value, b: ir.Value) -> ir.Value:
    """``a if a > b else b`` lane-wise (the scalar code's comparison, NaN-free inputs assumed)."""
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


@intrinsic
def vmax(typingctx, a, b):  # noqa: ANN001, ANN201
    """Lane-wise ``a if a > b else b``."""
    if a != float32x8 or b != float32x8:
        raise errors.TypingError(f"vmax needs two float32x8, got {a}, {b}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return _larger(builder, args[0], args[1])

    return float32x8(a, b), codegen


def _reduction(name: str, combine):  # noqa: ANN001, ANN202
    def typer(typingctx, a):  # noqa: ANN001, ANN202
        if a != float32x8:
            raise errors.TypingError(f"{name} needs a float32x8, got {a}")

        def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
            value, width = args[0], LANES
            while width > 1:  # halves combined lane by lane: 8 -> 4 -> 2 -> 1 (three steps)
                width //= 2
                lanes = ir.VectorType(ir.IntType(32), width)
                low = builder.shuffle_vector(value, value, ir.Constant(lanes, list(range(width))))
                high = builder.shuffle_vector(value, value, ir.Constant(lanes, list(range(width, 2 * width))))
                value = combine(builder, low, high)
            return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))

        return types.float32(a), codegen

    typer.__name__ = name
    return intrinsic(typer)


hmax = _reduction("hmax", _larger)  # the largest lane
hsum = _reduction("hsum", lambda builder, a, b: builder.fadd(a, b))  # the lanes' sum, pairwise

# Cephes' single-precision exp: exp(x) = 2**n * exp(r), n = round(x / ln 2), |r| <= ln(2)/2, with a
# degree-6 polynomial for exp(r) (~1 ulp, as Eigen's vectorised exp that densecrf's softmax uses).
_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375
_LN2_LO = -2.12194440e-4
_EXP_MIN = -87.0  # exp(-87) ~ 1.6e-38, still a normal float32; below it the scale factor would not be
_EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)


@intrinsic
def vexp(typingctx, x):  # noqa: ANN001, ANN201
    """Lane-wise ``exp(max(x, -87))`` for ``x <= 0`` (softmax arguments), Cephes' polynomial."""
    if x != float32x8:
        raise errors.TypingError(f"vexp needs a float32x8, got {x}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        v = _larger(builder, args[0], _splat_constant(_EXP_MIN))
        fadd, fmul, fsub = builder.fadd, builder.fmul, builder.fsub
        floor_type = ir.FunctionType(_VECTOR, [_VECTOR])
        floor = cgutils.get_or_insert_function(builder.module, floor_type, "llvm.floor.v8f32")
        n = builder.call(floor, [fadd(fmul(v, _splat_constant(_LOG2E)), _splat_constant(0.5))])
        v = fsub(fsub(v, fmul(n, _splat_constant(_LN2_HI))), fmul(n, _splat_constant(_LN2_LO)))
        y = _splat_constant(_EXP_POLY[0])
        for coefficient in _EXP_POLY[1:]:
            y = fadd(fmul(y, v), _splat_constant(coefficient))
        e = fadd(fadd(fmul(y, fmul(v, v)), v), _splat_constant(1.0))
        ints = ir.VectorType(ir.IntType(32), LANES)
        exponent = builder.add(builder.fptosi(n, ints), ir.Constant(ints, [127] * LANES))
        scale = builder.bitcast(builder.shl(exponent, ir.Constant(ints, [23] * LANES)), _VECTOR)
        return fmul(e, scale)

    return float32x8(x), codegen


# Cephes' single-precision log: x = m 2**e with m in [sqrt(1/2), sqrt(2)), log(x) = log(m) + e ln 2, with
# a degree-8 polynomial for log(1 + (m - 1)) and ln 2 split in two parts (~1 ulp).
_SQRT_HALF = 0.707106781186547524
_LOG_POLY = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)


@intrinsic
def vlog(typingctx, x):  # noqa: ANN001, ANN201
    """Lane-wise natural log of positive normal floats (the unary's ``log(max(p, 1e-8))``), Cephes'
    polynomial; zero, negative, subnormal, infinite or NaN lanes give meaningless values."""
    if x != float32x8:
        raise errors.TypingError(f"vlog needs a float32x8, got {x}")

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fadd, fmul, fsub = builder.fadd, builder.fmul, builder.fsub
        ints = ir.VectorType(ir.IntType(32), LANES)

        def int_lanes(value: int) -> ir.Constant:
            return ir.Constant(ints, [value] * LANES)

        bits = builder.bitcast(args[0], ints)
        exponent = builder.sub(builder.lshr(bits, int_lanes(23)), int_lanes(126))  # x = m 2**e, m in [1/2, 1)
        mantissa = builder.or_(builder.and_(bits, int_lanes(0x007FFFFF)), int_lanes(0x3F000000))
        m = builder.bitcast(mantissa, _VECTOR)
        small = builder.fcmp_ordered("<", m, _splat_constant(_SQRT_HALF))  # then use 2m and e - 1
        e = builder.sitofp(builder.sub(exponent, builder.zext(small, ints)), _VECTOR)
        v = fsub(builder.select(small, fadd(m, m), m), _splat_constant(1.0))
        z = fmul(v, v)
        y = _splat_constant(_LOG_POLY[0])
        for coefficient in _LOG_POLY[1:]:
            y = fadd(fmul(y, v), _splat_constant(coefficient))
        y = fmul(fmul(y, v), z)
        y = fadd(y, fmul(e, _splat_constant(_LN2_LO)))
        y = fadd(y, fmul(z, _splat_constant(-0.5)))
        return fadd(fadd(v, y), fmul(e, _splat_constant(_LN2_HI)))

    return float32x8(x), codegen
