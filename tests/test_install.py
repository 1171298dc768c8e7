"""The package installs like a user installs it: without the native library, and as a wheel.

Each test installs a copy of this source tree into a throwaway venv with the real pip and
setuptools (``--no-deps --no-build-isolation --no-index``: nothing is downloaded). To stay fast
the venv does not reinstall torch & co.: a ``.pth`` file appends the running interpreter's
site-packages to its path (after the venv's own site-packages, so the installed ``sinq_export``
is the one imported, never this checkout). Then the installed package runs from a folder outside
the checkout: the module route (``samples/quantize_mlp.py``) exports and validates, and the CLI
is asked for what needs the custom-op library.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD_HINT = "python -m sinq_export.runtime_ops build"
INSTALL_WARNING = "warning: sinq-export installed without its optional sinq.ops custom-op library"
# What a fresh shell would not have, or what would make the build find headers anyway.
_SCRUB = ("PYTHONPATH", "ORT_INCLUDE_DIR", "CI", "SINQ_OPS_REQUIRED", "SINQ_OPS_SKIP_BUILD",
          "SINQ_OPS_LIBRARY", "SINQ_OPS_CUDA_LIBRARY", "SINQ_OPS_BUILD_DIR", "SINQ_OPS_PORTABLE")


def _source_copy(dest: Path) -> Path:
    """This checkout minus build outputs (setuptools writes build/ and egg-info into the tree)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "out", "__pycache__",
                                    "*.so", "*.o", "*.egg-info", ".pytest_cache", ".hypothesis",
                                    ".ruff_cache", "_native", "node_modules")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _venv(dest: Path) -> Path:
    """A venv without pip whose path ends with this interpreter's site-packages; its python."""
    venv.create(dest, with_pip=False, symlinks=True)
    py = dest / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    parent = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (Path(site) / "_parent_site.pth").write_text("\n".join(parent) + "\n")
    return py


def _tool_bin(dest: Path, tools: tuple[str, ...]) -> Path:
    """A PATH folder holding only ``tools`` (symlinks): no apt-get, apt-cache, dpkg-deb."""
    dest.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        if found:
            (dest / tool).symlink_to(found)
    return dest


