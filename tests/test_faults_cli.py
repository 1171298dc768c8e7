"""Fault cases the CLI owns beyond tests/test_faults.py: errors raised inside the export's
writer, flag values argparse lets through, signals while importing, a disk that fills during
the write, parents of -o left behind, argparse's own errors, a model folder without tokenizer.

Each case runs on tiny models made here and asserts the exit code, one error line on stderr
naming the problem, no traceback, nothing left behind (temp folders, parents we created) and
pre-existing data byte-identical.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
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
from _models import write_tiny_llama, write_tiny_qwen2

from sinq_export.cli import main
from sinq_export.contract import MANIFEST_FILE
from sinq_export.outcome import EXIT_OUTPUT, EXIT_SIGINT, EXIT_USAGE

WEIGHT_ONLY = ["--energy-refit", "0", "--lm-head-bits", "8"]  # no forward pass reads a tensor


def poison(src: Path, dest: Path, tensor: str, value: float) -> Path:
    """A copy of ``src`` whose ``tensor`` holds one NaN / Inf."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    state = load_file(dest / "model.safetensors")
    assert tensor in state, sorted(state)
    state[tensor].view(-1)[1] = value
    save_file(state, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama")


@pytest.fixture(scope="session")
def slow_llama(tmp_path_factory) -> Path:
    """Big enough that quantizing (inside the write) takes seconds."""
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama-8", layers=8, hidden=128)


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A parent folder holding the user's other data, which must survive every case."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("the user's notes\n")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("src") / "tiny-qwen2")


# ------------------------------------------------- errors raised inside the lazy-tensor writer

@pytest.mark.parametrize(("family", "tensor", "value"), [
    ("llama", "model.norm.weight", float("nan")),
    ("llama", "model.layers.0.input_layernorm.weight", float("inf")),
    ("llama", "model.layers.1.post_attention_layernorm.weight", float("nan")),
    ("qwen2", "model.layers.0.self_attn.k_proj.bias", float("nan")),
    ("qwen2", "model.layers.1.self_attn.q_proj.bias", float("-inf")),
    ("qwen2", "model.norm.weight", float("nan")),
])
def test_nan_read_only_by_the_writer_names_the_tensor(family, tensor, value, tiny_llama,
                                                        tiny_qwen2, tmp_path, capsys):
    """Weight-only SINQ and an 8-bit head: the writer is the first to read a norm or a bias,
    and the checkpoint's own error must come out, not the serializer's wrapper."""
    src = poison({"llama": tiny_llama, "qwen2": tiny_qwen2}[family], tmp_path / "damaged",
                 tensor, value)
    before = tree_digest(tmp_path)
    rc, err = run_main(["model", str(src), "-o", str(tmp_path / "out"), *WEIGHT_ONLY,
                        *QUANT_FLAGS], capsys)
    assert rc == EXIT_USAGE, err
    assert_one_error_line(err, str(src), tensor, "NaN or Inf")
    assert "internal error" not in err and "SerdeError" not in err
    assert tree_digest(tmp_path) == before and partials(tmp_path) == []


# --------------------------------------------------------------- flag values argparse accepts

@pytest.mark.parametrize("command", ["model", "quantize"])
@pytest.mark.parametrize("value", ["inf", "1e308", "nan", "0", "-5"])
def test_max_size_must_be_a_finite_positive_size(command, value, tiny_llama, workspace, capsys):
    out = workspace / "out"
    before = tree_digest(workspace)
    rc, err = run_main([command, str(tiny_llama), "-o", str(out), "--max-size", value,
                        *QUANT_FLAGS], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, "max_size_mb", "positive, finite")
    assert tree_digest(workspace) == before and partials(workspace) == []


# --------------------------------------------------------------------- eval past the context

@pytest.mark.parametrize("length", ["129", "100000"])
def test_eval_length_past_the_context_is_refused_before_loading(length, tiny_llama, monkeypatch,
                                                                  capsys):
    """The tiny model's max_position_embeddings is 128: refused from config.json alone."""
    from sinq_export import models

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --length was checked")

    monkeypatch.setattr(models, "load_causal_lm", no_load)
    rc, err = run_main(["eval", str(tiny_llama), "--length", length, "--windows", "1",
                        "--compare", "float"], capsys)
    assert rc == EXIT_USAGE
    assert_one_error_line(err, f"--length {length}", "context of 128 tokens")


def test_eval_length_at_the_context_runs(tiny_llama, capsys):
    rc, err = run_main(["eval", str(tiny_llama), "--length", "128", "--windows", "1",
                        "--compare", "float", "--json"], capsys)
    assert rc == 0, err


# ------------------------------------------------------------------ Ctrl-C while importing

def _loading_torch(pid: int) -> bool:
    """Whether the process has mapped libtorch: it is inside ``import torch``, seconds long."""
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _sigint_default() -> None:
    """The child's SIGINT as a terminal gives it, whatever the test process inherited: a child
    started with SIGINT ignored gets no KeyboardInterrupt handler from Python, and the signal
    this test sends would be dropped before our code could answer it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_while_importing_is_one_line_and_exit_130(tiny_llama, workspace):
    """SIGINT while torch is being imported, before `cli.main` runs: the console entry point
    (what the installed `sinq-export` script calls) answers with one line, exit 130."""
    out = workspace / "new" / "out"
    before = tree_digest(workspace)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sinq_export.console import main; sys.exit(main())",
         "model", str(tiny_llama), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO,
        preexec_fn=_sigint_default)
    try:
        deadline = time.monotonic() + 120
        while not _loading_torch(proc.pid):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_SIGINT, stderr
    assert_one_error_line(stderr, "interrupted by SIGINT while starting")
    assert tree_digest(workspace) == before and partials(workspace) == []


def test_console_script_is_the_light_entry_point():
    """pyproject's `sinq-export` script runs `sinq_export.console:main`, and importing that
    module loads neither torch nor the CLI (so the window before it is milliseconds)."""
    assert 'sinq-export = "sinq_export.console:main"' in (REPO / "pyproject.toml").read_text()
    code = ("import sys, sinq_export.console; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'sinq_export.cli') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ------------------------------------------------------------------------- a disk that fills

def mount_tmpfs(folder: Path, size: str) -> bool:
    """Mount a real ``size`` tmpfs at ``folder`` (root); False where mounting is not permitted."""
    folder.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0 and os.geteuid() == 0:
        pytest.fail(f"root cannot mount a tmpfs here: {proc.stderr.strip()}")
    return proc.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """``make(size)`` -> a folder on a real tmpfs of that size (None where mount is not
    permitted: not root); unmounted after the test."""
    mounted: list[Path] = []

    def make(size: str) -> Path | None:
        folder = tmp_path / f"disk-{size}"
        if not mount_tmpfs(folder, size):
            return None
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize("flags", [
    [],  # the default: the random-id probe runs first (seconds to minutes on a real model)
    ["--calibrate", "--calibration-windows", "1"],
    ["--avg-bits", "3.5"],
])
def test_free_space_is_checked_before_the_probe_or_calibration(flags, tiny_llama, small_disk,
                                                               tmp_path, monkeypatch, capsys):
    """A file system that cannot hold the estimate is refused before any statistic is
    measured (exit 3, ENOSPC, the path): the probe / calibration must not even start."""
    from sinq_export.export import decoder

    disk = small_disk("1m") or pytest.skip("mount not permitted (not root): see the simulated "
                                           "write-time case below")
    (disk / "keep.txt").write_text("the user's file\n")

    def too_late(*args, **kwargs):
        raise AssertionError("the model ran before the free-space check")

    monkeypatch.setattr(decoder, "probe_energies", too_late)
    monkeypatch.setattr(decoder, "quantize_planned", too_late)
    before = tree_digest(disk)
    rc, err = run_main(["model", str(tiny_llama), "-o", str(disk / "out"), *flags, *QUANT_FLAGS],
                       capsys)
    assert rc == EXIT_OUTPUT, err
    assert_one_error_line(err, f"cannot write {disk / 'out'}", "[ENOSPC]", "free disk space")
    assert tree_digest(disk) == before and partials(disk) == []


def _fill(folder: Path, leave: int) -> Path:
    """Another program fills the file system, leaving about ``leave`` bytes."""
    filler = folder / "other-program.bin"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * (1 << 16))
                fh.flush()
        except OSError:
            pass
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.mark.parametrize("leave", [0, 32 << 10])  # the export needs more than that
def test_disk_filling_during_the_write_is_exit_3_enospc(leave, slow_llama, small_disk, tmp_path,
                                                        monkeypatch, capsys):
    """The free-space check passes, then another program fills the disk (while the probe
    runs, so the whole write meets it; with 32 KiB left the first tensors still fit): the
    output side is blamed (exit 3, ENOSPC, the output named), nothing is left but the other
    program's file, byte-identical."""
    disk = small_disk("24m")
    if disk is None:  # no mount permitted: the write call itself reports the full disk
        from sinq_export.export import decoder

        def full(self, file):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(decoder._WrittenByFile, "tofile", full)
        out = tmp_path / "out"
        rc, stderr = run_main(["model", str(slow_llama), "-o", str(out), *QUANT_FLAGS], capsys)
        assert rc == EXIT_OUTPUT, stderr
        assert_one_error_line(stderr, f"cannot write {out}", "[ENOSPC]")
        assert not out.exists() and partials(tmp_path) == []
        return
    out = disk / "out"
    log = tmp_path / "stderr.txt"
    # progress on stderr (no --json): the stage bar says "calibrate" once the plan stage, and
    # the free-space check in it, passed
    cmd = cli_cmd("model", str(slow_llama), "-o", str(out), "--group-size", "16")
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=cli_env(),
                                cwd=REPO)
        try:
            deadline = time.monotonic() + 300
            while "calibrate" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.01)
            filler = _fill(disk, leave)
            digest = tree_digest(disk)[filler.name]
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert rc == EXIT_OUTPUT, stderr
    assert_one_error_line(stderr, f"cannot write {disk}", "[ENOSPC]")
    assert sorted(p.name for p in disk.iterdir()) == [filler.name]
    assert tree_digest(disk)[filler.name] == digest


