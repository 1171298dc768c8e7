"""Fault cases that the CLI and `sinq_export.io` own, on tiny models made here.

Each case asserts the exit code, one error line on stderr naming the problem, no partial
output, no temp folder left next to it, and pre-existing data byte-identical (sha256).

How the OS errors are produced (real errors from the kernel, nothing mocked, nothing that can
harm the machine):

* permission denied: a folder with ``chmod a-w``; as root (who bypasses mode bits) the CLI
  subprocess first drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from its bounding set
  (``prctl``), so the mode bits apply to it;
* read-only file system: ``unshare -m`` gives the CLI subprocess a private mount namespace
  in which the target's parent is bind-mounted read-only; the mount lives and dies with that
  subprocess and is invisible to the rest of the machine;
* disk full (ENOSPC): the same private namespace mounts a 64 KiB tmpfs at the parent;
* file too large (EFBIG, what a quota or ``ulimit -f`` gives): RLIMIT_FSIZE in the subprocess;
* a parent path that is a file: a plain file.

Without root, ``unshare -r`` (a user namespace) provides the same private mounts.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _helpers import (
    QUANT_FLAGS,
    REPO,
    assert_one_error_line,
    cli_cmd,
    cli_env,
    partials,
    run_main,
    tree_digest,
)
from _models import write_tiny_llama

from sinq_export import io
from sinq_export.cli import main
from sinq_export.contract import MANIFEST_FILE
from sinq_export.nn import QUANTIZED_MARKER, QUANTIZED_META_FILE
from sinq_export.outcome import EXIT_OUTPUT, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE

# ------------------------------------------------------------------------------------ helpers

def run_cli(cmd: list[str], preexec=None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=cli_env(), timeout=timeout,
                          preexec_fn=preexec, cwd=REPO)


def _drop_dac_capabilities() -> None:
    """preexec_fn: remove root's permission-bit override so ``chmod a-w`` binds it too."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop, cap_dac_override, cap_dac_read_search = 24, 1, 2
    for cap in (cap_dac_override, cap_dac_read_search):
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _limit_file_size(limit: int):
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def mount_namespace_prefix() -> list[str]:
    """``unshare`` arguments for a private mount namespace (root, else a user namespace)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("the read-only / disk-full cases need util-linux `unshare`")
    for flags in (["-m"], ["-r", "-m"]):
        cmd = [unshare, *flags, "--propagation", "private", "true"]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            return [unshare, *flags, "--propagation", "private"]
    pytest.fail("cannot create a private mount namespace (unshare -m / unshare -rm): the "
                "read-only and disk-full cases need one")


def in_private_mount(mount: list[str], cmd: list[str]) -> list[str]:
    """Run ``cmd`` after ``mount ARGS`` inside a private mount namespace."""
    script = " ".join(["mount", *map(_sh_quote, mount), "&&", 'exec "$@"'])
    return [*mount_namespace_prefix(), "sh", "-c", script, "sh", *cmd]


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# ----------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama")


@pytest.fixture(scope="session")
def earlier_output(tiny_model, tmp_path_factory) -> Path:
    """A finished `quantize` output (3-bit) that later runs overwrite."""
    out = tmp_path_factory.mktemp("earlier") / "q"
    assert main(["quantize", str(tiny_model), "-o", str(out), "--bits", "3", *QUANT_FLAGS]) == 0
    return out


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A parent folder holding the user's other data, which must survive every case."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("the user's notes\n")
    return tmp_path


@pytest.fixture(autouse=True)
def _restore_modes(tmp_path):
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir() and not p.is_symlink():
            p.chmod(p.stat().st_mode | stat.S_IWUSR | stat.S_IXUSR)


# ------------------------------------------------------------------ 1: --overwrite safety

@pytest.mark.parametrize("command", ["quantize", "model"])
def test_overwrite_refuses_a_folder_that_is_not_ours(command, tiny_model, workspace, capsys):
    mine = workspace / "my_notes"
    mine.mkdir()
    (mine / "thesis.txt").write_text("years of work\n")
    marker = {"quantize": QUANTIZED_META_FILE, "model": MANIFEST_FILE}[command]
    (mine / marker).write_text(json.dumps({"unrelated": True}))  # our file name alone is not enough
    before = tree_digest(workspace)
    rc, err = run_main([command, str(tiny_model), "-o", str(mine), "--overwrite"], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, "refusing to overwrite", str(mine))
    assert tree_digest(workspace) == before and partials(workspace) == []


@pytest.mark.parametrize("command", ["quantize", "model"])
@pytest.mark.parametrize("which", ["input", "parent", "grandparent", "symlink"])
def test_overwrite_never_touches_the_input_or_its_parents(command, which, tiny_model, tmp_path,
                                                          capsys):
    src = tmp_path / "models" / "llama"
    shutil.copytree(tiny_model, src)
    # An earlier output of ours inside: even a recognisable folder must not be swapped away.
    (src / MANIFEST_FILE).write_text(json.dumps(
        {"format_version": 1, "kind": "causal-lm", "config": {}, "layers": {}}))
    (src / QUANTIZED_META_FILE).write_text(json.dumps({"format_version": 1, "config": {}, "layers": {}}))
    link = tmp_path / "link-to-model"
    link.symlink_to(src, target_is_directory=True)
    target = {"input": src, "parent": src.parent, "grandparent": tmp_path,
              "symlink": link}[which]
    before = tree_digest(tmp_path)
    rc, err = run_main([command, str(src), "-o", str(target), "--overwrite"], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, "input folder", "choose another -o")
    assert tree_digest(tmp_path) == before
    assert partials(tmp_path) == partials(src.parent) == []


def test_overwrite_replaces_our_earlier_output_only(tiny_model, earlier_output, workspace, capsys):
    out = workspace / "q"
    shutil.copytree(earlier_output, out)
    keep = tree_digest(workspace / "keep")
    # Without --overwrite an existing output is refused before any work and left as it was.
    before = tree_digest(out)
    rc, err = run_main(["quantize", str(tiny_model), "-o", str(out), *QUANT_FLAGS], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, "already exists", "--overwrite")
    assert tree_digest(out) == before
    # With it, our earlier output (3-bit) is replaced by the new one (4-bit), atomically.
    rc, err = run_main(["quantize", str(tiny_model), "-o", str(out), "--overwrite", "--bits", "4",
                        *QUANT_FLAGS], capsys)
    assert rc == 0, err
    assert json.loads((out / QUANTIZED_META_FILE).read_text())["config"]["bits"] == 4
    assert tree_digest(workspace / "keep") == keep and partials(workspace) == []


def test_output_checks_come_before_any_work(tmp_path, capsys):
    """A refused -o is reported even when the model folder is broken: it is checked first."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (tmp_path / "out").mkdir()
    for command in ("quantize", "model"):
        t0 = time.perf_counter()
        rc, err = run_main([command, str(broken), "-o", str(tmp_path / "out")], capsys)
        assert rc == EXIT_USAGE and time.perf_counter() - t0 < 30
        assert_one_error_line(err, "already exists")


