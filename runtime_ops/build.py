#!/usr/bin/env python3
"""Build the sinq.ops onnxruntime custom-op library (``libsinq_ops.so``).

Standard library only: ``setup.py`` (at install time, inside pip's isolated build env) and
``python -m sinq_export.runtime_ops build`` both load this file by path.

Steps:
1. onnxruntime C/C++ API headers (the pip wheel ships none), first found of:
   ``$ORT_INCLUDE_DIR`` (a folder with ``onnxruntime_cxx_api.h``, or its parent holding
   ``onnxruntime/``); headers cached by an earlier build in ``<build dir>/ort-headers``;
   ``/usr/include/onnxruntime`` or ``/usr/local/include/onnxruntime``; else Debian's
   ``libonnxruntime-dev`` ``.deb``, fetched with ``apt-get download`` (no root, no install:
   a private apt state dir) from the machine's configured Debian release if it has the
   package, else from a newer release on the *same configured mirror* (sources derived from
   the machine's own apt sources; no host name is written anywhere), and unpacked with
   ``dpkg-deb -x``.
2. ``g++ -O3``: ``op.cpp`` (x86-64 baseline) + ``kernels.cpp`` compiled three times (baseline,
   ``-mavx2 -mfma``, ``-mavx512f -mavx512bw``); the operator picks one at run time from the
   CPU, so the library runs on any x86-64 machine. Other architectures: the portable baseline
   kernels only; ``SINQ_OPS_PORTABLE=1`` builds exactly that on x86-64 too (how the non-x86 path
   is tested here).
3. CUDA (optional, never required): ``libsinq_ops_cuda.so`` with the same CPU op plus the
   CUDA kernel, only when ``nvcc`` exists and the installed onnxruntime has the CUDA provider
   (or ``SINQ_OPS_CUDA=1``); ``SINQ_OPS_CUDA=0`` disables it.

Output is written atomically; a stamp in the build dir (hash of sources, flags, headers)
skips rebuilds, and the last library linked is kept in the build dir so that building the same
thing into another folder (an editable install, then ``pip wheel .``) copies it instead.
Environment: ``ORT_INCLUDE_DIR``, ``CXX``, ``NVCC``, ``SINQ_OPS_BUILD_DIR`` (cache/objects,
default ``runtime_ops/build``), ``SINQ_OPS_CUDA``, ``SINQ_OPS_PORTABLE``,
``SINQ_OPS_DEB_RELEASES`` (space-separated release names to try, default ``trixie forky sid``).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE / "src"
LIB_NAME = "libsinq_ops.so"
CUDA_LIB_NAME = "libsinq_ops_cuda.so"
HEADER = "onnxruntime_cxx_api.h"
REQUIRED_HEADERS = (
    "onnxruntime_c_api.h",
    "onnxruntime_cxx_api.h",
    "onnxruntime_cxx_inline.h",
    "onnxruntime_float16.h",
)
DEB_PACKAGE = "libonnxruntime-dev"
DEFAULT_RELEASES = ("trixie", "forky", "sid")


class BuildError(RuntimeError):
    """Anything that stops the build; the message says what to do."""


def _log(msg: str) -> None:
    print(f"[sinq_ops build] {msg}", file=sys.stderr, flush=True)


def default_build_dir() -> Path:
    return Path(os.environ.get("SINQ_OPS_BUILD_DIR") or HERE / "build")


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive inter-process lock (concurrent pip/pytest builds share the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


# --------------------------------------------------------------------------------------------
# Headers
# --------------------------------------------------------------------------------------------

def _link(cmd: list[str], tmp: Path, out: Path, stamp_file: Path, stamp: str) -> None:
    """Link into ``tmp``, then move it into place and record the stamp (never a half library)."""
    r = _run(cmd)
    if r.returncode != 0:
        raise BuildError(f"link failed:\n$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    os.replace(tmp, out)
    stamp_file.write_text(stamp)
    _log(f"built {out}")

def _header_dir_of(root: Path) -> Path | None:
    for cand in (root, root / "onnxruntime", root / "include" / "onnxruntime"):
        if all((cand / h).is_file() for h in REQUIRED_HEADERS):
            return cand
    return None


def _api_version(include_dir: Path) -> int:
    text = (include_dir / "onnxruntime_c_api.h").read_text(errors="replace")
    m = re.search(r"#define\s+ORT_API_VERSION\s+(\d+)", text)
    return int(m.group(1)) if m else -1


def find_headers(build_dir: Path) -> Path:
    env = os.environ.get("ORT_INCLUDE_DIR")
    if env:
        found = _header_dir_of(Path(env))
        if found is None:
            raise BuildError(
                f"ORT_INCLUDE_DIR={env} does not contain {', '.join(REQUIRED_HEADERS)} "
                "(point it at the folder holding onnxruntime_cxx_api.h)"
            )
        return found
    cached = _header_dir_of(build_dir / "ort-headers" / "usr" / "include")
    if cached:
        return cached
    for sysdir in ("/usr/include/onnxruntime", "/usr/local/include/onnxruntime"):
        found = _header_dir_of(Path(sysdir))
        if found:
            return found
    return fetch_headers_from_debian(build_dir)


def _parse_sources(root: str = "/") -> list[dict]:
    """The machine's apt sources as dicts (types, uris, suites, components, signed_by)."""
    entries: list[dict] = []
    etc = os.path.join(root, "etc", "apt")
    files = [os.path.join(etc, "sources.list")]
    files += sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.list")))
    for f in files:
        with contextlib.suppress(OSError):
            for line in Path(f).read_text().splitlines():
                line = line.split("#", 1)[0].strip()
                if not line:
                    continue
                m = re.match(r"^(deb|deb-src)\s+(\[[^\]]*\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
                if not m:
                    continue
                opts = m.group(2) or ""
                sb = re.search(r"signed-by=(\S+?)\]?(\s|$)", opts)
                entries.append(
                    {
                        "types": [m.group(1)],
                        "uris": [m.group(3)],
                        "suites": [m.group(4)],
                        "components": m.group(5).split(),
                        "signed_by": sb.group(1) if sb else None,
                    }
                )
    for f in sorted(glob.glob(os.path.join(etc, "sources.list.d", "*.sources"))):
        with contextlib.suppress(OSError):
            for stanza in re.split(r"\n\s*\n", Path(f).read_text()):
                fields: dict[str, str] = {}
                key = None
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0].isspace() and key:
                        fields[key] += " " + line.strip()
                        continue
                    if ":" in line:
                        key, val = line.split(":", 1)
                        key = key.strip().lower()
                        fields[key] = val.strip()
                if fields.get("enabled", "yes").lower() == "no" or "uris" not in fields:
                    continue
                entries.append(
                    {
                        "types": fields.get("types", "deb").split(),
                        "uris": fields["uris"].split(),
                        "suites": fields.get("suites", "").split(),
                        "components": fields.get("components", "").split(),
                        "signed_by": fields.get("signed-by"),
                    }
                )
    return entries


