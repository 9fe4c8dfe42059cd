import importlib.util
import os

import pytest
import torch

# Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors. The mode is fixed when a kernel
# is decorated, so it is set here, before any test module imports int8pass.lowering's Triton kernels.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    if importlib.util.find_spec("triton") is not None:  # Inductor's Triton code for CPU tensors, interpreted
        from tests import interpreter_driver

        interpreter_driver.install()
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("long", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