@pytest.mark.parametrize("command", ["quantize", "model"])
def test_parent_path_is_a_file(command, tiny_model, workspace, capsys):
    (workspace / "report.pdf").write_bytes(b"%PDF-1.4 not a folder")
    before = tree_digest(workspace)
    rc, err = run_main([command, str(tiny_model), "-o", str(workspace / "report.pdf" / "out")],
                       capsys)
    assert rc == EXIT_OUTPUT
    assert_one_error_line(err, str(workspace / "report.pdf"), "ENOTDIR")
    assert tree_digest(workspace) == before and partials(workspace) == []


def test_concurrent_overwrites_never_mix_or_leak(tmp_path):
    """Many writers replace one target at once: it is always one writer's complete output."""
    target = tmp_path / "out"
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(6):
                with io.atomic_output_dir(target, True, marker=QUANTIZED_MARKER) as tmp:
                    (tmp / "data.bin").write_bytes(bytes([i]) * 4096)
                    io.write_json(tmp / QUANTIZED_META_FILE,
                                  {"format_version": 1, "config": {"writer": i, "round": j},
                                   "layers": {}})
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    who = json.loads((target / QUANTIZED_META_FILE).read_text())["config"]["writer"]
    assert (target / "data.bin").read_bytes() == bytes([who]) * 4096
    assert sorted(p.name for p in target.iterdir()) == ["data.bin", QUANTIZED_META_FILE]
    assert partials(tmp_path) == []


