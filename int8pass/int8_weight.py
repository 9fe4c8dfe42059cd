"""Int8Weight: a linear layer's weight as LLM.int8() keeps it, owned by the model like any parameter.

It holds the int8 codes W_q [N, K] (row-major, output channels as rows: bitsandbytes' CB) and the fp32 row absmax
s_w [N] (bitsandbytes' SCB), or, in block mode (`block_size`, docs/design.md §1b), one bf16 scale d_w per block of
block_size columns of each row ([N, ceil(K / block_size)]), and keeps the original weight's shape, dtype and device as its face, so a module whose
weight is an Int8Weight still works as that module:
- `F.linear` (and the `mm`/`addmm` it becomes) runs the llmint8 math (`llmint8::linear`, or `llmint8::block_linear`);
- any other read (print, `.sum()`, indexing, an embedding lookup of a tied weight) sees the dequantized values
  W_q * s_w / 127 in the face dtype, or the original values when they are kept (`original`);
- in-place writes (`copy_` from `load_state_dict`, `mul_`, ...) re-quantize from the written values, into the same
  tensors, so compiled graphs (which read the weight as an input on every call) use them;
- `.to(dtype)` keeps the codes and changes the face dtype; `.to(device)` moves them;
- `torch.save` / `torch.load` (weights_only included, once int8pass is imported) round-trip it exactly.

The codes are the one copy of the weight on every device: the CPU kernel (int8pass/lowering/cpu_linear_kernels.h)
and the Triton kernels read this row-major layout as it is, so nothing is packed or duplicated. Beside them it keeps
each row's sum of codes (int32 [N], 4 bytes a row): the CPU kernel's VNNI and AMX GEMMs multiply X_q + 128 and take
128 times that sum off, which they would otherwise compute with a pass over the weight on every call.
"""

from __future__ import annotations

import hashlib

import torch

from int8pass import process_memory, reference
from int8pass.lowering import cpu_linear
from int8pass.lowering.block_linear import block_linear_on_cpu
from int8pass.lowering.linear import linear_on_cpu
from int8pass.options import DEFAULT_THRESHOLD
from int8pass.subclass_api import eager_call, no_dispatch_mode, torch_function_off, tree_map_only

aten = torch.ops.aten
_F_LINEAR = torch.nn.functional.linear

# Rows quantized at a time: caps the fp32 temporaries of quantizing one weight at ~4 MB each.
_QUANTIZE_BLOCK_ELEMENTS = 1 << 20


