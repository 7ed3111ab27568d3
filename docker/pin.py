"""Print docker/constraints.txt: ptserve's runtime dependency closure pinned at the installed versions.

    .venv/bin/python docker/pin.py > docker/constraints.txt

torch is pinned at the tested version without its local tag (the tests ran "2.13.0+cpu"; the image
installs PyPI's "2.13.0", the CUDA build); the CUDA libraries it needs (nvidia-*, triton) are left to
torch's own exact requirements.
"""

import re
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"triton"}
HEADER = """\
# Runtime dependencies of ptserve pinned at the versions its tests ran with, torch included (PyPI's CUDA
# build of the tested version; its nvidia-* libraries follow torch's own pins).
# The Dockerfile installs with: pip install -c docker/constraints.txt .
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
        pinned[key(name)] = dist.version.split("+")[0]  # 2.13.0+cpu -> 2.13.0
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