def _env(tmp: Path, path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(PATH=str(path), SINQ_OPS_BUILD_DIR=str(tmp / "ops-build"), PIP_NO_CACHE_DIR="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


def _pip(py: Path, args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [str(py), "-m", "pip", *args, "--no-deps", "--no-build-isolation", "--no-index", "-v"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def _run(cmd: list, env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def _mlp_export(py: Path, src: Path, out: Path, env: dict, *args: str) -> dict:
    """``samples/quantize_mlp.py`` (export + onnxruntime-vs-torch + validate) in that venv."""
    proc = _run([py, src / "samples" / "quantize_mlp.py", "-o", out, "--json", *args], env, out.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _imported_from(py: Path, env: dict, cwd: Path) -> Path:
    proc = _run([py, "-c", "import sinq_export; print(sinq_export.__file__)"], env, cwd)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip()).resolve()


def test_install_without_apt_or_headers_warns_and_stock_route_works(tmp_path):
    src = _source_copy(tmp_path / "src")
    py = _venv(tmp_path / "venv")
    env = _env(tmp_path, _tool_bin(tmp_path / "bin", ("g++", "c++", "cc", "gcc")))
    proc = _pip(py, ["install", str(src)], env, tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    assert log.count(INSTALL_WARNING) == 1, log
    assert "'apt-get' not found" in log
    installed = _imported_from(py, env, tmp_path)
    assert installed.is_relative_to((tmp_path / "venv").resolve())
    assert not list(installed.parent.glob("runtime_ops/libsinq_ops*.so"))

    # the stock route needs no native code: a 4-bit export that validates
    summary = _mlp_export(py, src, tmp_path / "mlp4", env, "--bits", "4")
    assert summary["ok"] and summary["validation"] == "passed"
    assert summary["ops"] == ["MatMulNBits"]

    # what needs sinq.ops fails up front with one line saying how to build it (no apt here)
    for flags in (["--runtime", "custom", "--bits", "3"], ["--runtime", "custom", "--col-scale", "fused"]):
        proc = _run([tmp_path / "venv" / "bin" / "sinq-export", "model", *flags, "-o", tmp_path / "x"],
                    env, tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert BUILD_HINT in lines[0] and "ORT_INCLUDE_DIR" in lines[0] and "apt-get" not in lines[0]
        assert not (tmp_path / "x").exists()

    # the build command itself, from the installed package (its sources travel inside it)
    proc = _run([py, "-m", "sinq_export.runtime_ops", "build"], env, tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "ORT_INCLUDE_DIR" in proc.stderr


def test_failed_native_build_fails_the_install_in_ci(tmp_path):
    src = _source_copy(tmp_path / "src")
    py = _venv(tmp_path / "venv")
    env = _env(tmp_path, _tool_bin(tmp_path / "bin", ("g++", "c++")), CI="true")
    proc = _pip(py, ["install", str(src)], env, tmp_path)
    assert proc.returncode != 0
    assert "required here: CI or SINQ_OPS_REQUIRED is set" in proc.stdout + proc.stderr
    assert _run([py, "-c", "import sinq_export"], env, tmp_path).returncode != 0


def _ort_include_dir() -> str:
    """Headers for the wheel build: ORT_INCLUDE_DIR, else what the editable install fetched."""
    if os.environ.get("ORT_INCLUDE_DIR"):
        return os.environ["ORT_INCLUDE_DIR"]
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sinq_ops_build_w", ROOT / "runtime_ops" / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.find_headers(mod.default_build_dir()))


def test_platform_wheel_carries_the_library_and_runs_custom_ops(tmp_path):
    src = _source_copy(tmp_path / "src")
    builder = _venv(tmp_path / "build-venv")
    path = Path(shutil.which("g++") or "/usr/bin/g++").parent
    env = _env(tmp_path, path, ORT_INCLUDE_DIR=_ort_include_dir(), SINQ_OPS_REQUIRED="1")
    proc = _pip(builder, ["wheel", str(src), "-w", str(tmp_path / "dist")], env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "dist").glob("sinq_export-*.whl")
    plat = sysconfig.get_platform().replace("-", "_").replace(".", "_")
    assert wheel.name.endswith(f"-py3-none-{plat}.whl"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "sinq_export/runtime_ops/libsinq_ops.so" in names
    assert {"sinq_export/runtime_ops/_native/build.py",
            "sinq_export/runtime_ops/_native/src/op.cpp"} <= names

    py = _venv(tmp_path / "venv")
    run_env = _env(tmp_path, tmp_path / "venv" / "bin")
    proc = _pip(py, ["install", str(wheel)], run_env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installed = _imported_from(py, run_env, tmp_path)
    assert installed.is_relative_to((tmp_path / "venv").resolve())
    proc = _run([py, "-m", "sinq_export.runtime_ops", "info"], run_env, tmp_path)
    assert proc.returncode == 0 and "(loads)" in proc.stdout, proc.stdout + proc.stderr
    assert str(installed.parent / "runtime_ops" / "libsinq_ops.so") in proc.stdout
    for bits in ("3", "5"):
        summary = _mlp_export(py, src, tmp_path / f"mlp{bits}", run_env, "--bits", bits,
                              "--runtime", "custom")
        assert summary["ok"] and summary["validation"] == "passed"
        assert summary["ops"] == ["SinqMatMulNBits"]
        assert summary["onnx_rel_error_vs_quantized_torch"] < 1e-4


@pytest.mark.skipif(sys.platform != "linux", reason="the x86-64 SIMD variants are Linux/x86 builds")
def test_portable_build_is_baseline_only_and_matches(tmp_path):
    """The non-x86 build (SINQ_OPS_PORTABLE=1: baseline kernels only, no -mavx*) on this CPU."""
    env = _env(tmp_path, Path(shutil.which("g++") or "/usr/bin/g++").parent,
               ORT_INCLUDE_DIR=_ort_include_dir(), SINQ_OPS_PORTABLE="1")
    proc = _run([sys.executable, ROOT / "runtime_ops" / "build.py", "--out", tmp_path / "lib",
                 "--cuda", "no"], env, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lib = tmp_path / "lib" / "libsinq_ops.so"
    symbols = _run(["nm", "-C", lib], env, tmp_path).stdout
    assert "base::" in symbols and "avx2::" not in symbols and "avx512::" not in symbols
    env.update(SINQ_OPS_LIBRARY=str(lib), PYTHONPATH=str(ROOT), SINQ_OPS_ISA="base")
    summary = _mlp_export(Path(sys.executable), ROOT, tmp_path / "mlp3", env, "--bits", "3",
                          "--runtime", "custom")
    assert summary["ok"] and summary["ops"] == ["SinqMatMulNBits"]