def test_partials_of_dead_runs_are_removed_live_ones_kept(tmp_path):
    """A killed run (SIGKILL, power loss) leaves its temp folder; the next run removes it,
    but never the temp folder of a run that is still alive (it holds a lock on it)."""
    dead = tmp_path / ".out.tmp-dead1234"
    dead.mkdir()
    (dead / "model.onnx.data").write_bytes(b"\0" * 1024)
    live = tmp_path / ".out.scratch-live5678"
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        with io.atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("done")
        assert not dead.exists() and live.is_dir()
    finally:
        os.close(fd)
    assert (tmp_path / "out" / "x").read_text() == "done"


# ------------------------------------------------------------- 5: OS errors on the output side

def _os_error_case(kind: str, workspace: Path, cmd: list[str]):
    """(command, preexec_fn, folder the error must name, errno name) for one fault kind."""
    target_parent = workspace / "dest"
    target_parent.mkdir()
    if kind == "permission":
        target_parent.chmod(0o555)
        preexec = _drop_dac_capabilities if os.geteuid() == 0 else None
        return cmd, preexec, target_parent, "EACCES"
    if kind == "read-only":
        return (in_private_mount(["--bind", "-o", "ro", str(target_parent), str(target_parent)], cmd),
                None, target_parent, "EROFS")
    if kind == "disk-full":
        return (in_private_mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target_parent)], cmd),
                None, target_parent / "out", "ENOSPC")
    if kind == "file-too-large":
        return cmd, _limit_file_size(64 * 1024), target_parent / "out", "EFBIG"
    raise AssertionError(kind)


@pytest.mark.parametrize(("command", "kind"), [
    ("quantize", "permission"), ("quantize", "read-only"), ("quantize", "disk-full"),
    ("quantize", "file-too-large"),
    ("model", "read-only"),
    ("model", "disk-full"),  # refused up front by the export's free-space check
    ("model", "file-too-large"),  # fails while writing model.onnx.data
])
def test_output_os_errors_are_one_line_and_exit_3(command, kind, tiny_model, workspace):
    out = workspace / "dest" / "out"
    cmd = cli_cmd(command, str(tiny_model), "-o", str(out), "--method", "rtn", *QUANT_FLAGS)
    cmd, preexec, named, code = _os_error_case(kind, workspace, cmd)
    before = tree_digest(workspace)
    src_before = tree_digest(tiny_model)
    proc = run_cli(cmd, preexec=preexec)
    assert proc.returncode == EXIT_OUTPUT, proc.stderr
    assert_one_error_line(proc.stderr, f"cannot write {named}", f"[{code}]")
    assert not out.exists() and partials(workspace / "dest") == []
    assert tree_digest(workspace) == before and tree_digest(tiny_model) == src_before


# --------------------------------------------------------------------- 8: SIGTERM and SIGINT

@pytest.fixture(scope="session")
def slow_tiny_model(tmp_path_factory) -> Path:
    """Big enough that quantizing takes seconds, so a signal lands mid-run."""
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama-8", layers=8, hidden=128)