def quantize_rows(weight: torch.Tensor, block_size: int = 0,
                  row_absmax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_weight (block_size 0; with row_absmax, the whole rows' s_w of a row-parallel shard) or
    reference.quantize_weight_blocks of a [N, K] weight, a block of rows at a time (rows are independent, so the
    result is bit-identical) so that no whole-weight fp32 temporary is ever allocated."""
    n, k = weight.shape
    codes = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    process_memory.prefer_huge_pages(codes)  # decode streams the codes once per token
    if block_size:
        scale = torch.empty((n, reference.block_count(k, block_size)), dtype=torch.bfloat16, device=weight.device)
    else:
        scale = torch.empty((n,), dtype=torch.float32, device=weight.device)
    rows = max(1, _QUANTIZE_BLOCK_ELEMENTS // max(1, k))
    with torch.no_grad():
        for start in range(0, n, rows):
            block = weight[start:start + rows]
            if block_size:
                codes[start:start + rows], scale[start:start + rows] = reference.quantize_weight_blocks(block, block_size)
            else:
                absmax = None if row_absmax is None else row_absmax[start:start + rows]
                codes[start:start + rows], scale[start:start + rows] = reference.quantize_weight(block, absmax)
    return codes, scale


def code_sums(codes: torch.Tensor) -> torch.Tensor:
    """Each row's sum of the int8 codes [N, K], as int32 [N] (exact: at most 128 K). On CPU as an int8 GEMM with
    columns of ones, which runs at ~7 GB/s where torch's int8 sum runs at ~0.7 (a 14336 x 4096 weight: 8 ms)."""
    if codes.device.type == "cpu":
        return torch._int_mm(codes, codes.new_ones((codes.shape[1], 8)))[:, 0].contiguous()
    return codes.sum(1, dtype=torch.int32)


def row_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max_k |W[n, k]| of a [N, K] weight as fp32 [N], a block of rows at a time (exact in any float dtype)."""
    rows = max(1, _QUANTIZE_BLOCK_ELEMENTS // max(1, weight.shape[-1]))
    if weight.shape[1] == 0:
        return weight.new_zeros(weight.shape[0], dtype=torch.float32)
    return torch.cat([block.abs().amax(dim=1).float() for block in weight.detach().split(rows)])


def all_finite(weight: torch.Tensor) -> bool:
    """No NaN or Inf in a 2-D weight, checked a block of rows at a time (no whole-weight temporaries either)."""
    rows = max(1, _QUANTIZE_BLOCK_ELEMENTS // max(1, weight.shape[-1]))
    return all(bool(torch.isfinite(block).all()) for block in weight.detach().split(rows))


class Int8Weight(torch.Tensor):
    """The int8 form of a linear weight; see the module docstring.

    codes: int8 [N, K], row-major
    scale: fp32 [N], the row absmax s_w; in block mode bf16 [N, ceil(K / block_size)], the block scales d_w
    block_size: 0 (LLM.int8(): one scale per row), or the columns per scale of block mode (32, 64 or 128)
    code_sums: int32 [N], each row's sum of codes (`code_sums`), for the CPU kernel; None in block mode
    original: the floating-point weight, in the face's shape, when kept (`keep_fp_weights`, a weight also read in
        floating point, `outlier_weights="original"`); None otherwise
    transposed: the face is W^T [K, N] (GPT-2's Conv1D stores [in, out]); the codes are [N, K] either way
    threshold: the outlier threshold eager `F.linear` uses (compiled graphs use the backend's option when given)
    """

    codes: torch.Tensor
    scale: torch.Tensor
    code_sums: torch.Tensor | None
    original: torch.Tensor | None
    transposed: bool
    threshold: float
    block_size: int

    @staticmethod
    def __new__(cls, codes, scale, *, dtype, shape, transposed=False, threshold=DEFAULT_THRESHOLD, original=None,
                block_size=0, code_sums=None):
        # contiguous face strides: what the floating-point weight it replaces had (Dynamo guards compare them)
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=dtype, device=scale.device, requires_grad=False
        )

    def __init__(self, codes, scale, *, dtype, shape, transposed=False, threshold=DEFAULT_THRESHOLD, original=None,
                 block_size=0, code_sums=None):
        self.codes = codes
        self.scale = scale
        self.code_sums = code_sums
        self.original = original
        self.transposed = transposed
        self.threshold = float(threshold)
        self.block_size = int(block_size)

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_float(cls, weight: torch.Tensor, *, threshold: float = DEFAULT_THRESHOLD, transposed: bool = False,
                   keep_original: bool = False, block_size: int = 0,
                   row_absmax: torch.Tensor | None = None) -> "Int8Weight":
        """Quantize a floating-point weight ([N, K], or [K, N] with transposed=True) row block by row block; with
        block_size, one scale per block of that many columns (docs/design.md §1b). row_absmax: fp32 [N], each whole
        row's absmax when `weight` holds only some of its columns (a row-parallel shard, §1c), which the codes and
        the scale then use, as the whole weight's would."""
        if not weight.dtype.is_floating_point or weight.dim() != 2:
            raise ValueError(f"Int8Weight.from_float expects a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
        _check_block_size(block_size)
        if row_absmax is not None and block_size:
            raise ValueError("Int8Weight.from_float: row_absmax is the one scale per row of LLM.int8(), not block mode's")
        weight = weight.detach()
        codes, scale = quantize_rows(weight.t() if transposed else weight, block_size, row_absmax)
        if not keep_original:  # read from an mmap'd checkpoint, its pages would stay resident: reclaim them
            process_memory.page_out(weight)
        return cls.from_codes(codes, scale, dtype=weight.dtype, transposed=transposed, threshold=threshold,
                              original=weight if keep_original else None, block_size=block_size)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype, transposed: bool = False,
                   threshold: float = DEFAULT_THRESHOLD, original: torch.Tensor | None = None,
                   block_size: int = 0) -> "Int8Weight":
        """An Int8Weight from int8 codes [N, K] and fp32 row absmax [N] (bitsandbytes' CB and SCB), or with
        block_size, bf16 block scales [N, ceil(K / block_size)]."""
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"Int8Weight codes must be int8 [N, K], got {codes.dtype} {tuple(codes.shape)}")
        _check_block_size(block_size)
        n, k = codes.shape
        if block_size:
            blocks = reference.block_count(k, block_size)
            if scale.shape != (n, blocks) or scale.dtype != torch.bfloat16:
                raise ValueError(f"Int8Weight block scales (block_size {block_size}) must be bfloat16 [{n}, {blocks}], "
                                 f"got {scale.dtype} {tuple(scale.shape)}")
        elif scale.shape != (n,):
            raise ValueError(f"Int8Weight scale must have shape ({n},), got {tuple(scale.shape)}")
        if not dtype.is_floating_point:
            raise ValueError(f"Int8Weight's dtype must be floating point, got {dtype}")
        if not block_size:
            scale = scale.to(torch.float32)
        shape = (k, n) if transposed else (n, k)
        if original is not None and tuple(original.shape) != shape:
            raise ValueError(f"Int8Weight original must have shape {shape}, got {tuple(original.shape)}")
        codes = codes.contiguous()
        return cls(codes, scale.contiguous(), dtype=dtype, shape=shape, transposed=transposed, threshold=threshold,
                   original=original, block_size=block_size, code_sums=None if block_size else code_sums(codes))

    def _like(self, **changes) -> "Int8Weight":
        """A new wrapper over the same inner tensors (views, detach), with some attributes changed."""
        fields = dict(codes=self.codes, scale=self.scale, dtype=self.dtype, transposed=self.transposed,
                      threshold=self.threshold, original=self.original, block_size=self.block_size,
                      code_sums=self.code_sums)
        fields.update(changes)
        n, k = self.out_features, self.in_features
        shape = (k, n) if fields["transposed"] else (n, k)
        codes, scale = fields.pop("codes"), fields.pop("scale")
        return Int8Weight(codes, scale, shape=shape, **fields)

    # ---- what it holds ------------------------------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        return self.scale.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[0] if self.transposed else self.shape[1]

    @property
    def int8_nbytes(self) -> int:
        """Bytes of the codes, scales and code sums, plus the original when kept."""
        kept = self.original.numel() * self.original.element_size() if self.original is not None else 0
        sums = 4 * self.out_features if self.code_sums is not None else 0
        return self.out_features * self.in_features + self.scale.numel() * self.scale.element_size() + sums + kept

    def dequantize(self) -> torch.Tensor:
        """W^ = W_q * s_w / 127 (block mode: W_q * d_w) as a plain tensor of the face's shape and dtype."""
        if self.block_size:
            w = reference.dequantize_blocks(self.codes, self.scale, self.block_size).to(self.dtype)
        else:
            w = reference.dequantize_weight(self.codes, self.scale).to(self.dtype)
        return w.t() if self.transposed else w

    def values(self) -> torch.Tensor:
        """What a floating-point read sees: the original weight when kept, else the dequantized one."""
        return self.original if self.original is not None else self.dequantize()

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T (+ bias) by the llmint8 math, for a weight whose codes' rows are the output channels."""
        # a gradient to record (for x, or a trainable bias of a frozen int8 weight): the op, with its autograd formula
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
        eager_cpu = type(x) is torch.Tensor and x.is_cpu and not needs_grad and no_dispatch_mode()
        if eager_cpu and cpu_linear.runs(x, self.codes):
            # An eager call on a real CPU tensor, nothing tracing it: the kernel's op itself, which checks x and the
            # bias as the Python checks do (this weight's own tensors are valid by construction). Each Python layer
            # skipped matters at decode: after a call that streamed the weight through L2 the interpreter runs from
            # L3 (this method over the op, a 4096 x 4096 one-row call: 22 us with the custom op's layers, 11 without;
            # 4 and 1 with the weight in L1).
            if self.block_size:
                return torch.ops.llmint8.cpu_block_linear.default(x, self.codes, self.scale, bias, self.block_size,
                                                                  self.threshold)
            return torch.ops.llmint8.cpu_linear.default(x, self.codes, self.scale, bias, self.threshold, None,
                                                        self.code_sums)
        if self.block_size:
            run = block_linear_on_cpu if eager_cpu else torch.ops.llmint8.block_linear
            return run(x, self.codes, self.scale, bias, self.block_size, self.threshold)
        run = linear_on_cpu if eager_cpu else torch.ops.llmint8.linear
        return run(x, self.codes, self.scale, bias, self.threshold, None, self.code_sums)

    def __repr__(self, *, tensor_contents=None) -> str:
        kept = ", original kept" if self.original is not None else ""
        blocks = f", block_size={self.block_size}" if self.block_size else ""
        return (f"Int8Weight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, "
                f"threshold={self.threshold}{blocks}{kept}, values:\n{self.values()!r})")

    # ---- tracing: the inner tensors and what is static -----------------------------------------------------------

    def __tensor_flatten__(self):
        names = ["codes", "scale"]
        if self.code_sums is not None:
            names.append("code_sums")
        if self.original is not None:
            names.append("original")
        return names, (self.dtype, self.transposed, self.threshold, self.block_size)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        dtype, transposed, threshold, block_size = meta
        return Int8Weight(inner["codes"], inner["scale"], dtype=dtype, shape=outer_size, transposed=transposed,
                          threshold=threshold, original=inner.get("original"), block_size=block_size,
                          code_sums=inner.get("code_sums"))

    def _stable_hash_for_caching(self) -> str:
        """AOT autograd's cache key for this weight as a graph input: what a compiled graph depends on (the face, the
        static metadata, the inner tensors' layouts), not the values, as for any parameter. (Without it torch hashes
        the same fields itself, after a warning on every compile.)"""
        names, meta = self.__tensor_flatten__()
        inner = [(name, tuple(t.shape), t.stride(), t.storage_offset(), str(t.dtype), str(t.device))
                 for name, t in ((name, getattr(self, name)) for name in names)]
        payload = (type(self).__qualname__, tuple(self.shape), self.requires_grad, str(meta[0]), meta[1:], inner)
        return hashlib.blake2b(repr(payload).encode(), digest_size=16).hexdigest()

    # ---- serialization ------------------------------------------------------------------------------------------

    def __reduce_ex__(self, protocol):
        return (_rebuild, (self.codes, self.scale, self.dtype, self.transposed, self.threshold, self.original,
                           self.block_size))

    def __deepcopy__(self, memo):
        return _copy(self)

    # ---- every aten op on it --------------------------------------------------------------------------------------

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # An eager F.linear of a plain activation (and bias) goes straight to the weight's linear; through aten it
        # would reach __torch_dispatch__ twice (aten.t, then aten.addmm), ~25 us a call. Everything else, and anything
        # compiled or traced (which must see the aten ops, as the FX pass and AOT autograd do), is as with no
        # __torch_function__.
        if func is _F_LINEAR and eager_call():
            x, weight, bias = _linear_arguments(*args, **(kwargs or {}))
            if type(weight) is cls and not weight.transposed and _plain(x) and (bias is None or _plain(bias)):
                return weight.linear(x, bias)
        return torch_function_off(func, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        if func._schema.is_mutable:
            written = _written_arguments(func, args, kwargs)
            if any(isinstance(arg, Int8Weight) for arg in written):
                if func in _RESHAPING or not (args and written[0] is args[0]):
                    raise RuntimeError(f"{func} cannot write into an Int8Weight: it holds int8 codes, not "
                                       "floating-point storage (in-place ops on the weight itself re-quantize)")
                return _write(func, args, kwargs)
        return func(*tree_map_only(Int8Weight, Int8Weight.values, args),
                    **tree_map_only(Int8Weight, Int8Weight.values, kwargs))

    # `param.data = t` swaps storage under a plain tensor; an Int8Weight has none, so it takes t's values instead
    @property
    def data(self) -> "Int8Weight":
        return self._like()

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(self.shape) or value.dtype != self.dtype:
            raise RuntimeError(f"cannot set .data of an Int8Weight {tuple(self.shape)} {self.dtype} to a tensor "
                               f"{tuple(value.shape)} {value.dtype}: assign a new parameter, or .to() it first")
        with torch.no_grad():
            self.copy_(value)

    # in-place re-quantization (the target of every write)
    def requantize_(self, values: torch.Tensor) -> "Int8Weight":
        """Quantize `values` (the face's shape) into this weight, in place: the codes, scales and kept original
        keep their tensors, so graphs compiled on this weight read the new values."""
        values = values.detach()
        if tuple(values.shape) != tuple(self.shape):
            raise RuntimeError(f"cannot write a {tuple(values.shape)} tensor into an Int8Weight of shape {tuple(self.shape)}")
        codes, scale = quantize_rows(values.t() if self.transposed else values, self.block_size)
        self._store(codes, scale, values)
        return self

    def _store(self, codes: torch.Tensor, scale: torch.Tensor, values: torch.Tensor | None) -> None:
        self.scale.copy_(scale)
        self.codes.copy_(codes)
        if self.code_sums is not None:
            self.code_sums.copy_(code_sums(self.codes))
        if self.original is not None:
            self.original.copy_(values if values is not None else self.dequantize())


def _rebuild(codes, scale, dtype, transposed, threshold, original, block_size=0):
    return Int8Weight.from_codes(codes, scale, dtype=dtype, transposed=transposed, threshold=threshold,
                                 original=original, block_size=block_size)


def _check_block_size(block_size: int) -> None:
    if block_size != 0 and block_size not in reference.BLOCK_SIZES:
        raise ValueError(f"Int8Weight block_size must be 0 (one scale per row) or one of {reference.BLOCK_SIZES}, "
                         f"got {block_size!r}")


# torch.load(weights_only=True), the default, accepts only allow-listed globals
torch.serialization.add_safe_globals([_rebuild])

_RESHAPING = {aten.set_.source_Storage_storage_offset, aten.set_.source_Tensor, aten.set_.default,
              aten.set_.source_Storage, aten.resize_.default, aten.as_strided_.default, aten.resize_as_.default}


def _linear_arguments(input, weight, bias=None):
    return input, weight, bias


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter)


def _alias(self, *args, **kwargs):
    return self._like()


def _transpose(self, *dims):
    return self._like(transposed=not self.transposed)


def _transpose_int(self, dim0, dim1):
    return self._like() if dim0 % 2 == dim1 % 2 else _transpose(self)


def _permute(self, dims):
    return self._like() if [d % 2 for d in dims] == [0, 1] else _transpose(self)


def _is_linear_operand(x, weight, *, transposed: bool = True) -> bool:
    """x and weight make x W^T, W being the codes' rows (the output channels): mm and addmm see a weight facing W^T
    (transposed), aten.linear one facing W."""
    return isinstance(weight, Int8Weight) and weight.transposed == transposed and not isinstance(x, Int8Weight)


def _mm(x, weight):
    return weight.linear(x) if _is_linear_operand(x, weight) else NotImplemented


def _addmm(bias, x, weight, *, beta=1, alpha=1):
    if beta != 1 or alpha != 1 or isinstance(bias, Int8Weight) or bias.shape != (weight.shape[-1],):
        return NotImplemented
    return weight.linear(x, bias) if _is_linear_operand(x, weight) else NotImplemented


def _linear(x, weight, bias=None):
    # reached where aten.linear is dispatched whole (torch.export's decompositions keep it), not as mm/addmm
    if _is_linear_operand(x, weight, transposed=False) and not isinstance(bias, Int8Weight):
        return weight.linear(x, bias)
    return NotImplemented


def _copy(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> "Int8Weight":
    """A new weight with its own copies of the codes and scales, on `device`, facing `dtype` (the same codes serve
    activations of another floating dtype)."""
    device = self.device if device is None else torch.device(device)
    dtype = dtype or self.dtype
    original = None if self.original is None else self.original.to(device=device, dtype=dtype, copy=True)
    return Int8Weight.from_codes(self.codes.to(device, copy=True), self.scale.to(device, copy=True), dtype=dtype,
                                 transposed=self.transposed, threshold=self.threshold, original=original,
                                 block_size=self.block_size)


def _to_copy(self, *, dtype=None, device=None, layout=None, pin_memory=None, non_blocking=False, memory_format=None):
    if dtype is not None and not dtype.is_floating_point:
        return NotImplemented  # an integer copy of the values
    return _copy(self, device, dtype)


def _clone(self, *, memory_format=None):
    return _copy(self)


def _copy_(self, src, non_blocking=False):
    if not isinstance(self, Int8Weight):
        return NotImplemented
    if (isinstance(src, Int8Weight) and src.transposed == self.transposed and src.block_size == self.block_size
            and tuple(src.shape) == tuple(self.shape)):
        # int8 into int8 (load_state_dict of an int8 checkpoint): the codes as they are
        values = src.original.to(self.dtype) if self.original is not None and src.original is not None else None
        self._store(src.codes.to(self.scale.device), src.scale.to(self.scale.device), values)
        return self
    return self.requantize_(src.values() if isinstance(src, Int8Weight) else src.to(self.dtype))


def _written_arguments(func, args, kwargs) -> list:
    """The arguments an op writes into, by its schema."""
    written = []
    for index, argument in enumerate(func._schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            if argument.kwarg_only or index >= len(args):
                written.append(kwargs.get(argument.name))
            else:
                written.append(args[index])
    return written


def _write(func, args, kwargs):
    """An in-place op on the weight: run it on its values, then re-quantize them into the weight."""
    self = args[0]
    values = self.values().clone()
    rest = tree_map_only(Int8Weight, Int8Weight.values, (args[1:], kwargs))
    func(values, *rest[0], **rest[1])
    return self.requantize_(values)


_HANDLERS = {
    aten.detach.default: _alias,
    aten.alias.default: _alias,
    aten.t.default: _transpose,
    aten.transpose.int: _transpose_int,
    aten.permute.default: _permute,
    aten.mm.default: _mm,
    aten.addmm.default: _addmm,
    aten.linear.default: _linear,
    aten._to_copy.default: _to_copy,
    aten.clone.default: _clone,
    aten.copy_.default: _copy_,
}