def test_numpy_full_disk_message_is_enospc():
    """numpy's ``tofile`` raises "Not enough free space" (no errno) only when fallocate(2)
    failed with ENOSPC: still the output side's full disk."""
    from sinq_export.io import output_error

    err = output_error(OSError("Not enough free space to write 28311552 bytes"), "/data/out")
    assert err is not None and err.errno == errno.ENOSPC and "/data/out" in str(err)


# ------------------------------------------------------------------ parents of -o we created

@pytest.mark.parametrize("command", ["model", "quantize"])
def test_failed_run_removes_the_parents_it_created(command, tiny_llama, workspace, capsys):
    """-o keep/new1/new2/out with a model that fails mid-run (NaN in the final norm, read by
    the writer / the quantizer): new1 and new2 go, keep/ and its files stay."""
    src = poison(tiny_llama, workspace.parent / f"{workspace.name}-nan", "model.norm.weight",
                 float("nan"))
    before = tree_digest(workspace)
    out = workspace / "keep" / "new1" / "new2" / "out"
    flags = WEIGHT_ONLY if command == "model" else []
    rc, err = run_main([command, str(src), "-o", str(out), *flags, *QUANT_FLAGS], capsys)
    assert rc == EXIT_USAGE, err
    assert_one_error_line(err, "model.norm.weight")
    assert tree_digest(workspace) == before and partials(workspace / "keep") == []