@pytest.mark.parametrize(("command", "signum"), [
    ("quantize", signal.SIGTERM), ("quantize", signal.SIGINT), ("model", signal.SIGTERM),
])
def test_signal_mid_run_removes_everything_and_keeps_old_output(
        command, signum, slow_tiny_model, earlier_output, workspace):
    out = workspace / "q"
    if command == "quantize":  # an earlier output that --overwrite would replace stays intact
        shutil.copytree(earlier_output, out)
    before = tree_digest(workspace)
    log = workspace.parent / f"stderr-{signum}.txt"
    cmd = cli_cmd(command, str(slow_tiny_model), "-o", str(out), "--overwrite", "--group-size", "16")
    # `quantize`: its progress bar's first unit says quantizing began; `model`: the temp folder
    # appears when writing starts (the linears are quantized while it is written).
    started = "SINQ quantize" if command == "quantize" else ""
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=cli_env(), cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while started not in log.read_text() or not partials(workspace):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            proc.send_signal(signum)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert rc == {signal.SIGTERM: EXIT_SIGTERM, signal.SIGINT: EXIT_SIGINT}[signum], stderr
    assert_one_error_line(stderr, f"interrupted by {signal.Signals(signum).name}", "removed")
    assert tree_digest(workspace) == before and partials(workspace) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_while_writing_removes_the_temp_folder(signum, tmp_path):
    """The signal lands while files are being written into the temp folder (a real process)."""
    script = tmp_path / "writer.py"
    script.write_text(
        "import sys, time\n"
        "from sinq_export import io\n"
        "from sinq_export.outcome import signals_as_exceptions\n"
        "with signals_as_exceptions():\n"
        "    try:\n"
        "        with io.atomic_output_dir(sys.argv[1]) as tmp:\n"
        "            for i in range(10000):\n"
        "                (tmp / f'part{i}.bin').write_bytes(b'x' * 4096)\n"
        "                print(i, flush=True)\n"
        "                time.sleep(0.01)\n"
        "    except KeyboardInterrupt as exc:\n"
        "        sys.exit(100 + getattr(exc, 'signum', 2))\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], stdout=subprocess.PIPE,
                            text=True, env=cli_env())
    for _ in range(5):  # a few files are in the temp folder
        proc.stdout.readline()
    assert partials(tmp_path)
    proc.send_signal(signum)
    assert proc.wait(timeout=60) == 100 + signum
    assert not out.exists() and partials(tmp_path) == []


# ------------------------------------------------------------------ exit codes, documented