def _debian_archive_entries() -> list[dict]:
    """Configured entries of the main Debian archive (not security), de-duplicated."""
    return _debian_archive_entries_from(_parse_sources())


def _debian_archive_entries_from(entries: list[dict]) -> list[dict]:
    out, seen = [], set()
    for e in entries:
        if "deb" not in e["types"] or "main" not in e["components"]:
            continue
        # .../debian, or a snapshot of it (.../debian/20250520T000000Z); not debian-security
        uris = [u for u in e["uris"] if re.search(r"/debian(/\d{8}T\d{6}Z)?/?$", u)]
        key = (tuple(uris), e["signed_by"])
        if uris and key not in seen:
            seen.add(key)
            out.append({**e, "uris": uris})
    return out


def _apt_opts(apt_dir: Path) -> list[str]:
    return [
        "-o",
        f"Dir::Etc::SourceList={apt_dir / 'sources.list'}",
        "-o",
        f"Dir::Etc::SourceParts={apt_dir / 'sources.list.d'}",
        "-o",
        f"Dir::State={apt_dir / 'state'}",
        "-o",
        f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o",
        f"Dir::State::status={apt_dir / 'status'}",
        "-o",
        f"Dir::Cache={apt_dir / 'cache'}",
        "-o",
        "Dir::Etc::Preferences=/dev/null",
        "-o",
        f"Dir::Etc::PreferencesParts={apt_dir / 'preferences.d'}",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "Acquire::Languages=none",
        "-o",
        "APT::Get::List-Cleanup=0",
        # As root apt downloads as user _apt, which cannot write into a private folder.
        *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []),
    ]


