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

from llvmlite import ir
from numba import types
from numba.core import errors
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
vmul = _binary("fmul")  # lane-wise a * b
