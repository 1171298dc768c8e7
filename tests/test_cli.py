"""The CLI shell: flags -> SinqConfig, exit codes, JSON output, clear errors."""

import json

import pytest
import torch

from sinq_export.cli import build_parser, config_from_args, main


def tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      architectures=["LlamaForCausalLM"])
    folder = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"w{i}": i + 1 for i in range(127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


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