def _apt_candidate(opts: list[str]) -> str | None:
    r = _run(["apt-cache", *opts, "policy", DEB_PACKAGE])
    m = re.search(r"Candidate:\s*(\S+)", r.stdout)
    return m.group(1) if m and m.group(1) != "(none)" else None


def _download_and_extract(opts: list[str], work: Path, dest: Path) -> Path:
    r = _run(["apt-get", *opts, "download", DEB_PACKAGE], cwd=work)
    debs = sorted(work.glob(f"{DEB_PACKAGE}_*.deb"))
    if r.returncode != 0 or not debs:
        raise BuildError(f"apt-get download {DEB_PACKAGE} failed: {r.stderr.strip()[-800:]}")
    tmp = Path(tempfile.mkdtemp(prefix="ort-headers.", dir=dest.parent))
    r = _run(["dpkg-deb", "-x", str(debs[-1]), str(tmp)])
    if r.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BuildError(f"dpkg-deb -x {debs[-1].name} failed: {r.stderr.strip()}")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    found = _header_dir_of(dest / "usr" / "include")
    if found is None:
        raise BuildError(f"{debs[-1].name} has no onnxruntime headers under usr/include")
    _log(f"onnxruntime headers from {debs[-1].name} -> {found}")
    return found


def fetch_headers_from_debian(build_dir: Path) -> Path:
    how_to = (
        "Alternatively, set ORT_INCLUDE_DIR to a folder with onnxruntime's C/C++ API headers "
        "(onnxruntime_c_api.h, onnxruntime_cxx_api.h, ...; API version <= the installed "
        "onnxruntime's), e.g. from Debian's libonnxruntime-dev or an onnxruntime release archive."
    )
    for tool in ("apt-get", "apt-cache", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise BuildError(f"cannot fetch onnxruntime headers: '{tool}' not found. {how_to}")
    dest = build_dir / "ort-headers"
    work = build_dir / "apt"
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob("*.deb"):
        old.unlink()

    # 1. The machine's own apt configuration may already carry the package.
    sys_opts = ["-o", "Debug::NoLocking=1"]
    if _apt_candidate(sys_opts):
        with contextlib.suppress(BuildError):
            return _download_and_extract(sys_opts, work, dest)

    # 2. A release that has it, on the machine's configured Debian mirror.
    archive = _debian_archive_entries()
    if not archive:
        raise BuildError(
            f"{DEB_PACKAGE} is not available from this machine's apt sources and no Debian "
            f"archive entry (.../debian, component main) was found to derive one from. {how_to}"
        )
    releases = os.environ.get("SINQ_OPS_DEB_RELEASES", " ".join(DEFAULT_RELEASES)).split()
    errors = []
    for release in releases:
        apt_dir = work / f"apt-{release}"
        for sub in ("sources.list.d", "lists/partial", "cache/archives/partial", "state", "preferences.d"):
            (apt_dir / sub).mkdir(parents=True, exist_ok=True)
        (apt_dir / "status").touch()
        stanzas = []
        for e in archive:
            signed = f"Signed-By: {e['signed_by']}\n" if e["signed_by"] else ""
            stanzas.append(
                f"Types: deb\nURIs: {' '.join(e['uris'])}\nSuites: {release}\nComponents: main\n{signed}"
            )
        (apt_dir / "sources.list").write_text("")
        (apt_dir / "sources.list.d" / "derived.sources").write_text("\n".join(stanzas))
        opts = _apt_opts(apt_dir)
        _log(f"looking for {DEB_PACKAGE} in Debian '{release}' on the configured mirror")
        r = _run(["apt-get", *opts, "update"])
        if r.returncode != 0:
            errors.append(f"{release}: apt-get update failed: {r.stderr.strip()[-400:]}")
            continue
        cand = _apt_candidate(opts)
        if not cand:
            errors.append(f"{release}: no {DEB_PACKAGE}")
            continue
        try:
            return _download_and_extract(opts, work, dest)
        except BuildError as e:
            errors.append(f"{release}: {e}")
    raise BuildError(f"could not fetch {DEB_PACKAGE} (tried: {'; '.join(errors) or 'nothing'}). {how_to}")


# --------------------------------------------------------------------------------------------
# Compile
# --------------------------------------------------------------------------------------------
def _cxx() -> str:
    for cand in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if cand and shutil.which(cand.split()[0]):
            return cand
    raise BuildError("no C++ compiler found (install g++, or set CXX)")


def _is_x86_64() -> bool:
    """Whether to add the AVX2/AVX-512 kernel variants (never with SINQ_OPS_PORTABLE=1)."""
    if os.environ.get("SINQ_OPS_PORTABLE", "").strip().lower() in ("1", "yes", "true", "on"):
        return False
    return platform.machine().lower() in ("x86_64", "amd64")


def _compile_jobs(cxx: str, inc: Path, obj_dir: Path) -> tuple[list[tuple[list[str], Path]], list[str]]:
    common = [
        "-O3",
        "-std=c++17",
        "-fPIC",
        "-fvisibility=hidden",
        "-fvisibility-inlines-hidden",
        "-Wall",
        "-Wextra",
        "-Wno-unused-parameter",
        "-DNDEBUG",
    ]
    jobs = []
    op_defs = []
    kern = str(SRC / "kernels.cpp")
    jobs.append(([*common, "-DSINQ_ISA=base", "-c", kern], obj_dir / "kernels_base.o"))
    if _is_x86_64():
        jobs.append(
            (
                [*common, "-DSINQ_ISA=avx2", "-DSINQ_ISA_AVX2", "-mavx2", "-mfma", "-c", kern],
                obj_dir / "kernels_avx2.o",
            )
        )
        op_defs.append("-DSINQ_HAVE_AVX2")
        probe = _run(
            [*cxx.split(), "-mavx512f", "-mavx512bw", "-x", "c++", "-E", "-", "-o", os.devnull], input=""
        )
        if probe.returncode == 0:
            jobs.append(
                (
                    [
                        *common,
                        "-DSINQ_ISA=avx512",
                        "-DSINQ_ISA_AVX512",
                        "-mavx512f",
                        "-mavx512bw",
                        "-mavx2",
                        "-mfma",
                        "-Wno-uninitialized",
                        "-Wno-maybe-uninitialized",
                        "-c",
                        kern,
                    ],
                    obj_dir / "kernels_avx512.o",
                )
            )
            op_defs.append("-DSINQ_HAVE_AVX512")
    jobs.append(([*common, *op_defs, f"-I{inc}", "-c", str(SRC / "op.cpp")], obj_dir / "op.o"))
    return jobs, common


def _stamp(parts: list[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(SRC.glob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    h.update(Path(__file__).read_bytes())
    for p in parts:
        h.update(p.encode())
    return h.hexdigest()


def _stamp_file(build_dir: Path, out: Path) -> Path:
    """Where the stamp of ``out`` lives: in the build dir, never next to the library."""
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    (build_dir / "stamps").mkdir(parents=True, exist_ok=True)
    return build_dir / "stamps" / f"{out.name}.{key}"


def _compile_all(cxx: str, jobs: list[tuple[list[str], Path]]) -> None:
    procs = []
    for args, obj in jobs:
        cmd = [*cxx.split(), *args, "-o", str(obj)]
        procs.append(
            (cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        )
    failed = []
    for cmd, proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"$ {' '.join(cmd)}\n{out[-4000:]}")
    if failed:
        raise BuildError("compilation failed:\n" + "\n".join(failed))


def _cuda_wanted() -> str | None:
    """Path to nvcc if a CUDA build should be attempted, else None."""
    flag = os.environ.get("SINQ_OPS_CUDA", "auto").lower()
    if flag in ("0", "no", "off", "false"):
        return None
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if not nvcc:
        for cand in ("/usr/local/cuda/bin/nvcc",):
            if os.path.exists(cand):
                nvcc = cand
    if not nvcc:
        return None
    if flag in ("1", "yes", "on", "true"):
        return nvcc
    try:  # a CUDA onnxruntime present in the interpreter that runs the build?
        import importlib.util

        spec = importlib.util.find_spec("onnxruntime")
        if spec and spec.submodule_search_locations:
            capi = Path(list(spec.submodule_search_locations)[0]) / "capi"
            if list(capi.glob("libonnxruntime_providers_cuda.so*")):
                return nvcc
    except Exception:
        pass
    return None


def build(
    out_dir: str | os.PathLike | None = None,
    *,
    force: bool = False,
    build_dir: str | os.PathLike | None = None,
    cuda: bool | None = None,
) -> Path:
    """Build ``libsinq_ops.so`` into ``out_dir`` (default: ``build_dir``); return its path."""
    build_dir = Path(build_dir) if build_dir else default_build_dir()
    out_dir = Path(out_dir) if out_dir else build_dir
    build_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked(build_dir / ".lock"):
        inc = find_headers(build_dir)
        api = _api_version(inc)
        cxx = _cxx()
        obj_dir = build_dir / "obj"
        obj_dir.mkdir(parents=True, exist_ok=True)
        jobs, common = _compile_jobs(cxx, inc, obj_dir)
        out = out_dir / LIB_NAME
        stamp_file = _stamp_file(build_dir, out)
        stamp = _stamp([cxx, str(inc), str(api), *(" ".join(a) for a, _ in jobs)])
        cached, cached_stamp = build_dir / "last" / LIB_NAME, build_dir / "last" / "stamp"
        if not force and out.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            _log(f"{out} is up to date")
        elif not force and cached.is_file() and cached_stamp.is_file() and cached_stamp.read_text() == stamp:
            tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
            shutil.copy2(cached, tmp)
            os.replace(tmp, out)
            stamp_file.write_text(stamp)
            _log(f"{out}: copied the identical build from {cached}")
        else:
            _log(f"compiling with {cxx} against onnxruntime API {api} headers in {inc}")
            _compile_all(cxx, jobs)
            tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
            link = [
                *cxx.split(),
                "-shared",
                "-o",
                str(tmp),
                *(str(o) for _, o in jobs),
                "-Wl,--no-undefined",
                "-Wl,-z,defs",
                "-Wl,--exclude-libs,ALL",
            ]
            _link(link, tmp, out, stamp_file, stamp)
            cached.parent.mkdir(exist_ok=True)
            shutil.copy2(out, cached)
            cached_stamp.write_text(stamp)

        want_cuda = cuda if cuda is not None else bool(_cuda_wanted())
        if want_cuda:
            try:
                _build_cuda(cxx, inc, common, jobs, build_dir, out_dir, force)
            except BuildError as e:
                if cuda:
                    raise
                _log(f"CUDA variant skipped: {e}")
        return out


def _cuda_paths(nvcc: str) -> tuple[list[str], list[str]]:
    """CUDA include and library folders, as nvcc itself reports them (``--dryrun``)."""
    r = _run([nvcc, "-x", "cu", "-v", "--dryrun", "-c", "-", "-o", os.devnull], input="")
    text = r.stdout + r.stderr
    inc, lib = [], []
    for line in text.splitlines():
        if "INCLUDES=" in line:
            inc += [os.path.normpath(x) for x in re.findall(r'-I"?([^"\s]+)', line)]
        if "LIBRARIES=" in line:
            lib += [
                os.path.normpath(x)
                for x in re.findall(r'-L"?([^"\s]+)', line)
                if not x.rstrip("/").endswith("stubs")
            ]
    home = Path(nvcc).resolve().parent.parent
    for cand in (home / "include", Path("/usr/local/cuda/include")):
        if cand.is_dir():
            inc.append(str(cand))
    for cand in (home / "lib64", home / "lib", Path("/usr/local/cuda/lib64")):
        if cand.is_dir():
            lib.append(str(cand))
    if not any((Path(d) / "cuda_runtime.h").is_file() for d in inc):
        raise BuildError(f"cuda_runtime.h not found next to {nvcc} (looked in {inc})")
    return list(dict.fromkeys(inc)), list(dict.fromkeys(lib))


def _build_cuda(cxx, inc, common, cpu_jobs, build_dir: Path, out_dir: Path, force: bool) -> Path:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc) and not shutil.which(nvcc):
        raise BuildError("nvcc not found")
    inc_dirs, lib_dirs = _cuda_paths(nvcc)
    obj_dir = build_dir / "obj_cuda"
    obj_dir.mkdir(parents=True, exist_ok=True)
    archs = os.environ.get("SINQ_OPS_CUDA_ARCHS", "80;86;89;90").split(";")
    gencode = []
    for a in archs:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cu_obj = obj_dir / "kernels_cuda.o"
    op_obj = obj_dir / "op_cuda.o"
    out = out_dir / CUDA_LIB_NAME
    stamp_file = _stamp_file(build_dir, out)
    stamp = _stamp([cxx, nvcc, str(inc), *archs])
    if not force and out.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return out
    cpu_objs = [o for _, o in cpu_jobs if o.name != "op.o"]
    op_args = next(a for a, o in cpu_jobs if o.name == "op.o")
    cmds = [
        [
            nvcc,
            "-O3",
            "-std=c++17",
            "-Xcompiler",
            "-fPIC,-fvisibility=hidden",
            *gencode,
            "-c",
            str(SRC / "kernels_cuda.cu"),
            "-o",
            str(cu_obj),
        ],
        [
            *cxx.split(),
            *op_args[:-2],
            "-DSINQ_WITH_CUDA",
            *(f"-I{d}" for d in inc_dirs),
            "-c",
            str(SRC / "op.cpp"),
            "-o",
            str(op_obj),
        ],
    ]
    for cmd in cmds:
        r = _run(cmd)
        if r.returncode != 0:
            raise BuildError(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}"[-4000:])
    tmp = out_dir / f".{CUDA_LIB_NAME}.{os.getpid()}.tmp"
    link = [
        *cxx.split(),
        "-shared",
        "-o",
        str(tmp),
        str(op_obj),
        str(cu_obj),
        *(str(o) for o in cpu_objs),
        *(f"-L{d}" for d in lib_dirs),
        "-l:libcudart_static.a",
        "-ldl",
        "-lpthread",
        "-lrt",
        "-Wl,--exclude-libs,ALL",
    ]
    _link(link, tmp, out, stamp_file, stamp)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for libsinq_ops.so (default: the build dir)")
    ap.add_argument("--build-dir", help="cache/objects folder (default: runtime_ops/build)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--cuda", choices=("auto", "yes", "no"), default="auto")
    args = ap.parse_args(argv)
    cuda = {"auto": None, "yes": True, "no": False}[args.cuda]
    try:
        path = build(args.out, force=args.force, build_dir=args.build_dir, cuda=cuda)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
