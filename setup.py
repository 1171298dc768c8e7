"""Install-time build of the optional native custom-op library (metadata lives in pyproject.toml).

`pip install .` / `pip install -e .` / `pip wheel .` run setuptools' ``build_ext``; ours runs
``runtime_ops/build.py`` (stdlib only, loaded by path: pip's isolated build env has neither
torch nor onnxruntime) and puts ``libsinq_ops.so`` inside the ``sinq_export/runtime_ops``
package: next to the sources for an editable install, into the wheel otherwise. ``build_py``
also copies the build script and C++ sources into ``sinq_export/runtime_ops/_native`` so that an
installed wheel can rebuild it (``python -m sinq_export.runtime_ops build``).

The library is optional (only ``--runtime custom`` / ``--col-scale fused`` need it), so a failed
build — no compiler, no onnxruntime headers, no apt — does not fail the install: it prints one
warning and installs the Python package. Where the library is required — ``CI`` set to a true
value, or ``SINQ_OPS_REQUIRED=1`` (``install.sh`` sets it when asked to) — a failed build fails
the install. ``SINQ_OPS_SKIP_BUILD=1`` does not try at all.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PKG_REL = Path("sinq_export") / "runtime_ops"
NATIVE_REL = PKG_REL / "_native"
TRUE = ("1", "yes", "true", "on")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE


def _load_builder():
    spec = importlib.util.spec_from_file_location("_sinq_ops_build", ROOT / "runtime_ops" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BinaryDistribution(Distribution):
    """The wheel carries a native library: platform-specific, and build_ext always runs."""

    def has_ext_modules(self) -> bool:
        return True


class BuildPyWithNativeSources(build_py):
    """Ship ``runtime_ops/build.py`` and ``runtime_ops/src`` inside the package (``_native/``)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install builds from the checkout's runtime_ops/ directly
        dest = Path(self.build_lib) / NATIVE_REL
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(ROOT / "runtime_ops" / "src", dest / "src")
        shutil.copy2(ROOT / "runtime_ops" / "build.py", dest / "build.py")


class BuildSinqOps(build_ext):
    def _target_dir(self) -> Path:
        if getattr(self, "editable_mode", False) or self.inplace:
            return ROOT / PKG_REL
        return Path(self.build_lib) / PKG_REL

    def run(self) -> None:
        super().run()  # no regular extensions; keeps setuptools' bookkeeping intact
        if _flag("SINQ_OPS_SKIP_BUILD"):
            print("SINQ_OPS_SKIP_BUILD set: not building libsinq_ops.so", file=sys.stderr)
            return
        builder = _load_builder()
        try:
            builder.build(self._target_dir())
        except builder.BuildError as e:
            if _flag("CI") or _flag("SINQ_OPS_REQUIRED"):
                raise SystemExit(
                    f"error: building the sinq.ops custom-op library failed (required here: CI or "
                    f"SINQ_OPS_REQUIRED is set):\n{e}"
                ) from e
            reason = str(e).strip().splitlines()[0].split(". ")[0]
            print(
                f"warning: sinq-export installed without its optional sinq.ops custom-op library "
                f"({reason}); stock-op exports, validate and eval work; `--runtime custom` and "
                f"`--col-scale fused` need it: build it later with "
                f"`python -m sinq_export.runtime_ops build` (ORT_INCLUDE_DIR=<onnxruntime headers>)",
                file=sys.stderr,
            )

    def get_outputs(self) -> list[str]:
        out = self._target_dir()
        return [str(p) for p in out.glob("libsinq_ops*.so")]


class PlatformWheel(bdist_wheel):
    """Tag ``py3-none-<platform>``: the library is loaded by onnxruntime, not by Python, so it
    does not depend on the Python version or ABI, only on the OS and CPU architecture."""

    def get_tag(self) -> tuple[str, str, str]:
        _, _, plat = super().get_tag()
        return "py3", "none", plat


setup(
    distclass=BinaryDistribution,
    cmdclass={"build_ext": BuildSinqOps, "build_py": BuildPyWithNativeSources, "bdist_wheel": PlatformWheel},
)
