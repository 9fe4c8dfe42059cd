"""llmint8::onednn_int8_mm: the CPU linear's GEMM, one oneDNN u8 x s8 GEMM on a weight packed for oneDNN.

oneDNN's VNNI int8 GEMM wants unsigned activations and a prepacked weight. X_q + 128 as uint8 with zero-point
128 gives exactly the signed product, and with unit scales the GEMM returns the int32 accumulator converted to
fp32. Without VNNI (or AMX), x86 int8 GEMMs add u8 x s8 products in pairs into saturating int16 (vpmaddubsw), which
is wrong for activations above 128; there each row is split into two halves of at most 128 (split_rows_gemm).
An int8 weight on a CPU keeps its codes only in the packed layout (int8pass.Int8Weight), so the outlier columns
W_q[:, O] are read back through the same GEMM: one extra activation row per outlier column, all 128 (zero)
but a 129 (one) at that column, yields that column of W_q exactly. Decode (M = 1) thus still reads the
weights once; columns read back are kept for later calls (PackedWeight). Past MAX_ONE_HOT_ROWS new outlier
columns the packed weight is unpacked instead. Without oneDNN the CPU linear (linear.py) uses torch._int_mm and
llmint8::outlier_matmul on the dense codes instead.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref

import torch
from torch.utils.weak import WeakIdKeyDictionary

log = logging.getLogger("int8pass")

ZERO_POINT = 128
# Past this many outlier columns, unpacking the whole weight (~1 GB/s) beats one GEMM row per column.
MAX_ONE_HOT_ROWS = 256
# Evaluated once: Dynamo cannot trace torch.backends.mkldnn.is_available().
ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_prepack")
_CPU = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
# u8 x s8 products are summed in int32 only with VNNI or AMX; elsewhere pairs saturate in int16.
EXACT_U8_GEMM = any(_CPU.get(flag, False) for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


class PackedWeight:
    """A weight's codes in oneDNN's packed layout, plus the outlier columns of W_q read back from it so far.

    W_q[:, k] is a constant of the weight, and emergent features recur in the same dims call after call, so
    each column is extracted once and kept (at most 1/64 of the weight's bytes); no activation statistics are
    carried between calls.
    """

    def __init__(self, codes: torch.Tensor):
        n, k = codes.shape
        self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
        self.slots: dict[int, int] = {}  # column -> row of `columns`
        self.columns = torch.empty((max(8, k // 64), n), dtype=torch.int8)
        self.lock = threading.Lock()

    def lookup(self, cols: list[int]) -> list[int | None]:
        with self.lock:
            return [self.slots.get(c) for c in cols]

    def remember(self, cols: list[int], codes: torch.Tensor) -> None:
        with self.lock:
            for col, row in zip(cols, codes):
                if col not in self.slots and len(self.slots) < len(self.columns):
                    self.columns[len(self.slots)] = row.to(torch.int8)
                    self.slots[col] = len(self.slots)


# oneDNN's packed tensors cannot be inputs of a compiled graph, so a weight packed for oneDNN owns its PackedWeight
# and carries a handle to it: an int64 [1] tensor holding an id that is never reused. The graph passes the handle;
# the GEMM finds the codes by its value (so a copy of the handle names the same codes). Weak values: the entry goes
# when the weight that owns the PackedWeight does.
_BY_HANDLE: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)
_PACKING = threading.Lock()


def pack(codes: torch.Tensor, handle: torch.Tensor | None = None) -> tuple[PackedWeight, torch.Tensor]:
    """`codes` (int8 [N, K], CPU) in oneDNN's layout, registered under `handle` (a new one when None, else the
    weight's own, which then names the new codes); returns (the PackedWeight, which the weight must own, handle)."""
    if not ONEDNN:
        raise RuntimeError("llmint8: this torch has no oneDNN, so int8 weights cannot be packed for it")
    packed = PackedWeight(codes)
    if handle is None:
        handle = torch.tensor([next(_HANDLES)], dtype=torch.int64)
    with _PACKING:
        _BY_HANDLE[int(handle)] = packed
    return packed, handle


def packed_by_handle(handle: torch.Tensor) -> PackedWeight:
    with _PACKING:
        packed = _BY_HANDLE.get(int(handle))
    if packed is None:
        raise RuntimeError(f"llmint8: no oneDNN-packed int8 weight has handle {int(handle)} (the weight that owned it "
                           "was freed); pack codes with int8pass.Int8Weight")
    return packed


# A weight kept dense (made for a Triton compile) that the CPU GEMM runs: a packed copy, held besides the dense codes
# and made again when they change in place
_DENSE_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def packed_copy(codes: torch.Tensor) -> PackedWeight:
    with _PACKING:
        version, packed = _DENSE_COPIES.get(codes, (None, None))
        if version != codes._version:
            log.warning("llmint8: an int8 weight [%d, %d] kept dense is run by the CPU GEMM: keeping a "
                        "oneDNN-packed copy of its codes besides them", *codes.shape)
            packed = PackedWeight(codes)
            _DENSE_COPIES[codes] = (codes._version, packed)
        return packed


@torch.library.custom_op("llmint8::onednn_int8_mm", mutates_args=())
def onednn_int8_mm(
    x_q_shifted: torch.Tensor,
    x: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_count: torch.Tensor,
    weight_q: torch.Tensor | None,
    packed_handle: torch.Tensor | None,
    out_features: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One GEMM: (float(X_q . W_q^T), X[:, O] . W_q[:, O]^T), both fp32 [M, N].

    x_q_shifted is X_q + 128 as uint8. The weight is its packed codes' handle (packed_handle), or its dense codes
    weight_q [N, K] (which get a packed copy, made once).
    """
    m, k = x_q_shifted.shape
    n = out_features
    weight = packed_by_handle(packed_handle) if packed_handle is not None else packed_copy(weight_q)
    cols = outlier_indices[: int(outlier_count.item())].tolist()
    slots = weight.lookup(cols)
    missing_at = [i for i, slot in enumerate(slots) if slot is None]
    missing = [cols[i] for i in missing_at]
    extract_in_gemm = 0 < len(missing) <= MAX_ONE_HOT_ROWS
    rows = x_q_shifted
    if extract_in_gemm:
        one_hot = torch.full((len(missing), k), ZERO_POINT, dtype=torch.uint8)
        one_hot[torch.arange(len(missing)), missing] = ZERO_POINT + 1
        rows = torch.cat([x_q_shifted, one_hot])
    if rows.shape[0] == 0:
        return x.new_zeros((0, n), dtype=torch.float32), x.new_zeros((0, n), dtype=torch.float32)
    out = _gemm(rows, weight.packed, n) if EXACT_U8_GEMM else split_rows_gemm(rows, weight.packed, n)
    if not cols:
        return out, x.new_zeros((m, n), dtype=torch.float32)
    # W_q[:, O]^T as fp32 [|O|, N]: cached columns, plus new ones from the one-hot rows or, for many, from
    # unpacking the weight (to_dense gives W_q^T)
    codes = torch.empty((len(cols), n), dtype=torch.float32)
    cached = [i for i, slot in enumerate(slots) if slot is not None]
    if cached:
        codes[cached] = weight.columns[[slots[i] for i in cached]].float()
    if missing:
        new_codes = out[m:] if extract_in_gemm else weight.packed.to_dense()[missing].float()
        codes[missing_at] = new_codes
        weight.remember(missing, new_codes)
    acc = out[:m].clone() if extract_in_gemm else out
    return acc, x[:, cols].float() @ codes


def _gemm(rows: torch.Tensor, packed: torch.Tensor, n: int, zero_point: int = ZERO_POINT) -> torch.Tensor:
    """(rows - zero_point) . W_q^T as fp32, for uint8 rows and the packed weight."""
    return torch.ops.onednn.qlinear_pointwise.default(
        rows, 1.0, zero_point, packed, torch.ones(n), torch.zeros(n, dtype=torch.int64),
        None, 1.0, 0, torch.float32, "none", [], "",
    )


def split_rows_gemm(rows: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """The same product on CPUs whose int8 GEMM saturates pairs of u8 x s8 products in int16: each row u is
    split into a = min(u, 127) and b = u - a <= 128, both with zero-point 64, so (a - 64) + (b - 64) = u - 128 and
    every pair stays within int16 (2 * 128 * 127 < 2**15). One GEMM over both halves; the halves are exact in fp32
    while below 2**24 and are added in fp64, so the result is the int32 accumulator rounded once, as on VNNI."""
    low = rows.clamp(max=127)
    out = _gemm(torch.cat([low, rows - low]), packed, n, ZERO_POINT // 2)
    m = rows.shape[0]
    return (out[:m].double() + out[m:].double()).float()


@onednn_int8_mm.register_fake
def _(x_q_shifted, x, outlier_indices, outlier_count, weight_q, packed_handle, out_features):
    shape = (x_q_shifted.shape[0], out_features)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)
