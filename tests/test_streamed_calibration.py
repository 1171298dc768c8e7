"""Calibration on a model streamed block by block, and the head calibrated alone.

`models.load_causal_lm_streamed` builds the decoder blocks on the meta device and loads each
from the checkpoint when it first runs; `quantize_model` with ``calibrate`` or
``calibrate_head`` then needs one float block at a time. Real transformers models of every
supported family (random weights, saved to a folder), real checkpoints on disk.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from _helpers import PROMPT, STEPS, cpu_session, error_lines
from _models import ARCHS, make_model_dir, tiny_tokenizer
from safetensors.torch import load_file, save_file

from sinq_export.checkpoint import Checkpoint
from sinq_export.config import SinqConfig
from sinq_export.models import ModelLoadError, decoder_blocks, load_causal_lm, load_causal_lm_streamed
from sinq_export.nn import quantize_model, quantized_layers
from sinq_export.quant.stats import LayerStats, output_error
from sinq_export.saved import SpilledRecords

WINDOWS = torch.randint(0, 320, (4, 24), generator=torch.Generator().manual_seed(3))


def _with_tokenizer(folder):
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_streamed_model_computes_what_the_loaded_one_does(tmp_path, model_type):
    """Blocks hold no weights until they run; then the logits equal from_pretrained's."""
    make_model_dir(tmp_path / "hf", model_type)
    _with_tokenizer(tmp_path / "hf")
    streamed, _ = load_causal_lm_streamed(tmp_path / "hf")
    assert all(p.is_meta for b in decoder_blocks(streamed) for p in b.parameters())
    assert not any(p.is_meta for n, p in streamed.named_parameters() if ".layers." not in n)
    full, _ = load_causal_lm(tmp_path / "hf")
    with torch.no_grad():
        got = streamed(input_ids=WINDOWS[:1]).logits
        want = full(input_ids=WINDOWS[:1]).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _records(model):
    return {n: m.record for n, m in quantized_layers(model).items()}


def _same_record(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f))
               for f in ("packed", "scales", "zero_points", "col_scale"))


@pytest.mark.parametrize("calibrated", ["all", "head"])
def test_streamed_calibration_gives_the_in_memory_records_and_drops_the_float_blocks(
        tmp_path, calibrated):
    """Streamed == loaded, for a calibrated model and for the head calibrated alone (whose
    decoder's energy refit first runs a float pass that releases and reloads each block)."""
    make_model_dir(tmp_path / "hf", "qwen2")
    _with_tokenizer(tmp_path / "hf")
    cfg = SinqConfig(group_size=16, lm_head_bits=4, calibrate=calibrated == "all",
                     calibrate_head=True)
    streamed, _ = load_causal_lm_streamed(tmp_path / "hf")
    quantize_model(streamed, cfg, progress=False, calibration=WINDOWS)
    full, _ = load_causal_lm(tmp_path / "hf")
    quantize_model(full, cfg, progress=False, calibration=WINDOWS)
    got, want = _records(streamed), _records(full)
    assert set(got) == set(want) and len(got) == 2 * 7 + 1
    assert all(_same_record(got[n], want[n]) for n in want)
    # no float linear weight is left in any block: only records, norms and biases
    for block in decoder_blocks(streamed):
        assert not any(isinstance(m, torch.nn.Linear) for m in block.modules())


def test_records_spilled_block_by_block_are_the_in_memory_ones(tmp_path):
    """With a `SpilledRecords` sink every record waits on disk (one file each) as its block
    finishes, equal to the in-memory run's, and no block keeps a tensor of its linears."""
    make_model_dir(tmp_path / "hf", "qwen2")
    _with_tokenizer(tmp_path / "hf")
    cfg = SinqConfig(group_size=16, lm_head_bits=4, calibrate_head=True)
    (tmp_path / "spill").mkdir()
    sink = SpilledRecords(tmp_path / "spill")
    streamed, _ = load_causal_lm_streamed(tmp_path / "hf")
    quantize_model(streamed, cfg, progress=False, calibration=WINDOWS, sink=sink)
    full, _ = load_causal_lm(tmp_path / "hf")
    quantize_model(full, cfg, progress=False, calibration=WINDOWS)
    want = _records(full)
    assert set(sink) == set(want) and len(list((tmp_path / "spill").iterdir())) == len(want)
    assert all(_same_record(sink[n], want[n]) and sink[n].shape == want[n].shape
               and (sink[n].bits, sink[n].group_size) == (want[n].bits, want[n].group_size)
               for n in want)
    assert all(p.is_meta for m in quantized_layers(streamed).values() for p in m.buffers())
    del sink["lm_head"]
    assert "lm_head" not in sink and len(list((tmp_path / "spill").iterdir())) == len(want) - 1


