"""The pinned install set (constraints.txt) agrees with the package's own dependency ranges."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            out[canonicalize_name(name)] = Version(version)
    return out


def declared() -> list[Requirement]:
    """pyproject.toml's dependencies and extras, as the installed package's metadata has them."""
    return [Requirement(r) for r in metadata.requires("sinq-export") or []]


def test_every_declared_dependency_is_pinned_inside_its_range():
    pinned = pins()
    for req in declared():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} is declared in pyproject.toml but not pinned"
        # A local build label (torch's +cpu) is what install.sh installs; ranges ignore it.
        assert req.specifier.contains(Version(pinned[name].public), prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]} outside pyproject's {req}"


def test_install_sh_resolves_every_dependency_through_the_constraints():
    script = (ROOT / "install.sh").read_text()
    installs = [ln for ln in script.splitlines()
                if re.search(r"PIP\[@\]}\" install", ln) and "--no-deps" not in ln]
    assert installs, "install.sh installs nothing?"
    for line in installs:
        assert "CONSTRAINTS[@]" in line, f"install.sh line bypasses constraints.txt: {line.strip()}"
    assert "CONSTRAINTS=(-c constraints.txt)" in script
    assert "bash install.sh" in (ROOT / ".ci" / "run").read_text()
