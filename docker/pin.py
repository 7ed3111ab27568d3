"""Print docker/constraints.txt: ptserve's runtime dependency closure pinned at the installed versions.

    .venv/bin/python docker/pin.py > docker/constraints.txt

torch (and what only torch needs) is left out: the CUDA base image brings it.
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"torch", "triton"}
HEADER = """\
# Runtime dependencies of ptserve pinned at the versions its tests ran with (torch and its own
# dependencies come from the CUDA base image). The Dockerfile installs with: pip install -c docker/constraints.txt .
# Regenerate after changing pyproject.toml's dependencies: python docker/pin.py > docker/constraints.txt"""


def key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str]) -> dict[str, str]:
    pinned: dict[str, str] = {}
    stack = list(roots)
    while stack:
        name = stack.pop()
        if key(name) in pinned or key(name) in SKIP or key(name).startswith("nvidia-"):
            continue
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        pinned[key(name)] = dist.version
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                stack.append(req.name)
    return pinned


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(r).name for r in project["dependencies"]]
    print(HEADER)
    for name, version in sorted(closure(roots).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
