"""Lets Inductor generate Triton for CPU tensors (cpu_backend="triton") and run it in Triton's interpreter.

Inductor's Triton code generation asks the active Triton driver for its target (to key its caches); the pip
Triton has no CPU driver, and TRITON_INTERPRET=1 provides none. This driver answers for the interpreter,
naming an sm_90 CUDA target so code generation takes the GPU's code paths; every kernel then runs in the
interpreter (Inductor launches through it when TRITON_INTERPRET=1). The interpreter has no CUDA libdevice,
which Inductor's generated code calls for erf, tanh, rsqrt...: `InterpretedLibdevice` stands in for it.
Tests only: nothing here is compiled.
"""

from __future__ import annotations

import torch
import torch._inductor.runtime.triton_helpers as triton_helpers
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver


class InterpreterDriver(DriverBase):
    @classmethod
    def is_active(cls):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_device_interface(self):
        return torch.cpu

    def get_benchmarker(self):
        from triton.testing import do_bench

        return do_bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(1)

    def clear_cache(self, cache):
        pass

    def map_python_to_cpp_type(self, ty):
        return ty


class InterpretedLibdevice:
    """libdevice as the interpreter runs it: tl.math's functions (which it implements), and tanh."""

    def __getattr__(self, name):
        return getattr(tl.math, name)

    @staticmethod
    def tanh(x):
        return 2 * tl.sigmoid(2 * x) - 1


def install() -> None:
    driver.set_active(InterpreterDriver())
    triton_helpers.libdevice = InterpretedLibdevice()  # generated kernels import it from here