def test_a_successful_run_keeps_the_parents_it_created(tiny_llama, workspace, capsys):
    out = workspace / "new1" / "new2" / "q"
    rc, err = run_main(["quantize", str(tiny_llama), "-o", str(out), *QUANT_FLAGS], capsys)
    assert rc == 0, err
    assert (out / "sinq_quantized.json").is_file()


def test_parents_someone_else_filled_meanwhile_stay(tmp_path):
    """Only empty folders are removed: a file another program put in a created parent keeps
    that parent (and its parents)."""
    from sinq_export import io

    out = tmp_path / "new1" / "new2" / "out"
    with pytest.raises(RuntimeError), io.atomic_output_dir(out) as tmp:
        (tmp / "part").write_text("partial")
        (tmp_path / "new1" / "theirs.txt").write_text("someone else's")
        raise RuntimeError("the run fails")
    assert sorted(p.name for p in (tmp_path / "new1").iterdir()) == ["theirs.txt"]


# ------------------------------------------------------------------- argparse's own errors

@pytest.mark.parametrize(("argv", "named"), [
    (["model", "--bits", "9", "-o", "{out}"], "--bits"),
    (["model", "--dtype", "fp64", "-o", "{out}"], "--dtype"),
    (["model", "--target", "tflite", "-o", "{out}"], "--target"),
    (["model", "--lm-head-bits", "3.5", "-o", "{out}"], "--lm-head-bits"),
    (["quantize", "--group-size", "sixty", "-o", "{out}"], "--group-size"),
    (["quantize", "--method", "gptq", "-o", "{out}"], "--method"),
    (["quantize"], "-o/--output"),
    (["eval", "--windows", "many"], "--windows"),
    (["validate"], "out_dir"),
    (["frobnicate"], "frobnicate"),
    ([], "COMMAND"),
])
def test_argparse_errors_are_one_line_exit_2(argv, named, workspace, capsys):
    argv = [a.format(out=workspace / "out") for a in argv]
    before = tree_digest(workspace)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == EXIT_USAGE
    captured = capsys.readouterr()
    line = assert_one_error_line(captured.err, named, "--help")
    assert line.startswith("sinq-export") and ": error: " in line and "usage:" not in line
    assert captured.out == ""
    assert tree_digest(workspace) == before and partials(workspace) == []


