"""Install-time build of the native custom-op library (all metadata lives in pyproject.toml).

`pip install .` / `pip install -e .` run setuptools' ``build_ext``; ours runs
``runtime_ops/build.py`` (stdlib only, loaded by path: pip's isolated build env has neither
torch nor onnxruntime) and puts ``libsinq_ops.so`` inside the ``sinq_export/runtime_ops``
package: next to the sources for an editable install, into the wheel otherwise.

A failed native build fails the install with the build's message. ``SINQ_OPS_SKIP_BUILD=1``
installs the Python package without it (build later: ``python -m sinq_export.runtime_ops build``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PKG_REL = Path("sinq_export") / "runtime_ops"


def _load_builder():
    spec = importlib.util.spec_from_file_location("_sinq_ops_build", ROOT / "runtime_ops" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class BinaryDistribution(Distribution):
    """The wheel carries a native library: platform-specific, and build_ext always runs."""

    def has_ext_modules(self) -> bool:
        return True


class BuildSinqOps(build_ext):
    def _target_dir(self) -> Path:
        if getattr(self, "editable_mode", False) or self.inplace:
            return ROOT / PKG_REL
        return Path(self.build_lib) / PKG_REL

    def run(self) -> None:
        super().run()  # no regular extensions; keeps setuptools' bookkeeping intact
        if os.environ.get("SINQ_OPS_SKIP_BUILD", "").lower() in ("1", "yes", "true", "on"):
            print("SINQ_OPS_SKIP_BUILD set: not building libsinq_ops.so")
            return
        builder = _load_builder()
        try:
            builder.build(self._target_dir())
        except builder.BuildError as e:
            raise SystemExit(
                f"error: building the sinq.ops onnxruntime custom-op library failed:\n{e}\n"
                "Set ORT_INCLUDE_DIR to onnxruntime C/C++ API headers, or SINQ_OPS_SKIP_BUILD=1 "
                "to install without the native library."
            ) from e

    def get_outputs(self) -> list[str]:
        out = self._target_dir()
        return [str(p) for p in out.glob("libsinq_ops*.so")]


setup(distclass=BinaryDistribution, cmdclass={"build_ext": BuildSinqOps})