def test_head_calibrated_alone_keeps_the_decoder_calibration_free(tmp_path):
    """``calibrate_head``: every decoder record is the calibration-free one, the head's is
    calibrated on the final norm of the quantized decoder's output and has the lower output
    error there. (Without the energy refit: with it, the decoder's energies come from the
    calibration text in one run and from the random-id probe in the other.)"""
    make_model_dir(tmp_path / "hf", "llama")
    _with_tokenizer(tmp_path / "hf")
    base = SinqConfig(group_size=16, lm_head_bits=4, shared_col_scale="mlp", energy_refit=0)
    model, _ = load_causal_lm_streamed(tmp_path / "hf")
    report = quantize_model(model, base.replace(calibrate_head=True), progress=False,
                            calibration=WINDOWS)
    plain, _ = load_causal_lm(tmp_path / "hf")
    float_head = copy.deepcopy(plain.lm_head.weight.detach())
    quantize_model(plain, base, progress=False)
    got, want = _records(model), _records(plain)
    body = [n for n in want if n != "lm_head"]
    assert body and all(_same_record(got[n], want[n]) for n in body)
    labels = {r.name: r.method for r in report.layers}
    assert labels["lm_head"] == "sinq+calibrated"
    assert all(not labels[n].endswith("+calibrated") for n in body)

    captured = []
    hook = plain.lm_head.register_forward_hook(lambda _m, a, _o: captured.append(a[0]))
    with torch.no_grad():
        plain(input_ids=WINDOWS)
    hook.remove()
    stats = LayerStats(float_head.shape[1])
    stats.add(captured[0])
    h = stats.hessian()

    def err(rec) -> float:
        return output_error(float_head, rec.dequantize(), h)

    assert err(got["lm_head"]) < err(want["lm_head"])


