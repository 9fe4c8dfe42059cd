"""What the two Triton template lowerings share (int8_mm_dequant.py, fused_linear.py): the tile configs, the Jinja
pieces around the kernels' tile math, and the choice between template configs and the extern op.

Each template is the eager kernel's tile math (triton_gemm.py) followed by Inductor's `store_output`, where Inductor
appends the pointwise ops it fuses (a GELU, a residual add, a cast...). Where Triton is not Inductor's code generator
for the device, the ops stay extern kernel calls. Tile configs: one by heuristic (triton_gemm.gemm_config) by
default; under max-autotune every config for the M class (decode: M <= 16, GEMV-like and weight-bandwidth bound;
prefill: compute bound) is benchmarked and the fastest kept.
"""

from __future__ import annotations

from int8pass.lowering import inductor_api as inductor

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
DECODE_CONFIGS = [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (16, 32, 256, 2, 4)]
PREFILL_CONFIGS = [
    (64, 64, 128, 4, 4), (64, 128, 128, 4, 4), (128, 64, 128, 4, 4), (128, 128, 64, 8, 3), (128, 128, 128, 8, 3),
    (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
]

# Jinja sources. `def_kernel` names the inputs (pointer arguments); `size`/`stride` give their shapes, as
# constants or, for dynamic shapes, kernel arguments; `store_output` writes Y and Inductor's fused epilogue.
OPTIONAL_INPUTS = r"""
{%- set outlier_w = "W_Q" if OUTLIER_CODES else "OW" -%}
{%- set optional_inputs = ([] if OUTLIER_CODES else ["OW"]) + (["BIAS"] if HAS_BIAS else []) -%}
"""
STORE = r"""
    idx_m = rows[:, None]
    idx_n = cols[None, :]
    mask = (idx_m < M) & (idx_n < N)
    {{store_output(("idx_m", "idx_n"), "y", "mask", val_shape=("BLOCK_M", "BLOCK_N"))}}
"""


def configs(m_hint: int) -> list[tuple[int, int, int, int, int]]:
    if not inductor.max_autotune():
        from int8pass.lowering.triton_gemm import gemm_config  # Triton is optional

        c = gemm_config(m_hint)
        return [(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"])]
    return DECODE_CONFIGS if m_hint <= 16 else PREFILL_CONFIGS


def select(name, template, op_args, input_nodes, tile_configs, layout, **meta):
    """The template over the tile configs (benchmarked if more than one), or the extern op."""
    choices: list = []
    for block_m, block_n, block_k, num_warps, num_stages in tile_configs:
        template.maybe_append_choice(
            choices, input_nodes=tuple(input_nodes), layout=layout, num_warps=num_warps, num_stages=num_stages,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **meta,
        )
    if not choices:  # the template could not be generated (logged by Inductor)
        return inductor.fallback(*op_args)
    return inductor.autotune_select_algorithm(name, choices, input_nodes, layout)