def test_help_documents_the_exit_codes(capsys):
    for argv in (["--help"], ["quantize", "--help"], ["validate", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
        text = capsys.readouterr().out
        for code in ("0 ", "1 ", "2 ", "3 ", "130", "143"):
            assert f"\n  {code}" in text, (argv, code)


@pytest.mark.parametrize("argv", [
    ["quantize", "{missing}", "-o", "{out}"],
    ["model", "{missing}", "-o", "{out}"],
    ["validate", "{missing}"],
    ["eval", "{missing}", "--compare", "float", "--windows", "1", "--length", "8"],
])
def test_missing_input_is_exit_2_for_every_command(argv, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "nope", out=tmp_path / "out") for a in argv]
    rc, err = run_main(argv, capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, str(tmp_path / "nope"))
    assert not (tmp_path / "out").exists() and partials(tmp_path) == []


# -------------------------------------------------------------------- 9: the skip policy

def test_ci_turns_a_non_cuda_skip_into_a_failure(tmp_path):
    """Our conftest, run by a real pytest on a two-test file: CI=1 fails the plain skip only."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_s.py").write_text(
        "import pytest\n"
        "def test_plain():\n    pytest.skip('library missing')\n"
        "@pytest.mark.cuda\n"
        "def test_gpu():\n    pytest.skip('no CUDA here')\n"
        "def test_ok():\n    assert True\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs CUDA\n")
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    env = {k: v for k, v in cli_env().items() if k != "CI"}
    lax = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    strict = subprocess.run(base, capture_output=True, text=True, env={**env, "CI": "1"},
                            cwd=tmp_path, timeout=300)
    assert lax.returncode == 0 and "2 skipped" in lax.stdout, lax.stdout
    assert strict.returncode == 1, strict.stdout
    assert "1 failed, 1 passed, 1 skipped" in strict.stdout, strict.stdout
    assert "test_plain skipped outside the 'cuda' tests" in strict.stdout


def test_nested_output_inside_a_temp_folder(tmp_path):
    """An output written inside another's temp folder (an export's reference/) needs no lock
    of its own there and is swapped in with its parent."""
    with io.atomic_output_dir(tmp_path / "export") as tmp:
        with io.atomic_output_dir(tmp / "reference") as inner:
            (inner / "w.bin").write_bytes(b"w")
    assert (tmp_path / "export" / "reference" / "w.bin").read_bytes() == b"w"
    assert partials(tmp_path) == [] and partials(tmp_path / "export") == []


# ------------------------------------------------------------ 10: damaged model folders

@pytest.mark.parametrize("command", ["quantize", "model"])
def test_missing_tensor_is_named_not_filled_with_random_values(command, tiny_model, tmp_path,
                                                                capsys):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "damaged"
    shutil.copytree(tiny_model, src)
    state = load_file(src / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    rc, err = run_main([command, str(src), "-o", str(tmp_path / "out"), *QUANT_FLAGS], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, str(src), "model.layers.1.mlp.down_proj.weight")
    assert not (tmp_path / "out").exists() and partials(tmp_path) == []


def test_missing_tokenizer_is_one_line(tiny_model, tmp_path, capsys):
    src = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model, src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    rc, err = run_main(["quantize", str(src), "-o", str(tmp_path / "out"), *QUANT_FLAGS], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, str(src), "tokenizer")
    assert not (tmp_path / "out").exists() and partials(tmp_path) == []


def test_validate_report_under_a_file_fails_before_validating(tmp_path, capsys):
    """validate --json into a path below a file: exit 3 at once (the export is not even read)."""
    (tmp_path / "report.pdf").write_bytes(b"%PDF")
    rc, err = run_main(["validate", str(tmp_path / "no-export"), "--json",
                        str(tmp_path / "report.pdf" / "r.json")], capsys)
    assert rc == EXIT_OUTPUT
    assert_one_error_line(err, str(tmp_path / "report.pdf"), "ENOTDIR")


def test_a_signal_whose_exception_an_extension_replaced_is_still_the_signal(monkeypatch, capsys):
    """SIGTERM raised inside a C extension's call can come out as that extension's own error
    (numpy's ``tofile`` under onnx_ir's writer turned it into a TypeError): still exit 143 and
    the one interruption line, never "internal error"."""
    import os

    from sinq_export import cli

    def run(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            raise TypeError("expected str, bytes or os.PathLike object, not BufferedWriter") from None

    monkeypatch.setitem(cli.COMMANDS, "eval", (cli.COMMANDS["eval"][0], run))
    assert cli.main(["eval"]) == EXIT_SIGTERM
    err = capsys.readouterr().err
    assert "interrupted by SIGTERM" in err and "internal error" not in err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_signal_swallowed_by_a_finalizer_still_stops_the_output(tmp_path):
    """Python drops an exception raised inside ``__del__`` ("Exception ignored"): a SIGTERM
    landing in a finalizer must still keep the new folder from replacing the old one."""
    from sinq_export.interrupts import RECEIVED, Interrupted, on_signal
    from sinq_export.outcome import run_interruptible, signals_as_exceptions

    target = tmp_path / "out"
    marker = io.Marker("ours.json", ("ours",))
    with io.atomic_output_dir(target, marker=marker) as tmp:  # an earlier output of ours
        (tmp / "ours.json").write_text('{"ours": 1}')

    class Finalizer:
        def __del__(self):
            on_signal(signal.SIGTERM, None)  # the handler, run while the finalizer runs

    def write() -> None:
        with io.atomic_output_dir(target, overwrite=True, marker=marker) as tmp:
            (tmp / "ours.json").write_text('{"ours": 2}')
            Finalizer()  # collected at once: its exception is swallowed

    with signals_as_exceptions(), pytest.raises(Interrupted) as info:
        run_interruptible(write)
    assert info.value.signum == signal.SIGTERM and RECEIVED == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "ours.json").read_text() == '{"ours": 1}'
