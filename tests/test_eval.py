"""Perplexity evaluation: protocol helpers, torch vs onnxruntime agreement, the comparison table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _models import cached_tiny_export, needs_tokenizer, tiny_float_model, tiny_tokens, tokenizer_dir

from sinq_export import eval as ev
from sinq_export.cli import main
from sinq_export.data import summed_nll


def _windows(n_windows: int = 2, length: int = 24) -> np.ndarray:
    return tiny_tokens(n_windows * length).reshape(n_windows, length)


@pytest.fixture()
def fixed_windows(monkeypatch):
    """Replace the Wikipedia windows by the fixture's fixed sentence (fast, no text package)."""
    monkeypatch.setattr(ev, "text_windows",
                        lambda tok, text="wikipedia", n_windows=4, length=512: _windows(n_windows, length))


def test_table_ratio_and_markdown():
    t = ev.PplTable(protocol=ev.protocol("wikipedia", 4, 512))
    mk = lambda label, bits, ppl: ev.PplResult(label, bits, 64 if bits else None, "torch", ppl,  # noqa: E731
                                               math.log(ppl), 2044, 1.0)
    t.rows += [mk("float", None, 20.0), mk("rtn", 4, 30.0), mk("sinq", 4, 23.0), mk("rtn", 3, 60.0)]
    assert t.ratio(4) == pytest.approx(0.3)
    assert t.ratio(3) is None  # no SINQ row at 3 bits
    md = t.to_markdown()
    assert "| sinq | 4 | 64 | torch | 23.00 | 0.300 |" in md and "stride 512" in md
    d = t.to_dict()
    assert d["ratio_sinq_vs_rtn"] == {"4": pytest.approx(0.3)} and d["protocol"]["length"] == 512


def test_parse_methods_and_bits():
    assert ev.parse_methods("float, SINQ,rtn,sinq") == ["float", "sinq", "rtn"]
    assert ev.parse_bits("3,4") == [3, 4]
    with pytest.raises(ValueError, match="unknown method"):
        ev.parse_methods("float,gptq")
    with pytest.raises(ValueError):
        ev.parse_bits("4,nine")
    with pytest.raises(ValueError):
        ev.parse_bits("9")


def test_summed_nll_matches_definition():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 7))
    window = rng.integers(0, 7, size=5)
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -sum(lp[i, window[i + 1]] for i in range(4))
    assert summed_nll(logits, window) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return cached_tiny_export(tmp_path_factory)


@needs_tokenizer
def test_torch_and_onnxruntime_perplexity_agree(tiny):
    from sinq_export.validate.core import reference_model

    windows = _windows(2, 24)
    ref = reference_model(tiny)  # rebuilt from the source folder + the ONNX tensors
    pt = ev.perplexity_torch(ref, windows, "sinq")
    ox = ev.perplexity_onnx(tiny, windows)
    assert pt.n_predictions == ox.n_predictions == 2 * 23
    assert ox.backend == "onnxruntime" and ox.label == "sinq" and ox.bits == 4
    assert ox.ppl == pytest.approx(pt.ppl, rel=1e-5)


@needs_tokenizer
def test_compare_float_rtn_sinq_on_the_fly(fixed_windows):
    from transformers import AutoTokenizer

    model = tiny_float_model()
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir()))
    table = ev.compare(model=model, tokenizer=tok, methods=["float", "rtn", "sinq"], bits=[3],
                       group_size=16, n_windows=2, length=24)
    labels = [(r.label, r.bits) for r in table.rows]
    assert labels == [("float", None), ("rtn", 3), ("sinq", 3)]
    assert all(math.isfinite(r.ppl) and r.ppl > 1 for r in table.rows)
    assert table.ratio(3) is not None
    assert not any(type(m).__name__ == "SinqLinear" for m in model.modules())  # float untouched


@needs_tokenizer
def test_cli_eval_export_folder_both_backends(tiny, fixed_windows, capsys):
    assert main(["eval", str(tiny), "--windows", "2", "--length", "24", "--json"]) == 0
    ort = json.loads(capsys.readouterr().out)
    assert ort["rows"][0]["backend"] == "onnxruntime" and ort["protocol"]["stride"] == 24
    assert main(["eval", str(tiny), "--backend", "torch", "--windows", "2", "--length", "24"]) == 0
    out = capsys.readouterr().out
    assert "| sinq | 4 | 16 | torch |" in out
    torch_ppl = float(out.split("| torch |")[1].split("|")[0])
    assert torch_ppl == pytest.approx(ort["rows"][0]["ppl"], rel=1e-3)


def test_cli_eval_usage_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--backend", "onnxruntime"]) == 2
    assert "not an export folder" in capsys.readouterr().err
    assert main(["eval", "--compare", "float,awq"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["eval", "--windows", "0"]) == 2


def test_torch_perplexity_matches_data_perplexity():
    """eval's NLL bookkeeping is the protocol of sinq_export.data.perplexity, number for number."""
    import torch

    from sinq_export.data import perplexity

    model = tiny_float_model()
    windows = np.random.default_rng(0).integers(0, 49152, size=(2, 16))
    ours = ev.perplexity_torch(model, windows)
    assert ours.n_predictions == 30
    assert ours.ppl == pytest.approx(perplexity(model, torch.as_tensor(windows)), rel=1e-9)
