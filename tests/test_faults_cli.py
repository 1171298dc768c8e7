"""Fault cases the CLI owns beyond tests/test_faults.py: errors raised inside the export's
writer, flag values argparse lets through, signals while importing, a disk that fills during
the write, parents of -o left behind, argparse's own errors, a model folder without tokenizer.

Each case runs on tiny models made here and asserts the exit code, one error line on stderr
naming the problem, no traceback, nothing left behind (temp folders, parents we created) and
pre-existing data byte-identical.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_faults import (
    QUANT_FLAGS,
    REPO,
    assert_one_error_line,
    cli_env,
    partials,
    run_main,
    tree_digest,
    write_tiny_llama,
)

from sinq_export.cli import EXIT_SIGINT, EXIT_USAGE

WEIGHT_ONLY = ["--energy-refit", "0", "--lm-head-bits", "8"]  # no forward pass reads a tensor


def write_tiny_qwen2(folder: Path) -> Path:
    """A random-weight Qwen2 (q/k/v biases, untied head) with the tiny Llama's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    llama = write_tiny_llama(folder.parent / f"{folder.name}-tokenizer", layers=1)
    cfg = Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(llama).save_pretrained(folder)
    shutil.rmtree(llama)
    return folder


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
def tiny_llama(tmp_path_factory) -> Path:  # noqa: ANN001
    return write_tiny_llama(tmp_path_factory.mktemp("src") / "tiny-llama")


@pytest.fixture
def workspace(tmp_path) -> Path:  # noqa: ANN001
    """A parent folder holding the user's other data, which must survive every case."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("the user's notes\n")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:  # noqa: ANN001
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

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
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


def test_ctrl_c_while_importing_is_one_line_and_exit_130(tiny_llama, workspace):
    """SIGINT while torch is being imported, before `cli.main` runs: the console entry point
    (what the installed `sinq-export` script calls) answers with one line, exit 130."""
    out = workspace / "new" / "out"
    before = tree_digest(workspace)
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sinq_export.console import main; sys.exit(main())",
         "model", str(tiny_llama), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=REPO)
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
