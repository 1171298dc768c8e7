"""The CLI shell: flags -> SinqConfig, exit codes, JSON output, clear errors."""

import json
import os
import re

import pytest
from _models import tiny_llama_dir

from sinq_export.cli import build_parser, config_from_args, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("quantize", "model", "validate", "eval"):
        assert cmd in out


def test_flags_build_one_config():
    args = build_parser().parse_args(
        ["quantize", "-o", "x", "--bits", "3", "--group-size", "128", "--method", "rtn",
         "--override", "down_proj=8", "--exclude", "lm_head", "--exclude", "embed"])
    cfg = config_from_args(args)
    assert (cfg.bits, cfg.group_size, cfg.method) == (3, 128, "rtn")
    assert cfg.overrides == (("down_proj", 8),)
    assert cfg.exclude == ("lm_head", "embed")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--group-size", "48"], "power of two"),
        (["--override", "down_proj"], "REGEX=BITS"),
        (["--method", "rtn", "--kurtosis-gate", "5"], "kurtosis_gate=5.0 does not apply"),
    ],
)
def test_bad_flags_exit_2_with_a_message(tmp_path, capsys, argv, message):
    rc = main(["quantize", str(tmp_path / "missing"), "-o", str(tmp_path / "o"), *argv])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unsupported_bits_is_rejected_by_argparse(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "-o", str(tmp_path / "o"), "--bits", "1"])
    assert exc.value.code == 2


def test_missing_model_dir_exit_2(tmp_path, capsys):
    rc = main(["quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "o")])
    assert rc == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_writes_safetensors_and_json(tmp_path, capsys):
    src = tiny_llama_dir(tmp_path)
    out = tmp_path / "q"
    rc = main(["quantize", str(src), "-o", str(out), "--group-size", "32", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layers"] == 7 and 0 < summary["mean_rel_error"] < 0.2
    assert (out / "quantized.safetensors").is_file() and (out / "sinq_quantized.json").is_file()
    rc = main(["quantize", str(src), "-o", str(out), "--group-size", "32"])
    assert rc == 2  # exists, no --overwrite
    assert main(["quantize", str(src), "-o", str(out), "--group-size", "32", "--overwrite"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"quantized 7 linears in [0-9.]+ s, mean relative error 0\.[0-9]{4} -> "
                        + re.escape(str(out)), line)


@pytest.mark.parametrize("user", [None, ("ACTIVE", "0")])
def test_the_console_sets_the_threads_and_heap_policies(user, monkeypatch):
    """Spinning OpenMP threads collapse under a busy neighbour and 4 KB page faults cost a
    big export a fifth of its time (docs/presets.md): the entry point asks for a passive wait
    and torch's huge pages before torch loads (leaving a user's own choices alone) and fixes
    glibc's mmap threshold (`heap.return_big_blocks_at_once`)."""
    import sinq_export.cli
    from sinq_export import console

    names = ("OMP_WAIT_POLICY", "THP_MEM_ALLOC_ENABLE")
    for name, value in zip(names, user or ("", "")):
        monkeypatch.setenv(name, value)  # restored after the test
        if user is None:
            monkeypatch.delenv(name)
    seen = []
    monkeypatch.setattr(sinq_export.cli, "main",
                        lambda: seen.append(tuple(os.environ[n] for n in names)) or 0)
    monkeypatch.setattr(console, "return_big_blocks_at_once", lambda: seen.append("mallopt"))
    assert console.main() == 0
    assert seen == ["mallopt", user or ("PASSIVE", "1")]