def test_a_block_tensor_the_checkpoint_lacks_is_named(tmp_path):
    make_model_dir(tmp_path / "hf", "llama")
    _with_tokenizer(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    model, _ = load_causal_lm_streamed(tmp_path / "hf")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        quantize_model(model, SinqConfig(group_size=16, calibrate=True), progress=False,
                       calibration=WINDOWS)


def test_model_default_calibrates_a_4bit_head_and_records_it(tmp_path, capsys):
    """The first command's head: 4-bit g32 calibrated alone (manifest says so), beside a 4-bit
    table; without a tokenizer in the source the head stays 8-bit, and the table with it,
    with a warning."""
    from sinq_export.cli import main

    make_model_dir(tmp_path / "hf", "llama")
    assert main(["model", str(tmp_path / "hf"), "-o", str(tmp_path / "plain"), "--group-size",
                 "32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert any("lm_head stays 8-bit" in w for w in summary["warnings"])
    manifest = json.loads((tmp_path / "plain" / "sinq_export.json").read_text())
    assert manifest["layers"]["lm_head"]["bits"] == 8
    assert manifest["layers"]["model.embed_tokens"]["bits"] == 8

    _with_tokenizer(tmp_path / "hf")
    assert main(["model", str(tmp_path / "hf"), "-o", str(tmp_path / "out"), "--group-size",
                 "32", "--calibration-windows", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert "calibrate" in summary["timings_s"] and summary["warnings"] == []
    manifest = json.loads((tmp_path / "out" / "sinq_export.json").read_text())
    assert not list(tmp_path.glob(".out.*"))  # the records' scratch folder is gone
    head = manifest["layers"]["lm_head"]
    assert (head["bits"], head["group_size"]) == (4, 32)
    assert manifest["calibration"]["layers"] == "lm_head"
    assert manifest["layers"]["model.embed_tokens"]["bits"] == 4


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_probe_energies_are_the_float_inputs_and_hold_one_block(tmp_path, model_type,
                                                                monkeypatch):
    """`input_energies` on a streamed model (blocks released as it goes, no tokenizer) equals
    ``E[x^2]`` of every linear's input hooked in one plain forward of the loaded float model;
    the head's is its input, the final norm's output; an export streams the same energies."""
    from sinq_export.calibration.forward import input_energies
    from sinq_export.calibration.probe import probe_tokens
    from sinq_export.linear import eligible_linears

    make_model_dir(tmp_path / "hf", model_type)
    _with_tokenizer(tmp_path / "hf")  # only the loaded model's loader wants one
    cfg = SinqConfig(group_size=16, lm_head_bits=4, probe_tokens=32)
    read: list[str] = []
    load = Checkpoint.load
    monkeypatch.setattr(Checkpoint, "load", lambda self, name, *a, **k: (
        read.append(name), load(self, name, *a, **k))[1])
    streamed, tok = load_causal_lm_streamed(tmp_path / "hf", with_tokenizer=False)
    assert tok is None
    ids, info = probe_tokens(streamed, cfg)
    names = list(eligible_linears(streamed, cfg))
    got = input_energies(streamed, ids, names, release=True)
    assert all(p.is_meta for b in decoder_blocks(streamed) for p in b.parameters())
    # the table is looked up row by row and the head is never read: neither is loaded whole
    assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(read)

    full, _ = load_causal_lm(tmp_path / "hf")
    seen: dict[str, torch.Tensor] = {}
    hooks = [full.get_submodule(n).register_forward_hook(
        lambda _m, a, _o, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
        for n in names]
    with torch.no_grad():
        full(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    assert set(got) == set(names) == set(seen) and "lm_head" in got
    for n in names:
        torch.testing.assert_close(got[n].diag(), seen[n].square().mean(0), rtol=1e-4, atol=1e-7)
    assert info["tokens"] == 32


def test_default_export_streams_the_probe_and_records_it(tmp_path):
    """The default export measures the energies first (manifest ``probe``), its records differ
    from weight-only SINQ's, and its ONNX model computes quantize_model's torch model."""
    from sinq_export.export import export_causal_lm
    from sinq_export.validate.runners import run_ort_lm, run_torch_lm

    model = make_model_dir(tmp_path / "hf", "llama")
    cfg = SinqConfig(group_size=16, probe_tokens=32)
    res = export_causal_lm(tmp_path / "hf", tmp_path / "out", cfg, progress=False)
    plain = export_causal_lm(tmp_path / "hf", tmp_path / "plain", cfg.replace(energy_refit=0),
                             progress=False)
    assert res.manifest["probe"]["tokens"] == 32 and "probe" not in plain.manifest
    assert "calibrate" in res.timings and "calibrate" not in plain.timings
    quantize_model(model, cfg, progress=False)
    want, fed = run_torch_lm(model, PROMPT, STEPS)
    got = run_ort_lm(cpu_session(tmp_path / "out"), PROMPT, fed)
    assert float(abs(got.logits - want.logits).max() / abs(want.logits).max()) <= 1e-4
    other = run_ort_lm(cpu_session(tmp_path / "plain"), PROMPT, fed)
    assert float(abs(other.logits - got.logits).max()) > 0


def test_text_too_short_for_the_calibration_is_one_line(tmp_path, capsys, monkeypatch):
    """A tokenizer that makes too few tokens of the calibration text: exit 2, one line that
    says how many it made and how many were needed, no output folder."""
    from sinq_export.calibration import windows
    from sinq_export.cli import main

    make_model_dir(tmp_path / "hf", "llama")
    _with_tokenizer(tmp_path / "hf")
    monkeypatch.setattr(windows, "load_text", lambda _name: "w1 w2 w3 " * 30)
    capsys.readouterr()
    assert main(["model", str(tmp_path / "hf"), "-o", str(tmp_path / "out")]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert "calibration:" in line and "90 tokens" in line, line
    assert not (tmp_path / "out").exists()
