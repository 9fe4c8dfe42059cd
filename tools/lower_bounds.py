"""Print `name==version` for the lower bound (>=) of every dependency pyproject.toml declares, extras included, torch
excepted: the constraints of `tools/dev.sh test-oldest`. Torch stays the CPU wheel that tools/dev.sh installs (the
oldest torch admitted, 2.11, exists on PyPI only as a CUDA build: `tools/dev.sh test-torch211` tests it)."""

import re
import tomllib
from pathlib import Path

project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in project.get("optional-dependencies", {}).values():
    requirements += extra
for requirement in requirements:
    name, lower = re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1), re.search(r">=\s*([^,;\s]+)", requirement)
    if lower and name.lower() != "torch":
        print(f"{name}=={lower.group(1)}")