# ---------------------------------------------------------- a model folder without tokenizer

def test_model_without_tokenizer_warns_in_one_line_and_records_it(tiny_llama, workspace, capsys):
    """It still exports (a session fed token ids runs it), says in one warning line that
    onnxruntime-genai cannot tokenize for it (true: genai's tokenizer fails on the folder), and
    the manifest keeps the sentence."""
    import onnxruntime_genai as og

    src = workspace / "no-tokenizer"
    shutil.copytree(tiny_llama, src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    out = workspace / "out"
    rc, err = run_main(["model", str(src), "-o", str(out), *QUANT_FLAGS], capsys)
    assert rc == 0, err
    line = assert_one_error_line(err, "sinq-export model: warning:", str(src), "no tokenizer file",
                                 "onnxruntime-genai", "lm_head stays 8-bit")
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert len(manifest["warnings"]) == 2 and all(w in line for w in manifest["warnings"])
    model = og.Model(str(out))
    with pytest.raises(Exception, match="(?i)tokenizer"):
        og.Tokenizer(model)


def test_model_with_tokenizer_records_no_warning(tiny_llama, workspace, capsys):
    out = workspace / "out"
    rc, err = run_main(["model", str(tiny_llama), "-o", str(out), *QUANT_FLAGS], capsys)
    assert rc == 0, err
    assert json.loads((out / MANIFEST_FILE).read_text())["warnings"] == []
    assert "warning" not in err


# ------------------------------------------------------- hypothesis: no deadline, suite-wide

def test_property_tests_have_no_deadline():
    """An example slower than hypothesis' default 200 ms deadline passes: the conftest profile
    turns deadlines off for every test, including those with their own @settings."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    assert settings.default.deadline is None

    @settings(max_examples=2, database=None)
    @given(st.integers(0, 1))
    def slow_example(i: int) -> None:
        time.sleep(0.3)

    slow_example()


def test_records_already_spilled_are_not_counted_twice(tiny_llama, tmp_path, monkeypatch,
                                                        capsys):
    """The check after the calibrate stage sees the spilled records' bytes already gone from
    the free space, so it counts only what is still to be written: a file system with room
    for the output and the records once (what the first check asked for) takes the export."""
    import collections

    from sinq_export.export import diskspace

    disk = tmp_path / "disk"
    disk.mkdir()
    usage = collections.namedtuple("usage", "total used free")
    capacity = []
    checks = []
    real_check = diskspace.check_free_space

    def written() -> int:
        return sum(p.stat().st_size for p in disk.rglob("*") if p.is_file())

    def check(target, needed):
        if not capacity:  # a file system that holds exactly what the first check asks for
            capacity.append(needed + written())
        checks.append((needed, written()))
        return real_check(target, needed)

    monkeypatch.setattr(diskspace.shutil, "disk_usage",
                        lambda path: usage(capacity[0], written(), capacity[0] - written()))
    monkeypatch.setattr("sinq_export.export.decoder.check_free_space", check)
    # the default preset calibrates the head on text (the folder has a tokenizer): records spill
    rc, err = run_main(["model", str(tiny_llama), "-o", str(disk / "out")], capsys)
    assert rc == 0, err
    (first, _), (second, spilled) = checks
    assert spilled > 0  # the calibrated records were on disk at the second check
    assert second <= first - spilled
